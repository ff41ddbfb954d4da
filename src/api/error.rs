//! The one mapping from what went wrong to an HTTP status, and the error body that goes with it.

use poem::IntoResponse;
use poem_openapi::payload::{Json, Payload};

use super::types::{ErrorBody, Reply};
use crate::store::StoreError;

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
                // Logged once, here, with its cause; the client gets the sentence.
                tracing::warn!(error = crate::error_chain(&e), "request failed on MongoDB");
                Reply::Unavailable(body("unavailable", e.to_string()))
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
