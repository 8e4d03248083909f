#!/usr/bin/env bash
# A real multi-node Slurm on this one machine, as root, for the multi-node tests: a controller,
# a login host and N compute nodes, each "host" its own network, UTS (hostname), mount, PID and
# IPC namespace, joined by a bridge. One slurmd per node (no special Slurm build: `%n` in the
# slurmd paths), one munged of our own. Beside the single-node Slurm of ci/slurm.sh, untouched.
#
#   ci/multinode.sh up              build it; returns once `srun -N<nodes> true` works
#   ci/multinode.sh down            cancel jobs, end every process, delete namespaces and state
#   ci/multinode.sh exec HOST CMD…  run CMD on HOST (ctl, login, node1…) with SLURM_CONF set
#   ci/multinode.sh isolate-login   compute nodes lose their route to the login host
#   ci/multinode.sh reach-login     …and get it back
#   ci/multinode.sh cut HOST        HOST's link goes down (its processes live on)
#   ci/multinode.sh heal HOST       …and comes back
#   ci/multinode.sh kill HOST       HOST dies: link down first (no goodbye reaches anyone), then
#                                   every process on it is killed
#   ci/multinode.sh revive HOST     a killed node boots again: new namespaces, slurmd, link up
#   ci/multinode.sh mend            undo all of the above: routes back, links up, dead nodes revived
#   ci/multinode.sh pids HOST       pids (as this namespace sees them) of every process on HOST
#   ci/multinode.sh status | logs
#
# Shared by every host, like NFS: the whole filesystem, /tmp included, except /etc/hosts (each
# host's own names) and /dev/shm (MPI's shared memory must not cross nodes); Slurm's TmpFS
# is a directory of each node's own. Private PID and IPC
# namespaces keep a node's processes invisible to the others, and make UCX (MPICH) see
# separate machines. Env: CMAN_MN_DIR (/var/tmp/cman-multinode), CMAN_MN_NODES (2),
# CMAN_MN_CPUS (2 task slots per node), CMAN_MN_NET (10.77.0, a /24).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
DIR=${CMAN_MN_DIR:-/var/tmp/cman-multinode}
NODES=${CMAN_MN_NODES:-2}
CPUS=${CMAN_MN_CPUS:-2}
NET=${CMAN_MN_NET:-10.77.0}
NS=cman-mn
CONF=$DIR/slurm.conf
MUNGE=$DIR/munge

nodes() { seq -f 'node%g' 1 "$NODES"; }
hosts() { echo ctl; echo login; nodes; }
address() { case $1 in ctl) echo "$NET.1" ;; login) echo "$NET.100" ;; node*) echo "$NET.$((10 + ${1#node}))" ;; esac; }
holder() { cat "$DIR/$1/holder.pid"; }

# on HOST CMD…: CMD in every namespace of HOST (nsenter forks into its PID namespace).
on() {
  local host=$1; shift
  nsenter --target "$(holder "$host")" --all --wd="$PWD" -- env SLURM_CONF="$CONF" "$@"
}

# boot HOST: the namespaces of HOST other than its network one, held by a process that is PID 1
# there (it reaps orphans, and when it dies the kernel ends everything else on the host).
boot() {
  local host=$1 dir=$DIR/$1
  install -d -m 0755 "$dir" "$dir/cgroup"
  rm -f "$dir/booted"
  # `ip netns exec` would remount /sys and hide the cgroup tree, without which slurmd 22.05
  # refuses to start: mount this namespace's sysfs (UCX and hwloc list network devices there)
  # with the machine's cgroup mounts moved back on top.
  setsid nsenter --net="/run/netns/$NS-$host" unshare --uts --ipc --mount --propagation private --pid --fork --mount-proc sh -c '
      set -e
      hostname "$1"
      mount --rbind /sys/fs/cgroup "$2/cgroup"
      mount -t sysfs "sysfs-$1" /sys
      mount --move "$2/cgroup" /sys/fs/cgroup
      mount --bind "$3/hosts" /etc/hosts
      mount -t tmpfs -o mode=1777,size=1g "shm-$1" /dev/shm
      touch "$2/booted"
      trap "exit 0" TERM
      while :; do sleep 3600 & wait $!; done' boot "$host" "$dir" "$DIR" </dev/null >/dev/null 2>&1 &
  local unshare=$!
  wait_until 10 "$host to boot" test -e "$dir/booted"
  # unshare --fork: the holder is unshare's child
  tr -d ' \n' < "/proc/$unshare/task/$unshare/children" > "$dir/holder.pid"
}

# link HOST up|down: HOST's end of its veth.
link() { ip -n "$NS-$1" link set eth0 "$2"; }

start_slurmd() {
  # TmpFS is per node: PMIx makes a directory of the same name for a step on every node
  install -d -m 0755 "$DIR/$1/spool"; install -d -m 1777 "$DIR/$1/tmp"
  on "$1" slurmd -f "$CONF"
}

idle_nodes() { on login sinfo -h -N -t idle -o %N | sort -u | wc -l; }

up() {
  [ ! -e "/run/netns/$NS-ctl" ] || down
  for tool in slurmctld slurmd munged mungekey nsenter unshare ip; do
    command -v "$tool" >/dev/null || apt_install slurm-wlm munge iproute2 util-linux
  done
  install -d -m 0755 "$DIR" "$DIR/ctl" "$DIR/ctl/state"
  { echo "127.0.0.1 localhost"; for h in $(hosts); do echo "$(address "$h") $h"; done; } > "$DIR/hosts"

  # munge over a unix socket, which every network namespace reaches (its directory must be o+x)
  install -d -o munge -g munge -m 0755 "$MUNGE"
  runuser -u munge -- mungekey --create --keyfile "$MUNGE/key" 2>/dev/null
  runuser -u munge -- munged --key-file="$MUNGE/key" --socket="$MUNGE/socket" --pid-file="$MUNGE/pid" \
    --seed-file="$MUNGE/seed" --log-file="$MUNGE/log"
  wait_until 10 "munged" sh -c "munge -S '$MUNGE/socket' -n </dev/null | unmunge -S '$MUNGE/socket'"

  # the network: a bridge on ctl carrying ctl's address, a veth from it to every other host
  for h in $(hosts); do
    ip netns add "$NS-$h"
    ip -n "$NS-$h" link set lo up
    boot "$h"
  done
  ip -n "$NS-ctl" link add br0 type bridge
  ip -n "$NS-ctl" addr add "$(address ctl)/24" dev br0
  ip -n "$NS-ctl" link set br0 up
  for h in login $(nodes); do
    ip -n "$NS-ctl" link add "to-$h" type veth peer name eth0 netns "$NS-$h"
    ip -n "$NS-ctl" link set "to-$h" master br0 up
    ip -n "$NS-$h" addr add "$(address "$h")/24" dev eth0
    link "$h" up
  done

  # SlurmdTimeout: a node silent for 10 s is DOWN (its jobs end) until its slurmd registers
  # again (the lines both test clusters share: slurm_conf_common in ci/lib.sh)
  local mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / (NODES + 2) ))
  { cat <<EOF
ClusterName=multinode
SlurmctldHost=ctl($(address ctl))
SlurmctldPort=17817
SlurmdPort=17818
AuthInfo=socket=$MUNGE/socket
SlurmdTimeout=10
SlurmctldPidFile=$DIR/ctl/slurmctld.pid
SlurmctldLogFile=$DIR/ctl/slurmctld.log
StateSaveLocation=$DIR/ctl/state
SlurmdPidFile=$DIR/%n/slurmd.pid
SlurmdSpoolDir=$DIR/%n/spool
SlurmdLogFile=$DIR/%n/slurmd.log
TmpFS=$DIR/%n/tmp
KillWait=2
EOF
    slurm_conf_common
  } > "$CONF"
  for h in $(nodes); do
    echo "NodeName=$h NodeAddr=$(address "$h") CPUs=$CPUS RealMemory=$mem State=UNKNOWN" >> "$CONF"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$CONF"

  on ctl slurmctld -f "$CONF"
  for h in $(nodes); do start_slurmd "$h"; done
  wait_until 30 "$NODES idle nodes" sh -c "[ \"\$('$0' idle-nodes)\" = $NODES ]"
  wait_until 60 "srun -N$NODES true" on login timeout 20 srun -N"$NODES" true
  echo "multi-node Slurm up: $(on login sinfo -h -o '%D nodes %t: %N')"
}

# ends every process on HOST; link down first, so none of them says goodbye over the network
kill_host() {
  local host=$1 pid
  link "$host" down 2>/dev/null || true
  for pid in $(ip netns pids "$NS-$host" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
  wait_until 10 "processes on $host to end" sh -c "[ -z \"\$(ip netns pids $NS-$host)\" ]"
}

revive() {
  local host=$1
  [ -z "$(ip netns pids "$NS-$host")" ] || { echo "$host is alive" >&2; return 1; }
  boot "$host"
  link "$host" up
  start_slurmd "$host"
  wait_until 60 "$host idle again" sh -c "'$0' exec login sinfo -h -n '$host' -t idle -o %N | grep -q '$host'"
}

mend() {
  local h
  for h in $(nodes); do
    ip -n "$NS-$h" route del prohibit "$(address login)/32" 2>/dev/null || true
    if [ -z "$(ip netns pids "$NS-$h")" ]; then revive "$h"; else link "$h" up; fi
  done
}

down() {
  [ -e "$DIR" ] || [ -e "/run/netns/$NS-ctl" ] || return 0
  if [ -s "$DIR/ctl/holder.pid" ] && [ -n "$(ip netns pids "$NS-ctl" 2>/dev/null)" ] && [ -n "$(ip netns pids "$NS-login" 2>/dev/null)" ]; then
    on login timeout 10 scancel --user=root 2>/dev/null || true
    wait_until 15 "jobs to leave squeue" sh -c "[ -z \"\$('$0' exec login squeue -h -o %i 2>/dev/null)\" ]" || true
  fi
  local h
  for h in $(hosts); do
    [ -e "/run/netns/$NS-$h" ] || continue
    kill_host "$h" || true
    ip netns del "$NS-$h"
  done
  stop_daemons "$MUNGE/pid:munged"
  rm -rf "$DIR"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  exec) shift; host=$1; shift; on "$host" "$@" ;;
  isolate-login) for h in $(nodes); do ip -n "$NS-$h" route replace prohibit "$(address login)/32"; done ;;
  reach-login) for h in $(nodes); do ip -n "$NS-$h" route del prohibit "$(address login)/32" 2>/dev/null || true; done ;;
  cut) link "$2" down ;;
  heal) link "$2" up ;;
  kill) kill_host "$2" ;;
  revive) revive "$2" ;;
  mend) mend ;;
  pids) ip netns pids "$NS-$2" ;;
  idle-nodes) idle_nodes ;;
  status) on login sinfo -N; on login squeue ;;
  logs) for f in "$DIR"/*/*.log "$MUNGE/log"; do echo "--- $f"; tail -n 20 "$f"; done ;;
  *) echo "usage: $0 up|down|exec HOST CMD...|isolate-login|reach-login|cut HOST|heal HOST|kill HOST|revive HOST|mend|pids HOST|status|logs" >&2; exit 2 ;;
esac
