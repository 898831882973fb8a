//! Who may sync which document: the authorisation seam between connections and documents.
//!
//! Owns the [`Access`] decision type, the [`Principal`] a connection acts for, and the
//! [`Authorizer`] trait the hub consults for every document message. The document is the unit
//! of authorisation (per-change refusal cannot converge in a hash DAG). Must stay free of
//! I/O: decisions are pure functions of data handed in.
//!
//! Accounts, devices and tokens arrive with issue 3; until then [`OpenAccess`] lets every
//! peer read and write every document, and the README says so.

use crate::ids::DocumentId;

/// What a principal may do with one document.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// Not even its existence is revealed: the answer is `doc-unavailable`.
    None,
    /// Receives changes; its own changes are not applied (read-only sync state).
    Read,
    ReadWrite,
}

/// The authenticated party behind a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// A label for logs and provenance; never a secret.
    pub label: String,
}

impl Principal {
    pub fn anonymous() -> Self {
        Self {
            label: "anonymous".into(),
        }
    }
}

/// Decides access per (principal, document). Called on the hot path: must be cheap and must
/// not block on I/O.
pub trait Authorizer: Send + Sync + 'static {
    fn access(&self, who: &Principal, doc: DocumentId) -> Access;
}

/// Everyone may read and write everything (development default before accounts exist).
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenAccess;

impl Authorizer for OpenAccess {
    fn access(&self, _who: &Principal, _doc: DocumentId) -> Access {
        Access::ReadWrite
    }
}
