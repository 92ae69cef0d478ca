//! The whole behaviour suite on `MemoryStore`, used through `Arc<dyn TaskHistoryStore>`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use taskhistory_memory::MemoryStore;

taskhistory_core::conformance_tests!(Arc::new(MemoryStore::new()) as taskhistory_core::DynStore);
