//! Where the change log keeps its rows, behind one interface with a backend per engine:
//! provenance rows (one per accepted change, readable per document and in server order as
//! the change feed), actor bindings, and the server sequence. The sled layout (trees keyed
//! by bytes) is here; the PostgreSQL one (tables with an index per question) is in
//! `changelog::postgres`. One conformance suite (`tests`) runs against both. Must not:
//! decide who may read a row (callers pass `visible`), or look inside documents.

use super::ProvenanceRow;
use crate::auth::DeviceId;
use crate::ids::DocumentId;
use crate::storage::{StorageError, Store, Table};

/// Every call blocks (call it on a blocking thread).
pub trait ChangeLogStore: Send + Sync + 'static {
    /// Binds `actor` to `device` unless it is bound already; returns the device it was
    /// bound to before (`None`: bound now).
    fn bind_actor(&self, actor: &[u8], device: &DeviceId)
        -> Result<Option<DeviceId>, StorageError>;

    /// A new server sequence number, greater than every one handed out before, also
    /// across restarts (gaps are possible after a crash).
    fn next_seq(&self) -> Result<u64, StorageError>;

    /// Stores a row (its `seq` from [`ChangeLogStore::next_seq`]); it is then in the
    /// document's history and in the feed. Durable with the store's next flush.
    fn append(&self, row: &ProvenanceRow) -> Result<(), StorageError>;

    /// Every row of `doc`, in server order.
    fn history(&self, doc: DocumentId) -> Result<Vec<ProvenanceRow>, StorageError>;

    /// Rows after `after` in server order whose document is `visible`, up to `limit`,
    /// looking at `scan_max` rows at most; also the last sequence number looked at (the
    /// `after` of the next page; `after` itself when nothing was).
    fn feed(
        &self,
        after: u64,
        limit: usize,
        scan_max: usize,
        visible: &dyn Fn(DocumentId) -> bool,
    ) -> Result<(Vec<ProvenanceRow>, u64), StorageError>;

    /// Every actor binding, as (actor, device), for copying to another backend.
    fn actors(&self) -> Result<Vec<(Vec<u8>, DeviceId)>, StorageError>;

    /// Stores rows copied from another backend under their own sequence numbers (a row
    /// already stored is left as it is), and makes every number handed out later greater
    /// than theirs.
    fn import(&self, rows: &[ProvenanceRow]) -> Result<(), StorageError>;
}

/// The sled layout: [`Table::Provenance`] keyed doc(16) | seq(8 BE) with the row as JSON,
/// [`Table::Changes`] keyed seq(8 BE) -> doc(16) | hash(32), [`Table::Actors`] actor ->
/// device. Each write stands alone, in order (see `Store::table_write_in_order_blocking`).
pub struct SledChangeLog {
    store: Store,
}

impl SledChangeLog {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

fn provenance_key(doc: DocumentId, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(24);
    k.extend_from_slice(doc.as_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn parse_row(v: &[u8]) -> Result<ProvenanceRow, StorageError> {
    serde_json::from_slice(v).map_err(|e| StorageError::Corrupt(format!("provenance row: {e}")))
}

impl ChangeLogStore for SledChangeLog {
    fn bind_actor(
        &self,
        actor: &[u8],
        device: &DeviceId,
    ) -> Result<Option<DeviceId>, StorageError> {
        Ok(self
            .store
            .table_insert_if_absent_blocking(Table::Actors, actor, device.as_str().as_bytes())?
            .and_then(|b| DeviceId::new(&String::from_utf8_lossy(&b)).ok()))
    }

    fn next_seq(&self) -> Result<u64, StorageError> {
        // sled's ids start at 0, and the feed lists what comes *after* a number (0 for
        // "from the start"): start at 1, as PostgreSQL's sequence does.
        Ok(self.store.next_sequence_blocking()? + 1)
    }

    fn append(&self, row: &ProvenanceRow) -> Result<(), StorageError> {
        let hash = hex::decode(&row.hash)
            .map_err(|e| StorageError::Corrupt(format!("provenance row hash: {e}")))?;
        let mut feed = row.doc.as_bytes().to_vec();
        feed.extend_from_slice(&hash);
        self.store.table_write_in_order_blocking(
            Table::Provenance,
            vec![(
                provenance_key(row.doc, row.seq),
                Some(serde_json::to_vec(row).expect("rows serialise")),
            )],
        )?;
        self.store.table_write_in_order_blocking(
            Table::Changes,
            vec![(row.seq.to_be_bytes().to_vec(), Some(feed))],
        )
    }

    fn history(&self, doc: DocumentId) -> Result<Vec<ProvenanceRow>, StorageError> {
        self.store
            .table_scan_blocking(Table::Provenance, doc.as_bytes())?
            .into_iter()
            .map(|(_, v)| parse_row(&v))
            .collect()
    }

    fn feed(
        &self,
        after: u64,
        limit: usize,
        scan_max: usize,
        visible: &dyn Fn(DocumentId) -> bool,
    ) -> Result<(Vec<ProvenanceRow>, u64), StorageError> {
        let store = &self.store;
        let mut rows = Vec::new();
        let mut next = after;
        let mut scanned = 0;
        let mut failed = None;
        store.table_for_each_blocking(
            Table::Changes,
            b"",
            Some(&after.to_be_bytes()),
            |k, v| {
                scanned += 1;
                let (Ok(seq), Some(doc)) = (
                    <[u8; 8]>::try_from(k).map(u64::from_be_bytes),
                    v.get(..16)
                        .and_then(|b| <[u8; 16]>::try_from(b).ok())
                        .map(DocumentId::from_bytes),
                ) else {
                    return true;
                };
                next = seq;
                if visible(doc) {
                    match store
                        .table_get_blocking(Table::Provenance, &provenance_key(doc, seq))
                        .and_then(|r| r.map(|r| parse_row(&r)).transpose())
                    {
                        Ok(Some(row)) => rows.push(row),
                        Ok(None) => {}
                        Err(e) => {
                            failed = Some(e);
                            return false;
                        }
                    }
                }
                rows.len() < limit && scanned < scan_max
            },
        )?;
        match failed {
            Some(e) => Err(e),
            None => Ok((rows, next)),
        }
    }

    fn actors(&self) -> Result<Vec<(Vec<u8>, DeviceId)>, StorageError> {
        self.store
            .table_scan_blocking(Table::Actors, b"")?
            .into_iter()
            .map(|(actor, device)| {
                let device = DeviceId::new(&String::from_utf8_lossy(&device)).map_err(|_| {
                    StorageError::Corrupt("an actor is bound to an invalid device name".into())
                })?;
                Ok((actor, device))
            })
            .collect()
    }

    fn import(&self, rows: &[ProvenanceRow]) -> Result<(), StorageError> {
        for row in rows {
            if self
                .store
                .table_get_blocking(Table::Provenance, &provenance_key(row.doc, row.seq))?
                .is_none()
            {
                self.append(row)?;
            }
        }
        match rows.iter().map(|r| r.seq).max() {
            // `next_seq` is the store's sequence + 1.
            Some(last) => self.store.advance_sequence_blocking(last),
            None => Ok(()),
        }
    }
}

/// The conformance suite, against every backend.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::auth::UserName;
    use crate::ids::Timestamp;

    fn row(seq: u64, doc: DocumentId, n: u8) -> ProvenanceRow {
        ProvenanceRow {
            seq,
            doc,
            hash: hex::encode([n; 32]),
            actor: hex::encode([n; 16]),
            device: Some(DeviceId::new("dev-1").unwrap()),
            user: UserName::new("amy").unwrap(),
            received_at: Timestamp::from_millis(1_790_000_000_000 + u64::from(n)),
            flagged: n % 2 == 1,
            actor_bound_to: (n % 2 == 1).then(|| DeviceId::new("dev-0").unwrap()),
            heads_after: vec![hex::encode([n; 32]), hex::encode([n + 1; 32])],
        }
    }

    pub(crate) fn run_all(s: &dyn ChangeLogStore) {
        // Actors: the first device keeps the binding.
        let (d1, d2) = (
            DeviceId::new("dev-1").unwrap(),
            DeviceId::new("dev-2").unwrap(),
        );
        assert_eq!(s.bind_actor(b"actor-a", &d1).unwrap(), None);
        assert_eq!(s.bind_actor(b"actor-a", &d1).unwrap(), Some(d1.clone()));
        assert_eq!(s.bind_actor(b"actor-a", &d2).unwrap(), Some(d1.clone()));
        assert_eq!(s.bind_actor(b"actor-b", &d2).unwrap(), None);

        // Sequence numbers increase.
        let seqs: Vec<u64> = (0..6).map(|_| s.next_seq().unwrap()).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

        // Rows come back whole, per document in order, and in the feed in order.
        let (a, b) = (DocumentId::random(), DocumentId::random());
        let rows: Vec<ProvenanceRow> = seqs
            .iter()
            .enumerate()
            .map(|(i, seq)| row(*seq, if i % 3 == 0 { b } else { a }, i as u8))
            .collect();
        for r in &rows {
            s.append(r).unwrap();
        }
        let of_a: Vec<ProvenanceRow> = rows.iter().filter(|r| r.doc == a).cloned().collect();
        assert_eq!(s.history(a).unwrap(), of_a);
        assert!(s.history(DocumentId::random()).unwrap().is_empty());

        let before = seqs[0] - 1;
        let (all, next) = s.feed(before, 100, 1000, &|_| true).unwrap();
        let ours: Vec<ProvenanceRow> = all
            .into_iter()
            .filter(|r| r.doc == a || r.doc == b)
            .collect();
        assert_eq!(ours, rows);
        assert_eq!(next, *seqs.last().unwrap());

        // Only what is visible, a page at a time; the next page starts after the last look.
        let only_a = |d: DocumentId| d == a;
        let (page, next) = s.feed(before, 2, 1000, &only_a).unwrap();
        assert_eq!(page, of_a[..2].to_vec());
        let (page2, _) = s.feed(next, 100, 1000, &only_a).unwrap();
        assert_eq!(page2, of_a[2..].to_vec());
        // The scan stops after `scan_max` rows even when nothing was visible.
        let (none, next) = s.feed(before, 100, 3, &|_| false).unwrap();
        assert!(none.is_empty());
        assert_eq!(next, seqs[2]);
        // Past the end: nothing, and `after` stays.
        let end = *seqs.last().unwrap();
        assert_eq!(s.feed(end, 10, 10, &|_| true).unwrap(), (Vec::new(), end));

        // Every binding is listed.
        let mut bound = s.actors().unwrap();
        bound.sort();
        assert!(
            bound.contains(&(b"actor-a".to_vec(), d1.clone())),
            "{bound:?}"
        );
        assert!(
            bound.contains(&(b"actor-b".to_vec(), d2.clone())),
            "{bound:?}"
        );

        // Imported rows keep their numbers, importing again changes nothing, and numbers
        // handed out later are greater.
        let c = DocumentId::random();
        let far = end + 5_000;
        let imported = vec![row(far - 1, c, 7), row(far, c, 8)];
        s.import(&imported).unwrap();
        s.import(&imported).unwrap();
        assert_eq!(s.history(c).unwrap(), imported);
        assert!(s.next_seq().unwrap() > far);
    }

    #[test]
    fn the_sled_change_log_conforms() {
        crate::storage::on_temp_store(|store| run_all(&SledChangeLog::new(store)));
    }
}
