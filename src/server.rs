//! The composition root: opens the store, TLS, keys and queue, starts the listeners and
//! delivery workers, and owns shutdown.
//!
//! Shutdown is one token: listeners stop accepting, sessions waiting for a command get
//! `421 4.3.0`, workers finish the attempt in hand and stop taking new ones; whatever is still
//! running at the grace deadline is abandoned (queued messages stay queued).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::auth::Authenticator;
use crate::config::Config;
use crate::delivery::relay::{Relay, RelayError};
use crate::delivery::Delivery;
use crate::dkim::{DkimError, Signer};
use crate::listener::{self, Caps, ConnectionLimits, ListenerKind};
use crate::pipeline::Pipeline;
use crate::queue::{Queue, RetryPolicy, SpoolError};
use crate::reload::{self, Reloadable, SubmitPolicy};
use crate::smtp::connection::ConnectionContext;
use crate::smtp::session::SessionSettings;
use crate::store::trace::TraceWriter;
use crate::store::{Store, StoreError};
use crate::tls::{self, TlsError};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Dkim(#[from] DkimError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Sockets to serve, bound by the caller (tests bind port 0).
#[derive(Debug, Default)]
pub struct Listeners {
    pub submission: Vec<TcpListener>,
    pub submissions: Vec<TcpListener>,
    /// The Prometheus endpoint, if `[listen] metrics` is set.
    pub metrics: Option<TcpListener>,
}

/// How the outside world steers a running server.
#[derive(Debug, Clone, Default)]
pub struct Controls {
    /// Cancel to shut down gracefully.
    pub shutdown: CancellationToken,
    /// Notify to reload certificates, DKIM keys and privacy settings from `config_path`.
    pub reload: Arc<Notify>,
    /// The file a reload reads; without it, reloads are refused.
    pub config_path: Option<PathBuf>,
}

impl Listeners {
    /// Binds the addresses of `[listen]`.
    pub async fn bind(config: &Config) -> Result<Self, ServerError> {
        let mut listeners = Listeners::default();
        for (addrs, out) in [
            (&config.listen.submission, &mut listeners.submission),
            (&config.listen.submissions, &mut listeners.submissions),
        ] {
            for addr in addrs {
                out.push(bind_one(*addr).await?);
            }
        }
        if let Some(addr) = config.listen.metrics {
            listeners.metrics = Some(bind_one(addr).await?);
        }
        Ok(listeners)
    }
}

/// Binds one listening address, naming it in the error.
async fn bind_one(addr: std::net::SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind {
            addr: addr.to_string(),
            source,
        })
}

/// Runs the server until `controls.shutdown` is cancelled, then shuts down gracefully.
pub async fn run(
    config: Config,
    listeners: Listeners,
    controls: Controls,
) -> Result<(), ServerError> {
    let shutdown = controls.shutdown.clone();
    crate::metrics::install();
    for w in config
        .warnings()
        .into_iter()
        .chain(crate::dkim::permission_warnings(&config.dkim))
    {
        warn!("{w}");
    }
    let store = Store::open(&config.database.url).await?;
    let tls = tls::server_config(&config.tls.cert, &config.tls.key)?;
    let signer = Arc::new(Signer::load(&config.dkim)?);
    let queue = Queue::open(
        &config.queue.dir,
        RetryPolicy {
            first_retry: config.queue.first_retry,
            max_retry: config.queue.max_retry,
            max_age: config.queue.max_age,
        },
    )?;
    let relay = match &config.relay {
        Some(r) => Some(Arc::new(Relay::new(r, &config.hostname)?)),
        None => None,
    };
    let node = config.node_name();
    let auth = Authenticator::new(store.clone(), &config.auth);
    let (trace, trace_writer) = TraceWriter::start(store.clone());
    let pipeline = Arc::new(Pipeline {
        hostname: config.hostname.clone(),
        node: node.clone(),
        policy: Reloadable::new(Arc::new(SubmitPolicy {
            privacy: config.privacy.clone(),
            signer,
        })),
        queue: Arc::clone(&queue),
        trace: trace.clone(),
    });
    let ctx = Arc::new(ConnectionContext {
        settings: Arc::new(SessionSettings {
            hostname: config.hostname.clone(),
            max_message_size: config.limits.max_message_size,
            max_recipients: config.limits.max_recipients,
            max_errors: config.limits.max_errors,
        }),
        tls: Reloadable::new(tls),
        auth,
        pipeline,
        timeouts: config.timeouts.clone(),
        shutdown: shutdown.clone(),
    });
    let limits = ConnectionLimits::new(Caps {
        total: config.limits.max_connections,
        per_ip: config.limits.max_connections_per_ip,
        unauthenticated_per_ip: config.limits.max_unauthenticated_per_ip,
    });

    let sessions = TaskTracker::new();
    for (kind, list) in [
        (ListenerKind::Submission, listeners.submission),
        (ListenerKind::Submissions, listeners.submissions),
    ] {
        for l in list {
            if let Ok(addr) = l.local_addr() {
                info!(%addr, port = kind.name(), "listening");
            }
            sessions.spawn(listener::run(
                l,
                kind,
                Arc::clone(&ctx),
                Arc::clone(&limits),
                sessions.clone(),
            ));
        }
    }

    let workers = TaskTracker::new();
    if let Some(relay) = relay {
        let delivery = Arc::new(Delivery {
            queue: Arc::clone(&queue),
            relay,
            trace: trace.clone(),
            hostname: config.hostname.clone(),
            node,
        });
        for _ in 0..config.queue.workers {
            workers.spawn(Arc::clone(&delivery).run_worker(shutdown.clone()));
        }
    }
    workers.spawn(watch_wakeup(Arc::clone(&queue), shutdown.clone()));
    workers.spawn(prune(
        store.clone(),
        Arc::clone(&ctx.auth),
        config.privacy.trace_retention,
        shutdown.clone(),
    ));
    if let Some(l) = listeners.metrics {
        if let Ok(addr) = l.local_addr() {
            info!(%addr, "metrics endpoint");
        }
        workers.spawn(crate::metrics::serve(
            l,
            Arc::clone(&queue),
            shutdown.clone(),
        ));
    }

    info!(hostname = %config.hostname, "submitd running");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = controls.reload.notified() => match &controls.config_path {
                Some(path) => {
                    let problems = reload::reload(path, &ctx.tls, &ctx.pipeline.policy);
                    if problems.is_empty() {
                        info!(config = %path.display(), "reloaded");
                    }
                }
                None => warn!("reload requested, but the server was started without a config file"),
            },
        }
    }
    info!("shutting down");
    sessions.close();
    workers.close();
    let grace = config.timeouts.shutdown_grace;
    let finished = tokio::time::timeout(grace, async {
        sessions.wait().await;
        workers.wait().await;
    })
    .await;
    if finished.is_err() {
        warn!(
            ?grace,
            "grace period over; abandoning what is still running (queued mail stays queued)"
        );
    }
    // The outcomes of the last deliveries are still on their way to the database.
    trace.stop();
    if tokio::time::timeout(Duration::from_secs(5), trace_writer)
        .await
        .is_err()
    {
        warn!("trace writer did not finish; the last delivery outcomes may be missing");
    }
    store.close().await;
    info!("stopped");
    Ok(())
}

/// Rescans the spool when `submitd queue retry` drops the wakeup file; one stat per second.
async fn watch_wakeup(queue: Arc<Queue>, stop: CancellationToken) {
    let path = queue.spool().wakeup_path();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if std::fs::remove_file(&path).is_ok() {
            match queue.rescan() {
                Ok(n) => info!(messages = n, "queue rescanned on request"),
                Err(e) => error!(error = %e, "queue rescan failed"),
            }
        }
    }
}

/// Deletes trace records past their retention and stale login failures, hourly.
async fn prune(
    store: Store,
    auth: Arc<Authenticator>,
    retention: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.prune_traces(retention, SystemTime::now()).await {
            Ok(0) => {}
            Ok(n) => info!(records = n, "pruned old trace records"),
            Err(e) => warn!(error = %e, "trace pruning failed"),
        }
        if let Err(e) = auth.prune_failures().await {
            warn!(error = %e, "login failure pruning failed");
        }
    }
}
