//! The submission protocol over real TCP and TLS: STARTTLS, implicit TLS, the MSA
//! extensions, limits, SMTP smuggling, AUTH and its throttle, sender ownership, queueing,
//! and lettre as a real client.
mod common;

use std::time::{Duration, Instant};

use common::*;

const ALICE: &str = "alice@example.org";
const BOB: &str = "bob@example.org";

/// The EHLO keywords (every line after the first, without the `250-`/`250 ` prefix).
fn keywords(r: &Reply) -> Vec<String> {
    assert_eq!(r.code, 250, "{r:?}");
    r.lines[1..]
        .iter()
        .map(|l| l.get(4..).unwrap_or_default().to_owned())
        .collect()
}

fn b64(s: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The queue id of a `250 2.0.0 Ok: queued as <ID>` reply, asserting its exact form.
fn queued_id(r: &Reply) -> String {
    assert_eq!(r.lines.len(), 1, "{r:?}");
    let id = r.lines[0]
        .strip_prefix("250 2.0.0 Ok: queued as ")
        .unwrap_or_else(|| panic!("not a queued reply: {r:?}"));
    assert!(
        !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()),
        "queue id {id:?}"
    );
    id.to_owned()
}

/// A server with alice and bob.
async fn server_with_users(extra: &str) -> TestServer {
    let server = TestServer::start_with(extra).await;
    server.add_user(ALICE).await;
    server.add_user(BOB).await;
    server
}

/// An implicit-TLS client that said EHLO (not authenticated).
async fn greeted_tls(server: &TestServer) -> Client {
    let mut c = server.tls_client().await;
    c.cmd("EHLO client.example", "250").await;
    c
}

/// MAIL and RCPT for alice to bob, then DATA, then `raw` as is (no stuffing, no final dot).
async fn data_raw(c: &mut Client, raw: &[u8]) -> Reply {
    c.cmd(&format!("MAIL FROM:<{ALICE}>"), "250 2.1.0").await;
    c.cmd("RCPT TO:<bob@example.net>", "250 2.1.5").await;
    c.cmd("DATA", "354").await;
    c.send(raw).await;
    c.reply().await
}

fn alice_message(subject: &str) -> String {
    simple_message(ALICE, "bob@example.net", subject)
}

// ---------------------------------------------------------------------------------------
// 1. Port 587: STARTTLS first.

#[tokio::test]
async fn plaintext_587_requires_starttls_for_everything() {
    let server = server_with_users("").await;
    let mut c = server.client().await;
    c.expect("220 ").await;
    let ehlo = c.cmd("EHLO client.example", "250 ").await;
    let kw = keywords(&ehlo);
    assert!(kw.iter().any(|k| k == "STARTTLS"), "{kw:?}");
    assert!(!kw.iter().any(|k| k.starts_with("AUTH")), "{kw:?}");
    c.cmd(
        &format!("AUTH PLAIN {}", plain(ALICE, PASSWORD)),
        "530 5.7.0",
    )
    .await;
    c.cmd("AUTH LOGIN", "530 5.7.0").await;
    c.cmd(&format!("MAIL FROM:<{ALICE}>"), "530 5.7.0").await;
    c.cmd("RCPT TO:<bob@example.net>", "530 5.7.0").await;
    c.cmd("DATA", "530 5.7.0").await;
    // The BDAT chunk follows the command whatever the answer; it is not read as commands.
    c.send(b"BDAT 6 LAST\r\nNOOP\r\n").await;
    c.expect("530 5.7.0").await;
    c.cmd("HELP", "214 2.0.0").await;
    c.cmd("QUIT", "221 2.0.0").await;
    assert!(c.is_closed().await);
    assert!(server.queued_ids().is_empty());
}

#[tokio::test]
async fn starttls_starts_the_session_over() {
    let server = server_with_users("").await;
    let mut c = server.client().await;
    c.expect("220 ").await;
    c.cmd("EHLO before.example", "250 ").await;
    c.starttls().await;
    // No new greeting, and the EHLO from before TLS is forgotten.
    c.cmd(&format!("MAIL FROM:<{ALICE}>"), "503 5.5.1").await;
    c.cmd(
        &format!("AUTH PLAIN {}", plain(ALICE, PASSWORD)),
        "503 5.5.1",
    )
    .await;
    let ehlo = c.cmd("EHLO after.example", "250 ").await;
    let kw = keywords(&ehlo);
    assert!(kw.iter().any(|k| k == "AUTH PLAIN LOGIN"), "{kw:?}");
    assert!(!kw.iter().any(|k| k == "STARTTLS"), "{kw:?}");
    c.cmd("STARTTLS", "503 5.5.1").await;
    c.auth_plain(ALICE, PASSWORD, "235 2.7.0").await;
    let r = c
        .send_message(ALICE, &["bob@example.net"], &alice_message("after-tls"))
        .await;
    queued_id(&r);
    assert_eq!(server.queued_ids().len(), 1);
}

#[tokio::test]
async fn starttls_pipelined_input_is_discarded() {
    // CVE-2011-0411: a command injected after STARTTLS in the same packet.
    let server = server_with_users("").await;
    let mut c = server.client().await;
    c.expect("220 ").await;
    c.cmd("EHLO client.example", "250 ").await;
    c.send(b"STARTTLS\r\nNOOP\r\n").await;
    c.expect("220 2.0.0").await;
    c.upgrade_tls().await;
    // The very next reply is the EHLO reply, not a 250 for the injected NOOP.
    let ehlo = c.cmd("EHLO client.example", "250").await;
    assert_eq!(ehlo.lines[0], format!("250-{HOSTNAME}"), "{ehlo:?}");
    assert!(ehlo.lines.len() > 2, "{ehlo:?}");
    let noop = c.cmd("NOOP", "250").await;
    assert_eq!(noop.lines, ["250 2.0.0 OK"]);
    c.cmd("HELP", "214 2.0.0").await;
    c.cmd("QUIT", "221 2.0.0").await;
}

// ---------------------------------------------------------------------------------------
// 2. Port 465: implicit TLS.

#[tokio::test]
async fn implicit_tls_on_465() {
    let server = server_with_users("").await;
    let mut c = server.tls_client().await;
    let ehlo = c.cmd("EHLO client.example", "250 ").await;
    let kw = keywords(&ehlo);
    assert!(kw.iter().any(|k| k == "AUTH PLAIN LOGIN"), "{kw:?}");
    assert!(!kw.iter().any(|k| k == "STARTTLS"), "{kw:?}");
    c.cmd("STARTTLS", "503 5.5.1").await;
    c.auth_plain(ALICE, PASSWORD, "235 2.7.0").await;
    let r = c
        .send_message(ALICE, &["bob@example.net"], &alice_message("on-465"))
        .await;
    let id = queued_id(&r);
    assert_eq!(server.queued_ids(), [id]);
}

#[tokio::test]
async fn tls_handshake_timeout_closes_the_connection() {
    let server = TestServer::start_tuned(
        Tuning {
            timeouts: "tls_handshake = \"1s\"",
            ..Tuning::default()
        },
        "",
    )
    .await;
    let started = Instant::now();
    let mut c = Client::connect(server.submissions, &server.cert_pem).await;
    assert!(c.is_closed().await, "closed within 10s");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );

    // The same deadline applies to the handshake after STARTTLS.
    let mut c = server.client().await;
    c.expect("220 ").await;
    c.cmd("STARTTLS", "220 2.0.0").await;
    let started = Instant::now();
    assert!(c.is_closed().await, "closed within 10s");
    assert!(started.elapsed() >= Duration::from_millis(900));
}

// ---------------------------------------------------------------------------------------
// 3. What is offered after TLS.

#[tokio::test]
async fn ehlo_after_tls_offers_the_msa_extensions() {
    let server = server_with_users("[limits]\nmax_message_size = 54321\n").await;
    let mut on587 = server.client().await;
    on587.expect("220 ").await;
    on587.cmd("EHLO client.example", "250").await;
    on587.starttls().await;
    let mut on465 = server.tls_client().await;
    for c in [&mut on587, &mut on465] {
        let ehlo = c.cmd("EHLO client.example", "250 ").await;
        assert_eq!(ehlo.lines[0], format!("250-{HOSTNAME}"), "{ehlo:?}");
        let kw = keywords(&ehlo);
        for want in [
            "PIPELINING",
            "SIZE 54321",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "CHUNKING",
            "AUTH PLAIN LOGIN",
        ] {
            assert!(kw.iter().any(|k| k == want), "{want} in {kw:?}");
        }
        for absent in ["ETRN", "EXPN", "VRFY", "STARTTLS"] {
            assert!(
                !kw.iter().any(|k| k.starts_with(absent)),
                "{absent}: {kw:?}"
            );
        }
        c.cmd("VRFY alice", "252 2.5.0").await;
        c.cmd("EXPN staff", "502 5.5.1").await;
        c.cmd("ETRN example.org", "502 5.5.1").await;
        // MAIL before AUTH is refused at MAIL, and so is everything after it.
        c.cmd(&format!("MAIL FROM:<{ALICE}>"), "530 5.7.0").await;
        c.cmd("RCPT TO:<bob@example.net>", "530 5.7.0").await;
        c.cmd("DATA", "530 5.7.0").await;
        c.auth_plain(ALICE, PASSWORD, "235 2.7.0").await;
        c.cmd(&format!("MAIL FROM:<{ALICE}>"), "250 2.1.0").await;
    }
}

#[tokio::test]
async fn advertised_extensions_work() {
    let server = server_with_users("").await;
    let mut c = server.authenticated(ALICE).await;
    // PIPELINING: a whole transaction up to DATA in one write, 8BITMIME and SMTPUTF8.
    c.send(
        format!(
            "MAIL FROM:<{ALICE}> BODY=8BITMIME SMTPUTF8 SIZE=300\r\n\
             RCPT TO:<bj\u{f8}rn@example.net>\r\nRCPT TO:<carol@example.net>\r\nDATA\r\n"
        )
        .as_bytes(),
    )
    .await;
    c.expect("250 2.1.0").await;
    c.expect("250 2.1.5").await;
    c.expect("250 2.1.5").await;
    c.expect("354").await;
    let msg = format!(
        "{}Gr\u{fc}\u{df}e aus K\u{f6}ln.\r\n",
        alice_message("8bit")
    );
    c.send(dot_stuff(msg.as_bytes()).as_slice()).await;
    c.send(b".\r\n").await;
    let id = queued_id(&c.reply().await);
    let body = queued_message(&server.queue_dir(), &id).unwrap();
    assert!(String::from_utf8(body)
        .unwrap()
        .contains("Gr\u{fc}\u{df}e aus K\u{f6}ln."));
    let entry = queued_entry(&server.queue_dir(), &id).unwrap();
    assert_eq!(entry["recipients"][0]["address"], "bj\u{f8}rn@example.net");
}

// ---------------------------------------------------------------------------------------
// 4. Limits.

const LIMITS: &str = "[limits]\nmax_message_size = 4096\nmax_recipients = 3\n";

#[tokio::test]
async fn command_line_length_limit() {
    let server = server_with_users("").await;
    let mut c = greeted_tls(&server).await;
    // 512 octets with the CRLF is allowed, 513 is not.
    let exact = format!("NOOP {}", "x".repeat(512 - 7));
    assert_eq!(exact.len() + 2, 512);
    c.cmd(&exact, "250 2.0.0").await;
    let over = format!("NOOP {}", "x".repeat(512 - 6));
    c.cmd(&over, "500 5.5.6").await;
    // A much longer line arriving in several reads, then the session goes on.
    let long = format!("MAIL FROM:<{}@example.org>", "a".repeat(5000));
    c.cmd(&long, "500 5.5.6").await;
    c.cmd("NOOP", "250 2.0.0").await;
    c.auth_plain(ALICE, PASSWORD, "235 2.7.0").await;
    let r = c
        .send_message(ALICE, &["bob@example.net"], &alice_message("after-long"))
        .await;
    queued_id(&r);
}

#[tokio::test]
async fn long_auth_line_is_not_refused_for_length() {
    let server = server_with_users("").await;
    let mut c = greeted_tls(&server).await;
    let password = "p".repeat(8900);
    let line = format!("AUTH PLAIN {}", plain(ALICE, &password));
    assert!((11_900..12_286).contains(&line.len()), "{}", line.len());
    let r = c.cmd(&line, "5").await;
    let last = r.lines.last().unwrap();
    assert!(
        last.starts_with("535 5.7.8") || last.starts_with("501 "),
        "{r:?}"
    );
    // The same length as a SASL response after an empty challenge.
    c.cmd("AUTH PLAIN", "334").await;
    let r = c.cmd(&plain(ALICE, &password), "5").await;
    let last = r.lines.last().unwrap();
    assert!(
        last.starts_with("535 5.7.8") || last.starts_with("501 "),
        "{r:?}"
    );
    // Past RFC 4954's 12,288 octets even an AUTH line is too long.
    let line = format!("AUTH PLAIN {}", plain(ALICE, &"p".repeat(9300)));
    assert!(line.len() + 2 > 12_288, "{}", line.len());
    c.cmd(&line, "500 5.5.6").await;
    c.cmd("AUTH LOGIN", "334").await;
    c.cmd(&b64(ALICE.as_bytes()), "334").await;
    c.cmd(&"A".repeat(13_000), "500 5.5.6").await;
    // The exchange ended with the refusal: this is a command again.
    c.cmd("NOOP", "250 2.0.0").await;
    c.auth_plain(ALICE, PASSWORD, "235 2.7.0").await;
}

#[tokio::test]
async fn data_limits() {
    let server = server_with_users(LIMITS).await;
    let mut c = server.authenticated(ALICE).await;

    // A text line over 1000 octets.
    let mut msg = alice_message("long-line").into_bytes();
    msg.extend_from_slice(&[b'x'; 1001]);
    msg.extend_from_slice(b"\r\n.\r\n");
    assert_eq!(
        data_raw(&mut c, &msg).await.lines[0].get(..9),
        Some("550 5.6.0")
    );
    assert!(server.queued_ids().is_empty());

    // SIZE= above the limit is refused at MAIL; at the limit it is fine.
    c.cmd(&format!("MAIL FROM:<{ALICE}> SIZE=4097"), "552 5.3.4")
        .await;
    c.cmd(&format!("MAIL FROM:<{ALICE}> SIZE=4096"), "250 2.1.0")
        .await;
    c.cmd("RSET", "250 2.0.0").await;

    // A message that grows past the limit during DATA: refused after the final dot only.
    // Its lines would be answered as unknown commands if they were read as commands.
    let mut msg = alice_message("too-big").into_bytes();
    for i in 0..100 {
        msg.extend_from_slice(format!("line {i} of a message that is much too big\r\n").as_bytes());
    }
    msg.extend_from_slice(b".\r\n");
    let r = data_raw(&mut c, &msg).await;
    assert!(r.lines[0].starts_with("552 5.3.4"), "{r:?}");
    c.cmd(&format!("MAIL FROM:<{ALICE}>"), "250 2.1.0").await;
    c.cmd("RSET", "250 2.0.0").await;
    assert!(server.queued_ids().is_empty());

    // The same with BDAT: the first chunk fits, the last one does not.
    c.cmd(&format!("MAIL FROM:<{ALICE}>"), "250 2.1.0").await;
    c.cmd("RCPT TO:<bob@example.net>", "250 2.1.5").await;
    let first = alice_message("too-big-bdat");
    c.send(format!("BDAT {}\r\n{first}", first.len()).as_bytes())
        .await;
    c.expect("250 2.0.0").await;
    let second = "NOOP\r\n".repeat(700);
    c.send(format!("BDAT {} LAST\r\n{second}", second.len()).as_bytes())
        .await;
    c.expect("552 5.3.4").await;
    c.cmd(&format!("MAIL FROM:<{ALICE}>"), "250 2.1.0").await;
    assert!(server.queued_ids().is_empty());
    c.cmd("RSET", "250 2.0.0").await;

    // And a message within the limit still goes through.
    let r = c
        .send_message(ALICE, &["bob@example.net"], &alice_message("fits"))
        .await;
    queued_id(&r);
    assert_eq!(server.queued_ids().len(), 1);
}

#[tokio::test]
async fn recipient_limit_and_syntax_errors() {
    let server = server_with_users(LIMITS).await;
    let mut c = server.authenticated(ALICE).await;
    c.cmd("MAIL FROM:alice@example.org", "501 5.5.2").await;
    c.cmd("FOO bar", "500 5.5.1").await;
    c.cmd(&format!("MAIL FROM:<{ALICE}>"), "250 2.1.0").await;
    c.cmd("RCPT TO:<nodomain>", "501 5.1.3").await;
    c.cmd("RCPT TO:<a b@example.net>", "501 5.1.3").await;
    for r in ["a", "b", "c"] {
        c.cmd(&format!("RCPT TO:<{r}@example.net>"), "250 2.1.5")
            .await;
    }
    c.cmd("RCPT TO:<d@example.net>", "452 4.5.3").await;
    c.cmd("DATA", "354").await;
    c.send(dot_stuff(alice_message("three").as_bytes()).as_slice())
        .await;
    c.send(b".\r\n").await;
    let id = queued_id(&c.reply().await);
    let entry = queued_entry(&server.queue_dir(), &id).unwrap();
    let rcpts: Vec<&str> = entry["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["address"].as_str().unwrap())
        .collect();
    assert_eq!(rcpts, ["a@example.net", "b@example.net", "c@example.net"]);
}

#[tokio::test]
async fn too_many_errors_close_the_connection() {
    let server = server_with_users("[limits]\nmax_errors = 3\n").await;
    let mut c = server.tls_client().await;
    for _ in 0..3 {
        c.cmd("BOGUS", "500 5.5.1").await;
    }
    c.cmd("BOGUS", "421 4.7.0").await;
    assert!(c.is_closed().await);

    // Successful commands in between do not reset the count.
    let mut c = server.tls_client().await;
    c.cmd("BOGUS", "500 5.5.1").await;
    c.cmd("EHLO client.example", "250").await;
    c.cmd("MAIL FROM:<x@example.org>", "530 5.7.0").await;
    c.cmd("NOOP", "250 2.0.0").await;
    c.cmd("EXPN x", "502 5.5.1").await;
    c.cmd("DATA", "421 4.7.0").await;
    assert!(c.is_closed().await);
}

#[tokio::test]
async fn idle_timeout_closes_with_421() {
    let server = TestServer::start_tuned(
        Tuning {
            timeouts: "command = \"1s\"",
            ..Tuning::default()
        },
        "",
    )
    .await;
    server.add_user(ALICE).await;
    let mut c = server.client().await;
    c.expect("220 ").await;
    let started = Instant::now();
    c.expect("421 4.4.2").await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    assert!(c.is_closed().await);

    // Also inside TLS, after authentication.
    let mut c = server.tls_client().await;
    c.cmd("EHLO client.example", "250").await;
    c.auth_plain(ALICE, PASSWORD, "235 2.7.0").await;
    c.expect("421 4.4.2").await;
    assert!(c.is_closed().await);
}

#[tokio::test]
async fn unauthenticated_connections_per_ip_are_capped() {
    let server = server_with_users("[limits]\nmax_unauthenticated_per_ip = 2\n").await;
    let mut a = server.client().await;
    a.expect("220 ").await;
    let mut b = server.client().await;
    b.expect("220 ").await;
    let mut c = server.client().await;
    c.expect("421 4.7.0").await;
    assert!(c.is_closed().await);

    // Authenticating frees the slot.
    a.cmd("EHLO client.example", "250").await;
    a.starttls().await;
    a.cmd("EHLO client.example", "250").await;
    a.auth_plain(ALICE, PASSWORD, "235 2.7.0").await;
    let mut d = server.client().await;
    d.expect("220 ").await;
    // ... and only that one: b and d are unauthenticated.
    let mut e = server.client().await;
    e.expect("421 4.7.0").await;
    // A closed unauthenticated connection frees its slot too.
    b.cmd("QUIT", "221 2.0.0").await;
    assert!(b.is_closed().await);
    // The server releases the slot just after closing the socket, so the first attempt may
    // race it; within a second it must be free.
    let deadline = Instant::now() + Duration::from_secs(1);
    let _f = loop {
        let mut f = server.client().await;
        let r = f.reply().await;
        if r.code == 220 {
            break f;
        }
        assert!(r.lines[0].starts_with("421 4.7.0"), "{r:?}");
        assert!(
            Instant::now() < deadline,
            "slot of a closed connection not freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The authenticated one still works.
    a.cmd("NOOP", "250 2.0.0").await;
    drop(d);
}

// ---------------------------------------------------------------------------------------
// 5. SMTP smuggling.

#[tokio::test]
async fn bare_line_endings_and_nul_in_data_are_refused() {
    let server = server_with_users("").await;
    let mut c = server.authenticated(ALICE).await;
    for (name, bad) in [
        ("bare LF", &b"one\ntwo\r\n"[..]),
        ("bare CR", b"one\rtwo\r\n"),
        ("NUL", b"one\0two\r\n"),
        ("CR CR LF", b"one\r\r\n"),
    ] {
        let mut msg = alice_message("smuggle").into_bytes();
        msg.extend_from_slice(bad);
        msg.extend_from_slice(b".\r\n");
        let r = data_raw(&mut c, &msg).await;
        assert!(r.lines[0].starts_with("550 5.6.0"), "{name}: {r:?}");
        assert!(server.queued_ids().is_empty(), "{name}");
    }
    // The same session still queues a clean message.
    let r = c
        .send_message(ALICE, &["bob@example.net"], &alice_message("clean"))
        .await;
    queued_id(&r);
    assert_eq!(server.queued_ids().len(), 1);
}

#[tokio::test]
async fn only_crlf_dot_crlf_ends_data() {
    let server = server_with_users("").await;
    let mut c = server.authenticated(ALICE).await;
    let injected =
        "MAIL FROM:<alice@example.org>\r\nRCPT TO:<eve@example.net>\r\nDATA\r\nsmuggled\r\n.\r\n";
    for end in ["\n.\n", "\r\n.\n", "\n.\r\n"] {
        let msg = format!("{}hello{end}{injected}", alice_message("outer"));
        let r = data_raw(&mut c, msg.as_bytes()).await;
        assert!(r.lines[0].starts_with("550 5.6.0"), "{end:?}: {r:?}");
        // Nothing of the injected transaction is answered.
        c.cmd("HELP", "214 2.0.0").await;
        c.cmd("RCPT TO:<x@example.net>", "503 5.5.1").await;
    }
    assert!(server.queued_ids().is_empty());
}

#[tokio::test]
async fn bare_lf_in_a_command_line_does_not_split_it() {
    let server = server_with_users("").await;
    let mut c = server.authenticated(ALICE).await;
    c.send(format!("MAIL FROM:<{ALICE}>\nRCPT TO:<bob@example.net>\r\n").as_bytes())
        .await;
    c.expect("501 5.5.2").await;
    // Neither half was executed: there is no transaction, and no second reply is pending.
    c.cmd("RCPT TO:<bob@example.net>", "503 5.5.1").await;
    c.send(format!("MAIL FROM:<{ALICE}>\rRCPT TO:<bob@example.net>\r\n").as_bytes())
        .await;
    c.expect("501 5.5.2").await;
    c.cmd("HELP", "214 2.0.0").await;
    c.cmd("NOOP\0", "501 5.5.2").await;
    c.cmd(&format!("MAIL FROM:<{ALICE}>"), "250 2.1.0").await;
}

// ---------------------------------------------------------------------------------------
// 6. AUTH.

#[tokio::test]
async fn auth_mechanisms_and_refusals() {
    let server = server_with_users("").await;
    server.add_user("carol@example.org").await;
    server
        .store
        .set_disabled("carol@example.org", true)
        .await
        .unwrap();

    // PLAIN with an initial response.
    let mut c = greeted_tls(&server).await;
    c.cmd(
        &format!("AUTH PLAIN {}", plain(ALICE, PASSWORD)),
        "235 2.7.0",
    )
    .await;
    // AUTH twice.
    c.cmd(
        &format!("AUTH PLAIN {}", plain(ALICE, PASSWORD)),
        "503 5.5.1",
    )
    .await;
    c.cmd("AUTH LOGIN", "503 5.5.1").await;
    c.cmd(&format!("MAIL FROM:<{ALICE}>"), "250 2.1.0").await;

    // PLAIN after an empty challenge.
    let mut c = greeted_tls(&server).await;
    let challenge = c.cmd("AUTH PLAIN", "334").await;
    assert_eq!(challenge.lines, ["334 "]);
    c.cmd(&plain(ALICE, PASSWORD), "235 2.7.0").await;

    // LOGIN: two prompts.
    let mut c = greeted_tls(&server).await;
    let r = c.cmd("AUTH LOGIN", "334").await;
    assert_eq!(r.lines, ["334 VXNlcm5hbWU6"]);
    let r = c.cmd(&b64(ALICE.as_bytes()), "334").await;
    assert_eq!(r.lines, ["334 UGFzc3dvcmQ6"]);
    c.cmd(&b64(PASSWORD.as_bytes()), "235 2.7.0").await;

    // LOGIN with the username as initial response.
    let mut c = greeted_tls(&server).await;
    let r = c
        .cmd(&format!("AUTH LOGIN {}", b64(BOB.as_bytes())), "334")
        .await;
    assert_eq!(r.lines, ["334 UGFzc3dvcmQ6"]);
    c.cmd(&b64(PASSWORD.as_bytes()), "235 2.7.0").await;

    // Login with an uppercase domain.
    let mut c = greeted_tls(&server).await;
    c.auth_plain("alice@EXAMPLE.ORG", PASSWORD, "235 2.7.0")
        .await;
    c.cmd(&format!("MAIL FROM:<{ALICE}>"), "250 2.1.0").await;

    // Refusals; each leaves the session able to try again.
    let mut c = greeted_tls(&server).await;
    c.cmd("AUTH PLAIN", "334").await;
    c.cmd("*", "501 5.0.0").await;
    c.cmd("AUTH LOGIN", "334").await;
    c.cmd("*", "501 5.0.0").await;
    c.cmd("AUTH LOGIN", "334").await;
    c.cmd(&b64(ALICE.as_bytes()), "334").await;
    c.cmd("*", "501 5.0.0").await;
    c.cmd("AUTH PLAIN !!!not-base64!!!", "501 5.5.2").await;
    c.cmd("AUTH PLAIN", "334").await;
    c.cmd("%%%", "501 5.5.2").await;
    c.cmd("AUTH CRAM-MD5", "504 5.5.4").await;
    c.cmd("AUTH XFOO", "504 5.5.4").await;
    c.cmd("NOOP", "250 2.0.0").await;
    c.auth_plain(ALICE, PASSWORD, "235 2.7.0").await;

    let mut c = greeted_tls(&server).await;
    let authz = b64(format!("{BOB}\0{ALICE}\0{PASSWORD}").as_bytes());
    c.cmd(&format!("AUTH PLAIN {authz}"), "535 5.7.8").await;
    c.auth_plain(ALICE, "wrong password", "535 5.7.8").await;
    c.auth_plain("nobody@example.org", PASSWORD, "535 5.7.8")
        .await;
    c.auth_plain("carol@example.org", PASSWORD, "535 5.7.8")
        .await;
    // Not authenticated after all that.
    c.cmd(&format!("MAIL FROM:<{ALICE}>"), "530 5.7.0").await;
    // The same authzid as authcid is fine.
    let same = b64(format!("{ALICE}\0{ALICE}\0{PASSWORD}").as_bytes());
    c.cmd(&format!("AUTH PLAIN {same}"), "235 2.7.0").await;

    // Re-enabling carol lets her in: the refusal above was the disabled flag.
    server
        .store
        .set_disabled("carol@example.org", false)
        .await
        .unwrap();
    let mut c = greeted_tls(&server).await;
    c.auth_plain("carol@example.org", PASSWORD, "235 2.7.0")
        .await;
}

#[tokio::test]
async fn failures_throttle_the_account_from_that_address_only() {
    let server = TestServer::start_tuned(
        Tuning {
            auth: "max_failures_per_ip = 3",
            ..Tuning::default()
        },
        "",
    )
    .await;
    server.add_user(ALICE).await;
    server.add_user(BOB).await;
    let mut c = greeted_tls(&server).await;
    for _ in 0..3 {
        c.auth_plain(ALICE, "wrong password", "535 5.7.8").await;
    }
    c.auth_plain(ALICE, PASSWORD, "454 4.7.0").await;
    // Another connection from the same address: still throttled for alice.
    let mut d = greeted_tls(&server).await;
    d.cmd("AUTH LOGIN", "334").await;
    d.cmd(&b64(ALICE.as_bytes()), "334").await;
    d.cmd(&b64(PASSWORD.as_bytes()), "454 4.7.0").await;
    // Bob behind the same address logs in.
    c.auth_plain(BOB, PASSWORD, "235 2.7.0").await;
    d.auth_plain(BOB, PASSWORD, "235 2.7.0").await;
}

#[tokio::test]
async fn a_success_resets_the_failure_count() {
    let server = TestServer::start_tuned(
        Tuning {
            auth: "max_failures_per_ip = 3",
            ..Tuning::default()
        },
        "",
    )
    .await;
    server.add_user(ALICE).await;
    let mut c = greeted_tls(&server).await;
    c.auth_plain(ALICE, "wrong", "535 5.7.8").await;
    c.auth_plain(ALICE, "wrong", "535 5.7.8").await;
    c.auth_plain(ALICE, PASSWORD, "235 2.7.0").await;
    let mut d = greeted_tls(&server).await;
    d.auth_plain(ALICE, "wrong", "535 5.7.8").await;
    d.auth_plain(ALICE, "wrong", "535 5.7.8").await;
    d.auth_plain(ALICE, PASSWORD, "235 2.7.0").await;
}

// ---------------------------------------------------------------------------------------
// 7. Sender ownership.

#[tokio::test]
async fn senders_must_be_owned() {
    let server = server_with_users("").await;
    server
        .store
        .allow_sender(ALICE, "team@example.org")
        .await
        .unwrap();
    server
        .store
        .allow_sender(ALICE, "@alice.example")
        .await
        .unwrap();
    let mut c = server.authenticated(ALICE).await;

    c.cmd("MAIL FROM:<mallory@example.org>", "550 5.7.1").await;
    c.cmd("MAIL FROM:<alice@example.net>", "550 5.7.1").await;
    c.cmd("MAIL FROM:<@relay.example:alice@example.org>", "501 5.1.7")
        .await;
    c.cmd("MAIL FROM:<team@example.org>", "250 2.1.0").await;
    c.cmd("RSET", "250 2.0.0").await;
    c.cmd("MAIL FROM:<Alice@Example.ORG>", "250 2.1.0").await;
    c.cmd("RSET", "250 2.0.0").await;

    // An allowed domain, envelope and header.
    let r = c
        .send_message(
            "anyone@alice.example",
            &["bob@example.net"],
            &simple_message("anyone@alice.example", "bob@example.net", "domain"),
        )
        .await;
    queued_id(&r);
    assert_eq!(server.queued_ids().len(), 1);

    // Someone else's address in From: is refused at the end of DATA.
    let r = c
        .send_message(
            ALICE,
            &["bob@example.net"],
            &simple_message("mallory@example.org", "bob@example.net", "forged"),
        )
        .await;
    assert!(r.lines[0].starts_with("550 5.7.1"), "{r:?}");
    assert_eq!(server.queued_ids().len(), 1);

    // The null sender is accepted, but From: is still checked.
    let r = c
        .send_message(
            "",
            &["bob@example.net"],
            &simple_message("mallory@example.org", "bob@example.net", "null-forged"),
        )
        .await;
    assert!(r.lines[0].starts_with("550 5.7.1"), "{r:?}");
    assert_eq!(server.queued_ids().len(), 1);
    let r = c
        .send_message(
            "",
            &["bob@example.net"],
            &simple_message("team@example.org", "bob@example.net", "null-ok"),
        )
        .await;
    let id = queued_id(&r);
    let entry = queued_entry(&server.queue_dir(), &id).unwrap();
    assert_eq!(entry["sender"], "");
    assert_eq!(server.queued_ids().len(), 2);

    // Allowances belong to one user.
    let mut b = server.authenticated(BOB).await;
    b.cmd("MAIL FROM:<team@example.org>", "550 5.7.1").await;
    b.cmd("MAIL FROM:<x@alice.example>", "550 5.7.1").await;
    b.cmd(&format!("MAIL FROM:<{BOB}>"), "250 2.1.0").await;
}

// ---------------------------------------------------------------------------------------
// 8. Accepting.

#[tokio::test]
async fn accepted_message_is_on_disk_when_250_arrives() {
    let server = server_with_users("").await;
    let mut c = server.authenticated(ALICE).await;
    let r = c
        .send_message(
            ALICE,
            &["bob@example.net", "carol@example.net"],
            &format!("{}.a line with a dot\r\n", alice_message("accept")),
        )
        .await;
    let id = queued_id(&r);
    let entry = queued_entry(&server.queue_dir(), &id).expect("queued");
    assert_eq!(entry["sender"], ALICE);
    assert_eq!(entry["user"], ALICE);
    assert_eq!(entry["recipients"][1]["address"], "carol@example.net");
    let body = String::from_utf8(queued_message(&server.queue_dir(), &id).unwrap()).unwrap();
    assert!(body.contains("Subject: accept\r\n"), "{body}");
    assert!(
        body.ends_with("\r\nHello.\r\n.a line with a dot\r\n"),
        "{body}"
    );
    assert_eq!(server.queued_ids(), [id]);
}

#[tokio::test]
async fn bdat_chunks_are_queued() {
    let server = server_with_users("").await;
    let mut c = server.authenticated(ALICE).await;
    c.cmd(&format!("MAIL FROM:<{ALICE}>"), "250 2.1.0").await;
    c.cmd("RCPT TO:<bob@example.net>", "250 2.1.5").await;
    let first = format!("{}first chunk\r\n.\r\n", alice_message("bdat"));
    let second = "QUIT\r\nsecond chunk\r\n";
    c.send(format!("BDAT {}\r\n{first}", first.len()).as_bytes())
        .await;
    c.expect("250 2.0.0").await;
    c.cmd("DATA", "503 5.5.1").await;
    c.send(format!("BDAT {} LAST\r\n{second}", second.len()).as_bytes())
        .await;
    let id = queued_id(&c.reply().await);
    assert_eq!(server.queued_ids(), std::slice::from_ref(&id));
    let body = String::from_utf8(queued_message(&server.queue_dir(), &id).unwrap()).unwrap();
    // Chunks are taken as they are: no dot-unstuffing, no end marker.
    assert!(
        body.ends_with("\r\nHello.\r\nfirst chunk\r\n.\r\nQUIT\r\nsecond chunk\r\n"),
        "{body}"
    );

    // Pipelined in one write, with a zero-length LAST chunk.
    let msg = alice_message("bdat-pipelined");
    c.send(
        format!(
            "MAIL FROM:<{ALICE}>\r\nRCPT TO:<bob@example.net>\r\nBDAT {}\r\n{msg}BDAT 0 LAST\r\n",
            msg.len()
        )
        .as_bytes(),
    )
    .await;
    c.expect("250 2.1.0").await;
    c.expect("250 2.1.5").await;
    c.expect("250 2.0.0").await;
    queued_id(&c.reply().await);
    assert_eq!(server.queued_ids().len(), 2);
}

// ---------------------------------------------------------------------------------------
// 9. lettre as a real client.

async fn send_with_lettre(server: &TestServer, port: u16, implicit: bool, subject: &str) {
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

    let params = TlsParameters::builder("localhost".to_owned())
        .add_root_certificate(Certificate::from_pem(&server.cert_pem).unwrap())
        .build_rustls()
        .unwrap();
    let tls = if implicit {
        Tls::Wrapper(params)
    } else {
        Tls::Required(params)
    };
    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(port)
        .tls(tls)
        .credentials(Credentials::new(ALICE.to_owned(), PASSWORD.to_owned()))
        .timeout(Some(Duration::from_secs(10)))
        .build();
    let email = Message::builder()
        .from(format!("Alice <{ALICE}>").parse().unwrap())
        .to("Bob <bob@example.net>".parse().unwrap())
        .subject(subject)
        .body(String::from("Hello from lettre.\r\n"))
        .unwrap();
    let before = server.queued_ids().len();
    let response = mailer.send(email).await.expect("lettre sends");
    assert_eq!(u16::from(response.code()), 250, "{response:?}");
    let text: Vec<&str> = response.message().collect();
    let id = text[0]
        .strip_prefix("2.0.0 Ok: queued as ")
        .unwrap_or_else(|| panic!("{text:?}"));
    let ids = server.queued_ids();
    assert_eq!(ids.len(), before + 1);
    assert!(ids.iter().any(|i| i == id), "{id} in {ids:?}");
    let body = queued_message(&server.queue_dir(), id).unwrap();
    let body = String::from_utf8(body).unwrap();
    assert!(body.contains(&format!("Subject: {subject}\r\n")), "{body}");
}

#[tokio::test]
async fn lettre_submits_over_587_with_starttls() {
    let server = server_with_users("").await;
    send_with_lettre(&server, server.submission.port(), false, "lettre-587").await;
}

#[tokio::test]
async fn lettre_submits_over_465() {
    let server = server_with_users("").await;
    send_with_lettre(&server, server.submissions.port(), true, "lettre-465").await;
}

#[tokio::test]
async fn lettre_without_tls_gets_nowhere() {
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
    let server = server_with_users("").await;
    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(server.submission.port())
        .credentials(Credentials::new(ALICE.to_owned(), PASSWORD.to_owned()))
        .timeout(Some(Duration::from_secs(10)))
        .build();
    let email = Message::builder()
        .from(ALICE.parse().unwrap())
        .to("bob@example.net".parse().unwrap())
        .subject("plaintext")
        .body(String::from("no\r\n"))
        .unwrap();
    assert!(mailer.send(email).await.is_err());
    assert!(server.queued_ids().is_empty());
}

/// RSET ends a transaction only: after AUTH, and after a delivered message, the session stays
/// authenticated (clients such as Outlook send RSET between messages).
#[tokio::test]
async fn rset_keeps_the_session_authenticated() {
    let server = TestServer::start().await;
    server.add_user("alice@example.org").await;
    let mut c = server.authenticated("alice@example.org").await;
    c.cmd("RSET", "250 2.0.0").await;
    let msg = simple_message("alice@example.org", "bob@example.net", "r1");
    let r = c
        .send_message("alice@example.org", &["bob@example.net"], &msg)
        .await;
    assert_eq!(r.code, 250, "{r:?}");
    c.cmd("RSET", "250 2.0.0").await;
    c.cmd("MAIL FROM:<alice@example.org>", "250 2.1.0").await;
    c.cmd("RSET", "250 2.0.0").await;
    let r = c
        .send_message("alice@example.org", &["bob@example.net"], &msg)
        .await;
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(server.queued_ids().len(), 2);
}

/// RFC 6531: a non-ASCII address needs the SMTPUTF8 parameter on MAIL.
#[tokio::test]
async fn non_ascii_addresses_without_smtputf8_are_refused() {
    let server = TestServer::start().await;
    server.add_user("alice@example.org").await;
    let mut c = server.authenticated("alice@example.org").await;
    c.cmd("MAIL FROM:<alice@example.org>", "250 2.1.0").await;
    c.cmd("RCPT TO:<jürgen@example.de>", "553 5.6.7").await;
    c.cmd("RSET", "250 2.0.0").await;
    c.cmd("MAIL FROM:<alice@example.org> SMTPUTF8", "250 2.1.0")
        .await;
    c.cmd("RCPT TO:<jürgen@example.de>", "250 2.1.5").await;
}

/// A client that keeps the connection busy without ever authenticating is closed once
/// `[timeouts] unauthenticated` has passed; an authenticated one is not.
#[tokio::test]
async fn unauthenticated_sessions_have_a_deadline() {
    let server = TestServer::start_tuned(
        Tuning {
            timeouts: "unauthenticated = \"1s\"",
            ..Tuning::default()
        },
        "",
    )
    .await;
    server.add_user("alice@example.org").await;
    let mut trickle = server.client().await;
    trickle.expect("220").await;
    let started = Instant::now();
    let closing = loop {
        trickle.send(b"NOOP\r\n").await;
        let r = trickle.reply().await;
        if r.code != 250 {
            break r;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "never closed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(closing.text().starts_with("421 4.7.0"), "{closing:?}");
    assert!(trickle.is_closed().await);

    let mut authed = server.authenticated("alice@example.org").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    authed.cmd("NOOP", "250 2.0.0").await;
}
