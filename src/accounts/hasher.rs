//! A fixed pool of threads that check passwords (argon2: about 19 MiB and tens of
//! milliseconds each).
//!
//! Why not `spawn_blocking`: argon2 allocates its 19 MiB per check, and the allocator keeps
//! freed ones around per thread (measured: about 200 MiB per thread after a dozen checks);
//! tokio's blocking pool has hundreds of threads. Here each of a few long-lived threads keeps
//! one buffer and computes every check in it: the memory is the pool size times 19 MiB.
//! Must not queue without bound: callers hold a permit of `Accounts`' semaphore (one per
//! thread) before they submit, so the queue never holds more jobs than there are threads.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::auth::secrets::PasswordMemory;

/// A job gets its thread's argon2 memory, reused from job to job.
type Job = Box<dyn FnOnce(&mut PasswordMemory) + Send>;

pub(super) struct Hasher {
    jobs: mpsc::SyncSender<Job>,
}

impl Hasher {
    /// Starts `threads` worker threads; they end when the hasher is dropped.
    pub(super) fn start(threads: usize) -> std::io::Result<Hasher> {
        let threads = threads.max(1);
        let (jobs, queue) = mpsc::sync_channel::<Job>(threads);
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("password-check-{i}"))
                .spawn(move || {
                    let mut memory = PasswordMemory::default();
                    loop {
                        let next = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        match next {
                            Ok(job) => job(&mut memory),
                            Err(_) => return, // the hasher was dropped
                        }
                    }
                })?;
        }
        Ok(Hasher { jobs })
    }

    /// Runs `check` on a pool thread and waits for its answer; `None` if the pool stopped.
    pub(super) async fn run(
        &self,
        check: impl FnOnce(&mut PasswordMemory) -> bool + Send + 'static,
    ) -> Option<bool> {
        let (done, answer) = oneshot::channel();
        let job: Job = Box::new(move |memory| {
            let _ = done.send(check(memory));
        });
        // Never full: callers hold one of as many permits as there are threads.
        self.jobs.try_send(job).ok()?;
        answer.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn checks_run_on_the_pool_and_answer() {
        let hasher = Hasher::start(2).unwrap();
        // As many at once as there are threads (what the permits allow), twice.
        for _ in 0..2 {
            let answers: Vec<Option<bool>> = futures_util::future::join_all((0..2).map(|_| {
                hasher.run(|_| {
                    std::thread::current()
                        .name()
                        .is_some_and(|n| n.starts_with("password-check-"))
                })
            }))
            .await;
            assert_eq!(answers, vec![Some(true); 2]);
        }
    }
}
