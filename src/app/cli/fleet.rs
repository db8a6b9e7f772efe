//! `nightpass fleet`'s flags: the database and the fleet's subcommands
//! (their work is [`crate::fleet`]'s).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::values::parse_duration;
use super::{ScanArg, SyncArgs};

/// `nightpass fleet`: the database flags every fleet subcommand shares.
#[derive(Debug, Args)]
pub struct FleetArgs {
    /// The fleet's PostgreSQL database: a connection string
    /// (`host=/run/postgresql dbname=nightpass`) or a `postgres://` URL;
    /// read from NIGHTPASS_DB when not given (better: `ps` shows a command
    /// line, so never put a password here).
    #[arg(long, global = true, value_name = "URL")]
    pub db: Option<String>,
    /// A PEM file of the CA that signed the database's TLS certificate,
    /// trusted besides the system's (also NIGHTPASS_DB_CA, or libpq's
    /// sslrootcert= in the connection string).
    #[arg(long, global = true, value_name = "FILE")]
    pub db_ca: Option<PathBuf>,
    /// How long to keep trying to reach the database before giving up
    /// (exit 3).
    #[arg(long, global = true, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub db_wait: Duration,
    /// The longest one database query may take (exit 3 past it).
    #[arg(long, global = true, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub db_timeout: Duration,
    /// What to do.
    #[command(subcommand)]
    pub command: FleetCommand,
}

/// The fleet's subcommands.
#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Create or upgrade the fleet's schema (running it again changes nothing).
    Init,
    /// Register a filer from its plan file: its volumes become pending.
    Add {
        /// The filer's plan file (checked as `sync --plan` checks it).
        plan: PathBuf,
        /// The filer's name [default: the plan's file stem].
        #[arg(long)]
        filer: Option<String>,
        /// The sender host that reads the filer's sources [default: this
        /// machine's host name].
        #[arg(long)]
        host: Option<String>,
        /// Register anew a filer already there, while none of its volumes
        /// has started.
        #[arg(long)]
        replace: bool,
    },
    /// On a sender host: claim that host's volumes under leases, run
    /// their passes, and cut each scheduled filer over when its night
    /// comes, until SIGINT or SIGTERM.
    Agent(Box<AgentArgs>),
    /// The fleet's state: paused or not, then one line per volume.
    Status,
    /// Show or change the fleet's limits: passes in flight, the error
    /// threshold that presses the red button, and the retry policy.
    Limits(LimitsArgs),
    /// The red button: no new pass starts anywhere until `fleet resume`.
    Pause {
        /// Why, for `fleet status` and the other operators.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift `fleet pause`; retry the failed volumes and nights.
    Resume,
    /// Remove a filer added by mistake, with its volumes and their rows
    /// (never while an agent works on one of them).
    Remove {
        /// The filer's name in the fleet.
        filer: String,
        /// Remove a filer that was cut over too (its rows are the record
        /// of its migration).
        #[arg(long)]
        force: bool,
    },
    /// The night of a filer's group cutover.
    Schedule {
        /// The filer's name in the fleet.
        filer: String,
        /// When the window opens: RFC 3339 (2026-12-03T01:00:00Z) or local
        /// `YYYY-MM-DD HH:MM`.
        #[arg(long)]
        at: String,
        /// How long the window lasts (e.g. 2h).
        #[arg(long, value_parser = parse_duration)]
        window: Duration,
    },
}

/// `fleet agent`'s flags: which host's work, how it holds leases, how
/// often it passes, and the sender's own flags for every pass.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The host whose volumes this agent works (as `fleet add --host`
    /// registered them) [default: this machine's host name].
    #[arg(long)]
    pub host: Option<String>,
    /// This agent's name in leases and history [default:
    /// HOST:PID:RANDOM, unique per process].
    #[arg(long)]
    pub name: Option<String>,
    /// Passes this agent runs at once (the fleet's limits apply on top).
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// How long a lease lasts unless renewed (renewed every third of it):
    /// a killed agent's volumes wait this long before another takes them.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub lease: Duration,
    /// How often an idle agent looks for work and for an opening night.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub poll: Duration,
    /// Wait between two passes of a volume still converging.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Wait between two passes of a volume that is ready (its final pass
    /// fits its night): it is kept close until the night.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub ready_interval: Duration,
    /// The night a filer with no `fleet schedule` is judged against when
    /// deciding whether its volumes are ready.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub window: Duration,
    /// Safety factor on forecasts: ready when forecast × margin fits the
    /// volume's share of the night.
    #[arg(long, default_value_t = 1.2)]
    pub margin: f64,
    #[command(flatten)]
    /// The sender's flags for every pass.
    pub sync: SyncArgs,
    #[command(flatten)]
    /// What each pass reads.
    pub scan: ScanArg,
}

/// `fleet limits`' flags: each changes one limit; none given shows them.
#[derive(Debug, Args)]
pub struct LimitsArgs {
    /// Passes in flight in the whole fleet (0: no limit).
    #[arg(long, value_name = "N")]
    pub max_passes: Option<u32>,
    /// Passes in flight per filer (0: the filer's plan `jobs`).
    #[arg(long, value_name = "N")]
    pub per_filer: Option<u32>,
    /// Passes in flight per sender host (0: no limit).
    #[arg(long, value_name = "N")]
    pub per_host: Option<u32>,
    /// Passes in flight per receiver (0: no limit).
    #[arg(long, value_name = "N")]
    pub per_receiver: Option<u32>,
    /// Failures among the last --error-window passes that pause the fleet
    /// by themselves.
    #[arg(long, value_name = "N")]
    pub error_threshold: Option<u32>,
    /// How many of the fleet's last passes the error threshold counts in.
    #[arg(long, value_name = "N")]
    pub error_window: Option<u32>,
    /// Attempts a failing volume gets before it waits for an operator.
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
    /// Wait before a failed volume's first retry; doubled at each further
    /// failure, at most 1h.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub retry_after: Option<Duration>,
}
