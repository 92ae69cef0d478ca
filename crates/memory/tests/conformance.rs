//! The whole behaviour suite on `MemoryStore`, used through `Arc<dyn TaskHistoryStore>`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use taskhistory_memory::MemoryStore;

taskhistory_core::conformance_tests!(Arc::new(MemoryStore::new()) as taskhistory_core::DynStore);

/// The store-wide limit on watches, on a store made with one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_past_the_limit_are_refused() {
    let store = MemoryStore::with_max_watchers(3);
    let dyn_store: taskhistory_core::DynStore = Arc::new(store.clone());
    taskhistory_core::conformance::watchers_past_the_limit_are_refused(&dyn_store, 3).await;
    assert_eq!(store.watchers(), 0, "every place is freed with its stream");
}
