//! The malformed corpus: hundreds of distinct messages that are not readings, each labelled with
//! the reason `domain::decode` must give, and boundary cases that are readings.
//!
//! `malformed()` and `boundary_readings()` are the shared builders; the tests here check the
//! labels against the decoder in-process, then send the corpus interleaved with valid readings on
//! several connections to the real binary and account for every message.

use std::collections::{HashMap, HashSet};

use bson::{Bson, doc};
use futures_util::TryStreamExt;
use sensorhub::domain::{
    Captured, DEAD_LETTER_RAW_BYTES, Limits, MAX_KIND_BYTES, MAX_SENSOR_ID_BYTES, Reason,
    Timestamp, decode,
};
use serde_json::Value;

use crate::helpers::{Publisher, TestApp, reading_json, ts};

/// One message of the corpus: where it is published, what it carries, and why it is not a
/// reading.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Case {
    pub topic: String,
    pub payload: Vec<u8>,
    pub reason: Reason,
}

const TOPIC: &str = "sensors/temperature";

/// Whether `domain::decode` gives `reason` for the bytes of a message (see where it is used).
fn judged_by_decode(reason: Reason) -> bool {
    !matches!(reason, Reason::Forbidden | Reason::SensorIdConflict)
        && !reason.code().starts_with("sparkplug_")
}

/// A payload of three fields, each given as raw JSON text.
fn fields(sensor_id: &str, value: &str, timestamp: &str) -> Vec<u8> {
    format!(r#"{{"sensor_id":{sensor_id},"value":{value},"timestamp":{timestamp}}}"#).into_bytes()
}

/// A payload that is a reading in every respect but the one under test.
fn good() -> Vec<u8> {
    fields(r#""corpus""#, "1.5", r#""2026-01-01T00:00:00Z""#)
}

fn quoted(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

/// Every malformed message, distinct by (topic, payload). Timestamps relative to now (two days
/// ahead) are computed when this is called, so build the corpus just before sending it.
pub fn malformed() -> Vec<Case> {
    let mut cases: Vec<Case> = Vec::new();
    let mut add = |topic: &str, payload: Vec<u8>, reason: Reason| {
        cases.push(Case {
            topic: topic.to_owned(),
            payload,
            reason,
        });
    };

    // Truncated JSON: every strict prefix of two valid payloads (the empty one included), each
    // prefix once.
    let mut prefixes = HashSet::new();
    for whole in [
        br#"{"sensor_id":"cut-1","value":21.5,"timestamp":"2026-01-01T00:00:00.000Z"}"#.as_slice(),
        br#"{"sensor_id": "cut-2", "value": "-3.25", "timestamp": "2026-01-01T10:00:00.123456"}"#
            .as_slice(),
    ] {
        for cut in 0..whole.len() {
            if prefixes.insert(&whole[..cut]) {
                add(TOPIC, whole[..cut].to_vec(), Reason::InvalidJson);
            }
        }
    }

    // Not JSON, or not one JSON object of a reading.
    let good_text = String::from_utf8(good()).expect("ASCII");
    let depth = 1000;
    for payload in [
        "   ".to_owned(),
        "\n\t\r ".to_owned(),
        "not json".to_owned(),
        "}".to_owned(),
        "{]".to_owned(),
        "[1,2]".to_owned(),
        format!("[{good_text},1]"),
        format!("[{good_text}"),
        r#""a string""#.to_owned(),
        "42".to_owned(),
        "true".to_owned(),
        "null".to_owned(),
        r#"{"sensor_id":"a","value":1,"timestamp":"2026-01-01",}"#.to_owned(),
        r#"{'sensor_id':'a','value':1,'timestamp':'2026-01-01'}"#.to_owned(),
        r#"{sensor_id:"a",value:1,timestamp:"2026-01-01"}"#.to_owned(),
        format!("{good_text} x"),
        format!("{good_text}{good_text}"),
        format!("/* comment */{good_text}"),
        format!("\u{feff}{good_text}"),
        r#"{"sensor_id":"a","sensor_id":"b","value":1,"timestamp":"2026-01-01"}"#.to_owned(),
        r#"{"sensor_id":"a","value":1,"value":2,"timestamp":"2026-01-01"}"#.to_owned(),
        r#"{"sensor_id":"a","value":NaN,"timestamp":"2026-01-01"}"#.to_owned(),
        r#"{"sensor_id":"a","value":Infinity,"timestamp":"2026-01-01"}"#.to_owned(),
        r#"{"sensor_id":"a","value":-Infinity,"timestamp":"2026-01-01"}"#.to_owned(),
        r#"{"sensor_id":"a","value":0x10,"timestamp":"2026-01-01"}"#.to_owned(),
        r#"{"sensor_id":"a","value":012,"timestamp":"2026-01-01"}"#.to_owned(),
        r#"{"sensor_id":"a","value":+1,"timestamp":"2026-01-01"}"#.to_owned(),
        r#"{"sensor_id":"a","value":.5,"timestamp":"2026-01-01"}"#.to_owned(),
        r#"{"sensor_id":"a","value":1.,"timestamp":"2026-01-01"}"#.to_owned(),
        r#"{"sensor_id":"a\x","value":1,"timestamp":"2026-01-01"}"#.to_owned(),
        r#"{"sensor_id":"\ud800","value":1,"timestamp":"2026-01-01"}"#.to_owned(),
        "{\"sensor_id\":\"a\nb\",\"value\":1,\"timestamp\":\"2026-01-01\"}".to_owned(),
        r#"{"sensor_id":"a","value":1,"timestamp":"2026-01-01"#.to_owned(),
        // Deep nesting, unclosed or not an object.
        format!(
            r#"{{"sensor_id":"a","value":1,"timestamp":"2026-01-01","x":{}"#,
            "[".repeat(5 * depth)
        ),
        format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
        "[".repeat(8000),
    ] {
        add(TOPIC, payload.into_bytes(), Reason::InvalidJson);
    }

    // Fields missing, or under another name.
    for payload in [
        "{}",
        r#"{"sensor_id":"a"}"#,
        r#"{"value":1}"#,
        r#"{"timestamp":"2026-01-01"}"#,
        r#"{"sensor_id":"a","value":1}"#,
        r#"{"sensor_id":"a","timestamp":"2026-01-01"}"#,
        r#"{"value":1,"timestamp":"2026-01-01"}"#,
        r#"{"Sensor_id":"a","value":1,"timestamp":"2026-01-01"}"#,
        r#"{"sensorId":"a","value":1,"timestamp":"2026-01-01"}"#,
        r#"{"sensor_id":"a","val":1,"timestamp":"2026-01-01"}"#,
        r#"{"sensor_id":"a","value":1,"time":"2026-01-01"}"#,
        r#"{"id":"a","reading":1,"ts":"2026-01-01"}"#,
    ] {
        add(TOPIC, payload.as_bytes().to_vec(), Reason::MissingField);
    }
    // Well-formed, however deep, but none of the fields.
    add(
        TOPIC,
        format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth)).into_bytes(),
        Reason::MissingField,
    );

    // Wrong JSON types, for each field.
    let (id, value, at) = (r#""a""#, "1", r#""2026-01-01T00:00:00Z""#);
    for wrong in [
        "1",
        "1.5",
        "true",
        "false",
        "null",
        "[]",
        r#"["a"]"#,
        "{}",
        r#"{"a":1}"#,
    ] {
        add(TOPIC, fields(wrong, value, at), Reason::WrongType);
    }
    for wrong in ["true", "false", "null", "[]", "[1]", "{}", r#"{"v":1}"#] {
        add(TOPIC, fields(id, wrong, at), Reason::WrongType);
    }
    for wrong in [
        "1767225600",
        "1767225600000",
        "-1",
        "true",
        "null",
        "[]",
        r#"["2026-01-01"]"#,
        "{}",
    ] {
        add(TOPIC, fields(id, value, wrong), Reason::WrongType);
    }
    // The value nested as deep as the decoder must survive.
    add(
        TOPIC,
        fields(
            id,
            &format!("{}1{}", "[".repeat(depth), "]".repeat(depth)),
            at,
        ),
        Reason::WrongType,
    );

    // Values that are text but not numbers, and numbers that are not finite.
    for text in [
        "abc", "", " ", "1,5", "0x10", "1.2.3", "12abc", "--1", "1e", "e5", "1_000", "½", "٣",
        "infinite", "12 °C",
    ] {
        add(
            TOPIC,
            fields(id, &quoted(text), at),
            Reason::ValueNotNumeric,
        );
    }
    for raw in [
        "1e400".to_owned(),
        "-1e400".to_owned(),
        "1e309".to_owned(),
        "-1e999".to_owned(),
        "2e308".to_owned(),
        format!("1{}", "0".repeat(400)),
    ] {
        add(TOPIC, fields(id, &raw, at), Reason::ValueNotFinite);
    }
    for text in [
        "NaN",
        "nan",
        "-NaN",
        " NaN ",
        "Infinity",
        "-Infinity",
        "+Infinity",
        "inf",
        "-inf",
        "INF",
        "1e400",
        "-1e400",
    ] {
        add(TOPIC, fields(id, &quoted(text), at), Reason::ValueNotFinite);
    }

    // Sensor ids: empty, blank, too long, with control characters.
    for bad in [
        String::new(),
        " ".to_owned(),
        "   ".to_owned(),
        "\t".to_owned(),
        "x".repeat(MAX_SENSOR_ID_BYTES + 1),
        "x".repeat(200),
        "x".repeat(1000),
        "€".repeat(43),
        "a\u{0}b".to_owned(),
        "\u{1}".to_owned(),
        "bell\u{7}".to_owned(),
        "esc\u{1b}[31m".to_owned(),
        "line\nbreak".to_owned(),
        "carriage\rreturn".to_owned(),
        "del\u{7f}".to_owned(),
        "nel\u{85}".to_owned(),
        "c1\u{9f}".to_owned(),
    ] {
        add(
            TOPIC,
            fields(&quoted(&bad), value, at),
            Reason::SensorIdInvalid,
        );
    }

    // Timestamps that are not timestamps.
    for bad in [
        "",
        " ",
        "soon",
        "yesterday",
        "2026",
        "2026-01",
        "2026-1-1",
        "2026/01/01",
        "01/02/2026",
        "2026-13-01",
        "2026-02-30",
        "2026-01-01T25:00:00Z",
        "2026-01-01T10:60:00Z",
        "2026-01-01T10:00:61Z",
        "2026-01-01T10:00:00+25:00",
        "2026-01-01T10:00:00ZZ",
        "2026-01-01T",
        "2026-01-01T10:00:00.Z",
        "10000-01-01T00:00:00Z",
        "-0001-01-01T00:00:00Z",
        "1767225600",
    ] {
        add(
            TOPIC,
            fields(id, value, &quoted(bad)),
            Reason::TimestampInvalid,
        );
    }

    // Timestamps outside the accepted range: far past, before 2000, far and near future.
    let now = Timestamp::now();
    let day = 24 * 3600 * 1000;
    for bad in [
        "0001-01-01T00:00:00Z".to_owned(),
        "0000-01-01T00:00:00Z".to_owned(),
        "1900-01-01T00:00:00Z".to_owned(),
        "1970-01-01T00:00:00Z".to_owned(),
        "1999-12-31T23:59:59.999Z".to_owned(),
        "1999-12-31T23:59:59.999".to_owned(),
        "2000-01-01T00:59:59+01:00".to_owned(),
        "9999-12-31T23:59:59Z".to_owned(),
        "9999-12-31T23:59:59.999Z".to_owned(),
        "3000-01-01".to_owned(),
        now.saturating_add_millis(2 * day).to_string(),
        now.saturating_add_millis(day + 3_600_000).to_string(),
    ] {
        add(
            TOPIC,
            fields(id, value, &quoted(&bad)),
            Reason::TimestampOutOfRange,
        );
    }

    // Topics under sensors/ that do not name a kind.
    let long_kind = "k".repeat(MAX_KIND_BYTES + 1);
    for topic in [
        "sensors/".to_owned(),
        "sensors//".to_owned(),
        "sensors/temperature/".to_owned(),
        "sensors/ ".to_owned(),
        "sensors/a/ ".to_owned(),
        "sensors/temp\u{7}".to_owned(),
        "sensors/tab\tkind".to_owned(),
        "sensors/del\u{7f}".to_owned(),
        format!("sensors/{long_kind}"),
        format!("sensors/{}", "k".repeat(249)),
        format!("sensors/{}", "k".repeat(300)),
        format!("sensors/{}/temperature", "plant/".repeat(60)),
    ] {
        add(&topic, good(), Reason::TopicInvalid);
    }

    // Bytes that are not UTF-8, alone and inside otherwise valid readings.
    for bytes in [
        b"\xff".to_vec(),
        b"\xfe\xff".to_vec(),
        b"\x80".to_vec(),
        b"\xc0\x80".to_vec(),
        b"\xe0\x80\xaf".to_vec(),
        b"\xed\xa0\x80".to_vec(),
        b"\xf4\x90\x80\x80".to_vec(),
        b"\xe2\x82".to_vec(),
        b"{\"sensor_id\":\"a\xff\",\"value\":1,\"timestamp\":\"2026-01-01\"}".to_vec(),
        b"{\"sensor_id\":\"a\",\"value\":\"1\xc3\",\"timestamp\":\"2026-01-01\"}".to_vec(),
        b"{\"sensor_id\":\"a\",\"value\":1,\"timestamp\":\"2026-01-01\xed\xbf\xbf\"}".to_vec(),
        [good(), b"\xff".to_vec()].concat(),
    ] {
        add(TOPIC, bytes, Reason::InvalidUtf8);
    }

    // Batches that hold no reading, or more than a message may.
    add(TOPIC, b"[]".to_vec(), Reason::BatchEmpty);
    add(
        TOPIC,
        br#"{"sensor_id":"a","timestamp":"2026-01-01","values":{}}"#.to_vec(),
        Reason::BatchEmpty,
    );
    add(
        TOPIC,
        format!("[{}]", ["{}"; 1001].join(",")).into_bytes(),
        Reason::BatchTooLarge,
    );
    // A `values` object whose only key is no kind: a dead letter for that element.
    add(
        TOPIC,
        br#"{"sensor_id":"a","timestamp":"2026-01-01","values":{"a/b":1}}"#.to_vec(),
        Reason::KindInvalid,
    );

    // Larger than the limit, whatever else is wrong with them (checked first).
    let max = Limits::default().max_payload_bytes;
    let padded = |len: usize| {
        let mut payload = good();
        payload.splice(1..1, std::iter::repeat_n(b' ', len - payload.len()));
        payload
    };
    add(TOPIC, padded(max + 1), Reason::PayloadTooLarge);
    add(TOPIC, vec![b' '; 64 * 1024], Reason::PayloadTooLarge);
    add(TOPIC, vec![b'x'; 1 << 20], Reason::PayloadTooLarge);
    add(TOPIC, padded(1 << 20), Reason::PayloadTooLarge);
    add(TOPIC, vec![0xff; 100 * 1024], Reason::PayloadTooLarge);
    add("sensors/", padded(max + 1), Reason::PayloadTooLarge);

    cases
}

/// A reading at the edge of what is accepted, and what it must be stored as.
#[derive(Clone, Debug)]
pub struct Edge {
    pub topic: String,
    pub payload: Vec<u8>,
    pub sensor: String,
    pub millis: i64,
    pub value: f64,
}

/// Readings at the edges of what is accepted, each a distinct (sensor, time).
pub fn boundary_readings() -> Vec<Edge> {
    let max = Limits::default().max_payload_bytes;
    let at = "2026-01-01T00:00:00Z";
    let millis = 1_767_225_600_000;
    let edge = |topic: &str, payload: Vec<u8>, sensor: &str, millis: i64, value: f64| Edge {
        topic: topic.to_owned(),
        payload,
        sensor: sensor.to_owned(),
        millis,
        value,
    };
    let plain = |sensor: &str, value: &str, expected: f64| {
        edge(
            TOPIC,
            fields(&quoted(sensor), value, &quoted(at)),
            sensor,
            millis,
            expected,
        )
    };
    let mut full = fields(r#""edge-size""#, "1", &quoted(at));
    full.splice(1..1, std::iter::repeat_n(b' ', max - full.len()));
    let soon = Timestamp::now().saturating_add_millis(23 * 3600 * 1000);
    vec![
        // Exactly the payload limit.
        edge(TOPIC, full, "edge-size", millis, 1.0),
        plain(&"i".repeat(MAX_SENSOR_ID_BYTES), "1", 1.0),
        plain("edge-tiny", "1e-400", 0.0),
        plain("edge-plus", r#""+1""#, 1.0),
        plain("edge-text", r#"" 7 ""#, 7.0),
        // Full precision, as Python's repr() writes a float: stored as that very double.
        plain("edge-precise", "10.478027277614267", 10.478_027_277_614_267),
        plain(
            "edge-precise-text",
            r#""10.478027277614267""#,
            10.478_027_277_614_267,
        ),
        plain(
            "edge-digits",
            &format!("-3998{}e1", "9".repeat(89)),
            -3.999e93,
        ),
        edge(
            TOPIC,
            fields(r#""edge-earliest""#, "1", r#""2000-01-01T00:00:00Z""#),
            "edge-earliest",
            946_684_800_000,
            1.0,
        ),
        // An extra field nested deep is ignored, without exhausting the stack.
        edge(
            TOPIC,
            format!(
                r#"{{"sensor_id":"edge-nested","value":1,"timestamp":"{at}","x":{}0{}}}"#,
                "[".repeat(1000),
                "]".repeat(1000)
            )
            .into_bytes(),
            "edge-nested",
            millis,
            1.0,
        ),
        edge(
            TOPIC,
            fields(r#""edge-soon""#, "1", &quoted(&soon.to_string())),
            "edge-soon",
            soon.as_millis(),
            1.0,
        ),
        edge(
            &format!("sensors/{}", "k".repeat(MAX_KIND_BYTES)),
            fields(r#""edge-kind""#, "1", &quoted(at)),
            "edge-kind",
            millis,
            1.0,
        ),
        // A topic of exactly the limit, 256 bytes.
        edge(
            &format!("sensors/{}/kk", "p".repeat(256 - "sensors/".len() - 3)),
            fields(r#""edge-topic""#, "1", &quoted(at)),
            "edge-topic",
            millis,
            1.0,
        ),
    ]
}

fn captured(topic: &str, payload: &[u8]) -> Captured {
    Captured::new(
        Timestamp::now(),
        bytes::Bytes::copy_from_slice(topic.as_bytes()),
        bytes::Bytes::copy_from_slice(payload),
        Limits::default().max_payload_bytes,
    )
}

fn show(case: &Case) -> String {
    let head: Vec<u8> = case.payload.iter().copied().take(120).collect();
    format!(
        "{} {:?} ({} bytes)",
        case.topic.chars().take(80).collect::<String>(),
        String::from_utf8_lossy(&head),
        case.payload.len()
    )
}

#[test]
fn the_corpus_is_large_distinct_and_labelled_as_the_decoder_judges() {
    let cases = malformed();
    let distinct: HashSet<(&str, &[u8])> = cases
        .iter()
        .map(|c| (c.topic.as_str(), c.payload.as_slice()))
        .collect();
    assert_eq!(distinct.len(), cases.len(), "the corpus has repeats");
    assert!(cases.len() >= 200, "only {} cases", cases.len());
    let mut wrong = Vec::new();
    for case in &cases {
        // A message of one bad element (a `values` object's) is one element's dead letter.
        let verdict =
            decode(&captured(&case.topic, &case.payload), &Limits::default()).and_then(|mut d| {
                match d.rejected.pop() {
                    Some((0, rejection)) if d.readings.is_empty() && d.rejected.is_empty() => {
                        Err(rejection)
                    }
                    Some(other) => {
                        d.rejected.push(other);
                        Ok(d)
                    }
                    None => Ok(d),
                }
            });
        match verdict {
            Ok(reading) => wrong.push(format!("{}: accepted as {reading:?}", show(case))),
            Err(rejection) if rejection.reason != case.reason => wrong.push(format!(
                "{}: expected {}, got {rejection}",
                show(case),
                case.reason
            )),
            Err(rejection) => assert!(!rejection.message.is_empty()),
        }
    }
    assert!(wrong.is_empty(), "mislabelled:\n{}", wrong.join("\n"));
    let covered: HashSet<Reason> = cases.iter().map(|c| c.reason).collect();
    // `forbidden` is the broker's verdict on who sent a message, not on its bytes: tests/api/
    // security.rs covers it. `sensor_id_conflict` needs a topic template: tests/api/templates.rs.
    // The Sparkplug reasons are the Sparkplug sessions', not decode's: src/sparkplug and
    // tests/api/sparkplug.rs cover them.
    assert_eq!(
        covered.len(),
        Reason::ALL.iter().filter(|r| judged_by_decode(**r)).count(),
        "every reason is exercised"
    );
    for edge in boundary_readings() {
        let reading = decode(&captured(&edge.topic, &edge.payload), &Limits::default())
            .unwrap_or_else(|e| panic!("boundary reading {} rejected: {e}", edge.sensor))
            .readings
            .remove(0);
        assert_eq!(reading.sensor_id().as_str(), edge.sensor);
        assert_eq!(reading.timestamp().as_millis(), edge.millis);
        assert_eq!(reading.value(), edge.value, "{}", edge.sensor);
    }
}

/// The next page's path from a `Link: <path>; rel="next"` header.
fn next_link(response: &reqwest::Response) -> Option<String> {
    let link = response.headers().get("link")?.to_str().ok()?;
    let (target, rel) = link.split_once(';')?;
    rel.contains(r#"rel="next""#)
        .then(|| target.trim().trim_start_matches('<').trim_end_matches('>'))
        .map(str::to_owned)
}

/// What the API shows of a dead letter, as comparable text.
fn letter_key(topic: &str, payload: &str, payload_bytes: u64, reason: &str) -> String {
    format!("{reason}|{topic}|{payload_bytes}|{payload}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_malformed_corpus_is_dead_lettered_exactly_while_valid_readings_flow() {
    const CONNECTIONS: usize = 4;
    let mut app = TestApp::spawn().await;
    let cases = malformed();
    let boundary = boundary_readings();

    // Bad and good alternate on each connection; the boundary readings go last.
    let mut plans: Vec<Vec<(String, Vec<u8>)>> = vec![Vec::new(); CONNECTIONS];
    let mut expected: HashMap<(String, i64), f64> = HashMap::new();
    for (i, case) in cases.iter().enumerate() {
        let plan = &mut plans[i % CONNECTIONS];
        plan.push((case.topic.clone(), case.payload.clone()));
        let sensor = format!("corpus-ok-{}", i % 7);
        let millis = i as i64 * 1000;
        plan.push((
            TOPIC.to_owned(),
            reading_json(&sensor, i as f64, &ts(millis)).into_bytes(),
        ));
        expected.insert((sensor, 1_767_225_600_000 + millis), i as f64);
    }
    for (i, edge) in boundary.iter().enumerate() {
        plans[i % CONNECTIONS].push((edge.topic.clone(), edge.payload.clone()));
        expected.insert((edge.sensor.clone(), edge.millis), edge.value);
    }
    assert_eq!(expected.len(), cases.len() + boundary.len());

    let mut tasks = Vec::new();
    for (n, plan) in plans.into_iter().enumerate() {
        let port = app.mqtt_port;
        tasks.push(tokio::spawn(async move {
            let publisher = Publisher::connect(port, &format!("corpus-{n}")).await;
            for (id, (topic, payload)) in plan.iter().enumerate() {
                publisher.publish(id, topic, payload.clone()).await;
            }
            publisher.wait_acked(plan.len()).await;
            let errors = publisher.connection_errors();
            publisher.disconnect().await;
            errors
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 0, "a publisher was disconnected");
    }

    let expected_total = expected.len() as u64;
    app.wait_for_count(expected_total).await;
    let all_reasons =
        Reason::ALL.map(|r| format!("sensorhub_dead_letters_total{{reason=\"{r}\"}}"));
    app.eventually("every dead letter counted", || async {
        let mut total = 0;
        for name in &all_reasons {
            total += app.metric(name).await;
        }
        (total == cases.len() as u64).then_some(())
    })
    .await;

    // The process stayed up, and never restarted.
    assert!(app.is_running(), "sensorhub exited:\n{}", app.logs());
    assert_eq!(app.logs().matches("sensorhub ready").count(), 1);

    // Counters per reason equal the corpus.
    let mut per_reason: HashMap<Reason, u64> = HashMap::new();
    for case in &cases {
        *per_reason.entry(case.reason).or_default() += 1;
    }
    for reason in Reason::ALL.into_iter().filter(|r| judged_by_decode(*r)) {
        let counted = app
            .metric(&format!(
                "sensorhub_dead_letters_total{{reason=\"{reason}\"}}"
            ))
            .await;
        assert_eq!(counted, per_reason[&reason], "{reason}");
    }

    // Every valid reading stored, once.
    let readings = app.readings().await;
    let ids: Vec<Bson> = readings.distinct("_id", doc! {}).await.unwrap();
    assert_eq!(ids.len() as u64, expected_total);
    // Each with the value sent, to the last bit.
    let stored: HashMap<(String, i64), f64> = readings
        .find(doc! {})
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .into_iter()
        .map(|d| {
            let key = (
                d.get_str("sensor_id").unwrap().to_owned(),
                d.get_datetime("timestamp").unwrap().timestamp_millis(),
            );
            (key, d.get_f64("value").unwrap())
        })
        .collect();
    let differ: Vec<_> = expected
        .iter()
        .filter(|(key, value)| stored.get(*key) != Some(*value))
        .map(|(key, value)| format!("{key:?}: sent {value:e}, stored {:?}", stored.get(key)))
        .collect();
    assert!(
        differ.is_empty(),
        "stored otherwise:\n{}",
        differ.join("\n")
    );
    assert_eq!(stored.len(), expected.len());
    assert_eq!(app.metric("sensorhub_readings_duplicate_total").await, 0);

    // /deadletters, page by page, lists each bad message exactly once with its reason.
    let mut listed = Vec::new();
    let mut ids = HashSet::new();
    let mut path = Some("/deadletters?limit=37".to_owned());
    let mut pages = 0;
    while let Some(current) = path {
        let response = app.get(&current).await;
        assert_eq!(response.status().as_u16(), 200, "{current}");
        path = next_link(&response);
        let page: Vec<Value> = response.json().await.unwrap();
        pages += 1;
        assert!(pages <= cases.len(), "the pages do not end");
        for letter in page {
            assert!(
                ids.insert(letter["id"].as_str().unwrap().to_owned()),
                "{letter} listed twice"
            );
            assert!(!letter["message"].as_str().unwrap().is_empty());
            listed.push(letter_key(
                letter["topic"].as_str().unwrap(),
                letter["payload"].as_str().unwrap(),
                letter["payload_bytes"].as_u64().unwrap(),
                letter["reason"].as_str().unwrap(),
            ));
        }
    }
    let mut wanted: Vec<String> = cases
        .iter()
        .map(|c| {
            let head = &c.payload[..c.payload.len().min(DEAD_LETTER_RAW_BYTES)];
            letter_key(
                &c.topic,
                &String::from_utf8_lossy(head),
                c.payload.len() as u64,
                c.reason.code(),
            )
        })
        .collect();
    listed.sort();
    wanted.sort();
    assert_eq!(listed.len(), wanted.len());
    assert!(listed == wanted, "the dead letters differ from the corpus");
    eprintln!(
        "corpus: {} malformed messages ({} reasons) dead-lettered exactly, {} valid readings \
         stored, {pages} pages of /deadletters",
        cases.len(),
        per_reason.len(),
        expected_total
    );
}
