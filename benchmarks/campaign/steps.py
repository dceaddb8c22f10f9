"""The campaign's steps, most decisive first (each one or more rows of ``campaign.json``):

``env``     the environment (GPU, driver, clocks, library versions), the copy bandwidth and the
            cuBLAS bf16 rate: 8192^3 (the floor's rate) and the Gemma-2-9B head's GEMMs at N=8192 (logits, also with
            float32 output as the ``pairs``/``vocab`` schedules call it; dH; dW).
``exact``   bf16 exactness of every backend and schedule (:data:`~.plan.EXACT_IMPLS`) against the
            float64 reference computed on the GPU in chunks, at a small shape and at the 9B head
            (N=8192): relative norm errors of loss, log-probs, dH and dW, pass/fail at
            :data:`benchmarks.measure.TOLERANCES`; then ``pytest tests/test_triton_cuda.py`` (odd
            shapes, bf16/fp16/fp32, every schedule). Never cut by a prediction, only by the deadline.
``head``    the 9B head at N=8192, every position a target and the UltraFeedback-like batch (40%
            targets): each exact schedule, eager, Liger, CCE with and without gradient filtering,
            PyTorch's ``F.linear_cross_entropy`` (torch >= 2.13): checked, then CUDA-event medians of
            forward and forward+backward, peak extra memory, the cost model's prediction and the
            6NHV floor at the rate measured in ``env``. Then DPO (beta 0.01, precomputed reference
            values as fixed ``[B]`` tensors) on the UltraFeedback-like batch (:data:`~.plan.DPO_IMPLS`),
            and on the same inputs the reference precompute pass (``sequence_logps``, forward only:
            rows of kind ``precompute``, :data:`~.plan.PRECOMPUTE_IMPLS`), checked against the float64
            per-row sums and exact counts.
``memory``  the 9B head at N=32768 and 65536: the same, one repetition (memory is the question).
``train``   one training step of a Gemma-2-2B-shaped model, the official logits path (``eager``)
            against ours (``triton``): step time, tokens/s, peak memory (no batch search).
``sweep``   only with time left: kernel options per schedule at the 9B head; winners go to
            ``tuned-<gpu>.json`` and the launchers are checked to read it back (``readback``).

Every step row has ``predicted_s`` (:mod:`.plan`) beside ``wall_s``; impl rows also ``check_s``
(the first call, compilation included), which ``--calibrate`` turns into the next plan's fixed costs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional
from unittest import mock

import torch

from .. import cases as C
from .. import e2e as E
from .. import measure as M
from . import plan as P
from .common import Call, Step, fmt, table

ROOT = Path(__file__).resolve().parents[2]
PYTEST_LOG = "pytest-triton-cuda.log"
#: A sweep winner must beat the current best by this fraction to be kept (timing noise is ~1-2%).
MIN_GAIN = 0.03


class Campaign:
    """The state the steps share: settings, fixed costs, the measured matmul rate, what has run."""

    def __init__(self, call: Call, s: P.Settings, seed: int = 0):
        self.call, self.s, self.seed = call, s, seed
        self.pytest_command, self.pytest_t0 = "", 0.0
        self.device = call.device
        self.cuda = self.device.type == "cuda"
        self.fixed = P.load_fixed()
        self.rate: Optional[float] = None  # bf16 TFLOP/s measured in env (None: the H100 default)
        self.seen: set = set()

    def guard(self, seconds: Optional[float]) -> Optional[float]:
        """Predictions guard GPU steps only (a dry run's are H100 times, not CPU ones)."""
        return seconds if self.cuda else None

    def free_bytes(self) -> Optional[float]:
        return float(torch.cuda.mem_get_info(self.device)[0]) if self.cuda else None


# ------------------------------------------------------------------------------------------------ env


def gemm_rate(device: torch.device, m: int, n: int, k: int, out: str, dtype: torch.dtype) -> dict[str, Any]:
    """Median time and rate of ``[m, k] @ [k, n]`` on random operands (``out``: 'same' or 'float32')."""
    g = torch.Generator(device=device).manual_seed(m * 7 + n * 3 + k)
    a = torch.randn(m, k, generator=g, device=device).to(dtype)
    b = torch.randn(n, k, generator=g, device=device).to(dtype).t()  # the weight's [V, H] layout, transposed
    if out == "float32" and dtype != torch.float32:
        fn = lambda: torch.mm(a, b, out_dtype=torch.float32)  # noqa: E731 - the schedules' call
    else:
        fn = lambda: torch.mm(a, b)  # noqa: E731
    t = M.time_fn(fn, device, warmup=2, target_s=0.02 if device.type != "cuda" else 0.3, min_reps=5, max_reps=50)
    return {"median_ms": t["median_ms"], "reps": t["reps"], "tflops": 2.0 * m * n * k / (t["median_ms"] * 1e-3) / 1e12}


def copy_rate(device: torch.device, nbytes: int) -> dict[str, Any]:
    """Device-to-device copy bandwidth (bytes read plus written), the memory ceiling (METHOD.md)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = M.time_fn(lambda: dst.copy_(src), device, warmup=2, target_s=0.02 if device.type != "cuda" else 0.3,
                  min_reps=5, max_reps=50)
    return {"median_ms": t["median_ms"], "reps": t["reps"], "bytes": 2 * nbytes,
            "tbps": 2 * nbytes / (t["median_ms"] * 1e-3) / 1e12}


def run_env(cp: Campaign) -> None:
    call, s = cp.call, cp.s
    nbytes = 1 << (22 if s.dry_run else 31)  # 2 GiB on the GPU: far past the L2
    row = call.run_step("copy", lambda row: row.update(copy_rate(cp.device, nbytes)),
                        predicted_s=cp.guard(2.0), what="device-to-device copy")
    if row["status"] == "ok":
        call.set("copy_tbps", row["tbps"])
    for name, m, n, k, out in s.gemms:
        row = call.run_step("gemm", lambda row, m=m, n=n, k=k, out=out: row.update(
            gemm_rate(cp.device, m, n, k, out, s.dtype)), predicted_s=cp.guard(P.gemm_seconds(m, n, k)),
            name=name, m=m, n=n, k=k, dtype=str(s.dtype)[6:], out_dtype=out if out != "same" else str(s.dtype)[6:])
        if name == "square" and row["status"] == "ok":
            call.set("matmul_bf16_tflops", row["tflops"])  # a dry run's is float32 on the CPU
            cp.rate = row["tflops"] if cp.cuda else None  # None: predictions at the H100 default


# ------------------------------------------------------------------------------------------------ cases


def inputs_step(cp: Campaign, case: C.Case, group: str) -> Optional[M.CaseContext]:
    """The case's inputs and its float64 reference (computed on the device, chunked); None if that
    step did not finish."""
    frac = P.target_frac(case, cp.seed)
    holder: dict[str, M.CaseContext] = {}

    def inputs(row: Step) -> None:
        ctx = M.CaseContext(case, cp.device, seed=cp.seed, reference="float64")
        holder["ctx"] = ctx
        t0 = time.perf_counter()
        ref = ctx.reference(case.softcap)  # a -dpo case made its reference values in CaseContext
        M.sync(cp.device)
        row.update(reference=ref["kind"], reference_s=round(time.perf_counter() - t0, 3), loss=float(ref["loss"]))
        if cp.rate:
            row["floor_fwd_bwd_ms"] = case.flops_fwd_bwd() / (cp.rate * 1e12) * 1e3
        pred = P.reference_seconds(case, frac, cp.fixed) - cp.fixed["reference_fixed_s"]
        row["fixed_s"] = max(0.0, row["reference_s"] - pred)  # what --calibrate takes as the fixed part

    row = cp.call.run_step("reference", inputs, predicted_s=cp.guard(1.0 + P.reference_seconds(case, frac, cp.fixed)),
                           group=group, case=case.id, family=case.family, tokens=case.tokens, hidden=case.hidden,
                           vocab=case.vocab, softcap=case.softcap, dtype=case.dtype, layout=case.layout,
                           objective=case.loss, target_frac=round(frac, 4))  # "loss": the reference's value
    ctx = holder.get("ctx")
    if row["status"] != "ok" and ctx is not None:
        ctx.close()
        return None
    return ctx


def measure_impl(cp: Campaign, row: Step, impl_name: str, ctx: M.CaseContext, timing: Optional[dict],
                 impl: Optional[C.Impl] = None) -> None:
    """Check ``impl_name`` against the float64 reference (one fwd+bwd: ``check_s``, compilation
    included), then, with ``timing``, the runner's times and peak memory (:func:`benchmarks.measure.measure`)."""
    case = ctx.case
    if impl is None:
        try:
            impl = C.build_impl(impl_name, case, cp.device, ref_logps=ctx.ref_logps)
        except C.Unavailable as exc:
            row.skip(str(exc))
    reason = P.predicted_oom(impl_name, case, cp.free_bytes())
    if reason:
        row.skip(reason)
    row.update(softcap=impl.softcap, notes=list(impl.notes))
    row["new_shape"] = P.first_call_seconds(impl_name, case, cp.seen, cp.fixed)[1]
    P.mark_seen(cp.seen, impl_name, case)
    if impl.softcap != case.softcap:
        cp.seen.add(("nocap-ref", case.id))
    measure = None if timing is None else (lambda: M.measure(impl, ctx, check_first=False, **timing))
    if not check_then_measure(cp, row, lambda: M.check(impl, ctx), measure) or timing is None:
        return
    floor = case.flops_fwd_bwd() / (cp.rate * 1e12) * 1e3 if cp.rate else None
    if floor and row.get("fwd_bwd_ms"):
        row["floor_fwd_bwd_ms"] = floor
        row["x_floor"] = row["fwd_bwd_ms"] / floor


def check_then_measure(cp: Campaign, row: Step, check: Callable[[], dict],
                       measure: Optional[Callable[[], dict]]) -> bool:
    """``check()`` against the float64 reference, timed as ``check_s`` (the first call, compilation
    included); when it passes and ``measure`` is given, ``measure()``'s fields (status ok or oom,
    times, peak memory; not its own check's). False when the check failed (status ``mismatch``)."""
    t0 = time.perf_counter()
    res = check()
    M.sync(cp.device)
    row["check_s"] = round(time.perf_counter() - t0, 3)
    row.update(errors=res["errors"], reference=res["reference"], passed=res["ok"])
    if not res["ok"]:
        row["status"] = f"mismatch:{res['detail']}"[:300]
        return False
    if measure is not None:
        measured = measure()
        for k in ("errors", "reference"):
            measured.pop(k, None)
        row.update(measured)
    return True


def run_cases(cp: Campaign, group: str, cases, impls, timing: dict, precompute=()) -> None:
    """Per case an inputs/reference row, then one ``case`` row per impl (the runner's schema, so
    :mod:`benchmarks.report` renders them), then one ``precompute`` row per impl of ``precompute``
    (:func:`precompute_row`) on the same inputs."""
    from ..__main__ import prediction

    for family, tokens in cases:
        case = P.case_of(family, tokens)
        labels = C.make_labels(case, cp.seed)  # the runner's prediction() takes the labels
        frac = P.target_frac(case, cp.seed)
        ctx = inputs_step(cp, case, group)
        try:
            for impl in P.impls_at(family, impls):
                fields = dict(group=group, case=case.id, impl=impl, family=case.family, tokens=case.tokens,
                              rows=case.rows, seq=case.seq, hidden=case.hidden, vocab=case.vocab, dtype=case.dtype,
                              softcap=None if impl in P.NO_SOFTCAP_IMPLS else case.softcap, layout=case.layout,
                              loss=case.loss, target_frac=round(frac, 4))
                fields.update(prediction(fields, labels, cp.rate))  # pred_fwd_ms, pred_fwd_bwd_ms, ...
                secs = P.impl_seconds(case, impl, frac, cp.rate, cp.seen, cp.fixed, timing)

                def fn(row, impl=impl):
                    if ctx is None:
                        row.skip("no inputs/reference")
                    measure_impl(cp, row, impl, ctx, timing)

                row = cp.call.run_step("case", fn, predicted_s=cp.guard(secs), **fields)
                print(progress(row), flush=True)
            for impl in P.impls_at(family, precompute):
                precompute_row(cp, group, case, ctx, impl, labels, frac, timing)
        finally:
            if ctx is not None:
                ctx.close()


def precompute_row(cp: Campaign, group: str, case: C.Case, ctx: Optional[M.CaseContext], impl_name: str, labels,
                   frac: float, timing: dict) -> None:
    """The reference precompute pass ``impl_name`` (``sequence_logps``; CCE's forward) at ``case``:
    checked against the float64 per-row sums and the exact counts (``check_s``: the first call),
    then the median no-grad forward (``fwd_ms``), its peak extra memory (``fwd_peak_mem_mib``), the
    cost model's ``pred_fwd_ms`` (2MHV, forward only) and ``x_floor`` against 2NHV at the measured rate."""
    from ..__main__ import prediction

    fields = dict(group=group, case=case.id, impl=impl_name, family=case.family, tokens=case.tokens, rows=case.rows,
                  seq=case.seq, hidden=case.hidden, vocab=case.vocab, dtype=case.dtype, softcap=case.softcap,
                  layout=case.layout, target_frac=round(frac, 4))
    pred = prediction({**fields, "loss": "precompute"}, labels, cp.rate)
    fields.update({k: v for k, v in pred.items() if k != "pred_fwd_bwd_ms"})
    secs = P.precompute_seconds(case, impl_name, frac, cp.rate, cp.seen, cp.fixed, timing)

    def fn(row):
        if ctx is None:
            row.skip("no inputs/reference")
        try:
            impl = C.build_precompute(impl_name, case, cp.device)
        except C.Unavailable as exc:
            row.skip(str(exc))
        row["notes"] = list(impl.notes)
        cp.seen.add(f"precompute-{impl_name}")
        if not check_then_measure(cp, row, lambda: M.check_precompute(impl, ctx),
                                  lambda: M.measure_precompute(impl, ctx, check_first=False, **timing)):
            return
        if cp.rate and row.get("fwd_ms"):
            row["floor_fwd_ms"] = case.flops_fwd() / (cp.rate * 1e12) * 1e3  # 2NHV
            row["x_floor"] = row["fwd_ms"] / row["floor_fwd_ms"]

    row = cp.call.run_step("precompute", fn, predicted_s=cp.guard(secs), **fields)
    print(f"{case.id:>24} precompute {impl_name:>6}: {row['status'][:60]:<12} fwd {fmt(row.get('fwd_ms'))} ms "
          f"(pred {fmt(row.get('pred_fwd_ms'))}) peak {fmt(row.get('fwd_peak_mem_mib'), '.0f')} MiB "
          f"errors {row.get('errors')}  [{row.get('wall_s', 0):.1f} s, predicted {fmt(row.get('predicted_s'))} s]",
          flush=True)


def progress(row: dict) -> str:
    """The runner's progress line, with the step's wall time against its prediction."""
    from ..__main__ import fmt_row

    return fmt_row(row) + f"  [{row.get('wall_s', 0):.1f} s, predicted {fmt(row.get('predicted_s'))} s]"


# ------------------------------------------------------------------------------------------------ exact


def run_exact(cp: Campaign) -> None:
    """Every backend and schedule at each exactness shape, checked only (no prediction guard),
    while ``pytest tests/test_triton_cuda.py`` runs beside them (nothing here is timed, and both
    spend most of their time compiling, on separate CPU cores)."""
    proc = start_pytest(cp)
    try:
        for family, tokens in cp.s.exact_cases:
            case = P.case_of(family, tokens)
            ctx = inputs_step(cp, case, "exact")
            try:
                for name, backend, schedule, kw in P.EXACT_IMPLS:
                    if name in cp.s.exact_impls:
                        exact_row(cp, case, ctx, name, backend, schedule, kw)
            finally:
                if ctx is not None:
                    ctx.close()
        finish_pytest(cp, proc)
    finally:
        if proc.poll() is None:  # the deadline struck first
            proc.kill()
            proc.wait()


def exact_row(cp: Campaign, case: C.Case, ctx: Optional[M.CaseContext], name: str, backend: str, schedule: str,
              kw: dict) -> None:
    def fn(row):
        if ctx is None:
            row.skip("no inputs/reference")
        try:
            impl = C.simpo_kernels_impl(backend, case, cp.device, schedule, name, **kw)
        except C.Unavailable as exc:
            row.skip(str(exc))
        measure_impl(cp, row, name, ctx, None, impl=impl)

    frac = P.target_frac(case, cp.seed)
    expected = P.impl_seconds(case, name, frac, cp.rate, cp.seen, cp.fixed, None)
    row = cp.call.run_step("exact", fn, predicted_s=None, case=case.id, family=case.family, impl=name, backend=backend,
                           schedule=schedule, options=kw, approximate=bool(kw.get("grad_filter")), dtype=case.dtype,
                           tokens=case.tokens, hidden=case.hidden, vocab=case.vocab, expected_s=round(expected, 2))
    print(progress(row), flush=True)



def start_pytest(cp: Campaign) -> subprocess.Popen:
    """``pytest tests/test_triton_cuda.py`` in a subprocess, its output to a log in the work folder:
    bf16, fp16 and fp32 at odd shapes on every schedule against float64 (on CPU every test skips,
    with the reason)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)  # the CUDA tests, never the interpreter
    cmd = [sys.executable, "-m", "pytest", "tests/test_triton_cuda.py", "-q", "-rs", "-p", "no:cacheprovider"]
    cp.pytest_command = " ".join(cmd[1:])
    cp.pytest_t0 = time.monotonic()
    with open(cp.call.work / PYTEST_LOG, "w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish_pytest(cp: Campaign, proc: subprocess.Popen) -> None:
    """The pytest row: wait for it (at most ``pytest_timeout_s`` from its start), then its summary."""

    def fn(row):
        timeout = cp.s.pytest_timeout_s - (time.monotonic() - cp.pytest_t0)
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            row["status"] = f"error:TimeoutExpired: pytest ran past {cp.s.pytest_timeout_s:.0f} s"
        row["pytest_s"] = round(time.monotonic() - cp.pytest_t0, 2)
        lines = [ln for ln in (cp.call.work / PYTEST_LOG).read_text().splitlines() if ln.strip()]
        row.update(returncode=proc.returncode, summary=lines[-1] if lines else "", log=PYTEST_LOG)
        if row["status"] == "running" and proc.returncode not in (0, 5):  # 5: nothing collected
            row["status"] = f"error:pytest rc {proc.returncode}: {row['summary'][:200]}"

    cp.call.run_step("pytest", fn, predicted_s=None, command=cp.pytest_command, expected_s=cp.fixed["pytest_cuda_s"])


# ------------------------------------------------------------------------------------------------ train


def run_train(cp: Campaign) -> None:
    """One step of the Gemma-2-2B-shaped model per path, each path's model rebuilt with the same
    seed (so every path's first step sees the same weights and batch)."""
    s, call = cp.s.train, cp.call
    cfg = E.gemma2_2b_config(s["tiny"], **({"vocab_size": s["vocab"]} if s["vocab"] else {}))
    call.set("train_model", E.model_info(cfg, s["tiny"], s["dtype"]))
    for path in s["paths"]:
        built: dict[str, Any] = {}

        def build(row, path=path):
            model = E.build_model(cfg, cp.device, dtype=s["dtype"], seed=cp.seed)
            built.update(model=model, opt=torch.optim.AdamW(model.parameters(), lr=8e-7, foreach=True))
            M.sync(cp.device)
            row["params"] = sum(p.numel() for p in model.parameters())

        row = call.run_step("train-build", build, predicted_s=cp.guard(cp.fixed["train_build_s"]), path=path)
        if "model" not in built:
            continue

        def step(row, path=path):
            reason = C.triton_unavailable(cp.device) if path.startswith("triton") else None
            if reason:
                row.skip(reason)
            try:
                r = E.measure_step(built["model"], built["opt"], cfg, path, pairs=s["pairs"], seq=s["seq"],
                                   device=cp.device, steps=s["steps"], seed=cp.seed)
            finally:
                built["opt"].zero_grad(set_to_none=True)
            row.update({k: r.get(k) for k in ("first_loss", "loss", "warmup_ms", "step_ms", "step_ms_all",
                                              "tokens", "real_tokens", "tokens_per_s", "peak_mem_mib",
                                              "step_extra_mib")})

        try:
            row = call.run_step("train", step, predicted_s=cp.guard(P.train_path_seconds(path, cfg, s, cp.fixed)),
                                path=path, pairs=s["pairs"], seq=s["seq"], tokens=2 * s["pairs"] * s["seq"],
                                steps=s["steps"],
                                pred_step_ms=round(P.train_step_seconds(cfg, s["pairs"], s["seq"]) * 1e3, 1))
            print(f"train {path}: {row['status']} step {fmt(row.get('step_ms'))} ms, "
                  f"{fmt(row.get('tokens_per_s'))} tokens/s, peak {fmt(row.get('peak_mem_mib'), '.0f')} MiB", flush=True)
        finally:
            built.clear()
            M.free_memory(cp.device)


# ------------------------------------------------------------------------------------------------ sweep


def run_sweep(cp: Campaign) -> None:
    """Tune each schedule's candidate groups in turn (each given the winners before it; a winner
    must beat the current best by :data:`MIN_GAIN`), against the built-in defaults (a committed
    table is ignored while measuring), then write ``tuned-<gpu>.json`` and check the read-back."""
    from simpo_kernels.tuned import ENV_DIR, slug

    case = P.case_of(*cp.s.sweep_case)
    frac = P.target_frac(case, cp.seed)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="simpo-untuned-") as empty, mock.patch.dict(os.environ, {ENV_DIR: empty}):
        ctx = inputs_step(cp, case, "sweep")
        if ctx is None:
            return
        try:
            measured: dict[tuple, Step] = {}

            def config_row(schedule: str, options: dict, metric: str) -> Step:
                key = (schedule, json.dumps(options, sort_keys=True))
                if key not in measured:
                    def fn(row):
                        try:
                            impl = C.simpo_kernels_impl("triton", case, cp.device, schedule, schedule,
                                                        kernel_options=options)
                        except C.Unavailable as exc:
                            row.skip(str(exc))
                        measure_impl(cp, row, f"sweep-{schedule}", ctx, cp.s.timing, impl=impl)

                    secs = P.sweep_config_seconds(case, frac, schedule, options, cp.rate, cp.fixed, cp.s.timing)
                    measured[key] = cp.call.run_step("sweep", fn, predicted_s=cp.guard(secs), schedule=schedule,
                                                     options=options, metric=metric, case=case.id)
                return measured[key]

            for schedule, groups in cp.s.sweep.items():
                best: dict[str, Any] = {}
                for metric, candidates in groups:
                    rows = [config_row(schedule, {**best, **cand}, metric) for cand in [{}] + list(candidates)]
                    ok = [r for r in rows if r["status"] == "ok" and r.get(metric)]
                    base = next((r for r in ok if r["options"] == best), None)
                    if base is None:
                        break
                    win = min(ok, key=lambda r: r[metric])
                    if win[metric] < (1 - MIN_GAIN) * base[metric]:
                        best = dict(win["options"])
                default = measured.get((schedule, "{}"))
                final = measured.get((schedule, json.dumps(best, sort_keys=True)))
                if default and final and default["status"] == final["status"] == "ok":
                    results[schedule] = {"default_ms": default["fwd_bwd_ms"], "ms": final["fwd_bwd_ms"], "options": best}
        finally:
            ctx.close()
    if not results:
        return
    env = cp.call.result["env"]
    order = sorted(results, key=lambda k: results[k]["default_ms"])
    targets = int((C.make_labels(case, cp.seed)[:, 1:] != C.IGNORE_INDEX).sum())  # launchers key on target rows
    tuned = {"device": env["device"], "triton": env.get("triton"), "torch": env["torch"], "commit": env["commit"],
             "date": cp.call.result["date"], "measured_at": {"family": case.family, "tokens": case.tokens,
                                                           "target_frac": round(frac, 4)},
             "schedule_order": order if len(order) > 1 else None,
             "configs": [{"schedule": k, "dtype": case.dtype, "tokens": targets, "hidden": case.hidden,
                          "vocab": case.vocab, "options": r["options"], "ms": round(r["ms"], 4),
                          "default_ms": round(r["default_ms"], 4)} for k, r in results.items() if r["options"]]}
    name = f"tuned-{slug(tuned['device'])}.json"
    (cp.call.work / name).write_text(json.dumps(tuned, indent=1) + "\n")
    cp.call.set("tuned", {"file": name, **tuned})
    readback(cp, tuned)



def readback(cp: Campaign, tuned: dict) -> None:
    """Write ``tuned`` where the launchers look (a temporary ``$SIMPO_TUNED_DIR``) and check that
    ``make_config`` and ``schedule="auto"``'s order follow it."""
    from simpo_kernels.kernels.launch import make_config
    from simpo_kernels.tuned import ENV_DIR, schedule_order, table_path

    def fn(row):
        problems = []
        with tempfile.TemporaryDirectory() as d:
            table_path(tuned["device"], d).write_text(json.dumps(tuned))
            with mock.patch.dict(os.environ, {ENV_DIR: d}):
                for e in tuned["configs"]:
                    cfg = make_config(cp.device, cp.s.dtype, {}, schedule=e["schedule"],
                                      shape=(e["tokens"], e["hidden"], e["vocab"]))
                    problems += [f"{e['schedule']}.{k}={getattr(cfg, k)!r}, table {v!r}"
                                 for k, v in e["options"].items() if getattr(cfg, k) != v]
                order = schedule_order(tuned["device"])
                if tuple(tuned["schedule_order"] or ()) != tuple(order or ()):
                    problems.append(f"schedule order {order} != table {tuned['schedule_order']}")
        row["problems"] = problems
        if problems:
            row["status"] = "mismatch:" + "; ".join(problems)[:300]

    cp.call.run_step("readback", fn, entries=len(tuned["configs"]))


# ------------------------------------------------------------------------------------------------ the call


def run(call: Call, s: P.Settings, groups, seed: int = 0) -> str:
    """Run the step ``groups`` (``env`` always) in :data:`~.plan.GROUPS` order; the closing tables."""
    from ..__main__ import raise_dynamo_cache_limits

    raise_dynamo_cache_limits()  # Liger compiles one function per shape
    cp = Campaign(call, s, seed)
    call.set("startup_s", round(call.elapsed(), 2))
    # the GPU plan this call follows (a dry run prints it too: the numbers are GPU predictions)
    call.set("plan", {"groups": list(groups), **P.plan_summary(call.result["limit_s"], call.result["margin_s"])})
    print(P.plan_text(call.result["limit_s"], call.result["margin_s"]) + "\n", flush=True)
    run_env(cp)
    if "exact" in groups:
        run_exact(cp)
    if "head" in groups:
        run_cases(cp, "head", s.head_cases, s.head_impls, s.timing)
        run_cases(cp, "head", s.dpo_cases, s.dpo_impls, s.timing, s.precompute_impls)
    if "memory" in groups:
        run_cases(cp, "memory", s.memory_cases, s.memory_impls, s.memory_timing)
    if "train" in groups:
        run_train(cp)
    if "sweep" in groups:
        run_sweep(cp)
    render(call)
    if cp.cuda:
        from .common import nvidia_smi

        call.set("nvidia_smi_after", nvidia_smi())
    return summary(call)


def render(call: Call) -> None:
    """``bench.md`` and ``bench-<family>.png`` in the work folder from the ``case`` rows (a failure
    is recorded, not raised: the JSON is the result)."""
    if not call.rows("case"):
        return
    try:
        from ..report import render as render_report

        render_report([call.path], call.work, stem="bench")
        call.set("render", {"status": "ok", "files": sorted(p.name for p in call.work.glob("bench*"))})
    except Exception as exc:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        call.set("render", {"status": f"error:{type(exc).__name__}: {exc}"[:300]})


def summary(call: Call) -> str:
    """The closing tables: GEMM rates, exactness, the heads (ms, x floor, MiB), the train step."""
    parts = [table([dict(r, shape=f"{r['m']}x{r['n']}x{r['k']}") for r in call.rows("gemm")],
                   ["name", "shape", "out_dtype", "median_ms", "tflops", "status"])]
    ex = []
    for r in call.rows("exact"):
        e = r.get("errors") or {}
        ex.append({"case": r["case"], "impl": r["impl"], "loss": e.get("loss"), "logps": e.get("logps"),
                   "dH": e.get("dhidden"), "dW": e.get("dweight"), "status": r["status"][:40]})
    parts.append(table(ex, ["case", "impl", "loss", "logps", "dH", "dW", "status"]))
    parts += [f"pytest: {r.get('summary') or r['status']}" for r in call.rows("pytest")]
    cases = [{"case": r["case"], "impl": r["impl"], "fwd_bwd_ms": r.get("fwd_bwd_ms"), "x_floor": r.get("x_floor"),
              "pred_ms": r.get("pred_fwd_bwd_ms"), "peak_MiB": r.get("peak_mem_mib"), "status": r["status"][:40]}
             for r in call.rows("case")]
    parts.append(table(cases, ["case", "impl", "fwd_bwd_ms", "x_floor", "pred_ms", "peak_MiB", "status"]))
    pre = [{"case": r["case"], "impl": r["impl"], "fwd_ms": r.get("fwd_ms"), "x_2NHV": r.get("x_floor"),
            "pred_ms": r.get("pred_fwd_ms"), "peak_MiB": r.get("fwd_peak_mem_mib"),
            "sums_err": (r.get("errors") or {}).get("sums"), "status": r["status"][:40]}
           for r in call.rows("precompute")]
    if pre:
        parts.append("reference precompute pass (sequence_logps, forward only):\n"
                     + table(pre, ["case", "impl", "fwd_ms", "x_2NHV", "pred_ms", "peak_MiB", "sums_err", "status"]))
    parts.append(table(call.rows("train"), ["path", "step_ms", "tokens_per_s", "peak_mem_mib", "loss", "status"]))
    tuned = call.result.get("tuned")
    if tuned:
        parts.append(f"tuned: order {tuned.get('schedule_order')}; " + "; ".join(
            f"{e['schedule']} {fmt(e['default_ms'])} -> {fmt(e['ms'])} ms with {e['options']}"
            for e in tuned.get("configs", [])) + f" ({tuned['file']})")
    return "\n\n".join(parts)
