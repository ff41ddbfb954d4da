use std::net::TcpListener;
use std::process::Command;

use crate::helpers::{free_port, shared, unique};

/// Runs `sensorhub serve` expecting it to fail at start; returns its stderr.
fn failed_start(args: &[&str], env: &[(&str, String)]) -> String {
    let dir = std::env::temp_dir().join(unique("startup"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sensorhub"));
    cmd.arg("serve")
        .args(["--journal-dir", &dir.display().to_string()])
        .args(["--mqtt5-listen", &format!("127.0.0.1:{}", free_port())])
        .args(args)
        .env("MONGODB_URI", &shared().mongodb_uri)
        .env("REDIS_URL", &shared().redis_url)
        .env("MONGODB_DATABASE", unique("startup"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = cmd.output().expect("run sensorhub");
    assert!(
        !output.status.success(),
        "started although it should not have"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_taken_mqtt_port_ends_the_process_with_one_clear_line() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let http = format!("127.0.0.1:{}", free_port());
    let stderr = failed_start(&["--mqtt-listen", &addr, "--http-listen", &http], &[]);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains(&addr) && errors[0].contains("--mqtt-listen"),
        "{stderr}"
    );
}

#[test]
fn a_taken_http_port_ends_the_process_with_one_clear_line() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mqtt = format!("127.0.0.1:{}", free_port());
    let stderr = failed_start(&["--mqtt-listen", &mqtt, "--http-listen", &addr], &[]);
    assert!(
        stderr.contains(&addr) && stderr.contains("--http-listen"),
        "{stderr}"
    );
}

#[test]
fn unreachable_mongodb_and_redis_are_named() {
    let ports = [
        "--mqtt-listen".to_owned(),
        format!("127.0.0.1:{}", free_port()),
        "--http-listen".to_owned(),
        format!("127.0.0.1:{}", free_port()),
    ];
    let args: Vec<&str> = ports.iter().map(String::as_str).collect();
    let dead = format!("mongodb://127.0.0.1:{}", free_port());
    let stderr = failed_start(&args, &[("MONGODB_URI", dead)]);
    assert!(
        stderr.contains("cannot reach MongoDB") && stderr.contains("MONGODB_URI"),
        "{stderr}"
    );
    let dead = format!("redis://127.0.0.1:{}", free_port());
    let stderr = failed_start(&args, &[("REDIS_URL", dead)]);
    assert!(
        stderr.contains("cannot reach Redis") && stderr.contains("REDIS_URL"),
        "{stderr}"
    );
}
