//! One connection's protocol state machine: `handle_*(input, now) -> Vec<Effect>`.
//!
//! It owns the handshake (join/peer and version selection), checks that every later message
//! comes from the joined peer and is addressed to the server, turns document messages into
//! [`Effect::Sync`]/[`Effect::Ephemeral`] for the hub, and decides when to ping and when a
//! silent peer is dropped. It never performs I/O, never reads a clock (time is a parameter)
//! and never touches Automerge: the transport executes the effects.

use std::time::Duration;

use super::codec::{self, CodecError};
use super::message::*;
use crate::ids::{DocumentId, PeerId, StorageId, Timestamp};

/// WebSocket close codes fieldsync uses (RFC 6455 §7.4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseCode {
    /// The peer said `leave`, or the exchange ended normally.
    Normal = 1000,
    /// The server is shutting down, or the peer was silent too long.
    GoingAway = 1001,
    /// A malformed frame or a message that breaks the protocol.
    ProtocolError = 1002,
    /// A text frame: the protocol is binary CBOR only.
    UnsupportedData = 1003,
    /// The peer is too slow to read what it asked for, or is not allowed.
    PolicyViolation = 1008,
    /// A frame larger than `max_message_bytes`.
    MessageTooBig = 1009,
    /// The server failed (for example, storage could not be written).
    InternalError = 1011,
}

impl CloseCode {
    pub fn as_u16(self) -> u16 {
        self as u16
    }
}

/// Limits and identity the session needs; the server builds it from its config.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub server_peer_id: PeerId,
    pub server_storage_id: StorageId,
    pub max_message_bytes: usize,
    /// How often the transport should ping.
    pub ping_interval: Duration,
    /// A peer silent for this long (no frame, no pong) is dropped.
    pub idle_timeout: Duration,
    /// A peer that has not sent `join` this long after connecting is dropped (pongs do not
    /// count: a socket that answers pings but never joins holds resources for nothing).
    pub join_timeout: Duration,
}

/// The largest frame accepted before `join`: a join is a few hundred bytes, so a large frame
/// from a peer that has not joined is refused before it is decoded.
pub const MAX_JOIN_FRAME_BYTES: usize = 64 * 1024;

/// Whether a document message asked for a document (`request`) or offered one (`sync`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncKind {
    Request,
    Sync,
}

/// What the transport must do next, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Encode and send this message.
    Send(Message),
    /// The handshake is complete: register the peer with the hub.
    Joined {
        peer_id: PeerId,
        metadata: PeerMetadata,
    },
    /// Hand an Automerge sync message to the hub.
    Sync {
        kind: SyncKind,
        document_id: DocumentId,
        data: Vec<u8>,
    },
    /// Relay to the document's other peers; never stored.
    Ephemeral(Ephemeral),
    /// Send a WebSocket ping.
    Ping,
    /// Send a close frame with this code and reason, then stop.
    Close { code: CloseCode, reason: String },
}

#[derive(Debug)]
enum Phase {
    AwaitingJoin,
    Open {
        peer_id: PeerId,
        metadata: PeerMetadata,
    },
    Closed,
}

#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    phase: Phase,
    last_heard: Timestamp,
    started: Timestamp,
}

impl Session {
    pub fn new(config: SessionConfig, now: Timestamp) -> Self {
        Self {
            config,
            phase: Phase::AwaitingJoin,
            last_heard: now,
            started: now,
        }
    }

    /// While the handshake is pending, when it times out (the transport calls [`Session::tick`]
    /// then).
    pub fn join_deadline(&self) -> Option<Timestamp> {
        matches!(self.phase, Phase::AwaitingJoin)
            .then(|| self.started.saturating_add(self.config.join_timeout))
    }

    /// The joined peer, once the handshake is done.
    pub fn peer(&self) -> Option<(&PeerId, &PeerMetadata)> {
        match &self.phase {
            Phase::Open { peer_id, metadata } => Some((peer_id, metadata)),
            _ => None,
        }
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// A binary frame arrived.
    pub fn handle_binary(&mut self, frame: &[u8], now: Timestamp) -> Vec<Effect> {
        if self.is_closed() {
            return Vec::new();
        }
        self.last_heard = now;
        if matches!(self.phase, Phase::AwaitingJoin) && frame.len() > MAX_JOIN_FRAME_BYTES {
            return self.fail(
                CloseCode::MessageTooBig,
                format!(
                    "a frame of {} bytes before `join`; the first message must be a join of at most {MAX_JOIN_FRAME_BYTES} bytes",
                    frame.len()
                ),
            );
        }
        match codec::decode(frame, self.config.max_message_bytes) {
            Ok(message) => self.handle_message(message),
            Err(CodecError::TooLarge { size, limit }) => self.fail(
                CloseCode::MessageTooBig,
                format!("message of {size} bytes exceeds the limit of {limit} bytes"),
            ),
            // Newer clients may send message types this server does not know yet; ignoring
            // them keeps the connection useful, as the reference implementation does.
            Err(CodecError::UnknownType(_)) => Vec::new(),
            Err(e) => self.fail(CloseCode::ProtocolError, format!("malformed message: {e}")),
        }
    }

    /// A text frame arrived: the protocol is binary only.
    pub fn handle_text(&mut self, now: Timestamp) -> Vec<Effect> {
        self.last_heard = now;
        self.fail(
            CloseCode::UnsupportedData,
            "text frames are not supported: send CBOR in binary frames".into(),
        )
    }

    /// The transport refused a frame larger than its limit before it could be read whole.
    pub fn handle_oversized(&mut self) -> Vec<Effect> {
        let limit = self.config.max_message_bytes;
        self.fail(
            CloseCode::MessageTooBig,
            format!("message exceeds the limit of {limit} bytes"),
        )
    }

    /// Any sign of life that is not a data frame (a pong, a ping).
    pub fn heard_from_peer(&mut self, now: Timestamp) {
        self.last_heard = now;
    }

    /// The transport did not read from the peer between `from` and `to` (the server was
    /// busy, or paused reading to pace the peer): that time is not the peer's silence.
    pub fn not_listening(&mut self, from: Timestamp, to: Timestamp) {
        self.last_heard = self.last_heard.saturating_add(to.since(from)).min(to);
    }

    /// Called by the transport every `ping_interval`.
    pub fn tick(&mut self, now: Timestamp) -> Vec<Effect> {
        if self.is_closed() {
            return Vec::new();
        }
        if let Some(deadline) = self.join_deadline() {
            if now >= deadline {
                self.phase = Phase::Closed;
                return vec![Effect::Close {
                    code: CloseCode::PolicyViolation,
                    reason: format!(
                        "no join message within {} s of connecting",
                        self.config.join_timeout.as_secs()
                    ),
                }];
            }
        }
        if now.since(self.last_heard) >= self.config.idle_timeout {
            let reason = match self.phase {
                Phase::AwaitingJoin => "no join message received in time",
                _ => "peer silent for too long",
            };
            self.phase = Phase::Closed;
            return vec![Effect::Close {
                code: CloseCode::GoingAway,
                reason: reason.into(),
            }];
        }
        vec![Effect::Ping]
    }

    /// The server is stopping.
    pub fn shutdown(&mut self) -> Vec<Effect> {
        if self.is_closed() {
            return Vec::new();
        }
        self.phase = Phase::Closed;
        vec![Effect::Close {
            code: CloseCode::GoingAway,
            reason: "server shutting down".into(),
        }]
    }

    /// Ends the session with an `error` message and a close frame. Used for protocol
    /// violations found here and for failures the hub reports (garbage Automerge data).
    pub fn fail(&mut self, code: CloseCode, message: String) -> Vec<Effect> {
        if self.is_closed() {
            return Vec::new();
        }
        let target_id = self.peer().map(|(p, _)| p.clone());
        self.phase = Phase::Closed;
        // A close reason is limited to 123 bytes by RFC 6455; the error message carries the
        // full text.
        let reason = truncate_utf8(&message, 120).to_string();
        vec![
            Effect::Send(Message::Error(ErrorMessage {
                sender_id: self.config.server_peer_id.clone(),
                target_id,
                message,
            })),
            Effect::Close { code, reason },
        ]
    }

    fn handle_message(&mut self, message: Message) -> Vec<Effect> {
        match (&self.phase, message) {
            (Phase::AwaitingJoin, Message::Join(join)) => self.handle_join(join),
            (Phase::AwaitingJoin, other) => self.fail(
                CloseCode::ProtocolError,
                format!("expected `join` first, got `{}`", other.type_name()),
            ),
            (Phase::Open { peer_id, .. }, Message::Join(join)) => {
                // The JS client may repeat its join; the same peer gets the same answer.
                if &join.sender_id == peer_id {
                    vec![Effect::Send(self.peer_message(&join.sender_id))]
                } else {
                    self.fail(
                        CloseCode::ProtocolError,
                        "a second `join` with a different senderId".into(),
                    )
                }
            }
            (Phase::Open { .. }, message) => self.handle_open(message),
            (Phase::Closed, _) => Vec::new(),
        }
    }

    fn handle_join(&mut self, join: Join) -> Vec<Effect> {
        if !join
            .supported_protocol_versions
            .iter()
            .any(|v| v == PROTOCOL_V1)
        {
            return self.fail(
                CloseCode::ProtocolError,
                format!(
                    "unsupported protocol versions {:?}: this server speaks version \"1\"",
                    join.supported_protocol_versions
                ),
            );
        }
        let reply = self.peer_message(&join.sender_id);
        self.phase = Phase::Open {
            peer_id: join.sender_id.clone(),
            metadata: join.peer_metadata.clone(),
        };
        vec![
            Effect::Joined {
                peer_id: join.sender_id,
                metadata: join.peer_metadata,
            },
            Effect::Send(reply),
        ]
    }

    fn peer_message(&self, target: &PeerId) -> Message {
        Message::Peer(Peer {
            sender_id: self.config.server_peer_id.clone(),
            target_id: target.clone(),
            peer_metadata: PeerMetadata {
                storage_id: Some(self.config.server_storage_id.clone()),
                is_ephemeral: false,
            },
            selected_protocol_version: PROTOCOL_V1.into(),
        })
    }

    fn handle_open(&mut self, message: Message) -> Vec<Effect> {
        let Some((peer_id, _)) = self.peer() else {
            return Vec::new();
        };
        if message.sender_id() != peer_id {
            return self.fail(
                CloseCode::ProtocolError,
                format!(
                    "senderId `{}` does not match the joined peer",
                    message.sender_id()
                ),
            );
        }
        let server = &self.config.server_peer_id;
        let misaddressed = match &message {
            Message::Request(m) | Message::Sync(m) | Message::DocUnavailable(m) => {
                &m.target_id != server
            }
            Message::Ephemeral(m) => &m.target_id != server,
            _ => false,
        };
        if misaddressed {
            return self.fail(
                CloseCode::ProtocolError,
                "targetId is not this server's peer id".into(),
            );
        }
        match message {
            Message::Request(m) => vec![Effect::Sync {
                kind: SyncKind::Request,
                document_id: m.document_id,
                data: m.data,
            }],
            Message::Sync(m) => vec![Effect::Sync {
                kind: SyncKind::Sync,
                document_id: m.document_id,
                data: m.data,
            }],
            Message::Ephemeral(e) => vec![Effect::Ephemeral(e)],
            Message::Leave { .. } => {
                self.phase = Phase::Closed;
                vec![Effect::Close {
                    code: CloseCode::Normal,
                    reason: "peer left".into(),
                }]
            }
            Message::Peer(_) => self.fail(
                CloseCode::ProtocolError,
                "`peer` is sent by the server, not by clients".into(),
            ),
            // The peer does not have a document we never asked it for, reports its own error,
            // or gossips remote heads: nothing for the server to do.
            Message::DocUnavailable(_)
            | Message::Error(_)
            | Message::RemoteSubscriptionChange(_)
            | Message::RemoteHeadsChanged(_) => Vec::new(),
            Message::Join(_) => Vec::new(),
        }
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Timestamp = Timestamp::from_millis(1_000_000);

    fn config() -> SessionConfig {
        SessionConfig {
            server_peer_id: PeerId::new("server").unwrap(),
            server_storage_id: StorageId::new("store-1").unwrap(),
            max_message_bytes: 4096,
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(45),
            join_timeout: Duration::from_secs(10),
        }
    }

    fn join(versions: &[&str]) -> Vec<u8> {
        codec::encode(&Message::Join(Join {
            sender_id: PeerId::new("phone").unwrap(),
            peer_metadata: PeerMetadata {
                storage_id: Some(StorageId::new("phone-store").unwrap()),
                is_ephemeral: false,
            },
            supported_protocol_versions: versions.iter().map(|v| v.to_string()).collect(),
        }))
    }

    fn joined() -> Session {
        let mut s = Session::new(config(), T0);
        s.handle_binary(&join(&["1"]), T0);
        s
    }

    fn sync_frame(sender: &str, target: &str) -> (DocumentId, Vec<u8>) {
        let doc = DocumentId::random();
        let frame = codec::encode(&Message::Sync(DocMessage {
            sender_id: PeerId::new(sender).unwrap(),
            target_id: PeerId::new(target).unwrap(),
            document_id: doc,
            data: vec![0x42],
        }));
        (doc, frame)
    }

    fn close_code(effects: &[Effect]) -> Option<CloseCode> {
        effects.iter().find_map(|e| match e {
            Effect::Close { code, .. } => Some(*code),
            _ => None,
        })
    }

    #[test]
    fn join_gets_peer_with_the_server_storage_id() {
        let mut s = Session::new(config(), T0);
        let effects = s.handle_binary(&join(&["1"]), T0);
        assert!(
            matches!(&effects[0], Effect::Joined { peer_id, .. } if peer_id.as_str() == "phone")
        );
        let Effect::Send(Message::Peer(p)) = &effects[1] else {
            panic!("{effects:?}")
        };
        assert_eq!(p.target_id.as_str(), "phone");
        assert_eq!(p.selected_protocol_version, "1");
        assert_eq!(
            p.peer_metadata.storage_id.as_ref().unwrap().as_str(),
            "store-1"
        );
        assert!(!p.peer_metadata.is_ephemeral);
    }

    #[test]
    fn unsupported_version_gets_error_and_close() {
        let mut s = Session::new(config(), T0);
        let effects = s.handle_binary(&join(&["2"]), T0);
        assert!(
            matches!(&effects[0], Effect::Send(Message::Error(e)) if e.message.contains("\"1\""))
        );
        assert_eq!(close_code(&effects), Some(CloseCode::ProtocolError));
        assert!(s.is_closed());
    }

    #[test]
    fn messages_before_join_are_refused() {
        let mut s = Session::new(config(), T0);
        let (_, frame) = sync_frame("phone", "server");
        let effects = s.handle_binary(&frame, T0);
        assert_eq!(close_code(&effects), Some(CloseCode::ProtocolError));
    }

    #[test]
    fn sync_for_the_server_becomes_a_hub_effect() {
        let mut s = joined();
        let (doc, frame) = sync_frame("phone", "server");
        assert_eq!(
            s.handle_binary(&frame, T0),
            vec![Effect::Sync {
                kind: SyncKind::Sync,
                document_id: doc,
                data: vec![0x42]
            }]
        );
    }

    #[test]
    fn spoofed_sender_or_wrong_target_closes() {
        let mut s = joined();
        let (_, frame) = sync_frame("someone-else", "server");
        assert_eq!(
            close_code(&s.handle_binary(&frame, T0)),
            Some(CloseCode::ProtocolError)
        );
        let mut s = joined();
        let (_, frame) = sync_frame("phone", "another-peer");
        assert_eq!(
            close_code(&s.handle_binary(&frame, T0)),
            Some(CloseCode::ProtocolError)
        );
    }

    #[test]
    fn garbage_text_and_oversized_frames_close_with_their_codes() {
        let mut s = joined();
        assert_eq!(
            close_code(&s.handle_binary(&[0xff, 0xfe], T0)),
            Some(CloseCode::ProtocolError)
        );
        let mut s = joined();
        assert_eq!(
            close_code(&s.handle_text(T0)),
            Some(CloseCode::UnsupportedData)
        );
        let mut s = joined();
        assert_eq!(
            close_code(&s.handle_binary(&vec![0u8; 5000], T0)),
            Some(CloseCode::MessageTooBig)
        );
        // Once closed, nothing more happens.
        assert!(s.handle_binary(&join(&["1"]), T0).is_empty());
    }

    #[test]
    fn silent_peers_are_pinged_then_dropped() {
        let mut s = joined();
        assert_eq!(
            s.tick(T0.saturating_add(Duration::from_secs(20))),
            vec![Effect::Ping]
        );
        s.heard_from_peer(T0.saturating_add(Duration::from_secs(30)));
        assert_eq!(
            s.tick(T0.saturating_add(Duration::from_secs(60))),
            vec![Effect::Ping]
        );
        let effects = s.tick(T0.saturating_add(Duration::from_secs(80)));
        assert_eq!(close_code(&effects), Some(CloseCode::GoingAway));
    }

    #[test]
    fn time_the_server_did_not_read_is_not_the_peers_silence() {
        // The idle timeout is 50 s. The server stops reading from 10 s to 70 s (busy, or
        // pacing the peer); the peer's pongs wait unread meanwhile.
        let mut s = joined();
        let at = |secs| T0.saturating_add(Duration::from_secs(secs));
        s.not_listening(at(10), at(70));
        assert_eq!(s.tick(at(70)), vec![Effect::Ping]);
        // Silence while the server does read still counts: 50 s of it after 70 s.
        assert_eq!(s.tick(at(100)), vec![Effect::Ping]);
        let effects = s.tick(at(120));
        assert_eq!(close_code(&effects), Some(CloseCode::GoingAway));
    }

    #[test]
    fn a_peer_that_never_joins_is_dropped() {
        let mut s = Session::new(config(), T0);
        let effects = s.tick(T0.saturating_add(Duration::from_secs(46)));
        assert!(matches!(&effects[0], Effect::Close { reason, .. } if reason.contains("join")));
    }

    #[test]
    fn answering_pings_does_not_stretch_the_handshake() {
        let mut s = Session::new(config(), T0);
        assert_eq!(
            s.join_deadline(),
            Some(T0.saturating_add(Duration::from_secs(10)))
        );
        s.heard_from_peer(T0.saturating_add(Duration::from_secs(9))); // a pong
        let effects = s.tick(T0.saturating_add(Duration::from_secs(10)));
        assert_eq!(close_code(&effects), Some(CloseCode::PolicyViolation));
        assert_eq!(joined().join_deadline(), None);
    }

    #[test]
    fn a_large_frame_before_join_is_refused_undecoded() {
        let mut s = Session::new(
            SessionConfig {
                max_message_bytes: 1 << 20,
                ..config()
            },
            T0,
        );
        let effects = s.handle_binary(&vec![0u8; MAX_JOIN_FRAME_BYTES + 1], T0);
        assert_eq!(close_code(&effects), Some(CloseCode::MessageTooBig));
    }

    #[test]
    fn leave_closes_normally_and_unknown_types_are_ignored() {
        let mut s = joined();
        let unknown = {
            let v = ciborium::value::Value::Map(vec![
                ("type".into(), "future-thing".into()),
                ("senderId".into(), "phone".into()),
            ]);
            let mut out = Vec::new();
            ciborium::ser::into_writer(&v, &mut out).unwrap();
            out
        };
        assert!(s.handle_binary(&unknown, T0).is_empty());
        let leave = codec::encode(&Message::Leave {
            sender_id: PeerId::new("phone").unwrap(),
        });
        assert_eq!(
            close_code(&s.handle_binary(&leave, T0)),
            Some(CloseCode::Normal)
        );
    }
}
