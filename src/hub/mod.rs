//! The document hub: the server-side home of every loaded Automerge document.
//!
//! Owns which documents are loaded (a byte-bounded LRU, `cache`), one actor task per loaded
//! document (`actor`) that applies sync messages, writes and flushes changes, and only then
//! answers, which peers are subscribed to which document, and the relay of ephemeral
//! messages. Connections talk to it through [`PeerLink`]s; it talks back through their
//! bounded outboxes. Must not: speak WebSocket or CBOR (that is `server` and `protocol`),
//! call sled directly (that is `storage`), or block the reactor (Automerge and sled work runs
//! in `spawn_blocking`).

mod actor;
mod cache;
mod link;
pub mod op_count;
mod peer_sync;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use automerge::{Automerge, ChangeHash};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Access, Authorizer};
use crate::ids::{Clock, ConnId, DocumentId, PeerId, Timestamp};
use crate::protocol::{DocMessage, Ephemeral, Message, SyncKind};
use crate::storage::documents::DocumentStore;
use actor::{ActorTx, Cmd, DocActor};
pub use cache::CacheStats;
use cache::{Cache, Lookup};
pub use link::{InFlight, KillSwitch, Outbound, OutboundBudget, Outbox, OutboxRx, PeerLink};

/// Tuning for the hub; every field has a unit in its name.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Budget for loaded documents, in bytes of memory: each counts its estimated footprint
    /// (see `actor::memory_estimate`). At least one document stays loaded even if it alone
    /// exceeds the budget.
    pub cache_budget_bytes: usize,
    /// After this many incremental chunks a document is compacted into one snapshot.
    pub compact_after_chunks: usize,
    /// Commands queued per document actor before senders wait.
    pub actor_queue_len: usize,
    /// Operations one change may hold (counted from its header before it is applied).
    pub max_ops_per_change: u64,
    /// Operations a document may grow to; changes that would pass it are refused.
    pub max_ops_per_document: u64,
    /// Stored bytes a document may grow to.
    pub max_document_bytes: usize,
    /// Documents one connection may have in progress that are not yet registered to
    /// anyone (new uploads): each costs memory before it holds anything.
    pub max_ungranted_docs_per_connection: usize,
    /// A loaded document nobody has sent or asked anything of for this long is unloaded.
    pub idle_unload_after: std::time::Duration,
    /// A peer that has not answered the server's last message about a document is sent
    /// nothing new about it for at most this long (its answer is answered with everything
    /// new at once).
    pub push_hold: std::time::Duration,
    /// A peer with this many bytes already waiting to be written to its socket is sent
    /// nothing new until they are written (retried every quarter second), neither pushes
    /// nor answers: a message is generated fresh from the document when it goes, so waiting
    /// loses nothing, and the server's memory holds at most about this much per connection.
    pub push_backlog_bytes: usize,
    /// The least time between two messages to one peer about one document that it did not
    /// ask for (pushes), per peer subscribed to the document: 5 ms spaces pushes of a
    /// household two phones share 10 ms apart, and of one 200 phones share a second apart.
    /// Each push costs the document's whole change graph (Automerge computes what the peer
    /// lacks from it), so a document many peers edit at once would otherwise cost the
    /// square of their number in pushes; spaced, it costs at most 1/`push_spacing_per_peer`
    /// pushes a second, each carrying whatever arrived meanwhile. Answers to changes and
    /// requests are never spaced; the answer to a message that only tells what the peer has
    /// is spaced like a push.
    pub push_spacing_per_peer: std::time::Duration,
    /// Documents loaded from the store at once, if limited (at least one; by default the
    /// machine's cores). Loading a document with many uncompacted chunks applies all their
    /// changes in one batch, which briefly holds a copy of every operation several times the
    /// document's own size, and loads are CPU-bound: more at once than there are cores only
    /// add memory and contention. By heaptrack at 200 phones, unlimited loads side by side
    /// were a quarter of the peak heap. With jemalloc, two at a time on the 2-core machine
    /// (8 December) cut the 200-phone run's server CPU by a fifth (150–152 s against
    /// 187–189 s) and its push from 165–171 s to 150 s, for the same peak memory; at 20
    /// phones 2.5–2.9 s against 3.0–3.1 s, and a peak 2–3 MB higher.
    pub max_concurrent_loads: Option<usize>,
    /// For crash tests only: a place where the hub stops on purpose.
    pub failpoint: Option<Failpoint>,
}

/// Where a crash test makes the hub stop (`FIELDSYNC_FAILPOINT`). Never set in production.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failpoint {
    /// After a document's new chunk and provenance rows are durable, before its projection
    /// is written: the thread stops for good, so the test can SIGKILL the process there.
    StallBeforeProjection,
    /// Every flush of the embedded store hangs while the file `stall-flushes` exists in
    /// the data directory (a disk that stopped answering; readiness tests).
    StallFlushes,
}

impl Failpoint {
    /// The file that arms [`Failpoint::StallFlushes`], in the data directory.
    pub const STALL_FLUSHES_FILE: &str = "stall-flushes";
}

impl std::str::FromStr for Failpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stall-before-projection" => Ok(Failpoint::StallBeforeProjection),
            "stall-flushes" => Ok(Failpoint::StallFlushes),
            other => Err(format!("unknown failpoint `{other}`")),
        }
    }
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            cache_budget_bytes: 32 * 1024 * 1024,
            compact_after_chunks: 64,
            actor_queue_len: 256,
            max_ops_per_change: 100_000,
            max_ops_per_document: 1_000_000,
            max_document_bytes: 16 * 1024 * 1024,
            max_ungranted_docs_per_connection: 256,
            idle_unload_after: std::time::Duration::from_secs(15),
            push_hold: std::time::Duration::from_secs(1),
            push_backlog_bytes: 256 * 1024,
            push_spacing_per_peer: std::time::Duration::from_millis(5),
            max_concurrent_loads: Some(crate::cores()),
            failpoint: None,
        }
    }
}

/// What the hub reports for every batch of changes it accepted and made durable.
#[derive(Debug, Clone)]
pub struct AcceptedChanges {
    pub doc: DocumentId,
    /// Who delivered them: a peer's account and device, or the account on whose behalf the
    /// server made them (staff edits through the API).
    pub principal: crate::auth::Principal,
    /// Hashes of the changes this peer delivered that were new to the server.
    pub hashes: Vec<ChangeHash>,
    /// Server receive time (device clocks are not evidence).
    pub received_at: Timestamp,
}

/// An edit the server makes to a document itself (catalog entries, staff edits).
/// `Err` leaves the document as it was and is reported to whoever asked.
pub type LocalEdit = Box<dyn FnOnce(&mut Automerge) -> Result<(), String> + Send>;

/// An edit of another document that accepted changes call for.
pub struct DerivedEdit {
    pub doc: DocumentId,
    pub edit: LocalEdit,
}

/// The hook later layers (the change log, the projection) attach to; the hub calls its
/// observers in the order it was given them. Called on a blocking thread with the document
/// as it now is, after its new changes are written and before the flush that makes them
/// durable: rows written here are flushed with them. The derived edits returned are applied
/// (and durable) before any peer hears of the changes.
pub trait ChangeObserver: Send + Sync + 'static {
    fn changes_accepted(
        &self,
        _event: &AcceptedChanges,
        _doc: &Automerge,
    ) -> Result<Vec<DerivedEdit>, crate::storage::StorageError> {
        Ok(Vec::new())
    }

    /// Called once per batch that changed the document (after `changes_accepted` for each
    /// delivery, also for the server's own edits), on the same thread and before the same
    /// flush: projections of the document's content are kept here.
    fn document_changed(
        &self,
        _doc: DocumentId,
        _content: &Automerge,
        _batch: &ChangedBatch<'_>,
    ) -> Result<(), crate::storage::StorageError> {
        Ok(())
    }
}

/// One batch that changed a document, as [`ChangeObserver::document_changed`] sees it.
#[derive(Debug)]
pub struct ChangedBatch<'a> {
    /// Server receive time of the batch (the time of each of its [`AcceptedChanges`]).
    pub received_at: Timestamp,
    /// The document's heads before the batch: the batch's changes are the ones since.
    pub heads_before: &'a [ChangeHash],
    /// Who delivered which of them (each of these had an [`AcceptedChanges`]); the others
    /// are edits the server made on nobody's behalf (catalog entries).
    pub delivered: &'a [(crate::auth::Principal, Vec<ChangeHash>)],
}

/// Why a server-side edit did not happen.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("the edit was refused: {0}")]
    Edit(String),
    #[error("the document's actor stopped before the edit was durable; retry")]
    Stopped,
}

#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

pub(crate) struct HubInner {
    /// Where documents are kept (sled or PostgreSQL, through the storage seam).
    store: Arc<dyn DocumentStore>,
    server_peer_id: PeerId,
    config: HubConfig,
    cache: Mutex<Cache>,
    /// doc -> the connections that asked for it. Independent of the cache: a document can be
    /// evicted and reloaded while its peers stay subscribed.
    subs: Mutex<HashMap<DocumentId, HashMap<ConnId, PeerLink>>>,
    authorizer: Arc<dyn Authorizer>,
    /// Called in order for every accepted batch (see [`ChangeObserver`]).
    observers: Vec<Arc<dyn ChangeObserver>>,
    /// Server receive times come from here (tests inject a manual clock).
    clock: Arc<dyn Clock>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    /// Signalled when an actor exits (its memory is free for the next load).
    room: tokio::sync::Notify,
    /// Permits to load a document, when limited (`HubConfig::max_concurrent_loads`).
    loads: Option<tokio::sync::Semaphore>,
}

/// Whether starting an actor may wait for memory (see [`cache::Cache::make_room`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Admission {
    /// A peer's message: waits while evicted documents still hold the budget, so a burst of
    /// uploads from many phones cannot load more than the budget at once.
    WaitForRoom,
    /// The server's own edits and reads: actors make these (catalog entries) while others
    /// wait for them to exit, so they must never wait for room themselves.
    Now,
}

impl Hub {
    pub fn new(
        store: Arc<dyn DocumentStore>,
        server_peer_id: PeerId,
        config: HubConfig,
        authorizer: Arc<dyn Authorizer>,
        observers: Vec<Arc<dyn ChangeObserver>>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let cache = Cache::new(config.cache_budget_bytes);
        let loads = config
            .max_concurrent_loads
            .map(|n| tokio::sync::Semaphore::new(n.max(1)));
        Self {
            inner: Arc::new(HubInner {
                store,
                server_peer_id,
                config,
                cache: Mutex::new(cache),
                subs: Mutex::new(HashMap::new()),
                authorizer,
                observers,
                clock,
                tasks: TaskTracker::new(),
                cancel: CancellationToken::new(),
                room: tokio::sync::Notify::new(),
                loads,
            }),
        }
    }

    pub fn server_peer_id(&self) -> &PeerId {
        &self.inner.server_peer_id
    }

    pub fn documents(&self) -> &Arc<dyn DocumentStore> {
        &self.inner.store
    }

    pub fn cache_stats(&self) -> CacheStats {
        lock(&self.inner.cache).stats()
    }

    /// Handles one `request` or `sync` from a connection. Returns once the message is queued
    /// for the document (the reply follows through the link's outbox), so a connection can
    /// have many documents in flight and their flushes are shared. A queued message's actor
    /// holds `in_flight` until its answer is queued; on every other way out it is dropped
    /// here.
    pub async fn sync(
        &self,
        link: &PeerLink,
        kind: SyncKind,
        doc: DocumentId,
        mut data: Vec<u8>,
        mut in_flight: InFlight,
    ) {
        if self.inner.authorizer.may_know_more(doc) {
            let authorizer = self.inner.authorizer.clone();
            let _ = tokio::task::spawn_blocking(move || authorizer.look_up(doc)).await;
        }
        let access = self.inner.authorizer.access(&link.principal, doc);
        if access == Access::None {
            if kind == SyncKind::Sync {
                // Answered exactly as an id nobody has: a document that exists must not
                // answer differently from one that does not.
                self.answer_as_unknown(link, doc, data).await;
            } else {
                self.unavailable(link, doc);
            }
            return;
        }
        // A document nobody has registered yet (a new upload, or a made-up id) costs memory
        // while it is loaded: one connection may have only so many of them in progress.
        let limit = self.inner.config.max_ungranted_docs_per_connection;
        if access == Access::Create && kind == SyncKind::Sync {
            if !link.hold_ungranted(doc, limit) {
                tracing::warn!(conn = %link.conn, limit, "too many unregistered documents on one connection");
                link.send(Outbound::Fail {
                    code: crate::protocol::CloseCode::PolicyViolation,
                    message: format!(
                        "more than {limit} new documents in progress on one connection; sync them in smaller groups"
                    ),
                });
                return;
            }
        } else {
            link.release_ungranted(doc);
        }
        loop {
            tracing::trace!(doc = %doc, conn = %link.conn, "looking up the document");
            let tx = match self
                .inner
                .actor_for(doc, kind, Admission::WaitForRoom)
                .await
            {
                Ok(Some(tx)) => tx,
                Ok(None) => {
                    // A request for a document the server does not have.
                    self.unavailable(link, doc);
                    return;
                }
                Err(e) => {
                    tracing::error!(doc = %doc, error = %e, "loading a document failed");
                    link.send(Outbound::Fail {
                        code: crate::protocol::CloseCode::InternalError,
                        message: "the server could not load this document; try again later".into(),
                    });
                    return;
                }
            };
            lock(&self.inner.subs)
                .entry(doc)
                .or_default()
                .insert(link.conn, link.clone());
            let cmd = Cmd::Sync {
                link: link.clone(),
                kind,
                data,
                in_flight,
            };
            tracing::trace!(doc = %doc, conn = %link.conn, "queueing for the document");
            match tx.send(cmd).await {
                Ok(()) => {
                    tracing::trace!(doc = %doc, conn = %link.conn, "queued for the document");
                    return;
                }
                // The actor stopped between lookup and send (evicted and drained, or failed):
                // look it up again, which waits for it to finish and reloads.
                Err(Cmd::Sync {
                    data: d,
                    in_flight: f,
                    ..
                }) => {
                    data = d;
                    in_flight = f;
                }
                Err(_) => return,
            }
        }
    }

    /// Relays an ephemeral message to the document's other subscribed peers. Never stored.
    pub fn ephemeral(&self, link: &PeerLink, msg: Ephemeral) {
        if !may_see(
            self.inner
                .authorizer
                .access(&link.principal, msg.document_id),
        ) {
            return;
        }
        let peers: Vec<PeerLink> = lock(&self.inner.subs)
            .get(&msg.document_id)
            .map(|m| {
                m.values()
                    .filter(|p| p.conn != link.conn)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for peer in peers {
            if !may_see(
                self.inner
                    .authorizer
                    .access(&peer.principal, msg.document_id),
            ) {
                continue;
            }
            peer.send(Outbound::Message(Message::Ephemeral(Ephemeral {
                target_id: peer.peer_id.clone(),
                ..msg.clone()
            })));
        }
    }

    /// A connection ended: forget its subscriptions and let loaded documents persist its sync
    /// state.
    pub async fn disconnect(&self, conn: ConnId) {
        let docs: Vec<DocumentId> = {
            let mut subs = lock(&self.inner.subs);
            let docs: Vec<DocumentId> = subs
                .iter()
                .filter(|(_, peers)| peers.contains_key(&conn))
                .map(|(d, _)| *d)
                .collect();
            for d in &docs {
                if let Some(peers) = subs.get_mut(d) {
                    peers.remove(&conn);
                    if peers.is_empty() {
                        subs.remove(d);
                    }
                }
            }
            docs
        };
        for doc in docs {
            let tx = lock(&self.inner.cache).loaded(doc);
            if let Some(tx) = tx {
                let _ = tx.send(Cmd::Leave { conn }).await;
            }
        }
    }

    /// Stops every document actor (they persist their peers' sync states) and waits for them.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner.tasks.close();
        let tasks = self.inner.tasks.clone();
        // Spawned so that this future stays `Send` (see `server::run`).
        let _ = tokio::spawn(async move { tasks.wait().await }).await;
    }

    /// Answers a `sync` for a document the peer may not see as the server answers one for an
    /// id it has never heard of: an empty offer changes nothing and gets the empty document's
    /// reply; changes get `doc-unavailable` (as a refused new upload does). Nothing is loaded
    /// or stored.
    async fn answer_as_unknown(&self, link: &PeerLink, doc: DocumentId, data: Vec<u8>) {
        use automerge::sync::SyncDoc;
        let reply = tokio::task::spawn_blocking(move || {
            let message = match automerge::sync::Message::decode(&data) {
                Ok(m) => m,
                // The same words the document actor uses for garbage.
                Err(e) => {
                    return Err(format!(
                        "document {doc}: data is not an Automerge sync message ({e})"
                    ))
                }
            };
            if !message.changes.is_empty() {
                return Ok(None);
            }
            let mut empty = Automerge::new();
            let mut state = automerge::sync::State::new();
            if empty.receive_sync_message(&mut state, message).is_err() {
                return Ok(None);
            }
            Ok(empty.generate_sync_message(&mut state).map(|m| m.encode()))
        })
        .await
        .unwrap_or(Ok(None));
        match reply {
            Ok(Some(data)) => link.send(Outbound::Message(Message::Sync(DocMessage {
                sender_id: self.inner.server_peer_id.clone(),
                target_id: link.peer_id.clone(),
                document_id: doc,
                data,
            }))),
            Ok(None) => self.unavailable(link, doc),
            Err(message) => link.send(Outbound::Fail {
                code: crate::protocol::CloseCode::ProtocolError,
                message,
            }),
        }
    }

    fn unavailable(&self, link: &PeerLink, doc: DocumentId) {
        link.send(Outbound::Message(Message::DocUnavailable(DocMessage {
            sender_id: self.inner.server_peer_id.clone(),
            target_id: link.peer_id.clone(),
            document_id: doc,
            data: Vec::new(),
        })));
    }

    /// Makes a change as the server (catalogs) and waits until it is durable. Subscribed
    /// peers receive it like any other change. Creates the document if it does not exist.
    pub async fn change_local(&self, doc: DocumentId, edit: LocalEdit) -> Result<bool, HubError> {
        self.inner.change_local(doc, edit, None).await
    }

    /// Makes a change on behalf of `who` (a staff edit through the API): like
    /// [`Hub::change_local`], and its provenance names `who`. `Ok(None)`: no such document
    /// (it is not created).
    pub async fn change_as(
        &self,
        doc: DocumentId,
        who: crate::auth::Principal,
        edit: LocalEdit,
    ) -> Result<Option<bool>, HubError> {
        if self
            .inner
            .actor_for(doc, SyncKind::Request, Admission::Now)
            .await?
            .is_none()
        {
            return Ok(None);
        }
        self.inner
            .change_local(doc, edit, Some(who))
            .await
            .map(Some)
    }

    /// Another node sharing the store has stored changes of `doc`: if it is loaded here, its
    /// actor loads them and pushes them to this node's peers (a document not loaded here is
    /// read from the store when it is next loaded). Waits only for room in its queue.
    pub async fn refresh(&self, doc: DocumentId) {
        let loaded = lock(&self.inner.cache).loaded(doc);
        if let Some(tx) = loaded {
            let _ = tx.send(Cmd::Refresh).await;
        }
    }

    /// [`Hub::refresh`] for every loaded document (after missing notifications).
    pub async fn refresh_all(&self) {
        let docs = lock(&self.inner.cache).loaded_ids();
        for doc in docs {
            self.refresh(doc).await;
        }
    }

    /// Runs `read` on the document as it is now (loading it if needed), in its actor, off
    /// the reactor. `Ok(None)`: no such document.
    pub async fn read<R: Send + 'static>(
        &self,
        doc: DocumentId,
        read: impl FnOnce(&Automerge) -> R + Send + 'static,
    ) -> Result<Option<R>, HubError> {
        let Some(tx) = self
            .inner
            .actor_for(doc, SyncKind::Request, Admission::Now)
            .await?
        else {
            return Ok(None);
        };
        let (done, result) = oneshot::channel();
        let read: actor::ReadFn = Box::new(move |d| {
            let _ = done.send(read(d));
        });
        if tx.send(Cmd::Read { read }).await.is_err() {
            return Err(HubError::Stopped);
        }
        result.await.map(Some).map_err(|_| HubError::Stopped)
    }
}

impl HubInner {
    /// The actor for `doc`, starting one if needed. `None`: a `request` for a document that
    /// is not stored (no actor is started for it).
    async fn actor_for(
        self: &Arc<Self>,
        doc: DocumentId,
        kind: SyncKind,
        admission: Admission,
    ) -> Result<Option<ActorTx>, crate::storage::StorageError> {
        let mut checked_exists = false;
        loop {
            let lookup = lock(&self.cache).lookup(doc);
            match lookup {
                Lookup::Loaded(tx) => return Ok(Some(tx)),
                Lookup::Closing(done) => done.cancelled().await,
                Lookup::Absent => {
                    if kind == SyncKind::Request && !checked_exists {
                        let store = self.store.clone();
                        let exists = crate::storage::blocking(move || store.exists(doc)).await?;
                        if !exists {
                            return Ok(None);
                        }
                        checked_exists = true;
                        continue; // the cache may have changed while we looked
                    }
                    let bytes = actor::memory_estimate(0);
                    if admission == Admission::WaitForRoom {
                        // Registered before the check, so an exit in between is not missed.
                        let room = self.room.notified();
                        tokio::pin!(room);
                        room.as_mut().enable();
                        if !lock(&self.cache).make_room(bytes) {
                            room.await;
                            continue;
                        }
                    }
                    let (tx, rx) = ActorTx::channel(self.config.actor_queue_len);
                    let Some(generation) = lock(&self.cache).insert(doc, tx.clone(), bytes) else {
                        continue; // someone else started it first
                    };
                    let actor = DocActor::new(self.clone(), doc, generation);
                    let span = tracing::debug_span!("doc", doc = %doc);
                    self.tasks
                        .spawn(tracing::Instrument::instrument(actor.run(rx), span));
                    return Ok(Some(tx));
                }
            }
        }
    }
    /// Boxed: an actor awaits this for derived edits and this starts actors, a cycle whose
    /// future type rustc cannot prove `Send` without the box.
    fn change_local(
        self: &Arc<Self>,
        doc: DocumentId,
        edit: LocalEdit,
        on_behalf: Option<crate::auth::Principal>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, HubError>> + Send>> {
        let this = self.clone();
        Box::pin(async move {
            let tx = this
                .actor_for(doc, SyncKind::Sync, Admission::Now)
                .await?
                .ok_or(HubError::Stopped)?;
            let (done, result) = oneshot::channel();
            if tx
                .send(Cmd::Local {
                    edit,
                    on_behalf,
                    done,
                })
                .await
                .is_err()
            {
                return Err(HubError::Stopped);
            }
            match result.await {
                Ok(Ok(changed)) => Ok(changed),
                Ok(Err(reason)) => Err(HubError::Edit(reason)),
                Err(_) => Err(HubError::Stopped),
            }
        })
    }

    /// Called by an actor when its document's stored size changes; may evict others.
    fn set_cost(&self, doc: DocumentId, generation: u64, bytes: usize) {
        lock(&self.cache).set_cost(doc, generation, bytes);
    }

    /// Unloads `doc` (if `generation` is still the loaded one): its actor drains what is
    /// queued and exits.
    fn retire(&self, doc: DocumentId, generation: u64) {
        lock(&self.cache).retire(doc, generation);
    }

    fn actor_exited(&self, doc: DocumentId, generation: u64) {
        lock(&self.cache).exited(doc, generation);
        self.room.notify_waiters();
    }

    fn subscribers(&self, doc: DocumentId) -> Vec<PeerLink> {
        lock(&self.subs)
            .get(&doc)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    fn unsubscribe(&self, doc: DocumentId, conn: ConnId) {
        let mut subs = lock(&self.subs);
        if let Some(peers) = subs.get_mut(&doc) {
            peers.remove(&conn);
            if peers.is_empty() {
                subs.remove(&doc);
            }
        }
    }
}

/// Whether an access level lets a peer hear about the document at all.
fn may_see(access: Access) -> bool {
    matches!(access, Access::Read | Access::ReadWrite)
}

/// Locks a std mutex. These locks guard plain maps and are never held across an `.await`, so
/// a std Mutex is cheaper than tokio's; a poisoned lock means another thread panicked while
/// editing the map, and continuing with its data is the best we can do.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{OpenAccess, Principal};
    use crate::ids::{StorageId, SystemClock};
    use automerge::sync::{self, SyncDoc};
    use automerge::transaction::Transactable;

    /// A phone's change and its next message ("my heads are these") can wait in the same
    /// queue when the server is busy. The change must still be acknowledged: the phone waits
    /// for a message whose heads include it, and without one it never learns it is held.
    #[tokio::test(flavor = "current_thread")]
    async fn a_change_and_the_next_message_queued_together_are_both_answered() {
        let (hub, _dir) = hub_holding_pushes_for(HubConfig::default().push_hold);
        let doc = DocumentId::random();
        // The phone uploads a household and the two sides settle, as on any connection.
        let mut phone = Device::new("phone");
        phone.note("the gate is broken");
        phone.sync(&hub, doc).await;

        // A second note: the message that carries it...
        phone.note("the gate is fixed");
        let change = phone.doc.get_heads();
        let with_change = phone.doc.generate_sync_message(&mut phone.state).unwrap();
        assert_eq!(with_change.changes.len(), 1);
        // ...and, right behind it, a message naming the heads it made and carrying nothing
        // (the phone's answer to an earlier server message crossing its change).
        let heads_only = phone
            .doc
            .generate_sync_message(&mut sync::State::new())
            .unwrap();
        assert!(heads_only.changes.is_empty());
        assert_eq!(heads_only.heads, change);

        // Both are queued before the actor runs again (one thread: it cannot run until this
        // task waits), so they arrive together.
        phone.hand_over(&hub, doc, with_change).await;
        phone.hand_over(&hub, doc, heads_only).await;
        phone.handled().await;

        // The server answers with heads that include the change.
        let acknowledged = phone
            .inbox()
            .iter()
            .any(|reply| change.iter().all(|h| reply.heads.contains(h)));
        assert!(
            acknowledged,
            "the phone never heard that its change is held"
        );
        hub.shutdown().await;
    }

    /// A peer's change is stored as the peer sent it (not encoded again), and the stored
    /// chunks load into the same document, with a server edit made after it too.
    #[tokio::test(flavor = "current_thread")]
    async fn a_peers_change_is_stored_as_sent_and_reloads_with_a_server_edit() {
        let (hub, _dir) = hub_holding_pushes_for(HubConfig::default().push_hold);
        let doc = DocumentId::random();
        let mut phone = Device::with_history(&hub, doc).await;
        phone.note("the gate is fixed");
        let with_change = phone.doc.generate_sync_message(&mut phone.state).unwrap();
        let sent: Vec<u8> = with_change.changes.iter().flatten().copied().collect();
        phone.hand_over(&hub, doc, with_change).await;
        phone.handled().await;
        let edited = hub
            .change_as(
                doc,
                Principal::local("staff"),
                Box::new(|d: &mut Automerge| {
                    d.transact::<_, _, automerge::AutomergeError>(|tx| {
                        tx.put(automerge::ROOT, "checked", true)
                    })
                    .map(|_| ())
                    .map_err(|e| e.error.to_string())
                }),
            )
            .await
            .unwrap();
        assert_eq!(edited, Some(true));
        hub.shutdown().await;
        let stored = hub.inner.store.load(doc).unwrap();
        assert!(
            stored.chunks.iter().any(|(_, bytes)| *bytes == sent),
            "the phone's change is one chunk, byte for byte: sent {} bytes, stored {:?}",
            sent.len(),
            stored
                .chunks
                .iter()
                .map(|(k, b)| (k.kind, b.len()))
                .collect::<Vec<_>>()
        );
        let reloaded = stored.hydrate().unwrap();
        assert_eq!(
            automerge::ReadDoc::get(&reloaded, automerge::ROOT, "note")
                .unwrap()
                .unwrap()
                .0
                .as_str(),
            Some("the gate is fixed")
        );
        assert!(
            automerge::ReadDoc::get(&reloaded, automerge::ROOT, "checked")
                .unwrap()
                .is_some()
        );
    }

    /// A change that arrives before the change it depends on waits in the document's queue
    /// (its message changed nothing, so nothing was stored); when the missing change
    /// arrives both are applied, and both must be stored, not only the message in hand.
    #[tokio::test(flavor = "current_thread")]
    async fn a_change_that_waited_for_its_dependency_is_stored_with_it() {
        let (hub, _dir) = hub_holding_pushes_for(HubConfig::default().push_hold);
        let doc = DocumentId::random();
        let mut phone = Device::with_history(&hub, doc).await;
        phone.note("first");
        let first = phone.doc.get_last_local_change().unwrap();
        phone.note("second");
        let second = phone.doc.get_last_local_change().unwrap();
        let carrying = |change: &automerge::Change| sync::Message {
            heads: phone.doc.get_heads(),
            need: Vec::new(),
            have: Vec::new(),
            changes: vec![change.raw_bytes().to_vec()].into(),
            flags: None,
            version: sync::MessageVersion::V1,
        };
        let (late, early) = (carrying(&second), carrying(&first));
        phone.hand_over(&hub, doc, late).await;
        phone.handled().await;
        phone.hand_over(&hub, doc, early).await;
        phone.handled().await;
        hub.shutdown().await;
        let reloaded = hub.inner.store.load(doc).unwrap().hydrate().unwrap();
        assert_eq!(reloaded.get_heads(), phone.doc.get_heads());
    }

    /// A simulated device for the tests below: its link, what the server queued for it, its
    /// copy of the document and its sync state.
    struct Device {
        link: PeerLink,
        outbox: OutboxRx,
        /// The sending side's byte count: what the socket task marks written.
        sent: Outbox,
        doc: Automerge,
        state: sync::State,
    }

    impl Device {
        fn new(name: &str) -> Self {
            let (sent, outbox) = Outbox::new(64, 1 << 20, OutboundBudget::new(usize::MAX));
            let link = PeerLink::new(
                ConnId::next(),
                PeerId::new(name).unwrap(),
                Some(StorageId::random()),
                Principal::local(name),
                sent.clone(),
                Arc::new(KillSwitch::default()),
            );
            Self {
                link,
                outbox,
                sent,
                doc: Automerge::new(),
                state: sync::State::new(),
            }
        }

        /// A phone that wrote 50 notes to `doc` and synced them: a history longer than one
        /// change (a peer sends its whole document instead of changes when that is shorter).
        async fn with_history(hub: &Hub, doc: DocumentId) -> Self {
            let mut phone = Device::new("phone");
            for i in 0..50 {
                phone.note(&format!("the gate is broken ({i})"));
            }
            phone.sync(hub, doc).await;
            phone
        }

        fn note(&mut self, text: &str) {
            self.doc
                .transact::<_, _, automerge::AutomergeError>(|tx| {
                    tx.put(automerge::ROOT, "note", text)
                })
                .unwrap();
        }

        /// The sync messages the server has queued for this device, unapplied.
        fn inbox(&mut self) -> Vec<sync::Message> {
            let mut messages = Vec::new();
            while let Ok(out) = self.outbox.try_recv() {
                self.sent.written(&out);
                if let Outbound::Message(Message::Sync(m)) = out {
                    messages.push(sync::Message::decode(&m.data).unwrap());
                }
            }
            messages
        }

        fn receive(&mut self, messages: Vec<sync::Message>) {
            for m in messages {
                self.doc.receive_sync_message(&mut self.state, m).unwrap();
            }
        }

        /// Applies what the server sent and answers, until neither side has anything to say.
        /// Each message is handed to the hub and waited for until its actor has queued every
        /// answer it makes (the link's in-flight count), so nothing here depends on timing.
        async fn sync(&mut self, hub: &Hub, doc: DocumentId) {
            loop {
                let inbox = self.inbox();
                self.receive(inbox);
                let Some(m) = self.doc.generate_sync_message(&mut self.state) else {
                    return;
                };
                self.hand_over(hub, doc, m).await;
                self.handled().await;
            }
        }

        /// Puts something big in front of this device's socket (another document's message,
        /// `push_backlog_bytes` of it), as if the socket were behind; the test takes it from
        /// `outbox` and marks it written when the socket should catch up.
        fn fall_behind(&self) {
            self.link.send(Outbound::Message(Message::Sync(DocMessage {
                sender_id: PeerId::new("server").unwrap(),
                target_id: self.link.peer_id.clone(),
                document_id: DocumentId::random(),
                data: vec![0; HubConfig::default().push_backlog_bytes],
            })));
        }

        /// Hands one message to the hub (it is queued for the document, not yet handled).
        async fn hand_over(&self, hub: &Hub, doc: DocumentId, m: sync::Message) {
            let in_flight = self.link.request_started();
            hub.sync(&self.link, SyncKind::Sync, doc, m.encode(), in_flight)
                .await;
        }

        /// Waits (at most 10 s) until every message handed over has been handled and its
        /// answers, if any, are queued.
        async fn handled(&self) {
            while self.link.requests_in_flight() > 0 {
                tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    self.link.request_settled(),
                )
                .await
                .expect("the server handles every message");
            }
        }
    }

    fn hub_holding_pushes_for(hold: std::time::Duration) -> (Hub, tempfile::TempDir) {
        test_hub(HubConfig {
            push_hold: hold,
            push_spacing_per_peer: std::time::Duration::ZERO,
            ..HubConfig::default()
        })
    }

    /// A hub on a fresh store in a temp dir, open to every peer, with no observer.
    fn test_hub(config: HubConfig) -> (Hub, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store =
            crate::storage::Store::open(dir.path(), &crate::storage::StoreConfig::default())
                .unwrap();
        let hub = Hub::new(
            Arc::new(store),
            PeerId::new("server").unwrap(),
            config,
            Arc::new(OpenAccess),
            Vec::new(),
            Arc::new(SystemClock),
        );
        (hub, dir)
    }

    /// Phones pushing many households at once cannot load more than the memory budget:
    /// an evicted document still holds its memory until its actor has finished its queue,
    /// so the next load waits for it. Every upload is still held and acknowledged.
    #[tokio::test(flavor = "current_thread")]
    async fn a_burst_of_uploads_loads_no_more_than_the_budget_at_once() {
        let budget = 3 * actor::memory_estimate(0);
        let (hub, _dir) = test_hub(HubConfig {
            cache_budget_bytes: budget,
            ..HubConfig::default()
        });
        // Twelve phones open twelve new households at once (their first messages, handed
        // over back to back): the fourth and later wait for room, which the earlier ones'
        // actors make by finishing their queue and exiting.
        let mut phones = Vec::new();
        for n in 0..12 {
            let mut phone = Device::new(&format!("phone-{n}"));
            phone.note(&format!("household {n}"));
            let doc = DocumentId::random();
            let first = phone.doc.generate_sync_message(&mut phone.state).unwrap();
            phone.hand_over(&hub, doc, first).await;
            phones.push((phone, doc));
        }
        // Each goes on syncing; every household ends up stored and acknowledged.
        for (phone, doc) in &mut phones {
            phone.handled().await;
            phone.sync(&hub, *doc).await;
            assert_eq!(phone.state.shared_heads, phone.doc.get_heads(), "{doc}");
            assert!(hub.documents().exists(*doc).unwrap());
        }
        let stats = hub.cache_stats();
        assert!(stats.waits_for_room > 0, "{stats:?}");
        // Loaded and closing together: the budget, plus what the loaded ones grew by
        // (a peer's sync state and a few operations each) before the next eviction.
        assert!(
            stats.peak_loaded_bytes < budget + actor::memory_estimate(0),
            "{stats:?}"
        );
        hub.shutdown().await;
    }

    /// With one load at a time and room for two documents, twelve phones' households are
    /// uploaded, evicted, and fetched back by twelve tablets at once: every load waits its
    /// turn (none waits on another document), and each household comes back intact.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_load_at_a_time_still_serves_every_household_intact() {
        let (hub, _dir) = test_hub(HubConfig {
            cache_budget_bytes: 2 * actor::memory_estimate(0),
            max_concurrent_loads: Some(1),
            ..HubConfig::default()
        });
        let mut uploaded = Vec::new();
        for n in 0..12 {
            let mut phone = Device::new(&format!("phone-{n}"));
            phone.note(&format!("household {n}"));
            let doc = DocumentId::random();
            phone.sync(&hub, doc).await;
            uploaded.push((phone.doc.get_heads(), doc));
        }
        // Twelve tablets fetch them at once: their loads queue for the one permit.
        let fetches = uploaded.iter().map(|(_, doc)| {
            let hub = &hub;
            async move {
                let mut tablet = Device::new("station-tablet");
                tablet.sync(hub, *doc).await;
                tablet.doc.get_heads()
            }
        });
        let fetched = futures_util::future::join_all(fetches).await;
        for ((heads, doc), got) in uploaded.iter().zip(fetched) {
            assert_eq!(&got, heads, "{doc}");
        }
        let stats = hub.cache_stats();
        // Only two fit: all but the last two were evicted and loaded again.
        assert!(stats.loads >= 22 && stats.evictions >= 10, "{stats:?}");
        hub.shutdown().await;
    }

    /// Amy uploads a household, then Ben's device fetches it: both in sync, both subscribed.
    async fn amy_registers_and_ben_fetches(hub: &Hub, doc: DocumentId) -> (Device, Device) {
        let mut amy = Device::new("amy");
        amy.note("registered");
        amy.sync(hub, doc).await;
        let mut ben = Device::new("ben");
        ben.sync(hub, doc).await;
        assert_eq!(ben.doc.get_heads(), amy.doc.get_heads());
        (amy, ben)
    }

    /// Many changes to a document a device watches reach it as one message per round trip:
    /// while it has not answered the last push, new changes wait for its answer, which gets
    /// them all at once.
    #[tokio::test(flavor = "current_thread")]
    async fn a_watching_device_gets_one_push_per_round_trip_not_one_per_change() {
        let (hub, _dir) = hub_holding_pushes_for(std::time::Duration::from_secs(60));
        let doc = DocumentId::random();
        let (mut amy, mut ben) = amy_registers_and_ben_fetches(&hub, doc).await;

        for visit in ["visit 1", "visit 2", "visit 3"] {
            amy.note(visit);
            amy.sync(&hub, doc).await;
        }
        let pushed = ben.inbox();
        assert_eq!(pushed.len(), 1, "ben is pushed the first change only");
        ben.receive(pushed);
        assert_ne!(ben.doc.get_heads(), amy.doc.get_heads());
        // Ben's answer is answered with the other two changes.
        ben.sync(&hub, doc).await;
        assert_eq!(ben.doc.get_heads(), amy.doc.get_heads());
        hub.shutdown().await;
    }

    /// A device that never answers a push is still sent what came after it, once the hold
    /// has passed: holding back saves messages, it never loses a change.
    #[tokio::test(flavor = "current_thread")]
    async fn a_device_that_does_not_answer_still_gets_every_change() {
        let (hub, _dir) = hub_holding_pushes_for(std::time::Duration::from_millis(100));
        let doc = DocumentId::random();
        let (mut amy, mut ben) = amy_registers_and_ben_fetches(&hub, doc).await;

        amy.note("visit 1");
        amy.sync(&hub, doc).await;
        amy.note("visit 2");
        amy.sync(&hub, doc).await;
        // Ben never answers; he waits (at most 10 s) for messages until he has everything.
        let mut received = ben.inbox();
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                let mut copy = ben.doc.fork();
                let mut state = ben.state.clone();
                for m in received.clone() {
                    copy.receive_sync_message(&mut state, m).unwrap();
                }
                if copy.get_heads() == amy.doc.get_heads() {
                    break;
                }
                if let Some(Outbound::Message(Message::Sync(m))) = ben.outbox.recv().await {
                    received.push(sync::Message::decode(&m.data).unwrap());
                }
            }
        })
        .await
        .expect("ben got visit 2 without answering");
        hub.shutdown().await;
    }

    /// A device whose socket is behind (bytes queued for it, not yet written) is pushed
    /// nothing new until they are written; then it gets what it missed. Memory holds at
    /// most about `push_backlog_bytes` of pushes per connection, however busy the document.
    #[tokio::test(flavor = "current_thread")]
    async fn a_device_whose_socket_is_behind_is_pushed_nothing_until_it_catches_up() {
        let (hub, _dir) = hub_holding_pushes_for(std::time::Duration::from_millis(100));
        let doc = DocumentId::random();
        let (mut amy, mut ben) = amy_registers_and_ben_fetches(&hub, doc).await;

        ben.fall_behind();
        amy.note("visit 1");
        amy.sync(&hub, doc).await;
        let waiting = ben.outbox.try_recv().expect("the backlog is queued");
        assert!(
            ben.outbox.try_recv().is_err(),
            "ben was pushed visit 1 while his socket was behind"
        );

        // The socket writes the backlog; within the retry ben is pushed visit 1.
        ben.sent.written(&waiting);
        let pushed = tokio::time::timeout(std::time::Duration::from_secs(10), ben.outbox.recv())
            .await
            .expect("ben is pushed visit 1 once his socket caught up");
        let Some(Outbound::Message(Message::Sync(m))) = pushed else {
            panic!("expected a sync message, got {pushed:?}");
        };
        ben.receive(vec![sync::Message::decode(&m.data).unwrap()]);
        assert_eq!(ben.doc.get_heads(), amy.doc.get_heads());
        hub.shutdown().await;
    }

    /// With pushes spaced (here 30 s per device, so nothing times out by accident): a
    /// device that sends a change is answered at once, the answer acknowledging it; a
    /// device that only says what it has is answered no sooner than a push, and the other
    /// device is pushed the change when the spacing allows, or when the document leaves
    /// memory (here, at shutdown): spacing delays messages, it never loses one.
    #[tokio::test(flavor = "current_thread")]
    async fn a_change_is_answered_at_once_and_pushes_are_spaced() {
        let (hub, _dir) = test_hub(HubConfig {
            push_spacing_per_peer: std::time::Duration::from_secs(30),
            ..HubConfig::default()
        });
        let doc = DocumentId::random();
        let (mut amy, mut ben) = amy_registers_and_ben_fetches(&hub, doc).await;

        amy.note("visit 1");
        let m = amy.doc.generate_sync_message(&mut amy.state).unwrap();
        amy.hand_over(&hub, doc, m).await;
        amy.handled().await;
        let answers = amy.inbox();
        assert!(
            answers.iter().any(|m| m.heads == amy.doc.get_heads()),
            "amy's change is acknowledged at once: {answers:?}"
        );
        assert!(ben.inbox().is_empty(), "ben's push waits for the spacing");

        // Amy's phone starts its sync state afresh (as after a restart) and only tells what
        // it has: no changes, nothing asked. That is answered no sooner than a push.
        amy.receive(answers);
        amy.state = sync::State::new();
        let m = amy.doc.generate_sync_message(&mut amy.state).unwrap();
        assert!(m.changes.is_empty() && m.need.is_empty());
        amy.hand_over(&hub, doc, m).await;
        amy.handled().await;
        assert!(amy.inbox().is_empty(), "an answer to heads alone is spaced");

        hub.shutdown().await;
        let pushed = ben.inbox();
        ben.receive(pushed);
        assert_eq!(
            ben.doc.get_heads(),
            amy.doc.get_heads(),
            "ben gets visit 1 when the document leaves memory"
        );
    }

    /// An answer waits too while the device's socket is behind: his change is held and
    /// stored at once, and the answer that confirms it comes once the socket has written
    /// what was queued before it, so answers to hundreds of phones asking at once cannot
    /// pile up in memory beyond the outbound bounds.
    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_waits_while_the_devices_socket_is_behind() {
        let (hub, _dir) = hub_holding_pushes_for(std::time::Duration::from_millis(100));
        let doc = DocumentId::random();
        let (_amy, mut ben) = amy_registers_and_ben_fetches(&hub, doc).await;

        ben.fall_behind();
        ben.note("the dog barks at night");
        let m = ben.doc.generate_sync_message(&mut ben.state).unwrap();
        ben.hand_over(&hub, doc, m).await;
        ben.handled().await;
        let waiting = ben.outbox.try_recv().expect("the backlog is queued");
        assert!(
            ben.outbox.try_recv().is_err(),
            "ben was answered while his socket was behind"
        );
        let held = hub
            .read(doc, |d| d.get_heads())
            .await
            .expect("the document reads")
            .expect("the document exists");
        assert_eq!(held, ben.doc.get_heads(), "ben's change is held meanwhile");

        ben.sent.written(&waiting);
        let answer = tokio::time::timeout(std::time::Duration::from_secs(10), ben.outbox.recv())
            .await
            .expect("ben is answered once his socket caught up");
        let Some(Outbound::Message(Message::Sync(m))) = answer else {
            panic!("expected a sync message, got {answer:?}");
        };
        let m = sync::Message::decode(&m.data).unwrap();
        assert_eq!(
            m.heads,
            ben.doc.get_heads(),
            "the answer confirms his change"
        );
        hub.shutdown().await;
    }
}
