//! SASL PLAIN (RFC 4616) and LOGIN decoding: base64 in, credentials out. Pure functions.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::smtp::reply::Reply;

/// `Username:` in base64, the LOGIN mechanism's first challenge.
pub const LOGIN_USERNAME_PROMPT: &str = "VXNlcm5hbWU6";
/// `Password:` in base64, the LOGIN mechanism's second challenge.
pub const LOGIN_PASSWORD_PROMPT: &str = "UGFzc3dvcmQ6";

/// A login and password taken from a SASL exchange. Debug output never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    login: String,
    password: String,
}

impl Credentials {
    /// Wraps a login and password.
    pub fn new(login: String, password: String) -> Self {
        Self { login, password }
    }

    /// The authentication identity (an email address).
    pub fn login(&self) -> &str {
        &self.login
    }

    /// The password as sent.
    pub fn password(&self) -> &str {
        &self.password
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("login", &self.login)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why a SASL response was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    #[error("client cancelled the exchange")]
    Cancelled,
    #[error("response is not valid base64")]
    BadBase64,
    #[error("response is not a valid PLAIN or LOGIN message")]
    Malformed,
    #[error("authorization identity differs from the login")]
    AuthzidMismatch,
}

impl SaslError {
    /// The SMTP reply for this error (RFC 4954 section 4 and 6).
    pub fn reply(self) -> Reply {
        match self {
            SaslError::Cancelled => Reply::new(501, (5, 0, 0), "Authentication cancelled"),
            SaslError::BadBase64 => Reply::new(501, (5, 5, 2), "Invalid base64 data"),
            SaslError::Malformed => Reply::new(501, (5, 5, 2), "Malformed authentication response"),
            SaslError::AuthzidMismatch => Reply::new(
                535,
                (5, 7, 8),
                "Authorization identity must match the login",
            ),
        }
    }
}

fn decode(response: &[u8]) -> Result<Vec<u8>, SaslError> {
    let response = response.trim_ascii();
    if response == b"*" {
        return Err(SaslError::Cancelled);
    }
    // RFC 4954: "=" is an empty initial response.
    if response == b"=" {
        return Ok(Vec::new());
    }
    STANDARD.decode(response).map_err(|_| SaslError::BadBase64)
}

/// Decodes a PLAIN response: `[authzid] NUL authcid NUL passwd`.
pub fn decode_plain(response: &[u8]) -> Result<Credentials, SaslError> {
    let raw = decode(response)?;
    let mut parts = raw.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Malformed);
    };
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| SaslError::Malformed);
    let (authzid, login, password) = (text(authzid)?, text(authcid)?, text(password)?);
    if login.is_empty() || password.is_empty() {
        return Err(SaslError::Malformed);
    }
    if !authzid.is_empty() && authzid != login {
        return Err(SaslError::AuthzidMismatch);
    }
    Ok(Credentials::new(login, password))
}

/// Decodes one LOGIN response line (the username or the password).
pub fn decode_login_field(response: &[u8]) -> Result<String, SaslError> {
    let raw = decode(response)?;
    let field = String::from_utf8(raw).map_err(|_| SaslError::Malformed)?;
    if field.is_empty() || field.contains('\0') {
        return Err(SaslError::Malformed);
    }
    Ok(field)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &[u8]) -> Vec<u8> {
        STANDARD.encode(s).into_bytes()
    }

    /// Raw PLAIN message and the expected (login, password) or error.
    type PlainCase = (
        &'static [u8],
        Result<(&'static str, &'static str), SaslError>,
    );

    #[test]
    fn plain_table() {
        let table: &[PlainCase] = &[
            (
                b"\0alice@example.org\0secret",
                Ok(("alice@example.org", "secret")),
            ),
            (
                b"alice@example.org\0alice@example.org\0pw",
                Ok(("alice@example.org", "pw")),
            ),
            (
                b"bob\0alice@example.org\0pw",
                Err(SaslError::AuthzidMismatch),
            ),
            (b"\0alice@example.org", Err(SaslError::Malformed)),
            (b"\0alice@example.org\0", Err(SaslError::Malformed)),
            (b"\0\0pw", Err(SaslError::Malformed)),
            (b"a\0b\0c\0d", Err(SaslError::Malformed)),
            (b"\0al\xffce\0pw", Err(SaslError::Malformed)),
        ];
        for (raw, want) in table {
            let got = decode_plain(&b64(raw));
            let got = got
                .as_ref()
                .map(|c| (c.login(), c.password()))
                .map_err(|e| *e);
            assert_eq!(got, *want, "{raw:?}");
        }
        assert_eq!(decode_plain(b"*"), Err(SaslError::Cancelled));
        assert_eq!(decode_plain(b"not base64!"), Err(SaslError::BadBase64));
        assert_eq!(decode_plain(b"="), Err(SaslError::Malformed));
    }

    #[test]
    fn login_fields() {
        assert_eq!(decode_login_field(b"YWxpY2U=").unwrap(), "alice");
        assert_eq!(decode_login_field(b"*"), Err(SaslError::Cancelled));
        assert_eq!(decode_login_field(b"="), Err(SaslError::Malformed));
    }

    #[test]
    fn debug_hides_the_password() {
        let c = Credentials::new("a@b.c".into(), "hunter2".into());
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
