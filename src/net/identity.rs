//! Identities and fingerprints: an identity is a directory holding
//! `key.der` (PKCS#8, mode 0600) and `cert.der` (a self-signed
//! certificate). Its fingerprint is `np1-` followed by the unpadded
//! lowercase base32 of SHA-256 of the certificate's DER bytes.
//!
//! Owns the identity files and the fingerprint's shape; knows nothing of
//! connections (the verifiers that pin fingerprints are in `pinning`).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::{Error, IoContext, Result};

/// The name both sides put in and expect from certificates; not checked, only pinned fingerprints are.
pub const SERVER_NAME: &str = "nightpass";

/// A TLS identity: certificate and private key.
#[derive(Debug)]
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

/// The default identity directory: `$NIGHTPASS_HOME/identity`, else `~/.config/nightpass/identity`.
pub fn default_identity_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("NIGHTPASS_HOME") {
        return PathBuf::from(h).join("identity");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".config/nightpass/identity")
}

/// The fingerprint of a DER certificate.
pub fn fingerprint_of(cert_der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert_der);
    format!(
        "np1-{}",
        data_encoding::BASE32_NOPAD
            .encode(digest.as_ref())
            .to_ascii_lowercase()
    )
}

/// The fingerprint of the certificate the peer of `conn` presented (the
/// TLS handshake checked it against the pinned or allowed fingerprints);
/// `None` when it presented none.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| fingerprint_of(c))
}

/// Checks the shape of a fingerprint an operator typed or pasted.
pub fn parse_fingerprint(s: &str) -> Result<String> {
    let t = s.trim().to_ascii_lowercase();
    let ok = t.len() == 56
        && t.starts_with("np1-")
        && t[4..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b));
    if ok {
        Ok(t)
    } else {
        Err(Error::input(format!(
            "'{s}' is not a nightpass fingerprint (expected np1- followed by 52 base32 characters)"
        )))
    }
}

impl Identity {
    /// Creates a new identity in `dir`; refuses to overwrite one unless `force`.
    pub fn generate(dir: &Path, force: bool) -> Result<Identity> {
        let key_path = dir.join("key.der");
        let cert_path = dir.join("cert.der");
        if !force && (key_path.exists() || cert_path.exists()) {
            return Err(Error::input(format!(
                "an identity already exists in {} (use --force to replace it; peers that pinned it will refuse the new one)",
                dir.display()
            )));
        }
        fs::create_dir_all(dir).ctx(format!("create {}", dir.display()))?;
        let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
            .map_err(|e| Error::Io(format!("generate certificate: {e}")))?;
        let key = ck.key_pair.serialize_der();
        let cert = ck.cert.der().to_vec();
        let _ = fs::remove_file(&key_path);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .ctx(format!("create {}", key_path.display()))?;
        f.write_all(&key)
            .ctx(format!("write {}", key_path.display()))?;
        f.sync_all().ctx(format!("fsync {}", key_path.display()))?;
        crate::store::state::write_atomic(&cert_path, &cert)?;
        Ok(Identity {
            cert: CertificateDer::from(cert),
            key: PrivatePkcs8KeyDer::from(key),
        })
    }

    /// Loads the identity in `dir`.
    pub fn load(dir: &Path) -> Result<Identity> {
        let read = |name: &str| {
            fs::read(dir.join(name)).map_err(|e| {
                Error::input(format!(
                    "cannot read identity {} ({e}); create one with 'nightpass keygen --identity {}'",
                    dir.join(name).display(),
                    dir.display()
                ))
            })
        };
        let key = read("key.der")?;
        warn_if_exposed(&dir.join("key.der"));
        Ok(Identity {
            key: PrivatePkcs8KeyDer::from(key),
            cert: CertificateDer::from(read("cert.der")?),
        })
    }

    /// This identity's fingerprint.
    pub fn fingerprint(&self) -> String {
        fingerprint_of(&self.cert)
    }

    /// The certificate, for a TLS configuration.
    pub(super) fn cert_der(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }

    /// The private key, for a TLS configuration.
    pub(super) fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// Warns (in the log) when the private key at `path` may be read (or written)
/// by users other than its owner: whoever reads it can pose as this host to
/// every peer that pinned its fingerprint.
fn warn_if_exposed(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = fs::metadata(path) else { return };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            "warning: identity key {} is accessible to users other than its owner (mode {mode:03o}); anyone who reads it can pose as this host. Run 'chmod 600 {}'",
            path.display(),
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_shape() {
        let fp = fingerprint_of(b"certificate bytes");
        assert!(parse_fingerprint(&fp).is_ok());
        assert!(parse_fingerprint("np1-short").is_err());
        assert_eq!(
            parse_fingerprint(&fp.to_uppercase().replace("NP1-", "np1-")).unwrap(),
            fp
        );
    }
}
