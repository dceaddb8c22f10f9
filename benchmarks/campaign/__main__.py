"""``python -m benchmarks.campaign <check|bench|train-step> [--dry-run] [--out DIR] [options]``.

``--dry-run`` runs the call's every code path on CPU at tiny shapes, the Triton kernels under the
interpreter (``TRITON_INTERPRET=1`` is set before any kernel is imported); the test suite runs it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

CALLS = {"check": "check", "bench": "bench", "train-step": "train_step"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from .common import DEFAULT_LIMIT_S, DEFAULT_MARGIN_S

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks.campaign", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="call", required=True)
    for call, module in CALLS.items():
        if argv and argv[0] != call and argv[0] in CALLS:  # import only the call that runs
            sub.add_parser(call)
            continue
        mod = importlib.import_module(f"{__package__}.{module}")
        p = sub.add_parser(call, help=mod.__doc__.split("\n")[0], description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
        p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, kernels interpreted")
        p.add_argument("--limit-s", type=float, default=DEFAULT_LIMIT_S,
                       help="the command's wall-clock limit (default %(default)s)")
        p.add_argument("--margin-s", type=float, default=DEFAULT_MARGIN_S,
                       help="stop this long before the limit (default %(default)s)")
        p.add_argument("--seed", type=int, default=0)
        mod.add_arguments(p)
    args = ap.parse_args(argv)
    if not args.out:
        ap.error("--out is required when $OUT is unset")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    if "--dry-run" in (sys.argv[1:] if argv is None else argv):
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    args = parse_args(argv)
    import torch

    from .common import Call

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit(f"{args.call}: no CUDA device; use --dry-run to rehearse on CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    mod = importlib.import_module(f"{__package__}.{CALLS[args.call]}")
    call = Call(args.call, args.out, device, dry_run=args.dry_run, limit_s=args.limit_s, margin_s=args.margin_s,
                argv=sys.argv[1:] if argv is None else argv)
    try:
        closing = mod.run(call, args)
    except KeyboardInterrupt:  # interrupted from outside: the steps done are in the JSON already
        closing = "interrupted"
    return call.finish(closing)


if __name__ == "__main__":
    main()
