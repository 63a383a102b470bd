#!/bin/bash
# tokenclean on several machines under SLURM: one task per node, each starting `accelerate launch` for its own GPUs.
#   sbatch launch/slurm.sh name=myrun model=local model.name_or_path=/models/llama-8b       # 2 nodes x 8 GPUs, ZeRO-3
#   sbatch --nodes 4 --gpus-per-node 4 launch/slurm.sh name=myrun ...                       # any other shape
# Everything after the script name goes to tokenclean as Hydra overrides. Submit from the repository root, on a
# filesystem every node sees: the run directory (runs/<name>) is written by rank 0 and read back by every rank.
# Environment knobs (all optional):
#   ACCELERATE_CONFIG   accelerate config (default launch/multinode.yaml: ZeRO-3)
#   GPUS_PER_NODE       processes per node (default: $SLURM_GPUS_ON_NODE, else the GPUs nvidia-smi lists)
#   MAIN_PORT           rendezvous port on the first node (default 29500 + job id mod 1000, so jobs sharing a node differ)
#   TOKENCLEAN_TIMEOUT  seconds a rank waits in a collective for a missing peer before failing (default 1800)
#   ACCELERATE          the accelerate executable (default: accelerate on PATH; activate your environment first)
#   STOP_GRACE          seconds a worker may take to finish its step and save once told to stop (default 540:
#                       keep it below the --signal lead time below, which SLURM counts to the hard kill)
# Time limit and requeue (launch/README.md, "Preemption and time limits"): 600 s before the limit SLURM sends USR1
# to this shell, which passes SIGTERM on to every process of the job step; tokenclean finishes its training step,
# saves its state and exits; this shell then requeues the job, and the rerun resumes where it stopped.
#SBATCH --job-name=tokenclean
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$PWD}"
CONFIG=${ACCELERATE_CONFIG:-launch/multinode.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}}
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 1000))}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))
export ACCELERATE=${ACCELERATE:-accelerate}
# torchrun (inside accelerate launch) gets the SIGTERM too and passes it on to its workers, then kills them after
# this many seconds (default 30): long enough to finish a step and save
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-${STOP_GRACE:-540}}
echo "tokenclean: $SLURM_NNODES nodes x $GPUS_PER_NODE processes, config $CONFIG, main $MAIN_IP:$MAIN_PORT" \
     "(restart ${SLURM_RESTART_COUNT:-0})" >&2

# SLURM's warning (USR1) -> SIGTERM to every process of the job step through scancel. Not to srun: srun turns a
# SIGTERM of its own into SIGKILL for its tasks. scancel --signal leaves this shell out and marks no job state.
stopping=0
stop() {
  stopping=1
  echo "tokenclean: time limit near: asking every rank to stop at its next step boundary and save" >&2
  scancel --signal=TERM "$SLURM_JOB_ID" || echo "tokenclean: scancel failed: the run will not stop cleanly" >&2
}
trap stop USR1

# $SLURM_NODEID must be read inside each task (single quotes): expanded here it would be 0 on every node.
# --kill-on-bad-exit: a node whose launcher fails takes the others down at once instead of leaving them waiting.
# In the background, so that the trap runs as soon as the signal comes (bash runs traps between commands).
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  exec "$ACCELERATE" launch --config_file "$0" --num_machines "$SLURM_NNODES" --num_processes "$1" \
      --machine_rank "$SLURM_NODEID" --main_process_ip "$2" --main_process_port "$3" -m tokenclean "${@:4}"
' "$CONFIG" "$NUM_PROCESSES" "$MAIN_IP" "$MAIN_PORT" "$@" &
srun_pid=$!
while true; do   # a trapped signal ends `wait` early: wait again until srun itself has ended
  wait "$srun_pid" && rc=0 || rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done

# Requeue when the run stopped for the time limit. tokenclean exits with 75 then, but accelerate launch reports any
# worker's non-zero exit as 1: so after our own stop request any non-zero exit counts (a worker outside training
# when SIGTERM came dies of it; the rerun resumes from the last completed stage). A run that finished first exits 0.
if [[ $rc -eq 75 || ( $stopping -eq 1 && $rc -ne 0 ) ]]; then
  echo "tokenclean: stopped before the time limit (exit $rc); requeueing job $SLURM_JOB_ID to resume" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
