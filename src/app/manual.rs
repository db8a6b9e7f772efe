//! `nightpass completions SHELL` and `nightpass man`: the command line
//! described for shells (clap_complete) and for `man` (clap_mangen), both
//! generated from the flags themselves, so they never drift from `--help`.
//!
//! Owns these two documents; runs nothing else.

use std::path::Path;

use clap::CommandFactory;
use serde_json::json;

use crate::app::cli::Cli;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// Prints the completion script for `shell` on stdout. Under `--json` it
/// refuses (exit 2): a script is not JSON.
pub fn completions(
    shell: clap_complete::Shell,
    json: bool,
    progress: &dyn Progress,
) -> Result<i32> {
    if json {
        return Err(Error::input(
            "completions prints a shell script, not JSON: run it without --json",
        ));
    }
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "nightpass", &mut script);
    let script = String::from_utf8(script)
        .map_err(|_| Error::Io("the completion script is not UTF-8".into()))?;
    progress.answer(script.trim_end());
    Ok(0)
}

/// Prints nightpass(1) as roff on stdout or, with `out`, writes
/// `nightpass.1` and one `nightpass-COMMAND.1` per command into that
/// directory (created when missing) and says which. Printing roff under
/// `--json` is refused (exit 2); writing pages under `--json` ends with a
/// `man_pages` event.
pub fn man(out: Option<&Path>, json: bool, progress: &dyn Progress) -> Result<i32> {
    let Some(dir) = out else {
        if json {
            return Err(Error::input(
                "man prints roff, not JSON: run it without --json, or give --out DIR",
            ));
        }
        let mut page = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut page)
            .map_err(|e| Error::io("rendering the manual page", e))?;
        let page = String::from_utf8(page)
            .map_err(|_| Error::Io("the manual page is not UTF-8".into()))?;
        progress.answer(page.trim_end());
        return Ok(0);
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .map_err(|e| Error::io(format!("writing manual pages to {}", dir.display()), e))?;
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir.display(), e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("nightpass") && n.ends_with(".1"))
        .collect();
    files.sort();
    progress.event(
        &json!({"event": "man_pages", "dir": dir.display().to_string(), "files": files}),
        &format!(
            "wrote {} manual pages to {} (nightpass.1 and one per command)",
            files.len(),
            dir.display()
        ),
    );
    Ok(0)
}
