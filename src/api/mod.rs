//! The HTTP API (poem + poem-openapi): history from MongoDB, latest readings from Redis, the
//! OpenAPI document and UI, health and metrics.
//!
//! The paths of the system sensorhub replaces stay valid: `/startoenddate`, `/latestten`,
//! `/latestten/{sensor_id}`, `/allData`, `/`, `/docs`, and the spellings its users call
//! (`/alldata`, `/starttoenddate`). The rest: `sensors` (summary), `readings` (history, export,
//! aggregates, Grafana), `stream` (live), `admin` (the destructive operations), `access` (API
//! keys), `docs` (the document as served), `params` (typed parameters), `error` (the one
//! mapping to HTTP), `page/` (the live page, served as it is). Handlers translate between HTTP
//! and the domain; they never build queries or cache keys (store and cache do) and never touch
//! the broker.

mod access;
mod admin;
mod deadline;
mod docs;
mod error;
mod memo;
mod observe;
mod params;
mod probes;
mod readings;
mod sensors;
mod sparkplug;
mod stream;
mod types;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use poem::listener::TcpAcceptor;
use poem::{EndpointExt, Route, Server};
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::{Html, Json, PlainText};
use poem_openapi::{OpenApi, OpenApiService, Tags};

use crate::auth::ApiKeys;
use crate::cache::{Cache, Health};
use crate::domain::{Kind, Limits, Reading, Reason, SensorId, Timestamp, json_array};
use crate::health::Readiness;
use crate::live::Live;
use crate::metrics::{Gauges, Metrics};
use crate::store::{DeadLetterCursor, DeadLetterQuery, Store};
use access::ReadKey;
pub use deadline::WriteDeadline;
pub use error::ApiError;
use params::encode;
use types::{DeadLetterOut, HealthOut, RawJsonArray, ReadingOut, Reply};

/// Range pages hold this many readings unless `limit` says otherwise.
pub const DEFAULT_PAGE: u32 = 1000;
/// The largest page `limit` may ask for.
pub const MAX_PAGE: u32 = 10_000;

/// What the handlers read from.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub cache: Cache,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    /// Gauges owned elsewhere (the local log), read when `/metrics` is scraped.
    pub gauges: Arc<dyn Fn() -> Gauges + Send + Sync>,
    /// Range pages answered recently.
    pub ranges: Arc<memo::RangeMemo>,
    /// Newly stored readings, for `/stream`.
    pub live: Arc<Live>,
    /// A sensor without a reading for this long is stale.
    pub stale_after: Duration,
    /// The last round of readiness checks, for `/health/ready`.
    pub readiness: Arc<Readiness>,
    /// When the process started serving, for `/health/live`.
    pub started: Instant,
    /// Keys, CORS, limits and the decoder's settings.
    pub options: Arc<ApiOptions>,
}

/// Who may call the API, from where, and how much one request may ask for.
#[derive(Clone, Debug, Default)]
pub struct ApiOptions {
    /// The key file in force; `None`: the API is open.
    pub keys: Option<Arc<ApiKeys>>,
    /// Origins with CORS headers; `*` any. Empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// The longest span of a range query; `None`: no limit.
    pub max_range: Option<Duration>,
    /// What a reading may be: the decoder's settings, for replaying dead letters.
    pub limits: Limits,
}

impl ApiState {
    /// `read_cache` bounds how long a range page may be served again from memory (writes
    /// through this process retire it at once). Zero: never.
    pub fn new(
        store: Store,
        cache: Cache,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        gauges: Arc<dyn Fn() -> Gauges + Send + Sync>,
        read_cache: Duration,
    ) -> Self {
        Self {
            store,
            cache,
            health,
            metrics,
            gauges,
            ranges: Arc::new(memo::RangeMemo::new(read_cache)),
            live: Arc::default(),
            stale_after: Duration::from_secs(300),
            readiness: Arc::default(),
            started: Instant::now(),
            options: Arc::default(),
        }
    }

    /// The readiness checks `/health/ready` reports.
    pub fn with_readiness(mut self, readiness: Arc<Readiness>) -> Self {
        self.readiness = readiness;
        self
    }

    /// Keys, CORS, limits and the decoder's settings.
    pub fn with_options(mut self, options: ApiOptions) -> Self {
        self.options = Arc::new(options);
        self
    }

    /// The live feed the writer publishes to, and when a sensor counts as stale.
    pub fn with_live(mut self, live: Arc<Live>, stale_after: Duration) -> Self {
        self.live = live;
        self.stale_after = stale_after;
        self
    }
}

/// Groups of endpoints in the OpenAPI document.
#[derive(Tags)]
enum Tag {
    /// Sensors and their latest readings.
    Sensors,
    /// History: ranges, exports, aggregates.
    History,
    /// Grafana (Infinity data source).
    Grafana,
    /// Readings as they arrive.
    Live,
    /// Destructive operations: an admin key when the server runs with API keys.
    Admin,
    /// Sparkplug B edge nodes and devices.
    Sparkplug,
    /// The latest ten, dead letters, health and metrics.
    Service,
}

/// A stored instant as the API types carry it.
fn to_datetime(t: Timestamp) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(t.as_millis()) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").finish_non_exhaustive()
    }
}

struct Api {
    state: ApiState,
}

struct Pages;

#[OpenApi]
impl Pages {
    /// The live page.
    #[oai(path = "/", method = "get", hidden)]
    async fn index(&self) -> Html<&'static str> {
        Html(include_str!("page/index.html"))
    }

    #[oai(path = "/page/app.js", method = "get", hidden)]
    async fn script(&self) -> poem_openapi::payload::Response<PlainText<&'static str>> {
        poem_openapi::payload::Response::new(PlainText(include_str!("page/app.js")))
            .header("Content-Type", "text/javascript; charset=utf-8")
    }

    #[oai(path = "/page/app.css", method = "get", hidden)]
    async fn style(&self) -> poem_openapi::payload::Response<PlainText<&'static str>> {
        poem_openapi::payload::Response::new(PlainText(include_str!("page/app.css")))
            .header("Content-Type", "text/css; charset=utf-8")
    }
}

type Readings = Reply<RawJsonArray<ReadingOut>>;

#[OpenApi(tag = "Tag::Service")]
impl Api {
    /// The latest ten readings of one sensor
    ///
    /// Newest first, by the sensor's own timestamps, over all the kinds the sensor reports
    /// (a device that measures temperature and humidity under one id has both; each reading
    /// names its kind). With `kind`, the latest ten of that kind only. Served from Redis; while
    /// Redis is down or being rebuilt, and for `kind`, from MongoDB (header
    /// `X-Sensorhub-Source` says which). 404 when the sensor has no readings (of that kind).
    #[oai(path = "/latestten/:sensor_id", method = "get")]
    async fn latest_of_sensor(
        &self,
        _key: ReadKey,
        /// The sensor's id.
        sensor_id: Path<String>,
        /// Only readings of this kind (e.g. temperature).
        kind: Query<Option<String>>,
    ) -> Readings {
        // A name no reading can carry (control characters, too long) has no readings: 404.
        let none = |of_kind: String| {
            ApiError::NotFound(format!("no readings{of_kind} for sensor '{}'", sensor_id.0)).into()
        };
        let Ok(id) = SensorId::parse(&sensor_id.0) else {
            return none(String::new());
        };
        let kind = match kind.0.as_deref().map(Kind::parse).transpose() {
            Ok(kind) => kind,
            Err(_) => return none(format!(" of kind '{}'", kind.0.unwrap_or_default())),
        };
        let found = match &kind {
            None => self.latest(Some(&id)).await,
            Some(kind) => self.latest_of_kind(&id, kind).await,
        };
        match found {
            Ok((None, _)) => {
                let of_kind = kind.map(|k| format!(" of kind '{k}'")).unwrap_or_default();
                ApiError::NotFound(format!("no readings{of_kind} for sensor '{id}'")).into()
            }
            Ok((Some(body), source)) => {
                Reply::Ok(RawJsonArray::from_bytes(body), None, Some(source.into()))
            }
            Err(e) => e.into(),
        }
    }

    /// The latest ten readings over all sensors
    ///
    /// Newest first, by the sensors' own timestamps. Served from Redis; while Redis is down or
    /// being rebuilt, from MongoDB (header `X-Sensorhub-Source: mongodb`).
    #[oai(path = "/latestten", method = "get")]
    async fn latest_overall(&self, _key: ReadKey) -> Readings {
        match self.latest(None).await {
            Ok((body, source)) => Reply::Ok(
                RawJsonArray::from_bytes(body.unwrap_or_else(|| Bytes::from_static(b"[]"))),
                None,
                Some(source.into()),
            ),
            Err(e) => e.into(),
        }
    }

    /// Rejected messages
    ///
    /// Messages on `sensors/#` that were not readings, newest first, each with its reason and
    /// raw payload (first 4 KiB). Kept for the configured time (7 days by default). Paged like
    /// `/startoenddate`: follow the `Link` header.
    #[oai(path = "/deadletters", method = "get")]
    async fn dead_letters(
        &self,
        _key: ReadKey,
        /// Only this reason.
        reason: Query<Option<params::ReasonParam>>,
        /// Dead letters per page (default 100).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<u32>>,
        /// Where the page starts: the cursor in the previous page's `Link` header.
        #[oai(validator(pattern = "^-?[0-9]{1,15}:."))]
        cursor: Query<Option<String>>,
    ) -> Reply<Json<Vec<DeadLetterOut>>> {
        self.dead_letter_page(reason.0.map(|r| r.0), limit.0, cursor.0)
            .await
            .unwrap_or_else(Reply::from)
    }

    /// Health (legacy summary)
    ///
    /// Always 200 while the process serves; `status` is "degraded" while MongoDB or Redis is
    /// unreachable. Kept for existing monitors: orchestrators should use `/health/live` and
    /// `/health/ready`, which also see the MQTT listeners and the local log's disk.
    #[oai(path = "/health", method = "get")]
    async fn health(&self) -> Json<HealthOut> {
        let mongodb = tokio::time::timeout(Duration::from_secs(2), self.state.store.ping())
            .await
            .is_ok_and(|r| r.is_ok());
        let redis = self.state.health.is_up();
        let up = |ok: bool| if ok { "up" } else { "down" }.to_owned();
        Json(HealthOut {
            status: if mongodb && redis { "ok" } else { "degraded" }.to_owned(),
            mongodb: up(mongodb),
            redis: up(redis),
            journal_pending_bytes: (self.state.gauges)().journal_pending_bytes,
        })
    }

    /// Metrics
    ///
    /// Counters, gauges and histograms in the Prometheus text format (0.0.4): the pipeline,
    /// the local log's depth, MongoDB write latency, HTTP latency and responses by route
    /// template, connected MQTT clients.
    #[oai(path = "/metrics", method = "get")]
    async fn metrics(&self) -> PlainText<String> {
        let mut gauges = (self.state.gauges)();
        gauges.cache_healthy = self.state.health.is_up();
        gauges.cache_dirty_sensors = self.state.health.dirty_count() as u64;
        let mut text = self.state.metrics.render(gauges);
        let live = &self.state.live;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        text.push_str(&format!(
            "# HELP sensorhub_stream_dropped_total /stream clients dropped for falling behind.\n\
             # TYPE sensorhub_stream_dropped_total counter\n\
             sensorhub_stream_dropped_total {}\n\
             # HELP sensorhub_stream_clients /stream clients connected.\n\
             # TYPE sensorhub_stream_clients gauge\n\
             sensorhub_stream_clients {}\n",
            load(&live.dropped),
            load(&live.subscribers)
        ));
        PlainText(text)
    }
}

impl Api {
    /// The latest ten as a JSON array (`None`: there are none), and where they came from.
    async fn latest(
        &self,
        sensor: Option<&SensorId>,
    ) -> Result<(Option<Bytes>, &'static str), ApiError> {
        if self.state.health.serves(sensor) {
            match self.state.cache.latest(sensor).await {
                Ok(Some(body)) => return Ok((Some(body), "redis")),
                // An empty set may only mean the cache has not caught up: ask MongoDB.
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(
                        error = crate::error_chain(&e),
                        "Redis read failed; answering from MongoDB"
                    );
                    self.state.health.set_up(false);
                }
            }
        }
        self.latest_from_store(sensor, None).await
    }

    /// One kind of one sensor: Redis keeps a sensor's latest ten over all its kinds, so the
    /// latest ten of one kind come from MongoDB's (sensor_id, timestamp, kind) index.
    async fn latest_of_kind(
        &self,
        sensor: &SensorId,
        kind: &Kind,
    ) -> Result<(Option<Bytes>, &'static str), ApiError> {
        self.latest_from_store(Some(sensor), Some(kind)).await
    }

    async fn latest_from_store(
        &self,
        sensor: Option<&SensorId>,
        kind: Option<&Kind>,
    ) -> Result<(Option<Bytes>, &'static str), ApiError> {
        let readings = self
            .state
            .store
            .latest(sensor, kind, crate::cache::LATEST as u32)
            .await?;
        let json: Vec<String> = readings.iter().map(Reading::to_json).collect();
        let body = (!json.is_empty()).then(|| Bytes::from(json_array(&json)));
        Ok((body, "mongodb"))
    }

    async fn dead_letter_page(
        &self,
        reason: Option<Reason>,
        limit: Option<u32>,
        cursor: Option<String>,
    ) -> Result<Reply<Json<Vec<DeadLetterOut>>>, ApiError> {
        let limit = limit.unwrap_or(100);
        // Any text the cursor's pattern allows marks a place in the order.
        let before = cursor.as_deref().and_then(|c| {
            let (millis, id) = c.split_once(':')?;
            Some(DeadLetterCursor {
                received_at: Timestamp::from_millis(0)?.saturating_add_millis(millis.parse().ok()?),
                id: id.to_owned(),
            })
        });
        let reason_filter = reason;
        let mut letters = self
            .state
            .store
            .dead_letters(&DeadLetterQuery {
                reason: reason_filter,
                before,
                limit: limit + 1,
            })
            .await?;
        let link = (letters.len() > limit as usize).then(|| {
            letters.truncate(limit as usize);
            let last = &letters[letters.len() - 1];
            let cursor = format!("{}:{}", last.received_at.as_millis(), last.id);
            let mut url = format!("/deadletters?limit={limit}&cursor={}", encode(&cursor));
            if let Some(reason) = reason {
                url.push_str(&format!("&reason={}", reason.code()));
            }
            format!("<{url}>; rel=\"next\"")
        });
        let out = letters.into_iter().map(DeadLetterOut::from).collect();
        Ok(Reply::Ok(Json(out), link, None))
    }
}

/// The whole HTTP application: API, page, spec and UI.
pub fn app(state: ApiState) -> impl poem::Endpoint {
    let metrics = Arc::clone(&state.metrics);
    let options = Arc::clone(&state.options);
    let service = OpenApiService::new(
        (
            sensors::Sensors {
                state: state.clone(),
            },
            readings::History {
                state: state.clone(),
            },
            stream::Stream {
                state: state.clone(),
            },
            probes::Probes {
                state: state.clone(),
            },
            admin::Admin {
                state: state.clone(),
            },
            sparkplug::Sparkplug {
                state: state.clone(),
            },
            Api { state },
            Pages,
        ),
        "sensorhub",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "MQTT sensor readings as queryable history. Devices publish \
         {\"sensor_id\", \"value\", \"timestamp\"} to sensors/<kind> (or an array of them, or \
         {\"sensor_id\", \"timestamp\", \"values\": {kind: value}}; or on topics the operator's \
         templates name, whose levels give sensor_id, kind and tags), and Sparkplug B edge \
         nodes their metrics on spBv1.0/... (each metric a reading of sensor \
         <group>/<edge node>[/<device>]/<metric name>); sensorhub stores every \
         reading in MongoDB and keeps the latest ten per sensor in Redis. Every error is \
         {\"error\": code, \"message\": text}: 400 names the bad parameter, 401/403 a missing \
         or insufficient API key (only when the server runs with --api-keys), 404 an unknown \
         sensor or path, 503 (with Retry-After) the dependency that is down.",
    )
    .server("/");
    let templates = observe::Templates::from_spec(&service.spec());
    let document = Arc::new(docs::Document::new(
        &service.spec(),
        &service.swagger_ui_html(),
        options.keys.is_some(),
    ));
    let (spec, ui) = (document.spec.clone(), document.ui.clone());
    let routes = Route::new()
        .at(
            "/docs",
            poem::endpoint::make_sync(move |_| poem::web::Html(ui.clone())),
        )
        .at(
            "/openapi.json",
            poem::endpoint::make_sync(move |_| {
                poem::Response::builder()
                    .content_type("application/json")
                    .body(spec.clone())
            }),
        )
        .nest("/", service)
        .data(access::Keys(options.keys.clone()))
        .before(error::limit_body)
        .catch_all_error(error::routing);
    let cors = access::cors(&options.cors_origins);
    let listed: Arc<[String]> = options.cors_origins.clone().into();
    let routes = routes
        .with_if(cors.is_some(), cors.unwrap_or_default())
        .before(move |request| access::forget_unlisted_origin(Arc::clone(&listed), request))
        // Refusals of the CORS layer (a preflight asking for a method or header it does not
        // allow) in the same shape.
        .catch_all_error(error::routing)
        .around(move |endpoint, request| {
            let document = Arc::clone(&document);
            error::allow(endpoint, request, document)
        });
    // Every answer counted by route, the refusals of keys, CORS and limits included.
    observe::observed(routes, metrics, templates)
        .catch_all_error(error::routing)
        // A bug must still answer in the one error shape (and is logged where it panicked).
        .with(poem::middleware::CatchPanic::new().with_handler(error::panicked))
}

/// Serves `state` on `listener` until `shutdown` resolves, then lets requests in flight finish
/// for up to `grace`.
pub async fn serve(
    listener: std::net::TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
    write_timeout: Duration,
    header_timeout: Duration,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let acceptor = WriteDeadline::new(
        TcpAcceptor::from_std(listener)?,
        write_timeout,
        header_timeout,
        Arc::clone(&state.metrics),
    );
    Server::new_with_acceptor(acceptor)
        .run_with_graceful_shutdown(app(state), shutdown, Some(grace))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_json_matches_its_documented_schema() {
        let r = Reading::new(
            SensorId::parse("t\"1").unwrap(),
            Kind::parse("temperature").unwrap(),
            21.5,
            Timestamp::parse("2024-05-01T10:00:00.5Z").unwrap(),
        )
        .unwrap()
        .with_tags(crate::domain::Tags::new(vec![("site".into(), "b".into())]));
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        let object = json.as_object().unwrap();
        let mut fields: Vec<&str> = object.keys().map(String::as_str).collect();
        fields.sort_unstable();
        let meta = <ReadingOut as poem_openapi::types::Type>::schema_ref();
        let mut registry = poem_openapi::registry::Registry::new();
        <ReadingOut as poem_openapi::types::Type>::register(&mut registry);
        let schema = registry.schemas.get("Reading").unwrap();
        let mut documented: Vec<&str> = schema.properties.iter().map(|(name, _)| *name).collect();
        documented.sort_unstable();
        assert_eq!(fields, documented, "{meta:?}");
        assert_eq!(object["timestamp"], "2024-05-01T10:00:00.500Z");
        assert_eq!(object["sensor_id"], "t\"1");
    }
}
