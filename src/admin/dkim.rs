//! `submitd dkim generate|dns`: make a key and print the DNS record to publish.

use std::path::Path;

use anyhow::{bail, Context};

use crate::dkim::{dns_record, generate_key, load_key, KeyType};
use crate::tls::write_private;

/// `dkim generate`.
pub fn generate(
    domain: &str,
    selector: &str,
    algorithm: &str,
    bits: usize,
    out: &Path,
) -> anyhow::Result<()> {
    let key_type = match algorithm {
        "ed25519" => KeyType::Ed25519,
        "rsa" => KeyType::Rsa,
        other => bail!("unknown algorithm {other}: use ed25519 or rsa"),
    };
    if out.exists() {
        bail!("{} exists; refusing to overwrite a key", out.display());
    }
    let pem = generate_key(key_type, bits).map_err(|e| anyhow::anyhow!(e))?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_private(out, pem.as_bytes()).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {} (mode 0600)", out.display());
    print_record(out, domain, selector)?;
    println!();
    println!("# add to submitd.toml:");
    println!("[[dkim]]");
    println!("domain = \"{domain}\"");
    println!("selector = \"{selector}\"");
    println!("key = \"{}\"", out.display());
    Ok(())
}

/// `dkim dns`: the record for an existing key.
pub fn print_record(key: &Path, domain: &str, selector: &str) -> anyhow::Result<()> {
    let loaded = load_key(key)?;
    println!(
        "{}",
        dns_record(selector, domain, loaded.key_type, &loaded.public_key)
    );
    Ok(())
}
