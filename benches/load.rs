//! The load bench: the PostgreSQL store driven from N concurrent tokio tasks, each figure
//! paired in the same run with the best a user could do with the raw driver for the same
//! work: the store's exact SQL through tokio-postgres, prepared. Single saves have two
//! baselines, each named in its column: the raw driver combining concurrent saves as the
//! store does (as many lanes, the same combined statement, a lone save by the single-step
//! statement), so the ratio is the library's own overhead; and pgbench running the Python
//! service's plain INSERT, one commit per row (pgbench missing fails the bench). Reads are
//! pipelined on as many shared connections as the store shares (2); batches of new tasks
//! are compared with the same claim and a binary `COPY` sent in 1 MiB chunks, and the
//! upsert path with the same upsert statement. Store and baseline rounds alternate, each
//! going first in every other round. It prints ops/s, p50/p99 latency and the ratio
//! store/baseline: the headline, since absolute figures drift on shared machines.
//!
//! ```sh
//! cargo bench --bench load                       # full run (a few minutes)
//! BENCH_SHORT=1 cargo bench --bench load         # the ratio tables in a minute or two (CI)
//! BENCH_ONLY=reads,list cargo bench --bench load # some sections only (save, batch, compat,
//!                                                # watch, reads, list, cleanup, memory, peak)
//! ```
//!
//! The server is the tests' (TEST_DATABASE_URL, else 127.0.0.1:5432, else a throwaway one);
//! the bench works in its own schema and drops it at the end.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::VecDeque;
use std::future::Future;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, Utc};
use futures::SinkExt;
use serde_json::json;
use taskhistory::{
    CleanupOptions, DynStore, HistoryScan, MemoryStore, PgConfig, PgTaskHistoryStore, SslMode,
    StepRecord, TaskHistoryStore, TaskStatus, TaskStepResult,
};
use taskhistory_testing as testing;
use taskhistory_testing::sql;
use tokio::sync::{oneshot, Mutex, OwnedMutexGuard};
use tokio_postgres::types::{Json, ToSql, Type};
use tokio_postgres::{Client, NoTls, Statement};

mod common;

use common::{drive, drive_until, median, ms, round_secs, scaled, section, short, Sample};

/// One raw tokio-postgres connection with the store's statements prepared.
struct Raw {
    client: Client,
    save: Statement,
    save_one: Statement,
    save_combined: Statement,
    load: Statement,
    status: Statement,
    statuses: Statement,
    list: Statement,
}

/// A listing's rows decoded as the store decodes them (what a caller of the raw driver
/// reads from a page), so that the listing's baseline does the same work as the store's.
type SummaryTuple = (String, String, i32, i64, DateTime<Utc>, DateTime<Utc>);

fn summaries(rows: &[tokio_postgres::Row]) -> Vec<SummaryTuple> {
    rows.iter()
        .map(|row| {
            (
                row.get(0),
                row.get(1),
                row.get(2),
                row.get(3),
                row.get(4),
                row.get(5),
            )
        })
        .collect()
}

async fn raw_connect(url: &str, schema: &str) -> Raw {
    let mut config: tokio_postgres::Config = url.parse().unwrap();
    config.options(format!("-c search_path={schema}"));
    let (client, conn) = config.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    Raw {
        save: client.prepare(sql::SAVE_STEPS).await.unwrap(),
        save_one: client.prepare(sql::SAVE_STEP).await.unwrap(),
        save_combined: client.prepare(sql::SAVE_COMBINED).await.unwrap(),
        load: client.prepare(sql::LOAD_HISTORY).await.unwrap(),
        status: client.prepare(sql::TASK_STATUS).await.unwrap(),
        statuses: client.prepare(sql::TASK_STATUSES).await.unwrap(),
        list: client.prepare(sql::LIST_TASKS).await.unwrap(),
        client,
    }
}

/// Raw connections, each used by one worker at a time (`w % n`; no pipelining the store
/// does not do).
#[derive(Clone)]
struct RawPool(Arc<Vec<Mutex<Raw>>>);

impl RawPool {
    async fn new(url: &str, schema: &str, n: usize) -> Self {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(Mutex::new(raw_connect(url, schema).await));
        }
        RawPool(Arc::new(v))
    }
    fn get(&self, worker: usize) -> &Mutex<Raw> {
        &self.0[worker % self.0.len()]
    }
}

/// Raw connections shared by every worker, as the store shares its read connections: each
/// worker sends on `w % n` without waiting for the others, and tokio-postgres pipelines the
/// statements of one connection.
#[derive(Clone)]
struct SharedRaw(Arc<Vec<Raw>>);

impl SharedRaw {
    async fn new(url: &str, schema: &str, n: usize) -> Self {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(raw_connect(url, schema).await);
        }
        SharedRaw(Arc::new(v))
    }
    fn get(&self, worker: usize) -> &Raw {
        &self.0[worker % self.0.len()]
    }
}

/// The raw driver combining status checks as the store does (`combine/status.rs`), on the
/// same shared, pipelined connections as [`SharedRaw`], so that the store against it is the
/// library's own overhead: a check that finds no check queued and a lane free (as many
/// lanes as the store's status lanes) is read at once by `TASK_STATUS` in the caller's task;
/// otherwise it queues, and a lane's worker (a task of its own) reads every check queued at
/// that moment (at most 1,000) in one `TASK_STATUSES`, answers each caller, and goes on
/// until the queue is empty.
#[derive(Clone)]
struct RawStatuses(Arc<RawStatusState>);

/// A caller's task and where its status goes.
type QueuedCheck = (String, String, oneshot::Sender<String>);

struct RawStatusState {
    shared: SharedRaw,
    next: AtomicU64,
    lanes: Arc<tokio::sync::Semaphore>,
    queue: std::sync::Mutex<VecDeque<QueuedCheck>>,
    /// Statements sent and checks answered, to show how much was combined.
    statements: AtomicU64,
    checks: AtomicU64,
}

impl RawStatuses {
    fn new(shared: SharedRaw, lanes: usize) -> Self {
        RawStatuses(Arc::new(RawStatusState {
            shared,
            next: AtomicU64::new(0),
            lanes: Arc::new(tokio::sync::Semaphore::new(lanes.max(1))),
            queue: std::sync::Mutex::new(VecDeque::new()),
            statements: AtomicU64::new(0),
            checks: AtomicU64::new(0),
        }))
    }

    /// The next shared connection, in turn.
    fn conn(&self) -> &Raw {
        let n = self.0.next.fetch_add(1, Ordering::Relaxed) as usize;
        self.0.shared.get(n)
    }

    async fn check(&self, user: &str, task: &str) -> String {
        let lone = {
            let queue = self.0.queue.lock().unwrap();
            if queue.is_empty() {
                self.0.lanes.clone().try_acquire_owned().ok()
            } else {
                None
            }
        };
        if let Some(lane) = lone {
            let raw = self.conn();
            let row = raw.client.query_opt(&raw.status, &[&user, &task]).await;
            self.0.statements.fetch_add(1, Ordering::Relaxed);
            self.0.checks.fetch_add(1, Ordering::Relaxed);
            drop(lane);
            if !self.0.queue.lock().unwrap().is_empty() {
                self.start();
            }
            return row
                .unwrap()
                .map_or_else(|| "pending".to_owned(), |r| r.get(0));
        }
        let (done, answer) = oneshot::channel();
        self.0
            .queue
            .lock()
            .unwrap()
            .push_back((user.to_owned(), task.to_owned(), done));
        self.start();
        answer.await.unwrap()
    }

    fn start(&self) {
        if let Ok(lane) = self.0.lanes.clone().try_acquire_owned() {
            tokio::spawn(self.clone().work(lane));
        }
    }

    async fn work(self, lane: tokio::sync::OwnedSemaphorePermit) {
        let mut lane = Some(lane);
        loop {
            let batch = take_queued(&self.0.queue);
            if batch.is_empty() {
                drop(lane.take());
                if self.0.queue.lock().unwrap().is_empty() {
                    return;
                }
                match self.0.lanes.clone().try_acquire_owned() {
                    Ok(again) => {
                        lane = Some(again);
                        continue;
                    }
                    Err(_) => return,
                }
            }
            let raw = self.conn();
            let (users, tasks): (Vec<&str>, Vec<&str>) = batch
                .iter()
                .map(|(u, t, _)| (u.as_str(), t.as_str()))
                .unzip();
            let mut statuses = vec!["pending".to_owned(); batch.len()];
            if let [(user, task, _)] = batch.as_slice() {
                if let Some(row) = raw
                    .client
                    .query_opt(&raw.status, &[user, task])
                    .await
                    .unwrap()
                {
                    statuses[0] = row.get(0);
                }
            } else {
                for row in raw
                    .client
                    .query(&raw.statuses, &[&users, &tasks])
                    .await
                    .unwrap()
                {
                    let n: i64 = row.get(0);
                    if let Some(status) = row.get::<_, Option<String>>(1) {
                        statuses[(n - 1) as usize] = status;
                    }
                }
            }
            self.0.statements.fetch_add(1, Ordering::Relaxed);
            self.0
                .checks
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            for ((_, _, done), status) in batch.into_iter().zip(statuses) {
                let _ = done.send(status);
            }
        }
    }

    /// Statements sent and checks answered so far.
    fn counts(&self) -> (u64, u64) {
        (
            self.0.statements.load(Ordering::Relaxed),
            self.0.checks.load(Ordering::Relaxed),
        )
    }
}

/// What a raw combining lane takes for its next statement: every call queued, at most
/// 1,000, as the store's lanes.
fn take_queued<T>(queue: &std::sync::Mutex<VecDeque<T>>) -> Vec<T> {
    let mut queue = queue.lock().unwrap();
    let n = queue.len().min(1_000);
    queue.drain(..n).collect()
}

/// The store's side of the reads section's status checks: worker `w` checks its own task.
fn status_of_workers_task(
    store: &DynStore,
) -> impl Fn(u64, usize, u64) -> futures::future::BoxFuture<'static, ()> + Clone + Send + Sync + 'static
{
    let s = store.clone();
    move |_, w, _| {
        let s = s.clone();
        Box::pin(async move {
            let st = s
                .check_task_status("reader", &format!("task-{w:06}"))
                .await
                .unwrap();
            assert_eq!(st, TaskStatus::Running);
        })
    }
}

async fn raw_save(raw: &Raw, records: &[StepRecord]) {
    if let [r] = records {
        // One step: the store's scalar statement, as the store sends it.
        let params: [&(dyn ToSql + Sync); 6] = [
            &r.user_id,
            &r.task_id,
            &r.step,
            &Json(&r.result),
            &r.timestamp,
            &r.result.status.as_str(),
        ];
        raw.client.query(&raw.save_one, &params).await.unwrap();
        return;
    }
    let users: Vec<&str> = records.iter().map(|r| r.user_id.as_str()).collect();
    let tasks: Vec<&str> = records.iter().map(|r| r.task_id.as_str()).collect();
    let steps: Vec<i32> = records.iter().map(|r| r.step).collect();
    let results: Vec<Json<&TaskStepResult>> = records.iter().map(|r| Json(&r.result)).collect();
    let times: Vec<Option<DateTime<Utc>>> = records.iter().map(|r| r.timestamp).collect();
    let statuses: Vec<&str> = records.iter().map(|r| r.result.status.as_str()).collect();
    let params: [&(dyn ToSql + Sync); 6] = [&users, &tasks, &steps, &results, &times, &statuses];
    raw.client.query(&raw.save, &params).await.unwrap();
}

/// The raw driver combining single saves as the store does (`combine/save.rs`), so that the
/// store against it is the library's own overhead: a save joins a queue and takes a free
/// lane if there is one (as many lanes as the store's save lanes, each a tokio-postgres
/// connection of its own with the store's statements prepared). The lane's worker, a task
/// of its own, takes every save queued at that moment (at most 1,000, as the store), writes
/// them in key order in one statement (`SAVE_COMBINED`; a lone save `SAVE_STEP`, as the
/// store sends it) and answers each caller after the commit, then takes what queued
/// meanwhile, until the queue is empty. The bench's saves never repeat a step, so no save
/// is held back for a later statement (the store's rule for a step queued twice).
#[derive(Clone)]
struct RawCombiner(Arc<CombinerState>);

struct CombinerState {
    queue: std::sync::Mutex<VecDeque<(StepRecord, oneshot::Sender<()>)>>,
    lanes: Vec<Arc<Mutex<Raw>>>,
    /// Statements sent and saves written, to show how much was combined.
    statements: AtomicU64,
    saves: AtomicU64,
}

impl RawCombiner {
    async fn new(url: &str, schema: &str, lanes: usize) -> Self {
        let mut v = Vec::new();
        for _ in 0..lanes.max(1) {
            v.push(Arc::new(Mutex::new(raw_connect(url, schema).await)));
        }
        RawCombiner(Arc::new(CombinerState {
            queue: std::sync::Mutex::new(VecDeque::new()),
            lanes: v,
            statements: AtomicU64::new(0),
            saves: AtomicU64::new(0),
        }))
    }

    /// Saves one step; returns after the commit of the statement that took it. Like the
    /// store: a save that finds no save queued and a lane free is written at once in the
    /// caller's task (no hand-over); saves queue only when the lanes are busy.
    async fn save(&self, record: StepRecord) {
        let lone = {
            let queue = self.0.queue.lock().unwrap();
            if queue.is_empty() {
                self.free_lane()
            } else {
                None
            }
        };
        if let Some(lane) = lone {
            raw_save(&lane, std::slice::from_ref(&record)).await;
            self.0.statements.fetch_add(1, Ordering::Relaxed);
            self.0.saves.fetch_add(1, Ordering::Relaxed);
            drop(lane);
            // Saves that queued meanwhile get a lane's worker.
            if !self.0.queue.lock().unwrap().is_empty() {
                if let Some(lane) = self.free_lane() {
                    tokio::spawn(self.clone().work(lane));
                }
            }
            return;
        }
        let (done, answer) = oneshot::channel();
        self.0.queue.lock().unwrap().push_back((record, done));
        if let Some(lane) = self.free_lane() {
            tokio::spawn(self.clone().work(lane));
        }
        answer.await.unwrap();
    }

    fn free_lane(&self) -> Option<OwnedMutexGuard<Raw>> {
        self.0
            .lanes
            .iter()
            .find_map(|lane| lane.clone().try_lock_owned().ok())
    }

    /// Writes what is queued until the queue is empty, then frees the lane.
    async fn work(self, lane: OwnedMutexGuard<Raw>) {
        let mut lane = Some(lane);
        loop {
            let mut batch = take_queued(&self.0.queue);
            if batch.is_empty() {
                drop(lane.take());
                // A save queued after the take found no free lane: take one again unless
                // another worker already did.
                if self.0.queue.lock().unwrap().is_empty() {
                    return;
                }
                match self.free_lane() {
                    Some(again) => {
                        lane = Some(again);
                        continue;
                    }
                    None => return,
                }
            }
            // Key order: the order every writer locks tasks in.
            batch.sort_by(|(a, _), (b, _)| {
                (&a.user_id, &a.task_id, a.step).cmp(&(&b.user_id, &b.task_id, b.step))
            });
            let raw = lane.as_deref().unwrap();
            let (records, answers): (Vec<StepRecord>, Vec<_>) = batch.into_iter().unzip();
            if let [one] = records.as_slice() {
                raw_save(raw, std::slice::from_ref(one)).await;
            } else {
                let users: Vec<&str> = records.iter().map(|r| r.user_id.as_str()).collect();
                let tasks: Vec<&str> = records.iter().map(|r| r.task_id.as_str()).collect();
                let steps: Vec<i32> = records.iter().map(|r| r.step).collect();
                let results: Vec<Json<&TaskStepResult>> =
                    records.iter().map(|r| Json(&r.result)).collect();
                let times: Vec<Option<DateTime<Utc>>> = vec![None; records.len()];
                let statuses: Vec<&str> =
                    records.iter().map(|r| r.result.status.as_str()).collect();
                let params: [&(dyn ToSql + Sync); 6] =
                    [&users, &tasks, &steps, &results, &times, &statuses];
                let row = raw
                    .client
                    .query_one(&raw.save_combined, &params)
                    .await
                    .unwrap();
                let written: i64 = row.get("rows_written");
                assert_eq!(written as usize, records.len(), "every save written");
            }
            self.0.statements.fetch_add(1, Ordering::Relaxed);
            self.0
                .saves
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            for done in answers {
                let _ = done.send(());
            }
        }
    }

    /// (statements, saves) so far.
    fn counts(&self) -> (u64, u64) {
        (
            self.0.statements.load(Ordering::Relaxed),
            self.0.saves.load(Ordering::Relaxed),
        )
    }
}

/// The best raw `COPY` of a batch of new tasks (sorted by task, as `records` makes them),
/// doing what the store's `COPY` path does: in one transaction, the transaction time, the
/// same claim statement for the tasks' summaries, then the rows in binary `COPY` format
/// encoded by the driver's own `ToSql` and sent in 1 MiB chunks, the first encoded while the
/// server runs the claim.
async fn copy_rows(raw: &Raw, records: &[StepRecord]) {
    let client = &raw.client;
    client.batch_execute("BEGIN").await.unwrap();
    let now: DateTime<Utc> = client
        .query_one(sql::TRANSACTION_TIME, &[])
        .await
        .unwrap()
        .get(0);
    let tasks: Vec<&[StepRecord]> = records
        .chunk_by(|a, b| (&a.user_id, &a.task_id) == (&b.user_id, &b.task_id))
        .collect();
    let at = |r: &StepRecord| r.timestamp.unwrap_or(now);
    let users: Vec<&str> = tasks.iter().map(|t| t[0].user_id.as_str()).collect();
    let ids: Vec<&str> = tasks.iter().map(|t| t[0].task_id.as_str()).collect();
    let last: Vec<&StepRecord> = tasks
        .iter()
        .map(|t| t.iter().max_by_key(|r| r.step).unwrap())
        .collect();
    let statuses: Vec<&str> = last.iter().map(|r| r.result.status.as_str()).collect();
    let last_steps: Vec<i32> = last.iter().map(|r| r.step).collect();
    let counts: Vec<i64> = tasks.iter().map(|t| t.len() as i64).collect();
    let first: Vec<DateTime<Utc>> = tasks
        .iter()
        .map(|t| t.iter().map(at).min().unwrap())
        .collect();
    let latest: Vec<DateTime<Utc>> = tasks
        .iter()
        .map(|t| t.iter().map(at).max().unwrap())
        .collect();
    let params: [&(dyn ToSql + Sync); 7] = [
        &users,
        &ids,
        &statuses,
        &last_steps,
        &counts,
        &first,
        &latest,
    ];
    let field = |buf: &mut BytesMut, ty: &Type, v: &(dyn ToSql + Sync)| {
        let at = buf.len();
        buf.put_i32(0);
        v.to_sql_checked(ty, buf).unwrap();
        let len = (buf.len() - at - 4) as i32;
        buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
    };
    // Rows in binary COPY format, about 1 MiB at a time; `true` once all are encoded.
    let rows: Vec<(usize, &StepRecord)> = tasks
        .iter()
        .enumerate()
        .flat_map(|(t, task)| task.iter().map(move |r| (t, r)))
        .collect();
    let mut next = 0;
    let mut fill = |buf: &mut BytesMut| {
        while let Some((t, r)) = rows.get(next) {
            if buf.len() >= 1 << 20 {
                return false;
            }
            buf.put_i16(7);
            field(buf, &Type::TEXT, &r.user_id);
            field(buf, &Type::TEXT, &r.task_id);
            field(buf, &Type::INT4, &r.step);
            field(buf, &Type::JSONB, &Json(&r.result));
            field(buf, &Type::TIMESTAMPTZ, &at(r));
            field(buf, &Type::TEXT, &r.result.status.as_str());
            field(buf, &Type::TIMESTAMPTZ, &first[*t]);
            next += 1;
        }
        true
    };
    let mut buf = BytesMut::with_capacity(1 << 21);
    buf.put_slice(b"PGCOPY\n\xff\r\n\0");
    buf.put_i32(0);
    buf.put_i32(0);
    // The first chunk is encoded while the server runs the claim, as the store does.
    let (claim, mut done) =
        futures::join!(client.query_one(sql::CLAIM_NEW_TASKS, &params), async {
            fill(&mut buf)
        });
    let claimed: i64 = claim.unwrap().get("claimed");
    assert_eq!(claimed as usize, tasks.len());
    let sink = client
        .copy_in::<_, bytes::Bytes>(sql::COPY_STEPS)
        .await
        .unwrap();
    futures::pin_mut!(sink);
    while !done {
        sink.send(buf.split().freeze()).await.unwrap();
        done = fill(&mut buf);
    }
    buf.put_i16(-1);
    sink.send(buf.freeze()).await.unwrap();
    sink.finish().await.unwrap();
    client.batch_execute("COMMIT").await.unwrap();
}

fn step_result(i: u64) -> TaskStepResult {
    TaskStepResult::running(
        "data_processing",
        json!({"processed_rows": i, "progress": 0.5, "stage": "transform"}),
        "Step running",
    )
}

fn records(user: &str, tasks: usize, steps: usize, at: Option<DateTime<Utc>>) -> Vec<StepRecord> {
    let mut v = Vec::with_capacity(tasks * steps);
    for t in 0..tasks {
        for s in 0..steps {
            let mut r = StepRecord::new(
                user,
                format!("task-{t:06}"),
                s as i32,
                step_result(s as u64),
            );
            r.timestamp = at;
            v.push(r);
        }
    }
    v
}

async fn seed(store: &PgTaskHistoryStore, records: &[StepRecord]) {
    for chunk in records.chunks(50_000) {
        store.save_batch_task_history(chunk).await.unwrap();
    }
}

struct Row {
    name: String,
    store: String,
    baseline: String,
    ratio: String,
}

/// The single saves' table: two baselines, each named in its column header.
const SAVE_HEADER: [&str; 6] = [
    "workload",
    "store",
    "raw tokio-postgres combining like the store (same lanes; SAVE_COMBINED, a lone save SAVE_STEP)",
    "store / raw combining",
    "pgbench: the seed's plain INSERT, one commit per row",
    "store / pgbench",
];

struct Report {
    rows: Vec<Row>,
    /// The single saves' rows, in [`SAVE_HEADER`]'s columns.
    saves: Vec<[String; 6]>,
}

impl Report {
    fn add(&mut self, name: &str, store: String, baseline: String, ratio: String) {
        println!("{name:<44} {store:<34} {baseline:<34} {ratio}");
        std::io::stdout().flush().ok();
        self.rows.push(Row {
            name: name.into(),
            store,
            baseline,
            ratio,
        });
    }

    fn add_save(&mut self, row: [String; 6]) {
        for (header, value) in SAVE_HEADER.iter().zip(&row) {
            println!("  {header}: {value}");
        }
        std::io::stdout().flush().ok();
        self.saves.push(row);
    }

    fn markdown(&self) -> String {
        let mut s = String::new();
        if !self.saves.is_empty() {
            s.push_str(&format!("| {} |\n", SAVE_HEADER.join(" | ")));
            s.push_str(&format!("|{}\n", "---|".repeat(SAVE_HEADER.len())));
            for r in &self.saves {
                s.push_str(&format!("| {} |\n", r.join(" | ")));
            }
            s.push('\n');
        }
        if !self.rows.is_empty() {
            s.push_str(
                "| workload | store | baseline (named in each row) | ratio |\n|---|---|---|---|\n",
            );
            for r in &self.rows {
                s.push_str(&format!(
                    "| {} | {} | {} | {} |\n",
                    r.name, r.store, r.baseline, r.ratio
                ));
            }
        }
        s
    }
}

fn describe(s: &Sample) -> String {
    format!(
        "{:.0}/s p50 {:.2} p99 {:.2} ms",
        s.rate(),
        ms(s.pct(0.5)),
        ms(s.pct(0.99))
    )
}

/// Alternates store and baseline rounds (three each; the store goes first in rounds 0 and 2,
/// the baseline in round 1): the samples of each.
async fn paired<S, SF, B, BF>(store_op: S, base_op: B, workers: usize) -> (Vec<Sample>, Vec<Sample>)
where
    S: Fn(u64, usize, u64) -> SF + Send + Sync + Clone + 'static,
    SF: Future<Output = ()> + Send,
    B: Fn(u64, usize, u64) -> BF + Send + Sync + Clone + 'static,
    BF: Future<Output = ()> + Send,
{
    let (mut ss, mut bs) = (Vec::new(), Vec::new());
    for round in 0..3u64 {
        for store_turn in [round % 2 == 0, round % 2 == 1] {
            if store_turn {
                let op = store_op.clone();
                ss.push(drive(workers, round_secs(), move |w, i| op(round, w, i)).await);
            } else {
                let op = base_op.clone();
                bs.push(drive(workers, round_secs(), move |w, i| op(round, w, i)).await);
            }
        }
    }
    (ss, bs)
}

/// [`paired`] rounds, reported as one row: the median rate of each and their ratio.
async fn compare<S, SF, B, BF>(
    report: &mut Report,
    name: &str,
    store_op: S,
    base_op: B,
    workers: usize,
) -> (f64, Sample)
where
    S: Fn(u64, usize, u64) -> SF + Send + Sync + Clone + 'static,
    SF: Future<Output = ()> + Send,
    B: Fn(u64, usize, u64) -> BF + Send + Sync + Clone + 'static,
    BF: Future<Output = ()> + Send,
{
    let (ss, bs) = paired(store_op, base_op, workers).await;
    let rs = median(ss.iter().map(Sample::rate).collect());
    let rb = median(bs.iter().map(Sample::rate).collect());
    let (s, b) = (Sample::merge(&ss), Sample::merge(&bs));
    report.add(
        name,
        format!(
            "{rs:.0}/s p50 {:.2} p99 {:.2} ms",
            ms(s.pct(0.5)),
            ms(s.pct(0.99))
        ),
        format!(
            "{rb:.0}/s p50 {:.2} p99 {:.2} ms",
            ms(b.pct(0.5)),
            ms(b.pct(0.99))
        ),
        format!("{:.2}", rs / rb),
    );
    (rs, s)
}

/// Ends the bench with `message` on stderr and exit status 1.
fn fail(message: &str) -> ! {
    eprintln!("load bench failed: {message}");
    std::process::exit(1)
}

/// pgbench: beside the server's binaries (`/usr/lib/postgresql/<version>/bin`), else on the
/// `PATH`.
fn find_pgbench() -> Result<std::path::PathBuf, String> {
    let mut found: Vec<std::path::PathBuf> = testing::postgres_bin_dir()
        .into_iter()
        .chain(
            std::fs::read_dir("/usr/lib/postgresql")
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .map(|e| e.path().join("bin")),
        )
        .map(|bin| bin.join("pgbench"))
        .filter(|p| p.exists())
        .collect();
    if found.is_empty() {
        found.push("pgbench".into());
    }
    let bin = found.swap_remove(0);
    match std::process::Command::new(&bin).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(bin),
        _ => Err(
            "pgbench (the single saves' second baseline) was not found under \
             /usr/lib/postgresql/<version>/bin nor on the PATH. Install it: on Debian 12 it \
             ships with the server package (apt-get install postgresql, which \
             scripts/ensure-postgres.sh installs; pgbench is in postgresql-15); elsewhere, the \
             package your distribution ships pgbench in. Or leave single saves out: \
             BENCH_ONLY=batch,compat,watch,reads,list"
                .to_owned(),
        ),
    }
}

/// pgbench (PostgreSQL's own load tool) running the Python service's plain one-row INSERT
/// (the seed's `save_task_history` statement, its six columns; pgbench's variables make
/// the values), prepared, one commit per row, into a table made as the Python service makes
/// it (with its six indexes), for `secs` seconds with `clients` connections: (rows/s,
/// average latency in ms). An error says why pgbench gave no figure.
fn pgbench_plain_insert(
    bin: &std::path::Path,
    url: &str,
    schema: &str,
    clients: usize,
    secs: u64,
) -> Result<(f64, f64), String> {
    let config: tokio_postgres::Config = url.parse().map_err(|e| format!("{e}"))?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let script = std::env::temp_dir().join(format!("th-pgbench-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        "\\set t random(1, 100000)\n\\set s random(0, 19)\n\
         INSERT INTO python_task_history (user_id, task_id, step, result, timestamp, status) \
         VALUES ('u' || :client_id, 't' || :t, :s, '{\"step_name\": \"s\", \"status\": \"running\", \"result\": {\"i\": 1}, \"message\": \"\"}', now(), 'running');\n",
    )
    .map_err(|e| format!("cannot write pgbench's script: {e}"))?;
    let mut cmd = std::process::Command::new(bin);
    cmd.args(["-n", "-M", "prepared", "-j", "2"])
        .args(["-c", &clients.to_string(), "-T", &secs.to_string()])
        .args(["-h", &host, "-p", &port.to_string()])
        .arg("-f")
        .arg(&script)
        .env("PGOPTIONS", format!("-c search_path={schema}"));
    if let Some(user) = config.get_user() {
        cmd.args(["-U", user]);
    }
    if let Some(password) = config.get_password() {
        cmd.env("PGPASSWORD", String::from_utf8_lossy(password).into_owned());
    }
    cmd.arg(config.get_dbname().unwrap_or("postgres"));
    let out = cmd.output();
    let _ = std::fs::remove_file(&script);
    let out = out.map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let number = |prefix: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
    };
    match (
        out.status.success(),
        number("tps = "),
        number("latency average = "),
    ) {
        (true, Some(tps), Some(latency)) => Ok((tps, latency)),
        _ => Err(format!(
            "pgbench gave no figure ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|n| n.parse().unwrap_or(0)))
        })
        .unwrap_or(0)
}

/// Child-process mode: one operation, then its peak resident memory on stdout.
async fn peak_child(what: &str) {
    let url = std::env::var("BENCH_URL").unwrap();
    let schema = std::env::var("BENCH_SCHEMA").unwrap();
    let config = PgConfig::from_url(&url)
        .unwrap()
        .ssl_mode(SslMode::Disable)
        .schema(schema)
        .pool_size(1, 2);
    let store = PgTaskHistoryStore::connect(config).await.unwrap();
    match what {
        "idle" => {}
        "records" => {
            let r = records("peak-batch", 1, 50_000, None);
            std::hint::black_box(&r);
        }
        "batch" => {
            let r = records("peak-batch", 1, 50_000, None);
            store.save_batch_task_history(&r).await.unwrap();
        }
        "export" => {
            // The loop `taskhistory export` runs: a page at a time, one JSON line per step.
            let mut out = std::io::BufWriter::new(std::io::sink());
            let mut scan = HistoryScan::all(5_000);
            let mut n = 0u64;
            loop {
                let page = store.scan_history("export-user", &scan).await.unwrap();
                for r in &page.steps {
                    serde_json::to_writer(&mut out, r).unwrap();
                    out.write_all(b"\n").unwrap();
                    n += 1;
                }
                match page.next {
                    Some(k) => scan = scan.after(Some(k)),
                    None => break,
                }
            }
            eprintln!("exported {n} steps");
        }
        other => panic!("unknown peak mode {other}"),
    }
    println!("{}", peak_rss_kib());
}

fn peak_of(url: &str, schema: &str, what: &str) -> u64 {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--peak", what])
        .env("BENCH_URL", url)
        .env("BENCH_SCHEMA", schema)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if let Some(pos) = args.iter().position(|a| a == "--peak") {
        rt.block_on(peak_child(&args[pos + 1]));
        return;
    }
    // `cargo bench` passes `--bench`; a filter-only run (`cargo test --benches`) does nothing.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    rt.block_on(run());
}

async fn run() {
    // pgbench is the single saves' second baseline: without it the bench fails (before it
    // makes anything on the server) instead of leaving that baseline out.
    let pgbench = if section("save") {
        Some(find_pgbench().unwrap_or_else(|e| fail(&e)))
    } else {
        None
    };
    let url = testing::database_url().await;
    let schema = format!("bench_{}", std::process::id());
    let config = PgConfig::from_url(&url)
        .unwrap()
        .ssl_mode(SslMode::Disable)
        .schema(schema.clone())
        .pool_size(10, 20)
        .notifications(std::env::var_os("BENCH_NOTIFY_OFF").is_none());
    // BENCH_SAVE_LANES: the store's save lanes (default: the store's default).
    let config = match std::env::var("BENCH_SAVE_LANES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(lanes) => config.save_lanes(lanes),
        None => config,
    };
    let pg = testing::store_for(config).await;
    let store: DynStore = Arc::new(pg.clone());
    let admin = raw_connect(&url, &schema).await;
    let mut report = Report {
        rows: Vec::new(),
        saves: Vec::new(),
    };

    if let Some(pgbench) = pgbench {
        // The Python service's table, for pgbench's plain INSERT.
        admin
            .client
            .batch_execute(
                "CREATE TABLE python_task_history (id SERIAL PRIMARY KEY, user_id TEXT NOT NULL, \
                 task_id TEXT NOT NULL, step INTEGER NOT NULL, result JSONB NOT NULL, \
                 timestamp TIMESTAMP NOT NULL, status TEXT NOT NULL DEFAULT 'pending');
                 CREATE INDEX ON python_task_history (user_id);
                 CREATE INDEX ON python_task_history (task_id);
                 CREATE INDEX ON python_task_history (status);
                 CREATE INDEX ON python_task_history (timestamp);
                 CREATE INDEX ON python_task_history (user_id, task_id);
                 CREATE INDEX ON python_task_history (user_id, timestamp DESC);",
            )
            .await
            .unwrap();
        // Single saves at concurrency 1, 8, 32: the store, the raw driver combining saves on
        // as many lanes as the store's, and pgbench's plain INSERT with as many connections.
        let lanes = pg.config().get_save_lanes() as usize;
        for c in [1usize, 8, 32] {
            let raw = RawCombiner::new(&url, &schema, lanes).await;
            // The store's statements (attempts) during its rounds: only saves run on it.
            let queries_before = pg.metrics().queries;
            // Three rounds; in each the store, the raw driver and pgbench take turns, in an
            // order rotating by round (pgbench runs whole seconds: at least one).
            let pgbench_secs = round_secs().as_secs_f64().ceil().max(1.0) as u64;
            let (mut ss, mut bs, mut pgs) = (Vec::new(), Vec::new(), Vec::new());
            for round in 0..3u64 {
                for turn in 0..3 {
                    match (round + turn) % 3 {
                        0 => {
                            let s = store.clone();
                            ss.push(
                                drive(c, round_secs(), move |w, i| {
                                    let s = s.clone();
                                    async move {
                                        let (user, task) =
                                            (format!("s{c}-{round}-{w}"), format!("t{}", i / 20));
                                        s.save_task_history(
                                            &user,
                                            &task,
                                            (i % 20) as i32,
                                            &step_result(i),
                                        )
                                        .await
                                        .unwrap();
                                    }
                                })
                                .await,
                            );
                        }
                        1 => {
                            let raw = raw.clone();
                            bs.push(
                                drive(c, round_secs(), move |w, i| {
                                    let raw = raw.clone();
                                    async move {
                                        raw.save(StepRecord::new(
                                            format!("r{c}-{round}-{w}"),
                                            format!("t{}", i / 20),
                                            (i % 20) as i32,
                                            step_result(i),
                                        ))
                                        .await;
                                    }
                                })
                                .await,
                            );
                        }
                        _ => pgs.push(
                            pgbench_plain_insert(&pgbench, &url, &schema, c, pgbench_secs)
                                .unwrap_or_else(|e| fail(&e)),
                        ),
                    }
                }
            }
            let (rs, rb) = (
                median(ss.iter().map(Sample::rate).collect()),
                median(bs.iter().map(Sample::rate).collect()),
            );
            let (tps, latency) = (
                median(pgs.iter().map(|p| p.0).collect()),
                median(pgs.iter().map(|p| p.1).collect()),
            );
            let (s, b) = (Sample::merge(&ss), Sample::merge(&bs));
            let store_statements = pg.metrics().queries - queries_before;
            let (raw_statements, raw_saves) = raw.counts();
            report.add_save([
                format!("save_task_history, {c} concurrent"),
                format!(
                    "{rs:.0}/s p50 {:.2} p99 {:.2} ms; {:.1} saves a statement",
                    ms(s.pct(0.5)),
                    ms(s.pct(0.99)),
                    s.ops as f64 / store_statements.max(1) as f64
                ),
                format!(
                    "{rb:.0}/s p50 {:.2} p99 {:.2} ms; {:.1} saves a statement",
                    ms(b.pct(0.5)),
                    ms(b.pct(0.99)),
                    raw_saves as f64 / raw_statements.max(1) as f64
                ),
                format!("{:.2}", rs / rb),
                format!("{tps:.0}/s avg {latency:.2} ms"),
                format!("{:.2}", rs / tps),
            ]);
        }
    }
    let others = [
        "batch", "compat", "watch", "reads", "list", "cleanup", "memory", "peak",
    ];
    if others.iter().any(|name| section(name)) {
        println!(
            "{:<44} {:<34} {:<34} ratio",
            "workload", "store", "baseline (named in each row)"
        );
    }
    if section("batch") {
        // Batches of new tasks, both paths of the store against the same work raw: the
        // default store (`COPY` from 1,000 steps) against the best raw `COPY` with the same
        // claim, and a store with `COPY` off against the same upsert statement.
        let upsert_config = PgConfig::from_url(&url)
            .unwrap()
            .ssl_mode(SslMode::Disable)
            .schema(schema.clone())
            .pool_size(2, 4)
            .copy_min_rows(None)
            .notifications(false);
        let upsert: DynStore = Arc::new(PgTaskHistoryStore::connect(upsert_config).await.unwrap());
        // The short mode keeps the full size of the small batch: scaled down it would fall
        // under `copy_min_rows` and compare another path.
        let sizes: &[(usize, usize)] = if short() {
            &[(5_000, 4)]
        } else {
            &[(5_000, 6), (50_000, 3)]
        };
        for &(size, rounds) in sizes {
            let (mut st, mut cp, mut su, mut rw) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for round in 0..rounds {
                // The four go in a rotating order, so none always follows the same one.
                for k in 0..4 {
                    let user = format!("batch-{k}-{size}-{round}");
                    let batch = records(&user, size / 10, 10, None);
                    let t = Instant::now();
                    let into = match (round + k) % 4 {
                        0 => {
                            store.save_batch_task_history(&batch).await.unwrap();
                            &mut st
                        }
                        1 => {
                            copy_rows(&admin, &batch).await;
                            &mut cp
                        }
                        2 => {
                            upsert.save_batch_task_history(&batch).await.unwrap();
                            &mut su
                        }
                        _ => {
                            if batch.len() > 10_000 {
                                admin.client.batch_execute("BEGIN").await.unwrap();
                                for chunk in batch.chunks(10_000) {
                                    raw_save(&admin, chunk).await;
                                }
                                admin.client.batch_execute("COMMIT").await.unwrap();
                            } else {
                                raw_save(&admin, &batch).await;
                            }
                            &mut rw
                        }
                    };
                    into.push(size as f64 / t.elapsed().as_secs_f64());
                }
            }
            let (st, cp, su, rw) = (median(st), median(cp), median(su), median(rw));
            report.add(
                &format!("save_batch_task_history, {size} new steps: COPY path"),
                format!("{st:.0} rows/s"),
                format!("raw claim + COPY {cp:.0} rows/s"),
                format!("{:.2}", st / cp),
            );
            report.add(
                &format!("save_batch_task_history, {size} new steps: upsert path (COPY off)"),
                format!("{su:.0} rows/s"),
                format!("same upsert SQL {rw:.0} rows/s"),
                format!("{:.2}", su / rw),
            );
        }
        upsert.close().await;
    }
    if section("compat") {
        // The Python compatibility mode costs the store's own writes (almost) nothing: the
        // same saves on the same table with the mode switched on and off between rounds
        // (order alternating), median of each.
        let rounds = 6u64;
        let sizes = [(5_000usize, "COPY path"), (500, "upsert path")];
        let mut single: Vec<[Vec<f64>; 2]> = vec![Default::default(); 2];
        let mut batches: Vec<[Vec<f64>; 2]> = vec![Default::default(); sizes.len()];
        for round in 0..rounds {
            for on in [round % 2 == 0, round % 2 == 1] {
                if on {
                    pg.enable_python_compat().await.unwrap();
                } else {
                    pg.disable_python_compat().await.unwrap();
                }
                let mode = usize::from(on);
                for (k, c) in [1usize, 8].into_iter().enumerate() {
                    let s = store.clone();
                    let sample = drive(c, round_secs(), move |w, i| {
                        let s = s.clone();
                        async move {
                            let (user, task) = (
                                format!("compat{mode}-{c}-{round}-{w}"),
                                format!("t{}", i / 20),
                            );
                            s.save_task_history(&user, &task, (i % 20) as i32, &step_result(i))
                                .await
                                .unwrap();
                        }
                    })
                    .await;
                    single[k][mode].push(sample.rate());
                }
                for (k, &(size, _)) in sizes.iter().enumerate() {
                    for n in 0..3 {
                        let user = format!("compat-batch{mode}-{size}-{round}-{n}");
                        let batch = records(&user, size / 10, 10, None);
                        let t = Instant::now();
                        store.save_batch_task_history(&batch).await.unwrap();
                        batches[k][mode].push(size as f64 / t.elapsed().as_secs_f64());
                    }
                }
            }
        }
        pg.disable_python_compat().await.unwrap();
        for (k, c) in [1usize, 8].into_iter().enumerate() {
            let (off, on) = (median(single[k][0].clone()), median(single[k][1].clone()));
            report.add(
                &format!("python compat on: save_task_history, {c} concurrent"),
                format!("{on:.0}/s"),
                format!("compat off {off:.0}/s"),
                format!("{:.2}", on / off),
            );
        }
        for (k, &(size, path)) in sizes.iter().enumerate() {
            let (off, on) = (median(batches[k][0].clone()), median(batches[k][1].clone()));
            report.add(
                &format!("python compat on: batch of {size} new steps ({path})"),
                format!("{on:.0} rows/s"),
                format!("compat off {off:.0} rows/s"),
                format!("{:.2}", on / off),
            );
        }
    }
    if section("watch") {
        // The write path with watching on (100 watchers reading what they are told about)
        // against the same store with notifications off.
        let off_config = PgConfig::from_url(&url)
            .unwrap()
            .ssl_mode(SslMode::Disable)
            .schema(schema.clone())
            .pool_size(10, 20)
            .notifications(false);
        let off: DynStore = Arc::new(PgTaskHistoryStore::connect(off_config).await.unwrap());
        let mut drains = Vec::new();
        let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
        for k in 0..100 {
            let mut events = pg.watch_user(&format!("watched-{k}"), None).await.unwrap();
            let received = received.clone();
            drains.push(tokio::spawn(async move {
                while let Some(Ok(_)) = futures::StreamExt::next(&mut events).await {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        let on_saves = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let queries_before = pg.metrics().queries;
        for c in [1usize, 8, 32] {
            let (on, off, counted) = (store.clone(), off.clone(), on_saves.clone());
            compare(
                &mut report,
                &format!("save_task_history, {c} concurrent: watching on (100 watchers) / off"),
                move |round, w, i| {
                    let (on, counted) = (on.clone(), counted.clone());
                    async move {
                        on.save_task_history(
                            &format!("watched-{w}"),
                            &format!("on{round}-{}", i / 20),
                            (i % 20) as i32,
                            &step_result(i),
                        )
                        .await
                        .unwrap();
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                },
                move |round, w, i| {
                    let off = off.clone();
                    async move {
                        // Users nobody watches.
                        off.save_task_history(
                            &format!("unwatched-{w}"),
                            &format!("off{round}-{}", i / 20),
                            (i % 20) as i32,
                            &step_result(i),
                        )
                        .await
                        .unwrap();
                    }
                },
                c,
            )
            .await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let saves = on_saves.load(Ordering::Relaxed);
        let m = pg.metrics();
        println!(
            "  watchers received {} events for {saves} saves of the watching store; reads of \
             the log: {} by the store's one tail, {} by watchers catching up ({} statements in \
             all since the section began)",
            received.load(Ordering::Relaxed),
            m.tail_reads,
            m.watcher_reads,
            m.queries - queries_before
        );
        for d in drains {
            d.abort();
        }
        // Delivery: a write of another store (as another process would make it), then the
        // time until a watcher of this one, reading all along, has it; woken by the
        // notification, and with the writer's notifications off (the poll alone,
        // DB_WATCH_POLL's default of 1 s). Writes 100 ms apart are each read on their own;
        // 10 ms apart, a busy watcher reads at most every 50 ms (watch.rs, MIN_READ_GAP).
        let short = common::short();
        for (label, notify, writes, gap) in [
            (
                "woken by notification",
                true,
                if short { 20 } else { 100 },
                100,
            ),
            (
                "woken by notification",
                true,
                if short { 50 } else { 300 },
                10,
            ),
            ("poll only (writer's notifications off)", false, 10, 300),
        ] {
            let writer_config = PgConfig::from_url(&url)
                .unwrap()
                .ssl_mode(SslMode::Disable)
                .schema(schema.clone())
                .pool_size(1, 4)
                .notifications(notify);
            let writer = PgTaskHistoryStore::connect(writer_config).await.unwrap();
            let user = format!("latency-{notify}-{gap}");
            let mut events = pg.watch_user(&user, None).await.unwrap();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let consumer = tokio::spawn(async move {
                while let Some(Ok(e)) = futures::StreamExt::next(&mut events).await {
                    let _ = tx.send((e.step, Instant::now()));
                }
            });
            let mut acked = Vec::with_capacity(writes);
            for i in 0..writes {
                writer
                    .save_task_history(&user, "t", i as i32, &step_result(i as u64))
                    .await
                    .unwrap();
                acked.push(Instant::now());
                tokio::time::sleep(std::time::Duration::from_millis(gap)).await;
            }
            let mut latencies = Vec::with_capacity(writes);
            while latencies.len() < writes {
                let (step, at) = rx.recv().await.unwrap();
                latencies.push(at.saturating_duration_since(acked[step as usize]));
            }
            consumer.abort();
            latencies.sort();
            let pct = |q: f64| ms(latencies[((latencies.len() - 1) as f64 * q) as usize]);
            report.add(
                &format!("watch: delivery after the ack, {label}"),
                format!("p50 {:.1} ms p99 {:.1} ms", pct(0.5), pct(0.99)),
                format!("{writes} writes, {gap} ms apart"),
                "-".to_owned(),
            );
            writer.close().await;
        }
    }
    if section("reads") {
        // Reads: 16 tasks of 50 steps.
        seed(&pg, &records("reader", 16, 50, None)).await;
        // As many shared, pipelined connections as the store shares for reads.
        let raw = SharedRaw::new(
            &url,
            &schema,
            pg.config().get_pipelined_reads().max(1) as usize,
        )
        .await;
        let (s, r) = (store.clone(), raw.clone());
        compare(
            &mut report,
            "load_task_history (50 steps), 16 concurrent",
            move |_, w, _| {
                let s = s.clone();
                async move {
                    let h = s
                        .load_task_history("reader", &format!("task-{w:06}"))
                        .await
                        .unwrap();
                    assert_eq!(h.len(), 50);
                }
            },
            move |_, w, _| {
                let r = r.clone();
                async move {
                    let raw = r.get(w);
                    let rows = raw
                        .client
                        .query(&raw.load, &[&"reader", &format!("task-{w:06}")])
                        .await
                        .unwrap();
                    let parsed: Vec<(i32, Json<TaskStepResult>, DateTime<Utc>, String)> = rows
                        .iter()
                        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
                        .collect();
                    assert_eq!(parsed.len(), 50);
                }
            },
            16,
        )
        .await;
        let r = raw.clone();
        compare(
            &mut report,
            "check_task_status, 16 concurrent: raw driver pipelined, a statement a check",
            status_of_workers_task(&store),
            move |_, w, _| {
                let r = r.clone();
                async move {
                    let raw = r.get(w);
                    let row = raw
                        .client
                        .query_opt(&raw.status, &[&"reader", &format!("task-{w:06}")])
                        .await
                        .unwrap();
                    let status: String = row.unwrap().get(0);
                    assert_eq!(status, "running");
                }
            },
            16,
        )
        .await;
        // The same against the raw driver combining checks like the store (same lanes, same
        // shared connections): what the library itself adds when both combine.
        let combining = RawStatuses::new(raw.clone(), pg.config().get_status_lanes() as usize);
        let queries_before = pg.metrics().queries;
        let r = combining.clone();
        let (_, store_sample) = compare(
            &mut report,
            "check_task_status, 16 concurrent: raw driver combining like the store",
            status_of_workers_task(&store),
            move |_, w, _| {
                let r = r.clone();
                async move {
                    let status = r.check("reader", &format!("task-{w:06}")).await;
                    assert_eq!(status, "running");
                }
            },
            16,
        )
        .await;
        let store_statements = pg.metrics().queries - queries_before;
        let (raw_statements, raw_checks) = combining.counts();
        report.add(
            "check_task_status, 16 concurrent: checks a statement",
            format!(
                "store {:.1}",
                store_sample.ops as f64 / store_statements.max(1) as f64
            ),
            format!(
                "raw combining {:.1}",
                raw_checks as f64 / raw_statements.max(1) as f64
            ),
            "-".to_owned(),
        );
        // One caller at a time: nothing to combine, each call's own cost.
        for (name, load) in [
            ("check_task_status, 1 concurrent", false),
            ("load_task_history (50 steps), 1 concurrent", true),
        ] {
            let (s, r) = (store.clone(), raw.clone());
            compare(
                &mut report,
                name,
                move |_, _, i| {
                    let s = s.clone();
                    async move {
                        let task = format!("task-{:06}", i % 16);
                        if load {
                            assert_eq!(
                                s.load_task_history("reader", &task).await.unwrap().len(),
                                50
                            );
                        } else {
                            assert_eq!(
                                s.check_task_status("reader", &task).await.unwrap(),
                                TaskStatus::Running
                            );
                        }
                    }
                },
                move |_, _, i| {
                    let r = r.clone();
                    async move {
                        let raw = r.get(0);
                        let task = format!("task-{:06}", i % 16);
                        if load {
                            let rows = raw
                                .client
                                .query(&raw.load, &[&"reader", &task])
                                .await
                                .unwrap();
                            let parsed: Vec<(i32, Json<TaskStepResult>, DateTime<Utc>, String)> =
                                rows.iter()
                                    .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
                                    .collect();
                            assert_eq!(parsed.len(), 50);
                        } else {
                            let row = raw
                                .client
                                .query_opt(&raw.status, &[&"reader", &task])
                                .await
                                .unwrap();
                            let status: String = row.unwrap().get(0);
                            assert_eq!(status, "running");
                        }
                    }
                },
                1,
            )
            .await;
        }
    }
    if section("list") {
        // Listings: a user with 2,000 steps and one with 40,000 (10 steps a task), then the
        // second again among many small users.
        let raw = RawPool::new(&url, &schema, 1).await;
        seed(&pg, &records("list-2k", 200, 10, None)).await;
        seed(&pg, &records("list-40k", scaled(4_000), 10, None)).await;
        admin.client.batch_execute("ANALYZE").await.unwrap();
        let mut p50 = Vec::new();
        for (user, crowd) in [("list-2k", false), ("list-40k", false), ("list-40k", true)] {
            if crowd {
                // Then among 2,000 users of 10 tasks: PostgreSQL's cached generic plan is
                // made for the average user, and must still read a big user's page from
                // the ordered index (a literal LIMIT once made it sort all 4,000 tasks).
                let small: Vec<StepRecord> = (0..2_000)
                    .flat_map(|u| records(&format!("list-small-{u}"), 10, 1, None))
                    .collect();
                seed(&pg, &small).await;
                admin.client.batch_execute("ANALYZE").await.unwrap();
            }
            let label = if crowd {
                format!("{user} among 2,000 users of 10 tasks")
            } else {
                user.to_owned()
            };
            let (s, r) = (store.clone(), raw.clone());
            let mut ss = Vec::new();
            let mut bs = Vec::new();
            for _ in 0..3 {
                let s2 = s.clone();
                ss.push(
                    drive(1, round_secs(), move |_, _| {
                        let s = s2.clone();
                        async move {
                            assert_eq!(s.get_user_tasks(user, 50).await.unwrap().len(), 50);
                        }
                    })
                    .await,
                );
                let r2 = r.clone();
                bs.push(
                    drive(1, round_secs(), move |_, _| {
                        let r = r2.clone();
                        async move {
                            let raw = r.get(0).lock().await;
                            let rows = raw.client.query(&raw.list, &[&user, &51i64]).await.unwrap();
                            assert_eq!(summaries(&rows).len(), 51);
                        }
                    })
                    .await,
                );
            }
            let (s, b) = (Sample::merge(&ss), Sample::merge(&bs));
            p50.push(s.pct(0.5));
            report.add(
                &format!("get_user_tasks(50), user with {label}"),
                describe(&s),
                describe(&b),
                format!(
                    "{:.2}",
                    median(ss.iter().map(Sample::rate).collect())
                        / median(bs.iter().map(Sample::rate).collect())
                ),
            );
        }
        report.add(
            "get_user_tasks p50: 40k-step user / 2k-step user",
            format!("{:.3} / {:.3} ms", ms(p50[1]), ms(p50[0])),
            "-".into(),
            format!("{:.2}", p50[1].as_secs_f64() / p50[0].as_secs_f64()),
        );
    }
    if section("cleanup") {
        // Cleanup of 250,000 expired steps out of 500,000 while 8 writers save.
        let half = scaled(25_000);
        let old = Utc::now() - chrono::Duration::days(60);
        for u in 0..10 {
            seed(
                &pg,
                &records(&format!("cleanup-old-{u}"), half / 10, 10, Some(old)),
            )
            .await;
            seed(
                &pg,
                &records(&format!("cleanup-new-{u}"), half / 10, 10, None),
            )
            .await;
        }
        admin.client.batch_execute("ANALYZE").await.unwrap();
        let writers = |tag: &'static str, stop: Arc<AtomicBool>| {
            let s = store.clone();
            tokio::spawn(drive_until(8, stop, move |w, i| {
                let s = s.clone();
                async move {
                    s.save_task_history(
                        &format!("cw-{tag}-{w}"),
                        &format!("t{}", i / 20),
                        (i % 20) as i32,
                        &step_result(i),
                    )
                    .await
                    .unwrap();
                }
            }))
        };
        let stop = Arc::new(AtomicBool::new(false));
        let before = writers("before", stop.clone());
        tokio::time::sleep(round_secs()).await;
        stop.store(true, Ordering::Relaxed);
        let before = before.await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let during = writers("during", stop.clone());
        let t = Instant::now();
        let removed = pg
            .cleanup_old_tasks_with(30, CleanupOptions::default(), &|_| {})
            .await
            .unwrap();
        let cleanup_secs = t.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let mut during = during.await.unwrap();
        during.secs = cleanup_secs;
        report.add(
            &format!(
                "cleanup: {} of {} steps, 8 writers",
                removed.steps_removed,
                half * 20
            ),
            format!(
                "{cleanup_secs:.1} s ({:.0} steps/s); writers p99 {:.1} max {:.1} ms",
                removed.steps_removed as f64 / cleanup_secs,
                ms(during.pct(0.99)),
                ms(during.pct(1.0))
            ),
            format!(
                "writers without cleanup: p99 {:.1} max {:.1} ms",
                ms(before.pct(0.99)),
                ms(before.pct(1.0))
            ),
            format!(
                "p99 {:.2}",
                during.pct(0.99).as_secs_f64() / before.pct(0.99).as_secs_f64()
            ),
        );
    }
    if section("memory") {
        // The memory store: microseconds.
        let mem: DynStore = Arc::new(MemoryStore::new());
        mem.save_batch_task_history(&records("m", 40, 50, None))
            .await
            .unwrap();
        let n = 20_000u64;
        for (name, which) in [
            ("save", 0),
            ("load (50 steps)", 1),
            ("status", 2),
            ("list 50 of 40", 3),
        ] {
            let t = Instant::now();
            for i in 0..n {
                match which {
                    0 => mem
                        .save_task_history("w", "t", (i % 1000) as i32, &step_result(i))
                        .await
                        .unwrap(),
                    1 => assert_eq!(
                        mem.load_task_history("m", "task-000007")
                            .await
                            .unwrap()
                            .len(),
                        50
                    ),
                    2 => assert_eq!(
                        mem.check_task_status("m", "task-000007").await.unwrap(),
                        TaskStatus::Running
                    ),
                    _ => assert_eq!(mem.get_user_tasks("m", 50).await.unwrap().len(), 40),
                }
            }
            report.add(
                &format!("memory store: {name}"),
                format!("{:.2} µs/op", t.elapsed().as_secs_f64() * 1e6 / n as f64),
                "-".into(),
                "-".into(),
            );
        }
    }
    if section("peak") {
        // Peak memory, each in its own process.
        let floor = peak_of(&url, &schema, "idle");
        let recs = peak_of(&url, &schema, "records");
        let batch = peak_of(&url, &schema, "batch");
        report.add(
            "peak RSS: save_batch of 50,000 steps",
            format!("{:.1} MiB", batch as f64 / 1024.0),
            format!(
                "idle {:.1} MiB; records alone {:.1} MiB",
                floor as f64 / 1024.0,
                recs as f64 / 1024.0
            ),
            format!(
                "+{:.1} MiB over the records",
                (batch as f64 - recs as f64) / 1024.0
            ),
        );
        let export_steps = scaled(1_000_000);
        let mut left = export_steps;
        let mut t = 0;
        while left > 0 {
            let n = left.min(50_000);
            let batch: Vec<StepRecord> = (0..n)
                .map(|i| {
                    StepRecord::new(
                        "export-user",
                        format!("task-{:07}", (t * 50_000 + i) / 25),
                        ((t * 50_000 + i) % 25) as i32,
                        step_result(i as u64),
                    )
                })
                .collect();
            pg.save_batch_task_history(&batch).await.unwrap();
            left -= n;
            t += 1;
        }
        let export = peak_of(&url, &schema, "export");
        report.add(
            &format!("peak RSS: export of {export_steps} steps"),
            format!("{:.1} MiB", export as f64 / 1024.0),
            format!("idle {:.1} MiB", floor as f64 / 1024.0),
            format!("+{:.1} MiB", (export as f64 - floor as f64) / 1024.0),
        );
    }
    println!("\n{}", report.markdown());
    pg.close().await;
    admin
        .client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}
