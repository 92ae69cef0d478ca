//! The log of events on PostgreSQL: the per-task order guard, and exact delivery to a
//! watcher that is dropped and resumed from its last cursor over and over while writers run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use taskhistory_core::{EventCursor, TaskEvent, TaskEventStream, TaskHistoryStore, TaskStepResult};
use taskhistory_testing::sql;
use taskhistory_testing::{fresh_config, store_for, test_db_client};

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

/// The store's single-step statement, sent by a raw client: step 2 of task `t`.
async fn save_step_2(
    client: &tokio_postgres::Client,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let result = serde_json::to_value(step(2)).unwrap();
    let now: Option<chrono::DateTime<chrono::Utc>> = None;
    client
        .query(
            sql::SAVE_STEP,
            &[&"u", &"t", &2i32, &result, &now, &"running"],
        )
        .await
}

/// A transaction given its id before the task's last writer, and committing after it,
/// would put the task's events out of commit order: the save statement refuses it with a
/// serialization failure (which the store retries with a new transaction) and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_numbered_before_the_tasks_last_writer_is_refused_and_writes_nothing() {
    let config = fresh_config().await;
    let schema = config.get_schema().unwrap().to_owned();
    let store = store_for(config).await;
    store
        .save_task_history("u", "t", 0, &step(0))
        .await
        .unwrap();
    let early = test_db_client().await;
    early
        .batch_execute(&format!("SET search_path TO \"{schema}\"; BEGIN"))
        .await
        .unwrap();
    // Numbered now, before the store's next write.
    early
        .query_one("SELECT pg_current_xact_id()", &[])
        .await
        .unwrap();
    store
        .save_task_history("u", "t", 1, &step(1))
        .await
        .unwrap();
    let result = save_step_2(&early).await;
    let err = result.expect_err("the out-of-order write was accepted");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE),
        "{err}"
    );
    early.batch_execute("ROLLBACK").await.unwrap();
    let steps: Vec<i32> = store
        .load_task_history("u", "t")
        .await
        .unwrap()
        .iter()
        .map(|e| e.step)
        .collect();
    assert_eq!(steps, [0, 1]);
    // A new transaction, numbered after the last writer, goes through.
    early
        .batch_execute(&format!("SET search_path TO \"{schema}\""))
        .await
        .unwrap();
    save_step_2(&early).await.unwrap();
    assert_eq!(store.load_task_history("u", "t").await.unwrap().len(), 3);
}

/// A watcher dropped and resumed from its last event's cursor 1,000 times while 8 writers
/// save (to tasks of their own and to one task they share) receives every acknowledged
/// write exactly once, each writer's steps of a task in the order it saved them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_a_thousand_times_under_eight_writers_every_write_arrives_once() {
    let store = store_for(fresh_config().await).await;
    // Started before the writers: every write they make comes after it.
    let mut events = store.watch_user("u", None).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8 {
        let (store, stop) = (store.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let task = if i % 2 == 0 {
                    format!("own-{w}")
                } else {
                    "shared".to_owned()
                };
                let number = i * 8 + w;
                store
                    .save_task_history("u", &task, number, &step(i))
                    .await
                    .unwrap();
                acked.push((task, number));
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            acked
        }));
    }
    let mut got: Vec<(String, i32)> = Vec::new();
    let mut cursor: Option<EventCursor> = None;
    for resume in 0..1000 {
        // One to three events, then the watch is dropped and resumed from the last cursor.
        for _ in 0..(1 + resume % 3) {
            let e = next(&mut events).await;
            got.push((e.task_id, e.step));
            cursor = Some(e.cursor);
        }
        drop(events);
        events = store.watch_user("u", cursor.clone()).await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let mut acked = BTreeSet::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    while got.len() < acked.len() {
        let e = match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
            Ok(e) => e.unwrap().unwrap(),
            Err(_) => {
                let received: BTreeSet<(String, i32)> = got.iter().cloned().collect();
                let missing: Vec<_> = acked.difference(&received).collect();
                panic!(
                    "after the resumes, {} of {} arrived; missing {missing:?}",
                    got.len(),
                    acked.len()
                );
            }
        };
        got.push((e.task_id, e.step));
    }
    let received: BTreeSet<(String, i32)> = got.iter().cloned().collect();
    assert_eq!(received.len(), got.len(), "a write arrived twice");
    assert_eq!(received, acked, "received and acknowledged writes differ");
    // Per task and writer, in the order saved.
    let mut by: BTreeMap<(String, i32), Vec<i32>> = BTreeMap::new();
    for (task, number) in &got {
        by.entry((task.clone(), number % 8))
            .or_default()
            .push(*number);
    }
    for (key, numbers) in by {
        assert!(
            numbers.windows(2).all(|w| w[0] < w[1]),
            "{key:?}: {numbers:?}"
        );
    }
    // Nothing more is pending: a write now is the next event.
    store
        .save_task_history("u", "last", 0, &step(0))
        .await
        .unwrap();
    assert_eq!(next(&mut events).await.task_id, "last");
}
