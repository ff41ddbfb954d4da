//! HTTP throughput with wrk, the tool the issue names (`wrk -t2 -c32 --latency`): its C event
//! loop costs the shared cores much less than a Rust load client would, and its numbers are the
//! ones people compare against.

use std::time::Duration;

use anyhow::{Context as _, bail};

/// What one wrk run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct WrkResult {
    pub requests_per_sec: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub requests: u64,
    /// Responses outside 2xx/3xx.
    pub non_2xx: u64,
    /// Connect, read, write and timeout errors together.
    pub socket_errors: u64,
}

/// `wrk -v`'s first line, e.g. "wrk 4.1.0 [epoll]"; `None` when wrk is not installed.
pub async fn version() -> Option<String> {
    // `wrk -v` exits with 1 after printing its version: only a failed spawn means it is missing.
    let out = tokio::process::Command::new("wrk")
        .arg("-v")
        .output()
        .await
        .ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let line = text.lines().next()?.trim();
    Some(line.split(" Copyright").next().unwrap_or(line).to_owned())
}

/// Runs `wrk -t<threads> -c<connections> -d<duration> --latency <url>`.
pub async fn run(
    url: &str,
    threads: u32,
    connections: u32,
    duration: Duration,
) -> anyhow::Result<WrkResult> {
    let out = tokio::process::Command::new("wrk")
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("--timeout")
        .arg("5s")
        .arg("--latency")
        .arg(url)
        .kill_on_drop(true)
        .output()
        .await
        .context("cannot run wrk: install it (Debian package `wrk`)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse(&stdout).with_context(|| format!("cannot read wrk's output:\n{stdout}"))
}

/// Reads the numbers out of wrk's report.
pub fn parse(output: &str) -> anyhow::Result<WrkResult> {
    let mut result = WrkResult {
        requests_per_sec: f64::NAN,
        p50: Duration::ZERO,
        p99: Duration::ZERO,
        requests: 0,
        non_2xx: 0,
        socket_errors: 0,
    };
    let (mut p50, mut p99) = (None, None);
    for line in output.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", rate] => result.requests_per_sec = rate.parse()?,
            ["50%", latency] => p50 = Some(parse_latency(latency)?),
            ["99%", latency] => p99 = Some(parse_latency(latency)?),
            [count, "requests", "in", ..] => result.requests = count.parse()?,
            ["Non-2xx", "or", "3xx", "responses:", count] => result.non_2xx = count.parse()?,
            ["Socket", "errors:", rest @ ..] => {
                result.socket_errors = rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            _ => {}
        }
    }
    anyhow::ensure!(result.requests_per_sec.is_finite(), "no Requests/sec line");
    result.p50 = p50.context("no 50% latency line (was --latency passed?)")?;
    result.p99 = p99.context("no 99% latency line (was --latency passed?)")?;
    Ok(result)
}

/// wrk prints latencies as a number and a unit: `812.00us`, `3.12ms`, `1.02s`, `1.50m`.
fn parse_latency(text: &str) -> anyhow::Result<Duration> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("latency without a unit: {text}"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse()?;
    let seconds = match unit {
        "us" => number / 1e6,
        "ms" => number / 1e3,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        other => bail!("unknown latency unit {other}"),
    };
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Running 20s test @ http://127.0.0.1:8000/latestten/temp-0001
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.23ms    2.00ms  40.00ms   90.00%
    Req/Sec    12.50k     1.00k   15.00k    70.00%
  Latency Distribution
     50%  812.00us
     75%    1.50ms
     90%    2.00ms
     99%    4.12ms
  502312 requests in 20.00s, 300.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 12
Requests/sec:  25115.60
Transfer/sec:     15.00MB
";

    #[test]
    fn reads_wrk_output() {
        let r = parse(SAMPLE).unwrap();
        assert_eq!(r.requests_per_sec, 25115.60);
        assert_eq!(r.p50, Duration::from_micros(812));
        assert_eq!(r.p99, Duration::from_micros(4120));
        assert_eq!(r.requests, 502_312);
        assert_eq!(r.non_2xx, 12);
        assert_eq!(r.socket_errors, 3);
    }

    #[test]
    fn refuses_output_without_latencies() {
        assert!(parse("Requests/sec: 10.0\n").is_err());
        assert_eq!(parse_latency("1.50m").unwrap(), Duration::from_secs(90));
        assert!(parse_latency("12").is_err());
    }
}
