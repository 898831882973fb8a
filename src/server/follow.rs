//! What a node hears from the other nodes on its database (PostgreSQL): the documents they
//! stored changes of, so that the devices connected here hear of those changes as promptly
//! as the ones connected there. Owns the listener's lifetime: it reconnects with a bounded
//! backoff, and after every (re)connection refreshes each loaded document, because
//! notifications sent while no listener was there are lost (a document that is not loaded
//! here is read from the database when it is next loaded, so it misses nothing).
//! It also keeps this node's view of whether the database answers (for readiness): the
//! listener's connection is probed every second, and a node is following only once its
//! listener has caught up.
//! Must not: carry data (notifications name documents only; the chunks are read from the
//! database), or acknowledge anything (the node that committed the change did).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::accounts::Accounts;
use crate::hub::Hub;
use crate::storage::postgres::{Notice, PgStore};

/// Waits between attempts to reconnect the listener: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_LAST: Duration = Duration::from_secs(5);

/// How often the listener's connection is probed, and how long an answer may take.
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_LIMIT: Duration = Duration::from_secs(2);

/// Whether this node follows the others now: its listener is connected, caught up, and the
/// database answered its last probe.
#[derive(Default)]
pub(super) struct Following {
    now: AtomicBool,
}

impl Following {
    pub(super) fn is_following(&self) -> bool {
        self.now.load(Ordering::Acquire)
    }

    fn set(&self, following: bool) {
        self.now.store(following, Ordering::Release);
    }
}

/// Follows the other nodes until `stop`.
pub(super) async fn follow(
    pg: Arc<PgStore>,
    hub: Hub,
    accounts: Accounts,
    state: Arc<Following>,
    stop: CancellationToken,
) {
    let mut retry = RETRY_FIRST;
    loop {
        state.set(false);
        let listening = tokio::select! {
            _ = stop.cancelled() => return,
            l = pg.listen() => l,
        };
        let mut listener = match listening {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, retry_ms = retry.as_millis() as u64, "cannot listen for the other nodes' changes; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(RETRY_LAST);
                continue;
            }
        };
        retry = RETRY_FIRST;
        // What changed while nobody listened (on the first start: accounts changed between
        // loading them and listening; no document is loaded yet).
        reload_accounts(&accounts).await;
        hub.refresh_all().await;
        state.set(true);
        tracing::info!("following the other nodes on the database");
        let mut probe = tokio::time::interval(PROBE_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let notice = tokio::select! {
                _ = stop.cancelled() => return,
                _ = probe.tick() => {
                    if let Err(e) = listener.probe(PROBE_LIMIT).await {
                        tracing::error!(error = %e, "the database does not answer: not ready (changes are refused until it does); reconnecting");
                        break;
                    }
                    continue;
                }
                n = listener.notices.recv() => n,
            };
            let Some(first) = notice else {
                tracing::warn!("lost the connection that hears the other nodes' changes: not ready; reconnecting");
                break;
            };
            // Everything already queued goes with it: one directory reload for a burst of
            // registrations, each document refreshed once.
            let mut directory = false;
            let mut docs = std::collections::BTreeSet::new();
            let mut next = Some(first);
            while let Some(n) = next {
                match n {
                    Notice::Directory => directory = true,
                    Notice::Changed(doc) => {
                        docs.insert(doc);
                    }
                }
                next = listener.notices.try_recv().ok();
            }
            // Accounts first: a change to a household registered there a moment ago is
            // then allowed here.
            if directory {
                reload_accounts(&accounts).await;
            }
            for doc in docs {
                hub.refresh(doc).await;
            }
        }
    }
}

async fn reload_accounts(accounts: &Accounts) {
    match accounts.reload().await {
        Ok(0) => {}
        Ok(closed) => tracing::info!(
            closed,
            "closed connections another node revoked or disabled"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot reload the accounts another node changed"),
    }
}
