//! The document half of the storage seam: what the hub asks of storage for a document,
//! named by what the server does (load its chunks, store an accepted change with its
//! unsettled mark, settle, compact, keep sync states, make everything durable), not by
//! trees and bytes. Two backends answer it: the embedded sled [`Store`](super::Store) and
//! [`PgStore`](super::postgres::PgStore). One conformance suite (`tests` below) runs against
//! both. Key and row layouts belong to each backend. Must not: know Automerge beyond bytes,
//! or decide anything about access.

use super::{ChunkKey, Result, StoredDocument};
use crate::ids::{DocumentId, StorageId};

/// Every call blocks: call it on a blocking thread (the hub's actors do), never on the
/// async reactor.
pub trait DocumentStore: Send + Sync + 'static {
    /// Every chunk of `doc`, snapshots first.
    fn load(&self, doc: DocumentId) -> Result<StoredDocument>;

    /// Whether anything is stored for `doc`.
    fn exists(&self, doc: DocumentId) -> Result<bool>;

    /// Every document with stored chunks, in id order (a full scan: for maintenance
    /// commands such as `fieldsync migrate`, never on a hot path).
    fn list(&self) -> Result<Vec<DocumentId>>;

    /// Stores the server's new changes of `doc` as one chunk and marks the document
    /// unsettled (its derived views may lag until [`DocumentStore::settle`]). After a crash
    /// a stored chunk always has its mark. Durable after [`DocumentStore::flush`].
    fn put_change(&self, doc: DocumentId, bytes: &[u8]) -> Result<ChunkKey>;

    /// `doc`'s derived views are durable and agree with its content.
    fn settle(&self, doc: DocumentId) -> Result<()>;

    /// Documents still marked unsettled.
    fn unsettled(&self) -> Result<Vec<DocumentId>>;

    /// Replaces `replaced` by one snapshot named `heads_hash`, atomically: after a crash
    /// either the old chunks or the snapshot are there, never neither.
    fn compact(
        &self,
        doc: DocumentId,
        heads_hash: [u8; 32],
        snapshot: &[u8],
        replaced: &[ChunkKey],
    ) -> Result<ChunkKey>;

    /// The persisted sync state of (`doc`, `peer`).
    fn sync_state(&self, doc: DocumentId, peer: &StorageId) -> Result<Option<Vec<u8>>>;

    /// Saves a sync state (losing one costs bandwidth, not data).
    fn put_sync_state(&self, doc: DocumentId, peer: &StorageId, state: &[u8]) -> Result<()>;

    /// Opens the unit of one accepted batch on this thread: what the hub and its observers
    /// write until [`DocumentStore::end_batch`] (chunk, registration, provenance,
    /// projection) commits or rolls back together. PostgreSQL: one transaction. sled: does
    /// nothing; its writes are ordered after the unsettled mark, which catch-up repairs from.
    fn begin_batch(&self) -> Result<()> {
        Ok(())
    }

    /// Commits (`true`) or rolls back the batch open on this thread.
    fn end_batch(&self, _commit: bool) -> Result<()> {
        Ok(())
    }

    /// Returns once everything written before the call is durable.
    fn flush(&self) -> Result<()>;

    /// [`DocumentStore::flush`] for async callers: resolves once everything written before
    /// the call is durable, sharing the work with concurrent callers where the backend can
    /// (sled: group commit).
    fn durable(&self) -> Durable;

    /// Makes everything written before the call durable on the calling (blocking) thread
    /// when that costs no more than [`DocumentStore::durable`] would: sled, when no flush is
    /// under way or queued that the caller could share; PostgreSQL, always (a batch is
    /// durable once its transaction commits). `None`: await `durable` instead.
    fn durable_here(&self) -> Option<Result<()>> {
        None
    }

    /// Why this store cannot make writes durable now, as far as it knows without I/O (for
    /// readiness; `None`: nothing known against it). sled: its flusher stopped, or a flush
    /// has run longer than `limit`. PostgreSQL answers through its listener instead.
    fn stalled(&self, _limit: std::time::Duration) -> Option<String> {
        None
    }
}

/// What [`DocumentStore::durable`] returns.
pub type Durable = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

impl DocumentStore for super::Store {
    fn load(&self, doc: DocumentId) -> Result<StoredDocument> {
        self.load_blocking(doc)
    }

    fn exists(&self, doc: DocumentId) -> Result<bool> {
        self.exists_blocking(doc)
    }

    fn list(&self) -> Result<Vec<DocumentId>> {
        self.list_documents_blocking()
    }

    fn put_change(&self, doc: DocumentId, bytes: &[u8]) -> Result<ChunkKey> {
        self.put_change_blocking(doc, bytes)
    }

    fn settle(&self, doc: DocumentId) -> Result<()> {
        self.settle_blocking(doc)
    }

    fn unsettled(&self) -> Result<Vec<DocumentId>> {
        self.unsettled_blocking()
    }

    fn compact(
        &self,
        doc: DocumentId,
        heads_hash: [u8; 32],
        snapshot: &[u8],
        replaced: &[ChunkKey],
    ) -> Result<ChunkKey> {
        self.compact_blocking(doc, heads_hash, snapshot, replaced)
    }

    fn sync_state(&self, doc: DocumentId, peer: &StorageId) -> Result<Option<Vec<u8>>> {
        self.sync_state_blocking(doc, peer)
    }

    fn put_sync_state(&self, doc: DocumentId, peer: &StorageId, state: &[u8]) -> Result<()> {
        self.put_sync_state_blocking(doc, peer, state)
    }

    fn flush(&self) -> Result<()> {
        self.flush_blocking()
    }

    fn durable(&self) -> Durable {
        Box::pin(super::Store::flush(self))
    }

    fn durable_here(&self) -> Option<Result<()>> {
        self.flush_here()
    }

    fn stalled(&self, limit: std::time::Duration) -> Option<String> {
        super::Store::stalled(self, limit)
    }
}

/// The conformance suite: the same scenarios against every backend. The PostgreSQL runs
/// start a throwaway cluster of Debian's `postgresql` (see `super::postgres::testing`).
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::storage::ChunkKind;
    use automerge::transaction::Transactable;
    use automerge::ReadDoc;

    fn peer(name: &str) -> StorageId {
        StorageId::new(name).unwrap()
    }

    /// Changes stored one by one load back into the same document, in a chunk each; the
    /// same bytes stored twice are one chunk.
    pub(crate) fn chunks_load_back_and_are_content_addressed(s: &dyn DocumentStore) {
        let id = DocumentId::random();
        assert!(s.load(id).unwrap().chunks.is_empty());
        assert!(!s.exists(id).unwrap());
        let mut doc = automerge::Automerge::new();
        let mut heads = Vec::new();
        for i in 0..3i64 {
            doc.transact(|tx| tx.put(automerge::ROOT, format!("k{i}"), i))
                .unwrap();
            let chunk = doc.save_after(&heads);
            s.put_change(id, &chunk).unwrap();
            s.put_change(id, &chunk).unwrap();
            heads = doc.get_heads();
        }
        s.flush().unwrap();
        // With no other flush under way, a blocking caller can make its writes durable in
        // place (what a document actor does when it is the only one writing).
        assert!(matches!(s.durable_here(), Some(Ok(()))));
        assert!(s.exists(id).unwrap());
        let stored = s.load(id).unwrap();
        assert_eq!(stored.chunks.len(), 3);
        assert!(stored
            .chunks
            .iter()
            .all(|(k, _)| k.kind == ChunkKind::Incremental && k.doc == id));
        let loaded = stored.hydrate().unwrap();
        assert_eq!(loaded.get_heads(), doc.get_heads());
        assert_eq!(
            loaded
                .get(automerge::ROOT, "k2")
                .unwrap()
                .unwrap()
                .0
                .as_i64(),
            Some(2)
        );
        // Another document's chunks stay apart.
        assert!(s.load(DocumentId::random()).unwrap().chunks.is_empty());
    }

    /// A stored change marks its document unsettled until it is settled.
    pub(crate) fn a_stored_change_is_unsettled_until_settled(s: &dyn DocumentStore) {
        for earlier in s.unsettled().unwrap() {
            s.settle(earlier).unwrap();
        }
        let (a, b) = (DocumentId::random(), DocumentId::random());
        let mut doc = automerge::Automerge::new();
        doc.transact(|tx| tx.put(automerge::ROOT, "n", 1)).unwrap();
        s.put_change(a, &doc.save()).unwrap();
        s.put_change(b, &doc.save()).unwrap();
        let mut marked = s.unsettled().unwrap();
        marked.sort();
        let mut expected = vec![a, b];
        expected.sort();
        assert_eq!(marked, expected);
        s.settle(a).unwrap();
        assert_eq!(s.unsettled().unwrap(), vec![b]);
        s.settle(b).unwrap();
        s.settle(b).unwrap(); // settling twice is harmless
        assert!(s.unsettled().unwrap().is_empty());
    }

    /// Compaction replaces the chunks it names by one snapshot and keeps a chunk stored
    /// meanwhile; the document loads the same.
    pub(crate) fn compaction_replaces_what_it_loaded(s: &dyn DocumentStore) {
        let id = DocumentId::random();
        let mut doc = automerge::Automerge::new();
        let mut heads = Vec::new();
        for i in 0..4i64 {
            doc.transact(|tx| tx.put(automerge::ROOT, "n", i)).unwrap();
            s.put_change(id, &doc.save_after(&heads)).unwrap();
            heads = doc.get_heads();
        }
        let replaced: Vec<ChunkKey> = s
            .load(id)
            .unwrap()
            .chunks
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let snapshot = doc.save();
        // A change that arrives after the compaction read the chunks.
        doc.transact(|tx| tx.put(automerge::ROOT, "late", true))
            .unwrap();
        s.put_change(id, &doc.save_after(&heads)).unwrap();
        let key = s.compact(id, [9; 32], &snapshot, &replaced).unwrap();
        assert_eq!(key.kind, ChunkKind::Snapshot);
        s.flush().unwrap();
        let stored = s.load(id).unwrap();
        assert_eq!(stored.chunks.len(), 2, "the snapshot and the late chunk");
        assert_eq!(stored.chunks[0].0, key, "snapshots load first");
        assert_eq!(stored.hydrate().unwrap().get_heads(), doc.get_heads());
        // Compacting again with the same snapshot is harmless.
        s.compact(id, [9; 32], &snapshot, &[key]).unwrap();
        assert_eq!(s.load(id).unwrap().chunks.len(), 2);
    }

    /// Sync states are kept per (document, peer) and replaced.
    pub(crate) fn sync_states_are_per_document_and_peer(s: &dyn DocumentStore) {
        let (a, b) = (DocumentId::random(), DocumentId::random());
        assert_eq!(s.sync_state(a, &peer("phone-1")).unwrap(), None);
        s.put_sync_state(a, &peer("phone-1"), b"one").unwrap();
        s.put_sync_state(a, &peer("phone-2"), b"two").unwrap();
        s.put_sync_state(b, &peer("phone-1"), b"three").unwrap();
        s.put_sync_state(a, &peer("phone-1"), b"one, later")
            .unwrap();
        assert_eq!(
            s.sync_state(a, &peer("phone-1")).unwrap().as_deref(),
            Some(&b"one, later"[..])
        );
        assert_eq!(
            s.sync_state(a, &peer("phone-2")).unwrap().as_deref(),
            Some(&b"two"[..])
        );
        assert_eq!(
            s.sync_state(b, &peer("phone-1")).unwrap().as_deref(),
            Some(&b"three"[..])
        );
    }

    /// Every document with chunks is listed once, in id order.
    pub(crate) fn documents_are_listed_once_in_id_order(s: &dyn DocumentStore) {
        let before = s.list().unwrap();
        let mut ids: Vec<DocumentId> = (0..3).map(|_| DocumentId::random()).collect();
        let mut doc = automerge::Automerge::new();
        for (i, id) in ids.iter().enumerate() {
            for n in 0..2i64 {
                doc.transact(|tx| tx.put(automerge::ROOT, "n", i as i64 * 10 + n))
                    .unwrap();
                s.put_change(*id, &doc.save()).unwrap();
            }
        }
        ids.extend(before);
        ids.sort();
        assert_eq!(s.list().unwrap(), ids);
    }

    pub(crate) fn run_all(s: &dyn DocumentStore) {
        documents_are_listed_once_in_id_order(s);
        chunks_load_back_and_are_content_addressed(s);
        a_stored_change_is_unsettled_until_settled(s);
        compaction_replaces_what_it_loaded(s);
        sync_states_are_per_document_and_peer(s);
    }

    #[tokio::test]
    async fn the_sled_store_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::storage::Store::open(dir.path(), &Default::default()).unwrap();
        tokio::task::spawn_blocking(move || run_all(&store))
            .await
            .unwrap();
    }
}
