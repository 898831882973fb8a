//! One task per loaded document. It is the only writer of its document, which gives the
//! durability rule a simple shape: apply a batch of incoming sync messages, store the new
//! changes as one chunk, wait for the (shared) flush, and only then generate the messages
//! that reveal those changes: to the senders and to every other subscribed peer.
//!
//! A batch holds at most one message per connection (Automerge's sync protocol answers each
//! message before the next), and a peer that has not answered its last push is sent nothing
//! new until it does or `push_hold` passes, so a document many devices edit costs one
//! message per round trip per device.
//!
//! The new changes are stored as the peers sent them when the batch's messages hold all of
//! them (otherwise encoded from the document). A batch that changed nothing is answered on
//! the thread that applied it: there is nothing to wait for. So is a batch that changed
//! only its own document when the store can flush on that thread at no extra cost (no other
//! flush under way to share: `DocumentStore::durable_here`); otherwise it waits for the
//! shared flush, then is answered on another blocking call.
//!
//! A batch of peers' changes that leaves the document with more than `MERGE_HEADS_ABOVE`
//! heads is followed by a merge change of the server's (no operations, stored with the
//! batch), so heads and every message carrying them stay small when many phones edited a
//! household offline. Beside those and the local edits it is handed (`Cmd::Local`), it
//! makes no change of its own.
//!
//! Automerge and sled work runs in `spawn_blocking`; the actor's state moves into the
//! blocking closure and back, so no lock is held across an `.await`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, ChangeHash};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::peer_sync::{Heads, PeerSync};
use super::{AcceptedChanges, DerivedEdit, HubInner, LocalEdit, Outbound, PeerLink};
use crate::auth::Access;
use crate::ids::{ConnId, DocumentId};
use crate::protocol::{CloseCode, DocMessage, Message, SyncKind};
use crate::storage::documents::DocumentStore;
use crate::storage::{blocking, ChunkKey, ChunkKind, StorageError};

/// At most this many queued commands are applied under one flush.
const MAX_BATCH: usize = 64;

/// At most this many commands wait for a later batch because their connection already has
/// a message in the current one (see `next_batch`).
const MAX_DEFERRED: usize = 256;

/// What a loaded document that stores nothing counts against the cache budget, at most. Such
/// a document (a new upload in progress, or an id a device made up) stores zero bytes but
/// holds its peers' sync states in memory (about 23 KB measured); counting it keeps the LRU
/// able to evict them. A sixteenth of the budget when that is less, so that a small budget
/// still holds a few.
const UNSTORED_DOC_COST_BYTES: usize = 64 * 1024;

/// Where a local edit's outcome goes: `Ok(changed)` once durable, or why it was refused.
pub(crate) type LocalDone = oneshot::Sender<Result<bool, String>>;
pub(crate) type ReadFn = Box<dyn FnOnce(&Automerge) + Send>;

/// The sending side of a document actor's queue. Commands travel boxed: a channel allocates
/// its slots 32 at a time, the first block when the actor starts, and a `Cmd` is 208 bytes
/// inline (its `PeerLink`), so every loaded document held 6.6 KB of mostly empty slots
/// (5.4 MB for 810 households, by heaptrack); boxed, the block is 256 bytes.
#[derive(Clone)]
pub(crate) struct ActorTx(mpsc::Sender<Box<Cmd>>);

/// The receiving side of a document actor's queue.
pub(crate) type ActorRx = mpsc::Receiver<Box<Cmd>>;

impl ActorTx {
    /// A queue of at most `len` commands.
    pub(super) fn channel(len: usize) -> (Self, ActorRx) {
        let (tx, rx) = mpsc::channel(len);
        (Self(tx), rx)
    }

    /// Queues `cmd`, waiting for room; gives it back if the actor has stopped.
    pub(super) async fn send(&self, cmd: Cmd) -> Result<(), Cmd> {
        self.0.send(Box::new(cmd)).await.map_err(|e| *e.0)
    }
}

pub(crate) enum Cmd {
    Sync {
        link: PeerLink,
        kind: SyncKind,
        data: Vec<u8>,
        /// Held until the answer is queued (dropped with the command on any other way out).
        in_flight: super::InFlight,
    },
    /// A change made by the server itself (catalogs), or on behalf of an account (staff
    /// edits through the API). Answered once durable: `Ok(true)` if it changed the document.
    Local {
        edit: LocalEdit,
        on_behalf: Option<crate::auth::Principal>,
        done: LocalDone,
    },
    /// A read of the document as it is now (the staff API's detail and history).
    Read { read: ReadFn },
    /// The connection closed: persist and forget its sync state.
    Leave { conn: ConnId },
    /// Another node sharing the store has stored changes of this document: load the chunks
    /// this copy does not have, and push what changed to the subscribed peers.
    Refresh,
}

struct PeerState {
    link: PeerLink,
    /// Whole during an exchange, parked once the peer is settled (`peer_sync`).
    sync: PeerSync,
    /// Shared heads as last persisted, to skip writes that would change nothing (shared with
    /// the document's heads when they are the same).
    persisted: Heads,
    /// When we sent this peer a message that calls for its answer, if it has not answered
    /// yet. Until it does (or `HubConfig::push_hold` passes) it is sent nothing new: its
    /// answer gets everything that arrived meanwhile in one message.
    awaiting_since: Option<Instant>,
    /// When this peer was last sent a message about this document: pushes are spaced
    /// (`HubConfig::push_spacing_per_peer`).
    last_sent: Option<Instant>,
}

/// Everything the actor owns; moved into blocking closures and back, boxed: an `Automerge`
/// is 3.5 KB inline, and the actor's future held several copies of it across its awaits
/// (16 KB per loaded document, measured with heaptrack at 200 phones).
struct DocState {
    id: DocumentId,
    doc: Automerge,
    /// Whether the document exists (has at least one change stored).
    exists: bool,
    chunks: Vec<ChunkKey>,
    incrementals: usize,
    stored_bytes: usize,
    /// Operations in the stored chunks (counted from their headers).
    ops: u64,
    peers: HashMap<ConnId, PeerState>,
    /// When the first peer held back by `push_hold` is due its message anyway.
    push_at: Option<Instant>,
    /// The document's heads as last asked for, held once for the peers parked at them.
    heads: Heads,
}

/// What a loaded document with `ops` operations takes in memory (the Automerge document and
/// the allocator's overhead), as measured by `examples/doc_memory.rs` on households of 0 to
/// 50 visits (18 KiB empty, 21 KiB with 4 visits, 68 KiB with 50): its stored size says little
/// (2.4 KB stored for the 21 KiB one).
pub(super) fn memory_estimate(ops: u64) -> usize {
    const BASE_BYTES: usize = 18 * 1024;
    const BYTES_PER_OP: usize = 9;
    BASE_BYTES.saturating_add((ops as usize).saturating_mul(BYTES_PER_OP))
}

/// How soon a push held back by a peer's socket backlog is tried again.
const BACKLOG_RETRY: std::time::Duration = std::time::Duration::from_millis(250);

/// Pushes to one peer are spaced at most this far apart, however many peers a document has.
const MAX_PUSH_SPACING: std::time::Duration = std::time::Duration::from_secs(10);

/// A peer's sync state (heads, the last have-filter, hashes sent this session).
const PEER_STATE_BYTES: usize = 1024;

/// A batch of peers' changes that leaves a document with more heads than this is followed
/// by a merge change of the server's (`DocState::merge_heads`). Eight keeps every copy of
/// the heads under 300 bytes, and at most one merge per eight concurrent changes.
pub(super) const MERGE_HEADS_ABOVE: usize = 8;

/// The message of the server's merge changes (what a developer inspecting a document's
/// history sees).
pub(crate) const MERGE_MESSAGE: &str = "fieldsync: merge of concurrent edits";

impl DocState {
    /// What the document counts against a cache budget of `budget` bytes.
    fn cost(&self, budget: usize) -> usize {
        if self.exists {
            memory_estimate(self.ops) + self.peers.len() * PEER_STATE_BYTES
        } else {
            UNSTORED_DOC_COST_BYTES.min(budget / 16)
        }
    }
}

pub(super) struct DocActor {
    hub: Arc<HubInner>,
    id: DocumentId,
    generation: u64,
}

/// The outcome of applying one batch, before anything is sent.
#[derive(Default)]
struct Applied {
    changed: bool,
    /// Changes another node stored were loaded (already durable: only pushed).
    refreshed: bool,
    /// Peers to answer even if nothing changed.
    responders: Vec<ConnId>,
    /// The responders whose message brought changes or asked for some: answered at once
    /// (the answer acknowledges the changes). The others only told the server what they
    /// have, and their answer is spaced like a push (`push_due`): in a household many
    /// devices edit, answering such messages at once is a loop of one message per round
    /// trip per device that spacing pushes alone does not slow.
    urgent: Vec<ConnId>,
    unavailable: Vec<PeerLink>,
    failed: Vec<(PeerLink, CloseCode, String)>,
    /// Who delivered which new changes (peers, and accounts the server edited for).
    accepted: Vec<(crate::auth::Principal, Vec<ChangeHash>)>,
    /// Local edits to answer once durable.
    local_done: Vec<(LocalDone, Result<bool, String>)>,
    /// Edits of other documents that the accepted changes call for (catalog entries).
    derived: Vec<DerivedEdit>,
    /// The `request`s/`sync`s this batch handled: settled once answers are queued.
    settled: Vec<super::InFlight>,
    /// The change chunks, as peers sent them, of the messages that changed the document:
    /// stored as they are instead of encoding the batch's changes again (`save_after` cost
    /// about a sixth of accepting a change). Not used when something else changed the
    /// document in this batch (`received_incomplete`: a local edit, a peer's whole
    /// document sent for one the server had, or changes that waited in the queue for
    /// their dependencies): the batch is then encoded from the document.
    received: Option<Vec<u8>>,
    /// Something changed the document that `received` does not hold.
    received_incomplete: bool,
}

impl DocActor {
    pub(super) fn new(hub: Arc<HubInner>, id: DocumentId, generation: u64) -> Self {
        Self {
            hub,
            id,
            generation,
        }
    }

    pub(super) async fn run(self, mut rx: ActorRx) {
        let mut state = match self.load().await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(doc = %self.id, error = %e, "cannot load document");
                self.fail_queued(
                    VecDeque::new(),
                    &mut rx,
                    "the server could not load this document",
                );
                self.hub.actor_exited(self.id, self.generation);
                return;
            }
        };
        self.hub.set_cost(
            self.id,
            self.generation,
            state.cost(self.hub.config.cache_budget_bytes),
        );
        let idle_unload = self.hub.config.idle_unload_after;
        let mut retired = false;
        // Commands taken from the queue that belong to a later batch (see `next_batch`).
        let mut deferred: VecDeque<Cmd> = VecDeque::new();
        loop {
            let push_at = state.push_at;
            let first = match deferred.pop_front() {
                Some(cmd) => Some(cmd),
                None => tokio::select! {
                    cmd = rx.recv() => cmd.map(|cmd| *cmd),
                    // Peers held back because they owed us an answer get their message now.
                    _ = sleep_until(push_at), if push_at.is_some() => {
                        match self.push_held(state).await {
                            Ok(s) => state = s,
                            Err(e) => {
                                tracing::error!(doc = %self.id, error = %e, "storage failed; unloading document");
                                self.fail_queued(deferred, &mut rx, "the server could not store this change; retry later");
                                self.hub.actor_exited(self.id, self.generation);
                                return;
                            }
                        }
                        continue;
                    }
                    _ = self.hub.cancel.cancelled() => None,
                    // Nothing asked of this document for a while: unload it (its peers' sync
                    // states are persisted on the way out; the next message reloads it), so
                    // memory follows what is in use, not what was used since the start.
                    _ = tokio::time::sleep(idle_unload), if !retired => {
                        tracing::debug!(doc = %self.id, "idle; unloading");
                        self.hub.retire(self.id, self.generation);
                        retired = true;
                        continue;
                    }
                },
            };
            let Some(first) = first else { break };
            let batch = next_batch(first, &mut deferred, &mut rx);
            // Told if the batch fails: their messages are not stored and nobody else would
            // answer them.
            let senders: Vec<PeerLink> = batch
                .iter()
                .filter_map(|c| match c {
                    Cmd::Sync { link, .. } => Some(link.clone()),
                    _ => None,
                })
                .collect();
            match self.process(state, batch).await {
                Ok(s) => {
                    state = s;
                    if !retired && !state.exists && state.peers.is_empty() {
                        // Nothing stored and nobody working on it (a refused or abandoned
                        // upload, a made-up id): unload now instead of holding memory until
                        // the cache evicts it. What is still queued is served first.
                        self.hub.retire(self.id, self.generation);
                        retired = true;
                    }
                }
                Err(e) => {
                    // The in-memory document may now hold changes that are not durable; it
                    // must not answer anyone. Stop; the next use reloads from disk.
                    tracing::error!(doc = %self.id, error = %e, "storage failed; unloading document");
                    let message = "the server could not store this change; retry later";
                    for link in senders {
                        link.send(Outbound::Fail {
                            code: CloseCode::InternalError,
                            message: message.into(),
                        });
                    }
                    self.fail_queued(deferred, &mut rx, message);
                    self.hub.actor_exited(self.id, self.generation);
                    return;
                }
            }
        }
        // Evicted or shutting down: keep the peers' sync states for their next visit, and
        // send what held-back peers are still owed.
        let store = self.hub.store.clone();
        let hub = self.hub.clone();
        let targets = match state.push_at {
            Some(_) => self.hub.subscribers(self.id),
            None => Vec::new(),
        };
        let _ = tokio::task::spawn_blocking(move || {
            state.answer(&hub, targets, &HashSet::new(), None);
            let heads = state.current_heads();
            for p in state.peers.values_mut() {
                persist_sync_state(store.as_ref(), state.id, p, &heads);
            }
        })
        .await;
        self.hub.actor_exited(self.id, self.generation);
    }

    /// Tells everyone whose message waits (`deferred`, then the queue) that it will not be
    /// served.
    fn fail_queued(&self, deferred: VecDeque<Cmd>, rx: &mut ActorRx, message: &str) {
        rx.close();
        let queued = std::iter::from_fn(|| rx.try_recv().ok().map(|cmd| *cmd));
        for cmd in deferred.into_iter().chain(queued) {
            if let Cmd::Sync { link, .. } = cmd {
                link.send(Outbound::Fail {
                    code: CloseCode::InternalError,
                    message: message.into(),
                });
            }
        }
    }

    async fn load(&self) -> Result<Box<DocState>, String> {
        let store = self.hub.store.clone();
        let id = self.id;
        // Held until the document is in memory; a load waits for no other document, so
        // waiting for a permit cannot deadlock.
        let _permit = match &self.hub.loads {
            Some(loads) => Some(
                loads
                    .acquire()
                    .await
                    .map_err(|_| "the server is shutting down".to_string())?,
            ),
            None => None,
        };
        tokio::task::spawn_blocking(move || {
            let stored = store.load(id).map_err(|e| e.to_string())?;
            let started = std::time::Instant::now();
            let doc = stored.hydrate().map_err(|e| e.to_string())?;
            let incrementals = stored
                .chunks
                .iter()
                .filter(|(k, _)| k.kind == ChunkKind::Incremental)
                .count();
            let ops = stored
                .chunks
                .iter()
                .map(|(_, bytes)| super::op_count::count_ops(bytes).unwrap_or(0))
                .fold(0u64, u64::saturating_add);
            tracing::debug!(
                doc = %id,
                chunks = stored.chunks.len(),
                incrementals,
                ops,
                bytes = stored.total_bytes(),
                hydrate_ms = started.elapsed().as_secs_f64() * 1e3,
                "loaded"
            );
            Ok(Box::new(DocState {
                id,
                ops,
                exists: !doc.get_heads().is_empty(),
                stored_bytes: stored.total_bytes(),
                chunks: stored.chunks.into_iter().map(|(k, _)| k).collect(),
                incrementals,
                doc,
                peers: HashMap::new(),
                push_at: None,
                heads: Heads::from([]),
            }))
        })
        .await
        .map_err(|e| e.to_string())?
    }

    async fn process(
        &self,
        state: Box<DocState>,
        batch: Vec<Cmd>,
    ) -> Result<Box<DocState>, StorageError> {
        let taken_up = std::time::Instant::now();
        let hub = self.hub.clone();
        let (state, applied) = blocking(move || {
            let mut state = state;
            let applied = state.apply(&hub, batch)?;
            if !applied.changed && applied.derived.is_empty() {
                // Nothing to make durable (a peer's "I have these heads", a request): answered
                // on this thread, without handing the document back and forth again.
                let state = state.finish(&hub, applied, taken_up)?;
                return Ok((state, None));
            }
            if applied.derived.is_empty() {
                // Durable before advertised, made so on this thread when no flush is under
                // way to share (a change at a time: the common case), and answered here too.
                if let Some(flushed) = hub.store.durable_here() {
                    flushed?;
                    let state = state.finish(&hub, applied, taken_up)?;
                    return Ok((state, None));
                }
            }
            Ok((state, Some(applied)))
        })
        .await?;
        let Some(mut applied) = applied else {
            self.hub.set_cost(
                self.id,
                self.generation,
                state.cost(self.hub.config.cache_budget_bytes),
            );
            return Ok(state);
        };

        // Derived documents (the village catalog) are brought up to date before the sender
        // hears that its changes are held, so "held" implies "discoverable". They go first:
        // this batch's writes (chunk, provenance, registration) are already in the store, and
        // a derived edit that changed its document answers only after a flush that started
        // after it was asked for (group commit), and a sled flush makes every earlier write
        // of the process durable. So when every derived edit changed something, that flush
        // covered this batch too and a second one would only add latency.
        let mut covered_by_derived = !applied.derived.is_empty();
        for derived in std::mem::take(&mut applied.derived) {
            if derived.doc == self.id {
                tracing::error!(doc = %self.id, "a document cannot derive an edit of itself; skipped");
                covered_by_derived = false;
                continue;
            }
            match self.hub.change_local(derived.doc, derived.edit, None).await {
                Ok(true) => {}
                Ok(false) => covered_by_derived = false,
                Err(e) => {
                    covered_by_derived = false;
                    tracing::warn!(doc = %self.id, derived = %derived.doc, error = %e, "updating a derived document failed");
                }
            }
        }
        if applied.changed && !covered_by_derived {
            // Durable before advertised: nobody hears of these changes (nor of their
            // provenance and registration rows, written in `apply`) until they are on disk.
            self.hub.store.durable().await?;
        }
        let hub = self.hub.clone();
        let state = blocking(move || state.finish(&hub, applied, taken_up)).await?;
        self.hub.set_cost(
            self.id,
            self.generation,
            state.cost(self.hub.config.cache_budget_bytes),
        );
        Ok(state)
    }

    /// Sends the peers held back by `push_hold` what they are owed, answered or not.
    async fn push_held(&self, state: Box<DocState>) -> Result<Box<DocState>, StorageError> {
        let targets = self.hub.subscribers(self.id);
        let hub = self.hub.clone();
        let hold = Some((Instant::now(), self.hub.config.push_hold));
        blocking(move || {
            let mut state = state;
            state.push_at = state.answer(&hub, targets, &HashSet::new(), hold);
            Ok(state)
        })
        .await
    }
}

impl DocState {
    /// After a batch is applied and what it changed is durable: tells the local edits and
    /// the refused peers, answers the senders and pushes to the other subscribers, and
    /// compacts when it is time. Runs on a blocking thread.
    fn finish(
        mut self: Box<Self>,
        hub: &HubInner,
        mut applied: Applied,
        taken_up: std::time::Instant,
    ) -> Result<Box<Self>, StorageError> {
        let accepted: usize = applied.accepted.iter().map(|(_, h)| h.len()).sum();
        if accepted > 0 {
            crate::metrics::CHANGES_ACCEPTED.inc_by(accepted as u64);
            crate::metrics::ACK_SECONDS.observe(taken_up.elapsed().as_secs_f64());
        }
        for (done, result) in applied.local_done.drain(..) {
            let _ = done.send(result);
        }
        for link in &applied.unavailable {
            hub.unsubscribe(self.id, link.conn);
            link.send(Outbound::Message(Message::DocUnavailable(DocMessage {
                sender_id: hub.server_peer_id.clone(),
                target_id: link.peer_id.clone(),
                document_id: self.id,
                data: Vec::new(),
            })));
        }
        for (link, code, reason) in &applied.failed {
            hub.unsubscribe(self.id, link.conn);
            link.send(Outbound::Fail {
                code: *code,
                message: reason.clone(),
            });
        }

        let responders: HashSet<ConnId> = applied.responders.iter().copied().collect();
        let urgent: HashSet<ConnId> = applied.urgent.iter().copied().collect();
        let targets: Vec<PeerLink> = if applied.changed || applied.refreshed {
            hub.subscribers(self.id)
        } else {
            hub.subscribers(self.id)
                .into_iter()
                .filter(|l| responders.contains(&l.conn))
                .collect()
        };
        let hold = Some((Instant::now(), hub.config.push_hold));
        let store = hub.store.as_ref();
        if applied.changed {
            // Made durable before this: the projection is as durable as the chunk.
            store.settle(self.id)?;
        }
        let push_at = self.answer(hub, targets, &urgent, hold);
        // A batch that changed nothing answered only its senders: peers held back earlier
        // are still owed their message.
        self.push_at = match (applied.changed || applied.refreshed, self.push_at) {
            (false, Some(earlier)) => Some(push_at.map_or(earlier, |p| p.min(earlier))),
            _ => push_at,
        };
        if self.incrementals >= hub.config.compact_after_chunks {
            self.compact(store)?;
        }
        drop(applied.settled); // answers are queued: these requests are no longer in flight
        Ok(self)
    }

    /// Applies one batch of commands and writes what it changed, as one unit of the store
    /// (one transaction on PostgreSQL): a failure leaves nothing of it stored, and the
    /// caller then unloads the document, whose memory may hold what was not stored.
    fn apply(&mut self, hub: &HubInner, batch: Vec<Cmd>) -> Result<Applied, StorageError> {
        /// Rolls the batch back if it is still open when dropped (a panic while applying),
        /// so nothing later on this thread writes into a transaction nobody commits.
        struct Open<'a>(Option<&'a dyn DocumentStore>);
        impl Drop for Open<'_> {
            fn drop(&mut self) {
                if let Some(store) = self.0.take() {
                    let _ = store.end_batch(false);
                }
            }
        }
        // What other nodes stored first, outside the batch: it is durable already, and the
        // batch's own chunk then holds only this batch's changes.
        let (refreshes, batch): (Vec<Cmd>, Vec<Cmd>) =
            batch.into_iter().partition(|c| matches!(c, Cmd::Refresh));
        let refreshed = !refreshes.is_empty() && self.refresh(hub.store.as_ref())?;
        if batch.is_empty() {
            return Ok(Applied {
                refreshed,
                ..Applied::default()
            });
        }
        hub.store.begin_batch()?;
        let mut open = Open(Some(hub.store.as_ref()));
        let applied = self.apply_batch(hub, batch);
        open.0 = None;
        hub.store.end_batch(applied.is_ok())?;
        applied.map(|a| Applied { refreshed, ..a })
    }

    /// Loads the chunks of this document that the store has and this copy does not (another
    /// node stored them), and forgets the ones that are gone (another node compacted them
    /// into a snapshot, which is loaded instead). Whether the document changed.
    fn refresh(&mut self, store: &dyn DocumentStore) -> Result<bool, StorageError> {
        let stored = store.load(self.id)?;
        let before = self.doc.get_heads();
        let known: HashSet<ChunkKey> = self.chunks.iter().copied().collect();
        let mut now = Vec::with_capacity(stored.chunks.len());
        for (key, bytes) in &stored.chunks {
            now.push(*key);
            if known.contains(key) {
                continue;
            }
            self.doc.load_incremental(bytes).map_err(|e| {
                StorageError::Corrupt(format!("document {}: a chunk does not load ({e})", self.id))
            })?;
            self.stored_bytes += bytes.len();
            self.ops = self
                .ops
                .saturating_add(super::op_count::count_ops(bytes).unwrap_or(0));
            if key.kind == ChunkKind::Incremental {
                self.incrementals += 1;
            }
        }
        let new_chunks = now.iter().filter(|k| !known.contains(k)).count();
        self.chunks = now;
        self.exists = !self.doc.get_heads().is_empty();
        let changed = self.doc.get_heads() != before;
        tracing::debug!(doc = %self.id, new_chunks, changed, "refreshed from the store");
        Ok(changed)
    }

    fn apply_batch(&mut self, hub: &HubInner, batch: Vec<Cmd>) -> Result<Applied, StorageError> {
        let store: &dyn DocumentStore = hub.store.as_ref();
        let mut out = Applied::default();
        let heads_at_start = self.doc.get_heads();
        // Changes that arrived before their dependencies wait in the document's queue, and
        // their message was not stored (it changed nothing). Once this batch brings what
        // they wait for they are applied too, and are in no message of this batch: then
        // the batch is encoded from the document.
        if !automerge::ReadDoc::get_missing_deps(&self.doc, &[]).is_empty() {
            out.received_incomplete = true;
        }
        for cmd in batch {
            match cmd {
                Cmd::Leave { conn } => {
                    if let Some(mut p) = self.peers.remove(&conn) {
                        let heads = self.current_heads();
                        persist_sync_state(store, self.id, &mut p, &heads);
                    }
                }
                Cmd::Sync {
                    link,
                    kind,
                    data,
                    in_flight,
                } => {
                    // Decided here, per message, so a revocation or a new registration made
                    // while the message waited in the queue is honoured.
                    let access = hub.authorizer.access(&link.principal, self.id);
                    tracing::trace!(doc = %self.id, conn = %link.conn, ?access, "applying");
                    out.settled.push(in_flight);
                    self.apply_one(hub, link, kind, &data, access, &mut out)
                }
                Cmd::Read { read } => read(&self.doc),
                // Taken out of the batch by `apply`.
                Cmd::Refresh => {}
                Cmd::Local {
                    edit,
                    on_behalf,
                    done,
                } => {
                    let before = self.doc.get_heads();
                    let result = edit(&mut self.doc).map(|()| self.doc.get_heads() != before);
                    if matches!(result, Ok(true)) {
                        out.received_incomplete = true;
                    }
                    if let (Some(who), Ok(true)) = (on_behalf, &result) {
                        let hashes = self
                            .doc
                            .get_changes_meta(&before)
                            .iter()
                            .map(|c| c.hash)
                            .collect();
                        out.accepted.push((who, hashes));
                    }
                    // Subscribed peers hear of a local change like of any other (`changed`).
                    self.exists = !self.doc.get_heads().is_empty();
                    out.local_done.push((done, result));
                }
            }
        }
        if !out.accepted.is_empty() && self.doc.get_heads().len() > MERGE_HEADS_ABOVE {
            self.merge_heads(hub.clock.now(), &mut out);
        }
        if self.doc.get_heads() != heads_at_start {
            let chunk = match out.received.take() {
                Some(bytes) if !out.received_incomplete => bytes,
                _ => self.doc.save_after(&heads_at_start),
            };
            // The chunk carries an "unsettled" mark until the projection written below is
            // durable too (cleared after the flush, in `finish`).
            let key = store.put_change(self.id, &chunk)?;
            self.chunks.push(key);
            self.incrementals += 1;
            self.stored_bytes += chunk.len();
            self.ops = self
                .ops
                .saturating_add(super::op_count::count_ops(&chunk).unwrap_or(0));
            out.changed = true;
            // Provenance, registrations and derived edits, written before the flush that
            // makes the chunk durable, so the same flush covers them.
            let received_at = hub.clock.now();
            for (principal, hashes) in &out.accepted {
                let event = AcceptedChanges {
                    doc: self.id,
                    principal: principal.clone(),
                    hashes: hashes.clone(),
                    received_at,
                };
                for observer in &hub.observers {
                    out.derived
                        .extend(observer.changes_accepted(&event, &self.doc)?);
                }
            }
            if hub.config.failpoint == Some(super::Failpoint::StallBeforeProjection) {
                stall_before_projection(store, self.id);
            }
            let batch = super::ChangedBatch {
                received_at,
                heads_before: &heads_at_start,
                delivered: &out.accepted,
            };
            for observer in &hub.observers {
                observer.document_changed(self.id, &self.doc, &batch)?;
            }
        }
        Ok(out)
    }

    /// Adds a merge change: no operations, every current head as a dependency, so the
    /// document has one head again. A household that many phones edited offline otherwise
    /// keeps one head per phone until someone edits it again, and every sync message about it
    /// and every peer's sync state carries them all, several times over (200 phones, 200
    /// heads: 13 KB per message, about 30 KB per peer's state). Stored with the batch.
    fn merge_heads(&mut self, now: crate::ids::Timestamp, out: &mut Applied) {
        let before = self.doc.get_heads();
        let seconds = i64::try_from(now.as_millis() / 1000).unwrap_or(i64::MAX);
        self.doc.empty_commit(
            automerge::transaction::CommitOptions::default()
                .with_message(MERGE_MESSAGE.to_string())
                .with_time(seconds),
        );
        crate::metrics::HEADS_MERGED.inc();
        tracing::debug!(doc = %self.id, heads = before.len(), "merged concurrent heads");
        if let Some(received) = out.received.as_mut() {
            if !out.received_incomplete {
                // The chunk stays what the phones sent, with the merge change after it.
                received.extend_from_slice(&self.doc.save_after(&before));
            }
        }
    }

    fn apply_one(
        &mut self,
        hub: &HubInner,
        link: PeerLink,
        kind: SyncKind,
        data: &[u8],
        access: Access,
        out: &mut Applied,
    ) {
        let store: &dyn DocumentStore = hub.store.as_ref();
        let message = match sync::Message::decode(data) {
            Ok(m) => m,
            Err(e) => {
                self.peers.remove(&link.conn);
                out.failed.push((
                    link,
                    CloseCode::ProtocolError,
                    format!(
                        "document {}: data is not an Automerge sync message ({e})",
                        self.id
                    ),
                ));
                return;
            }
        };
        let may_create = matches!(access, Access::ReadWrite | Access::Create);
        let refused = match access {
            Access::None => true,
            // Create means "unknown to the directory": an existing document is not theirs.
            Access::Create => self.exists,
            Access::Read | Access::ReadWrite => false,
        };
        if refused || (!self.exists && (kind == SyncKind::Request || !may_create)) {
            // Asking for (or offering, without the right to create) a document we do not
            // have, or one outside the peer's scope: the same answer for both.
            self.peers.remove(&link.conn);
            out.unavailable.push(link);
            return;
        }
        let mut whole_document_sent = false;
        if may_create && !message.changes.is_empty() {
            // Counted from the chunks' headers before Automerge expands anything.
            match self.within_limits(&hub.config, &message) {
                Ok(document) => whole_document_sent = document,
                Err(reason) => {
                    tracing::warn!(doc = %self.id, peer = %link.peer_id, reason = %reason, "changes refused: over a limit");
                    crate::metrics::CHANGES_REFUSED
                        .with_label_values(&["limits"])
                        .inc();
                    self.peers.remove(&link.conn);
                    out.failed.push((link, CloseCode::PolicyViolation, reason));
                    return;
                }
            }
        }
        // What Automerge loads from the message, kept to be stored as it is if it changes
        // the document (a read-only peer's changes are not loaded, and not kept).
        let sent: Option<Vec<u8>> = (may_create && !message.changes.is_empty())
            .then(|| message.changes.iter().flatten().copied().collect());
        let id = self.id;
        let conn = link.conn;
        let doc = &mut self.doc;
        let peer = peer_state(&mut self.peers, store, id, &link);
        peer.link = link.clone();
        peer.awaiting_since = None; // it answered
        peer.sync.live().set_read_only(!may_create);
        let before = doc.get_heads();
        let changes_in = message.changes.len();
        let asks = !message.need.is_empty();
        if let Err(e) = doc.receive_sync_message(peer.sync.live(), message) {
            self.peers.remove(&conn);
            out.failed.push((
                link,
                CloseCode::ProtocolError,
                format!("document {id}: the sync message could not be applied ({e})"),
            ));
            return;
        }
        let after = doc.get_heads();
        if tracing::enabled!(tracing::Level::TRACE) {
            tracing::trace!(doc = %id, conn = %conn, changes = changes_in, changed = after != before, missing_deps = automerge::ReadDoc::get_missing_deps(&*doc, &[]).len(), "received");
        }
        if access == Access::Create && !after.is_empty() {
            // The first changes of a new document: keep them only if the content may be
            // registered to this peer (its station and an assigned village).
            if let Err(reason) = hub.authorizer.admit(&link.principal, id, doc) {
                tracing::info!(doc = %id, peer = %link.peer_id, reason = %reason, "new document refused; nothing stored");
                crate::metrics::CHANGES_REFUSED
                    .with_label_values(&["scope"])
                    .inc();
                *doc = Automerge::new();
                self.peers.remove(&conn);
                out.unavailable.push(link);
                return;
            }
        }
        if after != before {
            let hashes = doc
                .get_changes_meta(&before)
                .iter()
                .map(|c| c.hash)
                .collect();
            out.accepted.push((link.principal.clone(), hashes));
            // A whole document is stored as sent only as the first chunk of a new one (its
            // operations are then counted once, as they are in the document).
            match sent {
                Some(bytes) if !whole_document_sent || before.is_empty() => out
                    .received
                    .get_or_insert_with(Vec::new)
                    .extend_from_slice(&bytes),
                _ => out.received_incomplete = true,
            }
        }
        // A document exists once it has a change; an upload starts with an exchange of heads
        // before any change arrives, so an empty document still gets an answer.
        self.exists = !after.is_empty();
        out.responders.push(conn);
        if changes_in > 0 || asks {
            out.urgent.push(conn);
        }
    }

    /// Whether the changes of `message` fit the per-change and per-document limits. The text
    /// of an `Err` goes to the peer: it says which limit and what to do.
    /// `Ok(true)` when a chunk is a whole document.
    fn within_limits(
        &self,
        config: &super::HubConfig,
        message: &sync::Message,
    ) -> Result<bool, String> {
        let id = self.id;
        let mut added_ops = 0u64;
        let mut whole_doc_ops = 0u64;
        let mut added_bytes = 0usize;
        let mut whole_doc_bytes = 0usize;
        for chunk in message.changes.iter() {
            let counted =
                super::op_count::chunk_ops(chunk).map_err(|e| format!("document {id}: {e}"))?;
            for c in counted {
                if c.is_document {
                    // The sender's whole document (automerge sends it instead of changes when
                    // that is shorter): most of it is usually here already.
                    whole_doc_ops = whole_doc_ops.max(c.ops);
                    whole_doc_bytes = whole_doc_bytes.max(chunk.len());
                } else if c.ops > config.max_ops_per_change {
                    return Err(format!(
                        "document {id}: a change of {} operations exceeds the limit of {} per change; split the edit into smaller changes",
                        c.ops, config.max_ops_per_change
                    ));
                } else {
                    added_ops = added_ops.saturating_add(c.ops);
                    added_bytes = added_bytes.saturating_add(chunk.len());
                }
            }
        }
        // Single changes add to what is stored; a whole document is at least its own size
        // once merged. (Two documents each under a limit can merge to more than it; the next
        // change is then refused.)
        let ops_after = self.ops.max(whole_doc_ops).saturating_add(added_ops);
        if ops_after > config.max_ops_per_document {
            return Err(format!(
                "document {id}: {ops_after} operations would exceed the limit of {} per document; start a new document for new records",
                config.max_ops_per_document
            ));
        }
        let bytes_after = self
            .stored_bytes
            .max(whole_doc_bytes)
            .saturating_add(added_bytes);
        if bytes_after > config.max_document_bytes {
            return Err(format!(
                "document {id}: it would exceed the limit of {} stored bytes per document; start a new document for new records",
                config.max_document_bytes
            ));
        }
        Ok(whole_doc_ops > 0 || whole_doc_bytes > 0)
    }

    /// Generates and queues a sync message for each target that needs one. `urgent` sent
    /// changes or asked for some in this batch and are answered now (unless their socket is
    /// behind); everyone else is sent a message only as `push_due` allows. With `hold` (now,
    /// how long), a peer
    /// that has not answered a message sent less than that long ago is passed over: it gets
    /// everything new in the answer to its answer, so a document many devices edit at once
    /// costs one message per round trip per device, not one per change per device.
    /// Returns when the first passed-over peer is due its message anyway. Without `hold`
    /// everyone who needs a message gets one.
    fn answer(
        &mut self,
        hub: &HubInner,
        targets: Vec<PeerLink>,
        urgent: &HashSet<ConnId>,
        hold: Option<(Instant, std::time::Duration)>,
    ) -> Option<Instant> {
        let store: &dyn DocumentStore = hub.store.as_ref();
        let server = &hub.server_peer_id;
        let mut push_at: Option<Instant> = None;
        let spacing = hub
            .config
            .push_spacing_per_peer
            .saturating_mul(u32::try_from(targets.len()).unwrap_or(u32::MAX))
            .min(MAX_PUSH_SPACING);
        let heads = self.current_heads();
        for link in targets {
            let id = self.id;
            if !matches!(
                hub.authorizer.access(&link.principal, id),
                Access::Read | Access::ReadWrite | Access::Create
            ) {
                // Revoked (or moved out of scope) since it subscribed: it hears nothing more.
                self.peers.remove(&link.conn);
                continue;
            }
            let doc = &self.doc;
            let peer = peer_state(&mut self.peers, store, id, &link);
            if peer.sync.has_nothing_to_say(&heads) {
                peer.sync.park(&heads);
                continue;
            }
            if let Some((now, hold)) = hold {
                // A push (nobody asked) is held while the peer owes an answer to the last one,
                // and until the spacing since its last message has passed.
                // Any message, an answer too, waits while the peer's socket is behind or all
                // sockets together are over the outbound budget: generated later, it holds
                // everything new at once, and what waits in memory for sockets stays within
                // the budget however many peers asked at once (200 phones asking for ten
                // households each of them edits: 66 MB of answers before, measured).
                let owed = if urgent.contains(&link.conn) {
                    None
                } else {
                    push_due(now, peer.awaiting_since, peer.last_sent, hold, spacing)
                };
                let due = owed.or_else(|| {
                    (link.queued_bytes() >= hub.config.push_backlog_bytes
                        || link.outbound_over_budget())
                    .then_some(now + BACKLOG_RETRY)
                });
                if let Some(due) = due {
                    push_at = Some(push_at.map_or(due, |p| p.min(due)));
                    continue;
                }
            }
            let msg = doc.generate_sync_message(peer.sync.live());
            tracing::trace!(doc = %id, conn = %link.conn, sent = msg.is_some(), "answering");
            if let Some(msg) = msg {
                // The peer answers unless the message only confirms what it already knows
                // (its own heads, nothing to send, nothing needed): Automerge generates no
                // reply then.
                let answers = !msg.changes.is_empty()
                    || !msg.need.is_empty()
                    || peer.sync.live().their_heads.as_ref() != Some(&msg.heads);
                peer.awaiting_since = match (answers, hold) {
                    (true, Some((now, _))) => Some(now),
                    _ => None,
                };
                peer.last_sent = hold.map(|(now, _)| now);
                peer.link.send(Outbound::Message(Message::Sync(DocMessage {
                    sender_id: server.clone(),
                    target_id: peer.link.peer_id.clone(),
                    document_id: id,
                    data: encoded(msg),
                })));
            }
            peer.sync.park(&heads);
            persist_sync_state(store, id, peer, &heads);
        }
        push_at
    }

    /// The document's heads, in the allocation peers parked at them share.
    fn current_heads(&mut self) -> Heads {
        let heads = self.doc.get_heads();
        if self.heads[..] != heads[..] {
            self.heads = heads.into();
        }
        self.heads.clone()
    }

    fn compact(&mut self, store: &dyn DocumentStore) -> Result<(), StorageError> {
        let snapshot = self.doc.save();
        let name = crate::storage::snapshot_name(&self.doc.get_heads());
        let key = store.compact(self.id, name, &snapshot, &self.chunks)?;
        tracing::debug!(doc = %self.id, chunks = self.chunks.len(), bytes = snapshot.len(), "compacted");
        self.chunks = vec![key];
        self.incrementals = 0;
        self.stored_bytes = snapshot.len();
        Ok(())
    }
}

/// `msg` encoded, in a buffer of its own size: Automerge grows it by doubling, and the
/// message waits in memory for its socket (counted by its length against the outbound
/// budget; its spare capacity was up to as much again, uncounted).
fn encoded(msg: sync::Message) -> Vec<u8> {
    let mut data = msg.encode();
    data.shrink_to_fit();
    data
}

/// When a push to a peer may go, if not `now`: once the peer has answered the last message
/// that called for an answer (sent at `awaiting_since`) or `hold` has passed since, and
/// `spacing` has passed since the last message it was sent (`last_sent`).
fn push_due(
    now: Instant,
    awaiting_since: Option<Instant>,
    last_sent: Option<Instant>,
    hold: std::time::Duration,
    spacing: std::time::Duration,
) -> Option<Instant> {
    let answer_due = awaiting_since.map(|since| since + hold);
    let spaced_due = last_sent.map(|sent| sent + spacing);
    answer_due.max(spaced_due).filter(|due| now < *due)
}

/// Completes at `at`; never if `None`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The batch that starts with `first`: then what was deferred before, then what is queued,
/// up to [`MAX_BATCH`] commands with at most one `request`/`sync` per connection. A
/// connection's second message, and everything of that connection after it, waits in
/// `deferred` (in order) for a later batch. The sync protocol needs this: a peer's message
/// is answered before its next one is received. Received in one batch, a peer's change and
/// then its next message naming the heads that change made ("I have what you have") would
/// leave Automerge's state believing the peer already knows the server holds the change, and
/// the answer that acknowledges it would never be sent. Other connections' messages are not
/// held up by it: a document many devices sync at once still takes many of them per batch.
fn next_batch(first: Cmd, deferred: &mut VecDeque<Cmd>, rx: &mut ActorRx) -> Vec<Cmd> {
    let mut in_batch: HashSet<ConnId> = HashSet::new();
    let mut waiting: HashSet<ConnId> = HashSet::new();
    let mut batch = Vec::new();
    let mut later = VecDeque::new();
    let mut take = |cmd: Cmd, batch: &mut Vec<Cmd>, later: &mut VecDeque<Cmd>| {
        let conn = match &cmd {
            Cmd::Sync { link, .. } => Some(link.conn),
            Cmd::Leave { conn } => Some(*conn),
            Cmd::Local { .. } | Cmd::Read { .. } | Cmd::Refresh => None,
        };
        let wait = match (conn, &cmd) {
            (Some(c), _) if waiting.contains(&c) => true,
            (Some(c), Cmd::Sync { .. }) if !in_batch.insert(c) => {
                waiting.insert(c);
                true
            }
            _ => false,
        };
        if wait {
            later.push_back(cmd);
        } else {
            batch.push(cmd);
        }
    };
    take(first, &mut batch, &mut later);
    while batch.len() < MAX_BATCH {
        let Some(cmd) = deferred.pop_front() else {
            break;
        };
        take(cmd, &mut batch, &mut later);
    }
    while batch.len() < MAX_BATCH && later.len() + deferred.len() < MAX_DEFERRED {
        let Ok(cmd) = rx.try_recv() else { break };
        take(*cmd, &mut batch, &mut later);
    }
    // What waited before and was not looked at stays behind what was looked at.
    later.append(deferred);
    *deferred = later;
    batch
}

/// The crash-test failpoint: makes the chunk and its provenance durable, says so, and stops
/// this thread for good before the projection is written, so a test can kill the process in
/// that window.
fn stall_before_projection(store: &dyn DocumentStore, doc: DocumentId) {
    let flushed = store.flush();
    tracing::error!(doc = %doc, flushed = flushed.is_ok(), "failpoint stall-before-projection reached; the process waits to be killed");
    loop {
        std::thread::park();
    }
}

/// The sync state for `link`, created on first use from the persisted one (non-ephemeral
/// peers) or fresh.
fn peer_state<'a>(
    peers: &'a mut HashMap<ConnId, PeerState>,
    store: &dyn DocumentStore,
    doc: DocumentId,
    link: &PeerLink,
) -> &'a mut PeerState {
    peers.entry(link.conn).or_insert_with(|| {
        let state = link
            .storage_id
            .as_ref()
            .and_then(|s| store.sync_state(doc, s).ok().flatten())
            .and_then(|bytes| sync::State::decode(&bytes).ok())
            .unwrap_or_default();
        PeerState {
            link: link.clone(),
            persisted: state.shared_heads.as_slice().into(),
            sync: PeerSync::new(state),
            awaiting_since: None,
            last_sent: None,
        }
    })
}

/// Saves a non-ephemeral peer's shared heads if they moved. Failure costs bandwidth on the
/// next connection, not data, so it is logged and not fatal. `heads` are the document's.
fn persist_sync_state(
    store: &dyn DocumentStore,
    doc: DocumentId,
    peer: &mut PeerState,
    heads: &Heads,
) {
    let Some(storage_id) = &peer.link.storage_id else {
        return;
    };
    let shared = peer.sync.shared_heads();
    if *shared == *peer.persisted {
        return;
    }
    match store.put_sync_state(doc, storage_id, &peer.sync.encode()) {
        Ok(()) => {
            let shared = peer.sync.shared_heads();
            peer.persisted = if *shared == **heads {
                heads.clone()
            } else {
                shared.into()
            };
        }
        Err(e) => tracing::warn!(doc = %doc, error = %e, "could not persist a sync state"),
    }
}

#[cfg(test)]
mod tests {
    use super::push_due;
    use std::time::Duration;
    use tokio::time::Instant;

    const HOLD: Duration = Duration::from_secs(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A household 200 phones share (5 ms per phone: pushes a second apart): a phone that
    /// answered at once still waits out the second since its last push; one that never
    /// answers gets the next push when the hold passes.
    #[test]
    fn pushes_wait_for_the_answer_and_the_spacing_whichever_is_later() {
        let t0 = Instant::now();
        let spacing = ms(5) * 200;
        // Pushed at t0, answered at once (no longer awaited): spaced until t0 + 1 s.
        assert_eq!(
            push_due(t0 + ms(20), None, Some(t0), HOLD, spacing),
            Some(t0 + spacing)
        );
        assert_eq!(push_due(t0 + spacing, None, Some(t0), HOLD, spacing), None);
        // Pushed at t0 and not answered, with a longer hold: the hold decides.
        assert_eq!(
            push_due(t0 + ms(20), Some(t0), Some(t0), ms(3000), spacing),
            Some(t0 + ms(3000))
        );
        // Two phones share a household: 10 ms apart, unless the answer is still owed.
        let spacing = ms(5) * 2;
        assert_eq!(push_due(t0 + ms(11), None, Some(t0), HOLD, spacing), None);
        assert_eq!(
            push_due(t0 + ms(11), Some(t0), Some(t0), HOLD, spacing),
            Some(t0 + HOLD)
        );
        // Never sent anything: nothing to wait for; no spacing: only the answer counts.
        assert_eq!(push_due(t0, None, None, HOLD, spacing), None);
        assert_eq!(
            push_due(t0 + ms(1), None, Some(t0), HOLD, Duration::ZERO),
            None
        );
    }
}
