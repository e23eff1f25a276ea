#!/usr/bin/env bash
# One node's torchrun for a multi-node job (c10d rendezvous); called by torchrun_multi_node.sh and,
# through srun, by slurm.sbatch. Not usually run by hand.
#
# Env: NNODES, MASTER_ADDR (required), MASTER_PORT (29500), RDZV_ID (required: a job id shared by all
# nodes), NPROC_PER_NODE (default "gpu": every visible GPU), IS_HOST (true on the node that hosts the
# rendezvous store, the one MASTER_ADDR points at; default: true where NODE_RANK or SLURM_NODEID is 0),
# MAX_RESTARTS (0), KIMI_TRAIN_LOG_DIR (optional: one log file per rank there, via torchrun --log-dir).
#
# is_host is passed explicitly: torchrun otherwise guesses it by matching MASTER_ADDR against this
# host's names, and with an InfiniBand or secondary-NIC address no node hosts the store and every
# node times out. Ranks: torchrun orders the nodes by host name (NODE_RANK is ignored by c10d); each
# node's ranks are consecutive, and global rank 0 (the one that prints and writes the run record)
# is local rank 0 of the first node in that order.
set -euo pipefail
: "${NNODES:?set NNODES to the number of nodes}"
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host (the node with IS_HOST=true)}"
: "${RDZV_ID:?set RDZV_ID to an id shared by every node of this job}"
node="${NODE_RANK:-${SLURM_NODEID:-}}"
if [ -z "${IS_HOST:-}" ]; then
  if [ -z "$node" ]; then
    echo "torchrun_node.sh: set NODE_RANK (0 on the MASTER_ADDR node) or IS_HOST=true|false" >&2
    exit 2
  fi
  if [ "$node" = 0 ]; then IS_HOST=true; else IS_HOST=false; fi
fi
log_args=()
if [ -n "${KIMI_TRAIN_LOG_DIR:-}" ]; then
  log_args=(--log-dir "$KIMI_TRAIN_LOG_DIR/node${node:-x}" --tee 3)
fi
exec torchrun \
  --nnodes "$NNODES" --nproc-per-node "${NPROC_PER_NODE:-gpu}" --max-restarts "${MAX_RESTARTS:-0}" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "$RDZV_ID" \
  --rdzv-conf "is_host=$IS_HOST" --role kimi-train ${log_args[@]+"${log_args[@]}"} \
  -m kimi_train.train "$@"
