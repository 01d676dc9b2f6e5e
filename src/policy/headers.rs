//! The header section of a message as raw fields with their exact byte ranges.
//!
//! Parsers such as mail-parser decode header values, but the privacy rewrite must remove a
//! few fields and leave every other byte of the header block exactly as submitted (folding,
//! order, case), so it needs the raw extent of each field. Finding those extents is a small
//! line scan, written here.

use std::ops::Range;

/// One header field: its name and the range of its raw bytes (continuation lines and the
/// final CRLF included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<'a> {
    pub name: &'a str,
    pub range: Range<usize>,
    /// Written in the obsolete syntax with white space before the colon (`Subject : x`,
    /// RFC 5322 §4.5): a field all the same, but not every parser agrees on its name.
    pub obsolete: bool,
}

impl Field<'_> {
    /// Case-insensitive name comparison.
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }
}

/// Splits a message into its header fields and the offset where the rest (the blank line
/// and the body) begins. A line that is neither a field nor a continuation ends the header
/// section there, as if a blank line preceded it; `rest_needs_separator` tells the two apart.
pub fn fields(message: &[u8]) -> (Vec<Field<'_>>, usize) {
    let mut fields: Vec<Field<'_>> = Vec::new();
    let mut pos = 0;
    while pos < message.len() {
        let line_end =
            memchr::memchr(b'\n', &message[pos..]).map_or(message.len(), |i| pos + i + 1);
        let line = &message[pos..line_end];
        let is_continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if is_continuation {
            match fields.last_mut() {
                Some(last) => last.range.end = line_end,
                None => break,
            }
        } else {
            let Some(colon) = memchr::memchr(b':', line) else {
                break;
            };
            let raw_name = &line[..colon];
            // obs-optional: the name may be followed by white space before the colon.
            let name_len = raw_name
                .iter()
                .rposition(|&b| !matches!(b, b' ' | b'\t'))
                .map_or(0, |i| i + 1);
            let name = &raw_name[..name_len];
            let valid =
                !name.is_empty() && name.iter().all(|&b| (33..=126).contains(&b) && b != b':');
            let Ok(name) = std::str::from_utf8(name) else {
                break;
            };
            if !valid {
                break;
            }
            fields.push(Field {
                name,
                range: pos..line_end,
                obsolete: name_len < raw_name.len(),
            });
        }
        pos = line_end;
    }
    (fields, pos)
}

/// True if the header section of `message` ended at a line that is not a field rather than
/// at a blank line (or the end of the message): the body then needs a separator in front.
pub fn rest_needs_separator(message: &[u8], header_end: usize) -> bool {
    let rest = message.get(header_end..).unwrap_or_default();
    !(rest.is_empty() || rest.starts_with(b"\r\n") || rest.starts_with(b"\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn obsolete_names_and_non_field_lines() {
        let msg =
            b"From: a@b.c\r\nSubject \t: old style\r\nX-Originating-IP : [192.0.2.1]\r\n\r\nb\r\n";
        let (f, end) = fields(msg);
        let names: Vec<_> = f.iter().map(|f| (f.name, f.obsolete)).collect();
        assert_eq!(
            names,
            [
                ("From", false),
                ("Subject", true),
                ("X-Originating-IP", true)
            ]
        );
        assert_eq!(&msg[f[1].range.clone()], b"Subject \t: old style\r\n");
        assert!(!rest_needs_separator(msg, end));

        let msg = b"From: a@b.c\r\nnot a field\r\nX-Y: z\r\n\r\nb\r\n";
        let (f, end) = fields(msg);
        assert_eq!(f.len(), 1);
        assert!(rest_needs_separator(msg, end));
        // An empty name is no name.
        let (f, end) = fields(b"From: a@b.c\r\n: x\r\n");
        assert_eq!((f.len(), end), (1, 13));
        assert!(!rest_needs_separator(b"From: a\r\n", 9));
        assert!(!rest_needs_separator(b"From: a\n\nb", 8));
    }

    #[test]
    fn finds_fields_and_folding() {
        let msg =
            b"From: a@b.c\r\nSubject: hello\r\n  world\r\nX-Y:z\r\n\r\nbody: not a header\r\n";
        let (f, end) = fields(msg);
        let names: Vec<_> = f.iter().map(|f| f.name).collect();
        assert_eq!(names, ["From", "Subject", "X-Y"]);
        assert_eq!(&msg[f[1].range.clone()], b"Subject: hello\r\n  world\r\n");
        assert_eq!(&msg[end..], b"\r\nbody: not a header\r\n");
        assert!(f[0].is("from"));
    }

    #[test]
    fn stops_at_a_non_header_line() {
        let (f, end) = fields(b"From: a@b.c\r\nthis is body\r\n");
        assert_eq!(f.len(), 1);
        assert_eq!(end, 13);
        let (f, end) = fields(b"\r\nbody\r\n");
        assert!(f.is_empty());
        assert_eq!(end, 0);
    }
}

/// The header fields RFC 6409 §8.2 and §8.3 let an MSA add when the client left them out:
/// `Date` and `Message-ID`. Fields that are present are never rewritten. `random` makes the
/// Message-ID unique; `now` is seconds since the epoch.
/// Returns each added field as (name, CRLF-terminated line).
pub fn missing_fields(
    fields: &[Field<'_>],
    hostname: &str,
    now: i64,
    random: u128,
) -> Vec<(&'static str, String)> {
    let mut added = Vec::new();
    if !fields.iter().any(|f| f.is("Message-ID")) {
        added.push((
            "Message-ID",
            format!("Message-ID: <{random:032x}@{hostname}>\r\n"),
        ));
    }
    if !fields.iter().any(|f| f.is("Date")) {
        added.push(("Date", format!("Date: {}\r\n", rfc5322_date(now))));
    }
    added
}

/// A date as RFC 5322 wants it, in UTC: `Fri, 4 Dec 2026 15:47:53 +0000`.
pub fn rfc5322_date(unix: i64) -> String {
    mail_parser::DateTime::from_timestamp(unix).to_rfc822()
}

#[cfg(test)]
mod fix_tests {
    use super::*;

    #[test]
    fn adds_only_what_is_missing() {
        let (f, _) = fields(b"From: a@b.c\r\n\r\n");
        let added = missing_fields(&f, "mx.example.org", 1_796_399_273, 0xab);
        let names: Vec<&str> = added.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["Message-ID", "Date"]);
        assert_eq!(
            added.into_iter().map(|(_, line)| line).collect::<String>(),
            "Message-ID: <000000000000000000000000000000ab@mx.example.org>\r\nDate: Fri, 4 Dec 2026 15:47:53 +0000\r\n"
        );
        let (f, _) = fields(b"message-id: <x@y>\r\nDATE: whenever\r\n\r\n");
        assert!(missing_fields(&f, "mx", 0, 1).is_empty());
    }
}
