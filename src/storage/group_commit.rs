//! Group commit: one flusher thread turns many "make my writes durable" requests into few
//! sled flushes. A request is answered by the first flush that *starts* after it was queued,
//! so every write its caller made before asking is covered.
//!
//! The flusher is a plain OS thread calling sled's blocking `flush`, not `flush_async`:
//! sled runs `flush_async` on its own I/O pool, which wakes every idle pool thread for each
//! job (a `notify_all`), and at one flush per acknowledged change that hand-off cost more CPU
//! than the flush itself (measured with `examples/loadgen.rs` under perf).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::{Result, StorageError};

/// Queue bound: callers wait for room rather than grow memory without limit.
const QUEUE: usize = 4096;

type Waiter = oneshot::Sender<Result<()>>;

pub(super) struct GroupCommit {
    tx: mpsc::Sender<Waiter>,
    flushes: Arc<AtomicU64>,
    /// When the flush under way started, in microseconds after `epoch` plus one (0: none
    /// under way), so readiness can tell a stuck disk without asking it anything.
    flushing_since: Arc<AtomicU64>,
    epoch: Instant,
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
        let flushes = Arc::new(AtomicU64::new(0));
        let counter = flushes.clone();
        let epoch = Instant::now();
        let flushing_since = Arc::new(AtomicU64::new(0));
        let since = flushing_since.clone();
        std::thread::Builder::new()
            .name("fieldsync-flush".into())
            .spawn(move || {
                let mut batch = Vec::new();
                while let Some(first) = rx.blocking_recv() {
                    batch.push(first);
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    since.store(micros_since(epoch) + 1, Ordering::Relaxed);
                    if stall_while.as_ref().is_some_and(|f| f.exists()) {
                        tracing::error!("failpoint stall-flushes: this flush hangs for good");
                        loop {
                            std::thread::park();
                        }
                    }
                    let outcome = db.flush().map(|_| ()).map_err(StorageError::from);
                    since.store(0, Ordering::Relaxed);
                    counter.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = &outcome {
                        tracing::error!(error = %e, "flushing the store failed");
                    }
                    for waiter in batch.drain(..) {
                        // A waiter that gave up (its connection closed) is fine to skip.
                        let _ = waiter.send(outcome.clone());
                    }
                }
            })?;
        Ok(Self {
            tx,
            flushes,
            flushing_since,
            epoch,
        })
    }

    /// Why writes cannot be made durable now, if they cannot: the flusher thread stopped,
    /// or the flush under way has run longer than `limit`.
    pub(super) fn stalled(&self, limit: Duration) -> Option<String> {
        if self.tx.is_closed() {
            return Some("the flusher thread stopped".into());
        }
        let since = self.flushing_since.load(Ordering::Relaxed);
        if since == 0 {
            return None;
        }
        let running = Duration::from_micros(micros_since(self.epoch).saturating_sub(since - 1));
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

    pub(super) fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }
}

fn micros_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
}
