//! The rolling migration (issue 16): the Python service's own statements, sent by a real
//! asyncpg client (`tests/python/legacy_service.py`, the design document's statements),
//! interleaved with the store's writes on the same tasks, on a table `init_database_schema`
//! adopted from the Python service. After every write the Python reads and the store's
//! reads agree (status, history, list); cancellation is sticky from both sides; watchers
//! are woken by Python writes; `disable_python_compat` ends it. On the plain and the
//! partitioned layout, and with the Python service on a least-privilege role. And the
//! Python service and Rust writers saving the same tasks at the same time: what each side
//! saw acknowledged is what is stored, the summaries are right, the overlap asserted.
//!
//! Needs `python3` with `asyncpg` (`scripts/test.sh` installs it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use serde_json::{json, Value};
use taskhistory_core::{StoreError, TaskHistoryStore, TaskStatus, TaskStepResult};
use taskhistory_postgres::{Partitioning, PgConfig, PgTaskHistoryStore};
use taskhistory_testing::{
    app_password, app_role, app_role_store, database_url, fresh_config, store_for,
};

const USER: &str = "user_123";

/// The Python service: one asyncpg process answering one request at a time.
struct Legacy {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Legacy {
    fn start(dsn: &str, schema: &str) -> Legacy {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/legacy_service.py"
        );
        let mut child = Command::new("python3")
            .arg(script)
            .env("LEGACY_DSN", dsn)
            .env("LEGACY_SCHEMA", schema)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("python3 is needed for this test ({e}): install Python 3"));
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut legacy = Legacy {
            child,
            stdin,
            stdout,
        };
        let ready = legacy.read();
        assert!(
            ready["ok"] == true,
            "the Python client did not start ({ready}); it needs asyncpg: \
             python3 -m pip install asyncpg (scripts/test.sh does)"
        );
        legacy
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!("the Python client answered {line:?} ({e}); did it start? it needs asyncpg")
        })
    }

    /// Sends `request`; its value, or the error the Python code raised.
    fn call(&mut self, request: Value) -> Result<Value, String> {
        writeln!(self.stdin, "{request}").unwrap();
        self.stdin.flush().unwrap();
        let reply = self.read();
        if reply["ok"] == true {
            Ok(reply["value"].clone())
        } else {
            Err(reply["error"].as_str().unwrap_or_default().to_owned())
        }
    }

    fn startup(&mut self) -> Result<Value, String> {
        self.call(json!({"op": "startup"}))
    }

    fn save(&mut self, task: &str, step: i32, status: &str) -> Result<Value, String> {
        self.call(json!({
            "op": "save", "user_id": USER, "task_id": task, "step": step, "status": status,
            "result": {"by": "python", "step": step}, "message": format!("python step {step}")
        }))
    }
}

impl Drop for Legacy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DSN for `user` (with `password`) on this process's test database.
async fn dsn(user: Option<(&str, &str)>) -> String {
    let url = database_url().await;
    let Some((user, password)) = user else {
        return url;
    };
    let config: tokio_postgres::Config = url.parse().unwrap();
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        #[cfg(unix)]
        tokio_postgres::config::Host::Unix(p) => p.to_string_lossy().into_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().unwrap();
    format!("postgres://{user}:{password}@{host}:{port}/{db}")
}

async fn create_schema(schema: &str) {
    let (client, conn) = tokio_postgres::connect(&database_url().await, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
}

fn rust_step(message: &str) -> TaskStepResult {
    TaskStepResult::running("rust", json!({"by": "rust"}), message)
}

/// The Python reads and the store's reads of `USER`'s tasks agree.
async fn agree(store: &PgTaskHistoryStore, py: &mut Legacy, tasks: &[&str], after: &str) {
    for task in tasks {
        let status = store.check_task_status(USER, task).await.unwrap();
        let py_status = py
            .call(json!({"op": "status", "user_id": USER, "task_id": task}))
            .unwrap();
        assert_eq!(json!(status), py_status, "status of {task} after {after}");
        let history: Vec<(i64, Value, String)> = store
            .load_task_history(USER, task)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (i64::from(e.step), json!(e.status), e.result.message))
            .collect();
        let py_history: Vec<(i64, Value, String)> = py
            .call(json!({"op": "load", "user_id": USER, "task_id": task}))
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["step"].as_i64().unwrap(),
                    r["status"].clone(),
                    r["result"]["message"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(history, py_history, "history of {task} after {after}");
    }
    let listed: BTreeMap<String, Value> = store
        .get_user_tasks(USER, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.task_id, json!(t.status)))
        .collect();
    let py_listed: BTreeMap<String, Value> = py
        .call(json!({"op": "tasks", "user_id": USER}))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["task_id"].as_str().unwrap().to_owned(),
                t["status"].clone(),
            )
        })
        .collect();
    assert_eq!(listed, py_listed, "task list after {after}");
    // The kept counts follow the Python service's writes as the store's (rule 10).
    let counted: taskhistory_core::TaskCounts = store
        .get_user_tasks(USER, 100)
        .await
        .unwrap()
        .iter()
        .map(|t| t.status)
        .collect();
    assert_eq!(
        store.task_counts(USER).await.unwrap(),
        counted,
        "counts after {after}"
    );
}

/// The next event of a watch (15 s at most): (task, step, status).
async fn next(events: &mut taskhistory_core::TaskEventStream) -> (String, i32, TaskStatus) {
    let event = tokio::time::timeout(Duration::from_secs(15), events.next())
        .await
        .expect("a Python write woke the watcher")
        .unwrap()
        .unwrap();
    (event.task_id, event.step, event.status)
}

/// The whole migration, from a table the Python service made to the mode switched off.
async fn rolling_migration(partitioned: bool, least_privilege: bool) {
    let config: PgConfig = fresh_config().await.watch_poll(Duration::from_secs(3600));
    let schema = config.get_schema().unwrap().to_owned();
    create_schema(&schema).await;
    let owner_dsn = dsn(None).await;

    // Before the migration: the Python service made its table and wrote to it (a retried
    // step inserted twice, as it did).
    let mut owner_py = Legacy::start(&owner_dsn, &schema);
    owner_py.startup().unwrap();
    owner_py.save("old", 0, "running").unwrap();
    owner_py.save("old", 0, "running").unwrap();
    owner_py.save("old", 1, "completed").unwrap();

    // `migrate` adopts the table and switches the mode on.
    let store = store_for(config.clone()).await;
    assert!(
        store.python_compat().await.unwrap().enabled,
        "adoption switches the mode on"
    );
    if partitioned {
        store
            .convert_to_partitioned(Partitioning::default())
            .await
            .unwrap();
        assert!(
            store.python_compat().await.unwrap().enabled,
            "the conversion keeps the mode"
        );
    }
    // A restarted Python service runs its start-up DDL again: it makes no index.
    owner_py.startup().unwrap();
    let state = store.python_compat().await.unwrap();
    assert!(
        state.python_indexes.is_empty(),
        "{:?}",
        state.python_indexes
    );

    let mut py = if least_privilege {
        app_role_store(&config).await.close().await;
        let app = Legacy::start(&dsn(Some((&app_role(), &app_password()))).await, &schema);
        drop(owner_py);
        app
    } else {
        owner_py
    };
    let tasks = ["old", "a", "b", "c"];
    agree(&store, &mut py, &tasks, "adoption").await;

    // Both sides write to the same tasks.
    py.save("a", 0, "running").unwrap();
    agree(&store, &mut py, &tasks, "a Python save of a new task").await;
    store
        .save_task_history(USER, "a", 1, &rust_step("rust step 1"))
        .await
        .unwrap();
    agree(&store, &mut py, &tasks, "a Rust save after a Python one").await;
    py.save("a", 1, "running").unwrap();
    agree(&store, &mut py, &tasks, "a Python step inserted again").await;
    py.save("a", 0, "running").unwrap();
    agree(
        &store,
        &mut py,
        &tasks,
        "a lower Python step inserted again",
    )
    .await;
    let batch: Vec<_> = (0..3)
        .map(|s| taskhistory_core::StepRecord::new(USER, "b", s, rust_step(&format!("rust b {s}"))))
        .collect();
    store.save_batch_task_history(&batch).await.unwrap();
    agree(&store, &mut py, &tasks, "a Rust batch").await;
    py.call(json!({"op": "save_batch", "records": [
        {"user_id": USER, "task_id": "b", "step": 3, "status": "running", "message": "python b 3"},
        {"user_id": USER, "task_id": "c", "step": 0, "status": "running", "message": "python c 0"},
        {"user_id": USER, "task_id": "b", "step": 1, "status": "running", "message": "python b 1"},
    ]}))
    .unwrap();
    agree(&store, &mut py, &tasks, "a Python executemany batch").await;
    // The design document's transactional save: an UPDATE of the existing step.
    py.call(
        json!({"op": "save_with_transaction", "user_id": USER, "task_id": "b", "step": 3,
                   "status": "running", "message": "python b 3 updated"}),
    )
    .unwrap();
    agree(&store, &mut py, &tasks, "a Python UPDATE of a step").await;
    py.save("a", 2, "failed").unwrap();
    agree(&store, &mut py, &tasks, "a Python failure").await;
    assert_eq!(
        store.load_task_history(USER, "a").await.unwrap().len(),
        3,
        "every write landed once"
    );

    // Cancelled from Python: sticky for both sides.
    assert_eq!(
        py.call(json!({"op": "cancel", "user_id": USER, "task_id": "c"})),
        Ok(json!(true))
    );
    agree(&store, &mut py, &tasks, "a Python cancel").await;
    assert_eq!(
        store.check_task_status(USER, "c").await.unwrap(),
        TaskStatus::Cancelled
    );
    let refused = store
        .save_task_history(USER, "c", 1, &rust_step("too late"))
        .await;
    assert!(
        matches!(refused, Err(StoreError::TaskCancelled { .. })),
        "{refused:?}"
    );
    let refused = py.save("c", 1, "running").unwrap_err();
    assert!(refused.contains("is cancelled"), "{refused}");
    agree(&store, &mut py, &tasks, "writes to a task Python cancelled").await;

    // Cancelled from Rust: sticky for Python too.
    assert!(store.mark_task_as_cancelled(USER, "b").await.unwrap());
    agree(&store, &mut py, &tasks, "a Rust cancel").await;
    let refused = py.save("b", 9, "running").unwrap_err();
    assert!(refused.contains("is cancelled"), "{refused}");
    let refused = py
        .call(
            json!({"op": "save_with_transaction", "user_id": USER, "task_id": "b", "step": 0,
                     "status": "running"}),
        )
        .unwrap_err();
    assert!(refused.contains("is cancelled"), "{refused}");
    agree(&store, &mut py, &tasks, "writes to a task Rust cancelled").await;

    // A watcher (its poll set to an hour) is woken by a Python write alone.
    let mut events = store.watch_user(USER, None).await.unwrap();
    for step in 0..2 {
        py.save("d", step, "running").unwrap();
        assert_eq!(
            next(&mut events).await,
            ("d".to_owned(), step, TaskStatus::Running)
        );
    }
    // A Python cancel (every row set to cancelled) is one cancellation event, as the store's.
    py.call(json!({"op": "cancel", "user_id": USER, "task_id": "d"}))
        .unwrap();
    assert_eq!(
        next(&mut events).await,
        ("d".to_owned(), 1, TaskStatus::Cancelled)
    );
    py.save("f", 0, "running").unwrap();
    assert_eq!(
        next(&mut events).await,
        ("f".to_owned(), 0, TaskStatus::Running)
    );

    // The mode's functions run with the owner's rights: only its triggers may call them.
    if least_privilege {
        let refused = py
            .call(json!({"op": "call_save_function", "user_id": USER, "task_id": "g"}))
            .unwrap_err();
        assert!(refused.contains("permission denied"), "{refused}");
    }

    let state = store.python_compat().await.unwrap();
    assert!(state.python_writes >= 10, "{state:?}");
    assert!(state.last_python_write.is_some(), "{state:?}");

    // The last Python writer is gone: the mode goes, and a Python INSERT fails loudly.
    let state = store.disable_python_compat().await.unwrap();
    assert!(!state.enabled && state.python_writes == 0, "{state:?}");
    let refused = py.save("e", 0, "running").unwrap_err();
    assert!(refused.contains("started_at"), "{refused}");
    assert!(store.load_task_history(USER, "e").await.unwrap().is_empty());
    if !least_privilege {
        // After the mode, a Python start-up would make its indexes again: they are reported.
        py.startup().unwrap();
        let state = store.python_compat().await.unwrap();
        assert_eq!(state.python_indexes.len(), 6, "{state:?}");
    }
    store.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_and_rust_write_the_same_tasks_on_the_plain_layout() {
    rolling_migration(false, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_and_rust_write_the_same_tasks_on_the_partitioned_layout() {
    rolling_migration(true, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_on_a_least_privilege_role() {
    rolling_migration(false, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_on_a_least_privilege_role_on_the_partitioned_layout() {
    rolling_migration(true, true).await;
}

/// Python saves of one side: per task, the steps and their statuses.
type Plan = Vec<(String, Vec<(i32, &'static str)>)>;

/// Seconds since the Unix epoch: the clock both processes read (Python's `time.time()`).
fn epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// One round of [`python_and_rust_writers_at_once_keep_every_acknowledged_write`]: the
/// Python service's saves and the Rust writers' on the same tasks at the same time; checks
/// what is stored against what each side saw acknowledged. Returns how many writes of each
/// side were acknowledged while the other side was writing (Python's, Rust's).
async fn python_and_rust_at_once(
    store: &PgTaskHistoryStore,
    py: Legacy,
    round: usize,
) -> (Legacy, usize, usize) {
    const TASKS: usize = 8;
    const PAIRS: i32 = 20;
    // Per task, Python saves the even steps and Rust the odd ones, so every acknowledged
    // write is a row of its own. The highest step says `completed` (Python's on odd
    // tasks, Rust's on even ones), the others `running`: each side saves in ascending
    // order, so the other side's lower steps may land after the highest.
    let highest = |k: usize| if k % 2 == 1 { 2 * PAIRS } else { 2 * PAIRS - 1 };
    let status_of = |k: usize, step: i32| {
        if step == highest(k) {
            "completed"
        } else {
            "running"
        }
    };
    let task = |k: usize| format!("race{round}-{k}");
    let python_plan: Plan = (0..TASKS)
        .map(|k| {
            let steps = (0..=PAIRS)
                .map(|i| 2 * i)
                .filter(|s| *s <= highest(k))
                .map(|s| (s, status_of(k, s)))
                .collect();
            (task(k), steps)
        })
        .collect();
    let rust_plan: Plan = (0..TASKS)
        .map(|k| {
            let steps = (0..PAIRS)
                .map(|i| 2 * i + 1)
                .map(|s| (s, status_of(k, s)))
                .collect();
            (task(k), steps)
        })
        .collect();

    // The Python service's saves, in its own process (the call waits for all of them).
    let request = json!({
        "op": "save_concurrently",
        "user_id": USER,
        "tasks": python_plan
            .iter()
            .map(|(task, steps)| json!({"task_id": task, "steps": steps}))
            .collect::<Vec<_>>(),
    });
    let writes_before = store.python_compat().await.unwrap().python_writes;
    let python = tokio::task::spawn_blocking(move || {
        let mut py = py;
        let reply = py.call(request);
        (py, reply)
    });
    // The Rust writers start once the Python service has written (so both write at once,
    // whatever the Python process's start-up takes), one per task.
    for polls in 0.. {
        if store.python_compat().await.unwrap().python_writes > writes_before {
            break;
        }
        assert!(
            polls < 5_000,
            "round {round}: the Python service never wrote"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let rust_started = SystemTime::now();
    let writers: Vec<_> = rust_plan
        .iter()
        .cloned()
        .map(|(task, steps)| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for (step, status) in steps {
                    let result = if status == "completed" {
                        TaskStepResult::success("rust", json!({"by": "rust", "step": step}), "")
                    } else {
                        TaskStepResult::running("rust", json!({"by": "rust", "step": step}), "")
                    };
                    let saved = store.save_task_history(USER, &task, step, &result).await;
                    outcomes.push((task.clone(), step, saved.map(|()| SystemTime::now())));
                }
                outcomes
            })
        })
        .collect();
    let mut rust_acked: BTreeMap<(String, i32), SystemTime> = BTreeMap::new();
    let mut rust_refused = Vec::new();
    for w in writers {
        for (task, step, outcome) in w.await.unwrap() {
            match outcome {
                Ok(at) => {
                    rust_acked.insert((task, step), at);
                }
                // A conflict is a statement that failed (after the store's retries):
                // nothing of it was written. Any other error (a timeout: written or not,
                // unknown) fails the test.
                Err(e @ StoreError::Conflict { .. }) => rust_refused.push((task, step, e)),
                Err(e) => panic!("round {round}: the store failed {task}/{step}: {e:?}"),
            }
        }
    }
    let rust_ended = SystemTime::now();
    let (py, reply) = python.await.unwrap();
    let reply = reply.unwrap();
    let (py_started, py_ended) = (
        reply["started"].as_f64().unwrap(),
        reply["ended"].as_f64().unwrap(),
    );
    let py_acked: BTreeMap<(String, i32), f64> = reply["acked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                (
                    a[0].as_str().unwrap().to_owned(),
                    a[1].as_i64().unwrap() as i32,
                ),
                a[2].as_f64().unwrap(),
            )
        })
        .collect();
    let py_refused = reply["refused"].as_array().unwrap();
    let planned: usize = python_plan.iter().map(|(_, s)| s.len()).sum();
    assert_eq!(
        py_acked.len() + py_refused.len(),
        planned,
        "round {round}: every Python write answered once"
    );
    // Writers of one task race: a Python INSERT is numbered in the event log (its row's
    // `xid` default) before it queues for its task, and the first writes of a new task race
    // to set its start, so a Python write can be refused with a serialization failure (the
    // Python service does not retry), and a Rust save with a conflict once the store's
    // retries are spent. Those are the only refusals allowed; they are counted, and
    // nothing refused is stored (checked below). Most writes of each side get through.
    for refusal in py_refused {
        let error = refusal[2].as_str().unwrap();
        assert!(
            error.starts_with("SerializationError: "),
            "round {round}: a Python write refused for another reason: {refusal}"
        );
    }
    let rust_planned: usize = rust_plan.iter().map(|(_, s)| s.len()).sum();
    assert!(
        py_acked.len() * 2 > planned && rust_acked.len() * 2 > rust_planned,
        "round {round}: acknowledged: Python {} of {planned}, Rust {} of {rust_planned} \
         ({rust_refused:?})",
        py_acked.len(),
        rust_acked.len()
    );
    // What is stored is exactly what each side saw acknowledged, and each task's summary
    // is the merge of those rows.
    let summaries: BTreeMap<String, taskhistory_core::TaskSummary> = store
        .get_user_tasks(USER, 1_000)
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.task_id.clone(), t))
        .collect();
    // The counts kept by both sides' concurrent writes equal the tasks counted.
    let counted: taskhistory_core::TaskCounts = summaries.values().map(|t| t.status).collect();
    assert_eq!(
        store.task_counts(USER).await.unwrap(),
        counted,
        "round {round}: counts"
    );
    for k in 0..TASKS {
        let task = task(k);
        let history = store.load_task_history(USER, &task).await.unwrap();
        let stored = |by: &str, parity: i32| -> Vec<i32> {
            history
                .iter()
                .filter(|e| e.step % 2 == parity)
                .inspect(|e| {
                    assert_eq!(
                        e.result.result["by"], by,
                        "round {round}: {task}/{} holds the other side's write",
                        e.step
                    )
                })
                .map(|e| e.step)
                .collect()
        };
        let acked = |keys: Vec<&(String, i32)>| -> Vec<i32> {
            keys.into_iter()
                .filter(|(t, _)| *t == task)
                .map(|(_, s)| *s)
                .collect()
        };
        let (py_stored, rust_stored) = (stored("python", 0), stored("rust", 1));
        let (py_steps, rust_steps) = (
            acked(py_acked.keys().collect()),
            acked(rust_acked.keys().collect()),
        );
        assert_eq!(
            (py_stored.len(), rust_stored.len()),
            (py_steps.len(), rust_steps.len()),
            "round {round}: {task}: rows stored (Python, Rust) against writes acknowledged"
        );
        assert_eq!(py_stored, py_steps, "round {round}: {task}: Python's rows");
        assert_eq!(
            rust_stored, rust_steps,
            "round {round}: {task}: Rust's rows"
        );
        let top = py_steps.iter().chain(&rust_steps).max().copied();
        match (summaries.get(&task), top) {
            (Some(s), Some(top)) => {
                assert_eq!(
                    (s.step_count, s.last_step, json!(s.status)),
                    (
                        (py_steps.len() + rust_steps.len()) as i64,
                        top,
                        json!(status_of(k, top))
                    ),
                    "round {round}: {task}: summary (step_count, last_step, status)"
                );
            }
            (None, None) => {}
            (s, top) => panic!("round {round}: {task}: summary {s:?}, highest write {top:?}"),
        }
    }

    // Both ran at once: the windows intersect, and each side had writes acknowledged while
    // the other was writing.
    let (rust_from, rust_to) = (epoch(rust_started), epoch(rust_ended));
    assert!(
        py_started < rust_to && rust_from < py_ended,
        "round {round}: Python wrote in [{py_started:.3}, {py_ended:.3}], Rust in \
         [{rust_from:.3}, {rust_to:.3}]: no overlap"
    );
    let py_during = py_acked
        .values()
        .filter(|at| (rust_from..=rust_to).contains(*at))
        .count();
    let rust_during = rust_acked
        .values()
        .filter(|at| (py_started..=py_ended).contains(&epoch(**at)))
        .count();
    eprintln!(
        "round {round}: Python {} acknowledged ({} refused), {py_during} while Rust wrote; \
         Rust {} acknowledged ({} refused), {rust_during} while Python wrote",
        py_acked.len(),
        py_refused.len(),
        rust_acked.len(),
        rust_refused.len()
    );
    for refusal in py_refused {
        eprintln!("  Python refused: {refusal}");
    }
    for (task, step, e) in &rust_refused {
        eprintln!("  Rust refused: {task}/{step}: {e}");
    }
    (py, py_during, rust_during)
}

/// The Python service (asyncpg, the seed's INSERT for single saves) and Rust writers (the
/// store's `save_task_history`) writing the same tasks at the same time, on a table the
/// store adopted: every write either side saw acknowledged is stored once, nothing else
/// is, and each summary is right (step count, highest step, its status). The overlap is
/// asserted: rounds go on (at most 5) until each side had writes acknowledged while the
/// other was writing.
#[tokio::test(flavor = "multi_thread")]
async fn python_and_rust_writers_at_once_keep_every_acknowledged_write() {
    let config: PgConfig = fresh_config().await.watch_poll(Duration::from_secs(3600));
    let schema = config.get_schema().unwrap().to_owned();
    create_schema(&schema).await;
    let mut py = Legacy::start(&dsn(None).await, &schema);
    py.startup().unwrap();
    let store = store_for(config).await;
    assert!(store.python_compat().await.unwrap().enabled);
    let (mut py_during, mut rust_during) = (0, 0);
    let mut round = 0;
    while round < 5 && (py_during == 0 || rust_during == 0) {
        let (back, p, r) = python_and_rust_at_once(&store, py, round).await;
        (py, py_during, rust_during) = (back, py_during + p, rust_during + r);
        round += 1;
    }
    assert!(
        py_during > 0 && rust_during > 0,
        "in {round} rounds, {py_during} Python writes were acknowledged while Rust wrote and \
         {rust_during} Rust writes while Python wrote: the two did not write at once"
    );
    let tasks: Vec<String> = (0..round)
        .flat_map(|r| (0..8).map(move |k| format!("race{r}-{k}")))
        .collect();
    let tasks: Vec<&str> = tasks.iter().map(String::as_str).collect();
    agree(&store, &mut py, &tasks, "Python and Rust writing at once").await;
    store.close().await;
}

/// Row-level isolation on while the Python service still runs: the legacy role declares no
/// user, so the database shows it no row and refuses its every write (its `INSERT` fails,
/// the Python code raises); the store, declaring its users, goes on. Isolation is for
/// after the last Python writer is gone (docs/reliability.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_reads_and_writes_nothing_under_isolation() {
    let config: PgConfig = fresh_config().await.watch_poll(Duration::from_secs(3600));
    let schema = config.get_schema().unwrap().to_owned();
    create_schema(&schema).await;
    let mut owner_py = Legacy::start(&dsn(None).await, &schema);
    owner_py.startup().unwrap();
    owner_py.save("old", 0, "running").unwrap();
    drop(owner_py);
    let store = store_for(config.clone()).await;
    assert!(store.python_compat().await.unwrap().enabled);
    app_role_store(&config).await.close().await;
    let mut py = Legacy::start(&dsn(Some((&app_role(), &app_password()))).await, &schema);
    // Before: the legacy role reads the task.
    assert_eq!(
        py.call(json!({"op": "status", "user_id": USER, "task_id": "old"}))
            .unwrap(),
        json!("running")
    );

    let state = store.set_isolation(true).await.unwrap();
    assert!(state.on() && state.declaring, "{state:?}");
    let err = py.save("new", 0, "running").unwrap_err();
    assert!(err.contains("row-level security"), "{err}");
    assert_eq!(
        py.call(json!({"op": "load", "user_id": USER, "task_id": "old"}))
            .unwrap(),
        json!([])
    );
    assert_eq!(
        py.call(json!({"op": "status", "user_id": USER, "task_id": "old"}))
            .unwrap(),
        json!("pending")
    );
    assert_eq!(
        py.call(json!({"op": "tasks", "user_id": USER})).unwrap(),
        json!([])
    );
    // The store declares its users and goes on.
    assert_eq!(
        store.check_task_status(USER, "old").await.unwrap(),
        TaskStatus::Running
    );
    store
        .save_task_history(USER, "old", 1, &rust_step("rust after isolation"))
        .await
        .unwrap();
    assert_eq!(store.load_task_history(USER, "old").await.unwrap().len(), 2);
    assert!(store
        .load_task_history(USER, "new")
        .await
        .unwrap()
        .is_empty());
    // Off again: the legacy role is back.
    assert!(!store.set_isolation(false).await.unwrap().on());
    py.save("new", 0, "running").unwrap();
    assert_eq!(store.load_task_history(USER, "new").await.unwrap().len(), 1);
}
