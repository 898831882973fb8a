//! The staff web page: `/` and its two assets, embedded in the binary (no build step, no
//! files to deploy). Served with a Content-Security-Policy that allows only this origin's
//! script and style and no inline script, so device-entered text can never run as code even
//! if a bug put it into the page as markup. Must not hold any record logic: the page is a
//! client of the JSON API like any other.

use warp::filters::BoxedFilter;
use warp::{Filter, Reply};

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const APP_CSS: &str = include_str!("web/app.css");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Box<dyn Reply> {
    let reply = warp::reply::with_header(body, "content-type", content_type);
    let reply = warp::reply::with_header(reply, "content-security-policy", CSP);
    let reply = warp::reply::with_header(reply, "x-content-type-options", "nosniff");
    let reply = warp::reply::with_header(reply, "referrer-policy", "no-referrer");
    let reply = warp::reply::with_header(reply, "x-frame-options", "DENY");
    // Small and embedded: revalidate each time so a new binary's page is used at once.
    Box::new(warp::reply::with_header(reply, "cache-control", "no-cache"))
}

pub(super) fn routes() -> BoxedFilter<(Box<dyn Reply>,)> {
    let index = warp::get()
        .and(warp::path::end())
        .map(|| asset(INDEX_HTML, "text/html; charset=utf-8"));
    let js = warp::get()
        .and(warp::path!("assets" / "app.js"))
        .map(|| asset(APP_JS, "text/javascript; charset=utf-8"));
    let css = warp::get()
        .and(warp::path!("assets" / "app.css"))
        .map(|| asset(APP_CSS, "text/css; charset=utf-8"));
    index.or(js).unify().or(css).unify().boxed()
}
