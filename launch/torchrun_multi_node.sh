#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous. Run the SAME command on every node, NODE_RANK 0 on
# the node MASTER_ADDR points at (it hosts the rendezvous store):
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 RDZV_ID=k2-1 launch/torchrun_multi_node.sh run_name=k2 model=k2_mini parallel.ep=8
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 RDZV_ID=k2-1 launch/torchrun_multi_node.sh run_name=k2 model=k2_mini parallel.ep=8
#
# Env: NNODES and MASTER_ADDR (required), NODE_RANK (0 on the MASTER_ADDR node; only decides which
# node hosts the store: torchrun orders the nodes by host name), MASTER_PORT (29500), NPROC_PER_NODE
# (default: every visible GPU), RDZV_ID (an id shared by all nodes; default: the arguments hashed),
# MAX_RESTARTS (0; PET_MAX_RESTARTS also works), KIMI_TRAIN_LOG_DIR (a log file per rank).
# Pass run_name=... (or run_dir=... on a shared filesystem) so every rank writes the same run.
# Ctrl-C / SIGTERM reach torchrun (exec below), which forwards them to its ranks: every rank of the
# job finishes its step, saves it and exits (130 / 143 where the signal arrived, 0 on the other
# nodes, so their torchruns do not restart). torchrun SIGKILLs its ranks TORCH_ELASTIC_SHUTDOWN_TIMEOUT
# s after forwarding (30 by default, 110 here): one step plus one save must fit in it.
# With restarts, also export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/distributed.md#restarts-and-stopping).
set -euo pipefail
RDZV_ID="${RDZV_ID:-kimi-$(echo "$*" | cksum | cut -d' ' -f1)}"
export RDZV_ID
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-110}"
exec "$(dirname "$0")/torchrun_node.sh" "$@"
