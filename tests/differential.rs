//! Memory and PostgreSQL side by side (proptest), in two tests:
//!
//! - `memory_and_postgres_agree_on_every_input`: one save and its read-back per case, on
//!   random ids, step numbers, statuses and JSON (deep nesting, long strings, NUL, huge
//!   numbers, large payloads, SQL-injection strings) and timestamps across the years 1-9999
//!   (the first years included). Lone surrogates cannot reach a store: a Rust string cannot
//!   hold one and serde_json refuses them in JSON text;
//! - `memory_and_postgres_agree_on_every_sequence`: a model-based test. Random sequences of
//!   every operation (saves, re-saves, batches with duplicates and explicit times, cancels,
//!   loads, status checks, task lists walked page by page with their cursors and filters
//!   (status, activity range, task id prefix), history scans walked page by page, cleanups
//!   over explicitly old data) run on the memory store and on PostgreSQL, and their outcomes
//!   are compared after every operation.
//!
//! PostgreSQL runs with the default configuration and with every batch of new tasks going
//! by `COPY` (`copy_min_rows(1)`); the sequences also run on a store whose every single save
//! goes through the combined statement (`combine_lone_saves`). `PROPTEST_CASES` sets the number of cases. Bad input
//! is not compared here (both stores call the same `validate`, so they would agree by
//! construction); the behaviour suite checks each rule on each store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use serde_json::{Map, Number, Value};
use taskhistory::{
    DynStore, ErrorCode, HistoryEntry, MemoryStore, StepRecord, StoreError, TaskStatus,
    TaskStepResult,
};
use taskhistory_testing as testing;

/// Strings that have broken stores before.
const NASTY: &[&str] = &[
    "",
    "\0",
    "a\0b",
    "'; DROP TABLE task_history; --",
    "\" OR 1=1 --",
    "$1",
    "\\u0000",
    "é",
    "🦀",
    "\u{fffd}",
    "  ",
    "%_",
    "NULL",
];

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9_-]{1,12}",
        2 => proptest::sample::select(NASTY).prop_map(str::to_owned),
        1 => any::<String>(),
        1 => (1usize..400).prop_map(|n| "x".repeat(n)),
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter_map("finite", Number::from_f64)
            .prop_map(Value::Number),
        Just(Value::from(1e300)),
        Just(Value::from(-0.0)),
        Just(Value::from(1e16)),
        Just(Value::from(u64::MAX)),
    ]
}

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(8, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((text(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A value nested `depth` levels deep.
fn deep(depth: usize) -> Value {
    let mut v = Value::from(1);
    for _ in 0..depth {
        v = Value::Array(vec![v]);
    }
    v
}

fn payload() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => json(),
        1 => (60usize..70).prop_map(deep),
        1 => Just(Value::String("y".repeat(1 << 20))),
    ]
}

fn status() -> impl Strategy<Value = TaskStatus> {
    proptest::sample::select(TaskStatus::ALL.to_vec())
}

fn step_result() -> impl Strategy<Value = TaskStepResult> {
    (
        text(),
        payload(),
        any::<bool>(),
        text(),
        status(),
        proptest::option::of(proptest::sample::select(ErrorCode::ALL.to_vec())),
        proptest::option::of(text()),
    )
        .prop_map(
            |(step, result, completed, message, status, error_code, error_message)| {
                TaskStepResult {
                    step,
                    result,
                    completed,
                    message,
                    status,
                    error_code,
                    error_message,
                }
            },
        )
}

fn timestamp() -> impl Strategy<Value = Option<DateTime<Utc>>> {
    proptest::option::of(prop_oneof![
        // The whole range, year 1 (-62,135,596,800 s) to 9999.
        (-62_135_596_800i64..253_402_300_799i64, 0u32..1_000_000_000)
            .prop_map(|(s, n)| Utc.timestamp_opt(s, n).single().unwrap()),
        // The first years, where calendar and epoch arithmetic break first.
        (-62_135_596_800i64..-62_000_000_000i64, 0u32..1_000_000_000)
            .prop_map(|(s, n)| Utc.timestamp_opt(s, n).single().unwrap()),
        Just(
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59)
                .single()
                .unwrap()
        ),
    ])
}

#[derive(Debug, Clone)]
struct Case {
    task: String,
    step: i32,
    result: TaskStepResult,
    at: Option<DateTime<Utc>>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        text(),
        prop_oneof![Just(0), Just(-1), Just(i32::MAX), any::<i32>(), 0i32..10],
        step_result(),
        timestamp(),
    )
        .prop_map(|(task, step, result, at)| Case {
            task,
            step,
            result,
            at,
        })
}

/// What a store did with one input, in a form both stores must agree on.
#[derive(Debug, PartialEq)]
enum Outcome {
    Stored(Vec<(i32, TaskStepResult, TaskStatus, Option<DateTime<Utc>>)>),
    Invalid(String),
    Other(String),
}

fn outcome(
    saved: Result<(), StoreError>,
    history: Result<Vec<HistoryEntry>, StoreError>,
    keep_time: bool,
) -> Outcome {
    match saved.and(history) {
        Ok(h) => Outcome::Stored(
            h.into_iter()
                .map(|e| (e.step, e.result, e.status, keep_time.then_some(e.timestamp)))
                .collect(),
        ),
        Err(StoreError::InvalidInput { field, .. }) => Outcome::Invalid(field),
        Err(e) => Outcome::Other(e.to_string()),
    }
}

async fn apply(store: &DynStore, user: &str, c: &Case) -> Outcome {
    match c.at {
        // A batch with an explicit timestamp: the time must come back the same too.
        Some(at) => {
            let r = StepRecord::new(user, c.task.clone(), c.step, c.result.clone()).at(at);
            let saved = store.save_batch_task_history(&[r]).await;
            let history = store.load_task_history(user, &c.task).await;
            outcome(saved, history, true)
        }
        None => {
            let saved = store
                .save_task_history(user, &c.task, c.step, &c.result)
                .await;
            let history = store.load_task_history(user, &c.task).await;
            outcome(saved, history, false)
        }
    }
}

static CASES: AtomicU64 = AtomicU64::new(0);

#[test]
fn memory_and_postgres_agree_on_every_input() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pg: DynStore = rt.block_on(testing::fresh_dyn_store());
    let pg_copy: DynStore = rt.block_on(testing::copy_dyn_store());
    let memory: DynStore = std::sync::Arc::new(MemoryStore::new());
    let config = ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(256),
        ..ProptestConfig::default()
    };
    proptest!(config, |(c in case())| {
        // A user of its own per case, so cases never see each other's steps.
        let user = format!("user-{}", CASES.fetch_add(1, Ordering::Relaxed));
        let (on_memory, on_pg, on_copy) = rt.block_on(async {
            (
                apply(&memory, &user, &c).await,
                apply(&pg, &user, &c).await,
                apply(&pg_copy, &user, &c).await,
            )
        });
        prop_assert!(!matches!(on_pg, Outcome::Other(_)), "postgres failed: {on_pg:?}");
        prop_assert_eq!(&on_memory, &on_pg);
        prop_assert_eq!(&on_pg, &on_copy);
        if let Outcome::Stored(h) = &on_pg {
            // Accepted input round-trips: every value there, numbers equal as numbers (checked
            // without the crate's canonical form, which the memory store applies itself).
            prop_assert!(
                taskhistory_core::conformance::same_values(&h[0].1.result, &c.result.result),
                "{:?} read back as {:?}", c.result.result, h[0].1.result
            );
            prop_assert_eq!(&h[0].1.message, &c.result.message);
        }
    });
}

/// One operation of a sequence, on the sequence's own user and a few task ids (so that
/// operations meet each other's tasks).
#[derive(Debug, Clone)]
enum Op {
    Save {
        task: usize,
        step: i32,
        result: TaskStepResult,
    },
    Batch(Vec<(usize, i32, TaskStepResult, Option<DateTime<Utc>>)>),
    Cancel(usize),
    Load(usize),
    Status(usize),
    List {
        limit: i64,
        status: Option<TaskStatus>,
        updated_after: Option<DateTime<Utc>>,
        updated_before: Option<DateTime<Utc>>,
        prefix: Option<&'static str>,
    },
    Scan {
        limit: i64,
        task: Option<usize>,
    },
    Cleanup {
        days: i64,
    },
}

const TASKS: &[&str] = &["a", "b", "c", "d'; --", "é"];
/// Task id prefixes the listings filter by: whole ids, parts, none, and "" (refused).
const PREFIXES: &[&str] = &["a", "d", "d'; ", "d'; --", "é", "\u{c3}", "z", ""];

fn small_result() -> impl Strategy<Value = TaskStepResult> {
    (text(), json(), any::<bool>(), text(), status()).prop_map(
        |(step, result, completed, message, status)| TaskStepResult {
            step,
            result,
            completed,
            message,
            status,
            error_code: None,
            error_message: None,
        },
    )
}

/// Explicit times: recent ones, and old ones (months to years back) for cleanup to find.
fn when() -> impl Strategy<Value = Option<DateTime<Utc>>> {
    proptest::option::of(
        (0i64..4_000 * 86_400, 0u32..1_000_000).prop_map(|(back, micros)| {
            Utc::now() - chrono::Duration::seconds(back)
                + chrono::Duration::microseconds(i64::from(micros))
        }),
    )
}

fn op() -> impl Strategy<Value = Op> {
    let task = 0..TASKS.len();
    let step = prop_oneof![0i32..6, Just(i32::MAX - 1)];
    prop_oneof![
        4 => (task.clone(), step.clone(), small_result())
            .prop_map(|(task, step, result)| Op::Save { task, step, result }),
        3 => prop::collection::vec((task.clone(), step, small_result(), when()), 1..12)
            .prop_map(Op::Batch),
        1 => task.clone().prop_map(Op::Cancel),
        1 => task.clone().prop_map(Op::Load),
        1 => task.clone().prop_map(Op::Status),
        2 => (
            1i64..4,
            proptest::option::of(status()),
            when(),
            when(),
            proptest::option::of(proptest::sample::select(PREFIXES)),
        )
            .prop_map(|(limit, status, updated_after, updated_before, prefix)| Op::List {
                limit,
                status,
                updated_after,
                updated_before,
                prefix,
            }),
        2 => (1i64..5, proptest::option::of(task))
            .prop_map(|(limit, task)| Op::Scan { limit, task }),
        1 => (1i64..3_000).prop_map(|days| Op::Cleanup { days }),
    ]
}

/// What an operation returned, in the form both stores must agree on: times the store sets
/// itself (saves without one, cancellations) are left out, explicit ones compared.
#[derive(Debug, PartialEq)]
enum Seen {
    Done,
    Refused(String),
    Bool(bool),
    History(Vec<(i32, TaskStepResult, TaskStatus)>),
    Status(TaskStatus),
    Tasks(Vec<Vec<(String, TaskStatus, i32, i64)>>),
    Steps(Vec<Vec<(String, i32, TaskStepResult)>>),
    Cleanup(u64, u64),
}

fn refused(e: StoreError) -> Seen {
    match e {
        StoreError::InvalidInput { field, .. } => Seen::Refused(format!("invalid {field}")),
        StoreError::TaskCancelled { task_id, .. } => Seen::Refused(format!("cancelled {task_id}")),
        other => Seen::Refused(format!("other: {other}")),
    }
}

async fn run_op(store: &DynStore, user: &str, op: &Op) -> Seen {
    let t = |i: &usize| TASKS[*i];
    let r = match op {
        Op::Save { task, step, result } => store
            .save_task_history(user, t(task), *step, result)
            .await
            .map(|()| Seen::Done),
        Op::Batch(steps) => {
            let records: Vec<StepRecord> = steps
                .iter()
                .map(|(task, step, result, at)| {
                    let r = StepRecord::new(user, t(task), *step, result.clone());
                    match at {
                        Some(at) => r.at(*at),
                        None => r,
                    }
                })
                .collect();
            store
                .save_batch_task_history(&records)
                .await
                .map(|()| Seen::Done)
        }
        Op::Cancel(task) => store
            .mark_task_as_cancelled(user, t(task))
            .await
            .map(Seen::Bool),
        Op::Load(task) => store.load_task_history(user, t(task)).await.map(|h| {
            Seen::History(
                h.into_iter()
                    .map(|e| (e.step, e.result, e.status))
                    .collect(),
            )
        }),
        Op::Status(task) => store
            .check_task_status(user, t(task))
            .await
            .map(Seen::Status),
        Op::List {
            limit,
            status,
            updated_after,
            updated_before,
            prefix,
        } => {
            // Every page, following the cursors: the pages themselves must agree.
            let mut query = taskhistory::TaskQuery::first(*limit);
            query.status = *status;
            query.updated_after = *updated_after;
            query.updated_before = *updated_before;
            query.task_id_prefix = prefix.map(str::to_owned);
            let mut pages = Vec::new();
            loop {
                match store.get_user_tasks_page(user, &query).await {
                    Ok(page) => {
                        pages.push(
                            page.tasks
                                .iter()
                                .map(|s| (s.task_id.clone(), s.status, s.last_step, s.step_count))
                                .collect(),
                        );
                        match page.next {
                            Some(next) if pages.len() < 50 => query = query.after(Some(next)),
                            _ => break Ok(Seen::Tasks(pages)),
                        }
                    }
                    Err(e) => break Err(e),
                }
            }
        }
        Op::Scan { limit, task } => {
            let mut scan = match task {
                Some(task) => taskhistory::HistoryScan::task(t(task), *limit),
                None => taskhistory::HistoryScan::all(*limit),
            };
            let mut pages = Vec::new();
            loop {
                match store.scan_history(user, &scan).await {
                    Ok(page) => {
                        pages.push(
                            page.steps
                                .iter()
                                .map(|r| (r.task_id.clone(), r.step, r.result.clone()))
                                .collect(),
                        );
                        match page.next {
                            Some(next) if pages.len() < 100 => scan = scan.after(Some(next)),
                            _ => break Ok(Seen::Steps(pages)),
                        }
                    }
                    Err(e) => break Err(e),
                }
            }
        }
        Op::Cleanup { days } => store
            .cleanup_old_tasks(*days)
            .await
            .map(|r| Seen::Cleanup(r.tasks_removed, r.steps_removed)),
    };
    r.unwrap_or_else(refused)
}

/// What rule 10 keeps after an operation: the counts, and the activity of the last 92 days
/// (where the writes stamped with the store's clock fall).
async fn kept(
    store: &DynStore,
    user: &str,
) -> (taskhistory::TaskCounts, Vec<taskhistory::ActivityHour>) {
    let to = Utc::now() + chrono::Duration::hours(1);
    let from = to - chrono::Duration::days(taskhistory::validate::MAX_ACTIVITY_DAYS);
    (
        store.task_counts(user).await.unwrap(),
        store.task_activity(user, from, to).await.unwrap(),
    )
}

/// The counts a listing of every task gives.
async fn counted(store: &DynStore, user: &str) -> taskhistory::TaskCounts {
    store
        .get_user_tasks(user, 1000)
        .await
        .unwrap()
        .iter()
        .map(|t| t.status)
        .collect()
}

/// How often the sequences met the outcomes that make them worth comparing: a cleanup that
/// removed something, a list or scan of several pages, a save refused by a cancellation.
static REMOVED: AtomicU64 = AtomicU64::new(0);
static PAGED: AtomicU64 = AtomicU64::new(0);
static REFUSED: AtomicU64 = AtomicU64::new(0);

fn note(seen: &Seen) {
    let counter = match seen {
        Seen::Cleanup(tasks, _) if *tasks > 0 => &REMOVED,
        Seen::Tasks(pages) if pages.len() > 1 => &PAGED,
        Seen::Steps(pages) if pages.len() > 1 => &PAGED,
        Seen::Refused(r) if r.starts_with("cancelled") => &REFUSED,
        _ => return,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

#[test]
fn memory_and_postgres_agree_on_every_sequence() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // One store of each kind per case: cleanup is not per user, so a case must not see
    // another's data.
    let config = ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(48),
        ..ProptestConfig::default()
    };
    proptest!(config, |(ops in prop::collection::vec(op(), 1..24))| {
        let (pg, pg_copy, pg_combined): (DynStore, DynStore, DynStore) = rt.block_on(async {
            (
                testing::fresh_dyn_store().await,
                testing::copy_dyn_store().await,
                testing::combined_dyn_store().await,
            )
        });
        let memory: DynStore = std::sync::Arc::new(MemoryStore::new());
        for (i, op) in ops.iter().enumerate() {
            let (on_memory, on_pg, on_copy, on_combined) = rt.block_on(async {
                (
                    run_op(&memory, "u", op).await,
                    run_op(&pg, "u", op).await,
                    run_op(&pg_copy, "u", op).await,
                    run_op(&pg_combined, "u", op).await,
                )
            });
            prop_assert!(
                !matches!(&on_pg, Seen::Refused(r) if r.starts_with("other")),
                "operation {i} {op:?} failed on PostgreSQL: {on_pg:?}"
            );
            prop_assert_eq!(&on_memory, &on_pg, "operation {} {:?}", i, op);
            prop_assert_eq!(&on_pg, &on_copy, "operation {} {:?} (COPY store)", i, op);
            prop_assert_eq!(
                &on_pg,
                &on_combined,
                "operation {} {:?} (combined saves)",
                i,
                op
            );
            note(&on_pg);
            let (memory_kept, pg_kept, copy_kept, combined_kept, listed) = rt.block_on(async {
                (
                    kept(&memory, "u").await,
                    kept(&pg, "u").await,
                    kept(&pg_copy, "u").await,
                    kept(&pg_combined, "u").await,
                    counted(&memory, "u").await,
                )
            });
            prop_assert_eq!(&memory_kept.0, &listed, "counts after operation {} {:?}", i, op);
            prop_assert_eq!(&memory_kept, &pg_kept, "kept after operation {} {:?}", i, op);
            prop_assert_eq!(&pg_kept, &copy_kept, "kept after operation {} {:?} (COPY)", i, op);
            prop_assert_eq!(
                &pg_kept,
                &combined_kept,
                "kept after operation {} {:?} (combined)",
                i,
                op
            );
        }
        rt.block_on(async {
            pg.close().await;
            pg_copy.close().await;
            pg_combined.close().await;
        });
    });
    // Enough cases to expect each: the comparison met what it is for.
    if config.cases >= 24 {
        for (what, n) in [
            ("cleanups that removed tasks", &REMOVED),
            ("paged lists and scans", &PAGED),
            ("saves refused after a cancel", &REFUSED),
        ] {
            assert!(
                n.load(Ordering::Relaxed) > 0,
                "no {what} in {} cases",
                config.cases
            );
        }
    }
}
