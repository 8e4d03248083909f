#!/usr/bin/env bash
# Fuzzes every decoder of untrusted input for SECONDS (default 60): random mutations of valid
# frames, hellos, welcomes and payloads; fails on a panic or an allocation past a small
# multiple of the input. A failure prints the input in hex; CMAN_FUZZ_SEED=N repeats a run.
set -euo pipefail
source "$(dirname "$0")/env.sh"
CMAN_FUZZ_SECONDS="${1:-60}" cargo test --release --test fuzz
