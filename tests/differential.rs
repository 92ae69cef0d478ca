//! Memory and PostgreSQL side by side on random input (proptest): random ids, step numbers,
//! statuses and JSON (deep nesting, long strings, NUL, escaped lone surrogates, huge
//! numbers, large payloads, SQL-injection strings). PostgreSQL runs twice: with the default
//! configuration, and with every batch of new tasks going by `COPY` (`copy_min_rows(1)`).
//! The stores must give the same outcome
//! on every input: accepted and read back identically, or `InvalidInput` naming the same
//! field. Nothing may panic.
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
    "\\ud800",
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
        (-62_000_000_000i64..253_000_000_000i64, 0u32..1_000_000_000)
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
        cases: 256,
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
            // Accepted input round-trips: the stored result is what jsonb keeps of it.
            let want = taskhistory::validate::canonical_result(&c.result);
            prop_assert_eq!(&h[0].1, &want);
        }
    });
}
