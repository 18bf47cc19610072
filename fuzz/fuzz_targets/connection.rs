//! One client connection (startup, authentication, three queries) against a fuzzed
//! server byte stream.
//! The check is in ../checks.rs, shared with tests/fuzz_regressions.rs.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgengine_fuzz::check_connection(data));
