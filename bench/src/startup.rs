//! Start to ready: from spawning the process until it answers `GET /health` with 200 and
//! accepts an MQTT CONNECT, whichever comes last. Each start has a fresh database, Redis key
//! prefix and local log, so it includes creating the indexes, as a first deployment does.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::client::mqtt_accepts;
use super::env::Env;
use super::note_log;
use super::report::{Report, Verdict, millis, percentile};
use super::targets::{STARTUP, STARTUP_RUNS};

const PATIENCE: Duration = Duration::from_secs(30);

pub async fn run(env: &Env, report: &mut Report) -> anyhow::Result<()> {
    let mut ready = Vec::with_capacity(STARTUP_RUNS);
    let mut runs = Vec::with_capacity(STARTUP_RUNS);
    for i in 0..STARTUP_RUNS {
        let scenario = format!("startup-{i}");
        let mut hub = env.launch(&scenario)?;
        let (mqtt_addr, launched) = (hub.mqtt, hub.launched);
        let client_id = format!("bench-{}-startup-{i}", env.run_id);
        let (http, mqtt) = tokio::join!(
            hub.wait_ready(PATIENCE),
            mqtt_ready(mqtt_addr, &client_id, launched)
        );
        let database = hub.database.clone();
        let log = hub.stop().await;
        note_log(report, "startup", &log);
        env.drop_database(&database).await;
        let (http, mqtt) = (http?, mqtt?);
        runs.push(format!("HTTP {} / MQTT {}", millis(http), millis(mqtt)));
        ready.push(http.max(mqtt));
    }
    report.detail("startup", format!("each run: {}", runs.join("; ")));
    ready.sort();
    let median = percentile(&ready, 50.0).unwrap_or_default();
    let max = ready.last().copied().unwrap_or_default();
    report.row(
        format!("Startup: spawn -> /health 200 and MQTT CONNACK ({STARTUP_RUNS} runs)"),
        format!("< {}", millis(STARTUP)),
        format!("median {}, max {}", millis(median), millis(max)),
        format!(
            "{:.2} of limit (max)",
            max.as_secs_f64() / STARTUP.as_secs_f64()
        ),
        if max < STARTUP {
            Verdict::Pass
        } else {
            Verdict::Fail
        },
    );
    Ok(())
}

/// Time from `launched` until the broker accepts a client.
async fn mqtt_ready(
    addr: SocketAddr,
    client_id: &str,
    launched: Instant,
) -> anyhow::Result<Duration> {
    loop {
        let attempt =
            tokio::time::timeout(Duration::from_millis(500), mqtt_accepts(addr, client_id));
        if let Ok(Ok(())) = attempt.await {
            return Ok(launched.elapsed());
        }
        anyhow::ensure!(
            launched.elapsed() < PATIENCE,
            "the MQTT listener did not accept a client within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
