//! What SIGHUP replaces while the server runs: the TLS certificate and key (certbot-style
//! renewal), the DKIM keys and the privacy settings. Each is read anew from the config file;
//! one that fails to load is reported and the previous one kept. Sessions take a snapshot
//! when they start, so a session in flight keeps the settings it began with.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use tracing::{error, info};

use crate::config::{Config, PrivacyConfig};
use crate::dkim::Signer;

/// A value that can be swapped while readers hold snapshots of the old one.
#[derive(Debug)]
pub struct Reloadable<T>(RwLock<Arc<T>>);

impl<T> Reloadable<T> {
    /// Starts with `value`.
    pub fn new(value: Arc<T>) -> Self {
        Self(RwLock::new(value))
    }

    /// The current value; it stays valid for the holder after a replace.
    pub fn get(&self) -> Arc<T> {
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Puts a new value in place for everyone who asks from now on.
    pub fn replace(&self, value: Arc<T>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = value;
    }
}

/// The settings the submission pipeline applies to a message, replaced as one on reload.
#[derive(Debug)]
pub struct SubmitPolicy {
    pub privacy: PrivacyConfig,
    pub signer: Arc<Signer>,
}

/// Re-reads `path` and swaps in the TLS configuration and the submission policy; returns
/// the problems (each already logged), empty when everything was reloaded.
pub fn reload(
    path: &Path,
    tls: &Reloadable<ServerConfig>,
    policy: &Reloadable<SubmitPolicy>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            let message = format!("reload: {e}; keeping the running configuration");
            error!("{message}");
            return vec![message];
        }
    };
    match crate::tls::server_config(&config.tls.cert, &config.tls.key) {
        Ok(new) => {
            tls.replace(new);
            info!(cert = %config.tls.cert.display(), "reload: TLS certificate loaded");
        }
        Err(e) => problems.push(format!("reload: {e}; keeping the previous certificate")),
    }
    let signer = match Signer::load(&config.dkim) {
        Ok(s) => {
            info!(keys = config.dkim.len(), "reload: DKIM keys loaded");
            Arc::new(s)
        }
        Err(e) => {
            problems.push(format!("reload: {e}; keeping the previous DKIM keys"));
            Arc::clone(&policy.get().signer)
        }
    };
    policy.replace(Arc::new(SubmitPolicy {
        privacy: config.privacy.clone(),
        signer,
    }));
    for p in &problems {
        error!("{p}");
    }
    problems
}
