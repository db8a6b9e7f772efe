//! QUIC and UDP tuning: the one owner of flow-control windows, congestion
//! control, idle and keep-alive times, MTU discovery and UDP socket
//! buffers. The command line, `demo` and `bench` all run what it derives.
//!
//! Owns configuration only; opens no endpoint.

use std::sync::Arc;
use std::time::Duration;

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

/// The QUIC transport configuration of `t`.
pub(super) fn transport_config(t: &Tuning) -> Arc<quinn::TransportConfig> {
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

/// Bytes of kernel buffer asked for on each UDP socket, each way. The
/// kernel's default (about 200 KiB) overflows at a few hundred Mbit/s as
/// soon as a process is a few milliseconds late, and every overflow is a
/// loss that congestion control answers by slowing down.
pub const UDP_BUFFER: usize = 16 << 20;

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
