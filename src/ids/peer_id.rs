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

    /// A random id with a readable prefix, e.g. `fieldsync-4f1c09ab22d1`. Peer ids ride in
    /// every frame, so they are kept short: 48 random bits are plenty to tell apart the peers
    /// of one session.
    pub fn random(prefix: &str) -> Self {
        let hex = uuid::Uuid::new_v4().simple().to_string();
        Self(format!("{prefix}-{}", &hex[..12]))
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
