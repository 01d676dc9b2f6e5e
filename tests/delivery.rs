//! Issue 3: the durable queue and the smart-host relay, end to end over real sockets against
//! the scriptable sink, plus the real binary for kill -9, SIGTERM and the queue CLI.
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{free_addr, Daemon};
use common::sink::{server_tls, Captured, Sink, SinkOptions, TestPki};
use common::*;
use mail_parser::{MessageParser, MimeHeaders};
use serde_json::Value;
use submitd::config::Config;
use submitd::server::{self, Controls, Listeners};
use submitd::store::Store;
use tempfile::TempDir;
use tokio::net::TcpListener;

const ALICE: &str = "alice@example.org";
const BOB: &str = "bob@example.net";
const CAROL: &str = "carol@example.net";
const NOBODY: &str = "nobody@example.net";

/// The `[queue]` keys of the base config.
const FAST_QUEUE: &str = "first_retry = \"1s\"\nmax_retry = \"2s\"\nmax_age = \"1h\"\nworkers = 2";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// EHLO, STARTTLS, EHLO, AUTH as alice.
async fn login(addr: SocketAddr, cert_pem: &[u8]) -> Client {
    let mut c = Client::connect(addr, cert_pem).await;
    c.expect("220").await;
    c.cmd("EHLO client.example", "250").await;
    c.starttls().await;
    c.cmd("EHLO client.example", "250").await;
    c.auth_plain(ALICE, PASSWORD, "235 2.7.0").await;
    c
}

/// Submits one message as alice; returns its queue id.
async fn submit(
    addr: SocketAddr,
    cert_pem: &[u8],
    from: &str,
    to: &[&str],
    message: &str,
) -> String {
    let mut c = login(addr, cert_pem).await;
    let r = c.send_message(from, to, message).await;
    let text = r.text();
    let id = text
        .strip_prefix("250 2.0.0 Ok: queued as ")
        .unwrap_or_else(|| panic!("not queued: {r:?}"))
        .trim()
        .to_owned();
    c.cmd("QUIT", "221").await;
    id
}

/// A queue entry as JSON, if the message is still queued.
fn entry(queue_dir: &Path, id: &str) -> Option<Value> {
    queued_entry(queue_dir, id)
}

/// Ids of the committed entries.
fn queued(queue_dir: &Path) -> Vec<String> {
    queued_ids_in(queue_dir)
}

/// Waits until the entry of `id` satisfies `pred`; panics with the last state seen.
async fn wait_entry(queue_dir: &Path, id: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let e = entry(queue_dir, id);
        if let Some(e) = &e {
            if pred(e) {
                return e.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "entry {id} never reached the expected state; last seen: {e:#?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the spool has no entries left.
async fn wait_spool_empty(queue_dir: &Path, secs: u64) {
    let ok = eventually(secs, || queued(queue_dir).is_empty()).await;
    assert!(ok, "spool still holds {:?}", queued(queue_dir));
}

fn attempts(e: &Value) -> u64 {
    e["attempts"].as_u64().unwrap_or(0)
}

fn last_error(e: &Value) -> String {
    e["last_error"].as_str().unwrap_or("").to_owned()
}

fn rcpt_status(e: &Value, address: &str) -> String {
    e["recipients"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["address"] == address))
        .and_then(|r| r["status"].as_str())
        .unwrap_or("")
        .to_owned()
}

/// Captured messages with the null sender (DSNs).
fn dsns(messages: &[Captured]) -> Vec<Captured> {
    messages
        .iter()
        .filter(|m| m.mail_from.is_empty())
        .cloned()
        .collect()
}

/// Runs the real binary with `--config config` and `args`.
async fn cli(config: &Path, args: &[&str]) -> Output {
    let config = config.to_owned();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_submitd"))
            .arg("--config")
            .arg(&config)
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .expect("run submitd")
    })
    .await
    .unwrap()
}

/// Runs the binary and asserts success; returns stdout.
async fn cli_ok(config: &Path, args: &[&str]) -> String {
    let out = cli(config, args).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "submitd {args:?} failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The config file text, like the harness's base config but with the listen addresses and
/// the `[queue]` keys given.
fn config_text(dir: &Path, listen: [SocketAddr; 2], queue: &str, extra: &str) -> String {
    format!(
        r#"hostname = "{HOSTNAME}"
node = "test"

[listen]
submission = ["{sub}"]
submissions = ["{subs}"]

[tls]
cert = "{dir}/certs/fullchain.pem"
key = "{dir}/certs/privkey.pem"

[database]
url = "sqlite://{dir}/data/submitd.db"

[queue]
dir = "{dir}/data/queue"
{queue}

[auth]
failure_delay = "0s"

[timeouts]
shutdown_grace = "5s"
{extra}
"#,
        dir = dir.display(),
        sub = listen[0],
        subs = listen[1],
    )
}

/// Writes the certificate, the config file and alice's account into `dir`; returns the
/// config path and the certificate PEM.
async fn prepare(dir: &Path, text: &str) -> (PathBuf, Vec<u8>) {
    let certs = dir.join("certs");
    if !certs.join("fullchain.pem").exists() {
        submitd::tls::write_self_signed(HOSTNAME, &certs).unwrap();
    }
    let config_path = dir.join("submitd.toml");
    std::fs::write(&config_path, text).unwrap();
    let config = Config::from_toml(text).unwrap();
    let store = Store::open(&config.database.url).await.unwrap();
    let hash = submitd::auth::hash_password(PASSWORD).unwrap();
    store.add_user(ALICE, &hash).await.unwrap();
    store.close().await;
    let cert_pem = std::fs::read(certs.join("fullchain.pem")).unwrap();
    (config_path, cert_pem)
}

/// An in-process server with a config of our own (the harness's base config fixes
/// `[queue]`).
struct Custom {
    submission: SocketAddr,
    cert_pem: Vec<u8>,
    config_path: PathBuf,
    queue_dir: PathBuf,
    shutdown: tokio_util::sync::CancellationToken,
    _dir: TempDir,
}

impl Custom {
    async fn start(queue: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let text = config_text(dir.path(), [any, any], queue, extra);
        let (config_path, cert_pem) = prepare(dir.path(), &text).await;
        let config = Config::from_toml(&text).unwrap();
        let submission = TcpListener::bind(any).await.unwrap();
        let submissions = TcpListener::bind(any).await.unwrap();
        let addr = submission.local_addr().unwrap();
        let controls = Controls::default();
        let shutdown = controls.shutdown.clone();
        let queue_dir = config.queue.dir.clone();
        tokio::spawn(server::run(
            config,
            Listeners {
                submission: vec![submission],
                submissions: vec![submissions],
                metrics: None,
            },
            controls,
        ));
        Self {
            submission: addr,
            cert_pem,
            config_path,
            queue_dir,
            shutdown,
            _dir: dir,
        }
    }

    async fn submit(&self, to: &[&str], message: &str) -> String {
        submit(self.submission, &self.cert_pem, ALICE, to, message).await
    }
}

impl Drop for Custom {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The address of a smart host that is down, and the `[relay]` section pointing at it.
async fn dead_sink() -> (SocketAddr, String) {
    let sink = Sink::start().await;
    let addr = sink.addr;
    let relay = sink.relay_config("");
    sink.stop_wait().await;
    (addr, relay)
}

/// The header section and the body (from the blank line on) of a message.
fn split(message: &[u8]) -> (&[u8], &[u8]) {
    let at = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a blank line after the header")
        + 2;
    message.split_at(at)
}

// ---------------------------------------------------------------------------------------------
// 1. The message arrives as submitted
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn relays_envelope_and_bytes_exactly() {
    let sink = Sink::start().await;
    let server = TestServer::start_with(&sink.relay_config("")).await;
    server.add_user(ALICE).await;
    let message = concat!(
        "From: Alice <alice@example.org>\r\n",
        "To: bob@example.net, carol@example.net\r\n",
        "Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?=\r\n",
        "Message-ID: <dots@client.example>\r\n",
        "Date: Fri, 4 Dec 2026 10:00:00 +0000\r\n",
        "MIME-Version: 1.0\r\n",
        "Content-Type: text/plain; charset=utf-8\r\n",
        "Content-Transfer-Encoding: 8bit\r\n",
        "X-Folded: first part\r\n\tsecond part\r\n",
        "\r\n",
        ".leading dot\r\n",
        "..two leading dots\r\n",
        ".\r\n",
        "..\r\n",
        "a line with a dot. in the middle\r\n",
        ". space after a dot\r\n",
        "\r\n",
        "Grüße aus Köln — 日本語のテキスト 🙂\r\n",
        "trailing spaces   \r\n",
        "\r\n",
        ".last line starts with a dot\r\n",
    );
    let id = submit(
        server.submission,
        &server.cert_pem,
        ALICE,
        &[BOB, CAROL],
        message,
    )
    .await;

    let got = sink.wait_for(1, 20).await;
    assert_eq!(got.len(), 1, "one message, one transaction");
    let m = &got[0];
    assert_eq!(m.mail_from, ALICE);
    assert_eq!(m.rcpt_to, [BOB, CAROL]);

    // The submitted bytes arrive unchanged after the header block we add in front: our
    // Received header only (Date and Message-ID were present, no DKIM key configured).
    let data = &m.data;
    assert!(
        data.ends_with(message.as_bytes()),
        "relayed message differs from the submitted one:\n--- relayed\n{}\n--- submitted\n{message}",
        m.text()
    );
    let added = std::str::from_utf8(&data[..data.len() - message.len()]).unwrap();
    assert!(added.starts_with("Received: "), "added: {added:?}");
    assert!(
        added.contains(&id),
        "Received names the queue id: {added:?}"
    );
    assert!(added.ends_with("\r\n"));
    for line in added.trim_end_matches("\r\n").split("\r\n").skip(1) {
        assert!(
            line.starts_with([' ', '\t']),
            "only one added header field, got line {line:?}"
        );
    }
    // And therefore: the body byte for byte, and no blank line appended.
    let (_, body) = split(data);
    let (_, submitted_body) = split(message.as_bytes());
    assert_eq!(body, submitted_body);
    assert!(data.ends_with(b"\r\n.last line starts with a dot\r\n"));
    assert!(!data.ends_with(b"\r\n\r\n"));

    // 8-bit content is declared to the smart host.
    let mail = sink.commands_starting("MAIL FROM:");
    assert_eq!(mail.len(), 1);
    assert!(
        mail[0].line.to_ascii_uppercase().contains("BODY=8BITMIME"),
        "{:?}",
        mail[0].line
    );
    wait_spool_empty(&server.queue_dir(), 10).await;
}

// ---------------------------------------------------------------------------------------------
// 2. Smart host down, then back
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn smart_host_down_keeps_the_message_queued_with_the_reason() {
    let (sink_addr, relay) = dead_sink().await;
    let server = TestServer::start_with(&relay).await;
    server.add_user(ALICE).await;
    let id = submit(
        server.submission,
        &server.cert_pem,
        ALICE,
        &[BOB],
        &simple_message(ALICE, BOB, "down"),
    )
    .await;
    let queue_dir = server.queue_dir();

    let e = wait_entry(&queue_dir, &id, 15, |e| attempts(e) >= 1).await;
    assert_eq!(rcpt_status(&e, BOB), "pending");
    let reason = last_error(&e);
    assert!(
        reason.starts_with("451 4.4.1 ") && reason.contains("smart host"),
        "last_error: {reason:?}"
    );

    let list = cli_ok(&server.config_path, &["queue", "list"]).await;
    let row = list
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{id} not in\n{list}"));
    assert!(row.contains("<alice@example.org>"), "{row}");
    assert!(row.contains("bob@example.net (deferred)"), "{row}");
    assert!(row.contains("451 4.4.1 "), "{row}");

    // The smart host comes back on the same port: the retry delivers.
    let sink = Sink::start_on(sink_addr, SinkOptions::default()).await;
    let got = sink.wait_for(1, 20).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_to, [BOB]);
    assert!(got[0].text().contains("Subject: down\r\n"));
    wait_spool_empty(&queue_dir, 10).await;
}

// ---------------------------------------------------------------------------------------------
// 3. kill -9 loses nothing
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn kill_9_loses_no_queued_message() {
    let (sink_addr, relay) = dead_sink().await;
    let dir = tempfile::tempdir().unwrap();
    let (sub, subs) = (free_addr(), free_addr());
    let text = config_text(dir.path(), [sub, subs], FAST_QUEUE, &relay);
    let (config_path, cert_pem) = prepare(dir.path(), &text).await;
    let queue_dir = dir.path().join("data/queue");
    let log = dir.path().join("submitd.log");

    let mut daemon = Daemon::start(&config_path, sub, &log).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let subject = format!("kill9-{i}");
        let id = submit(
            sub,
            &cert_pem,
            ALICE,
            &[BOB],
            &simple_message(ALICE, BOB, &subject),
        )
        .await;
        ids.push(id);
    }
    // At least one delivery attempt has failed, so the workers were busy with the spool.
    wait_entry(&queue_dir, &ids[0], 15, |e| attempts(e) >= 1).await;
    daemon.kill9();

    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(
        queued(&queue_dir),
        expected,
        "every accepted message is on disk"
    );

    let daemon = Daemon::start(&config_path, sub, &log).await;
    let sink = Sink::start_on(sink_addr, SinkOptions::default()).await;
    let got = sink.wait_for(5, 30).await;
    let mut subjects: Vec<String> = got
        .iter()
        .map(|m| {
            m.text()
                .lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_owned))
                .unwrap_or_default()
        })
        .collect();
    subjects.sort();
    assert_eq!(
        subjects,
        (0..5).map(|i| format!("kill9-{i}")).collect::<Vec<_>>(),
        "all delivered, once each\n{}",
        daemon.log()
    );
    wait_spool_empty(&queue_dir, 10).await;
    assert!(
        std::fs::read_dir(queue_dir.join("queued"))
            .unwrap()
            .next()
            .is_none(),
        "no message file left behind"
    );
    drop(daemon);
}

// ---------------------------------------------------------------------------------------------
// 4. A temporary refusal is retried
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn temporary_refusal_is_retried_and_delivered() {
    let sink = Sink::start().await;
    sink.script_rcpt(BOB, &["451 4.3.0 mailbox busy, try later"]);
    let server = TestServer::start_with(&sink.relay_config("")).await;
    server.add_user(ALICE).await;
    let started = Instant::now();
    submit(
        server.submission,
        &server.cert_pem,
        ALICE,
        &[BOB],
        &simple_message(ALICE, BOB, "retry"),
    )
    .await;

    let got = sink.wait_for(1, 20).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_to, [BOB]);
    // Two attempts: the refused one and the one that delivered, no more.
    let rcpts = sink.commands_starting(&format!("RCPT TO:<{BOB}>"));
    assert_eq!(rcpts.len(), 2, "{rcpts:?}");
    assert_eq!(sink.commands_starting("MAIL FROM:").len(), 2);
    // The second attempt waited for the retry schedule rather than looping at once.
    assert!(started.elapsed() >= Duration::from_millis(500));
    wait_spool_empty(&server.queue_dir(), 10).await;
    assert!(dsns(&sink.messages()).is_empty(), "no DSN for a deferral");
}

// ---------------------------------------------------------------------------------------------
// 5. A permanent refusal bounces, once, to the sender
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn permanent_refusal_delivers_the_rest_and_bounces_once() {
    let sink = Sink::start().await;
    sink.script_rcpt(NOBODY, &["550 5.1.1 <nobody@example.net>: no such user"]);
    let server = TestServer::start_with(&sink.relay_config("")).await;
    server.add_user(ALICE).await;
    let id = submit(
        server.submission,
        &server.cert_pem,
        ALICE,
        &[BOB, NOBODY],
        &simple_message(ALICE, BOB, "bounce-me"),
    )
    .await;

    let got = sink.wait_for(2, 20).await;
    wait_spool_empty(&server.queue_dir(), 10).await;
    let got_now = sink.messages();
    assert_eq!(got_now.len(), 2, "the message and one DSN: {got:#?}");
    let original: Vec<_> = got_now.iter().filter(|m| m.mail_from == ALICE).collect();
    assert_eq!(original.len(), 1);
    assert_eq!(original[0].rcpt_to, [BOB]);

    let dsns = dsns(&got_now);
    assert_eq!(dsns.len(), 1, "exactly one DSN");
    let dsn = &dsns[0];
    assert_eq!(dsn.rcpt_to, [ALICE]);
    assert_eq!(sink.commands_starting("MAIL FROM:<>").len(), 1);
    let text = dsn.text();
    for want in [
        "To: <alice@example.org>\r\n",
        "Content-Type: multipart/report; report-type=delivery-status;",
        "Content-Type: message/delivery-status\r\n",
        "Final-Recipient: rfc822; nobody@example.net\r\n",
        "Action: failed\r\n",
        "Status: 5.1.1\r\n",
        "Diagnostic-Code: smtp; 550 5.1.1 <nobody@example.net>: no such user\r\n",
        "Content-Type: text/rfc822-headers\r\n",
        "Subject: bounce-me\r\n",
        "Message-ID: <bounce-me@client.example>\r\n",
    ] {
        assert!(text.contains(want), "DSN lacks {want:?}:\n{text}");
    }
    assert!(text.contains(&id), "DSN names the queue id");
    assert!(!text.contains("Final-Recipient: rfc822; bob@"), "{text}");
    assert!(!text.contains("Hello."), "the body is not returned");

    // And it parses as a report with the three parts in order.
    let parsed = MessageParser::default()
        .parse(&dsn.data)
        .expect("DSN parses");
    let ct = parsed.content_type().expect("DSN Content-Type");
    assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("report")));
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    let children = parsed.parts[0].sub_parts().expect("multipart").to_vec();
    let types: Vec<String> = children
        .iter()
        .map(|&i| {
            let ct = parsed.parts[i as usize].content_type().expect("part type");
            format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or(""))
        })
        .collect();
    assert_eq!(
        types,
        [
            "text/plain",
            "message/delivery-status",
            "text/rfc822-headers"
        ]
    );

    // The trace record learns each recipient's outcome (written in the background).
    let mut outcome = Default::default();
    for _ in 0..50 {
        outcome = server.store.find_trace(&id).await.unwrap().unwrap().outcome;
        if outcome.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        outcome,
        [
            (BOB.to_owned(), "delivered".to_owned()),
            (
                NOBODY.to_owned(),
                "failed: 550 5.1.1 <nobody@example.net>: no such user".to_owned()
            ),
        ]
        .into()
    );
}

#[tokio::test]
async fn a_dsn_is_never_bounced() {
    let sink = Sink::start().await;
    sink.script_rcpt(NOBODY, &["550 5.1.1 no such user"]);
    // The sender's own mailbox refuses the DSN too.
    sink.script_rcpt_always(ALICE, "550 5.1.1 sender mailbox gone");
    let server = TestServer::start_with(&sink.relay_config("")).await;
    server.add_user(ALICE).await;
    submit(
        server.submission,
        &server.cert_pem,
        ALICE,
        &[NOBODY],
        &simple_message(ALICE, NOBODY, "double-bounce"),
    )
    .await;

    // The bounce is queued before the original leaves, so an empty spool means done.
    wait_spool_empty(&server.queue_dir(), 15).await;
    let dsn_rcpts = sink.commands_starting(&format!("RCPT TO:<{ALICE}>"));
    assert_eq!(dsn_rcpts.len(), 1, "one DSN, tried once: {dsn_rcpts:?}");
    assert_eq!(
        sink.commands_starting("MAIL FROM:<>").len(),
        1,
        "no DSN about the DSN: {:?}",
        sink.commands()
    );
    assert!(sink.messages().is_empty());
}

#[tokio::test]
async fn null_sender_gets_no_dsn() {
    let sink = Sink::start().await;
    sink.script_rcpt(NOBODY, &["550 5.1.1 no such user"]);
    let server = TestServer::start_with(&sink.relay_config("")).await;
    server.add_user(ALICE).await;
    submit(
        server.submission,
        &server.cert_pem,
        "",
        &[NOBODY],
        &simple_message(ALICE, NOBODY, "read-receipt"),
    )
    .await;

    wait_spool_empty(&server.queue_dir(), 15).await;
    // Only the message itself was tried, with the null sender; nothing followed.
    let mails = sink.commands_starting("MAIL FROM:");
    assert_eq!(mails.len(), 1, "{mails:?}");
    assert!(mails[0].line.starts_with("MAIL FROM:<>"), "{mails:?}");
    assert_eq!(sink.commands_starting("RCPT TO:").len(), 1);
    assert!(sink.messages().is_empty());
}

// ---------------------------------------------------------------------------------------------
// 6. max_age
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn message_expires_after_max_age_with_a_dsn() {
    let sink = Sink::start().await;
    sink.script_rcpt_always(BOB, "451 4.2.0 mailbox busy");
    let server = Custom::start(
        "first_retry = \"1s\"\nmax_retry = \"1s\"\nmax_age = \"3s\"\nworkers = 2",
        &sink.relay_config(""),
    )
    .await;
    let started = Instant::now();
    let id = server
        .submit(&[BOB], &simple_message(ALICE, BOB, "expire-me"))
        .await;

    let got = sink.wait_for(1, 20).await;
    assert_eq!(got.len(), 1, "a DSN");
    // Not before max_age (minus the one-second resolution of the schedule).
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let dsn = &got[0];
    assert_eq!(dsn.mail_from, "");
    assert_eq!(dsn.rcpt_to, [ALICE]);
    let text = dsn.text();
    for want in [
        "Content-Type: multipart/report; report-type=delivery-status;",
        "Final-Recipient: rfc822; bob@example.net\r\n",
        "Action: failed\r\n",
        "Diagnostic-Code: smtp; 451 4.2.0 mailbox busy",
        "expired",
        "Subject: expire-me\r\n",
    ] {
        assert!(text.contains(want), "DSN lacks {want:?}:\n{text}");
    }
    assert!(text.contains(&id));
    assert!(
        sink.commands_starting(&format!("RCPT TO:<{BOB}>")).len() >= 2,
        "retried before giving up"
    );
    wait_spool_empty(&server.queue_dir, 10).await;
}

// ---------------------------------------------------------------------------------------------
// 7. Relay TLS and AUTH
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn relay_starttls_with_the_right_ca() {
    let pki = TestPki::new();
    let files = tempfile::tempdir().unwrap();
    let ca = files.path().join("ca.pem");
    pki.write_ca(&ca);
    let sink = Sink::start_with(SinkOptions {
        tls: Some(server_tls(&pki)),
        auth: None,
        ..SinkOptions::default()
    })
    .await;
    let relay = sink.relay_config(&format!("ca_file = \"{}\"", ca.display()));
    assert!(relay.contains("tls = \"starttls\""));
    let server = TestServer::start_with(&relay).await;
    server.add_user(ALICE).await;
    submit(
        server.submission,
        &server.cert_pem,
        ALICE,
        &[BOB],
        &simple_message(ALICE, BOB, "tls"),
    )
    .await;
    let got = sink.wait_for(1, 20).await;
    assert_eq!(got.len(), 1);
    assert!(got[0].tls, "delivered over TLS");
    for c in sink.commands_starting("MAIL") {
        assert!(c.tls, "MAIL in plaintext: {c:?}");
    }
}

#[tokio::test]
async fn relay_with_an_untrusted_certificate_defers_and_never_sends_in_plaintext() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let files = tempfile::tempdir().unwrap();
    let wrong_ca = files.path().join("other-ca.pem");
    other.write_ca(&wrong_ca);
    let sink = Sink::start_with(SinkOptions {
        tls: Some(server_tls(&pki)),
        auth: None,
        ..SinkOptions::default()
    })
    .await;
    let server = TestServer::start_with(
        &sink.relay_config(&format!("ca_file = \"{}\"", wrong_ca.display())),
    )
    .await;
    server.add_user(ALICE).await;
    let id = submit(
        server.submission,
        &server.cert_pem,
        ALICE,
        &[BOB],
        &simple_message(ALICE, BOB, "untrusted"),
    )
    .await;

    // Tried, refused by our side at the handshake, and tried again later: still queued.
    let e = wait_entry(&server.queue_dir(), &id, 20, |e| attempts(e) >= 2).await;
    assert_eq!(rcpt_status(&e, BOB), "pending");
    assert!(last_error(&e).starts_with("451 4.4.1 "), "{e:#}");
    assert!(sink.tls_failures() >= 2, "handshakes attempted and failed");
    assert!(sink.messages().is_empty());
    for c in sink.commands() {
        let verb = c.line.to_ascii_uppercase();
        assert!(
            verb.starts_with("EHLO") || verb.starts_with("STARTTLS"),
            "nothing but EHLO and STARTTLS in plaintext: {c:?}"
        );
    }
}

#[tokio::test]
async fn relay_without_starttls_offered_defers() {
    let sink = Sink::start().await;
    let server = TestServer::start_with(&sink.relay_config_tls("starttls", "")).await;
    server.add_user(ALICE).await;
    let id = submit(
        server.submission,
        &server.cert_pem,
        ALICE,
        &[BOB],
        &simple_message(ALICE, BOB, "no-starttls"),
    )
    .await;
    let e = wait_entry(&server.queue_dir(), &id, 20, |e| attempts(e) >= 2).await;
    assert_eq!(rcpt_status(&e, BOB), "pending");
    assert!(last_error(&e).contains("STARTTLS"), "{e:#}");
    assert!(sink.messages().is_empty());
    for c in sink.commands() {
        let verb = c.line.to_ascii_uppercase();
        assert!(
            verb.starts_with("EHLO") || verb.starts_with("QUIT"),
            "nothing sent but EHLO: {c:?}"
        );
    }
}

#[tokio::test]
async fn relay_authenticates_with_the_password_file() {
    let pki = TestPki::new();
    let files = tempfile::tempdir().unwrap();
    let ca = files.path().join("ca.pem");
    pki.write_ca(&ca);
    let password_file = files.path().join("relay.secret");
    std::fs::write(&password_file, "s3cret relay pass\n").unwrap();
    let sink = Sink::start_with(SinkOptions {
        tls: Some(server_tls(&pki)),
        auth: Some(("relay-user".into(), "s3cret relay pass".into())),
        ..SinkOptions::default()
    })
    .await;
    let server = TestServer::start_with(&sink.relay_config(&format!(
        "ca_file = \"{}\"\nusername = \"relay-user\"\npassword_file = \"{}\"",
        ca.display(),
        password_file.display()
    )))
    .await;
    server.add_user(ALICE).await;
    submit(
        server.submission,
        &server.cert_pem,
        ALICE,
        &[BOB],
        &simple_message(ALICE, BOB, "auth"),
    )
    .await;
    let got = sink.wait_for(1, 20).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].authenticated.as_deref(), Some("relay-user"));
    assert!(got[0].tls);
    for c in sink.commands_starting("AUTH") {
        assert!(c.tls, "credentials only over TLS: {c:?}");
    }
}

#[tokio::test]
async fn relay_with_wrong_credentials_defers() {
    let pki = TestPki::new();
    let files = tempfile::tempdir().unwrap();
    let ca = files.path().join("ca.pem");
    pki.write_ca(&ca);
    let password_file = files.path().join("relay.secret");
    std::fs::write(&password_file, "not the password\n").unwrap();
    let sink = Sink::start_with(SinkOptions {
        tls: Some(server_tls(&pki)),
        auth: Some(("relay-user".into(), "s3cret relay pass".into())),
        ..SinkOptions::default()
    })
    .await;
    let server = TestServer::start_with(&sink.relay_config(&format!(
        "ca_file = \"{}\"\nusername = \"relay-user\"\npassword_file = \"{}\"",
        ca.display(),
        password_file.display()
    )))
    .await;
    server.add_user(ALICE).await;
    let id = submit(
        server.submission,
        &server.cert_pem,
        ALICE,
        &[BOB],
        &simple_message(ALICE, BOB, "bad-auth"),
    )
    .await;
    let e = wait_entry(&server.queue_dir(), &id, 20, |e| attempts(e) >= 1).await;
    assert_eq!(rcpt_status(&e, BOB), "pending");
    assert!(last_error(&e).contains("credentials"), "{e:#}");
    assert!(sink.commands_starting("MAIL").is_empty());
    assert!(dsns(&sink.messages()).is_empty());
}

// ---------------------------------------------------------------------------------------------
// 8. SIGTERM
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sigterm_exits_cleanly_and_keeps_the_queue() {
    let (sink_addr, relay) = dead_sink().await;
    let dir = tempfile::tempdir().unwrap();
    let (sub, subs) = (free_addr(), free_addr());
    let text = config_text(dir.path(), [sub, subs], FAST_QUEUE, &relay);
    let (config_path, cert_pem) = prepare(dir.path(), &text).await;
    let queue_dir = dir.path().join("data/queue");
    let log = dir.path().join("submitd.log");

    let mut daemon = Daemon::start(&config_path, sub, &log).await;
    let mut ids = Vec::new();
    for i in 0..2 {
        let subject = format!("term-{i}");
        ids.push(
            submit(
                sub,
                &cert_pem,
                ALICE,
                &[BOB],
                &simple_message(ALICE, BOB, &subject),
            )
            .await,
        );
    }
    wait_entry(&queue_dir, &ids[0], 15, |e| attempts(e) >= 1).await;
    // An idle client session does not hold the shutdown up.
    let mut idle = Client::connect(sub, &cert_pem).await;
    idle.expect("220").await;
    idle.cmd("EHLO client.example", "250").await;

    let (status, took) = daemon.terminate(10).await;
    assert!(status.success(), "exit status {status}\n{}", daemon.log());
    assert!(took < Duration::from_secs(4), "took {took:?} to stop");
    let bye = idle.try_reply().await;
    assert!(
        bye.as_ref().is_none_or(|r| r.code == 421),
        "idle session told 421 or closed: {bye:?}"
    );
    ids.sort();
    assert_eq!(queued(&queue_dir), ids, "queued mail stays queued");

    let daemon = Daemon::start(&config_path, sub, &log).await;
    let sink = Sink::start_on(sink_addr, SinkOptions::default()).await;
    let got = sink.wait_for(2, 30).await;
    assert_eq!(got.len(), 2, "{}", daemon.log());
    wait_spool_empty(&queue_dir, 10).await;
}

// ---------------------------------------------------------------------------------------------
// 9. The queue CLI
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn queue_cli_lists_shows_retries_and_deletes() {
    let sink = Sink::start().await;
    sink.script_rcpt(BOB, &["451 4.3.0 greylisted"]);
    sink.script_rcpt_always(CAROL, "451 4.7.1 try much later");
    let server = Custom::start(
        "first_retry = \"1h\"\nmax_retry = \"1h\"\nmax_age = \"5d\"\nworkers = 2",
        &sink.relay_config(""),
    )
    .await;
    let config = server.config_path.clone();
    let qdir = server.queue_dir.clone();
    let one = server
        .submit(&[BOB], &simple_message(ALICE, BOB, "cli-one"))
        .await;
    let two = server
        .submit(&[CAROL], &simple_message(ALICE, CAROL, "cli-two"))
        .await;
    wait_entry(&qdir, &one, 15, |e| {
        attempts(e) == 1 && !last_error(e).is_empty()
    })
    .await;
    wait_entry(&qdir, &two, 15, |e| {
        attempts(e) == 1 && !last_error(e).is_empty()
    })
    .await;

    // list: id, sender, recipient state, attempts, last error.
    let list = cli_ok(&config, &["queue", "list"]).await;
    assert!(list.lines().next().unwrap().starts_with("ID"), "{list}");
    assert!(list.contains("2 message(s)"), "{list}");
    let row = list
        .lines()
        .find(|l| l.starts_with(&one))
        .unwrap_or_else(|| panic!("{one} not listed:\n{list}"));
    let cols: Vec<&str> = row
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(cols[0], one, "{cols:?}");
    assert_eq!(cols[2], "<alice@example.org>", "{cols:?}");
    assert_eq!(cols[3], "bob@example.net (deferred)", "{cols:?}");
    assert_eq!(cols[4], "1", "attempts: {cols:?}");
    assert!(cols[5].starts_with("in "), "next attempt: {cols:?}");
    assert_eq!(cols[6], "451 4.3.0 greylisted", "{cols:?}");
    let json: Value = serde_json::from_str(&cli_ok(&config, &["queue", "list", "--json"]).await)
        .expect("list --json is JSON");
    assert_eq!(json.as_array().map(Vec::len), Some(2), "{json}");

    // show: envelope, state, headers, not the body.
    let show = cli_ok(&config, &["queue", "show", &one]).await;
    for want in [
        format!("id:          {one}"),
        "sender:      <alice@example.org>".to_owned(),
        "user:        alice@example.org".to_owned(),
        "attempts:    1".to_owned(),
        "recipient:   <bob@example.net> deferred 451 4.3.0 greylisted".to_owned(),
        "Subject: cli-one".to_owned(),
    ] {
        assert!(show.contains(&want), "show lacks {want:?}:\n{show}");
    }
    assert!(!show.contains("Hello."), "show prints no body:\n{show}");

    // retry: due now; the running server delivers it although the next attempt was an hour
    // away.
    let started = Instant::now();
    let out = cli_ok(&config, &["queue", "retry", &one]).await;
    assert!(out.contains(&format!("{one} due now")), "{out}");
    let got = sink.wait_for(1, 5).await;
    assert_eq!(got.len(), 1, "delivered after queue retry");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(got[0].text().contains("Subject: cli-one\r\n"));
    wait_entry_gone(&qdir, &one, 5).await;

    // delete: gone from the spool, the list and for good.
    let out = cli_ok(&config, &["queue", "delete", &two]).await;
    assert!(out.contains(&format!("deleted {two}")), "{out}");
    assert!(entry(&qdir, &two).is_none());
    assert!(queued_message(&qdir, &two).is_none());
    let list = cli_ok(&config, &["queue", "list"]).await;
    assert!(list.contains("0 message(s)"), "{list}");
    assert!(!cli(&config, &["queue", "show", &two])
        .await
        .status
        .success());
    let again = cli(&config, &["queue", "delete", &two]).await;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("no queued message"));
    // A retry of everything now finds nothing to resurrect.
    cli_ok(&config, &["queue", "retry", "--all"]).await;
    assert!(queued(&qdir).is_empty());
    assert_eq!(sink.messages().len(), 1);
}

async fn wait_entry_gone(queue_dir: &Path, id: &str, secs: u64) {
    let ok = eventually(secs, || entry(queue_dir, id).is_none()).await;
    assert!(ok, "{id} still queued: {:#?}", entry(queue_dir, id));
}

// ---------------------------------------------------------------------------------------------
// More of the relay's contract
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_retry_goes_only_to_the_deferred_recipients() {
    let sink = Sink::start().await;
    sink.script_rcpt(CAROL, &["451 4.3.0 try later"]);
    let server = TestServer::start_with(&sink.relay_config("")).await;
    server.add_user(ALICE).await;
    submit(
        server.submission,
        &server.cert_pem,
        ALICE,
        &[BOB, CAROL],
        &simple_message(ALICE, BOB, "partial"),
    )
    .await;
    let got = sink.wait_for(2, 20).await;
    wait_spool_empty(&server.queue_dir(), 10).await;
    let got_now = sink.messages();
    assert_eq!(got_now.len(), 2, "{got:#?}");
    assert_eq!(got_now[0].rcpt_to, [BOB]);
    assert_eq!(
        got_now[1].rcpt_to,
        [CAROL],
        "bob is not sent the message twice"
    );
    assert_eq!(sink.commands_starting(&format!("RCPT TO:<{BOB}>")).len(), 1);
}

#[tokio::test]
async fn a_refusal_after_data_fails_every_accepted_recipient() {
    let sink = Sink::start().await;
    sink.script_data(&["554 5.6.0 content rejected"]);
    let server = TestServer::start_with(&sink.relay_config("")).await;
    server.add_user(ALICE).await;
    submit(
        server.submission,
        &server.cert_pem,
        ALICE,
        &[BOB, CAROL],
        &simple_message(ALICE, BOB, "rejected"),
    )
    .await;
    let got = sink.wait_for(1, 20).await;
    wait_spool_empty(&server.queue_dir(), 10).await;
    assert_eq!(sink.messages().len(), 1, "{got:#?}");
    let dsn = &got[0];
    assert_eq!(dsn.mail_from, "");
    let text = dsn.text();
    for want in [
        "Final-Recipient: rfc822; bob@example.net\r\nAction: failed\r\nStatus: 5.6.0\r\n",
        "Final-Recipient: rfc822; carol@example.net\r\nAction: failed\r\nStatus: 5.6.0\r\n",
        "Diagnostic-Code: smtp; 554 5.6.0 content rejected\r\n",
    ] {
        assert!(text.contains(want), "DSN lacks {want:?}:\n{text}");
    }
}

#[tokio::test]
async fn a_kept_connection_the_smart_host_dropped_does_not_defer_the_next_message() {
    let sink = Sink::start().await;
    let addr = sink.addr;
    // One worker, so the second message goes over the connection the first one left open;
    // a deferral would mean an hour's wait.
    let server = Custom::start(
        "first_retry = \"1h\"\nmax_retry = \"1h\"\nmax_age = \"5d\"\nworkers = 1",
        &sink.relay_config(""),
    )
    .await;
    server
        .submit(&[BOB], &simple_message(ALICE, BOB, "first"))
        .await;
    assert_eq!(sink.wait_for(1, 20).await.len(), 1);
    // The smart host restarts: every open session is gone.
    sink.stop_wait().await;
    drop(sink);
    let sink = Sink::start_on(addr, SinkOptions::default()).await;

    let id = server
        .submit(&[BOB], &simple_message(ALICE, BOB, "second"))
        .await;
    let got = sink.wait_for(1, 10).await;
    assert_eq!(
        got.len(),
        1,
        "second message not delivered; entry: {:#?}",
        entry(&server.queue_dir, &id)
    );
    assert!(got[0].text().contains("Subject: second\r\n"));
}

#[tokio::test]
async fn queue_delete_during_an_attempt_is_not_undone_by_the_attempt() {
    let sink = Sink::start().await;
    sink.hold_data();
    sink.script_data(&["451 4.3.0 try later"]);
    // One worker: the probe below is handled only after the first attempt is finished.
    let server = Custom::start(
        "first_retry = \"1h\"\nmax_retry = \"1h\"\nmax_age = \"5d\"\nworkers = 1",
        &sink.relay_config(""),
    )
    .await;
    let id = server
        .submit(&[BOB], &simple_message(ALICE, BOB, "deleted-in-flight"))
        .await;
    assert!(
        eventually(15, || sink.held() == 1).await,
        "the attempt reached the end of DATA"
    );
    let out = cli_ok(&server.config_path, &["queue", "delete", &id]).await;
    assert!(out.contains(&format!("deleted {id}")), "{out}");
    // The smart host defers the message the operator just deleted.
    sink.release_data();
    server
        .submit(&[BOB], &simple_message(ALICE, BOB, "probe"))
        .await;
    let got = sink.wait_for(1, 15).await;
    assert_eq!(got.len(), 1);
    assert!(got[0].text().contains("Subject: probe\r\n"));
    // The deleted message stays deleted: no entry written back (it would have no message
    // file and be retried forever).
    wait_spool_empty(&server.queue_dir, 10).await;
}

#[tokio::test]
async fn relay_over_implicit_tls_verifies_the_certificate() {
    let pki = TestPki::new();
    let files = tempfile::tempdir().unwrap();
    let ca = files.path().join("ca.pem");
    pki.write_ca(&ca);
    let sink = Sink::start_with(SinkOptions {
        tls: Some(server_tls(&pki)),
        implicit: true,
        ..SinkOptions::default()
    })
    .await;
    let server = TestServer::start_with(
        &sink.relay_config_tls("implicit", &format!("ca_file = \"{}\"", ca.display())),
    )
    .await;
    server.add_user(ALICE).await;
    submit(
        server.submission,
        &server.cert_pem,
        ALICE,
        &[BOB],
        &simple_message(ALICE, BOB, "implicit"),
    )
    .await;
    let got = sink.wait_for(1, 20).await;
    assert_eq!(got.len(), 1);
    assert!(got[0].tls);

    // The same smart host without its CA configured: deferred, nothing delivered.
    let other = TestServer::start_with(&sink.relay_config_tls("implicit", "")).await;
    other.add_user(ALICE).await;
    let id = submit(
        other.submission,
        &other.cert_pem,
        ALICE,
        &[BOB],
        &simple_message(ALICE, BOB, "untrusted"),
    )
    .await;
    let e = wait_entry(&other.queue_dir(), &id, 20, |e| attempts(e) >= 1).await;
    assert!(last_error(&e).starts_with("451 4.4.1"), "{e}");
    assert_eq!(sink.messages().len(), 1);
}
