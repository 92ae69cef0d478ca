//! The whole behaviour suite through a role that may only read and write the store's rows
//! (`least_privilege_grants`); the schema is created and migrated by its owner.
#![allow(clippy::unwrap_used, clippy::expect_used)]

taskhistory_core::conformance_tests!(taskhistory_testing::least_privilege_dyn_store().await);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_role_cannot_change_the_schema() {
    use taskhistory_testing::{app_password, app_role, database_url};
    let _ = taskhistory_testing::least_privilege_dyn_store().await;
    let mut config: tokio_postgres::Config = database_url().await.parse().unwrap();
    config.user(app_role()).password(app_password());
    let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let err = client
        .batch_execute("CREATE TABLE public.th_should_not_exist (x int)")
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{err}"
    );
}
