//! Connection strings (URL and key=value) and the password file.
//! The check is in ../checks.rs, shared with tests/fuzz_regressions.rs.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgengine_fuzz::check_conninfo(data));
