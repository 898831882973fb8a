//! `/api/v1` account endpoints: device enrolment, staff sign-in and sign-out, and `me`.
//! Method and path first, then credentials, then a bounded body; every outcome is a reply
//! (errors through `errors::ApiError`). Must not hold account logic (that is `accounts`).

use std::net::IpAddr;
use std::sync::Arc;

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

/// The client address as the throttles key it (`-` when the transport has none).
fn client_filter(services: &Services) -> BoxedFilter<(String,)> {
    super::listen::client(Arc::new(services.config.listen.trusted_proxies.clone()))
        .map(|ip: Option<IpAddr>| ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into()))
        .boxed()
}

/// For the session endpoints, which a browser may be tricked into calling from another
/// site: a body must be declared JSON (an HTML form cannot send that without a CORS
/// preflight, which this server never grants), and an `Origin`, when the browser sends one,
/// must be this server's own.
fn same_origin_json() -> BoxedFilter<(Result<(), ApiError>,)> {
    warp::header::optional::<String>("content-type")
        .and(warp::header::optional::<String>("origin"))
        .and(warp::header::optional::<String>("host"))
        .map(
            |ctype: Option<String>, origin: Option<String>, host: Option<String>| {
                let json = ctype.as_deref().is_some_and(|c| {
                    c.split(';')
                        .next()
                        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
                });
                if !json {
                    return Err(ApiError::new(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "unsupported_media_type",
                        "send the body as JSON with Content-Type: application/json",
                    ));
                }
                check_origin(origin.as_deref(), host.as_deref())
            },
        )
        .boxed()
}

/// `Origin` (if sent) must name the host the request was sent to.
fn check_origin(origin: Option<&str>, host: Option<&str>) -> Result<(), ApiError> {
    let Some(origin) = origin else {
        return Ok(()); // native clients send none
    };
    let authority = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    match (authority, host) {
        (Some(a), Some(h)) if a.eq_ignore_ascii_case(h) => Ok(()),
        _ => Err(ApiError::forbidden(
            "cross-origin request refused: sign in from the staff page of this server",
        )),
    }
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
        .and(client_filter(services))
        .and(json_body())
        .then(move |client: String, body: Bytes| {
            let accounts = accounts.clone();
            async move {
                respond(
                    async {
                        let req: EnrollRequest = parse(&body)?;
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
    let secure_cookies = services.config.secure_cookies;
    warp::post()
        .and(warp::path!("api" / "v1" / "session"))
        .and(same_origin_json())
        .and(client_filter(services))
        .and(json_body())
        .then(move |checked: Result<(), ApiError>, client: String, body: Bytes| {
            let accounts = accounts.clone();
            async move {
                respond(
                    async {
                        checked?;
                        let req: SignInRequest = parse(&body)?;
                        let s = accounts.sign_in(&req.name, &req.password, &client).await?;
                        let max_age = s.expires_at.since(accounts.now()).as_secs();
                        let secure = if secure_cookies { "; Secure" } else { "" };
                        let cookie = format!(
                            "{SESSION_COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}{secure}",
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
        .and(auth::secret())
        .and(warp::header::optional::<String>(CSRF_HEADER))
        .then(
            move |who: Result<Authenticated, ApiError>,
                  secret: Option<String>,
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
                            // The session that authenticated this request ends, whichever
                            // way it came (bearer header or cookie): never another one.
                            if let Some(token) = secret {
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
