//! `serve` flags and their validation: exported volumes by name, and the
//! senders a receiver lets in (`--allow`, `--allow-file`).
//!
//! Owns the receiver's command-line vocabulary; serves nothing.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use super::values::{parse_metrics_addr, parse_size};
use super::QuicArgs;
use crate::error::{Error, Result};
use crate::net::transport::parse_fingerprint;

/// `serve` flags.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address and port to listen on (UDP): an IP address or a host name
    /// (`localhost:7400`, `newfiler:7400`), resolved at start to its first
    /// address.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_listen)]
    pub listen: SocketAddr,
    /// An exported volume, NAME=PATH (repeatable).
    #[arg(long = "volume", required = true)]
    pub volumes: Vec<String>,
    /// A sender allowed in (repeatable): FP for every volume, or
    /// FP=NAME[,NAME...] for the named volumes only.
    #[arg(long = "allow")]
    pub allow: Vec<String>,
    /// File of allowed senders, one per line in the forms of --allow (# comments allowed).
    #[arg(long)]
    pub allow_file: Option<PathBuf>,
    /// Largest target file a sender may make this receiver create [default:
    /// the size of the filesystem that would hold it].
    #[arg(long, value_parser = parse_size)]
    pub max_size: Option<u64>,
    /// Identity directory.
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// Receiver state directory [default: $NIGHTPASS_HOME/state or ~/.local/state/nightpass].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Most sender sessions served at once, counted once a sender has
    /// authenticated; more are refused with a reason.
    #[arg(long, default_value_t = 32)]
    pub max_sessions: usize,
    /// Most sessions one sender fingerprint may hold at once.
    #[arg(long, default_value_t = 8)]
    pub max_sessions_per_sender: usize,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_metrics_addr)]
    pub metrics: Option<SocketAddr>,
    #[command(flatten)]
    /// QUIC tuning.
    pub quic: QuicArgs,
}

/// A `--listen` value: `ADDR:PORT`, `[V6]:PORT` or `HOST:PORT`, a host name
/// resolved now to the first address it has (the one a sender resolving
/// it picks too).
pub fn parse_listen(s: &str) -> std::result::Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("'{s}' is not HOST:PORT (e.g. 0.0.0.0:7400)"));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("'{s}' is not HOST:PORT (e.g. 0.0.0.0:7400)"));
    }
    match s.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("host '{host}' resolves to no address")),
        Err(e) => Err(format!("cannot resolve host '{host}': {e}")),
    }
}

impl ServeArgs {
    /// Exported volumes by name.
    pub fn volume_map(&self) -> Result<HashMap<String, PathBuf>> {
        let mut out = HashMap::new();
        for v in &self.volumes {
            let (name, path) = v
                .split_once('=')
                .ok_or_else(|| Error::input(format!("--volume '{v}' is not NAME=PATH")))?;
            let ok = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok {
                return Err(Error::input(format!(
                    "volume name '{name}' may use only letters, digits, '-', '_' and '.'"
                )));
            }
            if name.chars().all(|c| c == '.') {
                return Err(Error::input(format!(
                    "volume name '{name}' is made only of dots; give it a letter or digit"
                )));
            }
            if path.is_empty() {
                return Err(Error::input(format!("--volume '{v}' has no path")));
            }
            if out.insert(name.to_string(), PathBuf::from(path)).is_some() {
                return Err(Error::input(format!("volume '{name}' is exported twice")));
            }
        }
        Ok(out)
    }

    /// Allowed senders, from `--allow` and `--allow-file`.
    pub fn allowed(&self) -> Result<Allowed> {
        let mut out = Allowed::default();
        for a in &self.allow {
            out.add(a)?;
        }
        if let Some(f) = &self.allow_file {
            let text = std::fs::read_to_string(f).map_err(|e| {
                Error::input(format!("cannot read --allow-file {}: {e}", f.display()))
            })?;
            for line in text.lines() {
                let line = line.split('#').next().unwrap_or("").trim();
                if !line.is_empty() {
                    out.add(line)?;
                }
            }
        }
        if out.fingerprints.is_empty() {
            return Err(Error::input(
                "no sender is allowed: give --allow FINGERPRINT or --allow-file FILE (there is no unauthenticated mode)",
            ));
        }
        Ok(out)
    }
}

/// The senders a receiver lets in, and on which volumes.
#[derive(Debug, Clone, Default)]
pub struct Allowed {
    /// Every fingerprint allowed in at all (the TLS layer pins these).
    pub fingerprints: HashSet<String>,
    /// Fingerprints limited to some volumes; one missing here may use every
    /// exported volume.
    pub limits: HashMap<String, HashSet<String>>,
}

impl Allowed {
    /// Adds one entry: `FP` (every volume) or `FP=NAME[,NAME...]`. A
    /// fingerprint given both ways may use every volume; limited entries of
    /// one fingerprint add up.
    pub fn add(&mut self, entry: &str) -> Result<()> {
        let (fp, names) = match entry.split_once('=') {
            Some((fp, names)) => (fp, Some(names)),
            None => (entry, None),
        };
        let fp = parse_fingerprint(fp)?;
        let unlimited = self.fingerprints.contains(&fp) && !self.limits.contains_key(&fp);
        self.fingerprints.insert(fp.clone());
        let Some(names) = names else {
            self.limits.remove(&fp);
            return Ok(());
        };
        let names: Vec<&str> = names.split(',').map(str::trim).collect();
        if names.iter().any(|n| n.is_empty()) {
            return Err(Error::input(format!(
                "--allow '{entry}': expected FINGERPRINT=NAME[,NAME...]"
            )));
        }
        if !unlimited {
            self.limits
                .entry(fp)
                .or_default()
                .extend(names.iter().map(|n| n.to_string()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "np1-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    #[test]
    fn allow_entries_limit_or_free_a_sender() {
        let mut a = Allowed::default();
        a.add(&format!("{FP}=a,b")).unwrap();
        a.add(&format!("{FP}=c")).unwrap();
        assert_eq!(a.limits[FP].len(), 3);
        a.add(FP).unwrap();
        assert!(a.limits.is_empty(), "FP alone means every volume");
        a.add(&format!("{FP}=a")).unwrap();
        assert!(a.limits.is_empty(), "an unlimited sender stays unlimited");
        assert!(a.add(&format!("{FP}=a,,b")).is_err());
        assert!(a.add("np1-x=a").is_err());
    }

    fn serve_args(volumes: &[&str]) -> ServeArgs {
        use clap::Parser;
        let mut argv = vec!["nightpass", "serve", "--listen", "127.0.0.1:7400"];
        for v in volumes {
            argv.extend(["--volume", v]);
        }
        match super::super::Cli::parse_from(argv).command {
            super::super::Command::Serve(args) => args,
            _ => panic!("not a serve"),
        }
    }

    #[test]
    fn listen_takes_addresses_and_host_names() {
        assert_eq!(
            parse_listen("127.0.0.1:7400").unwrap(),
            "127.0.0.1:7400".parse::<SocketAddr>().unwrap()
        );
        assert!(parse_listen("[::1]:7400").unwrap().is_ipv6());
        assert!(parse_listen("localhost:7400").unwrap().ip().is_loopback());
        for bad in ["localhost", ":7400", "localhost:port", "localhost:70000"] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
        let e = parse_listen("no-such-host.invalid:7400").unwrap_err();
        assert!(
            e.contains("cannot resolve host 'no-such-host.invalid'"),
            "{e}"
        );
    }

    #[test]
    fn volume_names_are_plain_and_exported_once() {
        let ok = serve_args(&["filer01=/dev/sdb", "a.b-c_d=/srv/x.img"]);
        let map = ok.volume_map().unwrap();
        assert_eq!(map["filer01"], PathBuf::from("/dev/sdb"));
        assert_eq!(map.len(), 2);
        for bad in [
            "noequals",
            "=/dev/sdb",
            "a/b=/x",
            "..=/x",
            "v=",
            "sp ace=/x",
        ] {
            assert!(serve_args(&[bad]).volume_map().is_err(), "{bad}");
        }
        assert!(serve_args(&["v=/a", "v=/b"]).volume_map().is_err());
    }
}
