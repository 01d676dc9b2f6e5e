//! The `submitd` binary: parses the command line, sets up logging, dispatches.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use submitd::admin;
use submitd::config::{Config, ConfigError};
use submitd::queue::Spool;
use submitd::server::{self, Controls, Listeners};
use submitd::store::Store;

/// A mail submission server (RFC 6409).
#[derive(Debug, Parser)]
#[command(name = "submitd", version)]
struct Cli {
    /// Configuration file.
    #[arg(
        long,
        global = true,
        env = "SUBMITD_CONFIG",
        default_value = "submitd.toml"
    )]
    config: PathBuf,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        /// Generate a self-signed certificate at the configured paths if none is there
        /// (development only).
        #[arg(long)]
        dev_cert: bool,
    },
    /// Validate the configuration and the files it names.
    CheckConfig,
    /// Manage users and the addresses they may send as.
    #[command(subcommand)]
    User(UserCommand),
    /// Inspect and act on the queue.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Who submitted the message with this queue id (from its Received header).
    Trace {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// DKIM keys.
    #[command(subcommand)]
    Dkim(DkimCommand),
    /// Certificates.
    #[command(subcommand)]
    Cert(CertCommand),
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Add a user; the password comes from a prompt or one line on stdin.
    Add {
        email: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Change a user's password.
    Passwd {
        email: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Delete a user.
    Del { email: String },
    /// List users.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop a user from logging in.
    Disable { email: String },
    /// Let a disabled user log in again.
    Enable { email: String },
    /// Let a user send as ADDRESS (`local@domain`, or `@domain` for a whole domain).
    Allow { email: String, address: String },
    /// Withdraw an address given with `allow`.
    Deny { email: String, address: String },
    /// Per-user settings.
    Set {
        email: String,
        /// Received-header policy for this user: keep, hide-ip, strip, or default.
        #[arg(long)]
        received: String,
    },
}

#[derive(Debug, Subcommand)]
enum QueueCommand {
    /// List queued messages.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one message's envelope, state and headers.
    Show { id: String },
    /// Make a message (or all) due now.
    Retry {
        id: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// Remove a message from the queue without delivering it.
    Delete { id: String },
}

#[derive(Debug, Subcommand)]
enum DkimCommand {
    /// Generate a key, print its DNS record and the config lines.
    Generate {
        #[arg(long)]
        domain: String,
        #[arg(long)]
        selector: String,
        #[arg(long, default_value = "ed25519")]
        algorithm: String,
        #[arg(long, default_value_t = 2048)]
        bits: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the DNS record of an existing key.
    Dns {
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        domain: String,
        #[arg(long)]
        selector: String,
    },
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Write a self-signed development certificate (fullchain.pem, privkey.pem).
    SelfSigned {
        #[arg(long)]
        hostname: String,
        #[arg(long)]
        out_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load_config(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| match e {
        // Read and parse errors name the file already; semantic ones do not.
        ConfigError::Invalid(reason) => anyhow::anyhow!("{}: {reason}", path.display()),
        other => other.into(),
    })
}

async fn open_store(path: &Path) -> anyhow::Result<Store> {
    let config = load_config(path)?;
    Store::open(&config.database.url)
        .await
        .with_context(|| format!("opening the database {}", config.database.url))
}

fn open_spool(path: &Path) -> anyhow::Result<Spool> {
    let config = load_config(path)?;
    Ok(Spool::open(&config.queue.dir)?)
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let config_path = cli.config.as_path();
    match cli.command {
        Command::Serve { dev_cert } => serve(config_path, dev_cert).await,
        Command::CheckConfig => {
            let config = load_config(config_path)?;
            let (errors, warnings) = admin::check::check(&config).await;
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            for e in &errors {
                eprintln!("error: {e}");
            }
            if errors.is_empty() {
                println!("{}: ok", config_path.display());
                Ok(())
            } else {
                anyhow::bail!("{} problem(s) in {}", errors.len(), config_path.display())
            }
        }
        Command::User(cmd) => {
            let store = open_store(config_path).await?;
            let result = match cmd {
                UserCommand::Add {
                    email,
                    password_stdin,
                } => admin::users::add(&store, &email, password_stdin).await,
                UserCommand::Passwd {
                    email,
                    password_stdin,
                } => admin::users::passwd(&store, &email, password_stdin).await,
                UserCommand::Del { email } => admin::users::delete(&store, &email).await,
                UserCommand::List { json } => admin::users::list(&store, json).await,
                UserCommand::Disable { email } => {
                    admin::users::set_disabled(&store, &email, true).await
                }
                UserCommand::Enable { email } => {
                    admin::users::set_disabled(&store, &email, false).await
                }
                UserCommand::Allow { email, address } => {
                    admin::users::allow(&store, &email, &address).await
                }
                UserCommand::Deny { email, address } => {
                    admin::users::deny(&store, &email, &address).await
                }
                UserCommand::Set { email, received } => {
                    admin::users::set_received(&store, &email, &received).await
                }
            };
            store.close().await;
            result
        }
        Command::Queue(cmd) => {
            let spool = open_spool(config_path)?;
            match cmd {
                QueueCommand::List { json } => admin::queue::list(&spool, json),
                QueueCommand::Show { id } => admin::queue::show(&spool, &id),
                QueueCommand::Retry { id, all } => admin::queue::retry(&spool, id.as_deref(), all),
                QueueCommand::Delete { id } => admin::queue::delete(&spool, &id),
            }
        }
        Command::Trace { id, json } => {
            let store = open_store(config_path).await?;
            let result = admin::trace::show(&store, &id, json).await;
            store.close().await;
            result
        }
        Command::Dkim(DkimCommand::Generate {
            domain,
            selector,
            algorithm,
            bits,
            out,
        }) => admin::dkim::generate(&domain, &selector, &algorithm, bits, &out),
        Command::Dkim(DkimCommand::Dns {
            key,
            domain,
            selector,
        }) => admin::dkim::print_record(&key, &domain, &selector),
        Command::Cert(CertCommand::SelfSigned { hostname, out_dir }) => {
            // Checked before writing anything: a new certificate next to the old key would
            // leave a pair that does not fit together.
            for name in ["fullchain.pem", "privkey.pem"] {
                let path = out_dir.join(name);
                if path.exists() {
                    anyhow::bail!("{} already exists; not overwriting it", path.display());
                }
            }
            let (cert, key) = submitd::tls::write_self_signed(&hostname, &out_dir)?;
            println!("wrote {} and {}", cert.display(), key.display());
            Ok(())
        }
    }
}

async fn serve(config_path: &Path, dev_cert: bool) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    if dev_cert && !config.tls.cert.exists() && !config.tls.key.exists() {
        let dir = config.tls.cert.parent().unwrap_or(Path::new("."));
        let (cert, key) = submitd::tls::write_self_signed(&config.hostname, dir)?;
        if cert != config.tls.cert || key != config.tls.key {
            anyhow::bail!(
                "--dev-cert writes {} and {}; point [tls] cert and key there",
                cert.display(),
                key.display()
            );
        }
        tracing::warn!(cert = %cert.display(), "generated a self-signed development certificate");
    }
    let listeners = Listeners::bind(&config).await?;
    let controls = Controls {
        config_path: Some(config_path.to_owned()),
        ..Controls::default()
    };
    handle_signals(&controls)?;
    server::run(config, listeners, controls).await?;
    Ok(())
}

/// SIGTERM and SIGINT shut down gracefully; SIGHUP reloads.
fn handle_signals(controls: &Controls) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (shutdown, reload) = (controls.shutdown.clone(), Arc::clone(&controls.reload));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                _ = hup.recv() => reload.notify_one(),
            }
        }
        shutdown.cancel();
    });
    Ok(())
}
