//! A server restarted, or crashed and started again, under a store with a warm pool: once
//! the server accepts connections, no caller gets an error that a healthy connection would
//! have avoided. A server of the test's own (never the shared one).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::json;
use taskhistory_core::{
    HistoryScan, RetryPolicy, StepRecord, StoreError, TaskHistoryStore, TaskQuery, TaskStatus,
    TaskStepResult,
};
use taskhistory_postgres::{PgConfig, PgTaskHistoryStore, SslMode};
use taskhistory_testing::{store_for, OwnServer};

/// Every operation of the contract once; the errors that reached the caller.
async fn every_operation(
    store: &PgTaskHistoryStore,
    round: usize,
) -> Vec<(&'static str, StoreError)> {
    let run = TaskStepResult::running("s", json!({ "round": round }), "");
    let task = format!("t{round}");
    let big: Vec<StepRecord> = (0..50)
        .map(|i| StepRecord::new("u", format!("big{round}"), i, run.clone()))
        .collect();
    let mut errors = Vec::new();
    let mut note = |op: &'static str, r: Result<(), StoreError>| {
        if let Err(e) = r {
            errors.push((op, e));
        }
    };
    note(
        "save_task_history",
        store.save_task_history("u", &task, 0, &run).await,
    );
    note(
        "save_batch_task_history (upsert)",
        store
            .save_batch_task_history(&[StepRecord::new("u", task.as_str(), 1, run.clone())])
            .await,
    );
    note(
        "save_batch_task_history (COPY)",
        store.save_batch_task_history(&big).await,
    );
    note(
        "load_task_history",
        store.load_task_history("u", &task).await.map(drop),
    );
    note(
        "check_task_status",
        store.check_task_status("u", &task).await.map(drop),
    );
    note(
        "get_user_tasks_page",
        store
            .get_user_tasks_page("u", &TaskQuery::first(10))
            .await
            .map(drop),
    );
    note(
        "scan_history",
        store
            .scan_history("u", &HistoryScan::all(100))
            .await
            .map(drop),
    );
    note(
        "mark_task_as_cancelled",
        store.mark_task_as_cancelled("u", &task).await.map(drop),
    );
    note(
        "cleanup_old_tasks",
        store.cleanup_old_tasks(30).await.map(drop),
    );
    note("health_check", store.health_check().await.map(drop));
    note("watch_user", store.watch_user("u", None).await.map(drop));
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_or_crashed_server_reaches_no_caller_once_it_answers() {
    let server = OwnServer::start(&[]);
    let config = PgConfig::from_url(&server.url())
        .unwrap()
        .ssl_mode(SslMode::Disable)
        .schema("restarts")
        .pool_size(12, 16)
        .pool_timeout(Duration::from_secs(20))
        .copy_min_rows(Some(10))
        .retry(RetryPolicy {
            initial_backoff: Duration::from_millis(5),
            ..RetryPolicy::default()
        });
    let store = store_for(config).await;
    assert!(every_operation(&store, 0).await.is_empty());

    for (round, how) in [(1, "restart -m fast"), (2, "kill -9 and start")] {
        // A warm pool: at least 10 idle connections, all of the server before the fault.
        let mut tries = 0;
        while store.pool_stats().idle < 10 {
            tries += 1;
            assert!(
                tries < 500,
                "the pool did not fill: {:?}",
                store.pool_stats()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let before = store.pool_stats();
        match round {
            1 => server.restart(),
            _ => server.crash_and_start(),
        }
        let errors = every_operation(&store, round).await;
        assert!(
            errors.is_empty(),
            "after {how}, errors reached the callers: {errors:#?}"
        );
        // The dead idle connections were found and replaced, not handed out.
        let after = store.pool_stats();
        assert!(
            after.closed_broken > before.closed_broken,
            "after {how}: no dead connection was dropped ({before:?} -> {after:?})"
        );
        assert_eq!(
            store
                .check_task_status("u", &format!("t{round}"))
                .await
                .unwrap(),
            TaskStatus::Cancelled
        );
    }
    store.close().await;
}

async fn next(events: &mut taskhistory_core::TaskEventStream) -> taskhistory_core::TaskEvent {
    use futures::StreamExt;
    tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .expect("no event within 20 s")
        .expect("the stream ended")
        .expect("the stream yielded an error")
}

/// A watch goes on across a restart and a crash of the server: the stream yields no error
/// (reconnecting is the store's business) and every write exactly once, in order; a watch
/// resumed from a cursor taken before both faults receives the same writes after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_goes_on_across_restarts_and_resumes_from_an_old_cursor() {
    use futures::StreamExt;
    let server = OwnServer::start(&[]);
    let config = PgConfig::from_url(&server.url())
        .unwrap()
        .ssl_mode(SslMode::Disable)
        .schema("watching")
        .pool_size(2, 8)
        .watch_poll(Duration::from_millis(200))
        .retry(RetryPolicy {
            initial_backoff: Duration::from_millis(5),
            ..RetryPolicy::default()
        });
    let store = store_for(config).await;
    let mut events = store.watch_user("u", None).await.unwrap();
    let run = TaskStepResult::running("s", json!({}), "");
    for i in 0..10 {
        store.save_task_history("u", "t", i, &run).await.unwrap();
    }
    let mut got = Vec::new();
    let mut cursor = None;
    for _ in 0..5 {
        let e = next(&mut events).await;
        got.push(e.step);
        cursor = Some(e.cursor);
    }
    server.restart();
    for i in 10..20 {
        store.save_task_history("u", "t", i, &run).await.unwrap();
    }
    server.crash_and_start();
    for i in 20..30 {
        store.save_task_history("u", "t", i, &run).await.unwrap();
    }
    while got.len() < 30 {
        got.push(next(&mut events).await.step);
    }
    assert_eq!(got, (0..30).collect::<Vec<_>>());
    let mut resumed = store.watch_user("u", cursor).await.unwrap();
    let mut again = Vec::new();
    while again.len() < 25 {
        again.push(next(&mut resumed).await.step);
    }
    assert_eq!(again, (5..30).collect::<Vec<_>>());
    // Nothing more on either: a write now is the next event of both.
    store.save_task_history("u", "t", 30, &run).await.unwrap();
    assert_eq!(next(&mut events).await.step, 30);
    assert_eq!(next(&mut resumed).await.step, 30);
    store.close().await;
    // A closed store ends its streams.
    assert!(events.next().await.is_none());
}

/// After a crash, PostgreSQL gives out again the ids of transactions whose end it had not
/// flushed (a `NOTIFY`'s, a rollback's, one that wrote nothing). A watch whose last read
/// saw such a transaction finish still gets the write that takes its id after the crash.
/// Crashes until three have given an id back (the WAL writer's tick, every 10 s, can write
/// the end out first): without the horizon, each such write was lost unless the tail
/// happened to read between the server's return and the write (about one time in four).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_gets_the_write_that_reuses_an_id_a_crash_gave_back() {
    let (server, config) = lazy_server("reused");
    let store = store_for(config).await;
    let mut events = store.watch_user("u", None).await.unwrap();
    let run = TaskStepResult::running("s", json!({}), "");
    let mut given_back = 0;
    for round in 0..8 {
        let step = round * 2;
        store.save_task_history("u", "t", step, &run).await.unwrap();
        assert_eq!(next(&mut events).await.step, step);
        // The notifier's NOTIFY for that step is sent by now; then a transaction that
        // writes nothing, whose end stays in memory.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let given: u64 = sql_value(&server, "BEGIN; SELECT pg_current_xact_id()::text; COMMIT")
            .await
            .parse()
            .unwrap();
        // The tail reads twice more: its last read began after that transaction ended.
        let reads = store.metrics().tail_reads;
        while store.metrics().tail_reads < reads + 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.crash_and_start();
        store
            .save_task_history("u", "t", step + 1, &run)
            .await
            .unwrap();
        let xid: u64 = sql_value(
            &server,
            &format!(
                "SELECT xid::text FROM reused.task_history WHERE user_id = 'u' AND step = {}",
                step + 1
            ),
        )
        .await
        .parse()
        .unwrap();
        // Given back or not, the write is the next event.
        assert_eq!(next(&mut events).await.step, step + 1, "round {round}");
        if xid <= given {
            given_back += 1;
            if given_back == 3 {
                break;
            }
        }
    }
    assert_eq!(
        given_back, 3,
        "fewer than 3 of 8 crashes gave an id back: the test shows too little"
    );
    store.close().await;
}

/// An event's cursor names the snapshot of the read that delivered it. One taken before a
/// crash may have seen ids end that the crash gives out again. A watch resumed from it
/// after the crash, while the first such id is held by an open transaction and the second
/// has saved a step, is not refused, and delivers both writes once: the save, then the
/// open transaction's row when it commits. (Tried again, up to three crashes, when the WAL
/// writer's tick wrote the ends out before the crash.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_from_before_a_crash_resumes_across_the_ids_it_gave_back() {
    let (server, config) = lazy_server("given_back");
    let store = store_for(config.clone()).await;
    // Another process's writes that wake no one: the tail reads them at its poll.
    let silent = store_for(config.notifications(false)).await;
    let run = TaskStepResult::running("s", json!({}), "");
    for attempt in 0..3 {
        let user = format!("u{attempt}");
        let mut events = store.watch_user(&user, None).await.unwrap();
        // A step, then two transactions that write nothing and whose ends stay in memory,
        // all before the tail's poll reads the step (else again).
        let (cursor, given) = 'taken: {
            for step in 0..10 {
                silent
                    .save_task_history(&user, "t", step, &run)
                    .await
                    .unwrap();
                let mut given = Vec::new();
                for _ in 0..2 {
                    let xid: u64 =
                        sql_value(&server, "BEGIN; SELECT pg_current_xact_id()::text; COMMIT")
                            .await
                            .parse()
                            .unwrap();
                    given.push(xid);
                }
                let event = next(&mut events).await;
                assert_eq!(event.step, step);
                let to_xmax: u64 = event
                    .cursor
                    .as_str()
                    .split('~')
                    .nth(2)
                    .and_then(|to| to.split(':').nth(1))
                    .unwrap()
                    .parse()
                    .unwrap();
                if given.iter().all(|&x| x < to_xmax) {
                    break 'taken (event.cursor, given);
                }
            }
            panic!("the tail's poll always read the step before the two transactions ended");
        };
        drop(events);
        server.crash_and_start();
        // After the crash: the first id given again held by an open transaction, the
        // second taken by a save.
        let (held, conn) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        let driver = tokio::spawn(conn);
        held.batch_execute("BEGIN").await.unwrap();
        let held_xid: u64 = held
            .query_one("SELECT pg_current_xact_id()::text", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
            .parse()
            .unwrap();
        store
            .save_task_history(&user, "t", 100, &run)
            .await
            .unwrap();
        let saved_xid: u64 = sql_value(
            &server,
            &format!(
                "SELECT xid::text FROM given_back.task_history WHERE user_id = '{user}' AND step = 100"
            ),
        )
        .await
        .parse()
        .unwrap();
        if !(given.contains(&held_xid) && given.contains(&saved_xid)) {
            // The ends were written out before the crash: nothing given back; again.
            drop(held);
            let _ = driver.await;
            continue;
        }
        let mut resumed = store.watch_user(&user, Some(cursor)).await.unwrap();
        assert_eq!(next(&mut resumed).await.step, 100);
        held.batch_execute(&format!(
            "INSERT INTO given_back.task_history \
             (user_id, task_id, step, result, timestamp, started_at, status) \
             VALUES ('{user}', 'held', 7, '{{}}', now(), now(), 'running'); COMMIT"
        ))
        .await
        .unwrap();
        let e = next(&mut resumed).await;
        assert_eq!((e.task_id.as_str(), e.step), ("held", 7));
        // Nothing twice: a write now is the next event.
        store
            .save_task_history(&user, "t", 101, &run)
            .await
            .unwrap();
        assert_eq!(next(&mut resumed).await.step, 101);
        drop(held);
        let _ = driver.await;
        store.close().await;
        silent.close().await;
        return;
    }
    panic!("none of 3 crashes gave the ids back: the test shows nothing");
}

/// A server of the test's own whose WAL writer writes the end of a transaction that wrote
/// nothing only at its tick, every 10 s (a crash nearly always comes before it), with no
/// autovacuum taking ids; and a store's settings for it (schema `schema`, a poll of 100 ms,
/// quick retries).
fn lazy_server(schema: &str) -> (OwnServer, PgConfig) {
    let server = OwnServer::start(&["wal_writer_delay=10000", "autovacuum=off"]);
    let config = PgConfig::from_url(&server.url())
        .unwrap()
        .ssl_mode(SslMode::Disable)
        .schema(schema)
        .watch_poll(Duration::from_millis(100))
        .retry(RetryPolicy {
            initial_backoff: Duration::from_millis(5),
            ..RetryPolicy::default()
        });
    (server, config)
}

/// The first value `sql` returns on a connection of its own to `server`.
async fn sql_value(server: &OwnServer, sql: &str) -> String {
    let (client, conn) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let value = client
        .simple_query(sql)
        .await
        .unwrap()
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap();
    drop(client);
    let _ = driver.await;
    value
}
