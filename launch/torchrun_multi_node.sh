#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous. Run the SAME command on every node:
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun_multi_node.sh run_name=k2 model=k2_mini parallel.ep=8
#   NNODES=4 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun_multi_node.sh run_name=k2 model=k2_mini parallel.ep=8
#   ...
#
# Env: NNODES (required), NODE_RANK (0..NNODES-1; optional with c10d, kept for stable rank order),
# MASTER_ADDR (a host every node can reach; required), MASTER_PORT (29500), NPROC_PER_NODE (8),
# RDZV_ID (a job id shared by all nodes; default: the run's arguments hashed).
# Pass run_name=... (or run_dir=... on a shared filesystem) so every rank writes the same run.
# Ctrl-C / SIGTERM reach torchrun (exec below), which forwards them to every rank: the ranks finish
# their step, save it and exit 130 / 143 (torchrun itself exits 1); it SIGKILLs them after
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT s (default 30): raise it if a step plus a save takes longer.
# PET_MAX_RESTARTS=1 (torchrun's --max-restarts) restarts every rank when one dies; they resume
# from the last checkpoint (docs/distributed.md#restarts-and-stopping).
# With restarts, also export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/distributed.md#restarts-and-stopping).
set -euo pipefail
: "${NNODES:?set NNODES to the number of nodes}"
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host (e.g. node 0)}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
RDZV_ID="${RDZV_ID:-kimi-$(echo "$*" | cksum | cut -d' ' -f1)}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
node_rank_args=()
if [ -n "${NODE_RANK:-}" ]; then node_rank_args=(--node_rank "$NODE_RANK"); fi
exec torchrun \
  --nnodes "$NNODES" ${node_rank_args[@]+"${node_rank_args[@]}"} --nproc_per_node "$NPROC_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID" \
  -m kimi_train.train "$@"
