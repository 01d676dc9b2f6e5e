//! Sender ownership (RFC 6409 §6.1): a user may send as their login address, as addresses the
//! administrator allowed, and as anyone in domains allowed as `@domain`; the envelope sender
//! and every From: header address are checked the same way.

use mail_parser::MessageParser;

use super::headers::Field;
use crate::message::{Address, Identity};

/// Why the From: header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FromError {
    #[error("message has no From header")]
    Missing,
    #[error("message has more than one From header")]
    Multiple,
    #[error("From header cannot be parsed")]
    Unparsable,
    #[error("From address {0} is not owned by the user")]
    NotOwned(String),
}

/// True if `identity` may use `address` as a sender.
pub fn may_send_as(identity: &Identity, address: &Address) -> bool {
    identity.login.same_mailbox(address)
        || identity
            .allowed
            .iter()
            .any(|allowed| match allowed.strip_prefix('@') {
                Some(domain) => domain.eq_ignore_ascii_case(address.domain()),
                None => Address::parse(allowed).is_ok_and(|a| a.same_mailbox(address)),
            })
}

/// Checks the From: field(s) of a message's header section against what the user owns.
pub fn check_from(
    identity: &Identity,
    message: &[u8],
    fields: &[Field<'_>],
) -> Result<(), FromError> {
    let mut from = fields.iter().filter(|f| f.is("From"));
    let field = from.next().ok_or(FromError::Missing)?;
    if from.next().is_some() {
        return Err(FromError::Multiple);
    }
    if field.obsolete {
        // `From : x`: our DKIM signer would not recognise the field as From, so the signature
        // could not cover it. Clients must not generate this form (RFC 5322 §4).
        return Err(FromError::Unparsable);
    }
    let raw = &message[field.range.clone()];
    // Folding whitespace is fine; any other control character is not.
    if raw
        .iter()
        .any(|&b| b < 32 && !matches!(b, b'\r' | b'\n' | b'\t') || b == 127)
    {
        return Err(FromError::Unparsable);
    }
    let parsed = MessageParser::new()
        .parse_headers(raw)
        .ok_or(FromError::Unparsable)?;
    let addresses = parsed.from().ok_or(FromError::Unparsable)?;
    let mut count = 0;
    for addr in addresses.iter() {
        count += 1;
        let text = addr.address.as_deref().ok_or(FromError::Unparsable)?;
        if text.starts_with('@') || text.contains(':') {
            // A source route survived parsing.
            return Err(FromError::Unparsable);
        }
        let address = Address::parse(text).map_err(|_| FromError::Unparsable)?;
        if !may_send_as(identity, &address) {
            return Err(FromError::NotOwned(address.to_string()));
        }
    }
    if count == 0 {
        return Err(FromError::Unparsable);
    }
    // mail-parser recovers from malformed headers by picking one address; other readers
    // may pick another (`From: <alice@x> "<mallory@y>"`). So every address-like text in the
    // raw field, wherever it stands (display name, comment, stray quotes), must be owned too.
    for candidate in addresses_in(&raw[raw.iter().position(|&b| b == b':').map_or(0, |i| i + 1)..])
    {
        if let Ok(address) = Address::parse(&candidate) {
            if !may_send_as(identity, &address) {
                return Err(FromError::NotOwned(address.to_string()));
            }
        }
    }
    Ok(())
}

/// Every `local@domain` run of address characters in `raw`.
fn addresses_in(raw: &[u8]) -> Vec<String> {
    let local =
        |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~.-".contains(&b) || b >= 0x80;
    let domain = |b: u8| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b >= 0x80;
    let mut found = Vec::new();
    for (at, _) in raw.iter().enumerate().filter(|(_, &b)| b == b'@') {
        let start = raw[..at]
            .iter()
            .rposition(|&b| !local(b))
            .map_or(0, |i| i + 1);
        let end = raw[at + 1..]
            .iter()
            .position(|&b| !domain(b))
            .map_or(raw.len(), |i| at + 1 + i);
        let (l, d) = (&raw[start..at], &raw[at + 1..end]);
        let d = d.strip_suffix(b".").unwrap_or(d);
        if !l.is_empty() && !d.is_empty() {
            found.push(format!(
                "{}@{}",
                String::from_utf8_lossy(l),
                String::from_utf8_lossy(d)
            ));
        }
    }
    found
}

/// The domain of the (first) From: address, for DKIM key selection.
pub fn from_domain(message: &[u8], fields: &[Field<'_>]) -> Option<String> {
    let field = fields.iter().find(|f| f.is("From"))?;
    let parsed = MessageParser::new().parse_headers(&message[field.range.clone()])?;
    let first = parsed.from()?.first()?;
    Address::parse(first.address.as_deref()?)
        .ok()
        .map(|a| a.domain().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::headers::fields;

    fn alice() -> Identity {
        Identity {
            user_id: 1,
            login: Address::parse("alice@example.org").unwrap(),
            allowed: vec!["@alice.example".into(), "team@example.org".into()],
            received: None,
        }
    }

    #[test]
    fn ownership_table() {
        let table = [
            ("alice@example.org", true),
            ("Alice@EXAMPLE.org", true),
            ("team@example.org", true),
            ("anyone@alice.example", true),
            ("anyone@ALICE.example", true),
            ("bob@example.org", false),
            ("alice@example.net", false),
            ("alice@sub.alice.example", false),
        ];
        for (addr, want) in table {
            assert_eq!(
                may_send_as(&alice(), &Address::parse(addr).unwrap()),
                want,
                "{addr}"
            );
        }
    }

    fn check(headers: &str) -> Result<(), FromError> {
        let msg = format!("{headers}\r\nbody\r\n");
        let (f, _) = fields(msg.as_bytes());
        check_from(&alice(), msg.as_bytes(), &f)
    }

    #[test]
    fn from_header_table() {
        let table: &[(&str, Result<(), FromError>)] = &[
            ("From: alice@example.org\r\n", Ok(())),
            ("From: \"Alice Liddell\" <alice@example.org>\r\n", Ok(())),
            ("From: Alice (work) <alice@example.org>\r\n", Ok(())),
            (
                "FROM: =?utf-8?q?Al=C3=AFce?= <alice@example.org>\r\n",
                Ok(()),
            ),
            ("From: Alice\r\n <alice@example.org>\r\n", Ok(())),
            ("From: alice@example.org, x@alice.example\r\n", Ok(())),
            (
                "From: \"alice@example.org\" <mallory@evil.example>\r\n",
                Err(FromError::NotOwned("mallory@evil.example".into())),
            ),
            (
                "From: alice@example.org, bob@example.org\r\n",
                Err(FromError::NotOwned("bob@example.org".into())),
            ),
            ("Subject: no from\r\n", Err(FromError::Missing)),
            (
                "From: alice@example.org\r\nFrom: alice@example.org\r\n",
                Err(FromError::Multiple),
            ),
            (
                "From: Alice\x01 <alice@example.org>\r\n",
                Err(FromError::Unparsable),
            ),
            ("From: undisclosed\r\n", Err(FromError::Unparsable)),
            (
                "From: <alice@example.org> \"<mallory@evil.example>\"\r\n",
                Err(FromError::NotOwned("mallory@evil.example".into())),
            ),
            (
                "From: <alice@example.org> (<mallory@evil.example>\r\n",
                Err(FromError::NotOwned("mallory@evil.example".into())),
            ),
            (
                "From: \"alice@example.org\" <alice@example.org>\r\n",
                Ok(()),
            ),
            (
                "From: \"support@bank.example\" <alice@example.org>\r\n",
                Err(FromError::NotOwned("support@bank.example".into())),
            ),
            ("From : alice@example.org\r\n", Err(FromError::Unparsable)),
            // A second From in the obsolete form is still a second From.
            (
                "From: alice@example.org\r\nFrom : mallory@evil.example\r\n",
                Err(FromError::Multiple),
            ),
            (
                "From: alice@example.org\r\nfrom\t: mallory@evil.example\r\n",
                Err(FromError::Multiple),
            ),
        ];
        for (headers, want) in table {
            assert_eq!(&check(headers), want, "{headers:?}");
        }
    }

    #[test]
    fn from_domain_is_the_first_address() {
        let msg = b"From: Alice <alice@Example.ORG>\r\n\r\n";
        let (f, _) = fields(msg);
        assert_eq!(from_domain(msg, &f).as_deref(), Some("example.org"));
    }
}
