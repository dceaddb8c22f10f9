"""``python -m benchmarks.campaign``: the GPU campaign's one call (``run.sh`` runs it on the device).

    python -m benchmarks.campaign --out DIR [--work DIR] [--groups env,exact,...] [--limit-s S]
    python -m benchmarks.campaign --dry-run --out DIR      # the same code on CPU, tiny shapes
    python -m benchmarks.campaign --plan                   # the GPU plan and its predicted device time
    python -m benchmarks.campaign --calibrate campaign.json  # a GPU run's fixed costs -> fixed_costs.json

``--dry-run`` sets ``TRITON_INTERPRET=1`` before any kernel is imported; the test suite runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Optional, Sequence


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from .common import DEFAULT_LIMIT_S, DEFAULT_MARGIN_S
    from .plan import GROUPS

    ap = argparse.ArgumentParser(prog="python -m benchmarks.campaign", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.split("\n")[1:]))
    ap.add_argument("--out", default=os.environ.get("OUT"),
                    help="what comes back: campaign.json and campaign.tar.gz (default: $OUT)")
    ap.add_argument("--work", default=None, help="where the files are made (default: a new folder under /tmp)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, kernels interpreted")
    ap.add_argument("--groups", default=",".join(GROUPS),
                    help="comma list of step groups to run, in the fixed order (env always runs; "
                         "default: %(default)s)")
    ap.add_argument("--limit-s", type=float, default=DEFAULT_LIMIT_S,
                    help="the command's wall-clock limit (default %(default)s)")
    ap.add_argument("--margin-s", type=float, default=DEFAULT_MARGIN_S,
                    help="stop this long before the limit (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plan", action="store_true", help="print the GPU plan and exit (measures nothing)")
    ap.add_argument("--calibrate", metavar="CAMPAIGN_JSON",
                    help="write a GPU run's measured fixed costs into fixed_costs.json and exit")
    args = ap.parse_args(argv)
    groups = [g for g in args.groups.split(",") if g]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        ap.error(f"unknown --groups {unknown}; known: {list(GROUPS)}")
    args.groups = tuple(g for g in GROUPS if g in groups or g == "env")
    if args.limit_s <= args.margin_s:
        ap.error(f"--limit-s ({args.limit_s:g}) must exceed --margin-s ({args.margin_s:g})")
    if not (args.plan or args.calibrate or args.out):
        ap.error("--out is required when $OUT is unset")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--dry-run" in argv:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    args = parse_args(argv)
    from . import plan as P

    if args.plan:
        print(P.plan_text(args.limit_s, args.margin_s))
        return None
    if args.calibrate:
        with open(args.calibrate) as f:
            fixed = P.calibrate(json.load(f))
        print(f"wrote {P.FIXED_COSTS}: {fixed['source']}")
        return None

    import torch

    from .common import Call
    from .steps import run

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("campaign: no CUDA device; use --dry-run to rehearse on CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    work = args.work or tempfile.mkdtemp(prefix="simpo-campaign-")
    call = Call(args.out, work, device, dry_run=args.dry_run, limit_s=args.limit_s, margin_s=args.margin_s,
                argv=argv)
    try:
        closing = run(call, P.settings(args.dry_run), args.groups, seed=args.seed)
    except KeyboardInterrupt:  # interrupted from outside: the steps done are in the JSON and tar already
        closing = "interrupted"
    return call.finish(closing)


if __name__ == "__main__":
    main()
