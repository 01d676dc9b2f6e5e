//! Received-header privacy: what the trace of a submission may reveal about the client.
//!
//! A roaming user's client address is usually a hotel or conference NAT that shares its
//! address with everyone there; once that address is on a blocklist, receivers that check
//! every Received header punish all mail that names it. So by default (`hide-ip`) our own
//! Received header records only our hop and the queue id, and the trace headers the client's
//! software added are removed. `strip` adds no Received header; `keep` writes the standard
//! RFC 5321 trace line. Precedence: per-user setting > most specific client network > default.

use std::net::IpAddr;

use super::headers::Field;
use crate::config::{NetworkPolicy, PrivacyConfig, ReceivedPolicy};
use crate::message::ClientInfo;

/// Headers that client-side software adds and that expose the client's network.
const CLIENT_TRACE_HEADERS: [&str; 4] = [
    "Received",
    "X-Originating-IP",
    "X-Forwarded-For",
    "X-Client-IP",
];

/// Picks the policy for one submission.
pub fn resolve(
    config: &PrivacyConfig,
    user: Option<ReceivedPolicy>,
    client: IpAddr,
) -> ReceivedPolicy {
    user.or_else(|| most_specific(&config.networks, client))
        .unwrap_or(config.received)
}

fn most_specific(networks: &[NetworkPolicy], client: IpAddr) -> Option<ReceivedPolicy> {
    // An IPv4 client may arrive as an IPv4-mapped IPv6 address on a dual-stack socket.
    let client = match client {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(client, IpAddr::V4),
        v4 => v4,
    };
    networks
        .iter()
        .filter(|n| n.cidr.contains(&client))
        .max_by_key(|n| n.cidr.prefix_len())
        .map(|n| n.received)
}

/// True if this submitted field must go under `policy`.
pub fn must_remove(field: &Field<'_>, policy: ReceivedPolicy, extra: &[String]) -> bool {
    policy != ReceivedPolicy::Keep
        && (CLIENT_TRACE_HEADERS.iter().any(|name| field.is(name))
            || extra.iter().any(|name| field.is(name)))
}

/// What our Received header records.
#[derive(Debug)]
pub struct Stamp<'a> {
    pub hostname: &'a str,
    pub queue_id: &'a str,
    pub client: &'a ClientInfo,
    pub recipients: &'a [String],
    /// Seconds since the epoch.
    pub now: i64,
}

/// Our Received header (CRLF terminated), or `None` under `strip`.
pub fn received_header(policy: ReceivedPolicy, stamp: &Stamp<'_>) -> Option<String> {
    let date = super::headers::rfc5322_date(stamp.now);
    let for_clause = match stamp.recipients {
        [one] if !one.contains(['<', '>', ';', '\r', '\n']) => format!("\r\n\tfor <{one}>"),
        _ => String::new(),
    };
    match policy {
        ReceivedPolicy::Strip => None,
        ReceivedPolicy::HideIp => Some(format!(
            "Received: by {} (submitd) with ESMTPSA id {}{for_clause};\r\n\t{date}\r\n",
            stamp.hostname, stamp.queue_id
        )),
        ReceivedPolicy::Keep => {
            let tls = stamp.client.tls.as_ref().map_or(String::new(), |t| {
                format!("\r\n\t(using {} with cipher {})", t.version, t.cipher)
            });
            Some(format!(
                "Received: from {} ([{}])\r\n\tby {} (submitd) with ESMTPSA id {}{tls}{for_clause};\r\n\t{date}\r\n",
                sanitize_ehlo(&stamp.client.ehlo),
                stamp.client.address,
                stamp.hostname,
                stamp.queue_id
            ))
        }
    }
}

/// The client's EHLO argument is arbitrary text; only host-name characters go into a header.
fn sanitize_ehlo(ehlo: &str) -> String {
    let clean: String = ehlo
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '[' | ']' | ':'))
        .take(255)
        .collect();
    if clean.is_empty() {
        "unknown".to_owned()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::TlsInfo;

    fn config() -> PrivacyConfig {
        PrivacyConfig {
            networks: vec![
                NetworkPolicy {
                    cidr: "10.0.0.0/8".parse().unwrap(),
                    received: ReceivedPolicy::Keep,
                },
                NetworkPolicy {
                    cidr: "10.9.0.0/16".parse().unwrap(),
                    received: ReceivedPolicy::Strip,
                },
            ],
            ..PrivacyConfig::default()
        }
    }

    #[test]
    fn precedence_user_network_default() {
        let c = config();
        let table = [
            (None, "192.0.2.1", ReceivedPolicy::HideIp),
            (None, "10.1.2.3", ReceivedPolicy::Keep),
            (None, "10.9.2.3", ReceivedPolicy::Strip),
            (None, "::ffff:10.1.2.3", ReceivedPolicy::Keep),
            (
                Some(ReceivedPolicy::HideIp),
                "10.1.2.3",
                ReceivedPolicy::HideIp,
            ),
            (
                Some(ReceivedPolicy::Keep),
                "192.0.2.1",
                ReceivedPolicy::Keep,
            ),
        ];
        for (user, ip, want) in table {
            assert_eq!(
                resolve(&c, user, ip.parse().unwrap()),
                want,
                "{user:?} {ip}"
            );
        }
    }

    fn client() -> ClientInfo {
        ClientInfo {
            address: "192.0.2.77".parse().unwrap(),
            ehlo: "[192.168.19.77]".into(),
            tls: Some(TlsInfo {
                version: "TLSv1.3".into(),
                cipher: "TLS13_AES_256_GCM_SHA384".into(),
            }),
            implicit_tls: false,
        }
    }

    #[test]
    fn hide_ip_names_only_our_hop() {
        let c = client();
        let rcpts = vec!["bob@example.net".to_owned()];
        let stamp = Stamp {
            hostname: "mx.example.org",
            queue_id: "ABC123",
            client: &c,
            recipients: &rcpts,
            now: 1_796_399_273,
        };
        let h = received_header(ReceivedPolicy::HideIp, &stamp).unwrap();
        assert_eq!(
            h,
            "Received: by mx.example.org (submitd) with ESMTPSA id ABC123\r\n\tfor <bob@example.net>;\r\n\tFri, 4 Dec 2026 15:47:53 +0000\r\n"
        );
        assert!(!h.contains("192."));
        assert!(received_header(ReceivedPolicy::Strip, &stamp).is_none());
        let keep = received_header(ReceivedPolicy::Keep, &stamp).unwrap();
        assert!(keep
            .starts_with("Received: from [192.168.19.77] ([192.0.2.77])\r\n\tby mx.example.org"));
        assert!(keep.contains("TLSv1.3"));
    }

    #[test]
    fn scrubs_client_trace_unless_keep() {
        let extra = vec!["User-Agent".to_owned()];
        for (name, policy, want) in [
            ("received", ReceivedPolicy::HideIp, true),
            ("X-Originating-IP", ReceivedPolicy::Strip, true),
            ("x-forwarded-for", ReceivedPolicy::HideIp, true),
            ("X-Client-IP", ReceivedPolicy::HideIp, true),
            ("User-Agent", ReceivedPolicy::HideIp, true),
            ("Received", ReceivedPolicy::Keep, false),
            ("Subject", ReceivedPolicy::HideIp, false),
        ] {
            let f = Field {
                name,
                range: 0..0,
                obsolete: false,
            };
            assert_eq!(must_remove(&f, policy, &extra), want, "{name} {policy:?}");
        }
    }
}
