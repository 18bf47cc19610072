#!/usr/bin/env bash
# Builds every fuzz target and runs each for FUZZ_SECONDS (default 60), starting from the
# committed corpus; fails on the first crash, hang or leak. Needs no database and no nightly
# toolchain: cargo-fuzz passes -Z flags (sanitizer, coverage), which RUSTC_BOOTSTRAP=1 lets the
# stable compiler accept.
#
#   bash fuzz/run-ci.sh                       # every target, 60 s each
#   FUZZ_SECONDS=600 bash fuzz/run-ci.sh scram  # one target, 10 minutes
#
# New inputs go to a scratch directory, not into fuzz/corpus/. To grow the committed corpus:
#   cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET -- -max_total_time=600
#   RUSTC_BOOTSTRAP=1 cargo fuzz cmin TARGET
# To refresh the seeds from a real server (tests/record_corpus.rs), then minimise as above:
#   PGENGINE_RECORD_CORPUS=/tmp/seeds cargo test --all-features --test record_corpus
#   cp /tmp/seeds/TARGET/* fuzz/corpus/TARGET/
# A crash is saved in fuzz/artifacts/TARGET/; keep it in fuzz/regressions/TARGET/ (after
# `cargo fuzz tmin TARGET FILE`), where tests/fuzz_regressions.rs replays it with `cargo test`.
set -euo pipefail
cd "$(dirname "$0")"

seconds=${FUZZ_SECONDS:-60}
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

# The main crate's `cargo fmt` does not reach this crate, nor checks.rs (it is include!d).
echo "== rustfmt --check (fuzz crate)"
rustfmt --edition 2024 --check checks.rs src/lib.rs fuzz_targets/*.rs

echo "== cargo fuzz build"
cargo fuzz build

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in "${targets[@]}"; do
    echo "== fuzzing $target for ${seconds}s"
    mkdir -p "$scratch/$target"
    log="$scratch/$target.log"
    # -timeout: one input running this long is a hang (the connection target also panics by
    # itself on a session that stops making progress).
    if ! cargo fuzz run "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1; then
        tail -n 80 "$log"
        echo "FAILED: fuzz target $target found a crash; the input is in fuzz/artifacts/$target/."
        echo "Reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run $target fuzz/artifacts/$target/<file>"
        exit 1
    fi
    grep -E '^#[0-9]+[[:space:]]+DONE|^stat::number_of_executed_units|^stat::peak_rss_mb' "$log" || true
done
echo "fuzzing passed: ${#targets[@]} targets, ${seconds}s each, no crash"
