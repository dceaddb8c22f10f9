"""``bench``: the loss runner at the Gemma-2-9B head (N = 2048 ... 65536), a realistic batch, and the
Gemma-2-2B and Llama-3-8B heads as time allows, against Liger-Kernel and Cut Cross-Entropy.

Plan (GPU), in this order, every impl at every case (``--families``, ``--tokens``, ``--impls``
override it):

    gemma2-9b      N = 2048, 8192, 32768, 65536     the target head (H=3584, V=256000, softcap 30)
    gemma2-9b-uf   N = 8192                          the same head on an UltraFeedback-like batch
                                                     (about 40% of positions are targets)
    gemma2-2b      N = 8192, 32768                   (H=2304, V=256000, softcap 30)
    llama3-8b      N = 8192, 32768                   (H=4096, V=128256, no softcap)

    impls: eager, torch, triton (schedule auto), triton-pairs, triton-vocab, triton-fused, liger,
           cce (its default gradient filtering), cce-nofilter (filter_eps=None)

It is the runner's method (``benchmarks/README.md``, :mod:`benchmarks.measure`): each (case, impl)
is checked against the reference before it is timed (CUDA events, medians), with its peak extra
memory and the cost model's predicted times beside the measured ones (at the bf16 matmul rate
measured first, in this call). Steps of ``bench.json`` (:class:`benchmarks.campaign.common.Call`):

- ``matmul``: the bf16 matmul rate (cuBLAS 8192^3), passed to every prediction;
- ``inputs``: one per case: its inputs and the reference the impls are checked against (the
  case's measured ``target_frac`` is recorded);
- ``case``: one per (case, impl), a result row of the runner's schema (``impl``, ``family``,
  ``tokens``, ..., ``status``, ``fwd_ms``, ``fwd_bwd_ms``, ``peak_mem_mib``, ``errors``,
  ``target_frac``, ``pred_fwd_ms``, ``pred_fwd_bwd_ms``) plus ``case``, ``layout``,
  ``predicted_s`` and ``wall_s``.

Time guard: every step carries ``predicted_s``, its wall time predicted before it starts
(:func:`step_seconds`: the cost model's forward and forward+backward times x :data:`SAFETY` x the
number of calls the measurement makes, plus compile/first-call and check overheads), and is
skipped (``skipped:predicted ...``) when that does not fit the time left, so the call never
starts what it cannot finish; the deadline (``--limit-s`` minus ``--margin-s``) interrupts a step
that overruns (``stopped:deadline``) and skips the rest. ``eager`` is skipped where its full
float32 logits cannot fit the free memory (``skipped:predicted OOM``), and an impl that ran out of
memory at a smaller N of a family is not tried at a larger one.

Output under ``--out`` (few files: the device returns at most 8): ``bench.json`` (rewritten after
every step), ``bench.md`` (the table: :func:`benchmarks.report.render`, which reads this JSON's
``case`` rows) and ``bench-<family>.png``; the closing table (impl x case: fwd+bwd ms measured /
predicted, peak MiB, or the status) is printed last.

``--dry-run``: the same code on CPU at the tiny families ``cpu-small``, ``cpu-small-nocap``,
``cpu-small-uf`` (the realistic layout) and ``cpu-interp-tiny`` (the triton impls, under the Triton
interpreter), one repetition per timing. ``python -m benchmarks.campaign.bench`` prints the GPU
plan with its predicted wall times and measures nothing.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

import torch

from .. import cases as C
from .. import cost_model as CM
from .. import measure as M
from ..__main__ import fmt_row, prediction, raise_dynamo_cache_limits
from .common import table

#: (family, token counts), in the order they run.
GPU_PLAN = (("gemma2-9b", (2048, 8192, 32768, 65536)), ("gemma2-9b-uf", (8192,)),
            ("gemma2-2b", (8192, 32768)), ("llama3-8b", (8192, 32768)))
DRY_PLAN = (("cpu-small", (256,)), ("cpu-small-nocap", (256,)), ("cpu-small-uf", (256,)),
            ("cpu-interp-tiny", (32,)))
IMPLS = C.ALL_IMPLS

#: Timing: seconds of repetitions per timing, and the repetition bounds (benchmarks.measure.time_fn).
GPU_TIMING = {"target_s": 0.5, "min_reps": 3, "max_reps": 20}
DRY_TIMING = {"target_s": 0.0, "min_reps": 1, "max_reps": 1}

#: The cost model is optimistic (every GEMM and tile at the one best cuBLAS rate): step time
#: predictions use its times x SAFETY.
SAFETY = 1.5
#: Seconds a step spends beyond its timed calls, on the GPU (guesses, to calibrate against the
#: ``wall_s`` beside each ``predicted_s`` of the first run): the first call of an impl in the process
#: (Triton JIT compiles of our kernels and CCE's; Liger's torch.compile) ...
FIRST_CALL_S = {"eager": 1.0, "torch": 2.0, "triton": 10.0, "triton-pairs": 3.0, "triton-vocab": 5.0,
                "triton-fused": 10.0, "liger": 30.0, "cce": 10.0, "cce-nofilter": 6.0}
#: ... its first call at a new head shape or row length (Triton re-specialises; dynamo recompiles
#: Liger's chunk function) ...
NEW_SHAPE_S = {"triton": 3.0, "triton-pairs": 2.0, "triton-vocab": 2.0, "triton-fused": 3.0,
               "liger": 12.0, "cce": 3.0, "cce-nofilter": 3.0}
#: ... and any other call (allocator, synchronisation).
LATER_CALL_S = 0.5
#: The same on CPU (dry run: the predictions are H100 times, so only the overheads count there).
DRY_FIRST_CALL_S, DRY_LATER_CALL_S, DRY_INPUTS_S = 2.0, 0.5, 0.5
#: The reference on the GPU (float32 at full precision or float64, chunked): its FLOPs (forward,
#: recomputed logits, dH, dW) at this rate, plus copying dW and dH to pinned host memory.
REFERENCE_TFLOPS = 40.0
HOST_COPY_GBPS = 2.0
#: The check compares dW and dH with the reference (float64 chunks, host-to-device copies).
COMPARE_GBPS = 5.0
#: eager holds about this many bytes per logit in forward+backward (bf16 logits, the float32
#: upcast, softcap temporaries, log-softmax, their gradients; benchmarks/NOTES.md).
EAGER_BYTES_PER_LOGIT = {True: 30, False: 22}  # by softcap


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--families", default=None,
                   help="comma list of case families (default: " + ",".join(f for f, _ in GPU_PLAN)
                        + "; dry run: " + ",".join(f for f, _ in DRY_PLAN) + ")")
    p.add_argument("--tokens", default=None,
                   help="comma list of token counts for the GPU families (default: the plan's)")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma list of impls (default: all)")
    p.add_argument("--target-s", type=float, default=None,
                   help=f"seconds of repetitions per timing (default {GPU_TIMING['target_s']}; dry run 0)")
    p.add_argument("--no-render", action="store_true", help="no bench.md and plots")


# --------------------------------------------------------------------------------------------
# The plan and its predicted wall time


def plan_cases(families=None, tokens=None, impls=IMPLS, *, dry_run: bool = False) -> list:
    """``[(Case, [impl, ...]), ...]`` in run order. ``families``/``tokens``: lists overriding the
    plan (a family outside the plan runs at its own token counts; CPU families keep theirs)."""
    base = dict(DRY_PLAN if dry_run else GPU_PLAN)
    names = list(families) if families else list(base)
    unknown = [f for f in names if f not in C.FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {unknown}; known: {list(C.FAMILIES)}")
    bad = [i for i in impls if i not in C.ALL_IMPLS]
    if bad:
        raise ValueError(f"unknown impls {bad}; known: {list(C.ALL_IMPLS)}")
    if dry_run and any(not C.FAMILIES[f].cpu for f in names):
        raise ValueError(f"a dry run takes CPU families only, not {[f for f in names if not C.FAMILIES[f].cpu]}")
    out = []
    for name in names:
        fam = C.FAMILIES[name]
        if fam.cpu or tokens is None:
            ns = base.get(name, fam.tokens)
        else:
            ns = [t for t in tokens if t in fam.tokens]
        for n in ns:
            wanted = [i for i in impls if i in fam.impls]
            if wanted:
                out.append((C.make_case(fam, n), wanted))
    return out


def applied_softcap(impl: str, case: C.Case):
    """The softcap ``impl`` applies at ``case`` (Liger has none)."""
    return None if impl == "liger" else case.softcap


def case_fields(case: C.Case, impl: Optional[str] = None, target_frac: Optional[float] = None) -> dict:
    """The descriptive fields of a step row (the runner's ``case_row`` plus ``case`` and ``layout``)."""
    row = M.case_row(case, impl, applied_softcap(impl, case), []) if impl else {
        "family": case.family, "tokens": case.tokens, "rows": case.rows, "seq": case.seq,
        "hidden": case.hidden, "vocab": case.vocab, "softcap": case.softcap, "dtype": case.dtype}
    row.update(case=case.id, layout=case.layout)
    if target_frac is not None:
        row["target_frac"] = round(target_frac, 4)
    return row


def _reps(ms: float, timing: dict) -> int:
    """Repetitions :func:`benchmarks.measure.time_fn` makes of a call of ``ms`` milliseconds."""
    return int(min(timing["max_reps"], max(timing["min_reps"], timing["target_s"] * 1e3 / max(ms, 1e-3))))


def reference_seconds(case: C.Case, device_type: str) -> float:
    """Predicted wall time of one reference (a softcap) at ``case``."""
    if device_type != "cuda":
        return DRY_INPUTS_S
    N, H, V = case.tokens, case.hidden, case.vocab
    return 8.0 * N * H * V / (REFERENCE_TFLOPS * 1e12) + (V * H + N * H) * 4 / (HOST_COPY_GBPS * 1e9) + 1.0


def inputs_seconds(case: C.Case, device_type: str) -> float:
    """Predicted wall time of the ``inputs`` step: the inputs and the case's reference."""
    if device_type != "cuda":
        return DRY_INPUTS_S
    return 1.0 + reference_seconds(case, device_type)


def _shape_key(case: C.Case):
    return (case.hidden, case.vocab, case.softcap, case.dtype, case.seq)


def overhead_seconds(impl: str, case: C.Case, seen: set, device_type: str) -> float:
    """The step's overhead beyond its timed calls, given the ``(impl, shape)`` pairs ``seen`` run
    before in this process (:data:`FIRST_CALL_S`, :data:`NEW_SHAPE_S`, :data:`LATER_CALL_S`)."""
    if device_type != "cuda":
        return DRY_LATER_CALL_S if impl in seen else DRY_FIRST_CALL_S
    if impl not in seen:
        return FIRST_CALL_S.get(impl, 10.0)
    if (impl, _shape_key(case)) not in seen:
        return NEW_SHAPE_S.get(impl, LATER_CALL_S)
    return LATER_CALL_S


def mark_seen(seen: set, impl: str, case: C.Case) -> None:
    seen.update((impl, (impl, _shape_key(case))))


def step_seconds(case: C.Case, impl: str, pred: dict, *, device_type: str, seen: set,
                 timing: dict) -> float:
    """Predicted wall time of the ``case`` step of ``impl``: check (1 fwd+bwd), forward timing
    (a warm-up, the repetitions, one memory call) and forward+backward timing (the same), at the
    cost model's times x :data:`SAFETY`, plus the overhead (:func:`overhead_seconds`), the
    check's comparisons and, for Liger at a softcap case, its own (no-softcap) reference."""
    over = overhead_seconds(impl, case, seen, device_type)
    if device_type != "cuda":
        return over
    fwd = (pred.get("pred_fwd_ms") or 0.0) * SAFETY
    fb = (pred.get("pred_fwd_bwd_ms") or 0.0) * SAFETY
    calls_s = ((3 + _reps(fb, timing)) * fb + (2 + _reps(fwd, timing)) * fwd) / 1e3
    compare = (case.vocab * case.hidden + case.tokens * case.hidden) * 4 / (COMPARE_GBPS * 1e9)
    extra_ref = reference_seconds(case, device_type) if impl == "liger" and case.softcap is not None else 0.0
    return calls_s + over + compare + extra_ref


def eager_bytes(case: C.Case) -> float:
    """Predicted peak extra memory of ``eager`` forward+backward (bytes)."""
    return float(case.tokens) * case.vocab * EAGER_BYTES_PER_LOGIT[case.softcap is not None]


def predicted_oom(impl: str, case: C.Case, free_bytes: Optional[float]) -> Optional[str]:
    """A skip reason where ``impl`` is predicted not to fit ``free_bytes`` (None: unknown, run it)."""
    if impl != "eager" or free_bytes is None:
        return None
    need = eager_bytes(case)
    if need > free_bytes:
        return f"predicted OOM ({need / 1e9:.0f} GB > {free_bytes / 1e9:.0f} GB free)"
    return None


def predict_plan(plan, *, device_type: str = "cuda", matmul_tflops: Optional[float] = None,
                 timing: Optional[dict] = None, seed: int = 0, memory_bytes: Optional[float] = 80e9) -> list:
    """Per case: ``{case, target_frac, inputs_s, steps: {impl: (predicted_s, pred_fwd_bwd_ms)},
    total_s}`` in run order, from the labels alone (no inputs are made): what the call expects to
    spend before it starts (``memory_bytes``: eager is skipped above it, as on the GPU)."""
    timing = timing or (GPU_TIMING if device_type == "cuda" else DRY_TIMING)
    seen, out = set(), []
    for case, impls in plan:
        labels = C.make_labels(case, seed)
        entry = {"case": case.id, "target_frac": round(CM.target_fraction(labels, C.IGNORE_INDEX), 4),
                 "inputs_s": inputs_seconds(case, device_type), "steps": {}}
        for impl in impls:
            if device_type == "cuda" and predicted_oom(impl, case, memory_bytes):
                entry["steps"][impl] = (0.0, None, "predicted OOM")
                continue
            pred = prediction(case_fields(case, impl), labels, matmul_tflops)
            s = step_seconds(case, impl, pred, device_type=device_type, seen=seen, timing=timing)
            mark_seen(seen, impl, case)
            entry["steps"][impl] = (round(s, 1), pred.get("pred_fwd_bwd_ms"), None)
        entry["total_s"] = round(entry["inputs_s"] + sum(v[0] for v in entry["steps"].values()), 1)
        out.append(entry)
    return out


def plan_markdown(predicted: list, limit_s: Optional[float] = None) -> str:
    """The predicted plan as a markdown table (per case: step seconds by impl, total)."""
    impls = []
    for e in predicted:
        impls += [i for i in e["steps"] if i not in impls]
    rows = []
    for e in predicted:
        r = {"case": e["case"], "target_frac": e["target_frac"], "inputs_s": round(e["inputs_s"], 1),
             "total_s": e["total_s"]}
        for i in impls:
            v = e["steps"].get(i)
            r[i] = None if v is None else ("OOM" if v[2] else v[0])
        rows.append(r)
    total = round(sum(e["total_s"] for e in predicted), 1)
    head = (f"Predicted wall time per step, seconds (cost model x {SAFETY} + overheads; a prediction, "
            f"not a measurement); total {total} s" + (f" of {limit_s:.0f} s usable" if limit_s else "") + ":")
    return head + "\n\n" + table(rows, ["case", "target_frac", "inputs_s", *impls, "total_s"])


# --------------------------------------------------------------------------------------------
# The call


def _split(text: Optional[str]) -> Optional[list]:
    return [t for t in text.split(",") if t] if text else None


def run(call, args) -> str:
    device, dry = call.device, call.dry_run
    timing = dict(DRY_TIMING if dry else GPU_TIMING)
    if args.target_s is not None:
        timing["target_s"] = args.target_s
    try:
        plan = plan_cases(_split(args.families), [int(t) for t in _split(args.tokens) or []] or None,
                          _split(args.impls) or IMPLS, dry_run=dry)
    except ValueError as exc:
        raise SystemExit(f"bench: {exc}") from None
    raise_dynamo_cache_limits()
    cuda = device.type == "cuda"
    memory = torch.cuda.get_device_properties(device).total_memory if cuda else None
    predicted = predict_plan(plan, device_type=device.type, timing=timing, seed=args.seed, memory_bytes=memory)
    usable = call.time_left()
    call.set("bench", {"timing": timing, "safety": SAFETY, "plan": predicted,
                       "predicted_total_s": round(sum(e["total_s"] for e in predicted), 1)})
    print(plan_markdown(predicted, usable), flush=True)

    def matmul(row):
        mm = M.matmul_tflops(device)
        row.update(mm)
        call.set("matmul_bf16_tflops", mm["tflops"])
        print(f"matmul bf16 {mm['n']}^3: {mm['tflops']:.4g} TFLOP/s", flush=True)

    row = call.run_step("matmul", matmul, predicted_s=5.0 if cuda else 2.0)
    rate = row.get("tflops") if cuda and row["status"] == "ok" else None  # CPU: predictions at the H100 default

    state = {"seen": set(), "oom": {}}
    for case, impls in plan:
        _run_case(call, case, impls, rate, timing, state, args.seed)

    if not args.no_render:
        _render(call)
    return closing_table(call)


def _run_case(call, case: C.Case, impls, rate, timing, state, seed) -> None:
    device = call.device
    labels = C.make_labels(case, seed)
    frac = CM.target_fraction(labels, C.IGNORE_INDEX)
    ctx = None

    def inputs(row):
        nonlocal ctx
        ctx = M.CaseContext(case, device, seed=seed)
        row["target_frac"] = round(CM.target_fraction(ctx.labels, C.IGNORE_INDEX), 4)
        ref = ctx.reference(case.softcap)
        row["reference"] = ref["kind"]
        if ref["kind"] == "none":
            row["status"] = f"skipped:{ref['error']}"

    row = call.run_step("inputs", inputs, predicted_s=inputs_seconds(case, device.type),
                        **case_fields(case, target_frac=frac))
    inputs_status = row["status"]
    print(f"{case.id}: inputs {inputs_status}, target_frac {row.get('target_frac')}, reference "
          f"{row.get('reference')}  [{row.get('wall_s', 0):.1f} s, predicted {row.get('predicted_s')} s]",
          flush=True)
    try:
        for impl in impls:
            pred = prediction(case_fields(case, impl), labels, rate)
            fields = {**case_fields(case, impl, frac), **pred}
            s = step_seconds(case, impl, pred, device_type=device.type, seen=state["seen"], timing=timing)
            r = call.run_step("case", lambda r, impl=impl: _measure(r, impl, case, ctx, inputs_status, rate, timing,
                                                                     state), predicted_s=s, **fields)
            print(fmt_row(r) + f"  [{r.get('wall_s', 0):.1f} s, predicted {s:.1f} s]", flush=True)
    finally:
        if ctx is not None:
            ctx.close()


def _measure(r, impl: str, case: C.Case, ctx, inputs_status: str, rate, timing: dict, state: dict) -> None:
    """Fill the step row ``r`` of ``impl`` at ``case``: a stated skip, or the runner's measurement
    (check, then times and memory) with the cost model's prediction beside it."""
    if ctx is None or inputs_status != "ok":
        r["status"] = f"skipped:inputs step {inputs_status}"[:200]
        return
    earlier = state["oom"].get((case.family, impl))
    if earlier is not None and earlier < case.tokens:
        r["status"] = f"skipped:oom at N={earlier}"
        return
    cuda = ctx.device.type == "cuda"
    reason = predicted_oom(impl, case, torch.cuda.mem_get_info(ctx.device)[0] if cuda else None)
    if reason:
        r["status"] = f"skipped:{reason}"
        return
    mark_seen(state["seen"], impl, case)
    res = M.run_impl(impl, ctx, **timing)
    r.update(res)
    r.update(prediction(res, ctx.labels, rate))
    if res["status"] == "oom":
        key = (case.family, impl)
        state["oom"][key] = min(case.tokens, state["oom"].get(key, case.tokens))


def _render(call) -> None:
    """``bench.md`` and ``bench-<family>.png`` from ``bench.json`` (a failure is recorded, not raised:
    the JSON is the result)."""
    t0 = time.monotonic()
    try:
        from ..report import render

        render([call.path], call.out, stem=call.name)
        files = sorted(p.name for p in call.out.glob(f"{call.name}*") if p.suffix in (".md", ".png"))
        call.set("render", {"status": "ok", "files": files, "wall_s": round(time.monotonic() - t0, 2)})
    except Exception as exc:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        call.set("render", {"status": f"error:{type(exc).__name__}: {exc}"[:300]})


# --------------------------------------------------------------------------------------------
# The closing table


def _short(status: str) -> str:
    if status.startswith("skipped:predicted OOM"):
        return "skip: pred. OOM"
    if status.startswith("skipped:predicted"):
        return "skip: no time"
    if status.startswith("skipped:"):
        return "skip: " + status[len("skipped:"):][:24]
    if status.startswith(("mismatch:", "error:")):
        return status[:32]
    return status


def _cell(r: dict) -> str:
    if r["status"] != "ok":
        return _short(r["status"])
    meas, pred, mem = r.get("fwd_bwd_ms"), r.get("pred_fwd_bwd_ms"), r.get("peak_mem_mib")
    f = (lambda v: "-" if v is None else f"{v:.1f}" if v >= 10 else f"{v:.3g}")
    return f"{f(meas)}/{f(pred)}" + (f" {mem:.0f}M" if mem is not None else "")


def closing_table(call) -> str:
    """impl x case: ``fwd+bwd ms measured/predicted peak-MiB`` or the status; then per case the
    wall time against the predicted."""
    rows = call.rows("case")
    cases, impls = [], []
    for r in rows:
        if r["case"] not in cases:
            cases.append(r["case"])
        if r["impl"] not in impls:
            impls.append(r["impl"])
    grid = []
    for impl in impls:
        g = {"impl": impl}
        for r in rows:
            if r["impl"] == impl:
                g[r["case"]] = _cell(r)
        grid.append(g)
    wall = {"impl": "wall s (pred)"}
    for c in cases:
        steps = [r for r in call.rows() if r.get("case") == c]
        w = sum(r.get("wall_s") or 0.0 for r in steps)
        p = sum(r.get("predicted_s") or 0.0 for r in steps if not str(r["status"]).startswith("skipped"))
        wall[c] = f"{w:.0f} ({p:.0f})"
    grid.append(wall)
    rate = call.result.get("matmul_bf16_tflops")
    head = ("bench: fwd+bwd ms measured/predicted (cost model"
            + (f" at the measured {rate:.4g} TFLOP/s" if rate and call.device.type == "cuda" else ", H100 defaults")
            + "), peak extra MiB; else the status"
            + (" (dry run: CPU times against H100 predictions, not a measurement)" if call.dry_run else ""))
    return head + "\n\n" + table(grid, ["impl", *cases])


if __name__ == "__main__":
    from .common import DEFAULT_LIMIT_S, DEFAULT_MARGIN_S

    print(plan_markdown(predict_plan(plan_cases()), DEFAULT_LIMIT_S - DEFAULT_MARGIN_S))
