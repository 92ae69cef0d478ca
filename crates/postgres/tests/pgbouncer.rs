//! The whole behaviour suite through PgBouncer (Debian's package) in transaction pooling
//! mode, with `PgConfig::pgbouncer` on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

taskhistory_core::conformance_tests!(taskhistory_testing::pgbouncer_dyn_store().await);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_through_pgbouncer_needs_a_direct_listen_url() {
    use taskhistory_core::{StoreError, TaskHistoryStore};
    use taskhistory_testing::{fresh_config, pgbouncer, store_for};
    let direct = fresh_config().await;
    store_for(direct.clone()).await.close().await;
    let port = pgbouncer().await.port;
    let store = store_for(direct.host("127.0.0.1").port(port).pgbouncer(true)).await;
    match store.watch_user("u").await {
        Err(StoreError::InvalidInput { field, .. }) => assert_eq!(field, "DB_LISTEN_URL"),
        Err(e) => panic!("expected InvalidInput(DB_LISTEN_URL), got {e}"),
        Ok(_) => panic!("a watch through PgBouncer without a listen URL was accepted"),
    }
    let quiet = store_for(fresh_config().await.notifications(false)).await;
    assert!(matches!(
        quiet.watch_user("u").await,
        Err(StoreError::InvalidInput { .. })
    ));
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
            if s == taskhistory_postgres::__private::sql::COPY_STEPS {
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
