//! The `taskhistory` binary end to end: on the in-memory store (no server) and on a real
//! PostgreSQL (the test harness's server; one schema per test), every exit code included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use assert_cmd::Command;
use chrono::{Duration, Utc};
use serde_json::{json, Value};
use taskhistory_core::{
    ErrorCode, HistoryScan, StepRecord, TaskHistoryStore, TaskStatus, TaskStepResult,
};
use taskhistory_postgres::{PgConfig, PgTaskHistoryStore, SslMode};
use taskhistory_testing as testing;

/// The binary with no configuration inherited from the environment.
fn bin() -> Command {
    let mut cmd = Command::cargo_bin("taskhistory").unwrap();
    for var in [
        "DATABASE_URL",
        "DB_HOST",
        "DB_PORT",
        "DB_NAME",
        "DB_USER",
        "DB_PASSWORD",
        "DB_SCHEMA",
        "DB_SSLMODE",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

fn run(cmd: &mut Command) -> Run {
    let out = cmd.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn memory<S: AsRef<OsStr>>(args: &[S]) -> Run {
    run(bin().arg("--memory").args(args))
}

/// A fresh schema name and the URL of this process's test database.
static SCHEMAS: AtomicU32 = AtomicU32::new(0);

struct Db {
    url: String,
    schema: String,
}

impl Db {
    async fn fresh() -> Db {
        let url = testing::database_url().await;
        let n = SCHEMAS.fetch_add(1, Ordering::Relaxed);
        let schema = format!(
            "cli_{}_{n}_{}",
            std::process::id(),
            Utc::now().timestamp_micros()
        );
        Db { url, schema }
    }

    fn cli<S: AsRef<OsStr>>(&self, args: &[S]) -> Run {
        run(bin()
            .args(["--database-url", &self.url, "--schema", &self.schema])
            .args(args))
    }

    /// The library's store on the same schema, migrated.
    async fn store(&self) -> PgTaskHistoryStore {
        let config = PgConfig::from_url(&self.url)
            .unwrap()
            .ssl_mode(SslMode::Disable)
            .schema(self.schema.clone())
            .pool_size(1, 4);
        testing::store_for(config).await
    }
}

#[test]
fn demo_runs_the_seed_scenarios_on_the_memory_store() {
    let r = run(bin().arg("demo"));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("on the memory store"), "{}", r.stdout);
    assert!(
        r.stdout.contains("the next write is refused"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("removed 1 task and 3 steps"),
        "{}",
        r.stdout
    );

    let r = run(bin().args(["--json", "demo"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = r.json();
    assert_eq!(j["backend"], "memory");
    let steps: Vec<i64> = j["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["step"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2]);
    assert_eq!(j["statuses"]["task_789"], "failed");
    assert_eq!(j["statuses"]["unknown_task"], "pending");
    assert_eq!(j["cancelled"], true);
    assert_eq!(j["status_after_cancel"], "cancelled");
    assert!(j["refused_write"].as_str().unwrap().contains("cancelled"));
    assert_eq!(j["cancelled_failed_task"], false);
    assert_eq!(
        j["cleanup"],
        json!({"tasks_removed": 1, "steps_removed": 3, "partitions_dropped": 0})
    );
    assert_eq!(j["tasks_after_cleanup"], json!(["task_456", "task_789"]));
}

#[test]
fn help_lists_the_exit_codes() {
    let r = run(bin().arg("--help"));
    assert_eq!(r.code, 0);
    for line in [
        "0  success",
        "2  bad input",
        "3  not found",
        "4  unavailable",
    ] {
        assert!(
            r.stdout.contains(line),
            "{line:?} missing from:\n{}",
            r.stdout
        );
    }
}

#[test]
fn every_exit_code_without_a_server() {
    // 2: bad input, caught before any connection.
    for args in [
        &["tasks", "u", "--limit", "0"][..],
        &["tasks", "u", "--cursor", "not-a-cursor"],
        &["tasks", "u", "--status", "sleeping"],
        &["tasks", "u", "--updated-after", "yesterday"],
        &["tasks", "u", "--prefix", ""],
        &[
            "tasks",
            "u",
            "--updated-after",
            "2026-01-02T00:00:00Z",
            "--updated-before",
            "2026-01-01T00:00:00Z",
        ],
        &["history", "", "t"],
        &["cleanup", "--days", "-1"],
        &["export", "u", "--output"],
    ] {
        let r = memory(args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        // Something is said (clap's own errors take several lines, ours one).
        assert!(!r.stderr.trim().is_empty(), "{args:?}: nothing on stderr");
    }
    // Bad input names the field, on one line.
    let r = memory(&["tasks", "u", "--limit", "0"]);
    assert_eq!(
        r.stderr.trim(),
        "taskhistory: invalid input: limit: is 0; it must be between 1 and 1000"
    );
    // 3: not found (`status` answers as the API does: an unknown task is pending).
    let r = memory(&["status", "u", "t"]);
    assert_eq!((r.code, r.stdout.trim()), (0, "pending"), "{}", r.stderr);
    for args in [&["history", "u", "t"][..], &["cancel", "u", "t"]] {
        let r = memory(args);
        assert_eq!(r.code, 3, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("not found"), "{}", r.stderr);
    }
    // 4: unavailable (nothing listens on port 1).
    let dead = "postgres://postgres@127.0.0.1:1/none";
    let r = run(bin().args(["--database-url", dead, "status", "u", "t"]));
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.contains("unavailable"), "{}", r.stderr);
    // 1: health of a store that cannot be reached, with the reason.
    let r = run(bin().args(["--database-url", dead, "health"]));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stdout.starts_with("unhealthy:"), "{}", r.stdout);
    let r = run(bin().args(["--database-url", dead, "--json", "health"]));
    assert_eq!((r.code, &r.json()["healthy"]), (1, &json!(false)));
    // 1: any other failure.
    let r = memory(&["stats"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    // 0: health of the memory store.
    assert_eq!(memory(&["health"]).code, 0);
}

/// Without any database setting a command says what to set (exit 2), instead of trying
/// `postgres@localhost/postgres`; `--json` makes every error a JSON object on stderr.
#[test]
fn without_a_database_the_tool_says_what_to_set() {
    for args in [
        &["tasks", "u"][..],
        &["migrate"],
        &["health"],
        &["cancel", "u", "t"],
    ] {
        let r = run(bin().args(args));
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("no database configured") && r.stderr.contains("DATABASE_URL"),
            "{args:?}: {}",
            r.stderr
        );
    }
    let r = run(bin().args(["--json", "tasks", "u"]));
    assert_eq!(r.code, 2);
    let error: Value = serde_json::from_str(r.stderr.trim()).unwrap();
    assert_eq!(error["error"]["class"], "bad_input");
    assert_eq!(error["error"]["exit_code"], 2);
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("DATABASE_URL"));
    let r = memory(&["--json", "history", "u", "t"]);
    assert_eq!(r.code, 3);
    let error: Value = serde_json::from_str(r.stderr.trim()).unwrap();
    assert_eq!(error["error"]["class"], "not_found");
}

/// Configuration errors name what the user typed (the flag, not the variable behind it),
/// exit 2; a refused connection names the server it tried.
#[test]
fn configuration_errors_name_the_flag_and_refusals_the_server() {
    let r = run(bin().args([
        "--database-url",
        "postgres://postgres@127.0.0.1:1/none",
        "--schema",
        "bad-name;",
        "tasks",
        "u",
    ]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("invalid configuration: --schema"),
        "{}",
        r.stderr
    );
    let r = run(bin().args([
        "--database-url",
        "postgres://postgres@127.0.0.1:1/none",
        "tasks",
        "u",
    ]));
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.contains("127.0.0.1:1"), "{}", r.stderr);
}

/// A database the store's tables are missing from: every command's error says to migrate.
#[tokio::test]
async fn an_unmigrated_database_gets_a_migrate_hint() {
    let db = Db::fresh().await;
    for args in [
        &["tasks", "u"][..],
        &["history", "u", "t"],
        &["status", "u", "t"],
    ] {
        let r = db.cli(args);
        assert_eq!(r.code, 1, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr
                .contains("hint: the schema is not migrated: run `taskhistory migrate` first"),
            "{args:?}: {}",
            r.stderr
        );
    }
    let r = db.cli(&["--json", "tasks", "u"]);
    let error: Value = serde_json::from_str(r.stderr.trim()).unwrap();
    assert!(error["error"]["hint"]
        .as_str()
        .unwrap()
        .contains("taskhistory migrate"));
}

#[test]
fn the_password_never_shows() {
    let url = "postgres://postgres:hunter2-secret@127.0.0.1:1/none";
    for args in [
        &["status", "u", "t"][..],
        &["health"],
        &["--json", "health"],
    ] {
        let r = run(bin().args(["--database-url", url]).args(args));
        assert_ne!(r.code, 0);
        assert!(
            !r.stdout.contains("hunter2") && !r.stderr.contains("hunter2"),
            "{args:?}: {}{}",
            r.stdout,
            r.stderr
        );
    }
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// `--json import FILE --batch-size N`.
fn import_args(file: &Path, batch: usize) -> Vec<String> {
    let file = file.to_str().unwrap().to_owned();
    [
        "--json",
        "import",
        &file,
        "--batch-size",
        &batch.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// An import report's lines, imported, refused and skipped counts.
fn counts(report: &Value) -> [u64; 4] {
    ["lines", "imported", "refused", "skipped_cancelled"].map(|k| report[k].as_u64().unwrap())
}

fn record_line(user: &str, task: &str, step: i32) -> String {
    let r = StepRecord::new(
        user,
        task,
        step,
        TaskStepResult::running(format!("s{step}"), json!({"n": step}), "m"),
    )
    .at(Utc::now() - Duration::minutes(10));
    serde_json::to_string(&r).unwrap()
}

#[test]
fn import_on_the_memory_store_checks_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.jsonl");
    let mut lines: Vec<String> = (0..5).map(|i| record_line("u", "t", i)).collect();
    lines[3] = "{not json".into();
    write_lines(&file, &lines);
    let r = memory(&import_args(&file, 2));
    assert_eq!(r.code, 2, "{}", r.stderr);
    let j = r.json();
    assert_eq!(counts(&j), [5, 3, 2, 0]);
    assert_eq!(j["bad_lines"][0]["line"], 4);
    assert!(r.stderr.contains("line 4:"), "{}", r.stderr);
    assert!(
        r.stderr.contains("lines 3-4 (its batch) were not imported"),
        "{}",
        r.stderr
    );
}

#[tokio::test]
async fn migrate_status_health_and_stats() {
    let db = Db::fresh().await;
    let r = db.cli(&["--json", "migrate", "--status"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["migrations"][0]["applied"], false);
    let r = db.cli(&["health"]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stdout.contains("pending"), "{}", r.stdout);

    let r = db.cli(&["migrate"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("applied now"), "{}", r.stdout);
    assert!(
        r.stdout.contains("GRANT SET ON PARAMETER lc_messages"),
        "{}",
        r.stdout
    );
    let r = db.cli(&["--json", "migrate", "--status"]);
    assert_eq!(r.json()["migrations"][0]["applied"], true);
    // Applying again is a no-op.
    assert_eq!(db.cli(&["migrate"]).code, 0);
    let r = db.cli(&["health"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.starts_with("healthy: postgres"), "{}", r.stdout);

    let store = db.store().await;
    let old = Utc::now() - Duration::days(3);
    let records = [
        StepRecord::new("u", "a", 0, TaskStepResult::running("x", json!(1), "m")).at(old),
        StepRecord::new("u", "a", 1, TaskStepResult::running("x", json!(2), "m")),
        StepRecord::new(
            "v",
            "b",
            0,
            TaskStepResult::failure("x", ErrorCode::Execution, "boom"),
        ),
    ];
    store.save_batch_task_history(&records).await.unwrap();
    let r = db.cli(&["--json", "stats"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = r.json();
    assert_eq!(j["tasks"].as_u64(), Some(2));
    assert!(j["estimated_steps"].as_u64().is_some(), "{j}");
    assert!(j["oldest_activity"].is_string(), "{j}");
    let statuses: Vec<(String, u64)> = j["statuses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["status"].as_str().unwrap().to_owned(),
                s["tasks"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(statuses, [("running".into(), 1), ("failed".into(), 1)]);
    let names: Vec<&str> = j["relations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"task_history") && names.contains(&"task_summary_pkey"),
        "{names:?}"
    );
    assert!(j["pool"]["max"].as_u64().unwrap() >= 1);
    let r = db.cli(&["stats"]);
    assert!(
        r.stdout.contains("task_summary") && r.stdout.contains("running"),
        "{}",
        r.stdout
    );
}

#[tokio::test]
async fn task_commands() {
    let db = Db::fresh().await;
    let store = db.store().await;
    for (task, step) in [("t1", 0), ("t1", 1), ("t2", 0), ("t3", 0)] {
        store
            .save_task_history(
                "u",
                task,
                step,
                &TaskStepResult::running("s", json!({"k": step}), "working"),
            )
            .await
            .unwrap();
    }
    store
        .save_task_history(
            "u",
            "done",
            0,
            &TaskStepResult::success("s", json!(null), "ok"),
        )
        .await
        .unwrap();

    let r = db.cli(&["status", "u", "t1"]);
    assert_eq!((r.code, r.stdout.trim()), (0, "running"), "{}", r.stderr);
    let r = db.cli(&["status", "u", "nope"]);
    assert_eq!((r.code, r.stdout.trim()), (0, "pending"), "{}", r.stderr);
    let r = db.cli(&["--json", "history", "u", "t1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let steps: Vec<i64> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["step"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, [0, 1]);
    let r = db.cli(&["history", "u", "t1"]);
    assert!(
        r.stdout.contains("working") && r.stdout.contains("{\"k\":1}"),
        "{}",
        r.stdout
    );
    assert_eq!(db.cli(&["history", "u", "nope"]).code, 3);

    // Pages through the listing with the cursor each page prints.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut args = vec!["--json", "tasks", "u", "--limit", "2"];
        if let Some(c) = &cursor {
            args.extend(["--cursor", c.as_str()]);
        }
        let r = db.cli(&args);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let j = r.json();
        for t in j["tasks"].as_array().unwrap() {
            seen.push(t["task_id"].as_str().unwrap().to_owned());
        }
        match j["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    seen.sort();
    assert_eq!(seen, ["done", "t1", "t2", "t3"]);
    let r = db.cli(&["--json", "tasks", "u", "--status", "completed"]);
    assert_eq!(r.json()["tasks"][0]["task_id"], "done");
    let r = db.cli(&["tasks", "u", "--limit", "1"]);
    assert!(r.stdout.contains("more: --cursor"), "{}", r.stdout);

    let r = db.cli(&["cancel", "u", "t2"]);
    assert_eq!((r.code, r.stdout.trim()), (0, "cancelled"), "{}", r.stderr);
    assert_eq!(
        store.check_task_status("u", "t2").await.unwrap(),
        TaskStatus::Cancelled
    );
    let r = db.cli(&["--json", "cancel", "u", "done"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["cancelled"], false);
    assert_eq!(r.json()["status"], "completed");
    assert_eq!(db.cli(&["cancel", "u", "nope"]).code, 3);
    assert_eq!(db.cli(&["tasks", "u", "--cursor", "12:"]).code, 2);
}

/// Everything `export` writes for `user`, as text.
fn export(db: &Db, user: &str, file: &Path) -> String {
    let r = db.cli(&["export", user, "-o", file.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    std::fs::read_to_string(file).unwrap()
}

#[tokio::test]
async fn export_import_round_trip_reproduces_the_history() {
    let source = Db::fresh().await;
    let store = source.store().await;
    let base = Utc::now() - Duration::days(2);
    let mut records = Vec::new();
    for t in 0..12_i64 {
        for s in 0..(t as i32 % 5 + 1) {
            let result = match (t, s) {
                (3, 1) => TaskStepResult::failure("crash", ErrorCode::Timeout, "took too long"),
                (4, _) => TaskStepResult::success(
                    "big",
                    json!({"blob": "é".repeat(20_000), "n": 1e300, "i": -12345678901234567_i64}),
                    "ok",
                ),
                _ => TaskStepResult::running(
                    format!("step {s}"),
                    json!({"t": t, "s": s, "nested": [1, {"a": null}]}),
                    "läuft ✓",
                ),
            };
            let at = base + Duration::microseconds(t * 1_000_003 + i64::from(s) * 7);
            records.push(StepRecord::new("user-é", format!("task/{t:02}"), s * 3, result).at(at));
        }
    }
    records.push(StepRecord::new(
        "someone-else",
        "x",
        0,
        TaskStepResult::running("x", json!(0), "m"),
    ));
    store.save_batch_task_history(&records).await.unwrap();
    assert!(store
        .mark_task_as_cancelled("user-é", "task/07")
        .await
        .unwrap());

    let dir = tempfile::tempdir().unwrap();
    let first = export(&source, "user-é", &dir.path().join("a.jsonl"));
    let lines = first.lines().count();
    assert_eq!(
        lines,
        records.len() - 1 + 1,
        "every step of the user plus the cancellation"
    );
    assert!(!first.contains("someone-else"));

    let target = Db::fresh().await;
    assert_eq!(target.cli(&["migrate"]).code, 0);
    let file = dir.path().join("a.jsonl");
    let r = target.cli(&import_args(&file, 7));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = r.json();
    assert_eq!(j["imported"].as_u64(), Some(lines as u64));
    assert_eq!(
        (j["refused"].as_u64(), j["skipped_cancelled"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(
        r.stderr.contains("import:"),
        "progress lines on a non-terminal: {}",
        r.stderr
    );

    let second = export(&target, "user-é", &dir.path().join("b.jsonl"));
    assert_eq!(second, first, "the round trip changed the history");
    let target_store = target.store().await;
    let summaries = |tasks: Vec<taskhistory_core::TaskSummary>| -> Vec<_> {
        tasks
            .into_iter()
            .map(|t| {
                (
                    t.task_id,
                    t.status,
                    t.last_step,
                    t.step_count,
                    t.last_updated,
                )
            })
            .collect()
    };
    let before = summaries(target_store.get_user_tasks("user-é", 100).await.unwrap());
    assert_eq!(
        before,
        summaries(store.get_user_tasks("user-é", 100).await.unwrap())
    );
    assert_eq!(
        target_store
            .check_task_status("user-é", "task/07")
            .await
            .unwrap(),
        TaskStatus::Cancelled
    );

    // Importing again changes nothing: the cancelled task's lines are skipped, the rest
    // rewrite identical rows.
    let r = target.cli(&import_args(&file, 7));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = r.json();
    let skipped = j["skipped_cancelled"].as_u64().unwrap();
    assert_eq!(skipped, 4, "task/07's three steps and its cancellation");
    assert_eq!(j["imported"].as_u64().unwrap() + skipped, lines as u64);
    let third = export(&target, "user-é", &dir.path().join("c.jsonl"));
    assert_eq!(third, first);
    assert_eq!(
        before,
        summaries(target_store.get_user_tasks("user-é", 100).await.unwrap())
    );

    // One task, to stdout.
    let r = source.cli(&["export", "user-é", "task/03"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.lines().count(), 4);
    assert!(
        r.stderr.contains("exported 4 step(s) of 1 task(s)"),
        "{}",
        r.stderr
    );
    // On a non-terminal stderr the progress line of a one-page export is printed once.
    assert_eq!(
        r.stderr
            .lines()
            .filter(|l| l.starts_with("export: 4 steps"))
            .count(),
        1,
        "{}",
        r.stderr
    );
}

#[tokio::test]
async fn import_refuses_whole_the_batch_holding_a_bad_line() {
    let db = Db::fresh().await;
    let store = db.store().await;
    let mut lines: Vec<String> = (0..6).map(|i| record_line("u", "t", i)).collect();
    lines[2] = "{\"user_id\": \"u\", \"task_id\": \"t\"".into(); // line 3: cut short
    lines[5] = record_line("", "t", 5); // line 6: empty user id
    lines.insert(4, String::new()); // a blank line is ignored
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.jsonl");
    write_lines(&file, &lines);
    let r = db.cli(&import_args(&file, 2));
    assert_eq!(r.code, 2, "{}", r.stderr);
    let j = r.json();
    assert_eq!(counts(&j), [6, 2, 4, 0]);
    let bad: Vec<u64> = j["bad_lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["line"].as_u64().unwrap())
        .collect();
    assert_eq!(bad, [3, 7]);
    assert!(r.stderr.contains("line 7: record.user_id"), "{}", r.stderr);
    // Lines 1-2 were written; line 4 (valid, but batched with line 3) and line 6 were not.
    let steps: Vec<i32> = store
        .load_task_history("u", "t")
        .await
        .unwrap()
        .iter()
        .map(|e| e.step)
        .collect();
    assert_eq!(steps, [0, 1]);
}

#[tokio::test]
async fn cleanup_dry_run_then_batches_with_progress() {
    let db = Db::fresh().await;
    let store = db.store().await;
    let old = Utc::now() - Duration::days(40);
    let mut records = Vec::new();
    for t in 0..5 {
        for s in 0..3 {
            records.push(
                StepRecord::new(
                    "u",
                    format!("old{t}"),
                    s,
                    TaskStepResult::running("s", json!(s), "m"),
                )
                .at(old),
            );
        }
    }
    records.push(StepRecord::new(
        "u",
        "fresh",
        0,
        TaskStepResult::running("s", json!(0), "m"),
    ));
    store.save_batch_task_history(&records).await.unwrap();

    let r = db.cli(&["--json", "cleanup", "--days", "30", "--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["tasks_removed"], 5);
    assert_eq!(r.json()["steps_removed"], 15);
    assert_eq!(
        store.get_user_tasks("u", 10).await.unwrap().len(),
        6,
        "a dry run removes nothing"
    );

    let r = db.cli(&["cleanup", "--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains(
            "would remove 5 tasks and 15 steps inactive for more than 30 days (dry run: nothing removed)"
        ),
        "the default retention is 30 days: {}",
        r.stdout
    );
    // A negative number reaches the store's own check (clap took it for a flag before).
    let r = db.cli(&["cleanup", "--days", "-1"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("invalid input: days_old"), "{}", r.stderr);
    let r = db.cli(&["cleanup", "--days", "30", "--batch-size", "2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("removed 5 tasks and 15 steps"),
        "{}",
        r.stdout
    );
    assert!(r.stderr.contains("cleanup: 5/5 tasks"), "{}", r.stderr);
    let left: Vec<String> = store
        .get_user_tasks("u", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    assert_eq!(left, ["fresh"]);
    assert!(store
        .scan_history("u", &HistoryScan::task("old0", 10))
        .await
        .unwrap()
        .steps
        .is_empty());
    assert_eq!(
        db.cli(&["cleanup", "--days", "30", "--batch-size", "0"])
            .code,
        2
    );
}

#[tokio::test]
async fn demo_on_postgres() {
    let db = Db::fresh().await;
    let r = db.cli(&["--json", "demo"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = r.json();
    assert_eq!(j["backend"], "postgres");
    assert_eq!(
        j["cleanup"],
        json!({"tasks_removed": 1, "steps_removed": 3, "partitions_dropped": 0})
    );
    // A second run works too: each run has its own user, and it says where its data went
    // and how to look at it.
    let r = db.cli(&["demo"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let user = r
        .stdout
        .lines()
        .next()
        .and_then(|l| l.split("as user ").nth(1))
        .and_then(|l| l.split(':').next())
        .unwrap()
        .to_owned();
    let hint = format!("taskhistory --schema {} tasks {user}", db.schema);
    assert!(r.stdout.contains(&hint), "{}", r.stdout);
    let listed = db.cli(&["tasks", &user]);
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    assert!(listed.stdout.contains("task_456"), "{}", listed.stdout);
}

/// `tasks` with the listing filters (`--updated-after` inclusive, `--updated-before`
/// exclusive, `--prefix`), with the status filter and cursor pages, as a table and as JSON;
/// a bad filter names its field.
#[tokio::test]
async fn tasks_filters() {
    let db = Db::fresh().await;
    let store = db.store().await;
    let base = Utc::now() - Duration::hours(1);
    let at = |s: i64| base + Duration::seconds(s);
    let records: Vec<StepRecord> = (0..6)
        .flat_map(|i| {
            let r = if i == 3 {
                TaskStepResult::success("s", json!(i), "m")
            } else {
                TaskStepResult::running("s", json!(i), "m")
            };
            [
                StepRecord::new("u", format!("job-{i}"), 0, r.clone()).at(at(i)),
                StepRecord::new("u", format!("run-{i}"), 0, r).at(at(i)),
            ]
        })
        .collect();
    store.save_batch_task_history(&records).await.unwrap();
    let rfc = |s: i64| at(s).to_rfc3339();
    let ids = |r: &Run| -> Vec<String> {
        assert_eq!(r.code, 0, "{}", r.stderr);
        r.json()["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["task_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (after, before) = (rfc(1), rfc(4));
    let base_args = [
        "--json",
        "tasks",
        "u",
        "--prefix",
        "job-",
        "--updated-after",
        &after,
        "--updated-before",
        &before,
    ];
    let r = db.cli(&base_args);
    assert_eq!(ids(&r), ["job-3", "job-2", "job-1"]);
    assert!(r.json()["next_cursor"].is_null());
    // The alias, the status filter and a page with its cursor.
    let r = db.cli(&[&base_args[..], &["--status", "running", "--limit", "1"]].concat());
    assert_eq!(ids(&r), ["job-2"]);
    let cursor = r.json()["next_cursor"].as_str().unwrap().to_owned();
    let mut next = base_args.to_vec();
    next[3] = "--task-id-prefix";
    let r = db.cli(&[&next[..], &["--status", "running", "--cursor", &cursor]].concat());
    assert_eq!(ids(&r), ["job-1"]);
    // The table form.
    let r = db.cli(&["tasks", "u", "--prefix", "run-", "--updated-after", &rfc(5)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("run-5") && !r.stdout.contains("run-4"),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains("job-"), "{}", r.stdout);
    // Bad filters: exit 2, the field named.
    let r = db.cli(&[
        "tasks",
        "u",
        "--updated-after",
        &rfc(4),
        "--updated-before",
        &rfc(1),
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("updated_before"), "{}", r.stderr);
    let long = "p".repeat(256);
    let r = db.cli(&["tasks", "u", "--prefix", &long]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("task_id_prefix"), "{}", r.stderr);
    let r = db.cli(&["tasks", "u", "--updated-before", "noon"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--updated-before"), "{}", r.stderr);
}

/// `counts` and `activity` (as tables and as JSON) say what the store's `task_counts` and
/// `task_activity` say; `activity`'s default is the 24 hours ending at the next hour.
#[tokio::test]
async fn counts_and_activity() {
    let db = Db::fresh().await;
    let store = db.store().await;
    let now = Utc::now();
    let ago = |h: i64| now - Duration::hours(h);
    let done = TaskStepResult::success("s", json!(1), "done");
    let failed = TaskStepResult::failure("s", ErrorCode::Execution, "broken");
    let running = TaskStepResult::running("s", json!(1), "running");
    store
        .save_batch_task_history(&[
            StepRecord::new("u", "a", 0, running.clone()).at(ago(30)),
            StepRecord::new("u", "a", 1, done.clone()).at(ago(30)),
            StepRecord::new("u", "b", 0, failed).at(ago(2)),
            StepRecord::new("u", "c", 0, done).at(ago(2)),
            StepRecord::new("u", "d", 0, running).at(ago(1)),
        ])
        .await
        .unwrap();
    let r = db.cli(&["--json", "counts", "u"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let counts = store.task_counts("u").await.unwrap();
    assert_eq!(r.json()["counts"], serde_json::to_value(counts).unwrap());
    assert_eq!(r.json()["total"], 4);
    assert_eq!(counts.get(TaskStatus::Completed), 2);
    let r = db.cli(&["counts", "u"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for (status, n) in [
        ("completed", 2),
        ("failed", 1),
        ("running", 1),
        ("total", 4),
    ] {
        assert!(
            r.stdout
                .lines()
                .any(|l| l.contains(status) && l.split_whitespace().any(|w| w == n.to_string())),
            "{status} {n}: {}",
            r.stdout
        );
    }
    // The default: the last 24 hours (not the task of 30 hours ago).
    let r = db.cli(&["--json", "activity", "u"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let to = taskhistory_core::validate::hour_of(Utc::now()) + Duration::hours(1);
    let expected = store
        .task_activity("u", to - Duration::hours(24), to)
        .await
        .unwrap();
    assert_eq!(r.json()["hours"], serde_json::to_value(&expected).unwrap());
    assert_eq!(expected.iter().map(|h| h.completed).sum::<u64>(), 1);
    let (from, until) = (ago(48).to_rfc3339(), now.to_rfc3339());
    let r = db.cli(&["--json", "activity", "u", "--from", &from, "--to", &until]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let expected = store.task_activity("u", ago(48), now).await.unwrap();
    assert_eq!(r.json()["hours"], serde_json::to_value(&expected).unwrap());
    assert_eq!(expected.iter().map(|h| h.completed).sum::<u64>(), 2);
    let r = db.cli(&["activity", "u", "--from", &from, "--to", &until]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("COMPLETED"), "{}", r.stdout);
    assert!(
        r.stdout
            .contains(&format!("{} hour(s) with activity", expected.len())),
        "{}",
        r.stdout
    );
    // Bad spans: exit 2, `to` named.
    let far = ago(24 * 200).to_rfc3339();
    for args in [
        &["activity", "u", "--from", &until, "--to", &from][..],
        &["activity", "u", "--from", &far],
    ] {
        let r = db.cli(args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("to"), "{}", r.stderr);
    }
    let r = db.cli(&["activity", "u", "--from", "monday"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--from"), "{}", r.stderr);
}

#[tokio::test]
async fn explain_and_query_stats() {
    let db = Db::fresh().await;
    let store = db.store().await;
    store
        .save_task_history("u", "t", 0, &TaskStepResult::running("s", json!(1), "m"))
        .await
        .unwrap();
    let r = db.cli(&[
        "--json",
        "explain",
        "--user",
        "u",
        "--task",
        "t",
        "--analyze",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let plans = r.json();
    // The plan of statement `name`, as text.
    let plan_of = |name: &str| {
        plans
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing"))["plan"]
            .to_string()
    };
    let names: Vec<&str> = plans
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for name in [
        "save_steps",
        "load_history",
        "task_status",
        "list_tasks",
        "cleanup_batch",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    let status_plan = plans
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "task_status")
        .unwrap()["plan"]
        .to_string();
    assert!(status_plan.contains("task_summary_pkey"), "{status_plan}");
    assert!(status_plan.contains("actual time"), "{status_plan}");
    // The listing filters' statements: a time range walks the activity indexes, a prefix a
    // range of the primary key.
    for (name, index) in [
        ("list_tasks_in_range", "task_summary_user_activity"),
        (
            "list_tasks_with_status_in_range",
            "task_summary_user_status_activity",
        ),
        ("list_tasks_with_prefix", "task_summary_pkey"),
    ] {
        let plan = plan_of(name);
        assert!(plan.contains(index), "{name}: {plan}");
        assert!(!plan.contains("Seq Scan"), "{name}: {plan}");
    }
    // Counts, activity and the operators' recent failures read their own indexes.
    for (name, index) in [
        ("task_counts", "task_counts_pkey"),
        ("task_activity", "task_activity_pkey"),
        ("recent_failures", "task_summary_recent_failures"),
    ] {
        let plan = plan_of(name);
        assert!(plan.contains(index), "{name}: {plan}");
    }
    // The log's read walks each watched user's part of the position index.
    let events_plan = plan_of("events_after");
    assert!(
        events_plan.contains("task_history_user_position"),
        "{events_plan}"
    );
    // A user's first position walks the same index backwards from its newest row.
    let newest_plan = plan_of("newest_seen");
    assert!(
        newest_plan.contains("task_history_user_position") && newest_plan.contains("Backward"),
        "{newest_plan}"
    );
    // Combined status checks probe each task by its keys, never a scan.
    let statuses_plan = plan_of("task_statuses");
    assert!(
        statuses_plan.contains("task_summary_pkey") && !statuses_plan.contains("Seq Scan"),
        "{statuses_plan}"
    );
    // ANALYZE ran the writes inside a rolled-back transaction: nothing changed.
    assert_eq!(
        store.check_task_status("u", "t").await.unwrap(),
        TaskStatus::Running
    );
    assert_eq!(store.load_task_history("u", "t").await.unwrap().len(), 1);

    // This server has no pg_stat_statements loaded: a clear message on how to enable it.
    let r = db.cli(&["stats", "--queries"]);
    if r.code == 0 {
        assert!(r.stdout.contains("CALLS"), "{}", r.stdout);
    } else {
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert!(
            r.stderr.contains("shared_preload_libraries"),
            "{}",
            r.stderr
        );
    }
}

#[tokio::test]
async fn per_status_retention() {
    let db = Db::fresh().await;
    let store = db.store().await;
    let old = Utc::now() - Duration::days(40);
    let mut records = Vec::new();
    for t in 0..3 {
        records.push(
            StepRecord::new(
                "u",
                format!("done{t}"),
                0,
                TaskStepResult::success("s", json!(t), "ok"),
            )
            .at(old),
        );
        records.push(
            StepRecord::new(
                "u",
                format!("failed{t}"),
                0,
                TaskStepResult::failure("s", ErrorCode::Execution, "boom"),
            )
            .at(old),
        );
    }
    store.save_batch_task_history(&records).await.unwrap();
    let r = db.cli(&[
        "--json",
        "cleanup",
        "--days",
        "30",
        "--status",
        "completed",
        "--dry-run",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["tasks_removed"], 3);
    let r = db.cli(&["cleanup", "--days", "30", "--status", "completed"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut left: Vec<String> = store
        .get_user_tasks("u", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["failed0", "failed1", "failed2"],
        "failed tasks are kept longer"
    );
    assert_eq!(
        memory(&["cleanup", "--days", "1", "--status", "failed"]).code,
        1
    );
}

#[tokio::test]
async fn watch_prints_events_as_lines() {
    use std::io::{BufRead, BufReader};
    let db = Db::fresh().await;
    let store = db.store().await;
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("taskhistory"))
        .args(["--database-url", &db.url, "--schema", &db.schema])
        .args(["--json", "watch", "u", "--count", "3"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it is watching.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.starts_with("watching"), "{line}");
    store
        .save_task_history("v", "t", 0, &TaskStepResult::running("s", json!(0), "m"))
        .await
        .unwrap();
    for step in 0..2 {
        store
            .save_task_history(
                "u",
                "t",
                step,
                &TaskStepResult::running("s", json!(step), "m"),
            )
            .await
            .unwrap();
    }
    assert!(store.mark_task_as_cancelled("u", "t").await.unwrap());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let got: Vec<(String, i64, String)> = events
        .iter()
        .map(|e| {
            (
                e["user_id"].as_str().unwrap().to_owned(),
                e["step"].as_i64().unwrap(),
                e["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("u".to_owned(), 0, "step_saved".to_owned()),
            ("u".to_owned(), 1, "step_saved".to_owned()),
            ("u".to_owned(), 2, "cancelled".to_owned()),
        ]
    );
}

/// `watch` in one process sees `import` and `cancel` run as other processes: with its poll
/// set to an hour, only their wake-ups (sent when each command closes its store before it
/// exits) can deliver them. Then `--after` the last printed cursor resumes with exactly the
/// writes after it.
#[tokio::test]
async fn watch_sees_other_commands_at_once_and_resumes_after_a_cursor() {
    use std::io::{BufRead, BufReader};
    let db = Db::fresh().await;
    db.store().await.close().await;
    let watch = |extra: &[&str]| {
        let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("taskhistory"))
            .env("DB_WATCH_POLL", "3600")
            .args(["--database-url", &db.url, "--schema", &db.schema])
            .args(["--json", "watch", "u"])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        assert!(line.starts_with("watching"), "{line}");
        (child, stderr)
    };
    let (child, _stderr) = watch(&["--count", "3"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("steps.jsonl");
    write_lines(&file, &[record_line("u", "t", 0), record_line("u", "t", 1)]);
    let imported = db.cli(&["import", file.to_str().unwrap()]);
    assert_eq!(imported.code, 0, "{}", imported.stderr);
    let cancelled = db.cli(&["cancel", "u", "t"]);
    assert_eq!(cancelled.code, 0, "{}", cancelled.stderr);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<(i64, &str)> = events
        .iter()
        .map(|e| (e["step"].as_i64().unwrap(), e["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        [(0, "step_saved"), (1, "step_saved"), (2, "cancelled")]
    );
    // Resumed after the first event: the other two, then a new write, nothing else.
    let first = events[0]["cursor"].as_str().unwrap().to_owned();
    let (child, mut stderr) = watch(&["--count", "3", "--after", &first]);
    let store = db.store().await;
    store
        .save_task_history("u", "next", 0, &TaskStepResult::running("s", json!(0), "m"))
        .await
        .unwrap();
    store.close().await;
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let resumed: Vec<(String, i64)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|e| {
            (
                e["task_id"].as_str().unwrap().to_owned(),
                e["step"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        resumed,
        [
            ("t".to_owned(), 1),
            ("t".to_owned(), 2),
            ("next".to_owned(), 0)
        ]
    );
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert!(rest.contains("--after pg~"), "{rest}");
}

#[tokio::test]
async fn partitions_convert_ensure_list_and_cleanup_drops() {
    let db = Db::fresh().await;
    let store = db.store().await;
    let r = db.cli(&["--json", "partitions", "list"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["layout"]["layout"], "plain");
    // A task that started 200 days ago, long finished.
    let old = Utc::now() - Duration::days(200);
    store
        .save_batch_task_history(&[StepRecord::new(
            "u",
            "ancient",
            0,
            TaskStepResult::success("s", json!(1), "ok"),
        )
        .at(old)])
        .await
        .unwrap();
    let r = db.cli(&[
        "partitions",
        "convert",
        "--interval",
        "month",
        "--ahead",
        "2",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("layout: partitioned by month"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("task_history_default"), "{}", r.stdout);
    let r = db.cli(&["--json", "partitions", "ensure", "--ahead", "4"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let made = r.json()["made"].as_array().unwrap().len();
    assert_eq!(made, 2, "two more months ahead: {}", r.stdout);
    let r = db.cli(&["--json", "cleanup", "--days", "30"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report = r.json();
    assert_eq!(report["tasks_removed"], 1);
    assert!(
        report["partitions_dropped"].as_u64().unwrap() >= 1,
        "{report}"
    );
    assert!(store
        .load_task_history("u", "ancient")
        .await
        .unwrap()
        .is_empty());
    assert_eq!(memory(&["partitions", "list"]).code, 1);
}

/// Sends `signal` (e.g. "-INT") to a child process.
fn signal(child: &std::process::Child, signal: &str) {
    let sent = std::process::Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// The binary on `db`'s schema as a child process, every stream piped.
fn spawn(db: &Db, args: &[&str]) -> std::process::Child {
    std::process::Command::new(assert_cmd::cargo::cargo_bin("taskhistory"))
        .args(["--database-url", &db.url, "--schema", &db.schema])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// A user with `tasks` x `steps` steps, saved in one batch.
async fn many_steps(db: &Db, user: &str, tasks: usize, steps: i32) {
    let store = db.store().await;
    let records: Vec<StepRecord> = (0..tasks)
        .flat_map(|t| {
            (0..steps).map(move |s| {
                StepRecord::new(
                    user,
                    format!("t{t}"),
                    s,
                    TaskStepResult::running(
                        format!("s{s}"),
                        json!({"n": s, "pad": "x".repeat(64)}),
                        "m",
                    ),
                )
            })
        })
        .collect();
    store.save_batch_task_history(&records).await.unwrap();
    store.close().await;
}

#[tokio::test]
async fn interrupted_import_from_stdin_reports_the_committed_lines() {
    use std::io::Write;
    let db = Db::fresh().await;
    let store = db.store().await;
    let mut child = spawn(&db, &["--json", "import", "-", "--batch-size", "10"]);
    // Two whole batches and half of a third; stdin stays open, so the tool is blocked
    // reading it when the signal comes.
    let mut stdin = child.stdin.take().unwrap();
    let lines: Vec<String> = (0..25).map(|s| record_line("u", "t", s)).collect();
    stdin
        .write_all((lines.join("\n") + "\n").as_bytes())
        .unwrap();
    stdin.flush().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while store.load_task_history("u", "t").await.unwrap().len() < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the batches never committed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    signal(&child, "-INT");
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["imported"], 20, "{report}");
    assert_eq!(report["lines"], 20, "{report}");
    assert_eq!(report["committed_through_line"], 20, "{report}");
    assert_eq!(report["interrupted"], true, "{report}");
    assert!(
        stderr.contains("interrupted: lines up to 20 are committed"),
        "{stderr}"
    );
    assert_eq!(store.load_task_history("u", "t").await.unwrap().len(), 20);
    store.close().await;
}

#[tokio::test]
async fn interrupted_export_to_stdout_ends_on_a_whole_line() {
    use std::io::Read;
    let db = Db::fresh().await;
    many_steps(&db, "u", 15, 1_000).await;
    let mut child = spawn(&db, &["export", "u"]);
    let mut stdout = child.stdout.take().unwrap();
    // The tool is now blocked writing its first page into the pipe.
    let mut head = vec![0; 100];
    stdout.read_exact(&mut head).unwrap();
    signal(&child, "-INT");
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    head.extend(rest);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    let text = String::from_utf8(head).unwrap();
    assert!(text.ends_with('\n'), "the last line is cut");
    let lines: Vec<StepRecord> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() < 15_000, "the export was not interrupted");
    assert!(
        stderr.contains(&format!("interrupted: exported {} step(s)", lines.len())),
        "{stderr}"
    );
}

#[tokio::test]
async fn interrupted_export_to_a_file_leaves_nothing_behind() {
    use std::io::Read;
    let db = Db::fresh().await;
    many_steps(&db, "u", 15, 1_000).await;
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("u.jsonl");
    let partial = dir.path().join("u.jsonl.partial");
    // The partial file is a FIFO this test reads: the tool blocks writing it, and is
    // interrupted in the middle of the export.
    assert!(std::process::Command::new("mkfifo")
        .arg(&partial)
        .status()
        .unwrap()
        .success());
    let child = spawn(&db, &["export", "u", "-o", target.to_str().unwrap()]);
    let mut fifo = std::fs::File::open(&partial).unwrap();
    let mut head = vec![0; 100];
    fifo.read_exact(&mut head).unwrap();
    signal(&child, "-INT");
    std::io::copy(&mut fifo, &mut std::io::sink()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("was not written"), "{stderr}");
    assert!(!target.exists(), "the target was written");
    assert!(!partial.exists(), "the partial file was left behind");
}

#[test]
fn subcommand_help_lists_connection_options_apart() {
    let r = run(bin().args(["cleanup", "--help"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (own, rest) = r
        .stdout
        .split_once("Connection options (every command):")
        .unwrap_or_else(|| panic!("no connection section:\n{}", r.stdout));
    assert!(own.contains("--days"), "{}", r.stdout);
    assert!(!own.contains("--database-url"), "{}", r.stdout);
    assert!(rest.contains("--database-url"), "{}", r.stdout);
    assert!(!rest.contains("--days"), "{}", r.stdout);
}

#[tokio::test]
async fn migrate_adopts_a_python_table_and_compat_switches_the_mode() {
    let db = Db::fresh().await;
    // The Python service's table, with one step it wrote.
    let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {s}; SET search_path TO {s};
             CREATE TABLE task_history (id SERIAL PRIMARY KEY, user_id TEXT NOT NULL,
                 task_id TEXT NOT NULL, step INTEGER NOT NULL, result JSONB NOT NULL,
                 timestamp TIMESTAMP NOT NULL, status TEXT NOT NULL DEFAULT 'pending');
             INSERT INTO task_history (user_id, task_id, step, result, timestamp, status)
             VALUES ('u', 't', 0, '{{\"step\": \"s\", \"status\": \"running\"}}', now(), 'running');",
            s = db.schema
        ))
        .await
        .unwrap();
    let r = db.cli(&["migrate"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("python compatibility: on since"),
        "{}",
        r.stdout
    );
    // A Python INSERT (no started_at) now lands as the store's own save.
    client
        .execute(
            "INSERT INTO task_history (user_id, task_id, step, result, timestamp, status) \
             VALUES ($1, $2, $3, $4::text::jsonb, now()::timestamp, $5)",
            &[
                &"u",
                &"t",
                &1_i32,
                &r#"{"step": "s1", "status": "completed"}"#,
                &"completed",
            ],
        )
        .await
        .unwrap();
    let r = db.cli(&["status", "u", "t"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("completed"), "{}", r.stdout);
    let r = db.cli(&["--json", "health"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let health = r.json();
    assert_eq!(health["python_compat"]["enabled"], true, "{health}");
    assert_eq!(health["python_compat"]["python_writes"], 1, "{health}");
    let r = db.cli(&["stats"]);
    assert!(
        r.stdout.contains("python compatibility  on since"),
        "{}",
        r.stdout
    );
    let r = db.cli(&["compat", "off"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.trim(), "python compatibility: off");
    assert!(
        r.stderr.contains("a Python INSERT now fails"),
        "{}",
        r.stderr
    );
    let refused = client
        .execute(
            "INSERT INTO task_history (user_id, task_id, step, result, timestamp, status) \
             VALUES ('u', 't', 2, '{}', now(), 'running')",
            &[],
        )
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("started_at") || format!("{refused:?}").contains("started_at"),
        "{refused:?}"
    );
    let r = db.cli(&["--json", "compat", "on"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["enabled"], true);
    let r = db.cli(&["--json", "compat"]);
    assert_eq!(r.json()["enabled"], true);
}

/// `taskhistory isolation`: the state per table, switched on and off by the tables' owner
/// (not a superuser, so it is held too); the CLI, opened after, declares its users and
/// reads as before, and a retention run by the owner declares the cross-user work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_switches_on_and_off_and_the_cli_reads_as_before() {
    testing::owner_config().await;
    let fresh = Db::fresh().await;
    let mut config: tokio_postgres::Config = fresh.url.parse().unwrap();
    config
        .user(testing::owner_role())
        .password(testing::owner_password());
    let url = format!(
        "postgres://{}:{}@127.0.0.1:{}/{}",
        testing::owner_role(),
        testing::owner_password(),
        config.get_ports().first().copied().unwrap_or(5432),
        config.get_dbname().unwrap()
    );
    let db = Db {
        url,
        schema: fresh.schema,
    };
    let store = db.store().await;
    store
        .save_task_history("u", "t", 0, &TaskStepResult::running("s", json!({}), ""))
        .await
        .unwrap();
    let r = db.cli(&["isolation"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("isolation: off"), "{}", r.stdout);

    let r = db.cli(&["--json", "isolation", "on"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let state = r.json();
    let tables = state["tables"].as_array().unwrap();
    assert_eq!(tables.len(), 5, "{state}");
    assert!(
        tables
            .iter()
            .all(|t| t["enabled"] == true && t["forced"] == true && t["policies"] == true),
        "{state}"
    );
    assert_eq!(state["maintainer"], true);
    let r = db.cli(&["status", "u", "t"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("running"), "{}", r.stdout);
    let r = db.cli(&["isolation", "status"]);
    assert!(r.stdout.contains("isolation: on"), "{}", r.stdout);
    let r = db.cli(&["cleanup", "--days", "0"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = db.cli(&["history", "u", "t"]);
    assert_eq!(r.code, 3, "retention removed the task: {}", r.stdout);

    let r = db.cli(&["isolation", "off"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("isolation: off"), "{}", r.stdout);
    store.close().await;
}
