//! `submitd queue ...`: look at and act on the spool. Works with or without a running
//! server: changes are written to the spool and a running server is woken to rescan it.

use std::time::SystemTime;

use anyhow::{bail, Context};

use super::{age, print_table, when};
use crate::message::{unix_seconds, QueueId};
use crate::queue::{RecipientStatus, Spool, SpoolError};

fn id(text: &str) -> anyhow::Result<QueueId> {
    QueueId::parse(text.trim()).with_context(|| format!("not a queue id: {text}"))
}

fn status_name(s: RecipientStatus) -> &'static str {
    match s {
        RecipientStatus::Pending => "deferred",
        RecipientStatus::Delivered => "delivered",
        RecipientStatus::Failed => "failed",
    }
}

/// `queue list`.
pub fn list(spool: &Spool, json: bool) -> anyhow::Result<()> {
    let (entries, errors) = spool.entries()?;
    for e in errors {
        eprintln!("warning: {e}");
    }
    if json {
        println!("{}", serde_json::to_string(&entries)?);
        return Ok(());
    }
    let now = unix_seconds(SystemTime::now());
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let recipients = e
                .recipients
                .iter()
                .map(|r| {
                    let state = if r.status == RecipientStatus::Pending && e.attempts == 0 {
                        "queued"
                    } else {
                        status_name(r.status)
                    };
                    format!("{} ({state})", r.address)
                })
                .collect::<Vec<_>>()
                .join(", ");
            vec![
                e.id.to_string(),
                age(now - e.received_at),
                format!("<{}>", e.sender),
                recipients,
                e.attempts.to_string(),
                if e.next_attempt <= now {
                    "now".into()
                } else {
                    format!("in {}", age(e.next_attempt - now))
                },
                e.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "AGE",
            "SENDER",
            "RECIPIENTS",
            "TRIES",
            "NEXT",
            "LAST ERROR",
        ],
        &rows,
    );
    println!("{} message(s)", entries.len());
    Ok(())
}

/// `queue show ID`.
pub fn show(spool: &Spool, text: &str) -> anyhow::Result<()> {
    let entry = spool.read_entry(&id(text)?)?;
    println!("id:          {}", entry.id);
    println!("received:    {}", when(entry.received_at));
    println!("sender:      <{}>", entry.sender);
    println!(
        "user:        {}",
        if entry.user.is_empty() {
            "-"
        } else {
            &entry.user
        }
    );
    println!("client:      {} (EHLO {})", entry.client_ip, entry.ehlo);
    println!("tls:         {}", entry.tls);
    println!("attempts:    {}", entry.attempts);
    println!("next:        {}", when(entry.next_attempt));
    if entry.is_bounce {
        println!("kind:        delivery status notification");
    }
    for r in &entry.recipients {
        println!(
            "recipient:   <{}> {} {}",
            r.address,
            status_name(r.status),
            r.last_reply.as_deref().unwrap_or("")
        );
    }
    let message = spool.read_message(&entry.id)?;
    let (_, header_end) = crate::policy::headers::fields(&message);
    println!("size:        {} bytes", message.len());
    println!();
    print!("{}", String::from_utf8_lossy(&message[..header_end]));
    Ok(())
}

/// `queue retry ID|--all`: due now; a running server picks it up within a second.
pub fn retry(spool: &Spool, target: Option<&str>, all: bool) -> anyhow::Result<()> {
    let now = unix_seconds(SystemTime::now());
    let ids = match (target, all) {
        (Some(text), false) => vec![id(text)?],
        (None, true) => spool.entries()?.0.into_iter().map(|e| e.id).collect(),
        _ => bail!("give a queue id or --all"),
    };
    let single = target.is_some();
    for id in ids {
        // Read and rewritten under the exclusive lock, so that a delivery attempt finishing
        // meanwhile is neither undone nor brought back from the dead.
        let _lock = spool.lock(true)?;
        let mut entry = match spool.read_entry(&id) {
            Ok(e) => e,
            // Delivered or deleted since the listing.
            Err(SpoolError::NotFound(_)) if !single => continue,
            Err(e) => return Err(e.into()),
        };
        entry.next_attempt = now;
        spool.write_entry(&entry)?;
        println!("{} due now", entry.id);
    }
    std::fs::write(spool.wakeup_path(), b"").context("waking the server")?;
    Ok(())
}

/// `queue delete ID`.
pub fn delete(spool: &Spool, text: &str) -> anyhow::Result<()> {
    let id = id(text)?;
    let _lock = spool.lock(true)?;
    match spool.remove(&id).and_then(|()| spool.sync_removals()) {
        Ok(()) => {
            println!("deleted {id}");
            Ok(())
        }
        Err(SpoolError::NotFound(_)) => bail!("no queued message {id}"),
        Err(e) => Err(e.into()),
    }
}
