//! Credentials on HTTP requests: where a secret may ride (`Authorization: Bearer`, the
//! `token` query parameter for the stock JS client that cannot set headers, or the staff
//! session cookie), and the filters that turn them into an authenticated caller or a 401.
//! Must not log a secret, and must not decide access to documents (that is `auth`).

use std::collections::HashMap;

use warp::filters::BoxedFilter;
use warp::Filter;

use super::errors::ApiError;
use super::Services;
use crate::accounts::Authenticated;

/// The session cookie's name.
pub(super) const SESSION_COOKIE: &str = "fieldsync_session";
/// The header a browser session echoes its CSRF token in.
pub(super) const CSRF_HEADER: &str = "x-csrf-token";

/// The secret a request carries, if any (header first, then query, then cookie).
pub(super) fn secret() -> BoxedFilter<(Option<String>,)> {
    warp::header::optional::<String>("authorization")
        .and(
            warp::query::<HashMap<String, String>>()
                .or(warp::any().map(HashMap::new))
                .unify(),
        )
        .and(warp::cookie::optional::<String>(SESSION_COOKIE))
        .map(
            |auth: Option<String>, query: HashMap<String, String>, cookie: Option<String>| {
                auth.and_then(|h| {
                    h.strip_prefix("Bearer ")
                        .or_else(|| h.strip_prefix("bearer "))
                        .map(|t| t.trim().to_string())
                })
                .or_else(|| query.get("token").cloned())
                .or(cookie)
            },
        )
        .boxed()
}

/// The authenticated caller, or the 401 to answer.
pub(super) fn caller(services: &Services) -> BoxedFilter<(Result<Authenticated, ApiError>,)> {
    let accounts = services.accounts.clone();
    secret()
        .map(move |s: Option<String>| {
            accounts
                .authenticate(s.as_deref())
                .map_err(ApiError::unauthenticated)
        })
        .boxed()
}

/// For state-changing requests: a browser session must echo its CSRF token in
/// `X-CSRF-Token`; device tokens (not sent automatically by browsers) need not.
pub(super) fn check_csrf(who: &Authenticated, header: Option<&str>) -> Result<(), ApiError> {
    match who {
        Authenticated::Device(_) => Ok(()),
        Authenticated::Session { csrf, .. } => {
            if header.is_some_and(|h| constant_time_eq(h.as_bytes(), csrf.as_bytes())) {
                Ok(())
            } else {
                Err(ApiError::forbidden(
                    "missing or wrong X-CSRF-Token header; reload the page and try again",
                ))
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
