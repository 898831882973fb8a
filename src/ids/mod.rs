//! Typed identifiers shared by every layer: documents, peers, storage ids, connections,
//! timestamps and the clock. Owns their parsing and display rules; must not know about I/O or Automerge.

mod clock;
mod conn_id;
mod document_id;
mod peer_id;
mod storage_id;
mod timestamp;

pub use clock::{Clock, ManualClock, SystemClock};
pub use conn_id::ConnId;
pub use document_id::{DocumentId, DocumentIdError};
pub use peer_id::PeerId;
pub use storage_id::StorageId;
pub use timestamp::Timestamp;
