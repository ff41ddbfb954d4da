//! Scale-out: 1, 2 and 3 sensorhub instances on one shared subscription of an external broker
//! (Debian's Mosquitto, started here), storing into one MongoDB database and one Redis. The
//! same publishers as the ingest scenario (4 connections at QoS 1, 1,000 sensors) publish to the
//! broker as fast as it acknowledges, paused while more than `--max-backlog` readings it
//! acknowledged are not yet stored by any instance; stored readings/s are counted in MongoDB
//! over the window, and then every published reading must be stored exactly once.
//!
//! On one machine the instances share its cores with the broker, the database and the
//! publishers, so this measures what an instance costs and whether instances split the stream
//! without loss, not the capacity of a cluster of machines: the scaling guide in README.md
//! does that arithmetic from these per-instance figures.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use sensorhub::domain::Timestamp;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::env::{Env, Hub, fetch_metrics, free_addr};
use super::load::{Counters, Fleet, Load, LoadSpec, Rate};
use super::procfs::{CpuMeter, describe};
use super::report::{Report, Verdict, thousands};
use super::targets::{CONNECTIONS, INFLIGHT, SENSORS};
use super::{Plan, note_log};

/// Instance counts measured, in order.
const INSTANCES: [usize; 3] = [1, 2, 3];

/// Debian's Mosquitto on a free port: no persistence (nothing restarts here), no cap on the
/// queue of a subscriber (its default of 1,000 drops acknowledged readings), 100 messages in
/// flight to each instance. The idle scenario uses it too.
pub(super) struct Mosquitto {
    pub(super) child: Child,
    pub(super) pid: u32,
    pub(super) port: u16,
}

impl Mosquitto {
    pub(super) async fn start(work: &Path) -> anyhow::Result<Self> {
        let port = free_addr()?.port();
        let conf = work.join("mosquitto-scaling.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_queued_messages 0\nmax_inflight_messages 100\n"
            ),
        )?;
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context(
                "cannot start mosquitto (Debian package `mosquitto`; scripts/setup installs it)",
            )?;
        let pid = child.id().context("mosquitto exited at once")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "mosquitto never listened on {port}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self { child, pid, port })
    }
}

/// One instance count's run.
#[derive(Debug)]
struct Measured {
    instances: usize,
    stored_rate: f64,
    /// Each instance's share of the readings stored over the window, by its own counter.
    per_instance: Vec<f64>,
    published: u64,
    documents: u64,
    duplicates: u64,
    connection_errors: u64,
    cpu: String,
}

pub async fn run(env: &Env, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let mut broker = Mosquitto::start(&env.work).await?;
    let mut runs = Vec::new();
    let mut failure = None;
    for n in INSTANCES {
        match measure(env, plan, &broker, n, report).await {
            Ok(m) => runs.push(m),
            Err(e) => {
                failure = Some(e.context(format!("{n} instance(s)")));
                break;
            }
        }
    }
    let _ = broker.child.kill().await;
    for m in &runs {
        let shares = m
            .per_instance
            .iter()
            .map(|r| thousands(*r))
            .collect::<Vec<_>>()
            .join(" + ");
        report.detail(
            "scaling",
            format!(
                "{} instance(s): {}/s stored ({shares} by each instance's counter); CPU {}",
                m.instances,
                thousands(m.stored_rate),
                m.cpu
            ),
        );
        let loss = m.published.saturating_sub(m.documents);
        report.row(
            format!(
                "Scaling: {} instance(s) on one shared subscription, stored/s",
                m.instances
            ),
            "every reading once",
            format!(
                "{}/s ({}/s per instance)",
                thousands(m.stored_rate),
                thousands(m.stored_rate / m.instances as f64)
            ),
            format!(
                "stored {} of {} published, {} duplicates",
                thousands(m.documents as f64),
                thousands(m.published as f64),
                m.duplicates
            ),
            if loss == 0 && m.documents == m.published && m.connection_errors == 0 {
                Verdict::Pass
            } else {
                Verdict::Fail
            },
        );
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn measure(
    env: &Env,
    plan: &Plan,
    broker: &Mosquitto,
    n: usize,
    report: &mut Report,
) -> anyhow::Result<Measured> {
    let database = env.database(&format!("scaling{n}"));
    let group = format!("bench-{}-{n}", env.run_id);
    let mut hubs = Vec::with_capacity(n);
    for i in 0..n {
        let extra = [
            format!("--external-broker=mqtt://127.0.0.1:{}", broker.port),
            format!("--share-group={group}"),
            format!("--external-client-id={group}-{i}"),
        ];
        let mut hub = env.launch_with(&format!("scaling{n}-{i}"), &database, &extra)?;
        hub.wait_ready(Duration::from_secs(30)).await?;
        hubs.push(hub);
    }
    // Each instance's shared subscription must be in place before anything is published, or
    // the broker delivers the first readings to nobody.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outcome = drive(env, plan, broker, &hubs, &database).await;
    for hub in hubs {
        let log = hub.stop().await;
        note_log(report, "scaling", &log);
    }
    env.drop_database(&database).await;
    let mut m = outcome?;
    m.instances = n;
    Ok(m)
}

async fn drive(
    env: &Env,
    plan: &Plan,
    broker: &Mosquitto,
    hubs: &[Hub],
    database: &str,
) -> anyhow::Result<Measured> {
    let fleet = Fleet::new(
        "",
        SENSORS,
        Timestamp::now().saturating_add_millis(-3_600_000),
    )?;
    let pause = Arc::new(AtomicBool::new(false));
    let load = Load::start(LoadSpec {
        port: broker.port,
        connections: CONNECTIONS,
        rate: plan.ingest_rate,
        inflight: INFLIGHT,
        fleet: Arc::new(fleet),
        name: format!("bench-{}-scaling{}", env.run_id, hubs.len()),
        pause: Some(Arc::clone(&pause)),
    })
    .await?;
    let bound = (plan.ingest_rate == Rate::Max && plan.max_backlog > 0).then_some(plan.max_backlog);
    let monitor_stop = CancellationToken::new();
    let monitor = tokio::spawn(watch_backlog(
        hubs.iter().map(Hub::http_client).collect(),
        load.counters(),
        bound,
        pause,
        monitor_stop.clone(),
    ));

    tokio::time::sleep(plan.ingest_warmup).await;
    let mut processes: Vec<(String, u32)> = hubs
        .iter()
        .enumerate()
        .map(|(i, h)| (format!("sensorhub {}", i + 1), h.pid))
        .collect();
    processes.push(("mosquitto".into(), broker.pid));
    processes.extend(env.services.iter().cloned());
    let (t0, c0) = counted(env, database).await?;
    let s0 = stored_each(hubs).await?;
    let cpu = CpuMeter::start(&processes);
    tokio::time::sleep(plan.ingest_window).await;
    let (t1, c1) = counted(env, database).await?;
    let s1 = stored_each(hubs).await?;
    let cpu = describe(&cpu.shares());
    let secs = (t1 - t0).as_secs_f64();

    let totals = load.stop().await?;
    monitor_stop.cancel();
    let _ = monitor.await;

    // Everything the broker acknowledged must reach MongoDB once.
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut progress, mut last) = (Instant::now(), 0);
    let duplicates = loop {
        let (settled, duplicates, pending) = settled(hubs).await?;
        if settled >= totals.published && pending == 0 {
            break duplicates;
        }
        if settled > last {
            (progress, last) = (Instant::now(), settled);
        }
        if Instant::now() > deadline || progress.elapsed() > Duration::from_secs(60) {
            break duplicates;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let documents = env.count_readings(database, true).await?;
    Ok(Measured {
        instances: hubs.len(),
        stored_rate: c1.saturating_sub(c0) as f64 / secs,
        per_instance: s0
            .iter()
            .zip(&s1)
            .map(|(a, b)| b.saturating_sub(*a) as f64 / secs)
            .collect(),
        published: totals.published,
        documents,
        duplicates,
        connection_errors: totals.errors,
        cpu,
    })
}

/// Documents now, and when they were counted (the middle of the count's round trip).
async fn counted(env: &Env, database: &str) -> anyhow::Result<(Instant, u64)> {
    let before = Instant::now();
    let count = env.count_readings(database, false).await?;
    Ok((before + before.elapsed() / 2, count))
}

/// Each instance's stored counter.
async fn stored_each(hubs: &[Hub]) -> anyhow::Result<Vec<u64>> {
    let mut out = Vec::with_capacity(hubs.len());
    for hub in hubs {
        out.push(fetch_metrics(&mut hub.http_client()).await?.stored);
    }
    Ok(out)
}

/// Over all instances: readings settled (stored, duplicate or dead-lettered), duplicates, and
/// bytes still in their local logs.
async fn settled(hubs: &[Hub]) -> anyhow::Result<(u64, u64, u64)> {
    let (mut settled, mut duplicates, mut pending) = (0, 0, 0);
    for hub in hubs {
        let m = fetch_metrics(&mut hub.http_client()).await?;
        settled += m.stored + m.duplicates + m.dead_letters;
        duplicates += m.duplicates;
        pending += m.journal_pending_bytes;
    }
    Ok((settled, duplicates, pending))
}

/// Pauses the publishers while more than `bound` readings the broker acknowledged are not
/// settled by any instance.
async fn watch_backlog(
    mut clients: Vec<super::client::HttpClient>,
    counters: Counters,
    bound: Option<u64>,
    pause: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
            () = stop.cancelled() => break,
        }
        let mut settled = 0;
        let mut complete = true;
        for http in &mut clients {
            match fetch_metrics(http).await {
                Ok(m) => settled += m.stored + m.duplicates + m.dead_letters,
                Err(_) => complete = false,
            }
        }
        if let (Some(bound), true) = (bound, complete) {
            pause.store(
                counters.acked().saturating_sub(settled) > bound,
                Ordering::Relaxed,
            );
        }
    }
    pause.store(false, Ordering::Relaxed);
}
