//! The query endpoints of issue 9 against real services: sensors and latest from the summary,
//! keyset paging, exports, aggregates and the Grafana series (checked against values computed
//! here from the readings sent), the original paths, and the one error shape.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use bson::{DateTime, doc};
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::helpers::{AppOptions, Publisher, TestApp, reading_json, start_mongo, ts};

/// 2026-01-01T00:00:00Z, the base of `ts`.
const BASE_MS: i64 = 1_767_225_600_000;

/// Publishes `(sensor, kind, value, ms after BASE_MS)` and waits until all are stored.
async fn publish(app: &TestApp, readings: &[(&str, &str, f64, i64)]) {
    let publisher = Publisher::connect(app.mqtt_port, &crate::helpers::unique("q")).await;
    for (i, (sensor, kind, value, at)) in readings.iter().enumerate() {
        publisher
            .publish(
                i,
                &format!("sensors/{kind}"),
                reading_json(sensor, *value, &ts(*at)),
            )
            .await;
    }
    publisher.wait_acked(readings.len()).await;
    publisher.disconnect().await;
}

async fn stored(app: &TestApp, count: u64) {
    app.wait_for_count(count).await;
}

/// RFC 3339 of `ms` after BASE_MS, percent-encoded for a query string.
fn q(ms: i64) -> String {
    ts(ms).replace(':', "%3A").replace('+', "%2B")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensors_and_latest_come_from_the_summary_kept_on_the_write_path() {
    let app = TestApp::spawn_with(AppOptions {
        args: vec!["--sensor-stale-secs".into(), "3600".into()],
        ..AppOptions::default()
    })
    .await;
    // `bme-1` reports two kinds now; `old-1` reported once, long ago (stale).
    let now = sensorhub::domain::Timestamp::now().as_millis() - BASE_MS;
    publish(
        &app,
        &[
            ("bme-1", "temperature", 20.0, now - 3000),
            ("bme-1", "temperature", 21.0, now - 1000),
            ("bme-1", "temperature", 19.0, now - 5000),
            ("bme-1", "humidity", 40.0, now - 2000),
            ("bme-1", "humidity", 41.0, now - 4000),
            ("old-1", "temperature", 5.0, 0),
        ],
    )
    .await;
    stored(&app, 6).await;
    // A duplicate with another value: not counted, and not the last value.
    publish(&app, &[("bme-1", "temperature", 99.0, now - 1000)]).await;
    app.eventually("the duplicate counted", || async {
        (app.metric("sensorhub_readings_duplicate_total").await == 1).then_some(())
    })
    .await;

    // The summary is written a moment after the readings (every 500 ms, off the write path).
    let body = app
        .eventually("both sensors summarised", || async {
            let (status, body) = app.get_json("/sensors").await;
            assert_eq!(status, 200, "{body}");
            let summarised = body["sensors"].as_array().is_some_and(|s| {
                s.len() == 2
                    && s.iter().map(|x| x["count"].as_u64()).sum::<Option<u64>>() == Some(6)
            });
            summarised.then_some(body)
        })
        .await;
    assert_eq!(body["has_more"], false);
    let sensors = body["sensors"].as_array().unwrap();
    assert_eq!(sensors.len(), 2, "{body}");
    let bme = &sensors[0];
    assert_eq!(bme["sensor_id"], "bme-1");
    assert_eq!(bme["kinds"], json!(["humidity", "temperature"]));
    assert_eq!(bme["count"], 5);
    assert_eq!(bme["stale"], false);
    assert_eq!(bme["last"]["value"], 21.0);
    assert_eq!(bme["last"]["kind"], "temperature");
    let millis = |v: &Value| {
        sensorhub::domain::Timestamp::parse(v.as_str().unwrap())
            .unwrap()
            .as_millis()
    };
    assert_eq!(millis(&bme["first_seen"]), BASE_MS + now - 5000);
    assert_eq!(millis(&bme["last_seen"]), BASE_MS + now - 1000);
    let humidity = &bme["by_kind"][0];
    assert_eq!(
        (
            &humidity["kind"],
            &humidity["count"],
            &humidity["last_value"]
        ),
        (&json!("humidity"), &json!(2), &json!(40.0))
    );
    let old = &sensors[1];
    assert_eq!(
        (&old["sensor_id"], &old["stale"]),
        (&json!("old-1"), &json!(true))
    );

    // Paging, prefix, one sensor, an unknown one.
    let (_, page) = app.get_json("/sensors?limit=1").await;
    assert_eq!(page["has_more"], true);
    assert_eq!(page["next_cursor"], "bme-1");
    let (_, next) = app.get_json("/sensors?limit=1&cursor=bme-1").await;
    assert_eq!(next["sensors"][0]["sensor_id"], "old-1");
    assert_eq!(next["has_more"], false);
    let (_, prefixed) = app.get_json("/sensors?prefix=old").await;
    assert_eq!(prefixed["sensors"].as_array().unwrap().len(), 1);
    let (status, one) = app.get_json("/sensors/bme-1").await;
    assert_eq!((status, &one["count"]), (200, &json!(5)));
    let (status, missing) = app.get_json("/sensors/nobody").await;
    assert_eq!((status, &missing["error"]), (404, &json!("not_found")));

    // The latest reading of every sensor and kind, in one call; filtered.
    let (status, latest) = app.get_json("/latest").await;
    assert_eq!(status, 200);
    let rows: Vec<(String, String, f64)> = latest["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["sensor_id"].as_str().unwrap().to_owned(),
                r["kind"].as_str().unwrap().to_owned(),
                r["value"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("bme-1".into(), "humidity".into(), 40.0),
            ("bme-1".into(), "temperature".into(), 21.0),
            ("old-1".into(), "temperature".into(), 5.0),
        ]
    );
    let (_, humid) = app.get_json("/latest?kind=humidity").await;
    assert_eq!(humid["readings"].as_array().unwrap().len(), 1);
    let (_, old_only) = app.get_json("/latest?prefix=old-").await;
    assert_eq!(old_only["readings"][0]["sensor_id"], "old-1");

    // The summary is its own small collection, one document per sensor, written a moment
    // after the readings.
    let collection = app
        .mongo()
        .await
        .collection::<bson::Document>("sensor_readings.sensors");
    app.eventually("both sensors in the summary collection", || async {
        (collection.count_documents(doc! {}).await.unwrap() == 2).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counted_reading_is_on_sensors_at_once_and_other_instances_see_it_once_written() {
    let a = TestApp::spawn().await;
    let b = TestApp::spawn_with(AppOptions {
        share_store_with: Some((a.database.clone(), a.prefix.clone())),
        ..AppOptions::default()
    })
    .await;
    let now = sensorhub::domain::Timestamp::now().as_millis() - BASE_MS;
    for round in 0..5_u64 {
        let at = now + round as i64 * 10;
        publish(
            &a,
            &[
                ("fresh-1", "temperature", round as f64, at),
                ("fresh-2", "humidity", round as f64 + 0.5, at),
            ],
        )
        .await;
        let counted = 2 * (round + 1);
        a.eventually("the readings counted", || async {
            (a.metric("sensorhub_readings_stored_total").await == counted).then_some(())
        })
        .await;
        // No waiting: the instance that stored them shows them, whether or not the summary
        // was written to MongoDB yet.
        let (status, body) = a.get_json("/sensors").await;
        assert_eq!(status, 200, "{body}");
        let sensors = body["sensors"].as_array().unwrap();
        let counts: Vec<(&str, u64, f64)> = sensors
            .iter()
            .map(|s| {
                (
                    s["sensor_id"].as_str().unwrap(),
                    s["count"].as_u64().unwrap(),
                    s["last"]["value"].as_f64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            counts,
            [
                ("fresh-1", round + 1, round as f64),
                ("fresh-2", round + 1, round as f64 + 0.5)
            ],
            "round {round}"
        );
        let (_, latest) = a.get_json("/latest?kind=humidity").await;
        assert_eq!(latest["readings"][0]["value"], round as f64 + 0.5);
        let (_, one) = a.get_json("/sensors/fresh-1").await;
        assert_eq!(one["count"], round + 1);
    }
    // Another instance on the same database reads what was written.
    b.eventually("the other instance sees both sensors", || async {
        let (_, body) = b.get_json("/sensors").await;
        let counts: Vec<u64> = body["sensors"]
            .as_array()?
            .iter()
            .filter_map(|s| s["count"].as_u64())
            .collect();
        (counts == [5, 5]).then_some(())
    })
    .await;
}

/// The sensor ids of a `/sensors` answer.
fn sensor_ids(body: &Value) -> Vec<String> {
    body["sensors"]
        .as_array()
        .unwrap_or_else(|| panic!("no sensors in {body}"))
        .iter()
        .map(|s| s["sensor_id"].as_str().unwrap().to_owned())
        .collect()
}

/// The summary's last value of `sensor`'s `kind`, straight from MongoDB.
async fn summarised_value(app: &TestApp, sensor: &str, kind: &str) -> Option<f64> {
    let summary = app
        .mongo()
        .await
        .collection::<bson::Document>("sensor_readings.sensors")
        .find_one(doc! {"_id": sensor})
        .await
        .unwrap()?;
    let last = summary
        .get_document("kinds")
        .ok()?
        .get_document(kind)
        .ok()?
        .get_document("last")
        .ok()?;
    last.get_f64("v").ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensors_of_another_instance_are_listed_after_a_reload_and_values_never_lag() {
    // `mine` pages from its in-memory sensor list, reloaded every second; `other` shares its
    // database and writes sensors `mine` never wrote.
    let mine = TestApp::spawn_with(AppOptions {
        args: vec!["--sensor-list-refresh-secs".into(), "1".into()],
        ..AppOptions::default()
    })
    .await;
    let other = TestApp::spawn_with(AppOptions {
        share_store_with: Some((mine.database.clone(), mine.prefix.clone())),
        ..AppOptions::default()
    })
    .await;
    publish(&mine, &[("a-1", "temperature", 1.0, 0)]).await;
    publish(
        &other,
        &[
            ("b-1", "temperature", 2.0, 0),
            ("c-1", "temperature", 3.0, 0),
        ],
    )
    .await;
    let listed = mine
        .eventually("the other instance's sensors listed", || async {
            let (status, body) = mine.get_json("/sensors").await;
            assert_eq!(status, 200, "{body}");
            (sensor_ids(&body) == ["a-1", "b-1", "c-1"]).then_some(body)
        })
        .await;
    assert_eq!(listed["has_more"], false);

    // A new value of a listed sensor, written by the other instance, shows as soon as its
    // summary holds it: the list holds ids, the values are read on every call.
    publish(&other, &[("b-1", "temperature", 20.0, 1000)]).await;
    other
        .eventually("the new value summarised", || async {
            (summarised_value(&other, "b-1", "temperature").await == Some(20.0)).then_some(())
        })
        .await;
    let (_, latest) = mine.get_json("/latest?prefix=b-").await;
    assert_eq!(latest["readings"][0]["value"], 20.0, "{latest}");
    // A new kind of that sensor: listed under its kind after a reload.
    publish(&other, &[("b-1", "humidity", 50.0, 1000)]).await;
    mine.eventually("the new kind listed", || async {
        let (_, body) = mine.get_json("/sensors?kind=humidity").await;
        (sensor_ids(&body) == ["b-1"]).then_some(())
    })
    .await;

    // A deleted sensor is skipped at once, and the page is filled from the ids after it.
    let response = mine
        .http
        .delete(mine.url(&format!(
            "/sensors/b-1/readings?start={}&end={}",
            q(0),
            q(1000)
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let (_, page) = mine.get_json("/sensors?limit=2").await;
    assert_eq!(sensor_ids(&page), ["a-1", "c-1"], "{page}");
    assert_eq!(page["has_more"], false, "{page}");
    let (_, page) = mine.get_json("/sensors?limit=1&cursor=a-1").await;
    assert_eq!(sensor_ids(&page), ["c-1"], "{page}");
    let (_, latest) = mine.get_json("/latest?kind=humidity").await;
    assert_eq!(latest["readings"], json!([]), "{latest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_page_every_reading_exactly_once_while_new_ones_arrive() {
    let app = TestApp::spawn().await;
    let mut sent: Vec<(String, &str, f64, i64)> = Vec::new();
    for i in 0..90 {
        // Three sensors, two kinds, several readings sharing a millisecond.
        let sensor = format!("p{}", i % 3);
        let kind = if i % 2 == 0 {
            "temperature"
        } else {
            "humidity"
        };
        sent.push((sensor, kind, i as f64, (i / 4) * 1000));
    }
    let refs: Vec<(&str, &str, f64, i64)> = sent
        .iter()
        .map(|(s, k, v, t)| (s.as_str(), *k, *v, *t))
        .collect();
    publish(&app, &refs).await;
    stored(&app, 90).await;
    let expected: HashSet<(String, String, String)> = sent
        .iter()
        .map(|(s, k, _, t)| (s.clone(), (*k).to_owned(), ts(*t)))
        .collect();
    assert_eq!(expected.len(), 90);

    for order in ["asc", "desc"] {
        let publisher = Publisher::connect(app.mqtt_port, &crate::helpers::unique("late")).await;
        let mut url = format!(
            "/readings?start={}&end={}&limit=7&order={order}",
            q(0),
            q(60_000)
        );
        let (mut seen, mut pages, mut late) = (Vec::new(), 0, 0);
        loop {
            let response = app.get(&url).await;
            assert_eq!(response.status(), 200);
            let link = response
                .headers()
                .get("link")
                .map(|l| l.to_str().unwrap().to_owned());
            let body: Value = response.json().await.unwrap();
            for r in body["readings"].as_array().unwrap() {
                seen.push((
                    r["sensor_id"].as_str().unwrap().to_owned(),
                    r["kind"].as_str().unwrap().to_owned(),
                    r["timestamp"].as_str().unwrap().to_owned(),
                ));
            }
            pages += 1;
            // New readings land inside the range, before and after the pages read so far.
            for at in [500 + pages * 10, 30_500 + pages * 10] {
                publisher
                    .publish(late, "sensors/pressure", reading_json("p9", 1.0, &ts(at)))
                    .await;
                late += 1;
            }
            let Some(cursor) = body["next_cursor"].as_str() else {
                assert_eq!(body["has_more"], false);
                assert!(link.is_none());
                break;
            };
            assert_eq!(body["has_more"], true);
            let link = link.expect("a Link header beside next_cursor");
            assert!(link.contains("rel=\"next\""), "{link}");
            url = link
                .trim_start_matches('<')
                .split('>')
                .next()
                .unwrap()
                .to_owned();
            assert!(url.contains("cursor="), "{url}");
            assert!(pages < 100, "paging does not end");
            let _ = cursor;
        }
        let unique: HashSet<_> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), seen.len(), "{order}: a reading came twice");
        assert!(
            expected.is_subset(&unique),
            "{order}: readings missing: {:?}",
            expected.difference(&unique).collect::<Vec<_>>()
        );
        let times: Vec<&String> = seen.iter().map(|(_, _, t)| t).collect();
        let mut sorted = times.clone();
        sorted.sort();
        if order == "desc" {
            sorted.reverse();
        }
        assert_eq!(times, sorted, "{order}: out of order");
        publisher.wait_acked(late).await;
        publisher.disconnect().await;
    }

    // Several sensors at once, one kind.
    let (_, body) = app
        .get_json("/readings?sensor_id=p0&sensor_id=p2&kind=temperature&limit=1000")
        .await;
    let rows = body["readings"].as_array().unwrap();
    let want = sent
        .iter()
        .filter(|(s, k, ..)| (s == "p0" || s == "p2") && *k == "temperature")
        .count();
    assert_eq!(rows.len(), want);
    assert!(
        rows.iter()
            .all(|r| r["kind"] == "temperature" && r["sensor_id"] != "p1")
    );

    // /startoenddate keeps its shape (a bare array) and pages the same way.
    let response = app
        .get(&format!(
            "/startoenddate?startDate={}&endDate={}&limit=5",
            q(0),
            q(60_000)
        ))
        .await;
    let link = response
        .headers()
        .get("link")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body.as_array().unwrap().len(), 5);
    assert!(link.starts_with("</startoenddate?"), "{link}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_stream_csv_and_ndjson_with_a_file_name() {
    let app = TestApp::spawn().await;
    publish(
        &app,
        &[
            ("plain", "temperature", 1.5, 1000),
            ("with,comma \"q\"", "temperature", -2.0, 2000),
            ("plain", "humidity", 3.25, 3000),
            ("other", "temperature", 4.0, 9000),
        ],
    )
    .await;
    stored(&app, 4).await;
    let url = format!("/readings/export?start={}&end={}&format=csv", q(0), q(5000));
    let response = app.get(&url).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/csv; charset=utf-8"
    );
    let disposition = response.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        disposition,
        "attachment; filename=\"readings-20260101T000000000Z-20260101T000005000Z.csv\""
    );
    let csv = response.text().await.unwrap();
    assert_eq!(
        csv,
        format!(
            "sensor_id,kind,value,timestamp\n\
             plain,temperature,1.5,{}\n\
             \"with,comma \"\"q\"\"\",temperature,-2.0,{}\n\
             plain,humidity,3.25,{}\n",
            ts(1000),
            ts(2000),
            ts(3000)
        )
    );
    let response = app
        .get("/readings/export?format=ndjson&order=desc&sensor_id=plain")
        .await;
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let lines: Vec<Value> = response
        .text()
        .await
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines,
        vec![
            json!({"sensor_id": "plain", "kind": "humidity", "value": 3.25, "timestamp": ts(3000)}),
            json!({"sensor_id": "plain", "kind": "temperature", "value": 1.5, "timestamp": ts(1000)}),
        ]
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_of_a_million_rows_streams_in_flat_memory() {
    const ROWS: i64 = 1_000_000;
    let app = TestApp::spawn().await;
    // Loaded straight into MongoDB: this test is about reading a large history back.
    let collection = app.readings().await;
    for chunk in 0..(ROWS / 20_000) {
        let docs: Vec<_> = (chunk * 20_000..(chunk + 1) * 20_000)
            .map(|i| {
                let sensor = format!("bulk-{}", i % 1000);
                doc! {
                    "_id": format!("{sensor}|temperature|{}", BASE_MS + i),
                    "sensor_id": sensor,
                    "kind": "temperature",
                    "value": i as f64,
                    "timestamp": DateTime::from_millis(BASE_MS + i),
                }
            })
            .collect();
        collection.insert_many(docs).await.unwrap();
    }
    let pid = app.pid().unwrap();
    let before = rss_kib(pid);
    let response = reqwest::Client::new()
        .get(app.url("/readings/export?format=csv"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let (mut lines, mut bytes, mut peak) = (0usize, 0usize, before);
    let mut last = Vec::new();
    let mut sampled = tokio::time::Instant::now();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("export cut short");
        lines += chunk.iter().filter(|b| **b == b'\n').count();
        bytes += chunk.len();
        last = chunk.to_vec();
        if sampled.elapsed() > Duration::from_millis(100) {
            peak = peak.max(rss_kib(pid));
            sampled = tokio::time::Instant::now();
        }
    }
    peak = peak.max(rss_kib(pid));
    eprintln!(
        "exported {lines} lines, {} MiB; RSS {before} KiB -> peak {peak} KiB",
        bytes >> 20
    );
    assert_eq!(
        lines,
        ROWS as usize + 1,
        "a header and one line per reading"
    );
    let tail = String::from_utf8_lossy(&last);
    assert!(
        tail.ends_with(&format!(",999999.0,{}\n", ts(ROWS - 1))),
        "{tail}"
    );
    let growth_mib = peak.saturating_sub(before) / 1024;
    assert!(
        growth_mib < 50,
        "RSS grew by {growth_mib} MiB exporting {} MiB",
        bytes >> 20
    );
}

/// Berlin's offset from UTC in 2026, in hours: summer time from 29 March 01:00 UTC to 25 October
/// 01:00 UTC. Written out here so the test does not trust the code under test.
fn berlin_offset_ms(utc_ms: i64) -> i64 {
    let spring = 1_774_746_000_000; // 2026-03-29T01:00:00Z
    let autumn = 1_792_890_000_000; // 2026-10-25T01:00:00Z
    if (spring..autumn).contains(&utc_ms) {
        7_200_000
    } else {
        3_600_000
    }
}

#[derive(Debug, Default, PartialEq)]
struct Expected {
    count: u64,
    min: f64,
    max: f64,
    sum: f64,
    first: f64,
    last: f64,
}

fn fold<K: Ord>(buckets: &mut BTreeMap<K, Expected>, key: K, value: f64) {
    let b = buckets.entry(key).or_insert(Expected {
        min: f64::MAX,
        max: f64::MIN,
        first: value,
        ..Expected::default()
    });
    b.count += 1;
    b.min = b.min.min(value);
    b.max = b.max.max(value);
    b.sum += value;
    b.last = value;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_match_buckets_computed_here_across_both_clock_changes() {
    let app = TestApp::spawn().await;
    // Every 20 minutes, from 2026-03-28 to 03-31 and from 10-24 to 10-27 (UTC), with values
    // that differ in every bucket.
    let spans = [
        (1_774_656_000_000_i64, 1_774_915_200_000_i64), // 03-28T00Z .. 03-31T00Z
        (1_792_800_000_000, 1_793_059_200_000),         // 10-24T00Z .. 10-27T00Z
    ];
    let mut readings = Vec::new();
    for (from, to) in spans {
        let mut at = from;
        while at < to {
            let value = ((at / 60_000) % 97) as f64 + 0.25;
            readings.push(("dst", "temperature", value, at - BASE_MS));
            at += 1_200_000;
        }
    }
    publish(&app, &readings).await;
    stored(&app, readings.len() as u64).await;

    // Day buckets in Berlin: local midnight to local midnight.
    let mut days: BTreeMap<i64, Expected> = BTreeMap::new();
    for (_, _, value, at) in &readings {
        let utc = BASE_MS + at;
        let local = utc + berlin_offset_ms(utc);
        fold(&mut days, local.div_euclid(86_400_000), *value);
    }
    let (status, body) = app
        .get_json("/readings/aggregate?sensor_id=dst&interval=1d&tz=Europe/Berlin")
        .await;
    assert_eq!(status, 200, "{body}");
    let buckets = body["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), days.len(), "{body}");
    for (bucket, (day, want)) in buckets.iter().zip(&days) {
        // The bucket starts at local midnight: its UTC start plus the offset then is a whole day.
        let start = sensorhub::domain::Timestamp::parse(bucket["start"].as_str().unwrap())
            .unwrap()
            .as_millis();
        assert_eq!(
            (start + berlin_offset_ms(start)).div_euclid(86_400_000),
            *day
        );
        assert_eq!(bucket["count"], want.count, "{bucket}");
        assert_eq!(bucket["min"], want.min, "{bucket}");
        assert_eq!(bucket["max"], want.max, "{bucket}");
        assert_eq!(bucket["first"], want.first, "{bucket}");
        assert_eq!(bucket["last"], want.last, "{bucket}");
        let avg = bucket["avg"].as_f64().unwrap();
        assert!(
            (avg - want.sum / want.count as f64).abs() < 1e-9,
            "{bucket}"
        );
    }
    // The 23-hour and the 25-hour day.
    let lengths: Vec<i64> = buckets
        .iter()
        .map(|b| {
            let t = |k: &str| {
                sensorhub::domain::Timestamp::parse(b[k].as_str().unwrap())
                    .unwrap()
                    .as_millis()
            };
            (t("end") - t("start")) / 3_600_000
        })
        .collect();
    assert!(
        lengths.contains(&23) && lengths.contains(&25),
        "{lengths:?}"
    );
    let short_day = days
        .iter()
        .find(|(day, _)| **day * 86_400_000 == 1_774_742_400_000) // 2026-03-29 local
        .map(|(_, b)| b.count);
    assert_eq!(short_day, Some(69), "23 hours of three readings an hour");

    // 15-minute buckets with two statistics, empty buckets filled (every third is empty).
    let (from, to) = (1_774_656_000_000_i64, 1_774_659_600_000_i64);
    let url = format!(
        "/readings/aggregate?sensor_id=dst&interval=15m&fn=count,last&tz=Europe/Berlin&empty=fill&start={}&end={}",
        q(from - BASE_MS),
        q(to - BASE_MS - 1)
    );
    let (_, body) = app.get_json(&url).await;
    let got: Vec<(String, u64, Option<f64>)> = body["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            assert!(b.get("min").is_none(), "only the asked-for statistics: {b}");
            (
                b["start"].as_str().unwrap().to_owned(),
                b["count"].as_u64().unwrap(),
                b["last"].as_f64(),
            )
        })
        .collect();
    let mut want = Vec::new();
    for i in 0..4 {
        let start = from + i * 900_000;
        let inside: Vec<f64> = readings
            .iter()
            .filter(|(.., at)| (start..start + 900_000).contains(&(BASE_MS + at)))
            .map(|(_, _, v, _)| *v)
            .collect();
        want.push((
            sensorhub::domain::Timestamp::from_millis(start)
                .unwrap()
                .to_string()
                .replace(".000Z", "Z"),
            inside.len() as u64,
            inside.last().copied(),
        ));
    }
    assert_eq!(got, want);
    let (_, omitted) = app.get_json(&url.replace("&empty=fill", "")).await;
    assert_eq!(omitted["buckets"].as_array().unwrap().len(), 3);

    // Parameters it cannot use are 400s that name them.
    for (query, name) in [
        ("interval=2m", "interval"),
        ("interval=1m&tz=Mars/Olympus", "tz"),
        ("interval=1m&fn=median", "fn"),
        ("interval=1m&empty=maybe", "empty"),
    ] {
        let (status, body) = app
            .get_json(&format!("/readings/aggregate?sensor_id=dst&{query}"))
            .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body["message"].as_str().unwrap().contains(name), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_series_downsamples_in_mongodb_to_at_most_max_points() {
    let app = TestApp::spawn().await;
    // Ten minutes at 1 Hz of two sensors.
    let mut readings = Vec::new();
    for s in 0..600 {
        readings.push(("g1", "temperature", (s % 37) as f64, s * 1000));
        readings.push(("g2", "temperature", (s % 11) as f64 * 2.0, s * 1000));
    }
    publish(&app, &readings).await;
    stored(&app, readings.len() as u64).await;
    let (from, to) = (BASE_MS, BASE_MS + 599_999);
    let max_points = 7;
    let url = format!(
        "/grafana/series?sensor_id=g1&sensor_id=g2&kind=temperature&from={from}&to={to}&max_points={max_points}"
    );
    let (status, body) = app.get_json(&url).await;
    assert_eq!(status, 200, "{body}");
    // Computed here: equal buckets from `from`, as wide as needed for max_points to cover.
    let width = (to - from + 1 + max_points - 1) / max_points;
    let mut want: BTreeMap<(i64, String), Expected> = BTreeMap::new();
    for (sensor, _, value, at) in &readings {
        let b = (BASE_MS + at - from) / width;
        fold(&mut want, (b, (*sensor).to_owned()), *value);
    }
    let rows = body.as_array().unwrap();
    assert_eq!(rows.len(), want.len(), "{body}");
    assert!(want.keys().filter(|(_, s)| s == "g1").count() <= max_points as usize);
    for (row, ((b, sensor), e)) in rows.iter().zip(&want) {
        let keys: Vec<&str> = row
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for key in ["time", "sensor_id", "kind", "value", "min", "max"] {
            assert!(keys.contains(&key), "{row}");
        }
        let time = sensorhub::domain::Timestamp::parse(row["time"].as_str().unwrap())
            .unwrap()
            .as_millis();
        assert_eq!(time, from + b * width, "{row}");
        assert_eq!(row["sensor_id"], sensor.as_str());
        assert_eq!(row["kind"], "temperature");
        assert_eq!(row["count"], e.count);
        assert_eq!(row["min"], e.min);
        assert_eq!(row["max"], e.max);
        assert!((row["value"].as_f64().unwrap() - e.sum / e.count as f64).abs() < 1e-9);
    }
    // RFC 3339 bounds give the same answer as epoch milliseconds.
    let rfc = format!(
        "/grafana/series?sensor_id=g1&sensor_id=g2&kind=temperature&from={}&to={}&max_points={max_points}",
        q(0),
        q(599_999)
    );
    let (_, same) = app.get_json(&rfc).await;
    assert_eq!(same, body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_paths_answer_and_are_marked_deprecated() {
    let app = TestApp::spawn().await;
    publish(
        &app,
        &[
            ("orig", "temperature", 1.0, 0),
            ("orig", "humidity", 2.0, 1000),
        ],
    )
    .await;
    stored(&app, 2).await;
    let (status, all) = app.get_json("/allData").await;
    assert_eq!(status, 200);
    assert_eq!(all.as_array().unwrap().len(), 2);
    assert_eq!(app.get_json("/alldata").await, (200, all.clone()));
    let range = format!("startDate={}&endDate={}", q(0), q(1000));
    let original = app.get_json(&format!("/startoenddate?{range}")).await;
    assert_eq!(original, (200, all));
    assert_eq!(
        app.get_json(&format!("/starttoenddate?{range}")).await,
        original
    );
    let (_, spec) = app.get_json("/openapi.json").await;
    assert_eq!(spec["paths"]["/alldata"]["get"]["deprecated"], true);
    assert_eq!(spec["paths"]["/starttoenddate"]["get"]["deprecated"], true);
    assert!(spec["paths"]["/allData"]["get"].get("deprecated").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_has_one_shape() {
    let app = TestApp::spawn().await;
    let check = |status: u16, body: &Value, code: &str| {
        assert_eq!(body["error"], code, "{body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        assert_eq!(body.as_object().unwrap().len(), 2, "{body}");
        let _ = status;
    };
    let (status, body) = app.get_json("/no/such/path").await;
    assert_eq!(status, 404);
    check(status, &body, "not_found");
    for method in [
        reqwest::Method::POST,
        reqwest::Method::DELETE,
        reqwest::Method::PUT,
    ] {
        let response = app
            .http
            .request(method.clone(), app.url("/readings"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405, "{method}");
        assert_eq!(response.headers()["allow"], "GET, HEAD");
        let body: Value = response.json().await.unwrap();
        check(405, &body, "method_not_allowed");
    }
    for (path, name) in [
        ("/readings?limit=0", "limit"),
        ("/readings?limit=10001", "limit"),
        ("/readings?order=sideways", "order"),
        ("/readings?start=yesterday", "start"),
        ("/readings?cursor=abc", "cursor"),
        ("/readings/export?format=xml", "format"),
        ("/grafana/series?from=soon&to=0", "from"),
        ("/sensors?limit=0", "limit"),
        ("/stream?heartbeat_secs=0", "heartbeat_secs"),
    ] {
        let (status, body) = app.get_json(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        check(status, &body, "bad_request");
        assert!(
            body["message"].as_str().unwrap().contains(name),
            "{path}: {body}"
        );
    }
    let (status, body) = app.get_json("/sensors/unknown").await;
    assert_eq!(status, 404);
    check(status, &body, "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_down_is_a_503_naming_it_with_retry_after_and_no_driver_details() {
    let mut mongo = start_mongo();
    let uri = format!("mongodb://127.0.0.1:{}", mongo.port);
    let app = TestApp::spawn_with(AppOptions {
        mongodb_uri: Some(uri),
        ..AppOptions::default()
    })
    .await;
    mongo.stop();
    for path in [
        "/readings",
        "/sensors",
        "/latest",
        "/readings/aggregate?sensor_id=a&interval=1h",
    ] {
        let response = app.get(path).await;
        assert_eq!(response.status(), 503, "{path}");
        assert_eq!(response.headers()["retry-after"], "5", "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "unavailable");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains("MongoDB"), "{message}");
        assert!(
            !message.contains("127.0.0.1") && !message.contains(&mongo.port.to_string()),
            "driver details leaked: {message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_declares_bounds_requirements_formats_and_enums() {
    let app = TestApp::spawn().await;
    let (_, spec) = app.get_json("/openapi.json").await;
    let param = |path: &str, name: &str| -> Value {
        spec["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap_or_else(|| panic!("no parameters for {path}"))
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{path} has no parameter {name}"))
            .clone()
    };
    // Enumerations are components: follow a `$ref`.
    let schema = |p: &Value| -> Value {
        match p["schema"]["$ref"].as_str() {
            Some(r) => {
                spec["components"]["schemas"][r.trim_start_matches("#/components/schemas/")].clone()
            }
            None => p["schema"].clone(),
        }
    };
    let limit = param("/readings", "limit");
    assert_eq!(
        (
            limit["schema"]["minimum"].as_f64(),
            limit["schema"]["maximum"].as_f64()
        ),
        (Some(1.0), Some(10000.0))
    );
    let start = param("/startoenddate", "startDate");
    assert_eq!(start["required"], true);
    assert_eq!(start["schema"]["format"], "date-time");
    assert_eq!(
        schema(&param("/readings/aggregate", "interval"))["enum"],
        json!(["1m", "5m", "15m", "1h", "1d"])
    );
    assert!(
        schema(&param("/readings/aggregate", "tz"))["enum"]
            .as_array()
            .unwrap()
            .contains(&json!("Europe/Berlin"))
    );
    assert_eq!(
        schema(&param("/readings", "order"))["enum"],
        json!(["asc", "desc"])
    );
    for path in [
        "/sensors",
        "/sensors/{sensor_id}",
        "/latest",
        "/readings",
        "/readings/export",
        "/readings/aggregate",
        "/grafana/series",
        "/stream",
        "/startoenddate",
        "/starttoenddate",
        "/latestten",
        "/latestten/{sensor_id}",
        "/allData",
        "/alldata",
        "/deadletters",
    ] {
        let op = &spec["paths"][path]["get"];
        assert!(op.is_object(), "{path} undocumented");
        assert!(op["summary"].is_string(), "{path} has no summary");
        for status in ["200", "400", "503"] {
            assert!(op["responses"][status].is_object(), "{path} lacks {status}");
        }
    }
    let reading = &spec["components"]["schemas"]["Reading"];
    assert!(reading["example"].is_object(), "{reading}");
}

#[test]
fn the_shipped_grafana_dashboard_queries_the_series_endpoint() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{dir}/dashboards/sensorhub.json")).unwrap(),
    )
    .unwrap();
    let target = &dashboard["panels"][0]["targets"][0];
    assert_eq!(target["datasource"]["uid"], "sensorhub");
    let url = target["url"].as_str().unwrap();
    for part in [
        "/grafana/series?",
        "from=${__from}",
        "to=${__to}",
        "max_points=${__maxDataPoints}",
    ] {
        assert!(url.contains(part), "{url}");
    }
    let datasource =
        std::fs::read_to_string(format!("{dir}/provisioning/datasources/sensorhub.yaml")).unwrap();
    assert!(
        datasource.contains("uid: sensorhub")
            && datasource.contains("yesoreyeram-infinity-datasource")
    );
}
