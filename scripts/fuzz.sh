#!/usr/bin/env bash
# Fuzzes what reads bytes from clients, peers and files (protocol detection, the transport header
# and HTTP markers, DNS messages, the config file, manifest files) with cargo-fuzz and libFuzzer:
# the targets in fuzz/, over the wrappers in src/fuzzing.rs. Each target runs for FUZZ_SECONDS,
# starting from its seeds in fuzz/corpus/<target>/, and its number of runs is printed.
# Installs cargo-fuzz if it is missing. The toolchain is stable: RUSTC_BOOTSTRAP=1 lets
# cargo-fuzz's -Z flags (sanitizer, coverage) through.
# Settings: FUZZ_SECONDS (per target, default 60), FUZZ_TARGETS (default: all six).
# A crash stops the run; the input is saved in fuzz/artifacts/<target>/. Replay it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/<file>
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

FUZZ_SECONDS=${FUZZ_SECONDS:-60}
read -r -a TARGETS <<< "${FUZZ_TARGETS:-detect http1_request transport_header dns config manifests}"
export RUSTC_BOOTSTRAP=1

command -v cargo-fuzz >/dev/null || stage install-fuzz cargo install cargo-fuzz --locked
# fuzz/ is a workspace of its own: build it with the main crate's locked dependency versions.
cp Cargo.lock fuzz/Cargo.lock

RUNS_LOG=()

# fuzz_one TARGET: runs one target for FUZZ_SECONDS and records libFuzzer's run count.
fuzz_one() {
    local target=$1 log done_line
    log=$(mktemp)
    # libFuzzer reports on stderr: keep it on screen and in the log.
    if ! cargo fuzz run "$target" -- -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 2>&1 | tee "$log"; then
        echo "fuzz $target: FAILED; the input that broke it is in fuzz/artifacts/$target/" >&2
        rm -f "$log"
        return 1
    fi
    done_line=$(grep -Eo 'Done [0-9]+ runs in [0-9]+ second\(s\)' "$log" | tail -n 1 || true)
    rm -f "$log"
    RUNS_LOG+=("$(printf '%-18s %s' "$target" "${done_line:-(no Done line from libFuzzer)}")")
    echo "fuzz $target: ${done_line:-(no Done line from libFuzzer)}"
}

stage fuzz-build cargo fuzz build
for target in "${TARGETS[@]}"; do
    stage "fuzz-$target" fuzz_one "$target"
done
stage_summary
echo
echo "target             libFuzzer (${FUZZ_SECONDS}s each)"
printf '%s\n' "${RUNS_LOG[@]}"
