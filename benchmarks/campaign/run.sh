#!/usr/bin/env bash
# The GPU campaign's one call, on the lent machine, from the repository root:
#   SIMPO_COMMIT=<sha> bash benchmarks/campaign/run.sh [options]
# (options: `python -m benchmarks.campaign --help`; e.g. `--groups sweep --limit-s 170` for the
# optional second call). Installs the carried peer wheels (.whl/: liger-kernel and
# cut-cross-entropy, the only packages the call imports beyond the image) into /tmp/site, runs the
# call with its own deadline (540 s, stops 30 s before) under `timeout` as a backstop, and leaves
# two files in $OUT: campaign.json (rewritten after every step) and campaign.tar.gz (everything:
# the JSON, this log, the tables and plots, the tuned table, the pytest log), packed again at the end.
# On CPU, `OUT=/tmp/x bash benchmarks/campaign/run.sh --dry-run` rehearses the same command.
set -uo pipefail
export SIMPO_CAMPAIGN_T0=$(date +%s.%N)  # the call's limit counts from here
: "${OUT:?OUT must name the output folder}"
mkdir -p "$OUT"
work=$(mktemp -d "${TMPDIR:-/tmp}/simpo-campaign.XXXXXX")
wheels=${SIMPO_WHEELS:-.whl}  # the carried wheels (device tool: carry [".whl"])
site=${SIMPO_SITE:-/tmp/site}
export PYTHONPATH=$site:$PWD PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
{
  if compgen -G "$wheels/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl \
      || echo "wheel install failed: the Liger and CCE rows will say why they are skipped"
  else
    echo "no wheels in $wheels: the Liger and CCE rows will be skipped (run benchmarks/campaign/fetch-wheels here)"
  fi
  timeout --signal=INT --kill-after=10 "${SIMPO_TIMEOUT_S:-575}" \
    python3 -m benchmarks.campaign --out "$OUT" --work "$work" "$@"
} 2>&1 | tee "$work/campaign.log"
rc=${PIPESTATUS[0]}
# the last pack holds the whole log (the call's own packs end at its last step)
tar czf "$OUT/campaign.tar.gz.tmp" -C "$work" . && mv "$OUT/campaign.tar.gz.tmp" "$OUT/campaign.tar.gz"
exit "$rc"
