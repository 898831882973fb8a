//! `GET /metrics` in Prometheus text, on its own listener (`--metrics-listen`, off by
//! default) so that it is never exposed with the public port. Owns what is read at scrape
//! time: connections, the document cache (loaded documents and their estimated memory,
//! loads, evictions), the embedded store's flushes and the waits they served, and the
//! projection's lag (documents whose staff rows are not settled yet); the counters the
//! layers bump are in `crate::metrics`.
//! Must not: serve anything else on that listener, or label a value with input.

use prometheus::{Encoder, IntCounter, IntGauge, Registry, TextEncoder};
use warp::filters::BoxedFilter;
use warp::{Filter, Reply};

use super::Services;

/// `GET /metrics`.
pub(super) fn routes(services: Services) -> BoxedFilter<(Box<dyn Reply>,)> {
    warp::get()
        .and(warp::path("metrics"))
        .and(warp::path::end())
        .and_then(move || {
            let services = services.clone();
            async move {
                let body = match scrape(&services).await {
                    Ok(text) => text,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics could not be gathered");
                        return Ok::<_, std::convert::Infallible>(
                            Box::new(warp::reply::with_status(
                                "metrics could not be gathered; see the server's log\n",
                                warp::http::StatusCode::INTERNAL_SERVER_ERROR,
                            )) as Box<dyn Reply>,
                        );
                    }
                };
                Ok(Box::new(warp::reply::with_header(
                    body,
                    "content-type",
                    "text/plain; version=0.0.4; charset=utf-8",
                )) as Box<dyn Reply>)
            }
        })
        .boxed()
}

/// Everything, as Prometheus text.
pub(super) async fn scrape(services: &Services) -> Result<String, crate::Error> {
    crate::metrics::init();
    let now = Registry::new();
    let gauge = |name: &str, help: &str, v: i64| -> Result<(), prometheus::Error> {
        let g = IntGauge::new(name, help)?;
        g.set(v);
        now.register(Box::new(g))
    };
    let counter = |name: &str, help: &str, v: u64| -> Result<(), prometheus::Error> {
        let c = IntCounter::new(name, help)?;
        c.inc_by(v);
        now.register(Box::new(c))
    };
    let documents = services.documents.clone();
    let unsettled = crate::storage::blocking(move || documents.unsettled()).await?;
    let cache = services.hub.cache_stats();
    let built = (|| -> Result<(), prometheus::Error> {
        gauge(
            "fieldsync_connections",
            "Open WebSocket connections of devices",
            services.accounts.live_connections() as i64,
        )?;
        gauge(
            "fieldsync_documents_loaded",
            "Documents in memory",
            (cache.loaded_docs + cache.closing_docs) as i64,
        )?;
        gauge(
            "fieldsync_documents_loaded_bytes",
            "Estimated memory of the documents in memory",
            (cache.loaded_bytes + cache.closing_bytes) as i64,
        )?;
        gauge(
            "fieldsync_document_cache_budget_bytes",
            "The document cache's budget (--cache-budget-bytes)",
            cache.budget_bytes as i64,
        )?;
        counter(
            "fieldsync_document_loads_total",
            "Documents loaded into memory",
            cache.loads,
        )?;
        counter(
            "fieldsync_document_evictions_total",
            "Documents unloaded to keep within the cache budget",
            cache.evictions,
        )?;
        gauge(
            "fieldsync_projection_unsettled_documents",
            "Documents whose staff rows are not yet up to date with their last stored change",
            unsettled.len() as i64,
        )?;
        if let Some(store) = &services.embedded {
            let stats = store.stats();
            counter(
                "fieldsync_store_flushes_total",
                "Flushes of the embedded store to disk",
                stats.flushes,
            )?;
            counter(
                "fieldsync_store_durability_waits_total",
                "Callers that waited for a flush (one flush serves many)",
                stats.durability_waits,
            )?;
        }
        Ok(())
    })();
    built.map_err(|e| crate::Error::Config(format!("building the metrics: {e}")))?;
    let mut families = crate::metrics::REGISTRY.gather();
    families.extend(now.gather());
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut out)
        .map_err(|e| crate::Error::Config(format!("encoding the metrics: {e}")))?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}
