"""pytest-benchmark suites: the lm_head loss, forward and forward+backward, per (case, impl): SimPO,
and DPO with a precomputed reference at the ``-dpo`` families (fixed ``[B]`` reference values made
once per case: ``benchmarks.measure.make_ref_logps``); and the reference precompute pass
(``sequence_logps``, forward only, per-row sums checked against float64) at the ``-dpo`` families.

Each test first checks the impl's loss, log-probabilities and gradients against the reference
(:func:`benchmarks.measure.check`, cached per case and impl), then times the call with
``benchmark.pedantic`` (synchronised on CUDA, so the host clock covers the device work) and puts
the peak extra memory (CUDA), the check's errors and the cost model's ``pred_ms`` in
``extra_info``. A missing peer is skipped with its reason; out-of-memory is skipped as ``oom``;
a wrong answer fails the test.
"""

from __future__ import annotations

import pytest

from benchmarks import cases as C
from benchmarks import cost_model as CM
from benchmarks import measure as M


def _prepare(case, impl_name, case_pool):
    ctx = case_pool.get(case)  # first: a -dpo case's reference values live with its inputs
    try:
        impl = C.build_impl(impl_name, case, case_pool.device, ref_logps=ctx.ref_logps)
    except C.Unavailable as exc:
        pytest.skip(str(exc))
    key = (case, impl_name)
    if key not in case_pool.checks:
        case_pool.checks[key] = M.measure(impl, ctx, timing=False)
    res = case_pool.checks[key]
    if res["status"] == "oom":
        pytest.skip(f"oom during the correctness check ({case.id}, {impl_name})")
    if res["status"].startswith("skipped:"):
        pytest.skip(res["status"][len("skipped:"):])
    assert res["status"] == "ok", f"{impl_name} at {case.id}: {res['status']} (errors {res['errors']})"
    return impl, ctx, res


def _bench(benchmark, fn, ctx, impl, res, kind):
    device = ctx.device

    def call():
        fn()
        M.sync(device)

    benchmark.extra_info.update(
        impl=impl.name, family=ctx.case.family, loss=ctx.case.loss, tokens=ctx.case.tokens, hidden=ctx.case.hidden,
        vocab=ctx.case.vocab, softcap=impl.softcap, dtype=ctx.case.dtype, notes=impl.notes,
        errors=res["errors"], reference=res["reference"], kind=kind)
    benchmark.extra_info.update(_prediction(impl, ctx, kind))
    try:
        if device.type == "cuda":
            benchmark.extra_info["peak_mem_mib"] = M.peak_extra_mib(fn, device)
        benchmark.pedantic(call, rounds=5, warmup_rounds=1, iterations=1)
    except Exception as exc:  # noqa: BLE001
        if not M.is_oom(exc):
            raise
        M.free_memory(device)
        pytest.skip(f"oom ({ctx.case.id}, {impl.name}, {kind})")
    finally:
        M.free_memory(device)


def _prediction(impl, ctx, kind) -> dict:
    """``pred_ms`` of this kind from the cost model (H100 default rates: pytest-benchmark measures
    no matmul rate) at the case's own target fraction; ``pred_error`` if the model fails."""
    case = ctx.case
    row = {"impl": C.cost_backend(impl.name), "tokens": case.tokens, "seq": case.seq, "hidden": case.hidden,
           "vocab": case.vocab, "softcap": impl.softcap, "dtype": case.dtype,
           "loss": "precompute" if kind == "precompute" else case.loss}
    try:
        pred = CM.prediction_fields(row, CM.target_fraction(ctx.labels, C.IGNORE_INDEX))
    except Exception as exc:  # noqa: BLE001 - a prediction never fails a benchmark
        return {"pred_error": f"{type(exc).__name__}: {exc}"[:200]}
    return {"pred_ms": pred["pred_fwd_bwd_ms" if kind == "fwd_bwd" else "pred_fwd_ms"],
            "target_frac": pred["target_frac"]}


def test_fwd(benchmark, case, impl, case_pool):
    impl_, ctx, res = _prepare(case, impl, case_pool)
    benchmark.group = f"fwd {case.id}"
    _bench(benchmark, lambda: M._fwd(impl_.fn, ctx.hidden, ctx.weight, ctx.labels), ctx, impl_,
           res, "fwd")


def test_fwd_bwd(benchmark, case, impl, case_pool):
    impl_, ctx, res = _prepare(case, impl, case_pool)
    benchmark.group = f"fwd_bwd {case.id}"
    _bench(benchmark, lambda: M._fwd_bwd(impl_.fn, ctx.hidden, ctx.weight, ctx.labels), ctx,
           impl_, res, "fwd_bwd")


def test_precompute(benchmark, precompute_case, precompute_impl, case_pool):
    """The reference precompute pass (forward only, no gradient): checked against the float64
    per-row sums and exact counts (cached), then timed."""
    case, name = precompute_case, precompute_impl
    try:
        impl = C.build_precompute(name, case, case_pool.device)
    except C.Unavailable as exc:
        pytest.skip(str(exc))
    ctx = case_pool.get(case)
    key = (case, "precompute-" + name)
    if key not in case_pool.checks:
        case_pool.checks[key] = M.check_precompute(impl, ctx)
    res = case_pool.checks[key]
    assert res["ok"], f"precompute {name} at {case.id}: {res['detail']} (errors {res['errors']})"
    assert res["errors"]["counts"] == 0 and res["errors"]["sums"] <= M.TOLERANCES[case.dtype][0]
    benchmark.group = f"precompute {case.id}"
    _bench(benchmark, lambda: M._fwd(impl.fn, ctx.hidden, ctx.weight, ctx.labels), ctx, impl,
           {"errors": res["errors"], "reference": res["reference"]}, "precompute")
