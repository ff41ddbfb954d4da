//! What the kernel knows about a process: resident memory and CPU time, read from `/proc`.
//!
//! The benchmark watches sensorhub from outside, as an operator would: `VmRSS` is what the
//! memory target is about, and CPU time per process shows where the two cores went (sensorhub,
//! the database, Redis, the load generator itself), which is how a bottleneck is found.

use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Resident memory of a process, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`: what the memory target is about.
    pub rss: u64,
    /// `RssAnon`: the heap and stacks, as opposed to mapped files; it tells a leak from cache.
    pub anon: u64,
}

/// The process's resident memory, `None` once it is gone.
pub fn memory(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix(name))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    };
    Some(Memory {
        rss: field("VmRSS:")?,
        anon: field("RssAnon:").unwrap_or(0),
    })
}

/// User plus system CPU time consumed so far, in seconds, including children that were waited
/// for: that is how wrk, a child of the benchmark, shows up in the benchmark's share.
pub fn cpu_seconds(pid: u32, ticks_per_second: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 to 17 of proc(5) (utime, stime, cutime, cstime); `rest` starts at field 3.
    let mut ticks = 0.0;
    for field in fields.get(11..15)? {
        ticks += field.parse::<f64>().ok()?;
    }
    Some(ticks / ticks_per_second)
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`), 100 on every common Linux.
pub fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// "sensorhub 95%, secantusd-rs 80%, ..." from `CpuMeter::shares`.
pub fn describe(shares: &[(String, f64)]) -> String {
    shares
        .iter()
        .map(|(name, share)| format!("{name} {share:.0}%"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// CPU used by named processes over a window, as a percentage of one core.
#[derive(Debug)]
pub struct CpuMeter {
    ticks: f64,
    started: Instant,
    start: Vec<(String, u32, Option<f64>)>,
}

impl CpuMeter {
    pub fn start(processes: &[(String, u32)]) -> Self {
        let ticks = ticks_per_second();
        Self {
            ticks,
            started: Instant::now(),
            start: processes
                .iter()
                .map(|(name, pid)| (name.clone(), *pid, cpu_seconds(*pid, ticks)))
                .collect(),
        }
    }

    /// "sensorhub 95%, secantusd-rs 80%, ..." for the window since `start`.
    pub fn finish(&self) -> String {
        describe(&self.shares())
    }

    /// Each process's CPU since `start`, as a percentage of one core.
    pub fn shares(&self) -> Vec<(String, f64)> {
        let wall = self.started.elapsed().as_secs_f64().max(1e-3);
        self.start
            .iter()
            .filter_map(|(name, pid, before)| {
                let used = cpu_seconds(*pid, self.ticks)? - (*before)?;
                Some((name.clone(), 100.0 * used / wall))
            })
            .collect()
    }
}

/// Samples a process's memory every second until finished.
#[derive(Debug)]
pub struct RssSampler {
    stop: CancellationToken,
    task: JoinHandle<Vec<(Duration, Memory)>>,
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let started = Instant::now();
                let mut samples = Vec::new();
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        () = stop.cancelled() => break,
                    }
                    match memory(pid) {
                        Some(m) => samples.push((started.elapsed(), m)),
                        None => break,
                    }
                }
                samples
            }
        });
        Self { stop, task }
    }

    /// The samples taken: (time since start, memory).
    pub async fn finish(self) -> Vec<(Duration, Memory)> {
        self.stop.cancel();
        self.task.await.unwrap_or_default()
    }
}

/// Least-squares slope of RSS over time, in bytes per minute.
pub fn slope_per_minute(samples: &[(Duration, u64)]) -> Option<f64> {
    if samples.len() < 3 {
        return None;
    }
    let n = samples.len() as f64;
    let xs = samples.iter().map(|(t, _)| t.as_secs_f64() / 60.0);
    let ys = samples.iter().map(|(_, rss)| *rss as f64);
    let (mean_x, mean_y) = (xs.clone().sum::<f64>() / n, ys.clone().sum::<f64>() / n);
    let (mut cov, mut var) = (0.0, 0.0);
    for (x, y) in xs.zip(ys) {
        cov += (x - mean_x) * (y - mean_y);
        var += (x - mean_x) * (x - mean_x);
    }
    (var > 0.0).then(|| cov / var)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_process() {
        let pid = std::process::id();
        let m = memory(pid).unwrap();
        assert!(m.rss > 0 && m.anon > 0 && m.anon <= m.rss, "{m:?}");
        assert!(cpu_seconds(pid, ticks_per_second()).unwrap() >= 0.0);
        assert!(memory(u32::MAX).is_none());
    }

    #[test]
    fn slope_of_a_line() {
        let samples: Vec<(Duration, u64)> = (0..10)
            .map(|s| (Duration::from_secs(s * 6), 1000 + s * 100))
            .collect();
        let slope = slope_per_minute(&samples).unwrap();
        assert!((slope - 1000.0).abs() < 1e-6, "{slope}");
        assert!(slope_per_minute(&samples[..2]).is_none());
    }
}
