#!/usr/bin/env bash
# A real single-node Slurm (Debian 12: slurm-wlm 22.05 + munge) for integration tests, as root,
# without systemd.
#   ci/slurm.sh start   install if missing, (re)write slurm.conf, restart munged/slurmctld/slurmd,
#                       return once `srun -n1 true` works. Safe to re-run: stops old daemons first.
#   ci/slurm.sh stop    cancel our jobs, stop the daemons (by pid file). Safe to re-run.
#   ci/slurm.sh logs    tail of the daemon logs (for diagnosing a failed start)
# Env: SLURM_CPUS (default 8): task slots of the node, whatever the real core count.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
CPUS=${SLURM_CPUS:-8}
HOST=$(hostname -s)
LOGS=/var/log/slurm

stop() {
  # scancel only if the controller is up: otherwise it retries for ~10 s and fails anyway.
  if pid_alive /run/slurmctld.pid; then
    timeout 10 scancel --user=root 2>/dev/null || true
    # let slurmd reap the job steps, so no slurmstepd outlives the daemons
    wait_until 15 "jobs to leave squeue" sh -c '[ -z "$(squeue -h -o %i)" ]' || true
  fi
  stop_daemons /run/slurmd.pid:slurmd /run/slurmctld.pid:slurmctld /run/munge/munged.pid:munged
}

start() {
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    apt_install slurm-wlm munge
  fi
  stop

  # munge: Slurm's authentication. One key, created once; munged runs as user munge.
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
  wait_until 10 "munged to answer" sh -c 'munge -n </dev/null | unmunge'

  # slurm.conf for this host only, $CPUS task slots whatever the real core count (the lines
  # both test clusters share, and why: slurm_conf_common in ci/lib.sh)
  install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGS"
  local mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  { cat <<EOF
ClusterName=ci
SlurmctldHost=$HOST
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
KillWait=5
NodeName=$HOST CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes=ALL MaxTime=1 State=UP
EOF
    slurm_conf_common
  } > /etc/slurm/slurm.conf

  # Both daemonize themselves. -c: start with no jobs (do not recover an earlier run's state).
  slurmctld -c
  slurmd
  wait_until 30 "node $HOST to be idle (sinfo)" sh -c 'sinfo -h -o %T | grep -qE "^(idle|mixed|allocated)"'
  wait_until 60 "srun -n1 true to succeed" timeout 20 srun -n1 true
}

logs() {
  for f in "$LOGS"/*.log /var/log/munge/munged.log; do
    [ -f "$f" ] && { echo "--- tail $f"; tail -n 20 "$f"; }
  done
  return 0
}

case "${1:-}" in
  start|stop|logs) "$1" ;;
  *) echo "usage: $0 start|stop|logs" >&2; exit 2 ;;
esac
