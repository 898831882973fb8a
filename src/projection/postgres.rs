//! The staff projection on PostgreSQL: `households` (the row as JSON, with the columns the
//! staff queries select on: station, village, last change, review state; indexed by
//! village and by last change), `visits` and `village_counts`, created by the store's
//! migrations (`storage::postgres`). A household's re-projection is one transaction.
//! Rows are read a page at a time and handed out between round trips, so a caller may
//! read other rows while it iterates. Must not: compute rows or counters.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::store::{ProjectionStore, RowWrite};
use super::{HouseholdRow, VillageCounts};
use crate::ids::DocumentId;
use crate::records::VisitRow;
use crate::storage::postgres::{database_error as db, PgStore};
use crate::storage::StorageError;

/// Rows fetched per round trip while iterating.
const PAGE: i64 = 256;

pub struct PgProjection {
    store: Arc<PgStore>,
}

impl PgProjection {
    pub fn new(store: Arc<PgStore>) -> Self {
        Self { store }
    }

    /// One page of `station`'s rows after `after`, by id.
    fn page(
        &self,
        station: &str,
        after: Option<uuid::Uuid>,
    ) -> Result<Vec<HouseholdRow>, StorageError> {
        let station = station.to_string();
        self.store.with_client(move |c| {
            Box::pin(async move {
                let rows = match after {
                    Some(after) => {
                        c.query(
                            "SELECT row FROM households WHERE station = $1 AND id > $2
                             ORDER BY id LIMIT $3",
                            &[&station, &after, &PAGE],
                        )
                        .await
                    }
                    None => {
                        c.query(
                            "SELECT row FROM households WHERE station = $1 ORDER BY id LIMIT $2",
                            &[&station, &PAGE],
                        )
                        .await
                    }
                }
                .map_err(db)?;
                rows.iter()
                    .map(|r| json(r.get(0), "household row"))
                    .collect()
            })
        })
    }

    fn stations(&self) -> Result<Vec<String>, StorageError> {
        self.store.with_client(|c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT DISTINCT station COLLATE \"C\" AS s FROM households ORDER BY s",
                        &[],
                    )
                    .await
                    .map_err(db)?;
                Ok(rows.iter().map(|r| r.get(0)).collect())
            })
        })
    }
}

fn json<T: serde::de::DeserializeOwned>(
    v: serde_json::Value,
    what: &str,
) -> Result<T, StorageError> {
    serde_json::from_value(v).map_err(|e| StorageError::Corrupt(format!("{what}: {e}")))
}

fn uuid(doc: DocumentId) -> uuid::Uuid {
    uuid::Uuid::from_bytes(*doc.as_bytes())
}

impl ProjectionStore for PgProjection {
    fn row(&self, station: &str, doc: DocumentId) -> Result<Option<HouseholdRow>, StorageError> {
        let station = station.to_string();
        self.store.with_client(move |c| {
            Box::pin(async move {
                let row = c
                    .query_opt(
                        "SELECT row FROM households WHERE station = $1 AND id = $2",
                        &[&station, &uuid(doc)],
                    )
                    .await
                    .map_err(db)?;
                row.map(|r| json(r.get(0), "household row")).transpose()
            })
        })
    }

    fn for_each_row(
        &self,
        station: Option<&str>,
        each: &mut dyn FnMut(HouseholdRow) -> bool,
    ) -> Result<(), StorageError> {
        let stations = match station {
            Some(s) => vec![s.to_string()],
            None => self.stations()?,
        };
        for station in stations {
            let mut after = None;
            loop {
                let page = self.page(&station, after)?;
                let full = page.len() as i64 == PAGE;
                for row in page {
                    after = Some(uuid(row.id));
                    if !each(row) {
                        return Ok(());
                    }
                }
                if !full {
                    break;
                }
            }
        }
        Ok(())
    }

    fn for_each_visit(
        &self,
        doc: DocumentId,
        each: &mut dyn FnMut(VisitRow) -> bool,
    ) -> Result<(), StorageError> {
        // A household's visits are bounded by the document's operation limit: one query.
        let visits: Vec<VisitRow> = self.store.with_client(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT row FROM visits WHERE doc = $1 ORDER BY visit_id COLLATE \"C\"",
                        &[&uuid(doc)],
                    )
                    .await
                    .map_err(db)?;
                rows.iter().map(|r| json(r.get(0), "visit row")).collect()
            })
        })?;
        for v in visits {
            if !each(v) {
                break;
            }
        }
        Ok(())
    }

    fn counts(&self, station: &str, village: &str) -> Result<VillageCounts, StorageError> {
        let (station, village) = (station.to_string(), village.to_string());
        self.store.with_client(move |c| {
            Box::pin(async move {
                let row = c
                    .query_opt(
                        "SELECT counts FROM village_counts WHERE station = $1 AND village = $2",
                        &[&station, &village],
                    )
                    .await
                    .map_err(db)?;
                match row {
                    Some(r) => json(r.get(0), "village counts"),
                    None => Ok(VillageCounts::default()),
                }
            })
        })
    }

    fn counts_for_update(
        &self,
        station: &str,
        village: &str,
    ) -> Result<VillageCounts, StorageError> {
        let (station, village) = (station.to_string(), village.to_string());
        let empty = serde_json::to_value(VillageCounts::default()).expect("counts serialise");
        self.store.with_transaction(move |c| {
            Box::pin(async move {
                // The row must exist to be locked: a concurrent first household of the
                // village waits here for the other's insert to commit or roll back.
                c.execute(
                    "INSERT INTO village_counts (station, village, counts) VALUES ($1, $2, $3)
                     ON CONFLICT DO NOTHING",
                    &[&station, &village, &empty],
                )
                .await
                .map_err(db)?;
                let row = c
                    .query_one(
                        "SELECT counts FROM village_counts WHERE station = $1 AND village = $2
                         FOR UPDATE",
                        &[&station, &village],
                    )
                    .await
                    .map_err(db)?;
                json(row.get(0), "village counts")
            })
        })
    }

    fn all_counts(&self) -> Result<BTreeMap<(String, String), VillageCounts>, StorageError> {
        self.store.with_client(|c| {
            Box::pin(async move {
                let rows = c
                    .query("SELECT station, village, counts FROM village_counts", &[])
                    .await
                    .map_err(db)?;
                rows.iter()
                    .map(|r| Ok(((r.get(0), r.get(1)), json(r.get(2), "village counts")?)))
                    .collect()
            })
        })
    }

    fn write(&self, w: &RowWrite<'_>) -> Result<(), StorageError> {
        let row = w.row.clone();
        let row_json = serde_json::to_value(&row).expect("rows serialise");
        let put: Vec<(String, serde_json::Value)> = w
            .put_visits
            .iter()
            .map(|v| {
                (
                    v.id.clone(),
                    serde_json::to_value(v).expect("rows serialise"),
                )
            })
            .collect();
        let removed = w.removed_visits.clone();
        let counts = w.counts.clone();
        self.store.with_transaction(move |tx| {
            Box::pin(async move {
                let id = uuid(row.id);
                for (visit_id, v) in &put {
                    tx.execute(
                        "INSERT INTO visits (doc, visit_id, row) VALUES ($1, $2, $3)
                         ON CONFLICT (doc, visit_id) DO UPDATE SET row = excluded.row",
                        &[&id, visit_id, v],
                    )
                    .await
                    .map_err(db)?;
                }
                for visit_id in &removed {
                    tx.execute(
                        "DELETE FROM visits WHERE doc = $1 AND visit_id = $2",
                        &[&id, visit_id],
                    )
                    .await
                    .map_err(db)?;
                }
                for (station, village, c) in &counts {
                    if c.is_empty() {
                        tx.execute(
                            "DELETE FROM village_counts WHERE station = $1 AND village = $2",
                            &[station, village],
                        )
                        .await
                        .map_err(db)?;
                    } else {
                        let value = serde_json::to_value(c).expect("counts serialise");
                        tx.execute(
                            "INSERT INTO village_counts (station, village, counts)
                             VALUES ($1, $2, $3)
                             ON CONFLICT (station, village) DO UPDATE SET counts = excluded.counts",
                            &[station, village, &value],
                        )
                        .await
                        .map_err(db)?;
                    }
                }
                tx.execute(
                    "INSERT INTO households (station, id, village, updated_at_ms, review_state, row)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (station, id) DO UPDATE SET village = excluded.village,
                         updated_at_ms = excluded.updated_at_ms,
                         review_state = excluded.review_state, row = excluded.row",
                    &[
                        &row.station,
                        &id,
                        &row.village,
                        &row.updated_at_ms,
                        &row.summary.review_state,
                        &row_json,
                    ],
                )
                .await
                .map_err(db)?;
                Ok(())
            })
        })
    }

    fn replace_counts(
        &self,
        counts: &BTreeMap<(String, String), VillageCounts>,
    ) -> Result<(), StorageError> {
        let counts: Vec<(String, String, serde_json::Value)> = counts
            .iter()
            .map(|((s, v), c)| {
                (
                    s.clone(),
                    v.clone(),
                    serde_json::to_value(c).expect("counts serialise"),
                )
            })
            .collect();
        self.store.with_transaction(move |tx| {
            Box::pin(async move {
                tx.execute("DELETE FROM village_counts", &[])
                    .await
                    .map_err(db)?;
                for (station, village, c) in &counts {
                    tx.execute(
                        "INSERT INTO village_counts (station, village, counts) VALUES ($1, $2, $3)",
                        &[station, village, c],
                    )
                    .await
                    .map_err(db)?;
                }
                Ok(())
            })
        })
    }

    fn clear(&self) -> Result<(), StorageError> {
        self.store.with_client(|c| {
            Box::pin(async move {
                c.batch_execute("TRUNCATE households, visits, village_counts")
                    .await
                    .map_err(db)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_postgres_projection_conforms() {
        crate::storage::postgres::tests::on_fresh_database(|store| {
            crate::projection::store::tests::run_all(&PgProjection::new(store))
        })
        .await;
    }

    /// Two batches changing one village's counters: the second reads them only after the
    /// first has committed, so neither change is lost (both read-modify-write the row).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_reads_counters_another_batch_is_changing_only_once_it_commits() {
        use crate::storage::documents::DocumentStore;
        crate::storage::postgres::tests::on_fresh_database(|store| {
            let rows = PgProjection::new(store.clone());
            let at = ("north".to_string(), "east".to_string());
            let five = VillageCounts {
                households: 5,
                ..Default::default()
            };
            rows.replace_counts(&BTreeMap::from([(at.clone(), five)]))
                .unwrap();
            store.begin_batch().unwrap();
            let mut counts = rows.counts_for_update(&at.0, &at.1).unwrap();
            counts.households += 1;
            rows.replace_counts(&BTreeMap::from([(at.clone(), counts)]))
                .unwrap();

            let (done_tx, done_rx) = std::sync::mpsc::channel();
            let other = {
                let (store, at) = (store.clone(), at.clone());
                std::thread::spawn(move || {
                    let rows = PgProjection::new(store.clone());
                    store.begin_batch().unwrap();
                    let seen = rows.counts_for_update(&at.0, &at.1).unwrap();
                    store.end_batch(true).unwrap();
                    let _ = done_tx.send(());
                    seen
                })
            };
            // Commit only once the other batch waits for the row (or has read it anyway,
            // which is the bug this test is for); bounded.
            let waiting = || {
                store
                    .with_client(|c| {
                        Box::pin(async move {
                            let n: i64 = c
                                .query_one("SELECT count(*) FROM pg_locks WHERE NOT granted", &[])
                                .await
                                .map_err(db)?
                                .get(0);
                            Ok(n)
                        })
                    })
                    .unwrap()
                    > 0
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !waiting() && done_rx.try_recv().is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the other batch never ran"
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            store.end_batch(true).unwrap();
            let seen = other.join().unwrap();
            assert_eq!(
                seen.households, 6,
                "the other batch saw the committed change"
            );
        })
        .await;
    }
}
