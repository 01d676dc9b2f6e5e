//! The TOML configuration file, parsed into a typed tree and validated once at start.
//!
//! Unknown keys are errors (`deny_unknown_fields`) so that a typo never silently falls back to
//! a default. Every section has defaults that make a single-node install on the embedded SQLite
//! database work; `submitd.example.toml` documents each key.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

/// Why a configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Our name: banner, EHLO reply, the "by" of our Received header, Message-ID domain.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// Name of this node among several sharing one database; part of every queue id.
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub listen: ListenConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub queue: QueueConfig,
    /// The smart host; without it accepted mail stays queued.
    #[serde(default)]
    pub relay: Option<RelayConfig>,
    #[serde(default)]
    pub privacy: PrivacyConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub dkim: Vec<DkimKeyConfig>,
}

/// Addresses to listen on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// Port 587 style: plaintext greeting, STARTTLS required before AUTH and MAIL.
    #[serde(default = "default_submission")]
    pub submission: Vec<SocketAddr>,
    /// Port 465 style: TLS from the first byte (RFC 8314).
    #[serde(default = "default_submissions")]
    pub submissions: Vec<SocketAddr>,
    /// Prometheus endpoint (`/metrics`); off unless set.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            submission: default_submission(),
            submissions: default_submissions(),
            metrics: None,
        }
    }
}

/// The server certificate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default = "default_cert")]
    pub cert: PathBuf,
    #[serde(default = "default_key")]
    pub key: PathBuf,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: default_cert(),
            key: default_key(),
        }
    }
}

/// Where users, addresses and trace records live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    #[serde(default = "default_database_url")]
    pub url: String,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: default_database_url(),
        }
    }
}

/// The durable spool and its retry schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    #[serde(default = "default_queue_dir")]
    pub dir: PathBuf,
    #[serde(default = "default_first_retry", with = "humantime_serde")]
    pub first_retry: Duration,
    #[serde(default = "default_max_retry", with = "humantime_serde")]
    pub max_retry: Duration,
    #[serde(default = "default_max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// Concurrent deliveries to the smart host.
    #[serde(default = "default_workers")]
    pub workers: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            dir: default_queue_dir(),
            first_retry: default_first_retry(),
            max_retry: default_max_retry(),
            max_age: default_max_age(),
            workers: default_workers(),
        }
    }
}

/// How to reach the smart host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayTls {
    /// STARTTLS required; never falls back to plaintext.
    Starttls,
    /// TLS from the first byte (port 465).
    Implicit,
    /// Plaintext: only sensible on loopback or a private link.
    None,
}

/// The smart host all mail leaves through.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    pub host: String,
    #[serde(default = "default_relay_port")]
    pub port: u16,
    #[serde(default = "default_relay_tls")]
    pub tls: RelayTls,
    /// Extra trust anchor for the smart host's certificate, besides the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password (first line); the password itself never sits in this file.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Connect, command and data timeout towards the smart host.
    #[serde(default = "default_relay_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// An idle connection to the smart host is closed after this long.
    #[serde(default = "default_relay_idle", with = "humantime_serde")]
    pub idle_timeout: Duration,
}

/// What submitd does with the trace of the submitting client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReceivedPolicy {
    /// Our own Received header naming only our hop; client trace headers scrubbed.
    HideIp,
    /// No Received header from us; client trace headers scrubbed.
    Strip,
    /// The standard RFC 5321 trace line with the client's EHLO name and address.
    Keep,
}

impl ReceivedPolicy {
    /// The spelling used in the config file, the database and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            ReceivedPolicy::HideIp => "hide-ip",
            ReceivedPolicy::Strip => "strip",
            ReceivedPolicy::Keep => "keep",
        }
    }

    /// Parses the config/CLI spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "hide-ip" => Some(ReceivedPolicy::HideIp),
            "strip" => Some(ReceivedPolicy::Strip),
            "keep" => Some(ReceivedPolicy::Keep),
            _ => None,
        }
    }
}

/// `[privacy]`: the Received-header policy and header scrubbing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    #[serde(default = "default_received")]
    pub received: ReceivedPolicy,
    /// Per client network overrides; the most specific matching network wins.
    #[serde(default)]
    pub networks: Vec<NetworkPolicy>,
    /// Extra header names removed from submitted messages under hide-ip and strip.
    #[serde(default)]
    pub remove_headers: Vec<String>,
    /// How long submission trace records are kept in the database.
    #[serde(default = "default_trace_retention", with = "humantime_serde")]
    pub trace_retention: Duration,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        Self {
            received: default_received(),
            networks: Vec::new(),
            remove_headers: Vec::new(),
            trace_retention: default_trace_retention(),
        }
    }
}

/// One `[[privacy.networks]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    pub cidr: IpNet,
    pub received: ReceivedPolicy,
}

/// `[limits]`: sizes and counts, each with its own SMTP reply when exceeded.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
    #[serde(default = "default_max_recipients")]
    pub max_recipients: usize,
    /// Refused commands in one session before it is closed with 421 4.7.0.
    #[serde(default = "default_max_errors")]
    pub max_errors: u32,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// Connections from one address that have not (yet) authenticated.
    #[serde(default = "default_max_unauthenticated_per_ip")]
    pub max_unauthenticated_per_ip: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_size: default_max_message_size(),
            max_recipients: default_max_recipients(),
            max_errors: default_max_errors(),
            max_connections: default_max_connections(),
            max_connections_per_ip: default_max_connections_per_ip(),
            max_unauthenticated_per_ip: default_max_unauthenticated_per_ip(),
        }
    }
}

/// `[timeouts]`: every phase of a session has a named deadline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// Waiting for the next command (RFC 5321 4.5.3.2: at least 5 minutes).
    #[serde(default = "default_command_timeout", with = "humantime_serde")]
    pub command: Duration,
    /// Waiting for more message data during DATA or BDAT.
    #[serde(default = "default_data_timeout", with = "humantime_serde")]
    pub data: Duration,
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub tls_handshake: Duration,
    /// From connect to a successful AUTH, whatever the client sends meanwhile.
    #[serde(default = "default_unauthenticated_timeout", with = "humantime_serde")]
    pub unauthenticated: Duration,
    /// How long shutdown waits for in-flight sessions and deliveries.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            command: default_command_timeout(),
            data: default_data_timeout(),
            tls_handshake: default_handshake_timeout(),
            unauthenticated: default_unauthenticated_timeout(),
            shutdown_grace: default_shutdown_grace(),
        }
    }
}

/// `[auth]`: password verification cost control and failure throttling.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Failures from one address against one account before that pair cools off.
    #[serde(default = "default_failures_per_ip")]
    pub max_failures_per_ip: u32,
    /// Failures against one account from anywhere before the account cools off.
    #[serde(default = "default_failures_per_account")]
    pub max_failures_per_account: u32,
    /// Length of the cooling-off period, and the window failures are counted in.
    #[serde(default = "default_lockout", with = "humantime_serde")]
    pub lockout: Duration,
    /// Pause before answering a failed AUTH, multiplied by recent failures (capped at 5x).
    #[serde(default = "default_failure_delay", with = "humantime_serde")]
    pub failure_delay: Duration,
    /// Password hashes verified at once; each argon2id run holds about 19 MiB.
    #[serde(default = "default_verify_concurrency")]
    pub verify_concurrency: usize,
    /// How long a successful verification is remembered (see `auth::cache`); 0 turns it off.
    #[serde(default = "default_cache_ttl", with = "humantime_serde")]
    pub cache_ttl: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            max_failures_per_ip: default_failures_per_ip(),
            max_failures_per_account: default_failures_per_account(),
            lockout: default_lockout(),
            failure_delay: default_failure_delay(),
            verify_concurrency: default_verify_concurrency(),
            cache_ttl: default_cache_ttl(),
        }
    }
}

/// One `[[dkim]]` key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimKeyConfig {
    pub domain: String,
    pub selector: String,
    pub key: PathBuf,
    /// `false` keeps the key configured (and checked) without signing with it.
    #[serde(default = "default_true")]
    pub sign: bool,
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Parses and validates configuration text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source: Box::new(source),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Semantic checks serde cannot express.
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.hostname.is_empty() || self.hostname.contains(char::is_whitespace) {
            return invalid("hostname must be a host name without spaces");
        }
        if self.listen.submission.is_empty() && self.listen.submissions.is_empty() {
            return invalid("[listen] needs at least one submission or submissions address");
        }
        if self.limits.max_message_size < 1024 {
            return invalid("[limits] max_message_size must be at least 1024");
        }
        if self.limits.max_recipients == 0 {
            return invalid("[limits] max_recipients must be at least 1");
        }
        if self.timeouts.command < Duration::from_secs(1) {
            return invalid("[timeouts] command must be at least 1s");
        }
        if self.queue.first_retry.is_zero() || self.queue.max_retry < self.queue.first_retry {
            return invalid("[queue] needs 0 < first_retry <= max_retry");
        }
        if self.queue.workers == 0 {
            return invalid("[queue] workers must be at least 1");
        }
        if self.auth.verify_concurrency == 0 {
            return invalid("[auth] verify_concurrency must be at least 1");
        }
        if !self.database.url.starts_with("sqlite:") && !self.database.url.starts_with("postgres") {
            return invalid("[database] url must start with sqlite:// or postgres://");
        }
        if let Some(relay) = &self.relay {
            if relay.username.is_some() != relay.password_file.is_some() {
                return invalid("[relay] username and password_file go together");
            }
        }
        Ok(())
    }

    /// The node name used in queue ids: `node`, or the hostname's first label.
    pub fn node_name(&self) -> String {
        let name = self
            .node
            .clone()
            .unwrap_or_else(|| self.hostname.split('.').next().unwrap_or("node").to_owned());
        name.chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
    }

    /// Warnings that do not stop the server but that an operator should see.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        match &self.relay {
            None => warnings
                .push("no [relay] configured: accepted mail stays queued until one is".to_owned()),
            Some(relay) if relay.tls == RelayTls::None && !is_loopback_host(&relay.host) => {
                warnings.push(format!(
                    "[relay] tls = \"none\" sends mail and credentials in plaintext to {}",
                    relay.host
                ))
            }
            Some(_) => {}
        }
        warnings
    }
}

/// True for `localhost` and loopback IP literals.
fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn default_hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
fn default_submission() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([0, 0, 0, 0], 587))]
}
fn default_submissions() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([0, 0, 0, 0], 465))]
}
fn default_cert() -> PathBuf {
    "certs/fullchain.pem".into()
}
fn default_key() -> PathBuf {
    "certs/privkey.pem".into()
}
fn default_database_url() -> String {
    "sqlite://data/submitd.db".into()
}
fn default_queue_dir() -> PathBuf {
    "data/queue".into()
}
fn default_first_retry() -> Duration {
    Duration::from_secs(60)
}
fn default_max_retry() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_age() -> Duration {
    Duration::from_secs(5 * 86400)
}
fn default_workers() -> usize {
    4
}
fn default_relay_port() -> u16 {
    587
}
fn default_relay_tls() -> RelayTls {
    RelayTls::Starttls
}
fn default_relay_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_relay_idle() -> Duration {
    Duration::from_secs(30)
}
fn default_received() -> ReceivedPolicy {
    ReceivedPolicy::HideIp
}
fn default_trace_retention() -> Duration {
    Duration::from_secs(30 * 86400)
}
fn default_max_message_size() -> usize {
    26_214_400
}
fn default_max_recipients() -> usize {
    100
}
fn default_max_errors() -> u32 {
    10
}
fn default_max_connections() -> usize {
    2000
}
fn default_max_connections_per_ip() -> usize {
    200
}
fn default_max_unauthenticated_per_ip() -> usize {
    30
}
fn default_command_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_data_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_unauthenticated_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_failures_per_ip() -> u32 {
    5
}
fn default_failures_per_account() -> u32 {
    30
}
fn default_lockout() -> Duration {
    Duration::from_secs(900)
}
fn default_failure_delay() -> Duration {
    Duration::from_secs(1)
}
fn default_verify_concurrency() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}
fn default_cache_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_true() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::from_toml("hostname = \"mx.example.org\"").unwrap();
        assert_eq!(c.listen.submission[0].port(), 587);
        assert_eq!(c.listen.submissions[0].port(), 465);
        assert_eq!(c.queue.first_retry, Duration::from_secs(60));
        assert_eq!(c.queue.max_age, Duration::from_secs(5 * 86400));
        assert_eq!(c.privacy.received, ReceivedPolicy::HideIp);
        assert_eq!(c.timeouts.command, Duration::from_secs(300));
        assert_eq!(c.node_name(), "mx");
    }

    #[test]
    fn unknown_keys_are_errors() {
        for text in [
            "hostnme = \"x\"",
            "[limits]\nmax_size = 5",
            "[relay]\nhost = \"a\"\nsecret = \"b\"",
        ] {
            assert!(Config::from_toml(text).is_err(), "{text}");
        }
    }

    #[test]
    fn durations_and_policies_parse() {
        let c = Config::from_toml(
            "[queue]\nfirst_retry = \"30s\"\nmax_retry = \"2h\"\nmax_age = \"5d\"\n\
             [privacy]\nreceived = \"strip\"\n[[privacy.networks]]\ncidr = \"10.0.0.0/8\"\nreceived = \"keep\"\n",
        )
        .unwrap();
        assert_eq!(c.queue.first_retry, Duration::from_secs(30));
        assert_eq!(c.queue.max_retry, Duration::from_secs(7200));
        assert_eq!(c.privacy.received, ReceivedPolicy::Strip);
        assert_eq!(c.privacy.networks[0].received, ReceivedPolicy::Keep);
    }

    #[test]
    fn semantic_errors_are_reported() {
        for text in [
            "[queue]\nfirst_retry = \"2h\"\nmax_retry = \"1h\"",
            "[database]\nurl = \"mysql://x\"",
            "[relay]\nhost = \"a\"\nusername = \"u\"",
            "[limits]\nmax_recipients = 0",
        ] {
            assert!(
                matches!(Config::from_toml(text), Err(ConfigError::Invalid(_))),
                "{text}"
            );
        }
    }

    #[test]
    fn plaintext_relay_warns_unless_loopback() {
        let remote = Config::from_toml("[relay]\nhost = \"smtp.example\"\ntls = \"none\"").unwrap();
        assert_eq!(remote.warnings().len(), 1);
        let local = Config::from_toml("[relay]\nhost = \"127.0.0.1\"\ntls = \"none\"").unwrap();
        assert!(local.warnings().is_empty());
    }
}
