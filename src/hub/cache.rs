//! The LRU of loaded documents, bounded by bytes (their stored size). Eviction drops the
//! hub's sender: the actor finishes what is queued, persists its peers' sync states and
//! exits; until it has, a new load of the same document waits, so there is never more than
//! one live copy of a document.

use std::collections::HashMap;

use lru::LruCache;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::actor::Cmd;
use crate::ids::DocumentId;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    pub loaded_docs: usize,
    pub loaded_bytes: usize,
    pub budget_bytes: usize,
    /// The most `loaded_bytes` has been after any load or change was accounted.
    pub peak_loaded_bytes: usize,
    pub loads: u64,
    pub evictions: u64,
}

struct Slot {
    tx: mpsc::Sender<Cmd>,
    bytes: usize,
    generation: u64,
    done: CancellationToken,
}

pub(super) enum Lookup {
    Loaded(mpsc::Sender<Cmd>),
    Closing(CancellationToken),
    Absent,
}

pub(super) struct Cache {
    lru: LruCache<DocumentId, Slot>,
    closing: HashMap<DocumentId, (u64, CancellationToken)>,
    total_bytes: usize,
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
        if let Some((_, done)) = self.closing.get(&doc) {
            return Lookup::Closing(done.clone());
        }
        Lookup::Absent
    }

    /// The sender of a loaded document, without touching its recency.
    pub(super) fn loaded(&self, doc: DocumentId) -> Option<mpsc::Sender<Cmd>> {
        self.lru.peek(&doc).map(|s| s.tx.clone())
    }

    /// Registers a new actor and returns its generation; `None` if the document is already
    /// loaded or closing. Its `done` token is cancelled by [`Cache::exited`].
    pub(super) fn insert(&mut self, doc: DocumentId, tx: mpsc::Sender<Cmd>) -> Option<u64> {
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
                bytes: 0,
                generation,
                done,
            },
        );
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
        self.peak_bytes = self.peak_bytes.max(self.total_bytes);
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
            self.total_bytes -= slot.bytes;
            self.evictions += 1;
            // Dropping `slot.tx` lets the actor drain and stop.
            self.closing.insert(doc, (slot.generation, slot.done));
        }
    }

    /// Unloads `doc` now, as an eviction would, if `generation` is the loaded one.
    pub(super) fn retire(&mut self, doc: DocumentId, generation: u64) {
        if self.lru.peek(&doc).map(|s| s.generation) != Some(generation) {
            return;
        }
        if let Some(slot) = self.lru.pop(&doc) {
            self.total_bytes -= slot.bytes;
            // Dropping `slot.tx` lets the actor drain and stop.
            self.closing.insert(doc, (slot.generation, slot.done));
        }
    }

    /// An actor stopped (evicted, failed or shut down).
    pub(super) fn exited(&mut self, doc: DocumentId, generation: u64) {
        if let Some((g, done)) = self.closing.get(&doc) {
            if *g == generation {
                done.cancel();
                self.closing.remove(&doc);
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
            budget_bytes: self.budget_bytes,
            peak_loaded_bytes: self.peak_bytes,
            loads: self.loads,
            evictions: self.evictions,
        }
    }
}
