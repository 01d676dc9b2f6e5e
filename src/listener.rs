//! Accept loops for the submission ports and the connection caps that protect them.
//!
//! `submission` (587) greets in plaintext and requires STARTTLS; `submissions` (465) starts
//! with the TLS handshake (RFC 8314). Caps: connections in total, per client address, and
//! unauthenticated connections per client address, so that one abusive host behind a shared
//! NAT cannot starve the server, while its authenticated neighbours keep working.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

use crate::smtp::connection::{self, ConnectionContext};

/// Which kind of port a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// Port 587: STARTTLS required before AUTH and MAIL.
    Submission,
    /// Port 465: implicit TLS.
    Submissions,
}

impl ListenerKind {
    /// The config key and log name.
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Submission => "submission",
            ListenerKind::Submissions => "submissions",
        }
    }
}

/// Connection caps.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub total: usize,
    pub per_ip: usize,
    pub unauthenticated_per_ip: usize,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    open: usize,
    unauthenticated: usize,
}

/// Open connections, counted per client address.
#[derive(Debug)]
pub struct ConnectionLimits {
    caps: Caps,
    state: Mutex<(usize, HashMap<IpAddr, Counts>)>,
}

/// Which cap a new connection hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CapExceeded {
    #[error("too many connections")]
    Total,
    #[error("too many connections from this address")]
    PerIp,
    #[error("too many unauthenticated connections from this address")]
    Unauthenticated,
}

impl ConnectionLimits {
    /// Limits with these caps.
    pub fn new(caps: Caps) -> Arc<Self> {
        Arc::new(Self {
            caps,
            state: Mutex::new((0, HashMap::new())),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, HashMap<IpAddr, Counts>)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new (unauthenticated) connection from `ip`, or says which cap it hit.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionGuard, CapExceeded> {
        let ip = client_key(ip);
        let mut state = self.lock();
        let (total, per_ip) = &mut *state;
        if *total >= self.caps.total {
            return Err(CapExceeded::Total);
        }
        let counts = per_ip.entry(ip).or_default();
        if counts.open >= self.caps.per_ip {
            return Err(CapExceeded::PerIp);
        }
        if counts.unauthenticated >= self.caps.unauthenticated_per_ip {
            return Err(CapExceeded::Unauthenticated);
        }
        counts.open += 1;
        counts.unauthenticated += 1;
        *total += 1;
        Ok(ConnectionGuard {
            limits: Arc::clone(self),
            ip,
            authenticated: false,
        })
    }

    /// Open connections in total.
    pub fn open(&self) -> usize {
        self.lock().0
    }
}

/// What the per-address caps count by: an IPv4 address (also when it arrives IPv4-mapped),
/// or an IPv6 /64, which one host usually holds whole and can hop around in.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(segments.into())
            }
        },
    }
}

/// Holds a connection's place in the counts until dropped.
#[derive(Debug)]
pub struct ConnectionGuard {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
    authenticated: bool,
}

impl ConnectionGuard {
    /// The connection authenticated: it no longer counts as unauthenticated.
    pub fn mark_authenticated(&mut self) {
        if self.authenticated {
            return;
        }
        self.authenticated = true;
        if let Some(c) = self.limits.lock().1.get_mut(&self.ip) {
            c.unauthenticated = c.unauthenticated.saturating_sub(1);
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut state = self.limits.lock();
        let (total, per_ip) = &mut *state;
        *total = total.saturating_sub(1);
        if let Some(c) = per_ip.get_mut(&self.ip) {
            c.open = c.open.saturating_sub(1);
            if !self.authenticated {
                c.unauthenticated = c.unauthenticated.saturating_sub(1);
            }
            if c.open == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// Accepts connections on `listener` until shutdown, serving each in its own task.
pub async fn run(
    listener: TcpListener,
    kind: ListenerKind,
    ctx: Arc<ConnectionContext>,
    limits: Arc<ConnectionLimits>,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = ctx.shutdown.cancelled() => return,
        };
        let (mut stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Typically EMFILE: back off briefly instead of spinning.
                error!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        match limits.admit(peer.ip()) {
            Ok(guard) => {
                tracker.spawn(connection::serve(
                    stream,
                    peer,
                    kind,
                    Arc::clone(&ctx),
                    guard,
                ));
            }
            Err(cap) => {
                warn!(client = %peer.ip(), port = kind.name(), reason = %cap, "connection refused");
                crate::metrics::connection_refused(match cap {
                    CapExceeded::Total => "total",
                    CapExceeded::PerIp => "per_ip",
                    CapExceeded::Unauthenticated => "unauthenticated",
                });
                if kind == ListenerKind::Submission {
                    tracker.spawn(async move {
                        let reply = format!(
                            "421 4.7.0 {}, try again later\r\n",
                            capitalize(&cap.to_string())
                        );
                        let _ = stream.write_all(reply.as_bytes()).await;
                        let _ = stream.shutdown().await;
                    });
                }
                // On 465 a plaintext reply would be garbage to a TLS client: just close.
            }
        }
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_count_per_64() {
        let limits = ConnectionLimits::new(Caps {
            total: 10,
            per_ip: 10,
            unauthenticated_per_ip: 1,
        });
        let _a = limits.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert_eq!(
            limits
                .admit("2001:db8:1:2:ffff::9".parse().unwrap())
                .unwrap_err(),
            CapExceeded::Unauthenticated
        );
        assert!(limits.admit("2001:db8:1:3::1".parse().unwrap()).is_ok());
        let _b = limits.admit("192.0.2.1".parse().unwrap()).unwrap();
        assert!(limits.admit("::ffff:192.0.2.1".parse().unwrap()).is_err());
    }

    #[test]
    fn caps_count_and_release() {
        let limits = ConnectionLimits::new(Caps {
            total: 3,
            per_ip: 2,
            unauthenticated_per_ip: 1,
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let mut first = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).unwrap_err(), CapExceeded::Unauthenticated);
        first.mark_authenticated();
        let second = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).unwrap_err(), CapExceeded::PerIp);
        let third = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b).unwrap_err(), CapExceeded::Total);
        drop(second);
        drop(third);
        assert_eq!(limits.open(), 1);
        drop(first);
        assert_eq!(limits.open(), 0);
        assert!(limits.lock().1.is_empty());
    }
}
