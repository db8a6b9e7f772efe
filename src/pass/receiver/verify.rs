//! Verify sessions: the target read fresh and hashed (all of it, or the
//! chunks a ranged request names, bounded), and forgetting the manifest
//! entries a verify found different. Never writes chunk data. Decides
//! nothing of the exchange: [`VerifyServer`] does (order, checks, refusal
//! codes, chunk size and extent, parts); this reads, hashes, moves bytes
//! and keeps the idle deadline.

use nightpass_proto::session::verify::{TargetInfo, VerifyServer};

use super::*;

/// A verify session: the exchange ([`VerifyServer`]) decides; this reads
/// and hashes what it names, moves its messages and applies its forgets.
pub(super) async fn verify_session(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    hello: wire::Hello,
    path: PathBuf,
) -> Result<()> {
    let mut server = match VerifyServer::new(&hello) {
        Ok(s) => s,
        Err(r) => return refuse(&mut send, &conn, Refuse(r.code, r.message)).await,
    };
    let own = state::peek_geometry(&volume_dir(&shared, &hello.volume).join("manifest"));
    // A target file not created yet (a first cutover's proof starts
    // before its pass creates it): an empty target.
    let volume = match std::fs::symlink_metadata(&path) {
        Err(_) => None,
        Ok(_) => match Volume::open_export(&path) {
            Ok(v) => Some(Arc::new(v)),
            Err(e) => return refuse(&mut send, &conn, e.into()).await,
        },
    };
    server.handle_target(TargetInfo {
        size: volume.as_ref().map_or(0, |v| v.size()),
        is_block: volume
            .as_ref()
            .is_some_and(|v| v.kind() == crate::io::device::Kind::Block),
        own_chunk: own.map(|g| g.chunk_size()),
        recorded_size: own.map(|g| g.size()),
    })?;
    let asked = server.asked_chunk();
    if let Some(chunk) = server
        .geometry()
        .map(|g| g.chunk_size())
        .filter(|&c| c != asked)
    {
        tracing::info!("volume '{}': a verify asked for chunks of {asked}; hashing in the volume's chunks of {chunk}", hello.volume);
    }
    let (ctl_tx, ctl_task) = control_writer(send, if volume.is_some() { 16 } else { 4 });
    drain(&mut server, &ctl_tx).await?;
    if let Some(volume) = volume {
        server = if hello.ranges.is_empty() {
            hash_whole(server, volume, &ctl_tx).await?
        } else {
            let tx = ctl_tx.clone();
            let log = SessionLog::current();
            tokio::task::spawn_blocking(move || hash_ranges(server, &volume, &tx, log))
                .await
                .map_err(|_| Error::Io("hash task failed".into()))??
        };
    }
    finish_verify(shared, recv, server, ctl_tx, ctl_task, &hello, &path).await
}

pub(super) type CtlTask = tokio::task::JoinHandle<Result<quinn::SendStream>>;

/// The task that writes the control stream, fed by a channel of `capacity`.
fn control_writer(mut send: quinn::SendStream, capacity: usize) -> (mpsc::Sender<Msg>, CtlTask) {
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Msg>(capacity);
    let ctl_task = tokio::spawn(async move {
        while let Some(m) = ctl_rx.recv().await {
            transport::send_control(&mut send, m).await?;
        }
        let _ = send.finish();
        Ok::<_, Error>(send)
    });
    (ctl_tx, ctl_task)
}

/// Sends what the exchange has to send.
async fn drain(server: &mut VerifyServer, tx: &mpsc::Sender<Msg>) -> Result<()> {
    while let Some(m) = server.poll_transmit() {
        tx.send(m)
            .await
            .map_err(|_| Error::Network("control stream closed".into()))?;
    }
    Ok(())
}

/// Hashes the whole extent fresh with the parallel scan, handing the
/// hashes to the exchange in index order as the blocks come in.
async fn hash_whole(
    mut server: VerifyServer,
    volume: Arc<Volume>,
    tx: &mpsc::Sender<Msg>,
) -> Result<VerifyServer> {
    let (Some(run), Some(&geometry)) = (server.poll_read(), server.geometry()) else {
        return Ok(server);
    };
    let mut scan = hash::scan(
        volume,
        ChunkSet::span(&geometry, run),
        ScanOptions::default(),
        |s| Some((s.index, s.hash)),
        Arc::new(Quiet),
    );
    let mut pending: std::collections::BTreeMap<u64, Vec<(u64, Hash)>> = Default::default();
    let mut next_seq = 0u64;
    let log = SessionLog::current();
    while let Some(block) = scan.rx.recv().await {
        let block = block?;
        if let Some(log) = &log {
            let bytes = block
                .items
                .iter()
                .filter_map(|(i, _)| geometry.range(*i))
                .map(|r| r.end - r.start)
                .sum();
            log.hashed(block.items.len() as u64, bytes);
        }
        pending.insert(block.seq, block.items);
        while let Some(items) = pending.remove(&next_seq) {
            next_seq += 1;
            for (i, h) in items {
                server.handle_hashes(i, &h)?;
            }
            drain(&mut server, tx).await?;
        }
    }
    tokio::task::spawn_blocking(move || scan.finish())
        .await
        .map_err(|_| Error::Io("reader failed".into()))??;
    drain(&mut server, tx).await?;
    Ok(server)
}

/// Hashes the runs of chunks the exchange names (at most
/// [`wire::HASHES_PER_PART`] each, the ranges a verify named) fresh, in
/// index order, and sends the parts it makes of them: memory stays bounded
/// whatever the ranges cover.
fn hash_ranges(
    mut server: VerifyServer,
    volume: &Volume,
    tx: &mpsc::Sender<Msg>,
    log: Option<Arc<SessionLog>>,
) -> Result<VerifyServer> {
    volume.drop_cache(0, volume.size());
    let geometry = *server
        .geometry()
        .ok_or_else(|| Error::Io("a verify reads once its target is known".into()))?;
    let mut buf = vec![0u8; geometry.chunk_size().usize()];
    while let Some(run) = server.poll_read() {
        let mut hashes = Vec::with_capacity((run.end - run.start) as usize * manifest::ENTRY_LEN);
        for k in run.clone() {
            let r = geometry
                .range(k)
                .ok_or_else(|| Error::Io(format!("chunk {k} lies outside the volume")))?;
            let b = &mut buf[..(r.end - r.start) as usize];
            volume.read_exact_at(b, r.start)?;
            hashes.extend_from_slice(blake3::hash(b).as_bytes());
            if let Some(log) = &log {
                log.hashed(1, r.end - r.start);
            }
        }
        server.handle_hashes(run.start, &hashes)?;
        while let Some(m) = server.poll_transmit() {
            tx.blocking_send(m)
                .map_err(|_| Error::Network("control stream closed".into()))?;
        }
    }
    Ok(server)
}

/// The end of a verify session: the sender may ask us to forget ranges
/// that differ. A sender still hashing its source sends heartbeats; one
/// silent for [`CONTROL_IDLE`] once our hashes are out is gone, and the
/// session ends (see [`next_control`]).
async fn finish_verify(
    shared: Arc<Shared>,
    mut recv: quinn::RecvStream,
    mut server: VerifyServer,
    ctl_tx: mpsc::Sender<Msg>,
    ctl_task: CtlTask,
    hello: &wire::Hello,
    path: &Path,
) -> Result<()> {
    while !server.is_closed() {
        match next_control(&mut recv, &ctl_tx).await? {
            None => server.handle_closed(),
            Some(m) => server.handle_message(m)?,
        }
        while let Some(ranges) = server.poll_forget() {
            forget_now(&shared, &hello.volume, path, ranges).await?;
            server.handle_forgotten()?;
        }
        drain(&mut server, &ctl_tx).await?;
    }
    drop(ctl_tx);
    let _ = ctl_task.await;
    Ok(())
}

/// Forgets `ranges` of `volume`'s manifest, holding the volume (waiting
/// for a sync session that is just ending to let go of it).
async fn forget_now(
    shared: &Arc<Shared>,
    volume: &str,
    path: &Path,
    ranges: Vec<u64>,
) -> Result<()> {
    let Some(_guard) = take_volume_waiting(shared, volume).await else {
        return Err(Error::Io(format!(
            "volume '{volume}' stayed in use; cannot forget ranges"
        )));
    };
    let (d, p) = (volume_dir(shared, volume), path.to_owned());
    let n = tokio::task::spawn_blocking(move || forget_ranges(&d, &p, &ranges))
        .await
        .map_err(|_| Error::Io("forget task failed".into()))??;
    if n > 0 {
        tracing::warn!(
            "volume '{volume}': verify found differences; {n} manifest entries marked unknown"
        );
    }
    Ok(())
}

/// Marks every manifest entry overlapping the byte ranges unknown; returns how many changed.
///
/// Only a manifest that describes this very target (its record's path
/// and identity) is touched, and a sealed volume's not at all (it holds
/// the cutover's consistency point; unsealing rebuilds it from the target).
pub fn forget_ranges(dir: &Path, target: &Path, ranges: &[u64]) -> Result<u64> {
    if !matches!(crate::store::seal::read(dir), Ok(None)) {
        return Ok(0);
    }
    let Some(record) = state::TargetRecord::read(dir) else {
        return Ok(0);
    };
    let identity = Volume::open_export(target)?.identity()?;
    if record.path != target || record.identity != identity {
        return Ok(0);
    }
    let mut m = match ManifestFile::open(&dir.join("manifest"))? {
        Some(Ok(m)) => m,
        _ => return Ok(0),
    };
    let n = forget_in(&mut m, ranges);
    if n > 0 {
        let root = m.current_root();
        let g = m.header().generation + 1;
        m.commit(g, root)?;
    }
    Ok(n)
}

/// Marks entries of `m` overlapping `(offset, length)` pairs unknown, in memory.
pub fn forget_in(m: &mut ManifestFile, ranges: &[u64]) -> u64 {
    let set = ChunkSet::from_flat_byte_ranges(&m.geometry(), ranges);
    let mut n = 0;
    for i in set.indices() {
        if m.entry(i) != UNKNOWN {
            m.set(i, &UNKNOWN);
            n += 1;
        }
    }
    n
}
