//! `sync --dry-run`: scans the source, compares every chunk with what the
//! receiver says its target holds (the table a pass would start from, read
//! in a [`Mode::DryRun`] session), and reports the chunks and bytes a pass
//! would send (`dry_run_end`).
//!
//! Writes and records nothing, on either side: no state directory is
//! created or probed, no journal, source record, manifest, pending or
//! tracked-pending file is written, and the receiver creates, opens for
//! writing and records nothing. A dry run reads the whole volume and never
//! takes a cut from the change tracker (that would consume the record the
//! next pass needs): so what it reports does not rest on the record, and the
//! next pass, tracked or not, sends exactly the chunks it counted when the
//! source is unchanged meanwhile.

use super::*;

/// What a dry run found.
#[derive(Debug, Clone)]
pub struct DryRunEnd {
    /// Destination as the operator named it.
    pub volume: String,
    /// Source size.
    pub size_bytes: u64,
    /// Chunk size a pass would use.
    pub chunk_size: u64,
    /// Chunks a pass would send.
    pub chunks: u64,
    /// Uncompressed bytes of those chunks.
    pub bytes: u64,
    /// Of those chunks, the ones all zeros (sent as markers, no payload).
    pub zero_chunks: u64,
    /// Bytes read and hashed.
    pub scanned_bytes: u64,
    /// Wall time.
    pub duration_s: f64,
}

/// What the target holds, as the dry run compares with it.
enum Known {
    /// Our own view, which is exactly the receiver's (its summary equals ours).
    Ours(Mutex<ManifestFile>),
    /// The receiver's table, fetched into memory (32 bytes per chunk).
    Fetched(Vec<u8>),
}

impl Known {
    fn entry(&self, index: u64) -> Hash {
        match self {
            Known::Ours(m) => m.lock().expect("not poisoned").entry(index),
            Known::Fetched(t) => manifest::entry(t, index),
        }
    }
}

/// Runs a dry run of `cfg`'s volume and reports it (`dry_run_end`).
pub async fn dry_run(
    cfg: &SyncConfig,
    id: &Identity,
    progress: Arc<dyn Progress>,
) -> Result<DryRunEnd> {
    let began = Instant::now();
    let source = cfg.read_from.clone().unwrap_or_else(|| cfg.source.clone());
    let size = Volume::open_source_reader(&source, cfg.scan.read_mode())?.size();
    if size == 0 {
        return Err(Error::input(format!(
            "source {} is empty (0 bytes): nothing to copy",
            source.display()
        )));
    }
    let dir = target_dir(&cfg.state_dir, &cfg.server_fingerprint, &cfg.dest);
    let journal = journal(cfg);
    let records = journal.read()?;
    check_source(cfg, &journal, &records)?;
    let ours = match ManifestFile::open(&dir.join("manifest")) {
        Ok(Some(Ok(m))) => Some(m),
        // Damaged, or held by a pass running now: ask the receiver.
        Ok(_) | Err(Error::InUse(_)) => None,
        Err(e) => return Err(e),
    };
    let (chunk, explicit) = chunk_size(cfg, ours.as_ref())?;
    let hello = wire::Hello {
        version: wire::PROTOCOL_VERSION,
        volume: cfg.dest.name.clone(),
        mode: Mode::DryRun as i32,
        source_size: size,
        chunk_size: chunk.bytes() as u32,
        chunk_size_explicit: explicit,
        known: ours.as_ref().map(|m| rx_summary(&m.header().summary())),
        ..Default::default()
    };
    let mut session =
        open_session(id, &cfg.dest, &cfg.server_fingerprint, &cfg.tuning, hello).await?;
    let known = known_table(&mut session, ours, size).await;
    end_dry_session(session).await;
    let (geometry, known) = known?;
    if let Some(cut) = journal::sealed_cutover(&records) {
        progress.note(&format!(
            "{} was cut over (consistency point {}): a pass into it is refused until 'nightpass unseal {}' on the receiver host",
            cfg.dest, cut.consistency_point, cfg.dest.name
        ));
    }
    let end = compare(cfg, &source, geometry, known, progress.clone()).await?;
    let end = DryRunEnd {
        duration_s: began.elapsed().as_secs_f64(),
        ..end
    };
    report(progress.as_ref(), &end);
    Ok(end)
}

/// A summary as the Hello carries it.
fn rx_summary(s: &Summary) -> wire::WireSummary {
    nightpass_proto::session::receiver::summary_to_wire(s)
}

/// The geometry the receiver chose and what its target holds: our own
/// view when it is exactly the receiver's, else its table, fetched.
async fn known_table(
    session: &mut Session,
    ours: Option<ManifestFile>,
    size: u64,
) -> Result<(Geometry, Known)> {
    let geometry = tx::agreed_geometry(&session.welcome, size, None)?;
    let theirs = parse_summary(session.welcome.summary.clone())?;
    let view = ours.as_ref().map(|m| (m.geometry(), m.header().summary()));
    if tx::trusts_own_view(view, &geometry, &theirs) {
        let m = ours.expect("trusted view exists");
        return Ok((geometry, Known::Ours(Mutex::new(m))));
    }
    drop(ours);
    transport::send_control(&mut session.send, TableFetch::request()).await?;
    let mut fetch = TableFetch::new(&geometry, &theirs);
    let mut table = vec![0u8; geometry.chunk_count() as usize * manifest::ENTRY_LEN];
    loop {
        let Some(msg) = transport::recv_control(&mut session.recv).await? else {
            return Err(Error::Network(
                "receiver closed the dry run before sending its table".into(),
            ));
        };
        let hashes = match &msg {
            Msg::ManifestPart(run) => run.hashes.clone(),
            _ => Bytes::new(),
        };
        let (first, done) = match fetch.handle(msg)? {
            Fetched::Part { first } => (first, false),
            Fetched::Complete { first } => (first, true),
        };
        // TableFetch checked that the part lies inside the table, in order.
        let at = first as usize * manifest::ENTRY_LEN;
        table[at..at + hashes.len()].copy_from_slice(&hashes);
        if done {
            return Ok((geometry, Known::Fetched(table)));
        }
    }
}

/// Ends the dry run's session: our side of the control stream first, then
/// (once the receiver ended its side, a few seconds at most) the connection.
async fn end_dry_session(mut s: Session) {
    let _ = s.send.finish();
    let _ =
        tokio::time::timeout(Duration::from_secs(5), transport::recv_control(&mut s.recv)).await;
    transport::close_session(&s.endpoint, &s.conn, b"dry run complete").await;
}

/// Reads every chunk of the source and counts those whose hash differs
/// from what the target holds.
async fn compare(
    cfg: &SyncConfig,
    source: &Path,
    geometry: Geometry,
    known: Known,
    progress: Arc<dyn Progress>,
) -> Result<DryRunEnd> {
    #[derive(Default)]
    struct Counts {
        chunks: AtomicU64,
        bytes: AtomicU64,
        zero: AtomicU64,
    }
    let vol = Arc::new(Volume::open_source_reader(source, cfg.scan.read_mode())?);
    let counts = Arc::new(Counts::default());
    let scanned = crate::metrics::SenderMeters::new(&cfg.dest.to_string()).scanned;
    let (c, known) = (counts.clone(), Arc::new(known));
    progress.begin("scanned", geometry.size());
    let mut scan = hash::scan(
        vol,
        ChunkSet::all(&geometry),
        cfg.scan.clone(),
        move |s| {
            scanned.increment(s.data.len() as u64);
            if known.entry(s.index) != s.hash {
                c.chunks.fetch_add(1, Ordering::Relaxed);
                c.bytes.fetch_add(s.data.len() as u64, Ordering::Relaxed);
                if s.zero {
                    c.zero.fetch_add(1, Ordering::Relaxed);
                }
            }
            None::<()>
        },
        progress.clone(),
    );
    let mut failed = None;
    while let Some(block) = scan.rx.recv().await {
        if let Err(e) = block {
            failed = Some(e);
            break;
        }
    }
    let stats = tokio::task::spawn_blocking(move || scan.finish())
        .await
        .map_err(|_| Error::Io("scan task failed".into()))?;
    progress.finish();
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(DryRunEnd {
        volume: cfg.dest.to_string(),
        size_bytes: geometry.size(),
        chunk_size: geometry.chunk_size().bytes(),
        chunks: counts.chunks.load(Ordering::Relaxed),
        bytes: counts.bytes.load(Ordering::Relaxed),
        zero_chunks: counts.zero.load(Ordering::Relaxed),
        scanned_bytes: stats?.bytes,
        duration_s: 0.0,
    })
}

/// The `dry_run_end` event and its sentence.
fn report(progress: &dyn Progress, e: &DryRunEnd) {
    progress.event(
        &json!({
            "event": "dry_run_end",
            "volume": e.volume,
            "size_bytes": e.size_bytes,
            "chunk_size": e.chunk_size,
            "chunks": e.chunks,
            "bytes": e.bytes,
            "zero_chunks": e.zero_chunks,
            "scanned_bytes": e.scanned_bytes,
            "duration_s": (e.duration_s * 1000.0).round() / 1000.0,
        }),
        &format!(
            "dry run of {}: a pass would send {} chunks ({}, {} of them zero) of {}; scanned {} in {:.2} s. Nothing was written or recorded",
            e.volume,
            e.chunks,
            crate::progress::human_bytes(e.bytes),
            e.zero_chunks,
            crate::progress::human_bytes(e.size_bytes),
            crate::progress::human_bytes(e.scanned_bytes),
            e.duration_s
        ),
    );
}
