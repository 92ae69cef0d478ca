//! Input rules shared by every store, so that all of them refuse the same inputs with the same
//! [`StoreError::InvalidInput`] before touching anything.
//!
//! | input | rule |
//! |---|---|
//! | `user_id`, `task_id` | 1 to [`MAX_ID_BYTES`] bytes of UTF-8, no NUL |
//! | step number | 0 or more |
//! | step result | no NUL in any string or key (PostgreSQL's text and jsonb refuse it), JSON nested at most [`MAX_JSON_DEPTH`] deep, at most [`MAX_RESULT_BYTES`] encoded |
//! | timestamp | from year 1 to year 9999, UTC; kept to the microsecond (finer digits are dropped) |
//! | listing filters | `task_id_prefix` like a `task_id`; `updated_after`, `updated_before` timestamps with `updated_after` <= `updated_before` (the range is `[updated_after, updated_before)`) |
//! | page size (`limit`) | 1 to [`MAX_PAGE_SIZE`]; for history scans 1 to [`MAX_SCAN_SIZE`] |
//! | retention (`days`) | 0 to [`MAX_RETENTION_DAYS`] |

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::{Map, Number, Value};

use crate::error::StoreError;
use crate::model::{HistoryScan, StepRecord, TaskCursor, TaskQuery, TaskStepResult};

use crate::rules::no_nul;
pub use crate::rules::{id, timestamp, MAX_ID_BYTES};

/// The most tasks one listing returns.
pub const MAX_PAGE_SIZE: i64 = 1000;
/// The most steps one history scan returns.
pub const MAX_SCAN_SIZE: i64 = 10_000;
/// The deepest nesting of arrays and objects in a step result (`serde_json` reads back at
/// most 128 levels; PostgreSQL's limit depends on its stack).
pub const MAX_JSON_DEPTH: usize = 64;
/// The largest step result, encoded as JSON.
pub const MAX_RESULT_BYTES: usize = 16 * 1024 * 1024;
/// The largest retention period `cleanup_old_tasks` accepts.
pub const MAX_RETENTION_DAYS: i64 = 1_000_000;

/// Checks a `user_id`.
pub fn user_id(value: &str) -> Result<(), StoreError> {
    id("user_id", value)
}

/// Checks a `task_id`.
pub fn task_id(value: &str) -> Result<(), StoreError> {
    id("task_id", value)
}

/// Checks the `user_id` and `task_id` that name one task.
pub fn task(user: &str, task: &str) -> Result<(), StoreError> {
    user_id(user)?;
    task_id(task)
}

/// Checks a step number reported as `field`.
pub fn step(field: &str, value: i32) -> Result<(), StoreError> {
    if value < 0 {
        return Err(StoreError::invalid(
            field,
            format!("is {value}; steps start at 0"),
        ));
    }
    Ok(())
}

/// Checks a page size.
pub fn limit(value: i64) -> Result<(), StoreError> {
    if !(1..=MAX_PAGE_SIZE).contains(&value) {
        return Err(StoreError::invalid(
            "limit",
            format!("is {value}; it must be between 1 and {MAX_PAGE_SIZE}"),
        ));
    }
    Ok(())
}

/// Checks the size of a history scan.
pub fn scan_limit(value: i64) -> Result<(), StoreError> {
    if !(1..=MAX_SCAN_SIZE).contains(&value) {
        return Err(StoreError::invalid(
            "limit",
            format!("is {value}; it must be between 1 and {MAX_SCAN_SIZE}"),
        ));
    }
    Ok(())
}

/// Checks a history scan of `user`'s steps.
pub fn scan(user: &str, value: &HistoryScan) -> Result<(), StoreError> {
    user_id(user)?;
    scan_limit(value.limit)?;
    if let Some(task) = &value.task_id {
        task_id(task)?;
    }
    if let Some(after) = &value.after {
        id("after.task_id", &after.task_id)?;
        step("after.step", after.step)?;
    }
    Ok(())
}

/// Checks a retention period in days.
pub fn days(value: i64) -> Result<(), StoreError> {
    if !(0..=MAX_RETENTION_DAYS).contains(&value) {
        return Err(StoreError::invalid(
            "days_old",
            format!("is {value}; it must be between 0 and {MAX_RETENTION_DAYS}"),
        ));
    }
    Ok(())
}

/// The longest span [`task_activity`](crate::TaskHistoryStore::task_activity) reads at
/// once, in days.
pub const MAX_ACTIVITY_DAYS: i64 = 92;

/// Checks an activity query and gives its hours: `from` and `to` cut to the hour, `from`
/// before `to`, at most [`MAX_ACTIVITY_DAYS`] apart.
pub fn activity(
    user: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), StoreError> {
    user_id(user)?;
    let (from, to) = (hour_of(from), hour_of(to));
    if from >= to {
        return Err(StoreError::invalid(
            "to",
            format!("is {to}, not after from ({from}) once both are cut to the hour"),
        ));
    }
    if to - from > chrono::Duration::days(MAX_ACTIVITY_DAYS) {
        return Err(StoreError::invalid(
            "to",
            format!("is more than {MAX_ACTIVITY_DAYS} days after from"),
        ));
    }
    Ok((from, to))
}

/// The start of the hour `t` is in (UTC).
pub fn hour_of(t: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::{DurationRound, TimeDelta};
    t.duration_trunc(TimeDelta::hours(1)).unwrap_or(t)
}

/// The store's clock: now, UTC, cut to the microsecond.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// Checks a listing cursor.
pub fn cursor(value: &TaskCursor) -> Result<(), StoreError> {
    value.check()
}

/// Checks a listing of `user`'s tasks (`get_user_tasks_page`).
pub fn list(user: &str, query: &TaskQuery) -> Result<(), StoreError> {
    user_id(user)?;
    self::query(query)
}

/// Checks a listing query: its limit, cursor, and filters (a prefix like an id, bounds in
/// the timestamp range, `updated_after` not later than `updated_before`).
pub fn query(value: &TaskQuery) -> Result<(), StoreError> {
    limit(value.limit)?;
    if let Some(c) = &value.after {
        cursor(c)?;
    }
    if let Some(prefix) = &value.task_id_prefix {
        id("task_id_prefix", prefix)?;
    }
    let from = value
        .updated_after
        .map(|t| timestamp("updated_after", t))
        .transpose()?;
    let until = value
        .updated_before
        .map(|t| timestamp("updated_before", t))
        .transpose()?;
    if let (Some(from), Some(until)) = (from, until) {
        if from > until {
            return Err(StoreError::invalid(
                "updated_before",
                format!("{until} is earlier than updated_after {from}"),
            ));
        }
    }
    Ok(())
}

/// Checks a step result reported under `field` (e.g. `"step_result"`).
pub fn step_result(field: &str, value: &TaskStepResult) -> Result<(), StoreError> {
    step_result_fields(value).map_err(|e| e.under(field))
}

/// [`step_result`] with field names relative to the result: nothing is allocated unless
/// the value is bad.
fn step_result_fields(value: &TaskStepResult) -> Result<(), StoreError> {
    no_nul("step", &value.step)?;
    no_nul("message", &value.message)?;
    let mut bound = RESULT_OVERHEAD + quoted_bound(&value.step) + quoted_bound(&value.message);
    if let Some(m) = &value.error_message {
        no_nul("error_message", m)?;
        bound += quoted_bound(m);
    }
    bound += json("result", &value.result, 1)?;
    // Encoding only to measure is skipped when even the worst case fits.
    if bound <= MAX_RESULT_BYTES {
        return Ok(());
    }
    let mut counter = ByteCounter(0);
    serde_json::to_writer(&mut counter, value)
        .map_err(|e| StoreError::invalid("", format!("does not encode as JSON: {e}")))?;
    if counter.0 > MAX_RESULT_BYTES {
        return Err(StoreError::invalid(
            "",
            format!(
                "encodes to {} bytes; at most {MAX_RESULT_BYTES} are allowed",
                counter.0
            ),
        ));
    }
    Ok(())
}

/// More than the encoded size of a step result's keys, status, code, booleans and
/// punctuation.
const RESULT_OVERHEAD: usize = 256;

/// The most bytes a string can take in JSON: every character escaped as `\uXXXX`, quotes.
fn quoted_bound(s: &str) -> usize {
    s.len() * 6 + 2
}

/// Checks one save: ids, step number and result.
pub fn save(
    user: &str,
    task: &str,
    step_no: i32,
    result: &TaskStepResult,
) -> Result<(), StoreError> {
    user_id(user)?;
    task_id(task)?;
    step("step", step_no)?;
    step_result("step_result", result)
}

/// A step that passed validation, borrowed from the caller: what stores write.
#[derive(Debug, Clone, Copy)]
pub struct PreparedStep<'a> {
    /// The task's user.
    pub user_id: &'a str,
    /// The task.
    pub task_id: &'a str,
    /// The step number.
    pub step: i32,
    /// Its timestamp, cut to the microsecond; `None` for "now".
    pub timestamp: Option<DateTime<Utc>>,
    /// The step's outcome.
    pub result: &'a TaskStepResult,
}

/// Checks one save ([`save`]) and returns it ready to write, without copying anything.
pub fn prepare_save<'a>(
    user: &'a str,
    task: &'a str,
    step_no: i32,
    result: &'a TaskStepResult,
) -> Result<PreparedStep<'a>, StoreError> {
    save(user, task, step_no, result)?;
    Ok(PreparedStep {
        user_id: user,
        task_id: task,
        step: step_no,
        timestamp: None,
        result,
    })
}

/// Checks one record of a batch (or one line of an import), reporting fields under
/// `field` (e.g. `"records[3]"`); returns its timestamp cut to the microsecond.
pub fn record(field: &str, r: &StepRecord) -> Result<Option<DateTime<Utc>>, StoreError> {
    record_fields(r).map_err(|e| e.under(field))
}

/// [`record`] with field names relative to the record.
fn record_fields(r: &StepRecord) -> Result<Option<DateTime<Utc>>, StoreError> {
    id("user_id", &r.user_id)?;
    id("task_id", &r.task_id)?;
    step("step", r.step)?;
    step_result_fields(&r.result).map_err(|e| e.under("result"))?;
    match r.timestamp {
        Some(ts) => Ok(Some(timestamp("timestamp", ts)?)),
        None => Ok(None),
    }
}

/// Validates a batch and puts it in the order every store applies it: sorted by
/// `(user_id, task_id, step)`, and where one step appears more than once, only the last
/// occurrence kept. The first invalid record fails the whole batch. A batch that cancels a
/// task (a step with status `cancelled`) and writes a higher step of it is refused whole
/// with [`StoreError::TaskCancelled`]: cancellation is sticky inside a batch too.
pub fn prepare_batch(records: &[StepRecord]) -> Result<Vec<PreparedStep<'_>>, StoreError> {
    let mut prepared = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        let timestamp = record_fields(r).map_err(|e| e.under(&format!("records[{i}]")))?;
        prepared.push((
            i,
            PreparedStep {
                user_id: &r.user_id,
                task_id: &r.task_id,
                step: r.step,
                timestamp,
                result: &r.result,
            },
        ));
    }
    // Stable sort by key then position; keep the last of each run of equal keys.
    prepared.sort_by(|(ia, a), (ib, b)| key(a).cmp(&key(b)).then(ia.cmp(ib)));
    let mut out: Vec<PreparedStep<'_>> = Vec::with_capacity(prepared.len());
    for (_, p) in prepared {
        match out.last_mut() {
            Some(last) if key(last) == key(&p) => *last = p,
            _ => out.push(p),
        }
    }
    // Cancellation is sticky inside a batch too: a batch that cancels a task and then
    // writes a later step of it is refused whole, as that write would be after the batch.
    for pair in out.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if (a.user_id, a.task_id) == (b.user_id, b.task_id)
            && a.result.status == crate::TaskStatus::Cancelled
        {
            return Err(StoreError::TaskCancelled {
                user_id: a.user_id.to_owned(),
                task_id: a.task_id.to_owned(),
            });
        }
    }
    Ok(out)
}

fn key<'a>(p: &PreparedStep<'a>) -> (&'a str, &'a str, i32) {
    (p.user_id, p.task_id, p.step)
}

/// Checks a JSON value and returns the most bytes it can encode to.
fn json(field: &str, value: &Value, depth: usize) -> Result<usize, StoreError> {
    match value {
        Value::String(s) => no_nul(field, s).map(|()| quoted_bound(s)),
        Value::Array(items) => {
            nested(field, depth)?;
            items
                .iter()
                .try_fold(2, |acc, v| Ok(acc + 1 + json(field, v, depth + 1)?))
        }
        Value::Object(map) => {
            nested(field, depth)?;
            map.iter().try_fold(2, |acc, (k, v)| {
                no_nul(field, k)?;
                Ok(acc + quoted_bound(k) + 2 + json(field, v, depth + 1)?)
            })
        }
        // Numbers print in at most 24 bytes (`-1.7976931348623157e308`).
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(24),
    }
}

fn nested(field: &str, depth: usize) -> Result<(), StoreError> {
    if depth > MAX_JSON_DEPTH {
        return Err(StoreError::invalid(
            field,
            format!("is nested more than {MAX_JSON_DEPTH} levels deep"),
        ));
    }
    Ok(())
}

struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The value as PostgreSQL's `jsonb` gives it back: a float written in exponent form with no
/// fractional digits left (`1e16`) comes back as an integer when it fits in 64 bits, and
/// `-0.0` comes back as `0.0`. Object keys and strings are unchanged. Stores that do not go
/// through jsonb apply this so that every store returns the same value.
///
/// Call it on validated values only (the depth is bounded there).
pub fn canonical_json(value: &Value) -> Value {
    match value {
        Value::Number(n) => Value::Number(canonical_number(n)),
        Value::Array(items) => Value::Array(items.iter().map(canonical_json).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), canonical_json(v)))
                .collect::<Map<_, _>>(),
        ),
        other => other.clone(),
    }
}

fn canonical_number(n: &Number) -> Number {
    let Some(f) = n.as_f64().filter(|_| n.is_f64()) else {
        return n.clone();
    };
    if f == 0.0 {
        return Number::from_f64(0.0).unwrap_or_else(|| n.clone());
    }
    // serde_json prints floats of magnitude 1e16 and above in exponent form, with the
    // shortest digits that read back as the same float; PostgreSQL reads those as integers
    // (those digits, then zeros) and prints them back in full. Rust prints a float with the
    // same shortest digits, then zeros: the integer PostgreSQL keeps (not the float's exact
    // binary value, which can differ in the last digits).
    if f.fract() == 0.0 && f.abs() >= 1e16 {
        let digits = format!("{f}");
        if let Ok(v) = digits.parse::<u64>() {
            return Number::from(v);
        }
        if let Ok(v) = digits.parse::<i64>() {
            return Number::from(v);
        }
    }
    n.clone()
}

/// Applies [`canonical_json`] to a step result's `result`.
pub fn canonical_result(value: &TaskStepResult) -> TaskStepResult {
    TaskStepResult {
        result: canonical_json(&value.result),
        ..value.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::TaskStatus;
    use chrono::TimeZone;
    use serde_json::json;

    fn ok_result() -> TaskStepResult {
        TaskStepResult::success("s", json!({"a": 1}), "ok")
    }

    #[test]
    fn ids_are_bounded_and_nul_free() {
        assert!(user_id("u").is_ok());
        assert!(user_id(&"x".repeat(MAX_ID_BYTES)).is_ok());
        for bad in ["", "a\0b"] {
            assert!(
                matches!(user_id(bad), Err(StoreError::InvalidInput { ref field, .. }) if field == "user_id")
            );
        }
        assert!(task_id(&"é".repeat(128)).is_err(), "256 bytes");
    }

    #[test]
    fn json_rules() {
        let mut r = ok_result();
        r.result = json!({"k": ["fine", {"x\u{0}": 1}]});
        assert!(step_result("step_result", &r).is_err());
        r.result = json!({"k": "a\u{0}"});
        assert!(step_result("step_result", &r).is_err());
        let mut deep = json!(1);
        for _ in 0..MAX_JSON_DEPTH {
            deep = json!([deep]);
        }
        r.result = deep.clone();
        assert!(step_result("step_result", &r).is_ok());
        r.result = json!([deep]);
        assert!(step_result("step_result", &r).is_err());
        r.result = Value::String("x".repeat(MAX_RESULT_BYTES));
        assert!(step_result("step_result", &r).is_err());
    }

    #[test]
    fn listing_filters_name_their_field() {
        let field_of = |q: &TaskQuery| match query(q) {
            Err(StoreError::InvalidInput { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().unwrap();
        let q = TaskQuery::first(10);
        assert!(query(&q.clone().updated_after(t).updated_before(t)).is_ok());
        assert!(query(&q.clone().task_id_prefix("é".repeat(127))).is_ok());
        for bad in ["", "a\0b"] {
            assert_eq!(field_of(&q.clone().task_id_prefix(bad)), "task_id_prefix");
        }
        assert_eq!(
            field_of(&q.clone().task_id_prefix("x".repeat(MAX_ID_BYTES + 1))),
            "task_id_prefix"
        );
        let later = t + chrono::Duration::microseconds(1);
        assert_eq!(
            field_of(&q.clone().updated_after(later).updated_before(t)),
            "updated_before"
        );
        let far = Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).single().unwrap();
        assert_eq!(field_of(&q.clone().updated_after(far)), "updated_after");
        assert_eq!(field_of(&q.updated_before(far)), "updated_before");
    }

    #[test]
    fn timestamps_are_cut_to_microseconds_and_bounded() {
        let t = Utc
            .timestamp_opt(1_700_000_000, 123_456_789)
            .single()
            .unwrap();
        let cut = timestamp("ts", t).unwrap();
        assert_eq!(cut.timestamp_subsec_nanos(), 123_456_000);
        let far = Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).single().unwrap();
        assert!(timestamp("ts", far).is_err());
    }

    #[test]
    fn batches_keep_the_last_duplicate_and_sort_by_key() {
        let a = StepRecord::new("u", "b", 2, ok_result());
        let b = StepRecord::new("u", "a", 1, ok_result());
        let c = StepRecord::new("u", "b", 2, ok_result().with_status(TaskStatus::Failed));
        let records = [a, b, c];
        let p = prepare_batch(&records).unwrap();
        let keys: Vec<_> = p
            .iter()
            .map(|p| (p.task_id, p.step, p.result.status))
            .collect();
        assert_eq!(
            keys,
            [
                ("a", 1, TaskStatus::Completed),
                ("b", 2, TaskStatus::Failed)
            ]
        );
    }

    #[test]
    fn the_size_limit_is_the_exact_encoded_size() {
        // Worst case (all escaped) is far over the limit, the real encoding is just under.
        let fits = "a".repeat(MAX_RESULT_BYTES - 400);
        let r = TaskStepResult::success("s", json!(fits), "m");
        assert!(quoted_bound(&fits) > MAX_RESULT_BYTES);
        assert!(step_result("step_result", &r).is_ok());
        let over = TaskStepResult::success("s", json!("a".repeat(MAX_RESULT_BYTES)), "m");
        match step_result("step_result", &over) {
            Err(StoreError::InvalidInput { field, .. }) => assert_eq!(field, "step_result"),
            other => panic!("{other:?}"),
        }
        // Escapes count as what they encode to.
        let escaped =
            TaskStepResult::success("s", json!("\n".repeat(MAX_RESULT_BYTES / 2 + 1)), "m");
        assert!(step_result("step_result", &escaped).is_err());
    }

    #[test]
    fn batch_errors_name_the_record() {
        let records = [
            StepRecord::new("u", "t", 0, ok_result()),
            StepRecord::new("u", "t", -1, ok_result()),
        ];
        match prepare_batch(&records) {
            Err(StoreError::InvalidInput { field, .. }) => assert_eq!(field, "records[1].step"),
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn canonical_numbers_follow_jsonb() {
        assert_eq!(
            canonical_json(&json!(1e16)),
            json!(10_000_000_000_000_000_u64)
        );
        assert_eq!(
            canonical_json(&json!(-1e17)),
            json!(-100_000_000_000_000_000_i64)
        );
        assert_eq!(canonical_json(&json!(1e20)), json!(1e20));
        assert_eq!(canonical_json(&json!(1.5)), json!(1.5));
        assert_eq!(canonical_json(&json!(-0.0)).to_string(), "0.0");
        assert_eq!(
            canonical_json(&json!({"a": [1e16]})),
            json!({"a": [10_000_000_000_000_000_u64]})
        );
        // The shortest digits, then zeros (what jsonb keeps), not the float's exact binary
        // value (-55568384273091208): found by the differential test.
        assert_eq!(
            canonical_json(&json!(-5.556838427309121e16)),
            json!(-55_568_384_273_091_210_i64)
        );
    }
}
