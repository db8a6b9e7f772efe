//! Verify sessions: the target read fresh and hashed (all of it, or the
//! chunks a ranged request names, bounded), and forgetting the manifest
//! entries a verify found different. Never writes chunk data.

use super::*;

pub(super) async fn verify_session(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    hello: wire::Hello,
    path: PathBuf,
) -> Result<()> {
    let asked = match ChunkSize::new(u64::from(hello.chunk_size)) {
        Ok(c) => c,
        Err(e) => {
            return refuse(
                &mut send,
                &conn,
                Refuse(RefuseCode::ChunkSize, e.to_string()),
            )
            .await
        }
    };
    if !hello.ranges.len().is_multiple_of(2) || hello.ranges.len() > 2 * wire::MAX_VERIFY_RANGES {
        let r = Refuse(
            RefuseCode::BadRequest,
            format!(
                "a verify names at most {} byte ranges (offset, length pairs); {} numbers were sent",
                wire::MAX_VERIFY_RANGES,
                hello.ranges.len()
            ),
        );
        return refuse(&mut send, &conn, r).await;
    }
    let chunk = verify_chunk(&shared, &hello.volume, asked);
    if std::fs::symlink_metadata(&path).is_err() {
        // A target file not created yet (a first cutover's proof starts
        // before its pass creates it): an empty target.
        return verify_missing(shared, send, recv, hello, path, chunk).await;
    }
    let volume = match Volume::open_export(&path) {
        Ok(v) => Arc::new(v),
        Err(e) => return refuse(&mut send, &conn, e.into()).await,
    };
    // Both sides hash the common extent, so their chunks line up; but the
    // peer does not pick where a short last chunk ends.
    let recorded = state::peek_geometry(&volume_dir(&shared, &hello.volume).join("manifest"))
        .map(|g| g.size());
    let extent = verify_extent(volume.size(), recorded, hello.source_size, chunk);
    let geometry = Geometry::new(extent, chunk).map_err(|e| Error::input(e.to_string()))?;
    transport::send_control(
        &mut send,
        Msg::Welcome(wire::Welcome {
            version: wire::PROTOCOL_VERSION,
            target_size: volume.size(),
            chunk_size: chunk.bytes() as u32,
            summary: None,
            target_is_block: volume.kind() == crate::io::device::Kind::Block,
            unsealed_cutover: String::new(),
        }),
    )
    .await?;
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Msg>(16);
    let ctl_task = tokio::spawn(async move {
        while let Some(m) = ctl_rx.recv().await {
            transport::send_control(&mut send, m).await?;
        }
        let _ = send.finish();
        Ok::<_, Error>(send)
    });
    if !hello.ranges.is_empty() {
        let (v, ranges, tx) = (volume.clone(), hello.ranges.clone(), ctl_tx.clone());
        tokio::task::spawn_blocking(move || hash_ranges(&v, &geometry, &ranges, &tx))
            .await
            .map_err(|_| Error::Io("hash task failed".into()))??;
        return finish_verify(shared, recv, ctl_tx, ctl_task, &hello, &path).await;
    }
    // Stream fresh hashes of the target in order, run by run.
    let mut scan = hash::scan(
        volume,
        geometry,
        0,
        ScanOptions::default(),
        |s| Some((s.index, s.hash)),
        Arc::new(Quiet),
    );
    let mut pending: std::collections::BTreeMap<u64, Vec<(u64, Hash)>> = Default::default();
    let mut next_seq = 0u64;
    let mut run: Vec<u8> = Vec::new();
    let mut run_first = 0u64;
    while let Some(block) = scan.rx.recv().await {
        let block = block?;
        pending.insert(block.seq, block.items);
        while let Some(items) = pending.remove(&next_seq) {
            next_seq += 1;
            for (i, h) in items {
                if run.is_empty() {
                    run_first = i;
                }
                run.extend_from_slice(&h);
                if run.len() >= wire::HASHES_PER_PART * manifest::ENTRY_LEN {
                    let hashes = Bytes::from(std::mem::take(&mut run));
                    ctl_tx
                        .send(Msg::VerifyPart(wire::HashRun {
                            first: run_first,
                            hashes,
                            last: false,
                        }))
                        .await
                        .map_err(|_| Error::Network("control stream closed".into()))?;
                }
            }
        }
    }
    tokio::task::spawn_blocking(move || scan.finish())
        .await
        .map_err(|_| Error::Io("reader failed".into()))??;
    ctl_tx
        .send(Msg::VerifyPart(wire::HashRun {
            first: run_first,
            hashes: Bytes::from(run),
            last: true,
        }))
        .await
        .map_err(|_| Error::Network("control stream closed".into()))?;
    finish_verify(shared, recv, ctl_tx, ctl_task, &hello, &path).await
}

/// A verify of an export whose file does not exist yet: zero bytes to hash.
pub(super) async fn verify_missing(
    shared: Arc<Shared>,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    hello: wire::Hello,
    path: PathBuf,
    chunk: ChunkSize,
) -> Result<()> {
    for m in [
        Msg::Welcome(wire::Welcome {
            version: wire::PROTOCOL_VERSION,
            target_size: 0,
            chunk_size: chunk.bytes() as u32,
            ..Default::default()
        }),
        Msg::VerifyPart(wire::HashRun {
            last: true,
            ..Default::default()
        }),
    ] {
        transport::send_control(&mut send, m).await?;
    }
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Msg>(4);
    let ctl_task = tokio::spawn(async move {
        while let Some(m) = ctl_rx.recv().await {
            transport::send_control(&mut send, m).await?;
        }
        let _ = send.finish();
        Ok::<_, Error>(send)
    });
    finish_verify(shared, recv, ctl_tx, ctl_task, &hello, &path).await
}

/// The chunk size a verify of `volume` hashes in: the volume's own (its
/// manifest's) when it has one, else what the sender asked for but never
/// below the default (64 KiB). Fresh hashes of small blocks would let a
/// sender test guesses of their contents offline.
pub(super) fn verify_chunk(shared: &Shared, volume: &str, asked: ChunkSize) -> ChunkSize {
    let own =
        state::peek_geometry(&volume_dir(shared, volume).join("manifest")).map(|g| g.chunk_size());
    let chunk = own.unwrap_or(if asked.bytes() < ChunkSize::DEFAULT.bytes() {
        ChunkSize::DEFAULT
    } else {
        asked
    });
    if chunk != asked {
        tracing::info!("volume '{volume}': a verify asked for chunks of {asked}; hashing in the volume's chunks of {chunk}");
    }
    chunk
}

/// The extent a verify hashes: the common extent of the source (the size
/// the peer claims) and the target, but a short last chunk ends only where
/// this receiver itself knows an end: the target's own size, or the source
/// size the volume's manifest records. Anywhere else the extent is rounded
/// down to whole chunks, or a peer would choose the end of a chunk and learn
/// the target's bytes one at a time by guessing the hash offline.
pub(super) fn verify_extent(
    target_size: u64,
    recorded: Option<u64>,
    source_size: u64,
    chunk: ChunkSize,
) -> u64 {
    if source_size >= target_size {
        return target_size;
    }
    if recorded == Some(source_size) {
        return source_size;
    }
    source_size - source_size % chunk.bytes()
}

/// Hashes the chunks overlapping byte ranges fresh, in index order, and
/// sends them as parts of at most [`wire::HASHES_PER_PART`] consecutive
/// chunks, the last flagged: memory stays bounded whatever the ranges cover.
pub(super) fn hash_ranges(
    volume: &Volume,
    geometry: &Geometry,
    ranges: &[u64],
    tx: &mpsc::Sender<Msg>,
) -> Result<()> {
    let send = |run: wire::HashRun| {
        tx.blocking_send(Msg::VerifyPart(run))
            .map_err(|_| Error::Network("control stream closed".into()))
    };
    volume.drop_cache(0, volume.size());
    let mut pending: Option<wire::HashRun> = None;
    let mut buf = vec![0u8; geometry.chunk_size().usize()];
    let set = ChunkSet::from_flat_byte_ranges(geometry, ranges);
    for run in set.ranges_at_most(wire::HASHES_PER_PART as u64) {
        let mut hashes = Vec::with_capacity((run.end - run.start) as usize * manifest::ENTRY_LEN);
        for k in run.clone() {
            let r = geometry
                .range(k)
                .expect("a set's indices lie below the chunk count");
            let b = &mut buf[..(r.end - r.start) as usize];
            volume.read_exact_at(b, r.start)?;
            hashes.extend_from_slice(blake3::hash(b).as_bytes());
        }
        if let Some(p) = pending.take() {
            send(p)?;
        }
        pending = Some(wire::HashRun {
            first: run.start,
            hashes: Bytes::from(hashes),
            last: false,
        });
    }
    let mut end = pending.unwrap_or_default();
    end.last = true;
    send(end)
}

pub(super) type CtlTask = tokio::task::JoinHandle<Result<quinn::SendStream>>;

/// The end of a verify session: the sender may ask us to forget ranges
/// that differ. A sender still hashing its source sends heartbeats; one
/// silent for [`CONTROL_IDLE`] once our hashes are out is gone, and the
/// session ends (see [`next_control`]).
pub(super) async fn finish_verify(
    shared: Arc<Shared>,
    mut recv: quinn::RecvStream,
    ctl_tx: mpsc::Sender<Msg>,
    ctl_task: CtlTask,
    hello: &wire::Hello,
    path: &Path,
) -> Result<()> {
    loop {
        match next_control(&mut recv, &ctl_tx).await? {
            None => break,
            Some(Msg::Heartbeat(_)) => {}
            Some(Msg::Forget(f)) => {
                let dir = volume_dir(&shared, &hello.volume);
                // Wait for a sync session that is just ending to let go of the volume.
                let mut guard = None;
                for _ in 0..100 {
                    let holder = Holder {
                        pass_id: Vec::new(),
                        conn: None,
                    };
                    if let Ok(g) = take_volume(&shared, &hello.volume, holder) {
                        guard = Some(g);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let Some(_guard) = guard else {
                    return Err(Error::Io(format!(
                        "volume '{}' stayed in use; cannot forget ranges",
                        hello.volume
                    )));
                };
                let (d, p, r) = (dir.clone(), path.to_owned(), f.ranges.clone());
                let n = tokio::task::spawn_blocking(move || forget_ranges(&d, &p, &r))
                    .await
                    .map_err(|_| Error::Io("forget task failed".into()))??;
                if n > 0 {
                    tracing::warn!("volume '{}': verify found differences; {n} manifest entries marked unknown", hello.volume);
                }
                ctl_tx
                    .send(Msg::Done(wire::Done { summary: None }))
                    .await
                    .map_err(|_| Error::Network("control stream closed".into()))?;
            }
            Some(other) => {
                return Err(Error::Peer(format!(
                    "unexpected control message: {}",
                    msg_name(&other)
                )))
            }
        }
    }
    drop(ctl_tx);
    let _ = ctl_task.await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_extent_ends_a_short_chunk_only_where_the_receiver_knows_an_end() {
        let c = ChunkSize::new(65536).unwrap();
        let p = 200_000;
        assert_eq!(verify_extent(1 << 20, None, p + 1, c), 196_608);
        assert_eq!(verify_extent(1 << 20, None, p + 2, c), 196_608);
        assert_eq!(verify_extent(1 << 20, Some(p + 1), p + 1, c), p + 1);
        assert_eq!(verify_extent(p + 1, None, 1 << 20, c), p + 1);
        assert_eq!(verify_extent(p + 1, None, p + 1, c), p + 1);
    }
}
