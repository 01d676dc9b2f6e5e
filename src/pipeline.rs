//! What happens to a message between the client's final dot and the `250`: the policy
//! checks and rewrites, the DKIM signature, the trace record and the durable enqueue.

use std::sync::Arc;
use std::time::SystemTime;

use rand::Rng;

use crate::config::PrivacyConfig;
use crate::dkim::{signed_header_names, DkimError};
use crate::message::{unix_seconds, Assembled, ClientInfo, QueueId};
use crate::policy::headers::{self, Field};
use crate::policy::privacy::{self, Stamp};
use crate::policy::sender::{self, FromError};
use crate::queue::{Entry, Queue, Recipient, RecipientStatus, SpoolError};
use crate::reload::{Reloadable, SubmitPolicy};
use crate::smtp::reply::{replies, Reply};
use crate::smtp::session::Submission;
use crate::store::trace::{TraceRecord, TraceWriter};
use crate::store::StoreError;

/// Why a submitted message was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    From(#[from] FromError),
    #[error(transparent)]
    Dkim(#[from] DkimError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("trace record: {0}")]
    Trace(#[from] StoreError),
    #[error("signing task failed")]
    Task,
}

impl SubmitError {
    /// The reply the client sees; the cause goes to the log.
    pub fn reply(&self) -> Reply {
        match self {
            SubmitError::From(FromError::NotOwned(_)) => Reply::new(
                550,
                (5, 7, 1),
                "From address not owned by the authenticated user",
            ),
            SubmitError::From(FromError::Missing) => {
                Reply::new(550, (5, 6, 0), "Message has no From header")
            }
            SubmitError::From(FromError::Multiple) => {
                Reply::new(550, (5, 6, 0), "Message has more than one From header")
            }
            SubmitError::From(FromError::Unparsable) => {
                Reply::new(550, (5, 6, 0), "From header cannot be parsed")
            }
            SubmitError::Dkim(_)
            | SubmitError::Spool(_)
            | SubmitError::Trace(_)
            | SubmitError::Task => replies::temporary_failure(),
        }
    }
}

/// Everything `prepare` needs besides the message.
#[derive(Debug)]
pub struct PrepareContext<'a> {
    pub hostname: &'a str,
    pub privacy: &'a PrivacyConfig,
    pub queue_id: &'a QueueId,
    pub client: &'a ClientInfo,
    /// Seconds since the epoch.
    pub now: i64,
    /// Randomness for a Message-ID, if one must be added.
    pub random: u128,
}

/// A message after the policy stage, ready for signing.
#[derive(Debug)]
pub struct Prepared {
    pub message: Assembled,
    /// Domain of the From: address, which selects the DKIM keys.
    pub from_domain: Option<String>,
    /// Header names the DKIM signature covers.
    pub signed_headers: Vec<String>,
}

/// The policy stage, pure: checks the From: header, scrubs client trace headers, adds our
/// Received header and a missing Date/Message-ID. Submitted header bytes that stay are
/// referenced, not copied.
pub fn prepare(
    submission: &Submission,
    data: Vec<u8>,
    ctx: &PrepareContext<'_>,
) -> Result<Prepared, FromError> {
    let (fields, header_end) = headers::fields(&data);
    sender::check_from(&submission.identity, &data, &fields)?;
    let policy = privacy::resolve(
        ctx.privacy,
        submission.identity.received,
        ctx.client.address,
    );
    let kept: Vec<&Field<'_>> = fields
        .iter()
        .filter(|f| !privacy::must_remove(f, policy, &ctx.privacy.remove_headers))
        .collect();
    let added = headers::missing_fields(&fields, ctx.hostname, ctx.now, ctx.random);
    let received = privacy::received_header(
        policy,
        &Stamp {
            hostname: ctx.hostname,
            queue_id: ctx.queue_id.as_str(),
            client: ctx.client,
            recipients: &submission.envelope.recipients,
            now: ctx.now,
        },
    );
    let from_domain = sender::from_domain(&data, &fields);
    let signed_headers = signed_header_names(
        kept.iter()
            .filter(|f| !f.obsolete)
            .map(|f| f.name)
            .chain(added.iter().map(|(name, _)| *name)),
    );
    let kept_ranges: Vec<_> = kept.iter().map(|f| f.range.clone()).collect();

    let total = data.len();
    let mut message = Assembled::new(data);
    message.push_added(received.unwrap_or_default().into_bytes());
    for range in kept_ranges {
        message.push_original(range);
    }
    message.push_added(
        added
            .into_iter()
            .map(|(_, line)| line)
            .collect::<String>()
            .into_bytes(),
    );
    if headers::rest_needs_separator(message.original(), header_end) {
        // The header section ended at a line that is not a field. Every reader must see the
        // same split as the scrubbing above, the added fields and the DKIM body hash did, so
        // the blank line is made explicit: what follows is body, not more header fields.
        // The signer finds the body in the part holding the blank line, so the two travel
        // together (a copy, for malformed messages only).
        let mut rest = b"\r\n".to_vec();
        rest.extend_from_slice(&message.original()[header_end..total]);
        message.push_added(rest);
    } else {
        message.push_original(header_end..total);
    }
    Ok(Prepared {
        message,
        from_domain,
        signed_headers,
    })
}

/// The submit stage: policy → DKIM → trace record → durable queue.
#[derive(Debug)]
pub struct Pipeline {
    pub hostname: String,
    pub node: String,
    /// Privacy settings and DKIM keys; SIGHUP replaces them.
    pub policy: Reloadable<SubmitPolicy>,
    pub queue: Arc<Queue>,
    /// Trace records are written in batches shared by concurrent sessions.
    pub trace: TraceWriter,
}

impl Pipeline {
    /// The current policy; a session takes it when it starts and keeps it.
    pub fn policy(&self) -> Arc<SubmitPolicy> {
        self.policy.get()
    }

    /// Takes a complete message; returns its queue id once it is durably queued.
    pub async fn submit(
        &self,
        policy: &Arc<SubmitPolicy>,
        submission: &Submission,
        client: &ClientInfo,
        data: Vec<u8>,
    ) -> Result<QueueId, SubmitError> {
        let now = SystemTime::now();
        let id = QueueId::generate(&self.node, now);
        let ctx = PrepareContext {
            hostname: &self.hostname,
            privacy: &policy.privacy,
            queue_id: &id,
            client,
            now: unix_seconds(now),
            random: rand::thread_rng().gen(),
        };
        let prepared = prepare(submission, data, &ctx)?;
        let message = sign(policy, prepared).await?;

        let tls = client
            .tls
            .as_ref()
            .map_or("none".to_owned(), |t| t.version.clone());
        self.trace
            .insert(TraceRecord {
                queue_id: id.to_string(),
                user: submission.identity.login.to_string(),
                client_ip: client.address.to_string(),
                ehlo: submission.ehlo.clone(),
                tls_version: tls.clone(),
                received_at: unix_seconds(now),
                sender: submission.envelope.sender.clone(),
                recipients: submission.envelope.recipients.clone(),
                outcome: Default::default(),
            })
            .await?;
        let entry = Entry {
            id: id.clone(),
            sender: submission.envelope.sender.clone(),
            recipients: submission
                .envelope
                .recipients
                .iter()
                .map(|r| Recipient {
                    address: r.clone(),
                    status: RecipientStatus::Pending,
                    last_reply: None,
                })
                .collect(),
            user: submission.identity.login.to_string(),
            client_ip: client.address.to_string(),
            ehlo: submission.ehlo.clone(),
            tls,
            received_at: unix_seconds(now),
            attempts: 0,
            next_attempt: unix_seconds(now),
            last_error: None,
            is_bounce: false,
        };
        self.queue.enqueue(entry, message).await?;
        Ok(id)
    }
}

/// Adds the DKIM signatures, off the reactor when there is a key to sign with (an RSA
/// signature costs about a millisecond of CPU).
async fn sign(policy: &Arc<SubmitPolicy>, prepared: Prepared) -> Result<Assembled, SubmitError> {
    let Prepared {
        mut message,
        from_domain,
        signed_headers,
    } = prepared;
    let Some(domain) = from_domain.filter(|d| policy.signer.signs_for(d)) else {
        return Ok(message);
    };
    let signer = Arc::clone(&policy.signer);
    tokio::task::spawn_blocking(move || {
        let signatures = signer.sign(&domain, &message.slices(), &signed_headers)?;
        for header in signatures.into_iter().rev() {
            message.prepend(header.into_bytes());
        }
        Ok(message)
    })
    .await
    .map_err(|_| SubmitError::Task)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ReceivedPolicy;
    use crate::message::{Address, Envelope, Identity};

    fn submission(received: Option<ReceivedPolicy>) -> Submission {
        Submission {
            envelope: Envelope {
                sender: "alice@example.org".into(),
                recipients: vec!["bob@example.net".into()],
            },
            identity: Identity {
                user_id: 1,
                login: Address::parse("alice@example.org").unwrap(),
                allowed: vec![],
                received,
            },
            ehlo: "[192.168.19.77]".into(),
        }
    }

    fn client() -> ClientInfo {
        ClientInfo {
            address: "127.0.0.77".parse().unwrap(),
            ehlo: "[192.168.19.77]".into(),
            tls: None,
            implicit_tls: false,
        }
    }

    fn run(msg: &str, user: Option<ReceivedPolicy>) -> Result<String, FromError> {
        let privacy = PrivacyConfig {
            remove_headers: vec!["X-Mailer".into()],
            ..PrivacyConfig::default()
        };
        let id = QueueId::parse("Q1").unwrap();
        let c = client();
        let ctx = PrepareContext {
            hostname: "mx.example.org",
            privacy: &privacy,
            queue_id: &id,
            client: &c,
            now: 1_796_399_273,
            random: 7,
        };
        let p = prepare(&submission(user), msg.as_bytes().to_vec(), &ctx)?;
        Ok(String::from_utf8(p.message.slices().concat()).unwrap())
    }

    #[test]
    fn hide_ip_rewrites_only_what_it_must() {
        let msg = "Received: from [192.168.19.77] by laptop\r\n\twith SMTP\r\nFrom: Alice <alice@example.org>\r\nX-Originating-IP: [192.168.19.77]\r\nsubject:  Odd   Case\r\n\tfolded\r\nX-Mailer: Foo 1.0\r\nMessage-ID: <m1@laptop>\r\n\r\nbody line\r\n";
        let out = run(msg, None).unwrap();
        assert_eq!(
            out,
            "Received: by mx.example.org (submitd) with ESMTPSA id Q1\r\n\tfor <bob@example.net>;\r\n\tFri, 4 Dec 2026 15:47:53 +0000\r\n\
             From: Alice <alice@example.org>\r\nsubject:  Odd   Case\r\n\tfolded\r\nMessage-ID: <m1@laptop>\r\n\
             Date: Fri, 4 Dec 2026 15:47:53 +0000\r\n\r\nbody line\r\n"
        );
        assert!(!out.contains("192.168"));
        assert!(!out.contains("127.0.0.77"));
    }

    #[test]
    fn keep_and_strip() {
        let msg = "From: alice@example.org\r\nReceived: inner\r\nDate: x\r\nMessage-ID: <a@b>\r\n\r\nb\r\n";
        let kept = run(msg, Some(ReceivedPolicy::Keep)).unwrap();
        assert!(kept.starts_with("Received: from [192.168.19.77] ([127.0.0.77])"));
        assert!(kept.contains("Received: inner\r\n"));
        let stripped = run(msg, Some(ReceivedPolicy::Strip)).unwrap();
        assert_eq!(
            stripped,
            "From: alice@example.org\r\nDate: x\r\nMessage-ID: <a@b>\r\n\r\nb\r\n"
        );
    }

    #[test]
    fn header_section_is_what_every_reader_sees() {
        // Obsolete `Name : value` fields are fields: scrubbed, and counted as present.
        let msg = "From: alice@example.org\r\nSubject : old\r\nX-Originating-IP : [192.168.19.77]\r\nMessage-ID : <a@b>\r\nDate: x\r\n\r\nb\r\n";
        let out = run(msg, None).unwrap();
        assert!(!out.contains("192.168"), "{out}");
        assert_eq!(out.matches("Message-ID").count(), 1, "{out}");
        assert!(out.ends_with("Subject : old\r\nMessage-ID : <a@b>\r\nDate: x\r\n\r\nb\r\n"));
        // A line that is not a field ends the header section; the blank line is made
        // explicit so what follows cannot be read as header fields further on.
        let msg = "From: alice@example.org\r\nSubject: s\r\nno colon here\r\nX-Originating-IP: [192.168.19.77]\r\nFrom: mallory@evil.example\r\n\r\nb\r\n";
        let out = run(msg, None).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(
            !head.contains("192.168") && !head.contains("mallory"),
            "{out}"
        );
        assert!(head.ends_with("Subject: s\r\nMessage-ID: <00000000000000000000000000000007@mx.example.org>\r\nDate: Fri, 4 Dec 2026 15:47:53 +0000"), "{out}");
        assert!(
            body.starts_with("no colon here\r\nX-Originating-IP"),
            "{out}"
        );
        // No body at all needs no separator.
        let out = run(
            "From: alice@example.org\r\nDate: x\r\nMessage-ID: <a@b>\r\n",
            None,
        )
        .unwrap();
        assert!(out.ends_with("From: alice@example.org\r\nDate: x\r\nMessage-ID: <a@b>\r\n"));
        // A second From in the obsolete form is refused, not passed on.
        assert_eq!(
            run(
                "From: alice@example.org\r\nFrom : mallory@evil.example\r\n\r\nb\r\n",
                None
            )
            .unwrap_err(),
            FromError::Multiple
        );
    }

    #[test]
    fn from_is_checked() {
        assert_eq!(
            run("From: mallory@example.org\r\n\r\nb\r\n", None).unwrap_err(),
            FromError::NotOwned("mallory@example.org".into())
        );
        assert_eq!(
            run("Subject: x\r\n\r\nb\r\n", None).unwrap_err(),
            FromError::Missing
        );
    }
}
