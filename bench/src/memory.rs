//! Memory over time: sensorhub's RSS, sampled every second while it ingests at the target rate
//! (40,000 readings/s, or 95% of what the ingest scenario sustained if that is lower, so the
//! run measures a steady state rather than a growing backlog) for N minutes.
//!
//! "Flat" is judged on the least-squares trend after a warm-up (the first tenth of the run, at
//! least 5 s, when buffers and caches fill): its growth over the run must stay under 10 MB.

use std::time::{Duration, Instant};

use super::env::{Env, Hub, fetch_metrics};
use super::load::{Load, LoadSpec};
use super::procfs::{Memory, RssSampler, slope_per_minute};
use super::report::{Report, Verdict, megabytes, thousands};
use super::targets::{FLAT_GROWTH, MEMORY_RATE, RSS_LIMIT};
use super::{Findings, Plan, note_log};

#[derive(Debug)]
struct Measured {
    samples: Vec<(Duration, Memory)>,
    stored_rate: f64,
    backlog_bytes: u64,
}

pub async fn run(
    env: &Env,
    plan: &Plan,
    findings: &Findings,
    report: &mut Report,
) -> anyhow::Result<()> {
    let rate = plan.memory_rate.unwrap_or_else(|| {
        findings
            .ingest
            .map_or(MEMORY_RATE, |sustained| MEMORY_RATE.min(0.95 * sustained))
    });
    let hub = env.spawn("memory").await?;
    let database = hub.database.clone();
    let outcome = measure(env, plan, &hub, rate).await;
    let log = hub.stop().await;
    note_log(report, "memory", &log);
    env.drop_database(&database).await;
    let m = outcome?;

    let minutes = plan.memory.as_secs_f64() / 60.0;
    report.detail(
        "memory",
        format!(
            "paced {}/s for {minutes:.1} min: stored {}/s; unstored at the end {}; {} RSS samples",
            thousands(rate),
            thousands(m.stored_rate),
            megabytes(m.backlog_bytes),
            m.samples.len()
        ),
    );
    if m.stored_rate < 0.95 * rate {
        report.problem(
            "memory",
            format!(
                "stored only {}/s of the {}/s published: the backlog grew during the run",
                thousands(m.stored_rate),
                thousands(rate)
            ),
        );
    }
    let warmup = Duration::from_secs_f64((plan.memory.as_secs_f64() / 10.0).max(5.0));
    let steady: Vec<(Duration, u64)> = m
        .samples
        .iter()
        .filter(|(t, _)| *t >= warmup)
        .map(|(t, mem)| (*t, mem.rss))
        .collect();
    let max = m.samples.iter().map(|(_, mem)| mem.rss).max().unwrap_or(0);
    // The shape tells a plateau (buffers filling up) from a leak (a straight line).
    let tenths: Vec<String> = (0..=10)
        .filter_map(|i| {
            let at = plan.memory.mul_f64(f64::from(i) / 10.0);
            let (_, mem) = m.samples.iter().find(|(t, _)| *t >= at)?;
            Some(format!("{:.0}", mem.rss as f64 / 1e6))
        })
        .collect();
    report.detail(
        "memory",
        format!("RSS at each tenth of the run, MB: {}", tenths.join(", ")),
    );
    if let (Some((_, first)), Some((_, last))) = (
        m.samples.iter().find(|(t, _)| *t >= warmup),
        m.samples.last(),
    ) {
        report.detail(
            "memory",
            format!(
                "anonymous RSS after warm-up {}, at the end {}",
                megabytes(first.anon),
                megabytes(last.anon)
            ),
        );
    }
    let (first, last) = match (steady.first(), steady.last()) {
        (Some(first), Some(last)) => (first.1, last.1),
        _ => anyhow::bail!("no RSS samples after the warm-up: the run was too short"),
    };
    report.row(
        format!(
            "Memory: max RSS, ingest {}/s for {minutes:.1} min",
            thousands(rate)
        ),
        format!("< {}", megabytes(RSS_LIMIT)),
        format!(
            "{} (after warm-up {}, end {})",
            megabytes(max),
            megabytes(first),
            megabytes(last)
        ),
        format!("{:.2} of limit", max as f64 / RSS_LIMIT as f64),
        if max < RSS_LIMIT {
            Verdict::Pass
        } else {
            Verdict::Fail
        },
    );
    let slope = slope_per_minute(&steady);
    let span = steady
        .last()
        .zip(steady.first())
        .map_or(0.0, |(l, f)| (l.0 - f.0).as_secs_f64() / 60.0);
    let growth = slope.map(|s| s * span);
    report.row(
        "Memory: RSS trend after warm-up",
        format!("flat (growth < {})", megabytes(FLAT_GROWTH)),
        match (slope, growth) {
            (Some(s), Some(g)) => format!("{:+.2} MB/min ({:+.1} MB)", s / 1e6, g / 1e6),
            _ => "too few samples".to_owned(),
        },
        "",
        match growth {
            Some(g) if g < FLAT_GROWTH as f64 => Verdict::Pass,
            Some(_) => Verdict::Fail,
            None => Verdict::Info,
        },
    );
    Ok(())
}

async fn measure(env: &Env, plan: &Plan, hub: &Hub, rate: f64) -> anyhow::Result<Measured> {
    let rss = RssSampler::start(hub.pid);
    let mut http = hub.http_client();
    let load = Load::start(LoadSpec::paced(
        hub.mqtt.port(),
        rate,
        format!("bench-{}-memory", env.run_id),
    )?)
    .await?;
    let (began, stored_before) = (Instant::now(), fetch_metrics(&mut http).await?.stored);
    tokio::time::sleep(plan.memory).await;
    let end = fetch_metrics(&mut http).await?;
    let stored_rate =
        end.stored.saturating_sub(stored_before) as f64 / began.elapsed().as_secs_f64();
    let samples = rss.finish().await;
    load.stop().await?;
    Ok(Measured {
        samples,
        stored_rate,
        backlog_bytes: end.journal_pending_bytes,
    })
}
