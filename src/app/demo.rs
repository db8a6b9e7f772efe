//! `nightpass demo`: the whole job on generated data, in one process.
//!
//! Generates a sample volume shaped like a filer's disk (runs of
//! incompressible data, text-like compressible data and zeros), starts a
//! receiver on 127.0.0.1 with throwaway identities, runs a first pass, then
//! changes the volume the way users would (scattered small writes, a new file
//! appended, a file deleted) and runs delta passes, then verifies the copy.
//! Everything lives in a temporary directory removed at the end.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::{Rng, RngCore, SeedableRng};
use serde_json::json;

use crate::error::{Error, IoContext, Result};
use crate::io::device::Volume;
use crate::io::hash::ScanOptions;
use crate::net::transport::{Identity, RemoteVolume, Tuning};
use crate::pass::receiver::{self, ServeConfig};
use crate::pass::sender::{self, ScanChoice, SyncConfig};
use crate::progress::{human_bytes, Progress};

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const MIB: u64 = 1 << 20;

/// Writes the sample volume: per MiB, 45% random, 35% text-like, 20% zeros.
fn generate(path: &Path, size: u64, rng: &mut rand::rngs::StdRng) -> Result<()> {
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .ctx(format!("create {}", path.display()))?;
    f.set_len(size).ctx("size the sample volume")?;
    let words = [
        "invoice",
        "customer",
        "index.php",
        "<div class=\"row\">",
        "SELECT * FROM",
        "2026-11-21",
        "mail",
        "backup",
    ];
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(MIB) as usize;
        let roll: f64 = rng.gen();
        if roll < 0.45 {
            rng.fill_bytes(&mut buf[..n]);
        } else if roll < 0.80 {
            let mut i = 0;
            while i < n {
                let w = words[rng.gen_range(0..words.len())].as_bytes();
                let k = w.len().min(n - i);
                buf[i..i + k].copy_from_slice(&w[..k]);
                i += k;
                if i < n {
                    buf[i] = b' ';
                    i += 1;
                }
            }
        } else {
            off += n as u64;
            continue;
        }
        f.write_all_at(&buf[..n], off)
            .ctx("write the sample volume")?;
        off += n as u64;
    }
    f.sync_all().ctx("fsync the sample volume")
}

/// Changes the volume as a filer's users would; returns a description.
fn churn(path: &Path, size: u64, rng: &mut rand::rngs::StdRng, scale: u64) -> Result<String> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .ctx(format!("open {}", path.display()))?;
    let mut block = vec![0u8; 4096];
    let writes = 40 * scale;
    for _ in 0..writes {
        rng.fill_bytes(&mut block);
        let at = rng.gen_range(0..size / 4096) * 4096;
        f.write_all_at(&block, at).ctx("write")?;
    }
    let new_file = (2 * MIB * scale).min(size / 4);
    let at = rng.gen_range(0..(size - new_file) / 4096) * 4096;
    let mut data = vec![0u8; new_file as usize];
    rng.fill_bytes(&mut data);
    f.write_all_at(&data, at).ctx("write")?;
    let deleted = (MIB * scale).min(size / 8);
    let del_at = rng.gen_range(0..(size - deleted) / 4096) * 4096;
    f.write_all_at(&vec![0u8; deleted as usize], del_at)
        .ctx("write")?;
    f.sync_all().ctx("fsync")?;
    Ok(format!(
        "{writes} scattered 4 KiB writes, a new {} file, a deleted {} file",
        human_bytes(new_file),
        human_bytes(deleted)
    ))
}

/// A sender identity and an in-process receiver on 127.0.0.1 exporting one
/// volume, `local`, with throwaway identities (demo and bench).
pub struct LocalPair {
    /// The receiver's address.
    pub addr: std::net::SocketAddr,
    /// The receiver's fingerprint.
    pub server_fp: String,
    /// The sender's identity.
    pub sender_id: Identity,
    state: PathBuf,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<()>>,
}

impl LocalPair {
    /// Starts the receiver; identities and state live under `dir`.
    pub async fn start(dir: &Path, target: &Path) -> Result<LocalPair> {
        let sender_id = Identity::generate(&dir.join("sender-identity"), true)?;
        let receiver_id = Identity::generate(&dir.join("receiver-identity"), true)?;
        let server_fp = receiver_id.fingerprint();
        let cfg = ServeConfig {
            listen: "127.0.0.1:0".parse().expect("literal address"),
            volumes: HashMap::from([("local".to_string(), target.to_owned())]),
            allowed: [sender_id.fingerprint()].into_iter().collect(),
            limits: HashMap::new(),
            max_size: None,
            state_dir: dir.join("receiver-state"),
            tuning: Tuning::default(),
            max_sessions: 4,
            max_sessions_per_sender: 4,
            access_updates: None,
        };
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(receiver::serve(
            cfg,
            receiver_id,
            move |addr, _| {
                let _ = ready_tx.send(addr);
            },
            async {
                let _ = stop_rx.await;
            },
        ));
        let addr = ready_rx
            .await
            .map_err(|_| Error::Io("the local receiver did not start".into()))?;
        Ok(LocalPair {
            addr,
            server_fp,
            sender_id,
            state: dir.join("sender-state"),
            stop,
            server,
        })
    }

    /// Settings of a pass from `source` to the local receiver.
    pub fn pass(&self, source: &Path, kind: &'static str) -> SyncConfig {
        SyncConfig {
            scan_choice: ScanChoice::Auto,
            audit_percent: 1.0,
            tracked_proof: false,
            scan_reason: None,
            source: source.to_owned(),
            dest: RemoteVolume {
                host_port: self.addr.to_string(),
                name: "local".into(),
            },
            server_fingerprint: self.server_fp.clone(),
            state_dir: self.state.clone(),
            chunk_size: None,
            streams: Tuning::default().default_streams(),
            bwlimit: None,
            shared_pacer: None,
            scan: ScanOptions::default(),
            tuning: Tuning::default(),
            kind,
            read_from: None,
            retry_for: std::time::Duration::ZERO,
            proof_read: false,
            new_source: false,
            receiver_answered: false,
        }
    }

    /// Stops the receiver, letting it finish its writes.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.server.await;
    }
}

/// Runs the demo on a volume of `size` bytes.
pub async fn run(size: u64, progress: Arc<dyn Progress>) -> Result<()> {
    if !(16 * MIB..=64 * 1024 * MIB).contains(&size) {
        return Err(Error::input("--size must be between 16M and 64G"));
    }
    let base = std::env::temp_dir().join(format!("nightpass-demo-{}", std::process::id()));
    std::fs::create_dir_all(&base).ctx(format!("create {}", base.display()))?;
    let tmp = TempDir(base.clone());
    let source = tmp.0.join("filer01.img");
    let target = tmp.0.join("filer01-copy.img");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6e69676874);
    progress.note(&format!(
        "generating a {} sample volume in {}",
        human_bytes(size),
        base.display()
    ));
    generate(&source, size, &mut rng)?;

    let local = LocalPair::start(&tmp.0, &target).await?;
    progress.note(&format!(
        "receiver listening on {} (fingerprint {})",
        local.addr, local.server_fp
    ));
    let pass = |kind| local.pass(&source, kind);
    let sender_id = &local.sender_id;
    let mut ends = Vec::new();
    ends.push(sender::run_pass(&pass("sync"), sender_id, progress.clone()).await?);
    for scale in [8u64, 2] {
        let what = churn(&source, size, &mut rng, scale)?;
        progress.note(&format!("users changed the volume: {what}"));
        ends.push(sender::run_pass(&pass("sync"), sender_id, progress.clone()).await?);
    }
    local.stop().await;
    let cmp = {
        let s = Arc::new(Volume::open_source(&source)?);
        let t = Volume::open_for_verify(&target)?;
        let p = progress.clone();
        let chunk = nightpass_proto::chunk::ChunkSize::DEFAULT;
        tokio::task::spawn_blocking(move || {
            crate::app::verify::verify_local(s, t, chunk, ScanOptions::default(), p)
        })
        .await
        .map_err(|_| Error::Io("verify task failed".into()))??
    };
    progress.finish();
    let mut table = String::from("pass  scanned     changed chunks  sent        seconds\n");
    for e in &ends {
        table.push_str(&format!(
            "{:<5} {:<11} {:<15} {:<11} {:.2}\n",
            e.start.pass,
            human_bytes(e.scanned_bytes),
            e.changed_chunks,
            human_bytes(e.sent_bytes),
            e.duration_s
        ));
    }
    table.push_str(if cmp.identical() {
        "verify: the copy is byte-identical to the source"
    } else {
        "verify: THE COPY DIFFERS"
    });
    progress.event(
        &json!({"event": "demo_end", "identical": cmp.identical(), "passes": ends.iter().map(|e| e.to_json()).collect::<Vec<_>>()}),
        &table,
    );
    if !cmp.identical() {
        return Err(Error::Io(format!(
            "demo copy differs in {} chunks",
            cmp.mismatched.len()
        )));
    }
    Ok(())
}
