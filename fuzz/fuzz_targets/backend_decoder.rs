//! Framing and every server message: decode, walk, re-encode, decode again.
//! The check is in ../checks.rs, shared with tests/fuzz_regressions.rs.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgengine_fuzz::check_backend_decoder(data));
