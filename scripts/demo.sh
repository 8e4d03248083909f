#!/usr/bin/env bash
# The main job: the flagship tour with real workers and real MPI (examples/mpi_cluster.rs:
# 4 mpirun ranks, MPI collectives inside mpido!, pmap), after the local-workers quickstart.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cargo build --release --examples --bins
echo "=== quickstart: local workers, typed calls, everywhere, a 10,000-item pmap ==="
target/release/examples/quickstart
echo
echo "=== mpi_cluster: 4 MPI ranks started by mpirun, MPI code on every rank with mpido! ==="
target/release/examples/mpi_cluster
