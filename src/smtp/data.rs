//! Message content as it arrives after DATA or BDAT: dot-unstuffing, the end-of-data marker,
//! the size limit and the line rules that keep SMTP smuggling out of the queue.
//!
//! smtp-proto ships a DATA receiver, but it treats a bare LF as a line end (so `\n.\n`
//! would be unstuffed and `\n.\r\n` ends the data), which is exactly the ambiguity SMTP
//! smuggling exploits. An MSA must be stricter than that, so this reader is written here:
//! the only end of data is CRLF.CRLF, and a bare CR, a bare LF or a NUL anywhere marks the
//! message as refused while the rest of it is still consumed so the session stays in sync.

use memchr::memchr3;

/// Longest text line without its CRLF (RFC 5321 4.5.3.1.6).
pub const MAX_TEXT_LINE: usize = 998;

/// What was wrong with a message's content, in the order they are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentError {
    /// More octets than `max_message_size`; nothing past the limit was kept.
    TooBig,
    /// A bare CR, a bare LF or a NUL.
    BareLineEnding,
    /// A line longer than 998 octets.
    LineTooLong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineState {
    /// At the start of a line (after CRLF, or at the very start).
    LineStart,
    /// A `.` at the start of a line (DATA only).
    Dot,
    /// `.` CR at the start of a line (DATA only): LF ends the data.
    DotCr,
    /// Inside a line.
    InLine,
    /// A CR inside a line, waiting for its LF.
    Cr,
}

/// Scans message content, appending the unstuffed bytes to a buffer.
#[derive(Debug)]
pub struct ContentReader {
    dot_stuffed: bool,
    state: LineState,
    line_len: usize,
    size: usize,
    limit: usize,
    too_big: bool,
    bare_line_ending: bool,
    line_too_long: bool,
}

impl ContentReader {
    /// A reader for DATA: dot-stuffed, ended by CRLF.CRLF.
    pub fn dot_stuffed(limit: usize) -> Self {
        Self::new(true, limit)
    }

    /// A reader for BDAT chunks: taken as they are, the length comes from the command.
    pub fn chunked(limit: usize) -> Self {
        Self::new(false, limit)
    }

    fn new(dot_stuffed: bool, limit: usize) -> Self {
        Self {
            dot_stuffed,
            state: LineState::LineStart,
            line_len: 0,
            size: 0,
            limit,
            too_big: false,
            bare_line_ending: false,
            line_too_long: false,
        }
    }

    /// Octets kept so far (after unstuffing).
    pub fn size(&self) -> usize {
        self.size
    }

    /// Feeds bytes. For DATA, returns `Some(consumed)` when CRLF.CRLF has been seen, with the
    /// bytes after it left for the command reader; otherwise every byte was consumed.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                LineState::LineStart if self.dot_stuffed && input[i] == b'.' => {
                    // The stuffing dot is not part of the line (RFC 5321 4.5.3.1.6).
                    self.state = LineState::Dot;
                    self.line_len = 0;
                    i += 1;
                }
                LineState::LineStart => {
                    self.state = LineState::InLine;
                    self.line_len = 0;
                }
                LineState::Dot if input[i] == b'\r' => {
                    self.state = LineState::DotCr;
                    i += 1;
                }
                // A stuffed dot: it was dropped, the line goes on.
                LineState::Dot => self.state = LineState::InLine,
                LineState::DotCr if input[i] == b'\n' => {
                    self.state = LineState::LineStart;
                    return Some(i + 1);
                }
                LineState::DotCr | LineState::Cr if input[i] == b'\n' => {
                    self.emit(b"\r\n", out);
                    self.state = LineState::LineStart;
                    i += 1;
                }
                LineState::DotCr | LineState::Cr => {
                    self.bare_line_ending = true;
                    self.emit(b"\r", out);
                    self.line_len += 1;
                    self.state = LineState::InLine;
                }
                LineState::InLine => {
                    let rest = &input[i..];
                    let stop = memchr3(b'\r', b'\n', 0, rest).unwrap_or(rest.len());
                    self.emit(&rest[..stop], out);
                    self.line_len += stop;
                    if self.line_len > MAX_TEXT_LINE {
                        self.line_too_long = true;
                    }
                    i += stop;
                    match input.get(i) {
                        Some(b'\r') => {
                            self.state = LineState::Cr;
                            i += 1;
                        }
                        Some(b'\n') => {
                            // A bare LF: kept out of the queue, but not a line end either.
                            self.bare_line_ending = true;
                            self.emit(b"\n", out);
                            i += 1;
                        }
                        Some(_) => {
                            self.bare_line_ending = true;
                            i += 1;
                        }
                        None => {}
                    }
                }
            }
        }
        None
    }

    /// Ends a BDAT message: a dangling CR is a bare CR; a missing final CRLF is added.
    pub fn finish_chunked(&mut self, out: &mut Vec<u8>) {
        if self.state == LineState::Cr {
            self.bare_line_ending = true;
            self.emit(b"\r", out);
        }
        if self.state != LineState::LineStart && self.size > 0 {
            self.emit(b"\r\n", out);
        }
        self.state = LineState::LineStart;
    }

    /// The verdict on everything fed so far.
    pub fn result(&self) -> Result<(), ContentError> {
        if self.too_big {
            Err(ContentError::TooBig)
        } else if self.bare_line_ending {
            Err(ContentError::BareLineEnding)
        } else if self.line_too_long {
            Err(ContentError::LineTooLong)
        } else {
            Ok(())
        }
    }

    fn emit(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        if self.too_big {
            return;
        }
        if self.size + bytes.len() > self.limit {
            // Keep consuming to stay in sync with the client, but hold nothing more.
            self.too_big = true;
            *out = Vec::new();
            return;
        }
        self.size += bytes.len();
        out.extend_from_slice(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes, as a network would.
    fn read(
        input: &[u8],
        step: usize,
        limit: usize,
    ) -> (Vec<u8>, Option<usize>, Result<(), ContentError>) {
        let mut r = ContentReader::dot_stuffed(limit);
        let mut out = Vec::new();
        let mut offset = 0;
        for chunk in input.chunks(step) {
            if let Some(n) = r.feed(chunk, &mut out) {
                return (out, Some(offset + n), r.result());
            }
            offset += chunk.len();
        }
        (out, None, r.result())
    }

    #[test]
    fn unstuffs_and_finds_the_end() {
        let table: &[(&[u8], &[u8], usize)] = &[
            (b".\r\n", b"", 3),
            (
                b"Subject: x\r\n\r\nbody\r\n.\r\n",
                b"Subject: x\r\n\r\nbody\r\n",
                23,
            ),
            (b"..leading dot\r\n.\r\n", b".leading dot\r\n", 18),
            (b"a\r\n..\r\n.\r\nQUIT\r\n", b"a\r\n.\r\n", 10),
            (b"a\r\n.b\r\n.\r\n", b"a\r\nb\r\n", 10),
        ];
        for step in [1, 2, 3, 1024] {
            for (input, want, end) in table {
                let (out, consumed, result) = read(input, step, 1 << 20);
                assert_eq!(out, *want, "{input:?} step {step}");
                assert_eq!(consumed, Some(*end), "{input:?} step {step}");
                assert_eq!(result, Ok(()));
            }
        }
    }

    #[test]
    fn only_crlf_dot_crlf_ends_data() {
        // Each of these would end the data for a lenient server; here the message goes on.
        let table: &[&[u8]] = &[
            b"a\n.\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\nRCPT TO:<x@y>\r\n",
            b"a\n.\r\nDATA\r\n",
            b"a\r.\r\nDATA\r\n",
        ];
        for input in table {
            for step in [1, 4, 1024] {
                let (_, consumed, result) = read(input, step, 1 << 20);
                assert_eq!(consumed, None, "{input:?}");
                assert_eq!(result, Err(ContentError::BareLineEnding), "{input:?}");
            }
        }
    }

    #[test]
    fn bare_endings_and_nul_refuse_the_message() {
        for input in [
            &b"a\nb\r\n.\r\n"[..],
            b"a\rb\r\n.\r\n",
            b"a\0b\r\n.\r\n",
            b"a\r\r\n.\r\n",
        ] {
            let (_, consumed, result) = read(input, 1024, 1 << 20);
            assert_eq!(consumed, Some(input.len()), "{input:?}");
            assert_eq!(result, Err(ContentError::BareLineEnding), "{input:?}");
        }
    }

    #[test]
    fn long_lines_and_size() {
        let mut long = vec![b'x'; 999];
        long.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(read(&long, 100, 1 << 20).2, Err(ContentError::LineTooLong));
        let mut ok = vec![b'x'; 998];
        ok.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(read(&ok, 100, 1 << 20).2, Ok(()));
        // A 998-octet line starting with a dot is 999 octets on the wire, stuffing included.
        let mut stuffed = vec![b'.', b'.'];
        stuffed.extend(vec![b'x'; 997]);
        stuffed.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(read(&stuffed, 100, 1 << 20).2, Ok(()));
        let (out, consumed, result) = read(b"0123456789\r\n.\r\n", 3, 8);
        assert_eq!(result, Err(ContentError::TooBig));
        assert_eq!(consumed, Some(15));
        assert!(out.is_empty());
    }

    #[test]
    fn chunks_keep_dots_and_check_endings() {
        let mut r = ContentReader::chunked(1 << 20);
        let mut out = Vec::new();
        assert_eq!(r.feed(b"a\r", &mut out), None);
        assert_eq!(r.feed(b"\n.\r\nb", &mut out), None);
        r.finish_chunked(&mut out);
        assert_eq!(out, b"a\r\n.\r\nb\r\n");
        assert_eq!(r.result(), Ok(()));

        let mut r = ContentReader::chunked(1 << 20);
        r.feed(b"a\nb", &mut out);
        assert_eq!(r.result(), Err(ContentError::BareLineEnding));
    }
}
