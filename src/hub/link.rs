//! The hub's handle on one connection: who it is, and a bounded outbox to reach it.
//! The outbox is bounded in messages and in bytes; a full outbox means the client is not
//! reading: it is disconnected, never buffered forever. (A client that keeps reading is never
//! cut off: the connection stops reading its requests while the outbox is half full, so its
//! own burst of requests waits in TCP instead of overflowing the outbox.) Every outbox also
//! counts against one [`OutboundBudget`] shared by all connections, so hundreds of phones
//! downloading at once cannot fill memory with messages their sockets have not taken yet.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::Principal;
use crate::ids::{ConnId, DocumentId, PeerId, StorageId};
use crate::protocol::{CloseCode, Message};

/// What the hub asks a connection to send.
#[derive(Debug)]
pub enum Outbound {
    Message(Message),
    /// Send an `error` with this text and close with this code.
    Fail {
        code: CloseCode,
        message: String,
    },
}

/// Ends a connection from outside its task (slow reader; later: a revoked device).
#[derive(Debug, Default)]
pub struct KillSwitch {
    token: CancellationToken,
    reason: Mutex<Option<(CloseCode, String)>>,
}

impl KillSwitch {
    pub fn kill(&self, code: CloseCode, reason: impl Into<String>) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some((code, reason.into()));
        }
        drop(r);
        self.token.cancel();
    }

    pub async fn killed(&self) -> (CloseCode, String) {
        self.token.cancelled().await;
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or((CloseCode::PolicyViolation, "connection ended".into()))
    }
}

/// Bytes queued for all connections' sockets together (a message counts until its socket
/// has taken it), with a soft limit. Nothing is refused over it: pushes and answers wait
/// (the document's actor generates them once there is room) and connections stop reading
/// new messages until the sockets have taken enough to fall below it.
#[derive(Debug)]
pub struct OutboundBudget {
    queued: AtomicUsize,
    limit: usize,
    room: tokio::sync::Notify,
}

impl OutboundBudget {
    pub fn new(limit_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            queued: AtomicUsize::new(0),
            limit: limit_bytes,
            room: tokio::sync::Notify::new(),
        })
    }

    /// Bytes queued for every socket together.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    pub fn is_over(&self) -> bool {
        self.queued_bytes() >= self.limit
    }

    /// Completes once the total is below the limit (at once if it is).
    pub async fn room(&self) {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if !self.is_over() {
                return;
            }
            room.await;
        }
    }

    fn charge(&self, bytes: usize) {
        self.queued.fetch_add(bytes, Ordering::Relaxed);
    }

    fn refund(&self, bytes: usize) {
        let before = self.queued.fetch_sub(bytes, Ordering::Relaxed);
        if before >= self.limit && before - bytes < self.limit {
            self.room.notify_waiters();
        }
    }
}

/// The sending side of a connection's outbox, with its byte count.
#[derive(Clone, Debug)]
pub struct Outbox {
    tx: mpsc::Sender<Box<Outbound>>,
    queued_bytes: Arc<AtomicUsize>,
    max_bytes: usize,
    budget: Arc<OutboundBudget>,
}

impl Outbox {
    /// A connection's outbox of at most `len` messages and `max_bytes` waiting for its socket
    /// at once (beyond it the peer is too slow); `budget`: the total shared with every other
    /// connection. Messages travel boxed: a channel allocates its slots 32 at a time and an
    /// `Outbound` is 120 bytes inline, so a connection kept 3.8 KB per block of slots
    /// whether anything waited or not; boxed, 256 bytes.
    pub fn new(len: usize, max_bytes: usize, budget: Arc<OutboundBudget>) -> (Self, OutboxRx) {
        let (tx, rx) = mpsc::channel(len);
        let outbox = Self {
            tx,
            queued_bytes: Arc::default(),
            max_bytes,
            budget,
        };
        (outbox, OutboxRx(rx))
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    /// The budget this outbox shares with every other connection's.
    pub fn budget(&self) -> &OutboundBudget {
        &self.budget
    }

    /// Messages that can still be queued.
    pub fn capacity(&self) -> usize {
        self.tx.capacity()
    }

    /// The connection wrote `out` (or dropped it): it no longer counts.
    pub fn written(&self, out: &Outbound) {
        self.refund(weight(out));
    }

    /// The connection finished writing a message that weighed `bytes` ([`Outbound::weight`]):
    /// a message counts until its socket has taken it, not only while it is queued (200
    /// sockets each writing a household's whole history held 20–50 MB outside the budget).
    pub fn written_bytes(&self, bytes: usize) {
        self.refund(bytes);
    }

    /// Counts `bytes` as queued; returns what was queued before.
    fn charge(&self, bytes: usize) -> usize {
        self.budget.charge(bytes);
        self.queued_bytes.fetch_add(bytes, Ordering::Relaxed)
    }

    fn refund(&self, bytes: usize) {
        self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.budget.refund(bytes);
    }
}

impl Outbound {
    /// What this message counts against the outbound bounds while it waits for its socket.
    pub fn weight(&self) -> usize {
        weight(self)
    }
}

/// What a queued message counts against the byte bound (its payload, roughly).
fn weight(out: &Outbound) -> usize {
    match out {
        Outbound::Message(Message::Sync(m)) | Outbound::Message(Message::Request(m)) => {
            m.data.len() + 128
        }
        Outbound::Message(Message::Ephemeral(e)) => e.data.len() + 128,
        _ => 128,
    }
}

/// The receiving side of a connection's outbox: what its socket task writes.
#[derive(Debug)]
pub struct OutboxRx(mpsc::Receiver<Box<Outbound>>);

impl OutboxRx {
    /// The next message to write; `None` once every sender is gone and nothing waits.
    pub async fn recv(&mut self) -> Option<Outbound> {
        self.0.recv().await.map(|out| *out)
    }

    /// The next message if one waits.
    pub fn try_recv(&mut self) -> Result<Outbound, mpsc::error::TryRecvError> {
        self.0.try_recv().map(|out| *out)
    }

    /// Takes no more messages (those already queued can still be received).
    pub fn close(&mut self) {
        self.0.close();
    }
}

/// A connection's requests in flight, and a wake-up for its pump when one settles.
#[derive(Debug, Default)]
struct Requests {
    count: AtomicUsize,
    /// `notify_one` keeps a permit when nobody waits: a pump that paused reading because too
    /// many requests were in flight cannot miss the settlement that lets it resume (a
    /// request answered with nothing to send queues no outbound message to wake it).
    settled: tokio::sync::Notify,
}

/// One request of a connection in flight; dropping it settles it.
#[derive(Debug)]
pub struct InFlight(Arc<Requests>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::Relaxed);
        self.0.settled.notify_one();
    }
}

#[derive(Clone, Debug)]
pub struct PeerLink {
    pub conn: ConnId,
    pub peer_id: PeerId,
    /// Set only for non-ephemeral peers: the key under which their sync state is persisted.
    pub storage_id: Option<StorageId>,
    pub principal: Principal,
    outbox: Outbox,
    kill: Arc<KillSwitch>,
    /// Documents this connection is uploading that are not registered yet (shared by every
    /// clone of the link).
    ungranted: Arc<Mutex<HashSet<DocumentId>>>,
    /// Its `request`s and `sync`s handed to the hub and not yet answered: the connection stops
    /// reading while many are, so its own burst cannot overflow its outbox.
    in_flight: Arc<Requests>,
}

impl PeerLink {
    /// Records that this connection works on `doc`, not yet registered; `false` if it already
    /// has `limit` such documents.
    pub fn hold_ungranted(&self, doc: DocumentId, limit: usize) -> bool {
        let mut held = self.ungranted.lock().unwrap_or_else(|p| p.into_inner());
        if held.contains(&doc) {
            return true;
        }
        if held.len() >= limit {
            return false;
        }
        held.insert(doc);
        true
    }

    /// `doc` is registered now (or out of reach): it no longer counts.
    pub fn release_ungranted(&self, doc: DocumentId) {
        self.ungranted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&doc);
    }

    pub fn new(
        conn: ConnId,
        peer_id: PeerId,
        storage_id: Option<StorageId>,
        principal: Principal,
        outbox: Outbox,
        kill: Arc<KillSwitch>,
    ) -> Self {
        Self {
            conn,
            peer_id,
            storage_id,
            principal,
            outbox,
            kill,
            ungranted: Arc::default(),
            in_flight: Arc::default(),
        }
    }

    /// A `request` or `sync` of this connection goes to the hub: it counts as in flight until
    /// the returned guard is dropped (by the hub or the document's actor, once the answer,
    /// if any, is queued; on every other way out it is dropped too).
    /// Bytes queued for this peer's socket and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.outbox.queued_bytes()
    }

    /// Whether every connection's queued bytes together are over the shared budget.
    pub fn outbound_over_budget(&self) -> bool {
        self.outbox.budget().is_over()
    }

    pub fn request_started(&self) -> InFlight {
        self.in_flight.count.fetch_add(1, Ordering::Relaxed);
        InFlight(self.in_flight.clone())
    }

    pub fn requests_in_flight(&self) -> usize {
        self.in_flight.count.load(Ordering::Relaxed)
    }

    /// Resolves when one of this connection's requests has settled since the last call.
    pub async fn request_settled(&self) {
        self.in_flight.settled.notified().await
    }

    /// Queues a message without waiting; a full queue (in messages or bytes) disconnects the
    /// peer.
    pub fn send(&self, out: Outbound) {
        let w = weight(&out);
        let queued = self.outbox.charge(w);
        if queued > 0 && queued + w > self.outbox.max_bytes {
            self.outbox.refund(w);
            tracing::warn!(conn = %self.conn, queued_bytes = queued, "outbound bytes over the limit; disconnecting slow peer");
            self.kill.kill(
                CloseCode::PolicyViolation,
                "too slow: too many bytes waiting to be sent; reconnect to resume syncing",
            );
            return;
        }
        match self.outbox.tx.try_send(Box::new(out)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.outbox.refund(w);
                tracing::warn!(conn = %self.conn, "outbound queue full; disconnecting slow peer");
                self.kill.kill(
                    CloseCode::PolicyViolation,
                    "too slow: the outbound queue is full; reconnect to resume syncing",
                );
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.outbox.refund(w);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_outbox_disconnects_the_peer_instead_of_buffering() {
        let (outbox, mut rx) = Outbox::new(2, 1 << 20, OutboundBudget::new(usize::MAX));
        let kill = Arc::new(KillSwitch::default());
        let link = PeerLink::new(
            ConnId::next(),
            PeerId::new("slow").unwrap(),
            None,
            Principal::local("test"),
            outbox,
            kill.clone(),
        );
        let leave = || {
            Outbound::Message(Message::Leave {
                sender_id: PeerId::new("server").unwrap(),
            })
        };
        link.send(leave());
        link.send(leave());
        link.send(leave()); // the queue holds 2: this one trips the switch
        let (code, reason) = kill.killed().await;
        assert_eq!(code, CloseCode::PolicyViolation);
        assert!(reason.contains("too slow"), "{reason}");
        // What was queued is still there; nothing beyond the bound was buffered.
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn large_messages_are_bounded_in_bytes_not_only_in_number() {
        let (outbox, _rx) = Outbox::new(100, 10_000, OutboundBudget::new(usize::MAX));
        let kill = Arc::new(KillSwitch::default());
        let link = PeerLink::new(
            ConnId::next(),
            PeerId::new("slow").unwrap(),
            None,
            Principal::local("test"),
            outbox.clone(),
            kill.clone(),
        );
        let big = || {
            Outbound::Message(Message::Sync(crate::protocol::DocMessage {
                sender_id: PeerId::new("server").unwrap(),
                target_id: PeerId::new("slow").unwrap(),
                document_id: crate::ids::DocumentId::random(),
                data: vec![0; 4000],
            }))
        };
        link.send(big());
        link.send(big());
        assert!(outbox.queued_bytes() > 8000);
        link.send(big()); // 12 KB would be waiting: over the bound
        let (code, reason) = kill.killed().await;
        assert_eq!(code, CloseCode::PolicyViolation);
        assert!(reason.contains("bytes"), "{reason}");
        // A single message larger than the bound still goes out (nothing else waits).
        let (outbox, _rx) = Outbox::new(100, 100, OutboundBudget::new(usize::MAX));
        let kill = Arc::new(KillSwitch::default());
        let link = PeerLink::new(
            ConnId::next(),
            PeerId::new("reader").unwrap(),
            None,
            Principal::local("test"),
            outbox,
            kill.clone(),
        );
        link.send(big());
        assert!(!kill.token.is_cancelled());
    }

    /// Two connections share one budget: over it, waiters learn of room as soon as a
    /// socket takes enough, and a closed connection's unwritten messages give theirs back.
    #[tokio::test]
    async fn connections_share_one_outbound_budget() {
        let budget = OutboundBudget::new(1000);
        let (a, mut rx_a) = Outbox::new(8, 1 << 20, budget.clone());
        let (b, rx_b) = Outbox::new(8, 1 << 20, budget.clone());
        let message = |bytes: usize| {
            Outbound::Message(Message::Sync(crate::protocol::DocMessage {
                sender_id: PeerId::new("server").unwrap(),
                target_id: PeerId::new("phone").unwrap(),
                document_id: DocumentId::random(),
                data: vec![0; bytes],
            }))
        };
        let link = |outbox: Outbox| {
            PeerLink::new(
                ConnId::next(),
                PeerId::new("phone").unwrap(),
                None,
                Principal::local("amy"),
                outbox,
                Arc::new(KillSwitch::default()),
            )
        };
        let (la, lb) = (link(a.clone()), link(b.clone()));
        la.send(message(500));
        assert!(!la.outbound_over_budget());
        lb.send(message(500));
        assert!(la.outbound_over_budget() && lb.outbound_over_budget());
        assert_eq!(budget.queued_bytes(), 2 * (500 + 128));

        // A's socket writes its message: both have room again, and a waiter hears of it.
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move { budget.room().await }
        });
        let written = rx_a.recv().await.unwrap();
        a.written(&written);
        tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("the waiter learns of room")
            .unwrap();
        assert!(!lb.outbound_over_budget());

        // B's connection ends with its message unwritten; the socket task gives it back.
        drop(rx_b);
        lb.send(message(100)); // after the close: given back by `send` itself
        assert_eq!(
            budget.queued_bytes(),
            500 + 128,
            "only B's queued message counts"
        );
        b.written(&message(500));
        assert_eq!(budget.queued_bytes(), 0);
    }
}
