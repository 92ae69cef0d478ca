//! The whole behaviour suite on the partitioned layout through a role that may only read
//! and write the store's rows (`least_privilege_grants`, given after the owner converted the
//! schema): writes route into partitions, retention and the start-conflict function work
//! without DDL rights.
#![allow(clippy::unwrap_used, clippy::expect_used)]

taskhistory_core::conformance_tests!(
    taskhistory_testing::least_privilege_partitioned_dyn_store().await
);
