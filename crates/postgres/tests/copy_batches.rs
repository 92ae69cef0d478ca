//! Batches by `COPY` (`copy.rs`): the whole behaviour suite with every batch of new tasks
//! going by `COPY` (`copy_min_rows(1)`), and what only that path can get wrong: batches
//! mixing new and existing tasks fall back to the upsert statement, and a `COPY` batch
//! racing single saves of the same new tasks loses nothing and keeps summaries exact (the
//! race counted: single saves whose call ran while the batch's did, in both orders).
#![allow(clippy::unwrap_used, clippy::expect_used)]

taskhistory_core::conformance_tests!(taskhistory_testing::copy_dyn_store().await);

mod copy_path {
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use serde_json::json;
    use taskhistory_core::{StepRecord, StoreError, TaskHistoryStore, TaskQuery, TaskStepResult};
    use taskhistory_postgres::PgTaskHistoryStore;
    use taskhistory_testing::sql;
    use taskhistory_testing::{fresh_config, store_for, test_db_client};

    fn r(i: i32) -> TaskStepResult {
        TaskStepResult::running("s", json!({ "i": i }), "")
    }

    fn batch(user: &str, task: &str, steps: std::ops::Range<i32>) -> Vec<StepRecord> {
        steps
            .map(|i| StepRecord::new(user, task, i, r(i)))
            .collect()
    }

    /// A store whose batches of new tasks go by COPY, and a count of the COPYs it sent.
    async fn observed() -> (PgTaskHistoryStore, Arc<Mutex<usize>>, String) {
        let copies = Arc::new(Mutex::new(0));
        let sink = copies.clone();
        let config = fresh_config()
            .await
            .copy_min_rows(Some(1))
            .observe_statements(move |s| {
                if s == sql::COPY_STEPS {
                    *sink.lock().unwrap() += 1;
                }
            });
        let schema = config.get_schema().unwrap().to_owned();
        (store_for(config).await, copies, schema)
    }

    async fn summary(store: &PgTaskHistoryStore, user: &str, task: &str) -> (i64, i32) {
        let page = store
            .get_user_tasks_page(user, &TaskQuery::first(1000))
            .await
            .unwrap();
        let t = page.tasks.iter().find(|t| t.task_id == task).unwrap();
        (t.step_count, t.last_step)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn new_tasks_go_by_copy_and_mixed_batches_by_the_upsert() {
        let (store, copies, _) = observed().await;
        store
            .save_batch_task_history(&batch("u", "a", 0..3))
            .await
            .unwrap();
        assert_eq!(
            *copies.lock().unwrap(),
            1,
            "a batch of a new task goes by COPY"
        );

        // Task a exists: the whole batch takes the upsert statement, b included.
        let mut mixed = batch("u", "a", 2..6);
        mixed.extend(batch("u", "b", 0..2));
        store.save_batch_task_history(&mixed).await.unwrap();
        assert_eq!(*copies.lock().unwrap(), 1, "a mixed batch does not COPY");
        assert_eq!(store.load_task_history("u", "a").await.unwrap().len(), 6);
        assert_eq!(summary(&store, "u", "a").await, (6, 5));
        assert_eq!(summary(&store, "u", "b").await, (2, 1));

        // A cancelled task in the batch refuses all of it, its new tasks too.
        assert!(store.mark_task_as_cancelled("u", "a").await.unwrap());
        let mut refused = batch("u", "a", 10..11);
        refused.extend(batch("u", "c", 0..3));
        let err = store.save_batch_task_history(&refused).await.unwrap_err();
        assert!(matches!(err, StoreError::TaskCancelled { .. }), "{err:?}");
        assert!(store.load_task_history("u", "c").await.unwrap().is_empty());
        assert_eq!(*copies.lock().unwrap(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn steps_left_without_their_summary_are_upserted_not_duplicated() {
        let (store, copies, schema) = observed().await;
        store
            .save_batch_task_history(&batch("u", "orphan", 0..3))
            .await
            .unwrap();
        // The summary is gone (by hand): the claim succeeds, COPY meets the old rows, and
        // the batch is redone by the upsert statement.
        test_db_client()
            .await
            .batch_execute(&format!(
                "DELETE FROM {schema}.task_summary WHERE task_id = 'orphan'"
            ))
            .await
            .unwrap();
        let mut again = batch("u", "orphan", 0..5);
        again[1].result = TaskStepResult::running("s", json!({ "again": 1 }), "");
        store.save_batch_task_history(&again).await.unwrap();
        assert_eq!(
            *copies.lock().unwrap(),
            2,
            "the second batch tried COPY first"
        );
        let h = store.load_task_history("u", "orphan").await.unwrap();
        assert_eq!(
            h.iter().map(|e| e.step).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        assert_eq!(h[1].result.result, json!({ "again": 1 }));
    }

    /// A call's start and end.
    type Window = (Instant, Instant);

    /// How many of `saves` ran while `batch` did (their windows intersect).
    fn overlapping(batch: Window, saves: &[Window]) -> usize {
        saves
            .iter()
            .filter(|(start, end)| *start < batch.1 && *end > batch.0)
            .count()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn copy_batches_racing_single_saves_lose_nothing() {
        let (store, copies, _) = observed().await;
        let tasks = 8;
        // Single saves that ran while the batch did, per order (batch first, singles first);
        // rounds go on (at most MAX_ROUNDS) until each order has had MIN_OVERLAPS of them.
        const MIN_OVERLAPS: usize = 16;
        const MAX_ROUNDS: u64 = 40;
        let mut overlaps = [0usize; 2];
        let mut rounds = [0u64; 2];
        // Both orders, driven: in even rounds the batch's claim wins (its COPY is under way
        // when the single saves start, and they wait on its summary rows); in odd rounds
        // the single saves create the tasks first (the batch's claim gives way and it takes
        // the upsert path while the other single saves go on).
        let mut round = 0u64;
        while round < 8 || (overlaps.iter().any(|n| *n < MIN_OVERLAPS) && round < MAX_ROUNDS) {
            let batch_first = round % 2 == 0;
            let user = format!("u{round}");
            let mut records = Vec::new();
            for t in 0..tasks {
                records.extend(batch(&user, &format!("t{t}"), 0..40));
            }
            let copies_before = *copies.lock().unwrap();
            if !batch_first {
                for t in 0..tasks {
                    store
                        .save_task_history(&user, &format!("t{t}"), 40, &r(40))
                        .await
                        .unwrap();
                }
            }
            let writer = {
                let store = store.clone();
                tokio::spawn(async move {
                    let start = Instant::now();
                    let outcome = store.save_batch_task_history(&records).await;
                    (outcome, (start, Instant::now()))
                })
            };
            if batch_first {
                let mut polls = 0;
                while *copies.lock().unwrap() == copies_before {
                    polls += 1;
                    assert!(
                        polls < 5_000,
                        "round {round}: the batch never sent its COPY"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
            let mut singles = Vec::new();
            for t in 0..tasks {
                let (store, user) = (store.clone(), user.clone());
                let first = if batch_first { 40 } else { 41 };
                singles.push(tokio::spawn(async move {
                    let mut windows = Vec::new();
                    for step in first..45 {
                        let start = Instant::now();
                        store
                            .save_task_history(&user, &format!("t{t}"), step, &r(step))
                            .await?;
                        windows.push((start, Instant::now()));
                    }
                    Ok::<_, StoreError>(windows)
                }));
            }
            let (outcome, batch_window) = writer.await.unwrap();
            outcome.unwrap();
            let mut windows = Vec::new();
            for s in singles {
                windows.extend(s.await.unwrap().unwrap());
            }
            let order = usize::from(!batch_first);
            overlaps[order] += overlapping(batch_window, &windows);
            rounds[order] += 1;
            let by_copy = *copies.lock().unwrap() > copies_before;
            assert_eq!(
                by_copy, batch_first,
                "round {round}: the order driven did not happen"
            );
            for t in 0..tasks {
                let task = format!("t{t}");
                let h = store.load_task_history(&user, &task).await.unwrap();
                let expected: Vec<i32> = (0..45).collect();
                assert_eq!(h.iter().map(|e| e.step).collect::<Vec<_>>(), expected);
                assert_eq!(
                    summary(&store, &user, &task).await,
                    (45, 44),
                    "{user}/{task}"
                );
            }
            round += 1;
        }
        // The race happened: single saves ran while the batch did, in both orders.
        eprintln!(
            "single saves overlapping the batch: {} in {} rounds with the batch first, {} in {} \
             with the single saves first",
            overlaps[0], rounds[0], overlaps[1], rounds[1]
        );
        for (order, name) in ["batch first (COPY)", "single saves first (upsert)"]
            .iter()
            .enumerate()
        {
            assert!(
                overlaps[order] >= MIN_OVERLAPS,
                "{name}: only {} single saves ran while the batch did, in {} rounds \
                 (wanted {MIN_OVERLAPS})",
                overlaps[order],
                rounds[order]
            );
        }
    }
}
