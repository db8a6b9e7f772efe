//! A UDP relay for lossy-path tests: it stands between one QUIC client and a
//! receiver and drops, delays, reorders and duplicates datagrams both ways.
//! Runs on threads; stopped (and joined) on drop.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::harness::Rng;

/// What the relay does to every datagram, in each direction.
#[derive(Debug, Clone, Copy)]
pub struct Impairment {
    /// Datagrams dropped, per thousand.
    pub drop_per_mille: u64,
    /// Datagrams sent twice, per thousand.
    pub dup_per_mille: u64,
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Extra delay, uniform in `0..=jitter`; datagrams closer than this reorder.
    pub jitter: Duration,
}

/// Counters of one direction.
#[derive(Debug, Default)]
pub struct Counts {
    /// Datagrams received from the sending side.
    pub seen: AtomicU64,
    /// Datagrams delivered (duplicates included).
    pub delivered: AtomicU64,
    /// Datagrams dropped on purpose.
    pub dropped: AtomicU64,
    /// Extra copies scheduled.
    pub duplicated: AtomicU64,
    /// Datagrams delivered after one that arrived later.
    pub reordered: AtomicU64,
}

impl Counts {
    pub fn get(&self) -> [u64; 5] {
        [
            self.seen.load(Ordering::Relaxed),
            self.delivered.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
            self.duplicated.load(Ordering::Relaxed),
            self.reordered.load(Ordering::Relaxed),
        ]
    }
}

/// Both directions' counters.
#[derive(Debug, Default)]
pub struct Stats {
    pub to_server: Counts,
    pub to_client: Counts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Dir {
    ToServer,
    ToClient,
}

/// (due, arrival sequence, direction, datagram); ordered by due time.
type Item = Reverse<(Instant, u64, Dir, Vec<u8>)>;

struct Queue {
    heap: Mutex<BinaryHeap<Item>>,
    cv: Condvar,
    seq: AtomicU64,
}

/// A running relay; `port` is where the client must send.
pub struct Relay {
    pub port: u16,
    pub stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    queue: Arc<Queue>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Starts a relay on `127.0.0.1:0` in front of `upstream`.
    pub fn start(upstream: SocketAddr, imp: Impairment, seed: u64) -> Relay {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").expect("bind relay front"));
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").expect("bind relay back"));
        back.connect(upstream).expect("connect relay back");
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        }
        let port = front.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Stats::default());
        let queue = Arc::new(Queue {
            heap: Mutex::new(BinaryHeap::new()),
            cv: Condvar::new(),
            seq: AtomicU64::new(0),
        });
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let mut threads = Vec::new();

        // Client → relay: remember the client, impair, schedule towards the server.
        {
            let (front, stop, queue, stats, client) = (
                front.clone(),
                stop.clone(),
                queue.clone(),
                stats.clone(),
                client.clone(),
            );
            threads.push(std::thread::spawn(move || {
                let mut rng = Rng::new(seed);
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = front.recv_from(&mut buf) else {
                        continue;
                    };
                    *client.lock().unwrap() = Some(from);
                    impair(
                        &buf[..n],
                        Dir::ToServer,
                        &imp,
                        &mut rng,
                        &queue,
                        &stats.to_server,
                    );
                }
            }));
        }
        // Server → relay: impair, schedule towards the client.
        {
            let (back, stop, queue, stats) =
                (back.clone(), stop.clone(), queue.clone(), stats.clone());
            threads.push(std::thread::spawn(move || {
                let mut rng = Rng::new(seed ^ 0x005e_ed0f_5e4e);
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    // Errors include ECONNREFUSED while the receiver is down.
                    let Ok(n) = back.recv(&mut buf) else { continue };
                    impair(
                        &buf[..n],
                        Dir::ToClient,
                        &imp,
                        &mut rng,
                        &queue,
                        &stats.to_client,
                    );
                }
            }));
        }
        // Delivery in due order.
        {
            let (stop, queue, stats) = (stop.clone(), queue.clone(), stats.clone());
            threads.push(std::thread::spawn(move || {
                let mut last_seq = [0u64; 2];
                let mut any = [false; 2];
                let mut heap = queue.heap.lock().unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    let due = heap.peek().map(|Reverse((t, ..))| *t);
                    match due {
                        Some(t) if t <= now => {
                            let Reverse((_, seq, dir, data)) = heap.pop().unwrap();
                            let (k, counts) = match dir {
                                Dir::ToServer => (0, &stats.to_server),
                                Dir::ToClient => (1, &stats.to_client),
                            };
                            if any[k] && seq < last_seq[k] {
                                counts.reordered.fetch_add(1, Ordering::Relaxed);
                            } else {
                                last_seq[k] = seq;
                                any[k] = true;
                            }
                            let sent = match dir {
                                Dir::ToServer => back.send(&data).is_ok(),
                                Dir::ToClient => match *client.lock().unwrap() {
                                    Some(c) => front.send_to(&data, c).is_ok(),
                                    None => false,
                                },
                            };
                            if sent {
                                counts.delivered.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Some(t) => {
                            heap = queue.cv.wait_timeout(heap, t - now).unwrap().0;
                        }
                        None => {
                            heap = queue
                                .cv
                                .wait_timeout(heap, Duration::from_millis(50))
                                .unwrap()
                                .0;
                        }
                    }
                }
            }));
        }
        Relay {
            port,
            stats,
            stop,
            queue,
            threads,
        }
    }

    /// `127.0.0.1:PORT/NAME` through the relay.
    pub fn dest(&self, name: &str) -> String {
        format!("127.0.0.1:{}/{name}", self.port)
    }
}

fn impair(data: &[u8], dir: Dir, imp: &Impairment, rng: &mut Rng, queue: &Queue, c: &Counts) {
    c.seen.fetch_add(1, Ordering::Relaxed);
    if rng.below(1000) < imp.drop_per_mille {
        c.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let copies = if rng.below(1000) < imp.dup_per_mille {
        c.duplicated.fetch_add(1, Ordering::Relaxed);
        2
    } else {
        1
    };
    let jitter_us = imp.jitter.as_micros() as u64;
    let now = Instant::now();
    let mut heap = queue.heap.lock().unwrap();
    for _ in 0..copies {
        let extra = Duration::from_micros(rng.below(jitter_us + 1));
        let seq = queue.seq.fetch_add(1, Ordering::Relaxed);
        heap.push(Reverse((now + imp.delay + extra, seq, dir, data.to_vec())));
    }
    drop(heap);
    queue.cv.notify_one();
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.queue.cv.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
