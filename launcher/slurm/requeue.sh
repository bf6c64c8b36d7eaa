# shellcheck shell=bash
# Sourced by launcher/slurm/{pretrain,finetune}.sbatch: run one job step so that a USR1 sent to the
# batch shell means "checkpoint now, then requeue", and the requeued run resumes by itself.
#
# Who gets what: `#SBATCH --signal=B:USR1@300` makes Slurm signal only this batch shell, 300 s before
# the time limit (or `scancel --signal=USR1 --batch JOBID` by hand). A shell runs a trap only between
# commands, so the step runs in the background and the shell waits on it. The trap relays USR1 to
# srun, which forwards it to every task; the trainer's handler makes all ranks agree to stop after the
# current step, save a checkpoint together and exit (status 138 = 128 + USR1). Only then does the job requeue itself: a
# requeue while the ranks were still writing would kill them mid-save. The requeued job runs this
# same script with the same arguments, and the trainer resumes from the run's latest checkpoint.
#
# Usage: srun_requeueable srun [srun options] python launcher/pretrain.py ...

preempted=0
step_pid=

on_usr1() {
  preempted=1
  echo "$(date '+%F %T') USR1: ranks save a checkpoint, then job $SLURM_JOB_ID requeues"
  # The step may have just exited (or not started yet): nothing to relay then, and no reason to fail.
  kill -USR1 "$step_pid" 2>/dev/null || true
}

srun_requeueable() {
  local rc=0
  trap on_usr1 USR1
  "$@" &
  step_pid=$!
  # `wait` returns early (status 138) when the trap fires; keep waiting until the step has exited.
  wait "$step_pid" || rc=$?
  while kill -0 "$step_pid" 2>/dev/null; do
    rc=0
    wait "$step_pid" || rc=$?
  done
  trap - USR1
  if ((preempted)); then
    # Requeue even when the step failed (a rank killed by the signal before its handler was
    # installed): the rerun resumes from the last periodic checkpoint instead of losing the job.
    echo "$(date '+%F %T') step exited with status $rc; requeueing (restart $((${SLURM_RESTART_COUNT:-0} + 1)))"
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  return "$rc"
}
