#!/usr/bin/env bash
# A real one-machine cluster for tests/test_cluster.py: Slurm (munge + slurmctld + slurmd) and
# two ssh-reachable "hosts" for pdsh, all on localhost, all state in one folder.
#
#   tests/cluster/cluster.sh install          # apt-get slurm-wlm munge pdsh openssh-server (skipped when present)
#   tests/cluster/cluster.sh slurm-up DIR     # then: export SLURM_CONF=DIR/slurm.conf; sbatch ...
#   tests/cluster/cluster.sh ssh-up DIR       # then: ssh igpt-node1 hostname; pdsh -R ssh -w igpt-node[1-2] hostname
#   tests/cluster/cluster.sh down DIR         # cancels jobs, stops every daemon by its pid file, undoes ssh-up
#
# Runs as root (CI and dev machines are root). Ports are picked free at start-up and the munge
# socket lives in DIR, so nothing collides with a system Slurm/munge/sshd; the host aliases and
# the ssh client drop-in are machine-wide, so run one cluster per machine (the tests hold a lock).
set -euo pipefail

HOSTS=(igpt-node1 igpt-node2)
HOST_IPS=(127.0.0.2 127.0.0.3)
HOSTS_MARK="# igpt-ds test cluster"
SSH_DROPIN=/etc/ssh/ssh_config.d/igpt-ds-test-cluster.conf

die() { echo "cluster.sh: $*" >&2; exit 1; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }

# Poll a command for up to $1 seconds; daemons fork before they are ready to answer.
wait_for() {
  local timeout=$1; shift
  for _ in $(seq "$((timeout * 4))"); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.25
  done
  return 1
}
node_idle() { sinfo -h -N -o %t | grep -qx idle; }
no_jobs_running() { [[ -z $(squeue -h -t R,CG) ]]; }
gone() { ! kill -0 "$1" 2>/dev/null; }

install() {
  local need=()
  command -v slurmctld >/dev/null || need+=(slurm-wlm)
  command -v munged >/dev/null || need+=(munge)
  command -v pdsh >/dev/null || need+=(pdsh)
  command -v sshd >/dev/null || need+=(openssh-server)
  ((${#need[@]})) || return 0
  apt-get update -qq
  # Debian's policy-rc.d (as in Docker-derived images) keeps the packages' own services from
  # starting; the daemons this script needs are started below with private config.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

slurm_up() {
  local dir=$1 host cpus
  host=$(hostname -s)
  # nproc obeys OMP_NUM_THREADS, which test environments set to 1.
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
  # munged runs as the munge user, must reach its own subfolder and wants its socket's folder
  # open to all (clients of every user connect to it), its key private.
  chmod 755 "$dir"
  mkdir -p "$dir/munge" "$dir/state" "$dir/spool"
  chown munge:munge "$dir/munge"
  chmod 755 "$dir/munge"
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chown munge:munge "$dir/munge/munge.key"
  chmod 400 "$dir/munge/munge.key"
  runuser -u munge -- munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
  wait_for 10 munge -S "$dir/munge/munge.socket" -n || die "munged did not start: $(cat "$dir/munge/munged.log")"

  cat >"$dir/slurm.conf" <<EOF
# One-node test cluster written by tests/cluster/cluster.sh (facts in docs/reference.md#a-slurm-cluster-on-one-machine).
ClusterName=igpttest
# Addresses given, so the daemons do not depend on how this machine's name resolves.
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
# No cgroups in containers/VMs without systemd: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
# Short waits between SIGTERM and SIGKILL and before a finished job's record is purged keep the tests fast.
KillWait=10
MinJobAge=300
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF=$dir/slurm.conf
  slurmctld
  wait_for 30 scontrol ping || die "slurmctld did not answer: $(tail -20 "$dir/slurmctld.log")"
  slurmd
  wait_for 30 node_idle || die "node not idle: $(tail -20 "$dir/slurmd.log")"
}

ssh_up() {
  local dir=$1 port i
  port=$(free_port)
  mkdir -p "$dir/ssh" /run/sshd
  chmod 700 "$dir/ssh"
  ssh-keygen -q -t ed25519 -N "" -f "$dir/ssh/host_key"
  ssh-keygen -q -t ed25519 -N "" -f "$dir/ssh/id_ed25519"
  cp "$dir/ssh/id_ed25519.pub" "$dir/ssh/authorized_keys"
  cat >"$dir/ssh/sshd_config" <<EOF
Port $port
ListenAddress ${HOST_IPS[0]}
ListenAddress ${HOST_IPS[1]}
HostKey $dir/ssh/host_key
PidFile $dir/ssh/sshd.pid
AuthorizedKeysFile $dir/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# The test folder is not owned the way StrictModes wants ~/.ssh to be.
StrictModes no
EOF
  # Each alias is its own host name too: a session runs in a new UTS namespace named after the
  # address it came in on, so gethostname() differs per "host" as MPI's and DeepSpeed's node
  # detection (local ranks, shared-memory peers) assume. Files, network and processes stay shared.
  for i in "${!HOSTS[@]}"; do
    cat >>"$dir/ssh/sshd_config" <<EOF
Match LocalAddress ${HOST_IPS[$i]}
  ForceCommand unshare --uts bash -c 'hostname ${HOSTS[$i]} && exec bash -c "\$SSH_ORIGINAL_COMMAND"'
EOF
  done
  /usr/sbin/sshd -f "$dir/ssh/sshd_config" -E "$dir/ssh/sshd.log"

  # Each alias resolves to its own loopback address, all of which reach this machine.
  remove_hosts
  for i in "${!HOSTS[@]}"; do echo "${HOST_IPS[$i]} ${HOSTS[$i]} $HOSTS_MARK" >>/etc/hosts; done
  # Client side, scoped to the aliases: plain `ssh igpt-node1` (as DeepSpeed's runner and pdsh call
  # it) finds the port and key without touching root's ~/.ssh.
  cat >"$SSH_DROPIN" <<EOF
Host ${HOSTS[*]}
  Port $port
  IdentityFile $dir/ssh/id_ed25519
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
EOF
  wait_for 10 ssh -o BatchMode=yes "${HOSTS[1]}" true || die "ssh ${HOSTS[1]} failed: $(cat "$dir/ssh/sshd.log")"
}

# Rewrite /etc/hosts in place (it may be a bind mount, which `sed -i`'s rename cannot replace).
remove_hosts() {
  local kept
  kept=$(grep -vF "$HOSTS_MARK" /etc/hosts || true)
  printf '%s\n' "$kept" >/etc/hosts
}

stop_pidfile() {
  local pidfile=$1 pid
  [[ -f $pidfile ]] || return 0
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || return 0
  wait_for 15 gone "$pid" || kill -9 "$pid" 2>/dev/null || true
}

down() {
  local dir=$1
  if [[ -f $dir/slurm.conf ]]; then
    export SLURM_CONF=$dir/slurm.conf
    # Jobs first, so slurmd's step daemons end with their tasks rather than outliving slurmd.
    if scontrol ping >/dev/null 2>&1; then
      scancel --user=root 2>/dev/null || true
      wait_for 20 no_jobs_running || true
    fi
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    stop_pidfile "$dir/munge/munged.pid"
  fi
  if [[ -f $dir/ssh/sshd_config ]]; then
    stop_pidfile "$dir/ssh/sshd.pid"
    rm -f "$SSH_DROPIN"
    remove_hosts
  fi
}

[[ $(id -u) == 0 ]] || die "run as root (daemons, /etc/hosts, apt-get)"
case "${1:-}" in
  install) install ;;
  slurm-up) [[ -d ${2:-} ]] || die "usage: $0 slurm-up DIR"; slurm_up "$(realpath "$2")" ;;
  ssh-up) [[ -d ${2:-} ]] || die "usage: $0 ssh-up DIR"; ssh_up "$(realpath "$2")" ;;
  down) [[ -d ${2:-} ]] || die "usage: $0 down DIR"; down "$(realpath "$2")" ;;
  *) die "usage: $0 install | slurm-up DIR | ssh-up DIR | down DIR" ;;
esac
