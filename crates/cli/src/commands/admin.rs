//! The operator's commands: `health`, `migrate`, `stats`, `compat`, `explain`,
//! `partitions`, `cleanup`.

use std::time::{Duration, Instant};

use serde_json::json;
use taskhistory_core::TaskHistoryStore;
use taskhistory_postgres::{CleanupOptions, Layout, Partitioning, PgTaskHistoryStore};

use crate::args::{CompatAction, DbArgs, IsolationAction, PartitionsAction};
use crate::error::{exit, CliError};
use crate::output::{bytes, clip, maybe_time, Output};
use crate::progress::Progress;
use crate::setup::{pg_config, Backend, Opened};

pub(super) async fn health(db: &DbArgs, opened: &Opened, out: Output) -> Result<u8, CliError> {
    if !db.memory {
        // No server named: a configuration error, not an unhealthy store.
        pg_config(db)?;
    }
    let started = Instant::now();
    let verdict: Result<(String, Duration, Option<taskhistory_postgres::PythonCompat>), String> = async {
        let backend = opened.open(db).await.map_err(|e| e.to_string())?;
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

pub(super) async fn migrate(
    backend: &Backend,
    status_only: bool,
    out: Output,
) -> Result<u8, CliError> {
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

pub(super) async fn stats(pg: &PgTaskHistoryStore, out: Output) -> Result<u8, CliError> {
    let stats = pg.stats().await?;
    if out.json {
        out.json(&stats)?;
        return Ok(exit::OK);
    }
    let p = &stats.pool;
    out.pairs(&[
        ("tasks", stats.tasks.to_string()),
        ("steps (estimate)", stats.estimated_steps.to_string()),
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
        .map(|s| vec![s.status.to_string(), s.tasks.to_string()])
        .collect();
    out.table(&["STATUS", "TASKS"], rows)?;
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

pub(super) async fn compat(
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

pub(super) async fn isolation(
    pg: &PgTaskHistoryStore,
    action: Option<IsolationAction>,
    out: Output,
) -> Result<u8, CliError> {
    let state = match action.unwrap_or(IsolationAction::Status) {
        IsolationAction::Status => pg.isolation().await?,
        IsolationAction::On => {
            let state = pg.set_isolation(true).await?;
            if !out.json {
                eprintln!(
                    "taskhistory: row-level isolation is on; services opened before now see \
                     nothing unless they run with DB_DECLARE_USERS=true: restart the others"
                );
            }
            state
        }
        IsolationAction::Off => pg.set_isolation(false).await?,
    };
    if out.json {
        out.json(&state)?;
        return Ok(exit::OK);
    }
    let yes = |b: bool| if b { "yes" } else { "no" }.to_owned();
    let table = state
        .tables
        .iter()
        .map(|t| {
            vec![
                t.table.clone(),
                yes(t.enabled),
                yes(t.forced),
                yes(t.policies),
            ]
        })
        .collect();
    out.table(&["TABLE", "ENABLED", "FORCED", "POLICIES"], table)?;
    out.line(&format!(
        "isolation: {}; this role may run retention under it: {}",
        if state.on() {
            "on"
        } else if state.ready() {
            "off"
        } else {
            "not available (apply the migrations)"
        },
        yes(state.maintainer)
    ))?;
    Ok(exit::OK)
}

pub(super) async fn query_stats(
    pg: &PgTaskHistoryStore,
    limit: i64,
    out: Output,
) -> Result<u8, CliError> {
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

pub(super) async fn explain(
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

pub(super) async fn partitions(
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

pub(super) async fn cleanup(
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
