//! One function per command.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use taskhistory_core::validate;
use taskhistory_core::{
    DynStore, EventCursor, HistoryScan, StoreError, TaskCursor, TaskHistoryStore, TaskQuery,
};
use taskhistory_memory::MemoryStore;
use taskhistory_postgres::{CleanupOptions, Layout, Partitioning, PgConfig, PgTaskHistoryStore};

use crate::args::{Cli, Command, CompatAction, DbArgs, PartitionsAction};
use crate::error::{exit, CliError};
use crate::interrupt::Interrupt;
use crate::output::{bytes, clip, maybe_time, time, Output};
use crate::progress::Progress;
use crate::{demo, serve, transfer};

/// The store a command works on.
pub(crate) enum Backend {
    /// An empty in-memory store (`--memory`, and `demo` by default).
    Memory(MemoryStore),
    /// PostgreSQL.
    Postgres(PgTaskHistoryStore),
}

impl Backend {
    /// The store as the trait object every command but a few PostgreSQL-only ones uses.
    pub(crate) fn store(&self) -> DynStore {
        match self {
            Backend::Memory(m) => Arc::new(m.clone()),
            Backend::Postgres(p) => Arc::new(p.clone()),
        }
    }

    fn postgres(&self, command: &str) -> Result<&PgTaskHistoryStore, CliError> {
        match self {
            Backend::Postgres(p) => Ok(p),
            Backend::Memory(_) => Err(CliError::Other(format!(
                "{command} needs PostgreSQL; drop --memory"
            ))),
        }
    }
}

/// The settings that name a server; without one of them there is no database to use
/// (the library's defaults, `postgres@localhost/postgres`, are not a guess the tool makes).
const SERVER_SETTINGS: [&str; 6] = [
    "DATABASE_URL",
    "DB_HOST",
    "DB_PORT",
    "DB_NAME",
    "DB_USER",
    "DB_PASSWORD",
];

/// The PostgreSQL configuration: flags over environment over defaults.
pub(crate) fn pg_config(db: &DbArgs) -> Result<PgConfig, CliError> {
    if SERVER_SETTINGS.iter().all(|k| db.lookup(k).is_none()) {
        return Err(CliError::Config(
            "no database configured: set DATABASE_URL (postgres://user:password@host:5432/db) \
             or DB_HOST and DB_NAME (with DB_PORT, DB_USER, DB_PASSWORD), or pass \
             --database-url; --memory tries the commands on an empty in-memory store"
                .to_owned(),
        ));
    }
    let config = PgConfig::from_lookup(|key| db.lookup(key))
        .and_then(|config| config.validate().map(|()| config));
    config.map_err(|e| match e {
        // A setting given as a flag is named as the user typed it.
        StoreError::Configuration { setting, reason } => {
            let flag = match setting.as_str() {
                "DATABASE_URL" if db.database_url.is_some() => "--database-url",
                "DB_SCHEMA" if db.schema.is_some() => "--schema",
                "DB_SSLMODE" if db.sslmode.is_some() => "--sslmode",
                "DB_SSLROOTCERT" if db.sslrootcert.is_some() => "--sslrootcert",
                "DB_COMMAND_TIMEOUT" if db.command_timeout.is_some() => "--command-timeout",
                "DB_CONNECT_TIMEOUT" if db.connect_timeout.is_some() => "--connect-timeout",
                _ => setting.as_str(),
            };
            CliError::Store(StoreError::configuration(flag, reason))
        }
        other => CliError::Store(other),
    })
}

/// Every store a command opened. They are closed before the process exits, so the wake-ups
/// of its last writes leave for other processes' watchers at once (else those watchers
/// would see the writes only at their next poll).
static OPENED: std::sync::Mutex<Vec<DynStore>> = std::sync::Mutex::new(Vec::new());

async fn open(db: &DbArgs) -> Result<Backend, CliError> {
    let backend = if db.memory {
        Backend::Memory(MemoryStore::new())
    } else {
        Backend::Postgres(PgTaskHistoryStore::connect(pg_config(db)?).await?)
    };
    OPENED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(backend.store());
    Ok(backend)
}

/// Runs the command, then closes the stores it opened; returns the exit code.
pub(crate) async fn run(cli: Cli) -> Result<u8, CliError> {
    let outcome = dispatch(cli).await;
    let opened = std::mem::take(&mut *OPENED.lock().unwrap_or_else(|p| p.into_inner()));
    for store in opened {
        store.close().await;
    }
    outcome
}

async fn dispatch(cli: Cli) -> Result<u8, CliError> {
    let out = Output { json: cli.json };
    let db = &cli.db;
    match cli.command {
        Command::Demo => demo::run(db, out).await,
        Command::Token { user, ttl, max_ttl } => {
            validate::user_id(&user)?;
            let secret = std::env::var("TASKHISTORY_SECRET")
                .ok()
                .filter(|s| s.len() >= serve::MIN_SECRET)
                .ok_or_else(|| {
                    CliError::Config(format!(
                        "TASKHISTORY_SECRET must be set to the server's signing secret (at \
                         least {} bytes, e.g. from `openssl rand -hex 32`)",
                        serve::MIN_SECRET
                    ))
                })?;
            let token = serve::issue(secret.as_bytes(), &user, ttl, max_ttl)?;
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
            let backend = open(db).await?;
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
        Command::Health => health(db, out).await,
        Command::Migrate { status } => {
            let backend = open(db).await?;
            migrate(&backend, status, out).await
        }
        Command::Stats { queries, limit } => {
            let backend = open(db).await?;
            let pg = backend.postgres("stats")?;
            if queries {
                query_stats(pg, limit, out).await
            } else {
                stats(pg, out).await
            }
        }
        Command::Compat { action } => {
            let backend = open(db).await?;
            compat(backend.postgres("compat")?, action, out).await
        }
        Command::Partitions { action } => {
            let backend = open(db).await?;
            partitions(backend.postgres("partitions")?, action, out).await
        }
        Command::Explain {
            user,
            task,
            analyze,
        } => {
            validate::task(&user, &task)?;
            let backend = open(db).await?;
            explain(backend.postgres("explain")?, &user, &task, analyze, out).await
        }
        Command::History { user, task } => {
            validate::task(&user, &task)?;
            history(&open(db).await?.store(), &user, &task, out).await
        }
        Command::Status { user, task } => {
            validate::task(&user, &task)?;
            status(&open(db).await?.store(), &user, &task, out).await
        }
        Command::Tasks {
            user,
            limit,
            cursor,
            status,
        } => {
            let after = cursor.map(|c| c.parse::<TaskCursor>()).transpose()?;
            let mut query = TaskQuery::first(limit).after(after);
            query.status = status;
            validate::user_id(&user)?;
            validate::query(&query)?;
            tasks(&open(db).await?.store(), &user, &query, out).await
        }
        Command::Cancel { user, task } => {
            validate::task(&user, &task)?;
            cancel(&open(db).await?.store(), &user, &task, out).await
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
            cleanup(&open(db).await?, days, options, out).await
        }
        Command::Export { user, task, output } => {
            let scan = match &task {
                Some(t) => HistoryScan::task(t, transfer::PAGE),
                None => HistoryScan::all(transfer::PAGE),
            };
            validate::scan(&user, &scan)?;
            let store = open(db).await?.store();
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
            let store = open(db).await?.store();
            watch(&store, &user, task.as_deref(), after, count, out).await
        }
        Command::Import { file, batch_size } => {
            if !(1..=100_000).contains(&batch_size) {
                return Err(CliError::BadInput(format!(
                    "--batch-size {batch_size}: it must be between 1 and 100000"
                )));
            }
            let store = open(db).await?.store();
            let interrupt = Interrupt::install();
            transfer::import(&store, &file, batch_size, &interrupt, out).await
        }
    }
}

async fn health(db: &DbArgs, out: Output) -> Result<u8, CliError> {
    if !db.memory {
        // No server named: a configuration error, not an unhealthy store.
        pg_config(db)?;
    }
    let started = Instant::now();
    let verdict: Result<(String, Duration, Option<taskhistory_postgres::PythonCompat>), String> = async {
        let backend = open(db).await.map_err(|e| e.to_string())?;
        let report = backend
            .store()
            .health_check()
            .await
            .map_err(|e| e.to_string())?;
        if let Backend::Postgres(pg) = &backend {
            let pending = pg
                .migration_status()
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .filter(|m| !m.applied)
                .count();
            if pending > 0 {
                return Err(format!(
                    "{pending} migration(s) pending: run `taskhistory migrate`"
                ));
            }
        }
        let mut what = match (&report.server_version, &report.schema_version) {
            (Some(server), Some(schema)) => {
                format!("{} {server}, schema {schema}", report.backend)
            }
            _ => report.backend.to_owned(),
        };
        let mut python_compat = None;
        if let Backend::Postgres(pg) = &backend {
            let compat = pg.python_compat().await.map_err(|e| e.to_string())?;
            if compat.enabled || !compat.python_indexes.is_empty() {
                what.push_str(&format!("; python compatibility {}", compat_line(&compat)));
            }
            python_compat = Some(compat);
            if !pg.untranslated_messages() {
                what.push_str(
                    " (server messages may be translated: behind PgBouncer, or this role may not set lc_messages, \
                     so timeouts, deadlocks and shutdowns on a server that does not speak \
                     English are not recognised; GRANT SET ON PARAMETER lc_messages TO it)",
                );
            }
        }
        Ok((what, report.round_trip, python_compat))
    }
    .await;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    match verdict {
        Ok((what, round_trip, python_compat)) => {
            let rt_ms = round_trip.as_secs_f64() * 1e3;
            if out.json {
                out.json(&json!({"healthy": true, "store": what, "round_trip_ms": rt_ms, "elapsed_ms": elapsed_ms, "python_compat": python_compat}))?;
            } else {
                out.line(&format!("healthy: {what}; round trip {rt_ms:.2} ms"))?;
            }
            Ok(exit::OK)
        }
        Err(reason) => {
            if out.json {
                out.json(&json!({"healthy": false, "reason": reason, "elapsed_ms": elapsed_ms}))?;
            } else {
                out.line(&format!("unhealthy: {reason}"))?;
            }
            Ok(exit::OTHER)
        }
    }
}

async fn migrate(backend: &Backend, status_only: bool, out: Output) -> Result<u8, CliError> {
    let pg = match backend {
        Backend::Postgres(pg) => pg,
        Backend::Memory(_) => {
            if out.json {
                out.json(&json!({"migrations": []}))?;
            } else {
                out.line("the in-memory store has no schema; nothing to migrate")?;
            }
            return Ok(exit::OK);
        }
    };
    let before = pg.migration_status().await?;
    if !status_only {
        pg.init_database_schema().await?;
    }
    let after = if status_only {
        before.clone()
    } else {
        pg.migration_status().await?
    };
    // The mode's state is in the schema: readable once every migration is applied.
    let compat = if after.iter().all(|m| m.applied) {
        Some(pg.python_compat().await?)
    } else {
        None
    };
    if out.json {
        let list: Vec<_> = after
            .iter()
            .map(|m| json!({"name": m.name, "applied": m.applied}))
            .collect();
        out.json(&json!({"migrations": list, "python_compat": compat}))?;
    } else {
        let rows = after
            .iter()
            .map(|m| {
                let was = before.iter().any(|b| b.name == m.name && b.applied);
                let state = match (m.applied, was) {
                    (true, true) => "applied",
                    (true, false) => "applied now",
                    (false, _) => "pending",
                };
                vec![m.name.clone(), state.to_owned()]
            })
            .collect();
        out.table(&["MIGRATION", "STATE"], rows)?;
        if let Some(compat) = compat.filter(|c| c.enabled) {
            out.line(&format!(
                "python compatibility: {} (the Python service's statements keep working beside \
                 this store; `taskhistory compat off` once it stops writing; see \
                 docs/migrating-from-python.md)",
                compat_line(&compat)
            ))?;
        }
        out.line(
            "services using a role with least_privilege_grants also need, on PostgreSQL 15+, \
             as a superuser: GRANT SET ON PARAMETER lc_messages TO <role> (untranslated \
             server messages; see docs/operations.md, Least privilege)",
        )?;
    }
    Ok(exit::OK)
}

async fn stats(pg: &PgTaskHistoryStore, out: Output) -> Result<u8, CliError> {
    let stats = pg.stats().await?;
    if out.json {
        out.json(&stats)?;
        return Ok(exit::OK);
    }
    let p = &stats.pool;
    out.pairs(&[
        ("tasks", stats.tasks.to_string()),
        ("steps", stats.steps.to_string()),
        ("oldest activity", maybe_time(stats.oldest_activity)),
        ("newest activity", maybe_time(stats.newest_activity)),
        (
            "pool",
            format!(
                "{} open ({} idle, {} in use) of max {}; {} waits, {} wait timeouts, {} created, {} closed broken",
                p.connections, p.idle, p.in_use, p.max, p.waits, p.wait_timeouts, p.created, p.closed_broken
            ),
        ),
        ("python compatibility", compat_line(&stats.python_compat)),
    ])?;
    let rows = stats
        .statuses
        .iter()
        .map(|s| {
            vec![
                s.status.to_string(),
                s.tasks.to_string(),
                s.steps.to_string(),
                maybe_time(s.oldest_activity),
                maybe_time(s.newest_activity),
            ]
        })
        .collect();
    out.table(
        &[
            "STATUS",
            "TASKS",
            "STEPS",
            "OLDEST ACTIVITY",
            "NEWEST ACTIVITY",
        ],
        rows,
    )?;
    let rows = stats
        .relations
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.kind.clone(),
                r.table.clone(),
                bytes(r.bytes),
                r.estimated_rows.to_string(),
            ]
        })
        .collect();
    out.table(&["RELATION", "KIND", "TABLE", "SIZE", "ROWS (EST.)"], rows)?;
    Ok(exit::OK)
}

/// One line on the Python compatibility mode.
fn compat_line(state: &taskhistory_postgres::PythonCompat) -> String {
    let mut line = if state.enabled {
        format!(
            "on since {}; last Python write {}; {} Python write(s)",
            maybe_time(state.enabled_at),
            maybe_time(state.last_python_write),
            state.python_writes
        )
    } else {
        "off".to_owned()
    };
    if !state.python_indexes.is_empty() {
        line.push_str(&format!(
            "; the Python service's indexes are back ({}): every write pays for them, \
             `taskhistory compat off` drops them",
            state.python_indexes.join(", ")
        ));
    }
    line
}

async fn compat(
    pg: &PgTaskHistoryStore,
    action: Option<CompatAction>,
    out: Output,
) -> Result<u8, CliError> {
    let state = match action.unwrap_or(CompatAction::Status) {
        CompatAction::Status => pg.python_compat().await?,
        CompatAction::On => pg.enable_python_compat().await?,
        CompatAction::Off => {
            let before = pg.python_compat().await?;
            let after = pg.disable_python_compat().await?;
            if !out.json && before.enabled {
                eprintln!(
                    "taskhistory: the Python compatibility mode is off; the last Python write \
                     arrived {} ({} in all): a Python INSERT now fails",
                    maybe_time(before.last_python_write),
                    before.python_writes
                );
            }
            after
        }
    };
    if out.json {
        out.json(&state)?;
    } else {
        out.line(&format!("python compatibility: {}", compat_line(&state)))?;
    }
    Ok(exit::OK)
}

async fn query_stats(pg: &PgTaskHistoryStore, limit: i64, out: Output) -> Result<u8, CliError> {
    if !(1..=1000).contains(&limit) {
        return Err(CliError::BadInput(format!(
            "--limit {limit}: it must be between 1 and 1000"
        )));
    }
    let rows = pg.query_stats(limit).await?;
    if out.json {
        out.json(&rows)?;
        return Ok(exit::OK);
    }
    let table = rows
        .iter()
        .map(|q| {
            vec![
                q.calls.to_string(),
                format!("{:.1}", q.total_ms),
                format!("{:.3}", q.mean_ms),
                q.rows.to_string(),
                clip(
                    &q.query.split_whitespace().collect::<Vec<_>>().join(" "),
                    90,
                ),
            ]
        })
        .collect();
    out.table(&["CALLS", "TOTAL MS", "MEAN MS", "ROWS", "QUERY"], table)?;
    Ok(exit::OK)
}

async fn explain(
    pg: &PgTaskHistoryStore,
    user: &str,
    task: &str,
    analyze: bool,
    out: Output,
) -> Result<u8, CliError> {
    let plans = pg.explain(user, task, analyze).await?;
    if out.json {
        out.json(&plans)?;
        return Ok(exit::OK);
    }
    let text: Vec<String> = plans
        .iter()
        .map(|p| format!("-- {}\n{}\n", p.name, p.plan.join("\n")))
        .collect();
    out.line(&text.join("\n"))?;
    Ok(exit::OK)
}

async fn watch(
    store: &DynStore,
    user: &str,
    task: Option<&str>,
    after: Option<EventCursor>,
    count: Option<u64>,
    out: Output,
) -> Result<u8, CliError> {
    use futures::StreamExt;
    let mut events = match task {
        Some(t) => store.watch_task(user, t, after).await?,
        None => store.watch_user(user, after).await?,
    };
    eprintln!(
        "watching {}; Ctrl-C to stop",
        task.map_or_else(
            || format!("user {user:?}"),
            |t| format!("task {t:?} of user {user:?}")
        )
    );
    let mut seen = 0;
    let mut last = None;
    // Watching until interrupted is the command's normal end: it exits 0.
    let mut interrupt = Interrupt::install();
    while count.is_none_or(|c| seen < c) {
        let event = tokio::select! {
            e = events.next() => e,
            _ = interrupt.wait() => None,
        };
        let Some(event) = event else { break };
        match event {
            Ok(e) => {
                seen += 1;
                last = Some(e.cursor.clone());
                if out.json {
                    let line = serde_json::to_string(&e)
                        .map_err(|err| CliError::Other(format!("writing JSON: {err}")))?;
                    out.line(&line)?;
                } else {
                    out.line(&format!(
                        "{}  {}  step {}  {}{}",
                        time(e.timestamp),
                        e.task_id,
                        e.step,
                        e.status,
                        if e.kind == taskhistory_core::TaskEventKind::Cancelled {
                            "  (cancelled)"
                        } else {
                            ""
                        }
                    ))?;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(cursor) = last {
        eprintln!("to go on from here: --after {cursor}");
    }
    Ok(exit::OK)
}

/// Whether a task has any step: what tells "unknown" from "pending".
async fn exists(store: &DynStore, user: &str, task: &str) -> Result<bool, StoreError> {
    let page = store
        .scan_history(user, &HistoryScan::task(task, 1))
        .await?;
    Ok(!page.steps.is_empty())
}

fn not_found(user: &str, task: &str) -> CliError {
    CliError::NotFound(format!("task {task:?} of user {user:?}"))
}

async fn history(store: &DynStore, user: &str, task: &str, out: Output) -> Result<u8, CliError> {
    let steps = store.load_task_history(user, task).await?;
    if steps.is_empty() {
        return Err(not_found(user, task));
    }
    if out.json {
        out.json(&steps)?;
    } else {
        let rows = steps
            .iter()
            .map(|e| {
                let r = &e.result;
                let detail = match (&r.error_code, &r.error_message) {
                    (Some(code), Some(msg)) => format!("{code}: {msg}"),
                    (Some(code), None) => code.to_string(),
                    _ => r.result.to_string(),
                };
                vec![
                    e.step.to_string(),
                    e.status.to_string(),
                    time(e.timestamp),
                    clip(&r.step, 24),
                    clip(&r.message, 40),
                    clip(&detail, 60),
                ]
            })
            .collect();
        out.table(
            &["STEP", "STATUS", "TIMESTAMP", "NAME", "MESSAGE", "RESULT"],
            rows,
        )?;
    }
    Ok(exit::OK)
}

/// The API's answer: a task the store has never seen is `pending` (exit 0), as
/// `check_task_status` says; `history` tells an unknown task apart.
async fn status(store: &DynStore, user: &str, task: &str, out: Output) -> Result<u8, CliError> {
    let status = store.check_task_status(user, task).await?;
    if out.json {
        out.json(&json!({"user_id": user, "task_id": task, "status": status}))?;
    } else {
        out.line(status.as_str())?;
    }
    Ok(exit::OK)
}

#[derive(Serialize)]
struct TasksPage<'a> {
    tasks: &'a [taskhistory_core::TaskSummary],
    next_cursor: Option<String>,
}

async fn tasks(
    store: &DynStore,
    user: &str,
    query: &TaskQuery,
    out: Output,
) -> Result<u8, CliError> {
    let page = store.get_user_tasks_page(user, query).await?;
    let next_cursor = page.next.as_ref().map(ToString::to_string);
    if out.json {
        out.json(&TasksPage {
            tasks: &page.tasks,
            next_cursor,
        })?;
        return Ok(exit::OK);
    }
    let rows = page
        .tasks
        .iter()
        .map(|t| {
            vec![
                t.task_id.clone(),
                t.status.to_string(),
                t.last_step.to_string(),
                t.step_count.to_string(),
                time(t.created_at),
                time(t.last_updated),
            ]
        })
        .collect();
    out.table(
        &[
            "TASK",
            "STATUS",
            "LAST STEP",
            "STEPS",
            "CREATED",
            "LAST UPDATED",
        ],
        rows,
    )?;
    match next_cursor {
        Some(c) => out.line(&format!("more: --cursor '{c}'"))?,
        None => out.line(&format!("{} task(s); no more", page.tasks.len()))?,
    }
    Ok(exit::OK)
}

async fn cancel(store: &DynStore, user: &str, task: &str, out: Output) -> Result<u8, CliError> {
    let cancelled = store.mark_task_as_cancelled(user, task).await?;
    let status = store.check_task_status(user, task).await?;
    if !cancelled && !exists(store, user, task).await? {
        return Err(not_found(user, task));
    }
    if out.json {
        out.json(
            &json!({"user_id": user, "task_id": task, "cancelled": cancelled, "status": status}),
        )?;
    } else if cancelled {
        out.line("cancelled")?;
    } else {
        out.line(&format!("not cancelled: the task is already {status}"))?;
    }
    Ok(exit::OK)
}

async fn partitions(
    pg: &PgTaskHistoryStore,
    action: PartitionsAction,
    out: Output,
) -> Result<u8, CliError> {
    let made = match action {
        PartitionsAction::List => None,
        PartitionsAction::Ensure { ahead } => Some(pg.ensure_partitions(ahead).await?),
        PartitionsAction::Convert { interval, ahead } => {
            let started = Instant::now();
            let made = pg
                .convert_to_partitioned(Partitioning { interval, ahead })
                .await?;
            if !out.json {
                out.line(&format!(
                    "converted in {:.2} s",
                    started.elapsed().as_secs_f64()
                ))?;
            }
            Some(made)
        }
    };
    let layout = pg.layout().await?;
    let list = pg.partitions().await?;
    if out.json {
        out.json(&json!({ "layout": layout, "made": made, "partitions": list }))?;
        return Ok(exit::OK);
    }
    if let Some(made) = &made {
        out.line(&format!(
            "made {} partition(s): {}",
            made.len(),
            made.join(", ")
        ))?;
    }
    match layout {
        Layout::Plain => out.line("layout: plain (one table; `taskhistory partitions convert`)")?,
        Layout::Partitioned { interval } => {
            out.line(&format!("layout: partitioned by {interval} (task start)"))?
        }
    }
    let rows = list
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                maybe_time(p.from),
                maybe_time(p.to),
                bytes(p.bytes),
                p.estimated_rows.to_string(),
            ]
        })
        .collect();
    out.table(&["PARTITION", "FROM", "TO", "SIZE", "ROWS (EST.)"], rows)?;
    Ok(exit::OK)
}

async fn cleanup(
    backend: &Backend,
    days: i64,
    options: CleanupOptions,
    out: Output,
) -> Result<u8, CliError> {
    let started = Instant::now();
    let (report, expected) = match backend {
        Backend::Postgres(pg) => {
            let preview = CleanupOptions {
                dry_run: true,
                ..options
            };
            let expected = pg.cleanup_old_tasks_with(days, preview, &|_| {}).await?;
            if options.dry_run {
                (expected, expected)
            } else {
                let progress = Progress::new("cleanup", "tasks", Some(expected.tasks_removed));
                let report = pg
                    .cleanup_old_tasks_with(days, options, &|r| progress.set(r.tasks_removed))
                    .await?;
                progress.finish(report.tasks_removed);
                (report, expected)
            }
        }
        Backend::Memory(m) => {
            if options.dry_run || options.status.is_some() {
                return Err(CliError::Other(
                    "cleanup --dry-run and --status need PostgreSQL; drop --memory".into(),
                ));
            }
            let report = m.cleanup_old_tasks(days).await?;
            (report, report)
        }
    };
    let finished = options.dry_run || report.tasks_removed >= expected.tasks_removed;
    let elapsed = started.elapsed().as_secs_f64();
    if out.json {
        out.json(&json!({
            "dry_run": options.dry_run,
            "tasks_removed": report.tasks_removed,
            "steps_removed": report.steps_removed,
            "partitions_dropped": report.partitions_dropped,
            "finished": finished,
            "elapsed_s": elapsed,
        }))?;
    } else {
        let plural =
            |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        let what = format!(
            "{} and {} inactive for more than {}",
            plural(report.tasks_removed, "task", "tasks"),
            plural(report.steps_removed, "step", "steps"),
            plural(days.unsigned_abs(), "day", "days"),
        );
        if options.dry_run {
            out.line(&format!("would remove {what} (dry run: nothing removed)"))?;
        } else {
            out.line(&format!("removed {what} in {elapsed:.2} s"))?;
        }
        if report.partitions_dropped > 0 {
            out.line(&format!(
                "{} whole partition(s) dropped",
                report.partitions_dropped
            ))?;
        }
        if !finished {
            out.line("stopped at the time limit; run it again to continue")?;
        }
    }
    Ok(exit::OK)
}
