//! Liveness and readiness, for load balancers, service managers and monitors. `/healthz`:
//! the process answers. `/readyz`: this node can take changes and acknowledge them now —
//! its store can make writes durable (embedded: the flusher runs and no flush is stuck;
//! PostgreSQL: the listener is connected and caught up, and the database answered its last
//! probe a moment ago), and it is not shutting down.
//! Owns that decision and its answer. Must not: do I/O per request (anyone may ask as often
//! as they like: the answer reads state the flusher and the follower keep), or say more
//! than which check fails (causes go to the log, once per change of the answer).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::{Filter, Reply};

use super::follow::Following;
use crate::storage::documents::DocumentStore;

/// A flush running longer than this means the disk is stuck: not ready.
const FLUSH_STALL: Duration = Duration::from_secs(5);

/// One check that fails, by name (what `/readyz` shows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Failing {
    /// The embedded store cannot make writes durable (its flusher stopped or is stuck).
    Store,
    /// PostgreSQL does not answer, or this node does not hear the other nodes yet.
    Database,
    /// The node is shutting down.
    Stopping,
}

/// What this node knows about its own readiness.
#[derive(Clone)]
pub(super) struct Readiness {
    documents: Arc<dyn DocumentStore>,
    /// On PostgreSQL: whether the follower is connected and caught up.
    following: Option<Arc<Following>>,
    closing: CancellationToken,
    /// The last answer, to log changes once.
    last: Arc<Mutex<Vec<Failing>>>,
}

impl Readiness {
    pub(super) fn new(
        documents: Arc<dyn DocumentStore>,
        following: Option<Arc<Following>>,
        closing: CancellationToken,
    ) -> Self {
        Self {
            documents,
            following,
            closing,
            last: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The checks that fail now (empty: ready).
    pub(super) fn failing(&self) -> Vec<Failing> {
        let mut failing = Vec::new();
        let stalled = self.documents.stalled(FLUSH_STALL);
        if stalled.is_some() {
            failing.push(Failing::Store);
        }
        if self.following.as_ref().is_some_and(|f| !f.is_following()) {
            failing.push(Failing::Database);
        }
        if self.closing.is_cancelled() {
            failing.push(Failing::Stopping);
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if *last != failing {
            if failing.is_empty() {
                tracing::info!("ready");
            } else {
                tracing::warn!(failing = ?failing, store = stalled.as_deref().unwrap_or("ok"), "not ready");
            }
            *last = failing.clone();
        }
        failing
    }
}

#[derive(Serialize)]
struct Answer {
    status: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    failing: Vec<Failing>,
}

/// `GET /healthz` and `GET /readyz`.
pub(super) fn routes(readiness: Readiness) -> BoxedFilter<(Box<dyn Reply>,)> {
    let health = warp::get()
        .and(warp::path("healthz"))
        .and(warp::path::end())
        .map(|| {
            Box::new(warp::reply::json(&Answer {
                status: "ok",
                failing: Vec::new(),
            })) as Box<dyn Reply>
        });
    let ready = warp::get()
        .and(warp::path("readyz"))
        .and(warp::path::end())
        .map(move || {
            let failing = readiness.failing();
            let (status, code) = if failing.is_empty() {
                ("ready", StatusCode::OK)
            } else {
                ("not ready", StatusCode::SERVICE_UNAVAILABLE)
            };
            Box::new(warp::reply::with_status(
                warp::reply::json(&Answer { status, failing }),
                code,
            )) as Box<dyn Reply>
        });
    health.or(ready).unify().boxed()
}
