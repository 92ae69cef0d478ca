//! The whole behaviour suite through PgBouncer (Debian's package) in transaction pooling
//! mode, with `PgConfig::pgbouncer` on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

taskhistory_core::conformance_tests!(taskhistory_postgres::testing::pgbouncer_dyn_store().await);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_through_pgbouncer_needs_a_direct_listen_url() {
    use taskhistory_core::{StoreError, TaskHistoryStore};
    use taskhistory_postgres::testing::{fresh_config, pgbouncer, store_for};
    let direct = fresh_config().await;
    store_for(direct.clone()).await.close().await;
    let port = pgbouncer().await.port;
    let store = store_for(direct.host("127.0.0.1").port(port).pgbouncer(true)).await;
    match store.watch_user("u").await {
        Err(StoreError::InvalidInput { field, .. }) => assert_eq!(field, "DB_LISTEN_URL"),
        Err(e) => panic!("expected InvalidInput(DB_LISTEN_URL), got {e}"),
        Ok(_) => panic!("a watch through PgBouncer without a listen URL was accepted"),
    }
    let quiet = store_for(fresh_config().await.notifications(false)).await;
    assert!(matches!(
        quiet.watch_user("u").await,
        Err(StoreError::InvalidInput { .. })
    ));
}
