//! The rolling migration (issue 16): the Python service's own statements, sent by a real
//! asyncpg client (`tests/python/legacy_service.py`, the design document's statements),
//! interleaved with the store's writes on the same tasks, on a table `init_database_schema`
//! adopted from the Python service. After every write the Python reads and the store's
//! reads agree (status, history, list); cancellation is sticky from both sides; watchers
//! are woken by Python writes; `disable_python_compat` ends it. On the plain and the
//! partitioned layout, and with the Python service on a least-privilege role.
//!
//! Needs `python3` with `asyncpg` (`scripts/test.sh` installs it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

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
