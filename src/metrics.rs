//! The process's Prometheus metrics that layers bump as things happen: changes accepted and
//! refused, how long an accepted batch takes to be applied and made durable, HTTP requests
//! by route and status. They live here, registered once, so that no layer needs a handle;
//! values read at scrape time (connections, the document cache, flushes, projection lag)
//! are collected by the server's metrics endpoint (`server::metrics`).
//! Must not: take a label value from input without a bound (no names of people, devices,
//! households or raw paths: routes are templates), or do I/O.

use std::sync::LazyLock;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

/// Every metric of this module.
pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

fn register<C: prometheus::core::Collector + Clone + 'static>(c: C) -> C {
    REGISTRY
        .register(Box::new(c.clone()))
        .expect("each metric is registered once");
    c
}

/// Seconds buckets from a millisecond to ten seconds.
const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Changes the server accepted and stored (each one Automerge change).
pub static CHANGES_ACCEPTED: LazyLock<IntCounter> = LazyLock::new(|| {
    register(
        IntCounter::new(
            "fieldsync_changes_accepted_total",
            "Automerge changes accepted from devices and staff and stored",
        )
        .expect("valid metric"),
    )
});

/// Messages refused with their changes, by why: `limits` (a change or document over its
/// operation or size limit), `scope` (a new document outside the device's villages).
pub static CHANGES_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "fieldsync_sync_messages_refused_total",
                "Sync messages whose changes were refused, nothing of them applied",
            ),
            &["reason"],
        )
        .expect("valid metric"),
    )
});

/// Household re-projections that read the household's whole provenance history: a rebuild,
/// the first projection of a document that had changes before it was registered, or a
/// change whose summary asked about an author its row had not kept. A steady climb with the accepted changes means the kept authors stopped helping.
pub static PROJECTION_HISTORY_READS: LazyLock<IntCounter> = LazyLock::new(|| {
    register(
        IntCounter::new(
            "fieldsync_projection_history_reads_total",
            "Household re-projections that read the household's whole provenance history",
        )
        .expect("valid metric"),
    )
});

/// Merge changes the server added to collapse a document's concurrent heads (many phones'
/// offline edits of one household): about one per eight such edits.
pub static HEADS_MERGED: LazyLock<IntCounter> = LazyLock::new(|| {
    register(
        IntCounter::new(
            "fieldsync_heads_merged_total",
            "Merge changes the server added to collapse a document's concurrent heads",
        )
        .expect("valid metric"),
    )
});

/// Accepted batches that left their household quarantined (kept and stored, but out of the
/// staff lists until someone fixes it).
pub static QUARANTINED_UPDATES: LazyLock<IntCounter> = LazyLock::new(|| {
    register(
        IntCounter::new(
            "fieldsync_quarantined_updates_total",
            "Accepted changes to a household that left it quarantined (stored, held out of staff lists)",
        )
        .expect("valid metric"),
    )
});

/// From a batch of a document's messages being taken up to its changes being durable (the
/// acknowledgement follows at once).
pub static ACK_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register(
        Histogram::with_opts(
            HistogramOpts::new(
                "fieldsync_accepted_batch_durable_seconds",
                "Time to apply a batch of changes to a document and make it durable, before it is acknowledged",
            )
            .buckets(SECONDS.to_vec()),
        )
        .expect("valid metric"),
    )
});

pub static HTTP_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "fieldsync_http_requests_total",
                "HTTP requests (and WebSocket upgrades) by route and status",
            ),
            &["route", "status"],
        )
        .expect("valid metric"),
    )
});

pub static HTTP_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(
        HistogramVec::new(
            HistogramOpts::new(
                "fieldsync_http_request_seconds",
                "Time to answer an HTTP request, by route (a WebSocket: to its upgrade)",
            )
            .buckets(SECONDS.to_vec()),
            &["route"],
        )
        .expect("valid metric"),
    )
});

/// Registers every metric, so a scrape lists them before anything happened.
pub fn init() {
    LazyLock::force(&CHANGES_ACCEPTED);
    LazyLock::force(&CHANGES_REFUSED);
    LazyLock::force(&QUARANTINED_UPDATES);
    LazyLock::force(&PROJECTION_HISTORY_READS);
    LazyLock::force(&HEADS_MERGED);
    LazyLock::force(&ACK_SECONDS);
    LazyLock::force(&HTTP_REQUESTS);
    LazyLock::force(&HTTP_SECONDS);
}

/// Counts one HTTP request under its route template.
pub fn http_request(path: &str, status: u16, seconds: f64) {
    let route = route_of(path);
    HTTP_REQUESTS
        .with_label_values(&[route, &status.to_string()])
        .inc();
    HTTP_SECONDS.with_label_values(&[route]).observe(seconds);
}

/// The route template of `path`: ids become `{id}`, anything unknown is `other`, so the
/// label's values are a fixed set whatever callers send.
pub fn route_of(path: &str) -> &'static str {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match parts.as_slice() {
        [] | [""] => "/",
        ["assets", "app.js" | "app.css"] => "/assets",
        ["sync"] => "/sync",
        ["healthz"] => "/healthz",
        ["readyz"] => "/readyz",
        ["api", "v1", rest @ ..] => match rest {
            ["session"] => "/api/v1/session",
            ["me"] => "/api/v1/me",
            ["devices", "enroll"] => "/api/v1/devices/enroll",
            ["households"] => "/api/v1/households",
            ["households", _] => "/api/v1/households/{id}",
            ["households", _, "history"] => "/api/v1/households/{id}/history",
            ["households", _, "review"] => "/api/v1/households/{id}/review",
            ["households", _, "merge"] => "/api/v1/households/{id}/merge",
            ["households", _, "follow-ups"] => "/api/v1/households/{id}/follow-ups",
            ["households", _, "follow-ups", _] => "/api/v1/households/{id}/follow-ups/{id}",
            ["households", _, "members", _] => "/api/v1/households/{id}/members/{id}",
            ["households", _, "visits", _, "meeting"] => {
                "/api/v1/households/{id}/visits/{id}/meeting"
            }
            ["changes"] => "/api/v1/changes",
            ["export.csv"] => "/api/v1/export.csv",
            ["coverage"] => "/api/v1/coverage",
            ["reports", "monthly"] => "/api/v1/reports/monthly",
            ["reports", "public"] => "/api/v1/reports/public",
            ["reports", "public.csv"] => "/api/v1/reports/public.csv",
            _ => "other",
        },
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_templates_whatever_the_path() {
        assert_eq!(route_of("/"), "/");
        assert_eq!(route_of("/sync"), "/sync");
        assert_eq!(route_of("/assets/app.js"), "/assets");
        assert_eq!(
            route_of("/api/v1/households/2jiDxyz/history"),
            "/api/v1/households/{id}/history"
        );
        assert_eq!(
            route_of("/api/v1/households/a/members/b"),
            "/api/v1/households/{id}/members/{id}"
        );
        assert_eq!(route_of("/api/v1/households/"), "/api/v1/households");
        for made_up in [
            "/x",
            "/api/v1/secret-of-amy",
            "/api/v2/me",
            "/../../etc/passwd",
        ] {
            assert_eq!(route_of(made_up), "other", "{made_up}");
        }
    }
}
