//! Faults on a real server: every backend killed under load, an exhausted pool, a thousand
//! callers dropping their futures mid-query, and rounds of cancellation racing saves. After
//! each, nothing acknowledged is lost or doubled and the same pool serves again.
//!
//! Run with `--nocapture` to see the figures (writes acknowledged, stored, recovery time).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use taskhistory_core::{
    HistoryScan, RetryPolicy, StoreError, TaskHistoryStore, TaskStatus, TaskStepResult,
};
use taskhistory_postgres::PgTaskHistoryStore;
use taskhistory_testing::{admin_execute, fresh_config, lock_summary, store_for, test_db_client};

fn step(i: i32) -> TaskStepResult {
    TaskStepResult::running(format!("s{i}"), json!({ "i": i }), "")
}

/// Every step of `user`, through the scan (the store's own paging).
async fn all_steps(store: &PgTaskHistoryStore, user: &str) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    let mut scan = HistoryScan::all(10_000);
    loop {
        let page = store.scan_history(user, &scan).await.unwrap();
        out.extend(page.steps.iter().map(|r| (r.task_id.clone(), r.step)));
        match page.next {
            Some(k) => scan = scan.after(Some(k)),
            None => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backends_under_load_lose_nothing_and_the_pool_recovers() {
    let app = format!("th-kill-{}", std::process::id());
    let config = fresh_config()
        .await
        .application_name(&app)
        .pool_size(4, 16)
        .retry(RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(20),
            ..RetryPolicy::default()
        });
    let store = store_for(config).await;
    let acked: Arc<Mutex<Vec<(String, i32)>>> = Arc::default();
    let failed: Arc<Mutex<Vec<StoreError>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..32)
        .map(|w| {
            let (store, acked, failed, stop) =
                (store.clone(), acked.clone(), failed.clone(), stop.clone());
            tokio::spawn(async move {
                let task = format!("w{w:02}");
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    match store.save_task_history("u", &task, i, &step(i)).await {
                        Ok(()) => acked.lock().unwrap().push((task.clone(), i)),
                        Err(e) => failed.lock().unwrap().push(e),
                    }
                    i += 1;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kill = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{app}'"
    );
    for _ in 0..3 {
        admin_execute(&kill).await;
        // The same pool serves again at once: the first save after the kill succeeds (a
        // connection that died is dropped, and the retry takes a checked one).
        store
            .save_task_history("u", "probe", 0, &step(0))
            .await
            .unwrap();
        // Writers run between the kills.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    let acked = acked.lock().unwrap().clone();
    let failed: Vec<StoreError> = std::mem::take(&mut *failed.lock().unwrap());
    for e in failed.iter() {
        assert!(
            e.is_transient(),
            "a save failed with a non-transient error: {e}"
        );
    }
    let stored: Vec<(String, i32)> = all_steps(&store, "u")
        .await
        .into_iter()
        .filter(|(t, _)| t != "probe")
        .collect();
    let unique: BTreeSet<_> = stored.iter().cloned().collect();
    assert_eq!(unique.len(), stored.len(), "a step is stored twice");
    let missing: Vec<_> = acked.iter().filter(|k| !unique.contains(k)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not stored: {missing:?}"
    );
    // Summaries agree with the rows.
    for t in store.get_user_tasks("u", 100).await.unwrap() {
        let rows = unique.iter().filter(|(task, _)| *task == t.task_id).count();
        if t.task_id != "probe" {
            assert_eq!(t.step_count as usize, rows, "{}", t.task_id);
        }
    }
    let metrics = store.metrics();
    println!(
        "killed every backend 3 times under 32 writers: {} saves acknowledged, {} stored, 0 \
         duplicates, {} transient failures returned, {} retries",
        acked.len(),
        stored.len(),
        failed.len(),
        metrics.retries,
    );
    assert!(metrics.retries > 0, "the kill did not hit the store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_pool_waits_then_says_so() {
    // Saves as statements of their own, each waiting for a connection (with combining,
    // saves wait for a lane instead: `combined.rs`).
    let config = fresh_config()
        .await
        .save_lanes(0)
        .pool_size(1, 2)
        .pool_timeout(Duration::from_millis(300))
        .retry(RetryPolicy::never());
    let schema = config.get_schema().unwrap().to_owned();
    let store = store_for(config).await;
    store
        .save_task_history("u", "t", 0, &step(0))
        .await
        .unwrap();
    let locker = lock_summary(&schema, "t").await;
    // Both connections wait on the lock.
    let blocked: Vec<_> = (1..=2)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.save_task_history("u", "t", i, &step(i)).await })
        })
        .collect();
    let mut polls = 0;
    while store.pool_stats().in_use < 2 {
        polls += 1;
        assert!(polls < 1_000, "the two saves never held both connections");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Reads do not need the pool (they share connections of their own) and still answer.
    assert_eq!(
        store.check_task_status("u", "t").await.unwrap(),
        taskhistory_core::TaskStatus::Running
    );
    let err = store
        .save_task_history("u", "other", 0, &step(0))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Unavailable { .. }),
        "expected a pool timeout, got {err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("no connection free within"), "{text}");
    assert!(text.contains("max 2"), "{text}");
    // It gave up by the pool's timeout (counted by the pool, not timed here).
    let stats = store.pool_stats();
    assert_eq!(stats.wait_timeouts, 1, "{stats:?}");

    // Released: the waiting saves finish, no deadlock, and the pool serves again.
    locker.batch_execute("ROLLBACK").await.unwrap();
    for b in blocked {
        tokio::time::timeout(Duration::from_secs(5), b)
            .await
            .expect("a blocked save never finished")
            .unwrap()
            .unwrap();
    }
    assert_eq!(
        store.check_task_status("u", "t").await.unwrap(),
        TaskStatus::Running
    );
    assert_eq!(store.load_task_history("u", "t").await.unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_dropped_futures_leave_every_connection_usable() {
    // Saves as statements of their own: the path on which a dropped caller cuts its
    // statement. (Combined saves run in a lane's task that no caller can cut:
    // `combined.rs`.)
    let config = fresh_config().await.pool_size(2, 8).save_lanes(0);
    let schema = config.get_schema().unwrap().to_owned();
    let store = store_for(config).await;
    store
        .save_task_history("u", "held", 100, &step(100))
        .await
        .unwrap();
    for i in 0..20 {
        store
            .save_task_history("u", "t", i, &step(i))
            .await
            .unwrap();
    }
    let mut dropped = 0;
    for round in 0..100 {
        let mut calls = Vec::new();
        for k in 0..10 {
            let store = store.clone();
            let i = round * 10 + k;
            // Deadlines from 0 to 6 ms: many calls are cut mid-flight, some finish.
            let deadline = Duration::from_micros(fastrand_like(i) % 6_000);
            calls.push(tokio::spawn(async move {
                let work = async {
                    if i % 2 == 0 {
                        store
                            .save_task_history("u", &format!("d{}", i % 7), i, &step(i))
                            .await
                            .map(drop)
                    } else {
                        store.load_task_history("u", "t").await.map(drop)
                    }
                };
                tokio::select! {
                    // A call that finished must have succeeded: a failure is no "cut".
                    r = work => {
                        if let Err(e) = r {
                            panic!("call {i} finished with an error: {e}");
                        }
                        true
                    }
                    () = tokio::time::sleep(deadline) => false,
                }
            }));
        }
        for c in calls {
            if !c.await.unwrap() {
                dropped += 1;
            }
        }
    }
    assert!(dropped > 100, "only {dropped} of 1000 calls were cut short");
    let cut = store.pool_stats();
    // Saves cut mid-statement had their connections thrown away (reads run on the shared
    // connections, not the pool).
    assert!(
        cut.closed_broken >= 1 && cut.closed_broken <= dropped,
        "{dropped} calls cut, pool {cut:?}"
    );
    // Every connection the pool can hand out works: 8 saves held on a lock at once use 8
    // pooled connections (checked in the pool's figures), then all finish once it goes.
    let locker = lock_summary(&schema, "held").await;
    let held: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.save_task_history("u", "held", i, &step(i)).await })
        })
        .collect();
    let mut polls = 0;
    while store.pool_stats().in_use < 8 {
        polls += 1;
        assert!(
            polls < 1_000,
            "8 saves never held 8 connections: {:?}",
            store.pool_stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(store.pool_stats().connections, 8);
    locker.batch_execute("ROLLBACK").await.unwrap();
    for h in held {
        h.await.unwrap().unwrap();
    }
    assert_eq!(store.load_task_history("u", "held").await.unwrap().len(), 9);
    assert_eq!(store.load_task_history("u", "t").await.unwrap().len(), 20);
    println!("{dropped} of 1000 calls dropped mid-flight; pool after the cuts: {cut:?}");
}

/// A cheap deterministic spread of numbers (no RNG needed for deadlines).
fn fastrand_like(i: i32) -> u64 {
    (i as u64).wrapping_mul(2_654_435_761) >> 7
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_racing_saves_keeps_the_rules_in_every_round() {
    let store = store_for(fresh_config().await.pool_size(2, 10)).await;
    let mut interleaved = 0;
    for round in 0..20 {
        let task = format!("race{round}");
        store
            .save_task_history("u", &task, 0, &step(0))
            .await
            .unwrap();
        let acked: Arc<Mutex<Vec<i32>>> = Arc::default();
        let writers: Vec<_> = (0..6)
            .map(|w| {
                let (store, task, acked) = (store.clone(), task.clone(), acked.clone());
                tokio::spawn(async move {
                    for k in 0..8 {
                        let s = 1 + w * 8 + k;
                        match store.save_task_history("u", &task, s, &step(s)).await {
                            Ok(()) => acked.lock().unwrap().push(s),
                            Err(StoreError::TaskCancelled { .. }) => {}
                            Err(e) => panic!("unexpected {e}"),
                        }
                    }
                })
            })
            .collect();
        // The cancellation goes once the writers are under way (1 to 6 steps acknowledged,
        // by round): an event, not a delay.
        let mut polls = 0;
        while acked.lock().unwrap().len() < 1 + round as usize % 6 {
            polls += 1;
            assert!(polls < 10_000, "round {round}: the writers did not start");
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        let cancelled = store.mark_task_as_cancelled("u", &task).await.unwrap();
        for w in writers {
            w.await.unwrap();
        }
        let history = store.load_task_history("u", &task).await.unwrap();
        let mut acked = acked.lock().unwrap().clone();
        if acked.len() < 48 {
            // Some saves came after the cancellation and were refused.
            interleaved += 1;
        }
        acked.push(0);
        acked.sort();
        let status = store.check_task_status("u", &task).await.unwrap();
        if cancelled {
            // Sticky: the cancellation is the last entry, right after the highest step
            // written before it, and every acknowledged step is there, once.
            let (last, rest) = history.split_last().unwrap();
            assert_eq!(last.status, TaskStatus::Cancelled, "round {round}");
            let steps: Vec<i32> = rest.iter().map(|e| e.step).collect();
            assert_eq!(steps, acked, "round {round}");
            assert_eq!(last.step, steps.last().unwrap() + 1, "round {round}");
            assert_eq!(status, TaskStatus::Cancelled);
            assert!(matches!(
                store.save_task_history("u", &task, 1000, &step(1)).await,
                Err(StoreError::TaskCancelled { .. })
            ));
        } else {
            // Not cancelled only if it was already terminal, which running steps never are.
            panic!("round {round}: the cancellation found nothing to cancel");
        }
        let summary = store
            .get_user_tasks("u", 100)
            .await
            .unwrap()
            .into_iter()
            .find(|t| t.task_id == task)
            .unwrap();
        assert_eq!(summary.step_count as usize, history.len());
    }
    // The race this test is named for happened: saves met the cancellation mid-way.
    assert!(
        interleaved > 0,
        "no round had a save refused after the cancellation"
    );
}

/// The writes come from another store (another process, as far as the watcher can tell),
/// so only its notifications wake the watcher, and the poll is set far away: after the
/// listener's backend is killed, the watcher is woken by the listener's reconnection alone
/// and reads what was written meanwhile from the log. Every write once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_survives_a_lost_listener_and_misses_nothing() {
    use futures::StreamExt;
    let app = format!("th-watch-{}", std::process::id());
    let config = fresh_config().await;
    let writer = store_for(config.clone()).await;
    let store = store_for(
        config
            .application_name(&app)
            .watch_poll(Duration::from_secs(3600)),
    )
    .await;
    writer
        .save_task_history("u", "t", 0, &step(0))
        .await
        .unwrap();
    let mut events = store.watch_task("u", "t", None).await.unwrap();
    let mut user_events = store.watch_user("u", None).await.unwrap();
    writer
        .save_task_history("u", "t", 1, &step(1))
        .await
        .unwrap();
    for stream in [&mut events, &mut user_events] {
        let e = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the notification did not wake the watcher")
            .unwrap()
            .unwrap();
        assert_eq!(e.step, 1);
    }
    // Kill the listener's backend (there is exactly one), then write while it reconnects.
    let admin = test_db_client().await;
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = $1 AND query LIKE 'LISTEN%'",
            &[&app],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1, "the listener's backend was not found");
    for i in 2..40 {
        writer
            .save_task_history("u", "t", i, &step(i))
            .await
            .unwrap();
    }
    assert!(writer.mark_task_as_cancelled("u", "t").await.unwrap());
    for stream in [&mut events, &mut user_events] {
        let mut steps = Vec::new();
        while steps.last() != Some(&40) {
            let e = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("the watcher did not catch up within 10 s")
                .unwrap()
                .unwrap();
            steps.push(e.step);
        }
        assert_eq!(
            steps,
            (2..=40).collect::<Vec<_>>(),
            "lost or doubled across the reconnect"
        );
    }
}

/// A process that commits and dies before its wake-up leaves: here a second store on the
/// same schema with notifications off plays that process. The watchers read its writes at
/// their next poll, each once, a task's in commit order; nothing waits on a long timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_whose_wake_up_never_left_reach_watchers_at_the_next_poll() {
    use futures::StreamExt;
    let config = fresh_config().await;
    let silent = store_for(config.clone().notifications(false)).await;
    let store = store_for(config.watch_poll(Duration::from_millis(200))).await;
    silent
        .save_task_history("u", "t", 0, &step(0))
        .await
        .unwrap();
    let mut events = store.watch_task("u", "t", None).await.unwrap();
    let mut user_events = store.watch_user("u", None).await.unwrap();
    let started = Instant::now();
    for i in 1..4 {
        silent
            .save_task_history("u", "t", i, &step(i))
            .await
            .unwrap();
    }
    silent
        .save_task_history("u", "other", 0, &step(0))
        .await
        .unwrap();
    let in_order = |got: &[(String, i32)], task: &str| -> Vec<i32> {
        got.iter()
            .filter(|(t, _)| t == task)
            .map(|(_, s)| *s)
            .collect()
    };
    for (stream, count) in [(&mut events, 3), (&mut user_events, 4)] {
        let mut got = Vec::new();
        while got.len() < count {
            let e = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("the poll did not deliver within 10 s")
                .unwrap()
                .unwrap();
            got.push((e.task_id, e.step));
        }
        assert_eq!(in_order(&got, "t"), [1, 2, 3], "{got:?}");
        assert_eq!(in_order(&got, "other"), vec![0; count - 3], "{got:?}");
    }
    // Saved again without a wake-up: delivered again, at the next poll.
    silent
        .save_task_history("u", "t", 2, &step(22))
        .await
        .unwrap();
    // Then a notified write: the very next event after that, so nothing was doubled.
    for (stream, expected) in [(&mut events, 2), (&mut user_events, 2)] {
        let e = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the re-save was not delivered")
            .unwrap()
            .unwrap();
        assert_eq!((e.task_id.as_str(), e.step), ("t", expected));
    }
    store
        .save_task_history("u", "t", 5, &step(5))
        .await
        .unwrap();
    for stream in [&mut events, &mut user_events] {
        let e = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the sentinel step did not arrive")
            .unwrap()
            .unwrap();
        assert_eq!(
            (e.task_id.as_str(), e.step),
            ("t", 5),
            "an extra event came first"
        );
    }
    println!(
        "un-notified writes delivered {:.2} s after they were saved",
        started.elapsed().as_secs_f64()
    );
}

/// Reads share connections of their own (pipelined). Killing every server process of the
/// store under 16 readers: reads fail only with transient errors (most are retried away),
/// the shared connections are replaced, and reads keep being answered correctly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_shared_read_connections_are_replaced() {
    let app = format!("th-kill-reads-{}", std::process::id());
    let config = fresh_config()
        .await
        .application_name(&app)
        .retry(RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(20),
            ..RetryPolicy::default()
        });
    let store = store_for(config).await;
    for i in 0..5 {
        store
            .save_task_history("u", "t", i, &step(i))
            .await
            .unwrap();
    }
    let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let failed: Arc<Mutex<Vec<StoreError>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..16)
        .map(|r| {
            let (store, answered, failed, stop) = (
                store.clone(),
                answered.clone(),
                failed.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let outcome = match r % 3 {
                        0 => store
                            .check_task_status("u", "t")
                            .await
                            .map(|s| assert_eq!(s, taskhistory_core::TaskStatus::Running)),
                        1 => store
                            .load_task_history("u", "t")
                            .await
                            .map(|h| assert_eq!(h.len(), 5)),
                        _ => store
                            .get_user_tasks("u", 10)
                            .await
                            .map(|t| assert_eq!(t.len(), 1)),
                    };
                    match outcome {
                        Ok(()) => {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failed.lock().unwrap().push(e),
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kill = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{app}'"
    );
    for _ in 0..3 {
        let before = answered.load(Ordering::Relaxed);
        admin_execute(&kill).await;
        // The first read after the kill is answered (the dead shared connection is
        // replaced within the read's retries), and the readers go on.
        assert_eq!(
            store.check_task_status("u", "t").await.unwrap(),
            taskhistory_core::TaskStatus::Running
        );
        let mut polls = 0;
        while answered.load(Ordering::Relaxed) < before + 100 {
            polls += 1;
            assert!(polls < 2_000, "the readers stopped being answered");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    for e in failed.lock().unwrap().iter() {
        assert!(
            e.is_transient(),
            "a read failed with a non-transient error: {e}"
        );
    }
    assert!(
        store.metrics().retries > 0,
        "the kill did not hit the readers"
    );
}

/// `warm_up` returns with the pool's minimum open (asyncpg's `create_pool` does the same).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_opens_the_pool_minimum() {
    let store = store_for(fresh_config().await.pool_size(6, 8)).await;
    store.warm_up().await.unwrap();
    let stats = store.pool_stats();
    assert!(stats.connections >= 6 && stats.idle >= 6, "{stats:?}");
    store.close().await;
    assert!(matches!(store.warm_up().await, Err(StoreError::Closed)));
}
