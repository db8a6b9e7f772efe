//! `nightpass bench`: the speed of each stage of a pass on this machine, so
//! an operator sees which one will bound a migration before starting one.
//!
//! Stages: reading the volume (when one is given, read fresh past the page
//! cache), BLAKE3 on every core, zstd level 1 both ways on text-like and on
//! incompressible data, and a whole pass over loopback QUIC (reader, hashers,
//! encryption, the receiver's checks and writes) into a temporary file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rand::RngCore;
use serde_json::json;

use crate::app::demo::LocalPair;
use crate::error::{Error, IoContext, Result};
use crate::io::device::Volume;
use crate::io::hash::worker_count;
use crate::pass::sender;
use crate::progress::{human_bytes, PassEnd, Progress, Quiet};

const CHUNK: usize = 64 << 10;

fn rate(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs.max(1e-9)
}

/// Bytes per second of `f` run over `data` in 64 KiB chunks on `threads` threads, for at least ~0.5 s.
fn per_chunk(data: &Arc<Vec<u8>>, threads: usize, f: fn(&[u8]) -> usize) -> f64 {
    let start = Instant::now();
    let mut total = 0u64;
    while start.elapsed().as_secs_f64() < 0.5 {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let d = data.clone();
                std::thread::spawn(move || {
                    let mut sink = 0usize;
                    for c in d.chunks(CHUNK) {
                        sink = sink.wrapping_add(f(c));
                    }
                    std::hint::black_box(sink);
                    d.len() as u64
                })
            })
            .collect();
        for h in handles {
            total += h.join().unwrap_or(0);
        }
    }
    rate(total, start.elapsed().as_secs_f64())
}

fn text(len: usize) -> Vec<u8> {
    let words: &[&[u8]] = &[
        b"invoice ",
        b"customer ",
        b"index.php ",
        b"<div class=\"row\"> ",
        b"2026-11-21 ",
    ];
    words
        .iter()
        .cycle()
        .flat_map(|w| w.iter().copied())
        .take(len)
        .collect()
}

/// Reads `path` once, fresh, and returns bytes per second.
fn read_rate(path: &Path) -> Result<(u64, f64)> {
    let v = Volume::open_source(path)?;
    v.drop_cache(0, v.size());
    let size = v.size().min(4 << 30);
    let start = Instant::now();
    let mut off = 0;
    while off < size {
        let n = (size - off).min(4 << 20) as usize;
        std::hint::black_box(v.read_vec_at(n, off)?);
        off += n as u64;
    }
    Ok((size, rate(size, start.elapsed().as_secs_f64())))
}

/// One row of the table: stage, bytes per second, note.
type Row = (String, f64, String);

/// Runs the benchmark; `volume` is measured for reads when given.
pub async fn run(volume: Option<PathBuf>, size: u64, progress: Arc<dyn Progress>) -> Result<()> {
    let mut rows: Vec<Row> = Vec::new();
    if let Some(v) = &volume {
        rows.push(read_row(v).await?);
    } else {
        progress.note(
            "read: not measured; give --volume DEVICE (read only, fresh past the page cache) to see whether the disk bounds a pass",
        );
    }
    let mut random = vec![0u8; 32 << 20];
    rand::thread_rng().fill_bytes(&mut random);
    let random = Arc::new(random);
    let words = Arc::new(text(32 << 20));
    let r2 = random.clone();
    let stage_rows = tokio::task::spawn_blocking(move || cpu_rows(&r2, &words))
        .await
        .map_err(|_| Error::Io("stage task failed".into()))?;
    rows.extend(stage_rows);
    rows.push(loopback_row(size, &random).await?);
    let slowest = slowest(&rows);
    progress.event(
        &json!({
            "event": "bench",
            "stages": rows.iter().map(|(n, r, note)| json!({"stage": n, "bytes_per_s": r.round(), "note": note})).collect::<Vec<_>>(),
            "slowest": slowest,
        }),
        &table(&rows, &slowest),
    );
    Ok(())
}

/// The read row: `volume` read once, fresh.
async fn read_row(volume: &Path) -> Result<Row> {
    let path = volume.to_path_buf();
    let (bytes, r) = tokio::task::spawn_blocking(move || read_rate(&path))
        .await
        .map_err(|_| Error::Io("read task failed".into()))??;
    Ok((
        "read".into(),
        r,
        format!("{} of {}, fresh", human_bytes(bytes), volume.display()),
    ))
}

/// The CPU rows: BLAKE3 on every core, zstd level 1 on text and on random
/// data, and zstd decompression of text. Blocks for a few seconds.
fn cpu_rows(random: &Arc<Vec<u8>>, words: &Arc<Vec<u8>>) -> Vec<Row> {
    let threads = worker_count(0);
    let unzstd = unzstd_rate(words);
    let compressed = |c: &[u8]| zstd::bulk::compress(c, 1).map(|x| x.len()).unwrap_or(0);
    vec![
        (
            "BLAKE3".to_string(),
            per_chunk(random, threads, |c| blake3::hash(c).as_bytes()[0] as usize),
            format!("64 KiB chunks, {threads} threads"),
        ),
        (
            "zstd -1 compress, text".to_string(),
            per_chunk(words, 1, compressed),
            "one thread".to_string(),
        ),
        (
            "zstd -1 compress, random".to_string(),
            per_chunk(random, 1, compressed),
            "one thread; skipped after 8 misses".to_string(),
        ),
        (
            "zstd decompress, text".to_string(),
            unzstd,
            "one thread".to_string(),
        ),
    ]
}

/// Bytes per second of zstd decompressing `words`, packed in 64 KiB chunks
/// at level 1, on one thread for at least ~0.5 s.
fn unzstd_rate(words: &[u8]) -> f64 {
    let packed: Vec<Vec<u8>> = words
        .chunks(CHUNK)
        .map(|c| zstd::bulk::compress(c, 1).unwrap_or_default())
        .collect();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < 0.5 {
        for p in &packed {
            n += zstd::bulk::decompress(p, CHUNK)
                .map(|d| d.len())
                .unwrap_or(0) as u64;
        }
    }
    rate(n, start.elapsed().as_secs_f64())
}

/// The last row: a whole first pass of `size` incompressible bytes over
/// loopback QUIC, into a temporary file removed afterwards.
async fn loopback_row(size: u64, random: &[u8]) -> Result<Row> {
    let dir = std::env::temp_dir().join(format!("nightpass-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ctx(format!("create {}", dir.display()))?;
    let result = loopback_pass(&dir, size, random).await;
    let _ = std::fs::remove_dir_all(&dir);
    let end = result?;
    Ok((
        "pass over loopback QUIC".into(),
        rate(end.scanned_bytes, end.duration_s),
        format!(
            "{} incompressible, sender and receiver on this machine",
            human_bytes(size)
        ),
    ))
}

/// Writes a `size`-byte image of `random` repeated in `dir` and passes it
/// to a receiver on this machine.
async fn loopback_pass(dir: &Path, size: u64, random: &[u8]) -> Result<PassEnd> {
    let source = dir.join("source.img");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&source).ctx("create the bench image")?;
        let mut left = size;
        while left > 0 {
            let n = left.min(random.len() as u64) as usize;
            f.write_all(&random[..n]).ctx("write the bench image")?;
            left -= n as u64;
        }
    }
    let local = LocalPair::start(dir, &dir.join("target.img")).await?;
    let end = sender::run_pass(
        &local.pass(&source, "bench"),
        &local.sender_id,
        Arc::new(Quiet),
    )
    .await?;
    local.stop().await;
    Ok(end)
}

/// The stage that bounds a pass: the slowest, leaving out compressing
/// random data (skipped in a pass) and decompressing (the receiver's).
fn slowest(rows: &[Row]) -> String {
    rows.iter()
        .filter(|r| !r.0.contains("random") && !r.0.starts_with("zstd decompress"))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|r| r.0.clone())
        .unwrap_or_default()
}

/// The table for humans.
fn table(rows: &[Row], slowest: &str) -> String {
    let mut human = String::from("stage                        rate         note\n");
    for (name, r, note) in rows {
        human.push_str(&format!(
            "{name:<28} {:>9}/s  {note}\n",
            human_bytes(*r as u64)
        ));
    }
    human.push_str(&format!("slowest stage: {slowest}"));
    human
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, r: f64) -> Row {
        (name.to_string(), r, "n".to_string())
    }

    #[test]
    fn the_slowest_stage_leaves_out_what_a_pass_skips() {
        let rows = [
            row("read", 500.0),
            row("zstd -1 compress, random", 10.0),
            row("zstd decompress, text", 20.0),
            row("BLAKE3", 300.0),
        ];
        assert_eq!(slowest(&rows), "BLAKE3");
        assert_eq!(slowest(&[]), "");
        let t = table(&rows[..1], "read");
        assert!(t.starts_with("stage "), "{t}");
        assert!(t.ends_with("\nslowest stage: read"), "{t}");
        assert!(t.contains("read                         "), "{t}");
    }
}
