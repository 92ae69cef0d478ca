//! Reads from a streaming standby (issue 31): read throughput with the standby serving
//! reads against the primary alone, the primary's CPU per read in both, and save
//! throughput with replicas against without (the bookkeeping of read-your-writes on every
//! write). Every figure is paired in the same run with its baseline; rounds alternate (the
//! baseline first in every other round); medians and ratios are printed, never asserted.
//!
//! - Servers: a primary and a hot standby of the bench's own (`OwnServer`, the standby by
//!   `pg_basebackup -R`, no apply delay), on this machine: both share its cores, so the
//!   read figures say what moving reads off the primary costs or saves here, not what a
//!   second machine would give.
//! - Data: 64 users x 50 tasks x 10 steps. Reads pick a random user and task; the reading
//!   store never writes them, so the standby serves them at once.
//! - `reads`: `check_task_status`, `load_task_history`, `get_user_tasks_page(20)` at 16
//!   concurrent, `BENCH_SECS` (2) per round, `BENCH_ROUNDS` (5) rounds.
//! - `saves`: `save_task_history` at 8 concurrent through a store with the standby and one
//!   without.
//! - The primary's CPU: user + system time of its server processes (`/proc`) per 1,000
//!   operations, over each run.
//!
//! ```sh
//! cargo bench --bench replicas
//! BENCH_SECS=1 BENCH_ROUNDS=3 cargo bench --bench replicas
//! BENCH_ONLY=saves BENCH_ROUNDS=9 cargo bench --bench replicas   # saves only
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{drive, env_f64, median, round_secs, Sample};
use serde_json::json;
use taskhistory::{
    PgConfig, PgTaskHistoryStore, SslMode, StepRecord, TaskHistoryStore, TaskQuery, TaskStepResult,
};
use taskhistory_testing::{store_for, OwnServer};

const USERS: usize = 64;
const TASKS: usize = 50;
const STEPS: i32 = 10;

fn config(primary: &OwnServer) -> PgConfig {
    PgConfig::from_url(&primary.url())
        .unwrap()
        .ssl_mode(SslMode::Disable)
        .schema("bench_replicas")
        .pool_size(4, 20)
}

/// CPU time (user + system, clock ticks) of `postmaster`'s children.
fn cpu_ticks(postmaster: u32) -> u64 {
    let mut total = 0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for entry in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The fields after the command (in parentheses, may hold spaces).
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        // f[1] = ppid, f[11] = utime, f[12] = stime.
        if f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(postmaster) {
            total += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            total += f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    total
}

/// One run: the sample and the primary's CPU ticks per 1,000 operations.
async fn run<F, Fut>(postmaster: u32, workers: usize, op: F) -> (Sample, f64)
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let before = cpu_ticks(postmaster);
    let s = drive(workers, round_secs(), op).await;
    let ticks = cpu_ticks(postmaster).saturating_sub(before);
    let per_k = ticks as f64 * 1000.0 / s.ops.max(1) as f64;
    (s, per_k)
}

#[derive(Clone, Copy)]
enum Read {
    Status,
    Load,
    List,
}

fn read_op(
    store: PgTaskHistoryStore,
    kind: Read,
) -> impl Fn(usize, u64) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync {
    move |_, _| {
        let store = store.clone();
        Box::pin(async move {
            let user = format!("u{}", fastrand::usize(..USERS));
            let task = format!("t{}", fastrand::usize(..TASKS));
            match kind {
                Read::Status => drop(store.check_task_status(&user, &task).await.unwrap()),
                Read::Load => drop(store.load_task_history(&user, &task).await.unwrap()),
                Read::List => drop(
                    store
                        .get_user_tasks_page(&user, &TaskQuery::first(20))
                        .await
                        .unwrap(),
                ),
            }
        })
    }
}

/// Alternating rounds of `op` on `base` and `with`: medians of rate and CPU per 1,000.
async fn paired<F>(postmaster: u32, workers: usize, rounds: u64, op: F) -> [(f64, f64); 2]
where
    F: Fn(
        bool,
    ) -> Box<
        dyn Fn(usize, u64) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync,
    >,
{
    let mut rates = [Vec::new(), Vec::new()];
    let mut cpu = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let f = op(which == 1);
            let (s, c) = run(postmaster, workers, f).await;
            rates[which].push(s.rate());
            cpu[which].push(c);
        }
    }
    let [r0, r1] = rates;
    let [c0, c1] = cpu;
    [(median(r0), median(c0)), (median(r1), median(c1))]
}

async fn bench() {
    let rounds = env_f64("BENCH_ROUNDS", 5.0) as u64;
    let primary = OwnServer::start(&["shared_buffers=256MB"]);
    let standby = OwnServer::standby_of(&primary, &["shared_buffers=256MB"]);
    let postmaster = primary.postmaster_pid();
    let alone = store_for(config(&primary)).await;
    let replicated = store_for(config(&primary).read_urls([standby.url()]).unwrap()).await;
    let step = |i: i32| TaskStepResult::running("s", json!({ "i": i, "stage": "transform" }), "");
    for u in 0..USERS {
        let batch: Vec<StepRecord> = (0..TASKS)
            .flat_map(|t| {
                (0..STEPS)
                    .map(move |i| StepRecord::new(format!("u{u}"), format!("t{t}"), i, step(i)))
            })
            .collect();
        alone.save_batch_task_history(&batch).await.unwrap();
    }
    // The standby has the data once a read of the replicated store is served by it.
    while replicated.metrics().reads_replicas < 100 {
        replicated.check_task_status("u0", "t0").await.unwrap();
    }
    println!(
        "replicas bench: {USERS} users x {TASKS} tasks x {STEPS} steps; {rounds} rounds of {:?}; \
         primary alone vs primary + standby on this machine",
        round_secs()
    );
    println!(
        "{:<28} {:>12} {:>12} {:>8} {:>14} {:>14}",
        "operation", "alone/s", "standby/s", "ratio", "cpu/1k alone", "cpu/1k standby"
    );
    let reads = std::env::var("BENCH_ONLY").map_or(true, |o| o.contains("reads"));
    for (name, kind) in [
        ("check_task_status x16", Read::Status),
        ("load_task_history x16", Read::Load),
        ("get_user_tasks_page x16", Read::List),
    ]
    .into_iter()
    .filter(|_| reads)
    {
        let (a, r) = (alone.clone(), replicated.clone());
        let [(base, base_cpu), (with, with_cpu)] = paired(postmaster, 16, rounds, |on| {
            Box::new(read_op(if on { r.clone() } else { a.clone() }, kind))
        })
        .await;
        println!(
            "{name:<28} {base:>12.0} {with:>12.0} {:>8.2} {base_cpu:>14.1} {with_cpu:>14.1}",
            with / base
        );
    }
    let served = replicated.metrics();
    let next = Arc::new(AtomicU64::new(0));
    let (a, r) = (alone.clone(), replicated.clone());
    let [(base, base_cpu), (with, with_cpu)] = paired(postmaster, 8, rounds, move |on| {
        let store = if on { r.clone() } else { a.clone() };
        let next = Arc::clone(&next);
        Box::new(move |w, _| {
            let store = store.clone();
            let i = next.fetch_add(1, Ordering::Relaxed);
            Box::pin(async move {
                store
                    .save_task_history(
                        &format!("w{w}"),
                        &format!("s{}", i / 10),
                        (i % 10) as i32,
                        &step(0),
                    )
                    .await
                    .unwrap();
            })
        })
    })
    .await;
    println!(
        "{:<28} {base:>12.0} {with:>12.0} {:>8.2} {base_cpu:>14.1} {with_cpu:>14.1}",
        "save_task_history x8",
        with / base
    );
    println!(
        "reads of the replicated store: {} by the standby, {} by the primary; cpu in clock ticks \
         ({} per second) of the primary's server processes per 1,000 operations",
        served.reads_replicas, served.reads_primary, 100
    );
    alone.close().await;
    replicated.close().await;
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`; a filter-only run (`cargo test --benches`) does nothing.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(bench());
}
