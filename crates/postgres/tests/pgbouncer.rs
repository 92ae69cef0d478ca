//! The whole behaviour suite through PgBouncer (Debian's package) in transaction pooling
//! mode, with `PgConfig::pgbouncer` on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

taskhistory_core::conformance_tests!(taskhistory_postgres::testing::pgbouncer_dyn_store().await);
