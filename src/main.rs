//! The `nightpass` binary: parse, install the log, run, map errors to exit
//! statuses and print them. Everything else lives in the library, which
//! never prints: operator output goes through `nightpass::progress`, and
//! diagnostics and the receiver's log through `tracing`, written here to
//! stderr. System calls that need `unsafe` go through the safe wrappers of
//! `nightpass::io::sys`.
#![deny(unsafe_code)]

use clap::Parser;
use nightpass::app::cli::Cli;
use nightpass::app::commands;
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

/// Installs the one logging path: this crate's `tracing` events at INFO and
/// above go to stderr as their bare message, with no level, target or time,
/// so the lines docs/CLI.md quotes (`listening on ADDR fingerprint FP`, the
/// receiver's log of refused and ended sessions and cutovers, warnings)
/// read as they always have. They are written in every mode: `--quiet` and
/// `--json` govern stdout and the bars, not the log. Other crates' events
/// (quinn's) stay silent, as before there was a subscriber.
fn install_log() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let ours = tracing_subscriber::filter::Targets::new()
        .with_target(env!("CARGO_CRATE_NAME"), tracing::Level::INFO);
    let plain = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_level(false)
        .with_target(false);
    // Only fails when a subscriber is already installed: keep that one.
    let _ = tracing_subscriber::registry()
        .with(plain)
        .with(ours)
        .try_init();
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
    install_log();
    let cli = Cli::parse();
    let json = cli.json;
    // `serve` shuts down gracefully on its own signals; everything else stops at once.
    let own_signals = matches!(
        cli.command,
        nightpass::app::cli::Command::Serve(_) | nightpass::app::cli::Command::Track(_)
    );
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
        let code = tokio::select! {
            r = commands::run(cli) => match r {
                Ok(code) => code,
                Err(e) => {
                    report_error(json, &e);
                    e.exit_code()
                }
            },
            // Dropping the command's future runs its guards: a frozen source is thawed.
            _ = tokio::signal::ctrl_c(), if !own_signals && !plan_signals => {
                report_error(json, &Error::Interrupted);
                130
            }
            _ = signal(SignalKind::terminate()), if !own_signals && !plan_signals => {
                report_error(json, &Error::Interrupted);
                143
            }
            // A cutover whose ssh session drops must thaw, not die frozen.
            _ = signal(SignalKind::hangup()), if !own_signals => {
                report_error(json, &Error::Interrupted);
                129
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
