//! HTTP metrics: every response's status and latency, labelled by the route template poem
//! matched (`/latestten/{sensor_id}`), never by the raw path, so the number of series is the
//! number of routes whatever clients ask for. What no route matched is `unmatched`.

use std::sync::Arc;
use std::time::Instant;

use poem::PathPattern;
use poem::{Endpoint, EndpointExt as _, IntoResponse as _, Request, Response};

use crate::metrics::Metrics;

/// Wraps `endpoint` so that each request is counted in `metrics.http`. Put it inside the
/// error mapping: an error still carries the route it came from, and its status.
pub fn observed(
    endpoint: impl Endpoint + 'static,
    metrics: Arc<Metrics>,
) -> impl Endpoint<Output = Response> {
    endpoint.around(move |inner, request: Request| {
        let metrics = Arc::clone(&metrics);
        async move {
            let started = Instant::now();
            let result = inner.call(request).await.map(|r| r.into_response());
            let (status, pattern) = match &result {
                Ok(response) => (response.status(), response.data::<PathPattern>()),
                Err(error) => (error.status(), error.data::<PathPattern>()),
            };
            let route = pattern.map_or_else(|| "unmatched".to_owned(), |p| template(&p.0));
            metrics
                .http
                .observe(&route, status.as_u16(), started.elapsed().as_secs_f64());
            result
        }
    })
}

/// poem's pattern in the OpenAPI document's spelling: `:id` as `{id}`, `*rest` as `{*rest}`.
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
    }
}
