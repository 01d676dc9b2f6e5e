//! A real SMTP submission load generator, for comparing submitd with other MSAs.
//!
//! Every session is what a mail client does: TCP, TLS (STARTTLS on a 587-style port or
//! implicit TLS on a 465-style port), EHLO, AUTH PLAIN, then MAIL/RCPT/DATA with a
//! dot-stuffed body, `--per-connection` messages per session (the next MAIL right after the
//! 250, no RSET), QUIT. Every reply code is checked; a wrong one fails that message and the
//! session, and each distinct failure (stage and code) is logged once to stderr.
//!
//! With `--sink ADDR` it also runs a counting SMTP server on ADDR (point the MSA's smart host
//! there) and waits, up to `--drain-timeout`, until the sink has received as many messages as
//! the MSA accepted, so `delivered_per_s` is submitted *and* relayed.
//!
//! With `--idle N` it opens N authenticated TLS sessions, says so on stderr
//! (`loadgen: idle: N/N sessions established`), holds them `--hold` seconds, checks each is
//! still alive with NOOP and reports (for memory-per-session measurements).
//!
//! Output: one JSON line on stdout; progress and failures on stderr.
//!
//! ```text
//! cargo run --release --example loadgen -- --target 127.0.0.1:2587 --mode starttls \
//!     --ca certs/fullchain.pem --server-name localhost \
//!     --user alice@example.org --password secret --from alice@example.org --to bob@example.net \
//!     --concurrency 20 --messages 2000 --per-connection 100 --size 4096 --sink 127.0.0.1:2525
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use clap::{Parser, ValueEnum};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// SMTP submission load generator (STARTTLS or implicit TLS, AUTH PLAIN, MAIL/RCPT/DATA).
#[derive(Debug, Clone, Parser)]
#[command(name = "loadgen")]
struct Args {
    /// The MSA to load, host:port.
    #[arg(long)]
    target: String,
    /// starttls: plain greeting, EHLO, STARTTLS (587 style); implicit: TLS first (465 style).
    #[arg(long, value_enum, default_value_t = Mode::Starttls)]
    mode: Mode,
    /// Do not verify the server certificate at all (handshake signatures still are).
    #[arg(long, conflicts_with = "ca")]
    insecure: bool,
    /// Trust only the certificates in this PEM file (default: the system roots).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Name sent as SNI and verified in the certificate (default: the host of --target).
    #[arg(long)]
    server_name: Option<String>,
    /// Do not resume TLS sessions (every connection does a full handshake).
    #[arg(long)]
    no_resumption: bool,
    /// AUTH PLAIN user name.
    #[arg(long)]
    user: String,
    /// AUTH PLAIN password.
    #[arg(long)]
    password: String,
    /// Envelope sender and From: address.
    #[arg(long)]
    from: Option<String>,
    /// Recipient (repeat for several).
    #[arg(long)]
    to: Vec<String>,
    /// Concurrent client sessions (also how many idle sessions are being opened at once).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Messages in total.
    #[arg(long, default_value_t = 100)]
    messages: usize,
    /// Messages per connection (MAIL follows the previous 250 directly).
    #[arg(long, default_value_t = 1)]
    per_connection: usize,
    /// Approximate message body size in bytes (text lines of at most 78 characters).
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// Send MAIL/RCPT/DATA one at a time even if the server offers PIPELINING.
    #[arg(long)]
    no_pipelining: bool,
    /// EHLO argument.
    #[arg(long, default_value = "loadgen.example")]
    ehlo: String,
    /// Seconds allowed for each connect, handshake and reply.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Open this many authenticated sessions and hold them instead of sending mail.
    #[arg(long)]
    idle: Option<usize>,
    /// Seconds to hold the idle sessions.
    #[arg(long, default_value_t = 10)]
    hold: u64,
    /// Run a counting SMTP sink on this address and wait until it received every accepted
    /// message.
    #[arg(long)]
    sink: Option<SocketAddr>,
    /// Seconds to wait, after the last message, for the sink to receive everything.
    #[arg(long, default_value_t = 120)]
    drain_timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Starttls,
    Implicit,
}

// ------------------------------------------------------------------ failures

/// Why a session or message failed.
#[derive(Debug)]
enum Fail {
    /// A reply with the wrong code.
    Reply {
        stage: &'static str,
        reply: Reply,
    },
    /// The server closed the connection.
    Closed {
        stage: &'static str,
    },
    Io {
        stage: &'static str,
        error: String,
    },
    Timeout {
        stage: &'static str,
    },
    Protocol {
        stage: &'static str,
        what: String,
    },
}

impl Fail {
    /// What distinguishes one kind of failure from another (logged once per key).
    fn key(&self) -> String {
        match self {
            Fail::Reply { stage, reply } => format!("{stage} {}", reply.code),
            Fail::Closed { stage } => format!("{stage} closed"),
            Fail::Io { stage, error } => format!("{stage} io {error}"),
            Fail::Timeout { stage } => format!("{stage} timeout"),
            Fail::Protocol { stage, what } => format!("{stage} {what}"),
        }
    }

    fn describe(&self) -> String {
        match self {
            Fail::Reply { stage, reply } => format!("{stage}: unexpected reply {:?}", reply.lines),
            Fail::Closed { stage } => format!("{stage}: connection closed by the server"),
            Fail::Io { stage, error } => format!("{stage}: {error}"),
            Fail::Timeout { stage } => format!("{stage}: timed out"),
            Fail::Protocol { stage, what } => format!("{stage}: {what}"),
        }
    }
}

/// Counts failures by kind and prints the first of each kind.
#[derive(Default)]
struct FailureLog {
    seen: Mutex<HashMap<String, u64>>,
}

impl FailureLog {
    fn record(&self, fail: &Fail) {
        let key = fail.key();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let count = seen.entry(key).or_insert(0);
        if *count == 0 {
            eprintln!("loadgen: failure: {}", fail.describe());
        }
        *count += 1;
    }

    fn summary(&self) {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut kinds: Vec<_> = seen.iter().collect();
        kinds.sort();
        for (key, count) in kinds {
            eprintln!("loadgen: {count} x {key}");
        }
    }
}

// ------------------------------------------------------------------ the wire

/// One SMTP reply.
#[derive(Debug, Clone)]
struct Reply {
    code: u16,
    lines: Vec<String>,
}

/// A stream with a read buffer, reading replies and writing commands under a timeout.
struct Wire<S> {
    stream: S,
    buf: Vec<u8>,
    timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    fn new(stream: S, timeout: Duration) -> Self {
        Self {
            stream,
            buf: Vec::with_capacity(4096),
            timeout,
        }
    }

    async fn send(&mut self, stage: &'static str, bytes: &[u8]) -> Result<(), Fail> {
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(self.timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Fail::Io {
                stage,
                error: e.to_string(),
            }),
            Err(_) => Err(Fail::Timeout { stage }),
        }
    }

    /// Reads one (possibly multi-line) reply.
    async fn reply(&mut self, stage: &'static str) -> Result<Reply, Fail> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut lines = Vec::new();
        loop {
            while let Some(end) = memchr::memchr(b'\n', &self.buf) {
                let raw = &self.buf[..end];
                let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
                let line = String::from_utf8_lossy(raw).into_owned();
                self.buf.drain(..=end);
                let last = line.as_bytes().get(3) != Some(&b'-');
                lines.push(line);
                if last {
                    let code = lines[lines.len() - 1]
                        .get(..3)
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(0);
                    return Ok(Reply { code, lines });
                }
            }
            self.buf.reserve(4096);
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) => return Err(Fail::Closed { stage }),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    return Err(Fail::Io {
                        stage,
                        error: e.to_string(),
                    })
                }
                Err(_) => return Err(Fail::Timeout { stage }),
            }
        }
    }

    /// Reads a reply and checks its code.
    async fn expect(&mut self, stage: &'static str, codes: &[u16]) -> Result<Reply, Fail> {
        let reply = self.reply(stage).await?;
        if codes.contains(&reply.code) {
            Ok(reply)
        } else {
            Err(Fail::Reply { stage, reply })
        }
    }

    async fn command(
        &mut self,
        stage: &'static str,
        line: &str,
        codes: &[u16],
    ) -> Result<Reply, Fail> {
        self.send(stage, format!("{line}\r\n").as_bytes()).await?;
        self.expect(stage, codes).await
    }
}

/// The EHLO keywords (upper case) of a 250 reply.
fn capabilities(reply: &Reply) -> Vec<String> {
    reply
        .lines
        .iter()
        .skip(1)
        .filter_map(|l| l.get(4..))
        .filter_map(|l| l.split_whitespace().next())
        .map(|k| k.to_ascii_uppercase())
        .collect()
}

// ------------------------------------------------------------------ TLS

/// Accepts any server certificate (`--insecure`); handshake signatures are still checked,
/// so the session is encrypted and authenticated to *some* key, just not a trusted one.
#[derive(Debug)]
struct NoCertificateVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCertificateVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_connector(args: &Args) -> Result<TlsConnector, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut config = if args.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoCertificateVerification(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        if let Some(path) = &args.ca {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        } else {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
        if roots.is_empty() {
            return Err("no trusted certificates (use --ca FILE or --insecure)".into());
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    if args.no_resumption {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(TlsConnector::from(Arc::new(config)))
}

// ------------------------------------------------------------------ messages

const WORDS: &str =
    "the meeting agenda for tomorrow is attached please review and send comments before \
     noon we will discuss budget travel plans quarterly report numbers look good but a \
     few items need clarification regarding invoice shipment schedule thanks again with \
     best regards project update deadline moved to next week of conference hotel network \
     was slow so I am sending this from my phone server configuration changes deployed \
     yesterday evening";

/// Lines that start with a dot, the ones dot-stuffing exists for.
const DOT_LINES: &[&str] = &[
    ".",
    "..",
    ". leading dot followed by text",
    ".hidden file name at the start of a line",
    "...and an ellipsis",
];

/// A body of about `size` bytes of text lines (CRLF, at most 78 characters), with a few
/// lines starting with '.'; not yet dot-stuffed.
fn generate_body(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let words: Vec<&str> = WORDS.split_whitespace().collect();
    let mut body = Vec::with_capacity(size + 80);
    let mut line = String::with_capacity(80);
    let mut lines = 0usize;
    while body.len() < size.max(1) {
        lines += 1;
        if lines.is_multiple_of(23) {
            line.push_str(DOT_LINES[rng.gen_range(0..DOT_LINES.len())]);
        } else if lines.is_multiple_of(9) {
            // paragraph break
        } else {
            let width = rng.gen_range(40..=78);
            loop {
                let word = words[rng.gen_range(0..words.len())];
                let extra = if line.is_empty() { 0 } else { 1 };
                if line.len() + extra + word.len() > width {
                    break;
                }
                if extra == 1 {
                    line.push(' ');
                }
                line.push_str(word);
            }
        }
        let room = size.max(1) - body.len();
        if line.len() + 2 > room && room > 2 {
            line.truncate(room - 2);
        }
        body.extend_from_slice(line.as_bytes());
        body.extend_from_slice(b"\r\n");
        line.clear();
    }
    body
}

/// Dot-stuffs CRLF text (RFC 5321 4.5.2): a '.' is added to every line starting with '.'.
/// The text must end with CRLF; the final ".\r\n" is not added.
fn dot_stuff(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + text.len() / 64 + 8);
    let mut at_line_start = true;
    for &b in text {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

/// An RFC 5322 date (UTC) for `secs` since the epoch.
fn rfc5322_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // civil_from_days (Howard Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{weekday}, {day} {} {year} {:02}:{:02}:{:02} +0000",
        months[(month - 1) as usize],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

// ------------------------------------------------------------------ the client

struct Ctx {
    args: Args,
    connector: TlsConnector,
    server_name: ServerName<'static>,
    timeout: Duration,
    /// The next message number to claim.
    next: AtomicUsize,
    /// Dot-stuffed bodies, each ending with CRLF, then the final ".\r\n".
    bodies: Vec<Vec<u8>>,
    from: String,
    date: String,
    run_id: u32,
    failures: FailureLog,
}

impl Ctx {
    fn claim(&self) -> Option<usize> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        (n < self.args.messages).then_some(n)
    }
}

struct Session {
    wire: Wire<TlsStream<TcpStream>>,
    pipelining: bool,
    size: bool,
    message: Vec<u8>,
}

async fn connect(ctx: &Ctx) -> Result<TcpStream, Fail> {
    let stage = "connect";
    match tokio::time::timeout(ctx.timeout, TcpStream::connect(&ctx.args.target)).await {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            Ok(tcp)
        }
        Ok(Err(e)) => Err(Fail::Io {
            stage,
            error: e.to_string(),
        }),
        Err(_) => Err(Fail::Timeout { stage }),
    }
}

async fn handshake(ctx: &Ctx, tcp: TcpStream) -> Result<TlsStream<TcpStream>, Fail> {
    let stage = "TLS handshake";
    let connect = ctx.connector.connect(ctx.server_name.clone(), tcp);
    match tokio::time::timeout(ctx.timeout, connect).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err(Fail::Io {
            stage,
            error: e.to_string(),
        }),
        Err(_) => Err(Fail::Timeout { stage }),
    }
}

/// TCP, TLS, EHLO and AUTH PLAIN: a session ready for MAIL.
async fn open_session(ctx: &Ctx) -> Result<Session, Fail> {
    let tcp = connect(ctx).await?;
    let ehlo = format!("EHLO {}", ctx.args.ehlo);
    let mut wire = match ctx.args.mode {
        Mode::Starttls => {
            let mut plain = Wire::new(tcp, ctx.timeout);
            plain.expect("greeting", &[220]).await?;
            let reply = plain.command("EHLO (plain)", &ehlo, &[250]).await?;
            if !capabilities(&reply).iter().any(|c| c == "STARTTLS") {
                return Err(Fail::Protocol {
                    stage: "EHLO (plain)",
                    what: "no STARTTLS offered".into(),
                });
            }
            plain.command("STARTTLS", "STARTTLS", &[220]).await?;
            if !plain.buf.is_empty() {
                return Err(Fail::Protocol {
                    stage: "STARTTLS",
                    what: "bytes after the 220 before the handshake".into(),
                });
            }
            Wire::new(handshake(ctx, plain.stream).await?, ctx.timeout)
        }
        Mode::Implicit => {
            let mut wire = Wire::new(handshake(ctx, tcp).await?, ctx.timeout);
            wire.expect("greeting", &[220]).await?;
            wire
        }
    };
    let reply = wire.command("EHLO", &ehlo, &[250]).await?;
    let caps = capabilities(&reply);
    let token = base64::engine::general_purpose::STANDARD
        .encode(format!("\0{}\0{}", ctx.args.user, ctx.args.password));
    wire.command("AUTH PLAIN", &format!("AUTH PLAIN {token}"), &[235])
        .await?;
    Ok(Session {
        wire,
        pipelining: !ctx.args.no_pipelining && caps.iter().any(|c| c == "PIPELINING"),
        size: caps.iter().any(|c| c == "SIZE"),
        message: Vec::new(),
    })
}

impl Session {
    /// Sends message number `n`; the time from the final dot to the 250.
    async fn send_message(&mut self, ctx: &Ctx, n: usize) -> Result<Duration, Fail> {
        let body = &ctx.bodies[n % ctx.bodies.len()];
        self.message.clear();
        let to = ctx.args.to.join(", ");
        self.message.extend_from_slice(
            format!(
                "From: Load Generator <{from}>\r\nTo: {to}\r\nSubject: loadgen message {n}\r\n\
                 Date: {date}\r\nMessage-ID: <{n}.{run}@loadgen.example>\r\nMIME-Version: 1.0\r\n\
                 Content-Type: text/plain; charset=us-ascii\r\n\r\n",
                from = ctx.from,
                date = ctx.date,
                run = ctx.run_id,
            )
            .as_bytes(),
        );
        self.message.extend_from_slice(body);
        let mut mail = format!("MAIL FROM:<{}>", ctx.from);
        if self.size {
            mail.push_str(&format!(" SIZE={}", self.message.len()));
        }
        if self.pipelining {
            let mut batch = format!("{mail}\r\n");
            for rcpt in &ctx.args.to {
                batch.push_str(&format!("RCPT TO:<{rcpt}>\r\n"));
            }
            batch.push_str("DATA\r\n");
            self.wire.send("MAIL", batch.as_bytes()).await?;
            self.wire.expect("MAIL", &[250]).await?;
            for _ in &ctx.args.to {
                self.wire.expect("RCPT", &[250, 251]).await?;
            }
            self.wire.expect("DATA", &[354]).await?;
        } else {
            self.wire.command("MAIL", &mail, &[250]).await?;
            for rcpt in &ctx.args.to {
                self.wire
                    .command("RCPT", &format!("RCPT TO:<{rcpt}>"), &[250, 251])
                    .await?;
            }
            self.wire.command("DATA", "DATA", &[354]).await?;
        }
        self.wire.send("message", &self.message).await?;
        let sent = Instant::now();
        self.wire.expect("end of DATA", &[250]).await?;
        Ok(sent.elapsed())
    }

    /// QUIT; a wrong reply is logged but fails no message.
    async fn quit(mut self, ctx: &Ctx) {
        if let Err(f) = self.wire.command("QUIT", "QUIT", &[221]).await {
            ctx.failures.record(&f);
        }
        let _ = self.wire.stream.shutdown().await;
    }
}

#[derive(Default)]
struct WorkerResult {
    ok: u64,
    failed: u64,
    data_to_250: Vec<f64>,
    connect_to_auth: Vec<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn worker(ctx: Arc<Ctx>) -> WorkerResult {
    let mut result = WorkerResult::default();
    'connections: while let Some(mut n) = ctx.claim() {
        let started = Instant::now();
        let mut session = match open_session(&ctx).await {
            Ok(s) => s,
            Err(f) => {
                ctx.failures.record(&f);
                result.failed += 1;
                continue;
            }
        };
        result.connect_to_auth.push(ms(started.elapsed()));
        let mut sent = 0;
        loop {
            match session.send_message(&ctx, n).await {
                Ok(latency) => {
                    result.ok += 1;
                    result.data_to_250.push(ms(latency));
                }
                Err(f) => {
                    ctx.failures.record(&f);
                    result.failed += 1;
                    // The session's state is unknown now: drop it, start a new one.
                    continue 'connections;
                }
            }
            sent += 1;
            if sent >= ctx.args.per_connection {
                break;
            }
            match ctx.claim() {
                Some(next) => n = next,
                None => break,
            }
        }
        session.quit(&ctx).await;
    }
    result
}

/// Opens `--idle` sessions, holds them, then checks each with NOOP.
async fn idle(ctx: Arc<Ctx>, count: usize) -> (WorkerResult, Duration) {
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(ctx.args.concurrency.max(1)));
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let ctx = ctx.clone();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.ok()?;
            let t = Instant::now();
            match open_session(&ctx).await {
                Ok(s) => Some((s, ms(t.elapsed()))),
                Err(f) => {
                    ctx.failures.record(&f);
                    None
                }
            }
        }));
    }
    let mut result = WorkerResult::default();
    let mut sessions = Vec::with_capacity(count);
    for t in tasks {
        match t.await.ok().flatten() {
            Some((s, latency)) => {
                result.connect_to_auth.push(latency);
                sessions.push(s);
            }
            None => result.failed += 1,
        }
    }
    let established = started.elapsed();
    eprintln!(
        "loadgen: idle: {}/{count} sessions established in {:.2}s, holding {}s",
        sessions.len(),
        established.as_secs_f64(),
        ctx.args.hold
    );
    tokio::time::sleep(Duration::from_secs(ctx.args.hold)).await;
    let mut checks = Vec::with_capacity(sessions.len());
    for mut s in sessions {
        let ctx = ctx.clone();
        checks.push(tokio::spawn(async move {
            match s.wire.command("NOOP", "NOOP", &[250]).await {
                Ok(_) => {
                    s.quit(&ctx).await;
                    true
                }
                Err(f) => {
                    ctx.failures.record(&f);
                    false
                }
            }
        }));
    }
    for c in checks {
        if c.await.unwrap_or(false) {
            result.ok += 1;
        } else {
            result.failed += 1;
        }
    }
    (result, established)
}

// ------------------------------------------------------------------ the sink

/// The counting sink: received messages and a wake-up per message.
struct SinkCount {
    messages: AtomicU64,
    arrived: Notify,
}

async fn run_sink(listener: TcpListener, count: Arc<SinkCount>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let count = count.clone();
                tokio::spawn(async move {
                    let _ = sink_session(stream, &count).await;
                });
            }
            Err(e) => {
                eprintln!("loadgen: sink accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A minimal SMTP server: replies to a pipelined batch go out in one write; a message counts
/// once its final dot arrived.
async fn sink_session(mut stream: TcpStream, count: &SinkCount) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    stream.write_all(b"220 loadgen-sink ESMTP\r\n").await?;
    let mut buf: Vec<u8> = Vec::with_capacity(65536);
    let mut out: Vec<u8> = Vec::with_capacity(512);
    let mut in_data = false;
    let mut has_mail = false;
    let mut rcpts = 0usize;
    let finder = memchr::memmem::Finder::new(b"\r\n.\r\n");
    loop {
        let mut consumed = 0;
        let mut quit = false;
        loop {
            if in_data {
                match finder.find(&buf[consumed..]) {
                    Some(p) => {
                        consumed += p + 5;
                        in_data = false;
                        has_mail = false;
                        rcpts = 0;
                        count.messages.fetch_add(1, Ordering::SeqCst);
                        count.arrived.notify_waiters();
                        out.extend_from_slice(b"250 2.0.0 Ok: counted\r\n");
                    }
                    None => {
                        // Keep a possible partial terminator.
                        consumed = consumed.max(buf.len().saturating_sub(4));
                        break;
                    }
                }
                continue;
            }
            let Some(end) = memchr::memchr(b'\n', &buf[consumed..]) else {
                break;
            };
            let line = &buf[consumed..consumed + end + 1];
            consumed += end + 1;
            let verb: Vec<u8> = line
                .iter()
                .take_while(|b| b.is_ascii_alphabetic())
                .map(|b| b.to_ascii_uppercase())
                .collect();
            match verb.as_slice() {
                b"EHLO" => out.extend_from_slice(
                    b"250-loadgen-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n\
                      250-SIZE 0\r\n250 ENHANCEDSTATUSCODES\r\n",
                ),
                b"HELO" => out.extend_from_slice(b"250 loadgen-sink\r\n"),
                b"MAIL" => {
                    has_mail = true;
                    rcpts = 0;
                    out.extend_from_slice(b"250 2.1.0 Ok\r\n");
                }
                b"RCPT" if has_mail => {
                    rcpts += 1;
                    out.extend_from_slice(b"250 2.1.5 Ok\r\n");
                }
                b"RCPT" => out.extend_from_slice(b"503 5.5.1 MAIL first\r\n"),
                b"DATA" if rcpts > 0 => {
                    out.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                    in_data = true;
                    // The CRLF before the final dot may be the DATA line's own (an empty
                    // message): put one in front of the data so one search finds both.
                    buf.drain(..consumed);
                    buf.splice(0..0, *b"\r\n");
                    consumed = 0;
                }
                b"DATA" => out.extend_from_slice(b"503 5.5.1 no valid recipients\r\n"),
                b"RSET" => {
                    has_mail = false;
                    rcpts = 0;
                    out.extend_from_slice(b"250 2.0.0 Ok\r\n");
                }
                b"NOOP" => out.extend_from_slice(b"250 2.0.0 Ok\r\n"),
                b"QUIT" => {
                    out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                    quit = true;
                    break;
                }
                _ => out.extend_from_slice(b"502 5.5.2 not implemented\r\n"),
            }
        }
        buf.drain(..consumed);
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if quit {
            return Ok(());
        }
        buf.reserve(16384);
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

// ------------------------------------------------------------------ report

/// Nearest-rank percentiles of `values` (ms, 3 decimals), null when empty.
fn percentiles(mut values: Vec<f64>) -> Value {
    if values.is_empty() {
        return json!({"p50": null, "p90": null, "p99": null});
    }
    values.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
        round3(values[rank - 1])
    };
    json!({"p50": at(0.50), "p90": at(0.90), "p99": at(0.99)})
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(line) => {
            println!("{line}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<String, String> {
    if args.idle.is_none() {
        if args.to.is_empty() {
            return Err("--to is required (unless --idle)".into());
        }
        if args.per_connection == 0 || args.concurrency == 0 {
            return Err("--per-connection and --concurrency must be at least 1".into());
        }
    }
    let connector = tls_connector(&args)?;
    let host = match args.target.rsplit_once(':') {
        Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => return Err("--target must be host:port".into()),
    };
    let name = args.server_name.clone().unwrap_or_else(|| host.to_owned());
    let server_name =
        ServerName::try_from(name.clone()).map_err(|e| format!("server name {name:?}: {e}"))?;
    let from = args.from.clone().unwrap_or_else(|| args.user.clone());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let bodies = (0..8u64)
        .map(|seed| {
            let mut body = dot_stuff(&generate_body(args.size, seed));
            body.extend_from_slice(b".\r\n");
            body
        })
        .collect();
    let ctx = Arc::new(Ctx {
        timeout: Duration::from_secs(args.timeout.max(1)),
        connector,
        server_name,
        next: AtomicUsize::new(0),
        bodies,
        from,
        date: rfc5322_date(now),
        run_id: rand::random(),
        failures: FailureLog::default(),
        args: args.clone(),
    });

    if let Some(count) = args.idle {
        let (result, established) = idle(ctx.clone(), count).await;
        ctx.failures.summary();
        let line = json!({
            "ok": result.ok,
            "failed": result.failed,
            "secs": round3(established.as_secs_f64()),
            "msgs_per_s": 0.0,
            "delivered": null,
            "delivered_per_s": null,
            "data_to_250_ms": percentiles(Vec::new()),
            "connect_to_auth_ms": percentiles(result.connect_to_auth),
            "idle": count,
            "hold_secs": args.hold,
        });
        return Ok(line.to_string());
    }

    let sink = match args.sink {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("sink {addr}: {e}"))?;
            let count = Arc::new(SinkCount {
                messages: AtomicU64::new(0),
                arrived: Notify::new(),
            });
            tokio::spawn(run_sink(listener, count.clone()));
            Some(count)
        }
        None => None,
    };

    let started = Instant::now();
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| tokio::spawn(worker(ctx.clone())))
        .collect();
    let mut total = WorkerResult::default();
    for w in workers {
        let r = w.await.map_err(|e| format!("worker: {e}"))?;
        total.ok += r.ok;
        total.failed += r.failed;
        total.data_to_250.extend(r.data_to_250);
        total.connect_to_auth.extend(r.connect_to_auth);
    }
    let secs = started.elapsed().as_secs_f64();

    let (delivered, delivered_per_s) = match &sink {
        Some(count) => {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(args.drain_timeout);
            loop {
                let notified = count.arrived.notified();
                if count.messages.load(Ordering::SeqCst) >= total.ok {
                    break;
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    break;
                }
            }
            let elapsed = started.elapsed().as_secs_f64();
            let delivered = count.messages.load(Ordering::SeqCst);
            if delivered < total.ok {
                eprintln!(
                    "loadgen: sink received {delivered} of {} accepted messages within {}s",
                    total.ok, args.drain_timeout
                );
            }
            (
                json!(delivered),
                json!(round3(delivered as f64 / elapsed.max(1e-9))),
            )
        }
        None => (Value::Null, Value::Null),
    };
    ctx.failures.summary();
    let line = json!({
        "ok": total.ok,
        "failed": total.failed,
        "secs": round3(secs),
        "msgs_per_s": round3(total.ok as f64 / secs.max(1e-9)),
        "delivered": delivered,
        "delivered_per_s": delivered_per_s,
        "data_to_250_ms": percentiles(total.data_to_250),
        "connect_to_auth_ms": percentiles(total.connect_to_auth),
    });
    Ok(line.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stuffing_doubles_leading_dots_only() {
        assert_eq!(
            dot_stuff(b".\r\na.b\r\n..x\r\n\r\n.\r\n"),
            b"..\r\na.b\r\n...x\r\n\r\n..\r\n"
        );
    }

    #[test]
    fn bodies_have_short_lines_and_dot_lines() {
        let body = generate_body(20_000, 1);
        assert!(body.len() >= 20_000 && body.len() < 20_100);
        let text = String::from_utf8(body).unwrap();
        assert!(text.ends_with("\r\n"));
        let lines: Vec<&str> = text.split("\r\n").collect();
        assert!(lines.iter().all(|l| l.len() <= 78 && !l.contains('\r')));
        assert!(lines.iter().any(|l| l.starts_with('.')));
    }

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_709_210_096),
            "Thu, 29 Feb 2024 12:34:56 +0000"
        );
    }

    #[test]
    fn nearest_rank() {
        let p = percentiles((1..=100).map(f64::from).collect());
        assert_eq!(p["p50"], 50.0);
        assert_eq!(p["p99"], 99.0);
    }
}
