"""check: environment, cuBLAS rates, bf16 exactness against float64, kernel variants, and the sweep.

Steps, in order (each one row of ``check.json``, written as it ends):

1. ``gemm``: the cuBLAS bf16 rate at 8192^3 and at the three GEMMs of the Gemma-2-9B head at
   N=8192 tokens (M x N x K): logits ``N x V x H`` (bf16 out, and float32 out as the ``pairs``
   and ``vocab`` schedules call it), dH ``N x H x V``, dW ``V x H x N``.
2. ``reference``: the exact float64 loss, log-probs, dH and dW at the 9B head, N=8192, computed on
   the GPU in chunks (:func:`benchmarks.measure.float64_reference`).
3. ``exact``: every backend and schedule in bf16 against it: relative norm errors of loss,
   log-probs, dH, dW, pass/fail against :data:`benchmarks.measure.TOLERANCES` (bf16: 1e-2 for loss
   and log-probs, 2e-2 for gradients); timed (fwd+bwd median, CUDA events) while the inputs are there.
4. ``variant``: kernel-variant microbenchmarks, each one ``kernel_options`` change against the
   defaults with the question it answers (:data:`VARIANTS`; add more with ``--variant``, no code
   edit): atomic semantics, tile shapes, raster groups, split counts, row-kernel widths.
5. ``sweep``: per schedule a small grid (:data:`SWEEP`); every candidate is checked against the
   reference before it is timed. The winners (at least :data:`MIN_GAIN` faster than the defaults)
   and the measured schedule order go to ``tuned-<gpu>.json`` under ``--out``: commit it as
   ``simpo_kernels/tuned/<gpu>.json`` (the launchers read it, :mod:`simpo_kernels.tuned`).
   ``readback`` then checks that the launchers pick those options up from such a file.

``--dry-run``: the same steps at the ``cpu-interp`` shape (float32, H=40, V=300, N=64) on CPU, the
Triton kernels interpreted, smaller grids; the GEMM step runs float32 at a tiny size.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any, Optional
from unittest import mock

import torch

from simpo_kernels.tuned import ENV_DIR, TUNABLE_SCHEDULES, slug

from .. import cases as C
from .. import cost_model as CM
from .. import measure as M
from .common import Call, fmt, table

#: The shape of the exactness check and the sweep: the Gemma-2-9B head at N=8192.
FAMILY, TOKENS = "gemma2-9b", 8192
DRY_FAMILY = "cpu-interp"
#: A winner must beat the defaults by this fraction to be written (timing noise is ~1-2%).
MIN_GAIN = 0.03
#: float64 matmul rate assumed for the reference's prediction (H100 DGEMM, tensor cores).
FP64_TFLOPS = 50.0

#: (name, backend, schedule, extra simpo_loss keywords) checked for exactness.
EXACT_IMPLS = (
    ("eager", "eager", "auto", {}),
    ("torch-tokens", "torch", "tokens", {}),
    ("torch-pairs", "torch", "pairs", {}),
    ("torch-vocab", "torch", "vocab", {}),
    ("triton", "triton", "auto", {}),
    ("triton-pairs", "triton", "pairs", {}),
    ("triton-vocab", "triton", "vocab", {}),
    ("triton-fused", "triton", "fused", {}),
    ("triton-fused-filter", "triton", "fused", {"grad_filter": True}),
)
#: Predicted compile time of a new configuration: the fused forward and backward kernels, or the row kernels.
COMPILE_S = {"fused": 8.0, "pairs": 3.0, "vocab": 3.0}
#: cost-model impl used for a step's predicted time
_MODEL_IMPL = {"eager": "eager", "torch-tokens": "torch", "torch-pairs": "triton-pairs",
               "torch-vocab": "triton-vocab", "triton": "triton", "triton-pairs": "triton-pairs",
               "triton-vocab": "triton-vocab", "triton-fused": "triton-fused",
               "triton-fused-filter": "triton-fused", "pairs": "triton-pairs", "vocab": "triton-vocab",
               "fused": "triton-fused"}

#: (name, schedule, kernel_options, the question it answers).
VARIANTS = (
    ("acq_rel-atomics", "fused", {"atomic_sem": "acq_rel"},
     "cost of Triton's default acq_rel atomics (MEMBAR+CCTL per add) against relaxed REDG"),
    ("fwd-tile-128x64", "fused", {"block_v": 64}, "forward tile 128x64 instead of 128x128"),
    ("fwd-tile-64x128", "fused", {"block_n": 64}, "forward tile 64x128 instead of 128x128"),
    ("bwd-tile-128x64", "fused", {"bwd_block_n": 128, "bwd_block_v": 64}, "backward tile 128x64 instead of 64x128"),
    ("bwd-tile-64x64", "fused", {"bwd_block_v": 64}, "backward tile 64x64 instead of 64x128"),
    ("no-raster-groups", "fused", {"group_n": 1, "bwd_group_n": 1},
     "L2 reuse from raster groups of 16 token blocks (1: no grouping)"),
    ("one-split", "fused", {"v_splits": 1}, "forward without vocabulary splits"),
    ("eight-splits", "fused", {"v_splits": 8}, "forward with 8 vocabulary splits (auto chooses from the SMs)"),
    ("rows-1024-w4", "pairs", {"logits_block_v": 1024, "logits_num_warps": 4}, "narrow row-kernel blocks"),
    ("rows-8192-w16", "pairs", {"logits_block_v": 8192, "logits_num_warps": 16}, "wide row-kernel blocks"),
)
DRY_VARIANTS = (
    ("acq_rel-atomics", "fused", {"atomic_sem": "acq_rel"}, VARIANTS[0][3]),
    ("no-raster-groups", "fused", {"group_n": 1, "bwd_group_n": 1}, VARIANTS[5][3]),
    ("rows-128-w2", "pairs", {"logits_block_v": 128, "logits_num_warps": 2}, "narrow row-kernel blocks"),
)

#: Per schedule: candidate groups; each group is tuned on ``metric`` given the winners before it.
SWEEP = {
    "fused": (
        ("fwd_ms", [{"block_v": 64}, {"block_n": 64}, {"num_stages": 4}, {"group_n": 8}, {"group_n": 32}]),
        ("fwd_bwd_ms", [{"bwd_block_v": 64}, {"bwd_block_n": 128, "bwd_block_v": 64}, {"bwd_num_stages": 2},
                        {"bwd_group_n": 8}, {"bwd_group_n": 32}]),
    ),
    "pairs": (("fwd_bwd_ms", [{"logits_block_v": 2048, "logits_num_warps": 4}, {"logits_block_v": 2048},
                             {"logits_num_warps": 4}, {"logits_num_warps": 16}, {"logits_block_v": 8192},
                             {"logits_block_v": 8192, "logits_num_warps": 16}]),),
}
SWEEP["vocab"] = SWEEP["pairs"]
DRY_SWEEP = {
    "fused": (("fwd_ms", [{"block_v": 64}]), ("fwd_bwd_ms", [{"bwd_block_n": 32}])),
    "pairs": (("fwd_bwd_ms", [{"logits_block_v": 128}]),),
    "vocab": (("fwd_bwd_ms", [{"logits_block_v": 128}]),),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=None, help=f"tokens of the check and sweep (default {TOKENS})")
    p.add_argument("--impls", default=None, help="comma list of exactness impls (default: all of "
                   + ",".join(n for n, *_ in EXACT_IMPLS) + ")")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:SCHEDULE:K=V[,K=V]",
                   help="an extra kernel variant, e.g. 'bwd-3stages:fused:bwd_num_stages=3' (repeatable)")
    p.add_argument("--only-variants", action="store_true", help="run only the --variant ones")
    p.add_argument("--sweep", default="fused,pairs,vocab", help="schedules to sweep ('' for none)")
    p.add_argument("--target-s", type=float, default=None, help="seconds of repetitions per timing")


def parse_variant(text: str) -> tuple[str, str, dict[str, Any], str]:
    """``'NAME:SCHEDULE:k=v,k=v'`` -> a :data:`VARIANTS` entry; ints where they parse."""
    try:
        name, schedule, body = text.split(":", 2)
        options = {}
        for item in filter(None, body.split(",")):
            k, v = item.split("=", 1)
            options[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else v.strip()
    except ValueError:
        raise ValueError(f"--variant {text!r}: expected NAME:SCHEDULE:K=V[,K=V]") from None
    if schedule not in TUNABLE_SCHEDULES:
        raise ValueError(f"--variant {text!r}: schedule must be one of {', '.join(TUNABLE_SCHEDULES)}")
    return name, schedule, options, "given on the command line"


class Inputs:
    """The check's inputs, their float64 reference and the timing settings."""

    def __init__(self, call: Call, args: argparse.Namespace):
        self.device = call.device
        family = DRY_FAMILY if call.dry_run else FAMILY
        tokens = C.FAMILIES[family].tokens[0] if call.dry_run else (args.tokens or TOKENS)
        self.case = C.make_case(C.FAMILIES[family], tokens)
        # the runner's case context, with the float64 reference (chunked: it fits the 9B head)
        self.ctx = M.CaseContext(self.case, self.device, seed=args.seed, reference="float64")
        self.hidden, self.weight, self.labels = self.ctx.hidden, self.ctx.weight, self.ctx.labels
        self.ref: Optional[dict] = None
        self.target_frac = CM.target_fraction(self.labels, C.IGNORE_INDEX)
        self.tol_val, self.tol_grad = M.TOLERANCES[self.case.dtype]
        self.target_s = args.target_s or (0.02 if call.dry_run else 0.3)
        # no separate warm-up: every timing follows the check's fwd+bwd call, which compiled the
        # kernels; a dry run times one call (the interpreter takes seconds per call), the GPU >= 3
        self.timing = dict(warmup=0, min_reps=1, max_reps=1) if call.dry_run else dict(warmup=0, min_reps=3)
        #: (schedule, options as JSON) -> its variant or sweep row: each configuration is measured once
        self.measured: dict[tuple[str, str], dict] = {}

    def fn(self, backend: str, schedule: str, **kwargs):
        from simpo_kernels import simpo_loss

        def fn(h, w, labels):
            out = simpo_loss(h, w, labels, beta=C.BETA, gamma_beta_ratio=C.GAMMA_BETA_RATIO, softcap=self.case.softcap,
                             ignore_index=C.IGNORE_INDEX, backend=backend, schedule=schedule, **kwargs)
            return out.loss, torch.cat([out.chosen_logps, out.rejected_logps])

        return fn

    def check(self, fn) -> dict[str, Any]:
        """One fwd+bwd against the float64 reference (:func:`benchmarks.measure.check`)."""
        res = M.check(C.Impl("check", fn, self.case.softcap), self.ctx)
        tol = {"loss": self.tol_val, "logps": self.tol_val, "dhidden": self.tol_grad, "dweight": self.tol_grad}
        return {"errors": res["errors"], "tolerances": tol, "passed": res["ok"], "detail": res["detail"]}

    def time(self, fn, backward: bool = True) -> dict[str, Any]:
        run = (lambda: M._fwd_bwd(fn, self.hidden, self.weight, self.labels)) if backward else \
            (lambda: M._fwd(fn, self.hidden, self.weight, self.labels))
        t = M.time_fn(run, self.device, target_s=self.target_s, **self.timing)
        return {"median_ms": t["median_ms"], "range_ms": [t["min_ms"], t["max_ms"]], "reps": t["reps"]}

    def predicted_ms(self, name: str, kernel_options: Optional[dict] = None) -> Optional[float]:
        return predicted_ms(self.case, self.target_frac, name, kernel_options)

    def step_seconds(self, name: str, calls: int, compile_s: float) -> Optional[float]:
        """Predicted wall time of a step (GPU only: a dry run is not guarded by GPU predictions)."""
        return step_seconds(self.case, self.target_frac, name, calls, compile_s) if self.device.type == "cuda" else None


def predicted_ms(case: C.Case, target_frac: float, name: str, kernel_options: Optional[dict] = None) -> Optional[float]:
    """The cost model's fwd+bwd time of impl or schedule ``name`` at ``case`` (an H100 prediction)."""
    impl = _MODEL_IMPL.get(name)
    if impl is None:
        return None
    try:
        kernel_config = None
        if kernel_options and impl == "triton-fused":
            from dataclasses import replace

            from simpo_kernels.kernels.launch import KernelConfig

            kernel_config = replace(KernelConfig(), **kernel_options)
        row = M.case_row(case, impl, case.softcap, [])
        return CM.prediction_fields(row, target_frac, kernel_config=kernel_config)["pred_fwd_bwd_ms"]
    except Exception:  # noqa: BLE001 - a prediction never costs a measurement
        return None


def step_seconds(case: C.Case, target_frac: float, name: str, calls: int, compile_s: float) -> Optional[float]:
    """Predicted wall time of a step making ``calls`` fwd+bwd calls of ``name`` after ``compile_s``."""
    ms = predicted_ms(case, target_frac, name)
    return None if ms is None else compile_s + calls * ms / 1e3


def gemm_seconds(m: int, n: int, k: int, tflops: float = 700.0) -> float:
    """Predicted wall time of a ``gemm`` step: set-up, 2 warm-ups and 5 to 50 repetitions (0.3 s)."""
    t = 2.0 * m * n * k / (tflops * 1e12)
    return 1.0 + (2 + min(50, max(5, 0.3 / t))) * t


def reference_seconds(case: C.Case, target_frac: float) -> float:
    """Predicted wall time of the float64 reference: 8 M H V float64 FLOPs plus a fixed 10 s."""
    return 10.0 + 8.0 * target_frac * case.tokens * case.hidden * case.vocab / (FP64_TFLOPS * 1e12)


# ------------------------------------------------------------------------------------------------ steps


def gemm_shapes(dry_run: bool) -> list[tuple[str, int, int, int, str]]:
    """(name, M, N, K, out dtype) of the cuBLAS rate measurements."""
    if dry_run:
        return [("square", 256, 256, 256, "same"), ("logits", 64, 300, 40, "same"),
                ("logits-f32out", 64, 300, 40, "float32"), ("dH", 64, 40, 300, "same"), ("dW", 300, 40, 64, "same")]
    fam = C.FAMILIES[FAMILY]
    N, H, V = TOKENS, fam.hidden, fam.vocab
    return [("square", 8192, 8192, 8192, "same"), ("logits", N, V, H, "same"), ("logits-f32out", N, V, H, "float32"),
            ("dH", N, H, V, "same"), ("dW", V, H, N, "same")]


def gemm_rate(device: torch.device, m: int, n: int, k: int, out: str, dtype: torch.dtype,
              target_s: float) -> dict[str, Any]:
    """Median time and rate of ``[m, k] @ [k, n]`` on random operands (``out``: 'same' or 'float32')."""
    g = torch.Generator(device=device).manual_seed(m * 7 + n * 3 + k)
    a = torch.randn(m, k, generator=g, device=device).to(dtype)
    b = torch.randn(n, k, generator=g, device=device).to(dtype).t()  # the weight's [V, H] layout, transposed
    if out == "float32" and dtype != torch.float32:
        fn = lambda: torch.mm(a, b, out_dtype=torch.float32)  # noqa: E731 - the schedules' call
    else:
        fn = lambda: torch.mm(a, b)  # noqa: E731
    t = M.time_fn(fn, device, warmup=2, target_s=target_s, min_reps=5, max_reps=50)
    return {"median_ms": t["median_ms"], "reps": t["reps"], "tflops": 2.0 * m * n * k / (t["median_ms"] * 1e-3) / 1e12}


def run_gemms(call: Call, dtype: torch.dtype, target_s: float) -> None:
    for name, m, n, k, out in gemm_shapes(call.dry_run):
        pred = None if call.dry_run else gemm_seconds(m, n, k)
        call.run_step("gemm", lambda row, m=m, n=n, k=k, out=out: row.update(
            gemm_rate(call.device, m, n, k, out, dtype, target_s)), predicted_s=pred, name=name, m=m, n=n, k=k,
            dtype=str(dtype)[6:], out_dtype=out if out != "same" else str(dtype)[6:])


def run_reference(call: Call, x: Inputs) -> None:
    c = x.case
    pred = None if call.dry_run else reference_seconds(c, x.target_frac)

    def reference(row):
        t0 = time.perf_counter()
        x.ref = x.ctx.reference(c.softcap)
        M.sync(call.device)
        row.update(reference="float64, chunked, on " + call.device.type, seconds=round(time.perf_counter() - t0, 3),
                   loss=float(x.ref["loss"]))

    call.run_step("reference", reference, predicted_s=pred, family=c.family, tokens=c.tokens, hidden=c.hidden,
                  vocab=c.vocab, softcap=c.softcap, dtype=c.dtype, target_frac=round(x.target_frac, 4))


def run_exactness(call: Call, x: Inputs, names: Optional[list[str]]) -> None:
    def exact(row, backend, schedule, kw):
        if x.ref is None:
            row.skip("no reference")
        if backend == "triton" and call.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            row.skip("triton needs CUDA or TRITON_INTERPRET=1")
        fn = x.fn(backend, schedule, **kw)
        row.update(x.check(fn))
        if not row["passed"]:
            row["status"] = f"mismatch:{row['detail']}"
            return
        row["fwd_bwd"] = x.time(fn)
        if x.device.type == "cuda":
            row["peak_mem_mib"] = M.peak_extra_mib(lambda: M._fwd_bwd(fn, x.hidden, x.weight, x.labels), x.device)
        row["pred_fwd_bwd_ms"] = x.predicted_ms(row["impl"])

    for name, backend, schedule, kw in EXACT_IMPLS:
        if names is None or name in names:
            call.run_step("exact", lambda row, b=backend, s=schedule, kw=kw: exact(row, b, s, kw),
                          predicted_s=x.step_seconds(name, 8, 10.0), impl=name, backend=backend, schedule=schedule,
                          options=kw, approximate=bool(kw.get("grad_filter")))


def measure_config(x: Inputs, row: dict, schedule: str, options: dict[str, Any]) -> None:
    """Check ``schedule`` with ``kernel_options=options`` against the reference, then time fwd and
    fwd+bwd: the fields of a variant or sweep row (status ``mismatch:`` if the check fails)."""
    fn = x.fn("triton", schedule, kernel_options=options)
    row.update(x.check(fn))
    if not row["passed"]:
        row["status"] = f"mismatch:{row['detail']}"
        return
    row["fwd_ms"] = x.time(fn, backward=False)["median_ms"]
    t = x.time(fn)
    row["fwd_bwd_ms"], row["fwd_bwd_range_ms"] = t["median_ms"], t["range_ms"]
    row["pred_fwd_bwd_ms"] = x.predicted_ms(schedule, options)


def config_row(call: Call, x: Inputs, kind: str, schedule: str, options: dict[str, Any], **fields: Any) -> dict:
    """The row of ``schedule`` with ``kernel_options=options``: measured in a new ``kind`` step the
    first time, the earlier row after that (variants and sweep share their defaults)."""
    key = (schedule, json.dumps(options, sort_keys=True))
    if key not in x.measured:
        def measure(row):
            if x.ref is None:
                row.skip("no reference")
            measure_config(x, row, schedule, options)

        x.measured[key] = call.run_step(kind, measure, predicted_s=x.step_seconds(schedule, 12, COMPILE_S[schedule]),
                                        schedule=schedule, options=options, **fields)
    return x.measured[key]


def run_variants(call: Call, x: Inputs, variants) -> None:
    """Each variant beside its schedule's defaults (measured once per schedule)."""
    for name, schedule, options, question in variants:
        base = config_row(call, x, "variant", schedule, {}, name="default", question="the defaults")
        row = config_row(call, x, "variant", schedule, options, name=name, question=question)
        if base.get("fwd_bwd_ms") and row.get("fwd_bwd_ms"):
            row["vs_default"] = round(row["fwd_bwd_ms"] / base["fwd_bwd_ms"], 4)
    call.dump()


def run_sweep(call: Call, x: Inputs, schedules: list[str]) -> dict[str, Any]:
    """Tune each schedule's candidate groups in turn, each group given the winners before it;
    returns ``{schedule: {default_ms, ms, options}}`` for the schedules whose defaults measured."""
    grid = DRY_SWEEP if call.dry_run else SWEEP
    results: dict[str, Any] = {}
    for schedule in schedules:
        best: dict[str, Any] = {}
        for metric, candidates in grid[schedule]:
            rows = [config_row(call, x, "sweep", schedule, {**best, **cand}, metric=metric)
                    for cand in [{}] + list(candidates)]
            ok = [r for r in rows if r["status"] == "ok" and r.get(metric)]
            base = next((r for r in ok if r["options"] == best), None)
            if base is None:  # the current best failed to measure: nothing to compare against
                break
            win = min(ok, key=lambda r: r[metric])
            if win[metric] < (1 - MIN_GAIN) * base[metric]:
                best = dict(win["options"])
        default = x.measured.get((schedule, "{}"))
        final = x.measured.get((schedule, json.dumps(best, sort_keys=True)))
        if default is None or default["status"] != "ok" or final is None or final["status"] != "ok":
            continue
        results[schedule] = {"default_ms": default["fwd_bwd_ms"], "ms": final["fwd_bwd_ms"], "options": best}
    return results


def tuned_table(call: Call, x: Inputs, results: dict[str, Any]) -> dict[str, Any]:
    """The ``simpo_kernels/tuned`` table from the sweep's results."""
    env = call.result["env"]
    c = x.case
    order = sorted(results, key=lambda s: results[s]["default_ms"])
    # the launchers look an entry up by the rows they launch on: the target tokens
    targets = int((x.labels[:, 1:] != C.IGNORE_INDEX).sum())
    configs = [{"schedule": s, "dtype": c.dtype, "tokens": targets, "hidden": c.hidden, "vocab": c.vocab,
                "options": r["options"], "ms": round(r["ms"], 4), "default_ms": round(r["default_ms"], 4)}
               for s, r in results.items() if r["options"]]
    return {"device": env["device"], "triton": env.get("triton"), "torch": env["torch"], "commit": env["commit"],
            "date": call.result["date"], "measured_at": {"family": c.family, "tokens": c.tokens,
                                                         "target_frac": round(x.target_frac, 4)},
            "schedule_order": order if len(order) > 1 else None, "configs": configs}


def readback(call: Call, x: Inputs, tuned: dict[str, Any]) -> None:
    """Write ``tuned`` where the launchers look (a temporary ``$SIMPO_TUNED_DIR``) and check that
    :func:`make_config` and ``schedule="auto"``'s order follow it."""
    from simpo_kernels.kernels.launch import make_config
    from simpo_kernels.tuned import schedule_order, table_path

    def check_readback(row):
        with tempfile.TemporaryDirectory() as d:
            table_path(tuned["device"], d).write_text(json.dumps(tuned))
            with mock.patch.dict(os.environ, {ENV_DIR: d}):
                problems = []
                for e in tuned["configs"]:
                    cfg = make_config(x.device, x.hidden.dtype, {}, schedule=e["schedule"],
                                      shape=(e["tokens"], e["hidden"], e["vocab"]))
                    problems += [f"{e['schedule']}.{k}={getattr(cfg, k)!r}, table {v!r}"
                                 for k, v in e["options"].items() if getattr(cfg, k) != v]
                order = schedule_order(tuned["device"])
                if tuple(tuned["schedule_order"] or ()) != tuple(order or ()):
                    problems.append(f"schedule order {order} != table {tuned['schedule_order']}")
        row["problems"] = problems
        if problems:
            row["status"] = "mismatch:" + "; ".join(problems)[:300]

    call.run_step("readback", check_readback, entries=len(tuned["configs"]))


# ------------------------------------------------------------------------------------------------ call


def run(call: Call, args: argparse.Namespace) -> str:
    from simpo_kernels.tuned import ENV_DIR

    dtype = torch.float32 if call.dry_run else torch.bfloat16
    names = [n for n in args.impls.split(",") if n] if args.impls else None
    known = [n for n, *_ in EXACT_IMPLS]
    if names and set(names) - set(known):
        raise SystemExit(f"unknown --impls {sorted(set(names) - set(known))}; known: {known}")
    variants = [parse_variant(v) for v in args.variant]
    if not args.only_variants:
        variants = list(DRY_VARIANTS if call.dry_run else VARIANTS) + variants
    schedules = [s for s in args.sweep.split(",") if s]
    if set(schedules) - set(SWEEP):
        raise SystemExit(f"unknown --sweep schedules {sorted(set(schedules) - set(SWEEP))}; known: {list(SWEEP)}")

    # measure against the built-in defaults, not against a table committed earlier
    with tempfile.TemporaryDirectory(prefix="simpo-untuned-") as empty, \
            mock.patch.dict(os.environ, {ENV_DIR: empty}):
        run_gemms(call, dtype, 0.02 if call.dry_run else 0.3)
        x = Inputs(call, args)  # not a step: without inputs there is nothing left to do
        call.set("shape", {"family": x.case.family, "tokens": x.case.tokens, "rows": x.case.rows, "seq": x.case.seq,
                           "hidden": x.case.hidden, "vocab": x.case.vocab, "softcap": x.case.softcap,
                           "dtype": x.case.dtype, "target_frac": round(x.target_frac, 4)})
        run_reference(call, x)
        run_exactness(call, x, names)
        run_variants(call, x, variants)
        results = run_sweep(call, x, schedules)
    tuned = tuned_table(call, x, results)
    name = f"tuned-{slug(tuned['device'])}.json"
    (call.out / name).write_text(json.dumps(tuned, indent=1) + "\n")
    call.set("tuned", {"file": name, **tuned})
    readback(call, x, tuned)
    if call.device.type == "cuda":
        from .common import nvidia_smi

        call.set("nvidia_smi_after", nvidia_smi())
    return summary(call)


def summary(call: Call) -> str:
    """The closing tables: GEMM rates, exactness, variants, the tuned result."""
    parts = [table([dict(r, shape=f"{r['m']}x{r['n']}x{r['k']}") for r in call.rows("gemm")],
                   ["name", "shape", "out_dtype", "median_ms", "tflops", "status"])]
    ex = []
    for r in call.rows("exact"):
        e = r.get("errors") or {}
        ex.append({"impl": r["impl"], "loss": e.get("loss"), "logps": e.get("logps"), "dH": e.get("dhidden"),
                   "dW": e.get("dweight"), "pass": r.get("passed"), "ms": (r.get("fwd_bwd") or {}).get("median_ms"),
                   "pred_ms": r.get("pred_fwd_bwd_ms"), "status": r["status"][:40]})
    parts.append(table(ex, ["impl", "loss", "logps", "dH", "dW", "pass", "ms", "pred_ms", "status"]))
    parts.append(table([{"variant": r.get("name"), "schedule": r["schedule"], "fwd_ms": r.get("fwd_ms"),
                         "fwd_bwd_ms": r.get("fwd_bwd_ms"), "vs_default": r.get("vs_default"),
                         "status": r["status"][:40]} for r in call.rows("variant")],
                       ["variant", "schedule", "fwd_ms", "fwd_bwd_ms", "vs_default", "status"]))
    tuned = call.result.get("tuned") or {}
    lines = [f"tuned: order {tuned.get('schedule_order')}; " + "; ".join(
        f"{e['schedule']} {fmt(e['default_ms'])} -> {fmt(e['ms'])} ms with {e['options']}"
        for e in tuned.get("configs", [])) + f" (file {tuned.get('file')})"]
    return "\n\n".join(parts + lines)


def plan() -> tuple[list[tuple[str, str, Optional[float]]], float]:
    """The GPU call's steps with their predicted seconds (the sweep counted in full, an upper
    bound: a group stops early only when a candidate fails), and the total."""
    case = C.make_case(C.FAMILIES[FAMILY], TOKENS)
    frac = CM.target_fraction(C.make_labels(case), C.IGNORE_INDEX)
    steps: list[tuple[str, str, Optional[float]]] = [("gemm", f"{name} {m}x{n}x{k}", gemm_seconds(m, n, k))
                                                     for name, m, n, k, _ in gemm_shapes(False)]
    steps.append(("reference", "float64 chunked", reference_seconds(case, frac)))
    steps += [("exact", name, step_seconds(case, frac, name, 8, 10.0)) for name, *_ in EXACT_IMPLS]
    seen = set()
    configs = [(name, sched, opts) for name, sched, opts, _ in VARIANTS]
    configs += [(f"sweep {sched}", sched, cand) for sched, groups in SWEEP.items() for _, cands in groups for cand in cands]
    for name, sched, opts in configs:
        for label, o in (("default", {}), (name, opts)):
            key = (sched, json.dumps(o, sort_keys=True))
            if key not in seen:
                seen.add(key)
                steps.append(("variant" if not name.startswith("sweep") else "sweep", f"{label} {sched} {o}",
                              step_seconds(case, frac, sched, 12, COMPILE_S[sched])))
    return steps, sum(s for *_, s in steps if s)


if __name__ == "__main__":
    from .common import DEFAULT_LIMIT_S, DEFAULT_MARGIN_S

    steps, total = plan()
    print(table([{"step": k, "what": w, "predicted_s": s} for k, w, s in steps], ["step", "what", "predicted_s"]))
    print(f"\ntotal {total:.0f} s predicted (cost model + fixed overheads; a prediction, not a measurement) of "
          f"{DEFAULT_LIMIT_S - DEFAULT_MARGIN_S:.0f} s usable")
