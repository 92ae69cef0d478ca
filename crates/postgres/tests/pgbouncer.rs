//! The whole behaviour suite through PgBouncer (Debian's package) in transaction pooling
//! mode, with `PgConfig::pgbouncer` on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

taskhistory_core::conformance_tests!(taskhistory_testing::pgbouncer_dyn_store().await);

/// Without `LISTEN` (through PgBouncer with no direct listen URL) or without
/// notifications, watching still works: the watcher reads the log at its polls. The writes
/// come from other stores that send no wake-up, so only the poll can deliver them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_without_listen_or_notifications_reads_at_its_polls() {
    use futures::StreamExt;
    use std::time::Duration;
    use taskhistory_core::{TaskHistoryStore, TaskStepResult};
    use taskhistory_testing::{fresh_config, pgbouncer, store_for};
    let direct = fresh_config().await;
    let port = pgbouncer().await.port;
    let poll = Duration::from_millis(100);
    // Migrated on the direct connection first: behind the pooler the store only checks.
    let writer = store_for(direct.clone().notifications(false)).await;
    let pooled = store_for(
        direct
            .clone()
            .host("127.0.0.1")
            .port(port)
            .pgbouncer(true)
            .watch_poll(poll),
    )
    .await;
    let quiet = store_for(direct.notifications(false).watch_poll(poll)).await;
    for watcher in [&pooled, &quiet] {
        let mut events = watcher.watch_user("u", None).await.unwrap();
        for step in 0..3 {
            let r = TaskStepResult::running("s", serde_json::json!({}), "");
            writer.save_task_history("u", "t", step, &r).await.unwrap();
            let e = tokio::time::timeout(Duration::from_secs(10), events.next())
                .await
                .expect("no event within 10 s")
                .unwrap()
                .unwrap();
            assert_eq!((e.task_id.as_str(), e.step), ("t", step));
        }
        writer.mark_task_as_cancelled("u", "t").await.unwrap();
        let e = events.next().await.unwrap().unwrap();
        assert_eq!(e.kind, taskhistory_core::TaskEventKind::Cancelled);
        writer.cleanup_old_tasks(0).await.unwrap();
    }
}

/// `COPY` batches through the pooler: the claim (an unnamed statement), `COPY` and the
/// transaction's `SET LOCAL`s stay on one server connection; many batches from several
/// tasks at once, each read back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_batches_through_pgbouncer() {
    use std::sync::{Arc, Mutex};
    use taskhistory_core::{StepRecord, TaskHistoryStore, TaskStepResult};
    use taskhistory_testing::{pgbouncer_config, store_for};
    let copies = Arc::new(Mutex::new(0));
    let sink = copies.clone();
    let config = pgbouncer_config()
        .await
        .copy_min_rows(Some(100))
        .observe_statements(move |s| {
            if s == taskhistory_testing::sql::COPY_STEPS {
                *sink.lock().unwrap() += 1;
            }
        });
    let store = store_for(config).await;
    let mut writers = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for b in 0..3 {
                let records: Vec<StepRecord> = (0..300)
                    .map(|i| {
                        let r = TaskStepResult::running("s", serde_json::json!({ "i": i }), "");
                        StepRecord::new(format!("u{w}"), format!("t{b}-{}", i / 50), i % 50, r)
                    })
                    .collect();
                store.save_batch_task_history(&records).await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(*copies.lock().unwrap(), 12);
    for w in 0..4 {
        for b in 0..3 {
            for t in 0..6 {
                let h = store
                    .load_task_history(&format!("u{w}"), &format!("t{b}-{t}"))
                    .await
                    .unwrap();
                assert_eq!(h.len(), 50);
                assert_eq!(h[7].result.result, serde_json::json!({ "i": t * 50 + 7 }));
            }
        }
    }
}
