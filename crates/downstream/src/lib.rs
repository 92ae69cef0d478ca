//! Not published. A crate that depends on `taskhistory` and `tokio` and nothing else, as a
//! service does: the README's Rust blocks are its doc tests (`cargo test --doc -p
//! taskhistory-downstream`, part of the test command), so a block that needs a crate a
//! service would not have (`serde_json::json!` without `taskhistory::`) fails here.

/// The README's code.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct Readme;
