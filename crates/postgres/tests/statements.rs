//! Every statement the store sends, recorded through `PgConfig::observe_statements` while
//! every operation runs: each is one of `sql::ALL_STATEMENTS` (SQL lives in one place) or
//! transaction control, and each filters on `user_id` except cleanup, migrations and the
//! operator's statements. This is what lets the tables be distributed by `user_id` (Citus).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use chrono::{Duration, Utc};
use serde_json::json;
use taskhistory_core::{
    HistoryScan, StepKey, StepRecord, TaskHistoryStore, TaskQuery, TaskStatus, TaskStepResult,
};
use taskhistory_postgres::{CleanupOptions, Partitioning};
use taskhistory_testing::sql;
use taskhistory_testing::{fresh_config, store_for};

/// The partitioned layout's DDL (`sql::ddl`), sent on its own connection by operator and
/// retention paths: names and bounds are made by the store, so the text varies.
const DDL_PREFIXES: &[&str] = &[
    "SELECT pg_advisory_xact_lock(hashtextextended('taskhistory:partitions:",
    "LOCK TABLE task_history",
    "CREATE TABLE task_history_p",
    "DROP TABLE task_history_p",
];

/// What a transaction's first round trip sets after `BEGIN` (the transaction helper sends
/// them together): the pooler's settings, the notifier's, plans' and the DDL lock wait.
const TRANSACTION_SETTINGS: &[&str] = &[
    "SET LOCAL statement_timeout = ",
    "SET LOCAL search_path TO ",
    "SET LOCAL lock_timeout = ",
    "SET LOCAL plan_cache_mode = force_generic_plan",
    sql::NOTIFY_LOCAL,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_statement_is_known_and_filters_on_user_id() {
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = log.clone();
    let config = fresh_config()
        .await
        .observe_statements(move |sql| sink.lock().unwrap().push(sql.to_owned()));
    let store = store_for(config).await;
    let migrations = std::mem::take(&mut *log.lock().unwrap());
    assert!(!migrations.is_empty(), "the observer saw nothing");

    // Every operation, every variant.
    let r = |i: i32| TaskStepResult::running("s", json!({ "i": i }), "");
    store.save_task_history("u", "t", 0, &r(0)).await.unwrap();
    // Combined saves: a store on the same schema that writes every save that way.
    let sink = log.clone();
    let combining = taskhistory_postgres::PgTaskHistoryStore::connect(
        store
            .config()
            .clone()
            .save_lanes(1)
            .combine_lone_saves(true)
            .status_lanes(1)
            .combine_lone_statuses(true)
            .observe_statements(move |sql| sink.lock().unwrap().push(sql.to_owned())),
    )
    .await
    .unwrap();
    combining
        .save_task_history("u", "t", 1, &r(1))
        .await
        .unwrap();
    assert_eq!(
        combining.check_task_status("u", "t").await.unwrap(),
        taskhistory_core::TaskStatus::Running
    );
    combining.close().await;
    // Position tokens (issue 31): without replicas a token is the primary's WAL insert
    // position; with a replica (here the server itself, which its check finds not in
    // recovery: never in the rotation) the refresher checks it.
    assert!(store.position("u").await.unwrap().is_some());
    let sink = log.clone();
    let replicated = taskhistory_postgres::PgTaskHistoryStore::connect(
        store
            .config()
            .clone()
            .read_urls([taskhistory_testing::database_url().await])
            .unwrap()
            .observe_statements(move |sql| sink.lock().unwrap().push(sql.to_owned())),
    )
    .await
    .unwrap();
    let checked = std::time::Instant::now();
    while !log
        .lock()
        .unwrap()
        .iter()
        .any(|s| s == sql::REPLICA_POSITION)
    {
        assert!(
            checked.elapsed() < std::time::Duration::from_secs(30),
            "no check of the replica"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!replicated.replicas()[0].in_rotation);
    replicated.close().await;
    let old = Utc::now() - Duration::days(40);
    let batch: Vec<StepRecord> = (0..3)
        .map(|i| StepRecord::new("u", "old", i, r(i)).at(old))
        .collect();
    store.save_batch_task_history(&batch).await.unwrap();
    let big: Vec<StepRecord> = (0..10_001)
        .map(|i| StepRecord::new("u", "big", i, r(i)))
        .collect();
    store.save_batch_task_history(&big).await.unwrap();
    // A store that declares its users sends a batch of new tasks by INSERT, not COPY: one
    // statement per 10,000 rows, in one transaction.
    let sink = log.clone();
    let declaring = taskhistory_postgres::PgTaskHistoryStore::connect(
        store
            .config()
            .clone()
            .declare_users(true)
            .copy_min_rows(Some(1))
            .observe_statements(move |sql| sink.lock().unwrap().push(sql.to_owned())),
    )
    .await
    .unwrap();
    let bulk: Vec<StepRecord> = (0..10_001)
        .map(|i| StepRecord::new("u", "declared", i, r(i)))
        .collect();
    declaring.save_batch_task_history(&bulk).await.unwrap();
    declaring.close().await;
    assert_eq!(
        store
            .load_task_history("u", "declared")
            .await
            .unwrap()
            .len(),
        10_001
    );
    assert_eq!(
        log.lock()
            .unwrap()
            .iter()
            .filter(|s| s.as_str() == sql::INSERT_NEW_STEPS.trim())
            .count(),
        2
    );
    store.load_task_history("u", "t").await.unwrap();
    // A position token for the user (without replicas: the primary's WAL position).
    store.position("u").await.unwrap();
    store.check_task_status("u", "t").await.unwrap();
    let first = store
        .get_user_tasks_page("u", &TaskQuery::first(1))
        .await
        .unwrap();
    store
        .get_user_tasks_page("u", &TaskQuery::first(1).after(first.next.clone()))
        .await
        .unwrap();
    let by_status = TaskQuery::first(1).with_status(TaskStatus::Running);
    let page = store.get_user_tasks_page("u", &by_status).await.unwrap();
    store
        .get_user_tasks_page("u", &by_status.clone().after(page.next))
        .await
        .unwrap();
    // The listing filters: a time range with and without a status, a prefix.
    let day_ago = Utc::now() - Duration::days(1);
    let in_range = TaskQuery::first(1).updated_after(day_ago);
    store.get_user_tasks_page("u", &in_range).await.unwrap();
    store
        .get_user_tasks_page("u", &in_range.with_status(TaskStatus::Running))
        .await
        .unwrap();
    store
        .get_user_tasks_page("u", &TaskQuery::first(1).task_id_prefix("b"))
        .await
        .unwrap();
    store.scan_history("u", &HistoryScan::all(5)).await.unwrap();
    let after = Some(StepKey {
        task_id: "big".into(),
        step: 3,
    });
    store
        .scan_history("u", &HistoryScan::task("big", 5).after(after))
        .await
        .unwrap();
    store.mark_task_as_cancelled("u", "t").await.unwrap();
    let dry = CleanupOptions {
        dry_run: true,
        ..CleanupOptions::default()
    };
    store
        .cleanup_old_tasks_with(30, dry, &|_| {})
        .await
        .unwrap();
    let failed_only = CleanupOptions {
        status: Some(TaskStatus::Failed),
        ..CleanupOptions::default()
    };
    store
        .cleanup_old_tasks_with(30, failed_only, &|_| {})
        .await
        .unwrap();
    let failed_only = CleanupOptions {
        dry_run: true,
        ..failed_only
    };
    store
        .cleanup_old_tasks_with(30, failed_only, &|_| {})
        .await
        .unwrap();
    store.cleanup_old_tasks(30).await.unwrap();
    store.health_check().await.unwrap();
    store.stats().await.unwrap();
    store.task_counts("u").await.unwrap();
    let now = Utc::now();
    store
        .task_activity("u", now - Duration::days(7), now)
        .await
        .unwrap();
    store.task_totals().await.unwrap();
    store.recent_failures(5).await.unwrap();
    let mut events = store.watch_user("u", None).await.unwrap();
    store
        .save_task_history("u", "watched", 0, &r(0))
        .await
        .unwrap();
    futures::StreamExt::next(&mut events)
        .await
        .unwrap()
        .unwrap();
    drop(events);
    store.init_database_schema().await.unwrap();
    // The partitioned layout: conversion, listing, making partitions, and retention that
    // drops a partition (a task started 200 days ago).
    let ancient = Utc::now() - Duration::days(200);
    store
        .save_batch_task_history(&[StepRecord::new("u", "ancient", 0, r(0)).at(ancient)])
        .await
        .unwrap();
    store
        .convert_to_partitioned(Partitioning::default())
        .await
        .unwrap();
    store.partitions().await.unwrap();
    store.ensure_partitions(4).await.unwrap();
    let report = store.cleanup_old_tasks(30).await.unwrap();
    // The task's partition and the empty ones between it and the cutoff.
    assert!(report.partitions_dropped >= 1, "{report:?}");
    assert_eq!(report.tasks_removed, 1, "{report:?}");

    #[cfg(feature = "test-schema")]
    {
        // A throwaway test schema (feature test-schema): its sweep of abandoned ones. (Its
        // migrations are not sql.rs's: only the sweep is kept.)
        let sink = log.clone();
        let fresh = taskhistory_postgres::PgTaskHistoryStore::on_fresh_schema(
            fresh_config().await.observe_statements(move |text| {
                if text == sql::TEST_SCHEMAS_ABANDONED.trim() {
                    sink.lock().unwrap().push(text.to_owned());
                }
            }),
        )
        .await
        .unwrap();
        fresh.drop_schema().await.unwrap();
    }
    let sent = log.lock().unwrap().clone();
    let known: Vec<(&str, &str)> = sql::ALL_STATEMENTS
        .iter()
        .map(|(name, text)| (*name, text.trim()))
        .collect();
    let mut seen = BTreeSet::new();
    // A transaction's start is one batch: `BEGIN` and the settings and lock it begins with.
    let sent: Vec<&str> = sent
        .iter()
        .flat_map(|s| match s.strip_prefix("BEGIN; ") {
            Some(rest) => std::iter::once("BEGIN").chain(rest.split("; ")).collect(),
            None => vec![s.as_str()],
        })
        .collect();
    let mut began = 0;
    let mut shared_sessions = 0;
    for statement in sent {
        if statement == "BEGIN" {
            began += 1;
        }
        if statement == sql::SHARED_READS_SESSION {
            shared_sessions += 1;
        }
        if ["BEGIN", "COMMIT", "ROLLBACK", ""]
            .iter()
            .any(|c| statement.eq_ignore_ascii_case(c))
            || DDL_PREFIXES.iter().any(|p| statement.starts_with(p))
            || TRANSACTION_SETTINGS
                .iter()
                .any(|p| statement.starts_with(p))
            || statement == sql::NOTIFY_SESSION
            || statement == sql::SHARED_READS_SESSION
            // The declaring store's declarations (`sql::declare`): its batch's user with
            // its transaction's `BEGIN`, no user ahead of its other lone statements.
            || statement == sql::declare::users(&sql::declare::array(["u"]), true)
            || statement == sql::declare::users(&sql::declare::array([]), false)
        {
            continue;
        }
        let Some((name, _)) = known.iter().find(|(_, text)| *text == statement) else {
            panic!("a statement outside sql.rs was sent:\n{statement}");
        };
        seen.insert(*name);
        if !sql::NOT_PER_USER.contains(name) {
            assert!(
                statement.contains("user_id = $1")
                    || statement.contains("unnest($1::text[]")
                    || statement.contains("$1::text AS user_id")
                    // COPY rows each carry their user (a distributed table routes them by it).
                    || statement.starts_with("COPY task_history (user_id,"),
                "{name} does not filter on user_id:\n{statement}"
            );
        }
    }
    // Transactions ran (partition DDL, the conversion, explain-free paths): the helper's
    // statements were seen and understood.
    assert!(began > 0, "no transaction was observed");
    // The connections reads share run every statement with its generic plan (the plans
    // `explain` shows and `a_big_users_page_is_never_a_sort_of_all_their_tasks` checks).
    assert!(
        shared_sessions > 0,
        "no shared read connection set its plan mode"
    );
    // Every statement of sql.rs was exercised.
    // (The sweep of test schemas runs only with the feature test-schema, which the test
    // command turns on.)
    let all: BTreeSet<&str> = known
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| cfg!(feature = "test-schema") || *name != "test_schemas_abandoned")
        // Sent to replicas only (`tests/replicas.rs`); this store has none.
        .filter(|name| *name != "replica_position")
        .collect();
    let missing: Vec<_> = all.difference(&seen).collect();
    assert!(missing.is_empty(), "not exercised: {missing:?}");
}

/// A big user's page is read from the ordered index, never by sorting all of the user's
/// tasks, whichever plan PostgreSQL runs the listing with: a custom one, or the generic one
/// (made for the average user, here 23 tasks: most users are small), which the store's
/// shared read connections always use (`sql::SHARED_READS_SESSION`). The store binds the
/// `LIMIT`. (With a literal `LIMIT`, as the store once sent
/// it, that generic plan can read every task of the user through the primary key and sort
/// them: 2.1 ms instead of 0.05 for a user of 4,000 tasks in the load bench; whether it
/// does is a close call of the planner's costs, so it is not asserted here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_users_page_is_never_a_sort_of_all_their_tasks() {
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = log.clone();
    let config = fresh_config()
        .await
        .observe_statements(move |sql| sink.lock().unwrap().push(sql.to_owned()));
    let schema = config.get_schema().unwrap().to_owned();
    let store = store_for(config).await;
    let r = TaskStepResult::running("s", json!({}), "");
    // 300 users of 10 tasks and one of 4,000.
    let steps: Vec<StepRecord> = (0..7_000)
        .map(|i| {
            let user = if i < 3_000 {
                format!("u{}", i % 300)
            } else {
                "big".to_owned()
            };
            StepRecord::new(user, format!("t{i}"), 0, r.clone())
        })
        .collect();
    store.save_batch_task_history(&steps).await.unwrap();
    let client = taskhistory_testing::test_db_client().await;
    client
        .batch_execute(&format!(
            "SET search_path TO {schema}; ANALYZE task_summary"
        ))
        .await
        .unwrap();
    let shapes = [
        (TaskQuery::first(50), sql::LIST_TASKS),
        (
            TaskQuery::first(50).with_status(TaskStatus::Running),
            sql::LIST_TASKS_WITH_STATUS,
        ),
    ];
    // A plan as EXPLAIN shows it, in plan cache mode `mode`.
    let plan = |execute: String, mode: &'static str| {
        let client = &client;
        async move {
            client
                .batch_execute(&format!("SET plan_cache_mode = {mode}"))
                .await
                .unwrap();
            let rows = client
                .query(&format!("EXPLAIN (COSTS OFF) {execute}"), &[])
                .await
                .unwrap();
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n")
        }
    };
    for (i, (query, text)) in shapes.into_iter().enumerate() {
        log.lock().unwrap().clear();
        let page = store.get_user_tasks_page("big", &query).await.unwrap();
        assert_eq!(page.tasks.len(), 50);
        // The listing as sent (the notifier's statements for the batch may land in the
        // log around it).
        let sent = text.trim();
        assert!(
            log.lock().unwrap().iter().any(|s| s == sent),
            "shape {i}: the listing was not sent as sql.rs writes it"
        );
    }
    // Those two and the other listings (the store sends sql.rs's texts as they are: see
    // `every_statement_is_known_and_filters_on_user_id`): next pages, activity ranges. (The
    // task id prefix is read by its range on the primary key and sorted, by design.)
    let cursor = "now() + interval '1 day', 't'";
    let listings = [
        (sql::LIST_TASKS, "'big', 51".to_owned()),
        (
            sql::LIST_TASKS_WITH_STATUS,
            "'big', 'running', 51".to_owned(),
        ),
        (sql::LIST_TASKS_AFTER, format!("'big', {cursor}, 51")),
        (
            sql::LIST_TASKS_WITH_STATUS_AFTER,
            format!("'big', 'running', {cursor}, 51"),
        ),
        (
            sql::LIST_TASKS_IN_RANGE,
            "'big', now() - interval '1 day', now() + interval '1 day', NULL, NULL, 51".to_owned(),
        ),
        (
            sql::LIST_TASKS_WITH_STATUS_IN_RANGE,
            format!("'big', 'running', NULL, NULL, {cursor}, 51"),
        ),
    ];
    for (i, (text, args)) in listings.into_iter().enumerate() {
        client
            .batch_execute(&format!("PREPARE listing{i} AS {text}"))
            .await
            .unwrap();
        for mode in ["force_generic_plan", "force_custom_plan"] {
            let shown = plan(format!("EXECUTE listing{i}({args})"), mode).await;
            assert!(
                !shown.contains("Sort") && shown.contains("Index Scan using task_summary_user_"),
                "{text}\n{mode}: a big user's page sorts:\n{shown}"
            );
        }
    }
    store.drop_schema().await.unwrap();
}
