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
#SBATCH --job-name=tokenclean
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --output=%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$PWD}"
CONFIG=${ACCELERATE_CONFIG:-launch/multinode.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}}
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 1000))}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))
export ACCELERATE=${ACCELERATE:-accelerate}
echo "tokenclean: $SLURM_NNODES nodes x $GPUS_PER_NODE processes, config $CONFIG, main $MAIN_IP:$MAIN_PORT" >&2

# $SLURM_NODEID must be read inside each task (single quotes): expanded here it would be 0 on every node.
# --kill-on-bad-exit: a node whose launcher fails takes the others down at once instead of leaving them waiting.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  exec "$ACCELERATE" launch --config_file "$0" --num_machines "$SLURM_NNODES" --num_processes "$1" \
      --machine_rank "$SLURM_NODEID" --main_process_ip "$2" --main_process_port "$3" -m tokenclean "${@:4}"
' "$CONFIG" "$NUM_PROCESSES" "$MAIN_IP" "$MAIN_PORT" "$@"
