//! Manifest headers read from disk: arbitrary bytes decoded as a header.
//!
//! Must not panic. A header that decodes re-encodes and decodes again to
//! itself. Raw random bytes almost never pass the magic and the BLAKE3
//! checksum, so a second, "repaired" copy of the input gets the right magic
//! and version (unless the first input byte says otherwise) and a correct
//! checksum, which lets the fuzzer reach the field checks behind them
//! (header length, chunk size, geometry).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nightpass_proto::manifest::{Header, FORMAT_VERSION, HEADER_LEN, MAGIC};

fn check(bytes: &[u8]) {
    if let Ok(h) = Header::decode(bytes) {
        let again = Header::decode(&h.encode()).expect("an encoded header decodes");
        assert_eq!(again, h);
        let _ = h.check_file_len(bytes.len() as u64);
        let _ = h.file_len();
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);

    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut b = vec![0u8; HEADER_LEN];
    let n = rest.len().min(HEADER_LEN);
    b[..n].copy_from_slice(&rest[..n]);
    if mode & 1 == 0 {
        b[0..8].copy_from_slice(&MAGIC);
    }
    if mode & 2 == 0 {
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    }
    if mode & 4 == 0 {
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    }
    if mode & 8 == 0 {
        let sum = blake3::hash(&b[..88]);
        b[88..120].copy_from_slice(sum.as_bytes());
    }
    // Shorter than a header when asked to: the truncation check.
    let len = if mode & 16 == 0 { HEADER_LEN } else { n };
    check(&b[..len]);
});
