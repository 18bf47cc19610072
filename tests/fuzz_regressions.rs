//! Replays every input the fuzz targets keep — each crash ever found (fuzz/regressions/) and the
//! committed seed corpus (fuzz/corpus/) — through the same checks the targets run
//! (fuzz/checks.rs), with plain `cargo test`: no libFuzzer, no nightly, no database. A bug the
//! fuzzer once found stays fixed, and the corpus keeps passing as the code changes.
//!
//! Not in the published crate (Cargo.toml's `include` leaves it out): it compiles fuzz/checks.rs
//! into itself, and cargo does not package fuzz/, a crate of its own.

#[allow(dead_code)]
mod checks {
    include!("../fuzz/checks.rs");
}

use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// A fuzz target's check: its raw input in, a panic for a bug.
type Check = fn(&[u8]);

/// Each target's name (its directory under fuzz/corpus/ and fuzz/regressions/) and check.
const TARGETS: [(&str, Check); 4] = [
    ("backend_decoder", checks::check_backend_decoder),
    ("connection", checks::check_connection),
    ("scram", checks::check_scram),
    ("conninfo", checks::check_conninfo),
];

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a readable directory entry").path())
        .filter(|p| p.is_file())
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

/// Runs `check` on each file and returns the ones that made it panic, with the message.
/// With `announce`, each file is named on stderr before it runs, past the test harness's
/// capture: a crash that aborts the process (a stack overflow, a failed allocation) cannot be
/// caught, and this line is then the only sign of which input it was.
fn failures(check: Check, files: &[PathBuf], announce: bool) -> Vec<String> {
    let mut failed = Vec::new();
    for file in files {
        if announce {
            let line = format!("fuzz_regressions: replaying {}\n", file.display());
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
        let data = std::fs::read(file).expect("a readable input file");
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(&data))) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            failed.push(format!("{}: {message}", file.display()));
        }
    }
    failed
}

#[test]
fn every_saved_crash_passes_its_check() {
    let mut failed = Vec::new();
    for (target, check) in TARGETS {
        failed.extend(failures(check, &inputs("regressions", target), true));
    }
    assert!(
        failed.is_empty(),
        "fuzz regressions fail:\n{}",
        failed.join("\n")
    );
}

#[test]
fn every_corpus_input_passes_its_check() {
    let mut failed = Vec::new();
    for (target, check) in TARGETS {
        let files = inputs("corpus", target);
        assert!(
            !files.is_empty(),
            "fuzz/corpus/{target} has no inputs: the seed corpus is part of the repository"
        );
        failed.extend(failures(check, &files, false));
    }
    assert!(
        failed.is_empty(),
        "fuzz corpus inputs fail:\n{}",
        failed.join("\n")
    );
}

/// The replay of a recorded session is deterministic: the same bytes give the same outcome.
#[test]
fn connection_replay_is_deterministic() {
    for file in inputs("corpus", "connection") {
        let data = std::fs::read(&file).expect("a readable input file");
        assert_eq!(
            checks::run_connection_input(&data),
            checks::run_connection_input(&data),
            "{}",
            file.display()
        );
    }
}
