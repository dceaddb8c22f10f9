"""The benchmark runner: everything in one call, results as JSON + plots + a markdown table.

    python -m benchmarks --out DIR [--families gemma2-9b,...] [--tokens 2048,8192]
                         [--impls eager,torch,triton,liger,cce] [--quick] [--e2e | --e2e-only]
                         [--budget-s 540] [--commit SHA]

On CUDA: measures the bf16 matmul rate (8192^3, random operands), then checks and times every
(case, impl), writing ``DIR/<date>-<gpu>.json`` after each case (a timed-out call still leaves
its finished cases), then renders the plots and table (:mod:`benchmarks.report`). Cases left when
``--budget-s`` runs out are recorded as ``skipped:time budget``.
On CPU: the same code on the tiny CPU smoke families (no speed claims: CPU numbers are smoke).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from simpo_kernels.tuned import slug

from . import cases as C
from . import measure as M

SCHEMA_VERSION = 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _versions() -> dict:
    v = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    for mod in ("triton", "transformers", "liger_kernel", "cut_cross_entropy"):
        v[mod] = M.package_version({"liger_kernel": "liger-kernel",
                                  "cut_cross_entropy": "cut-cross-entropy"}.get(mod, mod))
    return v


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None,
                    help="output folder (default: benchmarks/results on CUDA, a temp dir on CPU)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--families", default=None,
                    help=f"comma list of {','.join(C.FAMILIES)} (default: GPU families on CUDA, "
                         "CPU smoke families on CPU)")
    ap.add_argument("--tokens", default=None, help="comma list of token counts (GPU families)")
    ap.add_argument("--impls", default=",".join(C.IMPLS),
                    help=f"comma list of impls (default {','.join(C.IMPLS)}; also "
                         f"{','.join(C.VARIANT_IMPLS)})")
    ap.add_argument("--quick", action="store_true",
                    help="fewer cases and repetitions (CUDA: gemma2-9b at N=2048,8192)")
    ap.add_argument("--e2e", action="store_true", help="also run the end-to-end training step")
    ap.add_argument("--e2e-only", action="store_true", help="only the end-to-end training step")
    ap.add_argument("--e2e-max-pairs", type=int, default=None)
    ap.add_argument("--e2e-paths", default=None,
                    help="loss paths for --e2e (default eager,triton on CUDA, eager,torch on CPU)")
    ap.add_argument("--no-matmul", action="store_true", help="skip the matmul-rate measurement")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new cases after this many seconds (default 540 on CUDA)")
    ap.add_argument("--target-s", type=float, default=None,
                    help="seconds of repetitions per timing (default 0.5; --quick 0.2; CPU 0.05)")
    ap.add_argument("--commit", default=None, help="commit id to record (default: $SIMPO_COMMIT, "
                                                   "else git)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list", action="store_true",
                    help="print the planned cases with their 6NHV work and exit (no measuring)")
    return ap.parse_args(argv)


def _dump(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


def main(argv=None) -> Path:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    raise_dynamo_cache_limits()

    if args.families:
        families = [f for f in args.families.split(",") if f]
    elif args.quick and cuda:
        families = ["gemma2-9b"]
    else:
        families = list(C.default_families(device))
    unknown = [f for f in families if f not in C.FAMILIES]
    if unknown:
        raise SystemExit(f"unknown families {unknown}; known: {list(C.FAMILIES)}")
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else (
        [2048, 8192] if args.quick and cuda else None)
    impls = [i for i in args.impls.split(",") if i]
    bad = [i for i in impls if i not in C.ALL_IMPLS]
    if bad:
        raise SystemExit(f"unknown impls {bad}; known: {C.ALL_IMPLS}")
    if args.list:
        for case in C.cases_for(families, tokens):
            wanted = [i for i in impls if i in C.FAMILIES[case.family].impls]
            print(f"{case.id:>22}: {case.rows} x {case.seq} tokens, H={case.hidden} V={case.vocab} "
                  f"softcap={case.softcap} {case.dtype}; 6NHV={case.flops_fwd_bwd() / 1e12:.1f} "
                  f"TFLOP; impls {','.join(wanted)}")
        return None
    out = Path(args.out) if args.out else (
        Path(__file__).resolve().parent / "results" if cuda
        else Path(tempfile.mkdtemp(prefix="simpo-bench-cpu-")))
    out.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    dev_name = device_name(device)
    path = out / f"{now:%Y-%m-%d}-{slug(dev_name) if cuda else 'cpu-smoke'}.json"
    budget = args.budget_s if args.budget_s is not None else (540.0 if cuda else 1e9)
    target_s = args.target_s or (0.05 if not cuda else 0.2 if args.quick else 0.5)
    min_reps = 2 if not cuda else 3

    result = {
        "schema": SCHEMA_VERSION,
        "device": dev_name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _versions()["triton"],
        "versions": _versions(),
        "commit": M.git_commit(args.commit),
        "date": now.isoformat(timespec="seconds"),
        "host": platform.node(),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "method": {
            "beta": C.BETA, "gamma_beta_ratio": C.GAMMA_BETA_RATIO,
            "fwd": "forward without gradient (no_grad, detached inputs)",
            "fwd_bwd": "forward + autograd.grad w.r.t. hidden and weight",
            "time": "median over repetitions after a warm-up call; CUDA events" if cuda
                    else "median over repetitions after a warm-up call; host clock (CPU smoke)",
            "peak_mem_mib": "max_memory_allocated during one fwd_bwd call minus allocated before "
                            "(includes the returned dH and dW); None on CPU",
            "tolerances": M.TOLERANCES, "target_s": target_s,
        },
        "matmul_bf16_tflops": None,
        "cases": [],
    }
    print(f"device: {dev_name}; torch {torch.__version__}; triton {result['triton']}; "
          f"commit {result['commit']}; out {path}", flush=True)

    if not args.no_matmul and not args.e2e_only:
        mm = M.matmul_tflops(device)
        result["matmul_bf16_tflops"] = mm["tflops"]
        result["matmul"] = mm
        print(f"matmul bf16 {mm['n']}^3: {mm['tflops']:.4g} TFLOP/s ({mm['median_ms']:.3f} ms)",
              flush=True)
    _dump(path, result)

    if not args.e2e_only:
        case_list = C.cases_for(families, tokens)
        for case in case_list:
            wanted = [i for i in impls if i in C.FAMILIES[case.family].impls]
            if not wanted:
                continue
            if time.perf_counter() - t_start > budget:
                for impl in wanted:
                    row = M.case_row(case, impl, case.softcap, [])
                    row.update(status="skipped:time budget", fwd_ms=None, fwd_bwd_ms=None,
                               peak_mem_mib=None)
                    result["cases"].append(row)
                continue
            ctx = M.CaseContext(case, device, seed=args.seed)
            try:
                for impl in wanted:
                    t0 = time.perf_counter()
                    row = M.run_impl(impl, ctx, target_s=target_s, min_reps=min_reps)
                    row["wall_s"] = time.perf_counter() - t0
                    row.update(_prediction(row, ctx, result["matmul_bf16_tflops"] if cuda else None))
                    result["cases"].append(row)
                    _dump(path, result)
                    print(fmt_row(row), flush=True)
            finally:
                ctx.close()

    if args.e2e or args.e2e_only:
        from .e2e import run_e2e

        if time.perf_counter() - t_start > budget:
            result["e2e"] = {"status": "skipped:time budget"}
        else:
            tiny = not cuda
            try:
                paths = args.e2e_paths.split(",") if args.e2e_paths else None
                result["e2e"] = run_e2e(device, paths=paths, tiny=tiny, seq=64 if tiny else 2048,
                                        steps=2 if tiny else 3,
                                        max_pairs=args.e2e_max_pairs or (2 if tiny else 64))
            except Exception as exc:  # noqa: BLE001 - keep the loss results of this call
                import traceback

                traceback.print_exc()
                result["e2e"] = {"status": f"error:{type(exc).__name__}: {exc}"[:300]}
        _dump(path, result)

    result["wall_s"] = time.perf_counter() - t_start
    _dump(path, result)
    if not args.no_plots:
        from .report import render

        md = render([path], out)
        print(md)
    print(f"wrote {path} ({result['wall_s']:.1f}s)", flush=True)
    return path


def raise_dynamo_cache_limits() -> None:
    """Liger compiles one function per shape (mark_dynamic); let dynamo keep them all."""
    try:
        import torch._dynamo as dynamo

        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, max(64, getattr(dynamo.config, knob)))
    except Exception:  # noqa: BLE001
        pass


def prediction(row: dict, labels, matmul_tflops) -> dict:
    """The cost model's times for a result ``row`` (``benchmarks/cost_model.py``) at the target
    fraction of ``labels`` (the case's own) and the matmul rate measured in this call (CUDA; None:
    the H100 default). A peer variant (``cce-nofilter``) is predicted by its base's model
    (:func:`benchmarks.cases.cost_backend`). A failure of the model never costs a measurement: it
    is recorded as ``pred_error``."""
    from . import cost_model

    try:
        frac = cost_model.target_fraction(labels, C.IGNORE_INDEX)
        return cost_model.prediction_fields({**row, "impl": C.cost_backend(row["impl"])}, frac,
                                            matmul_tflops=matmul_tflops)
    except Exception as exc:  # noqa: BLE001 - an unknown impl, a kernels module mid-edit, ...
        return {"pred_fwd_ms": None, "pred_fwd_bwd_ms": None,
                "pred_error": f"{type(exc).__name__}: {exc}"[:200]}


def _prediction(row: dict, ctx, matmul_tflops) -> dict:
    return prediction(row, ctx.labels, matmul_tflops)


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def fmt_row(row) -> str:
    """One progress line for a result row (printed after each case)."""
    errs = row.get("errors") or {}
    e = " ".join(f"{k}={v:.1e}" for k, v in errs.items())
    return (f"{row['family']:>16} N={row['tokens']:>6} {row['impl']:>6}: {row['status'][:60]:<12} "
            f"fwd {_fmt(row.get('fwd_ms'))} ms (pred {_fmt(row.get('pred_fwd_ms'))})  "
            f"fwd+bwd {_fmt(row.get('fwd_bwd_ms'))} ms (pred {_fmt(row.get('pred_fwd_bwd_ms'))})  "
            f"peak {_fmt(row.get('peak_mem_mib'), '.0f')} MiB  [{e}] ref={row.get('reference')}")


if __name__ == "__main__":
    main()
