//! `/stream` against the real binary: stored readings arrive as Server-Sent Events, filtered,
//! with heartbeats and `Last-Event-ID` resumption; a client that stops reading is dropped and
//! counted while ingest goes on.

use std::time::Instant;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::helpers::{PATIENCE, Publisher, TestApp, reading_json, ts, unique};

/// One parsed SSE event, or a heartbeat comment.
#[derive(Debug, Clone, PartialEq)]
enum Sse {
    Event {
        id: Option<String>,
        kind: Option<String>,
        data: String,
    },
    Heartbeat,
}

/// Reads SSE frames off a response body.
struct Frames {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl Frames {
    async fn open(app: &TestApp, path: &str, last_event_id: Option<&str>) -> Self {
        let mut request = reqwest::Client::new().get(app.url(path));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Self {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    async fn next(&mut self) -> Sse {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let frame: String = self.buffer.drain(..end + 2).collect();
                let (mut id, mut kind, mut data, mut comment) = (None, None, String::new(), false);
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        kind = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    } else if line.starts_with(':') {
                        comment = true;
                    }
                }
                if comment && data.is_empty() {
                    return Sse::Heartbeat;
                }
                return Sse::Event { id, kind, data };
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            let chunk = tokio::time::timeout(remaining, self.body.next())
                .await
                .expect("no event in time")
                .expect("stream ended")
                .unwrap();
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// The next event that is not a heartbeat.
    async fn event(&mut self) -> (Option<String>, Option<String>, serde_json::Value) {
        loop {
            if let Sse::Event { id, kind, data } = self.next().await {
                return (id, kind, serde_json::from_str(&data).unwrap());
            }
        }
    }
}

async fn wait_for_clients(app: &TestApp, n: u64) {
    app.eventually(&format!("{n} stream clients"), || async {
        (app.metric("sensorhub_stream_clients").await == n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_carries_stored_readings_filtered_with_heartbeats_and_resumes() {
    let app = TestApp::spawn().await;
    let mut stream = Frames::open(&app, "/stream?sensor_id=s1&heartbeat_secs=1", None).await;
    let mut humid = Frames::open(&app, "/stream?kind=humidity", None).await;
    wait_for_clients(&app, 2).await;

    let publisher = Publisher::connect(app.mqtt_port, &unique("sse")).await;
    let sent = [
        ("s2", "temperature", 0),
        ("s1", "temperature", 1),
        ("s1", "humidity", 2),
        ("s2", "humidity", 3),
        ("s1", "temperature", 4),
    ];
    for (i, (sensor, kind, at)) in sent.iter().enumerate() {
        publisher
            .publish(
                i,
                &format!("sensors/{kind}"),
                reading_json(sensor, i as f64, &ts(*at * 1000)),
            )
            .await;
    }
    publisher.wait_acked(sent.len()).await;

    let mut ids = Vec::new();
    for want in [1.0, 2.0, 4.0] {
        let (id, kind, reading) = stream.event().await;
        assert_eq!(kind, None, "readings are plain messages");
        assert_eq!(reading["sensor_id"], "s1");
        assert_eq!(reading["value"], want);
        ids.push(id.unwrap().parse::<u64>().unwrap());
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    for want in [2.0, 3.0] {
        let (_, _, reading) = humid.event().await;
        assert_eq!(
            (&reading["kind"], &reading["value"]),
            (&"humidity".into(), &want.into())
        );
    }
    // Heartbeats keep an idle stream open.
    loop {
        if stream.next().await == Sse::Heartbeat {
            break;
        }
    }

    // A client that reconnects after the first event gets the two after it, and nothing again.
    let mut resumed = Frames::open(&app, "/stream?sensor_id=s1", Some(&ids[0].to_string())).await;
    for want in [2.0, 4.0] {
        let (_, _, reading) = resumed.event().await;
        assert_eq!(reading["value"], want);
    }
    // An id from outside the window: a gap event says some were missed.
    let mut gapped = Frames::open(&app, "/stream", Some("5")).await;
    let (_, kind, _) = gapped.event().await;
    assert_eq!(kind.as_deref(), Some("gap"));
}

/// Slow `/stream` clients cut off: for falling behind, or by the write deadline.
async fn dropped(app: &TestApp) -> u64 {
    app.metric("sensorhub_stream_dropped_total").await
        + app.metric("sensorhub_http_write_timeouts_total").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_and_counted_while_ingest_goes_on() {
    // A client that stops reading is never polled again, so only the write deadline ends it.
    let app = TestApp::spawn_with(crate::helpers::AppOptions {
        args: vec!["--http-write-timeout-secs".into(), "2".into()],
        ..Default::default()
    })
    .await;
    // A raw connection with a tiny receive window that never reads what it asked for.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = socket
        .connect(crate::helpers::addr(app.http_port))
        .await
        .unwrap();
    slow.write_all(b"GET /stream HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    wait_for_clients(&app, 1).await;

    let publisher = Publisher::connect(app.mqtt_port, &unique("flood")).await;
    let mut sent = 0;
    for round in 0..40 {
        for i in 0..5_000 {
            publisher
                .publish(
                    sent,
                    "sensors/temperature",
                    reading_json(&format!("f{}", i % 50), 1.0, &ts(round * 5_000 + i)),
                )
                .await;
            sent += 1;
        }
        publisher.wait_acked(sent).await;
        app.wait_for_count(sent as u64).await;
        if dropped(&app).await >= 1 {
            break;
        }
    }
    // Whichever comes first ends it: falling 10,000 readings behind, or a write stalled for
    // the write timeout (the client's window is full); each is counted. The deadline may run
    // out after the last round.
    app.eventually("the client that stopped reading dropped", || async {
        (dropped(&app).await >= 1).then_some(())
    })
    .await;
    // One client, one connection: each way counts it at most once (both may, when it fell
    // behind and then the write of the stream's end stalled too).
    let (behind, stalled) = (
        app.metric("sensorhub_stream_dropped_total").await,
        app.metric("sensorhub_http_write_timeouts_total").await,
    );
    assert!(
        behind <= 1 && stalled <= 1,
        "one client counted {behind} times as behind and {stalled} times as stalled"
    );
    wait_for_clients(&app, 0).await;
    assert_eq!(app.count_readings().await, sent as u64);
    drop(slow);
}
