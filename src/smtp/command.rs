//! One command line in, one typed [`Command`] (or the exact refusal) out.
//!
//! The grammar itself is smtp-proto's; this module adds what an MSA must refuse on top of it:
//! bare CR, bare LF and NUL inside a line (so they can never split one line into two
//! commands), source routes and control characters in addresses, and it maps every parser
//! error to its SMTP reply.

use std::borrow::Cow;

use smtp_proto::{Error as ParseError, Request};

use super::reply::Reply;

/// Longest command line, CRLF included (RFC 5321 4.5.3.1.4).
pub const MAX_COMMAND_LINE: usize = 512;
/// Longest AUTH command or SASL response line (RFC 4954 4: 12,288 octets).
pub const MAX_AUTH_LINE: usize = 12_288;

/// SASL mechanisms we implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

/// A parsed SMTP command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    Mail {
        /// Empty for the null reverse-path `<>`.
        address: String,
        /// The `SIZE=` parameter, if given.
        size: Option<usize>,
        /// The `SMTPUTF8` parameter (RFC 6531): non-ASCII addresses are allowed.
        smtputf8: bool,
    },
    Rcpt {
        address: String,
    },
    Data,
    Bdat {
        size: usize,
        last: bool,
    },
    Auth {
        /// `None` for a mechanism we do not offer.
        mechanism: Option<Mechanism>,
        /// Initial response as sent (base64 or `=`), if any.
        initial_response: Option<String>,
    },
    StartTls,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    /// A command smtp-proto knows that an MSA does not offer (ETRN, ATRN, BURL, LHLO).
    NotOffered(&'static str),
}

/// Parses one line that ends in CRLF. The line must not be longer than the caller's limit.
pub fn parse(line: &[u8]) -> Result<Command, Reply> {
    let Some(content) = line.strip_suffix(b"\r\n") else {
        return Err(Reply::new(500, (5, 5, 2), "Line must end with CRLF"));
    };
    if content.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(Reply::new(
            501,
            (5, 5, 2),
            "Bare CR, bare LF or NUL in command line",
        ));
    }
    if !content.is_ascii()
        && !starts_with_ignore_case(content, b"MAIL")
        && !starts_with_ignore_case(content, b"RCPT")
    {
        // Only SMTPUTF8 addresses may carry 8-bit octets in a command.
        return Err(Reply::new(500, (5, 5, 2), "8-bit characters in command"));
    }
    let request = Request::parse(&mut line.iter()).map_err(|e| parse_error_reply(&e, content))?;
    Ok(match request {
        Request::Ehlo { host } => Command::Ehlo(host.into_owned()),
        Request::Helo { host } => Command::Helo(host.into_owned()),
        Request::Lhlo { .. } => Command::NotOffered("LHLO"),
        Request::Mail { from } => {
            check_address(&from.address, content, (5, 1, 7))?;
            Command::Mail {
                smtputf8: from.flags & smtp_proto::MAIL_SMTPUTF8 != 0,
                address: from.address.into_owned(),
                size: (from.size > 0).then_some(from.size),
            }
        }
        Request::Rcpt { to } => {
            if to.address.is_empty() {
                return Err(Reply::new(501, (5, 1, 3), "Bad recipient address syntax"));
            }
            check_address(&to.address, content, (5, 1, 3))?;
            Command::Rcpt {
                address: to.address.into_owned(),
            }
        }
        Request::Data => Command::Data,
        Request::Bdat {
            chunk_size,
            is_last,
        } => Command::Bdat {
            size: chunk_size,
            last: is_last,
        },
        Request::Auth {
            mechanism,
            initial_response,
        } => Command::Auth {
            mechanism: match mechanism {
                smtp_proto::AUTH_PLAIN => Some(Mechanism::Plain),
                smtp_proto::AUTH_LOGIN => Some(Mechanism::Login),
                _ => None,
            },
            initial_response: (!initial_response.is_empty()).then(|| initial_response.into_owned()),
        },
        Request::StartTls => Command::StartTls,
        Request::Rset => Command::Rset,
        Request::Noop { .. } => Command::Noop,
        Request::Quit => Command::Quit,
        Request::Vrfy { .. } => Command::Vrfy,
        Request::Expn { .. } => Command::Expn,
        Request::Help { .. } => Command::Help,
        Request::Etrn { .. } => Command::NotOffered("ETRN"),
        Request::Atrn { .. } => Command::NotOffered("ATRN"),
        Request::Burl { .. } => Command::NotOffered("BURL"),
    })
}

/// True when the line is an AUTH command, which may be up to [`MAX_AUTH_LINE`] long.
pub fn is_auth_line(line: &[u8]) -> bool {
    starts_with_ignore_case(line, b"AUTH ")
}

fn starts_with_ignore_case(line: &[u8], prefix: &[u8]) -> bool {
    line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// smtp-proto silently drops source routes and accepts control characters inside quoted
/// local parts; an MSA refuses both.
fn check_address(address: &str, line: &[u8], enhanced: (u8, u16, u16)) -> Result<(), Reply> {
    let routed = line.windows(2).position(|w| w == b"<@").is_some();
    if routed {
        return Err(Reply::new(501, enhanced, "Source routes are not accepted"));
    }
    if address.chars().any(|c| c.is_control()) {
        return Err(Reply::new(501, enhanced, "Control characters in address"));
    }
    Ok(())
}

fn parse_error_reply(error: &ParseError, line: &[u8]) -> Reply {
    match error {
        ParseError::UnknownCommand => Reply::new(500, (5, 5, 1), "Unknown command"),
        ParseError::InvalidSenderAddress => Reply::new(501, (5, 1, 7), "Bad sender address syntax"),
        ParseError::InvalidRecipientAddress => {
            Reply::new(501, (5, 1, 3), "Bad recipient address syntax")
        }
        ParseError::SyntaxError { syntax } => {
            Reply::new(501, (5, 5, 2), Cow::Owned(format!("Syntax: {syntax}")))
        }
        ParseError::InvalidParameter { param } => Reply::new(
            501,
            (5, 5, 4),
            Cow::Owned(format!("Invalid value for parameter {param}")),
        ),
        ParseError::UnsupportedParameter { .. } => {
            Reply::new(555, (5, 5, 4), "Unsupported parameter")
        }
        ParseError::ResponseTooLong => Reply::new(500, (5, 5, 6), "Line too long"),
        ParseError::NeedsMoreData { .. } | ParseError::InvalidResponse { .. } => {
            if line.is_empty() {
                Reply::new(500, (5, 5, 2), "Empty command")
            } else {
                Reply::new(501, (5, 5, 2), "Syntax error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(line: &str) -> (u16, Option<(u8, u16, u16)>) {
        match parse(line.as_bytes()) {
            Ok(_) => (0, None),
            Err(r) => (r.code, r.enhanced),
        }
    }

    #[test]
    fn parses_the_commands_an_msa_uses() {
        let table: &[(&str, Command)] = &[
            (
                "EHLO client.example\r\n",
                Command::Ehlo("client.example".into()),
            ),
            (
                "ehlo [192.168.1.7]\r\n",
                Command::Ehlo("[192.168.1.7]".into()),
            ),
            (
                "MAIL FROM:<a@example.org> SIZE=1000\r\n",
                Command::Mail {
                    address: "a@example.org".into(),
                    size: Some(1000),
                    smtputf8: false,
                },
            ),
            (
                "MAIL FROM:<>\r\n",
                Command::Mail {
                    address: String::new(),
                    size: None,
                    smtputf8: false,
                },
            ),
            (
                "RCPT TO:<b@example.net>\r\n",
                Command::Rcpt {
                    address: "b@example.net".into(),
                },
            ),
            ("DATA\r\n", Command::Data),
            (
                "BDAT 10 LAST\r\n",
                Command::Bdat {
                    size: 10,
                    last: true,
                },
            ),
            (
                "BDAT 0\r\n",
                Command::Bdat {
                    size: 0,
                    last: false,
                },
            ),
            (
                "AUTH PLAIN AGEAYg==\r\n",
                Command::Auth {
                    mechanism: Some(Mechanism::Plain),
                    initial_response: Some("AGEAYg==".into()),
                },
            ),
            (
                "AUTH LOGIN\r\n",
                Command::Auth {
                    mechanism: Some(Mechanism::Login),
                    initial_response: None,
                },
            ),
            ("STARTTLS\r\n", Command::StartTls),
            ("ETRN example.org\r\n", Command::NotOffered("ETRN")),
            ("QUIT\r\n", Command::Quit),
            ("VRFY postmaster\r\n", Command::Vrfy),
        ];
        for (line, want) in table {
            assert_eq!(&parse(line.as_bytes()).unwrap(), want, "{line:?}");
        }
    }

    #[test]
    fn refuses_with_exact_codes() {
        let table: &[(&str, u16, (u8, u16, u16))] = &[
            ("FOO bar\r\n", 500, (5, 5, 1)),
            ("MAIL FROM:<a@b.c>\nRCPT TO:<x@y.z>\r\n", 501, (5, 5, 2)),
            ("MAIL FROM:<a@b.c>\rRCPT TO:<x@y.z>\r\n", 501, (5, 5, 2)),
            ("NOOP \0\r\n", 501, (5, 5, 2)),
            ("MAIL FROM:a@b.c\r\n", 501, (5, 5, 2)),
            ("MAIL FROM:<a@@b>\r\n", 501, (5, 1, 7)),
            ("RCPT TO:<nodomain>\r\n", 501, (5, 1, 3)),
            ("RCPT TO:<>\r\n", 501, (5, 1, 3)),
            ("RCPT TO:<@relay.example:b@c.d>\r\n", 501, (5, 1, 3)),
            ("MAIL FROM:<a@b.c> FOO=BAR\r\n", 555, (5, 5, 4)),
            ("MAIL FROM:<a@b.c> SIZE=abc\r\n", 501, (5, 5, 4)),
            ("EHLO\r\n", 501, (5, 5, 2)),
            ("DATA", 500, (5, 5, 2)),
        ];
        for (line, c, e) in table {
            assert_eq!(code(line), (*c, Some(*e)), "{line:?}");
        }
    }

    #[test]
    fn auth_lines_are_recognised() {
        assert!(is_auth_line(b"auth plain xyz\r\n"));
        assert!(!is_auth_line(b"AUTHX\r\n"));
    }
}
