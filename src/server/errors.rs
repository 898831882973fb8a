//! The one place where a rejection becomes an HTTP status and a JSON body
//! `{"error": {"code", "message"}}`. Internal causes are logged, never sent.

use std::convert::Infallible;

use warp::http::StatusCode;
use warp::Reply;

pub(super) async fn recover(err: warp::Rejection) -> Result<Box<dyn Reply>, Infallible> {
    let (status, code, message) = if err.is_not_found() {
        (StatusCode::NOT_FOUND, "not_found", "no such endpoint")
    } else if err.find::<warp::reject::MethodNotAllowed>().is_some() {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed here",
        )
    } else if err.find::<warp::reject::InvalidQuery>().is_some() {
        (
            StatusCode::BAD_REQUEST,
            "bad_query",
            "the query string is not valid",
        )
    } else if err.find::<warp::reject::MissingHeader>().is_some()
        || err.find::<warp::reject::InvalidHeader>().is_some()
    {
        (
            StatusCode::BAD_REQUEST,
            "bad_request",
            "a required header is missing or invalid; /sync expects a WebSocket upgrade",
        )
    } else {
        tracing::warn!(rejection = ?err, "unhandled rejection");
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    };
    Ok(Box::new(warp::reply::with_status(
        warp::reply::json(&serde_json::json!({"error": {"code": code, "message": message}})),
        status,
    )))
}
