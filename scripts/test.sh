#!/usr/bin/env bash
# Every test: unit and integration tests (real worker processes), the build without MPI,
# and clippy with warnings denied.
set -euo pipefail
source "$(dirname "$0")/env.sh"
step() { echo; echo "=== $* ==="; }
step "build without MPI";   cargo build --no-default-features --lib
step "clippy";              cargo clippy --all-targets -- -D warnings
step "tests";               cargo test --all-targets 2>&1 | tee target/test-output.txt
step "doc tests";           cargo test --doc
summary=$(grep -E '^test result:' target/test-output.txt | awk '{p+=$4; f+=$6} END {print p" passed, "f" failed"}')
echo; echo "$summary"
