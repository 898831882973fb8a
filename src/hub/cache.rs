//! The LRU of loaded documents, bounded by bytes (each document's estimated memory).
//! Eviction drops the hub's sender: the actor finishes what is queued, persists its peers'
//! sync states and exits; until it has, a new load of the same document waits, so there is
//! never more than one live copy of a document. A closing actor still holds its memory, so
//! it counts against the budget until it exits: loads for peers wait for that room
//! ([`Cache::make_room`]), which keeps memory flat when hundreds of phones push thousands
//! of households at once. Must not block or do I/O (it runs under the hub's lock).

use std::collections::HashMap;

use lru::LruCache;
use tokio_util::sync::CancellationToken;

use super::actor::ActorTx;
use crate::ids::DocumentId;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    pub loaded_docs: usize,
    pub loaded_bytes: usize,
    /// Evicted documents whose actors are still finishing their queue.
    pub closing_docs: usize,
    pub closing_bytes: usize,
    pub budget_bytes: usize,
    /// The most `loaded_bytes + closing_bytes` has been.
    pub peak_loaded_bytes: usize,
    pub loads: u64,
    pub evictions: u64,
    /// Loads that waited for evicted documents to leave memory.
    pub waits_for_room: u64,
}

struct Slot {
    tx: ActorTx,
    bytes: usize,
    generation: u64,
    done: CancellationToken,
}

/// An evicted or retired document whose actor has not exited yet.
struct Closing {
    generation: u64,
    done: CancellationToken,
    bytes: usize,
}

pub(super) enum Lookup {
    Loaded(ActorTx),
    Closing(CancellationToken),
    Absent,
}

pub(super) struct Cache {
    lru: LruCache<DocumentId, Slot>,
    closing: HashMap<DocumentId, Closing>,
    total_bytes: usize,
    closing_bytes: usize,
    waits_for_room: u64,
    budget_bytes: usize,
    next_generation: u64,
    peak_bytes: usize,
    loads: u64,
    evictions: u64,
}

impl Cache {
    pub(super) fn new(budget_bytes: usize) -> Self {
        Self {
            lru: LruCache::unbounded(),
            closing: HashMap::new(),
            total_bytes: 0,
            closing_bytes: 0,
            waits_for_room: 0,
            budget_bytes,
            next_generation: 1,
            peak_bytes: 0,
            loads: 0,
            evictions: 0,
        }
    }

    pub(super) fn lookup(&mut self, doc: DocumentId) -> Lookup {
        if let Some(slot) = self.lru.get(&doc) {
            return Lookup::Loaded(slot.tx.clone());
        }
        if let Some(c) = self.closing.get(&doc) {
            return Lookup::Closing(c.done.clone());
        }
        Lookup::Absent
    }

    /// The sender of a loaded document, without touching its recency.
    pub(super) fn loaded(&self, doc: DocumentId) -> Option<ActorTx> {
        self.lru.peek(&doc).map(|s| s.tx.clone())
    }

    /// Every loaded document (not the closing ones).
    pub(super) fn loaded_ids(&self) -> Vec<DocumentId> {
        self.lru.iter().map(|(doc, _)| *doc).collect()
    }

    /// Whether a document estimated at `bytes` may load now. Evicts the least recently used
    /// until what stays loaded leaves room for it; `false` while evicted documents still
    /// hold that room (wait for [`Cache::exited`], then ask again). With nothing closing it
    /// is always `true`: a budget smaller than one document does not stop the server.
    pub(super) fn make_room(&mut self, bytes: usize) -> bool {
        while self.total_bytes.saturating_add(bytes) > self.budget_bytes {
            let Some((doc, slot)) = self.lru.pop_lru() else {
                break;
            };
            self.evictions += 1;
            self.close(doc, slot);
        }
        let fits = self.total_bytes + self.closing_bytes + bytes <= self.budget_bytes;
        if fits || self.closing.is_empty() {
            return true;
        }
        self.waits_for_room += 1;
        false
    }

    /// Registers a new actor, counted at `bytes` until its first [`Cache::set_cost`], and
    /// returns its generation; `None` if the document is already loaded or closing. Its
    /// `done` token is cancelled by [`Cache::exited`].
    pub(super) fn insert(&mut self, doc: DocumentId, tx: ActorTx, bytes: usize) -> Option<u64> {
        if self.lru.contains(&doc) || self.closing.contains_key(&doc) {
            return None;
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        let done = CancellationToken::new();
        self.lru.put(
            doc,
            Slot {
                tx,
                bytes,
                generation,
                done,
            },
        );
        self.total_bytes += bytes;
        self.note_peak();
        self.loads += 1;
        Some(generation)
    }

    pub(super) fn set_cost(&mut self, doc: DocumentId, generation: u64, bytes: usize) {
        if let Some(slot) = self.lru.peek_mut(&doc) {
            if slot.generation == generation {
                self.total_bytes = self.total_bytes - slot.bytes + bytes;
                slot.bytes = bytes;
            }
        }
        self.evict_over_budget(doc);
        self.note_peak();
    }

    fn note_peak(&mut self) {
        self.peak_bytes = self.peak_bytes.max(self.total_bytes + self.closing_bytes);
    }

    /// Drops the hub's sender (the actor drains and stops); its memory counts as closing
    /// until it exits.
    fn close(&mut self, doc: DocumentId, slot: Slot) {
        self.total_bytes -= slot.bytes;
        self.closing_bytes += slot.bytes;
        self.closing.insert(
            doc,
            Closing {
                generation: slot.generation,
                done: slot.done,
                bytes: slot.bytes,
            },
        );
    }

    fn evict_over_budget(&mut self, keep: DocumentId) {
        while self.total_bytes > self.budget_bytes && self.lru.len() > 1 {
            let Some((doc, slot)) = self.lru.pop_lru() else {
                break;
            };
            if doc == keep {
                // The document being worked on stays; put it back as most recent.
                self.lru.put(doc, slot);
                if self.lru.len() == 1 {
                    break;
                }
                continue;
            }
            self.evictions += 1;
            self.close(doc, slot);
        }
    }

    /// Unloads `doc` now, as an eviction would, if `generation` is the loaded one.
    pub(super) fn retire(&mut self, doc: DocumentId, generation: u64) {
        if self.lru.peek(&doc).map(|s| s.generation) != Some(generation) {
            return;
        }
        if let Some(slot) = self.lru.pop(&doc) {
            self.close(doc, slot);
        }
    }

    /// An actor stopped (evicted, failed or shut down).
    pub(super) fn exited(&mut self, doc: DocumentId, generation: u64) {
        if self.closing.get(&doc).map(|c| c.generation) == Some(generation) {
            if let Some(c) = self.closing.remove(&doc) {
                self.closing_bytes -= c.bytes;
                c.done.cancel();
            }
        }
        if self.lru.peek(&doc).map(|s| s.generation) == Some(generation) {
            if let Some(slot) = self.lru.pop(&doc) {
                self.total_bytes -= slot.bytes;
                slot.done.cancel();
            }
        }
    }

    pub(super) fn stats(&self) -> CacheStats {
        CacheStats {
            loaded_docs: self.lru.len(),
            loaded_bytes: self.total_bytes,
            closing_docs: self.closing.len(),
            closing_bytes: self.closing_bytes,
            budget_bytes: self.budget_bytes,
            peak_loaded_bytes: self.peak_bytes,
            loads: self.loads,
            evictions: self.evictions,
            waits_for_room: self.waits_for_room,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(n: u8) -> DocumentId {
        DocumentId::from_bytes([n; 16])
    }

    fn sender() -> ActorTx {
        ActorTx::channel(1).0
    }

    #[test]
    fn a_load_waits_while_evicted_documents_still_hold_the_budget() {
        let mut cache = Cache::new(100);
        let a = cache.insert(doc(1), sender(), 40).unwrap();
        cache.insert(doc(2), sender(), 40).unwrap();
        // 80 + 40 > 100: the least recently used (1) is evicted, but its actor is still
        // finishing its queue and holds its memory, so the newcomer waits.
        assert!(!cache.make_room(40));
        assert!(matches!(cache.lookup(doc(1)), Lookup::Closing(_)));
        let stats = cache.stats();
        assert_eq!(
            (
                stats.loaded_bytes,
                stats.closing_bytes,
                stats.waits_for_room
            ),
            (40, 40, 1),
            "{stats:?}"
        );
        cache.exited(doc(1), a);
        assert!(cache.make_room(40));
        cache.insert(doc(3), sender(), 40).unwrap();
        assert!(matches!(cache.lookup(doc(1)), Lookup::Absent));
        assert!(matches!(cache.lookup(doc(3)), Lookup::Loaded(_)));
        assert!(
            cache.stats().peak_loaded_bytes <= 100,
            "{:?}",
            cache.stats()
        );
    }

    #[test]
    fn a_budget_smaller_than_one_document_still_loads_one_at_a_time() {
        let mut cache = Cache::new(10);
        assert!(cache.make_room(40));
        let a = cache.insert(doc(1), sender(), 40).unwrap();
        assert!(
            !cache.make_room(40),
            "the first is evicted and must leave first"
        );
        cache.exited(doc(1), a);
        assert!(cache.make_room(40));
    }
}
