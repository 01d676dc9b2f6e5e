//! Test harness: a real submitd on port-0 listeners with a temp SQLite database and spool,
//! and a line-level SMTP client over real TCP and TLS.
#![allow(dead_code)]

pub mod daemon;
pub mod postgres;
pub mod sink;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use submitd::config::Config;
use submitd::server::{self, Controls, Listeners, ServerError};
use submitd::store::Store;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

pub const HOSTNAME: &str = "mx.test.example";
pub const PASSWORD: &str = "correct horse battery staple";

/// A running server and everything it was started with.
pub struct TestServer {
    pub submission: SocketAddr,
    pub submissions: SocketAddr,
    pub dir: TempDir,
    pub config_path: PathBuf,
    pub config: Config,
    pub store: Store,
    pub cert_pem: Vec<u8>,
    /// The Prometheus endpoint.
    pub metrics: SocketAddr,
    shutdown: CancellationToken,
    reload: Arc<tokio::sync::Notify>,
    handle: Option<JoinHandle<Result<(), ServerError>>>,
}

/// The config text every test server starts from; `extra` is appended (sections only).
pub fn base_config(dir: &Path, extra: &str) -> String {
    tuned_config(dir, &Tuning::default(), extra)
}

/// Keys added inside the base config's own `[auth]` and `[timeouts]` sections, one
/// `key = value` per line (not `failure_delay` or `shutdown_grace`, which the base sets).
#[derive(Debug, Default, Clone, Copy)]
pub struct Tuning<'a> {
    pub auth: &'a str,
    pub timeouts: &'a str,
    /// Database URL instead of the temp SQLite file (empty: SQLite).
    pub database: &'a str,
    /// Node name instead of "test" (empty: "test").
    pub node: &'a str,
}

/// The base config with `tuning` inside its sections and `extra` appended (sections only).
pub fn tuned_config(dir: &Path, tuning: &Tuning<'_>, extra: &str) -> String {
    let Tuning {
        auth,
        timeouts,
        database,
        node,
    } = tuning;
    let node = if node.is_empty() { "test" } else { node };
    let database = if database.is_empty() {
        format!("sqlite://{}/data/submitd.db", dir.display())
    } else {
        database.to_string()
    };
    format!(
        r#"hostname = "{HOSTNAME}"
node = "{node}"

[listen]
submission = ["127.0.0.1:0"]
submissions = ["127.0.0.1:0"]

[tls]
cert = "{dir}/certs/fullchain.pem"
key = "{dir}/certs/privkey.pem"

[database]
url = "{database}"

[queue]
dir = "{dir}/data/queue"
first_retry = "1s"
max_retry = "2s"
max_age = "1h"
workers = 2

[auth]
failure_delay = "0s"
{auth}

[timeouts]
shutdown_grace = "5s"
{timeouts}
{extra}
"#,
        dir = dir.display()
    )
}

impl TestServer {
    /// Starts a server with the base config.
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// Starts a server with extra config sections appended.
    pub async fn start_with(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, extra).await
    }

    /// Starts a server with keys added to the base `[auth]`/`[timeouts]` sections and extra
    /// sections appended.
    pub async fn start_tuned(tuning: Tuning<'_>, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in_tuned(dir, tuning, extra).await
    }

    /// Starts a server in an existing directory (to restart over the same spool and database).
    pub async fn start_in(dir: TempDir, extra: &str) -> Self {
        Self::start_in_tuned(dir, Tuning::default(), extra).await
    }

    /// [`TestServer::start_in`] with [`Tuning`].
    pub async fn start_in_tuned(dir: TempDir, tuning: Tuning<'_>, extra: &str) -> Self {
        let certs = dir.path().join("certs");
        if !certs.join("fullchain.pem").exists() {
            submitd::tls::write_self_signed(HOSTNAME, &certs).unwrap();
        }
        let text = tuned_config(dir.path(), &tuning, extra);
        let config_path = dir.path().join("submitd.toml");
        std::fs::write(&config_path, &text).unwrap();
        let config = Config::from_toml(&text).unwrap();
        let store = Store::open(&config.database.url).await.unwrap();
        let submission = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let submissions = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addrs = (
            submission.local_addr().unwrap(),
            submissions.local_addr().unwrap(),
        );
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_addr = metrics.local_addr().unwrap();
        let listeners = Listeners {
            submission: vec![submission],
            submissions: vec![submissions],
            metrics: Some(metrics),
        };
        let controls = Controls {
            config_path: Some(config_path.clone()),
            ..Controls::default()
        };
        let shutdown = controls.shutdown.clone();
        let reload = Arc::clone(&controls.reload);
        let handle = tokio::spawn(server::run(config.clone(), listeners, controls));
        let cert_pem = std::fs::read(certs.join("fullchain.pem")).unwrap();
        Self {
            submission: addrs.0,
            submissions: addrs.1,
            dir,
            config_path,
            config,
            store,
            cert_pem,
            metrics: metrics_addr,
            shutdown,
            reload,
            handle: Some(handle),
        }
    }

    /// Asks the server to reload its config file, as SIGHUP does.
    pub fn reload(&self) {
        self.reload.notify_one();
    }

    /// Fetches the Prometheus metrics text.
    pub async fn scrape(&self) -> String {
        let mut stream = TcpStream::connect(self.metrics).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        response
    }

    /// Adds a user with [`PASSWORD`].
    pub async fn add_user(&self, email: &str) {
        let hash = submitd::auth::hash_password(PASSWORD).unwrap();
        self.store.add_user(email, &hash).await.unwrap();
    }

    /// The spool directory.
    pub fn queue_dir(&self) -> PathBuf {
        self.config.queue.dir.clone()
    }

    /// Names of the committed queue entries.
    pub fn queued_ids(&self) -> Vec<String> {
        queued_ids_in(&self.queue_dir())
    }

    /// Stops the server gracefully and returns its directory (for a restart).
    pub async fn stop(mut self) -> TempDir {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(20), h)
                .await
                .expect("server stops")
                .unwrap()
                .unwrap();
        }
        self.store.close().await;
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    /// Aborts the server task without any shutdown (the closest a test gets to kill -9).
    pub async fn kill(mut self) -> TempDir {
        if let Some(h) = self.handle.take() {
            h.abort();
            let _ = h.await;
        }
        self.store.close().await;
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    /// A plaintext client on the submission port (587 style).
    pub async fn client(&self) -> Client {
        Client::connect(self.submission, &self.cert_pem).await
    }

    /// A client that did EHLO, STARTTLS, EHLO and AUTH as `user`.
    pub async fn authenticated(&self, user: &str) -> Client {
        let mut c = self.client().await;
        c.expect("220").await;
        c.cmd("EHLO client.example", "250").await;
        c.starttls().await;
        c.cmd("EHLO client.example", "250").await;
        c.auth_plain(user, PASSWORD, "235 2.7.0").await;
        c
    }

    /// A client on the implicit-TLS port, greeted.
    pub async fn tls_client(&self) -> Client {
        let mut c = Client::connect_tls(self.submissions, &self.cert_pem).await;
        c.expect("220").await;
        c
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The client side of a TLS stream or a plain one.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Upgrading,
}

/// One reply as the client saw it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// The reply as on the wire, lines joined with `\n`.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

/// A line-level SMTP client for transcripts.
pub struct Client {
    stream: Stream,
    buf: Vec<u8>,
    cert_pem: Vec<u8>,
}

pub fn tls_connector(cert_pem: &[u8]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(cert_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

impl Client {
    pub async fn connect(addr: SocketAddr, cert_pem: &[u8]) -> Self {
        let tcp = TcpStream::connect(addr).await.unwrap();
        Self {
            stream: Stream::Plain(tcp),
            buf: Vec::new(),
            cert_pem: cert_pem.to_vec(),
        }
    }

    /// Connects from a chosen loopback source address (127.0.0.0/8 all works on Linux).
    pub async fn connect_from(source: &str, addr: SocketAddr, cert_pem: &[u8]) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let tcp = socket.connect(addr).await.unwrap();
        Self {
            stream: Stream::Plain(tcp),
            buf: Vec::new(),
            cert_pem: cert_pem.to_vec(),
        }
    }

    pub async fn connect_tls(addr: SocketAddr, cert_pem: &[u8]) -> Self {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = tls_connector(cert_pem)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        Self {
            stream: Stream::Tls(Box::new(tls)),
            buf: Vec::new(),
            cert_pem: cert_pem.to_vec(),
        }
    }

    /// The server certificate (DER) of a TLS session.
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        match &self.stream {
            Stream::Tls(s) => s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec()),
            _ => None,
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        match &mut self.stream {
            Stream::Plain(s) => s.write_all(bytes).await.unwrap(),
            Stream::Tls(s) => {
                s.write_all(bytes).await.unwrap();
                s.flush().await.unwrap();
            }
            Stream::Upgrading => unreachable!(),
        }
    }

    /// Reads more bytes; 0 at end of stream.
    async fn fill(&mut self) -> usize {
        let mut tmp = [0u8; 16384];
        let n = match &mut self.stream {
            Stream::Plain(s) => s.read(&mut tmp).await.unwrap_or(0),
            Stream::Tls(s) => s.read(&mut tmp).await.unwrap_or(0),
            Stream::Upgrading => unreachable!(),
        };
        self.buf.extend_from_slice(&tmp[..n]);
        n
    }

    /// Reads one (possibly multi-line) reply; `None` if the server closed the connection.
    pub async fn try_reply(&mut self) -> Option<Reply> {
        let mut lines = Vec::new();
        loop {
            while let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..pos]).into_owned();
                self.buf.drain(..pos + 2);
                let last = line.as_bytes().get(3) != Some(&b'-');
                lines.push(line);
                if last {
                    let code = lines[0].get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
                    return Some(Reply { code, lines });
                }
            }
            let n = tokio::time::timeout(Duration::from_secs(30), self.fill())
                .await
                .expect("reply within 30s");
            if n == 0 {
                return None;
            }
        }
    }

    pub async fn reply(&mut self) -> Reply {
        self.try_reply()
            .await
            .expect("a reply, not a closed connection")
    }

    /// Reads a reply and asserts its last line starts with `prefix` (e.g. `"530 5.7.0"`).
    pub async fn expect(&mut self, prefix: &str) -> Reply {
        let r = self.reply().await;
        let last = r.lines.last().cloned().unwrap_or_default();
        assert!(
            last.starts_with(prefix),
            "expected {prefix:?}, got {:?}",
            r.lines
        );
        r
    }

    /// Sends a command line (CRLF added) and asserts the reply prefix.
    pub async fn cmd(&mut self, line: &str, prefix: &str) -> Reply {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.expect(prefix).await
    }

    /// True once the server has closed the connection (reads to end of stream).
    pub async fn is_closed(&mut self) -> bool {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if self.fill().await == 0 {
                    return true;
                }
            }
        })
        .await
        .unwrap_or(false)
    }

    /// STARTTLS and the handshake (certificate verified against the test certificate).
    pub async fn starttls(&mut self) {
        self.cmd("STARTTLS", "220 2.0.0").await;
        self.upgrade_tls().await;
    }

    /// The client side of the TLS handshake on a plain stream whose 220 has been read.
    pub async fn upgrade_tls(&mut self) {
        assert!(self.buf.is_empty(), "no bytes after the 220");
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Upgrading) else {
            panic!("already TLS");
        };
        let tls = tls_connector(&self.cert_pem)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        self.stream = Stream::Tls(Box::new(tls));
    }

    /// AUTH PLAIN with an initial response.
    pub async fn auth_plain(&mut self, user: &str, password: &str, prefix: &str) -> Reply {
        self.cmd(&format!("AUTH PLAIN {}", plain(user, password)), prefix)
            .await
    }

    /// MAIL, RCPT for each recipient, DATA, the message (dot-stuffed here), final dot.
    pub async fn send_message(&mut self, from: &str, to: &[&str], message: &str) -> Reply {
        self.cmd(&format!("MAIL FROM:<{from}>"), "250").await;
        for rcpt in to {
            self.cmd(&format!("RCPT TO:<{rcpt}>"), "250").await;
        }
        self.cmd("DATA", "354").await;
        self.send(&dot_stuff(message.as_bytes())).await;
        self.send(b".\r\n").await;
        self.reply().await
    }
}

/// Ids of the committed messages in a spool directory, sorted (read with the library's own
/// spool reader, so tests do not depend on the file layout).
pub fn queued_ids_in(queue_dir: &Path) -> Vec<String> {
    let spool = submitd::queue::Spool::open(queue_dir).expect("spool opens");
    let (entries, errors) = spool.entries().expect("spool lists");
    assert!(errors.is_empty(), "unreadable queue entries: {errors:?}");
    let mut ids: Vec<String> = entries.iter().map(|e| e.id.to_string()).collect();
    ids.sort();
    ids
}

/// A queued message's envelope as JSON; `None` once it has left the queue (any other spool
/// error fails the test).
pub fn queued_entry(queue_dir: &Path, id: &str) -> Option<serde_json::Value> {
    let spool = submitd::queue::Spool::open(queue_dir).expect("spool opens");
    let id = submitd::message::QueueId::parse(id).expect("a queue id");
    match spool.read_entry(&id) {
        Ok(entry) => Some(serde_json::to_value(entry).expect("an entry is JSON")),
        Err(submitd::queue::SpoolError::NotFound(_)) => None,
        Err(e) => panic!("reading the entry of {id}: {e}"),
    }
}

/// A queued message's bytes; `None` once it has left the queue (any other spool error fails
/// the test).
pub fn queued_message(queue_dir: &Path, id: &str) -> Option<Vec<u8>> {
    let spool = submitd::queue::Spool::open(queue_dir).expect("spool opens");
    let id = submitd::message::QueueId::parse(id).expect("a queue id");
    match spool.read_message(&id) {
        Ok(bytes) => Some(bytes),
        Err(submitd::queue::SpoolError::NotFound(_)) => None,
        Err(e) => panic!("reading the message {id}: {e}"),
    }
}

/// base64(`\0user\0password`).
pub fn plain(user: &str, password: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}

/// Dot-stuffs a message that ends in CRLF.
pub fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 16);
    let mut line_start = true;
    for &b in message {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    out
}

/// A minimal message from `from` to `to`.
pub fn simple_message(from: &str, to: &str, subject: &str) -> String {
    format!("From: {from}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@client.example>\r\nDate: Fri, 4 Dec 2026 10:00:00 +0000\r\n\r\nHello.\r\n")
}

/// Waits until `f` is true, checking every 50 ms, for at most `secs` seconds.
pub async fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}
