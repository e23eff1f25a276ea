#!/usr/bin/env bash
# Run HERE (a machine with network), before benchmarks/run_h200.sh goes to the device machine:
# puts the wheels the device image lacks (hydra-core, omegaconf, antlr4 4.9.3) into .whl/
# (git-ignored; name it in the device tool's carry list). antlr4 4.9.3 exists only as an sdist
# on PyPI, so it is built into a pure-Python wheel here.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl hydra-core==1.3.2 omegaconf==2.3.0
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -l .whl
