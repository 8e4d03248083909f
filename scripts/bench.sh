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
bench="${CARGO_TARGET_DIR:-target}/release/examples/bench"
# the MPI figures and the seed's transport program first: they are for a quiet machine, and the
# machine is slow to settle after the 4096 processes of the scale figures
mpirun -np 2 "$bench" --mpi-rtt | tee "$out"
# the MPI round trip again while another process keeps a core busy
sh -c 'while :; do :; done' &
spinner=$!
mpirun -np 2 "$bench" --mpi-rtt --busy | tee -a "$out"
kill "$spinner"
spinner=
# the seed's transport program: 100 round trips of 1e6 f64 between rank 0 and rank 1
cargo build --release --bin cman_transport
for transport in tcp mpi; do
    seconds=$(mpirun -np 5 "${CARGO_TARGET_DIR:-target}/release/cman_transport" --$transport | awk '/array size 1000000$/ { print $1 }')
    echo "BENCH cman_transport_1e6_f64_x100_$transport $seconds s baseline=- ratio=-" | tee -a "$out"
done
echo "# cman_transport_*: mpirun -np 5 cman_transport --tcp|--mpi, the seconds it prints for 100 round trips of 10^6 f64 (each way)" | tee -a "$out"
cargo run --quiet --release --example bench | tee -a "$out"

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
    echo "Ratio = ours / baseline, the baseline measured in the same run: raw loopback TCP (into a"
    echo "fresh buffer for \`fetch_*\`), raw MPI for \`mpi_*\`, children that only dial and answer"
    echo "for \`scale_*\`. Lower is better for latencies (us), higher for throughput (MB/s)."
    echo
    echo "| Figure | Value | Unit | Raw baseline | Ratio |"
    echo "|---|---:|---|---:|---:|"
    awk '$1 == "BENCH" { sub(/^baseline=/, "", $5); sub(/^ratio=/, "", $6); printf "| `%s` | %s | %s | %s | %s |\n", $2, $3, $4, $5, $6 }' "$out"
    echo
    echo "Notes from the run:"
    echo
    sed -n 's/^# \{0,1\}/- /p' "$out"
} > BENCHMARKS.md
echo "wrote BENCHMARKS.md"
