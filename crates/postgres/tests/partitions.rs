//! The partitioned layout on a real server: conversion keeps every row and task, partitions
//! are made ahead (rows waiting in the default partition move into them), retention drops
//! whole expired partitions and keeps summaries right, never cuts a task that is still
//! active, honours per-status retention, and stays whole-task under racing writers (the
//! race counted: saves whose call ran while the cleanup's did).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::json;
use taskhistory_core::{
    HistoryEntry, StepRecord, TaskHistoryStore, TaskQuery, TaskStatus, TaskStepResult, TaskSummary,
};
use taskhistory_postgres::{
    CleanupOptions, Layout, PartitionInterval, Partitioning, PgTaskHistoryStore,
};
use taskhistory_testing::{database_url, fresh_store, partitioned_store};
use tokio_postgres::NoTls;

const MONTH: PartitionInterval = PartitionInterval::Month;

fn running(i: i32) -> TaskStepResult {
    TaskStepResult::running(format!("s{i}"), json!({ "i": i }), "")
}

/// The start of the month `n` months from this one, plus `days`.
fn month(n: i64, days: i64) -> DateTime<Utc> {
    MONTH.shift(MONTH.floor(Utc::now()), n).unwrap() + TimeDelta::days(days)
}

fn partition_of(t: DateTime<Utc>) -> String {
    format!("task_history_p{}", MONTH.floor(t).format("%Y%m%d"))
}

/// `steps` steps of one task, the first at `start`, one minute apart.
async fn seed(
    store: &PgTaskHistoryStore,
    user: &str,
    task: &str,
    start: DateTime<Utc>,
    steps: i32,
) {
    let records: Vec<StepRecord> = (0..steps)
        .map(|i| {
            StepRecord::new(user, task, i, running(i)).at(start + TimeDelta::minutes(i64::from(i)))
        })
        .collect();
    store.save_batch_task_history(&records).await.unwrap();
}

/// Which partition holds each of a task's rows, with how many.
async fn placement(store: &PgTaskHistoryStore, user: &str, task: &str) -> BTreeMap<String, i64> {
    let (client, connection) = tokio_postgres::connect(&database_url().await, NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let schema = store.config().get_schema().unwrap().to_owned();
    client
        .batch_execute(&format!("SET search_path TO {schema}"))
        .await
        .unwrap();
    client
        .query(
            "SELECT tableoid::regclass::text, count(*) FROM task_history \
             WHERE user_id = $1 AND task_id = $2 GROUP BY 1",
            &[&user, &task],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn tasks(store: &PgTaskHistoryStore, user: &str) -> Vec<TaskSummary> {
    store.get_user_tasks(user, 1000).await.unwrap()
}

async fn history(store: &PgTaskHistoryStore, user: &str, task: &str) -> Vec<HistoryEntry> {
    store.load_task_history(user, task).await.unwrap()
}

async fn partition_names(store: &PgTaskHistoryStore) -> Vec<String> {
    store
        .partitions()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect()
}

/// The seeded world of the retention tests: `u/old` alone in the month four months back,
/// `v/other` (expired) and `u/mixed` (started then, active now) three months back, and a
/// fresh `u/new`.
async fn seeded_then_converted() -> PgTaskHistoryStore {
    let store = fresh_store().await;
    seed(&store, "u", "old", month(-4, 2), 3).await;
    seed(&store, "v", "other", month(-3, 1), 3).await;
    seed(&store, "u", "mixed", month(-3, 1), 3).await;
    store
        .save_task_history("u", "mixed", 3, &running(3))
        .await
        .unwrap();
    seed(&store, "u", "new", Utc::now(), 2).await;
    store
        .convert_to_partitioned(Partitioning::default())
        .await
        .unwrap();
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversion_keeps_every_row_and_task_together() {
    let store = fresh_store().await;
    assert_eq!(store.layout().await.unwrap(), Layout::Plain);
    assert!(store.partitions().await.unwrap().is_empty());
    seed(&store, "u", "old", month(-4, 2), 3).await;
    seed(&store, "u", "late", month(-3, 27), 3).await;
    // A step saved long after the task started stays with its task.
    store
        .save_task_history(
            "u",
            "late",
            3,
            &running(3).with_status(TaskStatus::Completed),
        )
        .await
        .unwrap();
    seed(&store, "v", "new", Utc::now(), 2).await;
    let before = (
        tasks(&store, "u").await,
        history(&store, "u", "old").await,
        history(&store, "u", "late").await,
        history(&store, "v", "new").await,
    );

    let made = store
        .convert_to_partitioned(Partitioning::default())
        .await
        .unwrap();
    assert_eq!(
        store.layout().await.unwrap(),
        Layout::Partitioned { interval: MONTH }
    );
    // From the oldest task's month to three past this one.
    assert_eq!(made.len(), 8, "{made:?}");
    assert_eq!(made.first(), Some(&partition_of(month(-4, 0))));
    assert_eq!(made.last(), Some(&partition_of(month(3, 0))));
    let names = partition_names(&store).await;
    assert_eq!(
        names.first().map(String::as_str),
        Some("task_history_default")
    );

    let after = (
        tasks(&store, "u").await,
        history(&store, "u", "old").await,
        history(&store, "u", "late").await,
        history(&store, "v", "new").await,
    );
    assert_eq!(before, after);
    let late = placement(&store, "u", "late").await;
    assert_eq!(late, BTreeMap::from([(partition_of(month(-3, 27)), 4)]));

    // Writes go on, and a new step of an old task joins its task's partition.
    store
        .save_task_history("u", "old", 3, &running(3))
        .await
        .unwrap();
    let old = placement(&store, "u", "old").await;
    assert_eq!(old, BTreeMap::from([(partition_of(month(-4, 2)), 4)]));
    assert_eq!(
        store.check_task_status("u", "old").await.unwrap(),
        TaskStatus::Running
    );
    assert_eq!(tasks(&store, "u").await[0].step_count, 4);
    // Operator statistics count the partitions' sizes.
    let stats = store.stats().await.unwrap();
    let partition = partition_of(month(-4, 2));
    let sized = stats
        .relations
        .iter()
        .find(|r| r.name == partition)
        .unwrap_or_else(|| panic!("{partition} not in {:?}", stats.relations));
    assert!(sized.bytes > 0);
    // Converting again changes nothing.
    assert!(store
        .convert_to_partitioned(Partitioning::default())
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_are_made_ahead_and_take_their_rows_from_the_default() {
    let store = partitioned_store().await;
    let names = partition_names(&store).await;
    assert_eq!(names.len(), 5, "default + this month + 3 ahead: {names:?}");
    // No partition for these: they land in the default one, and nothing fails.
    seed(&store, "u", "future", month(5, 3), 2).await;
    seed(&store, "u", "ancient", month(-30, 0), 2).await;
    let default = BTreeMap::from([("task_history_default".to_owned(), 2)]);
    assert_eq!(placement(&store, "u", "future").await, default);

    let made = store.ensure_partitions(6).await.unwrap();
    assert_eq!(
        made,
        [4, 5, 6].map(|n| partition_of(month(n, 0))).to_vec(),
        "only the missing ones"
    );
    assert_eq!(
        placement(&store, "u", "future").await,
        BTreeMap::from([(partition_of(month(5, 3)), 2)])
    );
    assert_eq!(placement(&store, "u", "ancient").await, default);
    assert_eq!(history(&store, "u", "future").await.len(), 2);
    assert!(store.ensure_partitions(6).await.unwrap().is_empty());
    // On the plain layout there is nothing to ensure.
    let plain = fresh_store().await;
    let err = plain.ensure_partitions(3).await.unwrap_err();
    assert!(err.to_string().contains("not partitioned"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_expired_partitions_and_never_cuts_an_active_task() {
    let store = seeded_then_converted().await;
    let old_partition = partition_of(month(-4, 2));
    let mixed_partition = partition_of(month(-3, 1));
    let dry = CleanupOptions {
        dry_run: true,
        ..CleanupOptions::default()
    };
    let preview = store
        .cleanup_old_tasks_with(30, dry, &|_| {})
        .await
        .unwrap();
    assert_eq!((preview.tasks_removed, preview.steps_removed), (2, 6));
    assert!(partition_names(&store).await.contains(&old_partition));

    let report = store.cleanup_old_tasks(30).await.unwrap();
    assert_eq!(report.tasks_removed, 2, "u/old and v/other: {report:?}");
    assert_eq!(report.steps_removed, 6, "{report:?}");
    // The month of u/old went whole (and the empty month before it, if any); the month of
    // u/mixed stays: it has an active task, so v/other left it by batched delete.
    assert!(report.partitions_dropped >= 1, "{report:?}");
    let names = partition_names(&store).await;
    assert!(!names.contains(&old_partition), "{names:?}");
    assert!(names.contains(&mixed_partition), "{names:?}");

    assert_eq!(history(&store, "u", "mixed").await.len(), 4);
    assert!(history(&store, "u", "old").await.is_empty());
    assert!(history(&store, "v", "other").await.is_empty());
    assert!(tasks(&store, "v").await.is_empty());
    let ids: Vec<String> = tasks(&store, "u")
        .await
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    assert_eq!(ids, ["new", "mixed"]);
    // The kept counts lost the tasks of the dropped partition and of the batched delete.
    for user in ["u", "v"] {
        let counted: taskhistory_core::TaskCounts =
            tasks(&store, user).await.iter().map(|t| t.status).collect();
        assert_eq!(store.task_counts(user).await.unwrap(), counted, "{user}");
    }
    assert_eq!(store.task_totals().await.unwrap().total(), 2);
    // The same id starts over as a new task, in this month's partition.
    store
        .save_task_history("u", "old", 0, &running(0))
        .await
        .unwrap();
    assert_eq!(
        placement(&store, "u", "old").await,
        BTreeMap::from([(partition_of(Utc::now()), 1)])
    );
    assert_eq!(store.cleanup_old_tasks(30).await.unwrap().tasks_removed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_status_retention_drops_a_partition_only_when_all_its_tasks_go() {
    // Two tasks of the same month, ended long ago: one completed, one failed.
    let store = fresh_store().await;
    for (task, status, day) in [
        ("done", TaskStatus::Completed, 1),
        ("broke", TaskStatus::Failed, 2),
    ] {
        let records: Vec<StepRecord> = (0..3)
            .map(|i| {
                let result = running(i);
                let result = if i == 2 {
                    result.with_status(status)
                } else {
                    result
                };
                StepRecord::new("u", task, i, result).at(month(-4, day))
            })
            .collect();
        store.save_batch_task_history(&records).await.unwrap();
    }
    store
        .convert_to_partitioned(Partitioning::default())
        .await
        .unwrap();
    let partition = partition_of(month(-4, 1));

    let completed = CleanupOptions {
        status: Some(TaskStatus::Completed),
        ..CleanupOptions::default()
    };
    let first = store
        .cleanup_old_tasks_with(30, completed, &|_| {})
        .await
        .unwrap();
    assert_eq!(
        (first.tasks_removed, first.steps_removed),
        (1, 3),
        "{first:?}"
    );
    assert!(
        partition_names(&store).await.contains(&partition),
        "a failed task is still in it"
    );
    assert_eq!(history(&store, "u", "broke").await.len(), 3);

    let failed = CleanupOptions {
        status: Some(TaskStatus::Failed),
        ..CleanupOptions::default()
    };
    let second = store
        .cleanup_old_tasks_with(30, failed, &|_| {})
        .await
        .unwrap();
    assert_eq!(
        (second.tasks_removed, second.steps_removed),
        (1, 3),
        "{second:?}"
    );
    assert!(second.partitions_dropped >= 1, "{second:?}");
    assert!(!partition_names(&store).await.contains(&partition));
    assert!(tasks(&store, "u").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_racing_a_partition_drop_never_leave_a_partial_task() {
    // Each round two writers save three steps each to one expired task. Rounds of three
    // kinds, driven, not left to timing: writers first (each has saved once before the
    // cleanup starts: the partition must stay), cleanup first (it has finished before the
    // writers start: the partition must go and their tasks start over), and racing (the
    // writers wake a little later each round, while the drop may be under way). The race
    // is counted: saves whose call ran while the cleanup's did; racing rounds go on (at
    // most 16 more) until MIN_OVERLAPS of them happened.
    const MIN_OVERLAPS: usize = 4;
    let (mut kept_rounds, mut dropped_rounds) = (0, 0);
    let (mut racing_rounds, mut racing_overlaps) = (0, 0);
    let mut round = 0u64;
    while round < 16 || (racing_overlaps < MIN_OVERLAPS && round < 32) {
        let kind = if round < 16 { round % 3 } else { 2 };
        let store = fresh_store().await;
        for t in 0..20 {
            seed(&store, "u", &format!("t{t:02}"), month(-4, 1), 5).await;
        }
        store
            .convert_to_partitioned(Partitioning::default())
            .await
            .unwrap();
        let acked: Arc<Mutex<Vec<(String, i32)>>> = Arc::default();
        // Each save's call, start and end, acknowledged or not.
        let windows: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
        let early = if kind == 1 {
            let start = Instant::now();
            let report = store.cleanup_old_tasks(30).await.unwrap();
            Some((report, (start, Instant::now())))
        } else {
            None
        };
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let (store, acked, windows) = (store.clone(), acked.clone(), windows.clone());
                tokio::spawn(async move {
                    if kind == 2 {
                        tokio::time::sleep(Duration::from_millis(round % 16 + w)).await;
                    }
                    let task = format!("t{:02}", (round + w * 7) % 20);
                    for k in 0..3 {
                        let step = 100 + (w as i32) * 10 + k;
                        let start = Instant::now();
                        let saved = store
                            .save_task_history("u", &task, step, &running(step))
                            .await;
                        windows.lock().unwrap().push((start, Instant::now()));
                        if saved.is_ok() {
                            acked.lock().unwrap().push((task.clone(), step));
                        }
                    }
                })
            })
            .collect();
        if kind == 0 {
            // Each writer's first save is acknowledged before the cleanup starts.
            let mut polls = 0;
            let both = |acked: &[(String, i32)]| {
                let tasks: std::collections::BTreeSet<&String> =
                    acked.iter().map(|(t, _)| t).collect();
                tasks.len() == 2
            };
            while !both(&acked.lock().unwrap()) {
                polls += 1;
                assert!(polls < 2_000, "round {round}: the writers did not save");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let (report, cleanup) = match early {
            Some(done) => done,
            None => {
                let start = Instant::now();
                let report = store.cleanup_old_tasks(30).await.unwrap();
                (report, (start, Instant::now()))
            }
        };
        for w in writers {
            w.await.unwrap();
        }
        let overlaps = windows
            .lock()
            .unwrap()
            .iter()
            .filter(|(start, end)| *start < cleanup.1 && *end > cleanup.0)
            .count();
        eprintln!("round {round} (kind {kind}): {report:?}, {overlaps} saves during the cleanup");
        match kind {
            0 => {
                // The writers' two tasks are active: their partition stays, the other 18
                // expired tasks go by batched deletes.
                assert_eq!(report.tasks_removed, 18, "round {round}: {report:?}");
                kept_rounds += 1;
            }
            1 => {
                assert_eq!(report.tasks_removed, 20, "round {round}: {report:?}");
                assert!(report.partitions_dropped >= 1, "round {round}: {report:?}");
                dropped_rounds += 1;
            }
            _ => {
                racing_rounds += 1;
                racing_overlaps += overlaps;
            }
        }
        let acked = acked.lock().unwrap().clone();
        assert_eq!(acked.len(), 6, "every save succeeds (round {round})");
        let summaries: BTreeMap<String, TaskSummary> = store
            .get_user_tasks_page("u", &TaskQuery::first(100))
            .await
            .unwrap()
            .tasks
            .into_iter()
            .map(|t| (t.task_id.clone(), t))
            .collect();
        for t in 0..20 {
            let task = format!("t{t:02}");
            let steps: Vec<i32> = history(&store, "u", &task)
                .await
                .iter()
                .map(|e| e.step)
                .collect();
            let original = steps.iter().filter(|s| **s < 5).count();
            assert!(
                original == 0 || original == 5,
                "round {round}: {task} lost part of its history: {steps:?} ({report:?})"
            );
            match summaries.get(&task) {
                Some(s) => {
                    assert_eq!(s.step_count, steps.len() as i64, "round {round}: {task}");
                    assert_eq!(Some(&s.last_step), steps.last(), "round {round}: {task}");
                }
                None => assert!(
                    steps.is_empty(),
                    "round {round}: {task} has steps, no summary"
                ),
            }
            let mut sorted = steps.clone();
            sorted.dedup();
            assert_eq!(sorted, steps, "round {round}: {task} has a step twice");
        }
        // A save makes its task active, so no cleanup after it may remove it: every
        // acknowledged step is there (in the old task, or in a new one of the same id).
        for (task, step) in &acked {
            assert!(
                history(&store, "u", task)
                    .await
                    .iter()
                    .any(|e| e.step == *step),
                "round {round}: {task}/{step} acknowledged but gone ({report:?})"
            );
        }
        round += 1;
    }
    // Both orders were driven and checked, beside the racing rounds.
    assert_eq!((kept_rounds, dropped_rounds), (6, 5));
    // And the racing rounds raced: saves ran while the cleanup did.
    assert!(
        racing_overlaps >= MIN_OVERLAPS,
        "only {racing_overlaps} saves ran during the cleanup in {racing_rounds} racing rounds \
         (wanted {MIN_OVERLAPS})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saves_creating_one_task_at_once_agree_on_its_start() {
    for store in [fresh_store().await, partitioned_store().await] {
        for round in 0..10 {
            let task = format!("t{round}");
            // Eight first saves of one new task, each with its own (different) time, so each
            // picks a different start; whichever commits first sets it for all.
            let saves: Vec<_> = (0..8)
                .map(|i| {
                    let (store, task) = (store.clone(), task.clone());
                    tokio::spawn(async move {
                        let at = month(0, 0) + TimeDelta::hours(i64::from(i) + 1);
                        let record = StepRecord::new("u", &task, i, running(i)).at(at);
                        store.save_batch_task_history(&[record]).await
                    })
                })
                .collect();
            for s in saves {
                s.await.unwrap().unwrap();
            }
            let steps: Vec<i32> = history(&store, "u", &task)
                .await
                .iter()
                .map(|e| e.step)
                .collect();
            assert_eq!(steps, (0..8).collect::<Vec<_>>(), "round {round}");
            let summary = store
                .get_user_tasks_page("u", &TaskQuery::first(100))
                .await
                .unwrap()
                .tasks
                .into_iter()
                .find(|t| t.task_id == task)
                .unwrap();
            assert_eq!(summary.step_count, 8, "round {round}");
            if store.layout().await.unwrap() != Layout::Plain {
                assert_eq!(
                    placement(&store, "u", &task).await.len(),
                    1,
                    "round {round}"
                );
            }
        }
        eprintln!(
            "{:?}: {} retries",
            store.layout().await.unwrap(),
            store.metrics().retries
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_ddl_rights_cleans_up_by_batched_deletes() {
    let owner_config = taskhistory_testing::fresh_config().await;
    let owner = taskhistory_testing::store_for(owner_config.clone()).await;
    seed(&owner, "u", "old", month(-4, 2), 3).await;
    seed(&owner, "u", "new", Utc::now(), 2).await;
    owner
        .convert_to_partitioned(Partitioning::default())
        .await
        .unwrap();
    let app = taskhistory_testing::app_role_store(&owner_config).await;
    let report = app.cleanup_old_tasks(30).await.unwrap();
    assert_eq!(
        (
            report.tasks_removed,
            report.steps_removed,
            report.partitions_dropped
        ),
        (1, 3, 0),
        "{report:?}"
    );
    assert!(app.load_task_history("u", "old").await.unwrap().is_empty());
    assert_eq!(app.load_task_history("u", "new").await.unwrap().len(), 2);
    // The owner drops what is left: the now empty expired partitions.
    assert!(
        owner
            .cleanup_old_tasks(30)
            .await
            .unwrap()
            .partitions_dropped
            >= 1
    );
}

/// Two cleanups at once (two processes' stores on one schema) both list the same expired
/// partitions: each partition is dropped once, by one of them, and neither fails on the
/// partitions the other dropped first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cleanups_at_once_drop_each_partition_once_and_neither_fails() {
    let store = fresh_store().await;
    for n in 4..=12 {
        seed(&store, "u", &format!("old{n}"), month(-n, 2), 2).await;
    }
    seed(&store, "u", "new", Utc::now(), 2).await;
    store
        .convert_to_partitioned(Partitioning::default())
        .await
        .unwrap();
    let before = partition_names(&store).await;
    let other = PgTaskHistoryStore::connect(store.config().clone())
        .await
        .unwrap();
    let (a, b) = tokio::join!(store.cleanup_old_tasks(30), other.cleanup_old_tasks(30));
    let (a, b) = (a.unwrap(), b.unwrap());
    let after = partition_names(&store).await;
    let gone = before.iter().filter(|p| !after.contains(p)).count() as u64;
    assert!(gone >= 9, "{before:?} -> {after:?}");
    assert_eq!(
        a.partitions_dropped + b.partitions_dropped,
        gone,
        "{a:?} {b:?}"
    );
    assert_eq!(a.tasks_removed + b.tasks_removed, 9, "{a:?} {b:?}");
    assert_eq!(
        tasks(&store, "u")
            .await
            .into_iter()
            .map(|t| t.task_id)
            .collect::<Vec<_>>(),
        ["new"]
    );
    assert_eq!(store.task_totals().await.unwrap().total(), 1);
    other.close().await;
}
