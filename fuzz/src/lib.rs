//! The checks behind pgengine's fuzz targets. They live in `checks.rs` beside this crate so
//! that the main crate's `tests/fuzz_regressions.rs` can `include!` the very same code and
//! replay every saved input with plain `cargo test`, without libFuzzer.

include!("../checks.rs");
