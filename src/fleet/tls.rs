//! TLS to the fleet's database: the libpq options tokio-postgres does not
//! read, and the certificates nightpass trusts.
//!
//! Owns two things. [`split_libpq`] takes out of a connection string the
//! options operators copy from libpq that tokio-postgres refuses:
//! `sslrootcert` (the CA to trust) and `sslmode=verify-ca|verify-full`
//! (read as `require`: nightpass always verifies the server's certificate
//! and name). [`client_config`] builds the rustls configuration: the
//! system's trusted certificates (`rustls-native-certs`: Debian's
//! `/etc/ssl/certs`, or `SSL_CERT_FILE`/`SSL_CERT_DIR`) plus the CA given
//! with `--db-ca`, `NIGHTPASS_DB_CA` or `sslrootcert`. Which connection
//! uses TLS is [`super::db`]'s; this module opens no connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::error::{Error, Result};

/// A connection string without the options tokio-postgres does not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// What tokio-postgres parses.
    pub text: String,
    /// `sslrootcert`, when given.
    pub ca: Option<PathBuf>,
}

/// Takes `sslrootcert` out of `text` (key=value pairs or a `postgres://`
/// URL) and reads `sslmode=verify-ca|verify-full` as `require`.
pub fn split_libpq(text: &str) -> std::result::Result<Split, String> {
    let t = text.trim();
    if t.starts_with("postgres://") || t.starts_with("postgresql://") {
        Ok(split_url(t))
    } else {
        split_pairs(t)
    }
}

/// [`split_libpq`] of a URL: its query's `sslrootcert` and `sslmode`.
fn split_url(t: &str) -> Split {
    let Some((base, query)) = t.split_once('?') else {
        return Split {
            text: t.to_string(),
            ca: None,
        };
    };
    let mut ca = None;
    let mut kept = Vec::new();
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = param.split_once('=').unwrap_or((param, ""));
        match (k, v) {
            ("sslrootcert", v) => ca = Some(PathBuf::from(percent_decode(v))),
            ("sslmode", "verify-ca" | "verify-full") => kept.push("sslmode=require".to_string()),
            _ => kept.push(param.to_string()),
        }
    }
    let text = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Split { text, ca }
}

/// `%XX` escapes of a URL's value decoded (others kept as they are).
fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied(), b.get(i + 2).copied()) {
            (b'%', Some(h), Some(l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One `key=value` of a connection string: where it is, and its value
/// unquoted.
struct Pair {
    start: usize,
    end: usize,
    key: String,
    value: String,
}

/// [`split_libpq`] of key=value pairs (values bare or single-quoted,
/// with backslash escapes, as libpq reads them).
fn split_pairs(t: &str) -> std::result::Result<Split, String> {
    let mut text = String::new();
    let mut ca = None;
    let mut last = 0;
    for p in pairs(t)? {
        let replace = match (p.key.as_str(), p.value.as_str()) {
            ("sslrootcert", v) => {
                ca = Some(PathBuf::from(v));
                Some("")
            }
            ("sslmode", "verify-ca" | "verify-full") => Some("sslmode=require"),
            _ => None,
        };
        if let Some(r) = replace {
            text.push_str(&t[last..p.start]);
            text.push_str(r);
            last = p.end;
        }
    }
    text.push_str(&t[last..]);
    Ok(Split {
        text: text.split_whitespace().collect::<Vec<_>>().join(" "),
        ca,
    })
}

/// The pairs of `t`, in order.
fn pairs(t: &str) -> std::result::Result<Vec<Pair>, String> {
    let b = t.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_ws(i);
        if i >= b.len() {
            return Ok(out);
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = t[start..i].to_string();
        i = skip_ws(i);
        if b.get(i) != Some(&b'=') {
            return Err(format!("{key:?} has no value"));
        }
        i = skip_ws(i + 1);
        let (value, end) = value_at(t, i)?;
        out.push(Pair {
            start,
            end,
            key,
            value,
        });
        i = end;
    }
}

/// The value starting at `i` (quoted or bare) and where it ends.
fn value_at(t: &str, mut i: usize) -> std::result::Result<(String, usize), String> {
    let b = t.as_bytes();
    let quoted = b.get(i) == Some(&b'\'');
    if quoted {
        i += 1;
    }
    let mut value = Vec::new();
    while i < b.len() {
        match b[i] {
            b'\'' if quoted => return Ok((String::from_utf8_lossy(&value).into_owned(), i + 1)),
            c if c.is_ascii_whitespace() && !quoted => break,
            b'\\' if i + 1 < b.len() => {
                value.push(b[i + 1]);
                i += 2;
                continue;
            }
            c => value.push(c),
        }
        i += 1;
    }
    if quoted {
        return Err("a quoted value is not closed".into());
    }
    Ok((String::from_utf8_lossy(&value).into_owned(), i))
}

/// The rustls client configuration for the database: the system's trusted
/// certificates and those in the PEM file `ca`. A CA file that cannot be
/// read or holds no certificate is bad input (exit 2).
pub fn client_config(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A system certificate rustls cannot use is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| Error::input(format!("the database's CA {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(Error::input(format!(
                "the database's CA {}: no certificate in it (PEM expected)",
                path.display()
            )));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| Error::input(format!("the database's CA {}: {e}", path.display())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Io(format!("TLS for the database: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_options_are_taken_out_of_pairs() {
        let s = split_libpq(
            "host=db.example sslmode=verify-full sslrootcert='/etc/np/ca dir/ca.pem' dbname=np",
        )
        .unwrap();
        assert_eq!(s.text, "host=db.example sslmode=require dbname=np");
        assert_eq!(s.ca, Some(PathBuf::from("/etc/np/ca dir/ca.pem")));
        let s = split_libpq("host=/run/postgresql dbname=np").unwrap();
        assert_eq!(s.text, "host=/run/postgresql dbname=np");
        assert_eq!(s.ca, None);
        let s = split_libpq("password='it\\'s' sslrootcert = /ca.pem").unwrap_or_else(|e| {
            panic!("{e}");
        });
        assert_eq!(s.ca, Some(PathBuf::from("/ca.pem")));
        assert!(split_libpq("host='open").is_err());
    }

    #[test]
    fn libpq_options_are_taken_out_of_urls() {
        let s = split_libpq(
            "postgres://np@db.example/np?sslmode=verify-ca&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=5",
        )
        .unwrap();
        assert_eq!(
            s.text,
            "postgres://np@db.example/np?sslmode=require&connect_timeout=5"
        );
        assert_eq!(s.ca, Some(PathBuf::from("/etc/ca.pem")));
        let s = split_libpq("postgresql://db/np?sslrootcert=/ca.pem").unwrap();
        assert_eq!(s.text, "postgresql://db/np");
    }

    #[test]
    fn a_ca_file_without_certificates_is_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "not a certificate\n").unwrap();
        assert_eq!(client_config(Some(&p)).unwrap_err().exit_code(), 2);
        let missing = dir.path().join("missing.pem");
        assert_eq!(client_config(Some(&missing)).unwrap_err().exit_code(), 2);
    }
}
