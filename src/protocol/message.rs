//! The messages of automerge-repo protocol v1 as typed Rust values.
//!
//! Field names follow the JS implementation (`senderId`, `targetId`, `documentId`, ...); the
//! mapping to CBOR lives in `codec`. Peer-chosen strings stay strings here (`PeerId` checks
//! length); document ids are parsed so a bad id is a protocol error, not a storage key.

use crate::ids::{DocumentId, PeerId, StorageId};

/// The only protocol version fieldsync speaks.
pub const PROTOCOL_V1: &str = "1";

/// What a peer says about its storage in `join` and `peer`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PeerMetadata {
    /// Present when the peer has persistent storage; absent (or CBOR `undefined`) otherwise.
    pub storage_id: Option<StorageId>,
    /// An ephemeral peer keeps nothing between connections; its sync state is not persisted.
    pub is_ephemeral: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Join {
    pub sender_id: PeerId,
    pub peer_metadata: PeerMetadata,
    pub supported_protocol_versions: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Peer {
    pub sender_id: PeerId,
    pub target_id: PeerId,
    pub peer_metadata: PeerMetadata,
    pub selected_protocol_version: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ErrorMessage {
    pub sender_id: PeerId,
    /// Absent when the error is sent before the peer said who it is.
    pub target_id: Option<PeerId>,
    pub message: String,
}

/// `request`, `sync` and (without `data`) `doc-unavailable` share this shape.
#[derive(Clone, Debug, PartialEq)]
pub struct DocMessage {
    pub sender_id: PeerId,
    pub target_id: PeerId,
    pub document_id: DocumentId,
    /// One encoded Automerge sync message; empty for `doc-unavailable`.
    pub data: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Ephemeral {
    pub sender_id: PeerId,
    pub target_id: PeerId,
    pub document_id: DocumentId,
    /// Sender-chosen session id; with `count` it lets receivers drop duplicates.
    pub session_id: String,
    pub count: u64,
    pub data: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RemoteSubscriptionChange {
    pub sender_id: PeerId,
    pub target_id: PeerId,
    pub add: Vec<StorageId>,
    pub remove: Vec<StorageId>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RemoteHeadsChanged {
    pub sender_id: PeerId,
    pub target_id: PeerId,
    pub document_id: DocumentId,
    /// storageId -> (heads as base58 strings, timestamp in ms)
    pub new_heads: Vec<(StorageId, Vec<String>, u64)>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    Join(Join),
    Peer(Peer),
    Leave { sender_id: PeerId },
    Error(ErrorMessage),
    Request(DocMessage),
    Sync(DocMessage),
    DocUnavailable(DocMessage),
    Ephemeral(Ephemeral),
    RemoteSubscriptionChange(RemoteSubscriptionChange),
    RemoteHeadsChanged(RemoteHeadsChanged),
}

impl Message {
    /// The `type` field on the wire.
    pub fn type_name(&self) -> &'static str {
        match self {
            Message::Join(_) => "join",
            Message::Peer(_) => "peer",
            Message::Leave { .. } => "leave",
            Message::Error(_) => "error",
            Message::Request(_) => "request",
            Message::Sync(_) => "sync",
            Message::DocUnavailable(_) => "doc-unavailable",
            Message::Ephemeral(_) => "ephemeral",
            Message::RemoteSubscriptionChange(_) => "remote-subscription-change",
            Message::RemoteHeadsChanged(_) => "remote-heads-changed",
        }
    }

    pub fn sender_id(&self) -> &PeerId {
        match self {
            Message::Join(m) => &m.sender_id,
            Message::Peer(m) => &m.sender_id,
            Message::Leave { sender_id } => sender_id,
            Message::Error(m) => &m.sender_id,
            Message::Request(m) | Message::Sync(m) | Message::DocUnavailable(m) => &m.sender_id,
            Message::Ephemeral(m) => &m.sender_id,
            Message::RemoteSubscriptionChange(m) => &m.sender_id,
            Message::RemoteHeadsChanged(m) => &m.sender_id,
        }
    }
}
