//! The hub's handle on one connection: who it is, and a bounded outbox to reach it.
//! A full outbox means the client is not reading: it is disconnected, never buffered forever.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::Principal;
use crate::ids::{ConnId, PeerId, StorageId};
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

#[derive(Clone, Debug)]
pub struct PeerLink {
    pub conn: ConnId,
    pub peer_id: PeerId,
    /// Set only for non-ephemeral peers: the key under which their sync state is persisted.
    pub storage_id: Option<StorageId>,
    pub principal: Principal,
    outbox: mpsc::Sender<Outbound>,
    kill: Arc<KillSwitch>,
}

impl PeerLink {
    pub fn new(
        conn: ConnId,
        peer_id: PeerId,
        storage_id: Option<StorageId>,
        principal: Principal,
        outbox: mpsc::Sender<Outbound>,
        kill: Arc<KillSwitch>,
    ) -> Self {
        Self {
            conn,
            peer_id,
            storage_id,
            principal,
            outbox,
            kill,
        }
    }

    /// Queues a message without waiting; a full queue disconnects the peer.
    pub fn send(&self, out: Outbound) {
        match self.outbox.try_send(out) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(conn = %self.conn, "outbound queue full; disconnecting slow peer");
                self.kill.kill(
                    CloseCode::PolicyViolation,
                    "too slow: the outbound queue is full; reconnect to resume syncing",
                );
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
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
            tx,
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
}
