//! Data stream input: arbitrary bytes decoded as a chunk frame body. Must not
//! panic; a decoded payload slices the input (zero-copy), so it can never be
//! longer than the input.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use nightpass_proto::wire::{self, MAX_DATA_FRAME};

fuzz_target!(|data: &[u8]| {
    let body = Bytes::copy_from_slice(data);
    if let Ok(chunk) = wire::decode_chunk(body) {
        assert!(chunk.payload.len() <= data.len());
        // Re-encoding through the zero-copy path must not panic either.
        let payload = chunk.payload.clone();
        let [head, _payload] = wire::encode_chunk_frame(&chunk, payload);
        assert!(head.len() >= 4);
    }
    // And through the framing used on data streams.
    let (frames, _err) = wire::split_frames(Bytes::copy_from_slice(data), MAX_DATA_FRAME);
    for frame in frames {
        let _ = wire::decode_chunk(frame);
    }
});
