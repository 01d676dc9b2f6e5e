//! The values that travel through the pipeline: addresses, the envelope, who submitted a
//! message and from where, and queue ids.

use std::fmt;
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::config::ReceivedPolicy;

/// An email address split at its last `@`; the domain is kept lowercased.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    local: String,
    domain: String,
}

/// Why a string is not an address we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address has no @domain")]
    NoDomain,
    #[error("address has an empty local part")]
    EmptyLocalPart,
    #[error("address contains spaces or control characters")]
    BadCharacters,
    #[error("domain is not a valid host name")]
    BadDomain,
}

impl Address {
    /// Parses `local@domain` as found between `<` and `>` or in a login name.
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        let (local, domain) = s.rsplit_once('@').ok_or(AddressError::NoDomain)?;
        if local.is_empty() {
            return Err(AddressError::EmptyLocalPart);
        }
        let spaced = domain.contains(' ') || (local.contains(' ') && !local.starts_with('"'));
        if spaced || s.chars().any(char::is_control) {
            return Err(AddressError::BadCharacters);
        }
        let domain_ok = !domain.is_empty()
            && domain.len() <= 255
            && (domain.starts_with('[') && domain.ends_with(']')
                || domain.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                        && label
                            .chars()
                            .all(|c| c.is_alphanumeric() || c == '-' || c == '_')
                }));
        if !domain_ok {
            return Err(AddressError::BadDomain);
        }
        Ok(Self {
            local: local.to_owned(),
            domain: domain.to_lowercase(),
        })
    }

    /// The part before the `@`, as written.
    pub fn local(&self) -> &str {
        &self.local
    }

    /// The domain, lowercased.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Same mailbox for sender-ownership purposes: domain and local part both compared
    /// without regard to case, as every mailbox provider in practice does.
    pub fn same_mailbox(&self, other: &Address) -> bool {
        self.domain == other.domain && self.local.eq_ignore_ascii_case(&other.local)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// The SMTP envelope of one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Empty for the null reverse-path `<>`.
    pub sender: String,
    pub recipients: Vec<String>,
}

/// TLS parameters of the session a message came in on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
}

/// An authenticated user as the session knows them after AUTH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: i64,
    /// The login, which is also the user's own address.
    pub login: Address,
    /// Extra addresses (`local@domain`) and whole domains (`@domain`) the admin allowed.
    pub allowed: Vec<String>,
    /// Per-user override of the Received-header policy.
    pub received: Option<ReceivedPolicy>,
}

/// Where and how a session reached us: what the trace record and the logs remember.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub address: IpAddr,
    pub ehlo: String,
    pub tls: Option<TlsInfo>,
    /// True for the implicit-TLS port 465.
    pub implicit_tls: bool,
}

/// A queue id: time-ordered, unique across nodes, safe as a file name. Read back from a
/// spool entry, it is checked like one typed by an operator.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct QueueId(String);

impl TryFrom<String> for QueueId {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        QueueId::parse(&s).ok_or_else(|| format!("not a queue id: {s:?}"))
    }
}

impl From<QueueId> for String {
    fn from(id: QueueId) -> Self {
        id.0
    }
}

impl QueueId {
    /// A new id: milliseconds since the epoch, the node name, and 40 random bits.
    pub fn generate(node: &str, now: SystemTime) -> Self {
        let millis = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let random: u64 = rand::thread_rng().gen::<u64>() & 0xff_ffff_ffff;
        Self(format!("{millis:011x}{random:010x}{node}").to_ascii_uppercase())
    }

    /// Accepts an id typed by an operator, refusing anything that could escape the spool.
    pub fn parse(s: &str) -> Option<Self> {
        let ok = !s.is_empty() && s.len() <= 80 && s.chars().all(|c| c.is_ascii_alphanumeric());
        ok.then(|| Self(s.to_ascii_uppercase()))
    }

    /// When the id was generated (milliseconds since the epoch), from its first 11 digits.
    pub fn created_millis(&self) -> Option<i64> {
        self.0
            .get(..11)
            .and_then(|hex| i64::from_str_radix(hex, 16).ok())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Seconds since the epoch, the unit the store and the spool keep time in.
pub fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        let a = Address::parse("Alice@Example.ORG").unwrap();
        assert_eq!(a.local(), "Alice");
        assert_eq!(a.domain(), "example.org");
        assert_eq!(a.to_string(), "Alice@example.org");
        assert!(a.same_mailbox(&Address::parse("alice@example.org").unwrap()));
        assert!(!a.same_mailbox(&Address::parse("alice@example.net").unwrap()));
        assert!(Address::parse("\"john doe\"@example.org").is_ok());
        let bad: &[(&str, AddressError)] = &[
            ("nodomain", AddressError::NoDomain),
            ("@example.org", AddressError::EmptyLocalPart),
            ("a b@example.org", AddressError::BadCharacters),
            ("a\u{7}@example.org", AddressError::BadCharacters),
            ("a@exa mple.org", AddressError::BadCharacters),
            ("a@-example.org", AddressError::BadDomain),
            ("a@example..org", AddressError::BadDomain),
            ("a@", AddressError::BadDomain),
        ];
        for (s, e) in bad {
            assert_eq!(Address::parse(s).unwrap_err(), *e, "{s}");
        }
    }

    #[test]
    fn queue_ids_sort_by_time_and_are_safe() {
        let t0 = UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let t1 = t0 + std::time::Duration::from_millis(1);
        let a = QueueId::generate("node1", t0);
        let b = QueueId::generate("node1", t1);
        assert!(a < b);
        assert!(a.as_str().ends_with("NODE1"));
        assert_eq!(a.created_millis(), Some(1_800_000_000_000));
        assert_eq!(QueueId::parse(a.as_str()), Some(a.clone()));
        assert_eq!(QueueId::parse("../etc/passwd"), None);
        assert_eq!(QueueId::parse(""), None);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<QueueId>(&json).unwrap(), a);
        assert!(serde_json::from_str::<QueueId>("\"../../etc/passwd\"").is_err());
    }
}

/// A message as the pipeline leaves it: the submitted bytes, untouched, plus the parts that
/// make up the final message, so that adding a header never copies the body.
#[derive(Debug, Default)]
pub struct Assembled {
    data: Vec<u8>,
    parts: Vec<Part>,
}

/// One piece of an [`Assembled`] message.
#[derive(Debug)]
enum Part {
    /// Bytes the pipeline produced (Received, DKIM-Signature, Message-ID, Date).
    Added(Vec<u8>),
    /// A range of the submitted bytes.
    Original(std::ops::Range<usize>),
}

impl Assembled {
    /// Starts from the submitted bytes, with no parts yet.
    pub fn new(data: Vec<u8>) -> Self {
        Self {
            data,
            parts: Vec::new(),
        }
    }

    /// The submitted bytes.
    pub fn original(&self) -> &[u8] {
        &self.data
    }

    /// Appends produced bytes.
    pub fn push_added(&mut self, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.parts.push(Part::Added(bytes));
        }
    }

    /// Appends a range of the submitted bytes, merging with a directly preceding range.
    pub fn push_original(&mut self, range: std::ops::Range<usize>) {
        if range.is_empty() {
            return;
        }
        if let Some(Part::Original(last)) = self.parts.last_mut() {
            if last.end == range.start {
                last.end = range.end;
                return;
            }
        }
        self.parts.push(Part::Original(range));
    }

    /// Puts produced bytes in front of everything (trace and signature headers).
    pub fn prepend(&mut self, bytes: Vec<u8>) {
        self.parts.insert(0, Part::Added(bytes));
    }

    /// The final message as slices, in order.
    pub fn slices(&self) -> Vec<&[u8]> {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Added(bytes) => bytes.as_slice(),
                Part::Original(range) => &self.data[range.clone()],
            })
            .collect()
    }

    /// Length of the final message.
    pub fn len(&self) -> usize {
        self.slices().iter().map(|s| s.len()).sum()
    }

    /// True if the final message is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
