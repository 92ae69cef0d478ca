//! Combined single saves and status checks: the behaviour suite with every save and every
//! status check through the combined statements on one lane; each caller's own
//! outcome in a combined statement; callers that give up; durability across a `kill -9` of
//! the server under 32 writers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use taskhistory_core::{RetryPolicy, StoreError, TaskHistoryStore, TaskStatus, TaskStepResult};
use taskhistory_postgres::{PgConfig, SslMode};
use taskhistory_testing::sql;
use taskhistory_testing::{fresh_config, lock_summary, store_for, OwnServer};

taskhistory_core::conformance_tests!(taskhistory_testing::combined_dyn_store().await);

fn step(i: i32) -> TaskStepResult {
    TaskStepResult::running("s", json!({ "i": i }), "")
}

/// Saves queued behind a busy lane go in one statement; the one to a cancelled task is
/// refused alone, the others are stored, and each caller hears its own outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_combined_statement_refuses_only_the_save_to_a_cancelled_task() {
    let combined = Arc::new(AtomicUsize::new(0));
    let counter = combined.clone();
    let config = fresh_config()
        .await
        .save_lanes(1)
        .observe_statements(move |s| {
            if s == sql::SAVE_COMBINED.trim() {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
    let schema = config.get_schema().unwrap().to_owned();
    let store = store_for(config).await;
    for task in ["held", "a", "b", "c"] {
        store
            .save_task_history("u", task, 0, &step(0))
            .await
            .unwrap();
    }
    assert!(store.mark_task_as_cancelled("u", "c").await.unwrap());
    // The one lane waits on a lock the test holds; the next saves queue behind it.
    let locker = lock_summary(&schema, "held").await;
    let first = {
        let store = store.clone();
        tokio::spawn(async move { store.save_task_history("u", "held", 1, &step(1)).await })
    };
    while locker
        .query_one("SELECT count(*) FROM pg_locks WHERE NOT granted", &[])
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 0
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let queued: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|task| {
            let store = store.clone();
            tokio::spawn(async move { store.save_task_history("u", task, 1, &step(1)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = combined.load(Ordering::Relaxed);
    locker.batch_execute("ROLLBACK").await.unwrap();
    first.await.unwrap().unwrap();
    let mut outcomes = Vec::new();
    for q in queued {
        outcomes.push(q.await.unwrap());
    }
    assert!(outcomes[0].is_ok() && outcomes[1].is_ok(), "{outcomes:?}");
    assert!(
        matches!(&outcomes[2], Err(StoreError::TaskCancelled { task_id, .. }) if task_id == "c"),
        "{outcomes:?}"
    );
    // The three went in one statement.
    assert_eq!(combined.load(Ordering::Relaxed) - before, 1);
    for (task, steps) in [("a", 2), ("b", 2), ("c", 2)] {
        assert_eq!(
            store.load_task_history("u", task).await.unwrap().len(),
            steps
        );
    }
    assert_eq!(
        store.load_task_history("u", "c").await.unwrap()[1].status,
        taskhistory_core::TaskStatus::Cancelled
    );
}

/// Callers that give up (their futures dropped at random moments) never cut a combined
/// statement: no connection is thrown away, every save whose caller heard `Ok` is stored,
/// and the store goes on serving. (Every save goes through the queue here: a lone save
/// that finds the queue empty is written in its caller's task, and a caller that gives up
/// on it cuts only its own statement, as without combining.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_give_up_never_cut_other_callers_saves() {
    let config = fresh_config().await.pool_size(2, 8).save_lanes(1);
    let store = store_for(config.combine_lone_saves(true)).await;
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let mut cut = 0;
    for round in 0..50 {
        let mut calls = Vec::new();
        for k in 0..16 {
            let (store, acked) = (store.clone(), acked.clone());
            let i = round * 16 + k;
            let deadline =
                Duration::from_micros(((i as u64).wrapping_mul(2_654_435_761) >> 7) % 4_000);
            calls.push(tokio::spawn(async move {
                let (task, result) = (format!("t{}", k % 4), step(i));
                tokio::select! {
                    r = store.save_task_history("u", &task, i, &result) => {
                        r.unwrap();
                        acked.lock().unwrap().insert((k % 4, i));
                        true
                    }
                    () = tokio::time::sleep(deadline) => false,
                }
            }));
        }
        for c in calls {
            if !c.await.unwrap() {
                cut += 1;
            }
        }
    }
    assert!(cut > 50, "only {cut} calls were cut");
    assert_eq!(
        store.pool_stats().closed_broken,
        0,
        "{:?}",
        store.pool_stats()
    );
    let acked = acked.lock().unwrap().clone();
    for task in 0..4 {
        let stored: BTreeSet<i32> = store
            .load_task_history("u", &format!("t{task}"))
            .await
            .unwrap()
            .iter()
            .map(|e| e.step)
            .collect();
        let want: BTreeSet<i32> = acked
            .iter()
            .filter(|(t, _)| *t == task)
            .map(|(_, s)| *s)
            .collect();
        assert!(
            want.is_subset(&stored),
            "task t{task}: acknowledged saves missing"
        );
    }
    store
        .save_task_history("u", "after", 0, &step(0))
        .await
        .unwrap();
}

/// `kill -9` of the server (one of the test's own) under 32 writers with combining on:
/// every acknowledged save is stored, once; the writers go on after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_combined_save_survives_a_kill_9() {
    let server = OwnServer::start(&[]);
    let config = PgConfig::from_url(&server.url())
        .unwrap()
        .ssl_mode(SslMode::Disable)
        .schema("combined")
        .pool_size(4, 8)
        .retry(RetryPolicy {
            initial_backoff: Duration::from_millis(20),
            max_attempts: 10,
            ..RetryPolicy::default()
        });
    let store = store_for(config).await;
    let stop = Arc::new(AtomicBool::new(false));
    let saved = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..32 {
        let (store, stop, saved) = (store.clone(), stop.clone(), saved.clone());
        writers.push(tokio::spawn(async move {
            let (mut acked, mut failed) = (Vec::new(), 0);
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                match store
                    .save_task_history("u", &format!("w{w}"), i, &step(i))
                    .await
                {
                    Ok(()) => {
                        acked.push(i);
                        saved.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        assert!(e.is_transient(), "writer {w}: {e}");
                        failed += 1;
                    }
                }
                i += 1;
            }
            (acked, failed)
        }));
    }
    while saved.load(Ordering::Relaxed) < 2_000 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.crash_and_start();
    let after_crash = saved.load(Ordering::Relaxed);
    while saved.load(Ordering::Relaxed) < after_crash + 2_000 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for (w, writer) in writers.into_iter().enumerate() {
        let (acked, _) = writer.await.unwrap();
        let stored: Vec<i32> = store
            .load_task_history("u", &format!("w{w}"))
            .await
            .unwrap()
            .iter()
            .map(|e| e.step)
            .collect();
        let unique: BTreeSet<i32> = stored.iter().copied().collect();
        assert_eq!(
            unique.len(),
            stored.len(),
            "writer {w}: a step stored twice"
        );
        for step in &acked {
            assert!(
                unique.contains(step),
                "writer {w}: acknowledged step {step} lost"
            );
        }
        total += acked.len();
    }
    assert!(total >= 4_000);
    store.close().await;
}

/// Saves queued behind lanes that stay busy (both wait on a lock the test holds) give up
/// after the pool timeout with `Unavailable`, as a save waiting for a connection does, and
/// are not written later; once the lock goes, the lanes serve again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saves_waiting_for_busy_lanes_give_up_after_the_pool_timeout() {
    let config = fresh_config()
        .await
        .save_lanes(2)
        .pool_size(1, 4)
        .pool_timeout(Duration::from_millis(300))
        .retry(RetryPolicy::never());
    let schema = config.get_schema().unwrap().to_owned();
    let store = store_for(config).await;
    store
        .save_task_history("u", "t", 0, &step(0))
        .await
        .unwrap();
    let locker = lock_summary(&schema, "t").await;
    let blocked: Vec<_> = (1..=2)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.save_task_history("u", "t", i, &step(i)).await })
        })
        .collect();
    // Both lanes wait on the lock: two statements blocked in the server.
    while locker
        .query_one("SELECT count(*) FROM pg_locks WHERE NOT granted", &[])
        .await
        .unwrap()
        .get::<_, i64>(0)
        < 2
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let err = store
        .save_task_history("u", "other", 0, &step(0))
        .await
        .unwrap_err();
    assert!(matches!(&err, StoreError::Unavailable { .. }), "{err:?}");
    assert!(
        err.to_string().contains("no save lane free within 300ms"),
        "{err}"
    );
    locker.batch_execute("ROLLBACK").await.unwrap();
    for b in blocked {
        b.await.unwrap().unwrap();
    }
    // The save that gave up was taken out of the queue: never written.
    assert!(store
        .load_task_history("u", "other")
        .await
        .unwrap()
        .is_empty());
    store
        .save_task_history("u", "other", 1, &step(1))
        .await
        .unwrap();
    assert_eq!(store.load_task_history("u", "t").await.unwrap().len(), 3);
}

/// A lone save (no other save queued, a lane free) is written by the single-step statement
/// in its caller's own task, with no hand-over; saves that queue behind busy lanes are
/// written by a lane's task, in one combined statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_save_is_written_in_its_callers_task_and_queued_saves_by_a_lane() {
    type Sent = Arc<Mutex<Vec<(&'static str, Option<tokio::task::Id>)>>>;
    let sent: Sent = Arc::default();
    let seen = sent.clone();
    let config = fresh_config()
        .await
        .save_lanes(1)
        .observe_statements(move |text| {
            let which = if text == sql::SAVE_STEP.trim() {
                "single"
            } else if text == sql::SAVE_COMBINED.trim() {
                "combined"
            } else {
                return;
            };
            seen.lock().unwrap().push((which, tokio::task::try_id()));
        });
    let schema = config.get_schema().unwrap().to_owned();
    let store = store_for(config).await;

    // Alone: its statement runs in the caller's task.
    let caller = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .save_task_history("u", "t", 0, &step(0))
                .await
                .unwrap();
            tokio::task::id()
        })
        .await
        .unwrap()
    };
    assert_eq!(
        sent.lock().unwrap().as_slice(),
        [("single", Some(caller))],
        "a lone save was handed over"
    );

    // The one lane busy (its save waits on a lock the test holds): later saves queue, and
    // a lane's task writes them together once it is free.
    sent.lock().unwrap().clear();
    let locker = lock_summary(&schema, "t").await;
    let first = {
        let store = store.clone();
        tokio::spawn(async move { store.save_task_history("u", "t", 1, &step(1)).await })
    };
    while sent.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let queued: Vec<_> = (2..6)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let id = tokio::task::id();
                store
                    .save_task_history("u", &format!("q{i}"), i, &step(i))
                    .await
                    .map(|()| id)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    locker.batch_execute("ROLLBACK").await.unwrap();
    first.await.unwrap().unwrap();
    let mut callers = Vec::new();
    for q in queued {
        callers.push(q.await.unwrap().unwrap());
    }
    let sent = sent.lock().unwrap().clone();
    let combined: Vec<_> = sent.iter().filter(|(w, _)| *w == "combined").collect();
    assert_eq!(combined.len(), 1, "{sent:?}");
    assert!(
        combined[0].1.is_some_and(|id| !callers.contains(&id)),
        "the combined statement ran in a caller's task: {sent:?}"
    );
}

/// Counts the status statements a store sends: its own (`status`) and combined (`statuses`).
fn status_statements(config: PgConfig) -> (PgConfig, Arc<Mutex<Vec<&'static str>>>) {
    let sent: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    let seen = sent.clone();
    let config = config.status_lanes(1).observe_statements(move |text| {
        if text == sql::TASK_STATUS.trim() {
            seen.lock().unwrap().push("status");
        } else if text == sql::TASK_STATUSES.trim() {
            seen.lock().unwrap().push("statuses");
        }
    });
    (config, sent)
}

/// Holds the one status lane with a check of `task` that waits on a lock of the summary
/// table the returned client holds (`ROLLBACK` it to let the check go): later checks queue.
async fn hold_the_status_lane(
    store: &taskhistory_postgres::PgTaskHistoryStore,
    schema: &str,
    task: &'static str,
    sent: &Arc<Mutex<Vec<&'static str>>>,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<TaskStatus, StoreError>>,
) {
    let locker = taskhistory_testing::test_db_client().await;
    locker
        .batch_execute(&format!(
            "SET search_path TO {schema}; BEGIN; LOCK TABLE task_summary IN ACCESS EXCLUSIVE MODE"
        ))
        .await
        .unwrap();
    let sent_before = sent.lock().unwrap().len();
    let first = {
        let store = store.clone();
        tokio::spawn(async move { store.check_task_status("u", task).await })
    };
    while sent.lock().unwrap().len() == sent_before {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (locker, first)
}

/// Waits until `n` status checks wait for the status lane.
async fn until_queued(store: &taskhistory_postgres::PgTaskHistoryStore, n: u64) {
    let started = std::time::Instant::now();
    while store.metrics().queued_status_checks < n {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} of {n} checks queued",
            store.metrics().queued_status_checks
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Status checks queued behind a busy status lane go in one statement (tasks of two users,
/// a task asked twice, a task with no step), and each caller gets its own task's status,
/// the same as a lone check's. A check alone runs its own statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_status_checks_are_read_in_one_statement_each_its_own_status() {
    let (config, sent) = status_statements(fresh_config().await);
    let schema = config.get_schema().unwrap().to_owned();
    let store = store_for(config).await;
    for (user, task, steps) in [("u", "a", 1), ("u", "b", 2), ("v", "a", 3)] {
        for i in 0..steps {
            store
                .save_task_history(user, task, i, &step(i))
                .await
                .unwrap();
        }
    }
    store
        .save_task_history(
            "v",
            "a",
            3,
            &TaskStepResult::failure("s", taskhistory_core::ErrorCode::Execution, "boom"),
        )
        .await
        .unwrap();
    let asked = [
        ("u", "a"),
        ("v", "a"),
        ("u", "none"),
        ("u", "b"),
        ("v", "a"),
    ];
    let mut alone = Vec::new();
    for (user, task) in asked {
        alone.push(store.check_task_status(user, task).await.unwrap());
    }
    use TaskStatus::{Failed, Pending, Running};
    assert_eq!(alone, [Running, Failed, Pending, Running, Failed]);
    assert_eq!(sent.lock().unwrap().as_slice(), ["status"; 5]);

    sent.lock().unwrap().clear();
    let (locker, first) = hold_the_status_lane(&store, &schema, "b", &sent).await;
    let queued: Vec<_> = asked
        .into_iter()
        .map(|(user, task)| {
            let store = store.clone();
            tokio::spawn(async move { store.check_task_status(user, task).await })
        })
        .collect();
    until_queued(&store, 5).await;
    assert_eq!(sent.lock().unwrap().len(), 1, "a queued check ran alone");
    locker.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(first.await.unwrap().unwrap(), Running);
    let mut combined = Vec::new();
    for q in queued {
        combined.push(q.await.unwrap().unwrap());
    }
    assert_eq!(combined, alone);
    assert_eq!(sent.lock().unwrap().as_slice(), ["status", "statuses"]);
    assert_eq!(store.metrics().queued_status_checks, 0);
}

/// A combined check meeting one task's row that does not decode (a status this version
/// does not know, as a newer version might write) fails only that task's check: its caller
/// gets the error, every other caller its status, from the one statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_that_does_not_decode_fails_only_its_own_tasks_check() {
    let (config, sent) = status_statements(fresh_config().await);
    let schema = config.get_schema().unwrap().to_owned();
    let store = store_for(config).await;
    for task in ["newer", "b", "c"] {
        store
            .save_task_history("u", task, 0, &step(0))
            .await
            .unwrap();
    }
    taskhistory_testing::test_db_client()
        .await
        .batch_execute(&format!(
            "SET search_path TO {schema}; \
             ALTER TABLE task_summary DROP CONSTRAINT task_summary_status_check; \
             UPDATE task_summary SET status = 'paused' WHERE user_id = 'u' AND task_id = 'newer'"
        ))
        .await
        .unwrap();
    let (locker, first) = hold_the_status_lane(&store, &schema, "c", &sent).await;
    let queued: Vec<_> = ["b", "newer", "c"]
        .into_iter()
        .map(|task| {
            let store = store.clone();
            tokio::spawn(async move { store.check_task_status("u", task).await })
        })
        .collect();
    until_queued(&store, 3).await;
    locker.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(first.await.unwrap().unwrap(), TaskStatus::Running);
    let mut outcomes = Vec::new();
    for q in queued {
        outcomes.push(q.await.unwrap());
    }
    assert_eq!(
        outcomes[0].as_ref().unwrap(),
        &TaskStatus::Running,
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes[2].as_ref().unwrap(),
        &TaskStatus::Running,
        "{outcomes:?}"
    );
    let e = outcomes[1].as_ref().unwrap_err();
    assert!(
        matches!(e, StoreError::Database { .. }) && e.to_string().contains("paused"),
        "{e:?}"
    );
    // The first check's own statement, then the combined one.
    assert_eq!(sent.lock().unwrap().as_slice(), ["status", "statuses"]);
}

/// A status check that waits longer than the pool timeout for a status lane gets
/// `Unavailable` naming the lanes, and leaves the queue; the lane's own check still
/// answers once it is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_checks_waiting_for_a_busy_lane_give_up_after_the_pool_timeout() {
    let (config, sent) = status_statements(
        fresh_config()
            .await
            .pool_timeout(Duration::from_millis(300))
            .retry(RetryPolicy::never()),
    );
    let schema = config.get_schema().unwrap().to_owned();
    let store = store_for(config).await;
    store
        .save_task_history("u", "t", 0, &step(0))
        .await
        .unwrap();
    let (locker, first) = hold_the_status_lane(&store, &schema, "t", &sent).await;
    let err = store.check_task_status("u", "t").await.unwrap_err();
    assert!(matches!(&err, StoreError::Unavailable { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("no status lane free within 300ms (its one lane busy)"),
        "{err}"
    );
    assert_eq!(store.metrics().queued_status_checks, 0);
    locker.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(first.await.unwrap().unwrap(), TaskStatus::Running);
    assert_eq!(
        store.check_task_status("u", "t").await.unwrap(),
        TaskStatus::Running
    );
    // The check that gave up sent nothing: the first check's statement, then the last's.
    assert_eq!(sent.lock().unwrap().as_slice(), ["status", "status"]);
}
