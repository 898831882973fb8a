//! The hub's handle on one connection: who it is, and a bounded outbox to reach it.
//! The outbox is bounded in messages and in bytes; a full outbox means the client is not
//! reading: it is disconnected, never buffered forever. (A client that keeps reading is never
//! cut off: the connection stops reading its requests while the outbox is half full, so its
//! own burst of requests waits in TCP instead of overflowing the outbox.)

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

/// The sending side of a connection's outbox, with its byte count.
#[derive(Clone, Debug)]
pub struct Outbox {
    tx: mpsc::Sender<Outbound>,
    queued_bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

impl Outbox {
    /// `max_bytes`: what may wait for the socket at once (beyond it the peer is too slow).
    pub fn new(tx: mpsc::Sender<Outbound>, max_bytes: usize) -> Self {
        Self {
            tx,
            queued_bytes: Arc::default(),
            max_bytes,
        }
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    /// Messages that can still be queued.
    pub fn capacity(&self) -> usize {
        self.tx.capacity()
    }

    /// The connection wrote `out` (or dropped it): it no longer counts.
    pub fn written(&self, out: &Outbound) {
        self.queued_bytes.fetch_sub(weight(out), Ordering::Relaxed);
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
        let queued = self.outbox.queued_bytes.fetch_add(w, Ordering::Relaxed);
        if queued > 0 && queued + w > self.outbox.max_bytes {
            self.outbox.queued_bytes.fetch_sub(w, Ordering::Relaxed);
            tracing::warn!(conn = %self.conn, queued_bytes = queued, "outbound bytes over the limit; disconnecting slow peer");
            self.kill.kill(
                CloseCode::PolicyViolation,
                "too slow: too many bytes waiting to be sent; reconnect to resume syncing",
            );
            return;
        }
        match self.outbox.tx.try_send(out) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.outbox.queued_bytes.fetch_sub(w, Ordering::Relaxed);
                tracing::warn!(conn = %self.conn, "outbound queue full; disconnecting slow peer");
                self.kill.kill(
                    CloseCode::PolicyViolation,
                    "too slow: the outbound queue is full; reconnect to resume syncing",
                );
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.outbox.queued_bytes.fetch_sub(w, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_outbox_disconnects_the_peer_instead_of_buffering() {
        let (tx, mut rx) = mpsc::channel(2);
        let kill = Arc::new(KillSwitch::default());
        let link = PeerLink::new(
            ConnId::next(),
            PeerId::new("slow").unwrap(),
            None,
            Principal::local("test"),
            Outbox::new(tx, 1 << 20),
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
        let (tx, _rx) = mpsc::channel(100);
        let kill = Arc::new(KillSwitch::default());
        let outbox = Outbox::new(tx, 10_000);
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
        let (tx, _rx) = mpsc::channel(100);
        let kill = Arc::new(KillSwitch::default());
        let link = PeerLink::new(
            ConnId::next(),
            PeerId::new("reader").unwrap(),
            None,
            Principal::local("test"),
            Outbox::new(tx, 100),
            kill.clone(),
        );
        link.send(big());
        assert!(!kill.token.is_cancelled());
    }
}
