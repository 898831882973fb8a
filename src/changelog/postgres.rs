//! The change log on PostgreSQL: `provenance` (one row per accepted change, with an index
//! per document; the change feed is the same table in `seq` order), `actors`, and the
//! `change_seq` sequence, created by the store's migrations
//! (`storage::postgres`). Columns, not JSON, so a station's analysts can query who
//! delivered what and when. Must not: decide visibility (the caller's `visible` does).

use std::sync::Arc;

use super::store::ChangeLogStore;
use super::ProvenanceRow;
use crate::auth::{DeviceId, UserName};
use crate::ids::{DocumentId, Timestamp};
use crate::storage::postgres::{database_error as db, PgStore};
use crate::storage::StorageError;

/// Rows fetched per round trip while reading the feed.
const FEED_PAGE: i64 = 256;

pub struct PgChangeLog {
    store: Arc<PgStore>,
}

impl PgChangeLog {
    pub fn new(store: Arc<PgStore>) -> Self {
        Self { store }
    }
}

const COLUMNS: &str =
    "seq, doc, hash, actor, device, officer, received_at_ms, flagged, actor_bound_to, heads_after";

fn from_row(r: &tokio_postgres::Row) -> Result<ProvenanceRow, StorageError> {
    let corrupt = |what: &str| StorageError::Corrupt(format!("provenance row: {what}"));
    let device = |v: Option<String>| -> Result<Option<DeviceId>, StorageError> {
        v.map(|d| DeviceId::new(&d).map_err(|_| corrupt("a device name is not valid")))
            .transpose()
    };
    Ok(ProvenanceRow {
        seq: r.get::<_, i64>(0) as u64,
        doc: DocumentId::from_bytes(*r.get::<_, uuid::Uuid>(1).as_bytes()),
        hash: r.get(2),
        actor: r.get(3),
        device: device(r.get(4))?,
        user: UserName::new(&r.get::<_, String>(5))
            .map_err(|_| corrupt("an officer name is not valid"))?,
        received_at: Timestamp::from_millis(r.get::<_, i64>(6).max(0) as u64),
        flagged: r.get(7),
        actor_bound_to: device(r.get(8))?,
        heads_after: r.get(9),
    })
}

impl ChangeLogStore for PgChangeLog {
    fn bind_actor(
        &self,
        actor: &[u8],
        device: &DeviceId,
    ) -> Result<Option<DeviceId>, StorageError> {
        let (actor, device) = (actor.to_vec(), device.to_string());
        self.store.with_client(move |c| {
            Box::pin(async move {
                let inserted = c
                    .query_opt(
                        "INSERT INTO actors (actor, device) VALUES ($1, $2)
                         ON CONFLICT (actor) DO NOTHING RETURNING device",
                        &[&actor, &device],
                    )
                    .await
                    .map_err(db)?;
                if inserted.is_some() {
                    return Ok(None);
                }
                let bound: String = c
                    .query_one("SELECT device FROM actors WHERE actor = $1", &[&actor])
                    .await
                    .map_err(db)?
                    .get(0);
                Ok(DeviceId::new(&bound).ok())
            })
        })
    }

    fn next_seq(&self) -> Result<u64, StorageError> {
        self.store.with_client(|c| {
            Box::pin(async move {
                let n: i64 = c
                    .query_one("SELECT nextval('change_seq')", &[])
                    .await
                    .map_err(db)?
                    .get(0);
                Ok(n as u64)
            })
        })
    }

    fn append(&self, row: &ProvenanceRow) -> Result<(), StorageError> {
        let row = row.clone();
        self.store.with_client(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO provenance (seq, doc, hash, actor, device, officer,
                         received_at_ms, flagged, actor_bound_to, heads_after)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                     ON CONFLICT (seq) DO NOTHING",
                    &[
                        &(row.seq as i64),
                        &uuid::Uuid::from_bytes(*row.doc.as_bytes()),
                        &row.hash,
                        &row.actor,
                        &row.device.as_ref().map(|d| d.to_string()),
                        &row.user.to_string(),
                        &(row.received_at.as_millis() as i64),
                        &row.flagged,
                        &row.actor_bound_to.as_ref().map(|d| d.to_string()),
                        &row.heads_after,
                    ],
                )
                .await
                .map_err(db)?;
                Ok(())
            })
        })
    }

    fn history(&self, doc: DocumentId) -> Result<Vec<ProvenanceRow>, StorageError> {
        let doc = uuid::Uuid::from_bytes(*doc.as_bytes());
        self.store.with_client(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        &format!("SELECT {COLUMNS} FROM provenance WHERE doc = $1 ORDER BY seq"),
                        &[&doc],
                    )
                    .await
                    .map_err(db)?;
                rows.iter().map(from_row).collect()
            })
        })
    }

    fn feed(
        &self,
        after: u64,
        limit: usize,
        scan_max: usize,
        visible: &dyn Fn(DocumentId) -> bool,
    ) -> Result<(Vec<ProvenanceRow>, u64), StorageError> {
        let mut out = Vec::new();
        let mut next = after;
        let mut scanned = 0;
        loop {
            let from = next as i64;
            let page: Vec<ProvenanceRow> = self.store.with_client(move |c| {
                Box::pin(async move {
                    let rows = c
                        .query(
                            &format!(
                                "SELECT {COLUMNS} FROM provenance WHERE seq > $1 ORDER BY seq LIMIT $2"
                            ),
                            &[&from, &FEED_PAGE],
                        )
                        .await
                        .map_err(db)?;
                    rows.iter().map(from_row).collect()
                })
            })?;
            let full = page.len() as i64 == FEED_PAGE;
            for row in page {
                scanned += 1;
                next = row.seq;
                if visible(row.doc) {
                    out.push(row);
                }
                if out.len() >= limit || scanned >= scan_max {
                    return Ok((out, next));
                }
            }
            if !full {
                return Ok((out, next));
            }
        }
    }

    fn actors(&self) -> Result<Vec<(Vec<u8>, DeviceId)>, StorageError> {
        self.store.with_client(|c| {
            Box::pin(async move {
                let rows = c
                    .query("SELECT actor, device FROM actors ORDER BY actor", &[])
                    .await
                    .map_err(db)?;
                rows.iter()
                    .map(|r| {
                        let device = DeviceId::new(&r.get::<_, String>(1)).map_err(|_| {
                            StorageError::Corrupt(
                                "an actor is bound to an invalid device name".into(),
                            )
                        })?;
                        Ok((r.get::<_, Vec<u8>>(0), device))
                    })
                    .collect()
            })
        })
    }

    fn import(&self, rows: &[ProvenanceRow]) -> Result<(), StorageError> {
        let Some(last) = rows.iter().map(|r| r.seq).max() else {
            return Ok(());
        };
        for row in rows {
            self.append(row)?; // ON CONFLICT (seq) DO NOTHING
        }
        let last = last as i64;
        self.store.with_client(move |c| {
            Box::pin(async move {
                c.execute(
                    "SELECT setval('change_seq', greatest($1, (SELECT last_value FROM change_seq)))",
                    &[&last],
                )
                .await
                .map_err(db)?;
                Ok(())
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_postgres_change_log_conforms() {
        crate::storage::postgres::tests::on_fresh_database(|store| {
            crate::changelog::store::tests::run_all(&PgChangeLog::new(store))
        })
        .await;
    }
}
