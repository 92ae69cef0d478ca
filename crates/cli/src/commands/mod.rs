//! One function per command, by concern: reading (`read.rs`), writing (`write.rs`), the
//! operator's (`admin.rs`); `export`/`import` are in `transfer.rs`, `serve` in `serve/`,
//! `demo` in `demo.rs`. Here: running a command and closing the stores it opened.

mod admin;
mod read;
mod write;

use std::time::Duration;

use serde_json::json;
use taskhistory_core::validate;
use taskhistory_core::{EventCursor, HistoryScan, TaskCursor, TaskQuery};
use taskhistory_postgres::CleanupOptions;

use crate::args::{Cli, Command};
use crate::error::{exit, CliError};
use crate::interrupt::Interrupt;
use crate::output::Output;
use crate::setup::{Backend, Opened};
use crate::{demo, serve, transfer};

/// Runs the command, then closes the stores it opened; returns the exit code.
pub(crate) async fn run(cli: Cli) -> Result<u8, CliError> {
    let opened = Opened::default();
    let outcome = dispatch(cli, &opened).await;
    opened.close_all().await;
    outcome
}

/// Runs one command; the stores it opens are kept in `opened`.
async fn dispatch(cli: Cli, opened: &Opened) -> Result<u8, CliError> {
    let out = Output { json: cli.json };
    let db = &cli.db;
    match cli.command {
        Command::Demo => demo::run(db, out).await,
        Command::Token { user, ttl, max_ttl } => {
            validate::user_id(&user)?;
            let token = serve::issue(&user, ttl, max_ttl)?;
            if out.json {
                out.json(&json!({"user_id": user, "token": token, "ttl_secs": ttl.as_secs()}))?;
            } else {
                out.line(&token)?;
            }
            Ok(exit::OK)
        }
        Command::Serve {
            listen,
            tls_cert,
            tls_key,
            cors_origins,
            heartbeat,
            limits,
        } => {
            let backend = opened.open(db).await?;
            let pg = match &backend {
                Backend::Postgres(pg) => Some(pg.clone()),
                Backend::Memory(_) => None,
            };
            let options = serve::Options {
                listen,
                tls: tls_cert.zip(tls_key),
                cors_origins,
                heartbeat: Duration::from_secs(heartbeat.max(1)),
                limits,
            };
            serve::run(backend.store(), pg, options).await
        }
        Command::Health => admin::health(db, opened, out).await,
        Command::Migrate { status } => {
            let backend = opened.open(db).await?;
            admin::migrate(&backend, status, out).await
        }
        Command::Stats { queries, limit } => {
            let backend = opened.open(db).await?;
            let pg = backend.postgres("stats")?;
            if queries {
                admin::query_stats(pg, limit, out).await
            } else {
                admin::stats(pg, out).await
            }
        }
        Command::Compat { action } => {
            let backend = opened.open(db).await?;
            admin::compat(backend.postgres("compat")?, action, out).await
        }
        Command::Isolation { action } => {
            let backend = opened.open(db).await?;
            admin::isolation(backend.postgres("isolation")?, action, out).await
        }
        Command::Partitions { action } => {
            let backend = opened.open(db).await?;
            admin::partitions(backend.postgres("partitions")?, action, out).await
        }
        Command::Explain {
            user,
            task,
            analyze,
        } => {
            validate::task(&user, &task)?;
            let backend = opened.open(db).await?;
            admin::explain(backend.postgres("explain")?, &user, &task, analyze, out).await
        }
        Command::History { user, task } => {
            validate::task(&user, &task)?;
            read::history(&opened.open(db).await?.store(), &user, &task, out).await
        }
        Command::Status { user, task } => {
            validate::task(&user, &task)?;
            read::status(&opened.open(db).await?.store(), &user, &task, out).await
        }
        Command::Tasks {
            user,
            limit,
            cursor,
            status,
            updated_after,
            updated_before,
            prefix,
        } => {
            let after = cursor.map(|c| c.parse::<TaskCursor>()).transpose()?;
            let mut query = TaskQuery::first(limit).after(after);
            query.status = status;
            query.updated_after = updated_after;
            query.updated_before = updated_before;
            query.task_id_prefix = prefix;
            validate::list(&user, &query)?;
            read::tasks(&opened.open(db).await?.store(), &user, &query, out).await
        }
        Command::Counts { user } => {
            validate::user_id(&user)?;
            read::counts(&opened.open(db).await?.store(), &user, out).await
        }
        Command::Activity { user, from, to } => {
            validate::user_id(&user)?;
            let (from, to) = serve::activity_span(from, to, chrono::Utc::now());
            validate::activity(&user, from, to)?;
            read::activity(&opened.open(db).await?.store(), &user, from, to, out).await
        }
        Command::Cancel { user, task } => {
            validate::task(&user, &task)?;
            write::cancel(&opened.open(db).await?.store(), &user, &task, out).await
        }
        Command::Cleanup {
            days,
            dry_run,
            batch_size,
            time_limit,
            status,
        } => {
            validate::days(days)?;
            let time_limit = time_limit
                .map(|s| {
                    Duration::try_from_secs_f64(s)
                        .ok()
                        .filter(|d| !d.is_zero())
                        .ok_or_else(|| {
                            CliError::BadInput(format!(
                                "--time-limit {s}: expected a positive number of seconds"
                            ))
                        })
                })
                .transpose()?;
            let options = CleanupOptions {
                batch_size,
                time_limit,
                dry_run,
                status,
            };
            admin::cleanup(&opened.open(db).await?, days, options, out).await
        }
        Command::Export { user, task, output } => {
            let scan = match &task {
                Some(t) => HistoryScan::task(t, transfer::PAGE),
                None => HistoryScan::all(transfer::PAGE),
            };
            validate::scan(&user, &scan)?;
            let store = opened.open(db).await?.store();
            let interrupt = Interrupt::install();
            transfer::export(&store, &user, scan, output.as_deref(), &interrupt, out).await
        }
        Command::Watch {
            user,
            task,
            count,
            after,
        } => {
            match &task {
                Some(t) => validate::task(&user, t)?,
                None => validate::user_id(&user)?,
            }
            let after = after.map(|c| EventCursor::parse(&c)).transpose()?;
            let store = opened.open(db).await?.store();
            read::watch(&store, &user, task.as_deref(), after, count, out).await
        }
        Command::Import { file, batch_size } => {
            if !(1..=100_000).contains(&batch_size) {
                return Err(CliError::BadInput(format!(
                    "--batch-size {batch_size}: it must be between 1 and 100000"
                )));
            }
            let store = opened.open(db).await?.store();
            let interrupt = Interrupt::install();
            transfer::import(&store, &file, batch_size, &interrupt, out).await
        }
    }
}
