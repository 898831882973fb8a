//! `/api/v1` account endpoints: device enrolment, staff sign-in and sign-out, and `me`.
//! Method and path first, then credentials, then a bounded body; every outcome is a reply
//! (errors through `errors::ApiError`). Must not hold account logic (that is `accounts`).

use std::net::SocketAddr;

use bytes::Bytes;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::{Filter, Reply};

use super::auth::{self, CSRF_HEADER, SESSION_COOKIE};
use super::errors::{respond, ApiError};
use super::Services;
use crate::accounts::Authenticated;

/// Largest JSON body these endpoints accept.
const MAX_BODY_BYTES: u64 = 16 * 1024;

type Route = BoxedFilter<(Box<dyn Reply>,)>;

pub(super) fn routes(services: &Services) -> Route {
    enroll(services)
        .or(sign_in(services))
        .unify()
        .or(sign_out(services))
        .unify()
        .or(me(services))
        .unify()
        .boxed()
}

fn json_body() -> BoxedFilter<(Bytes,)> {
    warp::body::content_length_limit(MAX_BODY_BYTES)
        .and(warp::body::bytes())
        .boxed()
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not the expected JSON: {e}")))
}

#[derive(serde::Deserialize)]
struct EnrollRequest {
    code: String,
    device_name: String,
}

/// `POST /api/v1/devices/enroll {"code", "device_name"}` -> the device id and its token.
fn enroll(services: &Services) -> Route {
    let accounts = services.accounts.clone();
    warp::post()
        .and(warp::path!("api" / "v1" / "devices" / "enroll"))
        .and(warp::addr::remote())
        .and(json_body())
        .then(move |remote: Option<SocketAddr>, body: Bytes| {
            let accounts = accounts.clone();
            async move {
                respond(
                    async {
                        let req: EnrollRequest = parse(&body)?;
                        let client = remote.map(|a| a.ip().to_string()).unwrap_or_default();
                        let enrolled = accounts
                            .enroll(&req.code, &req.device_name, &client)
                            .await?;
                        Ok(Box::new(warp::reply::with_status(
                            warp::reply::json(&enrolled),
                            StatusCode::CREATED,
                        )) as Box<dyn Reply>)
                    }
                    .await,
                )
            }
        })
        .boxed()
}

#[derive(serde::Deserialize)]
struct SignInRequest {
    name: String,
    password: String,
}

/// `POST /api/v1/session {"name", "password"}` -> session cookie + CSRF token.
fn sign_in(services: &Services) -> Route {
    let accounts = services.accounts.clone();
    warp::post()
        .and(warp::path!("api" / "v1" / "session"))
        .and(json_body())
        .then(move |body: Bytes| {
            let accounts = accounts.clone();
            async move {
                respond(
                    async {
                        let req: SignInRequest = parse(&body)?;
                        let s = accounts.sign_in(&req.name, &req.password).await?;
                        let max_age = s.expires_at.since(accounts.now()).as_secs();
                        let cookie = format!(
                            "{SESSION_COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}",
                            s.token.expose()
                        );
                        let body = serde_json::json!({
                            "user": s.principal.user,
                            "role": s.principal.role,
                            "station": s.principal.station,
                            "csrf_token": s.csrf,
                            "expires_at": s.expires_at,
                        });
                        Ok(Box::new(warp::reply::with_header(
                            warp::reply::json(&body),
                            "set-cookie",
                            cookie,
                        )) as Box<dyn Reply>)
                    }
                    .await,
                )
            }
        })
        .boxed()
}

/// `DELETE /api/v1/session`: signs out (needs the CSRF token).
fn sign_out(services: &Services) -> Route {
    let accounts = services.accounts.clone();
    warp::delete()
        .and(warp::path!("api" / "v1" / "session"))
        .and(auth::caller(services))
        .and(warp::cookie::optional::<String>(SESSION_COOKIE))
        .and(warp::header::optional::<String>(CSRF_HEADER))
        .then(
            move |who: Result<Authenticated, ApiError>,
                  cookie: Option<String>,
                  csrf: Option<String>| {
                let accounts = accounts.clone();
                async move {
                    respond(
                        async {
                            let who = who?;
                            auth::check_csrf(&who, csrf.as_deref())?;
                            let Authenticated::Session { .. } = who else {
                                return Err(ApiError::bad_request(
                                    "no session to end: this request carries a device token",
                                ));
                            };
                            if let Some(token) = cookie {
                                accounts.sign_out(&token).await?;
                            }
                            let clear = format!(
                                "{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"
                            );
                            Ok(Box::new(warp::reply::with_header(
                                warp::reply::json(&serde_json::json!({"signed_out": true})),
                                "set-cookie",
                                clear,
                            )) as Box<dyn Reply>)
                        }
                        .await,
                    )
                }
            },
        )
        .boxed()
}

/// `GET /api/v1/me`: the caller's account, station, villages and catalog URLs (and, for a
/// browser session, its CSRF token).
fn me(services: &Services) -> Route {
    let accounts = services.accounts.clone();
    warp::get()
        .and(warp::path!("api" / "v1" / "me"))
        .and(auth::caller(services))
        .map(move |who: Result<Authenticated, ApiError>| {
            respond((|| {
                let who = who?;
                let me = accounts.me(who.principal())?;
                let mut body = serde_json::to_value(&me).unwrap_or_default();
                // A page reloaded in the browser learns its CSRF token again here.
                if let Authenticated::Session { csrf, .. } = &who {
                    body["csrf_token"] = serde_json::Value::String(csrf.clone());
                }
                Ok(Box::new(warp::reply::json(&body)) as Box<dyn Reply>)
            })())
        })
        .boxed()
}
