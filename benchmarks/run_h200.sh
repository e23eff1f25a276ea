#!/usr/bin/env bash
# One H200, one command: the training benchmark (<= 5 min), then the gpu-marked tests (<= 4 min).
#
#   bash benchmarks/fetch_device_wheels.sh          # here first: .whl/ with hydra-core, omegaconf, antlr4
#   device tool: run(command="bash benchmarks/run_h200.sh", carry=[".whl"], timeout_s=590)
#
# Writes into $OUT (the device tool brings it back): train_bench_h200_<date>.json, train_bench.log,
# gpu_tests.log. Copy the JSON to docs/results/gpu/ and the tables to docs/benchmarks.md.
# The benchmark runs first: it is the part a rerun could not fit in the session's device time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kimi_train_h200}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
if ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "hydra-core/omegaconf missing and no .whl/ here: run benchmarks/fetch_device_wheels.sh and carry .whl" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 2
  export PYTHONPATH="$PWD:/tmp/site"
fi
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

echo "== benchmark"
timeout 320 python3 benchmarks/gpu_train_bench.py --out "$OUT/train_bench_h200_$(date -u +%F).json" 2>&1 \
  | tee "$OUT/train_bench.log"
bench=${PIPESTATUS[0]}

echo "== gpu tests"
# (this order: tests/train/test_trainer.py imports its own conftest, after tests/kernels' one)
timeout 230 python3 -m pytest -q -p no:cacheprovider -m gpu tests/distributed/test_torchrun_one_rank.py \
  tests/kernels tests/model tests/optim tests/train/test_trainer.py 2>&1 | tee "$OUT/gpu_tests.log"
tests=${PIPESTATUS[0]}

echo "benchmark exit $bench, gpu tests exit $tests"
[ "$bench" -eq 0 ] && [ "$tests" -eq 0 ]
