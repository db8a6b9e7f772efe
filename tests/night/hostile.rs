//! An authenticated but hostile (or broken) peer: it holds an authorized
//! identity and speaks QUIC correctly, then sends frames no real sender
//! would. Each bad session must end with an error naming the problem, write
//! nothing, claim nothing, and leave the receiver serving other sessions.
//!
//! The peer is built from the library's own transport and wire modules, so
//! the frames are exactly what the receiver would decode from a sender.

use std::path::Path;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use nightpass::net::transport::{self, Identity, Tuning};
use nightpass_proto::wire::{self, control::Msg, Encoding, Mode};

use crate::harness::*;

const CHUNK: u64 = 64 << 10;

/// What the hostile peer does after its session is accepted.
#[derive(Clone, Copy, Debug)]
enum Attack {
    /// A valid chunk whose index lies past the end of the volume.
    PastTheEnd,
    /// A chunk that announces a length other than its chunk's.
    WrongLength,
    /// A payload whose hash is not the one announced.
    HashMismatch,
    /// A payload shorter than the chunk, with its own correct hash.
    ShortPayload,
    /// A zstd payload that is not zstd.
    BadZstd,
    /// A frame length prefix of 4 GiB.
    Oversized,
    /// A frame of random bytes.
    Garbage,
    /// A second Hello on the control stream after the Welcome.
    OutOfOrder,
    /// A message only a receiver sends (an Ack) from the sender's side.
    WrongDirection,
    /// A probe whose block hints are not one per 4 KiB block.
    ShortHints,
    /// A patch whose block bitmap does not fit the chunk.
    PatchBitmap,
    /// A patch naming two blocks that carries one.
    PatchShort,
    /// Half a chunk frame, the data stream reset, then Finish counting the
    /// chunk: the receiver cannot finish a pass with frames dropped.
    ResetThenFinish,
}

/// The 16-byte hint of each 4 KiB block of `chunk`, as a sender probes with.
fn hints_of(chunk: &[u8]) -> Vec<u8> {
    chunk
        .chunks(wire::BLOCK)
        .flat_map(wire::block_hint)
        .collect()
}

/// A chunk frame as a sender writes it on a data stream.
fn frame(index: u64, hash: &[u8], encoding: Encoding, blocks: Vec<u8>, payload: Bytes) -> Bytes {
    wire::encode_frame(&wire::Chunk {
        index,
        hash: hash.to_vec(),
        encoding: encoding as i32,
        len: CHUNK as u32,
        blocks,
        payload,
    })
}

fn patch_frame(index: u64, hash: &[u8], blocks: Vec<u8>, payload: Bytes) -> Bytes {
    frame(index, hash, Encoding::Patch, blocks, payload)
}

/// Chunk `index` sent whole, as `data` with its own hash.
fn raw_frame(index: u64, data: &[u8]) -> Bytes {
    let hash = blake3::hash(data);
    frame(
        index,
        hash.as_bytes(),
        Encoding::Raw,
        Vec::new(),
        Bytes::copy_from_slice(data),
    )
}

/// A frame of any length field (`len`), to send what a sender must not.
fn chunk_frame(index: u64, hash: &[u8], encoding: Encoding, len: u32, payload: Bytes) -> Bytes {
    wire::encode_frame(&wire::Chunk {
        index,
        hash: hash.to_vec(),
        encoding: encoding as i32,
        len,
        blocks: Vec::new(),
        payload,
    })
}

/// Opens a sync session on `volume` of `size` bytes: the peer, welcomed.
async fn open(id: &Identity, port: u16, fp: &str, volume: &str, size: u64) -> AuthorizedPeer {
    let mut peer = AuthorizedPeer::connect(id, port, fp, &Tuning::default()).await;
    let hello = wire::Hello {
        chunk_size_explicit: true,
        pass_id: Rng::new(size ^ 0x5a).bytes(16),
        ..hello_for(volume, Mode::Sync, size, CHUNK as u32)
    };
    peer.hello(hello).await.unwrap();
    peer.expect_welcome().await;
    peer
}

/// Runs one attack; returns the reason the receiver gave for closing.
async fn attack(id: &Identity, port: u16, fp: &str, size: u64, a: Attack) -> String {
    let AuthorizedPeer {
        ep,
        conn,
        mut send,
        recv: _recv,
    } = open(id, port, fp, "v", size).await;
    let payload = Bytes::from(Rng::new(7).bytes(CHUNK as usize));
    let hash = *blake3::hash(&payload).as_bytes();
    let data: Option<Bytes> = match a {
        Attack::PastTheEnd => Some(chunk_frame(
            size / CHUNK + 10,
            &hash,
            Encoding::Raw,
            CHUNK as u32,
            payload,
        )),
        Attack::WrongLength => Some(chunk_frame(1, &hash, Encoding::Raw, 4096, payload)),
        Attack::HashMismatch => {
            let other = *blake3::hash(b"something else").as_bytes();
            Some(chunk_frame(2, &other, Encoding::Raw, CHUNK as u32, payload))
        }
        Attack::ShortPayload => {
            let short = payload.slice(..1000);
            let h = *blake3::hash(&short).as_bytes();
            Some(chunk_frame(3, &h, Encoding::Raw, CHUNK as u32, short))
        }
        Attack::BadZstd => Some(chunk_frame(
            4,
            &hash,
            Encoding::Zstd,
            CHUNK as u32,
            payload.slice(..5000),
        )),
        Attack::Oversized => {
            let mut b = BytesMut::new();
            b.put_u32_le(u32::MAX);
            b.extend_from_slice(&[0u8; 1024]);
            Some(b.freeze())
        }
        Attack::Garbage => {
            let mut b = BytesMut::new();
            b.put_u32_le(300);
            b.extend_from_slice(&Rng::new(9).bytes(300));
            Some(b.freeze())
        }
        Attack::OutOfOrder => {
            let again = wire::Hello {
                version: wire::PROTOCOL_VERSION,
                volume: "v".into(),
                ..Default::default()
            };
            transport::send_control(&mut send, Msg::Hello(again))
                .await
                .unwrap();
            None
        }
        Attack::ShortHints => Some(chunk_frame(
            5,
            &hash,
            Encoding::Probe,
            CHUNK as u32,
            Bytes::from(hints_of(&payload)).slice(..100),
        )),
        Attack::PatchBitmap => Some(patch_frame(6, &hash, vec![1], payload.slice(..4096))),
        Attack::PatchShort => Some(patch_frame(7, &hash, vec![0b11, 0], payload.slice(..4096))),
        Attack::ResetThenFinish => {
            let frame = chunk_frame(8, &hash, Encoding::Raw, CHUNK as u32, payload);
            let mut s = conn.open_uni().await.unwrap();
            s.write_all(&frame[..frame.len() / 2]).await.unwrap();
            s.reset(quinn::VarInt::from_u32(1)).unwrap();
            // Let the reset arrive before the Finish.
            tokio::time::sleep(Duration::from_millis(200)).await;
            transport::send_control(&mut send, Msg::Finish(wire::Finish { chunks_sent: 1 }))
                .await
                .unwrap();
            None
        }
        Attack::WrongDirection => {
            transport::send_control(
                &mut send,
                Msg::Ack(wire::Ack {
                    indices: vec![0],
                    generation: 1,
                }),
            )
            .await
            .unwrap();
            None
        }
    };
    if let Some(frame) = data {
        let mut s = conn.open_uni().await.unwrap();
        // The receiver may close the connection before all of it is read.
        let _ = s.write_all(&frame).await;
        let _ = s.finish();
    }
    let err = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .unwrap_or_else(|_| panic!("{a:?}: the receiver did not end the session within 10 s"));
    ep.close(0u32.into(), b"");
    match err {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_ne!(
                c.error_code,
                quinn::VarInt::from_u32(0),
                "{a:?}: closed as if all went well"
            );
            String::from_utf8_lossy(&c.reason).into_owned()
        }
        other => panic!("{a:?}: the session ended without an explanation: {other}"),
    }
}

/// The receiver's log once it says `words`, or as it is after 5 s: its
/// stderr reaches the test through a reader thread, which may lag behind
/// the close the attacker already saw.
fn log_saying(rx: &Receiver, words: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = rx.log();
        if log.contains(words) || std::time::Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn setup(root: &Path) -> (SenderSide, Receiver, std::path::PathBuf, std::path::PathBuf) {
    let tv = root.join("target-v.img");
    let tw = root.join("target-w.img");
    random_file(&tv, 8 * MIB, 201);
    let (sender, rx) = pair(root, &[("v", &tv), ("w", &tw)]);
    (sender, rx, tv, tw)
}

#[test]
fn hostile_authenticated_peer_writes_nothing_and_others_carry_on() {
    let dir = scratch();
    let root = dir.path();
    let (sender, rx, tv, tw) = setup(root);
    let before = file_hash(&tv);
    let size = 8 * MIB;

    // An honest sync of another volume runs through all of it.
    let source_w = root.join("source-w.img");
    random_file(&source_w, 24 * MIB, 202);
    let mut honest = sender.command(
        "sync",
        &source_w,
        &rx.dest("w"),
        &rx.fp,
        &["--bwlimit", "8M"],
    );
    let honest = honest
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    let id = Identity::load(&sender.id.dir).unwrap();
    let cases = [
        (Attack::PastTheEnd, "past the end of the volume"),
        (Attack::WrongLength, "announces 4096 bytes"),
        (Attack::HashMismatch, "failed its hash check"),
        (Attack::ShortPayload, "payload is 1000 bytes"),
        (Attack::BadZstd, "does not decompress"),
        (Attack::Oversized, "exceeds the limit"),
        (Attack::Garbage, "bad chunk frame"),
        (Attack::OutOfOrder, "unexpected control message: hello"),
        (Attack::WrongDirection, "unexpected control message: ack"),
        (Attack::ShortHints, "carries 100 bytes of block hints"),
        (Attack::PatchBitmap, "block bitmap of 1 bytes"),
        (Attack::PatchShort, "shorter than the blocks it names"),
        (
            Attack::ResetThenFinish,
            "reset a data stream and then finished",
        ),
    ];
    let rt = runtime();
    for (a, expect) in cases {
        let reason = rt.block_on(attack(&id, rx.port, &rx.fp, size, a));
        assert!(
            reason.contains(expect),
            "{a:?}: the receiver's reason {reason:?} does not say {expect:?}"
        );
        assert_eq!(file_hash(&tv), before, "{a:?}: the target was written");
        assert_eq!(size_of(&tv), size, "{a:?}: the target changed size");
        let (claimed, bad) = manifest_claims_hold(&receiver_manifest(&rx.state, "v"), &tv);
        assert!(bad.is_empty(), "{a:?}: manifest claims {bad:?}");
        assert_eq!(claimed, 0, "{a:?}: the manifest claims chunks nobody sent");
        let log = log_saying(&rx, expect);
        assert!(
            log.contains(expect),
            "{a:?}: the receiver's log does not say {expect:?}:\n{log}"
        );
    }

    let out = honest.wait_with_output().unwrap();
    let r = parse_run(out.status.code().unwrap_or(-1), &out.stdout, &out.stderr);
    assert_eq!(r.code, 0, "honest sync beside the attacks: {}", r.stderr);
    assert_eq!(hash_prefix(&tw, 24 * MIB), file_hash(&source_w));

    // The attacked volume is free again at once, and a real pass works.
    let source_v = root.join("source-v.img");
    random_file(&source_v, size, 203);
    let r = sender.run("sync", &source_v, &rx.dest("v"), &rx.fp, &[]);
    assert_eq!(r.code, 0, "sync after the attacks: {}", r.stderr);
    assert_eq!(file_hash(&tv), file_hash(&source_v));
}

/// A peer that sends valid chunks as fast as it can but never reads the
/// receiver's acknowledgements must not grow the receiver's memory.
#[test]
fn peer_that_never_reads_acks_cannot_grow_receiver_memory() {
    let dir = scratch();
    let root = dir.path();
    let (sender, rx, _tv, tw) = setup(root);
    let size = 384 * MIB;
    let id = Identity::load(&sender.id.dir).unwrap();
    let rt = runtime();
    let sent = rt.block_on(async {
        let AuthorizedPeer {
            ep,
            conn,
            send: _send,
            recv: _recv,
        } = open(&id, rx.port, &rx.fp, "w", size).await;
        let payload = Bytes::from(Rng::new(11).bytes(CHUNK as usize));
        let hash = *blake3::hash(&payload).as_bytes();
        let mut streams = Vec::new();
        for _ in 0..4 {
            streams.push(conn.open_uni().await.unwrap());
        }
        let mut sent = 0u64;
        let t = std::time::Instant::now();
        for index in 0..size / CHUNK {
            let frame = chunk_frame(index, &hash, Encoding::Raw, CHUNK as u32, payload.clone());
            let s = &mut streams[(index % 4) as usize];
            match tokio::time::timeout(Duration::from_secs(20), s.write_all(&frame)).await {
                Ok(Ok(())) => sent += 1,
                _ => break,
            }
            if t.elapsed() > Duration::from_secs(60) {
                break;
            }
        }
        ep.close(0u32.into(), b"");
        sent
    });
    let status = std::fs::read_to_string(format!("/proc/{}/status", rx.child.id())).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc/PID/status");
    eprintln!(
        "never-reading peer: {sent} chunks ({} MiB) sent, receiver peak RSS {} MiB",
        sent * CHUNK / MIB,
        hwm_kib / 1024
    );
    assert!(
        sent * CHUNK >= 256 * MIB,
        "the receiver stopped taking data from a peer that does not read acks ({} MiB)",
        sent * CHUNK / MIB
    );
    assert!(
        hwm_kib < 200 * 1024,
        "receiver peak RSS {} MiB with a peer that never reads acks",
        hwm_kib / 1024
    );
    // What it recorded is on the target.
    std::thread::sleep(Duration::from_millis(500));
    let (_, bad) = manifest_claims_hold(&receiver_manifest(&rx.state, "w"), &tw);
    assert!(bad.is_empty(), "claims not held: {bad:?}");
}

/// The probe and patch exchange, driven by hand over real QUIC: the receiver
/// asks for exactly the blocks its target lacks, writes a patch only when the
/// patched chunk matches the chunk's hash, asks for the whole chunk when it
/// does not (writing nothing of it), and refuses a second probe of a chunk
/// it already patched in the session.
#[test]
fn probe_asks_for_changed_blocks_and_a_bad_patch_writes_nothing() {
    let dir = scratch();
    let root = dir.path();
    let (sender, rx, tv, _tw) = setup(root);
    let size = 8 * MIB;
    let before = std::fs::read(&tv).unwrap();
    let chunk = |i: usize| before[i * CHUNK as usize..(i + 1) * CHUNK as usize].to_vec();
    // Chunk 0 with blocks 3 and 9 rewritten.
    let mut new0 = chunk(0);
    let fresh = Rng::new(301).bytes(2 * wire::BLOCK);
    new0[3 * wire::BLOCK..4 * wire::BLOCK].copy_from_slice(&fresh[..wire::BLOCK]);
    new0[9 * wire::BLOCK..10 * wire::BLOCK].copy_from_slice(&fresh[wire::BLOCK..]);
    let hash0 = *blake3::hash(&new0).as_bytes();
    let id = Identity::load(&sender.id.dir).unwrap();
    let rt = runtime();
    let (new1, new2) = rt.block_on(async {
        let AuthorizedPeer {
            ep,
            conn,
            mut send,
            mut recv,
        } = open(&id, rx.port, &rx.fp, "v", size).await;
        let mut s = conn.open_uni().await.unwrap();
        let probe = chunk_frame(
            0,
            &hash0,
            Encoding::Probe,
            CHUNK as u32,
            Bytes::from(hints_of(&new0)),
        );
        s.write_all(&probe).await.unwrap();
        let need = expect_need(&mut recv, 0).await;
        assert_eq!(
            need.blocks,
            vec![1 << 3, 1 << (9 - 8)],
            "the receiver must ask for blocks 3 and 9 only"
        );
        let payload = [
            &new0[wire::block_range(3, CHUNK as usize)],
            &new0[wire::block_range(9, CHUNK as usize)],
        ]
        .concat();
        s.write_all(&patch_frame(0, &hash0, need.blocks, Bytes::from(payload)))
            .await
            .unwrap();
        expect_ack(&mut recv, 0).await;
        // A patch of chunk 1 whose result is not the announced hash.
        let wrong = *blake3::hash(b"not what the patch makes").as_bytes();
        s.write_all(&patch_frame(
            1,
            &wrong,
            vec![1, 0],
            Bytes::from(Rng::new(302).bytes(wire::BLOCK)),
        ))
        .await
        .unwrap();
        assert_eq!(
            expect_need(&mut recv, 1).await.blocks,
            vec![0xff, 0xff],
            "a failed patch asks for the whole chunk"
        );
        // The sender answers with the whole chunk 1, as a real one does.
        let new1 = Rng::new(303).bytes(CHUNK as usize);
        s.write_all(&raw_frame(1, &new1)).await.unwrap();
        expect_ack(&mut recv, 1).await;
        // Out of order, as only a faulty sender would: chunk 2 sent whole,
        // then patched over a copy of the target from before that write.
        // The patch is checked against what the target holds after the
        // whole chunk (the writer checks patches in order with the writes),
        // so it does not match and nothing of it is written; the target and
        // the manifest keep the whole chunk.
        let new2 = Rng::new(304).bytes(CHUNK as usize);
        let mut stale2 = chunk(2);
        stale2[..wire::BLOCK].copy_from_slice(&new2[..wire::BLOCK]);
        let stale_hash = *blake3::hash(&stale2).as_bytes();
        s.write_all(&raw_frame(2, &new2)).await.unwrap();
        s.write_all(&patch_frame(
            2,
            &stale_hash,
            vec![1, 0],
            Bytes::copy_from_slice(&new2[..wire::BLOCK]),
        ))
        .await
        .unwrap();
        let mut acked = Vec::new();
        let mut asked_whole = false;
        while acked.is_empty() || !asked_whole {
            match transport::recv_control(&mut recv).await.unwrap() {
                Some(Msg::Ack(a)) => acked.extend(a.indices),
                Some(Msg::Need(n)) => {
                    assert_eq!(n.index, 2);
                    assert_eq!(n.blocks, vec![0xff, 0xff]);
                    asked_whole = true;
                }
                other => {
                    panic!("expected the ack of chunk 2 and a refusal of its patch, got {other:?}")
                }
            }
        }
        assert_eq!(acked, vec![2], "only the whole chunk 2 is acknowledged");
        // Five chunk frames carried data (the probe does not count): the
        // refused patches count as arrived, so the pass ends cleanly.
        transport::send_control(&mut send, Msg::Finish(wire::Finish { chunks_sent: 5 }))
            .await
            .unwrap();
        let done =
            tokio::time::timeout(Duration::from_secs(20), transport::recv_control(&mut recv))
                .await
                .expect("the receiver ends the pass (it counts every chunk frame that arrived)");
        match done.unwrap() {
            Some(Msg::Done(_)) => {}
            other => panic!("expected done, got {other:?}"),
        }
        let _ = s.finish();
        drop(send);
        ep.close(0u32.into(), b"");
        (new1, new2)
    });
    let after = std::fs::read(&tv).unwrap();
    let c = CHUNK as usize;
    assert_eq!(after[..c], new0[..], "chunk 0 holds the patched data");
    assert_eq!(
        after[c..2 * c],
        new1[..],
        "chunk 1 holds the whole chunk sent after its failed patch"
    );
    assert_eq!(
        after[2 * c..3 * c],
        new2[..],
        "chunk 2 holds the whole chunk, not the stale patch"
    );
    assert_eq!(after[3 * c..], before[3 * c..], "nothing else was written");
    let (claimed, bad) = manifest_claims_hold(&receiver_manifest(&rx.state, "v"), &tv);
    assert!(bad.is_empty(), "manifest claims {bad:?}");
    assert_eq!(claimed, 3, "the manifest claims chunks 0, 1 and 2");
}

async fn expect_need(recv: &mut quinn::RecvStream, index: u64) -> wire::Need {
    match transport::recv_control(recv).await.unwrap() {
        Some(Msg::Need(n)) => {
            assert_eq!(
                n.index, index,
                "the receiver asks for blocks of chunk {index}"
            );
            n
        }
        other => panic!("expected the receiver to ask for blocks of chunk {index}, got {other:?}"),
    }
}

async fn expect_ack(recv: &mut quinn::RecvStream, index: u64) {
    match transport::recv_control(recv).await.unwrap() {
        Some(Msg::Ack(a)) => assert_eq!(a.indices, vec![index]),
        other => panic!("expected an ack of chunk {index}, got {other:?}"),
    }
}
