//! Issue 5: DKIM signatures checked by an independent implementation, Python's dkimpy, with
//! the DNS records `submitd dkim generate` prints; and the key-handling CLI around it.
//!
//! Needs `python3` with `pip install dkimpy pynacl` (pynacl for Ed25519).
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::sink::{Captured, Sink};
use common::*;

const DOMAIN: &str = "example.org";
const USER: &str = "alice@example.org";
const RCPT: &str = "bob@example.net";

/// A key made by `submitd dkim generate`, with the record it printed.
struct Key {
    path: PathBuf,
    selector: String,
    /// The printed line, `s1._domainkey.example.org. IN TXT "..." "..."`.
    line: String,
    /// The TXT value: the quoted strings concatenated.
    txt: String,
}

impl Key {
    /// `(owner name, TXT value)` for the fake DNS.
    fn record(&self) -> (String, String) {
        (
            format!("{}._domainkey.{DOMAIN}.", self.selector),
            self.txt.clone(),
        )
    }

    /// A `[[dkim]]` table for this key.
    fn config(&self) -> String {
        format!(
            "\n[[dkim]]\ndomain = \"{DOMAIN}\"\nselector = \"{}\"\nkey = \"{}\"\n",
            self.selector,
            self.path.display()
        )
    }
}

fn submitd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_submitd"))
        .args(args)
        .env_remove("SUBMITD_CONFIG")
        .output()
        .unwrap()
}

/// The record line for `selector` in submitd's output, and its TXT value.
fn parse_record(stdout: &str, selector: &str) -> (String, String) {
    let prefix = format!("{selector}._domainkey.{DOMAIN}. IN TXT ");
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in {stdout}"))
        .to_owned();
    let quoted = &line[prefix.len()..];
    let strings: Vec<&str> = quoted.split('"').skip(1).step_by(2).collect();
    assert!(!strings.is_empty(), "{line}");
    for s in &strings {
        assert!(s.len() <= 255, "TXT strings are at most 255 octets: {line}");
    }
    assert_eq!(
        quoted.matches('"').count(),
        strings.len() * 2,
        "unbalanced quotes: {line}"
    );
    (line.clone(), strings.concat())
}

/// Runs `submitd dkim generate` for example.org.
fn generate(dir: &Path, selector: &str, algorithm: &str) -> Key {
    let path = dir.join(format!("keys/{selector}.pem"));
    let out = submitd(&[
        "dkim",
        "generate",
        "--domain",
        DOMAIN,
        "--selector",
        selector,
        "--algorithm",
        algorithm,
        "--out",
        path.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dkim generate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (line, txt) = parse_record(&stdout, selector);
    assert!(
        txt.starts_with(&format!("v=DKIM1; k={algorithm}; p=")),
        "{txt}"
    );
    Key {
        path,
        selector: selector.to_owned(),
        line,
        txt,
    }
}

/// Verifies every DKIM-Signature of each message with dkimpy, resolving keys only from the
/// records given with that message. Input on stdin: `[{"message": base64, "records": {name:
/// txt}}]`; output: one list of verdicts per message. One interpreter for all messages, since
/// starting Python and importing dkimpy costs more than the verification.
const VERIFY_PY: &str = r#"
import base64, json, logging, sys
import dkim

logging.basicConfig(stream=sys.stderr, level=logging.INFO)
log = logging.getLogger("dkimpy")

def verify(message, records):
    def dnsfunc(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        value = records.get(name)
        return None if value is None else value.encode()
    try:
        headers = dkim.DKIM(message).headers
    except Exception as e:
        # Not even parsable: one failed verdict that says why.
        return [{"ok": False, "error": repr(e), "keysize": None,
                 "a": "", "d": "", "s": "", "h": "", "c": ""}]
    count = len([1 for k, _ in headers if k.lower() == b"dkim-signature"])
    out = []
    for idx in range(count):
        d = dkim.DKIM(message, logger=log)
        try:
            ok = bool(d.verify(idx=idx, dnsfunc=dnsfunc))
            error = None
        except Exception as e:
            ok, error = False, repr(e)
        fields = getattr(d, "signature_fields", None) or {}
        get = lambda t: fields.get(t, b"").decode()
        out.append({"ok": ok, "error": error, "keysize": getattr(d, "keysize", None),
                    "a": get(b"a"), "d": get(b"d"), "s": get(b"s"), "h": get(b"h"),
                    "c": get(b"c")})
    return out

cases = json.load(sys.stdin)
print(json.dumps([verify(base64.b64decode(c["message"]), c["records"]) for c in cases]))
"#;

#[derive(Debug)]
struct Verdict {
    ok: bool,
    keysize: Option<u64>,
    algorithm: String,
    domain: String,
    selector: String,
    /// The h= names, lowercased, in order.
    headers: Vec<String>,
    raw: serde_json::Value,
}

type Records = [(String, String)];

/// dkimpy's verdicts on every signature of every message.
fn dkimpy_all(cases: &[(&[u8], &Records)]) -> Vec<Vec<Verdict>> {
    use base64::Engine;
    let input: Vec<serde_json::Value> = cases
        .iter()
        .map(|(message, records)| {
            let map: serde_json::Map<String, serde_json::Value> = records
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            serde_json::json!({
                "message": base64::engine::general_purpose::STANDARD.encode(message),
                "records": map,
            })
        })
        .collect();
    let mut child = Command::new("python3")
        .args(["-c", VERIFY_PY])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (with `pip install dkimpy pynacl`) is needed");
    let stdin = serde_json::to_vec(&input).unwrap();
    child.stdin.take().unwrap().write_all(&stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "dkimpy failed (is `pip install dkimpy pynacl` done?): {stderr}"
    );
    let lists: Vec<Vec<serde_json::Value>> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(lists.len(), cases.len());
    lists
        .into_iter()
        .map(|list| {
            list.into_iter()
                .map(|v| {
                    let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
                    Verdict {
                        ok: v["ok"].as_bool().unwrap(),
                        keysize: v["keysize"].as_u64(),
                        algorithm: s("a"),
                        domain: s("d"),
                        selector: s("s"),
                        headers: s("h")
                            .split(':')
                            .map(|n| n.trim().to_ascii_lowercase())
                            .collect(),
                        raw: v,
                    }
                })
                .collect()
        })
        .collect()
}

/// dkimpy's verdicts on a relayed message and on altered copies of it that must all fail:
/// the body changed, a signed header changed, a second From added in transit (which only
/// over-signing catches).
fn dkimpy(m: &Captured, records: &Records) -> Vec<Verdict> {
    let text = m.text();
    let body_changed = text.replacen("Hello.", "Hellp.", 1);
    assert_ne!(body_changed, text, "the test message has a body to alter");
    let subject_changed = text.replacen("\r\nSubject: ", "\r\nSubject: Re: ", 1);
    assert_ne!(subject_changed, text);
    let from_added = format!("From: mallory@evil.example\r\n{text}");
    let mut all = dkimpy_all(&[
        (&m.data, records),
        (body_changed.as_bytes(), records),
        (subject_changed.as_bytes(), records),
        (from_added.as_bytes(), records),
    ]);
    for (what, verdicts) in ["altered body", "altered Subject", "added From"]
        .iter()
        .zip(&all[1..])
    {
        assert!(!verdicts.is_empty(), "{what}: no signature found");
        for v in verdicts {
            assert!(!v.ok, "{what} verified: {:?}", v.raw);
        }
    }
    let verdicts = all.swap_remove(0);
    for v in &verdicts {
        if !v.ok {
            eprintln!("dkimpy: {:?}", v.raw);
        }
    }
    verdicts
}

/// Header fields called `name` in a message (raw, folding included).
fn header_count(data: &[u8], name: &str) -> usize {
    let text = String::from_utf8_lossy(data);
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    head.split("\r\n")
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(n, _)| n.eq_ignore_ascii_case(name) && !n.starts_with([' ', '\t']))
        })
        .count()
}

/// The usual checks on one signature: verifies, example.org, From over-signed, no Received.
fn assert_good(v: &Verdict, algorithm: &str, selector: &str) {
    assert!(v.ok, "signature does not verify: {:?}", v.raw);
    assert_eq!(v.algorithm, algorithm);
    assert_eq!(v.domain, DOMAIN);
    assert_eq!(v.selector, selector);
    assert_eq!(v.raw["c"], "relaxed/relaxed");
    assert_eq!(
        v.headers.iter().filter(|h| *h == "from").count(),
        2,
        "From over-signed: {:?}",
        v.headers
    );
    assert!(
        !v.headers.iter().any(|h| h == "received"),
        "{:?}",
        v.headers
    );
}

async fn server_with(sink: &Sink, keys: &[&Key], extra: &str) -> TestServer {
    let mut config = sink.relay_config("");
    for k in keys {
        config.push_str(&k.config());
    }
    config.push_str(extra);
    let server = TestServer::start_with(&config).await;
    server.add_user(USER).await;
    server
}

async fn submit(server: &TestServer, user: &str, message: &str) {
    let mut c = server.authenticated(user).await;
    let r = c.send_message(user, &[RCPT], message).await;
    assert!(r.text().starts_with("250 2.0.0 Ok: queued as "), "{r:?}");
    c.cmd("QUIT", "221").await;
}

async fn one_relayed(sink: &Sink) -> Captured {
    let got = sink.wait_for(1, 20).await;
    assert_eq!(got.len(), 1, "the message was not relayed");
    got.into_iter().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_2048_signature_verifies() {
    let keys = tempfile::tempdir().unwrap();
    let rsa = generate(keys.path(), "s1", "rsa");
    let sink = Sink::start().await;
    let server = server_with(&sink, &[&rsa], "").await;
    submit(&server, USER, &simple_message(USER, RCPT, "rsa")).await;
    let m = one_relayed(&sink).await;
    assert_eq!(header_count(&m.data, "DKIM-Signature"), 1);
    assert!(m.text().starts_with("DKIM-Signature: "));

    let records = [rsa.record()];
    let v = tokio::task::block_in_place(|| dkimpy(&m, &records));
    assert_eq!(v.len(), 1);
    assert_good(&v[0], "rsa-sha256", "s1");
    assert_eq!(v[0].keysize, Some(2048));
    for h in ["to", "subject", "date", "message-id"] {
        assert!(
            v[0].headers.iter().any(|n| n == h),
            "{h}: {:?}",
            v[0].headers
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ed25519_signature_verifies() {
    let keys = tempfile::tempdir().unwrap();
    let ed = generate(keys.path(), "s1", "ed25519");
    let sink = Sink::start().await;
    let server = server_with(&sink, &[&ed], "").await;
    submit(&server, USER, &simple_message(USER, RCPT, "ed25519")).await;
    let m = one_relayed(&sink).await;
    assert_eq!(header_count(&m.data, "DKIM-Signature"), 1);

    let records = [ed.record()];
    let v = tokio::task::block_in_place(|| dkimpy(&m, &records));
    assert_eq!(v.len(), 1);
    assert_good(&v[0], "ed25519-sha256", "s1");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_signing_both_signatures_verify() {
    let keys = tempfile::tempdir().unwrap();
    let rsa = generate(keys.path(), "s1", "rsa");
    let ed = generate(keys.path(), "s2", "ed25519");
    let sink = Sink::start().await;
    let server = server_with(&sink, &[&rsa, &ed], "").await;
    submit(&server, USER, &simple_message(USER, RCPT, "dual")).await;
    let m = one_relayed(&sink).await;
    assert_eq!(header_count(&m.data, "DKIM-Signature"), 2);

    let records = [rsa.record(), ed.record()];
    let v = tokio::task::block_in_place(|| dkimpy(&m, &records));
    assert_eq!(v.len(), 2);
    let rsa_sig = v
        .iter()
        .find(|v| v.selector == "s1")
        .expect("an s1 signature");
    let ed_sig = v
        .iter()
        .find(|v| v.selector == "s2")
        .expect("an s2 signature");
    assert_good(rsa_sig, "rsa-sha256", "s1");
    assert_good(ed_sig, "ed25519-sha256", "s2");

    // Each signature is checked against its own key: with the s2 record missing, only the RSA
    // signature verifies.
    let v = tokio::task::block_in_place(|| dkimpy_all(&[(&m.data, &records[..1])])).remove(0);
    let ok: Vec<&str> = v
        .iter()
        .filter(|v| v.ok)
        .map(|v| v.selector.as_str())
        .collect();
    assert_eq!(ok, ["s1"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awkward_body_survives_signing_and_relay() {
    let keys = tempfile::tempdir().unwrap();
    let ed = generate(keys.path(), "s1", "ed25519");
    let rsa = generate(keys.path(), "s2", "rsa");
    let sink = Sink::start().await;
    let server = server_with(&sink, &[&ed, &rsa], "").await;

    let long_line = "x".repeat(990);
    // 989 octets of 8-bit text (ö is two octets).
    let long_words = "wörd ".repeat(165);
    let body = format!(
        "Hello.\r\n.leading dot\r\n..two dots\r\n.\r\n. dot space\r\n{long_line}\r\n{}\r\n\
         Grüße aus Köln — 日本語のテキスト — ünïcødé\r\n\
         trailing spaces   \r\n\ttab\t \r\n\r\n\r\n",
        long_words.trim_end()
    );
    assert_eq!(long_line.len(), 990);
    assert_eq!(long_words.trim_end().len(), 989);
    let message = format!(
        "From: Alice <{USER}>\r\nTo: {RCPT}\r\nSubject: awkward\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{body}"
    );
    let mut c = server.authenticated(USER).await;
    c.cmd(&format!("MAIL FROM:<{USER}> BODY=8BITMIME"), "250")
        .await;
    c.cmd(&format!("RCPT TO:<{RCPT}>"), "250").await;
    c.cmd("DATA", "354").await;
    c.send(&dot_stuff(message.as_bytes())).await;
    c.send(b".\r\n").await;
    c.expect("250 2.0.0 Ok: queued as ").await;
    c.cmd("QUIT", "221").await;

    let m = one_relayed(&sink).await;
    assert!(
        m.data.ends_with(format!("\r\n\r\n{body}").as_bytes()),
        "the body arrived changed:\n{}",
        m.text()
    );
    let records = [ed.record(), rsa.record()];
    let v = tokio::task::block_in_place(|| dkimpy(&m, &records));
    assert_eq!(v.len(), 2);
    for sig in &v {
        let a = if sig.selector == "s1" {
            "ed25519-sha256"
        } else {
            "rsa-sha256"
        };
        assert_good(sig, a, &sig.selector);
        for h in ["mime-version", "content-type", "content-transfer-encoding"] {
            assert!(sig.headers.iter().any(|n| n == h), "{h}: {:?}", sig.headers);
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privacy_rewritten_message_still_verifies() {
    let keys = tempfile::tempdir().unwrap();
    let ed = generate(keys.path(), "s1", "ed25519");
    let sink = Sink::start().await;
    // hide-ip is the default; be explicit, and remove one more header.
    let server = server_with(
        &sink,
        &[&ed],
        "\n[privacy]\nreceived = \"hide-ip\"\nremove_headers = [\"User-Agent\"]\n",
    )
    .await;
    // No Message-ID and no Date: both are added, and must be signed as added.
    let message = format!(
        "Received: from [192.168.19.77] by laptop\r\n\twith SMTP\r\nFrom: Alice <{USER}>\r\n\
         To: {RCPT}\r\nX-Originating-IP: [192.168.19.77]\r\nUser-Agent: Foo/1.0\r\n\
         Subject: rewritten\r\n\r\nHello.\r\n"
    );
    submit(&server, USER, &message).await;
    let m = one_relayed(&sink).await;
    assert_eq!(header_count(&m.data, "X-Originating-IP"), 0);
    assert_eq!(header_count(&m.data, "User-Agent"), 0);
    assert_eq!(header_count(&m.data, "Received"), 1);
    assert_eq!(header_count(&m.data, "Message-ID"), 1);
    assert_eq!(header_count(&m.data, "Date"), 1);
    assert!(!m.text().contains("192.168.19.77"));

    let records = [ed.record()];
    let v = tokio::task::block_in_place(|| dkimpy(&m, &records));
    assert_eq!(v.len(), 1);
    assert_good(&v[0], "ed25519-sha256", "s1");
    for h in ["message-id", "date", "subject", "to"] {
        assert!(
            v[0].headers.iter().any(|n| n == h),
            "{h}: {:?}",
            v[0].headers
        );
    }
    for h in ["x-originating-ip", "user-agent"] {
        assert!(
            !v[0].headers.iter().any(|n| n == h),
            "{h}: {:?}",
            v[0].headers
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_section_without_blank_line_verifies() {
    let keys = tempfile::tempdir().unwrap();
    let ed = generate(keys.path(), "s1", "ed25519");
    let sink = Sink::start().await;
    let server = server_with(&sink, &[&ed], "").await;
    // The header section ends at a line that is no field, with no blank line before it: the
    // signer, the verifier and the recipient must all split the message in the same place.
    let message = format!(
        "From: Alice <{USER}>\r\nTo: {RCPT}\r\nSubject: no separator\r\n\
         Hello. This line is no field\r\nX-Not-A-Field: body text\r\n"
    );
    submit(&server, USER, &message).await;
    let m = one_relayed(&sink).await;
    let records = [ed.record()];
    let v = tokio::task::block_in_place(|| dkimpy(&m, &records));
    assert_eq!(v.len(), 1);
    assert_good(&v[0], "ed25519-sha256", "s1");
    assert!(
        m.text()
            .ends_with("\r\n\r\nHello. This line is no field\r\nX-Not-A-Field: body text\r\n"),
        "{}",
        m.text()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_domain_without_a_key_is_not_signed() {
    let keys = tempfile::tempdir().unwrap();
    let ed = generate(keys.path(), "s1", "ed25519");
    let sink = Sink::start().await;
    let server = server_with(&sink, &[&ed], "").await;
    server.add_user("bob@example.net").await;

    submit(
        &server,
        "bob@example.net",
        &simple_message("bob@example.net", RCPT, "nokey"),
    )
    .await;
    submit(&server, USER, &simple_message(USER, RCPT, "withkey")).await;
    let got = sink.wait_for(2, 20).await;
    assert_eq!(got.len(), 2);
    let by_subject = |s: &str| {
        got.iter()
            .find(|m| m.text().contains(&format!("\r\nSubject: {s}\r\n")))
            .unwrap_or_else(|| panic!("no message {s}"))
    };
    assert_eq!(header_count(&by_subject("nokey").data, "DKIM-Signature"), 0);
    assert_eq!(
        header_count(&by_subject("withkey").data, "DKIM-Signature"),
        1
    );
    server.stop().await;
}

#[test]
fn generate_refuses_to_overwrite_writes_0600_and_dns_reprints() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    for (selector, algorithm) in [("s1", "ed25519"), ("s2", "rsa")] {
        let key = generate(dir.path(), selector, algorithm);
        let meta = std::fs::metadata(&key.path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{algorithm}");
        let pem = std::fs::read(&key.path).unwrap();

        let again = submitd(&[
            "dkim",
            "generate",
            "--domain",
            DOMAIN,
            "--selector",
            selector,
            "--algorithm",
            algorithm,
            "--out",
            key.path.to_str().unwrap(),
        ]);
        assert!(!again.status.success());
        let stderr = String::from_utf8_lossy(&again.stderr);
        assert!(
            stderr.contains("exists") && stderr.contains(key.path.to_str().unwrap()),
            "{stderr}"
        );
        assert_eq!(std::fs::read(&key.path).unwrap(), pem, "key overwritten");

        let dns = submitd(&[
            "dkim",
            "dns",
            "--key",
            key.path.to_str().unwrap(),
            "--domain",
            DOMAIN,
            "--selector",
            selector,
        ]);
        assert!(dns.status.success());
        let (line, txt) = parse_record(&String::from_utf8_lossy(&dns.stdout), selector);
        assert_eq!(line, key.line);
        assert_eq!(txt, key.txt);
    }
}

/// A 1024-bit RSA key (PKCS#8 PEM), written with mode 0600.
fn weak_key(path: &Path) {
    use rsa::pkcs8::{EncodePrivateKey, LineEnding};
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap();
    let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap();
    submitd::tls::write_private(path, pem.as_bytes()).unwrap();
}

#[tokio::test]
async fn weak_rsa_key_stops_the_server_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    submitd::tls::write_self_signed(HOSTNAME, &dir.path().join("certs")).unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    let weak = dir.path().join("weak-1024.pem");
    weak_key(&weak);
    let text = base_config(
        dir.path(),
        &format!(
            "[[dkim]]\ndomain = \"{DOMAIN}\"\nselector = \"s1\"\nkey = \"{}\"\n",
            weak.display()
        ),
    );

    // In process: server::run returns the error instead of serving.
    let config = submitd::config::Config::from_toml(&text).unwrap();
    let run = submitd::server::run(
        config,
        submitd::server::Listeners::default(),
        submitd::server::Controls::default(),
    );
    let err = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the server refuses to start instead of running")
        .expect_err("a 1024-bit key is refused");
    let msg = err.to_string();
    assert!(msg.contains(weak.to_str().unwrap()), "{msg}");
    assert!(msg.contains("1024"), "{msg}");

    // The binary: `serve` exits non-zero and says which file.
    let config_path = dir.path().join("submitd.toml");
    std::fs::write(&config_path, &text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_submitd"))
        .arg("--config")
        .arg(&config_path)
        .arg("serve")
        .env_remove("SUBMITD_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("submitd serve kept running with a 1024-bit key");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains(weak.to_str().unwrap()), "{stderr}");
    assert!(stderr.contains("1024"), "{stderr}");
}
