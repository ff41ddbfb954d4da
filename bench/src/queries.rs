//! The query goals of issue 9, each measured against MongoDB itself in the same run:
//! `/readings/aggregate` over 86,400 readings into 1-minute buckets against the same `$group`
//! pipeline sent straight to the server, `/readings/export` of a million rows against a raw
//! cursor read of them (and sensorhub's RSS growth while it streams), and `/sensors` and
//! `/latest` latency with 100,000 sensor summaries.
//!
//! The measuring is `scripts/bench_queries/run.py` (pymongo; `scripts/bench-queries` runs it on
//! its own): this module starts the sensorhub it measures, so its log is scanned like every
//! other scenario's, runs the script against it with `--json`, and judges what it reports. The
//! Python interpreter is `$SENSORHUB_BENCH_PYTHON`, which `scripts/bench` points at a virtual
//! environment holding pymongo and requests.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;

use super::env::Env;
use super::report::{Report, Verdict, megabytes, thousands};
use super::{Plan, note_log};

/// The issue's goals: each endpoint's rate as a share of MongoDB's own,
const QUERY_RATIO: f64 = 0.8;
/// RSS growth while a million rows are exported (MB = 10^6 bytes),
const QUERY_RSS_GROWTH: u64 = 50_000_000;
/// and p99 of `/sensors` and `/latest` with 100,000 sensors.
const QUERY_LATENCY_P99: Duration = Duration::from_millis(50);

const SCRIPT: &str = "scripts/bench_queries/run.py";
/// The whole script, at full size (about five minutes here).
const PATIENCE: Duration = Duration::from_secs(1800);

pub async fn run(env: &Env, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let hub = env.spawn("queries").await?;
    let database = hub.database.clone();
    let outcome = measure(env, plan, &hub.url(""), hub.pid, &database).await;
    let log = hub.stop().await;
    note_log(report, "queries", &log);
    env.drop_database(&database).await;
    judge(&outcome?, report)
}

async fn measure(
    env: &Env,
    plan: &Plan,
    url: &str,
    pid: u32,
    database: &str,
) -> anyhow::Result<Value> {
    let python = std::env::var("SENSORHUB_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut command = Command::new(&python);
    command
        .arg(SCRIPT)
        .args([
            "--url",
            url,
            "--pid",
            &pid.to_string(),
            "--database",
            database,
        ])
        .args(["--mongodb", &env.mongodb_uri, "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if plan.quick {
        command.arg("--quick");
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot run {python} {SCRIPT} (set SENSORHUB_BENCH_PYTHON)"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let read = async {
        let mut lines = BufReader::new(stdout).lines();
        let mut last = None;
        while let Some(line) = lines.next_line().await? {
            if line.starts_with('{') {
                last = Some(line);
            } else {
                tracing::info!("queries: {line}");
            }
        }
        let status = child.wait().await?;
        anyhow::ensure!(status.success(), "{SCRIPT} exited with {status}");
        last.context("the script printed no measurements")
    };
    let line = tokio::time::timeout(PATIENCE, read)
        .await
        .with_context(|| format!("{SCRIPT} still running after {PATIENCE:?}"))??;
    serde_json::from_str(&line).context("the script's measurements are not JSON")
}

fn number(v: &Value, path: &[&str]) -> anyhow::Result<f64> {
    let mut at = v;
    for key in path {
        at = &at[key];
    }
    at.as_f64()
        .with_context(|| format!("no number at {} in the measurements", path.join(".")))
}

fn verdict(ok: bool) -> Verdict {
    if ok { Verdict::Pass } else { Verdict::Fail }
}

fn judge(m: &Value, report: &mut Report) -> anyhow::Result<()> {
    let readings = number(m, &["aggregate", "readings"])?;
    let buckets = number(m, &["aggregate", "buckets"])?;
    let (http, direct) = (
        number(m, &["aggregate", "http_per_s"])?,
        number(m, &["aggregate", "direct_per_s"])?,
    );
    let ratio = http / direct;
    report.row(
        format!(
            "Queries: /readings/aggregate, {} readings -> {} 1-minute buckets",
            thousands(readings),
            thousands(buckets)
        ),
        format!(">= {QUERY_RATIO} of the pipeline sent to MongoDB"),
        format!("{http:.2}/s (MongoDB {direct:.2}/s)"),
        format!("{ratio:.2} of MongoDB"),
        verdict(ratio >= QUERY_RATIO),
    );

    let rows = number(m, &["export", "rows"])?;
    let expected = number(m, &["export", "expected_rows"])?;
    let (http, direct) = (
        number(m, &["export", "http_rows_per_s"])?,
        number(m, &["export", "direct_rows_per_s"])?,
    );
    let ratio = http / direct;
    report.row(
        format!("Queries: /readings/export CSV, {} rows", thousands(rows)),
        format!(">= {QUERY_RATIO} of a raw cursor read"),
        format!(
            "{} rows/s (cursor {} rows/s)",
            thousands(http),
            thousands(direct)
        ),
        format!("{ratio:.2} of cursor"),
        verdict(ratio >= QUERY_RATIO && rows == expected),
    );
    if rows != expected {
        report.problem(
            "queries",
            format!(
                "the export returned {} rows, the cursor {}",
                thousands(rows),
                thousands(expected)
            ),
        );
    }
    let before = number(m, &["export", "rss_before_bytes"])? as u64;
    let peak = number(m, &["export", "rss_peak_bytes"])? as u64;
    let growth = peak.saturating_sub(before);
    report.row(
        "Queries: sensorhub RSS growth during that export",
        format!("< {}", megabytes(QUERY_RSS_GROWTH)),
        format!(
            "{} ({} -> peak {})",
            megabytes(growth),
            megabytes(before),
            megabytes(peak)
        ),
        format!("{:.2} of limit", growth as f64 / QUERY_RSS_GROWTH as f64),
        verdict(growth < QUERY_RSS_GROWTH),
    );

    let latency = m["latency"].as_array().context("no latency measurements")?;
    let limit = QUERY_LATENCY_P99.as_secs_f64() * 1e3;
    for l in latency {
        let path = l["path"].as_str().context("a latency without its path")?;
        let p99 = number(l, &["p99_ms"])?;
        report.row(
            format!(
                "Queries: GET {path} p99, {} sensors",
                thousands(number(l, &["sensors"])?)
            ),
            format!("< {limit:.0} ms"),
            format!(
                "{p99:.1} ms (p50 {:.1} ms, {} requests, {} KB each)",
                number(l, &["p50_ms"])?,
                number(l, &["requests"])?,
                thousands(number(l, &["bytes"])? / 1e3)
            ),
            format!("{:.2} of limit", p99 / limit),
            verdict(p99 < limit),
        );
    }
    report.detail(
        "queries",
        format!(
            "sensor summary on the write path: a batch of {} readings over {} sensors, \
             insert_many {:.0} ms, summary update {:.0} ms",
            thousands(number(m, &["summary", "readings"])?),
            thousands(number(m, &["summary", "sensors"])?),
            number(m, &["summary", "insert_ms"])?,
            number(m, &["summary", "update_ms"])?,
        ),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judges_every_goal_of_the_measurements() {
        let m: Value = serde_json::from_str(
            r#"{"aggregate": {"readings": 86400, "buckets": 1440, "http_per_s": 9.0,
                              "direct_per_s": 10.0},
                "export": {"rows": 1000000, "expected_rows": 1000000, "http_rows_per_s": 70000,
                           "direct_rows_per_s": 100000, "rss_before_bytes": 20000000,
                           "rss_peak_bytes": 90000000},
                "latency": [{"path": "/sensors", "sensors": 100000, "requests": 200,
                             "p50_ms": 10, "p99_ms": 20, "bytes": 400000},
                            {"path": "/latest", "sensors": 100000, "requests": 200,
                             "p50_ms": 30, "p99_ms": 60, "bytes": 100000}],
                "summary": {"readings": 3000, "sensors": 1000, "insert_ms": 40,
                            "update_ms": 20}}"#,
        )
        .unwrap();
        let mut report = Report::default();
        judge(&m, &mut report).unwrap();
        let verdicts: Vec<Verdict> = report.rows.iter().map(|r| r.verdict).collect();
        assert_eq!(
            verdicts,
            [
                Verdict::Pass, // 0.9 of the pipeline
                Verdict::Fail, // 0.7 of the cursor
                Verdict::Fail, // 70 MB
                Verdict::Pass, // /sensors 20 ms
                Verdict::Fail, // /latest 60 ms
            ]
        );
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert!(judge(&serde_json::json!({}), &mut Report::default()).is_err());
    }
}
