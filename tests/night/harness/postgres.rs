//! A private PostgreSQL per test: `initdb` in the test's scratch directory
//! as an unprivileged user (`postgres` when that account exists, else
//! `nobody`; ourselves when not root), started with `pg_ctl` on a free port
//! with its unix socket in the scratch directory and no TCP listener,
//! stopped and removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{have_tool, scratch, skip};

/// A running private PostgreSQL server.
pub struct Postgres {
    /// Removed on drop, after the server stops.
    dir: tempfile::TempDir,
    bin: PathBuf,
    user: Option<String>,
    port: u16,
    /// Also listening on 127.0.0.1 (TCP), with TLS: [`Postgres::enable_tls`].
    tcp: std::sync::atomic::AtomicBool,
}

/// The directory holding `initdb` and `pg_ctl`: on the PATH, else
/// Debian's `/usr/lib/postgresql/N/bin` (newest first).
fn pg_bin() -> Option<PathBuf> {
    if have_tool("initdb") && have_tool("pg_ctl") {
        let out = Command::new("sh")
            .args(["-c", "command -v pg_ctl"])
            .output()
            .ok()?;
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let real = std::fs::canonicalize(&p).unwrap_or(p);
        return real.parent().map(Path::to_path_buf);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions.pop()
}

/// The account the server runs as when we are root.
fn pg_user() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let exists = |u: &str| {
        Command::new("id")
            .arg(u)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    Some(
        if exists("postgres") {
            "postgres"
        } else {
            "nobody"
        }
        .to_string(),
    )
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().unwrap().port()
}

impl Postgres {
    /// A fresh server, or `None` after [`skip`] when PostgreSQL is not
    /// installed (a failure under `CI=true`).
    pub fn start(test: &str) -> Option<Postgres> {
        let Some(bin) = pg_bin() else {
            skip(
                test,
                "needs PostgreSQL's initdb and pg_ctl (Debian: postgresql)",
            );
            return None;
        };
        let dir = scratch();
        let user = pg_user();
        let pg = Postgres {
            dir,
            bin,
            user,
            port: free_port(),
            tcp: Default::default(),
        };
        std::fs::create_dir_all(pg.socket_dir()).unwrap();
        if let Some(u) = &pg.user {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(pg.dir.path(), std::fs::Permissions::from_mode(0o755))
                .unwrap();
            pg.run("chown", &["-R", u, &pg.root().display().to_string()], false);
        }
        let data = pg.data_dir().display().to_string();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "fleet",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            true,
        );
        pg.pg_ctl_start();
        Some(pg)
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("pg")
    }

    fn data_dir(&self) -> PathBuf {
        self.root().join("data")
    }

    /// The directory of the server's unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.root().join("sock")
    }

    /// The connection string for nightpass (`NIGHTPASS_DB`).
    pub fn url(&self) -> String {
        format!(
            "host={} port={} user=fleet dbname=postgres",
            self.socket_dir().display(),
            self.port
        )
    }

    /// Starts (or restarts) the server and waits until it accepts connections.
    pub fn pg_ctl_start(&self) {
        let data = self.data_dir().display().to_string();
        let log = self.root().join("log").display().to_string();
        let listen = if self.tcp.load(std::sync::atomic::Ordering::SeqCst) {
            "127.0.0.1"
        } else {
            ""
        };
        let opts = format!(
            "-p {} -k {} -c listen_addresses='{listen}' -c fsync=off -c shared_buffers=16MB -c max_connections=40",
            self.port,
            self.socket_dir().display()
        );
        self.run(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-o", &opts, "-w", "start"],
            true,
        );
    }

    /// Restarts the server listening on 127.0.0.1 too, with TLS: a
    /// certificate for `localhost` and 127.0.0.1 signed by a CA of its
    /// own, and connections logged (their TLS too). Returns the CA's PEM
    /// file.
    pub fn enable_tls(&self) -> PathBuf {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let data = self.data_dir();
        std::fs::write(data.join("server.crt"), cert.pem()).unwrap();
        std::fs::write(data.join("server.key"), key.serialize_pem()).unwrap();
        let ca_file = self.dir.path().join("fleet-ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let conf = "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nlog_connections = on\n";
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut f, conf.as_bytes()).unwrap();
        if let Some(u) = &self.user {
            for file in ["server.crt", "server.key"] {
                let path = data.join(file).display().to_string();
                self.run("chown", &[u, &path], false);
            }
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        self.stop();
        self.tcp.store(true, std::sync::atomic::Ordering::SeqCst);
        self.pg_ctl_start();
        ca_file
    }

    /// The connection string over TCP to `host` (127.0.0.1 or
    /// localhost), after [`Postgres::enable_tls`], with `extra` options.
    pub fn tcp_url(&self, host: &str, extra: &str) -> String {
        format!(
            "host={host} port={} user=fleet dbname=postgres {extra}",
            self.port
        )
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root().join("log")).unwrap_or_default()
    }

    /// Stops the server at once (as a crash would).
    pub fn stop(&self) {
        let data = self.data_dir().display().to_string();
        self.run(
            "pg_ctl",
            &["-D", &data, "-m", "immediate", "-w", "stop"],
            true,
        );
    }

    /// Runs one SQL statement through `psql` (stops on its first error).
    pub fn sql(&self, statement: &str) {
        self.psql(&["-c", statement]);
    }

    /// Runs one query through `psql` and returns its rows, each a list of
    /// its fields as text (NULL: an empty string; a row of one NULL field
    /// reads as no row, so coalesce such a column).
    pub fn query(&self, statement: &str) -> Vec<Vec<String>> {
        let out = self.psql(&["-A", "-t", "-F", "\x1f", "-R", "\x1e", "-c", statement]);
        out.trim_end_matches('\n')
            .split('\x1e')
            .filter(|r| !r.is_empty())
            .map(|r| r.split('\x1f').map(str::to_string).collect())
            .collect()
    }

    /// The one field of the one row `statement` returns.
    #[track_caller]
    pub fn scalar(&self, statement: &str) -> String {
        let rows = self.query(statement);
        assert!(
            rows.len() == 1 && rows[0].len() == 1,
            "{statement}: expected one field, got {rows:?}"
        );
        rows[0][0].clone()
    }

    /// `psql ARGS` against this server (stops on its first error); its stdout.
    fn psql(&self, args: &[&str]) -> String {
        let sock = self.socket_dir().display().to_string();
        let port = self.port.to_string();
        let mut all = vec![
            "-X",
            "-q",
            "-h",
            &sock,
            "-p",
            &port,
            "-U",
            "fleet",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
        ];
        all.extend_from_slice(args);
        self.run("psql", &all, true)
    }

    /// Runs `tool` (from PostgreSQL's bin directory when `pg`) as the
    /// server's account; panics with its output when it fails, else
    /// returns its stdout.
    fn run(&self, tool: &str, args: &[&str], pg: bool) -> String {
        let program = if pg {
            self.bin.join(tool).display().to_string()
        } else {
            tool.to_string()
        };
        let mut c = match (&self.user, pg) {
            (Some(u), true) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--", &program]);
                c
            }
            _ => Command::new(&program),
        };
        let out = c
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data_dir().display().to_string();
        let mut c = match &self.user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(self.bin.join("pg_ctl"));
                c
            }
            None => Command::new(self.bin.join("pg_ctl")),
        };
        let _ = c
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
