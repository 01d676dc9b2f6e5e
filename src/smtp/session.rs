//! The SMTP session as a pure state machine: a command line goes in, a [`Step`] comes out.
//!
//! The session never touches a socket, a clock or the database. Whatever needs I/O (checking a
//! password, reading message data, queueing a message, the TLS handshake) is returned as a
//! [`Step`] for the connection loop to carry out, which then reports the result back. That
//! keeps every rule of RFC 5321, 3207, 4954 and 6409 testable with plain values.

use std::borrow::Cow;
use std::sync::Arc;

use smtp_proto::{
    EhloResponse, AUTH_LOGIN, AUTH_PLAIN, EXT_8BIT_MIME, EXT_AUTH, EXT_CHUNKING,
    EXT_ENHANCED_STATUS_CODES, EXT_PIPELINING, EXT_SIZE, EXT_SMTP_UTF8, EXT_START_TLS,
};

use super::command::{self, Command, Mechanism};
use super::data::ContentError;
use super::reply::{replies, Reply};
use crate::auth::sasl::{self, Credentials, SaslError};
use crate::auth::AuthFailure;
use crate::message::{Address, Envelope, Identity, QueueId};
use crate::policy::sender;

/// Limits and names a session needs; shared by all sessions of a listener.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub hostname: String,
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub max_errors: u32,
}

/// What the connection loop must do next.
#[derive(Debug)]
pub enum Step {
    /// Send this reply and read the next command.
    Reply(Reply),
    /// Send this reply and close the connection.
    Close(Reply),
    /// Send this reply (220), drop any pipelined input, then do the TLS handshake and start
    /// a new session on the encrypted stream.
    StartTls(Reply),
    /// Check these credentials and report with [`Session::auth_result`].
    Verify(Credentials),
    /// Send this reply (354), read dot-stuffed data, report with [`Session::data_received`].
    ReceiveData(Reply),
    /// Read a BDAT chunk of `size` octets into the message; report with
    /// [`Session::chunk_received`].
    ReceiveChunk {
        size: usize,
        last: bool,
        /// The first chunk of a new message: any earlier partial message is dropped.
        first: bool,
    },
    /// Read and throw away a BDAT chunk of `size` octets, then send the reply.
    DiscardChunk { size: usize, reply: Reply },
    /// Run the message through the pipeline; report with [`Session::submitted`].
    Submit(Box<Submission>),
}

/// A complete transaction, handed to the submission pipeline.
#[derive(Debug, Clone)]
pub struct Submission {
    pub envelope: Envelope,
    pub identity: Identity,
    pub ehlo: String,
}

/// A SASL exchange waiting for the client's next line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SaslExchange {
    /// PLAIN after an empty 334: the next line is the whole response.
    Plain,
    /// LOGIN: the next line is the username.
    LoginUser,
    /// LOGIN: the next line is the password.
    LoginPassword { login: String },
    /// The credentials are being checked; no line is expected.
    Verifying,
}

/// An open mail transaction.
#[derive(Debug, Clone)]
struct Transaction {
    sender: String,
    recipients: Vec<String>,
    /// The client's `SIZE=` estimate, if it gave one.
    declared_size: Option<usize>,
    /// MAIL carried `SMTPUTF8`: recipients may have non-ASCII addresses.
    smtputf8: bool,
    /// BDAT chunks have started; DATA is no longer allowed.
    chunking: bool,
}

/// Where the session is. Each phase carries exactly what is known in it.
#[derive(Debug, Clone)]
enum Phase {
    /// Before EHLO/HELO.
    Connected,
    /// After EHLO/HELO, not authenticated.
    Greeted {
        ehlo: String,
        extended: bool,
        sasl: Option<SaslExchange>,
    },
    /// Authenticated, no transaction.
    Authenticated { ehlo: String, identity: Identity },
    /// MAIL accepted.
    Transaction {
        ehlo: String,
        identity: Identity,
        tx: Transaction,
    },
    /// QUIT or a fatal error; nothing more is read.
    Closed,
}

/// One SMTP session, from greeting (or from the TLS handshake after STARTTLS) to close.
#[derive(Debug)]
pub struct Session {
    settings: Arc<SessionSettings>,
    /// True once the stream is encrypted (always on the implicit-TLS port).
    tls: bool,
    phase: Phase,
    errors: u32,
}

impl Session {
    /// A new session; `tls` is true on port 465 and after STARTTLS.
    pub fn new(settings: Arc<SessionSettings>, tls: bool) -> Self {
        Self {
            settings,
            tls,
            phase: Phase::Connected,
            errors: 0,
        }
    }

    /// The 220 banner.
    pub fn greeting(&self) -> Reply {
        Reply::plain(220, format!("{} ESMTP submitd", self.settings.hostname))
    }

    /// True after a successful AUTH.
    pub fn is_authenticated(&self) -> bool {
        matches!(
            self.phase,
            Phase::Authenticated { .. } | Phase::Transaction { .. }
        )
    }

    /// True while a SASL exchange waits for the client, so the longer AUTH line limit applies.
    pub fn expects_sasl_line(&self) -> bool {
        matches!(
            self.phase,
            Phase::Greeted {
                sasl: Some(
                    SaslExchange::Plain
                        | SaslExchange::LoginUser
                        | SaslExchange::LoginPassword { .. }
                ),
                ..
            }
        )
    }

    /// True while a mail transaction is open.
    pub fn in_transaction(&self) -> bool {
        matches!(self.phase, Phase::Transaction { .. })
    }

    /// The message size the client declared with `SIZE=` for the open transaction.
    pub fn declared_size(&self) -> Option<usize> {
        match &self.phase {
            Phase::Transaction { tx, .. } => tx.declared_size,
            _ => None,
        }
    }

    /// True once the session is over.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// The reply when the client has been idle too long.
    pub fn timed_out(&mut self) -> Reply {
        self.phase = Phase::Closed;
        replies::idle_timeout()
    }

    /// A reply for a line that broke a length limit before it could be parsed.
    pub fn line_too_long(&mut self) -> Step {
        if self.expects_sasl_line() {
            self.end_sasl();
        }
        self.refuse(replies::line_too_long())
    }

    /// Handles one complete input line (CRLF included).
    pub fn handle_line(&mut self, line: &[u8]) -> Step {
        if self.expects_sasl_line() {
            return self.sasl_line(line);
        }
        match command::parse(line) {
            Ok(command) => self.command(command),
            Err(reply) => self.refuse(reply),
        }
    }

    fn command(&mut self, command: Command) -> Step {
        match command {
            Command::Ehlo(host) => self.hello(host, true),
            Command::Helo(host) => self.hello(host, false),
            Command::StartTls => self.starttls(),
            Command::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, initial_response),
            Command::Mail {
                address,
                size,
                smtputf8,
            } => self.mail(address, size, smtputf8),
            Command::Rcpt { address } => self.rcpt(address),
            Command::Data => self.data(),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Rset => {
                self.reset_transaction();
                Step::Reply(replies::ok())
            }
            Command::Noop => Step::Reply(replies::ok()),
            Command::Quit => {
                self.phase = Phase::Closed;
                Step::Close(Reply::new(221, (2, 0, 0), "Bye"))
            }
            Command::Help => Step::Reply(Reply::new(
                214,
                (2, 0, 0),
                "submitd: mail submission (RFC 6409); see your administrator",
            )),
            Command::Vrfy => Step::Reply(Reply::new(
                252,
                (2, 5, 0),
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Command::Expn => self.refuse(Reply::new(502, (5, 5, 1), "EXPN not available")),
            Command::NotOffered(_) => {
                self.refuse(Reply::new(502, (5, 5, 1), "Command not implemented"))
            }
        }
    }

    fn hello(&mut self, host: String, extended: bool) -> Step {
        // EHLO ends any transaction (RFC 5321 4.1.4) but keeps the authentication.
        self.phase = match std::mem::replace(&mut self.phase, Phase::Connected) {
            Phase::Authenticated { identity, .. } | Phase::Transaction { identity, .. } => {
                Phase::Authenticated {
                    ehlo: host,
                    identity,
                }
            }
            _ => Phase::Greeted {
                ehlo: host,
                extended,
                sasl: None,
            },
        };
        if !extended {
            return Step::Reply(Reply::plain(250, self.settings.hostname.clone()));
        }
        Step::Reply(self.ehlo_reply())
    }

    /// The EHLO reply; built with smtp-proto's generator.
    fn ehlo_reply(&self) -> Reply {
        let mut ehlo = EhloResponse::new(self.settings.hostname.as_str());
        ehlo.capabilities = EXT_PIPELINING | EXT_SIZE | EXT_8BIT_MIME | EXT_ENHANCED_STATUS_CODES;
        ehlo.size = self.settings.max_message_size;
        if self.tls {
            ehlo.capabilities |= EXT_SMTP_UTF8 | EXT_CHUNKING | EXT_AUTH;
            ehlo.auth_mechanisms = AUTH_PLAIN | AUTH_LOGIN;
        } else {
            ehlo.capabilities |= EXT_START_TLS;
        }
        let mut wire = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = ehlo.write(&mut wire);
        // smtp-proto's first line carries a joke after the hostname; ours is the name alone.
        let lines = std::iter::once(Cow::Owned(self.settings.hostname.clone()))
            .chain(
                String::from_utf8_lossy(&wire)
                    .split("\r\n")
                    .skip(1)
                    .filter(|l| l.len() > 4)
                    .map(|l| Cow::Owned(l[4..].to_owned())),
            )
            .collect();
        Reply::multiline(250, lines)
    }

    fn starttls(&mut self) -> Step {
        if self.tls {
            return self.refuse(replies::bad_sequence("TLS already active"));
        }
        // RFC 3207: the session starts over on the encrypted stream.
        self.phase = Phase::Closed;
        Step::StartTls(Reply::new(220, (2, 0, 0), "Ready to start TLS"))
    }

    fn auth(&mut self, mechanism: Option<Mechanism>, initial: Option<String>) -> Step {
        if !self.tls {
            return self.refuse(replies::must_starttls());
        }
        match &self.phase {
            Phase::Connected => return self.refuse(replies::bad_sequence("Send EHLO first")),
            Phase::Greeted {
                extended: false, ..
            } => return self.refuse(replies::bad_sequence("Send EHLO first")),
            Phase::Authenticated { .. } | Phase::Transaction { .. } => {
                return self.refuse(replies::bad_sequence("Already authenticated"))
            }
            Phase::Greeted { .. } | Phase::Closed => {}
        }
        let Some(mechanism) = mechanism else {
            return self.refuse(Reply::new(
                504,
                (5, 5, 4),
                "Unrecognized authentication mechanism",
            ));
        };
        match (mechanism, initial) {
            (Mechanism::Plain, None) => {
                self.set_sasl(Some(SaslExchange::Plain));
                Step::Reply(Reply::plain(334, ""))
            }
            (Mechanism::Plain, Some(response)) => self.plain_response(response.as_bytes()),
            (Mechanism::Login, None) => {
                self.set_sasl(Some(SaslExchange::LoginUser));
                Step::Reply(Reply::plain(334, sasl::LOGIN_USERNAME_PROMPT))
            }
            (Mechanism::Login, Some(response)) => self.login_username(response.as_bytes()),
        }
    }

    fn sasl_line(&mut self, line: &[u8]) -> Step {
        let response = line.strip_suffix(b"\r\n").unwrap_or(line);
        let exchange = match &self.phase {
            Phase::Greeted { sasl: Some(s), .. } => s.clone(),
            _ => return self.refuse(replies::bad_sequence("No authentication in progress")),
        };
        match exchange {
            SaslExchange::Plain => self.plain_response(response),
            SaslExchange::LoginUser => self.login_username(response),
            SaslExchange::LoginPassword { login } => match sasl::decode_login_field(response) {
                Ok(password) => self.verify(Credentials::new(login, password)),
                Err(e) => self.sasl_failed(e),
            },
            SaslExchange::Verifying => {
                self.refuse(replies::bad_sequence("Authentication in progress"))
            }
        }
    }

    fn plain_response(&mut self, response: &[u8]) -> Step {
        match sasl::decode_plain(response) {
            Ok(credentials) => self.verify(credentials),
            Err(e) => self.sasl_failed(e),
        }
    }

    fn login_username(&mut self, response: &[u8]) -> Step {
        match sasl::decode_login_field(response) {
            Ok(login) => {
                self.set_sasl(Some(SaslExchange::LoginPassword { login }));
                Step::Reply(Reply::plain(334, sasl::LOGIN_PASSWORD_PROMPT))
            }
            Err(e) => self.sasl_failed(e),
        }
    }

    fn verify(&mut self, credentials: Credentials) -> Step {
        self.set_sasl(Some(SaslExchange::Verifying));
        Step::Verify(credentials)
    }

    fn sasl_failed(&mut self, error: SaslError) -> Step {
        self.end_sasl();
        self.refuse(error.reply())
    }

    /// Reports the result of a [`Step::Verify`].
    pub fn auth_result(&mut self, result: Result<Identity, AuthFailure>) -> Step {
        let ehlo = match &self.phase {
            Phase::Greeted {
                ehlo,
                sasl: Some(SaslExchange::Verifying),
                ..
            } => ehlo.clone(),
            _ => return self.refuse(replies::bad_sequence("No authentication in progress")),
        };
        match result {
            Ok(identity) => {
                self.phase = Phase::Authenticated { ehlo, identity };
                Step::Reply(Reply::new(235, (2, 7, 0), "Authentication successful"))
            }
            Err(failure) => {
                self.end_sasl();
                self.refuse(failure.reply())
            }
        }
    }

    fn mail(&mut self, address: String, size: Option<usize>, smtputf8: bool) -> Step {
        if !self.tls {
            return self.refuse(replies::must_starttls());
        }
        let identity = match &self.phase {
            Phase::Connected => return self.refuse(replies::bad_sequence("Send EHLO first")),
            Phase::Greeted { .. } | Phase::Closed => return self.refuse(replies::auth_required()),
            Phase::Transaction { .. } => {
                return self.refuse(replies::bad_sequence("Nested MAIL command"))
            }
            Phase::Authenticated { identity, .. } => identity,
        };
        if size.is_some_and(|s| s > self.settings.max_message_size) {
            return self.refuse(replies::too_big());
        }
        if !address.is_ascii() && !smtputf8 {
            return self.refuse(replies::needs_smtputf8());
        }
        if !address.is_empty() {
            let owned = match Address::parse(&address) {
                Ok(parsed) => sender::may_send_as(identity, &parsed),
                Err(_) => {
                    return self.refuse(Reply::new(501, (5, 1, 7), "Bad sender address syntax"))
                }
            };
            if !owned {
                return self.refuse(Reply::new(
                    550,
                    (5, 7, 1),
                    "Sender address not owned by the authenticated user",
                ));
            }
        }
        if let Phase::Authenticated { ehlo, identity } =
            std::mem::replace(&mut self.phase, Phase::Closed)
        {
            self.phase = Phase::Transaction {
                ehlo,
                identity,
                tx: Transaction {
                    sender: address,
                    declared_size: size,
                    smtputf8,
                    recipients: Vec::new(),
                    chunking: false,
                },
            };
        }
        Step::Reply(Reply::new(250, (2, 1, 0), "Sender OK"))
    }

    fn rcpt(&mut self, address: String) -> Step {
        if !self.tls {
            return self.refuse(replies::must_starttls());
        }
        let max = self.settings.max_recipients;
        let tx = match &mut self.phase {
            Phase::Transaction { tx, .. } => tx,
            Phase::Authenticated { .. } => {
                return self.refuse(replies::bad_sequence("Need MAIL before RCPT"))
            }
            Phase::Connected => return self.refuse(replies::bad_sequence("Send EHLO first")),
            Phase::Greeted { .. } | Phase::Closed => return self.refuse(replies::auth_required()),
        };
        if tx.recipients.len() >= max {
            return self.refuse(Reply::new(452, (4, 5, 3), "Too many recipients"));
        }
        if !address.is_ascii() && !tx.smtputf8 {
            return self.refuse(replies::needs_smtputf8());
        }
        if Address::parse(&address).is_err() {
            return self.refuse(Reply::new(501, (5, 1, 3), "Bad recipient address syntax"));
        }
        tx.recipients.push(address);
        Step::Reply(Reply::new(250, (2, 1, 5), "Recipient OK"))
    }

    /// Checks that a transaction can take message data now; true for the first BDAT chunk.
    fn ready_for_content(&mut self, bdat: bool) -> Result<bool, Reply> {
        if !self.tls {
            return Err(replies::must_starttls());
        }
        match &mut self.phase {
            Phase::Transaction { tx, .. } if tx.recipients.is_empty() => {
                Err(replies::bad_sequence("Need RCPT before DATA"))
            }
            Phase::Transaction { tx, .. } if tx.chunking && !bdat => {
                Err(replies::bad_sequence("DATA not allowed after BDAT"))
            }
            Phase::Transaction { tx, .. } => {
                let first = bdat && !tx.chunking;
                tx.chunking |= bdat;
                Ok(first)
            }
            Phase::Authenticated { .. } => Err(replies::bad_sequence("Need MAIL before DATA")),
            Phase::Connected => Err(replies::bad_sequence("Send EHLO first")),
            Phase::Greeted { .. } | Phase::Closed => Err(replies::auth_required()),
        }
    }

    fn data(&mut self) -> Step {
        match self.ready_for_content(false) {
            Ok(_) => Step::ReceiveData(Reply::plain(354, "End data with <CR><LF>.<CR><LF>")),
            Err(reply) => self.refuse(reply),
        }
    }

    fn bdat(&mut self, size: usize, last: bool) -> Step {
        match self.ready_for_content(true) {
            Ok(first) => Step::ReceiveChunk { size, last, first },
            Err(reply) => {
                // The chunk follows the command whatever we answer; it must not be read as
                // commands.
                let reply = match self.refuse(reply) {
                    Step::Reply(r) => r,
                    other => return other,
                };
                Step::DiscardChunk { size, reply }
            }
        }
    }

    /// Reports a non-final BDAT chunk as read.
    pub fn chunk_received(&mut self, size: usize) -> Step {
        Step::Reply(Reply::new(
            250,
            (2, 0, 0),
            format!("{size} octets received"),
        ))
    }

    /// Reports the end of message data (after DATA, or after BDAT LAST).
    pub fn data_received(&mut self, result: Result<(), ContentError>) -> Step {
        let Phase::Transaction { ehlo, identity, tx } =
            std::mem::replace(&mut self.phase, Phase::Closed)
        else {
            return self.refuse(replies::bad_sequence("No transaction"));
        };
        self.phase = Phase::Authenticated {
            ehlo: ehlo.clone(),
            identity: identity.clone(),
        };
        let refusal = match result {
            Ok(()) => {
                return Step::Submit(Box::new(Submission {
                    envelope: Envelope {
                        sender: tx.sender,
                        recipients: tx.recipients,
                    },
                    identity,
                    ehlo,
                }))
            }
            Err(ContentError::TooBig) => replies::too_big(),
            Err(ContentError::BareLineEnding) => Reply::new(
                550,
                (5, 6, 0),
                "Message refused: bare CR, bare LF or NUL in message content",
            ),
            Err(ContentError::LineTooLong) => Reply::new(
                550,
                (5, 6, 0),
                "Message refused: line longer than 998 octets",
            ),
        };
        self.refuse(refusal)
    }

    /// Reports the outcome of a [`Step::Submit`].
    pub fn submitted(&mut self, result: Result<QueueId, Reply>) -> Step {
        match result {
            Ok(id) => Step::Reply(Reply::new(250, (2, 0, 0), format!("Ok: queued as {id}"))),
            Err(reply) => self.refuse(reply),
        }
    }

    /// RSET: ends an open transaction; every other phase (greeting, authentication) stays.
    fn reset_transaction(&mut self) {
        if !matches!(self.phase, Phase::Transaction { .. }) {
            return;
        }
        if let Phase::Transaction { ehlo, identity, .. } =
            std::mem::replace(&mut self.phase, Phase::Closed)
        {
            self.phase = Phase::Authenticated { ehlo, identity };
        }
    }

    fn set_sasl(&mut self, exchange: Option<SaslExchange>) {
        if let Phase::Greeted { sasl, .. } = &mut self.phase {
            *sasl = exchange;
        }
    }

    fn end_sasl(&mut self) {
        self.set_sasl(None);
    }

    /// Counts a refusal; past `max_errors` the session ends with 421 4.7.0 instead.
    fn refuse(&mut self, reply: Reply) -> Step {
        self.errors += 1;
        if self.errors > self.settings.max_errors {
            self.phase = Phase::Closed;
            return Step::Close(replies::too_many_errors());
        }
        Step::Reply(reply)
    }
}

impl AuthFailure {
    /// The reply the client sees; the cause goes to the log.
    pub fn reply(&self) -> Reply {
        match self {
            AuthFailure::InvalidCredentials => {
                Reply::new(535, (5, 7, 8), "Authentication credentials invalid")
            }
            AuthFailure::Throttled => Reply::new(
                454,
                (4, 7, 0),
                "Too many failed authentication attempts, try again later",
            ),
            AuthFailure::Unavailable => {
                Reply::new(454, (4, 7, 0), "Temporary authentication failure")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Arc<SessionSettings> {
        Arc::new(SessionSettings {
            hostname: "mx.example.org".into(),
            max_message_size: 10_000,
            max_recipients: 2,
            max_errors: 5,
        })
    }

    fn alice() -> Identity {
        Identity {
            user_id: 1,
            login: Address::parse("alice@example.org").unwrap(),
            allowed: vec!["@alice.example".into()],
            received: None,
        }
    }

    /// Feeds a line and returns the reply's code and enhanced code, or 0 for other steps.
    fn reply_of(step: &Step) -> (u16, Option<(u8, u16, u16)>) {
        match step {
            Step::Reply(r) | Step::Close(r) | Step::StartTls(r) | Step::ReceiveData(r) => {
                (r.code, r.enhanced)
            }
            Step::DiscardChunk { reply, .. } => (reply.code, reply.enhanced),
            _ => (0, None),
        }
    }

    fn line(s: &mut Session, l: &str) -> Step {
        s.handle_line(format!("{l}\r\n").as_bytes())
    }

    fn authenticated() -> Session {
        let mut s = Session::new(settings(), true);
        line(&mut s, "EHLO client");
        assert!(matches!(
            line(&mut s, "AUTH PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHNlY3JldA=="),
            Step::Verify(_)
        ));
        assert_eq!(
            reply_of(&s.auth_result(Ok(alice()))),
            (235, Some((2, 7, 0)))
        );
        s
    }

    #[test]
    fn plaintext_session_only_offers_starttls() {
        let mut s = Session::new(settings(), false);
        let Step::Reply(ehlo) = line(&mut s, "EHLO client") else {
            panic!()
        };
        let caps = ehlo.lines.join("\n");
        assert!(caps.contains("STARTTLS"));
        assert!(!caps.contains("AUTH"));
        for cmd in [
            "AUTH PLAIN",
            "MAIL FROM:<alice@example.org>",
            "RCPT TO:<b@example.net>",
            "DATA",
            "BDAT 5 LAST",
        ] {
            assert_eq!(
                reply_of(&line(&mut s, cmd)),
                (530, Some((5, 7, 0))),
                "{cmd}"
            );
        }
        assert!(matches!(line(&mut s, "STARTTLS"), Step::StartTls(_)));
    }

    #[test]
    fn tls_session_advertises_the_msa_extensions() {
        let mut s = Session::new(settings(), true);
        let Step::Reply(ehlo) = line(&mut s, "EHLO client") else {
            panic!()
        };
        assert_eq!(ehlo.lines[0], "mx.example.org");
        let caps = ehlo.lines[1..].to_vec();
        for want in [
            "PIPELINING",
            "SIZE 10000",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "CHUNKING",
            "AUTH PLAIN LOGIN",
        ] {
            assert!(caps.iter().any(|c| c == want), "{want} in {caps:?}");
        }
        for absent in ["STARTTLS", "ETRN", "VRFY", "EXPN"] {
            assert!(!caps.iter().any(|c| c.starts_with(absent)), "{absent}");
        }
    }

    #[test]
    fn mail_before_auth_is_refused_at_mail() {
        let mut s = Session::new(settings(), true);
        line(&mut s, "EHLO client");
        assert_eq!(
            reply_of(&line(&mut s, "MAIL FROM:<alice@example.org>")),
            (530, Some((5, 7, 0)))
        );
        assert_eq!(
            reply_of(&line(&mut s, "RCPT TO:<b@example.net>")),
            (530, Some((5, 7, 0)))
        );
    }

    /// Lines sent and the expected reply code and enhanced code of the last one.
    type Exchange = (&'static [&'static str], (u16, Option<(u8, u16, u16)>));

    #[test]
    fn sasl_edge_cases() {
        let table: &[Exchange] = &[
            (&["AUTH PLAIN", "*"], (501, Some((5, 0, 0)))),
            (&["AUTH LOGIN", "*"], (501, Some((5, 0, 0)))),
            (&["AUTH PLAIN !!!notbase64"], (501, Some((5, 5, 2)))),
            (&["AUTH CRAM-MD5"], (504, Some((5, 5, 4)))),
            (&["AUTH XFOO"], (504, Some((5, 5, 4)))),
            // authzid "bob" differs from authcid "alice@example.org"
            (
                &["AUTH PLAIN Ym9iAGFsaWNlQGV4YW1wbGUub3JnAHNlY3JldA=="],
                (535, Some((5, 7, 8))),
            ),
        ];
        for (lines, want) in table {
            let mut s = Session::new(settings(), true);
            line(&mut s, "EHLO client");
            let mut last = Step::Reply(replies::ok());
            for l in *lines {
                last = line(&mut s, l);
            }
            assert_eq!(reply_of(&last), *want, "{lines:?}");
            // The session is usable again after a failed exchange.
            assert_eq!(reply_of(&line(&mut s, "NOOP")), (250, Some((2, 0, 0))));
        }
    }

    #[test]
    fn login_mechanism_prompts_twice() {
        let mut s = Session::new(settings(), true);
        line(&mut s, "EHLO client");
        assert_eq!(reply_of(&line(&mut s, "AUTH LOGIN")), (334, None));
        assert!(s.expects_sasl_line());
        assert_eq!(
            reply_of(&line(&mut s, "YWxpY2VAZXhhbXBsZS5vcmc=")),
            (334, None)
        );
        let Step::Verify(c) = line(&mut s, "c2VjcmV0") else {
            panic!()
        };
        assert_eq!(c.login(), "alice@example.org");
        assert_eq!(c.password(), "secret");
        assert_eq!(
            reply_of(&s.auth_result(Err(AuthFailure::InvalidCredentials))),
            (535, Some((5, 7, 8)))
        );
        assert_eq!(
            reply_of(&s.auth_result(Err(AuthFailure::Throttled))),
            (503, Some((5, 5, 1)))
        );
    }

    #[test]
    fn auth_twice_and_throttled() {
        let mut s = authenticated();
        assert_eq!(
            reply_of(&line(&mut s, "AUTH PLAIN AGEAYg==")),
            (503, Some((5, 5, 1)))
        );
        let mut t = Session::new(settings(), true);
        line(&mut t, "EHLO client");
        line(&mut t, "AUTH PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHNlY3JldA==");
        assert_eq!(
            reply_of(&t.auth_result(Err(AuthFailure::Throttled))),
            (454, Some((4, 7, 0)))
        );
    }

    #[test]
    fn sender_ownership_and_limits() {
        let mut s = authenticated();
        assert_eq!(
            reply_of(&line(&mut s, "MAIL FROM:<mallory@example.org>")),
            (550, Some((5, 7, 1)))
        );
        assert_eq!(
            reply_of(&line(&mut s, "MAIL FROM:<alice@example.org> SIZE=20000")),
            (552, Some((5, 3, 4)))
        );
        assert_eq!(
            reply_of(&line(&mut s, "MAIL FROM:<anyone@alice.example>")),
            (250, Some((2, 1, 0)))
        );
        assert_eq!(
            reply_of(&line(&mut s, "MAIL FROM:<alice@example.org>")),
            (503, Some((5, 5, 1)))
        );
        assert_eq!(reply_of(&line(&mut s, "DATA")), (503, Some((5, 5, 1))));
        assert_eq!(
            reply_of(&line(&mut s, "RCPT TO:<a@example.net>")),
            (250, Some((2, 1, 5)))
        );
        assert_eq!(
            reply_of(&line(&mut s, "RCPT TO:<b@example.net>")),
            (250, Some((2, 1, 5)))
        );
        assert_eq!(
            reply_of(&line(&mut s, "RCPT TO:<c@example.net>")),
            (452, Some((4, 5, 3)))
        );
        assert_eq!(reply_of(&line(&mut s, "DATA")), (354, None));
        let Step::Submit(sub) = s.data_received(Ok(())) else {
            panic!()
        };
        assert_eq!(sub.envelope.recipients, ["a@example.net", "b@example.net"]);
        assert_eq!(sub.envelope.sender, "anyone@alice.example");
        // A null sender is allowed (read receipts).
        assert_eq!(
            reply_of(&line(&mut s, "MAIL FROM:<>")),
            (250, Some((2, 1, 0)))
        );
    }

    #[test]
    fn content_refusals_end_the_transaction() {
        for (err, want) in [
            (ContentError::TooBig, (552, Some((5, 3, 4)))),
            (ContentError::BareLineEnding, (550, Some((5, 6, 0)))),
            (ContentError::LineTooLong, (550, Some((5, 6, 0)))),
        ] {
            let mut s = authenticated();
            line(&mut s, "MAIL FROM:<alice@example.org>");
            line(&mut s, "RCPT TO:<a@example.net>");
            line(&mut s, "DATA");
            assert_eq!(reply_of(&s.data_received(Err(err))), want);
            assert_eq!(
                reply_of(&line(&mut s, "MAIL FROM:<alice@example.org>")),
                (250, Some((2, 1, 0)))
            );
        }
    }

    #[test]
    fn bdat_before_recipients_discards_the_chunk() {
        let mut s = authenticated();
        let step = line(&mut s, "BDAT 10 LAST");
        assert!(matches!(step, Step::DiscardChunk { size: 10, .. }));
        assert_eq!(reply_of(&step), (503, Some((5, 5, 1))));
        line(&mut s, "MAIL FROM:<alice@example.org>");
        line(&mut s, "RCPT TO:<a@example.net>");
        assert!(matches!(
            line(&mut s, "BDAT 3"),
            Step::ReceiveChunk {
                size: 3,
                last: false,
                first: true
            }
        ));
        assert!(matches!(
            line(&mut s, "BDAT 3"),
            Step::ReceiveChunk { first: false, .. }
        ));
        assert_eq!(reply_of(&line(&mut s, "DATA")), (503, Some((5, 5, 1))));
    }

    #[test]
    fn rset_keeps_the_greeting_and_the_authentication() {
        let mut s = Session::new(settings(), true);
        line(&mut s, "EHLO client");
        assert_eq!(reply_of(&line(&mut s, "RSET")), (250, Some((2, 0, 0))));
        assert!(matches!(
            line(&mut s, "AUTH PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHNlY3JldA=="),
            Step::Verify(_)
        ));
        s.auth_result(Ok(alice()));
        for _ in 0..2 {
            assert_eq!(reply_of(&line(&mut s, "RSET")), (250, Some((2, 0, 0))));
            assert!(s.is_authenticated());
        }
        line(&mut s, "MAIL FROM:<alice@example.org>");
        assert_eq!(reply_of(&line(&mut s, "RSET")), (250, Some((2, 0, 0))));
        assert!(s.is_authenticated());
        assert_eq!(s.declared_size(), None);
        assert_eq!(
            reply_of(&line(&mut s, "MAIL FROM:<alice@example.org>")),
            (250, Some((2, 1, 0)))
        );
    }

    #[test]
    fn non_ascii_addresses_need_smtputf8() {
        let mut s = authenticated();
        assert_eq!(
            reply_of(&line(&mut s, "MAIL FROM:<alice@example.org>")),
            (250, Some((2, 1, 0)))
        );
        assert_eq!(
            reply_of(&line(&mut s, "RCPT TO:<jürgen@example.de>")),
            (553, Some((5, 6, 7)))
        );
        line(&mut s, "RSET");
        assert_eq!(
            reply_of(&line(&mut s, "MAIL FROM:<alice@example.org> SMTPUTF8")),
            (250, Some((2, 1, 0)))
        );
        assert_eq!(
            reply_of(&line(&mut s, "RCPT TO:<jürgen@example.de>")),
            (250, Some((2, 1, 5)))
        );
    }

    #[test]
    fn too_many_errors_closes() {
        let mut s = Session::new(settings(), true);
        for _ in 0..5 {
            assert_eq!(reply_of(&line(&mut s, "BOGUS")), (500, Some((5, 5, 1))));
        }
        let last = line(&mut s, "BOGUS");
        assert!(matches!(last, Step::Close(_)));
        assert_eq!(reply_of(&last), (421, Some((4, 7, 0))));
    }

    #[test]
    fn misc_commands() {
        let mut s = Session::new(settings(), true);
        assert_eq!(
            reply_of(&line(&mut s, "VRFY alice")),
            (252, Some((2, 5, 0)))
        );
        assert_eq!(reply_of(&line(&mut s, "EXPN list")), (502, Some((5, 5, 1))));
        assert_eq!(
            reply_of(&line(&mut s, "ETRN example.org")),
            (502, Some((5, 5, 1)))
        );
        assert_eq!(reply_of(&line(&mut s, "STARTTLS")), (503, Some((5, 5, 1))));
        assert_eq!(
            reply_of(&line(&mut s, "MAIL FROM:<a@b.c>")),
            (503, Some((5, 5, 1)))
        );
        assert_eq!(reply_of(&line(&mut s, "QUIT")), (221, Some((2, 0, 0))));
        assert!(s.is_closed());
    }
}
