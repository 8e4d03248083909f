#!/usr/bin/env bash
# Every test: unit and integration tests with real worker processes, real mpirun (Open MPI and
# MPICH), real Slurm and Grid Engine daemons and a real multi-node Slurm in namespaces (started
# here when run as root), 30 s of fuzzing
# of every decoder of untrusted input, the build without MPI, and clippy with warnings denied.
set -euo pipefail
CMAN_EXTRA_PACKAGES="mpich libmpich-dev iproute2 python3" source "$(dirname "$0")/env.sh"
step() { echo; echo "=== $* ==="; }
log=target/test-output.txt
mkdir -p target && : > "$log"
# A one-off build gains nothing from incremental caches, which would double the disk it takes.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi
echo "free disk: $(df -h --output=avail . | tail -1 | tr -d ' ')"

if [ "$(id -u)" -eq 0 ]; then
  step "start Slurm and Grid Engine (single node, real daemons)"
  bash ci/schedulers.sh start
  set +u; . /var/lib/gridengine/default/common/settings.sh; set -u
  export CMAN_REQUIRE_SCHEDULERS=1   # their tests fail, not skip, if a daemon is missing
  step "start the multi-node Slurm (controller, login host, two compute nodes in namespaces)"
  bash ci/multinode.sh up
  trap 'bash ci/multinode.sh down' EXIT
  export CMAN_REQUIRE_MULTINODE=1
else
  echo "not root: the Slurm, Grid Engine and multi-node tests will report themselves skipped (start them with: sudo ci/schedulers.sh start; sudo ci/multinode.sh up)"
fi

step "build without MPI";        cargo build --no-default-features --lib
                                 cargo clippy --no-default-features --lib -- -D warnings
step "clippy";                   cargo clippy --all-targets -- -D warnings
# (tests/fuzz.rs fuzzes every decoder of untrusted input; 30 s here, see scripts/fuzz.sh)
step "tests (Open MPI)";         CMAN_FUZZ_SECONDS=30 cargo test --all-targets 2>&1 | tee -a "$log"
step "doc tests";                cargo test --doc 2>&1 | tee -a "$log"
# MPICH: its own target dir (mpi-sys does not rebuild when the MPI changes) and its launcher
step "MPI tests (MPICH), and mpirun under the fake PBS and LSF"
MPI_PKG_CONFIG=mpich CARGO_TARGET_DIR=target/mpich CMAN_MPIEXEC=mpiexec.mpich cargo test --test mpi --test pbs --test lsf 2>&1 | tee -a "$log"
# and workers on two nodes of the multi-node Slurm (srun --mpi=pmi2; MPICH over UCX's TCP may hang
# in MPI_Finalize across nodes, openucx/ucx#8738: ranks leave after 10 s without it)
MPI_PKG_CONFIG=mpich CARGO_TARGET_DIR=target/mpich CMAN_MPIEXEC=mpiexec.mpich cargo test --test multinode workers_span 2>&1 | tee -a "$log"
echo
grep -E '^test result:' "$log" | awk '{p+=$4; f+=$6; i+=$8} END {print p" passed, "f" failed, "i" skipped"}'
