//! The one mapping from what went wrong to an HTTP status, and the error body that goes with it:
//! `{"error": code, "message": text}` for every failure, unknown paths and methods included.

use poem::IntoResponse;
use poem::http::{HeaderValue, StatusCode, header};
use poem_openapi::payload::{Json, Payload};

use super::access::KeyRefused;
use super::docs::Document;
use super::types::{ErrorBody, Reply};
use crate::store::StoreError;

/// Seconds a client is asked to wait when MongoDB is unreachable.
const RETRY_AFTER_SECS: u32 = 5;

/// What every path answers to; the others get 405 with this `Allow`.
pub const ALLOWED_METHODS: &str = "GET, HEAD";

/// The largest request body accepted. No endpoint reads a body; this only bounds what a client
/// can make the server receive.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A dependency other than MongoDB failed; the message says what to do.
    #[error("{0}")]
    Unavailable(String),
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
            ApiError::Unavailable(message) => {
                Reply::Unavailable(body("unavailable", message), RETRY_AFTER_SECS)
            }
        }
    }
}

/// Parameters poem could not parse (a missing or mistyped query parameter): a 400 that names it.
/// A refused API key, which poem-openapi hands over the same way, keeps its 401 or 403.
pub fn bad_request<T: Payload + IntoResponse + Send>(err: poem::Error) -> Reply<T> {
    if let Some(refused) = err.downcast_ref::<KeyRefused>() {
        return match refused.challenge() {
            Some(challenge) => Reply::Unauthorized(refused.body(), challenge.to_owned()),
            None => Reply::Forbidden(refused.body()),
        };
    }
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
    if let Some(refused) = err.downcast_ref::<KeyRefused>() {
        return poem::error::ResponseError::as_response(refused);
    }
    let status = err.status();
    let (code, message) = match status {
        StatusCode::NOT_FOUND => ("not_found", "no such path; see /docs".to_owned()),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            format!("this path answers {ALLOWED_METHODS} only"),
        ),
        StatusCode::FORBIDDEN => ("forbidden", err.to_string()),
        StatusCode::PAYLOAD_TOO_LARGE => (
            "payload_too_large",
            format!("request bodies are limited to {MAX_BODY_BYTES} bytes"),
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

/// Refuses a request that declares a body larger than `MAX_BODY_BYTES` (413). A body sent
/// without a length is never read: no endpoint takes one.
pub async fn limit_body(req: poem::Request) -> poem::Result<poem::Request> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(poem::Error::from_status(StatusCode::PAYLOAD_TOO_LARGE));
    }
    Ok(req)
}

/// A 405 names the methods its path does answer to, from the document.
pub async fn allow<E: poem::Endpoint>(
    endpoint: std::sync::Arc<E>,
    request: poem::Request,
    document: std::sync::Arc<Document>,
) -> poem::Result<poem::Response> {
    let path = request.uri().path().to_owned();
    let response = endpoint.call(request).await?.into_response();
    if response.status() != StatusCode::METHOD_NOT_ALLOWED {
        return Ok(response);
    }
    let Some(methods) = document.allowed(&path).filter(|m| *m != ALLOWED_METHODS) else {
        return Ok(response);
    };
    let mut response = body(
        "method_not_allowed",
        format!("this path answers {methods} only"),
    )
    .into_response();
    response.set_status(StatusCode::METHOD_NOT_ALLOWED);
    if let Ok(value) = HeaderValue::from_str(methods) {
        response.headers_mut().insert(header::ALLOW, value);
    }
    Ok(response)
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
