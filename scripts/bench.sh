#!/usr/bin/env bash
# Builds and runs the benchmark program (examples/bench.rs) in release mode, shows its output,
# and writes BENCHMARKS.md: the machine, the date, a table of the BENCH lines and the notes.
#
#   scripts/bench.sh            (honours CARGO_TARGET_DIR and the other cargo variables)
set -euo pipefail
source "$(dirname "$0")/env.sh"

out=$(mktemp)
spinner=
trap 'rm -f "$out"; [ -z "$spinner" ] || kill "$spinner" 2>/dev/null' EXIT

cargo build --release --example bench
cargo run --quiet --release --example bench | tee "$out"
bench="${CARGO_TARGET_DIR:-target}/release/examples/bench"
mpirun -np 2 "$bench" --mpi-rtt | tee -a "$out"
# the MPI round trip again while another process keeps a core busy
sh -c 'while :; do :; done' &
spinner=$!
mpirun -np 2 "$bench" --mpi-rtt --busy | tee -a "$out"
kill "$spinner"

cpu=$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)
{
    echo "# clusterman benchmarks"
    echo
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- Machine: ${cpu:-unknown CPU}, $(nproc) CPUs, $(uname -sr)"
    echo "- Rust: $(rustc --version)"
    echo "- Commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src 2>/dev/null || echo ' (src/ has uncommitted changes)')"
    echo "- Command: \`scripts/bench.sh\` (runs \`cargo run --release --example bench\`)"
    echo
    echo "Ratio = ours / baseline, where the baseline is raw loopback TCP (raw MPI for \`mpi_*\`)"
    echo "measured in the same run: lower is better for latencies (us), higher is better for"
    echo "throughput (MB/s)."
    echo
    echo "| Figure | Value | Unit | Raw TCP baseline | Ratio |"
    echo "|---|---:|---|---:|---:|"
    awk '$1 == "BENCH" { sub(/^baseline=/, "", $5); sub(/^ratio=/, "", $6); printf "| `%s` | %s | %s | %s | %s |\n", $2, $3, $4, $5, $6 }' "$out"
    echo
    echo "Notes from the run:"
    echo
    sed -n 's/^# \{0,1\}/- /p' "$out"
} > BENCHMARKS.md
echo "wrote BENCHMARKS.md"
