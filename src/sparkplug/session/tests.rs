use bytes::Bytes;

use super::*;

const T0: u64 = 1_700_000_000_000;

fn metric(
    name: Option<&str>,
    alias: Option<u64>,
    datatype: Option<u32>,
    value: Value,
) -> proto::Metric {
    proto::Metric {
        name: name.map(str::to_owned),
        alias,
        datatype,
        value: Some(value),
        ..proto::Metric::default()
    }
}

fn payload(seq: Option<u64>, metrics: Vec<proto::Metric>) -> Vec<u8> {
    proto::Payload {
        timestamp: Some(T0),
        metrics,
        seq,
        ..proto::Payload::default()
    }
    .encode_to_vec()
}

fn captured(topic: &str, payload: Vec<u8>) -> Captured {
    Captured::new(
        Timestamp::from_millis(T0 as i64 + 1000).unwrap(),
        Bytes::copy_from_slice(topic.as_bytes()),
        Bytes::from(payload),
        16 * 1024,
    )
}

/// The node's birth: bdSeq 3, a temperature (Int16, alias 1) and a running flag (alias 2).
fn nbirth(seq: u64) -> Vec<u8> {
    payload(
        Some(seq),
        vec![
            metric(
                Some("bdSeq"),
                None,
                Some(datatype::INT64),
                Value::LongValue(3),
            ),
            metric(
                Some("Line/Temp"),
                Some(1),
                Some(datatype::INT16),
                Value::IntValue(0xFFF6),
            ),
            metric(
                Some("Running"),
                Some(2),
                Some(datatype::BOOLEAN),
                Value::BooleanValue(true),
            ),
        ],
    )
}

struct Run {
    sessions: Sessions,
    lsn: u64,
    readings: Vec<Reading>,
    dead: Vec<DeadLetter>,
}

impl Run {
    fn new() -> Self {
        Self {
            sessions: Sessions::default(),
            lsn: 0,
            readings: Vec::new(),
            dead: Vec::new(),
        }
    }

    fn send(&mut self, topic: &str, payload: Vec<u8>) {
        self.lsn += 10;
        self.sessions.judge(
            "log",
            self.lsn,
            &captured(topic, payload),
            &Limits::default(),
            &mut self.readings,
            &mut self.dead,
        );
    }

    fn values(&self) -> Vec<(String, String, f64)> {
        self.readings
            .iter()
            .map(|r| (r.sensor_id().to_string(), r.kind().to_string(), r.value()))
            .collect()
    }
}

fn row(id: &str, kind: &str, v: f64) -> (String, String, f64) {
    (id.to_owned(), kind.to_owned(), v)
}

#[test]
fn births_and_aliased_data_become_readings_with_names_types_and_times() {
    let mut run = Run::new();
    run.send("spBv1.0/plant/NBIRTH/gw1", nbirth(0));
    run.send(
        "spBv1.0/plant/DBIRTH/gw1/plc",
        payload(
            Some(1),
            vec![
                metric(
                    Some("Pressure"),
                    Some(10),
                    Some(datatype::INT8),
                    Value::IntValue(0x80),
                ),
                metric(
                    Some("Count"),
                    Some(11),
                    Some(datatype::INT32),
                    Value::IntValue(u32::MAX),
                ),
                metric(
                    Some("Flow"),
                    Some(12),
                    Some(datatype::FLOAT),
                    Value::FloatValue(1.5),
                ),
            ],
        ),
    );
    let mut data = metric(None, Some(11), None, Value::IntValue((-70_000_i32) as u32));
    data.timestamp = Some(T0 - 5);
    run.send(
        "spBv1.0/plant/DDATA/gw1/plc",
        payload(
            Some(2),
            vec![data, metric(None, Some(12), None, Value::DoubleValue(2.25))],
        ),
    );
    run.send(
        "spBv1.0/plant/NDATA/gw1",
        payload(
            Some(3),
            vec![metric(None, Some(2), None, Value::BooleanValue(false))],
        ),
    );
    assert!(run.dead.is_empty(), "{:?}", run.dead);
    assert_eq!(
        run.values(),
        [
            row("plant/gw1/Line/Temp", "Temp", -10.0),
            row("plant/gw1/Running", "Running", 1.0),
            row("plant/gw1/plc/Pressure", "Pressure", -128.0),
            row("plant/gw1/plc/Count", "Count", -1.0),
            row("plant/gw1/plc/Flow", "Flow", 1.5),
            row("plant/gw1/plc/Count", "Count", -70_000.0),
            row("plant/gw1/plc/Flow", "Flow", 2.25),
            row("plant/gw1/Running", "Running", 0.0),
        ]
    );
    // The metric's own timestamp, else the payload's.
    assert_eq!(run.readings[5].timestamp().as_millis(), T0 as i64 - 5);
    assert_eq!(run.readings[6].timestamp().as_millis(), T0 as i64);
    let node = run.sessions.node(&NodeKey::new("plant", "gw1")).unwrap();
    assert_eq!(
        (node.bd_seq, node.seq, node.online),
        (Some(3), Some(3), true)
    );
    assert!(node.devices["plc"].online);
    assert!(run.sessions.take_rebirths().is_empty());
}

#[test]
fn seq_wraps_from_255_to_0() {
    let mut run = Run::new();
    run.send("spBv1.0/g/NBIRTH/n", nbirth(254));
    for seq in [255, 0, 1] {
        run.send(
            "spBv1.0/g/NDATA/n",
            payload(
                Some(seq),
                vec![metric(None, Some(1), None, Value::IntValue(seq as u32))],
            ),
        );
    }
    assert!(run.dead.is_empty(), "{:?}", run.dead);
    assert_eq!(run.readings.len(), 2 + 3);
}

#[test]
fn a_seq_gap_is_dead_lettered_with_one_rebirth_request_until_the_next_birth() {
    let mut run = Run::new();
    run.send("spBv1.0/g/NBIRTH/n", nbirth(0));
    let data = |seq: u64| {
        payload(
            Some(seq),
            vec![metric(None, Some(1), None, Value::IntValue(7))],
        )
    };
    run.send("spBv1.0/g/NDATA/n", data(1));
    run.send("spBv1.0/g/NDATA/n", data(5));
    run.send("spBv1.0/g/NDATA/n", data(6));
    run.send("spBv1.0/g/NDATA/n", data(7));
    assert_eq!(run.readings.len(), 2 + 1);
    let reasons: Vec<Reason> = run.dead.iter().map(|d| d.reason).collect();
    assert_eq!(reasons, [Reason::SparkplugSeqGap; 3]);
    assert_eq!(run.dead[0].id, "log:30");
    assert!(
        run.dead[0].message.contains("seq 5 does not follow 1"),
        "{}",
        run.dead[0].message
    );
    assert_eq!(run.sessions.take_rebirths(), [NodeKey::new("g", "n")]);
    // The rebirth restores trust.
    run.send("spBv1.0/g/NBIRTH/n", nbirth(0));
    run.send("spBv1.0/g/NDATA/n", data(1));
    assert_eq!(run.readings.len(), 3 + 2 + 1);
    assert_eq!(run.dead.len(), 3);
    assert!(run.sessions.take_rebirths().is_empty());
}

#[test]
fn an_unknown_alias_stores_nothing_of_the_message_and_asks_for_a_rebirth() {
    let mut run = Run::new();
    run.send("spBv1.0/g/NBIRTH/n", nbirth(0));
    run.send(
        "spBv1.0/g/NDATA/n",
        payload(
            Some(1),
            vec![
                metric(None, Some(1), None, Value::IntValue(1)),
                metric(None, Some(99), None, Value::IntValue(2)),
            ],
        ),
    );
    assert_eq!(run.readings.len(), 2, "only the birth's");
    assert_eq!(run.dead.len(), 1);
    assert_eq!(run.dead[0].reason, Reason::SparkplugUnknownAlias);
    assert!(
        run.dead[0].message.contains("metric 1 (alias 99)"),
        "{}",
        run.dead[0].message
    );
    assert_eq!(run.sessions.take_rebirths().len(), 1);
}

#[test]
fn data_without_a_birth_asks_for_one_rebirth_per_patience_window() {
    let mut run = Run::new();
    for seq in 0..3 {
        run.send(
            "spBv1.0/g/NDATA/n",
            payload(
                Some(seq),
                vec![metric(None, Some(1), None, Value::IntValue(1))],
            ),
        );
    }
    assert!(run.readings.is_empty());
    assert!(
        run.dead
            .iter()
            .all(|d| d.reason == Reason::SparkplugNoBirth)
    );
    assert_eq!(run.sessions.take_rebirths().len(), 1);
}

#[test]
fn only_the_death_of_the_session_in_force_counts() {
    let mut run = Run::new();
    run.send("spBv1.0/g/NBIRTH/n", nbirth(0));
    run.send("spBv1.0/g/DBIRTH/n/d", payload(Some(1), vec![]));
    let death = |bd: u64| {
        payload(
            None,
            vec![metric(
                Some("bdSeq"),
                None,
                Some(datatype::INT64),
                Value::LongValue(bd),
            )],
        )
    };
    run.send("spBv1.0/g/NDEATH/n", death(2));
    let key = NodeKey::new("g", "n");
    assert!(
        run.sessions.node(&key).unwrap().online,
        "a stale bdSeq is ignored"
    );
    run.send("spBv1.0/g/NDEATH/n", death(3));
    let node = run.sessions.node(&key).unwrap();
    assert!(!node.online);
    assert!(!node.devices["d"].online, "the devices die with their node");
    assert!(run.dead.is_empty(), "{:?}", run.dead);
}

#[test]
fn ddeath_marks_the_device_offline_and_its_data_needs_a_new_dbirth() {
    let mut run = Run::new();
    run.send("spBv1.0/g/NBIRTH/n", nbirth(0));
    run.send(
        "spBv1.0/g/DBIRTH/n/d",
        payload(
            Some(1),
            vec![metric(
                Some("x"),
                Some(5),
                Some(datatype::DOUBLE),
                Value::DoubleValue(1.0),
            )],
        ),
    );
    run.send("spBv1.0/g/DDEATH/n/d", payload(Some(2), vec![]));
    let key = NodeKey::new("g", "n");
    assert!(!run.sessions.node(&key).unwrap().devices["d"].online);
    run.send(
        "spBv1.0/g/DDATA/n/d",
        payload(
            Some(3),
            vec![metric(None, Some(5), None, Value::DoubleValue(2.0))],
        ),
    );
    assert_eq!(run.dead.last().unwrap().reason, Reason::SparkplugNoBirth);
}

#[test]
fn nulls_and_bdseq_are_no_readings_historical_ones_are_marked_strings_dead_lettered() {
    let mut run = Run::new();
    run.send("spBv1.0/g/NBIRTH/n", nbirth(0));
    let _ = run.sessions.take_historical();
    let mut null = metric(None, Some(1), None, Value::IntValue(0));
    null.is_null = Some(true);
    null.value = None;
    let mut old = metric(None, Some(1), None, Value::IntValue(4));
    old.is_historical = Some(true);
    old.timestamp = Some(T0 - 60_000);
    run.send("spBv1.0/g/NDATA/n", payload(Some(1), vec![null, old]));
    assert_eq!(run.readings.len(), 3);
    assert_eq!(run.sessions.take_historical(), [2]);
    run.send(
        "spBv1.0/g/DBIRTH/n/d",
        payload(
            Some(2),
            vec![
                metric(
                    Some("Label"),
                    Some(1),
                    Some(datatype::STRING),
                    Value::StringValue("a".into()),
                ),
                metric(
                    Some("Level"),
                    Some(2),
                    Some(datatype::UINT16),
                    Value::IntValue(9),
                ),
            ],
        ),
    );
    assert_eq!(run.readings.len(), 4);
    assert_eq!(run.dead.len(), 1);
    assert_eq!(run.dead[0].id, "log:30:0");
    assert_eq!(run.dead[0].reason, Reason::SparkplugUnsupportedType);
    assert!(
        run.dead[0]
            .message
            .starts_with("metric 0 'Label': a String metric"),
        "{}",
        run.dead[0].message
    );
}

#[test]
fn bad_payloads_and_births_are_dead_letters() {
    let mut run = Run::new();
    run.send("spBv1.0/g/NBIRTH/n", b"\xff\xff\xff".to_vec());
    assert_eq!(run.dead[0].reason, Reason::SparkplugInvalid);
    run.send(
        "spBv1.0/g/NBIRTH/n",
        payload(
            Some(0),
            vec![
                metric(
                    Some("a"),
                    Some(1),
                    Some(datatype::INT32),
                    Value::IntValue(1),
                ),
                metric(
                    Some("b"),
                    Some(1),
                    Some(datatype::INT32),
                    Value::IntValue(1),
                ),
            ],
        ),
    );
    assert!(
        run.dead[1].message.contains("repeats alias 1"),
        "{}",
        run.dead[1].message
    );
    run.send("spBv1.0/g/NDATA", payload(Some(0), vec![]));
    assert_eq!(run.dead[2].reason, Reason::TopicInvalid);
    run.send(
        "spBv1.0/g/NBIRTH/n",
        payload(
            Some(0),
            vec![metric(
                Some("a"),
                Some(1),
                Some(datatype::INT32),
                Value::DoubleValue(1.0),
            )],
        ),
    );
    assert_eq!(run.dead[3].reason, Reason::SparkplugInvalid);
    assert!(run.readings.is_empty());
}

#[test]
fn a_restored_state_skips_what_it_already_applied_and_judges_the_rest_the_same() {
    let mut first = Run::new();
    first.send("spBv1.0/g/NBIRTH/n", nbirth(0));
    let saved = first.sessions.take_changed("log", 15);
    let data = |run: &mut Run| {
        run.send(
            "spBv1.0/g/NDATA/n",
            payload(
                Some(1),
                vec![metric(None, Some(1), None, Value::IntValue(5))],
            ),
        );
    };
    data(&mut first);
    // A restart replays from lsn 10 (the birth) with the state saved after it.
    let mut replay = Run::new();
    replay.sessions = Sessions::new(saved.clone(), HashMap::new());
    replay.send("spBv1.0/g/NBIRTH/n", nbirth(0));
    assert!(replay.readings.is_empty(), "already applied and stored");
    data(&mut replay);
    assert_eq!(replay.values(), first.values()[2..]);
    // The same state from another log is not skipped.
    let mut other = Run::new();
    other.sessions = Sessions::new(saved, HashMap::new());
    other
        .sessions
        .nodes
        .values_mut()
        .for_each(|n| n.log_id = "old".into());
    other.send("spBv1.0/g/NBIRTH/n", nbirth(0));
    assert_eq!(other.readings.len(), 2);
}

#[test]
fn configured_kinds_override_the_names_last_segment() {
    let mut run = Run::new();
    run.sessions
        .kinds
        .insert("Line/Temp".into(), Kind::parse("temperature").unwrap());
    run.send("spBv1.0/g/NBIRTH/n", nbirth(0));
    assert_eq!(run.readings[0].kind().as_str(), "temperature");
    assert_eq!(run.readings[1].kind().as_str(), "Running");
}

#[test]
fn state_round_trips_through_serde() {
    let mut run = Run::new();
    run.send("spBv1.0/g/NBIRTH/n", nbirth(0));
    let (_, node) = run.sessions.take_changed("log", 11).remove(0);
    let json = serde_json::to_string(&node).unwrap();
    let back: NodeSession = serde_json::from_str(&json).unwrap();
    assert_eq!(back, node);
    assert!(back.metrics.contains_name("Line/Temp"));
}
