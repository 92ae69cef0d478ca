//! Not published. A crate that depends on `taskhistory` and `tokio` (and, for the guide's
//! tracing example, the OpenTelemetry crates a service would add), as a service does: the
//! README's and the guide's Rust blocks are its doc tests (`cargo test --doc -p
//! taskhistory-downstream`, part of the test command), so a block that needs a crate a
//! service would not have (`serde_json::json!` without `taskhistory::`) fails here.

/// The README's code.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct Readme;

/// The guide's code (the facade's documentation, `docs/guide.md`).
#[cfg(doctest)]
#[doc = include_str!("../../../docs/guide.md")]
pub struct Guide;
