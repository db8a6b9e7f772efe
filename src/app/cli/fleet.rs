//! `nightpass fleet`'s flags: the database and the fleet's subcommands
//! (their work is [`crate::fleet`]'s).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::values::parse_duration;

/// `nightpass fleet`: the database flags every fleet subcommand shares.
#[derive(Debug, Args)]
pub struct FleetArgs {
    /// The fleet's PostgreSQL database: a connection string
    /// (`host=/run/postgresql dbname=nightpass`) or a `postgres://` URL;
    /// read from NIGHTPASS_DB when not given (better: `ps` shows a command
    /// line, so never put a password here).
    #[arg(long, global = true, value_name = "URL")]
    pub db: Option<String>,
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
    /// The fleet's state: paused or not, then one line per volume.
    Status,
    /// The red button: no new pass starts anywhere until `fleet resume`.
    Pause {
        /// Why, for `fleet status` and the other operators.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift `fleet pause`.
    Resume,
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
