//! Day-to-day operations: the metrics endpoint, reloading certificates on SIGHUP, and logs
//! that carry what operators need and never a secret or a message body.
mod common;

use std::time::Duration;

use common::daemon::{free_addr, Daemon};
use common::sink::Sink;
use common::*;

/// The value of the first sample line starting with `name_and_labels`, if any.
fn sample(metrics: &str, name_and_labels: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The metrics registry is one per process: tests that read it take turns.
static METRICS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn metrics_move_with_a_scripted_session() {
    let _turn = METRICS.lock().await;
    let server = TestServer::start().await;
    server.add_user("alice@example.org").await;
    let before = server.scrape().await;
    let accepted_before = sample(&before, "submitd_messages_accepted_total").unwrap_or(0.0);

    let mut c = server.authenticated("alice@example.org").await;
    let r = c
        .send_message(
            "alice@example.org",
            &["bob@example.net"],
            &simple_message("alice@example.org", "bob@example.net", "m"),
        )
        .await;
    assert_eq!(r.code, 250, "{r:?}");
    // Refused for the From: header (sender mismatch) and for a bare LF (smuggling).
    let r = c
        .send_message(
            "alice@example.org",
            &["bob@example.net"],
            &simple_message("mallory@example.org", "bob@example.net", "x"),
        )
        .await;
    assert_eq!(r.code, 550);
    c.cmd("MAIL FROM:<alice@example.org>", "250").await;
    c.cmd("RCPT TO:<bob@example.net>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(b"From: alice@example.org\r\n\r\nbare\nlf\r\n.\r\n")
        .await;
    c.expect("550 5.6.0").await;
    let mut bad = server.client().await;
    bad.expect("220").await;
    bad.cmd("EHLO x", "250").await;
    bad.starttls().await;
    bad.cmd("EHLO x", "250").await;
    bad.auth_plain("alice@example.org", "wrong", "535 5.7.8")
        .await;

    let after = server.scrape().await;
    assert_eq!(
        sample(&after, "submitd_messages_accepted_total").unwrap(),
        accepted_before + 1.0,
        "{after}"
    );
    for line in [
        "submitd_auth_total{result=\"ok\"}",
        "submitd_auth_total{result=\"failed\"}",
        "submitd_messages_refused_total{reason=\"sender_mismatch\"}",
        "submitd_messages_refused_total{reason=\"smuggling\"}",
        "submitd_connections_total{port=\"submission\"}",
        "submitd_submit_duration_seconds_count",
    ] {
        assert!(
            sample(&after, line).unwrap_or(0.0) >= 1.0,
            "{line} in\n{after}"
        );
    }
    assert!(sample(&after, "submitd_connections_open{port=\"submission\"}").unwrap() >= 2.0);
    // No smart host is configured, so the accepted message waits in the queue.
    assert_eq!(
        sample(&after, "submitd_queue_messages").unwrap(),
        1.0,
        "{after}"
    );
    assert!(sample(&after, "submitd_queue_oldest_age_seconds").is_some());
    server.stop().await;
}

#[tokio::test]
async fn deliveries_and_bounces_are_counted() {
    let _turn = METRICS.lock().await;
    let sink = Sink::start().await;
    sink.script_rcpt("nobody@example.net", &["550 5.1.1 no such user"]);
    let server = TestServer::start_with(&sink.relay_config("")).await;
    server.add_user("alice@example.org").await;
    let mut c = server.authenticated("alice@example.org").await;
    let r = c
        .send_message(
            "alice@example.org",
            &["bob@example.net", "nobody@example.net"],
            &simple_message("alice@example.org", "bob@example.net", "d"),
        )
        .await;
    assert_eq!(r.code, 250);
    // The message and its DSN.
    sink.wait_for(2, 20).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = server.scrape().await;
        let delivered =
            sample(&m, "submitd_deliveries_total{outcome=\"delivered\"}").unwrap_or(0.0);
        let failed = sample(&m, "submitd_deliveries_total{outcome=\"failed\"}").unwrap_or(0.0);
        let bounces = sample(&m, "submitd_bounces_total").unwrap_or(0.0);
        if delivered >= 2.0 && failed >= 1.0 && bounces >= 1.0 {
            assert!(
                sample(&m, "submitd_delivery_duration_seconds_count").unwrap_or(0.0) >= 3.0,
                "{m}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "counters did not move:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop().await;
}

/// Replaces the server's certificate files with a new self-signed pair; returns its PEM.
fn renew_certificate(server: &TestServer) -> Vec<u8> {
    let certs = server.dir.path().join("certs");
    std::fs::remove_file(certs.join("fullchain.pem")).unwrap();
    std::fs::remove_file(certs.join("privkey.pem")).unwrap();
    submitd::tls::write_self_signed(HOSTNAME, &certs).unwrap();
    std::fs::read(certs.join("fullchain.pem")).unwrap()
}

#[tokio::test]
async fn reload_serves_the_renewed_certificate_and_keeps_it_when_broken() {
    let server = TestServer::start().await;
    let old_pem = server.cert_pem.clone();
    let first = Client::connect_tls(server.submissions, &old_pem).await;
    let old_cert = first.peer_certificate().unwrap();

    // A session that starts before the reload and upgrades after it keeps the old settings.
    let mut in_flight = server.client().await;
    in_flight.expect("220").await;
    in_flight.cmd("EHLO client.example", "250").await;

    let new_pem = renew_certificate(&server);
    server.reload();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let new_cert = loop {
        // A client trusting only the new certificate succeeds once the reload happened.
        let tcp = tokio::net::TcpStream::connect(server.submissions)
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        if let Ok(tls) = tls_connector(&new_pem).connect(name, tcp).await {
            break tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(new_cert, old_cert);
    in_flight.starttls().await;
    assert_eq!(
        in_flight.peer_certificate().unwrap(),
        old_cert,
        "in-flight session keeps its certificate"
    );

    // A broken certificate file is reported and the running one kept.
    std::fs::write(
        server.dir.path().join("certs/fullchain.pem"),
        "not a certificate",
    )
    .unwrap();
    server.reload();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = Client::connect_tls(server.submissions, &new_pem).await;
    assert_eq!(after.peer_certificate().unwrap(), new_cert);
    server.stop().await;
}

#[tokio::test]
async fn sighup_reloads_the_binary_and_logs_never_hold_secrets() {
    let sink = Sink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let submission = free_addr();
    let submissions = free_addr();
    let text = base_config(dir.path(), &sink.relay_config(""))
        .replace(
            "submission = [\"127.0.0.1:0\"]",
            &format!("submission = [\"{submission}\"]"),
        )
        .replace(
            "submissions = [\"127.0.0.1:0\"]",
            &format!("submissions = [\"{submissions}\"]"),
        );
    let config_path = dir.path().join("submitd.toml");
    std::fs::write(&config_path, &text).unwrap();
    let certs = dir.path().join("certs");
    submitd::tls::write_self_signed(HOSTNAME, &certs).unwrap();
    let cert_pem = std::fs::read(certs.join("fullchain.pem")).unwrap();
    let config = submitd::config::Config::from_toml(&text).unwrap();
    let store = submitd::store::Store::open(&config.database.url)
        .await
        .unwrap();
    let password = "Sup3r-Secret-Passw0rd";
    store
        .add_user(
            "alice@example.org",
            &submitd::auth::hash_password(password).unwrap(),
        )
        .await
        .unwrap();
    store.close().await;

    let log_path = dir.path().join("serve.log");
    let mut daemon = Daemon::start_with(
        &config_path,
        submission,
        &log_path,
        &["--log-format", "json"],
        "debug",
    )
    .await;
    let mut c = Client::connect(submission, &cert_pem).await;
    c.expect("220").await;
    c.cmd("EHLO laptop.example", "250").await;
    c.starttls().await;
    c.cmd("EHLO laptop.example", "250").await;
    c.auth_plain("alice@example.org", "Wr0ng-Guess-Passw0rd", "535 5.7.8")
        .await;
    c.cmd("AUTH LOGIN", "334").await;
    c.cmd(&base64_of("alice@example.org"), "334").await;
    c.cmd(&base64_of(password), "235 2.7.0").await;
    let body =
        "From: alice@example.org\r\nTo: bob@example.net\r\nSubject: s\r\n\r\nBODY-MARKER-XYZZY\r\n";
    let r = c
        .send_message("alice@example.org", &["bob@example.net"], body)
        .await;
    assert_eq!(r.code, 250, "{r:?}");
    let id = r.text().rsplit(' ').next().unwrap().to_owned();
    sink.wait_for(1, 20).await;

    // SIGHUP with a renewed certificate: the next handshake serves it.
    std::fs::remove_file(certs.join("fullchain.pem")).unwrap();
    std::fs::remove_file(certs.join("privkey.pem")).unwrap();
    submitd::tls::write_self_signed(HOSTNAME, &certs).unwrap();
    let new_pem = std::fs::read(certs.join("fullchain.pem")).unwrap();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &daemon.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let tcp = tokio::net::TcpStream::connect(submissions).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        if tls_connector(&new_pem).connect(name, tcp).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP did not load the new certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = daemon.terminate(15).await;
    assert!(status.success());

    let log = daemon.log();
    for secret in [
        password,
        "Wr0ng-Guess-Passw0rd",
        &plain("alice@example.org", password),
        &base64_of(password),
        "BODY-MARKER-XYZZY",
    ] {
        assert!(!log.contains(secret), "log contains {secret:?}:\n{log}");
    }
    // Every line is JSON; the accepted message's line carries id, user and client address.
    let mut accepted = None;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["fields"]["message"] == "message accepted" {
            accepted = Some(v);
        }
    }
    let accepted = accepted.expect("a 'message accepted' line");
    assert_eq!(accepted["fields"]["queue_id"], id.as_str());
    assert_eq!(accepted["fields"]["user"], "alice@example.org");
    assert_eq!(accepted["fields"]["client"], "127.0.0.1");
    assert!(log.contains("delivery attempt"), "{log}");
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}
