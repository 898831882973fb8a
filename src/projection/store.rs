//! Where the staff projection keeps its rows, behind one interface with a backend per
//! engine: household rows, visit rows, the authors each household row cites, and village
//! counters. The sled layout (one tree,
//! keys by kind) is here; the PostgreSQL one (tables with indexes by station, village and
//! last change) is in `projection::postgres`. One conformance suite (`tests`) runs against
//! both. What a row holds and how counters move is `projection`'s; this only keeps them.
//! Must not: compute rows or counters, or decide who may read them.

use std::collections::BTreeMap;

use super::{Cursor, Filter, HouseholdRow, VillageCounts};
use crate::ids::DocumentId;
use crate::records::{Cited, VisitRow};
use crate::storage::{StorageError, Store, Table, TableWrite};

/// What one household's re-projection writes.
#[derive(Debug)]
pub struct RowWrite<'a> {
    /// The household's row, without its visits (they are stored apart).
    pub row: &'a HouseholdRow,
    /// Visit rows that are new or changed.
    pub put_visits: Vec<&'a VisitRow>,
    /// Ids of visit rows that are gone.
    pub removed_visits: Vec<String>,
    /// (station, village, counters) to store; empty counters are removed.
    pub counts: Vec<(String, String, VillageCounts)>,
    /// What is kept beside the row (apart from it: the lists never read it).
    pub kept: &'a Kept,
}

/// What the projection keeps beside a household's row so that a change can re-project it
/// alone: the authors its summary cites, and a digest of each visit row, so only the visit
/// rows that changed are written, without reading the others back (where this process is
/// the only writer: [`ProjectionStore::single_writer`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Kept {
    pub cited: Vec<Cited>,
    /// Visit id -> digest of its row as written (`None`: not kept; the rows are read).
    #[serde(default)]
    pub visits: Option<BTreeMap<String, u64>>,
}

/// Which households a staff list asks for (see [`ProjectionStore::list`]).
#[derive(Clone, Copy, Debug)]
pub struct ListQuery<'a> {
    pub station: &'a str,
    /// The villages the reader may see; `None`: every village of the station.
    pub villages: Option<&'a [String]>,
    pub filter: &'a Filter,
    /// What "overdue" is measured against.
    pub now_ms: i64,
    /// Only rows after this one (the list is newest change first, then by id).
    pub after: Option<Cursor>,
    pub limit: usize,
}

/// One page of a staff list.
#[derive(Debug, PartialEq, Eq)]
pub struct ListAnswer {
    pub rows: Vec<HouseholdRow>,
    /// Matching rows in all pages.
    pub total: usize,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Cursor>,
}

/// The time-dependent coverage figures of one village (they cannot be counters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeCounts {
    /// Households with a visit received at or after the given time.
    pub visited_since: i64,
    /// Follow-ups to do whose due time has passed.
    pub follow_ups_overdue: i64,
}

/// Every call blocks (call it on a blocking thread).
pub trait ProjectionStore: Send + Sync + 'static {
    /// The row of `doc` in `station` (its visits are apart).
    fn row(&self, station: &str, doc: DocumentId) -> Result<Option<HouseholdRow>, StorageError>;

    /// The rows of `station` (of every station with `None`), one at a time, in
    /// (station, id) order, until `each` returns `false`.
    fn for_each_row(
        &self,
        station: Option<&str>,
        each: &mut dyn FnMut(HouseholdRow) -> bool,
    ) -> Result<(), StorageError>;

    /// What the last [`ProjectionStore::write`] of `doc` kept beside its row (`None`:
    /// nothing kept).
    fn kept(&self, doc: DocumentId) -> Result<Option<Kept>, StorageError>;

    /// Whether this process is the only one that writes the projection (sled: its data
    /// directory is locked to one process). Then the visit digests a row keeps describe the
    /// visit rows as stored. Several nodes on one database may re-project one household at
    /// once, each from its own copy of the document, and one may keep digests of rows the
    /// other then overwrote: there the visit rows are read and compared instead.
    fn single_writer(&self) -> bool {
        false
    }

    /// The visit rows of `doc`, by visit id, until `each` returns `false`.
    fn for_each_visit(
        &self,
        doc: DocumentId,
        each: &mut dyn FnMut(VisitRow) -> bool,
    ) -> Result<(), StorageError>;

    /// A village's counters (empty when it has none).
    fn counts(&self, station: &str, village: &str) -> Result<VillageCounts, StorageError>;

    /// Whether the backend derives the village counters from the rows itself (its
    /// [`ProjectionStore::counts`] is an aggregate, [`RowWrite::counts`] and
    /// [`ProjectionStore::replace_counts`] are ignored): PostgreSQL, where a counters row
    /// changed by every accepted batch would be a lock every batch of a village waits on
    /// until the previous one commits. The embedded store keeps them (a scan per coverage
    /// request would cost more than the counters).
    fn counts_are_derived(&self) -> bool {
        false
    }

    /// Every village's counters, by (station, village).
    fn all_counts(&self) -> Result<BTreeMap<(String, String), VillageCounts>, StorageError>;

    /// Writes one household's re-projection. Ordered, not atomic, on sled (the document's
    /// unsettled mark precedes it and catch-up repairs a prefix); one transaction on
    /// PostgreSQL.
    fn write(&self, w: &RowWrite<'_>) -> Result<(), StorageError>;

    /// Replaces every village's counters by `counts`, as one unit.
    fn replace_counts(
        &self,
        counts: &BTreeMap<(String, String), VillageCounts>,
    ) -> Result<(), StorageError>;

    /// Removes everything (a projection about to be rebuilt).
    fn clear(&self) -> Result<(), StorageError>;

    /// A page of the station's rows within `q.villages` that `q.filter` matches, newest
    /// change first, and how many match in all. This default reads every row of the station
    /// and keeps only the sort keys of the matches (a few bytes each), then reads the page's
    /// rows again: what the embedded store does (one tree scan). PostgreSQL answers it
    /// from its indexes.
    fn list(&self, q: &ListQuery<'_>) -> Result<ListAnswer, StorageError> {
        let mut keys = Vec::new();
        self.for_each_row(Some(q.station), &mut |row| {
            if in_villages(q.villages, &row.village) && q.filter.matches(&row, q.now_ms) {
                keys.push(Cursor::of(&row).key());
            }
            true
        })?;
        keys.sort_unstable();
        let start = match q.after {
            Some(c) => keys.partition_point(|k| *k <= c.key()),
            None => 0,
        };
        let mut rows = Vec::new();
        for (_, id) in keys.iter().skip(start).take(q.limit) {
            // A row changed or vanished since the scan is shown as it is now, or skipped.
            if let Some(row) = self.row(q.station, *id)? {
                rows.push(row);
            }
        }
        let next = (start + q.limit < keys.len())
            .then(|| keys.get(start + q.limit - 1))
            .flatten()
            .map(|(t, id)| Cursor {
                updated_at_ms: t.0,
                id: *id,
            });
        Ok(ListAnswer {
            rows,
            total: keys.len(),
            next,
        })
    }

    /// The rows of `station` that are `wanted`, each with its visit rows (by visit id), one
    /// household at a time in id order, until `each` returns `false` (the export). This
    /// default reads a household's visits when it gets to it; PostgreSQL reads those of a
    /// page of households in one query.
    fn for_each_row_with_visits(
        &self,
        station: &str,
        wanted: &dyn Fn(&HouseholdRow) -> bool,
        each: &mut dyn FnMut(HouseholdRow, Vec<VisitRow>) -> bool,
    ) -> Result<(), StorageError> {
        let mut failed = None;
        self.for_each_row(Some(station), &mut |row| {
            if !wanted(&row) {
                return true;
            }
            let mut visits = Vec::new();
            if let Err(e) = self.for_each_visit(row.id, &mut |v| {
                visits.push(v);
                true
            }) {
                failed = Some(e);
                return false;
            }
            each(row, visits)
        })?;
        failed.map_or(Ok(()), Err)
    }

    /// For each (village, address key) of `wanted` (keys not empty), every household of
    /// `station` registered to that village with that key, quarantined ones included and
    /// merged ones left out. This
    /// default reads every row of the station; PostgreSQL asks by key.
    fn same_address(
        &self,
        station: &str,
        wanted: &[(String, String)],
    ) -> Result<SameAddress, StorageError> {
        let mut out = SameAddress::new();
        if wanted.is_empty() {
            return Ok(out);
        }
        let wanted: std::collections::BTreeSet<&(String, String)> = wanted.iter().collect();
        self.for_each_row(Some(station), &mut |row| {
            if row.merged() {
                return true;
            }
            let pair = (row.village.clone(), row.summary.address_key.clone());
            if !pair.1.is_empty() && wanted.contains(&pair) {
                out.entry(pair).or_default().push(row.id);
            }
            true
        })?;
        Ok(out)
    }

    /// The households of `station` merged into `survivor`. This default reads every row
    /// of the station; PostgreSQL asks by the survivor.
    fn merged_into(
        &self,
        station: &str,
        survivor: DocumentId,
    ) -> Result<Vec<HouseholdRow>, StorageError> {
        let mut out = Vec::new();
        self.for_each_row(Some(station), &mut |row| {
            if row
                .summary
                .merged_into
                .as_ref()
                .is_some_and(|m| m.into == survivor)
            {
                out.push(row);
            }
            true
        })?;
        Ok(out)
    }

    /// Per village of the station within `villages`: households visited since `since_ms`
    /// and follow-ups overdue at `now_ms`, over the households that are not quarantined.
    /// This default reads every row of the station; PostgreSQL answers from its indexes.
    fn time_counts(
        &self,
        station: &str,
        villages: Option<&[String]>,
        since_ms: i64,
        now_ms: i64,
    ) -> Result<BTreeMap<String, TimeCounts>, StorageError> {
        let mut out: BTreeMap<String, TimeCounts> = BTreeMap::new();
        self.for_each_row(Some(station), &mut |row| {
            if !row.listed() || !in_villages(villages, &row.village) {
                return true;
            }
            let visited = row.summary.last_visit_at_ms.is_some_and(|t| t >= since_ms);
            let overdue = row.summary.overdue(now_ms) as i64;
            if visited || overdue > 0 {
                let c = out.entry(row.village.clone()).or_default();
                c.visited_since += i64::from(visited);
                c.follow_ups_overdue += overdue;
            }
            true
        })?;
        Ok(out)
    }
}

/// A (village, address key) pair and the households that share it.
pub type SameAddress = BTreeMap<(String, String), Vec<DocumentId>>;

fn in_villages(villages: Option<&[String]>, village: &str) -> bool {
    villages.is_none_or(|v| v.iter().any(|x| x == village))
}

/// The sled layout of [`Table::Projection`].
pub struct SledProjection {
    store: Store,
}

impl SledProjection {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

/// Keys: `h` station 0x00 doc(16) -> row; `v` doc(16) visit-id -> visit row; `a` doc(16)
/// -> what is kept beside its row; `c` station 0x00 village -> counters.
mod keys {
    use crate::ids::DocumentId;

    pub fn kept(doc: DocumentId) -> Vec<u8> {
        let mut k = vec![b'a'];
        k.extend_from_slice(doc.as_bytes());
        k
    }

    pub fn household(station: &str, doc: DocumentId) -> Vec<u8> {
        let mut k = station_prefix(b'h', station);
        k.extend_from_slice(doc.as_bytes());
        k
    }

    pub fn station_prefix(kind: u8, station: &str) -> Vec<u8> {
        let mut k = vec![kind];
        k.extend_from_slice(station.as_bytes());
        k.push(0);
        k
    }

    pub fn visit(doc: DocumentId, visit: &str) -> Vec<u8> {
        let mut k = visits_of(doc);
        k.extend_from_slice(visit.as_bytes());
        k
    }

    pub fn visits_of(doc: DocumentId) -> Vec<u8> {
        let mut k = vec![b'v'];
        k.extend_from_slice(doc.as_bytes());
        k
    }

    pub fn counts(station: &str, village: &str) -> Vec<u8> {
        let mut k = station_prefix(b'c', station);
        k.extend_from_slice(village.as_bytes());
        k
    }

    /// (station, village) of a counters key.
    pub fn parse_counts(k: &[u8]) -> Option<(String, String)> {
        let rest = k.strip_prefix(b"c")?;
        let zero = rest.iter().position(|b| *b == 0)?;
        Some((
            String::from_utf8(rest[..zero].to_vec()).ok()?,
            String::from_utf8(rest[zero + 1..].to_vec()).ok()?,
        ))
    }
}

fn parse<T: serde::de::DeserializeOwned>(v: &[u8], what: &str) -> Result<T, StorageError> {
    serde_json::from_slice(v).map_err(|e| StorageError::Corrupt(format!("{what}: {e}")))
}

/// Calls `each` with every parsed value under `prefix` until it returns `false`.
fn for_each_parsed<T: serde::de::DeserializeOwned>(
    store: &Store,
    prefix: &[u8],
    what: &str,
    each: &mut dyn FnMut(T) -> bool,
) -> Result<(), StorageError> {
    let mut failed = None;
    store.table_for_each_blocking(Table::Projection, prefix, None, |_, v| {
        match parse::<T>(v, what) {
            Ok(x) => each(x),
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    })?;
    failed.map_or(Ok(()), Err)
}

impl ProjectionStore for SledProjection {
    fn row(&self, station: &str, doc: DocumentId) -> Result<Option<HouseholdRow>, StorageError> {
        match self
            .store
            .table_get_blocking(Table::Projection, &keys::household(station, doc))?
        {
            Some(v) => Ok(Some(parse(&v, "household row")?)),
            None => Ok(None),
        }
    }

    fn for_each_row(
        &self,
        station: Option<&str>,
        each: &mut dyn FnMut(HouseholdRow) -> bool,
    ) -> Result<(), StorageError> {
        let prefix = match station {
            Some(s) => keys::station_prefix(b'h', s),
            None => b"h".to_vec(),
        };
        for_each_parsed(&self.store, &prefix, "household row", each)
    }

    fn single_writer(&self) -> bool {
        true
    }

    fn kept(&self, doc: DocumentId) -> Result<Option<Kept>, StorageError> {
        self.store
            .table_get_blocking(Table::Projection, &keys::kept(doc))?
            .map(|v| parse(&v, "kept authors and digests"))
            .transpose()
    }

    fn for_each_visit(
        &self,
        doc: DocumentId,
        each: &mut dyn FnMut(VisitRow) -> bool,
    ) -> Result<(), StorageError> {
        for_each_parsed(&self.store, &keys::visits_of(doc), "visit row", each)
    }

    fn counts(&self, station: &str, village: &str) -> Result<VillageCounts, StorageError> {
        match self
            .store
            .table_get_blocking(Table::Projection, &keys::counts(station, village))?
        {
            Some(v) => parse(&v, "village counts"),
            None => Ok(VillageCounts::default()),
        }
    }

    fn all_counts(&self) -> Result<BTreeMap<(String, String), VillageCounts>, StorageError> {
        let mut out = BTreeMap::new();
        for (k, v) in self.store.table_scan_blocking(Table::Projection, b"c")? {
            let Some(at) = keys::parse_counts(&k) else {
                return Err(StorageError::Corrupt("an unreadable counters key".into()));
            };
            out.insert(at, parse(&v, "village counts")?);
        }
        Ok(out)
    }

    fn write(&self, w: &RowWrite<'_>) -> Result<(), StorageError> {
        let id = w.row.id;
        let mut writes: Vec<TableWrite> = Vec::new();
        for v in &w.put_visits {
            writes.push((
                keys::visit(id, &v.id),
                Some(serde_json::to_vec(v).expect("rows serialise")),
            ));
        }
        for gone in &w.removed_visits {
            writes.push((keys::visit(id, gone), None));
        }
        for (station, village, c) in &w.counts {
            let value = (!c.is_empty()).then(|| serde_json::to_vec(c).expect("counts serialise"));
            writes.push((keys::counts(station, village), value));
        }
        writes.push((
            keys::kept(id),
            Some(serde_json::to_vec(w.kept).expect("kept values serialise")),
        ));
        writes.push((
            keys::household(&w.row.station, id),
            Some(serde_json::to_vec(w.row).expect("rows serialise")),
        ));
        self.store
            .table_write_in_order_blocking(Table::Projection, writes)
    }

    fn replace_counts(
        &self,
        counts: &BTreeMap<(String, String), VillageCounts>,
    ) -> Result<(), StorageError> {
        let mut writes: Vec<TableWrite> = self
            .store
            .table_scan_blocking(Table::Projection, b"c")?
            .into_iter()
            .filter(|(k, _)| keys::parse_counts(k).is_none_or(|at| !counts.contains_key(&at)))
            .map(|(k, _)| (k, None))
            .collect();
        for ((station, village), c) in counts {
            writes.push((
                keys::counts(station, village),
                Some(serde_json::to_vec(c).expect("counts serialise")),
            ));
        }
        self.store.table_write_blocking(Table::Projection, writes)
    }

    fn clear(&self) -> Result<(), StorageError> {
        self.store.table_clear_blocking(Table::Projection)
    }
}

/// The conformance suite, against every backend.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::records::{summarise, Attribution};
    use automerge::Automerge;

    pub(crate) fn household_doc(house_no: &str, visits: usize) -> Automerge {
        let mut doc = Automerge::new();
        doc.transact(|tx| {
            crate::records::create_household(tx, &crate::records::samples::household(house_no))?;
            for i in 0..visits {
                crate::records::add_visit(
                    tx,
                    &crate::records::samples::visit("amy", &format!("visit {i}")),
                )?;
            }
            Ok::<_, crate::records::RecordError>(())
        })
        .unwrap();
        doc
    }

    pub(crate) fn household_row(
        station: &str,
        village: &str,
        updated: i64,
        doc: &Automerge,
    ) -> HouseholdRow {
        HouseholdRow {
            id: DocumentId::random(),
            station: station.into(),
            village: village.into(),
            updated_at_ms: updated,
            summary: summarise(doc, &Attribution::new(doc, Default::default())),
        }
    }

    fn write_whole(
        s: &dyn ProjectionStore,
        mut r: HouseholdRow,
        counts: VillageCounts,
    ) -> HouseholdRow {
        let visits = std::mem::take(&mut r.summary.visits);
        s.write(&RowWrite {
            row: &r,
            put_visits: visits.iter().collect(),
            removed_visits: Vec::new(),
            counts: vec![(r.station.clone(), r.village.clone(), counts)],
            kept: &kept_by(&r),
        })
        .unwrap();
        r.summary.visits = visits;
        r
    }

    /// What could be kept beside a row: authors it cites (one known, one the server recorded
    /// none for) and a visit digest.
    fn kept_by(r: &HouseholdRow) -> Kept {
        let hash = |n: u8| automerge::ChangeHash([n; 32]);
        let cited = vec![
            Cited {
                change: hash(r.id.as_bytes()[0]),
                author: Some(crate::records::Author {
                    user: "amy".into(),
                    device: Some("dev-1".into()),
                    received_at_ms: r.updated_at_ms,
                }),
            },
            Cited {
                change: hash(1),
                author: None,
            },
        ];
        Kept {
            cited,
            visits: Some(BTreeMap::from([("visit-1".to_string(), u64::MAX - 1)])),
        }
    }

    fn without_visits(r: &HouseholdRow) -> HouseholdRow {
        let mut r = r.clone();
        r.summary.visits.clear();
        r
    }

    pub(crate) fn run_all(s: &dyn ProjectionStore) {
        let some = VillageCounts {
            households: 1,
            visits: 2,
            visited: 1,
            ..Default::default()
        };
        let a = write_whole(
            s,
            household_row("north", "east", 10, &household_doc("1", 2)),
            some.clone(),
        );
        let b = write_whole(
            s,
            household_row("north", "west", 20, &household_doc("2", 1)),
            some.clone(),
        );
        let c = write_whole(
            s,
            household_row("south", "east", 30, &household_doc("3", 0)),
            some.clone(),
        );

        assert_eq!(s.row("north", a.id).unwrap(), Some(without_visits(&a)));
        assert_eq!(s.row("south", a.id).unwrap(), None, "rows are per station");
        assert_eq!(s.kept(a.id).unwrap(), Some(kept_by(&a)));
        assert_eq!(s.kept(DocumentId::random()).unwrap(), None);
        let mut north = Vec::new();
        s.for_each_row(Some("north"), &mut |r| {
            north.push(r.id);
            true
        })
        .unwrap();
        let mut expected = vec![a.id, b.id];
        expected.sort();
        assert_eq!(north, expected, "one station's rows, by id");
        let mut all = 0;
        s.for_each_row(None, &mut |_| {
            all += 1;
            true
        })
        .unwrap();
        assert_eq!(all, 3);
        let mut first = 0;
        s.for_each_row(None, &mut |_| {
            first += 1;
            false
        })
        .unwrap();
        assert_eq!(first, 1, "stops when asked");

        let mut visits = Vec::new();
        s.for_each_visit(a.id, &mut |v| {
            visits.push(v);
            true
        })
        .unwrap();
        let mut expected = a.summary.visits.clone();
        expected.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(visits, expected);

        // With their visits: only the wanted rows, in id order, each with its visits.
        let mut seen = Vec::new();
        s.for_each_row_with_visits("north", &|_| true, &mut |r, v| {
            seen.push((r.id, v.len()));
            true
        })
        .unwrap();
        let mut expected = vec![(a.id, 2), (b.id, 1)];
        expected.sort();
        assert_eq!(seen, expected);
        let mut seen = Vec::new();
        s.for_each_row_with_visits("north", &|r| r.id == b.id, &mut |r, v| {
            seen.push((r.id, v));
            true
        })
        .unwrap();
        assert_eq!(seen, vec![(b.id, b.summary.visits.clone())]);
        let mut calls = 0;
        s.for_each_row_with_visits("north", &|_| true, &mut |_, _| {
            calls += 1;
            false
        })
        .unwrap();
        assert_eq!(calls, 1, "stops when asked");

        // A re-projection: one visit changed, one gone; counters moved between villages.
        let mut changed = a.summary.visits[0].clone();
        changed.notes = "edited".into();
        let gone = a.summary.visits[1].id.clone();
        let mut a2 = without_visits(&a);
        a2.updated_at_ms = 40;
        s.write(&RowWrite {
            row: &a2,
            put_visits: vec![&changed],
            removed_visits: vec![gone],
            counts: vec![
                ("north".into(), "east".into(), VillageCounts::default()),
                ("north".into(), "west".into(), some.clone()),
            ],
            kept: &Kept::default(),
        })
        .unwrap();
        assert_eq!(s.row("north", a.id).unwrap().unwrap().updated_at_ms, 40);
        assert_eq!(s.kept(a.id).unwrap(), Some(Kept::default()), "replaced");
        let mut visits = Vec::new();
        s.for_each_visit(a.id, &mut |v| {
            visits.push(v);
            true
        })
        .unwrap();
        assert_eq!(visits, vec![changed]);
        if s.counts_are_derived() {
            // Counted from the rows, as the embedded store's counters move with them.
            let mut expected: BTreeMap<(String, String), VillageCounts> = BTreeMap::new();
            s.for_each_row(None, &mut |r| {
                expected
                    .entry((r.station.clone(), r.village.clone()))
                    .or_default()
                    .add(&r, 1);
                true
            })
            .unwrap();
            assert_eq!(expected.len(), 3);
            assert_eq!(s.all_counts().unwrap(), expected);
            let east = ("north".to_string(), "east".to_string());
            assert_eq!(s.counts("north", "east").unwrap(), expected[&east]);
            assert_eq!(
                s.counts("north", "nowhere").unwrap(),
                VillageCounts::default()
            );
        } else {
            assert_eq!(s.counts("north", "east").unwrap(), VillageCounts::default());
            assert_eq!(s.counts("north", "west").unwrap(), some);
            let all = s.all_counts().unwrap();
            assert_eq!(
                all.keys().cloned().collect::<Vec<_>>(),
                vec![
                    ("north".to_string(), "west".to_string()),
                    ("south".to_string(), "east".to_string())
                ],
                "empty counters are not kept"
            );

            let mut replaced = BTreeMap::new();
            replaced.insert(("south".to_string(), "east".to_string()), some.clone());
            s.replace_counts(&replaced).unwrap();
            assert_eq!(s.all_counts().unwrap(), replaced);
        }

        s.clear().unwrap();
        assert_eq!(s.row("south", c.id).unwrap(), None);
        assert_eq!(s.kept(b.id).unwrap(), None);
        assert!(s.all_counts().unwrap().is_empty());
        let mut any = false;
        s.for_each_visit(b.id, &mut |_| {
            any = true;
            true
        })
        .unwrap();
        assert!(!any);
    }

    /// Households that differ in every way a staff filter looks at, in two villages of one
    /// station and one of another station.
    fn varied_rows() -> Vec<HouseholdRow> {
        use crate::records::{FollowUpBrief, MatterBrief};
        let base = household_row("north", "east", 0, &household_doc("1", 1));
        let matter = |kind: &str, status: &str, open: bool| MatterBrief {
            id: format!("{kind}-{status}"),
            kind: kind.into(),
            status: status.into(),
            risk: "low".into(),
            open,
            description: String::new(),
            confidential: false,
            raised_at_ms: None,
            status_set_at_ms: None,
        };
        let follow_up = |status: &str, due_ms: Option<i64>| FollowUpBrief {
            id: format!("{status}-{due_ms:?}"),
            task: "call back".into(),
            owner: "amy".into(),
            status: status.into(),
            due_ms,
        };
        (0..14)
            .map(|i: i64| {
                let mut r = base.clone();
                r.id = DocumentId::random();
                r.village = if i % 3 == 0 { "west" } else { "east" }.into();
                if i == 13 {
                    r.station = "south".into();
                }
                // Two rows share an update time: the id orders them.
                r.updated_at_ms = 1_000 + (i / 2) * 10;
                let s = &mut r.summary;
                s.visits.clear();
                s.officers = match i % 4 {
                    0 => vec!["amy".into()],
                    1 => vec!["amy".into(), "ben".into()],
                    2 => vec!["ben".into()],
                    _ => vec![],
                };
                s.last_visit_at_ms = (i % 4 != 3).then_some(500 + i * 100);
                s.matters = match i % 5 {
                    0 => vec![matter("complaint", "open", true)],
                    1 => vec![
                        matter("complaint", "resolved", false),
                        matter("tip", "open", true),
                    ],
                    2 => vec![matter("dispute", "mediating", true)],
                    _ => vec![],
                };
                s.follow_ups = match i % 4 {
                    0 => vec![follow_up("todo", Some(1_500))],
                    1 => vec![follow_up("todo", Some(9_000)), follow_up("done", Some(100))],
                    2 => vec![follow_up("todo", None), follow_up("todo", Some(1_200))],
                    _ => vec![follow_up("cancelled", Some(100))],
                };
                s.review_state = ["received", "approved", "needs_follow_up"][i as usize % 3].into();
                s.changed_since_approval = i % 3 == 1 && i % 2 == 0;
                s.conflicts = u32::from(i % 6 == 5);
                s.quarantine = if i == 11 {
                    vec!["bad key".into()]
                } else {
                    vec![]
                };
                // Two households merged into another, one of them changed since.
                if i == 4 || i == 7 {
                    s.merged_into = Some(crate::records::merge::MergeMark {
                        into: DocumentId::random(),
                        by: "lin".into(),
                        at_ms: 900,
                        heads: vec![],
                    });
                    if i == 7 {
                        s.after_merge = vec!["visits.x".into()];
                    }
                }
                s.search_text = format!(
                    "no. {i} lane 50%_off \\ {}",
                    ["林森", "noise", "dog"][i as usize % 3]
                );
                r
            })
            .collect()
    }

    fn filters() -> Vec<Filter> {
        use crate::records::{FollowUpStatus, MatterKind};
        let f = Filter::default;
        vec![
            f(),
            Filter {
                village: Some("west".into()),
                ..f()
            },
            Filter {
                officer: Some("ben".into()),
                ..f()
            },
            Filter {
                matter_kind: Some(MatterKind::Complaint),
                ..f()
            },
            Filter {
                matter_status: Some("resolved".into()),
                ..f()
            },
            Filter {
                matter_kind: Some(MatterKind::Complaint),
                matter_status: Some("open".into()),
                ..f()
            },
            Filter {
                matter_status: Some("open".into()),
                ..f()
            },
            Filter {
                follow_up_status: Some(FollowUpStatus::Todo),
                ..f()
            },
            Filter {
                follow_up_status: Some(FollowUpStatus::Cancelled),
                ..f()
            },
            Filter {
                overdue: Some(true),
                ..f()
            },
            Filter {
                overdue: Some(false),
                ..f()
            },
            Filter {
                review: Some("approved".into()),
                ..f()
            },
            Filter {
                review: Some("changed_since_approval".into()),
                ..f()
            },
            Filter {
                updated_since: Some(1_040),
                ..f()
            },
            Filter {
                q: Some("  NOISE ".into()),
                ..f()
            },
            Filter {
                q: Some("林森".into()),
                ..f()
            },
            Filter {
                q: Some("50%_".into()),
                ..f()
            },
            Filter {
                q: Some("%".into()),
                ..f()
            },
            Filter {
                q: Some("\\".into()),
                ..f()
            },
            Filter {
                q: Some("5_%".into()),
                ..f()
            },
            Filter {
                conflicts: Some(true),
                ..f()
            },
            Filter {
                conflicts: Some(false),
                ..f()
            },
            Filter {
                quarantined: Some(true),
                ..f()
            },
            Filter {
                merged: Some(super::super::MergedFilter::All),
                ..f()
            },
            Filter {
                merged: Some(super::super::MergedFilter::AfterMerge),
                village: Some("east".into()),
                ..f()
            },
            Filter {
                village: Some("east".into()),
                officer: Some("amy".into()),
                overdue: Some(true),
                ..f()
            },
        ]
    }

    /// Every staff filter selects the same households, in the same order and pages, as
    /// [`Filter::matches`] over the rows; the coverage figures are the rows' own.
    pub(crate) fn lists_and_coverage_agree_with_the_rows(s: &dyn ProjectionStore) {
        s.clear().unwrap();
        let rows = varied_rows();
        for r in &rows {
            write_whole(s, r.clone(), VillageCounts::default());
        }
        let now_ms = 2_000;
        let west = ["west".to_string()];
        for filter in filters() {
            for villages in [None, Some(&west[..])] {
                let mut expected: Vec<&HouseholdRow> = rows
                    .iter()
                    .filter(|r| r.station == "north")
                    .filter(|r| villages.is_none_or(|v| v.contains(&r.village)))
                    .filter(|r| filter.matches(r, now_ms))
                    .collect();
                expected.sort_by_key(|r| Cursor::of(r).key());
                let want: Vec<DocumentId> = expected.iter().map(|r| r.id).collect();
                let mut got = Vec::new();
                let mut after = None;
                loop {
                    let page = s
                        .list(&ListQuery {
                            station: "north",
                            villages,
                            filter: &filter,
                            now_ms,
                            after,
                            limit: 3,
                        })
                        .unwrap();
                    assert_eq!(page.total, want.len(), "{filter:?} in {villages:?}");
                    assert!(page.rows.len() <= 3);
                    got.extend(page.rows.iter().map(|r| r.id));
                    match page.next {
                        Some(c) => after = Some(c),
                        None => break,
                    }
                }
                assert_eq!(got, want, "{filter:?} in {villages:?}");
            }
        }

        let since = 900;
        for villages in [None, Some(&west[..])] {
            let mut expected: BTreeMap<String, TimeCounts> = BTreeMap::new();
            for r in rows.iter().filter(|r| r.station == "north" && r.listed()) {
                if villages.is_some_and(|v| !v.contains(&r.village)) {
                    continue;
                }
                let visited = r.summary.last_visit_at_ms.is_some_and(|t| t >= since);
                let overdue = r.summary.overdue(now_ms) as i64;
                if visited || overdue > 0 {
                    let c = expected.entry(r.village.clone()).or_default();
                    c.visited_since += i64::from(visited);
                    c.follow_ups_overdue += overdue;
                }
            }
            assert!(!expected.is_empty());
            assert_eq!(
                s.time_counts("north", villages, since, now_ms).unwrap(),
                expected,
                "{villages:?}"
            );
        }

        // A survivor finds the households merged into it, and no others.
        for merged in rows.iter().filter(|r| r.merged()) {
            let into = merged.summary.merged_into.as_ref().unwrap().into;
            let found: Vec<DocumentId> = s
                .merged_into("north", into)
                .unwrap()
                .iter()
                .map(|r| r.id)
                .collect();
            assert_eq!(found, vec![merged.id]);
        }
        assert!(s.merged_into("north", rows[0].id).unwrap().is_empty());
        s.clear().unwrap();
    }

    #[test]
    fn the_sled_projection_conforms() {
        crate::storage::on_temp_store(|store| {
            let s = SledProjection::new(store);
            assert!(s.single_writer(), "one process holds the data directory");
            run_all(&s);
            lists_and_coverage_agree_with_the_rows(&s);
        });
    }
}
