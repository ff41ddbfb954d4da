//! `sensorhub config check`, run as an operator would: the file, the environment and the flags
//! over it, passwords masked, and a bad key named.

use std::process::Command;

fn check(file: &std::path::Path, env: &[(&str, &str)], args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sensorhub"));
    cmd.args(["config", "check", "--config"])
        .arg(file)
        .args(args)
        .env_remove("MONGODB_URI")
        .env_remove("REDIS_URL")
        .env_remove("SENSORHUB_CONFIG");
    for (key, value) in env {
        cmd.env(key, value);
    }
    let out = cmd.output().expect("run sensorhub config check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_check_layers_masks_and_names_bad_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sensorhub.toml");
    std::fs::write(
        &file,
        "mongodb_database = \"plant\"\nredis_url = \"redis://:file-secret@cache:6379\"\n\
         reading_retention_days = 400\n",
    )
    .unwrap();
    let secret = dir.path().join("mongodb_uri");
    std::fs::write(&secret, "mongodb://hub:s3cret@db:27017/?authSource=admin\n").unwrap();

    let (ok, out, err) = check(
        &file,
        &[
            ("MONGODB_URI_FILE", secret.to_str().unwrap()),
            ("SENSORHUB_READ_CACHE_MS", "0"),
        ],
        &["--external-broker", "mqtt://gw:broker-secret@broker:1883"],
    );
    assert!(ok, "{err}");
    let settings: toml::Table = toml::from_str(&out).expect("the output is TOML");
    assert_eq!(settings["mongodb_database"].as_str(), Some("plant"));
    assert_eq!(settings["reading_retention_days"].as_integer(), Some(400));
    assert_eq!(settings["read_cache_ms"].as_integer(), Some(0));
    assert_eq!(
        settings["mongodb_uri"].as_str(),
        Some("mongodb://hub:***@db:27017/?authSource=admin")
    );
    assert_eq!(
        settings["redis_url"].as_str(),
        Some("redis://:***@cache:6379")
    );
    assert_eq!(
        settings["external_broker"].as_str(),
        Some("mqtt://gw:***@broker:1883")
    );
    for secret in ["s3cret", "file-secret", "broker-secret"] {
        assert!(!out.contains(secret) && !err.contains(secret), "{out}{err}");
    }

    std::fs::write(&file, "mongodb_database = \"plant\"\nretention_days = 3\n").unwrap();
    let (ok, _, err) = check(&file, &[], &[]);
    assert!(!ok);
    assert!(err.contains("unknown key `retention_days`"), "{err}");

    std::fs::write(&file, "journal_fsync = \"sometimes\"\n").unwrap();
    let (ok, _, err) = check(&file, &[], &[]);
    assert!(!ok);
    assert!(err.contains("journal_fsync"), "{err}");
}

/// The shipped example is a valid settings file as it stands.
#[test]
fn the_example_file_checks() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sensorhub.example.toml");
    let (ok, out, err) = check(&example, &[], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("reading_retention_days = 0"), "{out}");
}

/// A taken MQTT port ends the start with one line that gives the system's reason once.
#[test]
fn a_taken_mqtt_port_is_reported_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = Command::new(env!("CARGO_BIN_EXE_sensorhub"))
        .args(["serve", "--mqtt-listen", &format!("127.0.0.1:{port}")])
        .args([
            "--http-listen",
            &format!("127.0.0.1:{}", crate::helpers::free_port()),
        ])
        .env_remove("SENSORHUB_CONFIG")
        .output()
        .expect("run sensorhub");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen for MQTT on 127.0.0.1:{port}")),
        "{err}"
    );
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");
}
