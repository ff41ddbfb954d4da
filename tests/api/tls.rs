//! TLS: the MQTT TLS listener and HTTPS with certificates the test makes, client certificates
//! whose common name selects the credential, and certificates replaced under a running
//! process (files swapped, then SIGHUP). Clients are Mosquitto's and curl: independent of
//! sensorhub's TLS stack.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

use crate::helpers::{AppOptions, TestApp, free_port, reading_json, ts};
use crate::security::credentials;

pub(crate) struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    /// Writes a certificate it signed and its key as `<stem>.pem` and `<stem>.key`.
    pub(crate) fn issue(
        &self,
        dir: &Path,
        stem: &str,
        common_name: &str,
        server: bool,
    ) -> (PathBuf, PathBuf) {
        let names = if server {
            vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
        } else {
            Vec::new()
        };
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let (cert_path, key_path) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    pub(crate) fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.cert.pem()).unwrap();
        path.to_owned()
    }
}

struct TlsApp {
    app: TestApp,
    mqtts_port: u16,
    dir: tempfile::TempDir,
    ca: Ca,
    ca_file: PathBuf,
}

async fn tls_app() -> TlsApp {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("sensorhub test CA");
    let ca_file = ca.write(&dir.path().join("ca.pem"));
    let (cert, key) = ca.issue(dir.path(), "server", "localhost", true);
    let auth = credentials(dir.path());
    let mqtts_port = free_port();
    let path = |p: &Path| p.display().to_string();
    let app = TestApp::spawn_with(AppOptions {
        args: vec![
            "--mqtt-auth".into(),
            path(&auth),
            "--mqtts-listen".into(),
            format!("127.0.0.1:{mqtts_port}"),
            "--tls-cert".into(),
            path(&cert),
            "--tls-key".into(),
            path(&key),
            "--tls-client-ca".into(),
            path(&ca_file),
        ],
        ..AppOptions::default()
    })
    .await;
    TlsApp {
        app,
        mqtts_port,
        dir,
        ca,
        ca_file,
    }
}

/// `mosquitto_pub` over TLS at QoS 1, with `extra` flags (credentials or a certificate).
fn mosquitto_pub(port: u16, ca_file: &Path, extra: &[&str], sensor: &str, millis: i64) -> Output {
    Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &port.to_string(), "-q", "1"])
        .arg("--cafile")
        .arg(ca_file)
        .args(extra)
        .args(["-t", "sensors/temperature", "-m"])
        .arg(reading_json(sensor, 20.0, &ts(millis)))
        .output()
        .unwrap()
}

fn curl_status(url: &str, ca_file: &Path) -> String {
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(ca_file)
        .arg(url)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn mqtt_over_tls_with_a_password_or_a_client_certificate() {
    let t = tls_app().await;
    let port = t.mqtts_port;
    // A password over TLS, 3.1.1 and 5 on the one port.
    let out = mosquitto_pub(
        port,
        &t.ca_file,
        &["-u", "plant3", "-P", "right horse"],
        "plant3/a",
        1_000,
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = mosquitto_pub(
        port,
        &t.ca_file,
        &["-V", "5", "-u", "plant3", "-P", "right horse"],
        "plant3/b",
        1_000,
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = mosquitto_pub(
        port,
        &t.ca_file,
        &["-u", "plant3", "-P", "wrong"],
        "plant3/c",
        1_000,
    );
    assert!(!out.status.success(), "{}", text(&out));

    // A client certificate: its common name is the credential; no password.
    let (cert, key) = t.ca.issue(t.dir.path(), "plant3-device", "plant3", false);
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let out = mosquitto_pub(
        port,
        &t.ca_file,
        &["--cert", &cert, "--key", &key],
        "plant3/d",
        1_000,
    );
    assert!(out.status.success(), "{}", text(&out));
    // ...whose grant applies: another plant's sensor is refused with 0x87 on MQTT 5.
    let out = mosquitto_pub(
        port,
        &t.ca_file,
        &["-V", "5", "-d", "--cert", &cert, "--key", &key],
        "plant4/x",
        1_000,
    );
    assert!(
        text(&out).contains("PUBACK") && text(&out).contains("135"),
        "{}",
        text(&out)
    );
    // A certificate from the CA whose common name has no entry is not authorized.
    let (cert, key) = t.ca.issue(t.dir.path(), "stranger", "stranger", false);
    let out = mosquitto_pub(
        port,
        &t.ca_file,
        &[
            "--cert",
            &cert.display().to_string(),
            "--key",
            &key.display().to_string(),
        ],
        "plant3/e",
        1_000,
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).to_lowercase().contains("not authori"),
        "{}",
        text(&out)
    );
    // A certificate from another CA does not get through the handshake.
    let other = Ca::new("other CA");
    let (cert, key) = other.issue(t.dir.path(), "forged", "plant3", false);
    let out = mosquitto_pub(
        port,
        &t.ca_file,
        &[
            "--cert",
            &cert.display().to_string(),
            "--key",
            &key.display().to_string(),
        ],
        "plant3/f",
        1_000,
    );
    assert!(!out.status.success(), "{}", text(&out));

    t.app.wait_for_count(3).await;
    // The API speaks HTTPS here: ask MongoDB directly.
    let dead_letters = t
        .app
        .mongo()
        .await
        .collection::<bson::Document>("dead_letters");
    t.app
        .eventually("the forbidden dead letter", || async {
            let n = dead_letters
                .count_documents(bson::doc! {"reason": "forbidden"})
                .await
                .unwrap();
            (n == 1).then_some(())
        })
        .await;
    assert_eq!(t.app.count_readings().await, 3);
}

#[tokio::test]
async fn https_serves_the_api_and_plain_http_does_not() {
    let t = tls_app().await;
    let url = format!("https://localhost:{}/health", t.app.http_port);
    assert_eq!(curl_status(&url, &t.ca_file), "200");
    let plain = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://127.0.0.1:{}/health", t.app.http_port))
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&plain.stdout), "200");
}

#[tokio::test]
async fn replaced_certificates_are_used_after_sighup() {
    let t = tls_app().await;
    let port = t.mqtts_port;
    let login = ["-u", "plant3", "-P", "right horse"];
    let out = mosquitto_pub(port, &t.ca_file, &login, "plant3/a", 1_000);
    assert!(out.status.success(), "{}", text(&out));

    // A new CA and server certificate, written over the files the process was started with.
    let next = Ca::new("next CA");
    let next_ca = next.write(&t.dir.path().join("next-ca.pem"));
    next.issue(t.dir.path(), "server", "localhost", true);
    let status = Command::new("kill")
        .args(["-HUP", &t.app.pid().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    t.app
        .eventually("the reload", || async {
            t.app
                .logs()
                .contains("TLS certificates reloaded")
                .then_some(())
        })
        .await;

    let out = mosquitto_pub(port, &next_ca, &login, "plant3/b", 1_000);
    assert!(
        out.status.success(),
        "new connections get the new certificate: {}",
        text(&out)
    );
    let out = mosquitto_pub(port, &t.ca_file, &login, "plant3/c", 1_000);
    assert!(
        !out.status.success(),
        "the old certificate is gone: {}",
        text(&out)
    );
    let url = format!("https://localhost:{}/health", t.app.http_port);
    assert_eq!(curl_status(&url, &next_ca), "200");
    assert_ne!(curl_status(&url, &t.ca_file), "200");

    // A broken file is reported and the running certificate stays.
    std::fs::write(t.dir.path().join("server.key"), "not a key").unwrap();
    Command::new("kill")
        .args(["-HUP", &t.app.pid().unwrap().to_string()])
        .status()
        .unwrap();
    t.app
        .eventually("the failed reload", || async {
            t.app
                .logs()
                .contains("cannot reload the TLS certificates")
                .then_some(())
        })
        .await;
    assert_eq!(curl_status(&url, &next_ca), "200");
    t.app.wait_for_count(2).await;
}
