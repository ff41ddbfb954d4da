//! HTTP metrics: every response's status and latency, labelled by the route template poem
//! matched, in the OpenAPI document's spelling (`/latestten/{sensor_id}`), never by the raw
//! path, so the number of series is the number of routes whatever clients ask for. What no
//! route matched is `unmatched`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use poem::PathPattern;
use poem::{Endpoint, EndpointExt as _, IntoResponse as _, Request, Response};

use crate::metrics::Metrics;

/// The document's path templates by their shape: poem-openapi registers
/// `/latestten/{sensor_id}` as `/latestten/:param0`, so parameters are matched by position.
#[derive(Debug, Default)]
pub struct Templates(HashMap<String, String>);

impl Templates {
    /// From the paths of an OpenAPI document (JSON).
    pub fn from_spec(spec: &str) -> Self {
        let paths = serde_json::from_str::<serde_json::Value>(spec)
            .ok()
            .and_then(|doc| doc.get("paths")?.as_object().cloned())
            .unwrap_or_default();
        Self(
            paths
                .keys()
                .map(|path| (shape(path), path.clone()))
                .collect(),
        )
    }

    fn route(&self, pattern: &str) -> String {
        if pattern.is_empty() {
            return "unmatched".to_owned();
        }
        self.0
            .get(&shape(pattern))
            .cloned()
            .unwrap_or_else(|| template(pattern))
    }
}

/// A path with every parameter segment (`:x`, `*x`, `{x}`) replaced by `{}`.
fn shape(path: &str) -> String {
    path.split('/')
        .map(|s| {
            if s.starts_with([':', '*', '{']) {
                "{}"
            } else {
                s
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Wraps `endpoint` so that each request is counted in `metrics.http`. Put it inside the
/// error mapping: an error still carries the route it came from, and its status.
pub fn observed(
    endpoint: impl Endpoint + 'static,
    metrics: Arc<Metrics>,
    templates: Templates,
) -> impl Endpoint<Output = Response> {
    let templates = Arc::new(templates);
    endpoint.around(move |inner, request: Request| {
        let metrics = Arc::clone(&metrics);
        let templates = Arc::clone(&templates);
        async move {
            let started = Instant::now();
            let result = inner.call(request).await.map(|r| r.into_response());
            let (status, pattern) = match &result {
                Ok(response) => (response.status(), response.data::<PathPattern>()),
                Err(error) => (error.status(), error.data::<PathPattern>()),
            };
            let route = templates.route(pattern.map_or("", |p| &p.0));
            metrics
                .http
                .observe(&route, status.as_u16(), started.elapsed().as_secs_f64());
            result
        }
    })
}

/// A pattern the document does not list (the UI's) in its spelling: `:id` as `{id}`, `*rest`
/// as `{*rest}`.
fn template(pattern: &str) -> String {
    pattern
        .split('/')
        .map(|segment| {
            if let Some(name) = segment.strip_prefix(':') {
                format!("{{{name}}}")
            } else if let Some(name) = segment.strip_prefix('*') {
                format!("{{*{name}}}")
            } else {
                segment.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_read_as_the_document_writes_them() {
        assert_eq!(template("/latestten/:sensor_id"), "/latestten/{sensor_id}");
        assert_eq!(template("/docs/*path"), "/docs/{*path}");
        assert_eq!(template("/readings/export"), "/readings/export");
        assert_eq!(template("/"), "/");
        let templates =
            Templates::from_spec(r#"{"paths": {"/latestten/{sensor_id}": {}, "/latestten": {}}}"#);
        assert_eq!(
            templates.route("/latestten/:param0"),
            "/latestten/{sensor_id}"
        );
        assert_eq!(templates.route("/latestten"), "/latestten");
        assert_eq!(templates.route("/docs/*path"), "/docs/{*path}");
        assert_eq!(templates.route(""), "unmatched");
    }
}
