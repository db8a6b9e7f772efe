//! The `nightpass` binary: parse, install the log, run, map errors to exit
//! statuses and print them. Everything else lives in the library, which
//! never prints: operator output goes through `nightpass::progress`, and
//! diagnostics and the receiver's log through `tracing`, written here to
//! stderr in the format of `nightpass::app::log`. System calls that need `unsafe` go through the safe wrappers of
//! `nightpass::io::sys`.
#![deny(unsafe_code)]

use clap::Parser;
use nightpass::app::cli::Cli;
use nightpass::app::commands;
use nightpass::app::log;
use nightpass::error::Error;
use nightpass::io::sys;
use nightpass::net::transport;
use serde_json::json;
use tokio::signal::unix::SignalKind;

/// Resolves when the process receives signal `kind`.
async fn signal(kind: tokio::signal::unix::SignalKind) {
    match tokio::signal::unix::signal(kind) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

/// Whether `--json` is on the command line (before a `--`): known before
/// clap has parsed it, so that a usage error can be a JSON event too.
fn json_asked() -> bool {
    std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

/// Parses the command line. A usage error prints clap's text on stderr,
/// and under `--json` an `error` event on stdout as well, then exits 2;
/// `--help` and `--version` print and exit 0 as clap does.
fn parse() -> Cli {
    let e = match Cli::try_parse() {
        Ok(cli) => return cli,
        Err(e) => e,
    };
    if !e.use_stderr() {
        // --help, --version: not an error.
        let _ = e.print();
        std::process::exit(0);
    }
    let _ = e.print();
    if json_asked() {
        let rendered = e.to_string();
        let text = usage_message(&rendered);
        let message = if text.is_empty() {
            "invalid command line"
        } else {
            text.as_str()
        };
        println!(
            "{}",
            nightpass::progress::with_ts(
                json!({"event": "error", "message": message, "exit_code": 2})
            )
        );
    }
    std::process::exit(2);
}

/// The exit status of a command that ended, its error reported.
fn finish(json: bool, r: nightpass::error::Result<i32>) -> i32 {
    match r {
        Ok(code) => code,
        Err(e) => {
            report_error(json, &e);
            e.exit_code()
        }
    }
}

/// A signal arrived: the command is dropped (its guards run, a frozen
/// source is thawed) and the process exits `code`, unless the command is
/// recording a cutover's consistency points on the receiver, a few round
/// trips that would otherwise leave a group sealed in part: then it ends
/// first, and its own status stands.
async fn interrupted(
    json: bool,
    command: std::pin::Pin<&mut impl std::future::Future<Output = nightpass::error::Result<i32>>>,
    code: i32,
) -> i32 {
    if nightpass::app::cutover::recording() {
        eprintln!("nightpass: interrupted while recording the consistency points on the receiver: finishing that first");
        return finish(json, command.await);
    }
    report_error(json, &Error::Interrupted);
    code
}

/// clap's error text without its usage and help lines, on one line: the
/// error and what it names (a missing argument is listed on the lines
/// after "the following required arguments were not provided:").
fn usage_message(rendered: &str) -> String {
    rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .map(|l| l.trim_start_matches("error:").trim())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prints an error as docs/CLI.md says: text on stderr, and an `error` event on
/// stdout in JSON mode.
fn report_error(json: bool, e: &Error) {
    eprintln!("nightpass: error: {e}");
    if json {
        println!(
            "{}",
            nightpass::progress::with_ts(
                json!({"event": "error", "message": e.to_string(), "exit_code": e.exit_code()})
            )
        );
    }
}

fn main() {
    // A closed stdout (e.g. `| head`) must end us quietly, not with a panic.
    sys::default_sigpipe();
    let cli = parse();
    let json = cli.json;
    // `serve`, `track` and `fleet agent` shut down gracefully on their own
    // signals; everything else stops at once.
    let own_signals = matches!(
        cli.command,
        nightpass::app::cli::Command::Serve(_) | nightpass::app::cli::Command::Track(_)
    ) || cli.command.is_agent();
    // The daemons' lines carry their time (or the journal's priority); the
    // sender's read as bare messages, as docs/CLI.md quotes them (with the
    // journal's priority under systemd).
    log::install(if own_signals {
        log::Style::daemon()
    } else {
        log::Style::sender()
    });
    // A plan run presses its own red button on SIGINT/SIGTERM: the first
    // stops starting volumes, the second drops those in flight.
    let plan_signals = cli.command.is_plan_run();
    if own_signals {
        // A receiver outlives the terminal or ssh session that started it:
        // a hang-up must not end it (and the sessions it serves).
        sys::ignore_sighup();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            report_error(json, &Error::Io(format!("cannot start the runtime: {e}")));
            std::process::exit(3);
        }
    };
    let code = rt.block_on(async {
        let command = commands::run(cli);
        tokio::pin!(command);
        let code = tokio::select! {
            r = &mut command => finish(json, r),
            // Dropping the command's future runs its guards: a frozen source is thawed.
            _ = tokio::signal::ctrl_c(), if !own_signals && !plan_signals => {
                interrupted(json, command, 130).await
            }
            _ = signal(SignalKind::terminate()), if !own_signals && !plan_signals => {
                interrupted(json, command, 143).await
            }
            // A cutover whose ssh session drops must thaw, not die frozen.
            _ = signal(SignalKind::hangup()), if !own_signals => {
                interrupted(json, command, 129).await
            }
        };
        if matches!(code, 129 | 130 | 143) {
            // The command's future is gone (its guards ran); tell the
            // receivers at once, so they free the volume for a rerun.
            transport::close_clients("sender interrupted", std::time::Duration::from_secs(1)).await;
        }
        code
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    std::process::exit(code);
}
