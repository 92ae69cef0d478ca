//! Counts kept by the writes on PostgreSQL (rule 10, migration 6): what the tables hold
//! after concurrent writers of one user, and after cleanup took a user's last tasks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use taskhistory_core::{StepRecord, TaskCounts, TaskHistoryStore, TaskStatus, TaskStepResult};
use taskhistory_testing::{fresh_config, store_for, test_db_client};

fn step(i: i32) -> TaskStepResult {
    TaskStepResult::running("s", json!({ "i": i }), "")
}

/// 16 writers creating and finishing tasks of one user at once (single saves, combined by
/// the store, and batches): the counts equal the tasks counted by status, and the kept
/// rows stay few (slots, not a row per write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_of_one_user_keep_exact_counts() {
    let store = store_for(fresh_config().await).await;
    let mut writers = Vec::new();
    for w in 0..16 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for t in 0..20 {
                let task = format!("w{w}-t{t}");
                if w % 4 == 0 {
                    let batch = [
                        StepRecord::new("u", &task, 0, step(0)),
                        StepRecord::new("u", format!("{task}-b"), 0, step(0)),
                    ];
                    store.save_batch_task_history(&batch).await.unwrap();
                } else {
                    store
                        .save_task_history("u", &task, 0, &step(0))
                        .await
                        .unwrap();
                }
                if t % 2 == 0 {
                    let done = TaskStepResult::success("s", json!(1), "done");
                    store.save_task_history("u", &task, 1, &done).await.unwrap();
                }
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let counted: TaskCounts = store
        .get_user_tasks("u", 1000)
        .await
        .unwrap()
        .iter()
        .map(|t| t.status)
        .collect();
    assert_eq!(counted.total(), 16 * 20 + 4 * 20);
    assert_eq!(store.task_counts("u").await.unwrap(), counted);
    assert_eq!(store.task_totals().await.unwrap(), counted);
    let schema = store.config().get_schema().unwrap().to_owned();
    let client = test_db_client().await;
    let rows: i64 = client
        .query_one(&format!("SELECT count(*) FROM {schema}.task_counts"), &[])
        .await
        .unwrap()
        .get(0);
    assert!(rows <= 2 * 32, "{rows} rows of counts for 2 statuses");
}

/// Cleanup that removes a user's last tasks leaves no counts of theirs behind (of the
/// statuses their tasks passed through too), and trims the activity of the hours before
/// its cutoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_cleaned_away_leaves_no_rows() {
    let store = store_for(fresh_config().await).await;
    let old = chrono::Utc::now() - chrono::Duration::days(40);
    let batch: Vec<StepRecord> = (0..50)
        .map(|t| StepRecord::new("gone", format!("t{t}"), 0, step(t)).at(old))
        .collect();
    store.save_batch_task_history(&batch).await.unwrap();
    store
        .save_task_history("kept", "t", 0, &step(0))
        .await
        .unwrap();
    // A user whose old tasks are all of one status and whose recent one is of another:
    // the emptied status leaves no rows, the other keeps its count.
    let mut failed = step(0);
    failed.status = TaskStatus::Failed;
    let mixed: Vec<StepRecord> = (0..20)
        .map(|t| StepRecord::new("mixed", format!("old{t}"), 0, failed.clone()).at(old))
        .collect();
    store.save_batch_task_history(&mixed).await.unwrap();
    store
        .save_task_history("mixed", "new", 0, &step(0))
        .await
        .unwrap();
    // Tasks that moved from running to completed before they expired: their user's
    // `running` rows sum to zero though no removed task is running.
    let moved: Vec<StepRecord> = (0..10)
        .map(|t| StepRecord::new("moved", format!("t{t}"), 0, step(t)).at(old))
        .collect();
    store.save_batch_task_history(&moved).await.unwrap();
    let completed: Vec<StepRecord> = (0..10)
        .map(|t| {
            let mut done = step(t);
            done.status = TaskStatus::Completed;
            StepRecord::new("moved", format!("t{t}"), 1, done).at(old)
        })
        .collect();
    store.save_batch_task_history(&completed).await.unwrap();
    let counts = store.task_counts("moved").await.unwrap();
    assert_eq!((counts.running, counts.completed), (0, 10), "{counts:?}");
    assert_eq!(store.task_counts("gone").await.unwrap().running, 50);
    assert_eq!(store.task_counts("mixed").await.unwrap().failed, 20);
    assert_eq!(store.cleanup_old_tasks(30).await.unwrap().tasks_removed, 80);
    assert_eq!(
        store.task_counts("gone").await.unwrap(),
        TaskCounts::default()
    );
    let schema = store.config().get_schema().unwrap().to_owned();
    let client = test_db_client().await;
    for (table, user) in [
        ("task_counts", "gone"),
        ("task_activity", "gone"),
        ("task_counts", "moved"),
    ] {
        let n: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM {schema}.{table} WHERE user_id = $1"),
                &[&user],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{table} still holds rows of {user}");
    }
    assert_eq!(store.task_counts("kept").await.unwrap().running, 1);
    let mixed = store.task_counts("mixed").await.unwrap();
    assert_eq!((mixed.failed, mixed.running), (0, 1), "{mixed:?}");
    let failed_rows: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {schema}.task_counts \
                 WHERE user_id = 'mixed' AND status = 'failed'"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(failed_rows, 0, "the emptied status left rows");
}

/// A session of the test database on `schema` that sends the plan of every statement it
/// runs, nested ones too (`auto_explain`), as a notice; and the notices received.
async fn explaining_client(
    schema: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let url = taskhistory_testing::database_url().await;
    let (client, mut conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (sink, notices) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notice(n) = message {
                let _ = sink.send(n.message().to_owned());
            }
        }
    });
    client
        .batch_execute(&format!(
            "SET search_path TO \"{schema}\"; LOAD 'auto_explain'; \
             SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on; \
             SET auto_explain.log_level = notice"
        ))
        .await
        .unwrap_or_else(|e| panic!("auto_explain needs a superuser on the test server: {e}"));
    (client, notices)
}

/// Counting an update of many summaries never compares its rows pairwise, whatever plans
/// the session kept. PL/pgSQL keeps each statement's plan for the session, made for the
/// first update it counted: a single save's one row on a pooled connection. Version 6's
/// trigger joined the old rows to the new ones, and that plan was a nested loop, so a later
/// batch over 16,000 known tasks took 63 s instead of 1 s; migration 11's statements have
/// no join at all. Then the counts are right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counting_a_large_update_after_a_small_one_joins_nothing() {
    let config = fresh_config().await;
    let store = store_for(config.clone()).await;
    let batch: Vec<StepRecord> = (0..2_000)
        .map(|i| StepRecord::new("u", format!("t{i}"), 0, step(0)))
        .collect();
    store.save_batch_task_history(&batch).await.unwrap();
    let (client, mut notices) = explaining_client(config.get_schema().unwrap()).await;
    // One summary first: the trigger's plans are made for one row, and kept.
    client
        .batch_execute(
            "UPDATE task_summary SET step_count = step_count + 1 \
             WHERE user_id = 'u' AND task_id = 't0'",
        )
        .await
        .unwrap();
    // Then all of them, half of them finished.
    client
        .batch_execute(
            "UPDATE task_summary SET step_count = step_count + 1, \
             status = CASE WHEN right(task_id, 1) IN ('0', '2', '4', '6', '8') \
                           THEN 'completed' ELSE status END \
             WHERE user_id = 'u'",
        )
        .await
        .unwrap();
    drop(client);
    let mut counted = 0;
    while let Some(plan) = notices.recv().await {
        if plan.contains("new_summaries") || plan.contains("old_summaries") {
            counted += 1;
            for join in ["Join", "Nested Loop"] {
                assert!(!plan.contains(join), "a counting statement joins:\n{plan}");
            }
        }
    }
    // Both updates' plans were seen: the change check, counts, totals and activity.
    assert!(counted >= 6, "{counted} plans of counting statements");
    let counts = store.task_counts("u").await.unwrap();
    assert_eq!(counts.get(TaskStatus::Completed), 1_000, "{counts:?}");
    assert_eq!(counts.get(TaskStatus::Running), 1_000, "{counts:?}");
    assert_eq!(counts.total(), 2_000, "{counts:?}");
}
