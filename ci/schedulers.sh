#!/usr/bin/env bash
# Start or stop both real schedulers used by the integration tests (see ci/slurm.sh, ci/sge.sh).
#   ci/schedulers.sh start   Slurm, then Grid Engine; one line per scheduler with the time taken.
#                            On a failure: the daemon log tails, and exit status 1.
#   ci/schedulers.sh stop    stop both
set -uo pipefail
CI=$(cd "$(dirname "$0")" && pwd)

case "${1:-}" in
  start)
    for s in slurm sge; do
      t0=$(date +%s.%N)
      if ! "$CI/$s.sh" start; then
        echo "$s: start FAILED; daemon logs:" >&2
        "$CI/$s.sh" logs >&2
        exit 1
      fi
      awk -v s="$s" -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN {printf "%s: started in %.1f s\n", s, a - b}'
    done ;;
  stop)
    rc=0
    "$CI/sge.sh" stop || rc=1
    "$CI/slurm.sh" stop || rc=1
    exit $rc ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
