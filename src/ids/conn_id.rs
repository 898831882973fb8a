//! `ConnId`: the server's own number for one live WebSocket connection. Peer ids come from
//! clients and may collide; connection ids never do.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ConnId(u64);

static NEXT: AtomicU64 = AtomicU64::new(1);

impl ConnId {
    /// The next id of this process. (A process-wide counter is the one piece of global state
    /// here: ids only need to be unique within the process, and threading a counter through
    /// every constructor would buy nothing.)
    pub fn next() -> Self {
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}", self.0)
    }
}
