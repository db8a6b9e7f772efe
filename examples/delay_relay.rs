//! A UDP relay that adds a fixed one-way delay in each direction.
//!
//! ```text
//! delay_relay LISTEN_ADDR UPSTREAM_ADDR DELAY_MS
//! ```
//!
//! It receives datagrams from one client on `LISTEN_ADDR` and sends each to
//! `UPSTREAM_ADDR` `DELAY_MS` milliseconds after it arrived; replies from
//! upstream go back to the last client seen, also `DELAY_MS` later. With the
//! relay in the path a QUIC connection sees a round trip of `2 × DELAY_MS`
//! plus whatever the path behind it adds: a "long fat pipe" for kernels
//! without `netem` (`scripts/lfp.sh` shapes the rate with `tc tbf`).
//!
//! Each direction has a receive thread, which stamps every datagram with its
//! due time and pushes it into an unbounded FIFO, and a send thread, which
//! sleeps until the head of the FIFO is due and sends it. Order is kept and
//! the relay drops nothing of its own; a send the kernel refuses (e.g. a
//! datagram over the outgoing interface's MTU, as QUIC's MTU probes are) is
//! counted as a send error: the path dropped it. (A full qdisc behind the
//! relay drops silently: without `IP_RECVERR` Linux reports such a UDP send
//! as a success; read `tc -s qdisc` for those.) Both sockets get 32 MiB
//! receive and send buffers (`SO_RCVBUFFORCE` as root, else `SO_RCVBUF` up
//! to the sysctl cap) so bursts survive a loaded machine. On a 2-core VM it
//! carried 40k datagrams/s (486 Mbit/s) one way and 18k/s back for 75 s at
//! about a quarter of one core.
//!
//! Counters go to stderr every 5 s, with each direction's rate over those
//! 5 s, and once more on SIGINT or SIGTERM, which end the relay with status
//! 0. The first line on stderr names the bound address:
//! `delay_relay: listening on ADDR -> UPSTREAM, delay N ms, ...`.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Socket buffer size asked for on both sockets, each way.
const SOCKET_BUFFER: usize = 32 << 20;
/// Largest datagram we can take in (the UDP maximum).
const MAX_DATAGRAM: usize = 65_535;
/// How often the counters are printed.
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// A datagram waiting for its due time.
type Delayed = (Instant, Vec<u8>);

/// Counters of one direction.
#[derive(Default)]
struct Counters {
    /// Datagrams received.
    received: AtomicU64,
    /// Bytes received.
    received_bytes: AtomicU64,
    /// Datagrams sent on.
    sent: AtomicU64,
    /// Sends the kernel refused (e.g. over the MTU): the path dropped them.
    send_errors: AtomicU64,
    /// Receive errors (e.g. `ECONNREFUSED` before upstream listens).
    recv_errors: AtomicU64,
}

impl Counters {
    fn line(&self) -> String {
        let received = self.received.load(Ordering::Relaxed);
        let sent = self.sent.load(Ordering::Relaxed);
        let send_errors = self.send_errors.load(Ordering::Relaxed);
        format!(
            "{received} datagrams ({} bytes) in, {sent} out, {send_errors} send errors, \
             {} recv errors, {} queued",
            self.received_bytes.load(Ordering::Relaxed),
            self.recv_errors.load(Ordering::Relaxed),
            received.saturating_sub(sent + send_errors),
        )
    }
}

/// Both directions' counters.
#[derive(Default)]
struct Stats {
    /// Client to upstream.
    up: Counters,
    /// Upstream to client.
    down: Counters,
}

impl Stats {
    /// Bytes received so far, up and down.
    fn bytes(&self) -> (u64, u64) {
        (
            self.up.received_bytes.load(Ordering::Relaxed),
            self.down.received_bytes.load(Ordering::Relaxed),
        )
    }

    fn print(&self, what: &str) {
        eprintln!(
            "delay_relay: {what}: up: {}; down: {}",
            self.up.line(),
            self.down.line()
        );
    }
}

/// Mbit/s of `bytes` over `dt`.
fn mbit_s(bytes: u64, dt: Duration) -> f64 {
    bytes as f64 * 8.0 / 1e6 / dt.as_secs_f64().max(1e-9)
}

/// Asks for `SOCKET_BUFFER` bytes of receive and send buffer (as nightpass
/// does for its own sockets); returns what the kernel granted (it reports
/// twice the usable size).
fn grow_buffers(sock: &UdpSocket) -> (usize, usize) {
    nightpass::net::transport::grow_udp_buffers(sock, SOCKET_BUFFER);
    let fd = sock.as_raw_fd();
    let get = |opt: libc::c_int| {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: fd is an open socket owned by `sock`; v and len are valid
        // for writes of their sizes.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r == 0 {
            usize::try_from(v).unwrap_or(0)
        } else {
            0
        }
    };
    (get(libc::SO_RCVBUF), get(libc::SO_SNDBUF))
}

/// Receives datagrams forever, stamping each with `now + delay`.
/// `on_peer` is told each datagram's source address.
fn receive_loop(
    sock: &UdpSocket,
    delay: Duration,
    queue: &Sender<Delayed>,
    counters: &Counters,
    mut on_peer: impl FnMut(SocketAddr),
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let due = Instant::now() + delay;
                on_peer(from);
                counters.received.fetch_add(1, Ordering::Relaxed);
                counters
                    .received_bytes
                    .fetch_add(n as u64, Ordering::Relaxed);
                if queue.send((due, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                // ECONNREFUSED from an ICMP error and the like: keep going,
                // but do not spin if the socket is broken for good.
                if counters.recv_errors.fetch_add(1, Ordering::Relaxed) % 1000 == 999 {
                    thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
}

/// Sends each queued datagram when it is due, in order, through `send`.
fn send_loop(
    queue: &Receiver<Delayed>,
    counters: &Counters,
    mut send: impl FnMut(&[u8]) -> io::Result<()>,
) {
    while let Ok((due, data)) = queue.recv() {
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        loop {
            match send(&data) {
                Ok(()) => {
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    counters.send_errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
}

/// Resolves `s` to its first socket address.
fn resolve(s: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("cannot resolve '{s}': {e}"))?
        .next()
        .ok_or_else(|| format!("'{s}' resolves to no address"))
}

/// Blocks SIGINT and SIGTERM in this thread (and so in every thread spawned
/// after), and returns the set, for `sigtimedwait`.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; the calls initialise and fill it, and
    // pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits up to `timeout` for a signal of `set`; returns it, if one came.
fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Option<libc::c_int> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        // Below 10^9: fits a c_long everywhere.
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: set and ts are valid for reads; a null info pointer is allowed.
    let r = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (r > 0).then_some(r)
}

fn run(args: &[String]) -> Result<(), String> {
    let [listen, upstream, delay_ms] = args else {
        return Err("usage: delay_relay LISTEN_ADDR UPSTREAM_ADDR DELAY_MS".into());
    };
    let listen = resolve(listen)?;
    let upstream = resolve(upstream)?;
    let delay = Duration::from_millis(
        delay_ms
            .parse()
            .map_err(|e| format!("DELAY_MS '{delay_ms}': {e}"))?,
    );

    let signals = block_signals();

    let client_sock = UdpSocket::bind(listen).map_err(|e| format!("cannot bind {listen}: {e}"))?;
    let any: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid address")
    } else {
        "[::]:0".parse().expect("valid address")
    };
    let upstream_sock = UdpSocket::bind(any).map_err(|e| format!("cannot bind {any}: {e}"))?;
    upstream_sock
        .connect(upstream)
        .map_err(|e| format!("cannot connect to {upstream}: {e}"))?;
    let (c_rcv, c_snd) = grow_buffers(&client_sock);
    let (u_rcv, u_snd) = grow_buffers(&upstream_sock);
    let bound = client_sock
        .local_addr()
        .map_err(|e| format!("local address: {e}"))?;
    eprintln!(
        "delay_relay: listening on {bound} -> {upstream}, delay {} ms each way, \
         buffers rcv/snd client {c_rcv}/{c_snd} upstream {u_rcv}/{u_snd}",
        delay.as_millis()
    );

    let client_sock = Arc::new(client_sock);
    let upstream_sock = Arc::new(upstream_sock);
    let stats = Arc::new(Stats::default());
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));

    let (up_tx, up_rx) = mpsc::channel::<Delayed>();
    let (down_tx, down_rx) = mpsc::channel::<Delayed>();
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map_err(|e| format!("cannot spawn thread {name}: {e}"))
    };

    // Client -> upstream.
    {
        let (sock, stats, client) = (client_sock.clone(), stats.clone(), client.clone());
        spawn(
            "up-recv",
            Box::new(move || {
                let mut last = None;
                receive_loop(&sock, delay, &up_tx, &stats.up, |from| {
                    if last != Some(from) {
                        last = Some(from);
                        *client.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
                    }
                });
            }),
        )?;
    }
    {
        let (sock, stats) = (upstream_sock.clone(), stats.clone());
        spawn(
            "up-send",
            Box::new(move || {
                send_loop(&up_rx, &stats.up, |d| sock.send(d).map(drop));
            }),
        )?;
    }
    // Upstream -> client.
    {
        let (sock, stats) = (upstream_sock.clone(), stats.clone());
        spawn(
            "down-recv",
            Box::new(move || {
                receive_loop(&sock, delay, &down_tx, &stats.down, |_| {});
            }),
        )?;
    }
    {
        let (sock, stats, client) = (client_sock.clone(), stats.clone(), client.clone());
        spawn(
            "down-send",
            Box::new(move || {
                send_loop(&down_rx, &stats.down, |d| {
                    let to = *client.lock().unwrap_or_else(|e| e.into_inner());
                    match to {
                        Some(to) => sock.send_to(d, to).map(drop),
                        None => Err(io::Error::new(io::ErrorKind::NotConnected, "no client yet")),
                    }
                });
            }),
        )?;
    }

    let mut last = (Instant::now(), stats.bytes());
    let mut next = last.0 + REPORT_EVERY;
    loop {
        let now = Instant::now();
        if now >= next {
            let (up, down) = stats.bytes();
            let (t0, (up0, down0)) = last;
            let dt = now - t0;
            stats.print(&format!(
                "counters (last {:.1} s: up {:.1} Mbit/s, down {:.1} Mbit/s)",
                dt.as_secs_f64(),
                mbit_s(up - up0, dt),
                mbit_s(down - down0, dt)
            ));
            last = (now, (up, down));
            next += REPORT_EVERY;
            continue;
        }
        if let Some(sig) = wait_signal(&signals, next - now) {
            let name = if sig == libc::SIGINT {
                "SIGINT"
            } else {
                "SIGTERM"
            };
            stats.print(&format!("final ({name})"));
            return Ok(());
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("delay_relay: {e}");
            ExitCode::from(2)
        }
    }
}
