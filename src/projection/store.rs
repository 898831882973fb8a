//! Where the staff projection keeps its rows, behind one interface with a backend per
//! engine: household rows, visit rows and village counters. The sled layout (one tree,
//! keys by kind) is here; the PostgreSQL one (tables with indexes by station, village and
//! last change) is in `projection::postgres`. One conformance suite (`tests`) runs against
//! both. What a row holds and how counters move is `projection`'s; this only keeps them.
//! Must not: compute rows or counters, or decide who may read them.

use std::collections::BTreeMap;

use super::{HouseholdRow, VillageCounts};
use crate::ids::DocumentId;
use crate::records::VisitRow;
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

    /// The visit rows of `doc`, by visit id, until `each` returns `false`.
    fn for_each_visit(
        &self,
        doc: DocumentId,
        each: &mut dyn FnMut(VisitRow) -> bool,
    ) -> Result<(), StorageError>;

    /// A village's counters (empty when it has none).
    fn counts(&self, station: &str, village: &str) -> Result<VillageCounts, StorageError>;

    /// A village's counters, read to be changed by [`ProjectionStore::write`] in the same
    /// batch: on PostgreSQL the row is locked until the batch ends, so a concurrent batch
    /// reads the counters only once this one's change is committed (else both would start
    /// from the same value and one change would be lost). sled needs nothing more than the
    /// projection's own lock: its writes are visible at once.
    fn counts_for_update(
        &self,
        station: &str,
        village: &str,
    ) -> Result<VillageCounts, StorageError> {
        self.counts(station, village)
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

/// Keys: `h` station 0x00 doc(16) -> row; `v` doc(16) visit-id -> visit row; `c` station
/// 0x00 village -> counters.
mod keys {
    use crate::ids::DocumentId;

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

    fn household(house_no: &str, visits: usize) -> Automerge {
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

    fn row(station: &str, village: &str, updated: i64, doc: &Automerge) -> HouseholdRow {
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
        })
        .unwrap();
        r.summary.visits = visits;
        r
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
            row("north", "east", 10, &household("1", 2)),
            some.clone(),
        );
        let b = write_whole(
            s,
            row("north", "west", 20, &household("2", 1)),
            some.clone(),
        );
        let c = write_whole(
            s,
            row("south", "east", 30, &household("3", 0)),
            some.clone(),
        );

        assert_eq!(s.row("north", a.id).unwrap(), Some(without_visits(&a)));
        assert_eq!(s.row("south", a.id).unwrap(), None, "rows are per station");
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
        })
        .unwrap();
        assert_eq!(s.row("north", a.id).unwrap().unwrap().updated_at_ms, 40);
        let mut visits = Vec::new();
        s.for_each_visit(a.id, &mut |v| {
            visits.push(v);
            true
        })
        .unwrap();
        assert_eq!(visits, vec![changed]);
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

        s.clear().unwrap();
        assert_eq!(s.row("south", c.id).unwrap(), None);
        assert!(s.all_counts().unwrap().is_empty());
        let mut any = false;
        s.for_each_visit(b.id, &mut |_| {
            any = true;
            true
        })
        .unwrap();
        assert!(!any);
    }

    #[test]
    fn the_sled_projection_conforms() {
        crate::storage::on_temp_store(|store| run_all(&SledProjection::new(store)));
    }
}
