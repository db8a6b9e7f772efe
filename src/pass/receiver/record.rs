//! The cutover's two short sessions: the preflight (would a sync be accepted
//! now?) and the record of a consistency point, which seals the volume.

use super::*;

/// Answers a cutover's question before it freezes its source: would a sync
/// session of this volume be accepted now? `accept` has checked the
/// version, the export (and what else every session must pass); this adds
/// what a sync would find when it opens the volume: not held by another
/// session, a chunk size the volume's manifest agrees with, a target not
/// smaller than the source, and what [`prepare_target`] checks (room for
/// the manifest, `--max-size`). Takes nothing and writes no data (the
/// volume's state directory may be created).
pub(super) async fn preflight_session(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    hello: &wire::Hello,
    path: &Path,
) -> Result<()> {
    let answer = {
        let (shared, hello, path) = (shared.clone(), hello.clone(), path.to_owned());
        tokio::task::spawn_blocking(move || preflight_answer(&shared, &hello, &path))
            .await
            .map_err(|_| Error::Io("preflight task failed".into()))?
    };
    match answer {
        Ok(welcome) => {
            transport::send_control(&mut send, Msg::Welcome(welcome)).await?;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
            Ok(())
        }
        Err(r) => refuse(&mut send, conn, r).await,
    }
}

/// The checks of [`preflight_session`], on a blocking thread.
pub(super) fn preflight_answer(
    shared: &Shared,
    hello: &wire::Hello,
    path: &Path,
) -> std::result::Result<wire::Welcome, Refuse> {
    let name = &hello.volume;
    if shared.busy.lock().expect("not poisoned").contains_key(name) {
        return Err(Refuse(
            RefuseCode::InUse,
            format!("volume '{name}' is in use by another sender's session"),
        ));
    }
    let chunk = ChunkSize::new(u64::from(hello.chunk_size))
        .map_err(|e| Refuse(RefuseCode::ChunkSize, e.to_string()))?;
    if hello.source_size == 0 {
        return Err(Refuse(
            RefuseCode::BadRequest,
            "the source is empty (0 bytes): nothing to copy".into(),
        ));
    }
    let (target_size, is_block) = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, false),
        Err(e) => return Err(Error::io(format!("target {}", path.display()), e).into()),
        Ok(_) => {
            let v = Volume::open_for_verify(path)?;
            let is_block = v.kind() == crate::io::device::Kind::Block;
            if is_block && crate::io::device::check_not_held(path).is_err() {
                return Err(Refuse(
                    RefuseCode::InUse,
                    format!(
                        "target {} of volume '{name}' is in use (mounted, or held open exclusively by another program)",
                        path.display()
                    ),
                ));
            }
            (v.size(), is_block)
        }
    };
    if target_size != 0 && target_size < hello.source_size {
        return Err(Refuse(
            RefuseCode::TooSmall,
            format!(
                "target of volume '{name}' ({target_size} bytes) is smaller than the source ({} bytes)",
                hello.source_size
            ),
        ));
    }
    let dir = volume_dir(shared, name);
    // What a sync checks before it opens or creates the target: geometry,
    // the state directory and room for a manifest, --max-size.
    prepare_target(
        &shared.cfg,
        &dir,
        path,
        hello.source_size,
        chunk,
        hello.chunk_size_explicit,
    )?;
    // Read without the manifest's lock: a sync of the volume opening it at
    // this moment must not be refused "in use".
    let have = state::peek_geometry(&dir.join("manifest")).map(|g| g.chunk_size());
    if let Some(have) = have.filter(|h| hello.chunk_size_explicit && *h != chunk) {
        return Err(Refuse(
            RefuseCode::ChunkSize,
            format!(
                "volume '{name}' was first copied with chunk size {have}; a pass with chunk size {chunk} would re-chunk it. Drop --chunk-size to keep {have}"
            ),
        ));
    }
    Ok(wire::Welcome {
        version: wire::PROTOCOL_VERSION,
        target_size,
        chunk_size: have.unwrap_or(chunk).bytes() as u32,
        summary: None,
        target_is_block: is_block,
        unsealed_cutover: crate::store::seal::last_unsealed(&shared.store, name)?,
    })
}

/// Records a cutover's consistency point in the volume's journal and seals
/// the volume, when the point is the root of what this receiver holds (see
/// [`crate::store::seal::record_cutover`]); otherwise answers `Failure` and writes
/// nothing.
pub(super) async fn record_session(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    hello: wire::Hello,
) -> Result<()> {
    transport::send_control(
        &mut send,
        Msg::Welcome(wire::Welcome {
            version: wire::PROTOCOL_VERSION,
            ..Default::default()
        }),
    )
    .await?;
    // A mark is one small message, sent right after the Welcome.
    let mark = tokio::time::timeout(HELLO_DEADLINE, transport::recv_control(&mut recv))
        .await
        .map_err(|_| {
            Error::Peer(format!(
                "no mark within {} s of the record session's welcome; ending the session",
                HELLO_DEADLINE.as_secs()
            ))
        })?;
    let mark = match mark? {
        Some(Msg::Mark(m)) => m,
        _ => return Err(Error::Peer("record session without a mark".into())),
    };
    let name = hello.volume.clone();
    if !mark.members.is_empty() {
        let recorded = record_group(&shared, &conn, &hello, &mark).await;
        return reply_group(send, &conn, &mark, recorded).await;
    }
    let recorded = match crate::store::seal::check_mark(&mark) {
        Err(why) => Err(Error::input(why)),
        Ok(()) => match take_volume_waiting(&shared, &name).await {
            None => Err(Error::Io(format!(
                "volume '{name}' stayed in use by another session"
            ))),
            Some(guard) => {
                let dir = volume_dir(&shared, &name);
                let (n, s) = (name.clone(), shared.clone());
                let sealed = tokio::task::spawn_blocking(move || {
                    crate::store::seal::record_cutover(&s.store, &dir, &n, &mark)
                })
                .await
                .map_err(|_| Error::Io("record task failed".into()))
                .and_then(|r| r);
                drop(guard);
                sealed
            }
        },
    };
    let reply = match recorded {
        Ok(seal) => {
            tracing::info!(
                "volume '{name}': cutover complete, consistency point {}; the volume is sealed until `nightpass unseal {name}`",
                seal.consistency_point
            );
            Msg::Done(wire::Done { summary: None })
        }
        Err(e) => {
            let message = format!(
                "receiver refused to record the cutover of volume '{name}': {e}; nothing recorded, the volume is not sealed"
            );
            failure(message)
        }
    };
    answer(send, &conn, reply).await
}

/// A refusal to record: logged, and the message for the sender.
fn failure(message: String) -> Msg {
    tracing::error!("{message}");
    Msg::Failure(wire::Failure { message })
}

/// Sends a record session's one answer and waits (a little) for the
/// sender to close.
async fn answer(mut send: quinn::SendStream, conn: &quinn::Connection, reply: Msg) -> Result<()> {
    transport::send_control(&mut send, reply).await?;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    Ok(())
}

/// Says, in a failed group record's message, that some volumes were sealed.
const PARTLY: &str = "after sealing";

/// A group's record: every member volume exported, this sender authorized
/// on it (as admission checks the session's own volume), its mark well
/// formed, all of them held, then every consistency point checked against
/// what this receiver holds before any is sealed: all sealed, or none.
async fn record_group(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    hello: &wire::Hello,
    mark: &wire::Mark,
) -> Result<Vec<crate::store::seal::Seal>> {
    let mut names: Vec<String> = mark.members.iter().map(|m| m.volume.clone()).collect();
    names.sort();
    names.dedup();
    if names.len() != mark.members.len() || !names.contains(&hello.volume) {
        return Err(Error::input(
            "a group's record names a volume twice, or not the session's own",
        ));
    }
    let marks: Vec<(String, wire::Mark)> = mark
        .members
        .iter()
        .map(|m| {
            let member = wire::Mark {
                consistency_point: m.consistency_point.clone(),
                members: Vec::new(),
                ..mark.clone()
            };
            (m.volume.clone(), member)
        })
        .collect();
    for (name, m) in &marks {
        let as_session = wire::Hello {
            volume: name.clone(),
            ..hello.clone()
        };
        admissible(shared, &as_session, conn).map_err(|r| Error::input(r.1))?;
        crate::store::seal::check_mark(m)
            .map_err(|why| Error::input(format!("volume '{name}': {why}")))?;
    }
    let mut guards = Vec::new();
    for name in &names {
        match take_volume_waiting(shared, name).await {
            Some(g) => guards.push(g),
            None => {
                return Err(Error::Io(format!(
                    "volume '{name}' stayed in use by another session"
                )))
            }
        }
    }
    let s = shared.clone();
    let dirs: Vec<_> = marks.iter().map(|(n, _)| volume_dir(shared, n)).collect();
    let sealed = tokio::task::spawn_blocking(move || {
        let seals = (marks.iter().zip(&dirs))
            .map(|((n, m), d)| crate::store::seal::prepare_cutover(d, n, m))
            .collect::<Result<Vec<_>>>()?;
        // Every point checked: sealing now fails only on a local I/O error,
        // which says which volumes it had sealed.
        for (k, (seal, (_, m))) in seals.iter().zip(&marks).enumerate() {
            if let Err(e) = crate::store::seal::apply_cutover(&s.store, seal, m) {
                let done: Vec<&str> = seals[..k].iter().map(|s| s.volume.as_str()).collect();
                return Err(Error::Io(format!(
                    "{e}, {PARTLY} [{}] of the group (I/O on this receiver; unseal them to retry)",
                    done.join(", ")
                )));
            }
        }
        Ok::<_, Error>(seals)
    })
    .await
    .map_err(|_| Error::Io("record task failed".into()))
    .and_then(|r| r);
    drop(guards);
    sealed
}

/// Answers a group's record: `Done` when every volume is sealed, else
/// `Failure` saying that none is.
async fn reply_group(
    send: quinn::SendStream,
    conn: &quinn::Connection,
    mark: &wire::Mark,
    recorded: Result<Vec<crate::store::seal::Seal>>,
) -> Result<()> {
    let reply = match recorded {
        Ok(seals) => {
            for seal in &seals {
                tracing::info!(
                    "volume '{}': group cutover complete, consistency point {} (group {}); the volume is sealed until `nightpass unseal {}`",
                    seal.volume, seal.consistency_point, mark.group_point, seal.volume
                );
            }
            Msg::Done(wire::Done { summary: None })
        }
        Err(e) => {
            let said = e.to_string();
            let message = if said.contains(PARTLY) {
                format!("receiver failed to record the whole group cutover: {said}")
            } else {
                format!(
                    "receiver refused to record the group cutover: {said}; nothing recorded, no volume of the group is sealed"
                )
            };
            failure(message)
        }
    };
    answer(send, conn, reply).await
}
