//! The `nightpass` binary: parse, run, map errors to exit statuses.
//! Everything else lives in the library; system calls that need `unsafe`
//! go through the safe wrappers of `nightpass::io::sys`.
#![deny(unsafe_code)]

use clap::Parser;
use nightpass::app::cli::Cli;
use nightpass::app::commands;
use nightpass::error::Error;
use nightpass::io::sys;
use nightpass::net::transport;
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

fn main() {
    // A closed stdout (e.g. `| head`) must end us quietly, not with a panic.
    sys::default_sigpipe();
    let cli = Cli::parse();
    let json = cli.json;
    // `serve` shuts down gracefully on its own signals; everything else stops at once.
    let own_signals = matches!(cli.command, nightpass::app::cli::Command::Serve(_));
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
            commands::report_error(json, &Error::Io(format!("cannot start the runtime: {e}")));
            std::process::exit(3);
        }
    };
    let code = rt.block_on(async {
        let code = tokio::select! {
            r = commands::run(cli) => match r {
                Ok(code) => code,
                Err(e) => {
                    commands::report_error(json, &e);
                    e.exit_code()
                }
            },
            // Dropping the command's future runs its guards: a frozen source is thawed.
            _ = tokio::signal::ctrl_c(), if !own_signals => {
                commands::report_error(json, &Error::Interrupted);
                130
            }
            _ = signal(SignalKind::terminate()), if !own_signals => {
                commands::report_error(json, &Error::Interrupted);
                143
            }
            // A cutover whose ssh session drops must thaw, not die frozen.
            _ = signal(SignalKind::hangup()), if !own_signals => {
                commands::report_error(json, &Error::Interrupted);
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
