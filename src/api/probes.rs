//! The orchestrators' probes: `/health/live` (the process serves) and `/health/ready` (it can
//! take readings and store them now). Readiness is read from the last background round of
//! checks (`health::Readiness`): a probe never waits on MongoDB, Redis or the disk.

use std::time::Instant;

use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::{ApiState, Tag};
use crate::health::{Component, Report};

pub struct Probes {
    pub state: ApiState,
}

/// The process is alive.
#[derive(Debug, Object)]
#[oai(rename = "Live")]
struct LiveOut {
    /// Always "alive".
    status: String,
    /// Seconds since the process started serving.
    uptime_secs: u64,
}

/// One component of readiness.
#[derive(Debug, Object)]
#[oai(rename = "ReadyComponent")]
struct ComponentOut {
    /// "up", "down", or "unknown" before the first check.
    status: String,
    /// How long its last check took, in milliseconds (a check that got no answer: the timeout).
    latency_ms: f64,
    /// When up: what was checked.
    #[oai(skip_serializing_if_is_none)]
    detail: Option<String>,
    /// When down: why.
    #[oai(skip_serializing_if_is_none)]
    error: Option<String>,
}

/// Each component's last check.
#[derive(Debug, Object)]
#[oai(rename = "ReadyComponents")]
struct ComponentsOut {
    /// The MQTT side: every listener of the embedded broker serves, or the subscription to
    /// the external broker is connected.
    broker: ComponentOut,
    /// The local log: open, not failed, its disk takes a write (a full disk is down), no
    /// recent append failed, and its unstored bytes below `--ready-max-pending-bytes`.
    journal: ComponentOut,
    /// MongoDB answers a ping within `--ready-timeout-ms`.
    mongodb: ComponentOut,
    /// Redis answers a PING within `--ready-timeout-ms`.
    redis: ComponentOut,
}

/// Readiness and its reasons.
#[derive(Debug, Object)]
#[oai(rename = "Ready")]
struct ReadyOut {
    /// "ready", or "not_ready" when a component is down, none was checked yet, or the last
    /// check is too old (the checking task stalled).
    status: String,
    /// Milliseconds since the components were last checked (they are checked every second,
    /// in the background); absent before the first check.
    #[oai(skip_serializing_if_is_none)]
    checked_ms_ago: Option<u64>,
    components: ComponentsOut,
}

#[derive(ApiResponse)]
enum ReadyResponse {
    /// Ready: every component is up.
    #[oai(status = 200)]
    Ready(Json<ReadyOut>),
    /// Not ready: the components say which is down and why.
    #[oai(status = 503)]
    NotReady(Json<ReadyOut>),
}

fn component(report: Option<&Report>, name: &str) -> ComponentOut {
    let found = report.and_then(|r| r.components.iter().find(|c| c.name == name));
    let Some(Component {
        outcome, latency, ..
    }) = found
    else {
        return ComponentOut {
            status: "unknown".into(),
            latency_ms: 0.0,
            detail: None,
            error: None,
        };
    };
    let latency_ms = latency.as_secs_f64() * 1000.0;
    match outcome {
        Ok(detail) => ComponentOut {
            status: "up".into(),
            latency_ms,
            detail: (!detail.is_empty()).then(|| detail.clone()),
            error: None,
        },
        Err(error) => ComponentOut {
            status: "down".into(),
            latency_ms,
            detail: None,
            error: Some(error.clone()),
        },
    }
}

#[OpenApi(tag = "Tag::Service")]
impl Probes {
    /// Liveness
    ///
    /// 200 while the process runs and serves HTTP. It checks no dependency: a MongoDB or
    /// Redis outage is survived (readings wait in the local log), so restarting the process
    /// for one would not help. Use `/health/ready` to decide where traffic goes.
    #[oai(path = "/health/live", method = "get")]
    async fn live(&self) -> Json<LiveOut> {
        Json(LiveOut {
            status: "alive".into(),
            uptime_secs: self.state.started.elapsed().as_secs(),
        })
    }

    /// Readiness
    ///
    /// 200 when every component is up: the MQTT listeners serve, the local log takes appends
    /// and holds fewer unstored bytes than its threshold, MongoDB and Redis answer within the
    /// timeout. Otherwise 503, with each component's status and error. The checks run in the
    /// background every second; this answers from the last round at once, so it stays fast
    /// while a dependency hangs.
    #[oai(path = "/health/ready", method = "get")]
    async fn ready(&self) -> ReadyResponse {
        let readiness = &self.state.readiness;
        let report = readiness.last();
        let age = report.as_ref().map(|r| Instant::now() - r.checked_at);
        let fresh = age.is_some_and(|age| age <= readiness.stale_after());
        let ready = fresh && report.as_ref().is_some_and(Report::is_ready);
        let out = ReadyOut {
            status: if ready { "ready" } else { "not_ready" }.into(),
            checked_ms_ago: age.map(|a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX)),
            components: ComponentsOut {
                broker: component(report.as_ref(), "broker"),
                journal: component(report.as_ref(), "journal"),
                mongodb: component(report.as_ref(), "mongodb"),
                redis: component(report.as_ref(), "redis"),
            },
        };
        if ready {
            ReadyResponse::Ready(Json(out))
        } else {
            ReadyResponse::NotReady(Json(out))
        }
    }
}
