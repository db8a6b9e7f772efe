//! Control stream input: arbitrary bytes cut into length-prefixed frames,
//! each frame decoded as a control message. Neither step may panic, and no
//! frame may exceed the control frame limit.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use nightpass_proto::wire::{self, MAX_CONTROL_FRAME};

fuzz_target!(|data: &[u8]| {
    let buf = Bytes::copy_from_slice(data);
    let (frames, _err) = wire::split_frames(buf.clone(), MAX_CONTROL_FRAME);
    for frame in frames {
        assert!(frame.len() <= MAX_CONTROL_FRAME);
        if let Ok(msg) = wire::decode_control(frame) {
            // A decoded message re-encodes without panicking.
            let _ = wire::encode_frame(&wire::Control::new(msg));
        }
    }
    // The whole input as one frame body, too.
    let _ = wire::decode_control(buf);
});
