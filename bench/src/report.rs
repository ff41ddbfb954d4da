//! The one table the benchmark ends with, the machine it ran on, and the details and problems
//! gathered on the way. Rendered as Markdown so a run can be pasted into BENCHMARKS.md as is.

use std::fmt::Write as _;

/// Whether a measurement met its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    /// A reference value, or a target that could not be judged (its scenario failed).
    Info,
}

#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub target: String,
    pub measured: String,
    /// "0.54 of ceiling", "1.3x target", ... (empty when a ratio means nothing).
    pub ratio: String,
    pub verdict: Verdict,
}

/// A table of its own under the main one: a sweep of configurations, say.
#[derive(Debug, Clone)]
pub struct Table {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

/// Everything the run found.
#[derive(Debug, Default)]
pub struct Report {
    pub facts: Vec<(String, String)>,
    pub rows: Vec<Row>,
    /// Shown after the main table, before the details.
    pub tables: Vec<Table>,
    /// Supporting numbers: configurations tried, CPU shares, achieved background rates.
    pub details: Vec<String>,
    /// Warnings and errors in sensorhub's logs, failed scenarios, invalid runs.
    pub problems: Vec<String>,
}

impl Report {
    pub fn row(
        &mut self,
        scenario: impl Into<String>,
        target: impl Into<String>,
        measured: impl Into<String>,
        ratio: impl Into<String>,
        verdict: Verdict,
    ) {
        self.rows.push(Row {
            scenario: scenario.into(),
            target: target.into(),
            measured: measured.into(),
            ratio: ratio.into(),
            verdict,
        });
    }

    pub fn table(&mut self, table: Table) {
        self.tables.push(table);
    }

    pub fn detail(&mut self, scenario: &str, text: impl AsRef<str>) {
        let line = format!("{scenario}: {}", text.as_ref());
        tracing::info!("{line}");
        self.details.push(line);
    }

    pub fn problem(&mut self, scenario: &str, text: impl AsRef<str>) {
        let line = format!("{scenario}: {}", text.as_ref());
        tracing::warn!("{line}");
        self.problems.push(line);
    }

    /// The report as Markdown.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "## sensorhub benchmark\n");
        for (name, value) in &self.facts {
            let _ = writeln!(out, "- {name}: {value}");
        }
        let header = ["scenario", "target", "measured", "ratio / verdict"].map(String::from);
        let cells: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                let verdict = match r.verdict {
                    Verdict::Pass => "PASS",
                    Verdict::Fail => "FAIL",
                    Verdict::Info => "",
                };
                let judged = match (r.ratio.is_empty(), verdict.is_empty()) {
                    (true, _) => verdict.to_owned(),
                    (false, true) => r.ratio.clone(),
                    (false, false) => format!("{} {verdict}", r.ratio),
                };
                vec![
                    r.scenario.clone(),
                    r.target.clone(),
                    r.measured.clone(),
                    judged,
                ]
            })
            .collect();
        let _ = writeln!(out);
        out.push_str(&aligned(&header, &cells));
        for table in &self.tables {
            let _ = writeln!(out, "\n{}\n", table.title);
            out.push_str(&aligned(&table.header, &table.rows));
        }
        if !self.details.is_empty() {
            let _ = writeln!(out, "\nDetails:");
            for d in &self.details {
                let _ = writeln!(out, "- {d}");
            }
        }
        let _ = writeln!(out, "\nProblems seen:");
        if self.problems.is_empty() {
            let _ = writeln!(out, "- none");
        }
        for p in &self.problems {
            let _ = writeln!(out, "- {p}");
        }
        out
    }
}

/// A Markdown table with its columns padded to one width, readable as plain text too.
fn aligned(header: &[String], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(header);
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    let _ = writeln!(out, "|-{}-|", rule.join("-|-"));
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

/// 41234.6 -> "41,235".
pub fn thousands(value: f64) -> String {
    if !value.is_finite() {
        return "n/a".to_owned();
    }
    let digits = format!("{:.0}", value.abs());
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    if value < -0.5 {
        grouped.insert(0, '-');
    }
    grouped
}

pub fn millis(d: std::time::Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1e3)
    } else if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

pub fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Nearest-rank percentile of sorted values.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Machine facts: CPUs, CPU model, load, tool versions, the commit measured.
pub fn machine_facts() -> Vec<(String, String)> {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let kib: f64 = info
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(format!("{:.1} GiB", kib / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "unknown".into());
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let dirty = command_line("git", &["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|s| !s.is_empty());
    let commit = command_line("git", &["rev-parse", "--short", "HEAD"])
        .map(|c| {
            if dirty {
                format!("{c} + uncommitted changes")
            } else {
                c
            }
        })
        .unwrap_or_else(|| "unknown".into());
    vec![
        ("CPUs (nproc)".into(), cpus.to_string()),
        ("CPU model".into(), model),
        ("memory".into(), memory),
        ("load average at start".into(), load),
        (
            "rustc".into(),
            command_line("rustc", &["--version"]).unwrap_or_else(|| "unknown".into()),
        ),
        (
            "MongoDB wire server".into(),
            command_line("secantusd-rs", &["--version"])
                .map(|v| v.lines().next().unwrap_or_default().to_owned())
                .unwrap_or_else(|| "unknown".into()),
        ),
        (
            "redis-server".into(),
            command_line("redis-server", &["--version"]).unwrap_or_else(|| "unknown".into()),
        ),
        ("sensorhub commit".into(), commit),
    ]
}

fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_numbers() {
        assert_eq!(thousands(41234.6), "41,235");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1_000_000.0), "1,000,000");
        assert_eq!(thousands(-1234.0), "-1,234");
        assert_eq!(millis(std::time::Duration::from_micros(4120)), "4.12 ms");
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u32> = (1..=200).collect();
        assert_eq!(percentile(&v, 50.0), Some(100));
        assert_eq!(percentile(&v, 99.0), Some(198));
        assert_eq!(percentile(&v, 100.0), Some(200));
        assert_eq!(percentile::<u32>(&[], 99.0), None);
    }

    #[test]
    fn renders_an_aligned_table() {
        let mut r = Report::default();
        r.row("ingest", ">= 1", "2", "2.0x", Verdict::Pass);
        r.row("ceiling", "", "70,000 docs/s", "reference", Verdict::Info);
        let text = r.render();
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with('|')).collect();
        assert_eq!(lines.len(), 4);
        assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{text}");
        assert!(text.contains("2.0x PASS"));
    }

    #[test]
    fn renders_extra_tables_between_the_main_one_and_the_details() {
        let mut r = Report::default();
        r.row("ceiling", "reference", "70,000 docs/s", "", Verdict::Info);
        r.table(Table {
            title: "Sweep:".into(),
            header: vec!["batch".into(), "1".into(), "2".into()],
            rows: vec![
                vec!["250".into(), "9,000".into(), "12,000 (best)".into()],
                vec!["1000".into(), "11,000".into(), "n/a".into()],
            ],
        });
        r.detail("ceiling", "more");
        let text = r.render();
        let (main, rest) = text.split_once("Sweep:").unwrap();
        assert_eq!(main.lines().filter(|l| l.starts_with('|')).count(), 3);
        let sweep: Vec<&str> = rest.lines().filter(|l| l.starts_with('|')).collect();
        assert_eq!(sweep.len(), 4, "{text}");
        assert!(sweep.iter().all(|l| l.len() == sweep[0].len()), "{text}");
        let (best, details) = (rest.find("12,000 (best)"), rest.find("Details:"));
        assert!(best.unwrap() < details.unwrap(), "{text}");
    }
}
