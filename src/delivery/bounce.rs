//! Delivery status notifications (RFC 3464) for recipients that failed for good.
//!
//! A DSN goes to the envelope sender with the null sender `<>`, through the same queue and
//! relay as any message; a DSN is never bounced itself, and a message sent with `<>` gets
//! none.

use crate::policy::headers::{self, rfc5322_date};
use crate::queue::{Entry, Recipient};

/// Everything a DSN needs besides the failed recipients.
#[derive(Debug)]
pub struct DsnContext<'a> {
    pub hostname: &'a str,
    /// Seconds since the epoch.
    pub now: i64,
    /// Makes the boundary and Message-ID unique.
    pub random: u128,
}

/// The enhanced status code in a reply such as `550 5.1.1 no such user`, or one derived from
/// the reply class.
pub fn status_of(reply: &str) -> String {
    let mut words = reply.split_whitespace();
    let code = words.next().unwrap_or("");
    if let Some(candidate) = words.next() {
        let parts: Vec<&str> = candidate.split('.').collect();
        let numeric = parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
        if numeric && matches!(parts[0], "2" | "4" | "5") {
            return candidate.to_owned();
        }
    }
    match code.chars().next() {
        Some('4') => "4.0.0".to_owned(),
        _ => "5.0.0".to_owned(),
    }
}

/// Builds the DSN message for `failed` recipients of the message `entry` describes;
/// `original` is the queued message, whose header section is returned to the sender.
pub fn build(
    ctx: &DsnContext<'_>,
    entry: &Entry,
    failed: &[&Recipient],
    original: &[u8],
) -> Vec<u8> {
    let boundary = format!("{:032x}/{}", ctx.random, ctx.hostname);
    let date = rfc5322_date(ctx.now);
    let (_, header_end) = headers::fields(original);
    let original_headers = &original[..header_end];
    let mut out = String::new();
    out.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{}>\r\n",
        ctx.hostname
    ));
    out.push_str(&format!("To: <{}>\r\n", entry.sender));
    out.push_str("Subject: Undelivered Mail Returned to Sender\r\n");
    out.push_str(&format!("Date: {date}\r\n"));
    out.push_str(&format!(
        "Message-ID: <{:032x}.dsn@{}>\r\n",
        ctx.random, ctx.hostname
    ));
    out.push_str("Auto-Submitted: auto-replied\r\n");
    out.push_str("MIME-Version: 1.0\r\n");
    out.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n"
    ));
    out.push_str("\r\nThis is a MIME-encapsulated message.\r\n\r\n");

    out.push_str(&format!("--{boundary}\r\n"));
    out.push_str(
        "Content-Description: Notification\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n",
    );
    out.push_str(&format!(
        "This is the mail system at {}.\r\n\r\nYour message {} could not be delivered to one or more\r\nrecipients. It has been returned with this notice.\r\n\r\n",
        ctx.hostname, entry.id
    ));
    for r in failed {
        out.push_str(&format!(
            "<{}>: {}\r\n",
            r.address,
            one_line(r.last_reply.as_deref())
        ));
    }
    out.push_str("\r\n");

    out.push_str(&format!("--{boundary}\r\n"));
    out.push_str(
        "Content-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n",
    );
    out.push_str(&format!("Reporting-MTA: dns; {}\r\n", ctx.hostname));
    out.push_str(&format!("X-Submitd-Queue-ID: {}\r\n", entry.id));
    out.push_str(&format!(
        "Arrival-Date: {}\r\n",
        rfc5322_date(entry.received_at)
    ));
    for r in failed {
        let reply = one_line(r.last_reply.as_deref());
        out.push_str("\r\n");
        out.push_str(&format!("Final-Recipient: rfc822; {}\r\n", r.address));
        out.push_str("Action: failed\r\n");
        out.push_str(&format!("Status: {}\r\n", status_of(&reply)));
        out.push_str(&format!("Diagnostic-Code: smtp; {reply}\r\n"));
    }
    out.push_str("\r\n");

    out.push_str(&format!("--{boundary}\r\n"));
    out.push_str("Content-Description: Undelivered Message Headers\r\nContent-Type: text/rfc822-headers\r\n\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(original_headers);
    if !original_headers.ends_with(b"\r\n") {
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    bytes
}

/// A reply as one printable line (a header value must not break).
/// A reply as one printable line (a header value must not break), cut to fit within the
/// 998-octet line limit even with the field name in front.
fn one_line(reply: Option<&str>) -> String {
    reply
        .unwrap_or("550 5.0.0 delivery failed")
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(900)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::QueueId;
    use crate::queue::RecipientStatus;

    #[test]
    fn status_codes() {
        assert_eq!(status_of("550 5.1.1 No such user"), "5.1.1");
        assert_eq!(status_of("550 No such user"), "5.0.0");
        assert_eq!(status_of("451 4.3.0 try later"), "4.3.0");
        assert_eq!(status_of("421 closing"), "4.0.0");
        assert_eq!(status_of("554 5.1.999x bad"), "5.0.0");
    }

    #[test]
    fn dsn_has_the_three_parts() {
        let entry = Entry {
            id: QueueId::parse("Q1").unwrap(),
            sender: "alice@example.org".into(),
            recipients: vec![],
            user: "alice@example.org".into(),
            client_ip: "192.0.2.1".into(),
            ehlo: "x".into(),
            tls: "TLSv1.3".into(),
            received_at: 1_796_399_000,
            attempts: 1,
            next_attempt: 0,
            last_error: None,
            is_bounce: false,
        };
        let failed = Recipient {
            address: "nobody@example.net".into(),
            status: RecipientStatus::Failed,
            last_reply: Some("550 5.1.1 <nobody@example.net>: no such user".into()),
        };
        let ctx = DsnContext {
            hostname: "mx.example.org",
            now: 1_796_399_273,
            random: 1,
        };
        let dsn = build(
            &ctx,
            &entry,
            &[&failed],
            b"From: alice@example.org\r\nSubject: hi\r\n\r\nsecret body\r\n",
        );
        let text = String::from_utf8(dsn).unwrap();
        for want in [
            "To: <alice@example.org>\r\n",
            "Content-Type: multipart/report; report-type=delivery-status;",
            "Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.org\r\n",
            "Final-Recipient: rfc822; nobody@example.net\r\nAction: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: smtp; 550 5.1.1 <nobody@example.net>: no such user\r\n",
            "Content-Type: text/rfc822-headers\r\n\r\nFrom: alice@example.org\r\nSubject: hi\r\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains("secret body"));
        assert!(text.ends_with("--\r\n"));
    }
}
