#!/usr/bin/env bash
# One node, all its GPUs, one kimi-train process per GPU.
#
#   launch/torchrun_single_node.sh run_name=k2mini model=k2_mini parallel.ep=8
#   NPROC=4 launch/torchrun_single_node.sh parallel.ep=2 train.steps=100
#
# Every argument is a Hydra override passed to kimi-train. NPROC: processes (default: every visible
# GPU; on a CPU machine set it). Set run_name (or run_dir): every rank must agree on the run
# directory, and restarts with the same name resume from its latest checkpoint.
# Ctrl-C / SIGTERM reach torchrun (exec below), which forwards them to every rank: the ranks finish
# their step, save it and exit 130 / 143 (torchrun itself exits 1); it SIGKILLs them after
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT s (30 by default, 110 here): one step plus one save must fit in it.
# PET_MAX_RESTARTS=1 (torchrun's --max-restarts) restarts every rank when one dies; they resume
# from the last checkpoint (docs/distributed.md#restarts-and-stopping).
# With restarts, also export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/distributed.md#restarts-and-stopping).
set -euo pipefail
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-110}"
exec torchrun --standalone --nnodes 1 --nproc-per-node "${NPROC:-${NPROC_PER_NODE:-gpu}}" --role kimi-train \
  -m kimi_train.train "$@"
