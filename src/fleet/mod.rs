//! A fleet of filers coordinated through PostgreSQL: the shared state
//! table every host's agent works from, and the operator's commands on it.
//!
//! Owns the fleet's database: how nightpass reaches it ([`db`]: the
//! connection string from `--db` or `NIGHTPASS_DB`, a small pool, every
//! query bounded by a timeout), its schema and versioned migrations
//! ([`schema`]), the operator's commands `fleet init | add | status |
//! pause | resume | limits | schedule` ([`ops`]), the leases with fencing
//! tokens under which an agent claims and changes a volume ([`lease`]),
//! what a pass leaves in the database and the state machine it drives
//! ([`record`]), a filer's night ([`night`]), and the agent that does a
//! sender host's work ([`agent`]). It sits beside [`crate::app`]: it reads
//! plan files through [`crate::app::plan::Plan`], runs passes and group
//! cutovers only through the sender's own machinery
//! ([`crate::pass::sender::run_pass`],
//! [`crate::app::cutover::group::group_cutover`]), and speaks to the
//! operator through [`crate::progress`]; `app::commands` dispatches to it.
//! It must not speak the protocol or write a volume itself. Only
//! [`agent`] runs passes; every SQL statement is in the other modules.

pub mod agent;
pub mod db;
pub mod lease;
pub mod night;
pub mod ops;
pub mod record;
pub mod schema;
pub mod tls;

pub use db::{DbSettings, Pool};

use std::sync::Arc;

use crate::app::cli::{FleetArgs, FleetCommand};
use crate::error::Result;
use crate::progress::Progress;

/// Runs `nightpass fleet …`; `Ok(0)` when done.
///
/// `every`: how often an agent's pass says how far it is
/// (`--progress-interval`; 0: never).
pub async fn run(
    args: FleetArgs,
    progress: Arc<dyn Progress>,
    every: std::time::Duration,
) -> Result<i32> {
    let settings = DbSettings::resolve(args.db.as_deref(), args.db_wait, args.db_timeout)?
        .with_ca(args.db_ca.as_deref())?;
    if let FleetCommand::Agent(a) = args.command {
        return agent::run(*a, settings, progress, every).await;
    }
    let progress = progress.as_ref();
    // One connection at a time is all an operator's command needs.
    let pool = Pool::new(settings, 1);
    match args.command {
        FleetCommand::Init => {
            let m = schema::init(&pool).await?;
            let human = if m.from == m.to {
                format!("fleet schema at version {}: nothing to do", m.to)
            } else if m.from == 0 {
                format!("fleet schema created (version {})", m.to)
            } else {
                format!("fleet schema upgraded from version {} to {}", m.from, m.to)
            };
            progress.event(
                &serde_json::json!({
                    "event": "fleet_schema",
                    "database": pool.target(),
                    "from_version": m.from,
                    "version": m.to,
                    "changed": m.from != m.to,
                }),
                &human,
            );
        }
        FleetCommand::Add {
            plan,
            filer,
            host,
            replace,
        } => {
            let req = ops::AddRequest {
                plan: &plan,
                filer,
                host,
                replace,
            };
            ops::add(&pool, req, progress).await?;
        }
        FleetCommand::Status => ops::status(&pool, progress).await?,
        FleetCommand::Limits(l) => ops::limits(&pool, &l, progress).await?,
        FleetCommand::Agent(_) => unreachable!("the agent ran above"),
        FleetCommand::Pause { reason } => {
            ops::set_paused(&pool, true, reason.as_deref(), progress).await?
        }
        FleetCommand::Resume => ops::set_paused(&pool, false, None, progress).await?,
        FleetCommand::Remove { filer, force } => {
            ops::remove(&pool, &filer, force, progress).await?
        }
        FleetCommand::Schedule { filer, at, window } => {
            let at = ops::parse_at(&at)?;
            ops::schedule(&pool, &filer, &at, window, progress).await?
        }
    }
    Ok(0)
}
