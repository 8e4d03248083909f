#!/usr/bin/env bash
# The flagship example: local workers, typed remote calls, everywhere, a 10,000-item pmap.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cargo run --release --example quickstart
