//! The one test harness: everything a topic module needs to run real
//! `nightpass` processes against real files and devices.
//!
//! Parts by topic: [`processes`] (identities, `serve`, per-test worlds),
//! [`commands`] (the sender's commands, to completion or in the
//! background), [`events`] (a command's
//! `--json` events and the assertions made on them), [`files`] (random
//! data, checksums, byte comparison, manifests on disk), [`system`] (root,
//! tools, loop devices, mounts, ext4), [`postgres`] (a private PostgreSQL
//! server per test) and [`peer`] (a peer driven by hand
//! over QUIC). Every test owns its scratch directory, identities and
//! receiver, so tests run in parallel threads and share nothing.
//!
//! A test that needs root, a tool or a kernel feature asks [`need_root`]
//! (or [`skip`]): by hand it prints a loud SKIP line and returns early; under
//! `CI=true` it fails, since CI must run every test.
#![allow(dead_code)]

mod commands;
mod events;
mod files;
mod peer;
mod postgres;
mod processes;
mod system;

pub use commands::*;
pub use events::*;
pub use files::*;
pub use peer::*;
pub use postgres::*;
pub use processes::*;
pub use system::*;

use std::time::{Duration, Instant};

/// The default chunk size of the contract.
pub const CHUNK: u64 = 64 * 1024;
/// One mebibyte.
pub const MIB: u64 = 1024 * 1024;
/// Longest any one nightpass command may run before the test kills it and fails.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(240);

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_nightpass")
}

/// A scratch directory removed at the end of the test.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("np-night-")
        .tempdir()
        .expect("tempdir")
}

/// A test that cannot run here: a loud SKIP line by hand, a failure under
/// `CI=true` (CI must run every test, never skip one quietly). Returns
/// false, for `if !need_root(..) { return; }`.
pub fn skip(test: &str, why: &str) -> bool {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} cannot run: {why} (CI=true: a skipped test is a failure)");
    }
    eprintln!("SKIP {test}: {why}");
    false
}

/// True when running as root with the given tools on the PATH (and, when
/// `losetup` is among them, the loop driver loaded); otherwise [`skip`]s
/// naming `test` and what is missing (a failure under `CI=true`).
pub fn need_root(test: &str, tools: &[&str]) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip(test, "needs root (loop devices, mount, fsfreeze)");
    }
    if let Some(t) = tools.iter().find(|t| !have_tool(t)) {
        return skip(test, &format!("needs '{t}', which is not installed"));
    }
    if tools.contains(&"losetup") && !std::path::Path::new("/dev/loop-control").exists() {
        return skip(test, "needs the loop driver (/dev/loop-control is missing)");
    }
    true
}

/// Waits until `f` is true or `limit` passes.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}
