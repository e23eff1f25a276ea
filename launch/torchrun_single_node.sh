#!/usr/bin/env bash
# One node, all its GPUs (default 8), one kimi-train process per GPU.
#
#   launch/torchrun_single_node.sh run_name=k2mini model=k2_mini parallel.ep=8
#   NPROC=4 launch/torchrun_single_node.sh parallel.ep=2 train.steps=100
#
# Every argument is a Hydra override passed to kimi-train. Set run_name (or run_dir): every rank
# must agree on the run directory, and restarts with the same name resume from its latest checkpoint.
# Ctrl-C / SIGTERM reach torchrun (exec below), which forwards them to every rank: the ranks finish
# their step, save it and exit 130 / 143 (torchrun itself exits 1); it SIGKILLs them after
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT s (default 30): raise it if a step plus a save takes longer.
# PET_MAX_RESTARTS=1 (torchrun's --max-restarts) restarts every rank when one dies; they resume
# from the last checkpoint (docs/distributed.md#restarts-and-stopping).
# With restarts, also export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/distributed.md#restarts-and-stopping).
set -euo pipefail
NPROC="${NPROC:-${NPROC_PER_NODE:-8}}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
exec torchrun --standalone --nnodes 1 --nproc_per_node "$NPROC" -m kimi_train.train "$@"
