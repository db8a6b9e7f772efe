//! Command-line flags (clap) and their validation into typed settings.
//!
//! Parsing happens in two steps, as in ripgrep: clap turns words into raw
//! flags, then the `parse_*` functions and `*Args::settings` turn those into
//! typed values (`ChunkSize`, byte counts, durations, pinned fingerprints), so
//! that nothing below this module handles an unchecked string.
//!
//! Here: the command line, the subcommands and the pass flags they share;
//! `serve.rs` holds the receiver's flags, `cutover.rs` the cutover's,
//! `fleet.rs` the fleet's, `values.rs` the parsers of sizes and durations.
//! Owns no behaviour: `commands` runs what these describe.

mod cutover;
mod fleet;
mod serve;
mod values;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use nightpass_proto::chunk::ChunkSize;

pub use cutover::{CutoverArgs, Proof, ProofKind};
pub use fleet::{AgentArgs, FleetArgs, FleetCommand, LimitsArgs};
pub use serve::{Allowed, ServeArgs};
pub use values::{parse_chunk_size, parse_duration, parse_metrics_addr, parse_size};

use crate::error::{Error, Result};
use crate::io::hash::ScanOptions;
use crate::net::transport::{default_identity_dir, parse_fingerprint, RemoteVolume, Tuning};
pub use crate::pass::sender::ScanChoice;
use crate::store::state::default_state_dir;

/// nightpass: move live storage servers between datacentres at block level.
#[derive(Debug, Parser)]
#[command(name = "nightpass", version, about, long_about = None)]
pub struct Cli {
    /// One JSON object per line on stdout, and nothing else there.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bars and no summaries (errors still go to stderr).
    #[arg(long, global = true)]
    pub quiet: bool,
    /// Without a terminal (stderr not a tty, and neither --json nor
    /// --quiet), print a progress line on stderr this often during a pass
    /// or a verify; 0 prints none.
    #[arg(long, global = true, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub progress_interval: Duration,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create this machine's identity and print its fingerprint.
    Keygen {
        /// Identity directory [default: $NIGHTPASS_HOME/identity or ~/.config/nightpass/identity].
        #[arg(long)]
        identity: Option<PathBuf>,
        /// Replace an existing identity.
        #[arg(long)]
        force: bool,
    },
    /// Print this machine's fingerprint.
    Fingerprint {
        /// Identity directory.
        #[arg(long)]
        identity: Option<PathBuf>,
    },
    /// Receive volumes: export NAME=PATH pairs to the allowed senders.
    Serve(ServeArgs),
    /// One delta pass: send the chunks that differ from what the target holds.
    #[command(
        override_usage = "nightpass sync [OPTIONS] SOURCE DEST\n       nightpass sync [OPTIONS] --plan FILE"
    )]
    Sync(SyncCmdArgs),
    /// Compare source and target by fresh checksums; list differing ranges.
    #[command(
        override_usage = "nightpass verify [OPTIONS] SOURCE DEST\n       nightpass verify [OPTIONS] --plan FILE"
    )]
    Verify(VerifyArgs),
    /// Repeat passes until a frozen final pass is forecast to fit the window.
    #[command(
        override_usage = "nightpass converge [OPTIONS] --window DURATION SOURCE DEST\n       nightpass converge [OPTIONS] --window DURATION --plan FILE"
    )]
    Converge(ConvergeArgs),
    /// Freeze the source, run the final pass, prove the target identical, thaw.
    Cutover(CutoverArgs),
    /// Record every write to each SOURCE block device until SIGINT/SIGTERM,
    /// so that passes read only what changed.
    Track(TrackArgs),
    /// On the receiver host: lift the seal a cutover put on volume NAME, so
    /// that passes into it are accepted again.
    Unseal {
        /// The exported volume's name.
        name: String,
        /// Receiver state directory (the one `serve` uses).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Many filers through PostgreSQL: the fleet's schema, filers, state,
    /// red button and nights.
    Fleet(FleetArgs),
    /// Pass history and forecast from the state directory.
    Status {
        /// Only volumes copied from this source.
        #[arg(conflicts_with = "plan")]
        source: Option<PathBuf>,
        /// One line per volume of this plan file (state, passes, last pass,
        /// forecast).
        #[arg(long, value_name = "FILE")]
        plan: Option<PathBuf>,
        /// Sender state directory.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// With --plan: a volume whose forecast × --margin fits this night
        /// window shows as converged.
        #[arg(long, value_parser = parse_duration, requires = "plan")]
        window: Option<Duration>,
        /// Safety margin the forecast is multiplied by (with --window).
        #[arg(long, default_value_t = 1.5, requires = "window")]
        margin: f64,
        /// With --plan: the group cutover's forecast with this many volumes
        /// in flight (as `cutover --plan --jobs N` would run them) instead
        /// of the plan's `jobs`.
        #[arg(long, value_name = "N", requires = "plan")]
        jobs: Option<usize>,
    },
    /// Measure each stage of a pass on this machine (read, BLAKE3, zstd, QUIC).
    Bench {
        /// A volume to measure reads on (read fresh, never written).
        #[arg(long)]
        volume: Option<PathBuf>,
        /// Size of the loopback pass.
        #[arg(long, default_value = "512M", value_parser = parse_size)]
        size: u64,
    },
    /// A self-contained run of the whole job on generated data.
    Demo {
        /// Size of the generated volume.
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        size: u64,
    },
    /// Print a shell completion script on stdout (e.g. `nightpass
    /// completions bash > /etc/bash_completion.d/nightpass`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page nightpass(1) as roff on stdout, or write one
    /// page per command to a directory.
    Man {
        /// Write nightpass.1 and nightpass-COMMAND.1 for every command here.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

impl Command {
    /// True for `fleet agent`: a daemon that stops on its own signals.
    pub fn is_agent(&self) -> bool {
        matches!(self, Command::Fleet(f) if matches!(f.command, FleetCommand::Agent(_)))
    }

    /// True for a command run over the volumes of a plan file (`--plan`).
    pub fn is_plan_run(&self) -> bool {
        match self {
            Command::Sync(a) => a.volumes.plan.is_some(),
            Command::Converge(a) => a.volumes.plan.is_some(),
            Command::Verify(a) => a.volumes.plan.is_some(),
            _ => false,
        }
    }
}

/// `track` flags.
#[derive(Debug, Args)]
pub struct TrackArgs {
    /// The block devices to record writes to.
    #[arg(required = true)]
    pub sources: Vec<PathBuf>,
    /// Sender state directory (the passes' own: they find the record there).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Kernel trace buffer per CPU (e.g. 8M); a larger one survives longer
    /// bursts of writes without losing events (a loss makes the next pass
    /// read everything).
    #[arg(long, value_parser = parse_size, default_value = "8M")]
    pub trace_buffer: u64,
}

/// How a pass chooses what to read (`--scan`).
#[derive(Debug, Args, Clone)]
pub struct ScanArg {
    /// What a pass reads: auto (read only the blocks `nightpass track`
    /// recorded since the previous pass when its record is unbroken,
    /// otherwise everything, saying why), full (everything), tracked
    /// (refuse, exit 2, unless the record is unbroken).
    #[arg(long, value_enum, default_value = "auto")]
    pub scan: ScanChoice,
    /// Percent of the chunks a change record says are unchanged that a
    /// tracked pass reads anyway and compares with the target: a chunk
    /// found changed ends the record and makes the pass read everything.
    /// Each pass audits another part, so at 1 the whole volume is audited
    /// every 100 passes; 0 audits nothing.
    #[arg(long, default_value_t = 1.0, value_parser = parse_percent)]
    pub audit: f64,
}

/// A percentage from 0 to 100.
fn parse_percent(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("'{s}' is not a percentage"))?;
    if (0.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s}: a percentage is from 0 to 100"))
    }
}

/// SOURCE and DEST of one volume, or the plan file of many.
#[derive(Debug, Args, Clone)]
pub struct Volumes {
    /// Source volume: a block device or an image file.
    #[arg(required_unless_present = "plan")]
    pub source: Option<PathBuf>,
    /// Destination: HOST:PORT/NAME (or, for verify, a local path).
    #[arg(required_unless_present = "plan")]
    pub dest: Option<String>,
    /// Every volume of a filer in one run: a plan file (TOML) instead of
    /// SOURCE and DEST.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["source", "dest"])]
    pub plan: Option<PathBuf>,
    /// With --plan: volumes in flight at once (wins over the plan's `jobs`).
    #[arg(long, value_name = "N", requires = "plan")]
    pub jobs: Option<usize>,
    /// With --plan: after this many failed volumes no new one starts (wins
    /// over the plan's `max_failures`).
    #[arg(long, value_name = "N", requires = "plan")]
    pub max_failures: Option<usize>,
}

impl Volumes {
    /// SOURCE and DEST, when no plan was given.
    pub fn single(&self) -> Option<(&std::path::Path, &str)> {
        match (&self.source, &self.dest) {
            (Some(s), Some(d)) if self.plan.is_none() => Some((s.as_path(), d.as_str())),
            _ => None,
        }
    }
}

/// `sync` flags.
#[derive(Debug, Args)]
pub struct SyncCmdArgs {
    #[command(flatten)]
    /// What to copy.
    pub volumes: Volumes,
    #[command(flatten)]
    /// The pass flags.
    pub sync: SyncArgs,
    #[command(flatten)]
    /// What the pass reads.
    pub scan: ScanArg,
    /// Scan and compare only: report what a pass would send; write and record nothing, on either side.
    #[arg(long)]
    pub dry_run: bool,
}

impl clap::ValueEnum for ScanChoice {
    fn value_variants<'a>() -> &'a [Self] {
        &[ScanChoice::Auto, ScanChoice::Full, ScanChoice::Tracked]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

/// `converge` flags.
#[derive(Debug, Args)]
pub struct ConvergeArgs {
    #[command(flatten)]
    /// What to copy.
    pub volumes: Volumes,
    #[command(flatten)]
    /// The pass flags.
    pub sync: SyncArgs,
    #[command(flatten)]
    /// What each pass reads.
    pub scan: ScanArg,
    /// The night window the frozen final pass must fit (e.g. 45m).
    #[arg(long, value_parser = parse_duration)]
    pub window: Duration,
    /// Stop after this many passes.
    #[arg(long, default_value_t = 10)]
    pub max_passes: u32,
    /// Pause between passes.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub interval: Duration,
    /// Safety margin: forecast × margin must fit the window.
    #[arg(long, default_value_t = 1.5)]
    pub margin: f64,
}

/// Congestion control (`--congestion`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Congestion {
    /// CUBIC, quinn's default.
    Cubic,
    /// BBR: measure it on your path first (README, "Performance").
    Bbr,
}

/// QUIC tuning flags.
#[derive(Debug, Args, Clone)]
pub struct QuicArgs {
    /// Congestion control.
    #[arg(long, value_enum, default_value_t = Congestion::Cubic)]
    pub congestion: Congestion,
    /// Flow-control window per connection (size it for bandwidth × delay).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub quic_window: u64,
}

impl QuicArgs {
    /// Typed tuning.
    pub fn tuning(&self) -> Tuning {
        Tuning::new(self.quic_window, self.congestion == Congestion::Bbr)
    }
}

/// How to reach and trust the receiver, shared by every sender command.
#[derive(Debug, Args, Clone)]
pub struct Endpoint {
    /// Identity directory [default: $NIGHTPASS_HOME/identity or ~/.config/nightpass/identity].
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// Sender state directory [default: $NIGHTPASS_HOME/state or ~/.local/state/nightpass].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Fingerprint of the receiver (required when DEST is remote; a plan
    /// names it itself).
    #[arg(long)]
    pub server_fingerprint: Option<String>,
    /// How long to wait for the receiver's first answer before failing
    /// (exit 3): a wrong host or port, or a firewall dropping UDP.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub connect_timeout: Duration,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics while the command runs.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_metrics_addr)]
    pub metrics: Option<std::net::SocketAddr>,
    #[command(flatten)]
    /// QUIC tuning.
    pub quic: QuicArgs,
}

impl Endpoint {
    /// The identity directory in force.
    pub fn identity_dir(&self) -> PathBuf {
        self.identity.clone().unwrap_or_else(default_identity_dir)
    }

    /// The state directory in force.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(default_state_dir)
    }

    /// Remote volume `dest` and its pinned fingerprint.
    pub fn remote(&self, dest: &str) -> Result<(RemoteVolume, String)> {
        let dest = RemoteVolume::parse(dest).ok_or_else(|| {
            Error::input(format!(
                "'{dest}' is not a remote volume (expected HOST:PORT/NAME, e.g. 10.0.0.2:7400/filer01)"
            ))
        })?;
        let fp = self.server_fingerprint.as_deref().ok_or_else(|| {
            Error::input(format!(
                "--server-fingerprint is required for {dest}: nightpass talks only to a receiver whose fingerprint it was given"
            ))
        })?;
        Ok((dest, parse_fingerprint(fp)?))
    }

    /// QUIC settings with this command's connect timeout.
    pub fn tuning(&self) -> Result<Tuning> {
        if self.connect_timeout.is_zero() {
            return Err(Error::input("--connect-timeout must be more than 0 s"));
        }
        Ok(Tuning {
            connect_timeout: self.connect_timeout,
            ..self.quic.tuning()
        })
    }
}

/// How the source is read, shared by every command that reads it.
#[derive(Debug, Args, Clone)]
pub struct ReadArgs {
    /// Limit source reads in bytes per second, to spare a production disk.
    #[arg(long, value_parser = parse_size)]
    pub read_limit: Option<u64>,
    /// Drop source pages from the page cache behind the reader (reads with
    /// pread; without it, blocks are read through memory maps).
    #[arg(long)]
    pub drop_cache: bool,
    /// Read the source with O_DIRECT, bypassing the page cache entirely
    /// (block devices; image files on filesystems that support it).
    #[arg(long)]
    pub direct: bool,
}

impl ReadArgs {
    /// Reader settings.
    pub fn scan(&self) -> ScanOptions {
        ScanOptions {
            workers: 0,
            read_limit: self.read_limit,
            drop_cache: self.drop_cache,
            direct: self.direct,
        }
    }
}

/// Flags of the commands that send passes (sync, converge, cutover).
#[derive(Debug, Args, Clone)]
pub struct SyncArgs {
    #[command(flatten)]
    /// The receiver.
    pub endpoint: Endpoint,
    #[command(flatten)]
    /// The source's reads.
    pub read: ReadArgs,
    /// Limit chunk payload bytes sent per second (e.g. 100M); with --plan,
    /// one limit for all the plan's volumes together (wins over the plan's
    /// `bwlimit`).
    #[arg(long, value_parser = parse_size)]
    pub bwlimit: Option<u64>,
    /// Chunk size, a power of two from 4K to 64M; effective on a volume's first pass.
    #[arg(long, value_parser = parse_chunk_size)]
    pub chunk_size: Option<ChunkSize>,
    /// Parallel QUIC data streams, 1 to 32 (default: enough streams of
    /// 2 MiB window each to fill --quic-window, 4 to 16; 16 streams keep
    /// 32 MiB in flight, enough for 2.5 Gbit/s at 100 ms round trip).
    #[arg(long)]
    pub streams: Option<usize>,
    /// Keep reconnecting this long after the link is lost, then fail (exit 3); 0 fails at once.
    /// A receiver that never answered is not retried: see --connect-timeout.
    #[arg(long, value_parser = parse_duration, default_value = "3m")]
    pub retry_for: Duration,
    /// Accept a SOURCE other than the one earlier passes of this volume
    /// read (the volume moved to another device).
    #[arg(long)]
    pub new_source: bool,
}

impl SyncArgs {
    /// The identity directory in force.
    pub fn identity_dir(&self) -> PathBuf {
        self.endpoint.identity_dir()
    }

    /// The state directory in force.
    pub fn state_dir(&self) -> PathBuf {
        self.endpoint.state_dir()
    }

    /// Reader settings.
    pub fn scan(&self) -> ScanOptions {
        self.read.scan()
    }
}

/// `verify` flags: what it compares, the receiver, and how the source is
/// read.
#[derive(Debug, Args, Clone)]
pub struct VerifyArgs {
    #[command(flatten)]
    /// What to compare.
    pub volumes: Volumes,
    #[command(flatten)]
    /// The receiver.
    pub endpoint: Endpoint,
    #[command(flatten)]
    /// The source's reads.
    pub read: ReadArgs,
    /// Chunk size of the comparison (default: the one the volume was copied
    /// with, else 64K).
    #[arg(long, value_parser = parse_chunk_size)]
    pub chunk_size: Option<ChunkSize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_runs_the_tuning_demo_and_bench_run() {
        let cli = Cli::parse_from(["nightpass", "sync", "a.img", "h:7400/v"]);
        let Command::Sync(args) = cli.command else {
            panic!("not a sync")
        };
        assert_eq!(args.scan.scan, ScanChoice::Auto);
        assert_eq!(args.sync.endpoint.quic.tuning(), Tuning::default());
        assert_eq!(Tuning::default().stream_window, 2 << 20);
        assert_eq!(Tuning::default().default_streams(), 16);
    }

    #[test]
    fn typed_values() {
        let cli = Cli::parse_from([
            "nightpass",
            "cutover",
            "a.img",
            "h:7400/v",
            "--lvm-snapshot",
            "--snapshot-size",
            "1G",
            "--verify",
            "none",
            "--congestion",
            "bbr",
        ]);
        let Command::Cutover(args) = cli.command else {
            panic!("not a cutover")
        };
        assert_eq!(args.verify, Proof::None);
        assert!(args.sync.endpoint.quic.tuning().bbr);
        assert!(matches!(
            args.method(),
            Some(crate::io::freeze::Method::LvmSnapshot { size }) if size == 1 << 30
        ));
        assert!(Cli::try_parse_from([
            "nightpass",
            "cutover",
            "a",
            "h:1/v",
            "--assume-frozen",
            "--verify",
            "half"
        ])
        .is_err());
    }

    #[test]
    fn a_plan_or_source_and_dest() {
        let p = |args: &[&str]| Cli::try_parse_from([&["nightpass"], args].concat());
        let cli = p(&["sync", "--plan", "f.toml"]).unwrap();
        assert!(cli.command.is_plan_run());
        let Command::Sync(a) = cli.command else {
            panic!("not a sync")
        };
        assert!(a.volumes.single().is_none());
        assert!(!p(&["sync", "a", "h:1/v"]).unwrap().command.is_plan_run());
        assert!(p(&["sync", "a", "h:1/v", "--plan", "f"]).is_err());
        assert!(p(&["sync", "a"]).is_err());
        assert!(p(&["verify", "--plan", "f"]).is_ok());
        assert!(p(&["converge", "--plan", "f", "--window", "1h"]).is_ok());
        assert!(p(&["status", "--plan", "f", "--window", "1h"]).is_ok());
        assert!(p(&["status", "--window", "1h"]).is_err());
        // The group cutover: the plan's freeze, or the command line's.
        assert!(p(&["cutover", "--plan", "f"]).is_ok());
        assert!(p(&["cutover", "--plan", "f", "--assume-frozen"]).is_ok());
        assert!(p(&["cutover", "a", "h:1/v", "--plan", "f"]).is_err());
        assert!(p(&[
            "cutover",
            "a",
            "h:1/v",
            "--fsfreeze",
            "/m",
            "--assume-frozen"
        ])
        .is_err());
        // verify lists only its own flags.
        assert!(p(&["verify", "a", "h:1/v", "--bwlimit", "1M"]).is_err());
        assert!(p(&["verify", "a", "h:1/v", "--retry-for", "1m"]).is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
