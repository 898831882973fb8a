//! # fieldsync
//!
//! An offline-first sync backend for community-policing door-to-door visits. Every household
//! is one Automerge document; officers' phones edit them offline and sync over the
//! automerge-repo WebSocket protocol when they are back in coverage; the server merges,
//! stores (sled) and relays every change.
//!
//! ## Architecture
//!
//! ```text
//!   phone / JS app ──ws──▶ server::ws ──frames──▶ protocol::Session (sans-IO)
//!                              │ effects                      │
//!                              ▼                              │
//!                           hub::Hub ── one actor per loaded document ── DocumentStore (sled | PostgreSQL)
//!                              ▲            apply → write → group-commit flush → answer
//!                              ├── accounts (auth::Authorizer: access per document)
//!                              └── observers, in order: changelog (provenance rows, the
//!                                  change feed, village catalogs) ─▶ projection (rows per
//!                                  household and visit, village counters)
//!
//!   staff tool ──http──▶ server::households ──▶ staff::StaffDesk ──▶ projection (lists,
//!                                               coverage, export) / hub (detail, history,
//!                                               edits on behalf of staff)
//! ```
//!
//! - [`protocol`]: messages, CBOR codec, per-connection state machine. No I/O.
//! - [`storage`]: the storage seam's document half (`DocumentStore`) and its two engines:
//!   the embedded sled `Store` (the only code that calls sled: content-addressed chunks,
//!   snapshots, sync states, group commit) and `PgStore` (PostgreSQL: the pool, every
//!   layer's migrations, one transaction per accepted batch). The other layers keep their
//!   rows behind traits of their own with a backend per engine; `server::backend` opens
//!   one engine whole.
//! - [`hub`]: loaded documents (byte-bounded LRU), their actors, subscriptions, relay; the
//!   operation limits, counted from change headers before anything is applied.
//! - [`server`]: the accept loop (connection cap, header deadline), warp routes, the
//!   WebSocket pump with its backpressure, shutdown.
//! - [`auth`]: stations, villages, users, devices, secrets and every access decision (pure).
//! - [`accounts`]: the live directory: admin commands, enrolment, sign-in, live
//!   connections; the hub's `Authorizer`.
//! - [`changelog`]: what happens to every accepted change: provenance rows, actor
//!   bindings, the change feed, village catalog entries (a hub `ChangeObserver`).
//! - [`records`]: the household schema on Automerge: vocabulary, validation, typed writes
//!   and reads, summaries, the staff detail with conflicts and authors. No I/O.
//! - [`projection`]: the staff projection, kept per accepted change; reindex; lists,
//!   coverage, the streamed export.
//! - [`migrate`]: `fieldsync migrate`, a station's data from one engine into the other.
//! - [`staff`]: what staff may ask and do through the API (detail, history, reviews,
//!   follow-ups), as changes made through the hub on their behalf.
//! - [`client`]: the device-side library: local store, offline edits, sync.
//!
//! The rule that shapes the hub: **durable before advertised**. A change is written and
//! flushed before any sync message that reflects it leaves the server. The rule that shapes
//! the edges: **nothing a caller starts costs more than a bounded amount** (connections,
//! header and handshake time, password checks, frame items, operations, unregistered
//! documents, outbound bytes; `proto-docs/security.md` lists every limit).

#![forbid(unsafe_code)]

pub mod accounts;
pub mod auth;
pub mod backup;
pub mod changelog;
pub mod client;
pub mod config;
pub mod demo;
pub mod hub;
pub mod ids;
pub mod metrics;
pub mod migrate;
pub mod projection;
pub mod protocol;
pub mod records;
pub mod server;
pub mod staff;
pub mod storage;

/// The machine's cores (2 if unknown): the default for work that is CPU-bound and costs
/// memory while it runs (password checks, document loads), where more at once only add
/// memory and contention.
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// The crate's error: one variant per layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    #[error("{0}")]
    Config(String),
    // Boxed: Automerge's errors are large, and `Result<_, Error>` is returned on hot paths.
    #[error(transparent)]
    Client(Box<client::ClientError>),
    #[error(transparent)]
    Record(Box<records::RecordError>),
    #[error(transparent)]
    Accounts(Box<accounts::AccountsError>),
}

impl From<accounts::AccountsError> for Error {
    fn from(e: accounts::AccountsError) -> Self {
        match e {
            accounts::AccountsError::Storage(s) => Error::Storage(s),
            other => Error::Accounts(Box::new(other)),
        }
    }
}

impl From<client::ClientError> for Error {
    fn from(e: client::ClientError) -> Self {
        Error::Client(Box::new(e))
    }
}

impl From<records::RecordError> for Error {
    fn from(e: records::RecordError) -> Self {
        Error::Record(Box::new(e))
    }
}
