#!/usr/bin/env bash
# A real single-node Grid Engine (Debian 12: gridengine 8.1.9) for integration tests, as root,
# without systemd.
#   ci/sge.sh start   install if missing, restart sge_qmaster + sge_execd, configure host, queue
#                     all.q ($SLOTS slots) and parallel environment "mpi", return once a
#                     `qsub -sync y` job has run. Safe to re-run: stops old daemons first.
#   ci/sge.sh stop    delete our jobs, stop the daemons (by pid file). Safe to re-run.
#   ci/sge.sh logs    tail of the daemons' messages files (for diagnosing a failed start)
# Afterwards:  . /var/lib/gridengine/default/common/settings.sh   (SGE_ROOT, SGE_CELL, PATH)
# Env: SGE_SLOTS (default 8): slots of the queue and of the PE, whatever the real core count.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
SLOTS=${SGE_SLOTS:-8}
HOST=$(hostname)
export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
COMMON=$SGE_ROOT/$SGE_CELL/common
SPOOL=/var/spool/gridengine
QMASTER_PID=$SPOOL/qmaster/qmaster.pid   # the daemons write their pid files themselves; execd's
                                         # spool dir is named as execd resolves itself ("localhost")

stop() {
  # qdel only if qmaster is up: otherwise the client keeps retrying until its own timeout.
  if pid_alive "$QMASTER_PID"; then
    timeout 10 qdel -u root >/dev/null 2>&1 || true
    # let execd reap the jobs, so no sge_shepherd outlives the daemons
    wait_until 15 "jobs to leave qstat" sh -c '[ -z "$(qstat -u root)" ]' || true
  fi
  local f execds=()
  for f in "$SPOOL"/execd/*/execd.pid; do execds+=("$f:sge_execd"); done
  stop_daemons "${execds[@]}" "$QMASTER_PID:sge_qmaster"   # qmaster takes ~9 s to shut down
}

install_sge() {
  # Preseed debconf so the postinst creates cell "default" with this host as master
  # (init_cluster) instead of asking.
  local p
  for p in gridengine-common gridengine-client gridengine-master gridengine-exec; do
    printf '%s shared/gridengineconfig boolean true\n%s shared/gridenginecell string default\n%s shared/gridenginemaster string %s\n' \
      "$p" "$p" "$p" "$HOST" | debconf-set-selections
  done
  apt_install gridengine-master gridengine-exec gridengine-client
}

configure() {  # needs a running qmaster; root is a manager from init_cluster on
  local w; w=$(mktemp -d)
  qconf -sh 2>/dev/null | grep -qx "$HOST" || quiet qconf -ah "$HOST"   # admin host
  qconf -ss 2>/dev/null | grep -qx "$HOST" || quiet qconf -as "$HOST"   # submit host
  # global: min_uid/min_gid default to 1000 and would refuse root's jobs; the accounting file
  # (qacct: exit status of finished jobs) is flushed every second instead of every 15 s
  qconf -sconf global | sed -e 's/^min_uid .*/min_uid 0/' -e 's/^min_gid .*/min_gid 0/' \
      -e 's/flush_time=[0-9:]*/flush_time=00:00:01/' > "$w/global"
  quiet qconf -Mconf "$w/global"
  # scheduler: run every second (default 15 s) and right after a submit/finish
  qconf -ssconf | sed -e 's/^schedule_interval .*/schedule_interval 0:0:1/' \
      -e 's/^flush_submit_sec .*/flush_submit_sec 1/' -e 's/^flush_finish_sec .*/flush_finish_sec 1/' > "$w/sconf"
  quiet qconf -Msconf "$w/sconf"
  # exec host (-Ae adds, -Me modifies: neither accepts the other case)
  printf 'hostname %s\nload_scaling NONE\ncomplex_values NONE\nuser_lists NONE\nxuser_lists NONE\nprojects NONE\nxprojects NONE\nusage_scaling NONE\nreport_variables NONE\n' "$HOST" > "$w/exec"
  if qconf -sel 2>/dev/null | grep -qx "$HOST"; then quiet qconf -Me "$w/exec"; else quiet qconf -Ae "$w/exec"; fi
  # parallel environment "mpi": fill this host first; control_slaves TRUE = tight integration
  # (mpirun starts ranks through `qrsh -inherit`, so SGE sees and kills them)
  cat > "$w/pe" <<EOF
pe_name            mpi
slots              $SLOTS
user_lists         NONE
xuser_lists        NONE
start_proc_args    NONE
stop_proc_args     NONE
allocation_rule    \$fill_up
control_slaves     TRUE
job_is_first_task  FALSE
urgency_slots      min
accounting_summary FALSE
qsort_args         NONE
EOF
  if qconf -spl 2>/dev/null | grep -qx mpi; then quiet qconf -Mp "$w/pe"; else quiet qconf -Ap "$w/pe"; fi
  # queue all.q, from the built-in template (EDITOR=cat prints it): this host, $SLOTS slots,
  # PE mpi, bash as the job shell, and no load thresholds (a busy 2-core box would otherwise
  # put the queue in alarm state and stop scheduling).
  if qconf -sql 2>/dev/null | grep -qx all.q; then qconf -sq all.q; else EDITOR=cat qconf -aq all.q 2>/dev/null || true; fi |
    sed -e "s/^hostlist .*/hostlist $HOST/" -e "s/^slots .*/slots $SLOTS/" -e 's/^load_thresholds .*/load_thresholds NONE/' \
        -e 's/^pe_list .*/pe_list mpi/' -e 's|^shell .*|shell /bin/bash|' > "$w/queue"
  grep -q '^qname' "$w/queue"
  if qconf -sql 2>/dev/null | grep -qx all.q; then quiet qconf -Mq "$w/queue"; else quiet qconf -Aq "$w/queue"; fi
  rm -rf "$w"
}

queue_ready() {  # the all.q line of `qstat -f` has a 6th column only when it has state flags (u, a, d, E...)
  [ "$(qstat -f -q all.q | awk '/^all.q@/ {print NF}')" = 5 ]
}

start() {
  command -v sge_qmaster >/dev/null && command -v sge_execd >/dev/null && command -v qsub >/dev/null || install_sge
  [ -s "$COMMON/settings.sh" ] || { echo "SGE cell not initialised: $COMMON/settings.sh missing (debconf preseed?)" >&2; exit 1; }
  . "$COMMON/settings.sh"
  stop
  echo "$HOST" > "$COMMON/act_qmaster"
  # Here `hostname` resolves to 127.0.0.1 and 127.0.0.1 back to "localhost", so qmaster sees
  # clients as "localhost" and denies them ("client IP resolved to host name localhost. This is
  # not identical to clients host name"). SGE's host_aliases file makes both names one host.
  local ip rev
  ip=$(getent hosts "$HOST" | awk '{print $1; exit}')
  rev=$(getent hosts "$ip" | awk '{print $2; exit}')
  if [ -n "$rev" ] && [ "$rev" != "$HOST" ]; then echo "$HOST $rev" > "$COMMON/host_aliases"; else rm -f "$COMMON/host_aliases"; fi
  chown -R sgeadmin:sgeadmin "$COMMON"

  /usr/sbin/sge_qmaster                       # daemonizes itself
  wait_until 30 "sge_qmaster to answer qstat" qstat
  configure
  /usr/sbin/sge_execd
  wait_until 60 "queue all.q to be free of state flags (qstat -f)" queue_ready || { qstat -f >&2; exit 1; }
  timeout 60 qsub -sync y -b y -N ci-ready -j y -o /dev/null true >/dev/null
}

logs() {
  local f
  for f in "$SPOOL"/qmaster/messages "$SPOOL"/execd/*/messages /tmp/qmaster_messages* /tmp/execd_messages*; do
    [ -f "$f" ] && { echo "--- tail $f"; tail -n 20 "$f"; }
  done
  return 0
}

case "${1:-}" in
  start|stop|logs) "$1" ;;
  *) echo "usage: $0 start|stop|logs" >&2; exit 2 ;;
esac
