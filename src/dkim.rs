//! DKIM signing (RFC 6376, RFC 8463) with mail-auth: keys per From: domain, one signature per
//! configured key (an RSA and an Ed25519 key give dual signing), relaxed/relaxed.
//!
//! Signing is the last change to a message before it is queued. The body hash runs over the
//! assembled message parts in place, so the body is never copied for signing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use mail_auth::common::crypto::{Algorithm, DkimKey, Ed25519Key, RsaKey, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderWriter, Writable};
use mail_auth::dkim::{Canonicalization, DkimSigner};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;

use crate::config::DkimKeyConfig;

/// Smallest RSA key we sign with (RFC 8301 forbids 1024-bit keys for signing).
pub const MIN_RSA_BITS: usize = 2048;

/// Header fields signed when present; `From` is always signed and over-signed.
const SIGNED_HEADERS: [&str; 11] = [
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

/// Errors of the DKIM layer; each names the key file it is about.
#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("DKIM key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("DKIM signing for {domain} failed: {reason}")]
    Sign { domain: String, reason: String },
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// The two key types DKIM knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Rsa,
    Ed25519,
}

impl KeyType {
    /// The `k=` tag value.
    pub fn tag(self) -> &'static str {
        match self {
            KeyType::Rsa => "rsa",
            KeyType::Ed25519 => "ed25519",
        }
    }
}

/// A private key shared by all signers built for it; mail-auth's signer takes its key by value,
/// so signing per message with a per-message header list needs a cheap handle.
#[derive(Clone)]
struct SharedKey(Arc<DkimKey>);

impl SigningKey for SharedKey {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        self.0.sign(input)
    }

    fn algorithm(&self) -> Algorithm {
        self.0.algorithm()
    }
}

/// A loaded private key with what the DNS record needs.
pub struct LoadedKey {
    pub key_type: KeyType,
    /// The `p=` value of the DNS record, base64.
    pub public_key: String,
    signing: SharedKey,
}

impl std::fmt::Debug for LoadedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedKey")
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

/// Reads a PEM private key (PKCS#8 RSA or Ed25519, or PKCS#1 RSA).
pub fn load_key(path: &Path) -> Result<LoadedKey, DkimError> {
    let fail = |reason: String| DkimError::Key {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let der = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| fail(format!("not a PEM private key ({e})")))?;
    match der {
        PrivateKeyDer::Pkcs8(ref pkcs8) => {
            if let Ok(ed) = Ed25519Key::from_pkcs8_maybe_unchecked_der(pkcs8.secret_pkcs8_der()) {
                let public_key = STANDARD.encode(ed.public_key());
                return Ok(LoadedKey {
                    key_type: KeyType::Ed25519,
                    public_key,
                    signing: SharedKey(Arc::new(DkimKey::Ed25519(ed))),
                });
            }
            let parsed = rsa::RsaPrivateKey::from_pkcs8_der(pkcs8.secret_pkcs8_der())
                .map_err(|e| fail(format!("neither Ed25519 nor RSA ({e})")))?;
            rsa_key(parsed, der, &fail)
        }
        PrivateKeyDer::Pkcs1(ref pkcs1) => {
            let parsed = rsa::RsaPrivateKey::from_pkcs1_der(pkcs1.secret_pkcs1_der())
                .map_err(|e| fail(format!("bad RSA key ({e})")))?;
            rsa_key(parsed, der, &fail)
        }
        _ => Err(fail("unsupported key format (use PKCS#8)".into())),
    }
}

fn rsa_key(
    parsed: rsa::RsaPrivateKey,
    der: PrivateKeyDer<'_>,
    fail: &dyn Fn(String) -> DkimError,
) -> Result<LoadedKey, DkimError> {
    let bits = parsed.size() * 8;
    if bits < MIN_RSA_BITS {
        return Err(fail(format!(
            "RSA key has {bits} bits; at least {MIN_RSA_BITS} are required"
        )));
    }
    let spki = parsed
        .to_public_key()
        .to_public_key_der()
        .map_err(|e| fail(e.to_string()))?;
    let signing = RsaKey::<Sha256>::from_key_der(der).map_err(|e| fail(e.to_string()))?;
    Ok(LoadedKey {
        key_type: KeyType::Rsa,
        public_key: STANDARD.encode(spki.as_bytes()),
        signing: SharedKey(Arc::new(DkimKey::Rsa(signing))),
    })
}

/// Warnings for key files that group or others can read (a leaked key lets anyone sign as
/// the domain).
pub fn permission_warnings(configs: &[DkimKeyConfig]) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    configs
        .iter()
        .filter(|k| std::fs::metadata(&k.key).is_ok_and(|m| m.permissions().mode() & 0o077 != 0))
        .map(|k| {
            format!(
                "DKIM key {} is readable by group or others; chmod 600 it",
                k.key.display()
            )
        })
        .collect()
}

/// A generated private key as PEM (PKCS#8), for `submitd dkim generate`.
pub fn generate_key(key_type: KeyType, bits: usize) -> Result<String, String> {
    match key_type {
        KeyType::Ed25519 => {
            let der = Ed25519Key::generate_pkcs8().map_err(|e| e.to_string())?;
            let doc = rustls_pki_types::PrivatePkcs8KeyDer::from(der);
            Ok(pem_encode("PRIVATE KEY", doc.secret_pkcs8_der()))
        }
        KeyType::Rsa => {
            if !(MIN_RSA_BITS..=8192).contains(&bits) {
                return Err(format!("RSA keys must have {MIN_RSA_BITS} to 8192 bits"));
            }
            let key =
                rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, bits).map_err(|e| e.to_string())?;
            key.to_pkcs8_pem(LineEnding::LF)
                .map(|pem| pem.to_string())
                .map_err(|e| e.to_string())
        }
    }
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The DNS TXT record for a key, as it is published: strings of at most 255 characters.
pub fn dns_record(selector: &str, domain: &str, key_type: KeyType, public_key: &str) -> String {
    let value = format!("v=DKIM1; k={}; p={public_key}", key_type.tag());
    let strings: Vec<String> = value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    format!(
        "{selector}._domainkey.{domain}. IN TXT {}",
        strings.join(" ")
    )
}

/// The header names to sign for a message with these fields: From twice (over-signing, so a
/// second From cannot be added), the listed fields and `List-*` fields that are present.
///
/// A field in the obsolete `Name : value` form is left out: the signer takes `Name ` (with
/// the space) for its name while RFC 6376 relaxed canonicalization says `Name`, so a signature
/// covering it would not verify.
///
/// `present` are the names of the fields in the final header section; fields in the obsolete
/// `Name : value` form are left out by the caller, since the signer would not find them.
pub fn signed_header_names<'a>(present: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let present: Vec<&str> = present.into_iter().collect();
    let has = |name: &str| present.iter().any(|p| p.eq_ignore_ascii_case(name));
    let mut names = vec!["From".to_owned(), "From".to_owned()];
    for name in SIGNED_HEADERS {
        if has(name) {
            names.push(name.to_owned());
        }
    }
    for name in &present {
        let is_list = name.len() > 5 && name[..5].eq_ignore_ascii_case("List-");
        if is_list && !names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            names.push((*name).to_owned());
        }
    }
    names
}

#[derive(Debug)]
struct DomainKey {
    selector: String,
    key: LoadedKey,
    sign: bool,
}

/// All configured keys, by domain.
#[derive(Debug, Default)]
pub struct Signer {
    by_domain: HashMap<String, Vec<DomainKey>>,
}

impl Signer {
    /// Loads every `[[dkim]]` key; any unreadable, unparsable or weak key is an error.
    pub fn load(configs: &[DkimKeyConfig]) -> Result<Self, DkimError> {
        let mut by_domain: HashMap<String, Vec<DomainKey>> = HashMap::new();
        for c in configs {
            let key = load_key(&c.key)?;
            by_domain
                .entry(c.domain.to_lowercase())
                .or_default()
                .push(DomainKey {
                    selector: c.selector.clone(),
                    key,
                    sign: c.sign,
                });
        }
        Ok(Self { by_domain })
    }

    /// True if messages from `domain` get at least one signature.
    pub fn signs_for(&self, domain: &str) -> bool {
        self.by_domain
            .get(domain)
            .is_some_and(|keys| keys.iter().any(|k| k.sign))
    }

    /// Signs a message (its parts, in order) for `domain` with every active key of that
    /// domain; returns the DKIM-Signature header fields to prepend, CRLF terminated.
    pub fn sign(
        &self,
        domain: &str,
        parts: &[&[u8]],
        header_names: &[String],
    ) -> Result<Vec<String>, DkimError> {
        let Some(keys) = self.by_domain.get(domain) else {
            return Ok(Vec::new());
        };
        let mut headers = Vec::new();
        for k in keys.iter().filter(|k| k.sign) {
            let signature = DkimSigner::from_key(k.key.signing.clone())
                .domain(domain)
                .selector(k.selector.as_str())
                .headers(header_names.iter().map(String::as_str))
                .header_canonicalization(Canonicalization::Relaxed)
                .body_canonicalization(Canonicalization::Relaxed)
                .sign_chained(parts.iter().copied())
                .map_err(|e| DkimError::Sign {
                    domain: domain.to_owned(),
                    reason: e.to_string(),
                })?;
            let mut header = signature.to_header();
            if !header.ends_with("\r\n") {
                header.push_str("\r\n");
            }
            headers.push(header);
        }
        Ok(headers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::headers::fields;

    #[test]
    fn header_list_oversigns_from_and_keeps_present_ones() {
        let msg = b"From: a@b.c\r\nTo: x@y.z\r\nSubject: s\r\nReceived: by x\r\nList-Id: <l.example>\r\nReturn-Path: <a@b.c>\r\nX-Other: 1\r\nDate : obsolete\r\n\r\n";
        let (f, _) = fields(msg);
        let present = f.iter().filter(|f| !f.obsolete).map(|f| f.name);
        assert_eq!(
            signed_header_names(present),
            ["From", "From", "To", "Subject", "List-Id"]
        );
    }

    #[test]
    fn dns_record_splits_long_values() {
        let short = dns_record("s1", "example.org", KeyType::Ed25519, "AAAA");
        assert_eq!(
            short,
            "s1._domainkey.example.org. IN TXT \"v=DKIM1; k=ed25519; p=AAAA\""
        );
        let long_key = "A".repeat(392);
        let long = dns_record("s2", "example.org", KeyType::Rsa, &long_key);
        let strings: Vec<&str> = long
            .split('"')
            .filter(|s| !s.trim().is_empty())
            .skip(1)
            .collect();
        assert_eq!(strings.len(), 2);
        assert_eq!(strings[0].len(), 255);
        assert_eq!(strings.concat(), format!("v=DKIM1; k=rsa; p={long_key}"));
    }

    #[test]
    fn generated_keys_load_and_sign() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ed.pem");
        std::fs::write(&path, generate_key(KeyType::Ed25519, 0).unwrap()).unwrap();
        let key = load_key(&path).unwrap();
        assert_eq!(key.key_type, KeyType::Ed25519);
        assert_eq!(STANDARD.decode(&key.public_key).unwrap().len(), 32);
        let signer = Signer::load(&[DkimKeyConfig {
            domain: "Example.org".into(),
            selector: "s1".into(),
            key: path,
            sign: true,
        }])
        .unwrap();
        assert!(signer.signs_for("example.org"));
        assert!(!signer.signs_for("example.net"));
        let msg: [&[u8]; 2] = [b"From: a@example.org\r\nSubject: hi\r\n", b"\r\nbody\r\n"];
        let names = vec!["From".to_owned(), "From".to_owned(), "Subject".to_owned()];
        let sigs = signer.sign("example.org", &msg, &names).unwrap();
        assert_eq!(sigs.len(), 1);
        assert!(sigs[0].starts_with(
            "DKIM-Signature: v=1; a=ed25519-sha256; s=s1; d=example.org; c=relaxed/relaxed"
        ));
        assert!(signer.sign("example.net", &msg, &names).unwrap().is_empty());
    }

    #[test]
    fn a_key_with_sign_false_is_loaded_but_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.pem");
        std::fs::write(&path, generate_key(KeyType::Ed25519, 0).unwrap()).unwrap();
        let config = DkimKeyConfig {
            domain: "example.org".into(),
            selector: "old".into(),
            key: path.clone(),
            sign: false,
        };
        let signer = Signer::load(std::slice::from_ref(&config)).unwrap();
        assert!(!signer.signs_for("example.org"));
        let msg: [&[u8]; 2] = [b"From: a@example.org\r\n", b"\r\nbody\r\n"];
        assert!(signer
            .sign("example.org", &msg, &["From".to_owned()])
            .unwrap()
            .is_empty());
        // Checked all the same: a broken key with sign = false still stops the start.
        std::fs::write(&path, "broken").unwrap();
        assert!(Signer::load(&[config]).is_err());
    }

    #[test]
    fn group_readable_keys_draw_a_warning() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        std::fs::write(&path, "x").unwrap();
        let config = DkimKeyConfig {
            domain: "example.org".into(),
            selector: "s".into(),
            key: path.clone(),
            sign: true,
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(permission_warnings(std::slice::from_ref(&config)).is_empty());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(permission_warnings(&[config]).len(), 1);
    }

    #[test]
    fn weak_and_broken_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let weak = dir.path().join("weak.pem");
        let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap();
        std::fs::write(&weak, key.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes()).unwrap();
        let err = load_key(&weak).unwrap_err().to_string();
        assert!(err.contains("1024 bits"), "{err}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        assert!(load_key(&junk)
            .unwrap_err()
            .to_string()
            .contains("junk.pem"));
        assert!(load_key(&dir.path().join("missing.pem")).is_err());
    }
}
