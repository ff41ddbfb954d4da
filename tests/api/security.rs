//! Device authentication and authorization on the plain MQTT listeners, checked on the wire:
//! CONNACK, PUBACK and SUBACK codes, what is stored and what becomes a dead letter.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tokio::net::TcpStream;

use crate::helpers::{AppOptions, TestApp, reading_json, ts};
use crate::raw_mqtt::{V, connack_code, is_closed, puback_code, suback_code};

/// Adds a credential with `sensorhub passwd`, the password on stdin.
pub fn passwd(file: &Path, user: &str, password: Option<&str>, flags: &[&str]) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sensorhub"));
    cmd.arg("passwd").arg(file).arg(user).args(flags);
    if password.is_none() {
        cmd.arg("--no-password");
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(password) = password {
        writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A credentials file: `plant3` may write `plant3/*` and subscribe to nothing; `dashboard` may
/// read `sensors/#` and write nothing.
pub fn credentials(dir: &Path) -> PathBuf {
    let file = dir.join("mqtt-credentials.toml");
    passwd(
        &file,
        "plant3",
        Some("right horse"),
        &["--allow", "plant3/*"],
    );
    passwd(
        &file,
        "dashboard",
        Some("battery staple"),
        &["--subscribe", "sensors/#"],
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains("right horse"), "only hashes are stored");
    file
}

pub async fn app_with_credentials(extra: &[&str]) -> (TestApp, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = credentials(dir.path());
    let mut args = vec!["--mqtt-auth".to_owned(), file.display().to_string()];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let app = TestApp::spawn_with(AppOptions {
        args,
        ..AppOptions::default()
    })
    .await;
    (app, dir)
}

async fn dial(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).await.unwrap()
}

#[tokio::test]
async fn bad_or_missing_credentials_get_the_connack_code_of_each_version() {
    let (app, _dir) = app_with_credentials(&[]).await;
    for (v, port, bad, missing) in [
        (V::V4, app.mqtt_port, 0x04, 0x05),
        (V::V5, app.mqtt5_port, 0x86, 0x87),
    ] {
        let mut s = dial(port).await;
        assert_eq!(
            connack_code(&mut s, v, "dev-1", Some(("plant3", "wrong"))).await,
            bad,
            "{v:?} wrong password"
        );
        assert!(is_closed(&mut s).await, "{v:?}: closed after the refusal");
        let mut s = dial(port).await;
        assert_eq!(
            connack_code(&mut s, v, "dev-1", Some(("nobody", "x"))).await,
            bad,
            "{v:?} unknown user"
        );
        let mut s = dial(port).await;
        assert_eq!(
            connack_code(&mut s, v, "dev-1", None).await,
            missing,
            "{v:?} no credentials"
        );
        // The internal subscriber's id prefix is sensorhub's own.
        let mut s = dial(port).await;
        let rejected = if v == V::V5 { 0x85 } else { 0x02 };
        assert_eq!(
            connack_code(
                &mut s,
                v,
                "sensorhub-internal-tap-0000",
                Some(("plant3", "right horse"))
            )
            .await,
            rejected,
            "{v:?} reserved client id"
        );
    }
    assert_eq!(app.metric("sensorhub_mqtt_logins_refused_total").await, 8);
}

#[tokio::test]
async fn the_right_password_publishes_and_the_reading_is_stored() {
    let (app, _dir) = app_with_credentials(&[]).await;
    let mut s = dial(app.mqtt5_port).await;
    assert_eq!(
        connack_code(&mut s, V::V5, "plant3-gw", Some(("plant3", "right horse"))).await,
        0
    );
    let reading = reading_json("plant3/boiler", 21.5, &ts(1_000));
    assert_eq!(
        puback_code(&mut s, V::V5, "sensors/temperature", 1, &reading).await,
        0
    );
    // And with an independent client, on 3.1.1.
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &app.mqtt_port.to_string()])
        .args(["-u", "plant3", "-P", "right horse", "-q", "1"])
        .args(["-t", "sensors/humidity", "-m"])
        .arg(reading_json("plant3/boiler", 40.0, &ts(1_000)))
        .status()
        .unwrap();
    assert!(status.success());
    let wrong = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &app.mqtt_port.to_string()])
        .args(["-u", "plant3", "-P", "wrong", "-q", "1"])
        .args(["-t", "sensors/humidity", "-m"])
        .arg(reading_json("plant3/boiler", 41.0, &ts(1_001)))
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("bad user name or password"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
    app.wait_for_count(2).await;
}

#[tokio::test]
async fn a_reading_for_another_devices_sensor_is_refused_and_dead_lettered() {
    let (app, _dir) = app_with_credentials(&[]).await;
    let theirs = reading_json("plant4/boiler", 99.0, &ts(1_000));
    let mine = reading_json("plant3/boiler", 21.5, &ts(1_000));

    let mut s5 = dial(app.mqtt5_port).await;
    assert_eq!(
        connack_code(&mut s5, V::V5, "p3-v5", Some(("plant3", "right horse"))).await,
        0
    );
    assert_eq!(
        puback_code(&mut s5, V::V5, "sensors/temperature", 1, &theirs).await,
        0x87,
        "MQTT 5: not authorized"
    );
    // 3.1.1 has no negative PUBACK: acknowledged and dropped, as Mosquitto does.
    let mut s4 = dial(app.mqtt_port).await;
    assert_eq!(
        connack_code(&mut s4, V::V4, "p3-v4", Some(("plant3", "right horse"))).await,
        0
    );
    assert_eq!(
        puback_code(&mut s4, V::V4, "sensors/temperature", 1, &theirs).await,
        0
    );
    // The connections stay usable for the device's own readings.
    assert_eq!(
        puback_code(&mut s5, V::V5, "sensors/temperature", 2, &mine).await,
        0
    );
    app.wait_for_count(1).await;
    app.eventually("two forbidden dead letters", || async {
        let (_, body) = app.get_json("/deadletters?reason=forbidden").await;
        (body.as_array().map(Vec::len) == Some(2)).then_some(())
    })
    .await;
    let (_, body) = app.get_json("/deadletters?reason=forbidden").await;
    assert!(
        body[0]["payload"]
            .as_str()
            .unwrap()
            .contains("plant4/boiler")
    );
    assert_eq!(
        app.count_readings().await,
        1,
        "only the device's own reading"
    );
    let (status, _) = app.get_json("/latestten/plant4%2Fboiler").await;
    assert_eq!(status, 404);
    assert_eq!(
        app.metric("sensorhub_mqtt_publishes_refused_total").await,
        2
    );
}

#[tokio::test]
async fn a_publish_only_device_cannot_subscribe_to_the_readings() {
    let (app, _dir) = app_with_credentials(&[]).await;
    for (v, port, refused) in [(V::V4, app.mqtt_port, 0x80), (V::V5, app.mqtt5_port, 0x87)] {
        let mut s = dial(port).await;
        // Client ids differ per version: this is about grants, not about taking over a session.
        assert_eq!(
            connack_code(
                &mut s,
                v,
                &format!("p3-{v:?}"),
                Some(("plant3", "right horse"))
            )
            .await,
            0
        );
        assert_eq!(
            suback_code(&mut s, v, 1, "sensors/#").await,
            refused,
            "{v:?}"
        );
        assert_eq!(suback_code(&mut s, v, 2, "#").await, refused, "{v:?}");
        let mut s = dial(port).await;
        assert_eq!(
            connack_code(
                &mut s,
                v,
                &format!("dash-{v:?}"),
                Some(("dashboard", "battery staple"))
            )
            .await,
            0
        );
        assert_eq!(
            suback_code(&mut s, v, 1, "sensors/#").await,
            1,
            "{v:?} granted"
        );
        assert_eq!(suback_code(&mut s, v, 2, "other/#").await, refused, "{v:?}");
    }
}

#[tokio::test]
async fn anonymous_clients_need_the_operators_consent() {
    let (app, _dir) = app_with_credentials(&["--mqtt-allow-anonymous"]).await;
    let mut s = dial(app.mqtt_port).await;
    assert_eq!(connack_code(&mut s, V::V4, "anon", None).await, 0);
    // A wrong password is still wrong: no fallback to anonymous.
    let mut s = dial(app.mqtt_port).await;
    assert_eq!(
        connack_code(&mut s, V::V4, "dev", Some(("plant3", "wrong"))).await,
        0x04
    );
}

#[tokio::test]
async fn without_credentials_mqtt_on_a_public_address_needs_consent() {
    let out = Command::new(env!("CARGO_BIN_EXE_sensorhub"))
        .args(["serve", "--mqtt-listen", "0.0.0.0:1"])
        .env("MONGODB_URI", "mongodb://127.0.0.1:1")
        .env("REDIS_URL", "redis://127.0.0.1:1")
        .env_remove("SENSORHUB_MQTT_AUTH")
        .env_remove("SENSORHUB_MQTT_ALLOW_ANONYMOUS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--mqtt-allow-anonymous"), "{err}");
}

#[tokio::test]
async fn the_built_in_simulator_logs_in_when_credentials_are_required() {
    let (app, _dir) = app_with_credentials(&["--simulate", "--simulate-interval-ms", "100"]).await;
    app.eventually("simulated readings", || async {
        (app.count_readings().await > 0).then_some(())
    })
    .await;
    assert_eq!(app.metric("sensorhub_mqtt_logins_refused_total").await, 0);
}
