//! The account directory on PostgreSQL: `directory` (one JSON record per key, with its
//! kind, so SQL can list a station's devices or users) and `audit`, created by the store's
//! migrations (`storage::postgres`). A directory change and its audit entry commit in one
//! transaction. Must not: decide anything about the records.

use std::sync::Arc;

use super::admin::AuditEntry;
use super::store::{DirectoryStore, NewAudit};
use crate::auth::directory::{Op, RecordKey};
use crate::auth::Record;
use crate::ids::Timestamp;
use crate::storage::documents::Durable;
use crate::storage::postgres::{database_error as db, PgStore};
use crate::storage::StorageError;

pub struct PgDirectory {
    store: Arc<PgStore>,
}

impl PgDirectory {
    pub fn new(store: Arc<PgStore>) -> Self {
        Self { store }
    }
}

fn kind(record: &Record) -> &'static str {
    match record {
        Record::Station(_) => "station",
        Record::Village(_) => "village",
        Record::User(_) => "user",
        Record::Device(_) => "device",
        Record::Enrolment(_) => "enrolment",
        Record::Session(_) => "session",
        Record::Household(_) => "household",
    }
}

impl DirectoryStore for PgDirectory {
    fn load(&self) -> Result<Vec<Record>, StorageError> {
        // Under the accounts' write lock (a reload): see `PgStore::with_own_transaction`.
        self.store.with_own_transaction(|c| {
            Box::pin(async move {
                let rows = c
                    .query("SELECT key, record FROM directory ORDER BY key", &[])
                    .await
                    .map_err(db)?;
                rows.iter()
                    .map(|r| {
                        let key: String = r.get(0);
                        serde_json::from_value(r.get::<_, serde_json::Value>(1)).map_err(|e| {
                            StorageError::Corrupt(format!(
                                "account record {key} is unreadable: {e}"
                            ))
                        })
                    })
                    .collect()
            })
        })
    }

    fn record(&self, key: &RecordKey) -> Result<Option<Record>, StorageError> {
        let key = String::from_utf8_lossy(&key.encode()).into_owned();
        self.store.with_client(move |c| {
            Box::pin(async move {
                let row = c
                    .query_opt("SELECT record FROM directory WHERE key = $1", &[&key])
                    .await
                    .map_err(db)?;
                row.map(|r| {
                    serde_json::from_value(r.get::<_, serde_json::Value>(0)).map_err(|e| {
                        StorageError::Corrupt(format!("account record {key} is unreadable: {e}"))
                    })
                })
                .transpose()
            })
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn insert_if_absent(&self, record: &Record) -> Result<Option<Record>, StorageError> {
        let key = String::from_utf8_lossy(&record.key().encode()).into_owned();
        let json = serde_json::to_value(record).expect("records serialise");
        let kind = kind(record);
        let store = self.store.clone();
        // Committed at once, not with the document's batch: every registration this node
        // holds in memory is then in the database, so a reload (another node's notice)
        // never drops one. A batch that then fails leaves a registration without a
        // document: it reserves the id for that device's village, whose retry it admits.
        self.store.with_own_transaction(move |tx| {
            Box::pin(async move {
                // Waits for another node's uncommitted insert of the key, then does nothing.
                let inserted = tx
                    .query_opt(
                        "INSERT INTO directory (key, kind, record) VALUES ($1, $2, $3)
                         ON CONFLICT (key) DO NOTHING RETURNING key",
                        &[&key, &kind, &json],
                    )
                    .await
                    .map_err(db)?;
                if inserted.is_some() {
                    store.notify_directory_changed(tx).await?;
                    return Ok(None);
                }
                let row = tx
                    .query_one("SELECT record FROM directory WHERE key = $1", &[&key])
                    .await
                    .map_err(db)?;
                serde_json::from_value(row.get::<_, serde_json::Value>(0))
                    .map(Some)
                    .map_err(|e| {
                        StorageError::Corrupt(format!("account record {key} is unreadable: {e}"))
                    })
            })
        })
    }

    fn commit(&self, ops: &[Op], audit: Option<&NewAudit>) -> Result<(), StorageError> {
        let ops = ops.to_vec();
        let audit = audit.cloned();
        let store = self.store.clone();
        // Under the accounts' write lock: see `PgStore::with_own_transaction`.
        self.store.with_own_transaction(move |tx| {
            Box::pin(async move {
                if !ops.is_empty() {
                    // The other nodes reload their directories once this commits.
                    store.notify_directory_changed(tx).await?;
                }
                for op in &ops {
                    match op {
                        Op::Put(r) => {
                            let key = String::from_utf8_lossy(&r.key().encode()).into_owned();
                            let json = serde_json::to_value(r).expect("records serialise");
                            tx.execute(
                                "INSERT INTO directory (key, kind, record) VALUES ($1, $2, $3)
                                 ON CONFLICT (key) DO UPDATE SET kind = excluded.kind,
                                     record = excluded.record",
                                &[&key, &kind(r), &json],
                            )
                            .await
                            .map_err(db)?;
                        }
                        Op::Remove(k) => {
                            let key = String::from_utf8_lossy(&k.encode()).into_owned();
                            tx.execute("DELETE FROM directory WHERE key = $1", &[&key])
                                .await
                                .map_err(db)?;
                        }
                    }
                }
                if let Some(a) = &audit {
                    tx.execute(
                        "INSERT INTO audit (seq, at_ms, operator, action, detail)
                         VALUES (nextval('audit_seq'), $1, $2, $3, $4)",
                        &[
                            &(a.at.as_millis() as i64),
                            &a.operator,
                            &a.action,
                            &a.detail,
                        ],
                    )
                    .await
                    .map_err(db)?;
                }
                Ok(())
            })
        })
    }

    fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StorageError> {
        let limit = limit.min(i64::MAX as usize) as i64;
        self.store.with_client(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT seq, at_ms, operator, action, detail FROM
                           (SELECT * FROM audit ORDER BY seq DESC LIMIT $1) latest
                         ORDER BY seq",
                        &[&limit],
                    )
                    .await
                    .map_err(db)?;
                Ok(rows
                    .iter()
                    .map(|r| AuditEntry {
                        seq: r.get::<_, i64>(0) as u64,
                        at: Timestamp::from_millis(r.get::<_, i64>(1).max(0) as u64),
                        operator: r.get(2),
                        action: r.get(3),
                        detail: r.get(4),
                    })
                    .collect())
            })
        })
    }

    fn import_audit(&self, entries: &[AuditEntry]) -> Result<(), StorageError> {
        let Some(last) = entries.iter().map(|e| e.seq).max() else {
            return Ok(());
        };
        let entries = entries.to_vec();
        self.store.with_transaction(move |tx| {
            Box::pin(async move {
                for e in &entries {
                    tx.execute(
                        "INSERT INTO audit (seq, at_ms, operator, action, detail)
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (seq) DO NOTHING",
                        &[
                            &(e.seq as i64),
                            &(e.at.as_millis() as i64),
                            &e.operator,
                            &e.action,
                            &e.detail,
                        ],
                    )
                    .await
                    .map_err(db)?;
                }
                tx.execute(
                    "SELECT setval('audit_seq', greatest($1, (SELECT last_value FROM audit_seq)))",
                    &[&(last as i64)],
                )
                .await
                .map_err(db)?;
                Ok(())
            })
        })
    }

    fn durable(&self) -> Durable {
        Box::pin(std::future::ready(Ok(()))) // each commit is its own transaction
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_postgres_directory_conforms() {
        crate::storage::postgres::tests::on_fresh_database(|store| {
            crate::accounts::store::tests::run_all(&PgDirectory::new(store))
        })
        .await;
    }
}
