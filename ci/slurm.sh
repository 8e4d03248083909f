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

  # slurm.conf for this host only. SlurmUser=root: no file-ownership dance on a throwaway box.
  # config_overrides: slurmd accepts CPUs=$CPUS although the machine has fewer cores, so tests
  # get $CPUS task slots. MpiDefault=pmix: plain `srun` launches Debian's Open MPI programs
  # (MPICH programs need `srun --mpi=pmi2`). ReturnToService=2: a node left DOWN by an earlier
  # run comes back by itself. MinJobAge=300: finished jobs stay visible to scontrol for 5 min.
  # SchedulerParameters: by default a job submitted right after another one ended waits ~3 s
  # (throttled event-driven scheduling) and one queued behind a never-runnable job waits for the
  # 60 s scheduling pass; on a one-node CI box scheduling every second costs nothing.
  install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGS"
  local mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  cat > /etc/slurm/slurm.conf <<EOF
ClusterName=ci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MailProg=/bin/true
MpiDefault=pmix
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SchedulerType=sched/backfill
SchedulerParameters=sched_min_interval=0,sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
NodeName=$HOST CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes=ALL MaxTime=1 State=UP
EOF

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
