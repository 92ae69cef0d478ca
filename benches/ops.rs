//! criterion micro-benchmarks: each store operation alone, the memory store's in
//! microseconds, the PostgreSQL store's next to the same statement through raw
//! tokio-postgres. `cargo bench --bench ops`. The paired, concurrent figures are in the load
//! bench (`cargo bench --bench load`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;
use taskhistory::{
    DynStore, MemoryStore, PgConfig, SslMode, StepRecord, TaskHistoryStore, TaskStepResult,
};
use taskhistory_testing as testing;
use taskhistory_testing::sql;
use tokio_postgres::types::Json;
use tokio_postgres::NoTls;

fn result(i: i32) -> TaskStepResult {
    TaskStepResult::running(
        "step",
        json!({"processed_rows": i, "progress": 0.5}),
        "running",
    )
}

fn seed_records(user: &str) -> Vec<StepRecord> {
    (0..40)
        .flat_map(|t| (0..50).map(move |s| (t, s)))
        .map(|(t, s)| StepRecord::new(user, format!("task-{t}"), s, result(s)))
        .collect()
}

fn bench_store(c: &mut Criterion, name: &str, rt: &tokio::runtime::Runtime, store: DynStore) {
    rt.block_on(store.save_batch_task_history(&seed_records("bench")))
        .unwrap();
    let mut g = c.benchmark_group(name);
    let mut i = 0;
    g.bench_function("save_task_history", |b| {
        b.to_async(rt).iter(|| {
            i += 1;
            let (store, step) = (store.clone(), i % 10_000);
            async move {
                store
                    .save_task_history("writer", "t", step, &result(step))
                    .await
                    .unwrap()
            }
        })
    });
    g.bench_function("load_task_history (50 steps)", |b| {
        b.to_async(rt)
            .iter(|| async { store.load_task_history("bench", "task-7").await.unwrap() })
    });
    g.bench_function("check_task_status", |b| {
        b.to_async(rt)
            .iter(|| async { store.check_task_status("bench", "task-7").await.unwrap() })
    });
    g.bench_function("get_user_tasks (50 of 40)", |b| {
        b.to_async(rt)
            .iter(|| async { store.get_user_tasks("bench", 50).await.unwrap() })
    });
    g.finish();
}

fn memory(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    bench_store(c, "memory", &rt, Arc::new(MemoryStore::new()));
}

fn postgres(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (url, schema) = rt.block_on(async {
        let url = testing::database_url().await;
        (url, format!("bench_ops_{}", std::process::id()))
    });
    let config = PgConfig::from_url(&url)
        .unwrap()
        .ssl_mode(SslMode::Disable)
        .schema(schema.clone())
        .pool_size(1, 4);
    let store = rt.block_on(testing::store_for(config));
    bench_store(c, "postgres store", &rt, Arc::new(store.clone()));

    // The same statements through tokio-postgres, prepared once.
    let client = rt.block_on(async {
        let mut config: tokio_postgres::Config = url.parse().unwrap();
        config.options(format!("-c search_path={schema}"));
        let (client, conn) = config.connect(NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    });
    let (save, load, status) = rt.block_on(async {
        (
            client.prepare(sql::SAVE_STEP).await.unwrap(),
            client.prepare(sql::LOAD_HISTORY).await.unwrap(),
            client.prepare(sql::TASK_STATUS).await.unwrap(),
        )
    });
    let mut g = c.benchmark_group("postgres raw tokio-postgres");
    let mut i = 0;
    g.bench_function("save_task_history", |b| {
        b.to_async(&rt).iter(|| {
            i += 1;
            let step = i % 10_000;
            let r = result(step);
            let (client, save) = (&client, &save);
            async move {
                client
                    .query(
                        save,
                        &[
                            &"raw-writer",
                            &"t",
                            &step,
                            &Json(&r),
                            &None::<chrono::DateTime<chrono::Utc>>,
                            &r.status.as_str(),
                        ],
                    )
                    .await
                    .unwrap()
            }
        })
    });
    g.bench_function("load_task_history (50 steps)", |b| {
        b.to_async(&rt).iter(|| async {
            let rows = client.query(&load, &[&"bench", &"task-7"]).await.unwrap();
            rows.iter()
                .map(|r| r.get::<_, Json<TaskStepResult>>(1))
                .collect::<Vec<_>>()
        })
    });
    g.bench_function("check_task_status", |b| {
        b.to_async(&rt).iter(|| async {
            client
                .query_opt(&status, &[&"bench", &"task-7"])
                .await
                .unwrap()
        })
    });
    g.finish();
    rt.block_on(async {
        store.close().await;
        client
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3));
    targets = memory, postgres
}
criterion_main!(benches);
