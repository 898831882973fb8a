//! The staff projection on PostgreSQL: `households` (the row as JSON, with the columns the
//! staff queries select on: station, village, last change, review state, quarantine,
//! conflicts, last visit, earliest due follow-up; indexed by each, and the row's matters,
//! follow-ups and officers by GIN indexes), `visits` and `household_kept` (what each
//! row keeps beside it; the village counters are counted from the rows), created by the
//! store's migrations (`storage::postgres`). A household's re-projection is one
//! transaction. The staff list and the coverage figures are SQL over those indexes, and
//! must select exactly what [`Filter::matches`] does (the conformance suite compares
//! them). Rows are read a page at a time and handed out between round trips, so a caller
//! may read other rows while it iterates. Must not: compute rows or counters.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::query::MergedFilter;
use super::store::{Kept, ListAnswer, ListQuery, ProjectionStore, RowWrite, TimeCounts};
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

    /// The village counters of one (station, village), or of all, counted from the rows:
    /// the same figures `VillageCounts::add` keeps on the embedded store.
    fn aggregate_counts(
        &self,
        only: Option<(&str, &str)>,
    ) -> Result<BTreeMap<(String, String), VillageCounts>, StorageError> {
        let mut c = Conditions::default();
        if let Some((station, village)) = only {
            let p = c.param(station.to_string());
            c.and(format!("station = {p}"));
            let p = c.param(village.to_string());
            c.and(format!("village = {p}"));
        }
        let filter = if c.clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", c.sql())
        };
        let counts_sql = format!(
            "SELECT station, village,
                 count(*) FILTER (WHERE {LISTED}),
                 count(*) FILTER (WHERE quarantined AND NOT merged),
                 coalesce(sum(visit_count) FILTER (WHERE {LISTED}), 0)::bigint,
                 count(*) FILTER (WHERE {LISTED} AND visit_count > 0),
                 coalesce(sum(follow_ups_todo) FILTER (WHERE {LISTED}), 0)::bigint,
                 count(*) FILTER (WHERE {LISTED} AND has_conflicts),
                 count(*) FILTER (WHERE merged),
                 count(*) FILTER (WHERE merged AND changed_after_merge)
             FROM households {filter} GROUP BY station, village"
        );
        let matters_filter = if c.clauses.is_empty() {
            format!("WHERE {LISTED}")
        } else {
            format!("WHERE {LISTED} AND {}", c.sql())
        };
        let matters_sql = format!(
            "SELECT station, village, m.key, sum(m.value::bigint)::bigint
             FROM households, jsonb_each_text(open_matters) m {matters_filter}
             GROUP BY station, village, m.key HAVING sum(m.value::bigint) <> 0"
        );
        self.store.with_client(|client| {
            Box::pin(async move {
                let mut out: BTreeMap<(String, String), VillageCounts> = BTreeMap::new();
                for r in client.query(&counts_sql, &c.refs()).await.map_err(db)? {
                    out.insert(
                        (r.get(0), r.get(1)),
                        VillageCounts {
                            households: r.get(2),
                            quarantined: r.get(3),
                            visits: r.get(4),
                            visited: r.get(5),
                            open_matters: BTreeMap::new(),
                            follow_ups_todo: r.get(6),
                            households_with_conflicts: r.get(7),
                            merged: r.get(8),
                            changed_after_merge: r.get(9),
                        },
                    );
                }
                for r in client.query(&matters_sql, &c.refs()).await.map_err(db)? {
                    if let Some(counts) = out.get_mut(&(r.get(0), r.get(1))) {
                        counts.open_matters.insert(r.get(2), r.get(3));
                    }
                }
                Ok(out)
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

/// The rows in the normal lists and counts (`HouseholdRow::listed`).
const LISTED: &str = "NOT quarantined AND NOT merged";

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
        match f.merged {
            None => {
                let p = self.param(f.quarantined.unwrap_or(false));
                self.and(format!("NOT merged AND quarantined = {p}"));
            }
            Some(MergedFilter::All) => self.and("merged".into()),
            Some(MergedFilter::AfterMerge) => self.and("merged AND changed_after_merge".into()),
        }
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

    fn kept(&self, doc: DocumentId) -> Result<Option<Kept>, StorageError> {
        self.store.with_client(move |c| {
            Box::pin(async move {
                let row = c
                    .query_opt(
                        "SELECT kept FROM household_kept WHERE doc = $1",
                        &[&uuid(doc)],
                    )
                    .await
                    .map_err(db)?;
                row.map(|r| json(r.get(0), "kept authors and digests"))
                    .transpose()
            })
        })
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
        let mut all = self.aggregate_counts(Some((station, village)))?;
        Ok(all
            .remove(&(station.to_string(), village.to_string()))
            .unwrap_or_default())
    }

    fn counts_are_derived(&self) -> bool {
        true
    }

    fn all_counts(&self) -> Result<BTreeMap<(String, String), VillageCounts>, StorageError> {
        self.aggregate_counts(None)
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
        let kept = serde_json::to_value(w.kept).expect("kept values serialise");
        // `w.counts` is ignored: the counters are derived from the rows.
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
                tx.execute(
                    "INSERT INTO household_kept (doc, kept) VALUES ($1, $2)
                     ON CONFLICT (doc) DO UPDATE SET kept = excluded.kept",
                    &[&id, &kept],
                )
                .await
                .map_err(db)?;
                for visit_id in &removed {
                    tx.execute(
                        "DELETE FROM visits WHERE doc = $1 AND visit_id = $2",
                        &[&id, visit_id],
                    )
                    .await
                    .map_err(db)?;
                }
                tx.execute(
                    "INSERT INTO households (station, id, village, updated_at_ms, review_state,
                         first_due_ms, follow_ups_todo, row)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                     ON CONFLICT (station, id) DO UPDATE SET village = excluded.village,
                         updated_at_ms = excluded.updated_at_ms,
                         review_state = excluded.review_state,
                         first_due_ms = excluded.first_due_ms,
                         follow_ups_todo = excluded.follow_ups_todo, row = excluded.row",
                    &[
                        &row.station,
                        &id,
                        &row.village,
                        &row.updated_at_ms,
                        &row.summary.review_state,
                        &row.summary.first_due_ms(),
                        &(row.summary.follow_ups_todo() as i32),
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
        _counts: &BTreeMap<(String, String), VillageCounts>,
    ) -> Result<(), StorageError> {
        Ok(()) // derived from the rows (`counts_are_derived`)
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

    fn same_address(
        &self,
        station: &str,
        wanted: &[(String, String)],
    ) -> Result<super::store::SameAddress, StorageError> {
        let mut out = super::store::SameAddress::new();
        if wanted.is_empty() {
            return Ok(out);
        }
        let keys: Vec<String> = wanted.iter().map(|(_, k)| k.clone()).collect();
        let station = station.to_string();
        let rows = self.store.with_client(move |client| {
            Box::pin(async move {
                client
                    .query(
                        "SELECT village, row->>'address_key', id FROM households
                         WHERE station = $1 AND row->>'address_key' = ANY($2) AND NOT merged",
                        &[&station, &keys],
                    )
                    .await
                    .map_err(db)
            })
        })?;
        let wanted: std::collections::BTreeSet<&(String, String)> = wanted.iter().collect();
        for r in rows {
            let pair: (String, String) = (r.get(0), r.get(1));
            if wanted.contains(&pair) {
                let id: uuid::Uuid = r.get(2);
                out.entry(pair)
                    .or_default()
                    .push(DocumentId::from_bytes(*id.as_bytes()));
            }
        }
        Ok(out)
    }

    fn merged_into(
        &self,
        station: &str,
        survivor: DocumentId,
    ) -> Result<Vec<HouseholdRow>, StorageError> {
        let (station, survivor) = (station.to_string(), survivor.to_string());
        self.store.with_client(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT row FROM households
                         WHERE station = $1 AND merged AND row->'merged_into'->>'into' = $2
                         ORDER BY id",
                        &[&station, &survivor],
                    )
                    .await
                    .map_err(db)?;
                rows.iter()
                    .map(|r| json(r.get(0), "household row"))
                    .collect()
            })
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
        visited.and(format!("{LISTED} AND last_visit_at_ms >= {since}"));
        let visited_sql = format!(
            "SELECT village, count(*) FROM households WHERE {} GROUP BY village",
            visited.sql()
        );
        let mut overdue = Conditions::scope(station, villages);
        let now = overdue.param(now_ms);
        overdue.and(format!("{LISTED} AND first_due_ms < {now}"));
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
                c.batch_execute("TRUNCATE households, visits, household_kept")
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
            assert!(!s.single_writer(), "several nodes may share the database");
            crate::projection::store::tests::run_all(&s);
            crate::projection::store::tests::lists_and_coverage_agree_with_the_rows(&s);
        })
        .await;
    }

    /// Two batches of one village run side by side: the second commits while the first is
    /// still open (nothing makes it wait, as a counters row every batch updates did), and
    /// the counters count both households.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_of_one_village_do_not_wait_for_each_other() {
        use crate::storage::documents::DocumentStore;
        crate::storage::postgres::tests::on_fresh_database(|store| {
            let doc = super::super::store::tests::household_doc("1", 2);
            let write_one = |rows: &PgProjection| {
                let r = super::super::store::tests::household_row("north", "east", 10, &doc);
                rows.write(&RowWrite {
                    row: &r,
                    put_visits: Vec::new(),
                    removed_visits: Vec::new(),
                    counts: Vec::new(),
                    kept: &Kept::default(),
                })
                .unwrap();
            };
            let rows = PgProjection::new(store.clone());
            store.begin_batch().unwrap();
            write_one(&rows);
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            let other = {
                let store = store.clone();
                let doc = doc.clone();
                std::thread::spawn(move || {
                    let rows = PgProjection::new(store.clone());
                    store.begin_batch().unwrap();
                    let r = super::super::store::tests::household_row("north", "east", 20, &doc);
                    rows.write(&RowWrite {
                        row: &r,
                        put_visits: Vec::new(),
                        removed_visits: Vec::new(),
                        counts: Vec::new(),
                        kept: &Kept::default(),
                    })
                    .unwrap();
                    store.end_batch(true).unwrap();
                    let _ = done_tx.send(());
                })
            };
            // A second batch that waited for the first would never finish while it is open.
            assert!(
                done_rx
                    .recv_timeout(std::time::Duration::from_secs(10))
                    .is_ok(),
                "the second batch waits for the first"
            );
            other.join().unwrap();
            // Outside this open batch only the other's household is counted yet.
            let outside = {
                let rows = PgProjection::new(store.clone());
                std::thread::spawn(move || rows.counts("north", "east").unwrap())
                    .join()
                    .unwrap()
            };
            assert_eq!(outside.households, 1);
            store.end_batch(true).unwrap();
            let counts = rows.counts("north", "east").unwrap();
            assert_eq!((counts.households, counts.visits), (2, 4));
        })
        .await;
    }
}
