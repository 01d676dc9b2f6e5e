//! The smart-host client, on lettre's connection-level API: one MAIL, one RCPT per recipient
//! (each with its own outcome), DATA, and the connection kept for the next message.
//!
//! lettre's high-level `send_raw` gives up on the whole message at the first refused
//! recipient, which would turn one bad address into a retry storm or a wrong bounce, hence
//! `AsyncSmtpConnection` here.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::Error as SmtpError;

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
    tls: Option<TlsParameters>,
    credentials: Option<Credentials>,
    /// After a failed connect, nobody connects again before this instant.
    down_until: Mutex<Option<Instant>>,
}

/// An open, authenticated connection to the smart host.
pub struct RelayConnection {
    conn: AsyncSmtpConnection,
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
        let tls = match config.tls {
            RelayTls::None => None,
            RelayTls::Starttls | RelayTls::Implicit => {
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
        let address = (self.config.host.as_str(), self.config.port);
        let timeout = Some(self.config.timeout);
        let implicit = match self.config.tls {
            RelayTls::Implicit => self.tls.clone(),
            _ => None,
        };
        let mut conn =
            AsyncSmtpConnection::connect_tokio1(address, timeout, &self.client_id, implicit, None)
                .await
                .map_err(|e| RelayError::Connect(describe(&e)))?;
        if self.config.tls == RelayTls::Starttls {
            let Some(tls) = self.tls.clone() else {
                return Err(RelayError::TlsSetup("no TLS parameters".into()));
            };
            if !conn.can_starttls() {
                conn.abort().await;
                return Err(RelayError::NoStartTls);
            }
            conn.starttls(tls, &self.client_id)
                .await
                .map_err(|e| RelayError::Connect(describe(&e)))?;
        }
        if let Some(credentials) = &self.credentials {
            conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials)
                .await
                .map_err(|e| RelayError::Auth(describe(&e)))?;
        }
        Ok(RelayConnection {
            conn,
            last_used: Instant::now(),
        })
    }
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
        match self.conn.command(Mail::new(from, params)).await {
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
            match self.conn.command(Rcpt::new(address, vec![])).await {
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
        let data_result = match self.conn.command(Data).await {
            // lettre appends CRLF.CRLF itself; giving it the final CRLF too would add an
            // empty line to every message.
            Ok(_) => {
                self.conn
                    .message(message.strip_suffix(b"\r\n").unwrap_or(message))
                    .await
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
        self.conn
            .command(Rset)
            .await
            .map(|_| ())
            .map_err(|e| RelayError::Broken(describe(&e)))
    }

    /// True if the connection can be used for another message.
    pub fn is_usable(&self) -> bool {
        !self.conn.has_broken()
    }

    /// Says goodbye to the smart host.
    pub async fn quit(mut self) {
        let _ = self.conn.quit().await;
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
