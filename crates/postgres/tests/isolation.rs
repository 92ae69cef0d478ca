//! Row-level isolation by user (migration 8, `set_isolation`): the behaviour suite with it
//! on, directly and behind PgBouncer (the schema's owner is not a superuser, so `FORCE`
//! holds it too); the database's own refusals seen through raw SQL as the service role
//! and as the owner; a store built to declare the wrong user; retention refused to the
//! service role; the switch read back, and kept by the conversion to partitions; batches of
//! new tasks by `INSERT` of arrays (the bulk path of a declaring store), their fall-back to
//! the upsert statement, and a user the batch's handle does not declare refused; a task
//! found by its key under isolation, however many tasks its user has.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use taskhistory_core::{StoreError, TaskHistoryStore, TaskQuery, TaskStatus, TaskStepResult};
use taskhistory_postgres::{Partitioning, PgConfig, PgTaskHistoryStore};
use taskhistory_testing::{
    app_password, app_role, app_role_store, database_url, isolated_store_for, owner_config,
    owner_password, owner_role, store_for,
};

mod direct {
    taskhistory_core::conformance_tests!(taskhistory_testing::isolated_dyn_store().await);
}

mod pgbouncer {
    taskhistory_core::conformance_tests!(taskhistory_testing::isolated_pgbouncer_dyn_store().await);
}

/// Every table that holds users' rows.
const TABLES: [&str; 5] = [
    "task_history",
    "task_summary",
    "task_counts",
    "task_activity",
    "task_history_duplicates",
];

/// A schema owned by the test owner role with isolation on, holding tasks of users `a`, `b`
/// and `c` (steps, a cancel, so every counted table has rows), and the app role granted.
async fn three_users() -> (PgConfig, PgTaskHistoryStore) {
    let config = owner_config().await;
    let store = isolated_store_for(config.clone()).await;
    for user in ["a", "b", "c"] {
        for step in 0..3 {
            store
                .save_task_history(
                    user,
                    "t",
                    step,
                    &TaskStepResult::running("s", json!({ "step": step }), ""),
                )
                .await
                .unwrap();
        }
        store
            .save_task_history(user, "u", 0, &TaskStepResult::running("s", json!({}), ""))
            .await
            .unwrap();
        assert!(store.mark_task_as_cancelled(user, "u").await.unwrap());
        store
            .save_task_history(
                user,
                "v",
                0,
                &TaskStepResult::failure("s", taskhistory_core::ErrorCode::Execution, "boom"),
            )
            .await
            .unwrap();
    }
    app_role_store(&config).await.close().await;
    (config, store)
}

/// A raw connection as `user` to the test database, on `schema`.
async fn raw(user: &str, password: &str, schema: &str) -> tokio_postgres::Client {
    let mut config: tokio_postgres::Config = database_url().await.parse().unwrap();
    config.user(user).password(password);
    let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("SET search_path TO \"{schema}\""))
        .await
        .unwrap();
    client
}

async fn count(client: &tokio_postgres::Client, table: &str, user: Option<&str>) -> i64 {
    let sql = match user {
        Some(u) => format!("SELECT count(*) FROM {table} WHERE user_id = '{u}'"),
        None => format!("SELECT count(*) FROM {table}"),
    };
    client.query_one(&sql, &[]).await.unwrap().get(0)
}

/// A new history row of `user` (the app role has the sequence's usage).
fn insert_row(user: &str) -> String {
    format!(
        "INSERT INTO task_history (user_id, task_id, step, result, timestamp, status, started_at) \
         VALUES ('{user}', 'x', 0, '{{}}', now(), 'running', now())"
    )
}

async fn assert_refused(client: &tokio_postgres::Client, sql: &str) {
    let err = client.batch_execute(sql).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{sql}: {err}"
    );
    assert!(
        err.as_db_error()
            .is_some_and(|e| e.message().contains("row-level security")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_declared_nothing_sees_and_writes_nothing() {
    let (config, store) = three_users().await;
    let schema = config.get_schema().unwrap();
    // The service role has no right on the duplicates' table at all.
    for (role, password, tables) in [
        (app_role(), app_password(), &TABLES[..4]),
        (owner_role(), owner_password(), &TABLES[..]),
    ] {
        let client = raw(&role, &password, schema).await;
        for &table in tables {
            assert_eq!(count(&client, table, None).await, 0, "{role} {table}");
            let changed = client
                .execute(&format!("UPDATE {table} SET user_id = user_id"), &[])
                .await
                .unwrap();
            assert_eq!(changed, 0, "{role} updated {table}");
            let deleted = client
                .execute(&format!("DELETE FROM {table}"), &[])
                .await
                .unwrap();
            assert_eq!(deleted, 0, "{role} deleted from {table}");
        }
        assert_refused(&client, &insert_row("a")).await;
    }
    // Everything is still there for the store, which declares its users.
    for user in ["a", "b", "c"] {
        assert_eq!(store.load_task_history(user, "t").await.unwrap().len(), 3);
        let counts = store.task_counts(user).await.unwrap();
        assert_eq!(counts.total(), 3, "{user}: {counts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_user_sees_and_writes_only_its_own_rows() {
    let (config, _store) = three_users().await;
    let schema = config.get_schema().unwrap();
    let client = raw(&app_role(), &app_password(), schema).await;
    // One user declared: only its rows, in every table.
    client
        .batch_execute("BEGIN; SELECT set_config('taskhistory.declared', '{a}', true)")
        .await
        .unwrap();
    for table in ["task_history", "task_summary", "task_counts"] {
        assert!(count(&client, table, Some("a")).await > 0, "{table}");
    }
    for table in &TABLES[..4] {
        assert_eq!(
            count(&client, table, None).await,
            count(&client, table, Some("a")).await
        );
        for other in ["b", "c"] {
            assert_eq!(count(&client, table, Some(other)).await, 0, "{table}");
            let changed = client
                .execute(
                    &format!("UPDATE {table} SET user_id = user_id WHERE user_id = '{other}'"),
                    &[],
                )
                .await
                .unwrap();
            assert_eq!(changed, 0);
            let deleted = client
                .execute(
                    &format!("DELETE FROM {table} WHERE user_id = '{other}'"),
                    &[],
                )
                .await
                .unwrap();
            assert_eq!(deleted, 0);
        }
    }
    // Moving a's row to b is a write of b's: refused.
    assert_refused(
        &client,
        "UPDATE task_summary SET user_id = 'b' WHERE user_id = 'a'",
    )
    .await;
    client.batch_execute("ROLLBACK").await.unwrap();

    // A combined save's declaration of a and b: a's and b's rows, never c's.
    client
        .batch_execute("BEGIN; SELECT set_config('taskhistory.declared', '{a,b}', true)")
        .await
        .unwrap();
    client.batch_execute(&insert_row("a")).await.unwrap();
    client.batch_execute(&insert_row("b")).await.unwrap();
    assert_eq!(count(&client, "task_history", Some("c")).await, 0);
    assert_refused(&client, &insert_row("c")).await;
    client.batch_execute("ROLLBACK").await.unwrap();

    // The declaration is the transaction's: after it, nothing again.
    assert_eq!(count(&client, "task_history", None).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_declaring_the_wrong_user_gets_nothing_of_the_user_it_names() {
    let (config, store) = three_users().await;
    // A store with a bug: it declares `a` whatever its statements name.
    let buggy = PgTaskHistoryStore::connect(config.clone().declare_as(Some("a".to_owned())))
        .await
        .unwrap();
    assert!(buggy.isolation().await.unwrap().declaring);
    assert_eq!(buggy.load_task_history("a", "t").await.unwrap().len(), 3);
    assert!(buggy.load_task_history("b", "t").await.unwrap().is_empty());
    assert_eq!(
        buggy.check_task_status("b", "t").await.unwrap(),
        TaskStatus::Pending
    );
    let page = buggy
        .get_user_tasks_page("b", &TaskQuery::first(10))
        .await
        .unwrap();
    assert!(page.tasks.is_empty());
    assert_eq!(buggy.task_counts("b").await.unwrap().total(), 0);
    let write = buggy
        .save_task_history("b", "t", 9, &TaskStepResult::running("s", json!({}), ""))
        .await;
    assert!(write.is_err(), "{write:?}");
    let cancel = buggy.mark_task_as_cancelled("b", "t").await;
    assert!(
        !matches!(cancel, Ok(true)),
        "the buggy store cancelled b's task: {cancel:?}"
    );
    // b's task is as it was.
    assert_eq!(store.load_task_history("b", "t").await.unwrap().len(), 3);
    assert_eq!(
        store.check_task_status("b", "t").await.unwrap(),
        TaskStatus::Running
    );
    buggy.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_is_refused_to_the_service_role_and_done_by_the_owner() {
    let (config, store) = three_users().await;
    let app = app_role_store(&config).await;
    let state = app.isolation().await.unwrap();
    assert!(
        state.on() && state.declaring && !state.maintainer,
        "{state:?}"
    );
    match app.cleanup_old_tasks(0).await {
        Err(StoreError::Configuration { setting, .. }) => assert_eq!(setting, "isolation"),
        other => panic!("{other:?}"),
    }
    // The service role still reads and writes its users' rows.
    assert_eq!(app.load_task_history("b", "t").await.unwrap().len(), 3);
    app.save_task_history("b", "t", 3, &TaskStepResult::running("s", json!({}), ""))
        .await
        .unwrap();
    // The owner, declaring the cross-user work, removes every user's old tasks.
    let report = store.cleanup_old_tasks(0).await.unwrap();
    assert_eq!(report.tasks_removed, 9, "{report:?}");
    for user in ["a", "b", "c"] {
        assert!(store.load_task_history(user, "t").await.unwrap().is_empty());
    }
    app.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_switch_reads_back_and_survives_the_conversion_to_partitions() {
    let config = owner_config().await;
    let store = store_for(config.clone()).await;
    let off = store.isolation().await.unwrap();
    assert!(off.ready() && !off.on() && !off.declaring, "{off:?}");
    assert!(!off.owner_bypasses && !off.role_bypasses, "{off:?}");
    // The tests' admin role is a superuser: never held, and said so.
    let admin = PgTaskHistoryStore::connect(
        PgConfig::from_url(&database_url().await)
            .unwrap()
            .ssl_mode(taskhistory_postgres::SslMode::Disable)
            .schema(config.get_schema().unwrap()),
    )
    .await
    .unwrap();
    assert!(admin.isolation().await.unwrap().role_bypasses);
    admin.close().await;
    assert_eq!(off.tables.len(), TABLES.len());
    // A store opened before the switch, declaring anyway (the no-window procedure).
    let early = PgTaskHistoryStore::connect(config.clone().declare_users(true))
        .await
        .unwrap();
    assert!(early.isolation().await.unwrap().declaring);
    early
        .save_task_history("a", "t", 0, &TaskStepResult::running("s", json!({}), ""))
        .await
        .unwrap();

    let on = store.set_isolation(true).await.unwrap();
    assert!(on.on() && on.declaring && on.maintainer, "{on:?}");
    assert_eq!(early.load_task_history("a", "t").await.unwrap().len(), 1);
    let late = PgTaskHistoryStore::connect(config.clone()).await.unwrap();
    assert!(late.isolation().await.unwrap().declaring);

    store
        .convert_to_partitioned(Partitioning::default())
        .await
        .unwrap();
    let converted = store.isolation().await.unwrap();
    assert!(converted.on(), "{converted:?}");
    assert_eq!(late.load_task_history("a", "t").await.unwrap().len(), 1);
    let client = raw(
        &owner_role(),
        &owner_password(),
        config.get_schema().unwrap(),
    )
    .await;
    assert_eq!(count(&client, "task_history", None).await, 0);

    let off = store.set_isolation(false).await.unwrap();
    assert!(!off.on() && off.tables.iter().all(|t| !t.enabled && !t.forced));
    // A store that declared goes on declaring (its connections hold declarations).
    assert!(off.declaring, "{off:?}");
    assert_eq!(count(&client, "task_history", None).await, 1);
    for s in [early, late, store] {
        s.close().await;
    }
}

/// A handle acting for one user (what `serve` runs a user token's request on) declares that
/// user only: asked for another user's rows, it gets none from the database; its own
/// user's as before; a watch of another user is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_acting_for_a_user_gets_nothing_of_another() {
    let (_config, store) = three_users().await;
    let a = store.acting_for("a").unwrap();
    assert_eq!(a.load_task_history("a", "t").await.unwrap().len(), 3);
    assert!(a.load_task_history("b", "t").await.unwrap().is_empty());
    assert_eq!(
        a.check_task_status("b", "t").await.unwrap(),
        TaskStatus::Pending
    );
    assert!(a
        .get_user_tasks_page("c", &TaskQuery::first(10))
        .await
        .unwrap()
        .tasks
        .is_empty());
    assert!(a
        .save_task_history("b", "t", 7, &TaskStepResult::running("s", json!({}), ""))
        .await
        .is_err());
    assert!(matches!(
        a.watch_user("b", None).await.map(drop),
        Err(StoreError::InvalidInput { .. })
    ));
    assert!(a.watch_user("a", None).await.is_ok());
    assert_eq!(store.load_task_history("b", "t").await.unwrap().len(), 3);
    assert!(matches!(
        store.acting_for(""),
        Err(StoreError::InvalidInput { .. })
    ));
    // Nothing of every user's through it; its close leaves the store open.
    assert!(matches!(
        a.cleanup_old_tasks(0).await,
        Err(StoreError::InvalidInput { .. })
    ));
    assert!(matches!(
        a.set_isolation(false).await,
        Err(StoreError::InvalidInput { .. })
    ));
    a.close().await;
    assert_eq!(store.load_task_history("a", "t").await.unwrap().len(), 3);
}

/// The service role under isolation: its reads and writes run without an error or a retry
/// (a policy or a declaration it may not use would show here as retried failures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_role_works_under_isolation_without_errors() {
    let (config, _store) = three_users().await;
    let app = app_role_store(&config).await;
    assert!(app.isolation().await.unwrap().declaring);
    let before = app.metrics();
    for i in 0..50 {
        assert_eq!(
            app.load_task_history("a", "t").await.unwrap().len(),
            3 + usize::from(i > 0)
        );
        app.check_task_status("b", "t").await.unwrap();
        app.get_user_tasks_page("c", &TaskQuery::first(10))
            .await
            .unwrap();
        if i == 0 {
            app.save_task_history("a", "t", 3, &TaskStepResult::running("s", json!({}), ""))
                .await
                .unwrap();
        }
    }
    let after = app.metrics();
    assert_eq!(after.errors, before.errors, "{after:?}");
    assert_eq!(after.retries, before.retries, "{after:?}");
    app.close().await;
}

/// The service role's store on `config`'s schema (isolation on), every batch of new tasks
/// on the bulk path, and how many `INSERT_NEW_STEPS` and `COPY_STEPS` it has sent.
async fn bulk_app_store(config: PgConfig) -> (PgTaskHistoryStore, impl Fn() -> (usize, usize)) {
    use std::sync::{Arc, Mutex};
    use taskhistory_testing::sql;

    let sent: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = sent.clone();
    let app = app_role_store(
        &config
            .copy_min_rows(Some(1))
            .observe_statements(move |s| sink.lock().unwrap().push(s.to_owned())),
    )
    .await;
    assert!(app.isolation().await.unwrap().on());
    // The observer sees each text trimmed.
    let bulk = move || {
        let log = sent.lock().unwrap();
        let count = |text: &str| log.iter().filter(|s| s.as_str() == text).count();
        (count(sql::INSERT_NEW_STEPS.trim()), count(sql::COPY_STEPS))
    };
    (app, bulk)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_new_tasks_go_by_one_insert_under_isolation_and_are_counted() {
    use taskhistory_core::StepRecord;

    let (config, _store) = three_users().await;
    let (app, bulk) = bulk_app_store(config).await;
    let r = |i: i32| TaskStepResult::running("s", json!({ "i": i }), "");
    let done = TaskStepResult::success("s", json!({}), "");
    // New tasks of two users, one completed by its last step; each step at a time of its
    // own, so that each row's task start (its earliest step) is checked too.
    let at = |minutes: i64| {
        chrono::DateTime::from_timestamp(1_750_000_000, 0).unwrap()
            + chrono::Duration::minutes(minutes)
    };
    let mut batch: Vec<StepRecord> = (0..3)
        .map(|i| StepRecord::new("a", "n1", i, r(i)).at(at(10 - i64::from(i))))
        .collect();
    batch.push(StepRecord::new("a", "n2", 0, r(0)).at(at(20)));
    batch.push(StepRecord::new("b", "n1", 0, r(0)).at(at(30)));
    batch.push(StepRecord::new("b", "n1", 1, done.clone()).at(at(31)));
    let before_a = app.task_counts("a").await.unwrap();
    let before_b = app.task_counts("b").await.unwrap();
    app.save_batch_task_history(&batch).await.unwrap();
    assert_eq!(bulk(), (1, 0), "new tasks go by one INSERT, never COPY");
    let steps = app.load_task_history("a", "n1").await.unwrap();
    assert_eq!(
        steps
            .iter()
            .map(|s| (s.step, s.timestamp, s.result.clone()))
            .collect::<Vec<_>>(),
        [(0, at(10), r(0)), (1, at(9), r(1)), (2, at(8), r(2))]
    );
    // The rows carry their task's start, the summary's: a load reaches them through it.
    assert_eq!(app.load_task_history("a", "n2").await.unwrap().len(), 1);
    assert_eq!(app.load_task_history("b", "n1").await.unwrap().len(), 2);
    assert_eq!(
        app.check_task_status("b", "n1").await.unwrap(),
        TaskStatus::Completed
    );
    // Counted as the writes that made them (rule 10): two running tasks more for a, one
    // completed task more for b.
    let after_a = app.task_counts("a").await.unwrap();
    let after_b = app.task_counts("b").await.unwrap();
    assert_eq!(after_a.running, before_a.running + 2, "{after_a:?}");
    assert_eq!(after_b.completed, before_b.completed + 1, "{after_b:?}");
    // A batch touching an existing task takes the upsert statement.
    let mixed = vec![
        StepRecord::new("a", "n1", 3, r(3)),
        StepRecord::new("a", "n3", 0, r(0)),
    ];
    app.save_batch_task_history(&mixed).await.unwrap();
    assert_eq!(bulk(), (1, 0), "a batch with a known task is upserted");
    assert_eq!(app.load_task_history("a", "n1").await.unwrap().len(), 4);
    assert_eq!(app.load_task_history("a", "n3").await.unwrap().len(), 1);
    app.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bulk_path_under_isolation_falls_back_and_refuses_a_user_not_declared() {
    use taskhistory_core::StepRecord;
    use taskhistory_testing::test_db_client;

    let (config, _store) = three_users().await;
    let schema = config.get_schema().unwrap().to_owned();
    let (app, bulk) = bulk_app_store(config).await;
    let inserts = || bulk().0;
    let r = |i: i32| TaskStepResult::running("s", json!({ "i": i }), "");
    let batch = |user: &str, task: &str, steps: std::ops::Range<i32>| -> Vec<StepRecord> {
        steps
            .map(|i| StepRecord::new(user, task, i, r(i)))
            .collect()
    };
    app.save_batch_task_history(&batch("a", "orphan", 0..3))
        .await
        .unwrap();
    assert_eq!(inserts(), 1);
    // The summary is gone (by hand): the claim succeeds, the INSERT meets the old rows, and
    // the batch is redone by the upsert statement.
    test_db_client()
        .await
        .batch_execute(&format!(
            "DELETE FROM \"{schema}\".task_summary WHERE user_id = 'a' AND task_id = 'orphan'"
        ))
        .await
        .unwrap();
    let mut again = batch("a", "orphan", 0..5);
    again[1].result = TaskStepResult::running("s", json!({ "again": 1 }), "");
    app.save_batch_task_history(&again).await.unwrap();
    assert_eq!(inserts(), 2, "the second batch tried the INSERT first");
    let h = app.load_task_history("a", "orphan").await.unwrap();
    assert_eq!(
        h.iter().map(|e| e.step).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    assert_eq!(h[1].result.result, json!({ "again": 1 }));

    // A handle acting for `a` declares only `a`: a batch naming `b` too is refused by the
    // database, and nothing of it is written.
    let for_a = app.acting_for("a").unwrap();
    let mut mixed = batch("a", "bulk-a", 0..2);
    mixed.extend(batch("b", "bulk-b", 0..2));
    assert!(for_a.save_batch_task_history(&mixed).await.is_err());
    assert!(app
        .load_task_history("a", "bulk-a")
        .await
        .unwrap()
        .is_empty());
    assert!(app
        .load_task_history("b", "bulk-b")
        .await
        .unwrap()
        .is_empty());
    app.close().await;
}

/// The estimated cost of a plan's top node (`cost=a..b`: `b`).
fn plan_cost(plan: &taskhistory_postgres::StatementPlan) -> f64 {
    let first = plan.plan.first().map(String::as_str).unwrap_or_default();
    let cost = first
        .split("cost=")
        .nth(1)
        .and_then(|c| c.split("..").nth(1))
        .and_then(|c| c.split(' ').next())
        .unwrap_or_else(|| panic!("no cost in {first:?}"));
    cost.parse().unwrap()
}

/// How a plan searches: its scans, sorts and index conditions, without costs and with
/// parameters unnumbered (the policy's own subquery takes a number; sort keys are left
/// out, as EXPLAIN names their columns differently once a plan has a subquery).
fn search(plan: &taskhistory_postgres::StatementPlan) -> Vec<String> {
    plan.plan
        .iter()
        .filter(|l| {
            l.contains("Scan")
                || (l.contains("Sort") && !l.contains("Sort Key"))
                || l.contains("Index Cond")
        })
        .map(|l| {
            let l = l.split("  (cost=").next().unwrap_or_default().trim();
            let mut out = String::new();
            let mut chars = l.chars().peekable();
            while let Some(c) = chars.next() {
                out.push(c);
                if c == '$' {
                    while chars.peek().is_some_and(char::is_ascii_digit) {
                        chars.next();
                    }
                }
            }
            out
        })
        .collect()
}

/// Under isolation, a statement naming one task still finds it by its key, however many
/// tasks its user has: the policy filters the rows the statement's own conditions found,
/// and takes no part in choosing the index. Version 8's policy, `user_id = ANY (...)`, was
/// an index condition, and the planner then costed a key probe as a scan of the user's
/// rows in every index leading with `user_id` (here 5x the cost without isolation), so
/// which index it took was a tie: in the bench, `task_summary_user_status_activity` for a
/// status check, a load and a save's lock, reading all of the user's entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_is_found_by_its_key_under_isolation_however_many_tasks_its_user_has() {
    use taskhistory_core::StepRecord;

    let (config, store) = three_users().await;
    // 200 users of 20 tasks, and one of 5,000.
    let batch: Vec<StepRecord> = (0..4_000)
        .map(|i| (format!("u{}", i / 20), format!("t{}", i % 20)))
        .chain((0..5_000).map(|i| ("big".to_owned(), format!("task-{i}"))))
        .map(|(user, task)| {
            StepRecord::new(user, task, 0, TaskStepResult::running("s", json!({}), ""))
        })
        .collect();
    store.save_batch_task_history(&batch).await.unwrap();
    let owner = raw(
        &owner_role(),
        &owner_password(),
        config.get_schema().unwrap(),
    )
    .await;
    owner
        .batch_execute("ANALYZE task_summary, task_history")
        .await
        .unwrap();
    // The plans without isolation, then with it, as the service role.
    store.set_isolation(false).await.unwrap();
    let plain = store.explain("big", "task-7", false).await.unwrap();
    store.set_isolation(true).await.unwrap();
    let app = app_role_store(&config).await;
    assert!(app.isolation().await.unwrap().on());
    let plans = app.explain("big", "task-7", false).await.unwrap();
    let keyed = [
        ("task_status", "task_summary_pkey"),
        ("task_statuses", "task_summary_pkey"),
        ("load_history", "task_summary_pkey"),
        ("load_history", "task_history_user_task_step_key"),
        ("save_step", "task_summary_pkey"),
        ("save_steps", "task_summary_pkey"),
        ("cancel_task", "task_summary_pkey"),
    ];
    for (name, index) in keyed {
        let find = |plans: &[taskhistory_postgres::StatementPlan]| {
            plans
                .iter()
                .find(|p| p.name == name)
                .unwrap_or_else(|| panic!("no plan for {name}"))
                .clone()
        };
        let (plan, without) = (find(&plans), find(&plain));
        let text = plan.plan.join("\n");
        assert!(text.contains(index), "{name} does not use {index}:\n{text}");
        for scan in [
            "task_summary_user_activity",
            "task_summary_user_status_activity",
            "task_history_user_position",
            "Seq Scan",
        ] {
            assert!(!text.contains(scan), "{name} uses {scan}:\n{text}");
        }
        // Costed as the same probes as without isolation (the policy's filter and its
        // one evaluation of the declaration add little).
        let (cost, base) = (plan_cost(&plan), plan_cost(&without));
        assert!(
            cost <= base * 1.25 + 1.0,
            "{name} costs {cost} under isolation, {base} without:\n{text}\n\nwithout:\n{}",
            without.plan.join("\n")
        );
    }
    // Every statement that names its users searches its indexes the same way under
    // isolation: the same scans, the same index conditions (a condition PostgreSQL does not
    // hold leakproof, such as a `COALESCE` or a cast, would turn into a filter applied
    // after the policy's, and the search would read all of the user's entries).
    let cross_user = ["recent_failures", "cleanup_preview", "cleanup_batch"];
    for plan in plans
        .iter()
        .filter(|p| !cross_user.contains(&p.name.as_str()))
    {
        let without = plain.iter().find(|p| p.name == plan.name).unwrap();
        assert_eq!(
            search(plan),
            search(without),
            "{} under isolation:\n{}\n\nwithout:\n{}",
            plan.name,
            plan.plan.join("\n"),
            without.plan.join("\n")
        );
    }
    // And the rows are the user's, through the service role.
    assert_eq!(
        app.load_task_history("big", "task-7").await.unwrap().len(),
        1
    );
    assert_eq!(
        app.check_task_status("big", "task-4999").await.unwrap(),
        TaskStatus::Running
    );
    app.close().await;
}
