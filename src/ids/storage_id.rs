//! `StorageId`: the stable id of a peer's persistent storage (automerge-repo `storageId`).
//! A non-ephemeral client that presents the same storage id again gets its persisted sync
//! state back, so reconnecting costs a few hundred bytes instead of a full exchange.

use std::fmt;

/// Longest storage id accepted from the wire, in bytes.
pub const MAX_STORAGE_ID_BYTES: usize = 128;

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorageId(String);

impl StorageId {
    pub fn new(s: impl Into<String>) -> Option<Self> {
        let s = s.into();
        (!s.is_empty() && s.len() <= MAX_STORAGE_ID_BYTES).then_some(Self(s))
    }

    /// A fresh random id (a UUID, as automerge-repo makes them).
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StorageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StorageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorageId({})", self.0)
    }
}
