//! The fleet's PostgreSQL client: the connection string, a small pool of
//! connections, and every query bounded by a timeout.
//!
//! Owns how nightpass reaches the database and how database failures
//! become [`Error`]s (a database that cannot be reached, or stays silent,
//! is a runtime failure: exit 3). It knows no table; the schema is
//! [`super::schema`]'s.
//!
//! The pool is our own, not a crate's: the fleet needs a handful of
//! connections, a health check (a closed connection is dropped, never
//! handed out) and a bounded wait for a free one, which is ~100 lines over
//! `tokio-postgres` and a semaphore; a general pool (deadpool, bb8) would
//! add its own configuration and runtime glue for no more than that.
//!
//! A unix socket (`host=/run/postgresql`) is reached without TLS (the
//! server offers none there); a TCP host with TLS whenever the server
//! offers it (libpq's `sslmode=prefer`, the default), or always
//! (`sslmode=require`), and the server's certificate and name are then
//! always verified against the system's trusted certificates and the CA
//! given ([`super::tls`]); `sslmode=disable` is plain TCP, for a trusted
//! network.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Config, NoTls, Socket};

use super::tls;

use crate::error::{Error, Result};

/// The environment variable read when `--db` is not given.
pub const ENV_DB: &str = "NIGHTPASS_DB";

/// The environment variable naming the database's CA when `--db-ca` is
/// not given.
pub const ENV_DB_CA: &str = "NIGHTPASS_DB_CA";

/// How nightpass reaches the database.
#[derive(Clone)]
pub struct DbSettings {
    /// The parsed connection string (it may hold a password: never print it).
    config: Config,
    /// The database as the operator names it, without the password.
    target: String,
    /// TLS for a TCP host (none for a unix socket or `sslmode=disable`).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The CA file trusted besides the system's, when one was given.
    ca: Option<PathBuf>,
    /// How long to keep trying to connect before giving up (exit 3).
    pub wait: Duration,
    /// The longest one query (or one transaction) may take.
    pub query_timeout: Duration,
}

impl std::fmt::Debug for DbSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The config may hold a password: show only the target.
        f.debug_struct("DbSettings")
            .field("target", &self.target)
            .field("wait", &self.wait)
            .field("query_timeout", &self.query_timeout)
            .finish()
    }
}

impl DbSettings {
    /// The connection string from `--db`, else from `NIGHTPASS_DB`; a
    /// `postgres://` URL or `key=value` pairs. Neither given, or not a
    /// connection string: exit 2.
    pub fn resolve(given: Option<&str>, wait: Duration, query_timeout: Duration) -> Result<Self> {
        let from_env = std::env::var(ENV_DB).ok().filter(|s| !s.trim().is_empty());
        let Some(text) = given.map(str::to_owned).or(from_env) else {
            return Err(Error::input(format!(
                "no database: give --db or set {ENV_DB} (a PostgreSQL connection string, \
                 e.g. host=/run/postgresql dbname=nightpass)"
            )));
        };
        let bad = |e: &dyn std::fmt::Display| {
            Error::input(format!(
                "the database connection string is not one PostgreSQL reads: {e}"
            ))
        };
        let split = tls::split_libpq(&text).map_err(|e| bad(&e))?;
        let config: Config = split.text.parse().map_err(|e| bad(&e))?;
        let target = describe(&config);
        let from_env = std::env::var_os(ENV_DB_CA).filter(|s| !s.is_empty());
        let ca = split.ca.or(from_env.map(PathBuf::from));
        let settings = DbSettings {
            config,
            target,
            tls: None,
            ca: None,
            wait,
            query_timeout,
        };
        settings.with_ca(ca.as_deref())
    }

    /// These settings trusting the CA in `ca` (`--db-ca`, which wins over
    /// `NIGHTPASS_DB_CA` and `sslrootcert`) besides the system's.
    pub fn with_ca(mut self, ca: Option<&Path>) -> Result<Self> {
        if let Some(ca) = ca {
            self.ca = Some(ca.to_owned());
        }
        let tcp = matches!(self.config.get_hosts().first(), Some(Host::Tcp(_)) | None);
        self.tls = if tcp && self.config.get_ssl_mode() != SslMode::Disable {
            Some(tls::client_config(self.ca.as_deref())?)
        } else {
            None
        };
        Ok(self)
    }

    /// The database as `postgresql://USER@HOST:PORT/DBNAME`, never with its
    /// password: for messages.
    pub fn target(&self) -> &str {
        &self.target
    }
}

/// `postgresql://USER@HOST:PORT/DBNAME` from `c`, without the password.
fn describe(c: &Config) -> String {
    let host = match c.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    let user = c.get_user().map(|u| format!("{u}@")).unwrap_or_default();
    let db = c.get_dbname().unwrap_or_else(|| c.get_user().unwrap_or(""));
    format!("postgresql://{user}{host}:{port}/{db}")
}

/// A database failure as an [`Error`] naming the database and what was
/// being done: exit 3.
pub fn db_error(target: &str, what: &str, e: &tokio_postgres::Error) -> Error {
    let detail = match e.as_db_error() {
        Some(d) => d.message().to_string(),
        None => e.to_string(),
    };
    Error::Network(format!("database {target}: {what}: {detail}"))
}

/// The SQLSTATE of a server's error, if it is one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(|c| c.code())
}

/// A few connections to the fleet's database, made on demand and reused.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    settings: DbSettings,
    idle: Mutex<Vec<Client>>,
    permits: Arc<Semaphore>,
}

/// One connection taken from the [`Pool`]; back to the pool on drop.
pub struct Conn {
    client: Option<Client>,
    inner: Arc<Inner>,
    _permit: OwnedSemaphorePermit,
}

impl std::ops::Deref for Conn {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("a connection until dropped")
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("a connection until dropped")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(c) = self.client.take().filter(|c| !c.is_closed()) {
            if let Ok(mut idle) = self.inner.idle.lock() {
                idle.push(c);
            }
        }
    }
}

impl Pool {
    /// A pool of at most `size` connections (none made yet).
    pub fn new(settings: DbSettings, size: usize) -> Pool {
        Pool {
            inner: Arc::new(Inner {
                settings,
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(size.max(1))),
            }),
        }
    }

    /// The settings the pool connects with.
    pub fn settings(&self) -> &DbSettings {
        &self.inner.settings
    }

    /// The database's name for messages (no password).
    pub fn target(&self) -> &str {
        self.inner.settings.target()
    }

    /// A connection: an idle one that is still open, or a new one. Waits
    /// at most the settings' `wait` for a free slot and for the database
    /// to answer, then fails (exit 3) naming the database.
    pub async fn get(&self) -> Result<Conn> {
        let s = &self.inner.settings;
        let permit = tokio::time::timeout(s.wait, self.inner.permits.clone().acquire_owned())
            .await
            .map_err(|_| {
                Error::Network(format!(
                    "database {}: no free connection within {:?}",
                    s.target, s.wait
                ))
            })?
            .map_err(|_| Error::Network(format!("database {}: the pool is closed", s.target)))?;
        let reused = {
            let mut idle = self.inner.idle.lock().map_err(|_| {
                Error::Network(format!("database {}: the pool is poisoned", s.target))
            })?;
            idle.retain(|c| !c.is_closed());
            idle.pop()
        };
        let client = match reused {
            Some(c) => c,
            None => connect(s).await?,
        };
        Ok(Conn {
            client: Some(client),
            inner: self.inner.clone(),
            _permit: permit,
        })
    }

    /// `fut` (a query, or a transaction's work) bounded by the query
    /// timeout; a database error or the timeout names `what` and the
    /// database (exit 3).
    pub async fn timed<T, F>(&self, what: &str, fut: F) -> Result<T>
    where
        F: std::future::Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    {
        let s = &self.inner.settings;
        match tokio::time::timeout(s.query_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(db_error(&s.target, what, &e)),
            Err(_) => Err(Error::Network(format!(
                "database {}: {what}: no answer within {:?}",
                s.target, s.query_timeout
            ))),
        }
    }
}

/// Opens one connection with `tls`; its driver runs on its own task.
async fn open<T>(
    config: &Config,
    tls: T,
    target: &str,
) -> std::result::Result<Client, tokio_postgres::Error>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let (client, connection) = config.connect(tls).await?;
    let target = target.to_string();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("database {target}: connection ended: {e}");
        }
    });
    Ok(client)
}

/// A TLS failure waiting cannot cure (a certificate not trusted, a name
/// that does not match, a server without TLS under `sslmode=require`),
/// said with what to do: exit 3 at once.
fn tls_refusal(s: &DbSettings, e: &tokio_postgres::Error) -> Option<Error> {
    let text = e.to_string();
    let detail = std::error::Error::source(e).map_or(text.clone(), |c| format!("{text}: {c}"));
    let hint = if detail.contains("does not support TLS") {
        "the server offers no TLS: enable ssl on it, or use sslmode=disable on a trusted network"
    } else if detail.contains("certificate") || detail.contains("InvalidDnsName") {
        match &s.ca {
            Some(_) => "its certificate is not signed by the CA given, or not for this host name",
            None => "give the CA that signed its certificate with --db-ca FILE, NIGHTPASS_DB_CA or sslrootcert=FILE",
        }
    } else {
        return None;
    };
    Some(Error::Network(format!(
        "database {}: TLS: {detail}: {hint}",
        s.target
    )))
}

/// Why one connection attempt failed.
#[derive(Debug)]
pub enum Attempt {
    /// Waiting may cure it (the server down, restarting, slow): why.
    Retry(String),
    /// Waiting will not (a wrong password, no such database, a TLS
    /// certificate not trusted): exit 3 at once.
    Lasting(Error),
}

/// One connection attempt, given at most `left`.
async fn attempt(s: &DbSettings, left: Duration) -> std::result::Result<Client, Attempt> {
    let mut config = s.config.clone();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(left.clamp(Duration::from_millis(100), Duration::from_secs(5)));
    }
    let limit = left.max(Duration::from_millis(100));
    let opened = match &s.tls {
        Some(t) => {
            let make = tokio_postgres_rustls::MakeRustlsConnect::new((**t).clone());
            tokio::time::timeout(limit, open(&config, make, &s.target)).await
        }
        None => tokio::time::timeout(limit, open(&config, NoTls, &s.target)).await,
    };
    let client = match opened {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => {
            // Class 28 (authorization), 3D (no such database): waiting won't help.
            if matches!(sqlstate(&e).map(|c| &c[..2]), Some("28" | "3D")) {
                return Err(Attempt::Lasting(db_error(&s.target, "cannot connect", &e)));
            }
            if let Some(refusal) = tls_refusal(s, &e) {
                return Err(Attempt::Lasting(refusal));
            }
            return Err(Attempt::Retry(e.to_string()));
        }
        Err(_) => return Err(Attempt::Retry("no answer".to_string())),
    };
    // The server bounds every statement too, so that a query abandoned
    // by our timeout does not run on.
    let ms = s.query_timeout.as_millis().max(1);
    let set = format!("SET statement_timeout = {ms}; SET lock_timeout = {ms}");
    match tokio::time::timeout(s.query_timeout, client.batch_execute(&set)).await {
        Ok(Ok(())) => Ok(client),
        Ok(Err(e)) => Err(Attempt::Retry(format!("setting timeouts: {e}"))),
        Err(_) => Err(Attempt::Retry("no answer to SET".into())),
    }
}

/// A new connection, tried again until `s.wait` has passed; its driver
/// runs on its own task. A refusal that waiting cannot cure (bad password,
/// no such database, a certificate not trusted) fails at once.
async fn connect(s: &DbSettings) -> Result<Client> {
    let deadline = Instant::now() + s.wait;
    let mut pause = Duration::from_millis(100);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let why = match attempt(s, left).await {
            Ok(client) => return Ok(client),
            Err(Attempt::Lasting(e)) => return Err(e),
            Err(Attempt::Retry(why)) => why,
        };
        if Instant::now() + pause >= deadline {
            return Err(Error::Network(format!(
                "database {}: cannot connect within {:?}: {why}",
                s.target, s.wait
            )));
        }
        tracing::debug!("database {}: cannot connect yet: {why}", s.target);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

impl Pool {
    /// One connection attempt (kept in the pool when it succeeds): tells
    /// a database that is away for now from one that refuses for good.
    pub async fn probe(&self) -> std::result::Result<(), Attempt> {
        let s = &self.inner.settings;
        let client = attempt(s, s.wait.min(Duration::from_secs(5))).await?;
        if let Ok(mut idle) = self.inner.idle.lock() {
            idle.push(client);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_never_shows_the_password() {
        let s = DbSettings::resolve(
            Some("postgres://alice:s3cret@db.example:6543/fleet"),
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(s.target(), "postgresql://alice@db.example:6543/fleet");
        assert!(!format!("{s:?}").contains("s3cret"));
        let s = DbSettings::resolve(
            Some("host=/tmp/pg port=7 user=bob password=x dbname=n"),
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(s.target(), "postgresql://bob@/tmp/pg:7/n");
    }

    #[test]
    fn a_connection_string_postgres_cannot_read_is_bad_input() {
        let e = DbSettings::resolve(
            Some("host='unterminated"),
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }
}
