//! The whole behaviour suite with `COPY` off (`copy_min_rows(None)`): every batch, whatever
//! its size, goes by the upsert statement, in chunks of 10,000 rows inside one transaction
//! past that. With the default configuration the large batches of the suite go by `COPY`, so
//! this is the run where the chunked upsert path meets them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

taskhistory_core::conformance_tests!(taskhistory_testing::upsert_dyn_store().await);

mod chunks {
    use std::sync::{Arc, Mutex};

    use serde_json::json;
    use taskhistory_core::{StepRecord, StoreError, TaskHistoryStore, TaskStepResult};
    use taskhistory_testing::sql;
    use taskhistory_testing::{fresh_config, store_for};

    /// The chunked path really runs: a 24,000-step batch of existing tasks whose last task is
    /// cancelled sends three upsert statements (two chunks written, the third refused) and
    /// rolls back, so nothing of the first two chunks stays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_task_in_the_last_chunk_rolls_back_the_earlier_chunks() {
        let sent: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = sent.clone();
        let config = fresh_config()
            .await
            .copy_min_rows(Some(1))
            .observe_statements(move |s| sink.lock().unwrap().push(s.to_owned()));
        let store = store_for(config).await;
        let run = |s: i32| TaskStepResult::running("s", json!({ "i": s }), "");
        let seed: Vec<StepRecord> = (0..24)
            .map(|t| StepRecord::new("u", format!("t{t:02}"), 0, run(0)))
            .collect();
        store.save_batch_task_history(&seed).await.unwrap();
        assert!(store.mark_task_as_cancelled("u", "t23").await.unwrap());
        sent.lock().unwrap().clear();
        let batch: Vec<StepRecord> = (0..24)
            .flat_map(|t| {
                (0..1_000).map(move |s| StepRecord::new("u", format!("t{t:02}"), s, run(s)))
            })
            .collect();
        let err = store.save_batch_task_history(&batch).await.unwrap_err();
        assert!(matches!(err, StoreError::TaskCancelled { .. }), "{err:?}");
        let sent = sent.lock().unwrap().clone();
        // The upsert's own transaction: the last BEGIN, then the three chunks, then ROLLBACK
        // (the COPY attempt's transaction, rolled back when its claim gave way, came before).
        let begin = sent.iter().rposition(|s| s.starts_with("BEGIN")).unwrap();
        let after = &sent[begin + 1..];
        let upserts = after
            .iter()
            .filter(|s| *s == sql::SAVE_STEPS.trim())
            .count();
        assert_eq!(upserts, 3, "three chunks of at most 10,000 rows: {after:?}");
        assert_eq!(after.len(), 4, "three chunks then the end: {after:?}");
        assert_eq!(
            sent.last().map(String::as_str),
            Some("ROLLBACK"),
            "{sent:?}"
        );
        // Not by COPY: every task existed (the claim found one and gave way).
        assert!(!sent.iter().any(|s| s == sql::COPY_STEPS), "{sent:?}");
        for t in ["t00", "t11", "t22"] {
            assert_eq!(
                store.load_task_history("u", t).await.unwrap().len(),
                1,
                "{t}"
            );
        }
    }
}
