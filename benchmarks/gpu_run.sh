#!/usr/bin/env bash
# Run the benchmark runner on the lent GPU machine, from the repository root, writing under $OUT.
#   SIMPO_COMMIT=<sha> bash benchmarks/gpu_run.sh [runner flags]     e.g. --families gemma2-9b
# Installs the carried wheels (.whl/, filled here by ../shared/gpu/fetch-wheels) into /tmp/site
# first: the device image lacks liger-kernel and cut-cross-entropy (the peers are skipped with
# their reason if they are missing). Prints the GPU's state (read only: nothing is changed).
set -uo pipefail
: "${OUT:?OUT must name the output folder}"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu \
  --format=csv 2>&1 | tee "$OUT/nvidia-smi.csv"
python3 -m benchmarks --out "$OUT" "$@" 2>&1 | tee "$OUT/runner.log"
exit "${PIPESTATUS[0]}"
