//! sensorhub on a three-master Redis Cluster: the sensors' sets spread over every master, and
//! a master that restarts empty mid-stream is noticed and refilled, so the latest ten are right
//! afterwards.

use std::process::Command;

use serde_json::Value;

use crate::helpers::{
    AppOptions, Publisher, TestApp, reading_json, start_redis_cluster, ts, wait_cluster_ok,
};

const SENSORS: usize = 200;

fn keys_on(port: u16, pattern: &str) -> usize {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "--scan", "--pattern", pattern])
        .output()
        .expect("redis-cli --scan");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .count()
}

async fn publish_round(publisher: &Publisher, round: usize, first_id: usize) -> usize {
    let mut id = first_id;
    for s in 0..SENSORS {
        let at = ts((round * 1000 + s) as i64);
        publisher
            .publish(
                id,
                "sensors/temperature",
                reading_json(&format!("c{s}"), round as f64, &at),
            )
            .await;
        id += 1;
    }
    id
}

async fn assert_latest_get_from_redis(app: &TestApp, rounds: usize) {
    for s in 0..SENSORS {
        let path = format!("/latestten/c{s}");
        let body: Value = app
            .eventually("the sensor's latest ten from Redis", || async {
                let body = app.get_from_redis(&path).await?;
                let right = body.as_array().is_some_and(|a| a.len() == 10)
                    && body[0]["timestamp"] == ts(((rounds - 1) * 1000 + s) as i64).as_str();
                right.then_some(body)
            })
            .await;
        let got: Vec<&str> = body
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["timestamp"].as_str().unwrap())
            .collect();
        let expected: Vec<String> = (rounds - 10..rounds)
            .rev()
            .map(|n| ts((n * 1000 + s) as i64))
            .collect();
        assert_eq!(got, expected, "sensor c{s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sets_spread_over_every_master_and_survive_a_master_restart() {
    let mut nodes = start_redis_cluster(3);
    let url = format!(
        "redis-cluster://127.0.0.1:{}?node=127.0.0.1:{}&node=127.0.0.1:{}",
        nodes[0].port, nodes[1].port, nodes[2].port
    );
    let app = TestApp::spawn_with(AppOptions {
        redis_url: Some(url),
        ..AppOptions::default()
    })
    .await;
    let publisher = Publisher::connect(app.mqtt_port, "cluster").await;
    let mut id = 0;
    for round in 0..12 {
        id = publish_round(&publisher, round, id).await;
    }
    publisher.wait_acked(id).await;
    app.wait_for_count((12 * SENSORS) as u64).await;
    assert_latest_get_from_redis(&app, 12).await;

    let pattern = format!("{{{}:*}}:latest:*", app.prefix);
    let per_master: Vec<usize> = nodes.iter().map(|n| keys_on(n.port, &pattern)).collect();
    assert_eq!(per_master.iter().sum::<usize>(), SENSORS, "{per_master:?}");
    for held in &per_master {
        // A third each, give or take the spread of 64 groups over three slot ranges.
        assert!(
            *held >= SENSORS / 6,
            "one master holds too little: {per_master:?}"
        );
    }

    // A master restarts empty while readings keep coming.
    nodes[1].stop();
    for round in 12..16 {
        id = publish_round(&publisher, round, id).await;
    }
    nodes[1].resume();
    wait_cluster_ok(nodes[1].port);
    for round in 16..20 {
        id = publish_round(&publisher, round, id).await;
    }
    publisher.wait_acked(id).await;
    app.wait_for_count((20 * SENSORS) as u64).await;
    assert_latest_get_from_redis(&app, 20).await;
    assert!(
        app.metric("sensorhub_cache_rebuilds_total").await > 0,
        "the emptied master was refilled from MongoDB"
    );
}
