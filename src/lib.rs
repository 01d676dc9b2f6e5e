//! submitd: a mail submission agent (RFC 6409).
//!
//! A message travels through the crate in this order, one module per stage:
//!
//! ```text
//! listener (587 STARTTLS / 465 TLS) ─▶ smtp::connection ⇄ smtp::session (pure state machine)
//!     AUTH ─▶ auth (SASL PLAIN/LOGIN, argon2id, throttle) ─▶ store (sqlx: SQLite | PostgreSQL)
//!     end of DATA ─▶ pipeline::submit:
//!         policy (sender ownership, Received privacy, Message-ID/Date) ─▶ dkim ─▶ queue (fsync) ─▶ 250 <id>
//! queue ─▶ delivery worker ─▶ relay (lettre → smart host)
//!     deferred → retry with backoff · failed / expired → bounce (RFC 3464 DSN, null sender) → queue
//! admin CLI (user, dkim, queue, trace) ─▶ store / keys / queue
//! ```
//!
//! `server` wires the stages together and owns shutdown; `config` is the typed TOML file.

pub mod admin;
pub mod auth;
pub mod config;
pub mod delivery;
pub mod dkim;
pub mod listener;
pub mod message;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod queue;
pub mod reload;
pub mod server;
pub mod smtp;
pub mod store;
pub mod tls;
