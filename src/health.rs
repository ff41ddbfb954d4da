//! Readiness: whether this process can take readings and serve them now, for orchestrators
//! (`GET /health/ready`, a load balancer, compose's healthcheck).
//!
//! Each component (broker, local log, MongoDB, Redis) has a check that the wiring builds from
//! its owner; this module only runs them. They run in one background task, every `every`,
//! all at once, each cut off after `timeout`, and the last report is kept: a request reads it
//! and never waits on a check, so a store that hangs cannot make probes pile up or hang too,
//! and a hundred probes a second cost one round of checks a second. A report older than
//! `stale_after` (the checking task stalled) counts as not ready.
//!
//! It imports nothing of ours and does no I/O of its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// What a check found: `Ok` with a note, or `Err` with what is wrong.
pub type Outcome = Result<String, String>;

/// One component's check.
pub struct Check {
    pub name: &'static str,
    run: Box<dyn Fn() -> Pin<Box<dyn Future<Output = Outcome> + Send>> + Send + Sync>,
}

impl Check {
    pub fn new<F, Fut>(name: &'static str, run: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        Self {
            name,
            run: Box::new(move || Box::pin(run())),
        }
    }
}

impl std::fmt::Debug for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Check").field("name", &self.name).finish()
    }
}

/// One component in a report.
#[derive(Clone, Debug, PartialEq)]
pub struct Component {
    pub name: &'static str,
    pub outcome: Outcome,
    /// How long the check took (up to the timeout).
    pub latency: Duration,
}

/// The components as last checked.
#[derive(Clone, Debug)]
pub struct Report {
    pub checked_at: Instant,
    pub components: Vec<Component>,
}

impl Report {
    pub fn is_ready(&self) -> bool {
        self.components.iter().all(|c| c.outcome.is_ok())
    }
}

/// The checks, and the last report of them.
#[derive(Debug)]
pub struct Readiness {
    checks: Vec<Check>,
    timeout: Duration,
    every: Duration,
    last: RwLock<Option<Report>>,
}

impl Readiness {
    /// `timeout` bounds each check; `every` is the interval between rounds.
    pub fn new(checks: Vec<Check>, timeout: Duration, every: Duration) -> Self {
        Self {
            checks,
            timeout,
            every,
            last: RwLock::new(None),
        }
    }

    /// A report older than this means the checking task no longer runs.
    pub fn stale_after(&self) -> Duration {
        (self.every + self.timeout) * 3
    }

    /// Runs every check at once, each bounded by the timeout, and keeps the report.
    pub async fn check_now(&self) -> Report {
        let rounds = self.checks.iter().map(|check| async move {
            let started = Instant::now();
            let outcome = match tokio::time::timeout(self.timeout, (check.run)()).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
            };
            Component {
                name: check.name,
                outcome,
                latency: started.elapsed(),
            }
        });
        let report = Report {
            checked_at: Instant::now(),
            components: futures_util::future::join_all(rounds).await,
        };
        *self
            .last
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(report.clone());
        report
    }

    /// Checks every `every` until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let report = self.check_now().await;
            for component in &report.components {
                if let Err(error) = &component.outcome {
                    tracing::debug!(component = component.name, %error, "not ready");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(self.every) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// The last report; `None` before the first round ended.
    pub fn last(&self) -> Option<Report> {
        self.last
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Default for Readiness {
    /// No checks and never checked: never ready.
    fn default() -> Self {
        Self::new(Vec::new(), Duration::from_secs(1), Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_check_that_hangs_is_cut_off_and_the_others_still_count() {
        let readiness = Readiness::new(
            vec![
                Check::new("fine", || async { Ok("up".to_owned()) }),
                Check::new("hangs", std::future::pending),
                Check::new("fails", || async { Err("refused".to_owned()) }),
            ],
            Duration::from_millis(200),
            Duration::from_secs(1),
        );
        assert!(readiness.last().is_none(), "never checked: no report");
        let report = readiness.check_now().await;
        let outcomes: Vec<_> = report
            .components
            .iter()
            .map(|c| (c.name, c.outcome.clone()))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("fine", Ok("up".to_owned())),
                ("hangs", Err("no answer within 200 ms".to_owned())),
                ("fails", Err("refused".to_owned())),
            ]
        );
        assert!(!report.is_ready());
        assert!(report.components[1].latency >= Duration::from_millis(200));
        assert!(readiness.last().is_some_and(|r| !r.is_ready()));
    }

    #[tokio::test]
    async fn all_up_is_ready() {
        let readiness = Readiness::new(
            vec![Check::new("a", || async { Ok(String::new()) })],
            Duration::from_secs(1),
            Duration::from_secs(1),
        );
        assert!(readiness.check_now().await.is_ready());
        assert!(Readiness::default().last().is_none());
    }
}
