//! Typed identifiers shared by every layer: documents, peers, storage ids, connections and
//! timestamps. Owns their parsing and display rules; must not know about I/O or Automerge.

mod conn_id;
mod document_id;
mod peer_id;
mod storage_id;
mod timestamp;

pub use conn_id::ConnId;
pub use document_id::{DocumentId, DocumentIdError};
pub use peer_id::PeerId;
pub use storage_id::StorageId;
pub use timestamp::Timestamp;
