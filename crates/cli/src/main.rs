//! `taskhistory`: the operator tool of the taskhistory store.
//!
//! What it is for: running the store by hand or from cron: apply migrations, check health,
//! read statistics, look at a user's tasks and histories, cancel a task, clean up expired
//! tasks, back a user's history up as JSON Lines and restore it, and show the seed's
//! scenarios end to end (`demo`). It reads the same configuration as the library
//! (`DATABASE_URL` or `DB_HOST`, `DB_PORT`, ...; flags over environment over defaults).
//!
//! `taskhistory serve` serves the history over HTTP (JSON, SSE, WebSocket, a dashboard) to
//! browsers and other services.
//!
//! What it is not for: a service's own writes (services link the library), or ad-hoc SQL
//! (use `psql`). Every other command is one short-lived process with a small pool.

mod args;
mod commands;
mod demo;
mod error;
mod interrupt;
mod output;
mod progress;
mod serve;
mod setup;
mod telemetry;
mod transfer;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let mut cli = args::Cli::parse();
    cli.db.serving = matches!(cli.command, args::Command::Serve { .. });
    let json = cli.json;
    // The process's one TLS crypto provider (ring): the server's TLS, the OTLP exporter's
    // HTTP client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Dropped when main returns: the exported spans are flushed.
    let _telemetry = telemetry::init(cli.db.serving);
    // `serve` answers many clients at once: every core. Other commands are one short
    // sequence of calls: one thread.
    let mut builder = if matches!(cli.command, args::Command::Serve { .. }) {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("taskhistory: cannot start the async runtime: {e}");
            return ExitCode::from(error::exit::OTHER);
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => ExitCode::from(code),
        // A reader that stopped early (`| head`) is not a failure of the tool.
        Err(error::CliError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            ExitCode::from(error::exit::OK)
        }
        Err(e) => {
            let hint = e.hint();
            if json {
                // One JSON object on stderr (stdout stays the command's data).
                let error = serde_json::json!({
                    "error": {
                        "class": e.class(),
                        "exit_code": e.exit_code(),
                        "message": e.to_string(),
                        "hint": hint,
                    }
                });
                eprintln!("{error}");
            } else {
                eprintln!("taskhistory: {e}");
                if let Some(hint) = hint {
                    eprintln!("hint: {hint}");
                }
            }
            ExitCode::from(e.exit_code())
        }
    }
}
