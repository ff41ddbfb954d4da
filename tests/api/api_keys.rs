//! HTTP API keys, the admin operations they guard, CORS and the request limits, against the
//! real process: keys made by `sensorhub apikey` run as a process, every operation of the served
//! OpenAPI document tried without, with a wrong, a read and an admin key.

use std::path::Path;
use std::process::Command;

use bson::doc;
use futures_util::TryStreamExt;
use serde_json::Value;

use crate::helpers::{AppOptions, PATIENCE, Publisher, TestApp, reading_json, ts, unique};

/// `sensorhub apikey FILE NAME --role ROLE` as an operator runs it: the key on stdout.
fn apikey(file: &Path, name: &str, role: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sensorhub"))
        .arg("apikey")
        .arg(file)
        .args([name, "--role", role])
        .output()
        .expect("sensorhub apikey runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("shk_"), "{key}");
    let file_text = std::fs::read_to_string(file).unwrap();
    assert!(!file_text.contains(&key[4..]), "the file keeps only hashes");
    key
}

/// A value every required parameter of the document accepts.
fn sample(parameter: &Value) -> String {
    let schema = &parameter["schema"];
    if let Some(first) = schema["enum"].as_array().and_then(|e| e.first()) {
        return first.as_str().unwrap().to_owned();
    }
    if schema["format"] == "date-time" || schema["anyOf"].is_array() {
        return "2026-01-01T00:00:00Z".to_owned();
    }
    match schema["type"].as_str() {
        Some("integer") => schema["minimum"].as_u64().unwrap_or(1).to_string(),
        _ => "x".to_owned(),
    }
}

/// Every operation of the document: (method, URL path with query of required parameters,
/// whether it declares the key, whether it is an admin operation).
fn operations(spec: &Value) -> Vec<(String, String, bool, bool)> {
    let mut out = Vec::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let mut url = path.clone();
            let mut query = Vec::new();
            for p in op["parameters"].as_array().into_iter().flatten() {
                let name = p["name"].as_str().unwrap();
                match p["in"].as_str() {
                    Some("path") => url = url.replace(&format!("{{{name}}}"), &sample(p)),
                    Some("query") if p["required"] == true => {
                        query.push(format!("{name}={}", sample(p)));
                    }
                    _ => {}
                }
            }
            if !query.is_empty() {
                url = format!("{url}?{}", query.join("&"));
            }
            let guarded = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("ApiKey").is_some()));
            let admin = op["tags"]
                .as_array()
                .is_some_and(|t| t.contains(&"Admin".into()));
            out.push((method.to_uppercase(), url, guarded, admin));
        }
    }
    out
}

/// Paths that stay open with keys on, by decision (README, Securing the API).
const OPEN: [&str; 4] = ["/health", "/health/live", "/health/ready", "/metrics"];

async fn status(app: &TestApp, method: &str, url: &str, key: Option<&str>) -> reqwest::Response {
    let mut request = app
        .http
        .request(method.parse().unwrap(), app.url(url))
        .timeout(PATIENCE);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.expect("HTTP request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_of_the_document_is_guarded_by_role_and_keys_reload_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("api-keys.toml");
    let read = apikey(&file, "grafana", "read");
    let admin = apikey(&file, "ops", "admin");
    let app = TestApp::spawn_with(AppOptions {
        args: vec!["--api-keys".into(), file.display().to_string()],
        ..AppOptions::default()
    })
    .await;

    // The document, its UI and the live page are open.
    for open in ["/openapi.json", "/docs", "/", "/page/app.js"] {
        assert_eq!(app.get(open).await.status(), 200, "{open}");
    }
    let spec: Value = app.get("/openapi.json").await.json().await.unwrap();
    let scheme = &spec["components"]["securitySchemes"]["ApiKey"];
    assert_eq!(
        (&scheme["type"], &scheme["scheme"]),
        (&"http".into(), &"bearer".into())
    );

    let ops = operations(&spec);
    let (mut guarded, mut admins) = (0, 0);
    for (method, url, is_guarded, is_admin) in &ops {
        let what = format!("{method} {url}");
        if !is_guarded {
            let path = url.split('?').next().unwrap();
            assert!(
                OPEN.contains(&path),
                "{what} is not guarded and not meant to be open"
            );
            assert_ne!(
                status(&app, method, url, None).await.status(),
                401,
                "{what}"
            );
            continue;
        }
        guarded += 1;
        for (key, case) in [(None, "no key"), (Some("shk_0123"), "a wrong key")] {
            let response = status(&app, method, url, key).await;
            assert_eq!(response.status(), 401, "{what} with {case}");
            let challenge = response.headers()["www-authenticate"].to_str().unwrap();
            assert!(challenge.starts_with("Bearer"), "{what}: {challenge}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"], "unauthorized", "{what}: {body}");
        }
        let with_read = status(&app, method, url, Some(&read)).await;
        if *is_admin {
            admins += 1;
            assert_eq!(with_read.status(), 403, "{what} with a read key");
            let body: Value = with_read.json().await.unwrap();
            assert_eq!(body["error"], "forbidden", "{what}: {body}");
        } else {
            let code = with_read.status().as_u16();
            assert!(code != 401 && code != 403, "{what} with a read key: {code}");
        }
        let code = status(&app, method, url, Some(&admin))
            .await
            .status()
            .as_u16();
        assert!(
            code != 401 && code != 403,
            "{what} with an admin key: {code}"
        );
    }
    assert!(guarded >= 15, "{guarded} guarded operations in {ops:?}");
    assert_eq!(admins, 2, "{ops:?}");

    // A key replaced with `sensorhub apikey` takes over on SIGHUP; the old one stops working.
    let replaced = apikey(&file, "grafana", "read");
    let pid = app.pid().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    app.eventually("the replaced key in force", || async {
        let new = status(&app, "GET", "/latestten", Some(&replaced))
            .await
            .status();
        let old = status(&app, "GET", "/latestten", Some(&read))
            .await
            .status();
        (new == 200 && old == 401).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_the_api_is_open_and_the_document_says_the_key_is_optional() {
    let app = TestApp::spawn().await;
    assert_eq!(app.get("/latestten").await.status(), 200);
    let spec: Value = app.get("/openapi.json").await.json().await.unwrap();
    let security = &spec["paths"]["/latestten"]["get"]["security"];
    assert_eq!(security, &serde_json::json!([{"ApiKey": []}, {}]));
    // The description's `sensors/<kind>` survives Markdown, in the document and in the UI page.
    let description = spec["info"]["description"].as_str().unwrap();
    assert!(
        description.contains("sensors/&lt;kind&gt; ("),
        "{description}"
    );
    let ui = app.get("/docs").await.text().await.unwrap();
    assert!(
        ui.contains("sensors/\\u0026lt;kind\\u0026gt; ("),
        "the UI embeds the same"
    );
    assert!(!ui.contains("sensors/<kind>"));
}

async fn admin_delete(app: &TestApp, sensor: &str, query: &str) -> (u16, Value) {
    let response = app
        .http
        .delete(app.url(&format!("/sensors/{sensor}/readings?{query}")))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// (kind, offset in ms) of a sensor's readings in MongoDB, newest first.
async fn stored(app: &TestApp, sensor: &str) -> Vec<(String, String)> {
    let docs: Vec<bson::Document> = app
        .readings()
        .await
        .find(doc! {"sensor_id": sensor})
        .sort(doc! {"timestamp": -1, "kind": -1})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    docs.iter()
        .map(|d| {
            let t = d.get_datetime("timestamp").unwrap().timestamp_millis();
            let t = sensorhub::domain::Timestamp::from_millis(t).unwrap();
            (d.get_str("kind").unwrap().to_owned(), t.to_string())
        })
        .collect()
}

fn instant(value: &Value) -> i64 {
    sensorhub::domain::Timestamp::parse(value.as_str().unwrap())
        .unwrap()
        .as_millis()
}

fn latest_of(body: &Value) -> Vec<(String, String)> {
    body.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap().to_owned(),
                r["timestamp"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_range_removes_exactly_those_readings_from_mongodb_redis_and_the_summary() {
    let app = TestApp::spawn().await;
    let publisher = Publisher::connect(app.mqtt_port, &unique("delete")).await;
    let mut id = 0;
    for i in 0..30 {
        for (sensor, topic) in [
            ("del-a", "sensors/temperature"),
            ("del-a", "sensors/humidity"),
            ("del-b", "sensors/temperature"),
        ] {
            let value = i as f64
                + if topic.ends_with("humidity") {
                    0.5
                } else {
                    0.0
                };
            publisher
                .publish(id, topic, reading_json(sensor, value, &ts(i * 1000)))
                .await;
            id += 1;
        }
    }
    publisher.wait_acked(id).await;
    app.wait_for_count(90).await;
    app.eventually("the summary counts everything", || async {
        let (_, a) = app.get_json("/sensors/del-a").await;
        (a["count"] == 60).then_some(())
    })
    .await;

    // The newest temperatures of del-a: what its latest ten (and the overall one) showed.
    let (code, body) = admin_delete(
        &app,
        "del-a",
        &format!("start={}&end={}&kind=temperature", ts(20_000), ts(29_000)),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["deleted"], 10);
    assert_eq!(
        body["by_kind"],
        serde_json::json!([{"kind": "temperature", "deleted": 10}])
    );
    let remaining = stored(&app, "del-a").await;
    assert_eq!(remaining.len(), 50);
    let temperatures: Vec<&String> = remaining
        .iter()
        .filter(|(k, _)| k == "temperature")
        .map(|(_, t)| t)
        .collect();
    assert_eq!(temperatures.len(), 20);
    assert_eq!(
        temperatures[0],
        &ts(19_000),
        "the newest left is the last before the range"
    );
    assert_eq!(
        stored(&app, "del-b").await.len(),
        30,
        "another sensor keeps everything"
    );

    // Redis serves exactly MongoDB's newest ten, for the sensor and overall.
    let latest = app
        .get_from_redis("/latestten/del-a")
        .await
        .expect("from Redis");
    assert_eq!(latest_of(&latest), remaining[..10].to_vec());
    let overall = app.get_from_redis("/latestten").await.expect("from Redis");
    for (r, (kind, t)) in overall.as_array().unwrap().iter().zip(latest_of(&overall)) {
        let deleted = r["sensor_id"] == "del-a" && kind == "temperature" && t >= ts(20_000);
        assert!(!deleted, "{overall}");
    }
    assert_eq!(overall.as_array().unwrap().len(), 10);

    // The summary: counts down by what was deleted, last seen from what remains.
    let (_, summary) = app.get_json("/sensors/del-a").await;
    assert_eq!(summary["count"], 50, "{summary}");
    let by_kind = summary["by_kind"].as_array().unwrap();
    let temperature = by_kind.iter().find(|k| k["kind"] == "temperature").unwrap();
    assert_eq!(temperature["count"], 20, "{summary}");
    assert_eq!(
        instant(&temperature["last_seen"]),
        instant(&ts(19_000).into())
    );
    assert_eq!(temperature["last_value"], 19.0);

    // Again: nothing left in the range. A reversed range deletes nothing.
    let (code, body) = admin_delete(
        &app,
        "del-a",
        &format!("start={}&end={}&kind=temperature", ts(20_000), ts(29_000)),
    )
    .await;
    assert_eq!((code, &body["deleted"]), (200, &0.into()));
    let (_, body) =
        admin_delete(&app, "del-a", &format!("start={}&end={}", ts(9_000), ts(0))).await;
    assert_eq!(body["deleted"], 0);

    // Everything of del-a: it is gone from every view. An unknown sensor is a 404.
    let (code, body) = admin_delete(
        &app,
        "del-a",
        "start=2000-01-01T00:00:00Z&end=2100-01-01T00:00:00Z",
    )
    .await;
    assert_eq!((code, &body["deleted"]), (200, &50.into()), "{body}");
    assert_eq!(app.get("/sensors/del-a").await.status(), 404);
    assert_eq!(app.get("/latestten/del-a").await.status(), 404);
    let (code, body) = admin_delete(&app, "del-a", "start=2000-01-01&end=2100-01-01").await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(body["error"], "not_found");
    assert_eq!(app.count_readings().await, 30);
}

async fn replay(app: &TestApp, reason: &str) -> Value {
    let response = app
        .http
        .post(app.url(&format!("/dead-letters/replay?reason={reason}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_stores_dead_letters_a_new_setting_lets_pass_exactly_once() {
    let mut first = TestApp::spawn().await;
    let publisher = Publisher::connect(first.mqtt_port, &unique("replay")).await;
    // 1999: before the default earliest timestamp (2000-01-01).
    let old = |i: i64| {
        sensorhub::domain::Timestamp::from_millis(915_148_800_000 + i * 1000)
            .unwrap()
            .to_string()
    };
    const OLD: usize = 12;
    for i in 0..OLD {
        let sensor = format!("replay-{}", i % 3);
        publisher
            .publish(
                i,
                "sensors/temperature",
                reading_json(&sensor, i as f64, &old(i as i64)),
            )
            .await;
    }
    // Still too old after the change; and one whose payload was kept only in part.
    publisher
        .publish(
            OLD,
            "sensors/temperature",
            reading_json("replay-0", 1.0, "1980-01-01T00:00:00Z"),
        )
        .await;
    let padded = format!(
        r#"{{"sensor_id":"replay-0","value":2,"timestamp":"{}","pad":"{}"}}"#,
        old(99),
        "x".repeat(6000)
    );
    publisher
        .publish(OLD + 1, "sensors/temperature", padded)
        .await;
    publisher
        .publish(
            OLD + 2,
            "sensors/temperature",
            reading_json("replay-ok", 5.0, &ts(0)),
        )
        .await;
    publisher.wait_acked(OLD + 3).await;
    first.wait_for_count(1).await;
    let out_of_range = "sensorhub_dead_letters_total{reason=\"timestamp_out_of_range\"}";
    first
        .eventually("the dead letters", || async {
            (first.metric(out_of_range).await == OLD as u64 + 2).then_some(())
        })
        .await;
    // Nothing passes under the settings that rejected them.
    let unchanged = replay(&first, "timestamp_out_of_range").await;
    assert_eq!(unchanged["replayed"], 0, "{unchanged}");
    assert_eq!(unchanged["still_failing"], OLD as u64 + 1, "{unchanged}");
    publisher.disconnect().await;
    assert!(first.terminate().await);

    // The operator moves the earliest timestamp back and replays.
    let second = TestApp::spawn_with(AppOptions {
        args: vec!["--earliest-timestamp".into(), "1990-01-01T00:00:00Z".into()],
        share_store_with: Some((first.database.clone(), first.prefix.clone())),
        ..AppOptions::default()
    })
    .await;
    let out = replay(&second, "timestamp_out_of_range").await;
    assert_eq!(out["examined"], OLD as u64 + 2, "{out}");
    assert_eq!(out["replayed"], OLD as u64, "{out}");
    assert_eq!(out["stored"], OLD as u64, "{out}");
    assert_eq!(out["still_failing"], 1, "{out}");
    assert_eq!(out["skipped_truncated"], 1, "{out}");
    assert_eq!(out["has_more"], false);
    assert_eq!(second.count_readings().await, OLD as u64 + 1);
    let (_, left) = second
        .get_json("/deadletters?reason=timestamp_out_of_range")
        .await;
    assert_eq!(left.as_array().unwrap().len(), 2, "{left}");

    // The ids a first pass would have given: the same reading published now is a duplicate.
    let publisher = Publisher::connect(second.mqtt_port, &unique("replay-again")).await;
    publisher
        .publish(
            0,
            "sensors/temperature",
            reading_json("replay-0", 0.0, &old(0)),
        )
        .await;
    publisher.wait_acked(1).await;
    second
        .eventually("the repeat counted as a duplicate", || async {
            (second.metric("sensorhub_readings_duplicate_total").await == 1).then_some(())
        })
        .await;
    assert_eq!(second.count_readings().await, OLD as u64 + 1);
    let id = format!("replay-0|temperature|{}", 915_148_800_000_i64);
    let doc = second
        .readings()
        .await
        .find_one(doc! {"_id": &id})
        .await
        .unwrap();
    assert!(doc.is_some(), "stored under {id}");

    // Replaying again stores nothing twice; the replayed readings reached Redis and the summary.
    let again = replay(&second, "timestamp_out_of_range").await;
    assert_eq!(
        (&again["replayed"], &again["examined"]),
        (&0.into(), &2.into()),
        "{again}"
    );
    assert_eq!(second.count_readings().await, OLD as u64 + 1);
    second
        .eventually("the replayed readings in Redis", || async {
            let latest = second.get_from_redis("/latestten/replay-1").await?;
            (latest.as_array()?.len() == OLD / 3).then_some(())
        })
        .await;
    second
        .eventually("the summary counts the replayed readings", || async {
            let (_, s) = second.get_json("/sensors/replay-2").await;
            (s["count"] == OLD as u64 / 3).then_some(())
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_preflight_for_listed_origins_only_and_range_and_body_limits_hold() {
    let app = TestApp::spawn_with(AppOptions {
        args: vec![
            "--cors-origins".into(),
            "https://dash.example,http://localhost:3000".into(),
            "--max-range-days".into(),
            "7".into(),
        ],
        ..AppOptions::default()
    })
    .await;
    let preflight = |origin: &'static str| {
        app.http
            .request(reqwest::Method::OPTIONS, app.url("/sensors/x/readings"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "DELETE")
            .header("Access-Control-Request-Headers", "authorization")
            .send()
    };
    let response = preflight("https://dash.example").await.unwrap();
    assert_eq!(response.status(), 200);
    let header = |r: &reqwest::Response, name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_lowercase())
    };
    assert_eq!(
        header(&response, "access-control-allow-origin").as_deref(),
        Some("https://dash.example")
    );
    assert!(
        header(&response, "access-control-allow-methods")
            .unwrap()
            .contains("delete")
    );
    assert!(
        header(&response, "access-control-allow-headers")
            .unwrap()
            .contains("authorization")
    );
    let simple = app
        .http
        .get(app.url("/latestten"))
        .header("Origin", "http://localhost:3000")
        .send()
        .await
        .unwrap();
    assert_eq!(simple.status(), 200);
    assert_eq!(
        header(&simple, "access-control-allow-origin").as_deref(),
        Some("http://localhost:3000")
    );
    assert!(
        header(&simple, "access-control-expose-headers")
            .unwrap()
            .contains("link")
    );
    // Another origin gets no CORS headers (its browser keeps the answer from the page).
    let other = preflight("https://evil.example").await.unwrap();
    assert!(header(&other, "access-control-allow-origin").is_none());
    let other = app
        .http
        .get(app.url("/latestten"))
        .header("Origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    assert!(header(&other, "access-control-allow-origin").is_none());

    // Ranges longer than 7 days, or open-ended, are a 400 naming the parameter.
    for (path, parameter) in [
        (
            format!("/readings?start={}&end=2026-01-09T00:00:00Z", ts(0)),
            "'end'",
        ),
        ("/readings?end=2026-01-09T00:00:00Z".to_owned(), "'start'"),
        (
            "/startoenddate?startDate=2026-01-01T00:00:00Z&endDate=2026-01-09T00:00:00Z".into(),
            "'endDate'",
        ),
        (
            "/grafana/series?from=1767225600000&to=1767916800000".into(),
            "'to'",
        ),
        (
            "/readings/export?start=2026-01-01T00:00:00Z".into(),
            "'end'",
        ),
        (
            "/readings/aggregate?sensor_id=x&interval=1h".into(),
            "'start'",
        ),
    ] {
        let (code, body) = app.get_json(&path).await;
        assert_eq!(code, 400, "{path}: {body}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains(parameter) && message.contains("7 days"),
            "{path}: {message}"
        );
    }
    let (code, _) = app
        .get_json("/readings?start=2026-01-01T00:00:00Z&end=2026-01-08T00:00:00Z")
        .await;
    assert_eq!(code, 200, "exactly 7 days is allowed");

    // A body larger than 64 KiB is refused before anything reads it.
    let response = app
        .http
        .post(app.url("/dead-letters/replay?reason=invalid_json"))
        .body(vec![b'x'; 100_000])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "payload_too_large");
}
