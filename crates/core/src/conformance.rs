//! The behaviour suite: every rule of the [`TaskHistoryStore`](crate::TaskHistoryStore) contract as a plain async
//! function taking a fresh store. Each backend runs all of it, through
//! [`conformance_tests!`](crate::conformance_tests), which expands into one named
//! `#[tokio::test]` per case (the runner crate needs `tokio` and `rstest` as dev-dependencies).
//!
//! A case panics (fails) when the store breaks the contract. Cases assume the store they get
//! is empty and used by no one else.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{DateTime, Duration, SubsecRound, TimeZone, Utc};
use serde_json::json;

use crate::validate::{self, MAX_ID_BYTES, MAX_JSON_DEPTH, MAX_PAGE_SIZE, MAX_SCAN_SIZE};
use crate::{
    DynStore, ErrorCode, EventCursor, HistoryEntry, HistoryScan, StepKey, StepRecord, StoreError,
    TaskCursor, TaskEvent, TaskEventKind, TaskEventStream, TaskQuery, TaskStatus, TaskStepResult,
    TaskSummary,
};
use futures::StreamExt;

/// Expands the whole suite into `#[tokio::test]`s, one per case, each on a fresh store made
/// by `$make` (an expression of type [`DynStore`]; it may `.await`).
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@cases $make;
            save_and_load_round_trip,
            resave_replaces_without_duplicate,
            status_is_that_of_the_highest_step,
            unknown_task_is_pending_and_empty,
            cancellation_is_sticky,
            cancel_of_unknown_task_changes_nothing,
            cancel_after_the_last_possible_step_changes_nothing,
            batch_that_cancels_then_writes_is_refused,
            history_is_in_step_order,
            user_tasks_newest_first_with_summaries,
            user_task_ties_are_broken_by_task_id,
            cursor_pages_cover_every_task_once,
            status_filter_pages,
            list_filters_match_a_plain_filter,
            list_prefix_is_byte_wise,
            batch_spans_tasks_and_last_duplicate_wins,
            batch_is_all_or_nothing,
            empty_batch_is_a_no_op,
            large_batch_is_one_write,
            large_batch_on_existing_tasks_with_a_late_cancelled_task_changes_nothing,
            cleanup_removes_whole_old_tasks,
            users_are_isolated,
            scan_pages_visit_every_step_once,
            scan_of_one_task,
            watch_task_sees_its_steps_in_order,
            watch_user_sees_only_that_user,
            watch_resumes_from_every_event_cursor,
            watch_resumed_at_random_cursors_under_writers_gets_each_write_once,
            step_saved_again_is_delivered_again,
            slow_watcher_does_not_hold_writers_back,
            concurrent_saves_lose_nothing,
            cancel_racing_saves_stays_sticky,
            timestamps_keep_microseconds,
            json_round_trips_as_jsonb_keeps_it,
            awkward_strings_round_trip,
            counts_follow_every_write,
            activity_counts_what_each_write_did,
            health_then_close
        );

        #[::rstest::rstest]
        #[case::completed($crate::TaskStatus::Completed)]
        #[case::failed($crate::TaskStatus::Failed)]
        #[case::timed_out($crate::TaskStatus::TimedOut)]
        #[case::cancelled($crate::TaskStatus::Cancelled)]
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn cancel_of_terminal_task_changes_nothing(#[case] status: $crate::TaskStatus) {
            let store: $crate::DynStore = $make;
            $crate::conformance::cancel_of_terminal_task_changes_nothing(&store, status).await;
        }

        #[::rstest::rstest]
        #[case::save_empty_user($crate::conformance::BadCall::SaveEmptyUser)]
        #[case::save_empty_task($crate::conformance::BadCall::SaveEmptyTask)]
        #[case::save_long_user($crate::conformance::BadCall::SaveLongUser)]
        #[case::save_long_task($crate::conformance::BadCall::SaveLongTask)]
        #[case::save_nul_user($crate::conformance::BadCall::SaveNulUser)]
        #[case::save_nul_task($crate::conformance::BadCall::SaveNulTask)]
        #[case::save_negative_step($crate::conformance::BadCall::SaveNegativeStep)]
        #[case::save_nul_step_name($crate::conformance::BadCall::SaveNulStepName)]
        #[case::save_nul_message($crate::conformance::BadCall::SaveNulMessage)]
        #[case::save_nul_error_message($crate::conformance::BadCall::SaveNulErrorMessage)]
        #[case::save_nul_json_string($crate::conformance::BadCall::SaveNulJsonString)]
        #[case::save_nul_json_key($crate::conformance::BadCall::SaveNulJsonKey)]
        #[case::save_too_deep_json($crate::conformance::BadCall::SaveTooDeepJson)]
        #[case::save_too_large_result($crate::conformance::BadCall::SaveTooLargeResult)]
        #[case::batch_one_bad_record($crate::conformance::BadCall::BatchOneBadRecord)]
        #[case::batch_bad_timestamp($crate::conformance::BadCall::BatchBadTimestamp)]
        #[case::load_empty_user($crate::conformance::BadCall::LoadEmptyUser)]
        #[case::status_nul_task($crate::conformance::BadCall::StatusNulTask)]
        #[case::cancel_empty_task($crate::conformance::BadCall::CancelEmptyTask)]
        #[case::list_zero_limit($crate::conformance::BadCall::ListZeroLimit)]
        #[case::list_negative_limit($crate::conformance::BadCall::ListNegativeLimit)]
        #[case::list_too_large_limit($crate::conformance::BadCall::ListTooLargeLimit)]
        #[case::list_bad_cursor($crate::conformance::BadCall::ListBadCursor)]
        #[case::list_empty_prefix($crate::conformance::BadCall::ListEmptyPrefix)]
        #[case::list_long_prefix($crate::conformance::BadCall::ListLongPrefix)]
        #[case::list_nul_prefix($crate::conformance::BadCall::ListNulPrefix)]
        #[case::list_inverted_range($crate::conformance::BadCall::ListInvertedRange)]
        #[case::list_range_out_of_bounds($crate::conformance::BadCall::ListRangeOutOfBounds)]
        #[case::scan_empty_user($crate::conformance::BadCall::ScanEmptyUser)]
        #[case::scan_zero_limit($crate::conformance::BadCall::ScanZeroLimit)]
        #[case::scan_too_large_limit($crate::conformance::BadCall::ScanTooLargeLimit)]
        #[case::scan_empty_task($crate::conformance::BadCall::ScanEmptyTask)]
        #[case::scan_negative_after_step($crate::conformance::BadCall::ScanNegativeAfterStep)]
        #[case::watch_empty_user($crate::conformance::BadCall::WatchEmptyUser)]
        #[case::watch_nul_task($crate::conformance::BadCall::WatchNulTask)]
        #[case::watch_foreign_cursor($crate::conformance::BadCall::WatchForeignCursor)]
        #[case::cleanup_negative_days($crate::conformance::BadCall::CleanupNegativeDays)]
        #[case::cleanup_too_many_days($crate::conformance::BadCall::CleanupTooManyDays)]
        #[case::counts_empty_user($crate::conformance::BadCall::CountsEmptyUser)]
        #[case::activity_nul_user($crate::conformance::BadCall::ActivityNulUser)]
        #[case::activity_backwards($crate::conformance::BadCall::ActivityBackwards)]
        #[case::activity_too_long($crate::conformance::BadCall::ActivityTooLong)]
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn invalid_input_changes_nothing(#[case] call: $crate::conformance::BadCall) {
            let store: $crate::DynStore = $make;
            $crate::conformance::invalid_input_changes_nothing(&store, call).await;
        }
    };
    (@cases $make:expr; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let store: $crate::DynStore = $make;
                $crate::conformance::$case(&store).await;
            }
        )+
    };
}

fn running(name: &str) -> TaskStepResult {
    TaskStepResult::running(name, json!({ "name": name }), format!("{name} running"))
}

fn done(name: &str) -> TaskStepResult {
    TaskStepResult::success(
        name,
        json!({ "name": name, "rows": 1000 }),
        format!("{name} done"),
    )
}

fn days_ago(days: i64) -> DateTime<Utc> {
    validate::now() - Duration::days(days)
}

async fn save(store: &DynStore, user: &str, task: &str, step: i32, r: &TaskStepResult) {
    store
        .save_task_history(user, task, step, r)
        .await
        .unwrap_or_else(|e| panic!("save {user}/{task}/{step} failed: {e}"));
}

async fn history(store: &DynStore, user: &str, task: &str) -> Vec<HistoryEntry> {
    store
        .load_task_history(user, task)
        .await
        .unwrap_or_else(|e| panic!("load {user}/{task}: {e}"))
}

async fn status(store: &DynStore, user: &str, task: &str) -> TaskStatus {
    store
        .check_task_status(user, task)
        .await
        .unwrap_or_else(|e| panic!("status {user}/{task}: {e}"))
}

async fn tasks(store: &DynStore, user: &str) -> Vec<TaskSummary> {
    store
        .get_user_tasks(user, MAX_PAGE_SIZE)
        .await
        .unwrap_or_else(|e| panic!("tasks of {user}: {e}"))
}

fn steps(h: &[HistoryEntry]) -> Vec<i32> {
    h.iter().map(|e| e.step).collect()
}

/// Rule 1 and 7: what is saved is what is loaded, field for field.
pub async fn save_and_load_round_trip(store: &DynStore) {
    let before = validate::now();
    let ok = done("data_processing");
    let failed = TaskStepResult::failure("step_1", ErrorCode::Execution, "division by zero");
    save(store, "user_123", "task_456", 0, &ok).await;
    save(store, "user_123", "task_456", 1, &failed).await;
    let after = validate::now();

    let h = history(store, "user_123", "task_456").await;
    assert_eq!(steps(&h), [0, 1]);
    assert_eq!(h[0].result, ok);
    assert_eq!(h[0].status, TaskStatus::Completed);
    assert_eq!(h[1].result, failed);
    assert_eq!(h[1].status, TaskStatus::Failed);
    assert_eq!(h[1].result.error_code, Some(ErrorCode::Execution));
    for e in &h {
        assert_eq!(
            e.timestamp.timestamp_subsec_nanos() % 1000,
            0,
            "microsecond precision"
        );
        // The server's clock may differ a little from ours.
        let slack = Duration::minutes(5);
        assert!(
            e.timestamp >= before - slack && e.timestamp <= after + slack,
            "timestamp {}",
            e.timestamp
        );
    }
    assert!(h[0].timestamp <= h[1].timestamp);
}

/// Rule 1: saving a step again replaces it.
pub async fn resave_replaces_without_duplicate(store: &DynStore) {
    save(store, "u", "t", 0, &running("a")).await;
    save(store, "u", "t", 1, &running("b")).await;
    let replaced = done("b-again");
    for _ in 0..3 {
        save(store, "u", "t", 1, &replaced).await;
    }
    let h = history(store, "u", "t").await;
    assert_eq!(steps(&h), [0, 1], "no duplicate step");
    assert_eq!(h[1].result, replaced);
    let t = tasks(store, "u").await;
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].step_count, 2);
    assert_eq!(t[0].last_step, 1);
    assert_eq!(t[0].status, TaskStatus::Completed);
}

/// Rule 2: the status is that of the highest step, whatever order steps arrive in.
pub async fn status_is_that_of_the_highest_step(store: &DynStore) {
    save(store, "u", "t", 0, &running("a")).await;
    assert_eq!(status(store, "u", "t").await, TaskStatus::Running);
    save(store, "u", "t", 2, &done("c")).await;
    assert_eq!(status(store, "u", "t").await, TaskStatus::Completed);
    // A lower step arriving late does not change the status.
    save(
        store,
        "u",
        "t",
        1,
        &running("b").with_status(TaskStatus::Failed),
    )
    .await;
    assert_eq!(status(store, "u", "t").await, TaskStatus::Completed);
    // Replacing the highest step does.
    save(
        store,
        "u",
        "t",
        2,
        &done("c").with_status(TaskStatus::TimedOut),
    )
    .await;
    assert_eq!(status(store, "u", "t").await, TaskStatus::TimedOut);
    let t = tasks(store, "u").await;
    assert_eq!(
        (t[0].status, t[0].last_step, t[0].step_count),
        (TaskStatus::TimedOut, 2, 3)
    );
}

/// Rule 2: an unknown task is pending and has no history.
pub async fn unknown_task_is_pending_and_empty(store: &DynStore) {
    assert_eq!(
        status(store, "nobody", "nothing").await,
        TaskStatus::Pending
    );
    assert!(history(store, "nobody", "nothing").await.is_empty());
    assert!(tasks(store, "nobody").await.is_empty());
}

/// Rule 3: cancellation appends an entry, refuses every later write, and is not undone.
pub async fn cancellation_is_sticky(store: &DynStore) {
    save(store, "u", "t", 0, &done("a")).await;
    save(store, "u", "t", 1, &running("b")).await;
    let before = history(store, "u", "t").await;

    assert!(store.mark_task_as_cancelled("u", "t").await.unwrap());
    assert_eq!(status(store, "u", "t").await, TaskStatus::Cancelled);
    let h = history(store, "u", "t").await;
    assert_eq!(steps(&h), [0, 1, 2]);
    assert_eq!(&h[..2], &before[..], "earlier steps are not rewritten");
    assert_eq!(h[2].result, TaskStepResult::cancellation());
    assert_eq!(h[2].status, TaskStatus::Cancelled);

    // The next step, a retry of an old step, and a batch touching the task are all refused.
    for step in [3, 1, 2] {
        let err = store
            .save_task_history("u", "t", step, &done("late"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::TaskCancelled { user_id, task_id } if user_id == "u" && task_id == "t"),
            "step {step}: {err:?}"
        );
    }
    let batch = [
        StepRecord::new("u", "other", 0, done("x")),
        StepRecord::new("u", "t", 5, done("y")),
    ];
    let err = store.save_batch_task_history(&batch).await.unwrap_err();
    assert!(err.is_cancelled(), "{err:?}");
    assert!(
        history(store, "u", "other").await.is_empty(),
        "the batch wrote nothing"
    );
    assert_eq!(history(store, "u", "t").await, h);
    assert_eq!(status(store, "u", "t").await, TaskStatus::Cancelled);

    // Cancelling again has nothing to do.
    assert!(!store.mark_task_as_cancelled("u", "t").await.unwrap());
    assert_eq!(history(store, "u", "t").await, h);
    let t = tasks(store, "u").await;
    assert_eq!((t.len(), t[0].step_count, t[0].last_step), (1, 3, 2));
}

/// Rule 3: a task whose highest step is `i32::MAX` has no step left for the cancellation
/// entry: `false`, and nothing changes (the same on every store).
pub async fn cancel_after_the_last_possible_step_changes_nothing(store: &DynStore) {
    save(store, "u", "t", i32::MAX, &running("last")).await;
    let before = (history(store, "u", "t").await, tasks(store, "u").await);
    assert!(!store.mark_task_as_cancelled("u", "t").await.unwrap());
    assert_eq!(
        (history(store, "u", "t").await, tasks(store, "u").await),
        before
    );
    assert_eq!(
        store.check_task_status("u", "t").await.unwrap(),
        TaskStatus::Running
    );
}

/// Rules 3 and 5: a batch that cancels a task and then writes a higher step of it is
/// refused whole, as that write would be after the batch; a batch whose cancelled step is
/// the task's highest is applied, and the task then refuses later saves.
pub async fn batch_that_cancels_then_writes_is_refused(store: &DynStore) {
    let refused = [
        StepRecord::new("u", "other", 0, running("fine")),
        StepRecord::new("u", "t", 0, running("a")),
        StepRecord::new("u", "t", 1, TaskStepResult::cancellation()),
        StepRecord::new("u", "t", 2, running("after the cancellation")),
    ];
    match store.save_batch_task_history(&refused).await {
        Err(StoreError::TaskCancelled { user_id, task_id }) => {
            assert_eq!((user_id.as_str(), task_id.as_str()), ("u", "t"));
        }
        other => panic!("expected TaskCancelled, got {other:?}"),
    }
    assert!(history(store, "u", "t").await.is_empty());
    assert!(history(store, "u", "other").await.is_empty());
    let applied = [
        StepRecord::new("u", "t", 0, running("a")),
        StepRecord::new("u", "t", 1, TaskStepResult::cancellation()),
    ];
    store.save_batch_task_history(&applied).await.unwrap();
    assert_eq!(
        store.check_task_status("u", "t").await.unwrap(),
        TaskStatus::Cancelled
    );
    assert!(matches!(
        store
            .save_task_history("u", "t", 2, &running("later"))
            .await,
        Err(StoreError::TaskCancelled { .. })
    ));
}

/// Rule 3: cancelling an unknown task returns false and creates nothing.
pub async fn cancel_of_unknown_task_changes_nothing(store: &DynStore) {
    assert!(!store.mark_task_as_cancelled("u", "ghost").await.unwrap());
    assert!(history(store, "u", "ghost").await.is_empty());
    assert_eq!(status(store, "u", "ghost").await, TaskStatus::Pending);
    assert!(tasks(store, "u").await.is_empty());
    // The task can still be started afterwards.
    save(store, "u", "ghost", 0, &running("a")).await;
    assert_eq!(status(store, "u", "ghost").await, TaskStatus::Running);
}

/// Rule 3: cancelling a terminal task returns false and changes nothing.
pub async fn cancel_of_terminal_task_changes_nothing(store: &DynStore, terminal: TaskStatus) {
    assert!(terminal.is_terminal());
    save(store, "u", "t", 0, &running("a")).await;
    save(store, "u", "t", 1, &done("b").with_status(terminal)).await;
    let before = history(store, "u", "t").await;
    assert!(!store.mark_task_as_cancelled("u", "t").await.unwrap());
    assert_eq!(history(store, "u", "t").await, before);
    assert_eq!(status(store, "u", "t").await, terminal);
}

/// Rule 4: history comes back in ascending step order.
pub async fn history_is_in_step_order(store: &DynStore) {
    for step in [5, 1, 3, 10, 0, 2] {
        save(store, "u", "t", step, &running(&format!("s{step}"))).await;
    }
    assert_eq!(steps(&history(store, "u", "t").await), [0, 1, 2, 3, 5, 10]);
}

/// Rule 4: tasks newest activity first, with correct summaries.
pub async fn user_tasks_newest_first_with_summaries(store: &DynStore) {
    let t0 = days_ago(3);
    let records = [
        StepRecord::new("u", "a", 0, running("a0")).at(t0),
        StepRecord::new("u", "b", 0, running("b0")).at(t0 + Duration::seconds(1)),
        StepRecord::new("u", "b", 1, done("b1")).at(t0 + Duration::seconds(5)),
        StepRecord::new("u", "c", 0, running("c0")).at(t0 + Duration::seconds(3)),
    ];
    store.save_batch_task_history(&records).await.unwrap();
    let t = tasks(store, "u").await;
    let ids: Vec<_> = t.iter().map(|s| s.task_id.as_str()).collect();
    assert_eq!(ids, ["b", "c", "a"]);
    assert_eq!(t[0].status, TaskStatus::Completed);
    assert_eq!((t[0].last_step, t[0].step_count), (1, 2));
    assert_eq!(t[0].created_at, t0 + Duration::seconds(1));
    assert_eq!(t[0].last_updated, t0 + Duration::seconds(5));

    // New activity moves a task to the front; the default listing limit applies.
    save(store, "u", "a", 1, &running("a1")).await;
    let t = store.get_user_tasks("u", 2).await.unwrap();
    let ids: Vec<_> = t.iter().map(|s| s.task_id.as_str()).collect();
    assert_eq!(ids, ["a", "b"]);
    assert!(t[0].last_updated > t0 + Duration::seconds(5));
    assert_eq!(t[0].created_at, t0);
}

/// Rule 4: equal activity times are ordered by task_id, descending, the same way every time.
pub async fn user_task_ties_are_broken_by_task_id(store: &DynStore) {
    let at = days_ago(1);
    let ids = ["b", "a", "B", "é", "a1", "z", "0"];
    let records: Vec<_> = ids
        .iter()
        .map(|id| StepRecord::new("u", *id, 0, running(id)).at(at))
        .collect();
    store.save_batch_task_history(&records).await.unwrap();
    let listed: Vec<_> = tasks(store, "u")
        .await
        .into_iter()
        .map(|s| s.task_id)
        .collect();
    let mut expected: Vec<_> = ids.iter().map(|s| s.to_string()).collect();
    expected.sort_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
    assert_eq!(listed, expected);
}

/// Rule 4: paging with the cursor returns every task once, in listing order.
pub async fn cursor_pages_cover_every_task_once(store: &DynStore) {
    let base = days_ago(2);
    // 23 tasks, some sharing a timestamp, so pages break inside runs of equal times.
    let records: Vec<_> = (0..23)
        .map(|i| {
            StepRecord::new("u", format!("task-{i:02}"), 0, running("x"))
                .at(base + Duration::seconds(i / 3))
        })
        .collect();
    store.save_batch_task_history(&records).await.unwrap();
    let all = tasks(store, "u").await;
    assert_eq!(all.len(), 23);

    let mut seen = Vec::new();
    let mut cursor: Option<TaskCursor> = None;
    let mut pages = 0;
    loop {
        let page = store
            .get_user_tasks_page("u", &TaskQuery::first(5).after(cursor.clone()))
            .await
            .unwrap();
        assert!(page.tasks.len() <= 5);
        pages += 1;
        seen.extend(page.tasks.iter().cloned());
        match page.next {
            Some(next) => {
                // The cursor survives its text form.
                let text = next.to_string();
                assert_eq!(text.parse::<TaskCursor>().unwrap(), next);
                assert_eq!(Some(&next), page.tasks.last().map(|t| t.cursor()).as_ref());
                cursor = Some(next);
            }
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 5);
    assert_eq!(seen, all);
    // Exactly a page's worth left: the last full page has no next cursor.
    let page = store
        .get_user_tasks_page("u", &TaskQuery::first(23))
        .await
        .unwrap();
    assert_eq!((page.tasks.len(), page.next), (23, None));
}

/// Rule 4: the status filter pages the same way.
pub async fn status_filter_pages(store: &DynStore) {
    let base = days_ago(1);
    let mut records = Vec::new();
    for i in 0..12 {
        let r = if i % 3 == 0 { done("x") } else { running("x") };
        records
            .push(StepRecord::new("u", format!("t{i:02}"), 0, r).at(base + Duration::seconds(i)));
    }
    store.save_batch_task_history(&records).await.unwrap();
    let mut seen = Vec::new();
    let mut q = TaskQuery::first(3).with_status(TaskStatus::Running);
    loop {
        let page = store.get_user_tasks_page("u", &q).await.unwrap();
        assert!(page.tasks.iter().all(|t| t.status == TaskStatus::Running));
        seen.extend(page.tasks.into_iter().map(|t| t.task_id));
        match page.next {
            Some(c) => q = q.after(Some(c)),
            None => break,
        }
    }
    let expected: Vec<_> = (0..12)
        .rev()
        .filter(|i| i % 3 != 0)
        .map(|i| format!("t{i:02}"))
        .collect();
    assert_eq!(seen, expected);
    let done_page = store
        .get_user_tasks_page(
            "u",
            &TaskQuery::first(10).with_status(TaskStatus::Completed),
        )
        .await
        .unwrap();
    assert_eq!(done_page.tasks.len(), 4);
    let none = store
        .get_user_tasks_page("u", &TaskQuery::first(10).with_status(TaskStatus::Failed))
        .await
        .unwrap();
    assert!(none.tasks.is_empty() && none.next.is_none());
}

/// Rule 5: a batch spans tasks and users; the last duplicate wins.
pub async fn batch_spans_tasks_and_last_duplicate_wins(store: &DynStore) {
    save(store, "u1", "t1", 0, &running("existing")).await;
    let last = done("second");
    let records = vec![
        StepRecord::new("u1", "t1", 1, running("first")),
        StepRecord::new("u2", "t9", 0, running("other user")),
        StepRecord::new("u1", "t2", 0, running("t2")),
        StepRecord::new("u1", "t1", 1, last.clone()),
        StepRecord::new("u1", "t1", 0, done("replaces existing")),
    ];
    store.save_batch_task_history(&records).await.unwrap();
    let h = history(store, "u1", "t1").await;
    assert_eq!(steps(&h), [0, 1]);
    assert_eq!(h[0].result, done("replaces existing"));
    assert_eq!(h[1].result, last);
    assert_eq!(status(store, "u1", "t1").await, TaskStatus::Completed);
    assert_eq!(steps(&history(store, "u1", "t2").await), [0]);
    assert_eq!(steps(&history(store, "u2", "t9").await), [0]);
    let t = tasks(store, "u1").await;
    let t1 = t.iter().find(|s| s.task_id == "t1").unwrap();
    assert_eq!(t1.step_count, 2);
}

/// Rule 5 and 7: a batch with one bad record, or touching a cancelled task, writes nothing.
pub async fn batch_is_all_or_nothing(store: &DynStore) {
    save(store, "u", "t", 0, &running("a")).await;
    let before = history(store, "u", "t").await;
    let mut bad = done("bad");
    bad.message = "nul \0 inside".into();
    let records = vec![
        StepRecord::new("u", "t", 1, done("fine")),
        StepRecord::new("u", "new", 0, done("fine")),
        StepRecord::new("u", "t", 2, bad),
    ];
    let err = store.save_batch_task_history(&records).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::InvalidInput { field, .. } if field == "records[2].result.message"),
        "{err:?}"
    );
    assert_eq!(history(store, "u", "t").await, before);
    assert!(history(store, "u", "new").await.is_empty());
    assert_eq!(tasks(store, "u").await.len(), 1);
}

/// Rule 7: an empty batch is a no-op.
pub async fn empty_batch_is_a_no_op(store: &DynStore) {
    store.save_batch_task_history(&[]).await.unwrap();
    assert!(tasks(store, "u").await.is_empty());
}

/// Rule 5: a batch of 20,010 steps (more than one statement's chunk of 10,000 on
/// PostgreSQL) of new tasks is one write, duplicates resolved.
pub async fn large_batch_is_one_write(store: &DynStore) {
    let n_tasks = 20;
    let per_task = 1_000;
    let mut records = Vec::with_capacity(n_tasks * per_task + 10);
    for t in 0..n_tasks {
        for s in 0..per_task {
            let r = TaskStepResult::running(format!("s{s}"), json!({ "i": s }), "bulk");
            records.push(StepRecord::new("bulk", format!("task-{t}"), s as i32, r));
        }
    }
    // Duplicates of the first steps: the last wins.
    for t in 0..10 {
        records.push(StepRecord::new("bulk", format!("task-{t}"), 0, done("dup")));
    }
    store.save_batch_task_history(&records).await.unwrap();
    let listed = store.get_user_tasks("bulk", 100).await.unwrap();
    assert_eq!(listed.len(), n_tasks);
    assert!(listed
        .iter()
        .all(|t| t.step_count == per_task as i64 && t.last_step == per_task as i32 - 1));
    let h = history(store, "bulk", "task-3").await;
    assert_eq!(h.len(), per_task);
    assert_eq!(h[0].result, done("dup"));
    assert_eq!(
        history(store, "bulk", "task-15").await[0].result.message,
        "bulk"
    );
}

/// Rule 5 on existing tasks: a batch of 24,000 steps that rewrites and extends tasks that
/// exist (so it cannot go by `COPY`, and spans several statements' chunks), one of which
/// was cancelled, is refused whole: a chunk written before the one that meets the
/// cancelled task is rolled back too.
pub async fn large_batch_on_existing_tasks_with_a_late_cancelled_task_changes_nothing(
    store: &DynStore,
) {
    let per_task = 1_000;
    let seed: Vec<StepRecord> = (0..24)
        .map(|t| StepRecord::new("bulk", format!("task-{t:02}"), 0, running("seed")))
        .collect();
    store.save_batch_task_history(&seed).await.unwrap();
    // The last task in key order: its rows come in the batch's last chunk.
    assert!(store
        .mark_task_as_cancelled("bulk", "task-23")
        .await
        .unwrap());
    let before_tasks = tasks(store, "bulk").await;
    let before_first = history(store, "bulk", "task-00").await;
    let records: Vec<StepRecord> = (0..24)
        .flat_map(|t| {
            (0..per_task).map(move |s| {
                let r = TaskStepResult::running(format!("s{s}"), json!({ "i": s }), "bulk");
                StepRecord::new("bulk", format!("task-{t:02}"), s, r)
            })
        })
        .collect();
    let err = store.save_batch_task_history(&records).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::TaskCancelled { task_id, .. } if task_id == "task-23"),
        "{err:?}"
    );
    assert_eq!(tasks(store, "bulk").await, before_tasks);
    assert_eq!(history(store, "bulk", "task-00").await, before_first);
    assert_eq!(history(store, "bulk", "task-22").await.len(), 1);
}

/// Rule 6: cleanup removes whole tasks whose last activity is older than the cutoff.
pub async fn cleanup_removes_whole_old_tasks(store: &DynStore) {
    let records = vec![
        StepRecord::new("u", "old", 0, running("a")).at(days_ago(40)),
        StepRecord::new("u", "old", 1, done("b")).at(days_ago(39)),
        StepRecord::new("u", "mixed", 0, running("a")).at(days_ago(45)),
        StepRecord::new("u", "mixed", 1, running("b")).at(days_ago(1)),
        StepRecord::new("v", "older", 0, running("a")).at(days_ago(50)),
        StepRecord::new("v", "fresh", 0, running("a")),
    ];
    store.save_batch_task_history(&records).await.unwrap();
    let report = store.cleanup_old_tasks(30).await.unwrap();
    assert_eq!((report.tasks_removed, report.steps_removed), (2, 3));
    assert!(history(store, "u", "old").await.is_empty());
    assert_eq!(status(store, "u", "old").await, TaskStatus::Pending);
    assert!(history(store, "v", "older").await.is_empty());
    assert_eq!(
        steps(&history(store, "u", "mixed").await),
        [0, 1],
        "an active task keeps its whole history"
    );
    let ids: Vec<_> = tasks(store, "u")
        .await
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    assert_eq!(ids, ["mixed"]);
    // Nothing more to do the second time.
    assert_eq!(
        store.cleanup_old_tasks(30).await.unwrap(),
        Default::default()
    );
    // Zero days removes everything last active before now.
    let report = store.cleanup_old_tasks(0).await.unwrap();
    assert_eq!((report.tasks_removed, report.steps_removed), (2, 3));
    assert!(tasks(store, "u").await.is_empty() && tasks(store, "v").await.is_empty());
}

/// Rule 8: no method returns or touches another user's data.
pub async fn users_are_isolated(store: &DynStore) {
    save(store, "alice", "t", 0, &running("alice's")).await;
    save(store, "bob", "t", 0, &done("bob's")).await;
    save(store, "bob", "only-bob", 0, &running("x")).await;
    assert_eq!(
        history(store, "alice", "t").await[0].result,
        running("alice's")
    );
    assert_eq!(status(store, "alice", "t").await, TaskStatus::Running);
    assert_eq!(
        status(store, "alice", "only-bob").await,
        TaskStatus::Pending
    );
    assert!(history(store, "alice", "only-bob").await.is_empty());
    assert!(!store
        .mark_task_as_cancelled("alice", "only-bob")
        .await
        .unwrap());
    assert_eq!(status(store, "bob", "only-bob").await, TaskStatus::Running);
    assert!(store.mark_task_as_cancelled("alice", "t").await.unwrap());
    // Bob's task of the same name is untouched and still writable.
    assert_eq!(status(store, "bob", "t").await, TaskStatus::Completed);
    save(store, "bob", "t", 1, &running("more")).await;
    let alice: Vec<_> = tasks(store, "alice")
        .await
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    assert_eq!(alice, ["t"]);
    assert_eq!(tasks(store, "bob").await.len(), 2);
}

/// Every page of a listing, following `next` until it ends; checks each page's length and
/// cursor.
async fn all_pages(store: &DynStore, user: &str, query: &TaskQuery) -> Vec<TaskSummary> {
    let mut out = Vec::new();
    let mut q = query.clone();
    for _ in 0..1000 {
        let page = store.get_user_tasks_page(user, &q).await.unwrap();
        assert!(
            page.tasks.len() as i64 <= q.limit,
            "page longer than its limit"
        );
        out.extend(page.tasks.iter().cloned());
        match page.next {
            Some(next) => {
                assert_eq!(Some(&next), page.tasks.last().map(|t| t.cursor()).as_ref());
                q = q.after(Some(next));
            }
            None => return out,
        }
    }
    panic!("paging does not end");
}

/// Rule 4: the activity range (`[updated_after, updated_before)` on `last_updated`) and the
/// task id prefix, alone and with each other, the status filter and cursor pages, list
/// exactly what a plain filter over all of the user's tasks gives, in listing order.
pub async fn list_filters_match_a_plain_filter(store: &DynStore) {
    let base = days_ago(3);
    // 40 tasks in three id families, times shared by runs of three (so bounds and pages
    // fall inside runs of equal times), statuses mixed; another user with the same ids.
    let mut records = Vec::new();
    for i in 0..40i64 {
        let family = ["job-", "job-a", "run-"][usize::try_from(i % 3).unwrap()];
        let r = if i % 4 == 0 { done("x") } else { running("x") };
        let at = base + Duration::seconds(i / 3);
        records.push(StepRecord::new("u", format!("{family}{i:02}"), 0, r.clone()).at(at));
        records.push(StepRecord::new("other", format!("{family}{i:02}"), 0, r).at(at));
    }
    store.save_batch_task_history(&records).await.unwrap();
    let all = tasks(store, "u").await;
    assert_eq!(all.len(), 40);

    let at = |s: i64| base + Duration::seconds(s);
    let ranges = [
        (None, None),
        (Some(at(4)), None),
        (None, Some(at(9))),
        (Some(at(4)), Some(at(9))),
        (Some(at(5)), Some(at(5))),
        // Sub-microsecond digits are dropped, as from stored times.
        (
            Some(at(2) + Duration::nanoseconds(999)),
            Some(at(7) + Duration::nanoseconds(1)),
        ),
        (Some(days_ago(10)), Some(days_ago(0))),
    ];
    let prefixes = [
        None,
        Some("job-"),
        Some("job-a"),
        Some("run-1"),
        Some("zzz"),
    ];
    let statuses = [None, Some(TaskStatus::Running), Some(TaskStatus::Completed)];
    for (from, until) in ranges {
        for prefix in prefixes {
            for status in statuses {
                let mut q = TaskQuery::first(4);
                q.status = status;
                q.updated_after = from;
                q.updated_before = until;
                q.task_id_prefix = prefix.map(str::to_owned);
                let cut = |t: DateTime<Utc>| t.trunc_subsecs(6);
                let expected: Vec<TaskSummary> = all
                    .iter()
                    .filter(|t| status.is_none_or(|s| t.status == s))
                    .filter(|t| from.is_none_or(|f| t.last_updated >= cut(f)))
                    .filter(|t| until.is_none_or(|u| t.last_updated < cut(u)))
                    .filter(|t| prefix.is_none_or(|p| t.task_id.starts_with(p)))
                    .cloned()
                    .collect();
                assert_eq!(all_pages(store, "u", &q).await, expected, "{q:?}");
                // One page holding everything says there is no more.
                q.limit = MAX_PAGE_SIZE;
                let page = store.get_user_tasks_page("u", &q).await.unwrap();
                assert_eq!((page.tasks, page.next), (expected, None), "{q:?}");
            }
        }
    }
    // The filters hold on the page a cursor starts, wherever the cursor came from.
    let cursor = all[10].cursor();
    let q = TaskQuery::first(100)
        .updated_after(at(1))
        .task_id_prefix("job")
        .after(Some(cursor));
    let expected: Vec<TaskSummary> = all[11..]
        .iter()
        .filter(|t| t.last_updated >= at(1) && t.task_id.starts_with("job"))
        .cloned()
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(all_pages(store, "u", &q).await, expected);
}

/// Rule 4: a task id prefix compares bytes (ids are ordered byte-wise): no case folding, no
/// collation, multi-byte and edge characters as they are.
pub async fn list_prefix_is_byte_wise(store: &DynStore) {
    let ids = [
        "a",
        "a\u{7f}",
        "a\u{80}",
        "A",
        "é",
        "éa",
        "e",
        "f",
        "a\u{10ffff}",
        "a\u{10ffff}x",
        "b",
        "\u{10ffff}",
        "\u{10ffff}\u{10ffff}",
        "%",
        "_",
        "a%",
        "a_",
    ];
    let t0 = days_ago(1);
    let records: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            StepRecord::new("u", *id, 0, running("x")).at(t0 + Duration::seconds(i as i64))
        })
        .collect();
    store.save_batch_task_history(&records).await.unwrap();
    let all = tasks(store, "u").await;
    for prefix in [
        "a",
        "a\u{7f}",
        "a\u{10ffff}",
        "\u{10ffff}",
        "é",
        "e",
        "A",
        "%",
        "_",
        "a%",
        "a_",
        "ab",
    ] {
        let expected: Vec<_> = all
            .iter()
            .filter(|t| t.task_id.as_bytes().starts_with(prefix.as_bytes()))
            .map(|t| t.task_id.clone())
            .collect();
        let listed: Vec<_> = all_pages(store, "u", &TaskQuery::first(2).task_id_prefix(prefix))
            .await
            .into_iter()
            .map(|t| t.task_id)
            .collect();
        assert_eq!(listed, expected, "prefix {prefix:?}");
    }
}

/// Every page of a scan, following `next` until it ends.
async fn scan_all(store: &DynStore, user: &str, mut scan: HistoryScan) -> Vec<StepRecord> {
    let mut out = Vec::new();
    loop {
        let page = store.scan_history(user, &scan).await.unwrap();
        assert!(
            page.steps.len() as i64 <= scan.limit,
            "page longer than its limit"
        );
        out.extend(page.steps);
        match page.next {
            Some(next) => scan = scan.after(Some(next)),
            None => return out,
        }
    }
}

/// Scans read a user's steps in (task_id, step) byte order, page by page, each step once,
/// with the timestamps and results `load_task_history` returns; never another user's.
pub async fn scan_pages_visit_every_step_once(store: &DynStore) {
    let t0 = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).single().unwrap();
    let mut records = Vec::new();
    for (task, steps) in [("b", 3), ("a", 2), ("B", 1), ("é", 2), ("a-1", 1)] {
        for step in 0..steps {
            let at = t0 + Duration::microseconds(i64::from(step) * 1_000_001 + 7);
            records.push(StepRecord::new("u", task, step * 10, running(task)).at(at));
        }
    }
    records.push(StepRecord::new("v", "a", 0, running("other user")));
    store.save_batch_task_history(&records).await.unwrap();
    assert!(store.mark_task_as_cancelled("u", "b").await.unwrap());

    let mut expected = Vec::new();
    for task in ["B", "a", "a-1", "b", "é"] {
        for e in history(store, "u", task).await {
            expected.push(StepRecord::new("u", task, e.step, e.result).at(e.timestamp));
        }
    }
    assert_eq!(expected.len(), 10);
    for limit in [1, 3, 10, 11, MAX_SCAN_SIZE] {
        let got = scan_all(store, "u", HistoryScan::all(limit)).await;
        assert_eq!(got, expected, "limit {limit}");
    }
    // A full last page says there is no more only when there is no more.
    let page = store
        .scan_history("u", &HistoryScan::all(10))
        .await
        .unwrap();
    assert_eq!((page.steps.len(), page.next), (10, None));
    let page = store.scan_history("u", &HistoryScan::all(9)).await.unwrap();
    assert_eq!(
        page.next,
        Some(StepKey {
            task_id: "é".into(),
            step: 0
        })
    );
    assert!(store
        .scan_history("nobody", &HistoryScan::all(5))
        .await
        .unwrap()
        .steps
        .is_empty());
}

/// A scan of one task reads only its steps, and `after` continues inside it.
pub async fn scan_of_one_task(store: &DynStore) {
    for task in ["t", "t2", "s"] {
        for step in [0, 1, 2, 7] {
            save(store, "u", task, step, &running(task)).await;
        }
    }
    let steps_of = |records: &[StepRecord]| {
        records
            .iter()
            .map(|r| (r.task_id.clone(), r.step))
            .collect::<Vec<_>>()
    };
    let all = scan_all(store, "u", HistoryScan::task("t", 2)).await;
    let t = |s: i32| ("t".to_string(), s);
    assert_eq!(steps_of(&all), [t(0), t(1), t(2), t(7)]);
    assert!(all.iter().all(|r| r.timestamp.is_some()));
    let rest = store
        .scan_history(
            "u",
            &HistoryScan::task("t", 10).after(Some(StepKey {
                task_id: "t".into(),
                step: 1,
            })),
        )
        .await
        .unwrap();
    assert_eq!(steps_of(&rest.steps), [t(2), t(7)]);
    assert_eq!(rest.next, None);
    assert!(store
        .scan_history("u", &HistoryScan::task("missing", 10))
        .await
        .unwrap()
        .steps
        .is_empty());
}

async fn next_event(events: &mut TaskEventStream) -> TaskEvent {
    tokio::time::timeout(std::time::Duration::from_secs(10), events.next())
        .await
        .expect("no event within 10 s")
        .expect("the event stream ended")
        .expect("the event stream failed")
}

/// Nothing more is pending on `events`: a step saved now (`user`/`task`/`step`, a task the
/// stream watches) is the very next event, so no late duplicate or stray event came before
/// it. An event the test causes, not a quiet window on a clock.
async fn assert_next_is_new(
    store: &DynStore,
    events: &mut TaskEventStream,
    (user, task, step): (&str, &str, i32),
) {
    save(store, user, task, step, &running("sentinel")).await;
    let e = next_event(events).await;
    assert_eq!(
        key(&e),
        (
            user,
            task,
            step,
            TaskStatus::Running,
            TaskEventKind::StepSaved
        ),
        "an event came before the sentinel step: {e:?}"
    );
}

/// Nothing more arrives on a stream whose task can change no more (cancelled): the one
/// check left on a clock, kept short.
async fn assert_quiet(events: &mut TaskEventStream) {
    let next = tokio::time::timeout(std::time::Duration::from_millis(300), events.next()).await;
    assert!(next.is_err(), "unexpected event: {next:?}");
}

fn key(e: &TaskEvent) -> (&str, &str, i32, TaskStatus, TaskEventKind) {
    (&e.user_id, &e.task_id, e.step, e.status, e.kind)
}

/// Each task's events in the order received: what rule 9 orders.
fn by_task(events: &[TaskEvent]) -> std::collections::BTreeMap<&str, Vec<(i32, TaskStatus)>> {
    let mut out = std::collections::BTreeMap::<&str, Vec<_>>::new();
    for e in events {
        out.entry(e.task_id.as_str())
            .or_default()
            .push((e.step, e.status));
    }
    out
}

/// Watching a task: every step committed after the call, in commit order, the cancellation
/// last; nothing from before the call, from other tasks, or from refused writes.
pub async fn watch_task_sees_its_steps_in_order(store: &DynStore) {
    save(store, "u", "t", 0, &running("before")).await;
    let mut events = store.watch_task("u", "t", None).await.unwrap();
    let mut other = store.watch_task("u", "t2", None).await.unwrap();
    save(store, "u", "t", 1, &running("a")).await;
    save(store, "u", "t", 2, &done("b")).await;
    let batch = [
        StepRecord::new("u", "t", 3, running("c")),
        StepRecord::new("u", "t2", 0, running("d")),
        StepRecord::new("v", "t", 0, running("e")),
    ];
    store.save_batch_task_history(&batch).await.unwrap();
    assert!(store.mark_task_as_cancelled("u", "t").await.unwrap());
    let refused = store.save_task_history("u", "t", 9, &running("no")).await;
    assert!(matches!(refused, Err(StoreError::TaskCancelled { .. })));

    use TaskEventKind::{Cancelled, StepSaved};
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(next_event(&mut events).await);
    }
    let keys: Vec<_> = got.iter().map(key).collect();
    assert_eq!(
        keys,
        [
            ("u", "t", 1, TaskStatus::Running, StepSaved),
            ("u", "t", 2, TaskStatus::Completed, StepSaved),
            ("u", "t", 3, TaskStatus::Running, StepSaved),
            ("u", "t", 4, TaskStatus::Cancelled, Cancelled),
        ]
    );
    let history = history(store, "u", "t").await;
    for e in &got {
        let stored = history.iter().find(|h| h.step == e.step).unwrap();
        assert_eq!(e.timestamp, stored.timestamp);
    }
    assert_quiet(&mut events).await;
    let e = next_event(&mut other).await;
    assert_eq!(key(&e), ("u", "t2", 0, TaskStatus::Running, StepSaved));
    assert_next_is_new(store, &mut other, ("u", "t2", 1)).await;
}

/// Watching a user: every task of that user, in commit order per task; no other user's.
pub async fn watch_user_sees_only_that_user(store: &DynStore) {
    let mut events = store.watch_user("u", None).await.unwrap();
    save(store, "v", "a", 0, &running("not mine")).await;
    save(store, "u", "a", 0, &running("1")).await;
    save(store, "u", "b", 0, &running("2")).await;
    save(store, "u", "a", 1, &running("3")).await;
    save(store, "v", "b", 0, &running("not mine")).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_event(&mut events).await);
    }
    assert!(got.iter().all(|e| e.user_id == "u"), "{got:?}");
    let of = |task: &str| -> Vec<i32> {
        got.iter()
            .filter(|e| e.task_id == task)
            .map(|e| e.step)
            .collect()
    };
    assert_eq!((of("a"), of("b")), (vec![0, 1], vec![0]));
    assert_next_is_new(store, &mut events, ("u", "c", 0)).await;
}

/// A watcher that reads nothing while 10,000 steps are written does not slow the writers
/// down, and loses nothing: afterwards it receives every step once, in order (rule 9: the
/// store reads its log at the watcher's pace).
pub async fn slow_watcher_does_not_hold_writers_back(store: &DynStore) {
    let mut events = store.watch_task("u", "t", None).await.unwrap();
    let total = 10_000;
    for chunk in 0..10 {
        let batch: Vec<StepRecord> = (0..1000)
            .map(|i| StepRecord::new("u", "t", chunk * 1000 + i, running("x")))
            .collect();
        store.save_batch_task_history(&batch).await.unwrap();
    }
    for expected in 0..total {
        let e = next_event(&mut events).await;
        assert_eq!(e.step, expected, "the watcher lost or reordered a step");
    }
    assert_next_is_new(store, &mut events, ("u", "t", total)).await;
}

/// Rule 9: a watch resumed from any event's cursor receives exactly the writes after that
/// event (of the task or user it watches), then what comes next; a cursor of the last
/// event resumes with nothing old.
pub async fn watch_resumes_from_every_event_cursor(store: &DynStore) {
    save(store, "u", "a", 0, &running("before")).await;
    let mut events = store.watch_user("u", None).await.unwrap();
    // Each write's events are received before the next write: a step saved again before
    // its event was read would be delivered once (its newest version).
    let mut got = Vec::new();
    save(store, "u", "a", 1, &running("1")).await;
    got.push(next_event(&mut events).await);
    save(store, "u", "b", 0, &running("2")).await;
    got.push(next_event(&mut events).await);
    let batch = [
        StepRecord::new("u", "a", 2, running("3")),
        StepRecord::new("u", "b", 1, running("4")),
        StepRecord::new("v", "a", 0, running("not mine")),
    ];
    store.save_batch_task_history(&batch).await.unwrap();
    got.push(next_event(&mut events).await);
    got.push(next_event(&mut events).await);
    assert!(store.mark_task_as_cancelled("u", "b").await.unwrap());
    got.push(next_event(&mut events).await);
    save(store, "u", "a", 1, &done("again")).await;
    got.push(next_event(&mut events).await);
    let steps_of = |task: &str, events: &[TaskEvent]| -> Vec<(i32, TaskStatus)> {
        events
            .iter()
            .filter(|e| e.task_id == task)
            .map(|e| (e.step, e.status))
            .collect()
    };
    use TaskStatus::{Cancelled, Completed, Running};
    assert_eq!(
        steps_of("a", &got),
        [(1, Running), (2, Running), (1, Completed)]
    );
    assert_eq!(
        steps_of("b", &got),
        [(0, Running), (1, Running), (2, Cancelled)]
    );
    let mut seen = std::collections::HashSet::new();
    assert!(
        got.iter().all(|e| seen.insert(e.cursor.clone())),
        "cursors repeat"
    );
    // Every event the user's stream received, in its order (the sentinels join it).
    let mut log = got.clone();
    for k in 0..got.len() {
        let mut resumed = store
            .watch_user("u", Some(log[k].cursor.clone()))
            .await
            .unwrap();
        let expected = &log[k + 1..];
        let mut again = Vec::new();
        for _ in expected {
            again.push(next_event(&mut resumed).await);
        }
        assert_eq!(
            by_task(&again),
            by_task(expected),
            "resumed after event {k}"
        );
        assert_next_is_new(store, &mut resumed, ("u", "sentinel", k as i32)).await;
        let mut of_a = store
            .watch_task("u", "a", Some(log[k].cursor.clone()))
            .await
            .unwrap();
        for e in log[k + 1..].iter().filter(|e| e.task_id == "a") {
            assert_eq!(
                key(&next_event(&mut of_a).await),
                key(e),
                "task a after {k}"
            );
        }
        assert_next_is_new(store, &mut of_a, ("u", "a", 10 + k as i32)).await;
        for _ in 0..2 {
            log.push(next_event(&mut events).await);
        }
    }
    // A cursor survives a round trip through text.
    let token = got[2].cursor.to_string();
    let parsed: EventCursor = token.parse().unwrap();
    let json = serde_json::to_string(&parsed).unwrap();
    assert_eq!(
        serde_json::from_str::<EventCursor>(&json).unwrap(),
        got[2].cursor
    );
}

/// Rule 9 under load: while 8 writers save steps of their own tasks, watches resumed 1,000
/// times from cursors picked at random among the events so far (of the user, or of one
/// task) receive what the first watch received after that cursor, each task's events in
/// the same order, none twice; and the first watch receives every write exactly once. The
/// first watch falls behind on purpose (it reads a few events per round while the writers
/// run), so a store that buffers events per watcher is tried past its buffer too.
pub async fn watch_resumed_at_random_cursors_under_writers_gets_each_write_once(store: &DynStore) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut events = store.watch_user("u", None).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (store, stop) = (store.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                let task = format!("w{w}");
                let mut step = 0;
                while !stop.load(Ordering::Relaxed) {
                    save(&store, "u", &task, step, &running("x")).await;
                    step += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
                (task, step)
            })
        })
        .collect();
    let mut log: Vec<TaskEvent> = Vec::new();
    while log.len() < 50 {
        log.push(next_event(&mut events).await);
    }
    let mut rng = fastrand::Rng::with_seed(27);
    let mut rounds = Vec::new();
    for round in 0..1000 {
        for _ in 0..3 {
            log.push(next_event(&mut events).await);
        }
        let k = rng.usize(..log.len());
        let cursor = log[k].cursor.clone();
        let task = (round % 2 == 1).then(|| format!("w{}", rng.usize(..8)));
        let mut resumed = match &task {
            None => store.watch_user("u", Some(cursor)).await.unwrap(),
            Some(t) => store.watch_task("u", t, Some(cursor)).await.unwrap(),
        };
        let known = log[k + 1..]
            .iter()
            .filter(|e| task.as_ref().is_none_or(|t| *t == e.task_id))
            .count();
        let mut got = Vec::new();
        for _ in 0..known.min(10) {
            got.push(next_event(&mut resumed).await);
        }
        rounds.push((k, task, got));
    }
    stop.store(true, Ordering::Relaxed);
    let mut written = BTreeSet::new();
    for writer in writers {
        let (task, steps) = writer.await.unwrap();
        written.extend((0..steps).map(|s| (task.clone(), s)));
    }
    while log.len() < written.len() {
        log.push(next_event(&mut events).await);
    }
    let mut delivered = BTreeSet::new();
    for e in &log {
        assert!(
            delivered.insert((e.task_id.clone(), e.step)),
            "delivered twice: {}/{}",
            e.task_id,
            e.step
        );
    }
    assert_eq!(
        delivered, written,
        "the first watch lost or invented writes"
    );
    assert_next_is_new(store, &mut events, ("u", "sentinel", 0)).await;
    // Each resumed watch: per task, a prefix of what the first watch got after its cursor.
    for (k, task, got) in rounds {
        let after = by_task(&log[k + 1..]);
        for (t, steps) in by_task(&got) {
            assert!(
                task.as_ref().is_none_or(|w| *w == t),
                "a watch of task {task:?} got task {t}"
            );
            let expected = after.get(t).map_or(&[][..], Vec::as_slice);
            assert!(
                expected.starts_with(&steps),
                "resumed after event {k}: task {t} got {steps:?}, expected a prefix of {expected:?}"
            );
        }
    }
}

/// A store made to allow `max` watches at once (`max` at least 1) refuses one more with
/// [`StoreError::LimitReached`], starting nothing, and takes a new one once a stream is
/// dropped. Run by each backend on a store built with that limit.
pub async fn watchers_past_the_limit_are_refused(store: &DynStore, max: usize) {
    let mut open = Vec::new();
    for i in 0..max {
        let stream = if i % 2 == 0 {
            store.watch_user("u", None).await
        } else {
            store.watch_task("u", "t", None).await
        };
        open.push(stream.unwrap_or_else(|e| panic!("watch {i} of {max}: {e}")));
    }
    for refused in [
        store.watch_user("v", None).await.err(),
        store.watch_task("u", "t", None).await.err(),
    ] {
        assert!(
            matches!(
                refused,
                Some(StoreError::LimitReached { limit: "watchers", max: m, .. }) if m == max
            ),
            "{refused:?}"
        );
    }
    // The open ones still work.
    save(store, "u", "t", 0, &running("a")).await;
    for stream in &mut open {
        assert_eq!(next_event(stream).await.step, 0);
    }
    drop(open.pop());
    let mut again = store.watch_user("u", None).await.unwrap();
    assert_next_is_new(store, &mut again, ("u", "t", 1)).await;
}

/// The user's tasks counted by status from its listing: what rule 10's kept counts must
/// equal.
async fn counted(store: &DynStore, user: &str) -> crate::TaskCounts {
    tasks(store, user).await.iter().map(|t| t.status).collect()
}

/// Rule 10: after every kind of write, the kept counts equal the tasks counted by status;
/// other users' counts are untouched; cleanup takes its tasks out.
pub async fn counts_follow_every_write(store: &DynStore) {
    let check = |when: &'static str| async move {
        for user in ["u", "v"] {
            assert_eq!(
                store.task_counts(user).await.unwrap(),
                counted(store, user).await,
                "{user} after {when}"
            );
        }
    };
    assert_eq!(store.task_counts("u").await.unwrap().total(), 0);
    check("nothing").await;
    save(store, "u", "a", 0, &running("a0")).await;
    save(store, "u", "b", 0, &running("b0")).await;
    save(store, "v", "a", 0, &running("v")).await;
    check("new tasks").await;
    save(store, "u", "a", 1, &done("a1")).await;
    save(
        store,
        "u",
        "b",
        1,
        &TaskStepResult::failure("b1", ErrorCode::Execution, "x"),
    )
    .await;
    check("finishing").await;
    // A lower step saved again does not change the status; a higher running one does.
    save(store, "u", "a", 0, &running("again")).await;
    save(store, "u", "b", 2, &running("b2")).await;
    check("saving again").await;
    let batch = [
        StepRecord::new("u", "c", 0, running("c0")),
        StepRecord::new("u", "c", 1, done("c1")),
        StepRecord::new("u", "b", 3, done("b3")),
        StepRecord::new("u", "old", 0, running("o")).at(days_ago(40)),
        StepRecord::new("v", "b", 0, done("vb")),
    ];
    store.save_batch_task_history(&batch).await.unwrap();
    check("a batch").await;
    let big: Vec<StepRecord> = (0..300)
        .map(|i| {
            StepRecord::new(
                "u",
                format!("many{i:03}"),
                0,
                if i % 3 == 0 { done("m") } else { running("m") },
            )
        })
        .collect();
    store.save_batch_task_history(&big).await.unwrap();
    check("a large batch of new tasks").await;
    assert!(store.mark_task_as_cancelled("u", "many001").await.unwrap());
    assert!(!store.mark_task_as_cancelled("u", "a").await.unwrap());
    check("a cancel").await;
    let refused = store
        .save_task_history("u", "many001", 5, &running("no"))
        .await;
    assert!(matches!(refused, Err(StoreError::TaskCancelled { .. })));
    check("a refused write").await;
    let report = store.cleanup_old_tasks(30).await.unwrap();
    assert_eq!(report.tasks_removed, 1);
    check("cleanup").await;
    let counts = store.task_counts("u").await.unwrap();
    assert_eq!(counts.total(), 303);
    assert_eq!(counts.cancelled, 1);
    assert_eq!(
        store.task_counts("nobody").await.unwrap(),
        crate::TaskCounts::default()
    );
}

/// Rule 10: activity per hour of `last_updated`: steps a write added, tasks it moved into
/// a terminal status; a call's writes to one task count together; a step saved again adds
/// no step; cleanup trims the hours before its cutoff.
pub async fn activity_counts_what_each_write_did(store: &DynStore) {
    use crate::ActivityHour;
    let hour = validate::hour_of(days_ago(3));
    let at = |minutes: i64| hour + Duration::minutes(minutes);
    // One call: task a runs then completes within the hour (one task completed, 2 steps);
    // task b fails in the next hour.
    let batch = [
        StepRecord::new("u", "a", 0, running("a0")).at(at(5)),
        StepRecord::new("u", "a", 1, done("a1")).at(at(20)),
        StepRecord::new(
            "u",
            "b",
            0,
            TaskStepResult::failure("b0", ErrorCode::Execution, "x"),
        )
        .at(at(70)),
        StepRecord::new("v", "a", 0, done("not mine")).at(at(10)),
    ];
    store.save_batch_task_history(&batch).await.unwrap();
    // Saved again with the same content: no step added, no new completion.
    store
        .save_batch_task_history(&[StepRecord::new("u", "a", 1, done("a1")).at(at(20))])
        .await
        .unwrap();
    let got = store
        .task_activity("u", hour, hour + Duration::hours(3))
        .await
        .unwrap();
    let first = ActivityHour {
        steps: 2,
        completed: 1,
        ..ActivityHour::empty(hour)
    };
    let second = ActivityHour {
        steps: 1,
        failed: 1,
        ..ActivityHour::empty(hour + Duration::hours(1))
    };
    assert_eq!(got, [first, second]);
    // Bounds cut to the hour: from inclusive, to exclusive.
    let only_first = store.task_activity("u", at(30), at(59)).await;
    assert!(only_first.is_err(), "{only_first:?}");
    let got = store.task_activity("u", at(30), at(90)).await.unwrap();
    assert_eq!(got, [first]);
    // Writes now: the hour of now.
    let now_hour = validate::hour_of(validate::now());
    save(store, "u", "c", 0, &running("c0")).await;
    save(store, "u", "c", 1, &running("c1")).await;
    assert!(store.mark_task_as_cancelled("u", "c").await.unwrap());
    let recent = store
        .task_activity(
            "u",
            now_hour - Duration::hours(1),
            now_hour + Duration::hours(2),
        )
        .await
        .unwrap();
    let total = |f: fn(&ActivityHour) -> u64| recent.iter().map(f).sum::<u64>();
    // The hour may turn during the test: sum over both.
    assert_eq!(total(|a| a.steps), 3, "{recent:?}");
    assert_eq!(total(|a| a.cancelled), 1, "{recent:?}");
    assert_eq!(
        total(|a| a.completed + a.failed + a.timed_out),
        0,
        "{recent:?}"
    );
    // Cleanup of what is older than a day takes those hours' activity with it.
    store.cleanup_old_tasks(1).await.unwrap();
    assert!(store
        .task_activity("u", hour, hour + Duration::hours(3))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store
            .task_activity(
                "u",
                now_hour - Duration::hours(1),
                now_hour + Duration::hours(2)
            )
            .await
            .unwrap(),
        recent
    );
}

/// Rule 9: a step saved again after its event was received is delivered again, at once
/// (no window in which a re-save is taken for a late copy), with its new time.
pub async fn step_saved_again_is_delivered_again(store: &DynStore) {
    let mut events = store.watch_task("u", "t", None).await.unwrap();
    for round in 0..20 {
        let r = if round % 2 == 0 {
            running("x")
        } else {
            done("y")
        };
        save(store, "u", "t", 1, &r).await;
        let e = next_event(&mut events).await;
        assert_eq!((e.step, e.status), (1, r.status), "round {round}");
        let stored = history(store, "u", "t").await;
        assert_eq!(e.timestamp, stored[0].timestamp, "round {round}");
    }
    assert_next_is_new(store, &mut events, ("u", "t", 2)).await;
}

/// Rules 1 and 2 under concurrency: many writers, one task, nothing lost or doubled.
pub async fn concurrent_saves_lose_nothing(store: &DynStore) {
    let writers = 16;
    let per_writer = 12;
    let mut handles = Vec::new();
    for w in 0..writers {
        let store = Arc::clone(store);
        handles.push(tokio::spawn(async move {
            for i in 0..per_writer {
                let step = i * writers + w;
                let r = running(&format!("w{w}"));
                store
                    .save_task_history("u", "shared", step, &r)
                    .await
                    .unwrap();
                // Every writer also re-saves step 0: the same key from many writers at once.
                store.save_task_history("u", "shared", 0, &r).await.unwrap();
                store
                    .save_task_history("u", &format!("own-{w}"), i, &r)
                    .await
                    .unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let h = history(store, "u", "shared").await;
    let expected: Vec<i32> = (0..writers * per_writer).collect();
    assert_eq!(steps(&h), expected);
    let t = tasks(store, "u").await;
    assert_eq!(t.len(), writers as usize + 1);
    let shared = t.iter().find(|s| s.task_id == "shared").unwrap();
    assert_eq!(
        (shared.step_count, shared.last_step),
        ((writers * per_writer) as i64, writers * per_writer - 1)
    );
    assert!(t
        .iter()
        .filter(|s| s.task_id != "shared")
        .all(|s| s.step_count == per_writer as i64));
}

/// Rule 3 under concurrency: cancellation racing writers. Every acknowledged save is stored,
/// no refused one is, and nothing lands after the cancellation.
pub async fn cancel_racing_saves_stays_sticky(store: &DynStore) {
    for round in 0..3 {
        let task = format!("race-{round}");
        save(store, "u", &task, 0, &running("start")).await;
        let saved = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut handles = Vec::new();
        for w in 0..8 {
            let store = Arc::clone(store);
            let (task, saved) = (task.clone(), Arc::clone(&saved));
            // Each writer saves until it is refused (at most 20,000 steps).
            handles.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 1..=20_000 {
                    let step = i * 8 + w;
                    match store
                        .save_task_history("u", &task, step, &running("w"))
                        .await
                    {
                        Ok(()) => {
                            acked.push(step);
                            saved.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(StoreError::TaskCancelled { .. }) => return (acked, true),
                        Err(e) => panic!("unexpected error {e:?}"),
                    }
                    tokio::task::yield_now().await;
                }
                (acked, false)
            }));
        }
        // The cancellation comes while the writers are saving: after 8 * (round + 1) saves.
        while saved.load(std::sync::atomic::Ordering::Relaxed) < 8 * (round + 1) {
            tokio::task::yield_now().await;
        }
        let cancelled = store.mark_task_as_cancelled("u", &task).await.unwrap();
        assert!(cancelled, "the task was running");
        let mut acked = BTreeSet::from([0]);
        for h in handles {
            let (steps, refused) = h.await.unwrap();
            // The race happened: every writer was still saving and met the cancellation.
            assert!(refused, "a writer was never refused");
            acked.extend(steps);
        }
        let h = history(store, "u", &task).await;
        let last = h.last().unwrap();
        assert_eq!(last.status, TaskStatus::Cancelled);
        assert_eq!(last.result, TaskStepResult::cancellation());
        let stored: BTreeSet<i32> = h[..h.len() - 1].iter().map(|e| e.step).collect();
        assert_eq!(
            stored, acked,
            "stored steps are exactly the acknowledged ones"
        );
        assert_eq!(
            last.step,
            stored.iter().max().unwrap() + 1,
            "cancellation is the highest step"
        );
        assert_eq!(status(store, "u", &task).await, TaskStatus::Cancelled);
        assert!(store
            .save_task_history("u", &task, 10_000, &running("late"))
            .await
            .unwrap_err()
            .is_cancelled());
    }
}

/// Rule 7: timestamps keep microseconds, and finer digits are dropped the same way everywhere.
pub async fn timestamps_keep_microseconds(store: &DynStore) {
    let precise = Utc
        .timestamp_opt(1_700_000_000, 123_456_789)
        .single()
        .unwrap();
    let early = Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).single().unwrap();
    let late = Utc
        .with_ymd_and_hms(9999, 12, 31, 23, 59, 59)
        .single()
        .unwrap();
    let records = [
        StepRecord::new("u", "t", 0, running("a")).at(precise),
        StepRecord::new("u", "t", 1, running("b")).at(early),
        StepRecord::new("u", "t", 2, running("c")).at(late),
    ];
    store.save_batch_task_history(&records).await.unwrap();
    let h = history(store, "u", "t").await;
    assert_eq!(
        h[0].timestamp,
        Utc.timestamp_opt(1_700_000_000, 123_456_000)
            .single()
            .unwrap()
    );
    assert_eq!(h[1].timestamp, early);
    assert_eq!(h[2].timestamp, late);
    let t = tasks(store, "u").await;
    assert_eq!((t[0].created_at, t[0].last_updated), (early, late));
}

/// Whether `a` and `b` hold the same values: numbers compared as numbers (`2.0` and `2`,
/// `-0.0` and `0` are the same), everything else exactly. For checking what a store read
/// back against what was saved without the crate's own canonical form.
pub fn same_values(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x == y
                || (x.as_u64().is_some() && x.as_u64() == y.as_u64())
                || (x.as_i64().is_some() && x.as_i64() == y.as_i64())
                || x.as_f64() == y.as_f64()
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_values(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_values(v, w)))
        }
        _ => a == b,
    }
}

/// Rule 7: JSON comes back as jsonb keeps it (numbers included).
pub async fn json_round_trips_as_jsonb_keeps_it(store: &DynStore) {
    let value = json!({
        "big_float": 1e16, "huge": 1.7976931348623157e308, "tiny": 5e-324, "neg_zero": -0.0,
        "u64": u64::MAX, "i64": i64::MIN, "third": 1.0 / 3.0, "int_float": 2.0,
        "nested": [[[{"k": null}]], [], {}], "bool": true,
        "escapes": "quote \" backslash \\ tab \t newline \n",
    });
    let r = TaskStepResult::success("json", value, "numbers");
    save(store, "u", "t", 0, &r).await;
    let h = history(store, "u", "t").await;
    // Checked without the crate's own canonical form (which the memory store applies):
    // every value is there, every number equal as a number, every other field unchanged.
    assert!(
        same_values(&h[0].result.result, &r.result),
        "{:?}",
        h[0].result.result
    );
    assert_eq!(
        (&h[0].result.step, &h[0].result.message, h[0].result.status),
        (&r.step, &r.message, r.status)
    );
    // Where jsonb's form differs from serde_json's: a float with an integral value comes
    // back as an integer.
    assert_eq!(
        h[0].result.result["big_float"],
        json!(10_000_000_000_000_000_u64)
    );
    assert_eq!(h[0].result.result["u64"], json!(u64::MAX));
}

/// Rules 1 and 7: ids and text with quotes, unicode, SQL and the longest allowed id.
pub async fn awkward_strings_round_trip(store: &DynStore) {
    let user = "o'brien\"; DROP TABLE task_history; --";
    let long_task = "t".repeat(MAX_ID_BYTES);
    let tasks_ids = [
        "ünïcødé 😀",
        "%_like\\pattern",
        long_task.as_str(),
        " spaced ",
        "$1",
    ];
    for (i, task) in tasks_ids.iter().enumerate() {
        let mut r = done(&format!("{task}'s step"));
        r.message = "line\r\nbreak 🚀 \u{7f} \u{200b}".into();
        r.error_message = Some("'); --".into());
        save(store, user, task, i as i32, &r).await;
        assert_eq!(history(store, user, task).await[0].result, r);
        assert_eq!(status(store, user, task).await, TaskStatus::Completed);
    }
    assert_eq!(tasks(store, user).await.len(), tasks_ids.len());
    assert!(tasks(store, "o'brien").await.is_empty());
}

/// health_check answers; after close every call fails with Closed.
pub async fn health_then_close(store: &DynStore) {
    let report = store.health_check().await.unwrap();
    assert!(!report.backend.is_empty());
    save(store, "u", "t", 0, &running("a")).await;
    store.close().await;
    assert!(matches!(
        store.save_task_history("u", "t", 1, &running("b")).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(
        store.load_task_history("u", "t").await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(
        store.health_check().await,
        Err(StoreError::Closed)
    ));
    // Closing twice is harmless.
    store.close().await;
}

/// One call with bad input, for [`invalid_input_changes_nothing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadCall {
    SaveEmptyUser,
    SaveEmptyTask,
    SaveLongUser,
    SaveLongTask,
    SaveNulUser,
    SaveNulTask,
    SaveNegativeStep,
    SaveNulStepName,
    SaveNulMessage,
    SaveNulErrorMessage,
    SaveNulJsonString,
    SaveNulJsonKey,
    SaveTooDeepJson,
    SaveTooLargeResult,
    BatchOneBadRecord,
    BatchBadTimestamp,
    LoadEmptyUser,
    StatusNulTask,
    CancelEmptyTask,
    ListZeroLimit,
    ListNegativeLimit,
    ListTooLargeLimit,
    ListBadCursor,
    ListEmptyPrefix,
    ListLongPrefix,
    ListNulPrefix,
    ListInvertedRange,
    ListRangeOutOfBounds,
    ScanEmptyUser,
    ScanZeroLimit,
    ScanTooLargeLimit,
    ScanEmptyTask,
    ScanNegativeAfterStep,
    WatchEmptyUser,
    WatchNulTask,
    WatchForeignCursor,
    CleanupNegativeDays,
    CleanupTooManyDays,
    CountsEmptyUser,
    ActivityNulUser,
    ActivityBackwards,
    ActivityTooLong,
}

async fn bad_call(store: &DynStore, call: BadCall) -> (Result<(), StoreError>, &'static str) {
    use BadCall::*;
    let ok = done("fine");
    let with_result = |v: serde_json::Value| TaskStepResult::success("s", v, "m");
    let save_r = |user: String, task: String, step: i32, r: TaskStepResult| async move {
        store.save_task_history(&user, &task, step, &r).await
    };
    let u = || "u".to_string();
    let t = || "t".to_string();
    match call {
        SaveEmptyUser => (save_r(String::new(), t(), 1, ok).await, "user_id"),
        SaveEmptyTask => (save_r(u(), String::new(), 1, ok).await, "task_id"),
        SaveLongUser => (
            save_r("u".repeat(MAX_ID_BYTES + 1), t(), 1, ok).await,
            "user_id",
        ),
        SaveLongTask => (
            save_r(u(), "é".repeat(MAX_ID_BYTES / 2 + 1), 1, ok).await,
            "task_id",
        ),
        SaveNulUser => (save_r("u\0".into(), t(), 1, ok).await, "user_id"),
        SaveNulTask => (save_r(u(), "t\0x".into(), 1, ok).await, "task_id"),
        SaveNegativeStep => (save_r(u(), t(), -1, ok).await, "step"),
        SaveNulStepName => (
            save_r(
                u(),
                t(),
                1,
                TaskStepResult {
                    step: "a\0".into(),
                    ..ok
                },
            )
            .await,
            "step_result.step",
        ),
        SaveNulMessage => (
            save_r(
                u(),
                t(),
                1,
                TaskStepResult {
                    message: "\0".into(),
                    ..ok
                },
            )
            .await,
            "step_result.message",
        ),
        SaveNulErrorMessage => {
            let r = TaskStepResult {
                error_message: Some("bad\0".into()),
                ..ok
            };
            (save_r(u(), t(), 1, r).await, "step_result.error_message")
        }
        SaveNulJsonString => (
            save_r(u(), t(), 1, with_result(json!({"a": ["ok", "x\u{0}y"]}))).await,
            "step_result.result",
        ),
        SaveNulJsonKey => (
            save_r(u(), t(), 1, with_result(json!({"a": {"k\u{0}": 1}}))).await,
            "step_result.result",
        ),
        SaveTooDeepJson => {
            let mut v = json!(0);
            for _ in 0..=MAX_JSON_DEPTH {
                v = json!({ "d": v });
            }
            (
                save_r(u(), t(), 1, with_result(v)).await,
                "step_result.result",
            )
        }
        SaveTooLargeResult => {
            let v = json!("x".repeat(validate::MAX_RESULT_BYTES));
            (save_r(u(), t(), 1, with_result(v)).await, "step_result")
        }
        BatchOneBadRecord => {
            let records = [
                StepRecord::new("u", "t", 1, ok.clone()),
                StepRecord::new("u", "", 0, ok),
            ];
            (
                store.save_batch_task_history(&records).await,
                "records[1].task_id",
            )
        }
        BatchBadTimestamp => {
            let year_10000 = Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).single().unwrap();
            let records = [
                StepRecord::new("u", "new", 0, ok.clone()),
                StepRecord::new("u", "t", 1, ok).at(year_10000),
            ];
            (
                store.save_batch_task_history(&records).await,
                "records[1].timestamp",
            )
        }
        LoadEmptyUser => (store.load_task_history("", "t").await.map(drop), "user_id"),
        StatusNulTask => (
            store.check_task_status("u", "\0").await.map(drop),
            "task_id",
        ),
        CancelEmptyTask => (
            store.mark_task_as_cancelled("u", "").await.map(drop),
            "task_id",
        ),
        ListZeroLimit => (store.get_user_tasks("u", 0).await.map(drop), "limit"),
        ListNegativeLimit => (store.get_user_tasks("u", -5).await.map(drop), "limit"),
        ListTooLargeLimit => (
            store.get_user_tasks("u", MAX_PAGE_SIZE + 1).await.map(drop),
            "limit",
        ),
        ListBadCursor => {
            let q = TaskQuery::first(10).after(Some(TaskCursor {
                last_updated: Utc::now(),
                task_id: String::new(),
            }));
            (store.get_user_tasks_page("u", &q).await.map(drop), "cursor")
        }
        ListEmptyPrefix => {
            let q = TaskQuery::first(10).task_id_prefix("");
            (
                store.get_user_tasks_page("u", &q).await.map(drop),
                "task_id_prefix",
            )
        }
        ListLongPrefix => {
            let q = TaskQuery::first(10).task_id_prefix("p".repeat(MAX_ID_BYTES + 1));
            (
                store.get_user_tasks_page("u", &q).await.map(drop),
                "task_id_prefix",
            )
        }
        ListNulPrefix => {
            let q = TaskQuery::first(10).task_id_prefix("t\0");
            (
                store.get_user_tasks_page("u", &q).await.map(drop),
                "task_id_prefix",
            )
        }
        ListInvertedRange => {
            let now = Utc::now();
            let q = TaskQuery::first(10)
                .updated_after(now)
                .updated_before(now - Duration::seconds(1));
            (
                store.get_user_tasks_page("u", &q).await.map(drop),
                "updated_before",
            )
        }
        ListRangeOutOfBounds => {
            let year_10000 = Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).single().unwrap();
            let q = TaskQuery::first(10).updated_after(year_10000);
            (
                store.get_user_tasks_page("u", &q).await.map(drop),
                "updated_after",
            )
        }
        ScanEmptyUser => (
            store.scan_history("", &HistoryScan::all(5)).await.map(drop),
            "user_id",
        ),
        ScanZeroLimit => (
            store
                .scan_history("u", &HistoryScan::all(0))
                .await
                .map(drop),
            "limit",
        ),
        ScanTooLargeLimit => (
            store
                .scan_history("u", &HistoryScan::all(MAX_SCAN_SIZE + 1))
                .await
                .map(drop),
            "limit",
        ),
        ScanEmptyTask => (
            store
                .scan_history("u", &HistoryScan::task("", 5))
                .await
                .map(drop),
            "task_id",
        ),
        ScanNegativeAfterStep => {
            let after = Some(StepKey {
                task_id: "t".into(),
                step: -1,
            });
            (
                store
                    .scan_history("u", &HistoryScan::all(5).after(after))
                    .await
                    .map(drop),
                "after.step",
            )
        }
        WatchEmptyUser => (store.watch_user("", None).await.map(drop), "user_id"),
        WatchNulTask => (
            store.watch_task("u", "t\0", None).await.map(drop),
            "task_id",
        ),
        WatchForeignCursor => {
            // A well-formed token that no store makes.
            let foreign = EventCursor::parse("not-a-position-of-this-store").unwrap();
            (
                store.watch_user("u", Some(foreign)).await.map(drop),
                "cursor",
            )
        }
        CleanupNegativeDays => (store.cleanup_old_tasks(-1).await.map(drop), "days_old"),
        CleanupTooManyDays => (
            store
                .cleanup_old_tasks(validate::MAX_RETENTION_DAYS + 1)
                .await
                .map(drop),
            "days_old",
        ),
        CountsEmptyUser => (store.task_counts("").await.map(drop), "user_id"),
        ActivityNulUser => {
            let now = validate::now();
            (
                store
                    .task_activity("u\0", now - Duration::hours(2), now)
                    .await
                    .map(drop),
                "user_id",
            )
        }
        ActivityBackwards => {
            // Inside one hour: empty once cut to the hour.
            let hour = validate::hour_of(validate::now());
            (
                store
                    .task_activity(
                        "u",
                        hour + Duration::minutes(50),
                        hour + Duration::minutes(10),
                    )
                    .await
                    .map(drop),
                "to",
            )
        }
        ActivityTooLong => {
            let now = validate::now();
            (
                store
                    .task_activity(
                        "u",
                        now - Duration::days(validate::MAX_ACTIVITY_DAYS + 1),
                        now,
                    )
                    .await
                    .map(drop),
                "to",
            )
        }
    }
}

/// Rule 7: each bad call gets InvalidInput naming the field, and the store is unchanged.
pub async fn invalid_input_changes_nothing(store: &DynStore, call: BadCall) {
    let old = [StepRecord::new("u", "t", 0, running("a")).at(days_ago(100))];
    store.save_batch_task_history(&old).await.unwrap();
    let before = (history(store, "u", "t").await, tasks(store, "u").await);
    let (result, field) = bad_call(store, call).await;
    match result {
        Err(StoreError::InvalidInput { field: got, .. }) => assert_eq!(got, field, "{call:?}"),
        other => panic!("{call:?}: expected InvalidInput({field}), got {other:?}"),
    }
    assert_eq!(
        (history(store, "u", "t").await, tasks(store, "u").await),
        before,
        "{call:?} changed the store"
    );
    assert!(history(store, "u", "new").await.is_empty());
}
