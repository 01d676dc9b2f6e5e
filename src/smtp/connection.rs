//! Drives a [`Session`] over a stream: frames command lines, enforces line limits and
//! timeouts, reads message data, performs the TLS handshake for STARTTLS and port 465, and
//! carries out the I/O the session asks for (AUTH checks, the submission pipeline).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::command::{is_auth_line, MAX_AUTH_LINE, MAX_COMMAND_LINE};
use super::data::{ContentError, ContentReader};
use super::reply::{replies, Reply};
use super::session::{Session, SessionSettings, Step, Submission};
use crate::auth::{AuthFailure, Authenticator};
use crate::config::TimeoutsConfig;
use crate::listener::{ConnectionGuard, ListenerKind};
use crate::message::{ClientInfo, TlsInfo};
use crate::metrics;
use crate::pipeline::{Pipeline, SubmitError};
use crate::policy::sender::FromError;
use crate::reload::{Reloadable, SubmitPolicy};

/// Read size while waiting for commands; small so idle sessions stay small.
const COMMAND_READ: usize = 1024;
/// Read size during DATA and BDAT.
const DATA_READ: usize = 64 * 1024;

/// What every connection of a server shares.
#[derive(Debug)]
pub struct ConnectionContext {
    pub settings: Arc<SessionSettings>,
    /// The server certificate; SIGHUP replaces it, each connection keeps the one it began with.
    pub tls: Reloadable<ServerConfig>,
    pub auth: Arc<Authenticator>,
    pub pipeline: Arc<Pipeline>,
    pub timeouts: TimeoutsConfig,
    pub shutdown: CancellationToken,
}

/// How a session on one stream ended.
enum SessionEnd {
    Closed,
    /// STARTTLS accepted: continue with a handshake on the same socket.
    StartTls,
}

/// Why reading from the client stopped.
enum ReadError {
    Timeout,
    /// The session did not authenticate within `[timeouts] unauthenticated`.
    AuthDeadline,
    Shutdown,
    Closed,
}

/// Serves one accepted connection to the end.
pub async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    ctx: Arc<ConnectionContext>,
    mut guard: ConnectionGuard,
) {
    let _ = stream.set_nodelay(true);
    let started = Instant::now();
    info!(client = %peer.ip(), port = kind.name(), "connected");
    let acceptor = TlsAcceptor::from(ctx.tls.get());
    let policy = ctx.pipeline.policy();
    metrics::connection_opened(kind.name());
    let _open = OpenConnection(kind);
    let implicit = kind == ListenerKind::Submissions;
    if !implicit {
        let mut conn = Connection::new(&mut stream, peer, &ctx, &policy, None, false);
        conn.connected = started;
        match conn.run(&mut guard).await {
            SessionEnd::Closed => {
                info!(client = %peer.ip(), secs = started.elapsed().as_secs(), "closed");
                return;
            }
            SessionEnd::StartTls => {}
        }
    }
    let handshake = tokio::time::timeout(ctx.timeouts.tls_handshake, acceptor.accept(stream)).await;
    let mut tls_stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!(client = %peer.ip(), error = %e, "TLS handshake failed");
            metrics::tls_handshake_failed();
            return;
        }
        Err(_) => {
            warn!(client = %peer.ip(), "TLS handshake timed out");
            metrics::tls_handshake_failed();
            return;
        }
    };
    let (_, tls_conn) = tls_stream.get_ref();
    let tls = TlsInfo {
        version: tls_conn
            .protocol_version()
            .and_then(|v| v.as_str())
            .map_or("TLS", |v| v)
            .replace('_', "."),
        cipher: tls_conn
            .negotiated_cipher_suite()
            .and_then(|c| c.suite().as_str())
            .unwrap_or("unknown")
            .to_owned(),
    };
    debug!(client = %peer.ip(), version = %tls.version, cipher = %tls.cipher, "TLS established");
    let mut conn = Connection::new(&mut tls_stream, peer, &ctx, &policy, Some(tls), implicit);
    conn.connected = started;
    conn.run(&mut guard).await;
    let _ = tokio::time::timeout(ctx.timeouts.command, tls_stream.shutdown()).await;
    info!(client = %peer.ip(), secs = started.elapsed().as_secs(), "closed");
}

/// Counts a connection as open until dropped.
struct OpenConnection(ListenerKind);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::connection_closed(self.0.name());
    }
}

/// One session's worth of I/O state on one stream.
struct Connection<'a, S> {
    stream: &'a mut S,
    peer: SocketAddr,
    ctx: &'a ConnectionContext,
    /// The submission policy as it was when the connection began.
    policy: &'a Arc<SubmitPolicy>,
    session: Session,
    tls: Option<TlsInfo>,
    implicit_tls: bool,
    /// Received, not yet processed bytes start at `start`.
    input: Vec<u8>,
    start: usize,
    output: Vec<u8>,
    /// The message being assembled from BDAT chunks.
    chunked: Option<(ContentReader, Vec<u8>)>,
    login: Option<String>,
    /// When the TCP connection was accepted (before any STARTTLS): the clock of the
    /// unauthenticated deadline.
    connected: Instant,
}

impl<'a, S: AsyncRead + AsyncWrite + Unpin> Connection<'a, S> {
    fn new(
        stream: &'a mut S,
        peer: SocketAddr,
        ctx: &'a ConnectionContext,
        policy: &'a Arc<SubmitPolicy>,
        tls: Option<TlsInfo>,
        implicit_tls: bool,
    ) -> Self {
        Self {
            stream,
            peer,
            ctx,
            policy,
            session: Session::new(Arc::clone(&ctx.settings), tls.is_some()),
            tls,
            implicit_tls,
            input: Vec::new(),
            start: 0,
            output: Vec::new(),
            chunked: None,
            login: None,
            connected: Instant::now(),
        }
    }

    async fn run(&mut self, guard: &mut ConnectionGuard) -> SessionEnd {
        // After STARTTLS the client speaks first (EHLO); the greeting is sent only on a fresh
        // connection (RFC 3207: the session starts over, without a new banner).
        if self.tls.is_none() || self.implicit_tls {
            let greeting = self.session.greeting();
            self.queue_reply(&greeting);
        }
        loop {
            let line = match self.next_line().await {
                Ok(Some(line)) => line,
                Ok(None) => {
                    let step = self.session.line_too_long();
                    if self.apply(step, guard).await {
                        continue;
                    }
                    return SessionEnd::Closed;
                }
                Err(e) => {
                    self.read_failed(e).await;
                    return SessionEnd::Closed;
                }
            };
            let step = self.session.handle_line(&line);
            if !self.session.in_transaction() {
                // RSET or EHLO ended a BDAT transaction: do not keep its partial message.
                self.chunked = None;
            }
            if let Step::StartTls(reply) = step {
                self.queue_reply(&reply);
                if self.flush().await.is_err() {
                    return SessionEnd::Closed;
                }
                // Anything pipelined after STARTTLS arrived in plaintext and must never be
                // answered inside the TLS session (CVE-2011-0411).
                let pipelined = self.input.len() - self.start;
                if pipelined > 0 {
                    warn!(client = %self.peer.ip(), bytes = pipelined, "discarded input pipelined after STARTTLS");
                }
                return SessionEnd::StartTls;
            }
            if !self.apply(step, guard).await {
                return SessionEnd::Closed;
            }
        }
    }

    /// Carries out one step and the steps that follow from it; false when the session is over.
    async fn apply(&mut self, mut step: Step, guard: &mut ConnectionGuard) -> bool {
        loop {
            step = match step {
                Step::Reply(reply) => {
                    self.queue_reply(&reply);
                    return true;
                }
                Step::Close(reply) => {
                    self.close_with(&reply).await;
                    return false;
                }
                Step::StartTls(_) => {
                    // Only reachable from `run`, which handles it itself.
                    return false;
                }
                Step::Verify(credentials) => {
                    if self.flush().await.is_err() {
                        return false;
                    }
                    let result = self
                        .ctx
                        .auth
                        .authenticate(&credentials, self.peer.ip())
                        .await;
                    match &result {
                        Ok(identity) => {
                            guard.mark_authenticated();
                            self.login = Some(identity.login.to_string());
                            metrics::auth("ok");
                            info!(client = %self.peer.ip(), user = %identity.login, "authenticated");
                        }
                        Err(e) => {
                            metrics::auth(match e {
                                AuthFailure::InvalidCredentials => "failed",
                                AuthFailure::Throttled => "throttled",
                                AuthFailure::Unavailable => "unavailable",
                            });
                            info!(client = %self.peer.ip(), user = ?credentials.login(), reason = %e, "authentication refused")
                        }
                    }
                    self.session.auth_result(result)
                }
                Step::ReceiveData(reply) => {
                    self.queue_reply(&reply);
                    if self.flush().await.is_err() {
                        return false;
                    }
                    match self.read_data().await {
                        Ok((reader, message)) => self.message_complete(&reader, message).await,
                        Err(e) => return self.read_failed(e).await,
                    }
                }
                Step::ReceiveChunk { size, last, first } => {
                    if first {
                        self.chunked = None;
                    }
                    if let Err(e) = self.read_chunk(size).await {
                        return self.read_failed(e).await;
                    }
                    if !last {
                        self.session.chunk_received(size)
                    } else {
                        let (mut reader, mut message) = self.chunked.take().unwrap_or_else(|| {
                            (
                                ContentReader::chunked(self.ctx.settings.max_message_size),
                                Vec::new(),
                            )
                        });
                        reader.finish_chunked(&mut message);
                        self.message_complete(&reader, message).await
                    }
                }
                Step::DiscardChunk { size, reply } => {
                    if let Err(e) = self.discard(size).await {
                        return self.read_failed(e).await;
                    }
                    self.chunked = None;
                    Step::Reply(reply)
                }
                // The session asks for a submission only from `data_received`, which
                // `message_complete` handles with the message in hand.
                Step::Submit(_) => Step::Reply(replies::temporary_failure()),
            };
        }
    }

    async fn read_failed(&mut self, error: ReadError) -> bool {
        match error {
            ReadError::Timeout => {
                let reply = self.session.timed_out();
                self.close_with(&reply).await;
                info!(client = %self.peer.ip(), "idle timeout");
            }
            ReadError::AuthDeadline => {
                self.close_with(&replies::auth_deadline()).await;
                info!(client = %self.peer.ip(), "no authentication in time");
            }
            ReadError::Shutdown => self.close_with(&replies::shutting_down()).await,
            ReadError::Closed => {}
        }
        false
    }

    /// Reports the end of message content; submits the message when the session accepts it.
    async fn message_complete(&mut self, reader: &ContentReader, message: Vec<u8>) -> Step {
        if let Err(e) = reader.result() {
            metrics::message_refused(match e {
                ContentError::TooBig => "size",
                ContentError::BareLineEnding => "smuggling",
                ContentError::LineTooLong => "line_length",
            });
        }
        match self.session.data_received(reader.result()) {
            Step::Submit(submission) => self.submit(&submission, message).await,
            other => other,
        }
    }

    /// Runs an accepted message through the pipeline and reports the outcome to the session.
    async fn submit(&mut self, submission: &Submission, message: Vec<u8>) -> Step {
        if self.flush().await.is_err() {
            return Step::Close(replies::temporary_failure());
        }
        let client = ClientInfo {
            address: self.peer.ip(),
            ehlo: submission.ehlo.clone(),
            tls: self.tls.clone(),
            implicit_tls: self.implicit_tls,
        };
        let size = message.len();
        let started = Instant::now();
        let result = self
            .ctx
            .pipeline
            .submit(self.policy, submission, &client, message)
            .await;
        match &result {
            Ok(id) => {
                metrics::message_accepted(size, started.elapsed());
                info!(
                queue_id = %id,
                client = %self.peer.ip(),
                user = %submission.identity.login,
                size,
                recipients = submission.envelope.recipients.len(),
                ms = started.elapsed().as_millis() as u64,
                "message accepted"
                )
            }
            Err(e) => {
                metrics::message_refused(match e {
                    SubmitError::From(FromError::NotOwned(_)) => "sender_mismatch",
                    SubmitError::From(_) => "policy",
                    _ => "temporary",
                });
                warn!(
                    client = %self.peer.ip(),
                    user = %submission.identity.login,
                    error = %e,
                    "message refused"
                )
            }
        }
        self.session.submitted(result.map_err(|e| e.reply()))
    }

    /// The next complete line, `Ok(None)` for a line over the limit (already skipped).
    async fn next_line(&mut self) -> Result<Option<Vec<u8>>, ReadError> {
        let mut skipping = false;
        loop {
            let pending = &self.input[self.start..];
            let limit = if self.session.expects_sasl_line() || is_auth_line(pending) {
                MAX_AUTH_LINE
            } else {
                MAX_COMMAND_LINE
            };
            if let Some(pos) = memchr::memmem::find(pending, b"\r\n") {
                let end = self.start + pos + 2;
                let too_long = skipping || pos + 2 > limit;
                let line = if too_long {
                    None
                } else {
                    Some(self.input[self.start..end].to_vec())
                };
                self.start = end;
                return Ok(line);
            }
            if pending.len() > limit {
                // Keep only a trailing CR, which may start the CRLF we are looking for.
                skipping = true;
                let keep = usize::from(pending.last() == Some(&b'\r'));
                self.start = self.input.len() - keep;
            }
            self.flush().await.map_err(|_| ReadError::Closed)?;
            self.fill(COMMAND_READ, self.ctx.timeouts.command, true)
                .await?;
        }
    }

    /// Reads more input, waiting at most `timeout`; on shutdown only if `interruptible`.
    async fn fill(
        &mut self,
        want: usize,
        timeout: Duration,
        interruptible: bool,
    ) -> Result<(), ReadError> {
        if self.start > 0 {
            self.input.drain(..self.start);
            self.start = 0;
        }
        if self.input.is_empty() && self.input.capacity() > 4 * COMMAND_READ {
            // Give back a large DATA buffer once the session goes idle again.
            self.input = Vec::new();
        }
        self.input.reserve(want);
        // Before AUTH the whole session has a deadline too, so that a client trickling a
        // byte now and then cannot hold an unauthenticated slot for ever.
        let mut timeout = timeout;
        let mut deadline_bound = false;
        if !self.session.is_authenticated() {
            let left = self
                .ctx
                .timeouts
                .unauthenticated
                .saturating_sub(self.connected.elapsed());
            if left.is_zero() {
                return Err(ReadError::AuthDeadline);
            }
            if left < timeout {
                timeout = left;
                deadline_bound = true;
            }
        }
        let read = self.stream.read_buf(&mut self.input);
        let n = if interruptible {
            tokio::select! {
                r = tokio::time::timeout(timeout, read) => r,
                _ = self.ctx.shutdown.cancelled() => return Err(ReadError::Shutdown),
            }
        } else {
            tokio::time::timeout(timeout, read).await
        };
        match n {
            Err(_) if deadline_bound => Err(ReadError::AuthDeadline),
            Err(_) => Err(ReadError::Timeout),
            Ok(Ok(0)) | Ok(Err(_)) => Err(ReadError::Closed),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Reads DATA content up to CRLF.CRLF.
    async fn read_data(&mut self) -> Result<(ContentReader, Vec<u8>), ReadError> {
        let mut reader = ContentReader::dot_stuffed(self.ctx.settings.max_message_size);
        let mut message = self.message_buffer();
        loop {
            let pending = &self.input[self.start..];
            if let Some(consumed) = reader.feed(pending, &mut message) {
                self.start += consumed;
                return Ok((reader, message));
            }
            self.start = self.input.len();
            self.fill(DATA_READ, self.ctx.timeouts.data, false).await?;
        }
    }

    /// An empty message buffer, sized from the client's `SIZE=` estimate (with some slack)
    /// so that a large message is not copied over and over while its buffer doubles.
    fn message_buffer(&self) -> Vec<u8> {
        Vec::with_capacity(self.initial_capacity())
    }

    fn initial_capacity(&self) -> usize {
        let max = self.ctx.settings.max_message_size;
        let estimate = self.session.declared_size().unwrap_or(0).min(max);
        estimate
            .saturating_add(estimate / 16 + 4096)
            .min(max + 4096)
    }

    /// Reads one BDAT chunk into the message being assembled.
    async fn read_chunk(&mut self, mut size: usize) -> Result<(), ReadError> {
        let max = self.ctx.settings.max_message_size;
        let initial = self.initial_capacity().max(size.min(max) + 4096);
        let (reader, message) = self
            .chunked
            .get_or_insert_with(|| (ContentReader::chunked(max), Vec::new()));
        if message.capacity() == 0 {
            *message = Vec::with_capacity(initial);
        }
        let mut reader = std::mem::replace(reader, ContentReader::chunked(max));
        let mut message = std::mem::take(message);
        let result = loop {
            let pending = &self.input[self.start..];
            let take = pending.len().min(size);
            reader.feed(&pending[..take], &mut message);
            self.start += take;
            size -= take;
            if size == 0 {
                break Ok(());
            }
            if let Err(e) = self.fill(DATA_READ, self.ctx.timeouts.data, false).await {
                break Err(e);
            }
        };
        self.chunked = Some((reader, message));
        result
    }

    /// Reads and drops `size` octets.
    async fn discard(&mut self, mut size: usize) -> Result<(), ReadError> {
        loop {
            let take = (self.input.len() - self.start).min(size);
            self.start += take;
            size -= take;
            if size == 0 {
                return Ok(());
            }
            self.fill(DATA_READ, self.ctx.timeouts.data, false).await?;
        }
    }

    fn queue_reply(&mut self, reply: &Reply) {
        if reply.is_error() {
            debug!(client = %self.peer.ip(), user = self.login.as_deref().unwrap_or("-"), reply = %reply, "refused");
        }
        reply.write_to(&mut self.output);
    }

    /// Sends the queued replies. A client that stops reading gets the command timeout, not
    /// a connection slot held forever.
    async fn flush(&mut self) -> std::io::Result<()> {
        if self.output.is_empty() {
            return Ok(());
        }
        let deadline = self.ctx.timeouts.command;
        let result = tokio::time::timeout(deadline, async {
            self.stream.write_all(&self.output).await?;
            self.stream.flush().await
        })
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
        self.output.clear();
        if self.output.capacity() > 4 * COMMAND_READ {
            self.output = Vec::new();
        }
        result
    }

    async fn close_with(&mut self, reply: &Reply) {
        self.queue_reply(reply);
        if self.flush().await.is_ok() {
            let _ = tokio::time::timeout(self.ctx.timeouts.command, self.stream.shutdown()).await;
        }
    }
}
