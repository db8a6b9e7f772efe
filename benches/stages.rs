//! Per-stage throughput of a pass, each stage alone on one core:
//! hashing (BLAKE3), compression (zstd level 1, as the sender uses it),
//! the manifest root, chunk framing on the wire, and range coalescing.
//!
//! Run with `cargo bench --bench stages` (about a minute and a half on two
//! cores); compare a figure with the end-to-end ones from `scripts/bench.sh`.
//! Each group reports bytes per second of chunk data (or of manifest table
//! for the root), so figures read directly against a link or disk rate.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use nightpass_proto::chunk::{ChunkSize, Geometry};
use nightpass_proto::manifest::{self, ENTRY_LEN};
use nightpass_proto::plan;
use nightpass_proto::wire::{self, Chunk, Encoding};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// Deterministic incompressible bytes (xorshift64*), so runs compare.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Text-like bytes: log lines with varying numbers, compressing about 3.7x
/// at level 1, like the text and metadata found on a filer.
fn text_bytes(len: usize) -> Vec<u8> {
    let words = [
        "INFO",
        "WARN",
        "request",
        "served",
        "user",
        "filer01",
        "/srv/share/projects",
        "bytes",
        "in",
        "ms",
        "GET",
        "PUT",
        "ok",
        "retry",
        "session",
        "closed",
    ];
    let mut out = String::with_capacity(len + 128);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut line = 0u64;
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        line += 1;
        out.push_str(&format!(
            "2024-05-{:02}T{:02}:{:02}:{:02} ",
            line % 28 + 1,
            x % 24,
            x % 60,
            (x >> 8) % 60
        ));
        for k in 0..8 {
            out.push_str(words[((x >> (k * 4)) & 15) as usize]);
            out.push(' ');
        }
        out.push_str(&format!("{}\n", x % 100_000));
    }
    let mut v = out.into_bytes();
    v.truncate(len);
    v
}

fn configure(c: Criterion) -> Criterion {
    c.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

fn bench_hash(c: &mut Criterion) {
    let mut g = c.benchmark_group("blake3");
    for (name, len) in [("64KiB", 64 * KIB), ("1MiB", MIB)] {
        let data = random_bytes(len, 1);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(name, |b| b.iter(|| blake3::hash(black_box(&data))));
    }
    g.finish();
}

fn bench_zstd(c: &mut Criterion) {
    let mut g = c.benchmark_group("zstd1");
    let len = 64 * KIB;
    g.throughput(Throughput::Bytes(len as u64));
    for (name, data) in [("random", random_bytes(len, 2)), ("text", text_bytes(len))] {
        let packed = zstd::bulk::compress(&data, 1).expect("compress");
        g.bench_function(format!("compress_{name}_64KiB"), |b| {
            b.iter(|| zstd::bulk::compress(black_box(&data), 1).expect("compress"))
        });
        g.bench_function(format!("decompress_{name}_64KiB"), |b| {
            b.iter(|| zstd::bulk::decompress(black_box(&packed), len).expect("decompress"))
        });
        eprintln!(
            "zstd1 {name}: 65536 -> {} bytes (pays: {})",
            packed.len(),
            plan::CompressPolicy::pays(len, packed.len())
        );
    }
    g.finish();
}

fn bench_manifest_root(c: &mut Criterion) {
    let mut g = c.benchmark_group("manifest");
    let chunk = ChunkSize::DEFAULT;
    let entries = 32_768u64; // 2 GiB at 64 KiB
    let geometry = Geometry::new(entries * chunk.bytes(), chunk).expect("geometry");
    let table = random_bytes(entries as usize * ENTRY_LEN, 3);
    g.throughput(Throughput::Bytes(table.len() as u64));
    g.bench_function("root_32768_entries", |b| {
        b.iter(|| manifest::root(black_box(&geometry), black_box(&table)))
    });
    g.finish();
}

fn bench_wire(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire");
    let len = 64 * KIB;
    let payload = Bytes::from(random_bytes(len, 4));
    let chunk = Chunk {
        index: 123_456,
        hash: blake3::hash(&payload).as_bytes().to_vec(),
        encoding: Encoding::Raw as i32,
        len: len as u32,
        blocks: Vec::new(),
        payload: Bytes::new(),
    };
    g.throughput(Throughput::Bytes(len as u64));
    g.bench_function("encode_chunk_frame_64KiB", |b| {
        b.iter(|| wire::encode_chunk_frame(black_box(&chunk), payload.clone()))
    });
    // The receiver sees the frame as one contiguous buffer (head + payload).
    let [head, body] = wire::encode_chunk_frame(&chunk, payload.clone());
    let mut joined = head[4..].to_vec();
    joined.extend_from_slice(&body);
    let frame = Bytes::from(joined);
    g.bench_function("decode_chunk_64KiB", |b| {
        b.iter(|| wire::decode_chunk(black_box(frame.clone())).expect("decode"))
    });
    g.bench_function("encode_join_decode_64KiB", |b| {
        b.iter_batched(
            || payload.clone(),
            |p| {
                let [h, p] = wire::encode_chunk_frame(&chunk, p);
                let mut buf = Vec::with_capacity(h.len() + p.len());
                buf.extend_from_slice(&h[4..]);
                buf.extend_from_slice(&p);
                wire::decode_chunk(Bytes::from(buf)).expect("decode")
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn bench_coalesce(c: &mut Criterion) {
    let mut g = c.benchmark_group("plan");
    let chunk = ChunkSize::DEFAULT;
    let count = 1_000_000u64;
    let geometry = Geometry::new(count * chunk.bytes(), chunk).expect("geometry");
    // 100k sorted distinct indices out of 1M: runs of neighbours and gaps.
    let rnd = random_bytes(100_000, 5);
    let mut idx = Vec::with_capacity(100_000);
    let mut i = 0u64;
    for r in rnd {
        i += 1 + u64::from(r % 16);
        idx.push(i.min(count - 1));
    }
    idx.dedup();
    // Throughput in changed bytes planned per second (100k chunks of 64 KiB).
    g.throughput(Throughput::Bytes(idx.len() as u64 * chunk.bytes()));
    g.bench_function("coalesce_100k_indices", |b| {
        b.iter(|| plan::coalesce(black_box(&geometry), black_box(&idx)))
    });
    g.finish();
}

criterion_group! {
    name = stages;
    config = configure(Criterion::default());
    targets = bench_hash, bench_zstd, bench_manifest_root, bench_wire, bench_coalesce
}
criterion_main!(stages);
