//! Group commit: one background task turns many "make my writes durable" requests into few
//! sled flushes. A request is answered by the first flush that *starts* after it was queued,
//! so every write its caller made before asking is covered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{Result, StorageError};

/// Queue bound: callers wait for room rather than grow memory without limit.
const QUEUE: usize = 4096;

type Waiter = oneshot::Sender<Result<()>>;

pub(super) struct GroupCommit {
    tx: mpsc::Sender<Waiter>,
    flushes: Arc<AtomicU64>,
}

impl GroupCommit {
    /// Starts the flusher. It stops by itself when the last store handle is dropped.
    pub(super) fn start(db: sled::Db) -> Self {
        let (tx, mut rx) = mpsc::channel::<Waiter>(QUEUE);
        let flushes = Arc::new(AtomicU64::new(0));
        let counter = flushes.clone();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while let Some(first) = rx.recv().await {
                batch.push(first);
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                // flush_async runs the fsync on sled's own thread pool, not on the reactor.
                let outcome = db
                    .flush_async()
                    .await
                    .map(|_| ())
                    .map_err(StorageError::from);
                counter.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = &outcome {
                    tracing::error!(error = %e, "flushing the store failed");
                }
                for waiter in batch.drain(..) {
                    // A waiter that gave up (its connection closed) is fine to skip.
                    let _ = waiter.send(outcome.clone());
                }
            }
        });
        Self { tx, flushes }
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
