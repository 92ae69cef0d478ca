//! Row-level isolation (issue 32): what declaring each operation's users and the policies
//! cost, isolation on against off, and declaring alone (a store that declares while
//! isolation is off), in the same run on the same schema and the same store
//! (the least-privilege role of `least_privilege_grants`, as a service runs; the schema's
//! owner, not a superuser, switches isolation between rounds). Each round measures the three
//! stores in turn, the order reversed every other round; each figure is the median of its
//! rounds; ratios are printed, never asserted.
//!
//! Workloads: single saves at 1 (p50 and rate), 8 and 32 concurrent; batches of 100 steps
//! (the upsert statement either way) and of 2,000 steps of new tasks (`COPY` for the store
//! that never declares; one `INSERT` of arrays for the two that declare, since PostgreSQL
//! refuses `COPY FROM` into a table with row-level security: so for this workload
//! "declaring / off" compares that `INSERT` with `COPY`); loads of a 10-step history,
//! statuses and first pages of 20 tasks, at 1 (p50) and 8 concurrent.
//!
//! ```sh
//! cargo bench --bench isolation                 # 5 rounds of 2 s per workload and mode
//! BENCH_SHORT=1 cargo bench --bench isolation   # 3 rounds of 0.4 s
//! BENCH_ROUNDS=9 BENCH_SECS=1 cargo bench --bench isolation
//! BENCH_ONLY=batch2000,status cargo bench --bench isolation   # some workloads only
//! ```
//!
//! The server is the tests' (TEST_DATABASE_URL, else 127.0.0.1:5432, else a throwaway one);
//! the schema lives in the bench process's test database, dropped when it exits.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{drive, env_f64, median, ms, round_secs, short, Sample};
use serde_json::json;
use taskhistory::{PgTaskHistoryStore, StepRecord, TaskHistoryStore, TaskQuery, TaskStepResult};
use taskhistory_testing as testing;

/// Users holding the read workloads' tasks.
const USERS: usize = 32;
/// Tasks per user, of 10 steps each.
const TASKS: usize = 50;

fn step(i: u64) -> TaskStepResult {
    TaskStepResult::running(
        "data_processing",
        json!({"processed_rows": i, "progress": 0.5, "stage": "transform"}),
        "Step running",
    )
}

/// One workload: what it runs, at how many concurrent callers.
struct Workload {
    name: &'static str,
    workers: usize,
    /// Report the p50 latency (one caller) instead of the rate.
    p50: bool,
}

/// Runs `w` on `store` for a round. `seed` is distinct for every workload of every round
/// and mode: the tasks a workload writes are new to it (no other workload wrote them), so
/// saves append steps and batches of new tasks are new tasks.
async fn run(store: &PgTaskHistoryStore, w: &Workload, seed: u64) -> Sample {
    let store = store.clone();
    let name = w.name;
    let counter = Arc::new(AtomicU64::new(0));
    drive(w.workers, round_secs(), move |worker, i| {
        let store = store.clone();
        let counter = counter.clone();
        async move {
            let user = format!("u{}", worker % USERS);
            let task = format!("t{}", i as usize % TASKS);
            match name {
                "save" => {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let task = format!("s{seed}_{worker}_{}", n / 10);
                    store
                        .save_task_history(&user, &task, (n % 10) as i32, &step(n))
                        .await
                        .unwrap();
                }
                "batch100" | "batch2000" => {
                    let rows: u32 = if name == "batch100" { 100 } else { 2_000 };
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let batch: Vec<StepRecord> = (0..rows)
                        .map(|k| {
                            StepRecord::new(
                                &user,
                                format!("b{seed}_{worker}_{n}_{}", k / 10),
                                (k % 10) as i32,
                                step(u64::from(k)),
                            )
                        })
                        .collect();
                    store.save_batch_task_history(&batch).await.unwrap();
                }
                "load" => {
                    store.load_task_history(&user, &task).await.unwrap();
                }
                "status" => {
                    store.check_task_status(&user, &task).await.unwrap();
                }
                "list" => {
                    store
                        .get_user_tasks_page(&user, &TaskQuery::first(20))
                        .await
                        .unwrap();
                }
                other => panic!("no workload {other}"),
            }
        }
    })
    .await
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench());
}

async fn bench() {
    let rounds = env_f64("BENCH_ROUNDS", if short() { 3.0 } else { 5.0 }) as u64;
    // The schema's owner (not a superuser) switches isolation; the service's store is the
    // least-privilege role's (`least_privilege_grants`), as the docs recommend: the
    // policies that hold it are the ones a service meets.
    let config = testing::owner_config()
        .await
        .pool_size(4, 16)
        .notifications(false);
    let owner = testing::store_for(config.clone()).await;
    // Three stores of the service's role: one that never declares (isolation off; a store
    // that once declared goes on declaring), one that declares while isolation is off
    // (`declare_users`: what declaring costs without a policy to read it), and one that
    // declares with isolation on.
    let store = testing::app_role_store(&config).await;
    let declaring_off = testing::app_role_store(&config.clone().declare_users(true)).await;
    let declaring = testing::app_role_store(&config).await;
    for u in 0..USERS {
        let batch: Vec<StepRecord> = (0..TASKS * 10)
            .map(|k| {
                StepRecord::new(
                    format!("u{u}"),
                    format!("t{}", k / 10),
                    (k % 10) as i32,
                    step(k as u64),
                )
            })
            .collect();
        store.save_batch_task_history(&batch).await.unwrap();
    }
    // Statistics as a table in service has them (the generic plans are made from them).
    let schema = config.get_schema().unwrap().to_owned();
    testing::test_db_client()
        .await
        .batch_execute(&format!(
            "ANALYZE \"{schema}\".task_history, \"{schema}\".task_summary, \"{schema}\".task_counts"
        ))
        .await
        .unwrap();
    let mut workloads = vec![
        Workload {
            name: "save",
            workers: 1,
            p50: true,
        },
        Workload {
            name: "save",
            workers: 1,
            p50: false,
        },
        Workload {
            name: "save",
            workers: 8,
            p50: false,
        },
        Workload {
            name: "save",
            workers: 32,
            p50: false,
        },
        Workload {
            name: "batch100",
            workers: 1,
            p50: false,
        },
        Workload {
            name: "batch2000",
            workers: 1,
            p50: false,
        },
        Workload {
            name: "load",
            workers: 1,
            p50: true,
        },
        Workload {
            name: "load",
            workers: 8,
            p50: false,
        },
        Workload {
            name: "status",
            workers: 1,
            p50: true,
        },
        Workload {
            name: "status",
            workers: 8,
            p50: false,
        },
        Workload {
            name: "list",
            workers: 1,
            p50: true,
        },
        Workload {
            name: "list",
            workers: 8,
            p50: false,
        },
    ];
    // `BENCH_ONLY=batch2000,status` runs those workloads only.
    if let Ok(only) = std::env::var("BENCH_ONLY") {
        workloads.retain(|w| only.split(',').any(|o| o.trim() == w.name));
    }
    // Per workload, per mode (0: off; 1: declaring, isolation off; 2: on): the rounds'
    // figures. The order of the modes turns around every other round.
    let mut figures = vec![[Vec::new(), Vec::new(), Vec::new()]; workloads.len()];
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1, 2] } else { [2, 1, 0] };
        for mode in order {
            let on = mode == 2;
            owner.set_isolation(on).await.unwrap();
            let measured = [&store, &declaring_off, &declaring][mode];
            let state = measured.isolation().await.unwrap();
            assert_eq!(state.on(), on, "{state:?}");
            assert_eq!(state.declaring, mode > 0, "{state:?}");
            assert!(!state.role_bypasses && !state.maintainer, "{state:?}");
            for (index, (w, figure)) in workloads.iter().zip(figures.iter_mut()).enumerate() {
                let seed = (round * 3 + mode as u64) * workloads.len() as u64 + index as u64;
                let sample = run(measured, w, seed).await;
                let value = if w.p50 {
                    ms(sample.pct(0.5))
                } else {
                    sample.rate()
                };
                figure[mode].push(value);
            }
        }
    }
    owner.set_isolation(false).await.unwrap();
    println!();
    println!(
        "| workload | concurrent | isolation off | declaring, isolation off | isolation on | \
         declaring / off | on / declaring | on / off |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (w, figure) in workloads.iter().zip(figures) {
        let [off, declared, on] = figure.map(median);
        // Above 1 is faster: throughput over throughput, or a p50 under a p50.
        let (unit, ratio): (&str, fn(f64, f64) -> f64) = if w.p50 {
            ("ms p50", |base, x| base / x)
        } else {
            ("ops/s", |base, x| x / base)
        };
        println!(
            "| {} | {} | {off:.3} {unit} | {declared:.3} {unit} | {on:.3} {unit} | {:.2} | {:.2} | {:.2} |",
            w.name,
            w.workers,
            ratio(off, declared),
            ratio(declared, on),
            ratio(off, on),
        );
    }
    println!("\n(each ratio \"a / b\": a's throughput over b's, or for a p50 b's p50 over a's: above 1, a is faster)");
    for (name, measured) in [
        ("never declaring", &store),
        ("declaring, isolation off", &declaring_off),
        ("declaring, isolation on", &declaring),
    ] {
        let m = measured.metrics();
        println!(
            "the service store {name}: {} attempts, {} failed, {} retried",
            m.queries, m.errors, m.retries
        );
    }
    store.close().await;
    declaring_off.close().await;
    declaring.close().await;
    owner.close().await;
}
