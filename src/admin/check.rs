//! `submitd check-config`: validates the configuration and every file it names.

use crate::config::Config;
use crate::delivery::relay::Relay;
use crate::dkim::{load_key, Signer};
use crate::store::Store;

/// Checks everything the server would need at start; returns the problems found.
pub async fn check(config: &Config) -> (Vec<String>, Vec<String>) {
    let mut errors = Vec::new();
    let mut warnings = config.warnings();
    if let Err(e) = crate::tls::server_config(&config.tls.cert, &config.tls.key) {
        errors.push(e.to_string());
    }
    for k in &config.dkim {
        if let Err(e) = load_key(&k.key) {
            errors.push(e.to_string());
        }
    }
    warnings.extend(crate::dkim::permission_warnings(&config.dkim));
    if let Some(relay) = &config.relay {
        if let Err(e) = Relay::new(relay, &config.hostname) {
            errors.push(e.to_string());
        }
    }
    match Store::open(&config.database.url).await {
        Ok(store) => {
            if let Ok(signer) = Signer::load(&config.dkim) {
                for domain in sender_domains(&store).await {
                    if !signer.signs_for(&domain) {
                        warnings.push(format!("no DKIM key signs for sender domain {domain}"));
                    }
                }
            }
            store.close().await;
        }
        Err(e) => errors.push(e.to_string()),
    }
    (errors, warnings)
}

/// Domains users may send from: their login domains and allowed addresses.
async fn sender_domains(store: &Store) -> Vec<String> {
    let mut domains = std::collections::BTreeSet::new();
    for user in store.list_users().await.unwrap_or_default() {
        if let Some((_, d)) = user.email.rsplit_once('@') {
            domains.insert(d.to_lowercase());
        }
        for a in store.allowed_senders(user.id).await.unwrap_or_default() {
            if let Some((_, d)) = a.rsplit_once('@') {
                domains.insert(d.to_lowercase());
            }
        }
    }
    domains.into_iter().collect()
}
