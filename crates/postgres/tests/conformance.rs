//! The whole behaviour suite on PostgreSQL: a real server, a fresh schema per test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

taskhistory_core::conformance_tests!(taskhistory_testing::fresh_dyn_store().await);
