//! QUIC endpoints and connections: a receiver's endpoint, a sender's
//! pinned connection, closing them, and what a failed connection means to
//! an operator; `HOST:PORT/NAME` addresses.
//!
//! Owns every endpoint this process opens; knows no pass, and nothing of
//! what travels on a connection (see `framing`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nightpass_proto::wire::ALPN;

use super::identity::{Identity, SERVER_NAME};
use super::pinning::{provider, AllowedClients, PinnedServer, Signatures};
use super::tuning::{grow_udp_buffers, transport_config, Tuning, UDP_BUFFER};
use crate::error::{Error, IoContext, Result};

/// A receiver's endpoint, accepting only `allowed` senders.
pub fn server_endpoint(
    id: &Identity,
    allowed: HashSet<String>,
    listen: SocketAddr,
    tuning: &Tuning,
) -> Result<quinn::Endpoint> {
    let cfg = server_config(id, allowed, tuning)?;
    let socket =
        udp_socket(listen).map_err(|e| Error::input(format!("cannot listen on {listen}: {e}")))?;
    endpoint(Some(cfg), socket).map_err(|e| Error::input(format!("cannot listen on {listen}: {e}")))
}

/// A receiver's QUIC and TLS settings, accepting only `allowed` senders:
/// what [`server_endpoint`] starts with, and what a receiver that re-reads
/// its allowed senders gives its endpoint (`set_server_config`), which
/// applies to the handshakes that follow.
pub fn server_config(
    id: &Identity,
    allowed: HashSet<String>,
    tuning: &Tuning,
) -> Result<quinn::ServerConfig> {
    let provider = provider();
    let verifier = Arc::new(AllowedClients {
        allowed,
        signatures: Signatures(provider.clone()),
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Io(format!("TLS setup: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![id.cert_der()], id.key_der())
        .map_err(|e| Error::input(format!("identity key or certificate is invalid: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| Error::Io(format!("QUIC TLS setup: {e}")))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport_config(tuning));
    Ok(cfg)
}

/// A UDP socket bound to `addr` with [`UDP_BUFFER`]-sized kernel buffers
/// where the system allows (see [`grow_udp_buffers`]).
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    grow_udp_buffers(&socket, UDP_BUFFER);
    Ok(socket)
}

/// An endpoint on `socket`, serving when given `server`.
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

/// Keeps `ep` among this process's client endpoints.
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
        .with_client_auth_cert(vec![id.cert_der()], id.key_der())
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
}
