//! A MongoDB outage mid-stream: ingest paced at 20,000 readings/s while the MongoDB server is
//! frozen (SIGSTOP) for 60 s (quick: 10 s), then thawed (SIGCONT). Publishers keep getting
//! PUBACKs because readings go to the local log; afterwards every acknowledged reading must be
//! stored, none twice, none refused. Reports the log's peak backlog and how long MongoDB took to
//! catch up.
//!
//! Freezing rather than killing the server is the harsher fault for a client: connections stay
//! open and requests hang, instead of failing fast.

use std::time::{Duration, Instant};

use super::env::{Env, fetch_metrics};
use super::load::{Load, LoadSpec};
use super::report::{Report, Verdict, megabytes, thousands};
use super::targets::{OUTAGE, OUTAGE_RATE};
use super::{Plan, eventually, note_log};

/// Thaws the server however the scenario ends.
struct Frozen(u32);

impl Frozen {
    fn new(pid: u32) -> anyhow::Result<Self> {
        signal(pid, "-STOP")?;
        Ok(Self(pid))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = signal(self.0, "-CONT");
    }
}

fn signal(pid: u32, which: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .args([which, &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill {which} {pid} failed");
    Ok(())
}

pub async fn run(env: &Env, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let Some(mongo_pid) = env
        .services
        .iter()
        .find(|(name, _)| name == "secantusd-rs")
        .map(|(_, pid)| *pid)
    else {
        anyhow::bail!("the MongoDB server's pid is needed to freeze it (--mongo-pid)");
    };
    let outage = if plan.quick {
        Duration::from_secs(10)
    } else {
        OUTAGE
    };
    let hub = env.spawn("outage").await?;
    let database = hub.database.clone();
    let mut http = hub.http_client();
    let load = Load::start(LoadSpec::paced(
        hub.mqtt.port(),
        OUTAGE_RATE,
        format!("bench-{}-outage", env.run_id),
    )?)
    .await?;
    let counters = load.counters();
    tokio::time::sleep(plan.settle).await;

    let acked_before = counters.acked();
    let mut peak_backlog = 0;
    {
        let _frozen = Frozen::new(mongo_pid)?;
        let thaw_at = Instant::now() + outage;
        while Instant::now() < thaw_at {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Ok(m) = fetch_metrics(&mut http).await {
                peak_backlog = peak_backlog.max(m.journal_pending_bytes);
            }
        }
    }
    let acked_during = counters.acked() - acked_before;
    let thawed = Instant::now();
    tokio::time::sleep(plan.settle).await;
    let totals = load.stop().await?;
    let acked = totals.acked;
    let hub_ref = &hub;
    let caught_up = eventually(
        "MongoDB to hold every acknowledged reading",
        Duration::from_secs(600),
        Duration::from_millis(200),
        || async move {
            let m = fetch_metrics(&mut hub_ref.http_client()).await.ok()?;
            m.settled(acked).then(|| thawed.elapsed())
        },
    )
    .await;
    let end = fetch_metrics(&mut http).await?;
    let documents = env.count_readings(&database, true).await?;
    let log = hub.stop().await;
    note_log(report, "outage", &log);
    env.drop_database(&database).await;
    let caught_up = caught_up?;

    let seconds = outage.as_secs();
    report.detail(
        "outage",
        format!(
            "MongoDB frozen {seconds} s at {}/s: {} readings acknowledged while it was frozen, \
             local log peaked at {}, MongoDB caught up {:.1} s after the thaw",
            thousands(OUTAGE_RATE),
            thousands(acked_during as f64),
            megabytes(peak_backlog),
            caught_up.as_secs_f64()
        ),
    );
    let lost = totals.acked.saturating_sub(documents);
    report.row(
        format!(
            "Outage: MongoDB frozen {seconds} s at {}/s: loss (acked - stored)",
            thousands(OUTAGE_RATE)
        ),
        "0",
        format!("{lost} of {} acked", thousands(totals.acked as f64)),
        "",
        if lost == 0 {
            Verdict::Pass
        } else {
            Verdict::Fail
        },
    );
    let stored_twice = documents.saturating_sub(totals.published);
    report.row(
        "Outage: documents beyond readings published",
        "0",
        format!(
            "{stored_twice} ({documents} documents, {} published, {} refused)",
            totals.published, end.refused
        ),
        "",
        if stored_twice == 0 && end.refused == 0 {
            Verdict::Pass
        } else {
            Verdict::Fail
        },
    );
    Ok(())
}
