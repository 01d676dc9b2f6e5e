//! SMTP replies: a code, an enhanced status code (RFC 3463) and a text.

use std::borrow::Cow;
use std::fmt;

/// One SMTP reply, possibly multi-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// `None` only where RFC 2034 has no place for one: the greeting, EHLO and SASL challenges.
    pub enhanced: Option<(u8, u16, u16)>,
    pub lines: Vec<Cow<'static, str>>,
}

impl Reply {
    /// A one-line reply with an enhanced status code.
    pub fn new(code: u16, enhanced: (u8, u16, u16), text: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            enhanced: Some(enhanced),
            lines: vec![text.into()],
        }
    }

    /// A reply without enhanced status code (greeting, EHLO, 334 challenges).
    pub fn plain(code: u16, text: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            enhanced: None,
            lines: vec![text.into()],
        }
    }

    /// A multi-line reply without enhanced code, such as the EHLO response.
    pub fn multiline(code: u16, lines: Vec<Cow<'static, str>>) -> Self {
        Self {
            code,
            enhanced: None,
            lines,
        }
    }

    /// 2xx.
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// 5xx and 4xx count as errors for the per-session error limit.
    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    /// Writes the reply in wire form, CRLF terminated.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        use std::io::Write;
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            let _ = write!(out, "{}{}", self.code, sep);
            if let Some((a, b, c)) = self.enhanced {
                let _ = write!(out, "{a}.{b}.{c} ");
            }
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if self.lines.is_empty() {
            let _ = write!(out, "{}\r\n", self.code);
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = Vec::new();
        self.write_to(&mut out);
        f.write_str(String::from_utf8_lossy(&out).trim_end())
    }
}

/// The replies used in more than one place, so that their wording stays consistent.
pub mod replies {
    use super::Reply;

    pub fn ok() -> Reply {
        Reply::new(250, (2, 0, 0), "OK")
    }
    pub fn must_starttls() -> Reply {
        Reply::new(530, (5, 7, 0), "Must issue a STARTTLS command first")
    }
    pub fn auth_required() -> Reply {
        Reply::new(530, (5, 7, 0), "Authentication required")
    }
    pub fn bad_sequence(text: &'static str) -> Reply {
        Reply::new(503, (5, 5, 1), text)
    }
    pub fn syntax(text: &'static str) -> Reply {
        Reply::new(501, (5, 5, 2), text)
    }
    pub fn line_too_long() -> Reply {
        Reply::new(500, (5, 5, 6), "Line too long")
    }
    pub fn too_many_errors() -> Reply {
        Reply::new(421, (4, 7, 0), "Too many errors, closing connection")
    }
    pub fn idle_timeout() -> Reply {
        Reply::new(421, (4, 4, 2), "Idle timeout, closing connection")
    }
    pub fn auth_deadline() -> Reply {
        Reply::new(
            421,
            (4, 7, 0),
            "Authentication took too long, closing connection",
        )
    }
    pub fn shutting_down() -> Reply {
        Reply::new(421, (4, 3, 0), "Server shutting down, try again later")
    }
    pub fn too_big() -> Reply {
        Reply::new(
            552,
            (5, 3, 4),
            "Message size exceeds fixed maximum message size",
        )
    }
    pub fn needs_smtputf8() -> Reply {
        Reply::new(
            553,
            (5, 6, 7),
            "Non-ASCII address requires the SMTPUTF8 parameter",
        )
    }
    pub fn temporary_failure() -> Reply {
        Reply::new(451, (4, 3, 0), "Temporary local problem, try again later")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(r: &Reply) -> String {
        let mut out = Vec::new();
        r.write_to(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn formats_single_and_multi_line() {
        assert_eq!(
            wire(&replies::must_starttls()),
            "530 5.7.0 Must issue a STARTTLS command first\r\n"
        );
        assert_eq!(wire(&Reply::plain(220, "mx ESMTP")), "220 mx ESMTP\r\n");
        let ehlo = Reply::multiline(
            250,
            vec!["mx".into(), "PIPELINING".into(), "SIZE 10".into()],
        );
        assert_eq!(wire(&ehlo), "250-mx\r\n250-PIPELINING\r\n250 SIZE 10\r\n");
        assert!(Reply::new(452, (4, 5, 3), "x").is_error());
        assert!(!replies::ok().is_error());
    }
}
