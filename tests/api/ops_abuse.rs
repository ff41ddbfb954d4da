//! Abuse outside the HTTP API, against the real broker: a connection that floods cannot
//! starve another one, and thousands of idle connections do not keep new devices out nor the
//! API from answering. (How fast it stays under such load is the benchmark's business.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bson::doc;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

use crate::helpers::{Publisher, TestApp, reading_json, ts};
use crate::raw_mqtt::{self, V};

/// Publishes valid readings at `qos` as fast as the connection takes them, until `stop`.
async fn flood(port: u16, client_id: &str, qos: QoS, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_inflight(500);
    let (client, mut eventloop) = AsyncClient::new(options, 10_000);
    let poller = tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let mut n: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        // Many sensors, each reading new: the flood costs the writer as much as it can.
        let payload = reading_json(&format!("flood-{client_id}-{}", n % 1000), 1.0, &ts(n));
        if client
            .publish("sensors/temperature", qos, false, payload)
            .await
            .is_err()
        {
            break;
        }
        sent.fetch_add(1, Ordering::Relaxed);
        n += 1;
    }
    poller.abort();
}

#[tokio::test]
async fn a_flooding_client_does_not_starve_another() {
    let app = TestApp::spawn().await;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let floods = [("flood0", QoS::AtMostOnce), ("flood1", QoS::AtLeastOnce)].map(|(id, qos)| {
        tokio::spawn(flood(
            app.mqtt_port,
            id,
            qos,
            Arc::clone(&stop),
            Arc::clone(&sent),
        ))
    });
    // The flood is under way before the quiet device starts.
    app.eventually("the flood to reach the broker", || async {
        (app.metric("sensorhub_messages_captured_total").await > 10_000).then_some(())
    })
    .await;

    const QUIET: usize = 200;
    let quiet = Publisher::connect(app.mqtt_port, "quiet-device").await;
    for i in 0..QUIET {
        quiet
            .publish(
                i,
                "sensors/humidity",
                reading_json("quiet", i as f64, &ts(i as i64)),
            )
            .await;
    }
    quiet.wait_acked(QUIET).await;
    let readings = app.readings().await;
    app.eventually(
        "the quiet device's readings stored during the flood",
        || async {
            let stored = readings
                .count_documents(doc! {"sensor_id": "quiet"})
                .await
                .expect("count");
            (stored == QUIET as u64).then_some(())
        },
    )
    .await;
    assert!(
        !stop.load(Ordering::Relaxed) && floods.iter().all(|f| !f.is_finished()),
        "the flood was still running"
    );
    stop.store(true, Ordering::Relaxed);
    for flood in floods {
        let _ = flood.await;
    }
    eprintln!(
        "flood: {} publishes sent while {QUIET} quiet readings were acknowledged and stored",
        sent.load(Ordering::Relaxed)
    );
}

#[tokio::test]
async fn thousands_of_idle_connections_do_not_keep_devices_or_the_api_out() {
    // Half of them never say a word (rumqttd closes those after connection_timeout_ms, 10 s);
    // half log in with keep-alive 0 and then stay silent for as long as they like.
    const IDLE: usize = 2_000;
    let app = TestApp::spawn().await;
    let mut idle = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        let mut stream = TcpStream::connect(("127.0.0.1", app.mqtt_port))
            .await
            .expect("an idle connection");
        if i % 2 == 1 {
            let mut connect = raw_mqtt::connect(V::V4, &format!("idle-{i}"), None);
            // Keep-alive 0: no pings are owed, the connection may sit idle forever.
            connect[10] = 0;
            connect[11] = 0;
            stream.write_all(&connect).await.expect("CONNECT");
            let (first, body) = raw_mqtt::read_packet(&mut stream).await.expect("CONNACK");
            assert_eq!((first, body[1]), (0x20, 0), "idle client {i} refused");
        }
        idle.push(stream);
    }

    let device = Publisher::connect(app.mqtt_port, "device-after-the-idle-ones").await;
    device
        .publish(0, "sensors/temperature", reading_json("late", 20.0, &ts(0)))
        .await;
    device.wait_acked(1).await;
    app.wait_for_count(1).await;
    let (status, health) = app.get_json("/health").await;
    assert_eq!(status, 200, "{health}");
    let (status, _) = app.get_json("/latestten/late").await;
    assert_eq!(status, 200);
    drop(idle);
}

#[tokio::test]
async fn a_slowloris_client_is_cut_off_while_others_are_served() {
    use tokio::io::AsyncReadExt as _;
    let app = TestApp::spawn_with(crate::helpers::AppOptions {
        args: vec!["--http-header-timeout-secs".into(), "1".into()],
        ..crate::helpers::AppOptions::default()
    })
    .await;
    let addr = ("127.0.0.1", app.http_port);
    // Headers trickled a byte every 200 ms, never finished.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let cut = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow.write_all(b"X").await.is_err() {
                return;
            }
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                _ => {}
            }
        }
    })
    .await;
    assert!(
        cut.is_ok(),
        "the slowloris connection was still open after 10 s"
    );
    let held = started.elapsed();
    assert!(
        held >= Duration::from_millis(800),
        "cut after {held:?}: before its deadline"
    );
    // A client that opens a connection and says nothing is closed too.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a silent connection was kept: {closed:?}"
    );
    assert_eq!(app.metric("sensorhub_http_header_timeouts_total").await, 2);
    // A keep-alive connection idle after a complete request is kept and answers again.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    let request = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n";
    for _ in 0..2 {
        kept.write_all(request).await.unwrap();
        let mut answer = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(10), kept.read(&mut answer))
            .await
            .expect("an answer")
            .unwrap();
        assert!(
            answer[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer[..n])
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
}
