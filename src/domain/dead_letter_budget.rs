//! How many dead letters are worth keeping: a flood of malformed messages must not fill MongoDB
//! with copies of the same mistake, nor slow the good readings that share the writer with them.
//!
//! A budget of `per_second` stored dead letters per reason and per second of arrival. The
//! clock is the letters' own `received_at`, not the wall clock: the decision is pure, the same
//! for the same letters in the same order (a replay of the local log from the same place
//! decides as the first pass did), and testable without waiting. What is over the budget is dropped and counted, never
//! silently: the caller adds the counts to `sensorhub_dead_letters_dropped_total{reason}`.
//! It must not look at anything but the reason and the arrival time.

use super::{DeadLetter, Reason};

/// The budget's use within one second of arrival, for one reason.
#[derive(Clone, Copy, Debug, Default)]
struct Window {
    second: i64,
    used: u32,
}

/// At most `per_second` dead letters of each reason per second of arrival are kept.
#[derive(Clone, Debug)]
pub struct DeadLetterBudget {
    per_second: u32,
    windows: [Window; Reason::ALL.len()],
}

impl DeadLetterBudget {
    /// Enough to see what a misbehaving device sends and how often, at a bounded cost: at most
    /// 12,000 documents a second over every reason, against the 30,000 and more a second a
    /// flood at ingest speed would write. Above the largest burst a legitimate test sends (the
    /// malformed corpus: 328 messages, over a hundred of one reason within a second).
    pub const DEFAULT_PER_SECOND: u32 = 1000;

    /// A budget of `per_second` per reason; 0 keeps every dead letter.
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second,
            windows: [Window::default(); Reason::ALL.len()],
        }
    }

    /// Whether `letter` is within its reason's budget (and spends from it if so).
    pub fn admit(&mut self, letter: &DeadLetter) -> bool {
        if self.per_second == 0 {
            return true;
        }
        let Some(i) = Reason::ALL.iter().position(|r| *r == letter.reason) else {
            return true;
        };
        let second = letter.received_at.as_millis().div_euclid(1000);
        let window = &mut self.windows[i];
        // A new second, or the clock went back: a fresh budget either way.
        if window.second != second {
            *window = Window { second, used: 0 };
        }
        if window.used < self.per_second {
            window.used += 1;
            true
        } else {
            false
        }
    }

    /// Keeps in `letters` those within budget, in order; returns how many of each reason it
    /// dropped (reasons with none left out).
    pub fn retain(&mut self, letters: &mut Vec<DeadLetter>) -> Vec<(Reason, u64)> {
        let mut dropped = [0_u64; Reason::ALL.len()];
        letters.retain(|letter| {
            let keep = self.admit(letter);
            if !keep && let Some(i) = Reason::ALL.iter().position(|r| *r == letter.reason) {
                dropped[i] += 1;
            }
            keep
        });
        Reason::ALL
            .into_iter()
            .zip(dropped)
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

impl Default for DeadLetterBudget {
    fn default() -> Self {
        Self::new(Self::DEFAULT_PER_SECOND)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::domain::Timestamp;

    fn letter(n: usize, millis: i64, reason: Reason) -> DeadLetter {
        DeadLetter {
            id: format!("log:{n}"),
            received_at: Timestamp::from_millis(millis).unwrap(),
            topic: "sensors/t".into(),
            payload: Bytes::from_static(b"x"),
            payload_len: 1,
            reason,
            message: String::new(),
        }
    }

    #[test]
    fn keeps_the_first_of_each_reason_in_each_second_and_counts_the_rest() {
        let base = 1_767_225_600_000;
        let mut letters: Vec<DeadLetter> = (0..10)
            .map(|n| letter(n, base + 10 * n as i64, Reason::InvalidJson))
            .chain((10..13).map(|n| letter(n, base + 500, Reason::TopicInvalid)))
            .chain((13..20).map(|n| letter(n, base + 1000, Reason::InvalidJson)))
            .collect();
        let dropped = DeadLetterBudget::new(3).retain(&mut letters);
        let kept: Vec<&str> = letters.iter().map(|l| l.id.as_str()).collect();
        assert_eq!(
            kept,
            [
                "log:0", "log:1", "log:2", "log:10", "log:11", "log:12", "log:13", "log:14",
                "log:15"
            ]
        );
        assert_eq!(dropped, [(Reason::InvalidJson, 11)]);
    }

    #[test]
    fn the_same_letters_get_the_same_decision_and_zero_keeps_all() {
        let letters: Vec<DeadLetter> = (0..500)
            .map(|n| letter(n, 1_767_225_600_000 + n as i64 * 7, Reason::InvalidJson))
            .collect();
        let (mut first, mut replay) = (letters.clone(), letters.clone());
        DeadLetterBudget::new(100).retain(&mut first);
        DeadLetterBudget::new(100).retain(&mut replay);
        assert_eq!(first, replay);
        assert!(first.len() < letters.len());
        let mut all = letters.clone();
        assert!(DeadLetterBudget::new(0).retain(&mut all).is_empty());
        assert_eq!(all, letters);
    }
}
