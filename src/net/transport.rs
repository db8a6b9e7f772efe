//! QUIC endpoints, TLS identities, fingerprint pinning and the authorized list.
//!
//! Owns everything about who may talk to whom. An identity is a directory
//! holding `key.der` (PKCS#8, mode 0600) and `cert.der` (a self-signed
//! certificate). Its fingerprint is `np1-` followed by the unpadded lowercase
//! base32 of SHA-256 of the certificate's DER bytes. Both sides present
//! certificates (mutual TLS 1.3) and each checks the other's fingerprint
//! against what the operator pinned; no CA, name or date is consulted, and
//! there is no unauthenticated mode.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nightpass_proto::wire::ALPN;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

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

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Client side: accepts exactly one server fingerprint.
#[derive(Debug)]
struct PinnedServer {
    expected: String,
    seen: Arc<Mutex<Option<String>>>,
    signatures: Signatures,
}

/// Handshake signature checks, the same on both sides: only the peer's
/// fingerprint is pinned; its signatures are checked as TLS requires.
#[derive(Debug)]
struct Signatures(Arc<CryptoProvider>);

impl Signatures {
    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint_of(end_entity);
        let ok = fp == self.expected;
        *self.seen.lock().expect("not poisoned") = Some(fp);
        if ok {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.schemes()
    }
}

/// Server side: accepts only client certificates whose fingerprint is allowed.
#[derive(Debug)]
struct AllowedClients {
    allowed: HashSet<String>,
    signatures: Signatures,
}

impl ClientCertVerifier for AllowedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let fp = fingerprint_of(end_entity);
        if self.allowed.contains(&fp) {
            Ok(ClientCertVerified::assertion())
        } else {
            log_refusal("unauthorized", || {
                format!("refused a sender: fingerprint {fp} is not authorized (not in --allow)")
            });
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.schemes()
    }
}

/// How often, at most, [`log_refusal`] logs a line of one kind.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

/// Per kind of refusal: when a line was last printed and how many were
/// left out since.
static REFUSALS: Mutex<Vec<(&'static str, Instant, u64)>> = Mutex::new(Vec::new());

/// Logs a refusal line (an unauthorized handshake, a connection over a
/// limit), at most one per `kind` per second: a flood of
/// connections must not become a flood of log lines (an unauthorized peer
/// made a receiver print 2,903 lines in 30 s). A line printed after others
/// of its kind were left out says how many.
pub fn log_refusal(kind: &'static str, line: impl FnOnce() -> String) {
    let now = Instant::now();
    let mut kinds = REFUSALS.lock().expect("not poisoned");
    let left_out = match kinds.iter_mut().find(|(k, _, _)| *k == kind) {
        Some((_, last, n)) if now.duration_since(*last) < REFUSAL_LOG_EVERY => {
            *n += 1;
            return;
        }
        Some((_, last, n)) => {
            *last = now;
            std::mem::take(n)
        }
        None => {
            kinds.push((kind, now, 0));
            0
        }
    };
    drop(kinds);
    if left_out == 0 {
        tracing::info!("{}", line());
    } else {
        tracing::info!(
            "{} (and {left_out} more like it since the last such line, not shown)",
            line()
        );
    }
}

/// Prints, for each kind of refusal with lines left out and none printed
/// for a second, how many were left out: the end of a flood is not silent.
/// A receiver calls it now and then.
pub fn flush_refusals() {
    let now = Instant::now();
    let mut kinds = REFUSALS.lock().expect("not poisoned");
    for (kind, last, n) in kinds.iter_mut() {
        if *n > 0 && now.duration_since(*last) >= REFUSAL_LOG_EVERY {
            tracing::info!("{n} more refusals ({kind}) not shown");
            *last = now;
            *n = 0;
        }
    }
}

/// Transport tuning shared by both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuning {
    /// Per-stream receive window in bytes.
    pub stream_window: u64,
    /// Per-connection receive and send window in bytes.
    pub conn_window: u64,
    /// Use BBR instead of CUBIC.
    pub bbr: bool,
    /// How long a sender waits for a receiver's first answer.
    pub connect_timeout: Duration,
}

/// Default of `--connect-timeout`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default of `--quic-window`: the connection's flow-control window.
pub const CONN_WINDOW: u64 = 64 << 20;

/// Largest receive window of one stream. quinn refuses (and ends the
/// connection) when one stream's receive buffer holds more than 1024
/// separate spans, which heavy loss within a large window produces; 2 MiB
/// is about 1700 datagrams, so it can never hold that many gaps. Throughput
/// on long paths comes from more streams instead (see `--streams`).
pub const MAX_STREAM_WINDOW: u64 = 2 << 20;

impl Tuning {
    /// The tuning of a connection window of `conn_window` bytes: each
    /// stream gets a quarter of it, at least 1 MiB and at most
    /// [`MAX_STREAM_WINDOW`]. The one place QUIC windows are derived: the
    /// command line, `demo` and `bench` all run this configuration.
    pub fn new(conn_window: u64, bbr: bool) -> Tuning {
        Tuning {
            stream_window: (conn_window / 4).clamp(1 << 20, MAX_STREAM_WINDOW),
            conn_window,
            bbr,
            connect_timeout: CONNECT_TIMEOUT,
        }
    }

    /// Data streams a pass opens unless told (`--streams`): enough stream
    /// windows to fill the connection window, 4 to 16 (each stream's
    /// buffers cost the receiver memory; measured at 2 GiB: peak RSS 80 MiB
    /// with 4 streams, 120 with 16, 163 with 32).
    pub fn default_streams(&self) -> usize {
        self.conn_window.div_ceil(self.stream_window).clamp(4, 16) as usize
    }
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning::new(CONN_WINDOW, false)
    }
}

fn transport_config(t: &Tuning) -> Arc<quinn::TransportConfig> {
    let mut c = quinn::TransportConfig::default();
    let w = |v: u64| quinn::VarInt::from_u64(v).unwrap_or(quinn::VarInt::MAX);
    c.stream_receive_window(w(t.stream_window))
        .receive_window(w(t.conn_window))
        .send_window(t.conn_window)
        .max_concurrent_uni_streams(32u32.into())
        .max_concurrent_bidi_streams(4u32.into())
        .keep_alive_interval(Some(Duration::from_secs(3)))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_secs(15)).expect("15 s fits"),
        ));
    // Datacentre links often carry jumbo frames, and loopback far more:
    // let MTU discovery go that high; it settles on what the path carries.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(9000);
    c.mtu_discovery_config(Some(mtu));
    if t.bbr {
        c.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    }
    Arc::new(c)
}

fn key_der(id: &Identity) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(id.key.clone_key())
}

/// A receiver's endpoint, accepting only `allowed` senders.
pub fn server_endpoint(
    id: &Identity,
    allowed: HashSet<String>,
    listen: SocketAddr,
    tuning: &Tuning,
) -> Result<quinn::Endpoint> {
    let provider = provider();
    let verifier = Arc::new(AllowedClients {
        allowed,
        signatures: Signatures(provider.clone()),
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Io(format!("TLS setup: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![id.cert.clone()], key_der(id))
        .map_err(|e| Error::input(format!("identity key or certificate is invalid: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| Error::Io(format!("QUIC TLS setup: {e}")))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport_config(tuning));
    let socket =
        udp_socket(listen).map_err(|e| Error::input(format!("cannot listen on {listen}: {e}")))?;
    endpoint(Some(cfg), socket).map_err(|e| Error::input(format!("cannot listen on {listen}: {e}")))
}

/// Bytes of kernel buffer asked for on each UDP socket, each way. The
/// kernel's default (about 200 KiB) overflows at a few hundred Mbit/s as
/// soon as a process is a few milliseconds late, and every overflow is a
/// loss that congestion control answers by slowing down.
pub const UDP_BUFFER: usize = 16 << 20;

/// A UDP socket bound to `addr` with [`UDP_BUFFER`]-sized kernel buffers
/// where the system allows (see [`grow_udp_buffers`]).
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    grow_udp_buffers(&socket, UDP_BUFFER);
    Ok(socket)
}

/// Asks for `bytes` of kernel receive and send buffer on `socket`: past
/// `net.core.rmem_max`/`wmem_max` where the process may (root,
/// CAP_NET_ADMIN), otherwise as much as the kernel caps the plain request
/// at, which is still better than its default.
pub fn grow_udp_buffers(socket: &std::net::UdpSocket, bytes: usize) {
    use std::os::unix::io::AsFd;
    let size = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let set = |opt| crate::io::sys::setsockopt_int(socket.as_fd(), libc::SOL_SOCKET, opt, size);
        if set(force).is_err() {
            let _ = set(plain);
        }
    }
}

fn endpoint(
    server: Option<quinn::ServerConfig>,
    socket: std::net::UdpSocket,
) -> std::io::Result<quinn::Endpoint> {
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime found"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)
}

/// Client endpoints of this process, so an interrupted command can close its
/// connections explicitly: otherwise the receiver would only learn of it at
/// its idle timeout and keep the volume busy until then.
static CLIENTS: Mutex<Vec<quinn::Endpoint>> = Mutex::new(Vec::new());

fn register_client(ep: &quinn::Endpoint) {
    let mut clients = CLIENTS.lock().expect("not poisoned");
    clients.retain(|e| e.open_connections() > 0);
    clients.push(ep.clone());
}

/// Closes every connection this process opened as a client, telling each
/// receiver `reason`, and waits (at most `limit`) for the closes to leave.
pub async fn close_clients(reason: &str, limit: Duration) {
    let clients = std::mem::take(&mut *CLIENTS.lock().expect("not poisoned"));
    for ep in &clients {
        ep.close(quinn::VarInt::from_u32(4), reason.as_bytes());
    }
    let idle = async {
        for ep in &clients {
            ep.wait_idle().await;
        }
    };
    let _ = tokio::time::timeout(limit, idle).await;
}

/// Closes a finished session's connection and gives the endpoint a moment
/// to send the close. Waiting for the whole draining period (three probe
/// timeouts: about 80 ms on loopback, far more across a continent) would add
/// to every pass (and to the frozen time of a cutover, which closes three
/// sessions); the receiver does not need the close, since it ends a session
/// when its protocol is done. A few milliseconds let the connection's driver
/// task put the CONNECTION_CLOSE on the wire.
pub async fn close_session(endpoint: &quinn::Endpoint, conn: &quinn::Connection, reason: &[u8]) {
    conn.close(0u32.into(), reason);
    let _ = tokio::time::timeout(Duration::from_millis(3), endpoint.wait_idle()).await;
}

/// A sender's connection to a receiver whose fingerprint is `expected`.
pub async fn connect(
    id: &Identity,
    addr: SocketAddr,
    expected: &str,
    tuning: &Tuning,
) -> Result<(quinn::Endpoint, quinn::Connection)> {
    let provider = provider();
    let seen = Arc::new(Mutex::new(None));
    let verifier = Arc::new(PinnedServer {
        expected: expected.to_string(),
        seen: seen.clone(),
        signatures: Signatures(provider.clone()),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Io(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![id.cert.clone()], key_der(id))
        .map_err(|e| Error::input(format!("identity key or certificate is invalid: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| Error::Io(format!("QUIC TLS setup: {e}")))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport_config(tuning));
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse().expect("literal")
    } else {
        "0.0.0.0:0".parse().expect("literal")
    };
    let mut ep = udp_socket(bind)
        .and_then(|s| endpoint(None, s))
        .ctx("bind UDP socket")?;
    ep.set_default_client_config(cfg);
    register_client(&ep);
    let connecting = ep
        .connect(addr, SERVER_NAME)
        .map_err(|e| Error::Network(format!("cannot connect to {addr}: {e}")))?;
    let limit = tuning.connect_timeout;
    match tokio::time::timeout(limit, connecting).await {
        Err(_) => Err(Error::Network(format!(
            "the receiver at {addr} did not answer on UDP port {} within {} s (--connect-timeout): check the host and the port, that 'nightpass serve' runs there, and that no firewall drops UDP to port {}",
            addr.port(),
            limit.as_secs_f64(),
            addr.port()
        ))),
        Ok(Ok(c)) => Ok((ep, c)),
        Ok(Err(e)) => {
            let fp = seen.lock().expect("not poisoned").clone();
            match fp {
                Some(fp) if fp != expected => Err(Error::input(format!(
                    "receiver at {addr} presented fingerprint {fp}, but --server-fingerprint pins {expected}: refusing to talk to it"
                ))),
                _ => Err(explain(&e, addr, &id.fingerprint())),
            }
        }
    }
}

/// Turns a connection error into an operator's message, recognising a
/// receiver that refused our identity.
pub fn explain(e: &quinn::ConnectionError, addr: SocketAddr, our_fp: &str) -> Error {
    let crypto_code = match e {
        quinn::ConnectionError::ConnectionClosed(c) => Some(u64::from(c.error_code)),
        quinn::ConnectionError::TransportError(t) => Some(u64::from(t.code)),
        _ => None,
    };
    match crypto_code {
        Some(c) if (0x100..0x200).contains(&c) => Error::input(format!(
            "receiver at {addr} refused the TLS handshake: our fingerprint {our_fp} is not authorized there (the receiver must list it with --allow); TLS alert {}",
            c - 0x100
        )),
        // CONNECTION_REFUSED: the receiver's caps on handshakes in progress
        // (in all, or from this address) are full.
        Some(0x2) => Error::Network(format!(
            "receiver at {addr} refused the connection: it has too many connection attempts in progress (from this address, or in all); try again in a few seconds"
        )),
        _ => match e {
            quinn::ConnectionError::ApplicationClosed(a) => Error::Network(format!(
                "receiver at {addr} closed the session: {}",
                String::from_utf8_lossy(&a.reason)
            )),
            quinn::ConnectionError::TimedOut => Error::Network(format!("connection to {addr} timed out")),
            other => Error::Network(format!("connection to {addr} failed: {other}")),
        },
    }
}

/// Reads one frame body of at most `max` bytes; `None` at a clean end of
/// stream. A stream the peer reset is an error.
pub async fn read_frame(recv: &mut quinn::RecvStream, max: usize) -> Result<Option<bytes::Bytes>> {
    match read_data_frame(recv, max).await? {
        DataFrame::Frame(b) => Ok(Some(b)),
        DataFrame::Finished => Ok(None),
        DataFrame::Abandoned => Err(Error::Network("the peer reset the stream".into())),
    }
}

/// What [`read_data_frame`] found.
pub enum DataFrame {
    /// One frame body.
    Frame(bytes::Bytes),
    /// The stream ended cleanly between frames.
    Finished,
    /// The peer reset the stream (it gave up sending on it); a frame it had
    /// not completed is dropped.
    Abandoned,
}

/// Reads one frame body of at most `max` bytes from a stream whose reset
/// is an answer of its own ([`DataFrame::Abandoned`]), not an error.
pub async fn read_data_frame(recv: &mut quinn::RecvStream, max: usize) -> Result<DataFrame> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(DataFrame::Finished),
        Err(quinn::ReadExactError::ReadError(quinn::ReadError::Reset(_))) => {
            return Ok(DataFrame::Abandoned)
        }
        // The peer closed the whole connection with the success code between frames.
        Err(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(
            quinn::ConnectionError::ApplicationClosed(a),
        ))) if a.error_code == quinn::VarInt::from_u32(0) => return Ok(DataFrame::Finished),
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return Err(Error::Peer(format!(
                "stream ended inside a frame header ({n} of 4 bytes)"
            )))
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(read_error(e)),
    }
    read_body(recv, prefix, max).await
}

/// Reads the body of a frame whose length `prefix` has arrived.
async fn read_body(recv: &mut quinn::RecvStream, prefix: [u8; 4], max: usize) -> Result<DataFrame> {
    let len =
        nightpass_proto::wire::frame_len(prefix, max).map_err(|e| Error::Peer(e.to_string()))?;
    // Assemble the body from the stream's own buffers: no zero-filling, one copy.
    let mut body = bytes::BytesMut::with_capacity(len);
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(Error::Peer(format!(
                    "stream ended inside a frame ({} of {len} bytes)",
                    body.len()
                )))
            }
            Err(quinn::ReadError::Reset(_)) => return Ok(DataFrame::Abandoned),
            Err(e) => return Err(read_error(e)),
        }
    }
    Ok(DataFrame::Frame(body.freeze()))
}

fn read_error(e: quinn::ReadError) -> Error {
    match e {
        quinn::ReadError::ConnectionLost(c) => match c {
            quinn::ConnectionError::ApplicationClosed(a) => Error::Network(format!(
                "peer closed the session: {}",
                String::from_utf8_lossy(&a.reason)
            )),
            other => Error::Network(format!("connection lost: {other}")),
        },
        other => Error::Network(format!("stream read failed: {other}")),
    }
}

/// Writes buffers (one or more, forming one frame) to a stream.
pub async fn write_bufs(send: &mut quinn::SendStream, bufs: &mut [bytes::Bytes]) -> Result<()> {
    send.write_all_chunks(bufs).await.map_err(|e| match e {
        quinn::WriteError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(a)) => {
            Error::Network(format!(
                "peer closed the session: {}",
                String::from_utf8_lossy(&a.reason)
            ))
        }
        other => Error::Network(format!("stream write failed: {other}")),
    })
}

/// Longest a control frame may take to arrive once its first byte has, and
/// to leave once we began writing it: a peer must not keep a session (and
/// its slot, or its volume) by sending 3 of a frame's 4 header bytes, or by
/// never reading what it asked for. The largest control frame (4 MiB) still
/// crosses a link of 1.2 Mbit/s in that time.
pub const FRAME_DEADLINE: Duration = Duration::from_secs(30);

/// Reads one control frame body of at most `max` bytes; `None` at a clean
/// end of stream. Waiting for a frame to begin has no limit here (each
/// session sets its own); once its first byte has arrived, the rest must
/// within [`FRAME_DEADLINE`].
async fn read_control_frame(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<bytes::Bytes>> {
    let mut prefix = [0u8; 4];
    loop {
        match recv.read(&mut prefix[..1]).await {
            Ok(Some(1)) => break,
            Ok(Some(_)) => continue,
            Ok(None) => return Ok(None),
            // The peer closed the whole connection with the success code between frames.
            Err(quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(a)))
                if a.error_code == quinn::VarInt::from_u32(0) =>
            {
                return Ok(None)
            }
            Err(quinn::ReadError::Reset(_)) => {
                return Err(Error::Network("the peer reset the stream".into()))
            }
            Err(e) => return Err(read_error(e)),
        }
    }
    let rest = async {
        match recv.read_exact(&mut prefix[1..]).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(n)) => {
                return Err(Error::Peer(format!(
                    "stream ended inside a frame header ({} of 4 bytes)",
                    n + 1
                )))
            }
            Err(quinn::ReadExactError::ReadError(quinn::ReadError::Reset(_))) => {
                return Err(Error::Network("the peer reset the stream".into()))
            }
            Err(quinn::ReadExactError::ReadError(e)) => return Err(read_error(e)),
        }
        read_body(recv, prefix, max).await
    };
    match tokio::time::timeout(FRAME_DEADLINE, rest).await {
        Err(_) => Err(Error::Peer(format!(
            "a control frame the peer began did not complete within {} s",
            FRAME_DEADLINE.as_secs()
        ))),
        Ok(Err(e)) => Err(e),
        Ok(Ok(DataFrame::Frame(b))) => Ok(Some(b)),
        Ok(Ok(_)) => Err(Error::Network("the peer reset the stream".into())),
    }
}

/// Writes one control message as a frame.
pub async fn send_control(
    send: &mut quinn::SendStream,
    msg: nightpass_proto::wire::control::Msg,
) -> Result<()> {
    let frame = nightpass_proto::wire::encode_frame(&nightpass_proto::wire::Control::new(msg));
    tokio::time::timeout(FRAME_DEADLINE, write_bufs(send, &mut [frame]))
        .await
        .map_err(|_| {
            Error::Network(format!(
                "the peer did not read our control stream for {} s",
                FRAME_DEADLINE.as_secs()
            ))
        })?
}

/// Awaits `work` while keeping the session's control stream alive: a
/// heartbeat at once and every [`nightpass_proto::wire::HEARTBEAT_INTERVAL_S`] after, so a
/// receiver that has sent all it had to send does not take our silence for
/// a dead sender (it ends a session silent for three intervals): a verify
/// waiting on its own source read, a sender writing a large manifest.
pub async fn with_heartbeats<T>(
    send: &mut quinn::SendStream,
    work: impl std::future::Future<Output = T>,
) -> Result<T> {
    tokio::pin!(work);
    let mut beat = tokio::time::interval(Duration::from_secs(
        nightpass_proto::wire::HEARTBEAT_INTERVAL_S,
    ));
    loop {
        tokio::select! {
            done = &mut work => return Ok(done),
            _ = beat.tick() => {
                send_control(
                    send,
                    nightpass_proto::wire::control::Msg::Heartbeat(nightpass_proto::wire::Heartbeat {}),
                )
                .await?;
            }
        }
    }
}

/// Reads one control message; `None` at a clean end of stream.
pub async fn recv_control(
    recv: &mut quinn::RecvStream,
) -> Result<Option<nightpass_proto::wire::control::Msg>> {
    match read_control_frame(recv, nightpass_proto::wire::MAX_CONTROL_FRAME).await? {
        None => Ok(None),
        Some(body) => nightpass_proto::wire::decode_control(body)
            .map(Some)
            .map_err(|e| Error::Peer(format!("bad control message: {e}"))),
    }
}

/// A volume exported by a receiver: `HOST:PORT/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteVolume {
    /// `HOST:PORT` as given (`[::1]:7400` keeps its brackets).
    pub host_port: String,
    /// Exported volume name.
    pub name: String,
}

impl RemoteVolume {
    /// Parses `HOST:PORT/NAME`; `None` when `s` does not have that shape
    /// (then it is a local path).
    pub fn parse(s: &str) -> Option<RemoteVolume> {
        if s.starts_with('/') || s.starts_with('.') {
            return None;
        }
        let (hp, name) = s.split_once('/')?;
        let (host, port) = hp.rsplit_once(':')?;
        if host.is_empty() || port.parse::<u16>().is_err() || name.is_empty() || name.contains('/')
        {
            return None;
        }
        Some(RemoteVolume {
            host_port: hp.to_string(),
            name: name.to_string(),
        })
    }

    /// Resolves the host to a socket address.
    pub async fn resolve(&self) -> Result<SocketAddr> {
        tokio::net::lookup_host(&self.host_port)
            .await
            .map_err(|e| Error::Network(format!("cannot resolve {}: {e}", self.host_port)))?
            .next()
            .ok_or_else(|| Error::Network(format!("{} resolves to no address", self.host_port)))
    }
}

impl std::fmt::Display for RemoteVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.host_port, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_volume_shapes() {
        let r = RemoteVolume::parse("10.1.2.3:7400/filer01").unwrap();
        assert_eq!(
            (r.host_port.as_str(), r.name.as_str()),
            ("10.1.2.3:7400", "filer01")
        );
        assert_eq!(
            RemoteVolume::parse("[::1]:7400/f").unwrap().host_port,
            "[::1]:7400"
        );
        assert!(RemoteVolume::parse("localhost:7400/f").is_some());
        assert!(RemoteVolume::parse("/dev/loop3").is_none());
        assert!(RemoteVolume::parse("images/a.img").is_none());
        assert!(RemoteVolume::parse("host:99999/x").is_none());
    }

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
