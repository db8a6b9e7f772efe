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

/// A batch being gathered: verified chunks and their bytes.
#[derive(Default)]
struct Batch {
    chunks: Vec<(u64, Hash, Content)>,
    bytes: usize,
}

impl Batch {
    fn push(&mut self, index: u64, hash: Hash, data: Content) {
        self.bytes += data.len();
        self.chunks.push((index, hash, data));
    }

    fn full(&self) -> bool {
        self.bytes >= BATCH_BYTES || self.chunks.len() >= BATCH_CHUNKS
    }
}

/// Answers the table requests waiting, a few pieces at a time.
fn send_tables(manifest: &ManifestFile, table_rx: &std::sync::mpsc::Receiver<mpsc::Sender<Bytes>>) {
    while let Ok(reply) = table_rx.try_recv() {
        manifest.for_each_piece(wire::HASHES_PER_PART, |piece| {
            reply.blocking_send(Bytes::copy_from_slice(piece)).is_ok()
        });
    }
}

/// Runs the writer of a session until its queue closes: gathers verified
/// chunks into batches (lingering briefly for more), commits each durably,
/// acknowledges it, and answers the Finish once every chunk announced is
/// committed ([`WriterLedger`]). What each batch wrote is counted in
/// `meters`.
pub(super) fn writer_loop(
    volume: &Volume,
    manifest: &mut ManifestFile,
    rx: std::sync::mpsc::Receiver<WriterMsg>,
    table_rx: std::sync::mpsc::Receiver<mpsc::Sender<Bytes>>,
    ctl: &mpsc::Sender<Msg>,
    meters: &crate::metrics::ReceiverMeters,
) -> Result<()> {
    let geometry = manifest.geometry();
    let mut ledger = WriterLedger::new();
    let mut reply: Option<oneshot::Sender<Result<Summary>>> = None;
    let mut batch = Batch::default();
    let mut closed = false;
    loop {
        send_tables(manifest, &table_rx);
        let timeout = if batch.chunks.is_empty() {
            Duration::from_millis(50)
        } else {
            LINGER
        };
        let mut finalize = |expected, r| {
            ledger.handle_finish(expected);
            reply = Some(r);
        };
        match rx.recv_timeout(timeout) {
            Ok(WriterMsg::Chunk { index, hash, data }) => {
                batch.push(index, hash, data);
                while !batch.full() {
                    match rx.try_recv() {
                        Ok(WriterMsg::Chunk { index, hash, data }) => batch.push(index, hash, data),
                        Ok(WriterMsg::Finalize { expected, reply }) => finalize(expected, reply),
                        Err(_) => break,
                    }
                }
                if !batch.full() && reply.is_none() {
                    continue; // linger for more before paying for a durable commit
                }
            }
            Ok(WriterMsg::Finalize { expected, reply }) => finalize(expected, reply),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => closed = true,
        }
        if !batch.chunks.is_empty() {
            let chunks = std::mem::take(&mut batch).chunks;
            let (written, refused, bytes) = commit_batch(volume, manifest, &geometry, chunks)?;
            meters.chunks.increment(written.len() as u64);
            meters.written.increment(bytes);
            let generation = manifest.header().generation;
            let out = ledger.handle_committed(written, refused, generation);
            for m in out
                .needs
                .into_iter()
                .map(Msg::Need)
                .chain(out.ack.map(Msg::Ack))
            {
                closed |= ctl.blocking_send(m).is_err();
            }
        }
        if let Some(end) = ledger.poll_end() {
            let result = end
                .map_err(Error::from)
                .and_then(|()| manifest.summary_now());
            if let Some(r) = reply.take() {
                let _ = r.send(result);
            }
        }
        if closed {
            manifest.summary_now()?;
            return Ok(());
        }
    }
}

/// Commits one batch durably (see the module docs). Returns the indices
/// written, a request for the whole chunk for each patch refused, and the
/// bytes of the target written (a zero chunk's whole length, a patch's
/// blocks).
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
) -> Result<(Vec<u64>, Vec<wire::Need>, u64)> {
    let indices: Vec<u64> = batch.iter().map(|(i, _, _)| *i).collect();
    let clear = WriterLedger::to_clear(&indices, |i| manifest.entry(i));
    if !clear.is_empty() {
        for i in clear {
            manifest.set(i, &UNKNOWN);
        }
        manifest.flush_table()?;
    }
    let mut written = Vec::with_capacity(batch.len());
    let mut refused = Vec::new();
    let mut bytes = 0u64;
    for (index, hash, data) in &batch {
        let range = geometry
            .range(*index)
            .expect("index checked against geometry");
        match data {
            Content::Whole(d) => {
                volume.write_all_at(d, range.start)?;
                bytes += d.len() as u64;
            }
            Content::Zero => {
                volume.zero_range(range.start, range.end - range.start)?;
                bytes += range.end - range.start;
            }
            Content::Patch { blocks, payload } => {
                let len = (range.end - range.start) as usize;
                let mut chunk = volume.read_vec_at(len, range.start)?;
                match rx::check_patch(*index, hash, &mut chunk, blocks, payload) {
                    Ok(runs) => {
                        for run in runs {
                            bytes += run.len() as u64;
                            volume.write_all_at(
                                &chunk[run.clone()],
                                range.start + run.start as u64,
                            )?;
                        }
                    }
                    Err(need) => {
                        refused.push(need);
                        continue;
                    }
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
    Ok((
        written.into_iter().map(|(i, _)| i).collect(),
        refused,
        bytes,
    ))
}
