//! Topic templates: how an operator whose devices publish on `plant/<site>/<line>/<sensor>`
//! rather than `sensors/<kind>` tells sensorhub which topic level is which.
//!
//! A template is a topic filter whose single-level wildcards carry names:
//! `plant/+site/+line/+sensor_id/+kind`. `+sensor_id` (required) and `+kind` (optional) give
//! the reading's fields; any other `+name` gives a tag stored with the reading; a bare `+`
//! matches a level that is not kept. Templates are checked once, at start, so that every topic
//! matches at most one of them, and none reaches into `sensors/...` (always the default) or
//! the broker's `$` topics. Pure: no I/O.

use std::fmt;

/// The longest tag name, in bytes.
pub const MAX_TAG_NAME_BYTES: usize = 32;
/// The longest tag value (a topic level), in bytes.
pub const MAX_TAG_VALUE_BYTES: usize = 128;

/// First levels a template may not start with: `sensors` is the default pipeline's, and
/// `spBv1.0` Sparkplug B's.
const RESERVED_FIRST_LEVELS: [&str; 2] = ["sensors", "spBv1.0"];

#[derive(Clone, Debug, PartialEq, Eq)]
enum Level {
    Literal(String),
    /// `+`: any level, not kept.
    Any,
    SensorId,
    Kind,
    /// `+name`: any level, kept as the tag `name`.
    Tag(String),
}

impl Level {
    fn is_wildcard(&self) -> bool {
        !matches!(self, Level::Literal(_))
    }
}

/// One template, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicTemplate {
    text: String,
    levels: Vec<Level>,
}

/// What a matching topic says about its readings, borrowed from the topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicFields<'t> {
    /// The template that matched, as the operator wrote it.
    pub template: &'t str,
    pub sensor_id: &'t str,
    pub kind: Option<&'t str>,
    /// (name, level text), in the template's order.
    pub tags: Vec<(&'t str, &'t str)>,
}

impl TopicTemplate {
    /// Parses `text`; the error says what is wrong with it, for a message that names the key.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("a template is empty".into());
        }
        let mut levels = Vec::new();
        let (mut sensor_id, mut kind) = (false, false);
        let mut tags: Vec<&str> = Vec::new();
        for (i, level) in text.split('/').enumerate() {
            let parsed = if level == "+" {
                Level::Any
            } else if let Some(name) = level.strip_prefix('+') {
                match name {
                    "sensor_id" if sensor_id => {
                        return Err(format!("'{text}' names +sensor_id twice"));
                    }
                    "sensor_id" => {
                        sensor_id = true;
                        Level::SensorId
                    }
                    "kind" if kind => return Err(format!("'{text}' names +kind twice")),
                    "kind" => {
                        kind = true;
                        Level::Kind
                    }
                    tag => {
                        check_tag_name(tag)
                            .map_err(|why| format!("'{text}': level {} '+{tag}' {why}", i + 1))?;
                        if tags.contains(&tag) {
                            return Err(format!("'{text}' names the tag +{tag} twice"));
                        }
                        tags.push(tag);
                        Level::Tag(tag.to_owned())
                    }
                }
            } else if level == "#" {
                return Err(format!(
                    "'{text}': '#' is not allowed in a template; name each level (+name) or \
                     match it with a bare +"
                ));
            } else if level.contains(['+', '#']) {
                return Err(format!(
                    "'{text}': level {} '{level}' mixes a wildcard with text; a level is \
                     either text, + or +name",
                    i + 1
                ));
            } else if level.is_empty() {
                return Err(format!("'{text}': level {} is empty", i + 1));
            } else if level.chars().any(char::is_control) {
                return Err(format!(
                    "'{text}': level {} holds a control character",
                    i + 1
                ));
            } else {
                Level::Literal(level.to_owned())
            };
            levels.push(parsed);
        }
        match levels.first() {
            Some(Level::Literal(first)) if first.starts_with('$') => {
                return Err(format!(
                    "'{text}' starts with '{first}': topics beginning with $ are the broker's"
                ));
            }
            Some(Level::Literal(first)) if RESERVED_FIRST_LEVELS.contains(&first.as_str()) => {
                return Err(format!(
                    "'{text}' starts with '{first}', whose topics sensorhub already reads \
                     ({first}/...); choose another first level"
                ));
            }
            Some(Level::Literal(_)) => {}
            _ => {
                return Err(format!(
                    "'{text}' starts with a wildcard: the first level must be text (such as \
                     plant/+site/+sensor_id/+kind), so the template cannot overlap sensors/#"
                ));
            }
        }
        if !sensor_id {
            return Err(format!(
                "'{text}' has no +sensor_id level: a template must say which level names the \
                 sensor (devices whose payload names it publish under sensors/<kind>)"
            ));
        }
        Ok(Self {
            text: text.to_owned(),
            levels,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The MQTT subscription filter of the topics it matches: each named level a bare `+`.
    pub fn filter(&self) -> String {
        let levels: Vec<&str> = self
            .levels
            .iter()
            .map(|l| match l {
                Level::Literal(text) => text.as_str(),
                _ => "+",
            })
            .collect();
        levels.join("/")
    }

    /// The fields of `topic`, when it matches. Levels may be empty (MQTT's `+` matches an
    /// empty level); judging their contents is the decoder's job.
    pub fn fields<'t>(&'t self, topic: &'t str) -> Option<TopicFields<'t>> {
        let mut parts = topic.split('/');
        let mut fields = TopicFields {
            template: &self.text,
            sensor_id: "",
            kind: None,
            tags: Vec::new(),
        };
        for level in &self.levels {
            let part = parts.next()?;
            match level {
                Level::Literal(text) if text != part => return None,
                Level::Literal(_) | Level::Any => {}
                Level::SensorId => fields.sensor_id = part,
                Level::Kind => fields.kind = Some(part),
                Level::Tag(name) => fields.tags.push((name, part)),
            }
        }
        parts.next().is_none().then_some(fields)
    }

    /// Whether some topic matches both: same depth, and at every level a wildcard or the same
    /// text.
    fn overlaps(&self, other: &Self) -> bool {
        self.levels.len() == other.levels.len()
            && self
                .levels
                .iter()
                .zip(&other.levels)
                .all(|(a, b)| a.is_wildcard() || b.is_wildcard() || a == b)
    }
}

impl fmt::Display for TopicTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn check_tag_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_TAG_NAME_BYTES {
        return Err(format!("needs a name of 1 to {MAX_TAG_NAME_BYTES} bytes"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphabetic())
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err("is not a tag name: a letter, then letters, digits, '_' or '-'".into());
    }
    Ok(())
}

/// The operator's templates, checked against each other. Empty by default: `sensors/#` alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Templates(Vec<TopicTemplate>);

impl Templates {
    /// Parses every template and refuses overlaps; the error names the template by position
    /// (`[i]`, from 0) for a message that names the key.
    pub fn parse<S: AsRef<str>>(texts: &[S]) -> Result<Self, String> {
        let mut templates: Vec<TopicTemplate> = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let template = TopicTemplate::parse(text.as_ref()).map_err(|e| format!("[{i}] {e}"))?;
            if let Some((j, earlier)) = templates
                .iter()
                .enumerate()
                .find(|(_, t)| t.overlaps(&template))
            {
                return Err(format!(
                    "[{j}] '{earlier}' and [{i}] '{template}' overlap: a topic such as '{}' \
                     matches both; make a literal level tell them apart",
                    example_of_overlap(earlier, &template)
                ));
            }
            templates.push(template);
        }
        Ok(Self(templates))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &TopicTemplate> {
        self.0.iter()
    }

    /// The template `topic` matches, with its fields.
    pub fn fields<'t>(&'t self, topic: &'t str) -> Option<TopicFields<'t>> {
        self.0.iter().find_map(|t| t.fields(topic))
    }

    /// Whether `topic` matches a template (and so is captured and judged).
    pub fn matches(&self, topic: &[u8]) -> bool {
        std::str::from_utf8(topic).is_ok_and(|topic| self.fields(topic).is_some())
    }
}

/// A topic both templates match (they overlap): each level the literal of either, else `x`.
fn example_of_overlap(a: &TopicTemplate, b: &TopicTemplate) -> String {
    let levels: Vec<&str> = a
        .levels
        .iter()
        .zip(&b.levels)
        .map(|pair| match pair {
            (Level::Literal(t), _) | (_, Level::Literal(t)) => t.as_str(),
            _ => "x",
        })
        .collect();
    levels.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_names_levels_and_keeps_tags_in_order() {
        let t = TopicTemplate::parse("plant/+site/+line/+sensor_id/+kind").unwrap();
        assert_eq!(t.filter(), "plant/+/+/+/+");
        let f = t.fields("plant/berlin/l2/press-4/temperature").unwrap();
        assert_eq!(f.sensor_id, "press-4");
        assert_eq!(f.kind, Some("temperature"));
        assert_eq!(f.tags, [("site", "berlin"), ("line", "l2")]);
        assert_eq!(f.template, "plant/+site/+line/+sensor_id/+kind");
        assert!(t.fields("plant/berlin/l2/press-4").is_none(), "too short");
        assert!(t.fields("plant/a/b/c/d/e").is_none(), "too deep");
        assert!(t.fields("other/a/b/c/d").is_none(), "another literal");
        let f = t.fields("plant//l2//t").unwrap();
        assert_eq!(
            (f.sensor_id, f.tags[0].1),
            ("", ""),
            "+ matches empty levels"
        );
        let bare = TopicTemplate::parse("gw/+/+sensor_id").unwrap();
        let f = bare.fields("gw/ignored/s1").unwrap();
        assert!(f.tags.is_empty() && f.kind.is_none());
    }

    #[test]
    fn bad_templates_say_why() {
        for (text, says) in [
            ("", "empty"),
            ("plant/+site/+kind", "no +sensor_id"),
            ("+site/+sensor_id", "starts with a wildcard"),
            ("sensors/+sensor_id/+kind", "starts with 'sensors'"),
            ("spBv1.0/+sensor_id", "starts with 'spBv1.0'"),
            ("$SYS/+sensor_id", "broker's"),
            ("plant/#", "'#' is not allowed"),
            ("plant/a+/+sensor_id", "mixes a wildcard"),
            ("plant//+sensor_id", "level 2 is empty"),
            ("plant/+sensor_id/+sensor_id", "+sensor_id twice"),
            ("plant/+kind/+sensor_id/+kind", "+kind twice"),
            ("plant/+a/+a/+sensor_id", "tag +a twice"),
            ("plant/+9x/+sensor_id", "not a tag name"),
            ("plant/+a.b/+sensor_id", "not a tag name"),
        ] {
            let e = TopicTemplate::parse(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn overlapping_templates_are_refused_with_an_example_topic() {
        let e =
            Templates::parse(&["plant/+site/+sensor_id", "plant/berlin/+sensor_id"]).unwrap_err();
        assert!(e.contains("[0]") && e.contains("[1]"), "{e}");
        assert!(e.contains("'plant/berlin/x'"), "{e}");
        // Another depth, or another literal, tells them apart.
        let ok = Templates::parse(&[
            "plant/+site/+sensor_id",
            "plant/+site/+line/+sensor_id",
            "lab/+sensor_id/+kind",
        ])
        .unwrap();
        assert!(ok.matches(b"plant/a/b"));
        assert!(ok.matches(b"plant/a/b/c"));
        assert!(!ok.matches(b"plant/a"));
        assert!(!ok.matches(b"sensors/temperature"));
        assert!(!ok.matches(b"\xff/a"));
        assert_eq!(
            ok.fields("lab/s/k").unwrap().template,
            "lab/+sensor_id/+kind"
        );
        let e = Templates::parse(&["ok/+sensor_id", "bad/+kind"]).unwrap_err();
        assert!(e.starts_with("[1] "), "{e}");
    }
}
