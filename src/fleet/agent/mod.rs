//! `nightpass fleet agent`: a sender host's worker.

use std::sync::Arc;

use super::DbSettings;
use crate::app::cli::AgentArgs;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(args: AgentArgs, db: DbSettings, progress: Arc<dyn Progress>) -> Result<i32> {
    let _ = (args, db, progress);
    Err(Error::input("fleet agent is not built yet"))
}
