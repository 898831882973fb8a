//! Who may sync which document: stations, villages, users, devices, secrets, and the
//! decisions made from them.
//!
//! Owns the typed names (`names`), secret formats and hashing (`secrets`), guessing
//! throttles (`throttle`), the in-memory directory with every access decision
//! (`directory`), the [`Principal`] a connection acts for, and the [`Authorizer`] seam the hub
//! consults. The document is the unit of authorisation (per-change refusal cannot converge
//! in a hash DAG). Must stay free of I/O: decisions are pure functions of data handed in;
//! time and randomness are parameters. The `accounts` service does the storing.

pub mod directory;
pub mod names;
pub mod secrets;
pub mod throttle;

use automerge::Automerge;

pub use directory::{
    AuthFailure, Directory, DocumentScope, Household, ReadingScope, Record, RecordKey,
};
pub use names::{DeviceId, NameError, Role, StationId, UserName, VillageName};

use crate::ids::DocumentId;

/// What a principal may do with one document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Not even its existence is revealed: the answer is `doc-unavailable`.
    None,
    /// Receives changes; its own changes are not applied (read-only sync state).
    Read,
    ReadWrite,
    /// The document is unknown and this principal may create it: its first changes are
    /// applied in memory and kept only if [`Authorizer::admit`] accepts the content.
    Create,
}

/// The authenticated party behind a connection or request. Decisions look its user and
/// device up again each time, so a revocation or a new assignment applies at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub user: UserName,
    pub role: Role,
    pub station: StationId,
    /// The enrolled device, for device tokens; `None` for a staff session.
    pub device: Option<DeviceId>,
}

impl Principal {
    /// A principal for in-process tools and tests that run with [`OpenAccess`].
    pub fn local(label: &str) -> Self {
        Self {
            user: UserName::new(label).unwrap_or_else(|_| UserName::new("local").expect("valid")),
            role: Role::Admin,
            station: StationId::new("local").expect("valid"),
            device: None,
        }
    }
}

/// Decides access per (principal, document). Called on the hot path and on blocking
/// threads: must be cheap and must not wait on the network.
pub trait Authorizer: Send + Sync + 'static {
    fn access(&self, who: &Principal, doc: DocumentId) -> Access;

    /// Called when a document the server did not have receives its first changes from
    /// `who` (with [`Access::Create`]). `Ok` keeps and registers it (the registration must be
    /// written before returning; the caller flushes it with the document); `Err(reason)`
    /// discards every byte of it and the peer gets `doc-unavailable`.
    fn admit(&self, who: &Principal, doc: DocumentId, content: &Automerge) -> Result<(), String>;

    /// Whether what decides `doc` may be stored but not yet known here (another node on a
    /// shared database registered it a moment ago): then [`Authorizer::look_up`] is called,
    /// off the reactor, before [`Authorizer::access`].
    fn may_know_more(&self, _doc: DocumentId) -> bool {
        false
    }

    /// Learns what the store says about `doc` (blocking).
    fn look_up(&self, _doc: DocumentId) {}
}

/// Everyone may read and write everything: for in-process tools and tests of the sync core
/// only. The server always runs with accounts.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenAccess;

impl Authorizer for OpenAccess {
    fn access(&self, _who: &Principal, _doc: DocumentId) -> Access {
        Access::ReadWrite
    }

    fn admit(
        &self,
        _who: &Principal,
        _doc: DocumentId,
        _content: &Automerge,
    ) -> Result<(), String> {
        Ok(())
    }
}
