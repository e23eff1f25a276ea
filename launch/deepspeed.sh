#!/usr/bin/env bash
# DeepSpeed's own launcher, for parallel.engine=deepspeed runs (torchrun launches them too).
#
#   launch/deepspeed.sh run_name=k2 model=k2_mini parallel.engine=deepspeed parallel.zero_stage=2
#   NUM_GPUS=4 launch/deepspeed.sh run_name=k2 parallel.engine=deepspeed parallel.zero_stage=3
#   HOSTFILE=hostfile launch/deepspeed.sh run_dir=/shared/runs/k2 parallel.engine=deepspeed ...
#
# Every argument is a Hydra override passed to kimi-train. One node: all its GPUs (NUM_GPUS, default:
# DeepSpeed's count), started on this host. Several nodes: run it ONCE, on the first host of HOSTFILE
# (DeepSpeed's format, one line per node: "node0 slots=8"); DeepSpeed starts the others over pdsh
# (LAUNCHER: pdsh, openmpi, mvapich, slurm, ...; passwordless ssh for pdsh), with MASTER_ADDR (default:
# the first host) and MASTER_PORT (29500). Every node must see the same code and, with run_dir, the
# same filesystem. Each rank gets RANK / LOCAL_RANK / WORLD_SIZE in its environment, as under torchrun
# (--no_local_rank: kimi-train takes no --local_rank argument). SIGINT/SIGTERM: the launcher forwards
# them; the ranks finish their step, save it and exit 130 / 143.
set -euo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
args=(--no_local_rank --master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
  args+=(--hostfile "$HOSTFILE" --launcher "${LAUNCHER:-pdsh}")
  if [ -n "${MASTER_ADDR:-}" ]; then args+=(--master_addr "$MASTER_ADDR"); fi
else
  if [ -n "${NUM_GPUS:-}" ]; then args+=(--num_gpus "$NUM_GPUS"); fi
fi
exec deepspeed "${args[@]}" --module kimi_train.train "$@"
