//! The one mapping from what went wrong to an HTTP status, and the error body that goes with it:
//! `{"error": code, "message": text}` for every failure, unknown paths and methods included.

use poem::IntoResponse;
use poem::http::{HeaderValue, StatusCode, header};
use poem_openapi::payload::{Json, Payload};

use super::types::{ErrorBody, Reply};
use crate::store::StoreError;

/// Seconds a client is asked to wait when MongoDB is unreachable.
const RETRY_AFTER_SECS: u32 = 5;

/// What every path answers to; the others get 405 with this `Allow`.
pub const ALLOWED_METHODS: &str = "GET, HEAD";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn body(error: &str, message: String) -> Json<ErrorBody> {
    Json(ErrorBody {
        error: error.to_owned(),
        message,
    })
}

impl<T: Payload + IntoResponse + Send> From<ApiError> for Reply<T> {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::BadRequest(message) => Reply::BadRequest(body("bad_request", message)),
            ApiError::NotFound(message) => Reply::NotFound(body("not_found", message)),
            ApiError::Store(e) => {
                // Logged once, here, with its cause. The client gets the sentence, which names
                // MongoDB and nothing of the driver's (hosts, topology).
                tracing::warn!(error = crate::error_chain(&e), "request failed on MongoDB");
                Reply::Unavailable(
                    body("unavailable", format!("{e}; retry later")),
                    RETRY_AFTER_SECS,
                )
            }
        }
    }
}

/// Parameters poem could not parse (a missing or mistyped query parameter): a 400 that names it.
pub fn bad_request<T: Payload + IntoResponse + Send>(err: poem::Error) -> Reply<T> {
    let message = match err.downcast_ref::<poem_openapi::error::ParseParamError>() {
        Some(e) => format!(
            "query parameter '{}' is missing or invalid: {}",
            e.name, e.reason
        ),
        None => err.to_string(),
    };
    Reply::BadRequest(body("bad_request", message))
}

/// Errors no endpoint answered (no such path, a method the path does not serve) in the same
/// shape as all others.
pub async fn routing(err: poem::Error) -> poem::Response {
    let status = err.status();
    let (code, message) = match status {
        StatusCode::NOT_FOUND => ("not_found", "no such path; see /docs".to_owned()),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            format!("this path answers {ALLOWED_METHODS} only"),
        ),
        s if s.is_client_error() => ("bad_request", err.to_string()),
        _ => {
            tracing::error!(error = %err, "request failed");
            (
                "internal",
                "the request failed; see the server log".to_owned(),
            )
        }
    };
    let mut response = body(code, message).into_response();
    response.set_status(status);
    if status == StatusCode::METHOD_NOT_ALLOWED {
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
    }
    response
}

/// A handler that panicked: a 500 in the one error shape.
pub fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> poem::Response {
    let mut response = body(
        "internal",
        "the request failed; see the server log".to_owned(),
    )
    .into_response();
    response.set_status(StatusCode::INTERNAL_SERVER_ERROR);
    response
}
