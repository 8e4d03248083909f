# Helpers shared by ci/slurm.sh and ci/sge.sh (sourced, not run).

# wait_until SECONDS WHAT CMD...: poll CMD every 0.1 s until it succeeds; give up after SECONDS.
# Daemons here come up in 0.1-5 s, so a fixed sleep would be either too long or flaky.
wait_until() {
  local limit=$1 what=$2; shift 2
  local deadline=$(( $(date +%s) + limit ))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "timed out after ${limit}s waiting for: $what" >&2
      return 1
    fi
    sleep 0.1
  done
}

# quiet CMD...: run CMD, show its output only if it fails (qconf reports success on stderr).
quiet() {
  local out
  out=$("$@" 2>&1) || { echo "$out" >&2; return 1; }
}

# apt_install PKG...: install without starting services. Debian postinst scripts call
# invoke-rc.d, which would try to start the daemons (there is no systemd here); a policy-rc.d
# that exits 101 forbids that. ci/*.sh start the daemons themselves.
apt_install() {
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  quiet apt-get update -q
  quiet apt-get -y -q --no-install-recommends install "$@"
  [ $made_policy = 0 ] || rm -f /usr/sbin/policy-rc.d
}

# stop_daemons FILE:NAME...: TERM each process named in a pid FILE, if it is alive and really is
# NAME (a stale pid file may name a recycled pid); wait for all of them (they take 1-9 s to shut
# down, so all at once rather than in turn); KILL what is left after 30 s. Never kills by name.
stop_daemons() {
  local arg pid pids=()
  for arg in "$@"; do
    local file=${arg%%:*} name=${arg#*:}
    [ -s "$file" ] || continue
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null && grep -q "^$name" "/proc/$pid/comm" 2>/dev/null; then
      kill "$pid"; pids+=("$pid")
    fi
    rm -f "$file"
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  wait_until 30 "pids ${pids[*]} to exit" none_alive "${pids[@]}" || kill -9 "${pids[@]}" 2>/dev/null || true
}
none_alive() {
  local pid
  for pid in "$@"; do ! kill -0 "$pid" 2>/dev/null || return 1; done
}

# pid_alive FILE: the pid file names a live process.
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# slurm_conf_common: the slurm.conf lines of both test clusters (ci/slurm.sh, ci/multinode.sh).
# SlurmUser=root: no file-ownership dance on a throwaway box. config_overrides: slurmd accepts
# more CPUs than the machine has, so tests get the task slots they ask for. MpiDefault=pmix:
# plain `srun` launches Debian's Open MPI programs (MPICH programs need `srun --mpi=pmi2`).
# ReturnToService=2: a node left DOWN comes back when its slurmd registers again. MinJobAge=300:
# finished jobs stay visible to scontrol for 5 min. SchedulerParameters: by default a job
# submitted right after another one ended waits ~3 s (throttled event-driven scheduling) and one
# queued behind a never-runnable job waits for the 60 s scheduling pass; scheduling every second
# costs nothing here.
slurm_conf_common() {
  cat <<'CONF'
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MailProg=/bin/true
MpiDefault=pmix
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
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
Waittime=0
CONF
}
