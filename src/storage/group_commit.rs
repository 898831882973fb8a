//! Group commit: one flusher thread turns many "make my writes durable" requests into few
//! sled flushes. A request is answered by the first flush that *starts* after it was queued,
//! so every write its caller made before asking is covered. A caller on a blocking thread
//! may instead flush in place when no flush is under way or queued (`flush_here`): with
//! nothing to share the flush with, handing it to the flusher thread and back only adds
//! two thread wake-ups (a steady trickle of changes is the common case).
//!
//! The flusher is a plain OS thread calling sled's blocking `flush`, not `flush_async`:
//! sled runs `flush_async` on its own I/O pool, which wakes every idle pool thread for each
//! job (a `notify_all`), and at one flush per acknowledged change that hand-off cost more CPU
//! than the flush itself (measured with `examples/loadgen.rs` under perf).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::{Result, StorageError};

/// Queue bound: callers wait for room rather than grow memory without limit.
const QUEUE: usize = 4096;

type Waiter = oneshot::Sender<Result<()>>;

pub(super) struct GroupCommit {
    tx: mpsc::Sender<Waiter>,
    flusher: Arc<Flusher>,
}

/// What flushes, on the flusher thread or in place.
struct Flusher {
    db: sled::Db,
    /// Tests only: while this file exists every flush hangs (a dead disk).
    stall_while: Option<std::path::PathBuf>,
    flushes: AtomicU64,
    /// Flushes under way, on the flusher thread or in place.
    running: AtomicUsize,
    /// When the flush under way started, in microseconds after `epoch` plus one (0: none
    /// under way), so readiness can tell a stuck disk without asking it anything.
    flushing_since: AtomicU64,
    epoch: Instant,
}

impl Flusher {
    /// One sled flush; the caller counted it in `running`.
    fn flush(&self) -> Result<()> {
        let started = micros_since(self.epoch) + 1;
        // Flushes may overlap (one in place, one on the flusher thread): the first to start
        // keeps the clock.
        let timed = self
            .flushing_since
            .compare_exchange(0, started, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if self.stall_while.as_ref().is_some_and(|f| f.exists()) {
            tracing::error!("failpoint stall-flushes: this flush hangs for good");
            loop {
                std::thread::park();
            }
        }
        let outcome = self.db.flush().map(|_| ()).map_err(StorageError::from);
        if timed {
            self.flushing_since.store(0, Ordering::Relaxed);
        }
        self.flushes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "flushing the store failed");
        }
        outcome
    }
}

impl GroupCommit {
    /// Starts the flusher thread. It stops by itself when the last store handle is dropped
    /// (its queue closes).
    /// `stall_while`: tests only; while that file exists every flush hangs (a dead disk).
    pub(super) fn start(
        db: sled::Db,
        stall_while: Option<std::path::PathBuf>,
    ) -> std::io::Result<Self> {
        let (tx, mut rx) = mpsc::channel::<Waiter>(QUEUE);
        let flusher = Arc::new(Flusher {
            db,
            stall_while,
            flushes: AtomicU64::new(0),
            running: AtomicUsize::new(0),
            flushing_since: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let on_thread = flusher.clone();
        std::thread::Builder::new()
            .name("fieldsync-flush".into())
            .spawn(move || {
                let mut batch = Vec::new();
                while let Some(first) = rx.blocking_recv() {
                    batch.push(first);
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    on_thread.running.fetch_add(1, Ordering::AcqRel);
                    let outcome = on_thread.flush();
                    on_thread.running.fetch_sub(1, Ordering::AcqRel);
                    for waiter in batch.drain(..) {
                        // A waiter that gave up (its connection closed) is fine to skip.
                        let _ = waiter.send(outcome.clone());
                    }
                }
            })?;
        Ok(Self { tx, flusher })
    }

    /// Why writes cannot be made durable now, if they cannot: the flusher thread stopped,
    /// or the flush under way has run longer than `limit`.
    pub(super) fn stalled(&self, limit: Duration) -> Option<String> {
        if self.tx.is_closed() {
            return Some("the flusher thread stopped".into());
        }
        let since = self.flusher.flushing_since.load(Ordering::Relaxed);
        if since == 0 {
            return None;
        }
        let running =
            Duration::from_micros(micros_since(self.flusher.epoch).saturating_sub(since - 1));
        (running > limit).then(|| format!("a flush has run for {} s", running.as_secs()))
    }

    /// Owns what it needs, so the future is `'static` and can be awaited anywhere.
    pub(super) fn flush(&self) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
        let queue = self.tx.clone();
        async move {
            let (tx, rx) = oneshot::channel();
            queue
                .send(tx)
                .await
                .map_err(|_| StorageError::FlusherStopped)?;
            rx.await.map_err(|_| StorageError::FlusherStopped)?
        }
    }

    /// Flushes on the calling (blocking) thread if no flush is under way or queued, and
    /// returns its outcome; `None` when there is one to share: then ask [`GroupCommit::flush`].
    pub(super) fn flush_here(&self) -> Option<Result<()>> {
        if self.tx.is_closed() || self.tx.capacity() < self.tx.max_capacity() {
            return None;
        }
        self.flusher
            .running
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
            .ok()?;
        let outcome = self.flusher.flush();
        self.flusher.running.fetch_sub(1, Ordering::AcqRel);
        Some(outcome)
    }

    pub(super) fn flushes(&self) -> u64 {
        self.flusher.flushes.load(Ordering::Relaxed)
    }
}

fn micros_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flush in place happens only when there is nothing to share it with; either way
    /// the writes made before are durable once it returns (counted as a flush).
    #[test]
    fn a_flush_in_place_happens_only_when_no_other_is_under_way() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let commit = GroupCommit::start(db.clone(), None).unwrap();
        db.insert(b"k", b"v").unwrap();
        assert!(matches!(commit.flush_here(), Some(Ok(()))));
        assert_eq!(commit.flushes(), 1);

        // Another flush under way: share it instead.
        commit.flusher.running.fetch_add(1, Ordering::AcqRel);
        assert!(commit.flush_here().is_none());
        commit.flusher.running.fetch_sub(1, Ordering::AcqRel);
        assert!(commit.flush_here().is_some());
        assert_eq!(commit.flushes(), 2);
        assert!(commit.stalled(Duration::from_secs(1)).is_none());
    }
}
