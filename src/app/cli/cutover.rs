//! `cutover`'s flags: the freeze, the proof, the limits of the night,
//! and their validation into the cutover's settings. Owns no behaviour.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{parse_duration, parse_size, ScanArg, SyncArgs, Volumes};
use crate::error::{Error, Result};
use crate::pass::sender::ScanChoice;

/// `cutover` flags.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("freeze").required(false).args(["fsfreeze", "lvm_snapshot", "pre", "assume_frozen"])))]
pub struct CutoverArgs {
    #[command(flatten)]
    /// What to cut over: one volume, or every volume of a plan at once.
    pub volumes: Volumes,
    #[command(flatten)]
    /// The pass flags.
    pub sync: SyncArgs,
    #[command(flatten)]
    /// What the passes read.
    pub scan: ScanArg,
    /// Freeze the filesystem mounted here (it must live on SOURCE).
    #[arg(long, value_name = "MOUNTPOINT")]
    pub fsfreeze: Option<PathBuf>,
    /// SOURCE is an LVM logical volume: pass from a snapshot of it.
    #[arg(long)]
    pub lvm_snapshot: bool,
    /// Copy-on-write space of the LVM snapshot.
    #[arg(long, default_value = "10G", requires = "lvm_snapshot", value_parser = parse_size)]
    pub snapshot_size: u64,
    /// The operator's stop command (sh -c), run before the final pass.
    #[arg(long, requires = "post")]
    pub pre: Option<String>,
    /// The operator's restart command, run after the pass in every case.
    #[arg(long, requires = "pre")]
    pub post: Option<String>,
    /// The operator has stopped every writer.
    #[arg(long)]
    pub assume_frozen: bool,
    /// Abort the pass and thaw when frozen longer than this (exit 3)
    /// [default: the forecast × --margin, at least 60 s].
    #[arg(long, value_parser = parse_duration)]
    pub max_freeze: Option<Duration>,
    /// Safety margin: the default --max-freeze is the forecast × margin.
    #[arg(long, default_value_t = 1.5)]
    pub margin: f64,
    /// Cut over a volume that has no forecast (never synced, or fewer than
    /// two passes): the frozen pass may then copy the whole volume.
    #[arg(long)]
    pub force_no_forecast: bool,
    /// Prove the target identical by fresh reads (full), or skip that (none).
    #[arg(long, value_enum, default_value_t = Proof::Full)]
    pub verify: Proof,
    /// Which proof: auto (tracked when the frozen pass is tracked, else
    /// full), full (both sides read whole: the frozen pass then reads the
    /// whole source, as --scan full), tracked (refused before anything is
    /// frozen, exit 2, without an unbroken change record).
    #[arg(long, value_enum, default_value_t = ProofKind::Auto)]
    pub proof: ProofKind,
}

/// Which proof a cutover makes (`--proof`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProofKind {
    /// Tracked when the frozen pass is, else full.
    Auto,
    /// Both sides read whole and compared.
    Full,
    /// The chunks the tracked pass read (and its audit sample), fresh on
    /// both sides.
    Tracked,
}

impl CutoverArgs {
    /// What the cutover's frozen pass reads, from `--scan` and `--proof`
    /// together; a contradiction (or a proof kind with `--verify none`) is
    /// bad usage.
    pub fn scan_choice(&self) -> Result<ScanChoice> {
        let scan = self.scan.scan;
        if self.verify == Proof::None && self.proof != ProofKind::Auto {
            return Err(Error::input(
                "--proof needs a proof: not with --verify none",
            ));
        }
        match (self.proof, scan) {
            (ProofKind::Auto, s) => Ok(s),
            (ProofKind::Full, ScanChoice::Tracked) | (ProofKind::Tracked, ScanChoice::Full) => {
                Err(Error::input(format!(
                    "--proof {} contradicts --scan {}",
                    if self.proof == ProofKind::Full {
                        "full"
                    } else {
                        "tracked"
                    },
                    scan.name()
                )))
            }
            (ProofKind::Full, _) => Ok(ScanChoice::Full),
            (ProofKind::Tracked, _) => Ok(ScanChoice::Tracked),
        }
    }
}

/// How a cutover proves its copy (`--verify`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Proof {
    /// Both sides read whole and compared.
    Full,
    /// No proof.
    None,
}

impl CutoverArgs {
    /// The freeze method given on the command line, if any (one volume's
    /// cutover needs one; a plan's may take it from the plan).
    pub fn method(&self) -> Option<crate::io::freeze::Method> {
        use crate::io::freeze::Method;
        if let Some(mp) = &self.fsfreeze {
            Some(Method::Fsfreeze(mp.clone()))
        } else if self.lvm_snapshot {
            Some(Method::LvmSnapshot {
                size: self.snapshot_size,
            })
        } else if let (Some(pre), Some(post)) = (&self.pre, &self.post) {
            Some(Method::Hooks {
                pre: pre.clone(),
                post: post.clone(),
            })
        } else if self.assume_frozen {
            Some(Method::AssumeFrozen)
        } else {
            None
        }
    }
}
