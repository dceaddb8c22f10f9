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
def test_triton_flops_by_construction(frac):
    s = gemma(target_frac=frac)
    M = round(frac * N)
    c = CM.predict("triton", s)
    assert c.fwd.flops == 2.0 * N * H * V  # every position: the metrics need all logit sums
    assert c.bwd.flops == 3 * 2.0 * M * H * V  # recompute + dH + dW on target rows only
    assert c.fwd_bwd.flops == 2.0 * N * H * V + 2.0 * M * H * V * 3


def test_floor_is_6nhv_with_fewest_bytes():
    c = CM.predict("floor", gemma())
    assert c.fwd.flops == 2.0 * N * H * V and c.fwd_bwd.flops == 6.0 * N * H * V
    assert c.fwd_bwd.hbm_bytes == 2 * (N + V) * H * 2 and c.fwd_bwd.atomic_bytes == 0
    assert abs(c.fwd_bwd.ms - 6.0 * N * H * V / 798e12 * 1e3) < 1e-9  # matmul-bound
    assert abs(c.fwd_bwd.flops / 1e12 - 45.1) < 0.05  # benchmarks/NOTES.md


def test_triton_atomic_bytes_follow_the_formula():
    s = gemma()
    M = s.target_rows
    cfg = CM.default_kernel_config()  # the defaults as they are now (being retuned)
    got = CM.predict("triton", s).bwd.atomic_bytes
    assert got == pytest.approx(M * H * V * (1 / cfg.bwd_block_v + 1 / cfg.bwd_block_n) * 4, rel=1e-12)
    assert CM.predict("triton", s).fwd.atomic_bytes == 0
    other = replace(cfg, bwd_block_n=128, bwd_block_v=64)
    got = CM.predict("triton", s, kernel_config=other).bwd.atomic_bytes
    assert got == pytest.approx(M * H * V * (1 / 64 + 1 / 128) * 4, rel=1e-12)


def test_the_cost_model_reads_kernel_config_at_call_time(monkeypatch):
    import simpo_kernels.kernels as K

    base = K.KernelConfig()
    monkeypatch.setattr(K, "KernelConfig", lambda: replace(base, bwd_block_n=256, bwd_block_v=256))
    got = CM.predict("triton", gemma()).bwd.atomic_bytes
    assert got == pytest.approx(4096 * H * V * (2 / 256) * 4, rel=1e-12)


def test_bytes_scale():
    # eager: every [N, V] pass is linear in N, the weight traffic is fixed: bytes are affine in N
    b1, b2, b3 = (CM.predict("eager", gemma(tokens=n)).fwd_bwd.hbm_bytes for n in (2048, 4096, 6144))
    assert b2 - b1 == pytest.approx(b3 - b2, rel=1e-12) and b2 - b1 > 0
    # torch: each chunk of C tokens reads all of W once and moves 56 bytes per float32 logit
    C = 128
    s = gemma(tokens=4 * C)
    W = V * H * 2
    per_chunk = W + C * H * 2 + C * V * 4 + (24 + 24 + 4) * C * V
    assert CM.predict("torch", s, torch_chunk=C).fwd.hbm_bytes == pytest.approx(4 * per_chunk, rel=1e-12)
    nocap = replace(s, softcap=False)
    assert CM.predict("torch", s, torch_chunk=C).fwd.hbm_bytes - CM.predict(
        "torch", nocap, torch_chunk=C).fwd.hbm_bytes == pytest.approx(4 * 24 * C * V, rel=1e-12)
    # liger computes every position; triton's atomics and cce's work follow the target rows
    lig = [CM.predict("liger", gemma(target_frac=f)).fwd_bwd for f in (0.25, 1.0)]
    assert lig[0].hbm_bytes == lig[1].hbm_bytes and lig[0].flops == lig[1].flops
    at = [CM.predict("triton", gemma(target_frac=f)).bwd.atomic_bytes for f in (0.25, 0.5)]
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
    # a fused single-kernel pass: exactly max(flops / rate, bytes / bw)
    fwd = CM.predict("triton", gemma(), hw).fwd
    assert len(fwd.phases) == 1
    assert fwd.ms == pytest.approx(max(fwd.flops / 500e12, fwd.hbm_bytes / 2e12) * 1e3, rel=1e-12)
    # an unfused pass: the sum of each phase's max, never the max of the totals
    eager = CM.predict("eager", gemma(), hw).fwd_bwd
    assert eager.ms == pytest.approx(sum(q.ms(hw) for q in eager.phases), rel=1e-12)
    assert eager.ms > max(eager.flops / 500e12, eager.hbm_bytes / 2e12) * 1e3
    # atomics default to the HBM bandwidth; faster atomics shorten the triton backward
    slow = CM.predict("triton", gemma()).bwd.ms
    fast = CM.predict("triton", gemma(), CM.Hardware(atomic_tbps=12.0)).bwd.ms
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


def test_cli_bad_input_exits_with_the_reason(capsys):
    with pytest.raises(SystemExit):
        CM.main(["--tokens", "-1"])
    assert "tokens must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        CM.main(["--target-frac", "2"])
    assert "target_frac" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        CM.main(["--backends", "eager,nope"])
    assert "unknown backend 'nope'" in capsys.readouterr().err


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
