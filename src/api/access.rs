//! Who may call what, and from which web pages: the bearer-key guards of the data endpoints,
//! declared in the OpenAPI document as the `ApiKey` security scheme, and CORS.
//!
//! A guarded handler takes `ReadKey` or `AdminKey` as its first argument; poem-openapi then
//! lists the scheme on the operation and runs the check before any parameter is parsed, so a
//! caller without a key learns nothing about the parameters. Without a key file (`--api-keys`)
//! every guard lets everything through, and the served document marks the key optional
//! (`docs::document`). Endpoints without a guard are open on purpose: health, metrics, the
//! document and UI, the live page.

use std::sync::Arc;

use poem::http::{HeaderValue, StatusCode, header};
use poem::{IntoResponse, Request, RequestBody};
use poem_openapi::payload::Json;
use poem_openapi::registry::{MetaSecurityScheme, Registry};
use poem_openapi::{ApiExtractor, ApiExtractorType, ExtractParamOptions};

use super::types::ErrorBody;
use crate::auth::{ApiKeys, KeyRefusal, Role};

/// The scheme's name in the OpenAPI document.
pub const SCHEME: &str = "ApiKey";

/// The key file in force, handed to the guards as request data; absent: the API is open.
#[derive(Clone, Debug)]
pub struct Keys(pub Option<Arc<ApiKeys>>);

/// A refused key: 401 (none, or one the file does not hold) or 403 (a read key on an admin
/// operation), in the one error shape.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct KeyRefused {
    pub status: StatusCode,
    pub message: String,
}

impl KeyRefused {
    fn new(refusal: KeyRefusal, needed: Role) -> Self {
        let (status, message) = match refusal {
            KeyRefusal::Missing => (
                StatusCode::UNAUTHORIZED,
                "this endpoint needs an API key: send `Authorization: Bearer <key>` (keys are \
                 made with `sensorhub apikey`)"
                    .to_owned(),
            ),
            KeyRefusal::Unknown => (
                StatusCode::UNAUTHORIZED,
                "the API key is not valid (unknown, replaced or removed)".to_owned(),
            ),
            KeyRefusal::Insufficient(role) => (
                StatusCode::FORBIDDEN,
                format!(
                    "this operation needs an {} key; this key's role is {}",
                    needed.name(),
                    role.name()
                ),
            ),
        };
        Self { status, message }
    }

    /// The `error` code of the body.
    pub fn code(&self) -> &'static str {
        if self.status == StatusCode::FORBIDDEN {
            "forbidden"
        } else {
            "unauthorized"
        }
    }

    /// `WWW-Authenticate` of a 401 (RFC 6750): the scheme, and why a key sent was refused.
    pub fn challenge(&self) -> Option<&'static str> {
        (self.status == StatusCode::UNAUTHORIZED).then_some(
            if self.message.starts_with("the API key is not valid") {
                "Bearer realm=\"sensorhub\", error=\"invalid_token\""
            } else {
                "Bearer realm=\"sensorhub\""
            },
        )
    }

    pub fn body(&self) -> Json<ErrorBody> {
        Json(ErrorBody {
            error: self.code().to_owned(),
            message: self.message.clone(),
        })
    }
}

impl poem::error::ResponseError for KeyRefused {
    fn status(&self) -> StatusCode {
        self.status
    }

    fn as_response(&self) -> poem::Response {
        let mut response = self.body().into_response();
        response.set_status(self.status);
        if let Some(challenge) = self.challenge() {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

/// CORS for the configured origins; `None` when there are none (no CORS headers at all).
pub fn cors(origins: &[String]) -> Option<poem::middleware::Cors> {
    if origins.is_empty() {
        return None;
    }
    let mut cors = poem::middleware::Cors::new()
        .allow_methods(["GET", "HEAD", "POST", "DELETE"])
        .allow_headers(["authorization", "last-event-id", "accept"])
        .expose_headers([
            "link",
            "x-sensorhub-source",
            "retry-after",
            "content-disposition",
        ])
        .max_age(600);
    // poem's Cors allows every origin when none is listed: `*` is exactly that.
    if !origins.iter().any(|o| o == "*") {
        cors = cors.allow_origins(origins.iter().map(String::as_str));
    }
    Some(cors)
}

/// An origin not listed gets no CORS headers (its browser then keeps the answer from the page)
/// rather than an error: same-origin requests carry an `Origin` too. Runs before `cors`.
pub async fn forget_unlisted_origin(
    listed: Arc<[String]>,
    mut request: Request,
) -> poem::Result<Request> {
    let unlisted = request.headers().get(header::ORIGIN).is_some_and(|origin| {
        !listed
            .iter()
            .any(|l| l == "*" || origin.as_bytes() == l.as_bytes())
    });
    if unlisted {
        request.headers_mut().remove(header::ORIGIN);
    }
    Ok(request)
}

/// The bearer key of a request, if it sent one.
fn bearer(req: &Request) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

fn check(req: &Request, needed: Role) -> poem::Result<Option<String>> {
    let Some(Keys(Some(keys))) = req.data::<Keys>() else {
        return Ok(None);
    };
    match keys.check(bearer(req), needed) {
        Ok(name) => Ok(Some(name)),
        Err(refusal) => {
            let refused = KeyRefused::new(refusal, needed);
            tracing::debug!(
                path = %req.uri().path(),
                status = refused.status.as_u16(),
                "API key refused"
            );
            Err(refused.into())
        }
    }
}

fn register_scheme(registry: &mut Registry) {
    registry.create_security_scheme(
        SCHEME,
        MetaSecurityScheme {
            ty: "http",
            description: Some(
                "A key made by `sensorhub apikey FILE NAME --role read|admin`, sent as \
                 `Authorization: Bearer <key>`. Needed only when the server runs with \
                 `--api-keys`: a read key for every data endpoint, an admin key for the \
                 destructive ones. Missing or unknown: 401 with `WWW-Authenticate: Bearer`; a \
                 read key on an admin operation: 403.",
            ),
            name: None,
            key_in: None,
            scheme: Some("bearer"),
            bearer_format: Some("shk_<64 hex digits>"),
            flows: None,
            openid_connect_url: None,
        },
    );
}

macro_rules! guard {
    ($(#[$doc:meta])* $ty:ident, $role:expr) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $ty {
            /// The key's name, for the log of what it did; `None` when the API runs without
            /// keys.
            #[allow(dead_code)]
            pub name: Option<String>,
        }

        impl<'a> ApiExtractor<'a> for $ty {
            const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::SecurityScheme];
            type ParamType = ();
            type ParamRawType = ();

            fn register(registry: &mut Registry) {
                register_scheme(registry);
            }

            fn security_schemes() -> Vec<&'static str> {
                vec![SCHEME]
            }

            async fn from_request(
                req: &'a Request,
                _body: &mut RequestBody,
                _param_opts: ExtractParamOptions<Self::ParamType>,
            ) -> poem::Result<Self> {
                check(req, $role).map(|name| Self { name })
            }
        }
    };
}

guard!(
    /// A read or admin key (or no key file at all).
    ReadKey,
    Role::Read
);
guard!(
    /// An admin key (or no key file at all).
    AdminKey,
    Role::Admin
);
