//! The staff projection: per household a row (village, address label, last visit, visit
//! count, open matters, follow-ups, review state, conflicts, quarantine reasons), one row per
//! visit for the export, and counters per village (kept on sled, counted from the rows on
//! PostgreSQL), kept by a [`ProjectionStore`] and updated on every accepted change of a
//! household, on the document's actor thread before the flush (or in the transaction)
//! that makes the change durable. A change is attributed from the authors the household's
//! row cites (kept beside it) and the batch's own, not from the household's provenance
//! history, which is read only for a household's first row, a rebuild, and a change whose
//! summary asks about an older change the row did not cite. `reindex` rebuilds it from the
//! stored documents and provenance rows; the two must agree (a property test checks it).
//!
//! Staff queries (`query`) read only this projection, never every document. Must not: decide
//! access (it is given a [`ReadingScope`](crate::auth::ReadingScope)), write documents, or
//! run on the reactor.

pub mod postgres;
mod query;
pub mod report;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use automerge::{Automerge, ChangeHash};

use crate::accounts::Accounts;
use crate::changelog::{ChangeLog, ProvenanceRow};
use crate::hub::{ChangeObserver, ChangedBatch};
use crate::ids::DocumentId;
use crate::records::{summarise, Attribution, Author, Cited, HouseholdSummary, VisitRow};
use crate::storage::documents::DocumentStore;
use crate::storage::{StorageError, Store};
pub use query::{Coverage, Cursor, Filter, HouseholdPage, MergedFilter, CSV_HEADER};
pub use store::{
    Kept, ListAnswer, ListQuery, ProjectionStore, RowWrite, SledProjection, TimeCounts,
};

/// The projection row of one household (its visits are stored beside it).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HouseholdRow {
    pub id: DocumentId,
    pub station: String,
    /// The village it is registered to (not what the document says: that may change).
    pub village: String,
    /// Server time of its latest change.
    pub updated_at_ms: i64,
    #[serde(flatten)]
    pub summary: HouseholdSummary,
}

impl HouseholdRow {
    pub fn quarantined(&self) -> bool {
        !self.summary.quarantine.is_empty()
    }

    /// Merged into another household by staff: it leaves the lists and counts.
    pub fn merged(&self) -> bool {
        self.summary.merged_into.is_some()
    }

    /// In the normal lists, counts and reports: neither quarantined nor merged away.
    pub fn listed(&self) -> bool {
        !self.quarantined() && !self.merged()
    }
}

/// Counters of one village, over its listed households (quarantined and merged ones are
/// only counted as such).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VillageCounts {
    pub households: i64,
    pub quarantined: i64,
    /// Households merged into another.
    #[serde(default)]
    pub merged: i64,
    /// Merged households that changed after their merge (a late offline visit).
    #[serde(default)]
    pub changed_after_merge: i64,
    pub visits: i64,
    /// Households with at least one visit.
    pub visited: i64,
    /// Open matters per kind.
    pub open_matters: BTreeMap<String, i64>,
    pub follow_ups_todo: i64,
    pub households_with_conflicts: i64,
}

impl VillageCounts {
    pub(crate) fn add(&mut self, row: &HouseholdRow, sign: i64) {
        if row.merged() {
            self.merged += sign;
            self.changed_after_merge += sign * i64::from(!row.summary.after_merge.is_empty());
            return;
        }
        if row.quarantined() {
            self.quarantined += sign;
            return;
        }
        let s = &row.summary;
        self.households += sign;
        self.visits += sign * i64::from(s.visit_count);
        self.visited += sign * i64::from(s.visit_count > 0);
        for (kind, n) in &s.open_matters {
            let e = self.open_matters.entry(kind.clone()).or_insert(0);
            *e += sign * i64::from(*n);
            if *e == 0 {
                self.open_matters.remove(kind);
            }
        }
        self.follow_ups_todo += sign * s.follow_ups_todo() as i64;
        self.households_with_conflicts += sign * i64::from(s.conflicts > 0);
    }

    /// No household counted: the counters are not kept.
    pub(crate) fn is_empty(&self) -> bool {
        *self == VillageCounts::default()
    }
}

#[derive(Clone)]
pub struct Projection {
    inner: Arc<Inner>,
}

struct Inner {
    /// The documents (for catch-up and reindex).
    docs: Arc<dyn DocumentStore>,
    /// The projection's own rows.
    rows: Arc<dyn ProjectionStore>,
    accounts: Accounts,
    /// The provenance rows that attribute a household's values.
    changelog: ChangeLog,
    /// Serialises read-modify-write of rows and counters across document actors.
    write: Mutex<()>,
    /// Re-projections that read a household's provenance history ([`Projection::history_reads`]).
    history_reads: AtomicU64,
}

/// A household's row as computed, and the authors its summary cites (kept beside it, so
/// the next change needs only its own authors).
struct Built {
    row: HouseholdRow,
    cited: Vec<Cited>,
    /// The digests of the visit rows as stored, when they were kept (else they are read).
    visits_written: Option<BTreeMap<String, u64>>,
}

impl Built {
    /// Summarises `content` with `attribution` into the household's row, keeping what the
    /// summary asked of the attribution.
    fn summarised(
        doc: DocumentId,
        (station, village): (String, String),
        updated_at_ms: i64,
        content: &Automerge,
        attribution: &Attribution,
        visits_written: Option<BTreeMap<String, u64>>,
    ) -> Self {
        Built {
            row: HouseholdRow {
                id: doc,
                station,
                village,
                updated_at_ms,
                summary: summarise(content, attribution),
            },
            cited: attribution.cited(),
            visits_written,
        }
    }
}

impl Projection {
    /// On the embedded sled store.
    pub fn new(store: Store, accounts: Accounts, changelog: ChangeLog) -> Self {
        Self::on(
            Arc::new(store.clone()),
            Arc::new(SledProjection::new(store)),
            accounts,
            changelog,
        )
    }

    /// On any backends of the storage seam.
    pub fn on(
        docs: Arc<dyn DocumentStore>,
        rows: Arc<dyn ProjectionStore>,
        accounts: Accounts,
        changelog: ChangeLog,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                docs,
                rows,
                accounts,
                changelog,
                write: Mutex::new(()),
                history_reads: AtomicU64::new(0),
            }),
        }
    }

    /// The station and village `doc` is registered to (`None`: not a household, e.g. a
    /// catalog).
    fn registration(&self, doc: DocumentId) -> Option<(String, String)> {
        self.inner.accounts.with_directory(|d| {
            d.household(doc)
                .map(|h| (h.station.to_string(), h.village.to_string()))
        })
    }

    /// The row of a household computed from its document and its whole provenance history
    /// (a rebuild, and the first projection of a household whose document had changes before
    /// the batch, e.g. one registered after its first upload).
    fn build_row(
        &self,
        doc: DocumentId,
        content: &Automerge,
        (station, village): (String, String),
    ) -> Result<Built, StorageError> {
        let rows = self.inner.changelog.provenance_blocking(doc)?;
        self.inner.history_reads.fetch_add(1, Ordering::Relaxed);
        crate::metrics::PROJECTION_HISTORY_READS.inc();
        let attribution = attribution(content, &rows);
        let updated_at_ms = rows
            .iter()
            .map(|r| r.received_at.as_millis() as i64)
            .max()
            .unwrap_or_default();
        Ok(Built::summarised(
            doc,
            (station, village),
            updated_at_ms,
            content,
            &attribution,
            None,
        ))
    }

    /// The row of a household after `batch`, from the authors its previous row cites and
    /// the authors of the batch's own changes, without reading its provenance history: the
    /// same row as [`Projection::build_row`] unless the summary asks about a change neither
    /// knows (a conflict with an old value, say). Then, or when nothing was kept, `None`.
    /// With no previous row, only a batch that is the document's whole history (it started
    /// from no heads) knows every author.
    fn row_after(
        &self,
        doc: DocumentId,
        content: &Automerge,
        (station, village): (String, String),
        old: Option<&HouseholdRow>,
        batch: &ChangedBatch<'_>,
    ) -> Result<Option<Built>, StorageError> {
        let kept = match old {
            Some(_) => match self.inner.rows.kept(doc)? {
                Some(kept) => kept,
                None => return Ok(None),
            },
            None if batch.heads_before.is_empty() => Kept::default(),
            None => return Ok(None),
        };
        let mut known: HashMap<ChangeHash, Option<Author>> = kept
            .cited
            .into_iter()
            .map(|c| (c.change, c.author))
            .collect();
        // The batch's changes that nobody delivered are the server's own edits: the change
        // log recorded no author for them.
        for change in content.get_changes_meta(batch.heads_before) {
            known.insert(change.hash, None);
        }
        // As a rebuild has it: the latest receive time of a delivered change.
        let mut updated_at_ms = old.map_or(0, |old| old.updated_at_ms);
        for (who, hashes) in batch.delivered {
            let author =
                crate::changelog::author(&who.user, who.device.as_ref(), batch.received_at);
            for hash in hashes {
                known.insert(*hash, Some(author.clone()));
                updated_at_ms = updated_at_ms.max(author.received_at_ms);
            }
        }
        let attribution = Attribution::partial(content, known);
        let built = Built::summarised(
            doc,
            (station, village),
            updated_at_ms,
            content,
            &attribution,
            // Trusted only where no other process writes the rows (see `single_writer`).
            kept.visits.filter(|_| self.inner.rows.single_writer()),
        );
        Ok((!attribution.missed()).then_some(built))
    }

    /// Brings the projection of `doc` up to date with `content`, after `batch` when the
    /// caller knows what changed (from the row's kept authors), else from the household's
    /// provenance history. Returns whether the household is quarantined now.
    pub fn update_blocking(
        &self,
        doc: DocumentId,
        content: &Automerge,
        batch: Option<&ChangedBatch<'_>>,
    ) -> Result<bool, StorageError> {
        let Some(registered) = self.registration(doc) else {
            return Ok(false); // catalogs, refused uploads
        };
        // Only this document's actor writes its row, so it can be read before the lock.
        let old = self.inner.rows.row(&registered.0, doc)?;
        let after = match batch {
            Some(batch) => self.row_after(doc, content, registered.clone(), old.as_ref(), batch)?,
            None => None,
        };
        let built = match after {
            Some(built) => built,
            None => self.build_row(doc, content, registered)?,
        };
        let quarantined = built.row.quarantined();
        // Counters kept apart are read, moved and written back: one writer at a time. A
        // backend that derives them needs no lock (a row is only written by its
        // document's actor).
        let _w = (!self.inner.rows.counts_are_derived()).then(|| lock(&self.inner.write));
        self.write_row_blocking(built, old)?;
        Ok(quarantined)
    }

    /// How many re-projections read a household's whole provenance history (the first of
    /// each household, rebuilds, and changes its kept authors did not cover).
    pub fn history_reads(&self) -> u64 {
        self.inner.history_reads.load(Ordering::Relaxed)
    }

    /// Replaces a household's row (`old`, as stored) and visit rows and moves its
    /// contribution to the counters. Call with the write lock held. The writes are ordered,
    /// not atomic: they follow the document's unsettled mark (written with its chunk), so a
    /// crash that keeps only some of them leaves the mark too, and
    /// [`Projection::catch_up_blocking`] rewrites the row and recounts the counters on
    /// start-up.
    fn write_row_blocking(
        &self,
        built: Built,
        old: Option<HouseholdRow>,
    ) -> Result<(), StorageError> {
        let Built {
            mut row,
            cited,
            visits_written,
        } = built;
        let rows = &self.inner.rows;
        let visits = std::mem::take(&mut row.summary.visits);
        let digests: BTreeMap<String, u64> = visits
            .iter()
            .map(|v| (v.id.clone(), visit_digest(v)))
            .collect();
        let (put_visits, removed_visits) = match visits_written {
            // What was written is known by digest: nothing to read back.
            Some(written) => (
                visits
                    .iter()
                    .filter(|v| written.get(&v.id) != digests.get(&v.id))
                    .collect(),
                written
                    .into_keys()
                    .filter(|id| !digests.contains_key(id))
                    .collect(),
            ),
            None => {
                let mut old_visits: HashMap<String, VisitRow> = HashMap::new();
                rows.for_each_visit(row.id, &mut |v| {
                    old_visits.insert(v.id.clone(), v);
                    true
                })?;
                let mut put = Vec::new();
                for v in &visits {
                    if old_visits.remove(&v.id).as_ref() != Some(v) {
                        put.push(v);
                    }
                }
                (put, old_visits.into_keys().collect())
            }
        };
        let mut counts: BTreeMap<(String, String), VillageCounts> = BTreeMap::new();
        if !rows.counts_are_derived() {
            if let Some(old) = &old {
                self.counts_entry(&mut counts, &old.station, &old.village)?
                    .add(old, -1);
            }
            self.counts_entry(&mut counts, &row.station, &row.village)?
                .add(&row, 1);
        }
        rows.write(&RowWrite {
            row: &row,
            put_visits,
            removed_visits,
            counts: counts
                .into_iter()
                .map(|((station, village), c)| (station, village, c))
                .collect(),
            kept: &Kept {
                cited,
                visits: Some(digests),
            },
        })
    }

    fn counts_entry<'a>(
        &self,
        counts: &'a mut BTreeMap<(String, String), VillageCounts>,
        station: &str,
        village: &str,
    ) -> Result<&'a mut VillageCounts, StorageError> {
        let k = (station.to_string(), village.to_string());
        if !counts.contains_key(&k) {
            let current = self.inner.rows.counts(station, village)?;
            counts.insert(k.clone(), current);
        }
        Ok(counts.get_mut(&k).expect("inserted"))
    }

    /// Rebuilds the whole projection from the stored documents and provenance rows, calling
    /// `progress(done, total)` after each household. Run it while no server uses the store
    /// (`fieldsync reindex` refuses otherwise), or, in tests, when the hub is quiescent.
    pub fn reindex_blocking(
        &self,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<usize, StorageError> {
        let mut docs: Vec<DocumentId> = self
            .inner
            .accounts
            .with_directory(|d| d.households().map(|h| h.doc).collect());
        docs.sort();
        let _w = lock(&self.inner.write);
        self.inner.rows.clear()?;
        let total = docs.len();
        for (i, doc) in docs.into_iter().enumerate() {
            let content = load_content(self.inner.docs.as_ref(), doc)?;
            if let Some(registered) = self.registration(doc) {
                let built = self.build_row(doc, &content, registered)?;
                self.write_row_blocking(built, None)?;
            }
            progress(i + 1, total);
        }
        Ok(total)
    }

    /// Brings the projection up to date for every document whose change may have outlived
    /// its projection row in a crash (marked unsettled by the store), then clears the marks.
    /// A crash may also have kept only part of a row's writes (they are ordered, not atomic),
    /// so the counters, which move by the difference between a row's old and new values, are
    /// then recounted from the rows. Run at start-up, before serving. Returns how many
    /// documents were re-projected.
    pub fn catch_up_blocking(&self) -> Result<usize, StorageError> {
        let store = self.inner.docs.as_ref();
        let docs = store.unsettled()?;
        for &doc in &docs {
            let content = load_content(store, doc)?;
            self.update_blocking(doc, &content, None)?;
        }
        if !docs.is_empty() {
            self.recount_blocking()?;
            store.flush()?;
            for &doc in &docs {
                store.settle(doc)?;
            }
        }
        Ok(docs.len())
    }

    /// Replaces every village's counters by a count of the household rows (read one at a
    /// time).
    fn recount_blocking(&self) -> Result<(), StorageError> {
        if self.inner.rows.counts_are_derived() {
            return Ok(());
        }
        let _w = lock(&self.inner.write);
        let mut counts: BTreeMap<(String, String), VillageCounts> = BTreeMap::new();
        self.inner.rows.for_each_row(None, &mut |row| {
            counts
                .entry((row.station.clone(), row.village.clone()))
                .or_default()
                .add(&row, 1);
            true
        })?;
        self.inner.rows.replace_counts(&counts)
    }

    /// Everything the projection holds, one line per row (JSON, in a fixed order), for
    /// comparing an incremental projection with a rebuilt one.
    pub fn dump_blocking(&self) -> Result<Vec<String>, StorageError> {
        let rows = &self.inner.rows;
        let mut out = Vec::new();
        let mut households = Vec::new();
        rows.for_each_row(None, &mut |row| {
            households.push(row);
            true
        })?;
        for row in households {
            let id = row.id;
            out.push(serde_json::to_string(&row).expect("rows serialise"));
            out.push(format!(
                "{id} keeps {}",
                serde_json::to_string(&rows.kept(id)?).expect("kept values serialise")
            ));
            rows.for_each_visit(id, &mut |v| {
                out.push(format!(
                    "{id} {}",
                    serde_json::to_string(&v).expect("rows serialise")
                ));
                true
            })?;
        }
        for ((station, village), c) in rows.all_counts()? {
            out.push(format!(
                "{station}/{village} {}",
                serde_json::to_string(&c).expect("counts serialise")
            ));
        }
        Ok(out)
    }

    /// The row of one household, if it is registered and projected.
    pub fn household_blocking(
        &self,
        station: &str,
        doc: DocumentId,
    ) -> Result<Option<HouseholdRow>, StorageError> {
        self.inner.rows.row(station, doc)
    }

    pub fn counts_blocking(
        &self,
        station: &str,
        village: &str,
    ) -> Result<VillageCounts, StorageError> {
        self.inner.rows.counts(station, village)
    }
}

/// The attribution of a document's values from its provenance rows.
pub fn attribution(content: &Automerge, rows: &[ProvenanceRow]) -> Attribution {
    let authors = rows
        .iter()
        .filter_map(|r| {
            let hash: ChangeHash = r.hash.parse().ok()?;
            Some((hash, r.author()))
        })
        .collect();
    Attribution::new(content, authors)
}

/// Runs after the change log (the hub calls its observers in order), so the rows of the
/// change being projected are there to attribute it.
impl ChangeObserver for Projection {
    fn document_changed(
        &self,
        doc: DocumentId,
        content: &Automerge,
        batch: &ChangedBatch<'_>,
    ) -> Result<(), StorageError> {
        if self.update_blocking(doc, content, Some(batch))? {
            crate::metrics::QUARANTINED_UPDATES.inc();
        }
        Ok(())
    }
}

/// A digest of a visit row as written, to tell whether it changed without reading it back.
/// (`DefaultHasher::new` is fixed within a build; a build that hashes differently only
/// rewrites each household's visit rows once.)
fn visit_digest(v: &VisitRow) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// A stored document, loaded whole.
fn load_content(store: &dyn DocumentStore, doc: DocumentId) -> Result<Automerge, StorageError> {
    store.load(doc)?.hydrate()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::AccountsConfig;
    use crate::ids::{ManualClock, Timestamp};
    use crate::records::samples;

    fn household(house_no: &str, visits: usize) -> Automerge {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        crate::records::create_household(&mut tx, &samples::household(house_no)).unwrap();
        for i in 0..visits {
            crate::records::add_visit(&mut tx, &samples::visit("amy", &format!("visit {i}")))
                .unwrap();
        }
        tx.commit();
        doc
    }

    fn row(id: DocumentId, doc: &Automerge) -> HouseholdRow {
        HouseholdRow {
            id,
            station: "north".into(),
            village: "east".into(),
            updated_at_ms: 0,
            summary: summarise(doc, &Attribution::new(doc, HashMap::new())),
        }
    }

    /// A crash can keep part of a row's ordered writes: here the counters moved for a new
    /// visit but the row did not. The document's unsettled mark survives with them, and
    /// catch-up recounts the counters from the rows (and drops counters of no household).
    #[tokio::test]
    async fn catch_up_recounts_counters_a_crash_left_half_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &Default::default()).unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_790_000_000_000)));
        let accounts = Accounts::open(store.clone(), clock, AccountsConfig::default())
            .await
            .unwrap();
        let changelog = ChangeLog::new(store.clone(), accounts.clone());
        let projection = Projection::new(store.clone(), accounts, changelog);
        let (a, b) = (DocumentId::random(), DocumentId::random());
        let (doc_a, doc_b) = (household("1", 2), household("2", 1));
        {
            let _w = lock(&projection.inner.write);
            for (id, doc) in [(a, &doc_a), (b, &doc_b)] {
                let built = Built {
                    row: row(id, doc),
                    cited: Vec::new(),
                    visits_written: None,
                };
                projection.write_row_blocking(built, None).unwrap();
            }
        }
        let before = projection.counts_blocking("north", "east").unwrap();
        assert_eq!((before.households, before.visits), (2, 3));

        let mut torn = before.clone();
        torn.visits += 1;
        torn.visited -= 1;
        let mut torn_counts = BTreeMap::new();
        torn_counts.insert(("north".to_string(), "east".to_string()), torn.clone());
        torn_counts.insert(("north".to_string(), "gone".to_string()), torn);
        projection.inner.rows.replace_counts(&torn_counts).unwrap();
        store.put_change_blocking(a, &doc_a.save()).unwrap();
        assert_ne!(projection.counts_blocking("north", "east").unwrap(), before);

        assert_eq!(projection.catch_up_blocking().unwrap(), 1);
        assert_eq!(projection.counts_blocking("north", "east").unwrap(), before);
        assert_eq!(
            projection.counts_blocking("north", "gone").unwrap(),
            VillageCounts::default()
        );
        assert!(store.unsettled_blocking().unwrap().is_empty());
    }
}
