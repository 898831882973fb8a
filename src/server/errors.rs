//! The one place where failures become an HTTP status and the JSON body
//! `{"error": {"code", "message"}}`: handler errors ([`ApiError`], from every layer's error
//! type) and warp rejections. Internal causes are logged, never sent.

use std::convert::Infallible;
use std::time::Duration;

use warp::http::StatusCode;
use warp::Reply;

use crate::accounts::AccountsError;
use crate::auth::AuthFailure;
use crate::staff::StaffError;

/// A failure answered to an HTTP client.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<Duration>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub(super) fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub(super) fn unauthenticated(f: AuthFailure) -> Self {
        let code = match f {
            AuthFailure::Missing => "unauthenticated",
            AuthFailure::Invalid => "invalid_token",
            AuthFailure::Revoked => "device_revoked",
            AuthFailure::Expired => "token_expired",
            AuthFailure::Disabled => "account_disabled",
        };
        Self::new(StatusCode::UNAUTHORIZED, code, f.to_string())
    }

    pub(super) fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the server could not complete this now; try again shortly",
        )
    }

    pub(super) fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<AccountsError> for ApiError {
    fn from(e: AccountsError) -> Self {
        match e {
            AccountsError::Storage(inner) => {
                tracing::error!(error = %inner, "storage failure while answering a request");
                ApiError::unavailable()
            }
            AccountsError::Invalid(m) => ApiError::bad_request(m),
            AccountsError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "not_found", m),
            AccountsError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            AccountsError::Unauthenticated(f) => ApiError::unauthenticated(f),
            e @ AccountsError::WrongPassword => {
                ApiError::new(StatusCode::UNAUTHORIZED, "wrong_password", e.to_string())
            }
            e @ AccountsError::BadEnrolmentCode => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "bad_enrolment_code",
                e.to_string(),
            ),
            e @ AccountsError::Throttled(wait) => ApiError {
                retry_after: Some(wait),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_attempts",
                    e.to_string(),
                )
            },
            AccountsError::Forbidden(m) => ApiError::forbidden(m),
            e @ AccountsError::Busy => ApiError {
                retry_after: Some(Duration::from_secs(1)),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", e.to_string())
            },
        }
    }
}

impl From<StaffError> for ApiError {
    fn from(e: StaffError) -> Self {
        match e {
            StaffError::NotFound(_) | StaffError::NoSuchEntry(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            StaffError::Forbidden(m) => ApiError::forbidden(m),
            StaffError::Invalid(m) => ApiError::bad_request(m),
            StaffError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            StaffError::Storage(inner) => {
                tracing::error!(error = %inner, "storage failure while answering a request");
                ApiError::unavailable()
            }
            StaffError::Hub(inner) => {
                tracing::warn!(error = %inner, "a record edit did not complete");
                ApiError::unavailable()
            }
            e @ StaffError::Busy => ApiError {
                retry_after: Some(Duration::from_secs(5)),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", e.to_string())
            },
        }
    }
}

impl Reply for ApiError {
    fn into_response(self) -> warp::reply::Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        let mut resp =
            warp::reply::with_status(warp::reply::json(&body), self.status).into_response();
        if let Some(wait) = self.retry_after {
            if let Ok(v) = warp::http::HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
                resp.headers_mut()
                    .insert(warp::http::header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// Turns a handler outcome into a reply.
pub(super) fn respond(r: Result<Box<dyn Reply>, ApiError>) -> Box<dyn Reply> {
    match r {
        Ok(reply) => reply,
        Err(e) => Box::new(e),
    }
}

/// A path that is none of the server's routes (see [`crate::metrics::route_of`]): 404
/// whatever the method, not the 405 warp would make of another route's method filter.
#[derive(Debug)]
pub(super) struct NoSuchEndpoint;

impl warp::reject::Reject for NoSuchEndpoint {}

pub(super) async fn recover(err: warp::Rejection) -> Result<Box<dyn Reply>, Infallible> {
    let e = if err.is_not_found() || err.find::<NoSuchEndpoint>().is_some() {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
    } else if err.find::<warp::reject::InvalidQuery>().is_some() {
        ApiError::bad_request("the query string is not valid")
    } else if err.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "the request body is too large",
        )
    } else if err.find::<warp::reject::LengthRequired>().is_some() {
        ApiError::new(
            StatusCode::LENGTH_REQUIRED,
            "length_required",
            "send a Content-Length header",
        )
    } else if err.find::<warp::reject::MissingHeader>().is_some()
        || err.find::<warp::reject::InvalidHeader>().is_some()
    {
        ApiError::bad_request("a required header is missing or invalid")
    } else if err.find::<warp::reject::MethodNotAllowed>().is_some() {
        // Last of the specific ones: warp combines the rejections of every route tried, and
        // a route that matched the path and failed on its body says more than another
        // route's method.
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed here",
        )
    } else {
        tracing::warn!(rejection = ?err, "unhandled rejection");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    };
    Ok(Box::new(e))
}
