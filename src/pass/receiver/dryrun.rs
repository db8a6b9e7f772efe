//! A dry run's session (`sync --dry-run`): the Welcome a sync session
//! would answer and, on a `ManifestRequest`, the table it would start
//! from (the manifest kept, the table a fresh read would rebuild, or a new
//! table of unknown or zero entries), so that the sender can count what a
//! pass would send.
//!
//! Writes and records nothing: no target is created or opened for
//! writing, no manifest, target record or journal is written, the volume's
//! state directory is not created. It holds the volume's busy slot (in
//! memory) while it answers, so that no writer changes the table it reads;
//! a sealed volume answers too, since nothing is written.

use super::*;

/// Where a dry run's table comes from.
enum DryTable {
    /// The volume's manifest, kept as a sync session would keep it.
    Manifest(ManifestFile),
    /// What a sync session would rebuild from a fresh read of the target.
    Rebuilt(Vec<u8>),
    /// A table a sync session would create: every entry unknown, or the
    /// zero chunk's hash for a target it would create.
    Fill(Fill),
}

/// What a sync session would start from.
struct DryView {
    welcome: wire::Welcome,
    geometry: Geometry,
    table: DryTable,
}

/// Answers a dry run of `hello.volume` (at `path`), holding the volume
/// (`guard`) until the answer is sent.
pub(super) async fn dry_run_session(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    hello: wire::Hello,
    guard: BusyGuard,
    path: PathBuf,
) -> Result<()> {
    let view = {
        let (shared, hello) = (shared.clone(), hello.clone());
        tokio::task::spawn_blocking(move || dry_view(&shared, &hello, &path))
            .await
            .map_err(|_| Error::Io("dry run task failed".into()))?
    };
    let view = match view {
        Ok(v) => v,
        Err(r) => return refuse_freeing(guard, &mut send, &conn, r).await,
    };
    transport::send_control(&mut send, Msg::Welcome(view.welcome.clone())).await?;
    // The sender asks for the table, or ends the session when its own view
    // is the receiver's.
    let mut table = Some((view.geometry, view.table));
    loop {
        let next = tokio::time::timeout(CONTROL_IDLE, transport::recv_control(&mut recv))
            .await
            .map_err(|_| {
                Error::Peer(format!(
                    "the dry run's sender said nothing for {} s; ending the session",
                    CONTROL_IDLE.as_secs()
                ))
            })??;
        match next {
            None => break,
            Some(Msg::Heartbeat(_)) => {}
            Some(Msg::ManifestRequest(_)) => match table.take() {
                Some((geometry, t)) => send_dry_table(&mut send, geometry, t).await?,
                None => return Err(Error::Peer("a dry run asked for the table twice".into())),
            },
            Some(m) => {
                return Err(Error::Peer(format!(
                    "a dry run's sender sent a {}",
                    wire::msg_name(&m)
                )))
            }
        }
    }
    drop(guard);
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    Ok(())
}

/// What a sync session of `hello` would start from, found by reading
/// only: the checks a sync makes before it creates or opens the target
/// (but the state directory's writability, which would create it), then
/// the manifest it would keep or create ([`manifest_start`]).
fn dry_view(
    shared: &Shared,
    hello: &wire::Hello,
    path: &Path,
) -> std::result::Result<DryView, Refuse> {
    let offer = rx::check_offer(hello)?;
    let name = &hello.volume;
    let dir = volume_dir(shared, name);
    let unsealed_cutover = crate::store::seal::last_unsealed(&shared.store, name)?;
    let (size, chunk, explicit) = (offer.size, offer.chunk, offer.explicit);
    check_target(&shared.cfg, &dir, path, size, chunk, explicit, false)?;
    let welcome = |target_size, geometry: Geometry, summary: &Summary, is_block| wire::Welcome {
        version: wire::PROTOCOL_VERSION,
        target_size,
        chunk_size: geometry.chunk_size().bytes() as u32,
        summary: Some(summary_to_wire(summary)),
        target_is_block: is_block,
        unsealed_cutover: unsealed_cutover.clone(),
    };
    if std::fs::symlink_metadata(path).is_err() {
        // A sync would create the target, sparse, and a manifest of zeros.
        let geometry = Geometry::new(size, chunk)
            .map_err(|e| Refuse(RefuseCode::BadRequest, e.to_string()))?;
        let summary = fill_summary(&geometry, Fill::Zeros);
        return Ok(DryView {
            welcome: welcome(size, geometry, &summary, false),
            geometry,
            table: DryTable::Fill(Fill::Zeros),
        });
    }
    let volume = open_existing(path, name, size)?;
    let is_block = volume.kind() == crate::io::device::Kind::Block;
    let record = state::TargetRecord {
        path: path.to_owned(),
        identity: volume.identity()?,
    };
    let (geometry, summary, table) =
        match manifest_start(&dir, name, &volume, &record, Created::Existing, &offer)? {
            Start::Keep(m) => {
                let geometry = m.geometry();
                let summary = kept_summary(&m);
                (geometry, summary, DryTable::Manifest(m))
            }
            Start::New { geometry, rebuild } if rebuild && volume.size() >= size => {
                let table = rebuild_table(&volume, geometry)?;
                let mut root = manifest::RootHasher::new(&geometry);
                root.update(&table);
                let summary = Summary {
                    volume_id: [0; 16],
                    generation: 2,
                    root: root.finalize(),
                };
                (geometry, summary, DryTable::Rebuilt(table))
            }
            Start::New { geometry, .. } => {
                let summary = fill_summary(&geometry, Fill::Unknown);
                (geometry, summary, DryTable::Fill(Fill::Unknown))
            }
        };
    Ok(DryView {
        welcome: welcome(volume.size(), geometry, &summary, is_block),
        geometry,
        table,
    })
}

/// The existing target, opened read-only, refused as a sync would refuse
/// it: held by another program, or smaller than the source.
fn open_existing(path: &Path, name: &str, size: u64) -> std::result::Result<Volume, Refuse> {
    let volume = Volume::open_export(path)?;
    if volume.kind() == crate::io::device::Kind::Block
        && crate::io::device::check_not_held(path).is_err()
    {
        return Err(Refuse(
            RefuseCode::InUse,
            format!(
                "target {} of volume '{name}' is in use (mounted, or held open exclusively by another program)",
                path.display()
            ),
        ));
    }
    if volume.size() < size {
        return Err(Refuse(
            RefuseCode::TooSmall,
            format!(
                "target of volume '{name}' ({} bytes) is smaller than the source ({size} bytes)",
                volume.size()
            ),
        ));
    }
    Ok(volume)
}

/// The summary a kept manifest would announce, without committing the
/// root of entries written past its last commit (a sync would commit it).
fn kept_summary(m: &ManifestFile) -> Summary {
    let mut s = m.header().summary();
    let root = m.current_root();
    if root != s.root {
        s.generation += 1;
        s.root = root;
    }
    s
}

/// The summary of a new table of `geometry` filled with `fill`.
fn fill_summary(geometry: &Geometry, fill: Fill) -> Summary {
    let mut root = manifest::RootHasher::new(geometry);
    let mut piece = Vec::new();
    let mut first = 0;
    while first < geometry.chunk_count() {
        state::fill_piece(
            geometry,
            fill,
            first,
            wire::HASHES_PER_PART as u64,
            &mut piece,
        );
        root.update(&piece);
        first += wire::HASHES_PER_PART as u64;
    }
    Summary {
        volume_id: [0; 16],
        generation: 1,
        root: root.finalize(),
    }
}

/// Sends `table` in parts, produced on a blocking thread a few at a time.
async fn send_dry_table(
    send: &mut quinn::SendStream,
    geometry: Geometry,
    table: DryTable,
) -> Result<()> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let producer = tokio::task::spawn_blocking(move || {
        let per = wire::HASHES_PER_PART;
        match &table {
            DryTable::Manifest(m) => {
                m.for_each_piece(per, |p| tx.blocking_send(Bytes::copy_from_slice(p)).is_ok())
            }
            DryTable::Rebuilt(t) => {
                for p in t.chunks(per * manifest::ENTRY_LEN) {
                    if tx.blocking_send(Bytes::copy_from_slice(p)).is_err() {
                        break;
                    }
                }
            }
            DryTable::Fill(fill) => {
                let mut first = 0;
                while first < geometry.chunk_count() {
                    let mut piece = Vec::new();
                    state::fill_piece(&geometry, *fill, first, per as u64, &mut piece);
                    if tx.blocking_send(Bytes::from(piece)).is_err() {
                        break;
                    }
                    first += per as u64;
                }
            }
        }
    });
    let mut parts = TableParts::new(&geometry);
    while let Some(piece) = rx.recv().await {
        transport::send_control(send, Msg::ManifestPart(parts.part(piece))).await?;
    }
    producer
        .await
        .map_err(|_| Error::Io("dry run table task failed".into()))
}
