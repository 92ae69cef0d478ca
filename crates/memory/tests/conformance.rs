//! The whole behaviour suite on `MemoryStore`, used through `Arc<dyn TaskHistoryStore>`.

use std::sync::Arc;

use taskhistory_memory::MemoryStore;

taskhistory_core::conformance_tests!(Arc::new(MemoryStore::new()) as taskhistory_core::DynStore);
