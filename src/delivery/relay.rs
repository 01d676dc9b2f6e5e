//! The smart-host client, on lettre's connection-level API: one MAIL, one RCPT per recipient
//! (each with its own outcome), DATA, and the connection kept for the next message.
//!
//! lettre's high-level `send_raw` gives up on the whole message at the first refused
//! recipient, which would turn one bad address into a retry storm or a wrong bounce, hence
//! `AsyncSmtpConnection` here.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters,
};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use lettre::transport::smtp::Error as SmtpError;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{RelayConfig, RelayTls};

/// Errors that make the whole attempt fail: no connection, or the connection broke.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot read {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("relay TLS setup: {0}")]
    TlsSetup(String),
    #[error("connection to the smart host failed: {0}")]
    Connect(String),
    #[error("smart host does not offer STARTTLS; refusing to send in plaintext")]
    NoStartTls,
    #[error("smart host refused our credentials: {0}")]
    Auth(String),
    #[error("connection to the smart host broke: {0}")]
    Broken(String),
    /// A kept connection failed at MAIL, before anything of the message was sent: the smart
    /// host closed it while it sat idle. A fresh connection may be tried at once.
    #[error("kept connection to the smart host was closed: {0}")]
    Closed(String),
}

/// The result for one recipient of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptOutcome {
    /// 2xx after DATA; the smart host's reply.
    Delivered(String),
    /// 4xx, or the connection failed; try again later.
    Deferred(String),
    /// 5xx: give up and bounce.
    Failed(String),
}

/// The configured smart host and how to reach it.
pub struct Relay {
    config: RelayConfig,
    client_id: ClientId,
    /// For `tls = "starttls"`: lettre upgrades the connection after EHLO.
    tls: Option<TlsParameters>,
    /// For `tls = "implicit"`: the handshake comes before the greeting, done here.
    implicit: Option<TlsConnector>,
    credentials: Option<Credentials>,
    /// After a failed connect, nobody connects again before this instant.
    down_until: Mutex<Option<Instant>>,
}

/// An open, authenticated connection to the smart host.
pub struct RelayConnection {
    conn: AsyncSmtpConnection,
    /// Longest wait for any one reply of the smart host.
    timeout: Duration,
    pub last_used: Instant,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("host", &self.config.host)
            .field("port", &self.config.port)
            .field("tls", &self.config.tls)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Reads the CA file and password file named by the config.
    pub fn new(config: &RelayConfig, hostname: &str) -> Result<Self, RelayError> {
        let implicit = match config.tls {
            RelayTls::Implicit => Some(implicit_connector(config.ca_file.as_deref())?),
            _ => None,
        };
        let tls = match config.tls {
            RelayTls::None | RelayTls::Implicit => None,
            RelayTls::Starttls => {
                let mut builder = TlsParameters::builder(config.host.clone());
                if let Some(ca) = &config.ca_file {
                    let pem = std::fs::read(ca).map_err(|source| RelayError::File {
                        path: ca.clone(),
                        source,
                    })?;
                    let cert = Certificate::from_pem(&pem)
                        .map_err(|e| RelayError::TlsSetup(format!("{}: {e}", ca.display())))?;
                    builder = builder.add_root_certificate(cert);
                }
                Some(
                    builder
                        .build_rustls()
                        .map_err(|e| RelayError::TlsSetup(e.to_string()))?,
                )
            }
        };
        let credentials = match (&config.username, &config.password_file) {
            (Some(user), Some(file)) => {
                let text = std::fs::read_to_string(file).map_err(|source| RelayError::File {
                    path: file.clone(),
                    source,
                })?;
                let password = text.lines().next().unwrap_or("").to_owned();
                Some(Credentials::new(user.clone(), password))
            }
            _ => None,
        };
        Ok(Self {
            config: config.clone(),
            client_id: ClientId::Domain(hostname.to_owned()),
            tls,
            implicit,
            credentials,
            down_until: Mutex::new(None),
        })
    }

    /// How long an idle connection is kept.
    pub fn idle_timeout(&self) -> Duration {
        self.config.idle_timeout
    }

    /// When the smart host may be tried again after a failed connect (`None`: now).
    pub fn down_until(&self) -> Option<Instant> {
        let guard = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        guard.filter(|t| *t > Instant::now())
    }

    fn mark_down(&self, pause: Duration) {
        *self.down_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + pause);
    }

    /// Opens a connection: TLS as configured (never a plaintext fallback), then AUTH.
    pub async fn connect(&self, pause_on_failure: Duration) -> Result<RelayConnection, RelayError> {
        let result = self.connect_once().await;
        match &result {
            Ok(_) => *self.down_until.lock().unwrap_or_else(|e| e.into_inner()) = None,
            Err(_) => self.mark_down(pause_on_failure),
        }
        result
    }

    async fn connect_once(&self) -> Result<RelayConnection, RelayError> {
        let deadline = self.config.timeout;
        let tcp = connect_tcp(&self.config.host, self.config.port, deadline).await?;
        let transport: Box<dyn AsyncTokioStream> = match (&self.config.tls, &self.implicit) {
            (RelayTls::Implicit, Some(connector)) => {
                let name = ServerName::try_from(self.config.host.clone())
                    .map_err(|e| RelayError::TlsSetup(e.to_string()))?;
                let tls = tokio::time::timeout(deadline, connector.connect(name, tcp))
                    .await
                    .map_err(|_| RelayError::Connect("TLS handshake timed out".into()))?
                    .map_err(|e| RelayError::Connect(format!("TLS handshake: {e}")))?;
                Box::new(ImplicitTls(tls))
            }
            _ => Box::new(tcp),
        };
        let mut conn = tokio::time::timeout(
            deadline,
            AsyncSmtpConnection::connect_with_transport(transport, &self.client_id),
        )
        .await
        .map_err(|_| RelayError::Connect("greeting timed out".into()))?
        .map_err(|e| RelayError::Connect(describe(&e)))?;
        if self.config.tls == RelayTls::Starttls {
            let Some(tls) = self.tls.clone() else {
                return Err(RelayError::TlsSetup("no TLS parameters".into()));
            };
            if !conn.can_starttls() {
                let _ = tokio::time::timeout(deadline, conn.abort()).await;
                return Err(RelayError::NoStartTls);
            }
            tokio::time::timeout(deadline, conn.starttls(tls, &self.client_id))
                .await
                .map_err(|_| RelayError::Connect("STARTTLS timed out".into()))?
                .map_err(|e| RelayError::Connect(describe(&e)))?;
        }
        if let Some(credentials) = &self.credentials {
            tokio::time::timeout(
                deadline,
                conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials),
            )
            .await
            .map_err(|_| RelayError::Auth("timed out".into()))?
            .map_err(|e| RelayError::Auth(describe(&e)))?;
        }
        Ok(RelayConnection {
            conn,
            timeout: deadline,
            last_used: Instant::now(),
        })
    }
}

/// Connects to the smart host with Nagle's algorithm off: lettre writes the message and the
/// final `CRLF.CRLF` separately, and with Nagle on, the second write waits for the smart
/// host's delayed ACK (about 40 ms per message).
async fn connect_tcp(host: &str, port: u16, deadline: Duration) -> Result<TcpStream, RelayError> {
    let addrs = tokio::time::timeout(deadline, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| RelayError::Connect(format!("resolving {host} timed out")))?
        .map_err(|e| RelayError::Connect(format!("resolving {host}: {e}")))?;
    let mut last = format!("{host} resolved to no address");
    for addr in addrs {
        match tokio::time::timeout(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: connection timed out"),
        }
    }
    Err(RelayError::Connect(last))
}

/// The client side of implicit TLS, in the shape lettre takes an existing stream in.
#[derive(Debug)]
struct ImplicitTls(tokio_rustls::client::TlsStream<TcpStream>);

impl AsyncTokioStream for ImplicitTls {
    fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}

impl tokio::io::AsyncRead for ImplicitTls {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ImplicitTls {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The TLS client configuration for implicit TLS: the system roots plus `ca_file`, with
/// hostname verification (rustls always verifies the name).
fn implicit_connector(ca_file: Option<&std::path::Path>) -> Result<TlsConnector, RelayError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(ca) = ca_file {
        let certs = CertificateDer::pem_file_iter(ca)
            .and_then(|c| c.collect::<Result<Vec<_>, _>>())
            .map_err(|e| RelayError::TlsSetup(format!("{}: {e}", ca.display())))?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| RelayError::TlsSetup(format!("{}: {e}", ca.display())))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| RelayError::TlsSetup(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

impl RelayConnection {
    /// Sends one message to `recipients`; the outcome per recipient, in order. An `Err`
    /// means the connection is unusable and every recipient is deferred.
    pub async fn send(
        &mut self,
        sender: &str,
        recipients: &[String],
        message: &[u8],
    ) -> Result<Vec<RcptOutcome>, RelayError> {
        self.last_used = Instant::now();
        let info = self.conn.server_info().clone();
        let mut params = Vec::new();
        if !message.is_ascii() && info.supports_feature(Extension::EightBitMime) {
            params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        let non_ascii = !sender.is_ascii() || recipients.iter().any(|r| !r.is_ascii());
        if non_ascii && info.supports_feature(Extension::SmtpUtfEight) {
            params.push(MailParameter::SmtpUtfEight);
        }
        let from = if sender.is_empty() {
            None
        } else {
            match sender.parse::<lettre::Address>() {
                Ok(a) => Some(a),
                Err(e) => {
                    let text = format!("554 5.1.7 sender address not usable: {e}");
                    return Ok(vec![RcptOutcome::Failed(text); recipients.len()]);
                }
            }
        };
        match self.call(Mail::new(from, params)).await? {
            Ok(_) => {}
            Err(e) if e.is_permanent() || e.is_transient() => {
                return self.all_refused(&e, recipients.len()).await
            }
            Err(e) => return Err(RelayError::Closed(describe(&e))),
        }

        let mut outcomes: Vec<Option<RcptOutcome>> = vec![None; recipients.len()];
        let mut accepted = Vec::new();
        for (i, rcpt) in recipients.iter().enumerate() {
            let Ok(address) = rcpt.parse::<lettre::Address>() else {
                outcomes[i] = Some(RcptOutcome::Failed(
                    "553 5.1.3 recipient address not usable".into(),
                ));
                continue;
            };
            match self.call(Rcpt::new(address, vec![])).await? {
                Ok(_) => accepted.push(i),
                Err(e) => outcomes[i] = Some(refusal(&e)?),
            }
        }
        if accepted.is_empty() {
            self.reset().await?;
            return Ok(outcomes
                .into_iter()
                .map(|o| o.unwrap_or(RcptOutcome::Deferred("no reply".into())))
                .collect());
        }
        let data_result = match self.call(Data).await? {
            // lettre appends CRLF.CRLF itself; giving it the final CRLF too would add an
            // empty line to every message. The transfer may take a while: the timeout grows
            // with the size (at least 100 KiB/s).
            Ok(_) => {
                let transfer =
                    self.timeout + Duration::from_secs((message.len() / (100 * 1024)) as u64);
                let body = message.strip_suffix(b"\r\n").unwrap_or(message);
                // In pieces: lettre dot-stuffs each into a buffer of its own, so this keeps
                // that copy at 64 KiB instead of the size of the message.
                tokio::time::timeout(transfer, self.conn.message_iter(body.chunks(64 * 1024)))
                    .await
                    .map_err(|_| RelayError::Broken("message transfer timed out".into()))?
            }
            Err(e) => Err(e),
        };
        let shared = match data_result {
            Ok(reply) => RcptOutcome::Delivered(format!(
                "{} {}",
                reply.code(),
                reply.message().collect::<Vec<_>>().join(" ")
            )),
            Err(e) => {
                let outcome = refusal(&e)?;
                self.reset().await?;
                outcome
            }
        };
        for i in accepted {
            outcomes[i] = Some(shared.clone());
        }
        self.last_used = Instant::now();
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or(RcptOutcome::Deferred("no reply".into())))
            .collect())
    }

    async fn all_refused(
        &mut self,
        e: &SmtpError,
        count: usize,
    ) -> Result<Vec<RcptOutcome>, RelayError> {
        let outcome = refusal(e)?;
        self.reset().await?;
        Ok(vec![outcome; count])
    }

    async fn reset(&mut self) -> Result<(), RelayError> {
        self.call(Rset)
            .await?
            .map(|_| ())
            .map_err(|e| RelayError::Broken(describe(&e)))
    }

    /// One command and its reply, within the timeout; a timeout breaks the connection.
    async fn call<C: std::fmt::Display>(
        &mut self,
        command: C,
    ) -> Result<Result<Response, SmtpError>, RelayError> {
        tokio::time::timeout(self.timeout, self.conn.command(command))
            .await
            .map_err(|_| RelayError::Broken("the smart host did not answer in time".into()))
    }

    /// True if the connection can be used for another message.
    pub fn is_usable(&self) -> bool {
        !self.conn.has_broken()
    }

    /// Says goodbye to the smart host.
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(self.timeout, self.conn.quit()).await;
    }
}

/// Maps a refused command to the recipient outcome; connection-level errors end the attempt.
fn refusal(e: &SmtpError) -> Result<RcptOutcome, RelayError> {
    if e.is_permanent() {
        Ok(RcptOutcome::Failed(describe(e)))
    } else if e.is_transient() {
        Ok(RcptOutcome::Deferred(describe(e)))
    } else {
        Err(RelayError::Broken(describe(e)))
    }
}

/// The smart host's reply as `550 5.1.1 text`, or the local error's description.
pub fn describe(e: &SmtpError) -> String {
    let detail = std::error::Error::source(e).map(|s| s.to_string());
    match (e.status(), detail) {
        (Some(code), Some(text)) => format!("{code} {text}"),
        (Some(code), None) => code.to_string(),
        // lettre's own text already ends with the cause.
        (None, _) => e.to_string(),
    }
}
