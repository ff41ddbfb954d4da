//! The session state of each edge node, and the judgement of one Sparkplug message against it.
//!
//! Per node: the `bdSeq` of its birth, the last `seq` (0-255, wrapping), whether it is online,
//! and the metric definitions (alias and name to data type) of the node and of each device,
//! from the births. Messages are applied in log order, one at a time; each yields readings and
//! dead letters, changes the state, and may ask for a rebirth. Everything depends only on the
//! messages and their capture times, so the same log applied from the same state gives the same
//! result.
//!
//! A message whose meaning the state cannot vouch for (an unknown alias, a gap in `seq`, data
//! before a birth) is dead-lettered whole, and so is every data message of the node after it,
//! until the next NBIRTH: a lost DBIRTH may have given the aliases other meanings, and nothing
//! may be stored under a wrong name. The dead letters keep the payload for a replay.

use std::collections::{BTreeMap, HashMap, HashSet};

use prost::Message as _;
use serde::{Deserialize, Serialize};

use super::proto::{self, Value, datatype};
use super::{BD_SEQ_METRIC, MessageType, NodeKey, Topic};
use crate::domain::{
    Captured, DeadLetter, Kind, Limits, Reading, Reason, Rejection, SensorId, Timestamp,
};

/// A rebirth request not answered within this time (of capture) may be sent again.
const REBIRTH_PATIENCE_MS: i64 = 30_000;

/// One metric as a birth declared it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricDef {
    pub name: String,
    /// The alias, as the two's complement of the u64 on the wire (BSON has no u64).
    pub alias: Option<i64>,
    pub datatype: u32,
}

/// The metrics of a node or device, found by alias and by name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "Vec<MetricDef>", into = "Vec<MetricDef>")]
pub struct Definitions {
    defs: Vec<MetricDef>,
    by_alias: HashMap<i64, usize>,
    by_name: HashMap<String, usize>,
}

impl From<Vec<MetricDef>> for Definitions {
    fn from(defs: Vec<MetricDef>) -> Self {
        let by_alias = (defs.iter().enumerate())
            .filter_map(|(i, d)| d.alias.map(|a| (a, i)))
            .collect();
        let by_name = (defs.iter().enumerate())
            .map(|(i, d)| (d.name.clone(), i))
            .collect();
        Self {
            defs,
            by_alias,
            by_name,
        }
    }
}

impl From<Definitions> for Vec<MetricDef> {
    fn from(d: Definitions) -> Self {
        d.defs
    }
}

impl Definitions {
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.defs.iter().map(|d| d.name.as_str())
    }

    pub fn len(&self) -> usize {
        self.defs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.defs.is_empty()
    }

    /// The definition a data message's metric refers to: by alias when it has one, else by name.
    fn find(&self, metric: &proto::Metric) -> Option<&MetricDef> {
        let i = match (metric.alias, &metric.name) {
            (Some(alias), _) => self.by_alias.get(&(alias as i64)),
            (None, Some(name)) => self.by_name.get(name),
            (None, None) => None,
        }?;
        self.defs.get(*i)
    }

    pub fn contains_name(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }
}

/// A device of an edge node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceSession {
    pub online: bool,
    /// Capture time (ms) of its last DBIRTH.
    pub birth_at: Option<i64>,
    /// Capture time (ms) of its last DDEATH, or of its node's death.
    pub death_at: Option<i64>,
    pub metrics: Definitions,
}

/// What sensorhub knows of one edge node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeSession {
    /// The `bdSeq` of the birth in force (as the two's complement of the wire's u64).
    pub bd_seq: Option<i64>,
    /// The `seq` of the node's last message.
    pub seq: Option<u8>,
    /// Born and not dead.
    pub online: bool,
    /// Capture time (ms) of the last NBIRTH.
    pub birth_at: Option<i64>,
    /// Capture time (ms) of the last NDEATH that counted.
    pub death_at: Option<i64>,
    pub metrics: Definitions,
    pub devices: BTreeMap<String, DeviceSession>,
    /// Set while the node's data cannot be trusted (the reason code), until its next NBIRTH.
    pub suspect: Option<String>,
    /// Capture time (ms) of the outstanding rebirth request.
    pub rebirth_requested_at: Option<i64>,
    /// The log this state was applied from, and the position up to which it was: a record of
    /// that log before it is already in this state (and its readings already stored).
    pub log_id: String,
    pub applied_to: u64,
}

/// The sessions of every edge node, applied in log order.
#[derive(Debug, Default)]
pub struct Sessions {
    nodes: HashMap<NodeKey, NodeSession>,
    /// Nodes changed since `take_changed`.
    changed: HashSet<NodeKey>,
    /// Metric name to kind, overriding the name's last segment.
    kinds: HashMap<String, Kind>,
    /// Positions, in the readings vector handed to `judge`, of historical readings.
    historical: Vec<usize>,
    /// Nodes to ask for a rebirth.
    rebirths: Vec<NodeKey>,
}

/// Why a whole message is not taken.
struct Refusal {
    reason: Reason,
    message: String,
    /// Whether the node should be asked to rebirth.
    rebirth: bool,
}

fn refuse(reason: Reason, message: impl Into<String>) -> Refusal {
    Refusal {
        reason,
        message: message.into(),
        rebirth: false,
    }
}

impl Sessions {
    /// Sessions restored from their stored state, with the operator's metric-name-to-kind map.
    pub fn new(stored: Vec<(NodeKey, NodeSession)>, kinds: HashMap<String, Kind>) -> Self {
        Self {
            nodes: stored.into_iter().collect(),
            kinds,
            ..Self::default()
        }
    }

    pub fn node(&self, key: &NodeKey) -> Option<&NodeSession> {
        self.nodes.get(key)
    }

    /// The state of every node changed since the last call, marked as applied up to `end` of
    /// `log_id`, for the store.
    pub fn take_changed(&mut self, log_id: &str, end: u64) -> Vec<(NodeKey, NodeSession)> {
        let mut out = Vec::with_capacity(self.changed.len());
        for key in self.changed.drain() {
            if let Some(node) = self.nodes.get_mut(&key) {
                node.log_id = log_id.to_owned();
                node.applied_to = end;
                out.push((key, node.clone()));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Positions of the historical readings among those judged since the last call.
    pub fn take_historical(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.historical)
    }

    /// The nodes to ask for a rebirth since the last call.
    pub fn take_rebirths(&mut self) -> Vec<NodeKey> {
        std::mem::take(&mut self.rebirths)
    }

    /// Judges one Sparkplug message (the record at `lsn` of log `log_id`): its readings go to
    /// `readings`, its dead letters (ids `<log id>:<lsn>`, or `<log id>:<lsn>:<i>` for metric
    /// `i`) to `dead`.
    pub fn judge(
        &mut self,
        log_id: &str,
        lsn: u64,
        message: &Captured,
        limits: &Limits,
        readings: &mut Vec<Reading>,
        dead: &mut Vec<DeadLetter>,
    ) {
        let id = format!("{log_id}:{lsn}");
        let topic = match std::str::from_utf8(&message.topic) {
            Ok(topic) => topic,
            Err(_) => {
                let rejection = Rejection {
                    reason: Reason::TopicInvalid,
                    message: "the topic is not UTF-8".into(),
                };
                dead.push(DeadLetter::new(id, message, rejection));
                return;
            }
        };
        let topic = match Topic::parse(topic) {
            Ok(topic) => topic,
            Err(why) => {
                let rejection = Rejection {
                    reason: Reason::TopicInvalid,
                    message: why,
                };
                dead.push(DeadLetter::new(id, message, rejection));
                return;
            }
        };
        let key = topic.node_key();
        if let Some(node) = self.nodes.get(&key)
            && node.log_id == log_id
            && lsn < node.applied_to
        {
            // Applied and stored before a restart: judging it again against a later state
            // could give other answers.
            return;
        }
        let mut metric_letters = Vec::new();
        let first = readings.len();
        let outcome = self.apply(&topic, &key, message, limits, readings, &mut metric_letters);
        if let Err(refusal) = outcome {
            readings.truncate(first);
            self.historical.retain(|i| *i < first);
            metric_letters.clear();
            if refusal.rebirth {
                self.ask_rebirth(&key, message.received_at.as_millis());
            }
            let rejection = Rejection {
                reason: refusal.reason,
                message: refusal.message,
            };
            dead.push(DeadLetter::new(id.clone(), message, rejection));
        }
        for (i, rejection) in metric_letters {
            dead.push(DeadLetter::new(format!("{id}:{i}"), message, rejection));
        }
    }

    fn ask_rebirth(&mut self, key: &NodeKey, now_ms: i64) {
        let node = self.nodes.entry(key.clone()).or_default();
        let outstanding = node
            .rebirth_requested_at
            .is_some_and(|at| now_ms.saturating_sub(at) < REBIRTH_PATIENCE_MS);
        if !outstanding {
            node.rebirth_requested_at = Some(now_ms);
            self.changed.insert(key.clone());
            self.rebirths.push(key.clone());
        }
    }

    fn apply(
        &mut self,
        topic: &Topic<'_>,
        key: &NodeKey,
        message: &Captured,
        limits: &Limits,
        readings: &mut Vec<Reading>,
        letters: &mut Vec<(usize, Rejection)>,
    ) -> Result<(), Refusal> {
        if message.payload_len > limits.max_payload_bytes {
            return Err(refuse(
                Reason::PayloadTooLarge,
                format!(
                    "the payload is {} bytes, the limit is {}",
                    message.payload_len, limits.max_payload_bytes
                ),
            ));
        }
        let payload = proto::Payload::decode(&message.payload[..]).map_err(|e| {
            refuse(
                Reason::SparkplugInvalid,
                format!("the payload is not a Sparkplug B protobuf payload: {e}"),
            )
        })?;
        let now = message.received_at.as_millis();
        self.changed.insert(key.clone());
        match topic.message {
            MessageType::NBirth => {
                let metrics = definitions(&payload)?;
                let Some(seq) = payload.seq else {
                    return Err(refuse(Reason::SparkplugInvalid, "the NBIRTH has no seq"));
                };
                let bd_seq = payload
                    .metrics
                    .iter()
                    .find(|m| m.name.as_deref() == Some(BD_SEQ_METRIC))
                    .and_then(|m| long(m.value.as_ref()));
                let node = self.nodes.entry(key.clone()).or_default();
                node.bd_seq = bd_seq;
                node.seq = Some(seq as u8);
                node.online = true;
                node.birth_at = Some(now);
                node.metrics = metrics;
                node.suspect = None;
                node.rebirth_requested_at = None;
                // A new session: each device must be born again within it.
                for device in node.devices.values_mut() {
                    device.online = false;
                    device.metrics = Definitions::default();
                }
                let prefix = key.as_str().to_owned();
                self.readings(&prefix, &payload, None, message, limits, readings, letters);
            }
            MessageType::NDeath => {
                let bd_seq = payload
                    .metrics
                    .iter()
                    .find(|m| m.name.as_deref() == Some(BD_SEQ_METRIC))
                    .and_then(|m| long(m.value.as_ref()));
                // Only the death of the session in force counts: an older connection's will
                // arriving after the new birth says nothing about the node now.
                if let Some(node) = self.nodes.get_mut(key)
                    && node.online
                    && bd_seq.is_some()
                    && bd_seq == node.bd_seq
                {
                    node.online = false;
                    node.death_at = Some(now);
                    for device in node.devices.values_mut() {
                        if device.online {
                            device.online = false;
                            device.death_at = Some(now);
                        }
                    }
                }
            }
            MessageType::NData | MessageType::DBirth | MessageType::DData | MessageType::DDeath => {
                self.check_session(topic, key, &payload)?;
                let node = self.nodes.entry(key.clone()).or_default();
                let prefix = match topic.device {
                    Some(device) => format!("{key}/{device}"),
                    None => key.as_str().to_owned(),
                };
                match (topic.message, topic.device) {
                    (MessageType::DBirth, Some(device)) => {
                        let metrics = definitions(&payload)?;
                        let device = node.devices.entry(device.to_owned()).or_default();
                        device.online = true;
                        device.birth_at = Some(now);
                        device.metrics = metrics;
                    }
                    (MessageType::DDeath, Some(device)) => {
                        let device = node.devices.entry(device.to_owned()).or_default();
                        device.online = false;
                        device.death_at = Some(now);
                        return Ok(());
                    }
                    _ => {}
                }
                // Taken out for the judging (and put back), so it is read, not copied.
                let defs = definitions_of(&mut self.nodes, key, topic.device)
                    .map(std::mem::take)
                    .unwrap_or_default();
                let unknown = (!topic.message.is_birth())
                    .then(|| {
                        (payload.metrics.iter().enumerate()).find(|(_, m)| defs.find(m).is_none())
                    })
                    .flatten();
                let outcome = match unknown {
                    Some((i, m)) => {
                        let named = match (m.alias, &m.name) {
                            (Some(alias), _) => format!("alias {alias}"),
                            (None, Some(name)) => format!("'{name}'"),
                            (None, None) => "no name and no alias".to_owned(),
                        };
                        Err(self.distrust(
                            key,
                            Reason::SparkplugUnknownAlias,
                            format!(
                                "metric {i} ({named}) was not declared by the birth in force; \
                                 the message is kept for a replay and a rebirth was requested"
                            ),
                        ))
                    }
                    None => {
                        self.readings(
                            &prefix,
                            &payload,
                            Some(&defs),
                            message,
                            limits,
                            readings,
                            letters,
                        );
                        Ok(())
                    }
                };
                if let Some(slot) = definitions_of(&mut self.nodes, key, topic.device) {
                    *slot = defs;
                }
                return outcome;
            }
        }
        Ok(())
    }

    /// Checks that a message other than NBIRTH and NDEATH continues its node's session: the node
    /// is born, trusted, and `seq` follows. Moves `seq` on.
    fn check_session(
        &mut self,
        topic: &Topic<'_>,
        key: &NodeKey,
        payload: &proto::Payload,
    ) -> Result<(), Refusal> {
        let (online, suspect, last) = match self.nodes.get(key) {
            Some(node) => (node.online, node.suspect.clone(), node.seq),
            None => (false, None, None),
        };
        if let Some(code) = suspect {
            let reason = Reason::from_code(&code).unwrap_or(Reason::SparkplugSeqGap);
            let mut refusal = refuse(
                reason,
                format!(
                    "edge node {key} is awaiting a rebirth after an earlier {code}: its data is \
                     kept for a replay, not stored under names it may no longer have"
                ),
            );
            refusal.rebirth = true;
            return Err(refusal);
        }
        if !online {
            let mut refusal = refuse(
                Reason::SparkplugNoBirth,
                format!("edge node {key} has no NBIRTH in force; a rebirth was requested"),
            );
            refusal.rebirth = true;
            return Err(refusal);
        }
        let Some(seq) = payload.seq else {
            return Err(refuse(Reason::SparkplugInvalid, "the payload has no seq"));
        };
        let expected = last.map_or(0, |s| s.wrapping_add(1));
        if seq > 255 || seq as u8 != expected {
            return Err(self.distrust(
                key,
                Reason::SparkplugSeqGap,
                format!(
                    "seq {seq} does not follow {} of edge node {key}: messages were lost; this \
                     one is kept for a replay and a rebirth was requested",
                    last.map_or("its birth".to_owned(), |s| s.to_string())
                ),
            ));
        }
        if let Some(node) = self.nodes.get_mut(key) {
            node.seq = Some(seq as u8);
        }
        if topic.message == MessageType::DData
            && let Some(device) = topic.device
            && !self
                .nodes
                .get(key)
                .and_then(|n| n.devices.get(device))
                .is_some_and(|d| d.online)
        {
            let mut refusal = refuse(
                Reason::SparkplugNoBirth,
                format!(
                    "device {device} of edge node {key} has no DBIRTH in force; a rebirth was \
                     requested"
                ),
            );
            refusal.rebirth = true;
            return Err(refusal);
        }
        Ok(())
    }

    /// Marks the node untrusted until its next birth.
    fn distrust(&mut self, key: &NodeKey, reason: Reason, message: String) -> Refusal {
        if let Some(node) = self.nodes.get_mut(key) {
            node.suspect = Some(reason.code().to_owned());
        }
        Refusal {
            reason,
            message,
            rebirth: true,
        }
    }

    /// The readings of a payload's metrics; `defs` gives the data types (a birth's own).
    #[allow(clippy::too_many_arguments)]
    fn readings(
        &mut self,
        prefix: &str,
        payload: &proto::Payload,
        defs: Option<&Definitions>,
        message: &Captured,
        limits: &Limits,
        readings: &mut Vec<Reading>,
        letters: &mut Vec<(usize, Rejection)>,
    ) {
        for (i, metric) in payload.metrics.iter().enumerate() {
            let def = defs.and_then(|d| d.find(metric));
            let (Some(name), Some(datatype)) = (
                def.map(|d| d.name.as_str()).or(metric.name.as_deref()),
                def.map(|d| d.datatype).or(metric.datatype),
            ) else {
                continue;
            };
            if metric.is_null == Some(true)
                || (prefix.matches('/').count() == 1 && name == BD_SEQ_METRIC)
            {
                // A null is the absence of a value; bdSeq is the session's, not a measurement.
                continue;
            }
            match self.reading(prefix, name, datatype, metric, payload, message, limits) {
                Ok(reading) => {
                    if metric.is_historical == Some(true) {
                        self.historical.push(readings.len());
                    }
                    readings.push(reading);
                }
                Err((reason, why)) => letters.push((
                    i,
                    Rejection {
                        reason,
                        message: format!("metric {i} '{name}': {why}"),
                    },
                )),
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn reading(
        &self,
        prefix: &str,
        name: &str,
        datatype: u32,
        metric: &proto::Metric,
        payload: &proto::Payload,
        message: &Captured,
        limits: &Limits,
    ) -> Result<Reading, (Reason, String)> {
        let value = number(datatype, metric.value.as_ref())?;
        let sensor_id = SensorId::parse(&format!("{prefix}/{name}")).map_err(|why| {
            (
                Reason::SensorIdInvalid,
                format!("the sensor id '{prefix}/{name}' is not valid: {why}"),
            )
        })?;
        let kind = match self.kinds.get(name) {
            Some(kind) => kind.clone(),
            None => {
                let last = name.rsplit('/').next().unwrap_or(name);
                Kind::parse(last).map_err(|why| {
                    (
                        Reason::SensorIdInvalid,
                        format!(
                            "the kind '{last}' (the name's last segment) is not valid: {why}; map \
                             the metric to a kind in sparkplug_kinds"
                        ),
                    )
                })?
            }
        };
        let Some(ms) = metric.timestamp.or(payload.timestamp) else {
            return Err((
                Reason::TimestampInvalid,
                "neither the metric nor the payload has a timestamp".into(),
            ));
        };
        let latest = message
            .received_at
            .saturating_add_millis(limits.max_future_skew_ms);
        let timestamp = i64::try_from(ms)
            .ok()
            .and_then(Timestamp::from_millis)
            .filter(|t| *t >= limits.earliest && *t <= latest)
            .ok_or_else(|| {
                (
                    Reason::TimestampOutOfRange,
                    format!(
                        "timestamp {ms} ms lies outside the accepted range {} to {latest}",
                        limits.earliest
                    ),
                )
            })?;
        Reading::new(sensor_id, kind, value, timestamp)
            .ok_or_else(|| (Reason::ValueNotFinite, "the value is not finite".into()))
    }
}

/// Where the metric definitions of a node, or of one of its devices, are kept.
fn definitions_of<'a>(
    nodes: &'a mut HashMap<NodeKey, NodeSession>,
    key: &NodeKey,
    device: Option<&str>,
) -> Option<&'a mut Definitions> {
    let node = nodes.get_mut(key)?;
    match device {
        None => Some(&mut node.metrics),
        Some(device) => node.devices.get_mut(device).map(|d| &mut d.metrics),
    }
}

/// The metric definitions a birth declares: each needs a name and a data type, and no alias
/// may be declared twice.
fn definitions(payload: &proto::Payload) -> Result<Definitions, Refusal> {
    let mut defs = Vec::with_capacity(payload.metrics.len());
    let mut aliases = HashMap::new();
    for (i, m) in payload.metrics.iter().enumerate() {
        let (Some(name), Some(datatype)) = (&m.name, m.datatype) else {
            return Err(refuse(
                Reason::SparkplugInvalid,
                format!("metric {i} of the birth has no name or no data type"),
            ));
        };
        let alias = m.alias.map(|a| a as i64);
        if let Some(alias) = alias
            && let Some(other) = aliases.insert(alias, name.clone())
        {
            return Err(refuse(
                Reason::SparkplugInvalid,
                format!("metric {i} '{name}' of the birth repeats alias {alias} of '{other}'"),
            ));
        }
        defs.push(MetricDef {
            name: name.clone(),
            alias,
            datatype,
        });
    }
    Ok(defs.into())
}

fn long(value: Option<&Value>) -> Option<i64> {
    match value? {
        Value::LongValue(v) => Some(*v as i64),
        Value::IntValue(v) => Some(i64::from(*v)),
        _ => None,
    }
}

/// A metric's value as a number, by the data type of its birth: signed integers of 8, 16 and 32
/// bits travel in an unsigned field and are sign-extended; booleans are 0 and 1.
fn number(datatype: u32, value: Option<&Value>) -> Result<f64, (Reason, String)> {
    let name = datatype::name(datatype);
    let mismatch = || {
        (
            Reason::SparkplugInvalid,
            format!("a {name} metric carries no value of its type"),
        )
    };
    let unsigned = |value: Option<&Value>| match value {
        Some(Value::IntValue(v)) => Ok(u64::from(*v)),
        Some(Value::LongValue(v)) => Ok(*v),
        _ => Err(mismatch()),
    };
    Ok(match datatype {
        datatype::INT8 => f64::from(unsigned(value)? as u8 as i8),
        datatype::INT16 => f64::from(unsigned(value)? as u16 as i16),
        datatype::INT32 => f64::from(unsigned(value)? as u32 as i32),
        datatype::INT64 => unsigned(value)? as i64 as f64,
        datatype::UINT8 => f64::from(unsigned(value)? as u8),
        datatype::UINT16 => f64::from(unsigned(value)? as u16),
        datatype::UINT32 => f64::from(unsigned(value)? as u32),
        datatype::UINT64 | datatype::DATETIME => unsigned(value)? as f64,
        datatype::FLOAT | datatype::DOUBLE => match value {
            Some(Value::FloatValue(v)) => f64::from(*v),
            Some(Value::DoubleValue(v)) => *v,
            _ => return Err(mismatch()),
        },
        datatype::BOOLEAN => match value {
            Some(Value::BooleanValue(v)) => f64::from(u8::from(*v)),
            _ => return Err(mismatch()),
        },
        _ => {
            return Err((
                Reason::SparkplugUnsupportedType,
                format!("a {name} metric is not a number; sensorhub stores numbers and booleans"),
            ));
        }
    })
}

#[cfg(test)]
mod tests;
