//! Wire messages and framing. This is the part that decodes peer input, so
//! it is the part fuzzing targets: no input may make it panic or allocate
//! past the frame limit.
//!
//! Messages are Protocol Buffers encoded by `prost` (derived here by hand, so
//! no code generator runs at build time); the schema is documented in
//! `PROTOCOL.md`. A frame is a 4-byte little-endian length followed by that
//! many bytes of one encoded message. Chunk payloads travel as
//! [`bytes::Bytes`]: decoding slices the frame buffer instead of copying, and
//! [`encode_chunk_frame`] puts a payload on the wire without copying it.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

/// Protocol version spoken by this build. A peer with another version is refused.
/// Version 5 added [`Mode::DryRun`].
pub const PROTOCOL_VERSION: u32 = 5;

/// ALPN token of the protocol inside TLS.
pub const ALPN: &[u8] = b"nightpass/1";

/// Largest control frame (hello, manifest parts, acks, verify hashes).
pub const MAX_CONTROL_FRAME: usize = 4 << 20;

/// Largest data frame: the largest chunk plus room for the header fields.
pub const MAX_DATA_FRAME: usize = (64 << 20) + 4096;

/// Hashes per manifest or verify part (512 KiB of hashes).
pub const HASHES_PER_PART: usize = 16384;

/// Most `(offset, length)` ranges one verify Hello may name; a sender with
/// more asks in several sessions.
pub const MAX_VERIFY_RANGES: usize = 4096;

/// What a session is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Mode {
    /// Not set: refused.
    Unspecified = 0,
    /// A replication pass.
    Sync = 1,
    /// A verify: the receiver reads its target fresh and streams hashes.
    Verify = 2,
    /// Records a cutover's consistency point in the receiver's journal.
    Record = 3,
    /// Asks whether a sync session of the volume would be accepted now
    /// (exported, authorized, not sealed, not busy, sizes and chunk size),
    /// without taking the volume or writing anything: a cutover asks this
    /// before it freezes the source.
    Preflight = 4,
    /// A dry run: the receiver answers what a sync session would start
    /// from (its Welcome, and its table on a [`ManifestRequest`]) and
    /// nothing else: it creates no target, opens none for writing, and
    /// records nothing; a sealed volume answers too. The sender then ends
    /// the session (version 5).
    DryRun = 5,
}

/// Why a receiver refused a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum RefuseCode {
    /// Unknown reason (a newer peer).
    Unspecified = 0,
    /// Incompatible protocol version.
    Version = 1,
    /// The volume name is not exported.
    UnknownVolume = 2,
    /// Another sender holds the volume, or the device is mounted or open elsewhere.
    InUse = 3,
    /// The target is smaller than the source.
    TooSmall = 4,
    /// The requested chunk size differs from the volume's.
    ChunkSize = 5,
    /// The request is malformed.
    BadRequest = 6,
    /// The receiver failed to open or read its target.
    Io = 7,
    /// The volume was cut over and is sealed until `nightpass unseal`.
    Sealed = 8,
    /// The sender's fingerprint is not authorized for this volume.
    NotAuthorized = 9,
}

/// How a chunk's payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Encoding {
    /// The payload is the chunk's bytes.
    Raw = 0,
    /// The payload is a zstd frame of the chunk's bytes.
    Zstd = 1,
    /// The chunk is all zeros; no payload.
    Zero = 2,
    /// No bytes yet: the payload is a [`BLOCK_HINT_LEN`]-byte hint
    /// ([`block_hint`]) of each [`BLOCK`]-sized block of the chunk, so the
    /// receiver can ask ([`Need`]) for only the blocks its target lacks.
    /// Written nothing; the chunk stays in flight until its patch arrives.
    Probe = 3,
    /// The payload is the blocks named by [`Chunk::blocks`], in order: the
    /// receiver overlays them on its target's copy of the chunk and writes
    /// the result only if it matches `hash`.
    Patch = 4,
}

/// Size of the blocks a [`Encoding::Probe`] describes and a
/// [`Encoding::Patch`] carries: the page and filesystem block size, so
/// scattered small writes cost one block each.
pub const BLOCK: usize = 4096;

/// Bytes of hint per block in a probe (see [`block_hint`]).
pub const BLOCK_HINT_LEN: usize = 16;

/// The hint of one block in a probe: XXH3-128 (seed 0) of its bytes, in
/// XXH3's canonical (big-endian) byte order.
/// Not a cryptographic hash, and it need not be one: a hint only chooses
/// which blocks travel, and the chunk's 256-bit BLAKE3 hash decides what is
/// written (a collision, chance or crafted, costs a resend of the whole
/// chunk, never a wrong byte). It runs about four times as fast as BLAKE3
/// on 4 KiB blocks, where BLAKE3 cannot fill its SIMD lanes.
pub fn block_hint(block: &[u8]) -> [u8; BLOCK_HINT_LEN] {
    xxhash_rust::xxh3::xxh3_128(block).to_be_bytes()
}

/// Blocks of a chunk of `len` bytes.
pub fn blocks_in(len: usize) -> usize {
    len.div_ceil(BLOCK)
}

/// True when bit `i` of a block bitmap (least significant bit first) is set.
pub fn bit(bitmap: &[u8], i: usize) -> bool {
    bitmap.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// The blocks a bitmap names among the `n` blocks of a chunk, in order.
pub fn named_blocks(bitmap: &[u8], n: usize) -> impl Iterator<Item = usize> + '_ {
    (0..n).filter(move |&i| bit(bitmap, i))
}

/// Byte range of block `i` in a chunk of `len` bytes (the last block may be
/// short).
pub fn block_range(i: usize, len: usize) -> std::ops::Range<usize> {
    (i * BLOCK).min(len)..((i + 1) * BLOCK).min(len)
}

/// A manifest summary as carried on the wire.
#[derive(Clone, PartialEq, Message)]
pub struct WireSummary {
    /// Target volume instance id (16 bytes) or empty when none is known.
    #[prost(bytes = "vec", tag = "1")]
    pub volume_id: Vec<u8>,
    /// Commit counter.
    #[prost(uint64, tag = "2")]
    pub generation: u64,
    /// Root hash (32 bytes) or empty.
    #[prost(bytes = "vec", tag = "3")]
    pub root: Vec<u8>,
}

/// Sender → receiver, first message on the control stream.
#[derive(Clone, PartialEq, Message)]
pub struct Hello {
    /// The sender's [`PROTOCOL_VERSION`].
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// Exported volume name.
    #[prost(string, tag = "2")]
    pub volume: String,
    /// Sync or verify.
    #[prost(enumeration = "Mode", tag = "3")]
    pub mode: i32,
    /// Size of the source in bytes.
    #[prost(uint64, tag = "4")]
    pub source_size: u64,
    /// Chunk size the sender proposes.
    #[prost(uint32, tag = "5")]
    pub chunk_size: u32,
    /// True when the operator chose the chunk size (a mismatch is then refused);
    /// false when the receiver's existing chunk size should be kept.
    #[prost(bool, tag = "6")]
    pub chunk_size_explicit: bool,
    /// What the sender believes the target holds.
    #[prost(message, optional, tag = "7")]
    pub known: Option<WireSummary>,
    /// Verify mode: flattened `(offset, length)` byte ranges to hash; empty = all.
    #[prost(uint64, repeated, tag = "8")]
    pub ranges: Vec<u64>,
    /// Random id of the pass (16 bytes), the same across its reconnections.
    #[prost(bytes = "vec", tag = "9")]
    pub pass_id: Vec<u8>,
    /// True when this session resumes pass `pass_id` after a lost link: the
    /// receiver may then end that pass's old session, which is presumed dead.
    #[prost(bool, tag = "10")]
    pub resumes: bool,
    /// The sender's number of this pass of the volume (1 = first), for the
    /// receiver's log; 0 when the session is not a pass or the sender does
    /// not say. Decides nothing.
    #[prost(uint64, tag = "11")]
    pub pass: u64,
}

/// Receiver → sender: the session is accepted.
#[derive(Clone, PartialEq, Message)]
pub struct Welcome {
    /// The receiver's [`PROTOCOL_VERSION`].
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// Size of the target in bytes.
    #[prost(uint64, tag = "2")]
    pub target_size: u64,
    /// Chunk size in force for this session.
    #[prost(uint32, tag = "3")]
    pub chunk_size: u32,
    /// The receiver's manifest summary.
    #[prost(message, optional, tag = "4")]
    pub summary: Option<WireSummary>,
    /// True when the target is a block device (which may be larger than the source).
    #[prost(bool, tag = "5")]
    pub target_is_block: bool,
    /// The consistency point of the volume's last cutover when the operator
    /// has since unsealed it on the receiver (`nightpass unseal`); empty
    /// otherwise. A sender that recorded that cutover passes again only
    /// when the receiver says so here.
    #[prost(string, tag = "6")]
    pub unsealed_cutover: String,
}

/// Receiver → sender: the session is refused; the connection closes after it.
#[derive(Clone, PartialEq, Message)]
pub struct Refusal {
    /// Machine-readable reason.
    #[prost(enumeration = "RefuseCode", tag = "1")]
    pub code: i32,
    /// Operator-readable explanation.
    #[prost(string, tag = "2")]
    pub message: String,
}

/// Sender → receiver: send me your manifest table.
#[derive(Clone, PartialEq, Message)]
pub struct ManifestRequest {}

/// A run of consecutive chunk hashes (manifest entries or fresh verify hashes).
#[derive(Clone, PartialEq, Message)]
pub struct HashRun {
    /// Index of the first chunk.
    #[prost(uint64, tag = "1")]
    pub first: u64,
    /// Concatenated 32-byte hashes.
    #[prost(bytes = "bytes", tag = "2")]
    pub hashes: Bytes,
    /// True on the last run of the series.
    #[prost(bool, tag = "3")]
    pub last: bool,
}

/// Receiver → sender: these chunks are durable and recorded.
#[derive(Clone, PartialEq, Message)]
pub struct Ack {
    /// Chunk indices, in any order.
    #[prost(uint64, repeated, tag = "1")]
    pub indices: Vec<u64>,
    /// The receiver's manifest generation after recording them.
    #[prost(uint64, tag = "2")]
    pub generation: u64,
}

/// Sender → receiver: every data stream is finished.
#[derive(Clone, PartialEq, Message)]
pub struct Finish {
    /// Number of chunk frames sent in this session.
    #[prost(uint64, tag = "1")]
    pub chunks_sent: u64,
}

/// Receiver → sender: everything is durable; the final summary.
#[derive(Clone, PartialEq, Message)]
pub struct Done {
    /// The receiver's manifest summary after the last commit.
    #[prost(message, optional, tag = "1")]
    pub summary: Option<WireSummary>,
}

/// Sender → receiver after a verify: these byte ranges differ; forget every
/// manifest entry that overlaps them.
#[derive(Clone, PartialEq, Message)]
pub struct Forget {
    /// Flattened `(offset, length)` pairs in bytes.
    #[prost(uint64, repeated, tag = "1")]
    pub ranges: Vec<u64>,
}

/// Sender → receiver in record mode: a cutover's consistency point.
#[derive(Clone, PartialEq, Message)]
pub struct Mark {
    /// Root hash (hex) of the final manifest.
    #[prost(string, tag = "1")]
    pub consistency_point: String,
    /// When the freeze began, seconds since the Unix epoch.
    #[prost(double, tag = "2")]
    pub freeze_unix_s: f64,
    /// Seconds the source stayed frozen.
    #[prost(double, tag = "3")]
    pub frozen_s: f64,
    /// A group cutover's consistency point (hex; empty for a cutover of
    /// one volume): the root over its volumes' points in name order.
    #[prost(string, tag = "4")]
    pub group_point: String,
    /// The group's volumes, in name order (empty for one volume).
    #[prost(string, repeated, tag = "5")]
    pub group_volumes: Vec<String>,
    /// A group's record: every volume's consistency point, all recorded
    /// and sealed by the receiver, or none (empty: the session's volume
    /// alone, with `consistency_point`).
    #[prost(message, repeated, tag = "6")]
    pub members: Vec<MarkMember>,
}

/// One volume of a group's [`Mark`].
#[derive(Clone, PartialEq, Message)]
pub struct MarkMember {
    /// The exported volume's name.
    #[prost(string, tag = "1")]
    pub volume: String,
    /// Root hash (hex) of its final manifest.
    #[prost(string, tag = "2")]
    pub consistency_point: String,
}

/// Receiver → sender: answers a [`Encoding::Probe`]: send these blocks of
/// chunk `index` as a [`Encoding::Patch`].
#[derive(Clone, PartialEq, Message)]
pub struct Need {
    /// Chunk index of the probe.
    #[prost(uint64, tag = "1")]
    pub index: u64,
    /// Bitmap of the blocks wanted, least significant bit first; every bit
    /// set asks for the whole chunk.
    #[prost(bytes = "vec", tag = "2")]
    pub blocks: Vec<u8>,
}

/// Receiver → sender: the session ends with an error.
#[derive(Clone, PartialEq, Message)]
pub struct Failure {
    /// Operator-readable explanation.
    #[prost(string, tag = "1")]
    pub message: String,
}

/// Either side, any time after the handshake: "still here". A sender
/// sends one every [`HEARTBEAT_INTERVAL_S`] seconds during a sync session (a
/// pass over a mostly unchanged volume may send no chunk for hours); a
/// receiver sends one to learn whether the peer holding a volume still
/// answers. The other side ignores it.
#[derive(Clone, PartialEq, Message)]
pub struct Heartbeat {}

/// Seconds between a sender's heartbeats in a sync session.
pub const HEARTBEAT_INTERVAL_S: u64 = 5;

/// Name of a control message, for errors.
pub fn msg_name(m: &control::Msg) -> &'static str {
    match m {
        control::Msg::Hello(_) => "hello",
        control::Msg::Welcome(_) => "welcome",
        control::Msg::Refusal(_) => "refusal",
        control::Msg::ManifestRequest(_) => "manifest request",
        control::Msg::ManifestPart(_) => "manifest part",
        control::Msg::Ack(_) => "ack",
        control::Msg::Finish(_) => "finish",
        control::Msg::Done(_) => "done",
        control::Msg::VerifyPart(_) => "verify part",
        control::Msg::Forget(_) => "forget",
        control::Msg::Failure(_) => "failure",
        control::Msg::Mark(_) => "mark",
        control::Msg::Need(_) => "need",
        control::Msg::Heartbeat(_) => "heartbeat",
    }
}

/// Every message of the control stream.
#[derive(Clone, PartialEq, Message)]
pub struct Control {
    /// The message.
    #[prost(
        oneof = "control::Msg",
        tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14"
    )]
    pub msg: Option<control::Msg>,
}

/// The variants of [`Control`].
pub mod control {
    /// One control message.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Msg {
        /// See [`super::Hello`].
        #[prost(message, tag = "1")]
        Hello(super::Hello),
        /// See [`super::Welcome`].
        #[prost(message, tag = "2")]
        Welcome(super::Welcome),
        /// See [`super::Refusal`].
        #[prost(message, tag = "3")]
        Refusal(super::Refusal),
        /// See [`super::ManifestRequest`].
        #[prost(message, tag = "4")]
        ManifestRequest(super::ManifestRequest),
        /// Manifest entries, receiver → sender.
        #[prost(message, tag = "5")]
        ManifestPart(super::HashRun),
        /// See [`super::Ack`].
        #[prost(message, tag = "6")]
        Ack(super::Ack),
        /// See [`super::Finish`].
        #[prost(message, tag = "7")]
        Finish(super::Finish),
        /// See [`super::Done`].
        #[prost(message, tag = "8")]
        Done(super::Done),
        /// Fresh hashes of the target, receiver → sender, in verify mode.
        #[prost(message, tag = "9")]
        VerifyPart(super::HashRun),
        /// See [`super::Forget`].
        #[prost(message, tag = "10")]
        Forget(super::Forget),
        /// See [`super::Failure`].
        #[prost(message, tag = "11")]
        Failure(super::Failure),
        /// See [`super::Mark`].
        #[prost(message, tag = "12")]
        Mark(super::Mark),
        /// See [`super::Need`].
        #[prost(message, tag = "13")]
        Need(super::Need),
        /// See [`super::Heartbeat`].
        #[prost(message, tag = "14")]
        Heartbeat(super::Heartbeat),
    }
}

impl Control {
    /// Wraps a message.
    pub fn new(msg: control::Msg) -> Self {
        Control { msg: Some(msg) }
    }
}

/// One chunk on a data stream.
#[derive(Clone, PartialEq, Message)]
pub struct Chunk {
    /// Chunk index.
    #[prost(uint64, tag = "1")]
    pub index: u64,
    /// BLAKE3 of the chunk's uncompressed bytes (32 bytes).
    #[prost(bytes = "vec", tag = "2")]
    pub hash: Vec<u8>,
    /// Payload encoding.
    #[prost(enumeration = "Encoding", tag = "3")]
    pub encoding: i32,
    /// Uncompressed length of the chunk.
    #[prost(uint32, tag = "4")]
    pub len: u32,
    /// [`Encoding::Patch`]: bitmap of the blocks in the payload, least
    /// significant bit first.
    #[prost(bytes = "vec", tag = "5")]
    pub blocks: Vec<u8>,
    /// Payload; always encoded last (see [`encode_chunk_frame`]).
    #[prost(bytes = "bytes", tag = "15")]
    pub payload: Bytes,
}

/// Errors decoding frames from a peer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// A frame announces more bytes than allowed.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// announced length
        len: usize,
        /// limit in force
        max: usize,
    },
    /// The bytes are not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A control frame without a message.
    #[error("empty control message")]
    Empty,
}

impl From<prost::DecodeError> for WireError {
    fn from(e: prost::DecodeError) -> Self {
        WireError::Malformed(e.to_string())
    }
}

/// Encodes a message as one frame: length prefix, then the message.
pub fn encode_frame<M: Message>(msg: &M) -> Bytes {
    let len = msg.encoded_len();
    let mut b = BytesMut::with_capacity(4 + len);
    b.put_u32_le(len as u32);
    msg.encode(&mut b).expect("BytesMut grows as needed");
    b.freeze()
}

/// Encodes a chunk frame as two buffers, the header and the payload, so the
/// payload goes on the wire without being copied. `chunk.payload` is ignored;
/// `payload` is appended as field 15, exactly as prost would encode it.
pub fn encode_chunk_frame(chunk: &Chunk, payload: Bytes) -> [Bytes; 2] {
    let head = Chunk {
        payload: Bytes::new(),
        ..chunk.clone()
    };
    let head_len = head.encoded_len();
    let key = (15u64 << 3) | 2;
    let tail_len = prost::encoding::encoded_len_varint(key)
        + prost::encoding::encoded_len_varint(payload.len() as u64);
    let total = head_len + tail_len + payload.len();
    let mut b = BytesMut::with_capacity(4 + head_len + tail_len);
    b.put_u32_le(total as u32);
    head.encode(&mut b).expect("BytesMut grows as needed");
    prost::encoding::encode_varint(key, &mut b);
    prost::encoding::encode_varint(payload.len() as u64, &mut b);
    [b.freeze(), payload]
}

/// Reads a frame's length prefix and checks it against `max`.
pub fn frame_len(prefix: [u8; 4], max: usize) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > max {
        return Err(WireError::FrameTooLarge { len, max });
    }
    Ok(len)
}

/// Decodes a control message from a frame body.
pub fn decode_control(body: Bytes) -> Result<control::Msg, WireError> {
    Control::decode(body)?.msg.ok_or(WireError::Empty)
}

/// Decodes a chunk from a frame body (zero-copy: the payload slices `body`).
pub fn decode_chunk(body: Bytes) -> Result<Chunk, WireError> {
    Ok(Chunk::decode(body)?)
}

/// Splits a buffer of length-prefixed frames, for tests and fuzzing: returns
/// the frame bodies that are complete and the error of the first bad prefix.
pub fn split_frames(mut buf: Bytes, max: usize) -> (Vec<Bytes>, Option<WireError>) {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let prefix = [buf[0], buf[1], buf[2], buf[3]];
        let len = match frame_len(prefix, max) {
            Ok(l) => l,
            Err(e) => return (out, Some(e)),
        };
        if buf.len() < 4 + len {
            break;
        }
        buf.advance(4);
        out.push(buf.split_to(len));
    }
    (out, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn control_round_trip() {
        let hello = Control::new(control::Msg::Hello(Hello {
            version: PROTOCOL_VERSION,
            volume: "filer01".into(),
            mode: Mode::Sync as i32,
            source_size: 1 << 30,
            chunk_size: 65536,
            chunk_size_explicit: true,
            known: Some(WireSummary {
                volume_id: vec![1; 16],
                generation: 4,
                root: vec![2; 32],
            }),
            ranges: vec![0, 4096],
            pass_id: vec![9; 16],
            resumes: false,
            pass: 3,
        }));
        let frame = encode_frame(&hello);
        let (frames, err) = split_frames(frame, MAX_CONTROL_FRAME);
        assert!(err.is_none());
        assert_eq!(frames.len(), 1);
        assert_eq!(
            decode_control(frames[0].clone()).unwrap(),
            hello.msg.unwrap()
        );
    }

    /// The hint is part of the protocol: pinned to the digests of the
    /// reference XXH3 implementation (Python's `xxhash` 3.x,
    /// `xxh3_128_hexdigest`), not to this crate's own output.
    #[test]
    fn block_hint_is_canonical_xxh3_128() {
        let hex =
            |h: [u8; BLOCK_HINT_LEN]| h.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(hex(block_hint(b"")), "99aa06d3014798d86001c324468d497f");
        let block: Vec<u8> = (0..BLOCK).map(|i| i as u8).collect();
        assert_eq!(hex(block_hint(&block)), "03916578969f7a66eb4b7c3707879151");
    }

    #[test]
    fn chunk_frame_matches_prost_encoding() {
        let payload = Bytes::from(vec![7u8; 100_000]);
        let c = Chunk {
            index: 42,
            hash: vec![5; 32],
            encoding: Encoding::Zstd as i32,
            len: 65536,
            blocks: vec![0b1010],
            payload: payload.clone(),
        };
        let [head, body] = encode_chunk_frame(&c, payload);
        let mut joined = head.to_vec();
        joined.extend_from_slice(&body);
        assert_eq!(joined, encode_frame(&c).to_vec());
        let (frames, _) = split_frames(Bytes::from(joined), MAX_DATA_FRAME);
        assert_eq!(decode_chunk(frames[0].clone()).unwrap(), c);
    }

    #[test]
    fn oversized_frame_refused() {
        let mut b = BytesMut::new();
        b.put_u32_le(MAX_CONTROL_FRAME as u32 + 1);
        let (_, err) = split_frames(b.freeze(), MAX_CONTROL_FRAME);
        assert!(matches!(err, Some(WireError::FrameTooLarge { .. })));
    }

    #[test]
    fn empty_control_refused() {
        assert_eq!(decode_control(Bytes::new()), Err(WireError::Empty));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let b = Bytes::from(bytes);
            let (frames, _) = split_frames(b.clone(), MAX_CONTROL_FRAME);
            for f in frames { let _ = decode_control(f.clone()); let _ = decode_chunk(f); }
            let _ = decode_control(b.clone());
            let _ = decode_chunk(b);
        }
    }
}
