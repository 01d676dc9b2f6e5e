//! Issue 4: what the relayed message reveals about the submitting client, per Received policy,
//! and how the abuse desk gets it back (`submitd trace ID`).
//!
//! Every test submits from a chosen loopback address (127.0.0.77) with an EHLO and message
//! headers that name a private address (192.168.19.77), then inspects the exact bytes that
//! reach the smart-host sink.
mod common;

use common::sink::{Captured, Sink};
use common::*;
use submitd::config::ReceivedPolicy;

const CLIENT: &str = "127.0.0.77";
/// Outside 127.0.0.0/24.
const OUTSIDE: &str = "127.0.1.5";
const EHLO_IP: &str = "192.168.19.77";
const USER: &str = "alice@example.org";
const RCPT: &str = "bob@example.net";

/// EHLO `[192.168.19.77]`, STARTTLS, AUTH as alice, one message to bob; the final reply.
async fn submit_reply(server: &TestServer, source: &str, message: &str) -> String {
    let mut c = Client::connect_from(source, server.submission, &server.cert_pem).await;
    c.expect("220").await;
    c.cmd(&format!("EHLO [{EHLO_IP}]"), "250").await;
    c.starttls().await;
    c.cmd(&format!("EHLO [{EHLO_IP}]"), "250").await;
    c.auth_plain(USER, PASSWORD, "235 2.7.0").await;
    let r = c.send_message(USER, &[RCPT], message).await;
    c.cmd("QUIT", "221").await;
    r.text()
}

/// As [`submit_reply`], asserting the message was queued; the queue id of the 250.
async fn submit_from(server: &TestServer, source: &str, message: &str) -> String {
    let text = submit_reply(server, source, message).await;
    let id = text
        .strip_prefix("250 2.0.0 Ok: queued as ")
        .unwrap_or_else(|| panic!("not queued: {text:?}"))
        .trim()
        .to_owned();
    assert!(
        !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()),
        "{id:?}"
    );
    id
}

/// A message as a client behind a NAT would submit it: its own software's Received line and
/// an X-Originating-IP header, both naming the private address.
fn tracked_message(subject: &str) -> String {
    format!(
        "Received: from [{EHLO_IP}] (laptop.lan [{EHLO_IP}])\r\n\tby laptop.lan with ESMTP;\r\n\tFri, 4 Dec 2026 09:59:00 +0000\r\n\
         From: Alice <{USER}>\r\n\
         To: {RCPT}\r\n\
         X-Originating-IP: [{EHLO_IP}]\r\n\
         Subject: {subject}\r\n\
         Message-ID: <{subject}@client.example>\r\n\
         Date: Fri, 4 Dec 2026 10:00:00 +0000\r\n\
         \r\n\
         Hello from behind the NAT.\r\n"
    )
}

/// Header fields of a message: (name, raw bytes with folding and CRLF), and the offset of the
/// blank line. Written independently of the server's parser.
fn fields(data: &[u8]) -> (Vec<(String, String)>, usize) {
    let text = String::from_utf8_lossy(data);
    let mut out: Vec<(String, String)> = Vec::new();
    let mut pos = 0;
    for line in text.split_inclusive("\r\n") {
        if line == "\r\n" {
            break;
        }
        if line.starts_with([' ', '\t']) {
            out.last_mut().expect("continuation first").1.push_str(line);
        } else {
            // `Name : value` (obsolete syntax) is the field `Name`.
            let name = line.split(':').next().unwrap().trim_end().to_owned();
            out.push((name, line.to_owned()));
        }
        pos += line.len();
    }
    (out, pos)
}

/// All fields called `name` (case-insensitive), raw.
fn all(data: &[u8], name: &str) -> Vec<String> {
    fields(data)
        .0
        .into_iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, raw)| raw)
        .collect()
}

/// Unfolded, whitespace-split tokens of a raw field.
fn tokens(raw: &str) -> Vec<String> {
    raw.split_whitespace().map(str::to_owned).collect()
}

/// Asserts a Received field is ours: `by mx.test.example ... id <queue id>`.
fn assert_ours(received: &str, id: &str) {
    let t = tokens(received);
    let by = t.iter().position(|w| w == "by").expect("a by clause");
    assert_eq!(t[by + 1], HOSTNAME, "{received:?}");
    let at = t.iter().position(|w| w == "id").expect("an id clause");
    assert_eq!(t[at + 1].trim_end_matches(';'), id, "{received:?}");
}

/// The relayed message carrying this subject, waiting for `n` arrivals in all.
async fn relayed(sink: &Sink, n: usize, subject: &str) -> Captured {
    let got = sink.wait_for(n, 20).await;
    assert!(got.len() >= n, "only {} of {n} messages relayed", got.len());
    let needle = format!("\r\nSubject: {subject}\r\n");
    got.into_iter()
        .find(|m| m.text().contains(&needle))
        .unwrap_or_else(|| panic!("no relayed message with subject {subject}"))
}

fn assert_no_client_address(m: &Captured) {
    let text = m.text();
    for ip in [CLIENT, OUTSIDE, EHLO_IP, "192.168.19"] {
        assert!(!text.contains(ip), "{ip} leaked:\n{text}");
    }
}

/// Runs `submitd --config <config> trace ID`; (success, stdout, stderr).
fn trace(server: &TestServer, id: &str) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_submitd"))
        .arg("--config")
        .arg(&server.config_path)
        .args(["trace", id])
        .env_remove("SUBMITD_CONFIG")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hide_ip_is_the_default_and_trace_finds_the_client() {
    let sink = Sink::start().await;
    let server = TestServer::start_with(&sink.relay_config("")).await;
    server.add_user(USER).await;

    let id = submit_from(&server, CLIENT, &tracked_message("hidden")).await;
    let m = relayed(&sink, 1, "hidden").await;
    assert_eq!(m.rcpt_to, [RCPT]);
    assert_no_client_address(&m);
    let received = all(&m.data, "Received");
    assert_eq!(received.len(), 1, "{received:?}");
    assert_ours(&received[0], &id);
    assert!(!received[0].contains("from"), "{received:?}");
    assert!(all(&m.data, "X-Originating-IP").is_empty());
    // Our Received header is the first line of the message.
    assert!(m.text().starts_with("Received: by mx.test.example "));

    // The abuse desk quotes the id from the Received header and gets the client back.
    let (ok, stdout, stderr) = tokio::task::block_in_place(|| trace(&server, &id));
    assert!(ok, "trace failed: {stderr}");
    assert!(stdout.contains(&id), "{stdout}");
    let line = |label: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(label))
            .map(|l| l[label.len()..].trim().to_owned())
            .unwrap_or_else(|| panic!("no {label} line in {stdout}"))
    };
    assert_eq!(line("user:"), USER);
    assert_eq!(line("client:"), CLIENT);
    assert!(line("ehlo:").contains(EHLO_IP), "{stdout}");
    // Case does not matter to the operator; an unknown id is an error.
    let (ok, stdout, _) = tokio::task::block_in_place(|| trace(&server, &id.to_lowercase()));
    assert!(ok && stdout.contains(CLIENT), "{stdout}");
    let (ok, _, stderr) = tokio::task::block_in_place(|| trace(&server, "0000000000NOSUCHID"));
    assert!(!ok);
    assert!(stderr.contains("no trace record"), "{stderr}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_adds_no_received_header() {
    let sink = Sink::start().await;
    let extra = format!(
        "{}\n[privacy]\nreceived = \"strip\"\n",
        sink.relay_config("")
    );
    let server = TestServer::start_with(&extra).await;
    server.add_user(USER).await;

    submit_from(&server, CLIENT, &tracked_message("stripped")).await;
    let m = relayed(&sink, 1, "stripped").await;
    assert_no_client_address(&m);
    assert!(all(&m.data, "Received").is_empty(), "{}", m.text());
    assert!(all(&m.data, "X-Originating-IP").is_empty());
    assert!(m.text().starts_with("From: Alice <alice@example.org>\r\n"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_writes_the_standard_trace_line() {
    let sink = Sink::start().await;
    let extra = format!(
        "{}\n[privacy]\nreceived = \"keep\"\n",
        sink.relay_config("")
    );
    let server = TestServer::start_with(&extra).await;
    server.add_user(USER).await;

    let id = submit_from(&server, CLIENT, &tracked_message("kept")).await;
    let m = relayed(&sink, 1, "kept").await;
    let received = all(&m.data, "Received");
    assert_eq!(received.len(), 2, "ours and the client's: {received:?}");
    let ours = &received[0];
    assert!(
        ours.starts_with(&format!("Received: from [{EHLO_IP}] ([{CLIENT}])")),
        "{ours:?}"
    );
    assert_ours(ours, &id);
    assert!(m.text().starts_with(ours.as_str()));
    // keep leaves the client's own trace alone.
    assert!(received[1].starts_with(&format!("Received: from [{EHLO_IP}] (laptop.lan")));
    assert_eq!(all(&m.data, "X-Originating-IP").len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_policy_and_user_override() {
    let sink = Sink::start().await;
    let extra = format!(
        "{}\n[[privacy.networks]]\ncidr = \"127.0.0.0/24\"\nreceived = \"keep\"\n",
        sink.relay_config("")
    );
    let server = TestServer::start_with(&extra).await;
    server.add_user(USER).await;

    // Inside the network: keep.
    let inside = submit_from(&server, CLIENT, &tracked_message("inside")).await;
    // Outside it: the default, hide-ip.
    let outside = submit_from(&server, OUTSIDE, &tracked_message("outside")).await;
    // The user's own setting beats the network.
    server
        .store
        .set_received_policy(USER, Some(ReceivedPolicy::Strip))
        .await
        .unwrap();
    submit_from(&server, CLIENT, &tracked_message("override")).await;

    let m = relayed(&sink, 3, "inside").await;
    let received = all(&m.data, "Received");
    assert!(
        received[0].starts_with(&format!("Received: from [{EHLO_IP}] ([{CLIENT}])")),
        "{received:?}"
    );
    assert_ours(&received[0], &inside);

    let m = relayed(&sink, 3, "outside").await;
    assert_no_client_address(&m);
    let received = all(&m.data, "Received");
    assert_eq!(received.len(), 1, "{received:?}");
    assert_ours(&received[0], &outside);

    let m = relayed(&sink, 3, "override").await;
    assert_no_client_address(&m);
    assert!(all(&m.data, "Received").is_empty(), "{}", m.text());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_rewrite_is_minimal_and_byte_exact() {
    let sink = Sink::start().await;
    let extra = format!(
        "{}\n[privacy]\nremove_headers = [\"User-Agent\"]\n",
        sink.relay_config("")
    );
    let server = TestServer::start_with(&extra).await;
    server.add_user(USER).await;

    // Odd folding, odd case, odd spacing; (field, removed?).
    let odd: &[(&str, bool)] = &[
        (
            "Received: from [192.168.19.77] by laptop\r\n\twith SMTP; Fri, 4 Dec 2026 09:59:00 +0000\r\n",
            true,
        ),
        ("fROM:   \"Alice  Liddell\"   <alice@example.org>\r\n", false),
        ("to: bob@example.net,\r\n    carol@example.net\r\n", false),
        ("user-agent: Foo/1.0\r\n\t(folded)\r\n", true),
        ("X-Originating-IP: [192.168.19.77]\r\n", true),
        ("SUBJECT:  Odd   Case\r\n\t  folded   twice\r\n\t and again \r\n", false),
        ("X-Custom:no-space\r\n", false),
        ("message-id:   <odd.1@client.example>\r\n", false),
        ("DATE: Fri, 4 Dec 2026 10:00:00 +0000\r\n", false),
        ("X-Empty:\r\n", false),
        ("X-Forwarded-For: 192.168.19.77\r\n", true),
        ("User-Agent: Second/2.0\r\n", true),
        ("MIME-Version:1.0\r\n", false),
    ];
    let body = "\r\nbody line\r\n  indented   line  \r\n";
    let message: String = odd.iter().map(|(f, _)| *f).collect::<String>() + body;
    let expected: String = odd
        .iter()
        .filter(|(_, removed)| !removed)
        .map(|(f, _)| *f)
        .collect::<String>()
        + body;
    let id = submit_from(&server, CLIENT, &message).await;

    // Missing Message-ID and Date are added, twice to see the Message-IDs differ.
    let bare = "From: alice@example.org\r\nTo: bob@example.net\r\nSubject: bare\r\nUser-Agent: X\r\n\r\nbare body\r\n";
    submit_from(&server, CLIENT, bare).await;
    let bare2 = bare.replace("Subject: bare", "Subject: bare2");
    submit_from(&server, CLIENT, &bare2).await;

    let got = sink.wait_for(3, 20).await;
    assert_eq!(got.len(), 3);
    let m = got
        .iter()
        .find(|m| m.text().contains("folded   twice"))
        .expect("the odd message");
    let (f, _) = fields(&m.data);
    let ours = &f[0].1;
    assert!(ours.starts_with("Received: by "), "{ours:?}");
    assert_ours(ours, &id);
    // Everything after our Received header is the submission minus the removed lines, byte
    // for byte; nothing was added since Message-ID and Date were present (in odd case).
    assert_eq!(
        String::from_utf8_lossy(&m.data[ours.len()..]),
        expected,
        "relayed:\n{}",
        m.text()
    );

    let mut message_ids = Vec::new();
    for subject in ["bare", "bare2"] {
        let m = relayed(&sink, 3, subject).await;
        assert!(all(&m.data, "User-Agent").is_empty());
        let ids = all(&m.data, "Message-ID");
        assert_eq!(ids.len(), 1, "{ids:?}");
        let mid = ids[0]
            .strip_prefix("Message-ID: <")
            .and_then(|s| s.strip_suffix(">\r\n"))
            .unwrap_or_else(|| panic!("{ids:?}"));
        let (local, domain) = mid.split_once('@').unwrap();
        assert_eq!(domain, HOSTNAME);
        assert!(local.len() >= 16, "{mid}");
        message_ids.push(mid.to_owned());
        let dates = all(&m.data, "Date");
        assert_eq!(dates.len(), 1, "{dates:?}");
        let t = tokens(&dates[0]);
        // `Date: Fri, 4 Dec 2026 15:47:53 +0000`
        assert_eq!(t.len(), 7, "{dates:?}");
        assert!(t[1].ends_with(','), "{dates:?}");
        assert_eq!(t[6], "+0000", "{dates:?}");
        // The submitted fields are kept in order and unchanged.
        let kept: Vec<String> = fields(&m.data)
            .0
            .into_iter()
            .filter(|(n, _)| !["Received", "Message-ID", "Date"].contains(&n.as_str()))
            .map(|(_, raw)| raw)
            .collect();
        assert_eq!(
            kept,
            [
                "From: alice@example.org\r\n".to_owned(),
                "To: bob@example.net\r\n".to_owned(),
                format!("Subject: {subject}\r\n"),
            ]
        );
        assert!(m.text().ends_with("\r\n\r\nbare body\r\n"), "{}", m.text());
    }
    assert_ne!(message_ids[0], message_ids[1]);
    server.stop().await;
}

/// The relayed message containing `needle`, waiting for `n` arrivals in all.
async fn relayed_containing(sink: &Sink, n: usize, needle: &str) -> Captured {
    let got = sink.wait_for(n, 20).await;
    assert!(got.len() >= n, "only {} of {n} messages relayed", got.len());
    got.into_iter()
        .find(|m| m.text().contains(needle))
        .unwrap_or_else(|| panic!("no relayed message with {needle:?}"))
}

/// The header section as every reader sees it: up to the first blank line.
fn head(m: &Captured) -> String {
    let text = m.text();
    text.split("\r\n\r\n").next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_header_section_cannot_smuggle_fields() {
    let sink = Sink::start().await;
    let server = TestServer::start_with(&sink.relay_config("")).await;
    server.add_user(USER).await;

    // Obsolete `Name : value` fields (RFC 5322 §4.5) are fields: scrubbed, and a present
    // Message-ID is not added a second time.
    let obsolete = format!(
        "From: Alice <{USER}>\r\nSubject : old style\r\nX-Originating-IP : [{EHLO_IP}]\r\n\
         Message-ID : <obs@client.example>\r\nDate: Fri, 4 Dec 2026 10:00:00 +0000\r\n\r\nmarker-obsolete\r\n"
    );
    submit_from(&server, CLIENT, &obsolete).await;
    // A line that is no field ends the header section, for us and for every later reader:
    // what follows it must not arrive as header fields (a trace field, a second From).
    let no_separator = format!(
        "From: Alice <{USER}>\r\nSubject: no separator\r\nthis line is no field\r\n\
         X-Originating-IP: [{EHLO_IP}]\r\nFrom: mallory@evil.example\r\n\r\nmarker-nosep\r\n"
    );
    submit_from(&server, CLIENT, &no_separator).await;
    // A second From in the obsolete form is a second From.
    let reply = submit_reply(
        &server,
        CLIENT,
        &format!("From: {USER}\r\nFrom : mallory@evil.example\r\nSubject: two\r\n\r\nb\r\n"),
    )
    .await;
    assert!(reply.starts_with("550 5.6.0"), "{reply}");

    let m = relayed_containing(&sink, 2, "marker-obsolete").await;
    assert_no_client_address(&m);
    assert_eq!(all(&m.data, "Message-ID").len(), 1, "{}", m.text());
    assert_eq!(all(&m.data, "Date").len(), 1, "{}", m.text());
    assert_eq!(all(&m.data, "Received").len(), 1, "{}", m.text());
    assert!(m.text().contains("\r\nSubject : old style\r\n"));

    let m = relayed_containing(&sink, 2, "marker-nosep").await;
    let h = head(&m);
    assert!(!h.contains(EHLO_IP), "{}", m.text());
    assert!(!h.contains("mallory"), "{}", m.text());
    assert!(h.contains("\r\nSubject: no separator\r\n"), "{}", m.text());
    let body = &m.text()[h.len() + 4..];
    assert!(
        body.starts_with("this line is no field\r\n"),
        "{}",
        m.text()
    );
    assert_eq!(sink.messages().len(), 2, "the refused message was relayed");
    server.stop().await;
}
