//! Reads from a streaming standby (issue 31): a primary and a hot standby of the test's own
//! (`pg_basebackup -R`), the standby applying commits 200 ms late
//! (`recovery_min_apply_delay`) so that it always lags behind fresh writes. Read-your-writes
//! (invariant 16): no read ever shows a writer less than it wrote, while the standby
//! serves most reads; a standby stopped, lagging past the limit or promoted leaves the
//! rotation with no caller error; a position token carries a write to another store; a
//! watcher of a replica-backed store delivers exactly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use taskhistory_core::{StoreError, TaskHistoryStore, TaskQuery, TaskStatus, TaskStepResult};
use taskhistory_postgres::{PgConfig, PgTaskHistoryStore, SslMode};
use taskhistory_testing::{store_for, OwnServer};

/// The whole behaviour suite on a store whose reads go to a standby that applies commits
/// 50 ms late: every read of a user the store wrote must show its writes.
mod behaviour {
    taskhistory_core::conformance_tests!(taskhistory_testing::replica_dyn_store().await);
}

const APPLY_DELAY: &str = "recovery_min_apply_delay=200ms";

fn config(primary: &OwnServer, schema: &str) -> PgConfig {
    PgConfig::from_url(&primary.url())
        .unwrap()
        .ssl_mode(SslMode::Disable)
        .schema(schema)
        .pool_size(2, 16)
}

fn with_standby(config: PgConfig, standby: &OwnServer) -> PgConfig {
    config.read_urls([standby.url()]).unwrap()
}

/// Waits (at most 60 s) until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(60), "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn in_rotation(store: &PgTaskHistoryStore) {
    until("the standby did not join the rotation", || {
        store.replicas().first().is_some_and(|r| r.in_rotation)
    })
    .await;
}

/// Reads a user nobody writes until the replica has served 10 reads: its shared read
/// connections are open and vouched for by a check (a read on a connection opened since
/// the latest check goes to the primary).
async fn until_served(store: &PgTaskHistoryStore) {
    let started = Instant::now();
    while store.metrics().reads_replicas < 10 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no read by the replica"
        );
        store.check_task_status("nobody", "t").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Transactions committed on `server` (its own sessions: on a standby, reads).
async fn commits(server: &OwnServer) -> i64 {
    let (client, conn) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .query_one(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// What one writer's reads found wrong.
#[derive(Default)]
struct Found {
    stale: u64,
    errors: Vec<String>,
    reads: u64,
}

/// Saves step `round` of its task, then reads status, history and listing `reads` times
/// (10 ms apart), each checked against what it wrote: everything up to step `round`.
async fn writer(
    store: PgTaskHistoryStore,
    user: String,
    rounds: i32,
    reads: usize,
    stop: Arc<AtomicBool>,
) -> Found {
    let task = "t";
    let mut found = Found::default();
    let run = |step: i32| TaskStepResult::running("s", json!({ "step": step }), "");
    for round in 0..rounds {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if let Err(e) = store
            .save_task_history(&user, task, round, &run(round))
            .await
        {
            found.errors.push(format!("save: {e}"));
            continue;
        }
        for _ in 0..reads {
            found.reads += 3;
            match store.check_task_status(&user, task).await {
                Ok(TaskStatus::Running) => {}
                Ok(other) => {
                    found.stale += 1;
                    found
                        .errors
                        .push(format!("status {other:?} at round {round}"));
                }
                Err(e) => found.errors.push(format!("status: {e}")),
            }
            match store.load_task_history(&user, task).await {
                Ok(h) if h.len() == usize::try_from(round + 1).unwrap() => {}
                Ok(h) => {
                    found.stale += 1;
                    found
                        .errors
                        .push(format!("history of {} steps at round {round}", h.len()));
                }
                Err(e) => found.errors.push(format!("history: {e}")),
            }
            match store
                .get_user_tasks_page(&user, &TaskQuery::first(10))
                .await
            {
                Ok(page) if page.tasks.first().is_some_and(|t| t.last_step == round) => {}
                Ok(page) => {
                    found.stale += 1;
                    found.errors.push(format!(
                        "listing {:?} at round {round}",
                        page.tasks.first().map(|t| t.last_step)
                    ));
                }
                Err(e) => found.errors.push(format!("listing: {e}")),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    found
}

async fn writers(
    store: &PgTaskHistoryStore,
    prefix: &str,
    rounds: i32,
    reads: usize,
    stop: &Arc<AtomicBool>,
) -> Found {
    let all = futures::future::join_all((0..8).map(|w| {
        tokio::spawn(writer(
            store.clone(),
            format!("{prefix}{w}"),
            rounds,
            reads,
            Arc::clone(stop),
        ))
    }))
    .await;
    let mut total = Found::default();
    for f in all {
        let f = f.unwrap();
        total.stale += f.stale;
        total.reads += f.reads;
        total.errors.extend(f.errors);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_writers_read_their_writes_while_the_standby_serves_most_reads_and_stops_and_returns()
{
    let primary = OwnServer::start(&[]);
    let standby = OwnServer::standby_of(&primary, &[APPLY_DELAY]);
    let store = store_for(with_standby(config(&primary, "replicas"), &standby)).await;
    in_rotation(&store).await;

    // 8 writers, 16 rounds each of a save then 60 checks of status, history and listing:
    // 23,040 reads, each of which must show the writer's latest step.
    let before = store.metrics();
    let commits_before = commits(&standby).await;
    let stop = Arc::new(AtomicBool::new(false));
    let found = writers(&store, "w", 16, 60, &stop).await;
    let after = store.metrics();
    assert_eq!(found.stale, 0, "stale reads: {:?}", &found.errors);
    assert!(found.errors.is_empty(), "{:?}", &found.errors);
    let by_replica = after.reads_replicas - before.reads_replicas;
    let by_primary = after.reads_primary - before.reads_primary;
    // Counted per statement: concurrent writers' status checks may be combined (a third of
    // the reads; loads and listings never are), at most 8 at once (one per writer).
    let (checks, others) = (found.reads / 3, found.reads - found.reads / 3);
    assert!(
        by_replica + by_primary <= found.reads
            && by_replica + by_primary >= others + checks.div_ceil(8),
        "{by_replica} + {by_primary} statements for {} reads",
        found.reads
    );
    // The standby's statistics arrive when its sessions flush them (within 10 s idle).
    let started = Instant::now();
    let mut on_standby = 0;
    while started.elapsed() < Duration::from_secs(30) {
        on_standby = commits(&standby).await - commits_before;
        if on_standby >= i64::try_from(by_replica).unwrap() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "{} reads: {by_replica} by the standby, {by_primary} by the primary, {} fall-backs; \
         the standby committed {on_standby} transactions",
        found.reads,
        after.replica_fallbacks - before.replica_fallbacks,
    );
    // Most reads by the standby, counted by the store and on the standby's side; the
    // reads right after each write by the primary (the standby applies commits 200 ms late).
    assert!(by_replica > by_primary, "{by_replica} by the standby");
    assert!(by_primary > 0);
    assert!(on_standby >= i64::try_from(by_replica).unwrap());

    // The standby stops mid-run, then comes back: no caller sees an error or a stale read.
    let stop = Arc::new(AtomicBool::new(false));
    let running = {
        let store = store.clone();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move { writers(&store, "s", 1_000, 20, &stop).await })
    };
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let served_before_stop = store.metrics().reads_replicas;
    standby.stop();
    until("the stopped standby did not leave the rotation", || {
        !store.replicas()[0].in_rotation
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let while_down = store.metrics().reads_replicas;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        store.metrics().reads_replicas,
        while_down,
        "reads went to a stopped standby"
    );
    standby.start_again();
    in_rotation(&store).await;
    let back = store.metrics().reads_replicas;
    until("the standby served no read after it came back", || {
        store.metrics().reads_replicas > back
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let found = running.await.unwrap();
    assert!(served_before_stop > 0);
    assert_eq!(found.stale, 0, "{:?}", &found.errors);
    assert!(found.errors.is_empty(), "{:?}", &found.errors);
    eprintln!(
        "stopped mid-run: {} reads, {} fall-backs",
        found.reads,
        store.metrics().replica_fallbacks - after.replica_fallbacks
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_carry_writes_across_stores_watchers_deliver_exactly_and_a_promoted_standby_leaves()
{
    let primary = OwnServer::start(&[]);
    let standby = OwnServer::standby_of(&primary, &[APPLY_DELAY]);
    // A writes; B reads through the standby and waits up to 5 s for it.
    let a = store_for(config(&primary, "tokens")).await;
    let b = store_for(
        with_standby(config(&primary, "tokens"), &standby).replica_wait(Duration::from_secs(5)),
    )
    .await;
    in_rotation(&b).await;
    let run = TaskStepResult::running("s", json!({}), "");
    // B's replica pool holds a connection vouched for by a check.
    until_served(&b).await;
    for round in 0..20 {
        let task = format!("t{round}");
        a.save_task_history("carried", &task, 0, &run)
            .await
            .unwrap();
        let token = a
            .position("carried")
            .await
            .unwrap()
            .expect("a token after a write");
        b.require_position("carried", &token).unwrap();
        let served = b.metrics().reads_replicas;
        assert_eq!(
            b.check_task_status("carried", &task).await.unwrap(),
            TaskStatus::Running,
            "round {round}: B did not see A's write"
        );
        // Served by the standby once it had replayed the token's position.
        assert_eq!(b.metrics().reads_replicas, served + 1);
    }
    match b.require_position("carried", "not-a-position") {
        Err(StoreError::InvalidInput { field, .. }) => assert_eq!(field, "position"),
        other => panic!("{other:?}"),
    }
    // A user B wrote has a position; one nobody wrote needs none.
    b.save_task_history("own", "t", 0, &run).await.unwrap();
    assert!(b.position("own").await.unwrap().is_some());

    // The watch cursor on a hot standby: snapshots work there, transaction ids are not
    // assigned (the tail reads the primary; see docs/architecture.md, invariant 16).
    let (client, conn) = tokio_postgres::connect(&standby.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await
        .expect("pg_current_snapshot() on a hot standby");
    assert!(client
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .is_err());

    // A watcher of B (replicas) receives every write of 4 writers through A exactly once, in
    // step order per task.
    let mut events = b.watch_user("watched", None).await.unwrap();
    let writers = futures::future::join_all((0..4).map(|w| {
        let a = a.clone();
        let run = run.clone();
        async move {
            for step in 0..50 {
                a.save_task_history("watched", &format!("t{w}"), step, &run)
                    .await
                    .unwrap();
            }
        }
    }));
    let reader = async {
        let mut seen = HashSet::new();
        let mut last = [-1; 4];
        while seen.len() < 200 {
            let e = tokio::time::timeout(Duration::from_secs(30), events.next())
                .await
                .expect("no event within 30 s")
                .expect("the stream ended")
                .expect("an error on the stream");
            let w: usize = e.task_id[1..].parse().unwrap();
            assert!(seen.insert((w, e.step)), "delivered twice: {e:?}");
            assert!(e.step > last[w], "out of order: {e:?}");
            last[w] = e.step;
        }
    };
    futures::join!(writers, reader);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), events.next())
            .await
            .is_err(),
        "an event past the 200 written"
    );

    // Lagging past DB_MAX_REPLICA_LAG: a store allowing 50 ms sees the standby (200 ms
    // behind fresh writes) leave the rotation while writes go on, and come back after.
    let strict = store_for(
        with_standby(config(&primary, "tokens"), &standby)
            .max_replica_lag(Duration::from_millis(50)),
    )
    .await;
    in_rotation(&strict).await;
    let writing = Arc::new(AtomicBool::new(true));
    let saves = {
        let a = a.clone();
        let writing = Arc::clone(&writing);
        let run = run.clone();
        tokio::spawn(async move {
            let mut step = 0;
            while writing.load(Ordering::Relaxed) {
                a.save_task_history("lag", "t", step, &run).await.unwrap();
                step += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    until(
        "a standby lagging past the limit stayed in the rotation",
        || !strict.replicas()[0].in_rotation,
    )
    .await;
    writing.store(false, Ordering::Relaxed);
    saves.await.unwrap();
    in_rotation(&strict).await;
    strict.close().await;

    // A store declaring its users (row-level isolation's statements, issue 32) reads on
    // the standby too: the declaration inside the read's statement runs on a hot standby.
    let declaring =
        store_for(with_standby(config(&primary, "tokens"), &standby).declare_users(true)).await;
    in_rotation(&declaring).await;
    until_served(&declaring).await;
    let served = declaring.metrics().reads_replicas;
    assert_eq!(
        declaring.check_task_status("carried", "t0").await.unwrap(),
        TaskStatus::Running
    );
    assert_eq!(
        declaring
            .load_task_history("watched", "t3")
            .await
            .unwrap()
            .len(),
        50
    );
    assert_eq!(declaring.metrics().reads_replicas, served + 2);
    declaring.close().await;

    // Promoted: it leaves the rotation; reads of fresh writes go to the primary and see
    // them.
    standby.promote();
    until("a promoted standby stayed in the rotation", || {
        !b.replicas()[0].in_rotation
    })
    .await;
    let by_replica = b.metrics().reads_replicas;
    for step in 0..20 {
        b.save_task_history("after", "t", step, &run).await.unwrap();
        let h = b.load_task_history("after", "t").await.unwrap();
        assert_eq!(h.len(), usize::try_from(step + 1).unwrap());
    }
    assert_eq!(b.metrics().reads_replicas, by_replica);
    assert!(!b.replicas()[0].in_rotation);
    a.close().await;
    b.close().await;
}
