//! The log's one tail on PostgreSQL: the database's reads follow the writes, not the number
//! of watchers; a watcher that stops reading holds back neither the writers nor the other
//! watchers, and loses nothing; the store-wide limit on watches.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use taskhistory_core::{
    DynStore, StepRecord, TaskEvent, TaskEventStream, TaskHistoryStore, TaskStepResult,
};
use taskhistory_testing::{fresh_config, store_for};

fn step(i: i32) -> TaskStepResult {
    TaskStepResult::running("s", json!({ "i": i }), "")
}

async fn next(events: &mut TaskEventStream) -> TaskEvent {
    tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("no event within 10 s")
        .expect("the stream ended")
        .expect("the stream failed")
}

/// Statements that read the log of events, counted as the store sends them.
fn counting() -> (Arc<AtomicU64>, impl Fn(&str) + Send + Sync + 'static) {
    let reads = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&reads);
    (reads, move |sql: &str| {
        if sql.contains("pg_visible_in_snapshot") {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    })
}

/// The same 40 saves, each awaited by every watcher before the next, with 1 watcher and
/// with 200 (20 users, 10 each): the store reads the log about as often either way, and
/// far less than once per watcher per write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_reads_follow_the_writes_not_the_watchers() {
    let mut reads_with = Vec::new();
    for watchers_per_user in [0usize, 10] {
        let (reads, observer) = counting();
        let store = store_for(fresh_config().await.observe_statements(observer)).await;
        let users: Vec<String> = (0..20).map(|u| format!("u{u}")).collect();
        let mut streams = Vec::new();
        // One watcher of its own user in both runs: it paces the writes.
        let mut pace = store.watch_user("pacer", None).await.unwrap();
        for user in &users {
            for _ in 0..watchers_per_user {
                streams.push(store.watch_user(user, None).await.unwrap());
            }
        }
        let started = reads.load(Ordering::Relaxed);
        for i in 0..40 {
            let user = &users[i % users.len()];
            store
                .save_task_history(user, "t", i as i32, &step(i as i32))
                .await
                .unwrap();
            store
                .save_task_history("pacer", "pace", i as i32, &step(0))
                .await
                .unwrap();
            // Every watcher of the written user, and the pacer, sees the write.
            let of_user = watchers_per_user * users.iter().position(|u| u == user).unwrap();
            for s in &mut streams[of_user..of_user + watchers_per_user] {
                let e = next(s).await;
                assert_eq!((e.user_id.as_str(), e.step), (user.as_str(), i as i32));
            }
            assert_eq!(next(&mut pace).await.step, i as i32);
        }
        let m = store.metrics();
        assert_eq!(m.watchers as usize, 1 + streams.len());
        assert_eq!(m.watcher_reads, 0, "no watcher had to read by itself");
        reads_with.push(reads.load(Ordering::Relaxed) - started);
        drop(streams);
    }
    let (alone, many) = (reads_with[0], reads_with[1]);
    eprintln!("log reads: {alone} with 1 watcher, {many} with 201");
    // 80 saves: a read per write at most (plus polls), whatever the number of watchers;
    // a read per watcher would be 200 times more.
    assert!(
        alone <= 100 && many <= 100,
        "log reads: {alone} with 1 watcher, {many} with 201"
    );
    assert!(
        many <= alone * 2 + 10,
        "log reads grew with the watchers: {alone} with 1, {many} with 201"
    );
}

/// A watcher that stops reading while 3,000 steps are written: the writers and another
/// watcher of the same user go on at their pace; the stopped one falls back to reading by
/// itself (the store's counters say so) and later receives every step once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_watcher_holds_back_no_one_and_loses_nothing() {
    let store = store_for(fresh_config().await).await;
    let mut stopped = store.watch_task("u", "t", None).await.unwrap();
    let mut live = store.watch_user("u", None).await.unwrap();
    let total = 3000;
    for chunk in 0..30 {
        let batch: Vec<StepRecord> = (0..100)
            .map(|i| StepRecord::new("u", "t", chunk * 100 + i, step(i)))
            .collect();
        store.save_batch_task_history(&batch).await.unwrap();
        // The live watcher keeps up, batch by batch, while the other reads nothing.
        for i in 0..100 {
            assert_eq!(next(&mut live).await.step, chunk * 100 + i);
        }
    }
    for expected in 0..total {
        assert_eq!(next(&mut stopped).await.step, expected, "lost or reordered");
    }
    let m = store.metrics();
    assert!(m.watcher_fallbacks >= 1, "{m:?}");
    assert!(m.watcher_reads >= 1, "{m:?}");
    // Both are back on the tail: a new write reaches them.
    store
        .save_task_history("u", "t", total, &step(0))
        .await
        .unwrap();
    assert_eq!(next(&mut stopped).await.step, total);
    assert_eq!(next(&mut live).await.step, total);
}

/// `max_watchers`: the store refuses a watch past it (the behaviour suite's case).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_past_the_limit_are_refused() {
    let store = store_for(fresh_config().await.max_watchers(3)).await;
    let dyn_store: DynStore = Arc::new(store.clone());
    taskhistory_core::conformance::watchers_past_the_limit_are_refused(&dyn_store, 3).await;
}

/// Closing the store ends every watch, attached or catching up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_store_ends_every_watch() {
    let store = store_for(fresh_config().await).await;
    store
        .save_task_history("u", "t", 0, &step(0))
        .await
        .unwrap();
    let mut fresh = store.watch_user("u", None).await.unwrap();
    let first = {
        let mut from_start = store.watch_user("u", None).await.unwrap();
        store
            .save_task_history("u", "t", 1, &step(1))
            .await
            .unwrap();
        assert_eq!(next(&mut fresh).await.step, 1);
        next(&mut from_start).await
    };
    let mut resumed = store
        .watch_task("u", "t", Some(first.cursor))
        .await
        .unwrap();
    store.close().await;
    for s in [&mut fresh, &mut resumed] {
        let end = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("the stream did not end");
        assert!(end.is_none(), "{end:?}");
    }
    assert_eq!(store.metrics().watchers, 0);
}

/// A cursor naming a position this server has not reached (forged, or kept from another
/// server) ends its stream with `InvalidInput` on `cursor` instead of waiting forever, and
/// the other watches go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_from_beyond_this_server_is_refused_not_waited_for() {
    let store = store_for(fresh_config().await).await;
    let mut fine = store.watch_user("u", None).await.unwrap();
    for token in [
        "pg~1:2:~1:99999999999:~-~-",
        "pg~99999999999:99999999999:~-~-~-",
        // Mid-page, past a row this server never wrote: not taken for a crash's.
        "pg~1:2:~1:99999999999:~99999999990~6",
    ] {
        let cursor = taskhistory_core::EventCursor::parse(token).unwrap();
        let mut forged = store.watch_user("u", Some(cursor)).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(10), forged.next())
            .await
            .expect("the forged cursor's stream neither ended nor failed");
        assert!(
            matches!(first, Some(Err(taskhistory_core::StoreError::InvalidInput { ref field, .. })) if field == "cursor"),
            "{token}: {first:?}"
        );
        assert!(forged.next().await.is_none());
    }
    store
        .save_task_history("u", "t", 0, &step(0))
        .await
        .unwrap();
    assert_eq!(next(&mut fine).await.step, 0);
}
