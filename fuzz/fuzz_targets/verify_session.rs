//! The verify exchange fed arbitrary message sequences: the input's first
//! 17 bytes describe the receiver's target, the rest is cut into
//! length-prefixed control frames. Every decoded message goes to a
//! `VerifyClient` and, once one of them was a hello it accepted, to a
//! `VerifyServer`, whose driver reads and hashes (zeros) what it asks
//! between messages and applies its forgets. Nothing may panic, and neither
//! side allocates by what the peer claims.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use nightpass_proto::chunk::ChunkSize;
use nightpass_proto::session::verify::{TargetInfo, VerifyClient, VerifyRequest, VerifyServer};
use nightpass_proto::wire::{self, control::Msg, MAX_CONTROL_FRAME};

fuzz_target!(|data: &[u8]| {
    if data.len() < 17 {
        return;
    }
    let (head, rest) = data.split_at(17);
    let target = target_of(head);
    let (frames, _) = wire::split_frames(Bytes::copy_from_slice(rest), MAX_CONTROL_FRAME);
    let mut client = VerifyClient::new(VerifyRequest {
        volume: "v".into(),
        // Our own source: the client's table is bounded by it.
        source_size: target.size % (1 << 24),
        chunk: ChunkSize::DEFAULT,
        ranges: Vec::new(),
    });
    let mut server: Option<VerifyServer> = None;
    for frame in frames {
        let Ok(msg) = wire::decode_control(frame) else {
            continue;
        };
        to_client(&mut client, msg.clone());
        match (&mut server, msg) {
            (None, Msg::Hello(h)) => {
                if let Ok(mut s) = VerifyServer::new(&h) {
                    let _ = s.handle_target(target);
                    server = Some(s);
                }
            }
            (None, _) => {}
            (Some(s), m) => {
                let _ = s.handle_message(m);
                drive(s);
            }
        }
    }
    let _ = client.handle_closed();
    if let Some(s) = server.as_mut() {
        s.handle_closed();
        drive(s);
    }
});

fn target_of(head: &[u8]) -> TargetInfo {
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&head[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let flags = head[16];
    let own_chunk = match (flags >> 1) & 3 {
        0 => None,
        1 => ChunkSize::new(4096).ok(),
        2 => Some(ChunkSize::DEFAULT),
        _ => ChunkSize::new(ChunkSize::MAX).ok(),
    };
    TargetInfo {
        size: word(0),
        is_block: flags & 1 != 0,
        own_chunk,
        recorded_size: (flags & 8 != 0).then(|| word(8)),
    }
}

fn to_client(client: &mut VerifyClient, msg: Msg) {
    while client.poll_transmit().is_some() {}
    if client.handle_message(msg).is_err() {
        return;
    }
    if client.hashes_received() {
        let _ = client.poll_read();
        let _ = client.handle_source_hashes(&[]);
        let _ = client.poll_outcome();
        let _ = client.forget(&[(0, 1)]);
    }
}

/// The receiver's driver: hashes (zeros) up to 256 chunks of what it is
/// asked to read, applies forgets, sends.
fn drive(s: &mut VerifyServer) {
    if let Some(run) = s.poll_read() {
        let n = (run.end - run.start).min(256) as usize;
        let _ = s.handle_hashes(run.start, &vec![0u8; n * 32]);
    }
    while s.poll_forget().is_some() {
        let _ = s.handle_forgotten();
    }
    while s.poll_transmit().is_some() {}
}
