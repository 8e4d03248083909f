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
# each MPI group in 5 runs, each figure the median run's (bench --median-of)
"$bench" --median-of 5 mpirun -np 2 "$bench" --mpi-rtt | tee "$out"
# the MPI round trip again while another process keeps a core busy
sh -c 'while :; do :; done' &
spinner=$!
"$bench" --median-of 5 mpirun -np 2 "$bench" --mpi-rtt --busy | tee -a "$out"
kill "$spinner"
spinner=
# the seed's transport program: 100 round trips of 1e6 f64 between rank 0 and rank 1
cargo build --release --bin cman_transport
transport_seconds() { # one run, as a BENCH line
    mpirun -np 5 "${CARGO_TARGET_DIR:-target}/release/cman_transport" "--$1" |
        awk -v t="$1" '/array size 1000000$/ { print "BENCH cman_transport_1e6_f64_x100_" t, $1, "s baseline=- ratio=-" }'
}
export -f transport_seconds
for transport in tcp mpi; do
    "$bench" --median-of 5 bash -c "transport_seconds $transport" | tee -a "$out"
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
    echo "Each figure is the median of 5 runs, each in fresh processes (the run with the median ratio,"
    echo "or value where there is no baseline); the last column shows every run's. Run once:"
    echo "\`workers_ready_8\` (itself the median of 3 starts) and \`scale_ready_4096\` (minutes long)."
    echo
    echo "| Figure | Value | Unit | Raw baseline | Ratio | Each run |"
    echo "|---|---:|---|---:|---:|---|"
    awk '$1 == "#" && $2 == "runs" && $3 == "of" { name = $4; sub(/:$/, "", name); $1 = $2 = $3 = $4 = ""; sub(/^ +/, ""); runs[name] = $0 }
         $1 == "BENCH" { sub(/^baseline=/, "", $5); sub(/^ratio=/, "", $6); order[++n] = $2; row[$2] = sprintf("| `%s` | %s | %s | %s | %s |", $2, $3, $4, $5, $6) }
         END { for (i = 1; i <= n; i++) printf "%s %s |\n", row[order[i]], (order[i] in runs ? runs[order[i]] : "-") }' "$out"
    echo
    echo "Notes from the run:"
    echo
    grep -v '^# runs of ' "$out" | sed -n 's/^# \{0,1\}/- /p'
} > BENCHMARKS.md
echo "wrote BENCHMARKS.md"
