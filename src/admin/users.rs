//! `submitd user ...`: accounts and the addresses they may send as.

use anyhow::{bail, Context};

use super::{print_table, read_password};
use crate::auth::{hash_password, normalize_login};
use crate::config::ReceivedPolicy;
use crate::message::Address;
use crate::store::Store;

fn login(email: &str) -> anyhow::Result<String> {
    normalize_login(email).with_context(|| format!("invalid address: {email}"))
}

/// `user add EMAIL`.
pub async fn add(store: &Store, email: &str, password_stdin: bool) -> anyhow::Result<()> {
    let email = login(email)?;
    let password = read_password(password_stdin)?;
    let hash = hash_password(&password).map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?;
    store.add_user(&email, &hash).await?;
    println!("added {email}");
    Ok(())
}

/// `user passwd EMAIL`.
pub async fn passwd(store: &Store, email: &str, password_stdin: bool) -> anyhow::Result<()> {
    let email = login(email)?;
    if store.find_user(&email).await?.is_none() {
        bail!("no such user: {email}");
    }
    let password = read_password(password_stdin)?;
    let hash = hash_password(&password).map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?;
    store.set_password(&email, &hash).await?;
    println!("password changed for {email}");
    Ok(())
}

/// `user del EMAIL`.
pub async fn delete(store: &Store, email: &str) -> anyhow::Result<()> {
    let email = login(email)?;
    store.delete_user(&email).await?;
    println!("deleted {email}");
    Ok(())
}

/// `user disable|enable EMAIL`.
pub async fn set_disabled(store: &Store, email: &str, disabled: bool) -> anyhow::Result<()> {
    let email = login(email)?;
    store.set_disabled(&email, disabled).await?;
    println!("{} {email}", if disabled { "disabled" } else { "enabled" });
    Ok(())
}

/// Checks an ADDRESS argument of `allow`/`deny`: `local@domain` or `@domain`.
fn sender_address(address: &str) -> anyhow::Result<String> {
    if let Some(domain) = address.strip_prefix('@') {
        let parsed = Address::parse(&format!("x@{domain}"))
            .map_err(|e| anyhow::anyhow!("invalid domain {domain}: {e}"))?;
        return Ok(format!("@{}", parsed.domain()));
    }
    let parsed =
        Address::parse(address).map_err(|e| anyhow::anyhow!("invalid address {address}: {e}"))?;
    Ok(parsed.to_string())
}

/// `user allow EMAIL ADDRESS`.
pub async fn allow(store: &Store, email: &str, address: &str) -> anyhow::Result<()> {
    let email = login(email)?;
    let address = sender_address(address)?;
    store.allow_sender(&email, &address).await?;
    println!("{email} may send as {address}");
    Ok(())
}

/// `user deny EMAIL ADDRESS`.
pub async fn deny(store: &Store, email: &str, address: &str) -> anyhow::Result<()> {
    let email = login(email)?;
    let address = sender_address(address)?;
    if !store.deny_sender(&email, &address).await? {
        bail!("{email} was not allowed to send as {address}");
    }
    println!("{email} may no longer send as {address}");
    Ok(())
}

/// `user set EMAIL --received POLICY|default`.
pub async fn set_received(store: &Store, email: &str, policy: &str) -> anyhow::Result<()> {
    let email = login(email)?;
    let policy = match policy {
        "default" => None,
        other => Some(ReceivedPolicy::parse(other).with_context(|| {
            format!("unknown policy {other}: use keep, hide-ip, strip or default")
        })?),
    };
    store.set_received_policy(&email, policy).await?;
    println!(
        "{email}: received policy {}",
        policy.map_or("from the configuration", |p| p.as_str())
    );
    Ok(())
}

/// `user list`.
pub async fn list(store: &Store, json: bool) -> anyhow::Result<()> {
    let users = store.list_users().await?;
    let mut rows = Vec::new();
    let mut out = Vec::new();
    for u in &users {
        let allowed = store.allowed_senders(u.id).await?;
        let state = if u.disabled { "disabled" } else { "enabled" };
        let received = u.received.map_or("default", |p| p.as_str());
        out.push(serde_json::json!({
            "email": u.email, "state": state, "received": received, "allowed": allowed,
        }));
        rows.push(vec![
            u.email.clone(),
            state.into(),
            received.into(),
            allowed.join(" "),
        ]);
    }
    if json {
        println!("{}", serde_json::Value::Array(out));
    } else {
        print_table(&["EMAIL", "STATE", "RECEIVED", "ALSO SENDS AS"], &rows);
    }
    Ok(())
}
