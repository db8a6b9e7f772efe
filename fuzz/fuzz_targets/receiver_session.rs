//! The receiver's sync session fed arbitrary input: a Hello of a fuzzed
//! size, then records of `[kind][len: u16 le][bytes]`, each a control frame
//! (even kind) or a chunk frame (odd kind). Every chunk that passes the
//! check is committed through the writer's ledger against a memory target;
//! every probe is answered from it. Must never panic, and whatever is
//! written must be what the frame's hash names.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use nightpass_proto::chunk::ChunkSize;
use nightpass_proto::patch;
use nightpass_proto::session::receiver::{self as rx, Checked, Content};
use nightpass_proto::session::{ReceiverSession, WriterLedger};
use nightpass_proto::wire;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let size = u64::from(u32::from_le_bytes(data[..4].try_into().unwrap())) % (1 << 20);
    let hello = wire::Hello {
        version: wire::PROTOCOL_VERSION,
        source_size: size,
        chunk_size: ChunkSize::MIN as u32,
        ..Default::default()
    };
    let Ok(offer) = rx::check_offer(&hello) else {
        return;
    };
    let Ok(geometry) = rx::agreed_geometry(&offer, None) else {
        return;
    };
    let mut target = vec![0u8; size as usize];
    let mut session = ReceiverSession::new();
    let mut writer = WriterLedger::new();
    let mut rest = &data[4..];
    while rest.len() >= 3 {
        let kind = rest[0];
        let len = (u16::from_le_bytes([rest[1], rest[2]]) as usize).min(rest.len() - 3);
        let body = Bytes::copy_from_slice(&rest[3..3 + len]);
        rest = &rest[3 + len..];
        if kind % 2 == 0 {
            let Ok(msg) = wire::decode_control(body) else {
                return;
            };
            match session.handle_control(Some(msg)) {
                Ok(rx::ControlAction::Finalize { expected }) => writer.handle_finish(expected),
                Ok(_) => {}
                Err(_) => return,
            }
            if let Some(Err(_)) = writer.poll_end() {
                return;
            }
            continue;
        }
        let checked = rx::check_chunk(body, &geometry, |_, _| Err("no zstd".into()));
        match checked {
            Err(_) => return,
            Ok(Checked::Probe {
                index,
                range,
                hints,
            }) => {
                let old = &target[range.start as usize..range.end as usize];
                let _ = patch::answer_probe(index, &hints, old);
            }
            Ok(Checked::Write {
                index,
                hash,
                content,
            }) => {
                let r = geometry.range(index).expect("checked inside");
                let at = r.start as usize..r.end as usize;
                let written = match content {
                    Content::Whole(d) => {
                        assert_eq!(blake3::hash(&d).as_bytes(), &hash);
                        target[at].copy_from_slice(&d);
                        true
                    }
                    Content::Zero => {
                        target[at].fill(0);
                        true
                    }
                    Content::Patch { blocks, payload } => {
                        let mut chunk = target[at.clone()].to_vec();
                        match rx::check_patch(index, &hash, &mut chunk, &blocks, &payload) {
                            Ok(runs) => {
                                for run in runs {
                                    target[at.start + run.start..at.start + run.end]
                                        .copy_from_slice(&chunk[run]);
                                }
                                true
                            }
                            Err(_) => false,
                        }
                    }
                };
                let r = geometry.range(index).expect("checked inside");
                if written {
                    let now = blake3::hash(&target[r.start as usize..r.end as usize]);
                    assert_eq!(now.as_bytes(), &hash, "written bytes match the hash");
                }
                let (w, n) = if written {
                    (vec![index], vec![])
                } else {
                    (
                        vec![],
                        vec![patch::whole_chunk(index, (r.end - r.start) as usize)],
                    )
                };
                let _ = writer.handle_committed(w, n, 1);
            }
        }
    }
});
