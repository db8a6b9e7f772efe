//! Hostile input to either side of a verify: arbitrary hellos, targets,
//! message sequences and driver calls end in errors, never in a panic.

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;
use crate::wire::{self, HashRun, Mode};

const C: u64 = 4096;

fn chunk(bytes: u64) -> ChunkSize {
    ChunkSize::new(bytes).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Arbitrary hellos, targets, messages and driver calls never make the
    /// server panic.
    #[test]
    fn hostile_input_never_panics_the_server(
        hello in arb_hello(),
        target in arb_target(),
        steps in vec(arb_server_step(), 0..40),
    ) {
        let Ok(mut s) = VerifyServer::new(&hello) else { return Ok(()) };
        let _ = s.handle_target(target);
        for step in steps {
            server_step(&mut s, step);
        }
    }

    /// Arbitrary answers never make the client panic.
    #[test]
    fn hostile_input_never_panics_the_client(
        source_size in 0u64..(1 << 24),
        ranges in vec(any::<u64>(), 0..6),
        msgs in vec(arb_msg(), 0..40),
    ) {
        let mut c = VerifyClient::new(VerifyRequest {
            volume: "v".into(),
            source_size,
            chunk: chunk(C),
            ranges,
        });
        for m in msgs {
            let _ = c.poll_transmit();
            if c.handle_message(m).is_err() { break; }
            if c.hashes_received() {
                let _ = c.poll_read();
                let _ = c.handle_source_hashes(&[0; 64]);
                let _ = c.forget(&[(0, 1)]);
            }
        }
        let _ = c.handle_closed();
    }
}

/// A step of a hostile exchange with the server.
#[derive(Debug, Clone)]
enum ServerStep {
    Message(Msg),
    Read,
    Hashes(u64, usize),
    Forgotten,
    Closed,
}

fn server_step(s: &mut VerifyServer, step: ServerStep) {
    match step {
        ServerStep::Message(m) => {
            let _ = s.handle_message(m);
        }
        ServerStep::Read => {
            let _ = s.poll_read();
        }
        ServerStep::Hashes(first, n) => {
            let _ = s.handle_hashes(first, &vec![7u8; n]);
        }
        ServerStep::Forgotten => {
            let _ = s.poll_forget();
            let _ = s.handle_forgotten();
        }
        ServerStep::Closed => s.handle_closed(),
    }
    while s.poll_transmit().is_some() {}
}

fn small_or_any() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..64, 0u64..(1 << 22), any::<u64>()]
}

fn arb_hello() -> impl Strategy<Value = wire::Hello> {
    (
        small_or_any(),
        prop_oneof![Just(4096u32), Just(65536), any::<u32>()],
        vec(small_or_any(), 0..8),
    )
        .prop_map(|(source_size, chunk_size, ranges)| wire::Hello {
            version: wire::PROTOCOL_VERSION,
            mode: Mode::Verify as i32,
            source_size,
            chunk_size,
            ranges,
            ..Default::default()
        })
}

fn arb_target() -> impl Strategy<Value = TargetInfo> {
    (
        small_or_any(),
        any::<bool>(),
        prop_oneof![Just(None), Just(Some(chunk(C))), Just(Some(chunk(1 << 26)))],
        prop::option::of(small_or_any()),
    )
        .prop_map(|(size, is_block, own_chunk, recorded_size)| TargetInfo {
            size,
            is_block,
            own_chunk,
            recorded_size,
        })
}

fn arb_server_step() -> impl Strategy<Value = ServerStep> {
    prop_oneof![
        arb_msg().prop_map(ServerStep::Message),
        Just(ServerStep::Read),
        (small_or_any(), 0usize..200).prop_map(|(f, n)| ServerStep::Hashes(f, n)),
        Just(ServerStep::Forgotten),
        Just(ServerStep::Closed),
    ]
}

/// Any control message, its numbers small or not.
fn arb_msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        Just(Msg::Heartbeat(wire::Heartbeat {})),
        (small_or_any(), vec(any::<u8>(), 0..200), any::<bool>()).prop_map(|(first, h, last)| {
            Msg::VerifyPart(HashRun {
                first,
                hashes: h.into(),
                last,
            })
        }),
        vec(small_or_any(), 0..6).prop_map(|ranges| Msg::Forget(wire::Forget { ranges })),
        Just(Msg::Done(wire::Done { summary: None })),
        (
            0u32..6,
            small_or_any(),
            prop_oneof![Just(4096u32), any::<u32>()]
        )
            .prop_map(
                |(version, target_size, chunk_size)| Msg::Welcome(wire::Welcome {
                    version,
                    target_size,
                    chunk_size,
                    ..Default::default()
                })
            ),
        any::<i32>().prop_map(|code| Msg::Refusal(wire::Refusal {
            code,
            message: "no".into()
        })),
        arb_hello().prop_map(Msg::Hello),
        Just(Msg::ManifestRequest(wire::ManifestRequest {})),
    ]
}
