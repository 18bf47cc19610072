//! The SCRAM-SHA-256 client against fuzzed server-first and server-final messages.
//! The check is in ../checks.rs, shared with tests/fuzz_regressions.rs.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgengine_fuzz::check_scram(data));
