//! The staff projection on PostgreSQL: `households` (the row as JSON, with the columns the
//! staff queries select on: station, village, last change, review state, quarantine,
//! conflicts, last visit, earliest due follow-up; indexed by each, and the row's matters,
//! follow-ups and officers by GIN indexes), `visits` and `village_counts`, created by the
//! store's migrations (`storage::postgres`). A household's re-projection is one
//! transaction. The staff list and the coverage figures are SQL over those indexes, and
//! must select exactly what [`Filter::matches`] does (the conformance suite compares
//! them). Rows are read a page at a time and handed out between round trips, so a caller
//! may read other rows while it iterates. Must not: compute rows or counters.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::store::{ListAnswer, ListQuery, ProjectionStore, RowWrite, TimeCounts};
use super::{Cursor, Filter, HouseholdRow, VillageCounts};
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

/// Parameters of a query built at run time.
type Params = Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>>;

/// A WHERE clause and its parameters, built a condition at a time.
#[derive(Default)]
struct Conditions {
    clauses: Vec<String>,
    params: Params,
}

impl Conditions {
    /// Adds `v` as the next parameter and returns its placeholder (`$n`).
    fn param(&mut self, v: impl tokio_postgres::types::ToSql + Sync + Send + 'static) -> String {
        self.params.push(Box::new(v));
        format!("${}", self.params.len())
    }

    fn and(&mut self, clause: String) {
        self.clauses.push(clause);
    }

    fn sql(&self) -> String {
        self.clauses.join(" AND ")
    }

    /// The rows of `station` within `villages`.
    fn scope(station: &str, villages: Option<&[String]>) -> Conditions {
        let mut c = Conditions::default();
        let p = c.param(station.to_string());
        c.and(format!("station = {p}"));
        if let Some(v) = villages {
            let p = c.param(v.to_vec());
            c.and(format!("village = ANY({p})"));
        }
        c
    }

    /// What [`Filter::matches`] selects, as SQL on the indexed columns.
    fn filter(&mut self, f: &Filter, now_ms: i64) {
        let p = self.param(f.quarantined.unwrap_or(false));
        self.and(format!("quarantined = {p}"));
        if let Some(v) = &f.village {
            let p = self.param(v.clone());
            self.and(format!("village = {p}"));
        }
        if let Some(o) = &f.officer {
            let p = self.param(serde_json::json!([o]));
            self.and(format!("row->'officers' @> {p}"));
        }
        if f.matter_kind.is_some() || f.matter_status.is_some() {
            let mut wanted = serde_json::Map::new();
            match f.matter_status.as_deref().unwrap_or("open") {
                "open" => wanted.insert("open".into(), true.into()),
                status => wanted.insert("status".into(), status.into()),
            };
            if let Some(k) = f.matter_kind {
                wanted.insert("kind".into(), k.as_str().into());
            }
            let p = self.param(serde_json::Value::Array(vec![wanted.into()]));
            self.and(format!("row->'matters' @> {p}"));
        }
        if let Some(st) = f.follow_up_status {
            let p = self.param(serde_json::json!([{ "status": st.as_str() }]));
            self.and(format!("row->'follow_ups' @> {p}"));
        }
        if let Some(want) = f.overdue {
            let p = self.param(now_ms);
            self.and(if want {
                format!("first_due_ms < {p}")
            } else {
                format!("(first_due_ms IS NULL OR first_due_ms >= {p})")
            });
        }
        match f.review.as_deref() {
            Some("changed_since_approval") => self.and("changed_since_approval".into()),
            Some(state) => {
                let p = self.param(state.to_string());
                self.and(format!("review_state = {p}"));
            }
            None => {}
        }
        if let Some(t) = f.updated_since {
            let p = self.param(t);
            self.and(format!("updated_at_ms >= {p}"));
        }
        if let Some(want) = f.conflicts {
            let p = self.param(want);
            self.and(format!("has_conflicts = {p}"));
        }
        if let Some(q) = &f.q {
            let q = q.trim().to_lowercase();
            if !q.is_empty() {
                // The search text is lower-cased already; LIKE's own characters are escaped.
                let escaped = q
                    .replace('\\', "\\\\")
                    .replace('%', "\\%")
                    .replace('_', "\\_");
                let p = self.param(format!("%{escaped}%"));
                self.and(format!("row->>'search_text' LIKE {p}"));
            }
        }
    }

    fn refs(&self) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
        self.params
            .iter()
            .map(|b| b.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect()
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
                    "INSERT INTO households
                         (station, id, village, updated_at_ms, review_state, first_due_ms, row)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (station, id) DO UPDATE SET village = excluded.village,
                         updated_at_ms = excluded.updated_at_ms,
                         review_state = excluded.review_state,
                         first_due_ms = excluded.first_due_ms, row = excluded.row",
                    &[
                        &row.station,
                        &id,
                        &row.village,
                        &row.updated_at_ms,
                        &row.summary.review_state,
                        &row.summary.first_due_ms(),
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

    fn for_each_row_with_visits(
        &self,
        station: &str,
        wanted: &dyn Fn(&HouseholdRow) -> bool,
        each: &mut dyn FnMut(HouseholdRow, Vec<VisitRow>) -> bool,
    ) -> Result<(), StorageError> {
        let mut after = None;
        loop {
            let page = self.page(station, after)?;
            let full = page.len() as i64 == PAGE;
            after = page.last().map(|r| uuid(r.id));
            let rows: Vec<HouseholdRow> = page.into_iter().filter(|r| wanted(r)).collect();
            let ids: Vec<uuid::Uuid> = rows.iter().map(|r| uuid(r.id)).collect();
            let mut visits: BTreeMap<uuid::Uuid, Vec<VisitRow>> = self.store.with_client(|c| {
                Box::pin(async move {
                    let found = c
                        .query(
                            "SELECT doc, row FROM visits WHERE doc = ANY($1)
                             ORDER BY doc, visit_id COLLATE \"C\"",
                            &[&ids],
                        )
                        .await
                        .map_err(db)?;
                    let mut out: BTreeMap<uuid::Uuid, Vec<VisitRow>> = BTreeMap::new();
                    for r in found {
                        out.entry(r.get(0))
                            .or_default()
                            .push(json(r.get(1), "visit row")?);
                    }
                    Ok(out)
                })
            })?;
            for row in rows {
                let of_row = visits.remove(&uuid(row.id)).unwrap_or_default();
                if !each(row, of_row) {
                    return Ok(());
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    fn list(&self, q: &ListQuery<'_>) -> Result<ListAnswer, StorageError> {
        let mut c = Conditions::scope(q.station, q.villages);
        c.filter(q.filter, q.now_ms);
        let count_sql = format!("SELECT count(*) FROM households WHERE {}", c.sql());
        let total: i64 = self.store.with_client(|client| {
            Box::pin(async move {
                Ok(client
                    .query_one(&count_sql, &c.refs())
                    .await
                    .map_err(db)?
                    .get(0))
            })
        })?;
        let mut c = Conditions::scope(q.station, q.villages);
        c.filter(q.filter, q.now_ms);
        if let Some(after) = q.after {
            let t = c.param(after.updated_at_ms);
            let id = c.param(uuid(after.id));
            c.and(format!(
                "(updated_at_ms < {t} OR (updated_at_ms = {t} AND id > {id}))"
            ));
        }
        // One more than asked: whether there is a next page.
        let limit = c.param(q.limit as i64 + 1);
        let page_sql = format!(
            "SELECT row FROM households WHERE {} ORDER BY updated_at_ms DESC, id LIMIT {limit}",
            c.sql()
        );
        let mut rows: Vec<HouseholdRow> = self.store.with_client(|client| {
            Box::pin(async move {
                let rows = client.query(&page_sql, &c.refs()).await.map_err(db)?;
                rows.iter()
                    .map(|r| json(r.get(0), "household row"))
                    .collect()
            })
        })?;
        let more = rows.len() > q.limit;
        rows.truncate(q.limit);
        let next = if more {
            rows.last().map(Cursor::of)
        } else {
            None
        };
        Ok(ListAnswer {
            rows,
            total: total as usize,
            next,
        })
    }

    fn time_counts(
        &self,
        station: &str,
        villages: Option<&[String]>,
        since_ms: i64,
        now_ms: i64,
    ) -> Result<BTreeMap<String, TimeCounts>, StorageError> {
        let mut visited = Conditions::scope(station, villages);
        let since = visited.param(since_ms);
        visited.and(format!("NOT quarantined AND last_visit_at_ms >= {since}"));
        let visited_sql = format!(
            "SELECT village, count(*) FROM households WHERE {} GROUP BY village",
            visited.sql()
        );
        let mut overdue = Conditions::scope(station, villages);
        let now = overdue.param(now_ms);
        overdue.and(format!("NOT quarantined AND first_due_ms < {now}"));
        let overdue_sql = format!(
            "SELECT village, sum((SELECT count(*) FROM jsonb_array_elements(row->'follow_ups') f
                 WHERE f->>'status' = 'todo' AND (f->>'due_ms')::bigint < {now}))::bigint
             FROM households WHERE {} GROUP BY village",
            overdue.sql()
        );
        self.store.with_client(|client| {
            Box::pin(async move {
                let mut out: BTreeMap<String, TimeCounts> = BTreeMap::new();
                for r in client
                    .query(&visited_sql, &visited.refs())
                    .await
                    .map_err(db)?
                {
                    out.entry(r.get(0)).or_default().visited_since = r.get(1);
                }
                for r in client
                    .query(&overdue_sql, &overdue.refs())
                    .await
                    .map_err(db)?
                {
                    out.entry(r.get(0)).or_default().follow_ups_overdue = r.get(1);
                }
                Ok(out)
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
            let s = PgProjection::new(store);
            crate::projection::store::tests::run_all(&s);
            crate::projection::store::tests::lists_and_coverage_agree_with_the_rows(&s);
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
