"""Tests of the cost model (``benchmarks/cost_model.py``): counts that hold by construction, the
time rule, scaling, the CLI, input errors, and the runner/report wiring. CPU only, no GPU."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from benchmarks import cost_model as CM
from benchmarks import report as R

N, H, V = 8192, 3584, 256000  # the Gemma-2-9B head at one device step (DESIGN section 2)


def gemma(**kw) -> CM.Shape:
    """The gemma2-9b family at N=8192, target fraction 0.5, with ``kw`` replaced (and validated)."""
    return replace(CM.shape_for_family("gemma2-9b", N, 0.5), **kw)


def test_family_shape():
    s = CM.shape_for_family("gemma2-9b", 8192, 0.5)
    assert (s.tokens, s.hidden, s.vocab, s.dtype_bytes, s.softcap) == (N, H, V, 2, True)
    assert s.target_rows == 4096
    assert CM.shape_for_family("llama3-8b", 2048).softcap is False


@pytest.mark.parametrize("frac", [0.0, 0.25, 0.5, 1.0])
def test_fused_flops_by_construction(frac):
    s = gemma(target_frac=frac)
    M = round(frac * N)
    c = CM.predict("triton-fused", s)
    # exact metrics with a softcap: the target rows' forward plus the metric-only rows' forward
    assert c.fwd.flops == 2.0 * M * H * V + 2.0 * (N - M) * H * V == 2.0 * N * H * V
    assert c.bwd.flops == 3 * 2.0 * M * H * V  # recompute + dH + dW on target rows only
    t = CM.predict("triton-fused", s, logit_metrics="targets")
    assert t.fwd.flops == 2.0 * M * H * V and t.fwd_bwd.flops == 8.0 * M * H * V


@pytest.mark.parametrize("frac", [0.0, 0.25, 0.4, 0.5, 1.0])
@pytest.mark.parametrize("mode", ["targets", "none"])
def test_schedule_flops_by_construction(frac, mode):
    s = gemma(target_frac=frac)
    M = round(frac * N)
    pairs = CM.predict("triton-pairs", s, logit_metrics=mode)
    assert pairs.fwd_bwd.flops == 6.0 * M * H * V == CM.target_floor_flops(s)  # the floor: no recompute
    assert pairs.fwd.flops == 2.0 * M * H * V and pairs.bwd.flops == 4.0 * M * H * V
    for name in ("triton-vocab", "triton-fused", "torch"):
        c = CM.predict(name, s, logit_metrics=mode)
        assert c.fwd_bwd.flops == 8.0 * M * H * V, name  # the recompute costs 2MHV
        assert c.fwd.flops == 2.0 * M * H * V, name


def test_pairs_and_vocab_have_no_atomics_fused_has():
    for frac in (0.25, 0.5, 1.0):
        for name in ("triton-pairs", "triton-vocab", "torch"):
            c = CM.predict(name, gemma(target_frac=frac))
            assert c.fwd_bwd.atomic_bytes == 0, name
            assert all(p.atomic_bytes == 0 for p in c.fwd_bwd.phases), name
        assert CM.predict("triton-fused", gemma(target_frac=frac)).bwd.atomic_bytes > 0


def _budget_for_vocab_chunks(M, cols):
    """A memory budget whose vocab chunk over ``M`` rows is ``cols`` columns (a multiple of 128)."""
    return M * cols * 4


def test_vocab_writes_dw_once_pairs_accumulates_per_chunk():
    s = gemma(target_frac=0.5)
    M, b = s.target_rows, 2
    one = CM.predict("triton-vocab", s, logit_metrics="none")
    for cols in (256000, 64000, 25600, 1024):
        budget = _budget_for_vocab_chunks(M, cols)
        assert CM.vocab_chunk_columns(M, V, budget) == cols
        k = -(-V // cols)
        c = CM.predict("triton-vocab", s, logit_metrics="none", memory_budget=budget)
        dw = [p for p in c.bwd.phases if p.name.startswith("dW[chunk]")]
        # each chunk's dW GEMM reads dz [M, c] and the target rows, and writes its c rows of dW
        written = sum(p.count * p.hbm_bytes for p in dw) - (M * V * b + k * M * H * b)
        assert written == pytest.approx(V * H * b, rel=1e-12)  # dW written once, in the input dtype
        # more chunks only re-read the target rows (recompute, dW) and round-trip the [M, H] float32
        # dH accumulator: nothing of size [V, H] per chunk
        extra = c.bwd.hbm_bytes - one.bwd.hbm_bytes
        assert extra == pytest.approx((k - 1) * (2 * M * H * b + 2 * M * H * 4), rel=1e-12)
        assert c.fwd_bwd.flops == one.fwd_bwd.flops == 8.0 * M * H * V
    # pairs: each chunk of pairs reads and writes the whole float32 [V, H] dW accumulator
    p1 = CM.predict("triton-pairs", s, logit_metrics="none")
    assert CM.pair_chunk_rows(s) == [M]  # 8 GiB hold every pair here
    per_pair = CM.pair_chunk_rows(s, memory_budget=2048 * V * 4)
    assert per_pair == [2048, 2048] and sum(per_pair) == M
    p2 = CM.predict("triton-pairs", s, logit_metrics="none", memory_budget=2048 * V * 4)
    acc = sum(p.count * p.hbm_bytes for p in p2.bwd.phases if p.name.startswith("dW addmm"))
    assert acc == pytest.approx(2 * (2048 * V * b + 2048 * H * b + 2 * V * H * 4), rel=1e-12)
    assert p2.bwd.hbm_bytes - p1.bwd.hbm_bytes == pytest.approx(V * H * b + 2 * V * H * 4, rel=1e-12)
    assert p2.fwd_bwd.flops == p1.fwd_bwd.flops


def test_pair_chunks_follow_the_memory_budget():
    s = gemma(tokens=32768, target_frac=0.5)  # 8 pairs of 2 x 2048 x 0.5 = 2048 target rows
    rows = CM.pair_chunk_rows(s)  # 8 GiB: 4 pairs (8.4 GB of float32 logits) per chunk
    assert rows == [8192, 8192]
    c = CM.predict("triton-pairs", s)
    gemms = [p for p in c.fwd.phases if p.name.startswith("logits GEMM")]
    assert sum(p.count for p in gemms) == 2  # W read once per chunk
    assert CM.pair_chunk_rows(s, memory_budget=1) == [2048] * 8  # a pair that does not fit: alone
    assert c.scratch_bytes == 8192 * V * 4 + V * H * 4
    with pytest.raises(ValueError, match="memory_budget"):
        CM.predict("triton-pairs", s, memory_budget=0)


@pytest.mark.parametrize("name", ["torch", "triton", "triton-pairs", "triton-vocab", "triton-fused"])
@pytest.mark.parametrize("frac", [0.25, 0.4, 0.5])
def test_logit_metrics_costs(name, frac):
    s = gemma(target_frac=frac)
    O = N - s.target_rows
    none = CM.predict(name, s, logit_metrics="none")
    targets = CM.predict(name, s, logit_metrics="targets")
    exact = CM.predict(name, s)  # the default
    for p in CM.PASSES:  # targets and none add nothing at all
        a, b = targets.pass_cost(p), none.pass_cost(p)
        assert (a.flops, a.hbm_bytes, a.atomic_bytes, a.ms) == (b.flops, b.hbm_bytes, b.atomic_bytes, b.ms)
    # exact + softcap: a forward-only pass over the metric-only rows, nothing in the backward
    assert exact.fwd_bwd.flops - none.fwd_bwd.flops == 2.0 * O * H * V
    assert exact.bwd.hbm_bytes == none.bwd.hbm_bytes and exact.bwd.flops == none.bwd.flops
    e = CM.logit_metrics_extra(name, s)
    assert e["flops"] == 2.0 * O * H * V and e["ms"] > 0
    assert CM.logit_metrics_extra(name, s, logit_metrics="targets") == {
        "flops": 0.0, "hbm_bytes": 0.0, "ms": 0.0, "base_ms": none.fwd_bwd.ms}
    # exact without softcap: W.sum(0) (one read of W) and a GEMV, whatever the schedule
    nc = replace(s, softcap=False)
    x = CM.logit_metrics_extra(name, nc)
    assert x["flops"] == 2.0 * O * H
    gather_and_gemv = 2 * O * H * 2 + O * H * (2 + 4) + O * H * 4 + 2 * H * 4
    assert x["hbm_bytes"] == pytest.approx(V * H * 2 + gather_and_gemv, rel=1e-12)
    assert x["ms"] < e["ms"] / 5


def test_eager_and_peers_ignore_logit_metrics():
    for name in ("eager", "liger", "cce", "floor"):
        a, b = CM.predict(name, gemma()), CM.predict(name, gemma(), logit_metrics="none")
        assert (a.fwd_bwd.flops, a.fwd_bwd.hbm_bytes, a.fwd_bwd.ms) == (b.fwd_bwd.flops, b.fwd_bwd.hbm_bytes,
                                                                       b.fwd_bwd.ms), name
    with pytest.raises(ValueError, match="logit_metrics must be one of"):
        CM.predict("triton-pairs", gemma(), logit_metrics="all")


def test_compaction_scales_with_target_rows():
    # nothing but metric rows, and with "targets" nothing at all: no matmul
    for name in ("torch", "triton-pairs", "triton-vocab", "triton-fused"):
        empty = CM.predict(name, gemma(target_frac=0.0), logit_metrics="targets")
        assert empty.fwd_bwd.flops == 0 and empty.fwd_bwd.atomic_bytes == 0, name
        # the matmul work of the target rows is linear in M
        f1, f2 = (CM.predict(name, gemma(target_frac=f), logit_metrics="none").fwd_bwd.flops for f in (0.25, 0.5))
        assert f2 == 2 * f1, name


def test_auto_schedule_follows_the_library():
    s = gemma()
    assert CM.auto_schedule(s) == "pairs"
    auto, pairs = CM.predict("triton", s), CM.predict("triton-pairs", s)
    assert auto.backend == "triton" and "'auto' -> 'pairs'" in auto.notes[0]
    assert (auto.fwd.ms, auto.bwd.ms, auto.fwd_bwd.hbm_bytes) == (pairs.fwd.ms, pairs.bwd.ms, pairs.fwd_bwd.hbm_bytes)
    # one pair's 2048 target rows of float32 logits (2.1 GB) do not fit 1 GiB: vocab's 128 columns do
    assert CM.auto_schedule(s, memory_budget=2**30) == "vocab"
    assert CM.predict("triton", s, memory_budget=2**30).fwd_bwd.flops == CM.predict(
        "triton-vocab", s, memory_budget=2**30).fwd_bwd.flops
    assert CM.auto_schedule(s, memory_budget=1024) == "fused"


def test_scratch_bytes():
    s = gemma(target_frac=0.5)
    M = s.target_rows
    t = dict(logit_metrics="targets")
    assert CM.predict("triton-pairs", s, **t).scratch_bytes == M * V * 4 + V * H * 4
    assert CM.predict("triton-vocab", s, **t).scratch_bytes == M * V * 4 + M * H * 4
    budget = _budget_for_vocab_chunks(M, 1024)
    assert CM.predict("triton-vocab", s, memory_budget=budget, **t).scratch_bytes == M * 1024 * 4 + M * H * 4
    assert CM.predict("triton-fused", s, **t).scratch_bytes == (M * H + V * H) * 4
    assert CM.predict("torch", s, torch_chunk=100, **t).scratch_bytes == 100 * V * (4 + 4 + 2) + V * H * 4
    # exact + softcap at f=0.4: the metric rows (4915) outnumber the targets (3277)
    s4 = gemma(target_frac=0.4)
    assert CM.predict("triton-vocab", s4).scratch_bytes == (N - s4.target_rows) * V * 4
    assert CM.predict("eager", s).scratch_bytes is None


def test_floor_is_6nhv_with_fewest_bytes():
    c = CM.predict("floor", gemma())
    assert c.fwd.flops == 2.0 * N * H * V and c.fwd_bwd.flops == 6.0 * N * H * V
    assert c.fwd_bwd.hbm_bytes == 2 * (N + V) * H * 2 and c.fwd_bwd.atomic_bytes == 0
    assert abs(c.fwd_bwd.ms - 6.0 * N * H * V / 798e12 * 1e3) < 1e-9  # matmul-bound
    assert abs(c.fwd_bwd.flops / 1e12 - 45.1) < 0.05  # benchmarks/NOTES.md


def test_fused_atomic_bytes_follow_the_formula():
    s = gemma()
    M = s.target_rows
    cfg = CM.default_kernel_config()  # the defaults as they are now (being retuned)
    got = CM.predict("triton-fused", s).bwd.atomic_bytes
    assert got == pytest.approx(M * H * V * (1 / cfg.bwd_block_v + 1 / cfg.bwd_block_n) * 4, rel=1e-12)
    assert CM.predict("triton-fused", s).fwd.atomic_bytes == 0
    other = replace(cfg, bwd_block_n=128, bwd_block_v=64)
    got = CM.predict("triton-fused", s, kernel_config=other).bwd.atomic_bytes
    assert got == pytest.approx(M * H * V * (1 / 64 + 1 / 128) * 4, rel=1e-12)


def test_the_cost_model_reads_kernel_config_at_call_time(monkeypatch):
    import simpo_kernels.kernels as K

    base = K.KernelConfig()
    monkeypatch.setattr(K, "KernelConfig", lambda: replace(base, bwd_block_n=256, bwd_block_v=256))
    got = CM.predict("triton-fused", gemma()).bwd.atomic_bytes
    assert got == pytest.approx(4096 * H * V * (2 / 256) * 4, rel=1e-12)


def test_bytes_scale():
    # eager: every [N, V] pass is linear in N, the weight traffic is fixed: bytes are affine in N
    b1, b2, b3 = (CM.predict("eager", gemma(tokens=n)).fwd_bwd.hbm_bytes for n in (2048, 4096, 6144))
    assert b2 - b1 == pytest.approx(b3 - b2, rel=1e-12) and b2 - b1 > 0
    # torch: the M = 2C gathered target rows in chunks of C tokens; each chunk reads all of W once
    # and moves 56 bytes per float32 logit
    C = 128
    s = gemma(tokens=4 * C)  # target fraction 0.5: M = 2C target rows, 2C metric-only rows
    W = V * H * 2
    per_chunk = W + C * H * 2 + C * V * 4 + (24 + 24 + 4) * C * V
    gather = 2 * (2 * C) * H * 2
    targets = CM.predict("torch", s, torch_chunk=C, logit_metrics="targets").fwd.hbm_bytes
    assert targets == pytest.approx(2 * per_chunk + gather, rel=1e-12)
    # exact + softcap: the same chunked forward over the 2C metric-only rows
    assert CM.predict("torch", s, torch_chunk=C).fwd.hbm_bytes == pytest.approx(2 * targets, rel=1e-12)
    nocap = replace(s, softcap=False)
    assert targets - CM.predict("torch", nocap, torch_chunk=C, logit_metrics="targets").fwd.hbm_bytes == (
        pytest.approx(2 * 24 * C * V, rel=1e-12))
    # liger computes every position; triton's atomics and cce's work follow the target rows
    lig = [CM.predict("liger", gemma(target_frac=f)).fwd_bwd for f in (0.25, 1.0)]
    assert lig[0].hbm_bytes == lig[1].hbm_bytes and lig[0].flops == lig[1].flops
    at = [CM.predict("triton-fused", gemma(target_frac=f)).bwd.atomic_bytes for f in (0.25, 0.5)]
    assert at[1] == pytest.approx(2 * at[0], rel=1e-12)
    # fp32 inputs: the floor's bytes double
    assert CM.predict("floor", gemma(dtype_bytes=4)).fwd_bwd.hbm_bytes == 2 * CM.predict(
        "floor", gemma()).fwd_bwd.hbm_bytes


def test_cce_filtering_and_target_rows():
    s = gemma()
    M = s.target_rows
    exact, filt = CM.predict("cce", s), CM.predict("cce", s, cce_filtered_frac=0.75)
    assert exact.fwd.flops == 2.0 * M * H * V  # only rows with a target, forward too
    assert exact.bwd.flops == 6.0 * M * H * V
    assert filt.bwd.flops == 2.0 * M * H * V + 0.25 * 4.0 * M * H * V  # recompute is never skipped
    locked = M * H * V * (2 / 128) * 2 * 2
    assert exact.bwd.atomic_bytes - filt.bwd.atomic_bytes == pytest.approx(0.75 * locked, rel=1e-9)


def test_liger_has_no_softcap():
    on, off = CM.predict("liger", gemma()), CM.predict("liger", gemma(softcap=False))
    assert on.fwd_bwd.hbm_bytes == off.fwd_bwd.hbm_bytes
    assert any("WITHOUT the softcap" in n for n in on.notes)
    assert not any("softcap" in n for n in off.notes)


def test_time_is_the_max_rule_per_phase():
    hw = CM.Hardware(matmul_tflops=500.0, hbm_tbps=2.0, atomic_tbps=4.0)
    p = CM.Phase("x", flops=1e12, hbm_bytes=3e9, atomic_bytes=8e9, count=3)
    assert p.ms(hw) == pytest.approx(3 * max(1e12 / 500e12, 3e9 / 2e12 + 8e9 / 4e12) * 1e3)
    # a fused kernel: exactly max(flops / rate, bytes / bw); a pass: the sum over its phases
    fwd = CM.predict("triton-fused", gemma(), hw, logit_metrics="targets").fwd
    kernel = [p for p in fwd.phases if "lse_forward" in p.name]
    assert len(kernel) == 1 and len(fwd.phases) == 2  # the target-row gather, then the kernel
    k = kernel[0]
    assert k.ms(hw) == pytest.approx(max(k.flops / 500e12, k.hbm_bytes / 2e12) * 1e3, rel=1e-12)
    assert fwd.ms == pytest.approx(sum(q.ms(hw) for q in fwd.phases), rel=1e-12)
    # an unfused pass: the sum of each phase's max, never the max of the totals
    eager = CM.predict("eager", gemma(), hw).fwd_bwd
    assert eager.ms == pytest.approx(sum(q.ms(hw) for q in eager.phases), rel=1e-12)
    assert eager.ms > max(eager.flops / 500e12, eager.hbm_bytes / 2e12) * 1e3
    # atomics default to the HBM bandwidth; faster atomics shorten the triton backward
    slow = CM.predict("triton-fused", gemma()).bwd.ms
    fast = CM.predict("triton-fused", gemma(), CM.Hardware(atomic_tbps=12.0)).bwd.ms
    assert fast < slow
    assert CM.Hardware().atomic_bytes_per_s == 3.0e12


def test_l2_reread_rule():
    assert CM.reread_bytes(10.0, 5, footprint_bytes=50, l2_bytes=100) == 10.0
    assert CM.reread_bytes(10.0, 5, footprint_bytes=200, l2_bytes=100) == pytest.approx(10 * 5)
    assert CM.reread_bytes(10.0, 1, footprint_bytes=1e9, l2_bytes=0) == 10.0


def test_cli_lists_every_backend(capsys):
    text = CM.main(["--family", "gemma2-9b", "--tokens", "8192", "--target-frac", "0.5"])
    assert capsys.readouterr().out == text
    assert "predictions, not measurements" in text and "M=4096" in text
    for name in CM.BACKENDS:
        for p in CM.PASSES:
            assert f"| {name} | {p} |" in text, (name, p)
    floor_row = next(line for line in text.splitlines() if line.startswith("| floor | fwd_bwd |"))
    assert floor_row.split("|")[3].strip() == "45.1" and floor_row.rstrip(" |").endswith("1.00")
    summary = CM.main(["--family", "gemma2-9b", "--tokens", "8192", "--summary",
                       "--kernel-config", "bwd_block_n=128"])
    for name in CM.BACKENDS:
        assert f"| {name} |" in summary
    assert "logit_metrics 'exact', memory budget 8 GiB" in summary


def _row(text, first):
    return next(line for line in text.splitlines() if line.startswith(first))


def test_cli_logit_metrics_and_memory_budget(capsys):
    args = ["--backends", "triton-pairs,triton-vocab", "--summary"]
    exact, none = CM.main(args), CM.main(args + ["--logit-metrics", "none"])
    # pairs at f=0.5: fwd+bwd TFLOP 8MHV with the metric rows' forward, 6MHV without
    assert _row(exact, "| triton-pairs |").split("|")[5].strip() == "30.1"
    assert _row(none, "| triton-pairs |").split("|")[5].strip() == "22.5"
    small = CM.main(args + ["--memory-budget", str(2**20)])
    assert "1 vocabulary chunk(s)" in exact and "vocabulary chunk(s) of 128 columns" not in exact
    assert "memory budget 0.000976562 GiB" in small


def test_cli_tables(tmp_path):
    out = tmp_path / "t.md"
    text = CM.main(["--logit-metrics-table", "--schedules-table", "--out", str(out)])
    assert out.read_text() == text
    assert "target fraction 0.4 (M=3277 target rows, N-M=4915 metric-only rows)" in text
    for mode in CM.LOGIT_METRICS:
        assert f"| 30 | {mode} |" in text and f"| none | {mode} |" in text
    for sched in ("pairs", "vocab", "fused", "tokens"):
        assert f"| 30 | exact | {sched} | 9.0 |" in text  # 2 * 4915 * H * V = 9.0 TFLOP
        assert _row(text, f"| {sched} |").split("|")[3].strip() == "0.5"
    assert "| 30 | targets | all | 0 | 0.00 | 0.00 | 0% |" in text
    pairs = [line for line in text.splitlines() if line.startswith("| pairs |")]
    assert [line.split("|")[6].strip() for line in pairs] == ["1.33", "1.50"]  # x 6MHV at f=0.5, 0.4
    vocab = [line for line in text.splitlines() if line.startswith("| vocab |")]
    assert [line.split("|")[6].strip() for line in vocab] == ["1.67", "1.83"]
    assert "picks `pairs` here" in text
    md = CM.schedules_markdown()
    assert md.startswith("# Predicted cost") and "## Schedules" in md and "## `logit_metrics`" in md


@pytest.mark.parametrize("kw, match", [
    (dict(tokens=-8192), "tokens must be a positive integer, got -8192"),
    (dict(tokens=0), "tokens"),
    (dict(hidden=2.5), "hidden"),
    (dict(target_frac=1.5), r"target_frac must be a number in \[0, 1\], got 1.5"),
    (dict(target_frac=-0.1), "target_frac"),
    (dict(dtype_bytes=3), "dtype_bytes"),
])
def test_bad_shape_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        gemma(**kw)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"unknown backend 'cublas'.*eager"):
        CM.predict("cublas", gemma())
    with pytest.raises(ValueError, match="cce_filtered_frac"):
        CM.predict("cce", gemma(), cce_filtered_frac=1.2)
    with pytest.raises(ValueError, match="matmul_tflops"):
        CM.Hardware(matmul_tflops=0)
    with pytest.raises(ValueError, match="chunk_size"):
        CM.predict("torch", gemma(), torch_chunk=-4)
    with pytest.raises(ValueError, match="unknown family"):
        CM.shape_for_family("gpt-5", 8192)
    with pytest.raises(ValueError, match="unknown pass"):
        CM.predict("floor", gemma()).pass_cost("step")


@pytest.mark.parametrize("argv, reason", [
    (["--tokens", "-1"], "tokens must be a positive integer"),
    (["--target-frac", "2"], "target_frac"),
    (["--backends", "eager,nope"], "unknown backend 'nope'"),
    (["--memory-budget", "0"], "memory_budget must be a positive integer"),
    (["--logit-metrics", "all"], "invalid choice"),
])
def test_cli_bad_input_exits_with_the_reason(capsys, argv, reason):
    with pytest.raises(SystemExit):
        CM.main(argv)
    assert reason in capsys.readouterr().err


def test_target_fraction_uses_the_shifted_labels():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, 8, -100]])
    # shifted targets: row 0 -> [-100, 5, 6, pad], row 1 -> [7, 8, -100, pad]: 4 of 8 positions
    assert CM.target_fraction(labels) == 0.5


def test_prediction_fields_for_a_result_row():
    row = {"impl": "liger", "tokens": 8192, "seq": 2048, "hidden": H, "vocab": V, "softcap": None,
           "dtype": "bfloat16"}
    p = CM.prediction_fields(row, 0.67, matmul_tflops=700.0)
    assert p["pred_matmul_tflops"] == 700.0 and p["target_frac"] == 0.67
    assert 0 < p["pred_fwd_ms"] < p["pred_fwd_bwd_ms"]
    from benchmarks import cases as C

    for impl in C.IMPLS:  # every impl the benchmarks time has a model under its own name
        q = CM.prediction_fields({**row, "impl": impl, "softcap": 30.0}, 0.67)
        assert 0 < q["pred_fwd_ms"] < q["pred_fwd_bwd_ms"], impl
    with pytest.raises(ValueError, match="unknown backend"):
        CM.prediction_fields({**row, "impl": "wrong"}, 0.5)


def test_runner_and_report_show_predictions(tmp_path):
    from benchmarks.__main__ import main

    path = main(["--device", "cpu", "--families", "cpu-small", "--impls", "eager,torch",
                 "--no-plots", "--no-matmul", "--target-s", "0", "--out", str(tmp_path), "--commit", "t"])
    rows = json.loads(path.read_text())["cases"]
    assert {r["impl"] for r in rows} == {"eager", "torch"}
    for r in rows:
        assert r["pred_fwd_ms"] > 0 and r["pred_fwd_bwd_ms"] > r["pred_fwd_ms"], r
        assert 0.3 < r["target_frac"] < 1.0  # random prompts mask 1/8..1/2 of each row
        assert r["pred_matmul_tflops"] == CM.DEFAULT_MATMUL_TFLOPS  # CPU: the H100 default
    md = R.table(R.load([path]))
    assert "pred_fwd_bwd_ms" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| cpu-small | 256 | eager |"))
    assert math.isfinite(float(line.split("|")[-2]))  # measured / predicted


# ------------------------------------------------------------------------------------------ losses


def test_every_paired_loss_costs_simpos_flops_and_bytes():
    """The head sees per-sequence sums only: at equal logit_metrics every loss of the family (DPO with a
    precomputed reference included) has SimPO's FLOPs, HBM and atomic bytes and time, per backend."""
    names = CM.loss_names()
    assert {"simpo", "dpo", "rdpo", "cpo", "orpo", "rrhf", "slic"} <= set(names)
    s = gemma(target_frac=0.4)
    for backend in CM.BACKENDS:
        for mode in CM.LOGIT_METRICS:
            base = CM.predict(backend, s, logit_metrics=mode)
            for loss in names:
                c = CM.predict(backend, s, logit_metrics=mode, loss=loss)
                assert c.loss == loss and c.logit_metrics == mode
                assert c.reference == ("precomputed" if CM.loss_profile(loss).needs_reference else None)
                for p in CM.PASSES:
                    a, b = c.pass_cost(p), base.pass_cost(p)
                    assert (a.flops, a.hbm_bytes, a.atomic_bytes, a.ms) == (b.flops, b.hbm_bytes, b.atomic_bytes,
                                                                            b.ms), (backend, mode, loss, p)


def test_each_loss_defaults_to_its_official_logit_metrics():
    s = gemma(target_frac=0.4)
    M, O = s.target_rows, N - s.target_rows
    official = {name: CM.loss_profile(name).logit_metrics for name in CM.loss_names()}
    assert official == {"simpo": "exact", "dpo": "targets", "rdpo": "targets", "cpo": "exact", "orpo": "exact",
                        "rrhf": "exact", "slic": "exact"}
    assert [n for n in CM.loss_names() if CM.loss_profile(n).needs_reference] == ["dpo", "rdpo"]
    dpo, simpo = CM.predict("triton", s, loss="dpo"), CM.predict("triton", s)
    # DPO at the 9B head: the pairs schedule's 6MHV with no metric-only rows; SimPO adds their forward
    assert dpo.fwd_bwd.flops == 6.0 * M * H * V == CM.predict("triton", s, logit_metrics="targets").fwd_bwd.flops
    assert simpo.fwd_bwd.flops - dpo.fwd_bwd.flops == 2.0 * O * H * V
    assert dpo.bwd.flops == simpo.bwd.flops and dpo.bwd.hbm_bytes == simpo.bwd.hbm_bytes
    with pytest.raises(ValueError, match="unknown loss 'kto'"):
        CM.predict("triton", s, loss="kto")


@pytest.mark.parametrize("frac", [0.4, 1.0])
def test_precompute_is_a_forward_only_2mhv_pass(frac):
    """sequence_logps: the target rows' forward only (triton: the fused lse_forward kernel; torch:
    token chunks; eager: the [M, V] logits), 2MHV FLOPs, no backward; the floor is 2NHV."""
    s = gemma(target_frac=frac)
    M, b = s.target_rows, 2
    same = {"triton": "triton-fused", "torch": "torch", "cce": "cce"}  # the backends' own no-grad forwards
    for backend in ("torch", "triton", "cce", "eager"):
        c = CM.predict_precompute(backend, s)
        assert c.fwd.flops == 2.0 * M * H * V, backend  # the target rows' logits, nothing else
        assert c.bwd.flops == 0 and c.bwd.hbm_bytes == 0 and c.bwd.ms == 0 and c.fwd_bwd.ms == c.fwd.ms
        assert c.loss == "precompute" and c.backend == backend
        if backend in same:
            assert c.fwd.ms == CM.predict(same[backend], s, logit_metrics="none").fwd.ms, backend
    assert CM.predict_precompute("triton", s).fwd.atomic_bytes == 0
    floor = CM.predict_precompute("floor", s)
    assert floor.fwd.flops == 2.0 * N * H * V and floor.fwd.hbm_bytes == (N + V) * H * b
    if frac == 1.0:  # every position a target: the precompute pass is the 2NHV forward
        assert CM.predict_precompute("triton", s).fwd.flops == 2.0 * N * H * V == floor.fwd.flops
    # its memory: no logits for triton's fused kernel and CCE, one chunk for torch, [M, V] for eager
    assert CM.predict_precompute("triton", s).scratch_bytes == 0 == CM.predict_precompute("cce", s).scratch_bytes
    assert CM.predict_precompute("torch", s).scratch_bytes == CM.torch_chunk_size(s) * V * (8 + b)
    assert CM.predict_precompute("eager", s).scratch_bytes == (b + 8) * M * V
    # triton: W read once per raster group, far fewer bytes than the eager [M, V] passes
    assert CM.predict_precompute("triton", s).fwd.hbm_bytes < CM.predict_precompute("eager", s).fwd.hbm_bytes / 5
    for bad in ("liger", "triton-pairs"):
        with pytest.raises(ValueError, match=f"unknown precompute backend '{bad}'"):
            CM.predict_precompute(bad, s)


def test_in_step_reference_adds_the_heads_forward_to_every_step():
    s = gemma(target_frac=0.4)
    M = s.target_rows
    for backend, head_backend in (("triton", "triton"), ("triton-pairs", "triton"), ("triton-fused", "triton"),
                                  ("torch", "torch"), ("eager", "eager"), ("cce", "cce")):
        pre = CM.predict(backend, s, loss="dpo")
        inst = CM.predict(backend, s, loss="dpo", reference="in-step")
        head = CM.predict_precompute(head_backend, s)
        assert inst.reference == "in-step" and pre.reference == "precomputed"
        assert inst.fwd_bwd.flops - pre.fwd_bwd.flops == head.fwd.flops
        assert inst.fwd.ms == pytest.approx(pre.fwd.ms + head.fwd.ms, rel=1e-12)
        assert inst.bwd.phases == pre.bwd.phases  # no gradient through the reference
    assert CM.predict("triton", s, loss="dpo", reference="in-step").fwd_bwd.flops == 8.0 * M * H * V
    with pytest.raises(ValueError, match="takes no reference model"):
        CM.predict("triton", s, reference="in-step")
    with pytest.raises(ValueError, match="reference must be one of"):
        CM.predict("triton", s, loss="dpo", reference="frozen")
    with pytest.raises(ValueError, match="liger has no precompute pass"):
        CM.predict("liger", s, loss="dpo", reference="in-step")


def test_losses_table_predicts_each_loss_at_the_9b_head(capsys):
    text = CM.main(["--family", "gemma2-9b", "--tokens", "8192", "--losses-table"])
    assert capsys.readouterr().out == text
    assert "predictions, not measurements" in text and "target fraction 0.4 (M=3277)" in text
    rows = {(r[1], r[2], r[3]): r for r in (line.split("|") for line in text.splitlines()
                                           if line.startswith("| triton |") or line.startswith("| eager |"))
            if len(r) > 10}
    cell = lambda backend, loss, ref, col: rows[(f" {backend} ", f" {loss} ", f" {ref} ")][col].strip()  # noqa: E731
    for loss in CM.loss_names():
        ref = "precomputed" if CM.loss_profile(loss).needs_reference else "none"
        # fwd+bwd ms at logit_metrics="exact" is the same for every loss (the last column)
        assert cell("triton", loss, ref, 11) == cell("triton", "simpo", "none", 11)
    # TFLOP: SimPO exact 6MHV + 2(N-M)HV = 27.1; DPO targets 6MHV = 18.0; in-step + 2MHV = 24.1
    assert cell("triton", "simpo", "none", 8) == "27.1" and cell("triton", "dpo", "precomputed", 8) == "18.0"
    assert cell("triton", "dpo", "in-step", 8) == "24.1" and cell("triton", "rdpo", "in-step", 8) == "24.1"
    assert cell("triton", "dpo", "precomputed", 5) == "targets" and cell("triton", "cpo", "none", 4) == "yes (1)"
    pre = next(line for line in text.splitlines() if line.startswith("| triton | reference precompute"))
    assert pre.split("|")[8].strip() == "6.0"  # 2MHV
    assert "| eager | dpo | precomputed |" in text
    # the committed table is this output (regenerate with the command in its header)
    from pathlib import Path

    committed = Path(__file__).resolve().parent / "results" / "losses_predicted.md"
    assert committed.read_text() == text == CM.losses_markdown()


def test_cli_loss_reference_and_precompute(capsys):
    dpo = CM.main(["--loss", "dpo", "--summary", "--target-frac", "0.4"])
    assert "loss 'dpo', reference precomputed; logit_metrics 'targets'" in dpo
    assert _row(dpo, "| triton |").split("|")[5].strip() == "18.0"
    inst = CM.main(["--loss", "dpo", "--reference", "in-step", "--summary", "--target-frac", "0.4"])
    assert "| liger |" not in inst and _row(inst, "| triton |").split("|")[5].strip() == "24.1"
    pre = CM.main(["--precompute", "--summary", "--target-frac", "0.4"])
    assert "the reference precompute pass" in pre and "| liger |" not in pre
    assert _row(pre, "| floor |").split("|")[5].strip() == "15.0"  # 2NHV
    assert _row(pre, "| triton |").split("|")[5].strip() == "6.0"  # 2MHV
    assert _row(pre, "| eager |").split("|")[5].strip() == "6.0"  # target rows only, as sequence_logps
    capsys.readouterr()
    with pytest.raises(SystemExit):
        CM.main(["--loss", "simpo", "--reference", "in-step"])
    assert "takes no reference model" in capsys.readouterr().err


def test_prediction_fields_follow_the_rows_loss():
    row = {"impl": "triton", "tokens": N, "seq": 2048, "hidden": H, "vocab": V, "softcap": 30.0, "dtype": "bfloat16"}
    simpo = CM.prediction_fields(row, 0.4)
    dpo = CM.prediction_fields({**row, "loss": "dpo"}, 0.4)
    assert dpo["pred_fwd_bwd_ms"] < simpo["pred_fwd_bwd_ms"]  # official "targets": no metric-only rows
    assert dpo["pred_fwd_bwd_ms"] == CM.predict("triton", gemma(target_frac=0.4), logit_metrics="targets").fwd_bwd.ms
    pre = CM.prediction_fields({**row, "loss": "precompute"}, 0.4)
    assert pre["pred_fwd_bwd_ms"] is None and pre["pred_fwd_tflop"] == pytest.approx(2 * 3277 * H * V / 1e12)
    assert pre["pred_fwd_ms"] == CM.predict_precompute("triton", gemma(target_frac=0.4)).fwd.ms
