//! The sender's own records of a volume: where its state lives (keyed by
//! the receiver's fingerprint and the volume's name), which source it is
//! copied from, whether this sender cut it over, and `status`. The records
//! go through the [`Store`]; `status` lists the state directory itself (with
//! the layout of older releases). Touches no network.

use super::*;

/// Where the sender keeps its state of volume `dest` on the receiver whose
/// fingerprint is `server_fp`: `targets/<fingerprint>/<name>/`. Keyed by
/// who the receiver is and what the volume is called there, not by how its
/// address was typed: `newfiler:7400/filer01` and `10.99.0.2:7400/filer01`
/// are one volume with one history.
pub fn target_dir(state_dir: &Path, server_fp: &str, dest: &RemoteVolume) -> PathBuf {
    FileStore::new(state_dir).sender_dir(&sender_volume(server_fp, dest))
}

/// Volume `dest` on the receiver whose fingerprint is `server_fp`, as the
/// store knows it.
fn sender_volume(server_fp: &str, dest: &RemoteVolume) -> SenderVolume {
    SenderVolume {
        receiver: server_fp.to_string(),
        name: dest.name.clone(),
    }
}

/// The sender's records of `cfg`'s volume: its journal and source record,
/// in the file store of `--state-dir` (see [`crate::store`]). Call it after
/// [`volume_state_dir`], which moves an older release's records into place.
pub fn journal(cfg: &SyncConfig) -> SenderJournal {
    SenderJournal::new(
        Arc::new(FileStore::new(&cfg.state_dir)),
        sender_volume(&cfg.server_fingerprint, &cfg.dest),
    )
}

/// The state directory of a pass's volume, ready for writing: the state
/// directory must be writable (else a refusal, exit 2, before anything is
/// read or sent), and a volume's state kept by an older release under
/// `targets/<HOST:PORT/NAME as typed>/` moves to [`target_dir`].
pub fn volume_state_dir(cfg: &SyncConfig) -> Result<PathBuf> {
    state::check_writable(&cfg.state_dir)?;
    let dir = target_dir(&cfg.state_dir, &cfg.server_fingerprint, &cfg.dest);
    let legacy = cfg
        .state_dir
        .join("targets")
        .join(state::key_for(&cfg.dest.to_string()));
    if !dir.exists() && legacy.join(journal::FILE_NAME).exists() {
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io(format!("create {}", parent.display()), e))?;
        }
        std::fs::rename(&legacy, &dir)
            .map_err(|e| Error::io(format!("move {} to {}", legacy.display(), dir.display()), e))?;
    }
    Ok(dir)
}

/// The path a source is known by: symlinks resolved (`/dev/vg0/filer01`
/// and `/dev/dm-3` are one source), else as given.
pub fn canonical_source(source: &Path) -> String {
    source
        .canonicalize()
        .unwrap_or_else(|_| source.to_owned())
        .display()
        .to_string()
}

/// The source earlier passes of a volume read, if any: its `source`
/// record, else (state of an older release) the last pass's.
pub(super) fn recorded_source(
    source: Option<SourceRecord>,
    records: &[SenderRecord],
) -> Option<String> {
    if let Some(r) = source {
        return Some(r.path);
    }
    journal::passes(records)
        .last()
        .map(|p| canonical_source(Path::new(&p.source)))
}

/// Refuses a source other than the one earlier passes of this volume read,
/// unless the operator said so (`--new-source`): copying another volume's
/// bytes over a target is a mistake a typo makes.
pub(super) fn check_source(
    cfg: &SyncConfig,
    journal: &SenderJournal,
    records: &[SenderRecord],
) -> Result<()> {
    let now = canonical_source(&cfg.source);
    match recorded_source(journal.source()?, records) {
        Some(before) if before != now && !cfg.new_source => Err(Error::input(format!(
            "earlier passes of {} read {before}, but this one would read {now}: refusing to copy another source over it. If the volume really moved to {now}, rerun with --new-source",
            cfg.dest
        ))),
        _ => Ok(()),
    }
}

/// Records the source this volume is copied from (see [`check_source`]).
pub(super) fn record_source(cfg: &SyncConfig, journal: &SenderJournal) -> Result<()> {
    let now = canonical_source(&cfg.source);
    if journal.source()?.is_some_and(|r| r.path == now) {
        return Ok(());
    }
    journal.set_source(&SourceRecord {
        path: now,
        recorded_unix_s: now_unix(),
    })
}

/// A sender passes again over a volume it cut over only when the receiver
/// says the operator unsealed that very cutover there (`nightpass unseal`);
/// then the lift is journaled here too.
pub(super) fn check_not_cut_over(
    cfg: &SyncConfig,
    journal: &SenderJournal,
    records: &[SenderRecord],
    welcome: &wire::Welcome,
) -> Result<()> {
    let Some(cut) = journal::sealed_cutover(records) else {
        return Ok(());
    };
    let (point, at) = (&cut.consistency_point, cut.freeze_unix_s);
    if welcome.unsealed_cutover == *point {
        return journal.append(&SenderRecord::Unsealed(UnsealedRecord {
            consistency_point: point.clone(),
            unix_s: now_unix(),
        }));
    }
    Err(Error::input(format!(
        "{} was cut over at {} (consistency point {point}): the new site owns it, and further passes are refused so that nothing overwrites what it wrote. To copy it again anyway, run 'nightpass unseal {}' on the receiver host first",
        cfg.dest,
        crate::progress::rfc3339(at),
        cfg.dest.name
    )))
}

/// Every volume's state directory under `targets`: `<fingerprint>/<name>/`,
/// and `<HOST:PORT/NAME>/` as older releases kept them (until their next
/// pass moves them); sorted.
pub(super) fn volume_dirs(targets: &Path) -> Vec<PathBuf> {
    let list = |d: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for d in list(targets) {
        if d.join(journal::FILE_NAME).exists() {
            out.push(d);
        } else {
            out.extend(list(&d));
        }
    }
    out.sort();
    out
}

/// Prints the pass history and the current forecast of every volume in the
/// sender state directory (only those copied from `source`, when given).
///
/// It lists the state directory itself, where volumes an older release
/// kept under `targets/<HOST:PORT/NAME>/` have no [`SenderVolume`] key
/// yet, so it reads their files directly; a fleet's status would be a
/// query of its store.
pub fn status(
    state_dir: &std::path::Path,
    source: Option<&std::path::Path>,
    progress: &dyn Progress,
) -> Result<()> {
    if !state_dir.is_dir() {
        return Err(Error::input(format!(
            "state directory {} does not exist (give the --state-dir the passes used)",
            state_dir.display()
        )));
    }
    let want = source.map(canonical_source);
    let mut any = false;
    for dir in volume_dirs(&state_dir.join("targets")) {
        let records = Journal::<SenderRecord>::in_dir(&dir).read()?;
        let Some(last) = journal::passes(&records).last() else {
            continue;
        };
        if let Some(w) = &want {
            let read = recorded_source(SourceRecord::read(&dir)?, &records);
            if read.as_deref() != Some(w.as_str()) {
                continue;
            }
        }
        any = true;
        // A volume cut over (and not unsealed since) belongs to the new
        // site: its state is the cutover, not a forecast.
        let cut_over = journal::sealed_cutover(&records);
        let forecast = match cut_over {
            Some(_) => None,
            None => plan::forecast(&journal::figures(&records), now_unix()),
        };
        // The pass records as the journal keeps them (without the format
        // version, which is the journal's and not the pass's).
        let passes: Vec<&SenderRecord> = records.iter().filter(|r| r.as_pass().is_some()).collect();
        progress.event(
            &json!({
                "event": "status",
                "volume": last.volume,
                "source": last.source,
                "passes": passes,
                "forecast_final_pass_s": forecast.map(|f| f.total_s),
                "forecast_scan": forecast.map(|f| if f.tracked { "tracked" } else { "full" }),
                "cut_over": cut_over.map(|c| json!({
                    "at": crate::progress::rfc3339_seconds(c.freeze_unix_s),
                    "consistency_point": c.consistency_point,
                    "frozen_s": c.frozen_s,
                    "proved": c.proved,
                })),
            }),
            &status_text(last, &records, forecast, cut_over),
        );
    }
    if !any {
        progress.note(&format!("no passes recorded in {}", state_dir.display()));
    }
    Ok(())
}

/// What `status` prints of one volume: its passes and the forecast.
pub(super) fn status_text(
    last: &PassRecord,
    records: &[SenderRecord],
    forecast: Option<Forecast>,
    cut_over: Option<&journal::CutoverRecord>,
) -> String {
    let mut text = format!(
        "{} (source {})\n  pass kind      duration  scanned     changed     sent\n",
        last.volume, last.source
    );
    for p in journal::passes(records) {
        text.push_str(&format!(
            "  {:<4} {:<9} {:>7.1}s  {:<11} {:<11} {}\n",
            p.pass,
            p.kind,
            p.duration_s,
            crate::progress::human_bytes(p.scanned_bytes),
            crate::progress::human_bytes(p.changed_bytes),
            crate::progress::human_bytes(p.sent_bytes),
        ));
    }
    if let Some(c) = cut_over {
        text.push_str(&format!(
            "  cut over at {} (consistency point {}, frozen {:.2} s): the new site owns it; passes are refused until it is unsealed on the receiver",
            crate::progress::rfc3339_seconds(c.freeze_unix_s),
            c.consistency_point,
            c.frozen_s
        ));
        return text;
    }
    text.push_str(&match forecast {
        Some(f) => format!(
            "  forecast of a frozen final pass at {} (now): {:.1} s ({} scan {:.1} s{}, send {:.1} s of {} changed at {}/s; overheads: pass {:.2} s, freeze {:.2} s)",
            crate::progress::rfc3339_seconds(now_unix()),
            f.total_s,
            if f.tracked { "tracked" } else { "full" },
            f.scan_s,
            if f.tracked { format!(", proof {:.1} s", f.proof_s) } else { String::new() },
            f.send_s,
            crate::progress::human_bytes(f.pending_bytes as u64),
            crate::progress::human_bytes(f.change_rate_bps as u64),
            f.pass_overhead_s,
            f.freeze_overhead_s
        ),
        None => "  forecast: needs at least two passes".into(),
    });
    text
}
