//! The automerge-repo WebSocket protocol, version 1, without I/O.
//!
//! Owns the message types, the CBOR codec (lenient on input, size-limited) and the
//! per-connection [`Session`] state machine: frames and time go in, [`Effect`]s come out.
//! Must not import tokio, warp or sled, and must not touch Automerge documents: the session
//! only says *which* document a sync message is for; the hub applies it.

pub mod codec;
pub mod message;
pub mod session;

pub use codec::{decode, encode, CodecError};
pub use message::{
    DocMessage, Ephemeral, ErrorMessage, Join, Message, Peer, PeerMetadata, RemoteHeadsChanged,
    RemoteSubscriptionChange, PROTOCOL_V1,
};
pub use session::{CloseCode, Effect, Session, SessionConfig, SyncKind};
