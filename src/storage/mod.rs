//! Storage: the seam (`documents::DocumentStore`, what the hub asks for a document), the
//! embedded sled store ([`Store`]; every sled call in the crate lives in this module) and the
//! PostgreSQL store (`postgres`: its pool, the migrations of every layer's tables, the batch
//! transaction, test clusters). The layers above keep their own rows behind traits of their
//! own, with a backend per engine built on these two.
//!
//! The sled store owns: the tree layout and key encoding (`keys`), content-addressed document chunks
//! (incremental changes and compacted snapshots), persisted Automerge sync states, small
//! metadata (the server's storage id), keyed tables for accounts, provenance, the change feed
//! and the audit log (`tables`), and durability through group commit (`group_commit`).
//! Must not: interpret Automerge documents (it stores bytes), or make any decision about who
//! may read what. Blocking sled calls are either wrapped in `spawn_blocking` (the `async`
//! methods) or named `*_blocking` for callers that are already on a blocking thread.

pub mod documents;
mod group_commit;
mod keys;
pub mod postgres;
mod tables;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::ids::{DocumentId, StorageId};
use group_commit::GroupCommit;
pub use keys::{ChunkKey, ChunkKind};
pub use tables::{Table, TableWrite};

/// Leading byte of every stored value: lets a later version change the value format.
const VALUE_VERSION: u8 = 1;

const TREE_CHUNKS: &str = "chunks";
const TREE_SYNC_STATES: &str = "sync_states";
const TREE_META: &str = "meta";
const META_STORAGE_ID: &[u8] = b"storage_id";

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// sled reported corruption: the data directory must be restored from a backup.
    #[error(
        "storage is corrupt ({0}); stop the server and restore the data directory from a backup"
    )]
    Corrupt(String),
    #[error("storage I/O failed: {0}")]
    Io(String),
    #[error("a stored value has unknown format version {0}; this fieldsync is too old for the data directory")]
    UnknownVersion(u8),
    #[error("the storage flusher has stopped")]
    FlusherStopped,
    #[error("a storage task failed: {0}")]
    Task(String),
    /// The data directory is open to other local users.
    #[error("{0}")]
    Permissions(String),
}

impl From<sled::Error> for StorageError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Corruption { .. } => StorageError::Corrupt(e.to_string()),
            other => StorageError::Io(other.to_string()),
        }
    }
}

impl Clone for StorageError {
    fn clone(&self) -> Self {
        match self {
            StorageError::Corrupt(s) => StorageError::Corrupt(s.clone()),
            StorageError::Io(s) => StorageError::Io(s.clone()),
            StorageError::Permissions(s) => StorageError::Permissions(s.clone()),
            StorageError::UnknownVersion(v) => StorageError::UnknownVersion(*v),
            StorageError::FlusherStopped => StorageError::FlusherStopped,
            StorageError::Task(s) => StorageError::Task(s.clone()),
        }
    }
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// Tuning for the embedded database.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// sled's page cache, in bytes.
    pub sled_cache_bytes: u64,
    /// Tests only (the `stall-flushes` failpoint): while a file of this name exists in the
    /// data directory, every flush hangs, as on a disk that stopped answering.
    pub stall_flushes_while: Option<String>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            sled_cache_bytes: 16 * 1024 * 1024,
            stall_flushes_while: None,
        }
    }
}

/// The name of a snapshot of a document at `heads` (what [`DocumentStore::compact`]
/// stores it under): equal snapshots get equal names, so storing one twice is harmless.
///
/// [`DocumentStore::compact`]: documents::DocumentStore::compact
pub fn snapshot_name(heads: &[automerge::ChangeHash]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for h in heads {
        hasher.update(h.0);
    }
    hasher.finalize().into()
}

/// Everything stored for one document, in load order (snapshots first).
#[derive(Debug, Default)]
pub struct StoredDocument {
    pub chunks: Vec<(ChunkKey, Vec<u8>)>,
}

impl StoredDocument {
    pub fn total_bytes(&self) -> usize {
        self.chunks.iter().map(|(_, b)| b.len()).sum()
    }

    /// The document these chunks hold. All chunks are handed to Automerge at once, so it
    /// applies their changes in one batch: chunk by chunk, each incremental chunk was a
    /// batch of its own, and loading documents evicted from the cache was the largest
    /// cost of a steady stream of visits after the projection. If that fails, the chunks
    /// are loaded one by one to name the chunk that does not load.
    pub fn hydrate(&self) -> Result<automerge::Automerge> {
        use automerge::{Automerge, LoadOptions, OnPartialLoad};
        if self.chunks.len() > 1 {
            let all: Vec<u8> = self
                .chunks
                .iter()
                .flat_map(|(_, b)| b.iter().copied())
                .collect();
            let options = LoadOptions::new().on_partial_load(OnPartialLoad::Error);
            if let Ok(doc) = Automerge::load_with_options(&all, options) {
                return Ok(doc);
            }
        }
        let mut doc = Automerge::new();
        for (key, bytes) in &self.chunks {
            doc.load_incremental(bytes).map_err(|e| {
                StorageError::Corrupt(format!(
                    "document {}: chunk {:?} does not load ({e})",
                    key.doc, key.kind
                ))
            })?;
        }
        Ok(doc)
    }
}

/// Creates the data directory, if missing, readable by this user only (0700): it holds
/// residents' records and password hashes.
pub fn prepare_data_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| {
            StorageError::Io(format!(
                "cannot create the data directory {}: {e}",
                dir.display()
            ))
        })
}

/// Refuses, with the command that fixes it, a data directory that other local users can
/// read or enter. The server checks this before it opens anything.
pub fn check_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(dir).map_err(|e| {
        StorageError::Io(format!(
            "cannot read the data directory {}: {e}",
            dir.display()
        ))
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StorageError::Permissions(format!(
            "the data directory {} is open to other users (mode {mode:o}); it holds residents' records and password hashes: run `chmod 700 {}` and start again",
            dir.display(),
            dir.display()
        )));
    }
    Ok(())
}

/// A file beside sled's, holding the store's id: if sled ever opens the directory empty (it
/// treats some kinds of damaged files as a fresh database), the mismatch is caught instead of
/// serving an empty store over the residents' records.
const IDENTITY_FILE: &str = "STORE_ID";

fn write_identity(dir: &Path, id: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(IDENTITY_FILE);
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| {
            f.write_all(id.as_bytes())?;
            f.sync_all()
        })
        .map_err(|e| StorageError::Io(format!("cannot write {}: {e}", path.display())))
}

/// Compares the store's id with the identity file (writing the file for a store that has
/// an id but no file yet, as stores made before it existed).
fn check_identity(dir: &Path, meta: &sled::Tree) -> Result<()> {
    let stored = match meta.get(META_STORAGE_ID)? {
        Some(v) => Some(String::from_utf8_lossy(unversioned(&v)?).into_owned()),
        None => None,
    };
    let marker = std::fs::read_to_string(dir.join(IDENTITY_FILE)).ok();
    match (marker, stored) {
        (Some(expected), None) => Err(StorageError::Corrupt(format!(
            "{} held store {} but its database files opened empty (damaged or replaced)",
            dir.display(),
            expected.trim()
        ))),
        (Some(expected), Some(id)) if expected.trim() != id => Err(StorageError::Corrupt(format!(
            "{} held store {} but its database files belong to store {id}",
            dir.display(),
            expected.trim()
        ))),
        (None, Some(id)) => write_identity(dir, &id),
        _ => Ok(()),
    }
}

/// Makes the files sled created readable by this user only (sled creates them with the
/// process umask). The directory is 0700 already; this keeps a copied or loosened directory
/// from exposing them.
fn restrict_files(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let entries = std::fs::read_dir(&d)
            .map_err(|e| StorageError::Io(format!("cannot list {}: {e}", d.display())))?;
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            let path = entry.path();
            if meta.is_dir() {
                if meta.permissions().mode() & 0o077 != 0 {
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                        .map_err(|e| {
                            StorageError::Io(format!("cannot restrict {}: {e}", path.display()))
                        })?;
                }
                pending.push(path);
                continue;
            }
            if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(
                    |e| StorageError::Io(format!("cannot restrict {}: {e}", path.display())),
                )?;
            }
        }
    }
    Ok(())
}

/// Counters for benchmarks and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// sled flushes performed by group commit.
    pub flushes: u64,
    /// Callers that waited for durability (one flush serves many).
    pub durability_waits: u64,
}

/// A cheap-to-clone handle to the store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    dir: std::path::PathBuf,
    db: sled::Db,
    chunks: sled::Tree,
    sync_states: sled::Tree,
    meta: sled::Tree,
    /// The [`Table`]s, in `Table::ALL` order.
    tables: Vec<sled::Tree>,
    commit: GroupCommit,
    durability_waits: AtomicU64,
}

impl Store {
    /// Opens (or creates) the store in `dir`. Must be called inside a tokio runtime (it starts
    /// the group-commit flusher). sled admits one process per directory: a second opener gets
    /// a clear error.
    pub fn open(dir: &Path, config: &StoreConfig) -> Result<Store> {
        prepare_data_dir(dir)?;
        let sled_config = sled::Config::new()
            .path(dir)
            .cache_capacity(config.sled_cache_bytes);
        // sled 0.34 panics on some kinds of damaged files instead of returning an error.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sled_config.open()))
            .map_err(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "sled failed while reading it".into());
                StorageError::Corrupt(format!("{}: {what}", dir.display()))
            })?;
        let db = opened
            .map_err(|e| match e {
                sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                    StorageError::Io(format!(
                        "the data directory {} is in use by another fieldsync process; stop it or choose another --data directory",
                        dir.display()
                    ))
                }
                other => StorageError::from(other),
            })?;
        let chunks = db.open_tree(TREE_CHUNKS)?;
        let sync_states = db.open_tree(TREE_SYNC_STATES)?;
        let meta = db.open_tree(TREE_META)?;
        let tables = Table::ALL
            .iter()
            .map(|t| db.open_tree(t.tree_name()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        check_identity(dir, &meta)?;
        restrict_files(dir)?;
        let stall = config.stall_flushes_while.as_ref().map(|f| dir.join(f));
        let commit = GroupCommit::start(db.clone(), stall)
            .map_err(|e| StorageError::Io(format!("cannot start the flusher thread: {e}")))?;
        Ok(Store {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                db,
                chunks,
                sync_states,
                meta,
                tables,
                commit,
                durability_waits: AtomicU64::new(0),
            }),
        })
    }

    /// Waits until everything written so far is on disk. Concurrent callers share one flush
    /// (group commit).
    pub fn flush(&self) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
        self.inner.durability_waits.fetch_add(1, Ordering::Relaxed);
        self.inner.commit.flush()
    }

    /// Makes everything written so far durable on this (blocking) thread when no flush is
    /// under way or queued to share it with; `None`: wait for [`Store::flush`] instead.
    pub fn flush_here(&self) -> Option<Result<()>> {
        let outcome = self.inner.commit.flush_here()?;
        self.inner.durability_waits.fetch_add(1, Ordering::Relaxed);
        Some(outcome)
    }

    /// Why writes cannot be made durable now, if that is known without I/O: the flusher
    /// stopped, or a flush has run longer than `limit`.
    pub fn stalled(&self, limit: std::time::Duration) -> Option<String> {
        self.inner.commit.stalled(limit)
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            flushes: self.inner.commit.flushes(),
            durability_waits: self.inner.durability_waits.load(Ordering::Relaxed),
        }
    }

    /// The stable storage id of this store, created on first use and flushed.
    pub async fn storage_id(&self) -> Result<StorageId> {
        let this = self.clone();
        let (id, created) = blocking(move || {
            if let Some(v) = this.inner.meta.get(META_STORAGE_ID)? {
                let text = String::from_utf8_lossy(unversioned(&v)?).into_owned();
                if let Some(id) = StorageId::new(text) {
                    return Ok((id, false));
                }
            }
            let id = StorageId::random();
            this.inner
                .meta
                .insert(META_STORAGE_ID, versioned(id.as_str().as_bytes()))?;
            Ok((id, true))
        })
        .await?;
        if created {
            // Durable first, then named beside the database (an existing id was checked
            // against the identity file when the store opened).
            self.flush().await?;
            let dir = self.inner.dir.clone();
            let marked = id.clone();
            blocking(move || write_identity(&dir, marked.as_str())).await?;
        }
        Ok(id)
    }

    /// The data directory it is in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Takes `id` as this store's id (`fieldsync migrate` keeps the source's, so devices'
    /// sync states stay true): stored, flushed, then named in the identity file.
    pub async fn adopt_storage_id(&self, id: &StorageId) -> Result<()> {
        let this = self.clone();
        let text = id.as_str().to_string();
        blocking(move || {
            this.inner
                .meta
                .insert(META_STORAGE_ID, versioned(text.as_bytes()))?;
            this.flush_blocking()?;
            write_identity(&this.inner.dir, &text)
        })
        .await
    }

    /// Whether anything is stored for `doc`.
    pub async fn exists(&self, doc: DocumentId) -> Result<bool> {
        let this = self.clone();
        blocking(move || this.exists_blocking(doc)).await
    }

    pub fn exists_blocking(&self, doc: DocumentId) -> Result<bool> {
        Ok(self
            .inner
            .chunks
            .scan_prefix(keys::doc_prefix(doc))
            .next()
            .transpose()?
            .is_some())
    }

    /// All chunks of `doc`, snapshots before incrementals.
    pub fn load_blocking(&self, doc: DocumentId) -> Result<StoredDocument> {
        let mut chunks = Vec::new();
        for item in self.inner.chunks.scan_prefix(keys::doc_prefix(doc)) {
            let (k, v) = item?;
            let Some(key) = ChunkKey::decode(&k) else {
                return Err(StorageError::Corrupt(format!(
                    "unreadable chunk key of {} bytes",
                    k.len()
                )));
            };
            chunks.push((key, unversioned(&v)?.to_vec()));
        }
        Ok(StoredDocument { chunks })
    }

    pub async fn load(&self, doc: DocumentId) -> Result<StoredDocument> {
        let this = self.clone();
        blocking(move || this.load_blocking(doc)).await
    }

    /// Stores one incremental chunk (content-addressed, so storing it twice is harmless).
    /// Not durable until [`Store::flush`] returns.
    pub fn put_incremental_blocking(&self, doc: DocumentId, bytes: &[u8]) -> Result<ChunkKey> {
        let key = ChunkKey::new(doc, ChunkKind::Incremental, Sha256::digest(bytes).into());
        self.inner.chunks.insert(key.encode(), versioned(bytes))?;
        Ok(key)
    }

    /// Stores the server's new changes of `doc` as one chunk, after marking the document
    /// *unsettled*: what is derived from its content (the staff projection) may lag behind it
    /// until [`Store::settle_blocking`] is called after the flush. After a crash, whatever
    /// chunk survived has its mark, and start-up brings the derived views up to date
    /// ([`Store::unsettled_blocking`]). Not durable until [`Store::flush`].
    ///
    /// Two plain writes in order, not a sled transaction: sled recovers a prefix of its log
    /// (see [`Store::table_write_in_order_blocking`]), so the chunk never survives without
    /// the mark written before it, and a transaction would cost two more log writes and
    /// syncs per accepted change.
    pub fn put_change_blocking(&self, doc: DocumentId, bytes: &[u8]) -> Result<ChunkKey> {
        let key = ChunkKey::new(doc, ChunkKind::Incremental, Sha256::digest(bytes).into());
        self.inner.meta.insert(unsettled_key(doc), versioned(&[]))?;
        self.inner
            .chunks
            .insert(&key.encode()[..], versioned(bytes))?;
        Ok(key)
    }

    /// `doc`'s derived views are durable and agree with its content: clears its mark. Needs
    /// no flush of its own (a mark that survives a crash only costs a re-projection).
    pub fn settle_blocking(&self, doc: DocumentId) -> Result<()> {
        self.inner.meta.remove(unsettled_key(doc))?;
        Ok(())
    }

    /// Documents marked unsettled: changed, and perhaps not yet projected, when the process
    /// stopped.
    pub fn unsettled_blocking(&self) -> Result<Vec<DocumentId>> {
        let mut out = Vec::new();
        for item in self.inner.meta.scan_prefix(UNSETTLED_PREFIX).keys() {
            let k = item?;
            if let Ok(bytes) = <[u8; 16]>::try_from(&k[UNSETTLED_PREFIX.len()..]) {
                out.push(DocumentId::from_bytes(bytes));
            }
        }
        Ok(out)
    }

    /// Writes everything to disk now, on this (blocking) thread.
    pub fn flush_blocking(&self) -> Result<()> {
        self.inner.db.flush()?;
        Ok(())
    }

    /// Replaces `replaced` chunks by one snapshot, atomically: after a crash either the old
    /// chunks or the snapshot are there, never neither. `heads_hash` names the snapshot.
    pub fn compact_blocking(
        &self,
        doc: DocumentId,
        heads_hash: [u8; 32],
        snapshot: &[u8],
        replaced: &[ChunkKey],
    ) -> Result<ChunkKey> {
        let key = ChunkKey::new(doc, ChunkKind::Snapshot, heads_hash);
        let mut batch = sled::Batch::default();
        for old in replaced {
            if *old != key {
                batch.remove(old.encode().to_vec());
            }
        }
        batch.insert(key.encode().to_vec(), versioned(snapshot));
        self.inner.chunks.apply_batch(batch)?;
        Ok(key)
    }

    /// Every document with stored chunks (for the device library and maintenance commands;
    /// a full scan, never on a hot path).
    pub fn list_documents_blocking(&self) -> Result<Vec<DocumentId>> {
        let mut out: Vec<DocumentId> = Vec::new();
        for item in self.inner.chunks.iter().keys() {
            let k = item?;
            if let Some(key) = ChunkKey::decode(&k) {
                if out.last() != Some(&key.doc) {
                    out.push(key.doc);
                }
            }
        }
        Ok(out)
    }

    pub async fn list_documents(&self) -> Result<Vec<DocumentId>> {
        let this = self.clone();
        blocking(move || this.list_documents_blocking()).await
    }

    /// The persisted sync state for (`doc`, `peer`), as `automerge::sync::State::encode` bytes.
    pub fn sync_state_blocking(
        &self,
        doc: DocumentId,
        peer: &StorageId,
    ) -> Result<Option<Vec<u8>>> {
        match self
            .inner
            .sync_states
            .get(keys::sync_state_key(doc, peer))?
        {
            Some(v) => Ok(Some(unversioned(&v)?.to_vec())),
            None => Ok(None),
        }
    }

    /// Saves a sync state. Not flushed on its own: losing one costs bandwidth, not data.
    pub fn put_sync_state_blocking(
        &self,
        doc: DocumentId,
        peer: &StorageId,
        state: &[u8],
    ) -> Result<()> {
        self.inner
            .sync_states
            .insert(keys::sync_state_key(doc, peer), versioned(state))?;
        Ok(())
    }

    /// Small named values (device settings in the client library).
    pub fn meta_get_blocking(&self, name: &str) -> Result<Option<Vec<u8>>> {
        match self.inner.meta.get(name.as_bytes())? {
            Some(v) => Ok(Some(unversioned(&v)?.to_vec())),
            None => Ok(None),
        }
    }

    pub fn meta_put_blocking(&self, name: &str, value: &[u8]) -> Result<()> {
        self.inner.meta.insert(name.as_bytes(), versioned(value))?;
        Ok(())
    }

    /// Bytes sled uses on disk (for benchmarks).
    pub fn size_on_disk(&self) -> Result<u64> {
        Ok(self.inner.db.size_on_disk()?)
    }
}

/// Runs blocking storage (and Automerge) work off the async reactor.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::Task(e.to_string()))?
}

/// Meta-tree keys of unsettled documents: this prefix, then the 16 id bytes.
const UNSETTLED_PREFIX: &[u8] = b"unsettled/";

fn unsettled_key(doc: DocumentId) -> Vec<u8> {
    let mut k = UNSETTLED_PREFIX.to_vec();
    k.extend_from_slice(doc.as_bytes());
    k
}

fn versioned(bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes.len() + 1);
    v.push(VALUE_VERSION);
    v.extend_from_slice(bytes);
    v
}

fn unversioned(v: &[u8]) -> Result<&[u8]> {
    match v.split_first() {
        Some((&VALUE_VERSION, rest)) => Ok(rest),
        Some((&other, _)) => Err(StorageError::UnknownVersion(other)),
        None => Err(StorageError::Corrupt("empty stored value".into())),
    }
}

/// Runs `f` with a store in a fresh temporary directory, inside a runtime (the store's
/// flusher needs one): what each layer's sled conformance run needs.
#[cfg(test)]
pub(crate) fn on_temp_store<T>(f: impl FnOnce(Store) -> T) -> T {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _guard = rt.enter();
    f(Store::open(dir.path(), &StoreConfig::default()).unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        (dir, s)
    }

    /// A snapshot and incremental chunks load in one go into the document they make up;
    /// a document whose chunk does not load names it.
    #[tokio::test]
    async fn stored_chunks_hydrate_into_their_document() {
        use automerge::transaction::Transactable;
        let (_dir, s) = store().await;
        let id = DocumentId::random();
        let mut doc = automerge::Automerge::new();
        let mut heads = Vec::new();
        for i in 0..5i64 {
            doc.transact(|tx| tx.put(automerge::ROOT, format!("k{i}"), i))
                .unwrap();
            s.put_change_blocking(id, &doc.save_after(&heads)).unwrap();
            heads = doc.get_heads();
            if i == 2 {
                let chunks: Vec<ChunkKey> = s
                    .load_blocking(id)
                    .unwrap()
                    .chunks
                    .into_iter()
                    .map(|(k, _)| k)
                    .collect();
                s.compact_blocking(id, [7; 32], &doc.save(), &chunks)
                    .unwrap();
            }
        }
        let stored = s.load_blocking(id).unwrap();
        assert_eq!(stored.chunks.len(), 3, "a snapshot and two incrementals");
        let loaded = stored.hydrate().unwrap();
        assert_eq!(loaded.get_heads(), doc.get_heads());
        use automerge::ReadDoc;
        for i in 0..5i64 {
            let value = loaded.get(automerge::ROOT, format!("k{i}")).unwrap();
            assert_eq!(value.unwrap().0.as_i64(), Some(i));
        }

        let broken = DocumentId::random();
        s.put_incremental_blocking(broken, b"not automerge")
            .unwrap();
        let err = s.load_blocking(broken).unwrap().hydrate().unwrap_err();
        assert!(
            err.to_string().contains("chunk Incremental does not load"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn chunks_are_content_addressed_and_compaction_replaces_them() {
        let (_dir, s) = store().await;
        let doc = DocumentId::random();
        let other = DocumentId::random();
        let a = s.put_incremental_blocking(doc, b"one").unwrap();
        let again = s.put_incremental_blocking(doc, b"one").unwrap();
        assert_eq!(a, again);
        let b = s.put_incremental_blocking(doc, b"two").unwrap();
        s.put_incremental_blocking(other, b"unrelated").unwrap();
        assert_eq!(s.load(doc).await.unwrap().chunks.len(), 2);

        s.compact_blocking(doc, [7; 32], b"snapshot", &[a, b])
            .unwrap();
        let loaded = s.load(doc).await.unwrap();
        assert_eq!(loaded.chunks.len(), 1);
        assert_eq!(loaded.chunks[0].0.kind, ChunkKind::Snapshot);
        assert_eq!(loaded.chunks[0].1, b"snapshot");
        assert_eq!(s.load(other).await.unwrap().chunks.len(), 1);
        let mut docs = s.list_documents().await.unwrap();
        docs.sort();
        let mut want = vec![doc, other];
        want.sort();
        assert_eq!(docs, want);
    }

    #[tokio::test]
    async fn storage_id_is_stable_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let s = Store::open(dir.path(), &StoreConfig::default()).unwrap();
            s.storage_id().await.unwrap()
        };
        // sled releases its lock when the last handle drops; the flusher holds one until its
        // channel closes, so wait for that deterministically by retrying the open.
        let s = loop {
            match Store::open(dir.path(), &StoreConfig::default()) {
                Ok(s) => break s,
                Err(_) => tokio::task::yield_now().await,
            }
        };
        assert_eq!(s.storage_id().await.unwrap(), first);
    }

    #[tokio::test]
    async fn concurrent_flushes_share_disk_syncs() {
        let (_dir, s) = store().await;
        let doc = DocumentId::random();
        let mut tasks = Vec::new();
        for i in 0..50u32 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.put_incremental_blocking(doc, &i.to_be_bytes()).unwrap();
                s.flush().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let stats = s.stats();
        assert_eq!(stats.durability_waits, 50);
        assert!(stats.flushes >= 1 && stats.flushes <= 50, "{stats:?}");
    }

    #[tokio::test]
    async fn sync_states_are_per_document_and_peer() {
        let (_dir, s) = store().await;
        let doc = DocumentId::random();
        let p1 = StorageId::new("p1").unwrap();
        let p2 = StorageId::new("p2").unwrap();
        s.put_sync_state_blocking(doc, &p1, b"state-1").unwrap();
        assert_eq!(
            s.sync_state_blocking(doc, &p1).unwrap().unwrap(),
            b"state-1"
        );
        assert_eq!(s.sync_state_blocking(doc, &p2).unwrap(), None);
        assert_eq!(
            s.sync_state_blocking(DocumentId::random(), &p1).unwrap(),
            None
        );
    }
}
