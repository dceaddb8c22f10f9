#!/usr/bin/env bash
# One campaign call on the lent GPU machine, run from the repository root, writing under $OUT:
#   SIMPO_COMMIT=<sha> bash benchmarks/campaign/run.sh check|bench|train-step [options]
# Installs the carried wheels (.whl/, filled here by benchmarks/campaign/fetch-wheels) into
# /tmp/site, checks them against the image's real packages (python -m benchmarks.campaign.wheels
# --installed; the result is in the log), then runs the call with its own deadline (540 s limit,
# stops 60 s before) under `timeout` as a backstop for a hang the deadline cannot interrupt.
# Output: $OUT/<call>.json (rewritten after every step), $OUT/<call>.log, and the call's own files.
set -uo pipefail
export SIMPO_CAMPAIGN_T0=$(date +%s.%N)  # the call's limit counts from here
: "${OUT:?OUT must name the output folder}"
call=${1:?usage: run.sh check|bench|train-step [options]}
shift
log="$OUT/$call.log"
wheels=${SIMPO_WHEELS:-.whl}  # the carried wheels (device tool: carry [".whl"])
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
{
  if compgen -G "$wheels/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheels"/*.whl || exit 1
    python3 -m benchmarks.campaign.wheels --dir "$wheels" --installed || echo "(wheel check failed: see above)"
  else
    echo "no wheels in $wheels: the peers and datasets/deepspeed are missing (run benchmarks/campaign/fetch-wheels here)"
  fi
  timeout --signal=INT --kill-after=10 575 python3 -m benchmarks.campaign "$call" --out "$OUT" "$@"
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
