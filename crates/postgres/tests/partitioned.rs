//! The whole behaviour suite on the partitioned layout (a fresh schema per test, converted
//! at start by `PgConfig::partitioning`): every rule, cleanup's included, holds on both
//! layouts. Partition-specific behaviour is in `partitions.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

taskhistory_core::conformance_tests!(taskhistory_testing::partitioned_dyn_store().await);
