//! The durable writer of a sync session: batches of verified chunks written,
//! made durable, then recorded in the manifest and acknowledged (see the
//! ordering in the parent module docs). The only code that writes a target.

use super::*;

/// Bytes of verified chunks a writer batches before one durable commit.
pub(super) const BATCH_BYTES: usize = 32 << 20;
/// Chunks per batch at most.
pub(super) const BATCH_CHUNKS: usize = 2048;
/// How long a writer lingers for more chunks before committing a small batch.
pub(super) const LINGER: Duration = Duration::from_millis(5);

/// What to write of a verified chunk.
pub(super) enum Content {
    /// The whole chunk.
    Whole(Bytes),
    /// The whole chunk is zeros.
    Zero,
    /// These blocks (named by the bitmap, in order in the payload) over the
    /// target's current copy; the writer checks the result against the
    /// chunk's hash before it writes them.
    Patch {
        /// Which blocks, one bit each.
        blocks: Vec<u8>,
        /// The blocks' bytes.
        payload: Bytes,
    },
}

impl Content {
    /// Bytes of data held.
    pub(super) fn len(&self) -> usize {
        match self {
            Content::Whole(b) => b.len(),
            Content::Zero => 0,
            Content::Patch { payload, .. } => payload.len(),
        }
    }
}

/// One verified chunk on its way to the writer, or the end-of-pass request.
pub(super) enum WriterMsg {
    Chunk {
        index: u64,
        hash: Hash,
        data: Content,
    },
    Finalize {
        expected: u64,
        reply: oneshot::Sender<Result<Summary>>,
    },
}

pub(super) fn writer_loop(
    volume: &Volume,
    manifest: &mut ManifestFile,
    rx: std::sync::mpsc::Receiver<WriterMsg>,
    table_rx: std::sync::mpsc::Receiver<mpsc::Sender<Bytes>>,
    ctl: &mpsc::Sender<Msg>,
) -> Result<()> {
    let geometry = manifest.geometry();
    let mut committed = 0u64;
    let mut finalize: Option<(u64, oneshot::Sender<Result<Summary>>)> = None;
    let mut batch: Vec<(u64, Hash, Content)> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut closed = false;
    loop {
        while let Ok(reply) = table_rx.try_recv() {
            manifest.for_each_piece(wire::HASHES_PER_PART, |piece| {
                reply.blocking_send(Bytes::copy_from_slice(piece)).is_ok()
            });
        }
        let timeout = if batch.is_empty() {
            Duration::from_millis(50)
        } else {
            LINGER
        };
        match rx.recv_timeout(timeout) {
            Ok(WriterMsg::Chunk { index, hash, data }) => {
                batch_bytes += data.len();
                batch.push((index, hash, data));
                while batch_bytes < BATCH_BYTES && batch.len() < BATCH_CHUNKS {
                    match rx.try_recv() {
                        Ok(WriterMsg::Chunk { index, hash, data }) => {
                            batch_bytes += data.len();
                            batch.push((index, hash, data));
                        }
                        Ok(WriterMsg::Finalize { expected, reply }) => {
                            finalize = Some((expected, reply))
                        }
                        Err(_) => break,
                    }
                }
                if batch_bytes < BATCH_BYTES && batch.len() < BATCH_CHUNKS && finalize.is_none() {
                    continue; // linger for more before paying for a durable commit
                }
            }
            Ok(WriterMsg::Finalize { expected, reply }) => finalize = Some((expected, reply)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => closed = true,
        }
        if !batch.is_empty() {
            batch_bytes = 0;
            let (indices, refused) =
                commit_batch(volume, manifest, &geometry, std::mem::take(&mut batch))?;
            // A refused patch arrived too (the sender counts it), though
            // nothing of it was written.
            committed += (indices.len() + refused.len()) as u64;
            for need in refused {
                if ctl.blocking_send(Msg::Need(need)).is_err() {
                    closed = true;
                }
            }
            let generation = manifest.header().generation;
            if !indices.is_empty()
                && ctl
                    .blocking_send(Msg::Ack(wire::Ack {
                        indices,
                        generation,
                    }))
                    .is_err()
            {
                closed = true;
            }
        }
        if let Some((expected, _)) = &finalize {
            if committed >= *expected {
                let (expected, reply) = finalize.take().expect("checked Some");
                let result = if committed == expected {
                    manifest.summary_now()
                } else {
                    Err(Error::Peer(format!(
                        "sender announced {expected} chunks but {committed} arrived"
                    )))
                };
                let _ = reply.send(result);
            }
        }
        if closed {
            manifest.summary_now()?;
            return Ok(());
        }
    }
}

/// Commits one batch durably (see the module docs). Returns the indices
/// written, and a request for the whole chunk for each patch refused.
///
/// A patch is checked here, in order with the batch's other writes, not when
/// its frame arrives: the blocks it keeps are read from the target after
/// every earlier write of the session, so what is written and recorded is
/// exactly what matched the chunk's hash, whatever a sender sent before it.
pub(super) fn commit_batch(
    volume: &Volume,
    manifest: &mut ManifestFile,
    geometry: &Geometry,
    batch: Vec<(u64, Hash, Content)>,
) -> Result<(Vec<u64>, Vec<wire::Need>)> {
    let mut invalidated = false;
    for (index, _, _) in &batch {
        if manifest.entry(*index) != UNKNOWN {
            manifest.set(*index, &UNKNOWN);
            invalidated = true;
        }
    }
    if invalidated {
        manifest.flush_table()?;
    }
    let mut written = Vec::with_capacity(batch.len());
    let mut refused = Vec::new();
    for (index, hash, data) in &batch {
        let range = geometry
            .range(*index)
            .expect("index checked against geometry");
        match data {
            Content::Whole(d) => volume.write_all_at(d, range.start)?,
            Content::Zero => volume.zero_range(range.start, range.end - range.start)?,
            Content::Patch { blocks, payload } => {
                let len = (range.end - range.start) as usize;
                let mut chunk = volume.read_vec_at(len, range.start)?;
                patch::apply(&mut chunk, blocks, payload);
                if blake3::hash(&chunk).as_bytes() != hash {
                    // The blocks kept from the target are not what the
                    // sender has (a hint that collided, a target changed
                    // behind the session): ask for the whole chunk.
                    refused.push(patch::whole_chunk(*index, len));
                    continue;
                }
                for run in patch::runs(blocks, len) {
                    volume.write_all_at(&chunk[run.clone()], range.start + run.start as u64)?;
                }
            }
        }
        written.push((*index, *hash));
    }
    volume.sync_data()?;
    for (index, hash) in &written {
        manifest.set(*index, hash);
    }
    manifest.flush_table()?;
    Ok((written.into_iter().map(|(i, _)| i).collect(), refused))
}
