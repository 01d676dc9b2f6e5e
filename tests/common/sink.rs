//! A scriptable SMTP server standing in for the smart host: commands parsed with smtp-proto,
//! STARTTLS with a test CA, optional AUTH, per-recipient replies on demand, and every
//! accepted message captured byte for byte.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use smtp_proto::request::receiver::DataReceiver;
use smtp_proto::Request;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

/// A message as the sink received it.
#[derive(Debug, Clone)]
pub struct Captured {
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// The content after un-dot-stuffing, without the final `.` line.
    pub data: Vec<u8>,
    pub tls: bool,
    pub authenticated: Option<String>,
}

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// A CA and a certificate for `localhost` issued by it.
pub struct TestPki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestPki {
    pub fn new() -> Self {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "submitd test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        Self {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    pub fn write_ca(&self, path: &Path) {
        std::fs::write(path, &self.ca_pem).unwrap();
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// One command line as the sink received it (CRLF removed).
#[derive(Debug, Clone)]
pub struct Seen {
    pub line: String,
    /// True if it came over TLS.
    pub tls: bool,
}

#[derive(Default)]
struct State {
    messages: Vec<Captured>,
    /// Replies to RCPT TO per recipient address, used in order; default 250.
    rcpt_script: HashMap<String, VecDeque<String>>,
    /// Replies to RCPT TO per recipient once its script is used up (e.g. always 451).
    rcpt_always: HashMap<String, String>,
    /// Replies after the final dot, used in order; default 250.
    data_script: VecDeque<String>,
    connections: usize,
    /// Every command line, in order, across sessions.
    commands: Vec<Seen>,
    /// STARTTLS handshakes that failed (e.g. the client did not trust our certificate).
    tls_failures: usize,
    /// Open sessions, aborted by [`Sink::stop`].
    sessions: Vec<tokio::task::AbortHandle>,
    /// While set, the reply after the final dot waits for a permit (see [`Sink::hold_data`]).
    data_gate: Option<Arc<tokio::sync::Semaphore>>,
    /// Sessions waiting at the gate now.
    held: usize,
}

/// Sink settings.
#[derive(Clone, Default)]
pub struct SinkOptions {
    /// Offer STARTTLS with this certificate.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Require AUTH PLAIN/LOGIN with these credentials before MAIL.
    pub auth: Option<(String, String)>,
    /// Use `tls` as implicit TLS (465 style) instead of offering STARTTLS.
    pub implicit: bool,
}

/// A running sink.
pub struct Sink {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    arrived: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
    options: SinkOptions,
}

pub fn server_tls(pki: &TestPki) -> Arc<rustls::ServerConfig> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pki.cert_pem.as_bytes())
            .map(|c| c.unwrap())
            .collect();
    let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    Arc::new(config)
}

impl Sink {
    /// Starts a plaintext sink on a free port.
    pub async fn start() -> Self {
        Self::start_with(SinkOptions::default()).await
    }

    pub async fn start_with(options: SinkOptions) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, options, Arc::default(), Arc::new(Notify::new()))
    }

    /// Binds the given address (to come back after [`Sink::stop`] on the same port); waits
    /// up to 5 s for a just-stopped listener on it to be gone.
    pub async fn start_on(addr: SocketAddr, options: SinkOptions) -> Self {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("sink cannot bind {addr}: {e}"),
            }
        };
        Self::serve(listener, options, Arc::default(), Arc::new(Notify::new()))
    }

    fn serve(
        listener: TcpListener,
        options: SinkOptions,
        state: Arc<Mutex<State>>,
        arrived: Arc<Notify>,
    ) -> Self {
        let addr = listener.local_addr().unwrap();
        let (s, a, o) = (Arc::clone(&state), Arc::clone(&arrived), options.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let handle = tokio::spawn(session(tcp, o.clone(), Arc::clone(&s), Arc::clone(&a)));
                let mut state = s.lock().unwrap();
                state.connections += 1;
                state.sessions.retain(|h| !h.is_finished());
                state.sessions.push(handle.abort_handle());
            }
        });
        Self {
            addr,
            state,
            arrived,
            task,
            options,
        }
    }

    /// Stops listening and drops the open sessions (a smart host that went away).
    pub fn stop(&self) {
        self.task.abort();
        for h in self.state.lock().unwrap().sessions.drain(..) {
            h.abort();
        }
    }

    /// [`Sink::stop`], then waits until the port is closed for sure.
    pub async fn stop_wait(&self) {
        self.stop();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while !self.task.is_finished() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(self.task.is_finished(), "sink stopped");
    }

    /// Scripts the reply to RCPT TO for `rcpt` for every attempt after the scripted ones.
    pub fn script_rcpt_always(&self, rcpt: &str, reply: &str) {
        self.state
            .lock()
            .unwrap()
            .rcpt_always
            .insert(rcpt.to_owned(), reply.to_owned());
    }

    /// From now on the reply after the final dot waits until [`Sink::release_data`] (the
    /// smart host is slow: a delivery attempt stays in flight).
    pub fn hold_data(&self) {
        self.state.lock().unwrap().data_gate = Some(Arc::new(tokio::sync::Semaphore::new(0)));
    }

    /// Lets every held and future reply after the final dot go.
    pub fn release_data(&self) {
        if let Some(gate) = self.state.lock().unwrap().data_gate.take() {
            gate.close();
        }
    }

    /// How many sessions have sent their message and wait for the reply now.
    pub fn held(&self) -> usize {
        self.state.lock().unwrap().held
    }

    /// Every command line received so far.
    pub fn commands(&self) -> Vec<Seen> {
        self.state.lock().unwrap().commands.clone()
    }

    /// Command lines starting with `prefix` (case-insensitive).
    pub fn commands_starting(&self, prefix: &str) -> Vec<Seen> {
        let prefix = prefix.to_ascii_uppercase();
        self.commands()
            .into_iter()
            .filter(|c| c.line.to_ascii_uppercase().starts_with(&prefix))
            .collect()
    }

    /// STARTTLS handshakes that failed.
    pub fn tls_failures(&self) -> usize {
        self.state.lock().unwrap().tls_failures
    }

    /// Scripts the replies to RCPT TO for `rcpt`, one per attempt (e.g. `"451 4.3.0 later"`).
    pub fn script_rcpt(&self, rcpt: &str, replies: &[&str]) {
        self.state.lock().unwrap().rcpt_script.insert(
            rcpt.to_owned(),
            replies.iter().map(|r| r.to_string()).collect(),
        );
    }

    /// Scripts the replies after the final dot.
    pub fn script_data(&self, replies: &[&str]) {
        self.state.lock().unwrap().data_script = replies.iter().map(|r| r.to_string()).collect();
    }

    pub fn messages(&self) -> Vec<Captured> {
        self.state.lock().unwrap().messages.clone()
    }

    pub fn connections(&self) -> usize {
        self.state.lock().unwrap().connections
    }

    /// Waits until at least `n` messages arrived, for at most `secs` seconds.
    pub async fn wait_for(&self, n: usize, secs: u64) -> Vec<Captured> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let notified = self.arrived.notified();
            let got = self.messages();
            if got.len() >= n {
                return got;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.messages();
            }
        }
    }

    /// The `[relay]` section pointing at this sink.
    pub fn relay_config(&self, extra: &str) -> String {
        let tls = if self.options.tls.is_some() {
            "starttls"
        } else {
            "none"
        };
        self.relay_config_tls(tls, extra)
    }

    /// The `[relay]` section pointing at this sink with `tls` as given
    /// (`"none"`, `"starttls"`, `"implicit"`).
    pub fn relay_config_tls(&self, tls: &str, extra: &str) -> String {
        format!(
            "[relay]\nhost = \"localhost\"\nport = {}\ntls = \"{tls}\"\ntimeout = \"10s\"\n{extra}\n",
            self.addr.port()
        )
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn session(
    tcp: TcpStream,
    options: SinkOptions,
    state: Arc<Mutex<State>>,
    arrived: Arc<Notify>,
) {
    let mut stream: Box<dyn Io> = Box::new(tcp);
    let mut tls = false;
    if options.implicit {
        let Some(config) = options.tls.clone() else {
            return;
        };
        match TlsAcceptor::from(config).accept(stream).await {
            Ok(s) => stream = Box::new(s),
            Err(_) => return,
        }
        tls = true;
    }
    let mut buf: Vec<u8> = Vec::new();
    let _ = stream.write_all(b"220 sink.test ESMTP\r\n").await;
    let mut authenticated: Option<String> = None;
    let mut mail_from: Option<String> = None;
    let mut rcpts: Vec<String> = Vec::new();
    loop {
        let Some(line) = read_line(&mut stream, &mut buf).await else {
            return;
        };
        state.lock().unwrap().commands.push(Seen {
            line: String::from_utf8_lossy(line.strip_suffix(b"\r\n").unwrap_or(&line)).into_owned(),
            tls,
        });
        let parsed = Request::parse(&mut line.iter()).map(|r| r.into_owned());
        let reply: String = match parsed {
            Ok(Request::Ehlo { .. }) => {
                let mut caps = vec![
                    "250-sink.test",
                    "250-PIPELINING",
                    "250-8BITMIME",
                    "250-SMTPUTF8",
                ];
                if options.tls.is_some() && !tls {
                    caps.push("250-STARTTLS");
                }
                if options.auth.is_some() {
                    caps.push("250-AUTH PLAIN LOGIN");
                }
                caps.push("250 ENHANCEDSTATUSCODES");
                caps.join("\r\n")
            }
            Ok(Request::StartTls) if options.tls.is_some() && !tls => {
                let _ = stream.write_all(b"220 2.0.0 go ahead\r\n").await;
                let acceptor = TlsAcceptor::from(options.tls.clone().unwrap());
                // The boxed stream is a TcpStream until STARTTLS.
                let raw: Box<dyn Io> =
                    std::mem::replace(&mut stream, Box::new(tokio::io::duplex(1).0));
                match acceptor.accept(raw).await {
                    Ok(s) => {
                        stream = Box::new(s);
                        tls = true;
                        buf.clear();
                        continue;
                    }
                    Err(_) => {
                        state.lock().unwrap().tls_failures += 1;
                        return;
                    }
                }
            }
            Ok(Request::Auth {
                mechanism,
                initial_response,
            }) => {
                let Some((user, pass)) = &options.auth else {
                    let _ = stream.write_all(b"502 5.5.1 no auth\r\n").await;
                    continue;
                };
                let decoded = if mechanism == smtp_proto::AUTH_PLAIN {
                    let response = if initial_response.is_empty() {
                        let _ = stream.write_all(b"334 \r\n").await;
                        let Some(l) = read_line(&mut stream, &mut buf).await else {
                            return;
                        };
                        String::from_utf8_lossy(&l).trim().to_owned()
                    } else {
                        initial_response
                    };
                    b64(&response)
                        .map(|raw| {
                            raw.split(|&b| b == 0)
                                .map(|p| String::from_utf8_lossy(p).into_owned())
                                .collect::<Vec<_>>()
                        })
                        .filter(|parts| parts.len() == 3)
                        .map(|parts| (parts[1].clone(), parts[2].clone()))
                } else {
                    let _ = stream.write_all(b"334 VXNlcm5hbWU6\r\n").await;
                    let Some(u) = read_line(&mut stream, &mut buf).await else {
                        return;
                    };
                    let _ = stream.write_all(b"334 UGFzc3dvcmQ6\r\n").await;
                    let Some(p) = read_line(&mut stream, &mut buf).await else {
                        return;
                    };
                    let dec = |l: &[u8]| {
                        b64(String::from_utf8_lossy(l).trim())
                            .map(|v| String::from_utf8_lossy(&v).into_owned())
                    };
                    dec(&u).zip(dec(&p))
                };
                match decoded {
                    Some((u, p)) if &u == user && &p == pass => {
                        authenticated = Some(u);
                        "235 2.7.0 ok".into()
                    }
                    _ => "535 5.7.8 bad credentials".into(),
                }
            }
            Ok(Request::Mail { from }) => {
                if options.auth.is_some() && authenticated.is_none() {
                    "530 5.7.0 auth required".into()
                } else {
                    mail_from = Some(from.address);
                    rcpts.clear();
                    "250 2.1.0 ok".into()
                }
            }
            Ok(Request::Rcpt { to }) => {
                let scripted = {
                    let mut st = state.lock().unwrap();
                    st.rcpt_script
                        .get_mut(&to.address)
                        .and_then(|q| q.pop_front())
                        .or_else(|| st.rcpt_always.get(&to.address).cloned())
                };
                let reply = scripted.unwrap_or_else(|| "250 2.1.5 ok".into());
                if reply.starts_with('2') {
                    rcpts.push(to.address);
                }
                reply
            }
            Ok(Request::Data) => {
                if mail_from.is_none() || rcpts.is_empty() {
                    "503 5.5.1 no valid recipients".into()
                } else {
                    let _ = stream.write_all(b"354 go\r\n").await;
                    let Some(data) = read_data(&mut stream, &mut buf).await else {
                        return;
                    };
                    let gate = state.lock().unwrap().data_gate.clone();
                    if let Some(gate) = gate {
                        state.lock().unwrap().held += 1;
                        // Never given permits: waits until `release_data` closes the gate.
                        let _ = gate.acquire().await;
                        state.lock().unwrap().held -= 1;
                    }
                    let scripted = state.lock().unwrap().data_script.pop_front();
                    let reply = scripted.unwrap_or_else(|| "250 2.0.0 queued in sink".into());
                    if reply.starts_with('2') {
                        state.lock().unwrap().messages.push(Captured {
                            mail_from: mail_from.clone().unwrap_or_default(),
                            rcpt_to: rcpts.clone(),
                            data,
                            tls,
                            authenticated: authenticated.clone(),
                        });
                        arrived.notify_waiters();
                    }
                    mail_from = None;
                    rcpts.clear();
                    reply
                }
            }
            Ok(Request::Rset) => {
                mail_from = None;
                rcpts.clear();
                "250 2.0.0 ok".into()
            }
            Ok(Request::Noop { .. }) => "250 2.0.0 ok".into(),
            Ok(Request::Quit) => {
                let _ = stream.write_all(b"221 2.0.0 bye\r\n").await;
                return;
            }
            _ => "500 5.5.1 what".into(),
        };
        if stream
            .write_all(format!("{reply}\r\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

fn b64(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

async fn read_line(stream: &mut Box<dyn Io>, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(pos) = buf.windows(2).position(|w| w == b"\r\n") {
            return Some(buf.drain(..pos + 2).collect());
        }
        let mut tmp = [0u8; 8192];
        let n = stream.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

async fn read_data(stream: &mut Box<dyn Io>, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut receiver = DataReceiver::new();
    let mut data = Vec::new();
    loop {
        let pending = std::mem::take(buf);
        let mut iter = pending.iter();
        if receiver.ingest(&mut iter, &mut data) {
            *buf = iter.as_slice().to_vec();
            // smtp-proto keeps the CRLF before the final dot; so does a message on disk.
            return Some(data);
        }
        let mut tmp = [0u8; 65536];
        let n = stream.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}
