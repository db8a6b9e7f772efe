//! Both ends of a verify in memory: a client against a server over a
//! simulated control stream (frames encoded and decoded, as on the wire),
//! over in-memory devices; then hostile input to either side.

use std::collections::VecDeque;

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;

use super::*;
use crate::wire::{self, Mode, HASHES_PER_PART, MAX_CONTROL_FRAME};

const C: u64 = 4096;

fn chunk(bytes: u64) -> ChunkSize {
    ChunkSize::new(bytes).unwrap()
}

/// Deterministic bytes, different per seed.
fn device(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

/// The table of a device's hashes over `set` (zero elsewhere).
fn hash_set(dev: &[u8], set: &ChunkSet) -> Vec<u8> {
    let g = set.geometry();
    let mut t = vec![0u8; g.chunk_count() as usize * ENTRY_LEN];
    for i in set.indices() {
        let r = g.range(i).unwrap();
        let o = i as usize * ENTRY_LEN;
        t[o..o + ENTRY_LEN]
            .copy_from_slice(blake3::hash(&dev[r.start as usize..r.end as usize]).as_bytes());
    }
    t
}

/// What happens to a frame on the simulated link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Deliver,
    Drop,
    Duplicate,
}

const DROP: u8 = 245;
const REPEAT: u8 = 255;

fn fault_of(b: u8) -> Fault {
    match b {
        0..=243 => Fault::Deliver,
        244..=249 => Fault::Drop,
        _ => Fault::Duplicate,
    }
}

/// One verify run: the client's side over `source`, the server's over `target`.
struct Sim<'a> {
    source: &'a [u8],
    target: &'a [u8],
    info: TargetInfo,
    client: VerifyClient,
    server: Option<VerifyServer>,
    server_dead: bool,
    c2s: VecDeque<Bytes>,
    s2c: VecDeque<Bytes>,
    faults: VecDeque<u8>,
    /// How many hashes the server's driver feeds at once (1..).
    feed: usize,
    outcome: Option<VerifyOutcome>,
    forgotten: Vec<Vec<u64>>,
}

impl<'a> Sim<'a> {
    fn new(source: &'a [u8], target: &'a [u8], info: TargetInfo, ranges: Vec<u64>) -> Self {
        let client = VerifyClient::new(VerifyRequest {
            volume: "v".into(),
            source_size: source.len() as u64,
            chunk: chunk(C),
            ranges,
        });
        Sim {
            source,
            target,
            info,
            client,
            server: None,
            server_dead: false,
            c2s: VecDeque::new(),
            s2c: VecDeque::new(),
            faults: VecDeque::new(),
            feed: 7,
            outcome: None,
            forgotten: Vec::new(),
        }
    }

    /// Puts a message on the link, encoded, through the next fault.
    fn send(faults: &mut VecDeque<u8>, q: &mut VecDeque<Bytes>, m: Msg) {
        let frame = wire::encode_frame(&wire::Control::new(m));
        match fault_of(faults.pop_front().unwrap_or(0)) {
            Fault::Deliver => q.push_back(frame),
            Fault::Drop => {}
            Fault::Duplicate => {
                q.push_back(frame.clone());
                q.push_back(frame);
            }
        }
    }

    fn receive(q: &mut VecDeque<Bytes>) -> Option<Msg> {
        let frame = q.pop_front()?;
        let (bodies, err) = wire::split_frames(frame, MAX_CONTROL_FRAME);
        assert!(err.is_none() && bodies.len() == 1);
        Some(wire::decode_control(bodies[0].clone()).unwrap())
    }

    /// The client's driver: sends, hashes the source once the target's
    /// hashes are in, forgets what differs. True when it did something.
    fn client_step(&mut self) -> Result<bool, VerifyError> {
        let mut did = false;
        while let Some(m) = self.client.poll_transmit() {
            Self::send(&mut self.faults, &mut self.c2s, m);
            did = true;
        }
        if self.client.hashes_received() && self.outcome.is_none() {
            let set = self.client.poll_read().expect("asked once");
            let ours = hash_set(self.source, &set);
            self.client.handle_source_hashes(&ours)?;
            let outcome = self.client.poll_outcome().expect("compared");
            let forget: Vec<(u64, u64)> = match &outcome {
                VerifyOutcome::Differing(d) => d.byte_ranges().collect(),
                _ => Vec::new(),
            };
            self.client.forget(&forget)?;
            self.outcome = Some(outcome);
            did = true;
        }
        Ok(did)
    }

    /// Delivers one frame to the server, as its driver would.
    fn deliver_to_server(&mut self) -> bool {
        let Some(m) = Self::receive(&mut self.c2s) else {
            return false;
        };
        if self.server_dead {
            return true;
        }
        let result = match (&mut self.server, m) {
            (None, Msg::Hello(h)) => match VerifyServer::new(&h) {
                Ok(mut s) => {
                    let r = s.handle_target(self.info);
                    self.server = Some(s);
                    r
                }
                Err(r) => {
                    let refusal = wire::Refusal {
                        code: r.code as i32,
                        message: r.message,
                    };
                    Self::send(&mut self.faults, &mut self.s2c, Msg::Refusal(refusal));
                    self.server_dead = true;
                    Ok(())
                }
            },
            (None, _) => Err(VerifyError::Unexpected("not a hello")),
            (Some(s), m) => s.handle_message(m),
        };
        if result.is_err() {
            // The receiver's driver ends the session.
            self.server_dead = true;
        }
        true
    }

    /// The server's driver: reads and hashes what it is asked, applies
    /// forgets, sends.
    fn server_step(&mut self) -> bool {
        let Some(s) = self.server.as_mut().filter(|_| !self.server_dead) else {
            return false;
        };
        let mut did = false;
        if let Some(run) = s.poll_read() {
            let g = *s.geometry().unwrap();
            let set = ChunkSet::span(&g, run.clone());
            let table = hash_set(self.target, &set);
            let mut i = run.start;
            while i < run.end {
                let n = (self.feed as u64).min(run.end - i);
                let o = i as usize * ENTRY_LEN;
                s.handle_hashes(i, &table[o..o + n as usize * ENTRY_LEN])
                    .unwrap();
                i += n;
            }
            did = true;
        }
        if let Some(ranges) = s.poll_forget() {
            self.forgotten.push(ranges);
            s.handle_forgotten().unwrap();
            did = true;
        }
        while let Some(m) = s.poll_transmit() {
            Self::send(&mut self.faults, &mut self.s2c, m);
            did = true;
        }
        did
    }

    fn deliver_to_client(&mut self) -> Result<bool, VerifyError> {
        match Self::receive(&mut self.s2c) {
            Some(m) => self.client.handle_message(m).map(|_| true),
            None => Ok(false),
        }
    }

    /// Runs to the end, taking steps in the order `schedule` picks.
    fn run(mut self, schedule: &[u8]) -> (Result<VerifyOutcome, VerifyError>, Vec<Vec<u64>>) {
        let mut pick = schedule.iter().cycle();
        let result = loop {
            if self.client.is_closed() && self.outcome.is_some() {
                break Ok(self.outcome.take().unwrap());
            }
            if let Some(VerifyOutcome::Refused(r)) = self.client.poll_outcome() {
                break Ok(VerifyOutcome::Refused(r));
            }
            let mut did = false;
            for k in 0..8 {
                // Four steps as the schedule picks, then each in turn.
                let which = if k < 4 {
                    pick.next().copied().unwrap_or(0)
                } else {
                    k
                };
                let step = match which % 4 {
                    0 => self.client_step(),
                    1 => Ok(self.deliver_to_server()),
                    2 => Ok(self.server_step()),
                    _ => self.deliver_to_client(),
                };
                match step {
                    Ok(d) => did |= d,
                    Err(e) => return (Err(e), self.forgotten),
                }
            }
            if !did {
                // Nothing moves: the connection ends.
                break self
                    .client
                    .handle_closed()
                    .and(Err(VerifyError::NotReady("the simulation stalled")));
            }
        };
        (result, self.forgotten)
    }
}

/// What a verify must find, computed from the bytes (not the hashes): the
/// chunks asked for that differ, or that the receiver does not hash (a
/// short last chunk past the end it knows).
fn oracle(source: &[u8], target: &[u8], info: TargetInfo, ranges: &[u64]) -> VerifyOutcome {
    let c = chunk(C);
    let extent = (source.len() as u64).min(info.size);
    let g = Geometry::new(extent, c).unwrap();
    let hashed = verify_extent(info.size, info.recorded_size, source.len() as u64, c);
    let differ = ChunkSet::from_indices(
        &g,
        asked_set(&g, ranges).indices().filter(|&i| {
            let r = g.range(i).unwrap();
            let (a, b) = (r.start as usize, r.end as usize);
            r.end > hashed || source[a..b] != target[a..b]
        }),
    );
    if differ.is_empty() {
        VerifyOutcome::Identical
    } else {
        VerifyOutcome::Differing(differ)
    }
}

fn info_of(target: &[u8]) -> TargetInfo {
    TargetInfo {
        size: target.len() as u64,
        is_block: false,
        own_chunk: Some(chunk(C)),
        recorded_size: None,
    }
}

fn run_clean(source: &[u8], target: &[u8], ranges: Vec<u64>) -> VerifyOutcome {
    let info = info_of(target);
    let (result, _) = Sim::new(source, target, info, ranges).run(&[0, 1, 2, 3]);
    result.unwrap()
}

fn differing(size: u64, indices: &[u64]) -> VerifyOutcome {
    let g = Geometry::new(size, chunk(C)).unwrap();
    VerifyOutcome::Differing(ChunkSet::from_indices(&g, indices.iter().copied()))
}

#[test]
fn identical_volumes_are_identical() {
    let d = device(10 * C as usize, 1);
    assert_eq!(run_clean(&d, &d, Vec::new()), VerifyOutcome::Identical);
    assert_eq!(run_clean(&[], &[], Vec::new()), VerifyOutcome::Identical);
}

#[test]
fn one_changed_byte_is_exactly_its_chunk() {
    let size = 10 * C as usize + 100;
    let src = device(size, 2);
    for (at, chunk_index) in [(0, 0), (9 * C as usize + 5, 9), (size - 1, 10)] {
        let mut t = src.clone();
        t[at] ^= 0xff;
        assert_eq!(
            run_clean(&src, &t, Vec::new()),
            differing(size as u64, &[chunk_index]),
            "byte {at}"
        );
    }
}

#[test]
fn a_ranged_verify_compares_only_its_chunks() {
    let src = device(20 * C as usize, 3);
    let mut t = src.clone();
    t[3 * C as usize] ^= 1;
    t[12 * C as usize] ^= 1;
    let ranges = vec![10 * C, 3 * C, 0, 1];
    assert_eq!(run_clean(&src, &t, ranges), differing(20 * C, &[12]));
    assert_eq!(run_clean(&src, &t, vec![C, 1]), VerifyOutcome::Identical);
}

#[test]
fn a_forget_names_exactly_the_differing_ranges() {
    let src = device(8 * C as usize, 4);
    let mut t = src.clone();
    t[C as usize] ^= 1;
    t[2 * C as usize] ^= 1;
    let (result, forgotten) = Sim::new(&src, &t, info_of(&t), Vec::new()).run(&[0, 1, 2, 3]);
    assert_eq!(result.unwrap(), differing(8 * C, &[1, 2]));
    assert_eq!(forgotten, vec![vec![C, 2 * C]]);
}

#[test]
fn a_short_chunk_the_receiver_does_not_know_is_not_hashed() {
    // The source ends 100 bytes into chunk 4 of a larger target: without
    // a recorded end the receiver rounds down and chunk 4 differs.
    let t = device(8 * C as usize, 5);
    let src = t[..4 * C as usize + 100].to_vec();
    assert_eq!(
        run_clean(&src, &t, Vec::new()),
        differing(4 * C + 100, &[4])
    );
    let mut info = info_of(&t);
    info.recorded_size = Some(src.len() as u64);
    let (r, _) = Sim::new(&src, &t, info, Vec::new()).run(&[0, 1, 2, 3]);
    assert_eq!(r.unwrap(), VerifyOutcome::Identical);
}

#[test]
fn a_missing_target_is_empty() {
    let src = device(3 * C as usize, 6);
    let info = TargetInfo::default();
    let (r, _) = Sim::new(&src, &[], info, Vec::new()).run(&[0, 1, 2, 3]);
    assert_eq!(r.unwrap(), VerifyOutcome::Identical);
    let (r, _) = Sim::new(&src, &[], info, vec![0, 5]).run(&[0, 1, 2, 3]);
    assert_eq!(r.unwrap(), VerifyOutcome::Identical);
}

/// Every single lost or repeated frame, at every position, of a ranged
/// verify that finds a difference: a clean error, or (a repeated heartbeat
/// or forget) the right answer; a lost or repeated part is always caught.
#[test]
fn each_lost_or_repeated_frame_is_caught() {
    let src = device(12 * C as usize, 11);
    let mut t = src.clone();
    t[5 * C as usize] ^= 1;
    let ranges = vec![0, C, 4 * C, 2 * C, 9 * C, 1];
    let expected = oracle(&src, &t, info_of(&t), &ranges);
    let (mut errors, mut right) = (0, 0);
    for at in 0..10 {
        for fault in [DROP, REPEAT] {
            let mut sim = Sim::new(&src, &t, info_of(&t), ranges.clone());
            sim.faults = (0..at).map(|_| 0).chain([fault]).collect();
            match sim.run(&[0, 1, 2, 3]).0 {
                Ok(o) => {
                    assert_eq!(o, expected, "fault {fault} at frame {at}");
                    right += 1;
                }
                Err(_) => errors += 1,
            }
        }
    }
    // Frames: hello, welcome, three parts, forget, done; then none. Only
    // a repeated forget (forgotten twice) or done (after the end) is harmless.
    assert_eq!((errors, right), (7 + 5, 2 + 2 * 3));
}

#[test]
fn compare_finds_and_coalesces() {
    let g = Geometry::new(5 * 4096, chunk(4096)).unwrap();
    let a = vec![0u8; 5 * 32];
    let mut b = a.clone();
    b[32] = 1;
    b[64] = 1;
    b[4 * 32 + 5] = 1;
    let d = compare(&g, &a, &b);
    assert_eq!(d.indices().collect::<Vec<_>>(), vec![1, 2, 4]);
    assert_eq!(
        d.byte_ranges().collect::<Vec<_>>(),
        vec![(4096, 8192), (4 * 4096, 4096)]
    );
    // A table that stops short differs from the rest.
    assert_eq!(compare(&g, &a, &a[..3 * 32]), ChunkSet::span(&g, 3..));
}

#[test]
fn too_many_ranges_are_refused_bad_request() {
    let src = device(C as usize, 7);
    let ranges = vec![0; 2 * MAX_VERIFY_RANGES + 2];
    let (r, _) = Sim::new(&src, &src, info_of(&src), ranges).run(&[0, 1, 2, 3]);
    match r.unwrap() {
        VerifyOutcome::Refused(r) => assert_eq!(r.code, RefuseCode::BadRequest),
        other => panic!("{other:?}"),
    }
    let mut hello = wire::Hello {
        chunk_size: 1000,
        ..Default::default()
    };
    assert_eq!(
        VerifyServer::new(&hello).unwrap_err().code,
        RefuseCode::ChunkSize
    );
    hello.chunk_size = 4096;
    hello.ranges = vec![1, 2, 3];
    assert_eq!(
        VerifyServer::new(&hello).unwrap_err().code,
        RefuseCode::BadRequest
    );
}

#[test]
fn the_chunk_size_is_the_volumes_or_at_least_the_default() {
    assert_eq!(verify_chunk(Some(chunk(C)), chunk(1 << 20)), chunk(C));
    assert_eq!(verify_chunk(None, chunk(C)), ChunkSize::DEFAULT);
    assert_eq!(verify_chunk(None, chunk(1 << 20)), chunk(1 << 20));
}

#[test]
fn verify_extent_ends_a_short_chunk_only_where_the_receiver_knows_an_end() {
    let c = chunk(65536);
    let p = 200_000;
    assert_eq!(verify_extent(1 << 20, None, p + 1, c), 196_608);
    assert_eq!(verify_extent(1 << 20, None, p + 2, c), 196_608);
    assert_eq!(verify_extent(1 << 20, Some(p + 1), p + 1, c), p + 1);
    assert_eq!(verify_extent(p + 1, None, 1 << 20, c), p + 1);
    assert_eq!(verify_extent(p + 1, None, p + 1, c), p + 1);
}

/// The parts' shapes on the wire, as this receiver has always sent them.
fn parts_of(ranges: Vec<u64>, count: u64) -> Vec<(u64, usize, bool)> {
    let hello = wire::Hello {
        mode: Mode::Verify as i32,
        source_size: count * C,
        chunk_size: C as u32,
        ranges,
        ..Default::default()
    };
    let mut s = VerifyServer::new(&hello).unwrap();
    s.handle_target(TargetInfo {
        size: count * C,
        own_chunk: Some(chunk(C)),
        ..Default::default()
    })
    .unwrap();
    let zero = vec![0u8; ENTRY_LEN * 1000];
    while let Some(run) = s.poll_read() {
        let mut i = run.start;
        while i < run.end {
            let n = (run.end - i).min(1000);
            s.handle_hashes(i, &zero[..n as usize * ENTRY_LEN]).unwrap();
            i += n;
        }
    }
    std::iter::from_fn(|| s.poll_transmit())
        .filter_map(|m| match m {
            Msg::VerifyPart(p) => Some((p.first, p.hashes.len() / ENTRY_LEN, p.last)),
            _ => None,
        })
        .collect()
}

#[test]
fn parts_keep_their_shape() {
    let h = HASHES_PER_PART;
    let n = h as u64;
    // Full: a part per HASHES_PER_PART hashes, then the rest flagged (maybe none).
    assert_eq!(parts_of(vec![], n), vec![(0, h, false), (0, 0, true)]);
    assert_eq!(parts_of(vec![], n + 3), vec![(0, h, false), (n, 3, true)]);
    assert_eq!(parts_of(vec![], 0), vec![(0, 0, true)]);
    // Ranged: a part per run of at most HASHES_PER_PART, the last flagged.
    let r = vec![0, (n + 2) * C, (n + 10) * C, C];
    assert_eq!(
        parts_of(r, n + 20),
        vec![(0, h, false), (n, 2, false), (n + 10, 1, true)]
    );
    assert_eq!(parts_of(vec![(n + 30) * C, C], n + 20), vec![(0, 0, true)]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Any sizes, changes, ranges and interleaving, over a faithful link:
    /// exactly the oracle's chunks.
    #[test]
    fn a_clean_link_finds_exactly_what_differs(
        size in 0usize..24 * C as usize,
        extra in prop_oneof![Just(0usize), 0usize..3 * C as usize],
        flips in vec(any::<prop::sample::Index>(), 0..4),
        ranges in vec((0u64..30 * C, 0u64..4 * C), 0..4),
        recorded in any::<bool>(),
        schedule in vec(any::<u8>(), 1..16),
        feed in 1usize..40,
    ) {
        let src = device(size, 9);
        let mut t = device(size + extra, 9);
        t[..size].copy_from_slice(&src);
        for f in &flips {
            if size > 0 { t[f.index(size)] ^= 0x5a; }
        }
        let mut info = info_of(&t);
        info.recorded_size = recorded.then_some(size as u64);
        let flat: Vec<u64> = ranges.iter().flat_map(|&(o, l)| [o, l]).collect();
        let mut sim = Sim::new(&src, &t, info, flat.clone());
        sim.feed = feed;
        let (r, _) = sim.run(&schedule);
        prop_assert_eq!(r.unwrap(), oracle(&src, &t, info, &flat));
    }

    /// Lost and repeated frames end in a clean error or the right answer,
    /// never in a wrong one.
    #[test]
    fn a_faulty_link_never_gives_a_wrong_answer(
        size in 0usize..12 * C as usize,
        flip in any::<prop::sample::Index>(),
        ranges in vec((0u64..14 * C, 0u64..3 * C), 0..3),
        faults in vec(any::<u8>(), 0..64),
        schedule in vec(any::<u8>(), 1..16),
    ) {
        let src = device(size, 10);
        let mut t = src.clone();
        if size > 0 { t[flip.index(size)] ^= 1; }
        let info = info_of(&t);
        let flat: Vec<u64> = ranges.iter().flat_map(|&(o, l)| [o, l]).collect();
        let mut sim = Sim::new(&src, &t, info, flat.clone());
        sim.faults = faults.into_iter().collect();
        sim.feed = 3;
        let (r, _) = sim.run(&schedule);
        if let Ok(outcome) = r {
            prop_assert_eq!(outcome, oracle(&src, &t, info, &flat));
        }
    }
}
