//! Key encoding for the storage trees: fixed-width, big-endian, so byte order is logical
//! order and every key of one document shares its 16-byte prefix.
//!
//! `chunks`:      doc(16) | kind(1) | hash(32)    kind 1 = snapshot, 2 = incremental, so a
//!                                                prefix scan yields snapshots first.
//! `sync_states`: doc(16) | storage id (utf-8, variable, last)

use crate::ids::{DocumentId, StorageId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChunkKind {
    Snapshot = 1,
    Incremental = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    pub doc: DocumentId,
    pub kind: ChunkKind,
    pub hash: [u8; 32],
}

const CHUNK_KEY_LEN: usize = 16 + 1 + 32;

impl ChunkKey {
    pub fn new(doc: DocumentId, kind: ChunkKind, hash: [u8; 32]) -> Self {
        Self { doc, kind, hash }
    }

    pub fn encode(&self) -> [u8; CHUNK_KEY_LEN] {
        let mut k = [0u8; CHUNK_KEY_LEN];
        k[..16].copy_from_slice(self.doc.as_bytes());
        k[16] = self.kind as u8;
        k[17..].copy_from_slice(&self.hash);
        k
    }

    pub fn decode(k: &[u8]) -> Option<Self> {
        if k.len() != CHUNK_KEY_LEN {
            return None;
        }
        let doc = DocumentId::from_bytes(k[..16].try_into().ok()?);
        let kind = match k[16] {
            1 => ChunkKind::Snapshot,
            2 => ChunkKind::Incremental,
            _ => return None,
        };
        Some(Self {
            doc,
            kind,
            hash: k[17..].try_into().ok()?,
        })
    }
}

pub fn doc_prefix(doc: DocumentId) -> [u8; 16] {
    *doc.as_bytes()
}

pub fn sync_state_key(doc: DocumentId, peer: &StorageId) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + peer.as_str().len());
    k.extend_from_slice(doc.as_bytes());
    k.extend_from_slice(peer.as_str().as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_keys_round_trip_and_sort_snapshots_first() {
        let doc = DocumentId::random();
        let inc = ChunkKey::new(doc, ChunkKind::Incremental, [0; 32]);
        let snap = ChunkKey::new(doc, ChunkKind::Snapshot, [255; 32]);
        assert_eq!(ChunkKey::decode(&inc.encode()), Some(inc));
        assert_eq!(ChunkKey::decode(&snap.encode()), Some(snap));
        assert!(snap.encode() < inc.encode());
        assert_eq!(ChunkKey::decode(&[0; 10]), None);
    }
}
