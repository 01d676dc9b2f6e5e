//! The happy path end to end: submit over 587 and 465, relay to the sink.
mod common;

use common::sink::Sink;
use common::*;

#[tokio::test]
async fn submits_over_587_and_465_and_relays() {
    let sink = Sink::start().await;
    let server = TestServer::start_with(&sink.relay_config("")).await;
    server.add_user("alice@example.org").await;

    let mut c = server.authenticated("alice@example.org").await;
    let r = c
        .send_message(
            "alice@example.org",
            &["bob@example.net"],
            &simple_message("alice@example.org", "bob@example.net", "one"),
        )
        .await;
    assert!(r.text().starts_with("250 2.0.0 Ok: queued as "), "{r:?}");
    c.cmd("QUIT", "221 2.0.0").await;

    let mut t = server.tls_client().await;
    t.cmd("EHLO client.example", "250").await;
    t.auth_plain("alice@example.org", PASSWORD, "235 2.7.0")
        .await;
    let r = t
        .send_message(
            "alice@example.org",
            &["carol@example.net"],
            &simple_message("alice@example.org", "carol@example.net", "two"),
        )
        .await;
    assert_eq!(r.code, 250, "{r:?}");

    let got = sink.wait_for(2, 20).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].mail_from, "alice@example.org");
    assert!(got.iter().any(|m| m.rcpt_to == ["carol@example.net"]));
    server.stop().await;
}
