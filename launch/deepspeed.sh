#!/usr/bin/env bash
# parallel.engine=deepspeed runs. One node: through torchrun (DeepSpeed reads the RANK / LOCAL_RANK /
# WORLD_SIZE torchrun sets). Several nodes: through DeepSpeed's own launcher over pdsh.
#
#   launch/deepspeed.sh run_name=k2 model=k2_mini parallel.engine=deepspeed parallel.zero_stage=2
#   NUM_GPUS=4 launch/deepspeed.sh run_name=k2 parallel.engine=deepspeed parallel.zero_stage=3
#   HOSTFILE=hostfile launch/deepspeed.sh run_dir=/shared/runs/k2 parallel.engine=deepspeed ...
#
# Every argument is a Hydra override passed to kimi-train.
# One node (no HOSTFILE): NUM_GPUS processes (default: every visible GPU; set it on a CPU machine),
# started by torchrun, which stops cleanly: Ctrl-C or SIGTERM to this script reaches every rank, which
# finishes its step, saves it and exits 130 / 143; torchrun waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT s
# (110 here) before it SIGKILLs them.
# Several nodes: run it ONCE, on the first host of HOSTFILE (DeepSpeed's format, one line per node:
# "node0 slots=8"). DeepSpeed starts the others over pdsh (LAUNCHER: pdsh, openmpi, mvapich, slurm;
# pdsh needs passwordless ssh from this host to every node and pdsh installed here). MASTER_ADDR
# defaults to the first host's name as written in HOSTFILE (DeepSpeed's own default is that host's
# first IP address, which can be a docker or management interface); MASTER_PORT 29500. Every node must
# see the same code and, with run_dir, the same filesystem. DeepSpeed forwards only some variables
# to the other nodes (NCCL*, PYTHON*, UCX*, ...): this script adds OMP_NUM_THREADS and every KIMI_TRAIN_*,
# HF_*, WANDB_*, TORCH_*, PYTORCH_* and CUDA_LAUNCH_BLOCKING variable set here, through DS_ENV_FILE.
# Stopping a multi-node DeepSpeed run: DeepSpeed's per-node launcher SIGKILLs the ranks 30 s after it
# signals them (not configurable in DeepSpeed 0.19): a step plus a save must fit in 30 s, or the save is
# lost (the previous complete checkpoint still loads). For longer saves launch the nodes with
# launch/torchrun_multi_node.sh or launch/slurm.sbatch (parallel.engine=deepspeed works under them).
set -euo pipefail
if [ -z "${HOSTFILE:-}" ]; then
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-110}"
  exec torchrun --standalone --nnodes 1 --nproc-per-node "${NUM_GPUS:-gpu}" --role kimi-train \
    -m kimi_train.train "$@"
fi
env_file="$(mktemp "${TMPDIR:-/tmp}/kimi-train-deepspeed-env.XXXXXX")"
trap 'rm -f "$env_file"' EXIT
env | grep -E '^(OMP_NUM_THREADS|KIMI_TRAIN_[A-Z0-9_]*|HF_[A-Z0-9_]*|WANDB_[A-Z0-9_]*|TORCH_[A-Z0-9_]*|PYTORCH_[A-Z0-9_]*|CUDA_LAUNCH_BLOCKING)=' \
  >"$env_file" || true
master_addr="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}"
DS_ENV_FILE="$env_file" deepspeed --no_local_rank --hostfile "$HOSTFILE" --launcher "${LAUNCHER:-pdsh}" \
  --master_addr "$master_addr" --master_port "${MASTER_PORT:-29500}" --module kimi_train.train "$@"
