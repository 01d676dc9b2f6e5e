//! Delivery workers: take due messages from the queue, relay them through the smart host,
//! record each recipient's outcome, schedule retries, and queue bounces.
//!
//! Contract: a message leaves the spool only when every recipient is delivered or failed
//! (and a DSN for the failed ones is itself durably queued first). A crash mid-attempt
//! leaves the entry as it was before the attempt, so the message is tried again: delivery is
//! at least once, never zero times.

pub mod bounce;
pub mod relay;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::message::{unix_seconds, Assembled, QueueId};
use crate::queue::{Entry, Queue, Recipient, RecipientStatus, SpoolError};
use crate::store::trace::{Outcome, TraceWriter};
use bounce::DsnContext;
use relay::{RcptOutcome, Relay, RelayConnection, RelayError};

/// What the workers share.
#[derive(Debug)]
pub struct Delivery {
    pub queue: Arc<Queue>,
    pub relay: Arc<Relay>,
    /// Final outcomes go to the trace records in the background.
    pub trace: TraceWriter,
    pub hostname: String,
    pub node: String,
}

impl Delivery {
    /// One worker: runs until `stop`, finishing the attempt in hand first.
    pub async fn run_worker(self: Arc<Self>, stop: CancellationToken) {
        let mut connection: Option<RelayConnection> = None;
        loop {
            if let Some(until) = self.relay.down_until() {
                // The smart host refused connections recently: do not hammer it.
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep_until(until.into()) => {}
                }
            }
            let idle = self.relay.idle_timeout();
            let id = tokio::select! {
                id = self.queue.next_due(&stop) => id,
                _ = tokio::time::sleep(idle), if connection.is_some() => {
                    if let Some(c) = connection.take() {
                        c.quit().await;
                    }
                    continue;
                }
            };
            let Some(id) = id else { break };
            match self.queue.load(&id).await {
                Ok((entry, message)) => self.attempt(entry, message, &mut connection).await,
                Err(SpoolError::NotFound(_)) => {
                    info!(queue_id = %id, "deleted from the queue before its attempt");
                    self.queue.release(&id);
                }
                Err(e) => {
                    error!(queue_id = %id, error = %e, "cannot read queue entry; left in place");
                    self.queue.release(&id);
                }
            }
        }
        if let Some(c) = connection.take() {
            c.quit().await;
        }
    }

    /// One delivery attempt of one message, given its envelope and (when readable) its bytes.
    async fn attempt(
        &self,
        mut entry: Entry,
        message: Result<Vec<u8>, SpoolError>,
        connection: &mut Option<RelayConnection>,
    ) {
        let started = std::time::Instant::now();
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                // Without its bytes the message cannot be delivered; keep the entry for the
                // operator (the file may come back from a backup) until it expires, then tell
                // the sender like for any other expiry.
                error!(queue_id = %entry.id, error = %e, "cannot read queued message");
                let now = unix_seconds(SystemTime::now());
                let reason = format!("451 4.3.0 cannot read the queued message file: {e}");
                entry.attempts += 1;
                entry.last_error = Some(reason.clone());
                if self.queue.retry().expired(entry.received_at, now) {
                    let failed: Vec<String> = entry.pending().map(|r| r.address.clone()).collect();
                    for r in entry
                        .recipients
                        .iter_mut()
                        .filter(|r| r.status == RecipientStatus::Pending)
                    {
                        r.status = RecipientStatus::Failed;
                        r.last_reply = Some(format!("{reason} (message expired in queue)"));
                    }
                    if !self.bounce(&entry, &failed, b"", now).await {
                        for r in entry
                            .recipients
                            .iter_mut()
                            .filter(|r| failed.contains(&r.address))
                        {
                            r.status = RecipientStatus::Pending;
                        }
                    }
                }
                self.retry_later(&mut entry, now);
                self.store_entry(entry).await;
                return;
            }
        };
        let pending: Vec<String> = entry.pending().map(|r| r.address.clone()).collect();
        let outcomes = self.send(&entry, &pending, &message, connection).await;
        let now = unix_seconds(SystemTime::now());
        entry.attempts += 1;
        let mut newly_failed = Vec::new();
        let mut deferred_reply = None;
        for (address, outcome) in pending.iter().zip(&outcomes) {
            let Some(r) = entry
                .recipients
                .iter_mut()
                .find(|r| &r.address == address && r.status == RecipientStatus::Pending)
            else {
                continue;
            };
            let (status, reply) = match outcome {
                RcptOutcome::Delivered(reply) => (RecipientStatus::Delivered, reply),
                RcptOutcome::Failed(reply) => (RecipientStatus::Failed, reply),
                RcptOutcome::Deferred(reply) => (RecipientStatus::Pending, reply),
            };
            info!(
                queue_id = %entry.id,
                user = %entry.user,
                client = %entry.client_ip,
                rcpt = %address,
                outcome = ?status,
                attempt = entry.attempts,
                ms = started.elapsed().as_millis() as u64,
                reply = %reply,
                "delivery attempt"
            );
            r.status = status;
            r.last_reply = Some(reply.clone());
            crate::metrics::delivery(
                match status {
                    RecipientStatus::Delivered => "delivered",
                    RecipientStatus::Failed => "failed",
                    RecipientStatus::Pending => "deferred",
                },
                started.elapsed(),
            );
            match status {
                RecipientStatus::Failed => newly_failed.push(address.clone()),
                RecipientStatus::Pending => deferred_reply = Some(reply.clone()),
                RecipientStatus::Delivered => {}
            }
        }
        if !entry.is_done() {
            if self.queue.retry().expired(entry.received_at, now) {
                for r in entry
                    .recipients
                    .iter_mut()
                    .filter(|r| r.status == RecipientStatus::Pending)
                {
                    let last = r.last_reply.clone().unwrap_or_else(|| "no reply".into());
                    r.status = RecipientStatus::Failed;
                    r.last_reply = Some(format!("{last} (message expired in queue)"));
                    newly_failed.push(r.address.clone());
                }
                warn!(queue_id = %entry.id, "message expired in the queue");
            } else {
                entry.last_error = deferred_reply;
                self.retry_later(&mut entry, now);
            }
        }
        if !newly_failed.is_empty() && !self.bounce(&entry, &newly_failed, &message, now).await {
            // The sender must hear of the failure: without a queued DSN the recipients stay
            // pending (and fail, and bounce, again at the next attempt).
            for r in entry
                .recipients
                .iter_mut()
                .filter(|r| newly_failed.contains(&r.address))
            {
                r.status = RecipientStatus::Pending;
            }
            entry.last_error = Some("451 4.3.0 the bounce could not be queued".into());
            self.retry_later(&mut entry, now);
        }
        // DSNs have no trace record (they were never submitted), so no outcome either.
        let traced = !entry.is_bounce;
        for r in entry
            .recipients
            .iter()
            .filter(|r| traced && r.status != RecipientStatus::Pending)
        {
            if pending.contains(&r.address) {
                let outcome = match r.status {
                    RecipientStatus::Delivered => "delivered".to_owned(),
                    _ => format!("failed: {}", r.last_reply.as_deref().unwrap_or("")),
                };
                self.trace.outcome(Outcome {
                    queue_id: entry.id.to_string(),
                    recipient: r.address.clone(),
                    outcome,
                });
            }
        }
        self.store_entry(entry).await;
    }

    fn retry_later(&self, entry: &mut Entry, now: i64) {
        entry.next_attempt =
            self.queue
                .retry()
                .next_attempt(entry.attempts.max(1), entry.received_at, now);
    }

    async fn store_entry(&self, entry: Entry) {
        let id = entry.id.clone();
        if let Err(e) = self.queue.finish(entry).await {
            error!(queue_id = %id, error = %e, "cannot update queue entry");
        }
    }

    /// Sends over the kept connection, opening one if needed; any connection-level failure
    /// defers every recipient. A kept connection the smart host closed while it was idle is
    /// replaced once, at once: nothing had been sent on it.
    async fn send(
        &self,
        entry: &Entry,
        pending: &[String],
        message: &[u8],
        connection: &mut Option<RelayConnection>,
    ) -> Vec<RcptOutcome> {
        if connection
            .as_ref()
            .is_some_and(|c| !c.is_usable() || c.last_used.elapsed() >= self.relay.idle_timeout())
        {
            if let Some(c) = connection.take() {
                c.quit().await;
            }
        }
        let mut reused = connection.is_some();
        loop {
            if connection.is_none() {
                let pause = self.queue.retry().first_retry.min(Duration::from_secs(60));
                match self.relay.connect(pause).await {
                    Ok(c) => *connection = Some(c),
                    Err(e) => {
                        warn!(queue_id = %entry.id, error = %e, "smart host unavailable");
                        let text = format!("451 4.4.1 {e}");
                        return vec![RcptOutcome::Deferred(text); pending.len()];
                    }
                }
            }
            let Some(conn) = connection.as_mut() else {
                return vec![
                    RcptOutcome::Deferred("451 4.4.1 no connection".into());
                    pending.len()
                ];
            };
            match conn.send(&entry.sender, pending, message).await {
                Ok(outcomes) => return outcomes,
                Err(e @ RelayError::Closed(_)) if reused => {
                    info!(queue_id = %entry.id, error = %e, "kept relay connection was closed; reconnecting");
                    *connection = None;
                    reused = false;
                }
                Err(e) => {
                    warn!(queue_id = %entry.id, error = %e, "relay connection failed");
                    *connection = None;
                    return vec![RcptOutcome::Deferred(format!("451 4.4.2 {e}")); pending.len()];
                }
            }
        }
    }

    /// Queues one DSN for `failed` recipients, unless the message is itself a bounce or had
    /// the null sender.
    /// Returns false only when a DSN was owed and could not be queued.
    async fn bounce(&self, entry: &Entry, failed: &[String], message: &[u8], now: i64) -> bool {
        if entry.is_bounce || entry.sender.is_empty() {
            info!(queue_id = %entry.id, "no bounce for a message with the null sender");
            return true;
        }
        let failed: Vec<&Recipient> = entry
            .recipients
            .iter()
            .filter(|r| failed.contains(&r.address))
            .collect();
        let ctx = DsnContext {
            hostname: &self.hostname,
            now,
            random: rand::thread_rng().gen(),
        };
        let dsn = bounce::build(&ctx, entry, &failed, message);
        let id = QueueId::generate(&self.node, SystemTime::now());
        let bounce_entry = Entry {
            id: id.clone(),
            sender: String::new(),
            recipients: vec![Recipient {
                address: entry.sender.clone(),
                status: RecipientStatus::Pending,
                last_reply: None,
            }],
            user: String::new(),
            client_ip: String::new(),
            ehlo: String::new(),
            tls: String::new(),
            received_at: now,
            attempts: 0,
            next_attempt: now,
            last_error: None,
            is_bounce: true,
        };
        let mut assembled = Assembled::new(dsn);
        let len = assembled.original().len();
        assembled.push_original(0..len);
        match self.queue.enqueue(bounce_entry, assembled).await {
            Ok(()) => {
                crate::metrics::bounce();
                info!(queue_id = %entry.id, bounce_id = %id, to = %entry.sender, "bounce queued");
                true
            }
            Err(e) => {
                error!(queue_id = %entry.id, error = %e, "cannot queue bounce");
                false
            }
        }
    }
}
