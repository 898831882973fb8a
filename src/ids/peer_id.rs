//! `PeerId`: the free-form peer name a client picks for one connection (automerge-repo uses
//! random strings). Untrusted input: bounded in length, never used as evidence of identity.

use std::fmt;

/// Longest peer id accepted from the wire, in bytes.
pub const MAX_PEER_ID_BYTES: usize = 256;

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(String);

impl PeerId {
    /// Accepts a non-empty id of at most [`MAX_PEER_ID_BYTES`].
    pub fn new(s: impl Into<String>) -> Option<Self> {
        let s = s.into();
        (!s.is_empty() && s.len() <= MAX_PEER_ID_BYTES).then_some(Self(s))
    }

    /// A random id with a readable prefix, e.g. `fieldsync-server-4f1c...`.
    pub fn random(prefix: &str) -> Self {
        Self(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.0)
    }
}
