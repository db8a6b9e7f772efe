//! Verify-only mode: compare source and target by fresh checksums.
//!
//! Trusts no manifest. Both sides read and hash their bytes fresh, in
//! parallel: locally in two reader pipelines, remotely with the receiver
//! hashing its target while we hash the source, so only hashes cross the
//! network. Differing chunks are coalesced into byte ranges. When a remote
//! verify finds differences it asks the receiver to forget the manifest
//! entries overlapping them, so the next `sync` resends exactly those chunks
//! (our own view is then rebuilt from the receiver's, since their summaries
//! no longer agree).
//!
//! The remote exchange (its order, the checks on what the receiver sends,
//! the comparison) is [`VerifyClient`]'s, in `nightpass_proto::session::verify`;
//! this module opens the session, moves the messages, hashes the source and
//! keeps the heartbeats.
//!
//! Sizes: both sides are compared over their common extent. A target block
//! device larger than the source is normal (devices come in fixed sizes) and
//! only the source's extent is judged; any other size difference is reported
//! and ends with exit status 2.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use nightpass_proto::chunk::{ChunkSize, Geometry};
use nightpass_proto::chunkset::ChunkSet;
use nightpass_proto::session::verify::{VerifyClient, VerifyOutcome, VerifyRequest};
use nightpass_proto::wire::control::Msg;
use serde_json::json;

use crate::app::cli::VerifyArgs;
use crate::error::{Error, Result};
use crate::io::device::{Kind, ReadMode, Volume};
use crate::io::hash::{self, ScanOptions};
use crate::net::transport::{self, Identity, RemoteVolume};
use crate::pass::sender::{open_session, target_dir, Session};
use crate::progress::{human_bytes, Progress};
use crate::store::state::ManifestFile;

/// Most ranges listed in `verify_end`.
pub const MAX_LISTED_RANGES: usize = 1000;

/// The outcome of a comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    /// Source size.
    pub source_size: u64,
    /// Target size.
    pub target_size: u64,
    /// Chunk size used.
    pub chunk_size: u64,
    /// Indices of differing chunks in the compared extent.
    pub mismatched: Vec<u64>,
    /// Differing byte ranges, coalesced.
    pub ranges: Vec<(u64, u64)>,
    /// True when the size difference itself is a defect (not a larger target device).
    pub size_defect: bool,
}

impl Comparison {
    /// Compares two tables of chunk hashes over the common extent
    /// `geometry`, noting whether the sizes differ in a way that matters
    /// (see [`size_defect`]).
    fn of(
        geometry: &Geometry,
        ours: &[u8],
        theirs: &[u8],
        source_size: u64,
        target_size: u64,
        target_is_block: bool,
    ) -> Comparison {
        let differing = compare(geometry, ours, theirs);
        Comparison::new(&differing, source_size, target_size, target_is_block)
    }

    /// The comparison that found `differing` (in the compared extent's geometry).
    fn new(
        differing: &ChunkSet,
        source_size: u64,
        target_size: u64,
        target_is_block: bool,
    ) -> Comparison {
        Comparison {
            source_size,
            target_size,
            chunk_size: differing.geometry().chunk_size().bytes(),
            mismatched: differing.indices().collect(),
            ranges: differing.byte_ranges().collect(),
            size_defect: size_defect(source_size, target_size, target_is_block),
        }
    }

    /// True when the target is a faithful copy.
    pub fn identical(&self) -> bool {
        self.mismatched.is_empty() && !self.size_defect
    }
}

pub use nightpass_proto::session::verify::{compare, table_entry};

fn chunk_for(args: &VerifyArgs, dest: &str, remote: Option<&RemoteVolume>) -> ChunkSize {
    if let Some(c) = args.chunk_size {
        return c;
    }
    let fp = args.endpoint.remote(dest).ok().map(|(_, fp)| fp);
    if let (Some(r), Some(fp)) = (remote, fp) {
        let p = target_dir(&args.endpoint.state_dir(), &fp, r).join("manifest");
        if let Ok(Some(Ok(m))) = ManifestFile::open(&p) {
            return m.geometry().chunk_size();
        }
    }
    ChunkSize::DEFAULT
}

/// Runs `nightpass verify SOURCE DEST`; returns 0 identical, 1 differences.
pub async fn run(
    args: &VerifyArgs,
    source: &Path,
    dest: &str,
    progress: Arc<dyn Progress>,
) -> Result<i32> {
    let started = Instant::now();
    let source = Arc::new(Volume::open_source_reader(
        source,
        args.read.scan().read_mode(),
    )?);
    let remote = RemoteVolume::parse(dest);
    let chunk = chunk_for(args, dest, remote.as_ref());
    let cmp = match &remote {
        Some(_) => {
            let (dest, fp) = args.endpoint.remote(dest)?;
            let id = Identity::load(&args.endpoint.identity_dir())?;
            verify_remote(source, &dest, &fp, &id, chunk, args, progress.clone()).await?
        }
        None => {
            let scan = args.read.scan();
            let mut target = Volume::open_for_verify(Path::new(dest))?;
            if scan.read_mode() == ReadMode::Mapped {
                target = target.map_reads();
            }
            let p = progress.clone();
            tokio::task::spawn_blocking(move || verify_local(source, target, chunk, scan, p))
                .await
                .map_err(|_| Error::Io("verify task failed".into()))??
        }
    };
    progress.finish();
    report(&cmp, started.elapsed().as_secs_f64(), progress.as_ref());
    if cmp.size_defect {
        return Err(Error::input(format!(
            "source and target sizes differ ({} vs {} bytes); the common extent was compared and reported above",
            cmp.source_size, cmp.target_size
        )));
    }
    Ok(if cmp.identical() { 0 } else { 1 })
}

fn report(cmp: &Comparison, duration_s: f64, progress: &dyn Progress) {
    let listed: Vec<[u64; 2]> = cmp
        .ranges
        .iter()
        .take(MAX_LISTED_RANGES)
        .map(|&(o, l)| [o, l])
        .collect();
    let event = json!({
        "event": "verify_end",
        "identical": cmp.identical(),
        "mismatched_chunks": cmp.mismatched.len(),
        "mismatched_ranges": listed,
        "mismatched_range_count": cmp.ranges.len(),
        "source_size": cmp.source_size,
        "target_size": cmp.target_size,
        "chunk_size": cmp.chunk_size,
        "duration_s": (duration_s * 1000.0).round() / 1000.0,
    });
    let mut human = if cmp.identical() {
        format!(
            "identical: {} compared in chunks of {} in {:.2} s",
            human_bytes(cmp.source_size.min(cmp.target_size)),
            human_bytes(cmp.chunk_size),
            duration_s
        )
    } else {
        let mut s = format!(
            "DIFFERENT: {} chunks differ in {} ranges",
            cmp.mismatched.len(),
            cmp.ranges.len()
        );
        for (o, l) in cmp.ranges.iter().take(20) {
            s.push_str(&format!("\n  offset {o} length {l}"));
        }
        if cmp.ranges.len() > 20 {
            s.push_str(&format!(
                "\n  … and {} more (use --json for up to {MAX_LISTED_RANGES})",
                cmp.ranges.len() - 20
            ));
        }
        s
    };
    if cmp.source_size != cmp.target_size {
        human.push_str(&format!(
            "\nsizes differ: source {} bytes, target {} bytes",
            cmp.source_size, cmp.target_size
        ));
    }
    progress.event(&event, &human);
}

fn size_defect(source: u64, target: u64, target_is_block: bool) -> bool {
    source != target && !(target_is_block && target > source)
}

/// Compares two local volumes, reading both in parallel.
pub fn verify_local(
    source: Arc<Volume>,
    target: Volume,
    chunk: ChunkSize,
    scan: ScanOptions,
    progress: Arc<dyn Progress>,
) -> Result<Comparison> {
    let extent = source.size().min(target.size());
    let geometry = Geometry::new(extent, chunk).map_err(|e| Error::input(e.to_string()))?;
    let (ssize, tsize, tblock) = (source.size(), target.size(), target.kind() == Kind::Block);
    progress.begin("verified", extent * 2);
    let target = Arc::new(target);
    let half = ScanOptions {
        workers: (hash::worker_count(scan.workers) / 2).max(1),
        ..scan
    };
    let (p2, h2) = (progress.clone(), half.clone());
    let t = std::thread::spawn(move || hash::hash_all(target, geometry, h2, p2));
    let a = hash::hash_all(source, geometry, half, progress)?;
    let b = t
        .join()
        .map_err(|_| Error::Io("target reader panicked".into()))??;
    Ok(Comparison::of(&geometry, &a, &b, ssize, tsize, tblock))
}

/// A verify session under way: the connection, and the exchange's state
/// ([`VerifyClient`], which decides everything but the I/O).
pub struct VerifySession {
    session: Session,
    client: VerifyClient,
}

/// Opens a verify session: the receiver starts reading and hashing its
/// target fresh, all of it or only the chunks overlapping `ranges`
/// (flattened offset/length pairs, at most [`nightpass_proto::wire::MAX_VERIFY_RANGES`]).
/// Returns the session and the geometry of the compared extent, in the
/// chunk size the receiver answered (the volume's own; `chunk` is a
/// request); collect the hashes with [`receive_hashes`].
pub async fn open_verify(
    id: &Identity,
    dest: &RemoteVolume,
    fp: &str,
    tuning: &crate::net::transport::Tuning,
    source_size: u64,
    chunk: ChunkSize,
    ranges: Vec<u64>,
) -> Result<(VerifySession, Geometry)> {
    let mut client = VerifyClient::new(VerifyRequest {
        volume: dest.name.clone(),
        source_size,
        chunk,
        ranges,
    });
    let Some(Msg::Hello(hello)) = client.poll_transmit() else {
        return Err(Error::Io("a verify starts with a hello".into()));
    };
    // The handshake (and a refusal's exit status) is every session's.
    let session = open_session(id, dest, fp, tuning, hello).await?;
    client.handle_message(Msg::Welcome(session.welcome.clone()))?;
    let geometry = *client
        .geometry()
        .ok_or_else(|| Error::Io("a welcomed verify has a geometry".into()))?;
    Ok((VerifySession { session, client }, geometry))
}

/// Feeds the receiver's messages to the exchange until its hashes are all in.
async fn receive(vs: &mut VerifySession) -> Result<()> {
    while !vs.client.hashes_received() {
        match transport::recv_control(&mut vs.session.recv).await? {
            Some(m) => vs.client.handle_message(m)?,
            None => vs.client.handle_closed()?,
        }
    }
    Ok(())
}

/// Receives the target's fresh hashes into a table over `geometry` (the
/// one [`open_verify`] returned; entries not requested stay zero).
pub async fn receive_hashes(vs: &mut VerifySession, geometry: &Geometry) -> Result<Vec<u8>> {
    if vs.client.geometry() != Some(geometry) {
        return Err(Error::Io(
            "hashes asked in another geometry than the verify's".into(),
        ));
    }
    receive(vs).await?;
    Ok(vs.client.take_table())
}

/// Asks the receiver to forget `ranges`, then ends the session.
pub async fn forget_and_close(mut vs: VerifySession, ranges: &[(u64, u64)]) -> Result<()> {
    vs.client.forget(ranges)?;
    let s = &mut vs.session;
    while let Some(m) = vs.client.poll_transmit() {
        transport::send_control(&mut s.send, m).await?;
    }
    while !vs.client.is_closed() {
        match transport::recv_control(&mut s.recv).await? {
            Some(m) => vs.client.handle_message(m)?,
            None => vs.client.handle_closed()?,
        }
    }
    let _ = s.send.finish();
    transport::close_session(&s.endpoint, &s.conn, b"verify complete").await;
    Ok(())
}

async fn verify_remote(
    source: Arc<Volume>,
    dest: &RemoteVolume,
    fp: &str,
    id: &Identity,
    chunk: ChunkSize,
    args: &VerifyArgs,
    progress: Arc<dyn Progress>,
) -> Result<Comparison> {
    let ssize = source.size();
    let tuning = args.endpoint.tuning()?;
    let (mut vs, geometry) = open_verify(id, dest, fp, &tuning, ssize, chunk, Vec::new()).await?;
    // Both sides read at once: the receiver its target, we the source.
    progress.begin("verified", geometry.size());
    let (scan, p) = (args.read.scan(), progress.clone());
    let ours = tokio::task::spawn_blocking(move || hash::hash_all(source, geometry, scan, p));
    receive(&mut vs).await?;
    // The source may take far longer to read than the target.
    let ours = transport::with_heartbeats(&mut vs.session.send, ours)
        .await?
        .map_err(|_| Error::Io("source reader failed".into()))??;
    vs.client.handle_source_hashes(&ours)?;
    let differing = match vs.client.poll_outcome() {
        Some(VerifyOutcome::Differing(d)) => d,
        _ => ChunkSet::empty(&geometry),
    };
    let welcome = &vs.session.welcome;
    let c = Comparison::new(
        &differing,
        ssize,
        welcome.target_size,
        welcome.target_is_block,
    );
    forget_and_close(vs, &c.ranges).await?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn larger_target_device_is_no_defect() {
        assert!(!size_defect(100, 200, true));
        assert!(size_defect(100, 200, false));
        assert!(size_defect(200, 100, true));
        assert!(!size_defect(100, 100, false));
    }
}
