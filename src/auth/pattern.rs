//! What a credential may touch: sensor id patterns (`plant3/*`) and MQTT topic filters.
//!
//! Pure string logic, no I/O.

use std::fmt;

/// A pattern of sensor ids: `*` stands for any run of characters (none included), everything
/// else for itself. `plant3/*` matches `plant3/boiler`, `*` matches every id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SensorPattern(String);

impl SensorPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("a sensor id pattern cannot be empty".into());
        }
        if text.chars().any(char::is_control) {
            return Err(format!(
                "sensor id pattern {text:?} contains a control character"
            ));
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `id` matches. Linear in `id` for each `*` segment: no backtracking blow-up.
    pub fn matches(&self, id: &str) -> bool {
        let mut parts = self.0.split('*');
        let first = parts.next().unwrap_or_default();
        let Some(mut rest) = id.strip_prefix(first) else {
            return false;
        };
        let parts: Vec<&str> = parts.collect();
        let Some((last, middle)) = parts.split_last() else {
            // No `*`: the whole id must be the pattern.
            return rest.is_empty();
        };
        for part in middle {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }
}

impl fmt::Display for SensorPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An MQTT topic filter a credential may subscribe within (`sensors/#`, `sensors/+/humidity`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterPattern(String);

impl FilterPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        valid_filter(text)?;
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether every topic `requested` can match is also matched by this pattern: a
    /// subscription to `requested` then receives nothing the credential may not read.
    pub fn covers(&self, requested: &str) -> bool {
        if valid_filter(requested).is_err() {
            return false;
        }
        let mut mine = self.0.split('/');
        let mut theirs = requested.split('/');
        let mut first = true;
        loop {
            match (mine.next(), theirs.next()) {
                (Some("#"), Some(level)) => return !(first && level.starts_with('$')),
                // `a/#` also matches `a` itself.
                (Some("#"), None) => return true,
                (Some("+"), Some(level)) => {
                    if level == "#" || (first && level.starts_with('$')) {
                        return false;
                    }
                }
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
            first = false;
        }
    }
}

impl fmt::Display for FilterPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The subscription's filter without a shared-subscription prefix (`$share/<group>/<filter>`).
pub fn unshared(filter: &str) -> &str {
    filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(filter, |(_, inner)| inner)
}

fn valid_filter(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("a topic filter cannot be empty".into());
    }
    if text.contains('\0') {
        return Err(format!("topic filter {text:?} contains NUL"));
    }
    let levels: Vec<&str> = text.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let wildcard = level.contains(['+', '#']);
        if wildcard && level.len() > 1 {
            return Err(format!("in {text:?} a wildcard must be a whole level"));
        }
        if *level == "#" && i + 1 != levels.len() {
            return Err(format!("in {text:?} '#' must be the last level"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sensor(p: &str) -> SensorPattern {
        SensorPattern::parse(p).unwrap()
    }

    fn filter(p: &str) -> FilterPattern {
        FilterPattern::parse(p).unwrap()
    }

    #[test]
    fn sensor_patterns() {
        assert!(sensor("plant3/*").matches("plant3/boiler"));
        assert!(sensor("plant3/*").matches("plant3/"));
        assert!(!sensor("plant3/*").matches("plant4/boiler"));
        assert!(!sensor("plant3/*").matches("plant3"));
        assert!(sensor("boiler-7").matches("boiler-7"));
        assert!(!sensor("boiler-7").matches("boiler-77"));
        assert!(!sensor("boiler-7").matches("xboiler-7"));
        assert!(sensor("*").matches("anything/at all"));
        assert!(sensor("temp-*-a").matches("temp-1-a"));
        assert!(!sensor("temp-*-a").matches("temp-1-b"));
        assert!(sensor("a*b*c").matches("abc"));
        assert!(sensor("a*b*c").matches("aXbYbZc"));
        assert!(!sensor("a*b*c").matches("acb"));
        // The suffix must not overlap the prefix.
        assert!(!sensor("ab*ba").matches("aba"));
        assert!(SensorPattern::parse("").is_err());
    }

    #[test]
    fn filter_coverage() {
        assert!(filter("sensors/#").covers("sensors/#"));
        assert!(filter("sensors/#").covers("sensors/temperature"));
        assert!(filter("sensors/#").covers("sensors/+/humidity"));
        assert!(filter("sensors/#").covers("sensors"));
        assert!(!filter("sensors/#").covers("#"));
        assert!(!filter("sensors/#").covers("other/x"));
        assert!(filter("sensors/+").covers("sensors/temperature"));
        assert!(filter("sensors/+").covers("sensors/+"));
        assert!(!filter("sensors/+").covers("sensors/#"));
        assert!(!filter("sensors/+").covers("sensors/a/b"));
        assert!(filter("sensors/temperature").covers("sensors/temperature"));
        assert!(!filter("sensors/temperature").covers("sensors/+"));
        // Wildcards in the first level never reach `$` topics.
        assert!(filter("#").covers("a/b"));
        assert!(!filter("#").covers("$SYS/#"));
        assert!(!filter("+/x").covers("$SYS/x"));
        assert!(filter("$SYS/#").covers("$SYS/broker"));
        // Invalid requests are never covered.
        assert!(!filter("#").covers("a/#/b"));
        assert!(!filter("#").covers("a+"));
        assert!(FilterPattern::parse("a/#/b").is_err());
    }

    #[test]
    fn shared_subscriptions_are_judged_by_their_filter() {
        assert_eq!(unshared("$share/g/sensors/#"), "sensors/#");
        assert_eq!(unshared("sensors/#"), "sensors/#");
        assert_eq!(unshared("$share/g"), "$share/g");
    }
}
