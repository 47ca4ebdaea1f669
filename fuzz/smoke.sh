#!/usr/bin/env bash
# Builds every cargo-fuzz target and runs each one for a few seconds: the saved reproducers
# under regressions/TARGET first (a fixed bug must stay fixed), then new inputs.
#
#   fuzz/smoke.sh [SECONDS]        default 10 seconds per target
#
# Environment:
#   FUZZ_FEATURES="a b"                     cargo features of the fuzz crate to enable
#   FUZZ_SANITIZER=none                     build without AddressSanitizer (default: address)
#   FUZZ_TARGETS="a b"                      only these targets
#
# Needs cargo-fuzz (installed from crates.io when missing). Only a stable toolchain is
# assumed: RUSTC_BOOTSTRAP=1 lets it accept the nightly-only flags cargo-fuzz passes.
# Exits non-zero when any target finds a crash or an invariant violation.
set -euo pipefail

cd "$(dirname "$0")"
secs="${1:-10}"
case "$secs" in
    '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;;
esac

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

args=(--sanitizer "${FUZZ_SANITIZER:-address}")
if [ -n "${FUZZ_FEATURES:-}" ]; then
    args+=(--features "$FUZZ_FEATURES")
fi

targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
cargo fuzz build "${args[@]}"

failed=()
for t in $targets; do
    echo "=== $t: ${secs}s"
    mkdir -p "corpus/$t"
    dirs=("corpus/$t")
    if [ -d "regressions/$t" ]; then
        dirs+=("regressions/$t")
    fi
    # -timeout: one input running longer than this is a hang, reported like a crash.
    if ! cargo fuzz run "${args[@]}" "$t" "${dirs[@]}" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1; then
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz smoke: FAILED: ${failed[*]} (reproducers under fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz smoke: all targets ran ${secs}s without a finding"
