//! sensorhub: MQTT sensor readings in, queryable history out, in one process.
//!
//! # Layout
//!
//! The modules follow the flow of a reading:
//!
//! - [`broker`]: the embedded rumqttd broker; its capture codec writes every `sensors/#` and
//!   Sparkplug B message to the local log before the broker acknowledges it;
//! - [`journal`]: the local log on disk, the pipeline's spine;
//! - [`ingest`]: reads the log, judges messages, stores readings and dead letters, feeds and
//!   repairs the Redis latest sets;
//! - [`store`]: MongoDB (history, dead letters);
//! - [`cache`]: Redis (latest ten per sensor and overall);
//! - [`live`]: the fan-out of newly stored readings to `/stream` subscribers;
//! - [`api`]: the HTTP API, OpenAPI document, UI and live page;
//! - [`simulator`]: simulated sensors over real MQTT;
//! - [`auth`]: device credentials and grants, enforced by the broker's codec; the HTTP API's
//!   bearer keys, checked by the API;
//! - [`tls`]: certificates for MQTT over TLS and HTTPS, reloaded on SIGHUP;
//! - [`domain`]: the vocabulary underneath (readings, timestamps, decoding), pure;
//! - [`sparkplug`]: Sparkplug B topics, payloads and edge-node sessions, pure like `domain`;
//! - [`metrics`]: counters shared by all stages;
//! - [`health`]: readiness checks, run in the background, reported by `/health/ready`;
//! - [`config`], [`app`], [`cli`]: settings, wiring and the command line.
//!
//! Dependencies point one way: `domain`, `metrics`, `health`, `auth` and `tls` import nothing
//! else of ours (`metrics` reads `domain`, `sparkplug` only `domain`); `broker` imports those; `journal`, `store`, `cache` and
//! `live` import only `domain` and `metrics`; `ingest` joins the adapters; `api` reads
//! `store` and `cache`, checks keys with `auth`, and never touches the broker; only `app`
//! knows everything.

pub mod api;
pub mod app;
pub mod auth;
pub mod broker;
pub mod cache;
pub mod cli;
pub mod config;
pub mod domain;
pub mod health;
pub mod ingest;
pub mod journal;
pub mod live;
pub mod metrics;
pub mod simulator;
pub mod sparkplug;
pub mod store;
pub mod tls;

/// An error with its causes, `outer: cause: root`, for the one log line that reports it.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
