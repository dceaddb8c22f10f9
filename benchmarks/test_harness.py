"""Tests of the benchmark machinery itself (CPU): the check catches wrong answers, OOM is a
result, the GPU-side float32 reference agrees with float64, the runner writes its JSON schema and
plots end to end, and the end-to-end training step and its batch search run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import cases as C
from benchmarks import e2e as E
from benchmarks import measure as M
from benchmarks import report as R

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def small_ctx():
    case = C.make_case(C.FAMILIES["cpu-small"], 256)
    ctx = M.CaseContext(case, CPU)
    yield ctx
    ctx.close()


def test_inputs_are_random_masked_and_valid(small_ctx):
    h, w, lab = small_ctx.hidden, small_ctx.weight, small_ctx.labels
    case = small_ctx.case
    assert h.shape == (case.rows, case.seq, case.hidden) and w.shape == (case.vocab, case.hidden)
    assert case.rows % 2 == 0 and case.rows * case.seq == case.tokens
    assert h.dtype == torch.bfloat16 and (h != 0).float().mean() > 0.99
    assert ((lab == C.IGNORE_INDEX).sum(1) > 0).all()  # prompts are masked
    assert ((lab[:, 1:] != C.IGNORE_INDEX).sum(1) > 0).all()  # every row has targets


def test_gpu_shapes():
    case = C.make_case(C.FAMILIES["gemma2-9b"], 2048)
    assert (case.rows, case.seq) == (2, 1024)
    case = C.make_case(C.FAMILIES["gemma2-9b"], 32768)
    assert (case.rows, case.seq) == (16, 2048)
    assert abs(C.make_case(C.FAMILIES["gemma2-9b"], 8192).flops_fwd_bwd() / 1e12 - 45.1) < 0.1
    assert C.FAMILIES["llama3-8b"].softcap is None and C.FAMILIES["llama3-8b"].vocab == 128256
    assert len(C.cases_for(C.GPU_FAMILIES)) == 16  # 5 token counts each, 65536 at gemma2-9b
    assert (C.make_case(C.FAMILIES["gemma2-9b"], 65536).rows, C.cases_for(["gemma2-2b"], [65536])) == (32, [])
    # CPU smoke: SimPO (cpu-small, -nocap, the interpreter's), DPO (cpu-small-dpo, the interpreter's tiny one)
    assert [c.tokens for c in C.cases_for(C.CPU_FAMILIES)] == [256, 256, 64, 256, 32]
    assert [C.FAMILIES[f].loss for f in C.CPU_FAMILIES] == ["simpo"] * 3 + ["dpo"] * 2
    dpo = C.make_case(C.FAMILIES["gemma2-9b-uf-dpo"], 8192)
    assert (dpo.hidden, dpo.vocab, dpo.softcap, dpo.layout, dpo.loss, dpo.beta) == (3584, 256000, 30.0, "ultrafeedback",
                                                                                 "dpo", 0.01)
    assert dpo.needs_reference and not C.make_case(C.FAMILIES["gemma2-9b-uf"], 8192).needs_reference
    with pytest.raises(ValueError, match="no precomputed reference"):
        C.Family("x", 8, 16, None, "float32", (8,), 4, loss="dpo")  # every impl, Liger's DPO included
    with pytest.raises(ValueError, match="unknown loss"):
        C.Family("x", 8, 16, None, "float32", (8,), 4, impls=("eager",), loss="kto")


def _wrong(scale_grad):
    """An impl whose loss is right but whose gradient is scaled: must be caught."""
    from simpo_kernels import simpo_loss

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * scale_grad

    def fn(h, w, lab):
        out = simpo_loss(Scale.apply(h), w, lab, beta=C.BETA, gamma_beta_ratio=C.GAMMA_BETA_RATIO,
                         softcap=30.0, backend="torch")
        return out.loss, torch.cat([out.chosen_logps, out.rejected_logps])

    return C.Impl("wrong", fn, 30.0)


def test_check_catches_a_wrong_gradient(small_ctx):
    row = M.measure(_wrong(1.05), small_ctx)
    assert row["status"].startswith("mismatch:") and "dhidden" in row["status"]
    assert row["fwd_ms"] is None and row["fwd_bwd_ms"] is None  # never timed
    assert M.measure(_wrong(1.0), small_ctx, timing=False)["status"] == "ok"


def test_oom_is_a_result(small_ctx):
    def boom(h, w, lab):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    row = M.measure(C.Impl("boom", boom, 30.0), small_ctx)
    assert row["status"] == "oom" and row["oom_phase"] == "check"


def test_runner_records_impl_errors(small_ctx, monkeypatch):
    def broken(h, w, lab):
        raise RuntimeError("triton compile failed")

    monkeypatch.setattr(C, "build_impl", lambda name, case, dev, ref_logps=None: C.Impl(name, broken, 30.0))
    row = M.run_impl("triton", small_ctx)
    assert row["status"].startswith("error:RuntimeError: triton compile failed")
    with pytest.raises(RuntimeError):
        M.run_impl("triton", small_ctx, catch_errors=False)


def test_missing_peer_is_skipped_with_reason(small_ctx, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "liger_kernel.chunked_loss", None)
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)
    for name in ("liger", "cce", "cce-nofilter"):
        row = M.run_impl(name, small_ctx)
        assert row["status"].startswith("skipped:") and "not installed" in row["status"], row


def test_triton_impl_wiring_under_the_interpreter(monkeypatch):
    """With TRITON_INTERPRET=1 and an importable ``simpo_kernels.kernels`` the ``triton-fused`` impl
    runs at the cpu-interp shape (here a stand-in module delegating to the chunked backend, so the
    wiring of the benchmark machinery is tested apart from the kernels; the real kernels run in
    :func:`test_triton_impls_in_the_interpreter`)."""
    import sys
    import types

    from simpo_kernels import chunked

    fake = types.ModuleType("simpo_kernels.kernels")
    fake.token_logprobs = lambda h, w, b, t, *, softcap, ignore_index, **kw: chunked.token_logprobs(
        h, w, b, t, softcap=softcap, ignore_index=ignore_index)
    fake.check_dtype = chunked.check_dtype
    fake.make_config = lambda device, dtype, options: None  # the row kernels' config (unused by fused)
    fake.row_kernels = types.ModuleType("simpo_kernels.kernels.row_kernels")
    fake.BACKEND = "triton"
    fake.interpreter_problem = lambda: None  # the stand-in runs wherever the chunked backend does
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "simpo_kernels.kernels", fake)
    ctx = M.CaseContext(C.make_case(C.FAMILIES["cpu-interp"], 64), CPU)
    row = M.run_impl("triton-fused", ctx, target_s=0.0, min_reps=1, max_reps=1)
    assert row["status"] == "ok" and row["reference"] == "float64", row
    assert row["impl"] == "triton-fused" and row["errors"]["dweight"] < 1e-3
    for name in ("triton", *C.TRITON_SCHEDULE_IMPLS):
        with pytest.raises(C.Unavailable, match="only at CPU smoke shapes"):
            C.build_impl(name, C.make_case(C.FAMILIES["gemma2-9b"], 2048), CPU)
    monkeypatch.delenv("TRITON_INTERPRET")
    for name in ("triton", *C.TRITON_SCHEDULE_IMPLS):
        assert M.run_impl(name, ctx)["status"].startswith("skipped:triton backend needs CUDA"), name


def test_triton_impls_in_the_interpreter():
    """Every triton impl (``schedule="auto"`` and each schedule pinned) checks out against float64 at
    the cpu-interp shape with the real kernels in the Triton interpreter. A subprocess: the
    interpreter must be chosen before ``simpo_kernels.kernels`` is first imported."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import json, torch\n"
        "from simpo_kernels.kernels.launch import interpreter_problem\n"
        "from benchmarks import cases as C, measure as M\n"
        "problem = interpreter_problem()\n"
        "rows = {}\n"
        "if problem is None:\n"
        "    ctx = M.CaseContext(C.make_case(C.FAMILIES['cpu-interp'], 64), torch.device('cpu'))\n"
        "    for name in ('triton', *C.TRITON_SCHEDULE_IMPLS):\n"
        "        r = M.run_impl(name, ctx, timing=False)\n"
        "        rows[name] = [r['status'], r['errors']]\n"
        "print(json.dumps({'problem': problem, 'rows': rows}))\n")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["problem"]:
        pytest.skip(f"the Triton interpreter cannot run the kernels here: {out['problem']}")
    assert set(out["rows"]) == {"triton", *C.TRITON_SCHEDULE_IMPLS}
    for name, (status, errors) in out["rows"].items():
        assert status == "ok", (name, status, errors)
        assert errors["dweight"] < 1e-3 and errors["dhidden"] < 1e-3, (name, errors)


def test_float32_reference_matches_float64(small_ctx):
    """The reference used on CUDA (float32 eager / chunked torch) agrees with float64."""
    ref64 = small_ctx.reference(30.0)
    assert ref64["kind"] == "float64"
    args = (small_ctx.case, small_ctx.hidden, small_ctx.weight, small_ctx.labels, 30.0)
    for backend in ("eager", "torch"):
        ref32 = M._float32_reference(backend, *args)
        assert ref32["kind"] == f"float32-{backend}"
        for k in ("loss", "logps", "dh", "dw"):
            assert M.rel_err(ref32[k], ref64[k]) < 1e-5, (backend, k)
    # DPO: preference_loss on float32 copies against the float64 DPO reference
    ctx = M.CaseContext(C.make_case(C.FAMILIES["cpu-small-dpo"], 256), CPU)
    ref64 = ctx.reference(30.0)
    for backend in ("eager", "torch"):
        ref32 = M._float32_reference(backend, ctx.case, ctx.hidden, ctx.weight, ctx.labels, 30.0, ctx.ref_logps)
        for k in ("loss", "logps", "dh", "dw"):
            assert M.rel_err(ref32[k], ref64[k]) < 1e-5, ("dpo", backend, k)
    ctx.close()


def test_rel_err_chunked_and_nonfinite():
    a = torch.randn(1000)
    b = a + 1e-3 * torch.randn(1000)
    assert abs(M.rel_err(a, b, chunk=7) - M.rel_err(a, b)) < 1e-12
    a[3] = float("nan")
    assert M.rel_err(a, b) == float("inf")


def test_peers_wired_like_the_official_objective(small_ctx):
    """Liger (no softcap) and CCE agree with float64 on the no-softcap and softcap cases."""
    for fam in ("cpu-small", "cpu-small-nocap"):
        ctx = M.CaseContext(C.make_case(C.FAMILIES[fam], 256), CPU)
        for name in ("liger", "cce", "cce-nofilter"):
            try:
                impl = C.build_impl(name, ctx.case, CPU)
            except C.Unavailable as exc:
                pytest.skip(str(exc))
            res = M.check(impl, ctx)
            assert res["ok"], (fam, name, res)
            if name == "liger" and ctx.case.softcap is not None:
                assert impl.softcap is None and "softcap_unsupported" in impl.notes
        ctx.close()


def _full_logits_dpo(hidden, weight, labels, softcap, ref_chosen, ref_rejected, beta):
    """DPO in float64 from the full ``[2B, T, V]`` logits, written from the formula in the test (the
    shift, the softcap, ``log_softmax``, per-row sums, ``-logsigmoid(beta * d)``): loss, sums, dH, dW."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    z = h @ w.t()
    z = softcap * torch.tanh(z / softcap)
    logp = z[:, :-1].log_softmax(-1)
    y = labels[:, 1:]
    mask = y != C.IGNORE_INDEX
    tok = logp.gather(-1, y.clamp_min(0)[..., None]).squeeze(-1) * mask
    sums = tok.sum(-1)
    B = sums.shape[0] // 2
    d = (sums[:B] - ref_chosen.double()) - (sums[B:] - ref_rejected.double())
    loss = torch.nn.functional.softplus(-beta * d).mean()  # -logsigmoid(x) = softplus(-x)
    dh, dw = torch.autograd.grad(loss, (h, w))
    return loss.detach(), sums.detach(), mask.sum(-1), dh, dw


def test_float64_dpo_reference_matches_the_full_logits_formula():
    """The chunked float64 DPO reference (and the per-row sums the precompute rows are checked
    against) equals DPO written from the full float64 logits; the reference values make a
    non-trivial, unsaturated loss."""
    ctx = M.CaseContext(C.make_case(C.FAMILIES["cpu-small-dpo"], 256), CPU)
    case = ctx.case
    rc, rr = ctx.ref_logps
    B = case.rows // 2
    assert rc.shape == rr.shape == (B,) and rc.dtype == rr.dtype == torch.float32
    loss, sums, counts, dh, dw = _full_logits_dpo(ctx.hidden, ctx.weight, ctx.labels, 30.0, rc, rr, case.beta)
    ref = ctx.reference(30.0)
    assert ref["kind"] == "float64"
    assert M.rel_err(ref["loss"].reshape(1), loss.reshape(1)) < 1e-12
    assert M.rel_err(ref["logps"], sums) < 1e-12  # DPO's log-probs are the per-row sums
    assert M.rel_err(ref["dh"], dh) < 1e-10 and M.rel_err(ref["dw"], dw) < 1e-10
    s64, n64 = ctx.float64_sums(30.0)
    assert M.rel_err(s64, sums) < 1e-12 and torch.equal(n64.long(), counts)
    # the reference values: the sums moved by N(0, 1)/beta, so beta * d is O(1) for every pair
    u = case.beta * ((sums[:B] - rc.double()) - (sums[B:] - rr.double()))
    assert 0.05 < u.abs().max() < 10 and u.abs().min() > 0
    assert abs(loss.item() - math.log(2)) > 1e-3 and 0.1 < loss.item() < 3
    # made once per case, the same for the same seed
    again = M.CaseContext(case, CPU)
    assert torch.equal(again.ref_logps[0], rc) and torch.equal(again.ref_logps[1], rr)
    again.close()
    # the no-softcap reference (for the peers without one) uses the same reference values
    ref_nc = ctx.reference(None)
    _, sums_nc, _, dh_nc, _ = _full_logits_dpo(ctx.hidden, ctx.weight, ctx.labels, 1e30, rc, rr, case.beta)
    assert M.rel_err(ref_nc["logps"], sums_nc) < 1e-10 and M.rel_err(ref_nc["dh"], dh_nc) < 1e-8
    ctx.close()
    with pytest.raises(ValueError, match="needs ref_logps"):
        C.build_impl("cce", case, CPU)
    with pytest.raises(ValueError, match="takes no reference"):
        C.build_impl("cce", C.make_case(C.FAMILIES["cpu-small"], 256), CPU, ref_logps=(rc, rr))


def test_dpo_peers_check_out_against_float64():
    """CCE (its torch fallback here) and PyTorch's linear_cross_entropy (no softcap) with the DPO head
    on the precomputed reference agree with the float64 DPO reference."""
    ctx = M.CaseContext(C.make_case(C.FAMILIES["cpu-small-dpo"], 256), CPU)
    checked = 0
    for name in ("cce", "cce-nofilter", "torch-lce"):
        try:
            impl = C.build_impl(name, ctx.case, CPU, ref_logps=ctx.ref_logps)
        except C.Unavailable:
            continue
        res = M.check(impl, ctx)
        assert res["ok"] and res["reference"] == "float64", (name, res)
        checked += 1
    assert checked >= 2  # CCE is installed wherever the benchmarks run
    # the check can fail: other reference values (one chosen sum moved by 1/beta) change loss and gradients
    rc, rr = ctx.ref_logps
    moved = rc.clone()
    moved[0] += 1.0 / ctx.case.beta
    res = M.check(C.build_impl("cce-nofilter", ctx.case, CPU, ref_logps=(moved, rr)), ctx)
    assert not res["ok"] and "loss" in res["detail"] and "dhidden" in res["detail"], res
    ctx.close()


def test_precompute_check_catches_wrong_sums_and_counts():
    """The precompute rows' check: float32 sums within the dtype's tolerance of float64 and exact
    counts pass; sums off by 2%, a count off by one, or float64 output for bf16 inputs fail."""
    ctx = M.CaseContext(C.make_case(C.FAMILIES["cpu-small"], 256), CPU)
    s64, n64 = ctx.float64_sums(30.0)

    def impl(scale=1.0, dn=0, dtype=torch.float32):
        def fn(h, w, lab):
            n = n64.long().clone()
            n[0] += dn
            return (s64 * scale).to(dtype), n
        return C.Impl("x", fn, 30.0)

    assert M.check_precompute(impl(), ctx)["ok"]
    assert M.check_precompute(impl(1.0 + 1e-3), ctx)["ok"]  # bf16 tolerance 1e-2
    bad = M.check_precompute(impl(1.02), ctx)
    assert not bad["ok"] and "sums" in bad["detail"] and abs(bad["errors"]["sums"] - 0.02) < 1e-6
    bad = M.check_precompute(impl(dn=1), ctx)
    assert not bad["ok"] and bad["errors"]["counts"] == 1 and "counts differ in 1 rows" in bad["detail"]
    assert "dtypes" in M.check_precompute(impl(dtype=torch.float64), ctx)["detail"]
    row = M.measure_precompute(impl(1.02), ctx)
    assert row["status"].startswith("mismatch:") and row["fwd_ms"] is None  # never timed
    row = M.measure_precompute(impl(), ctx, target_s=0.0, min_reps=1, max_reps=1)
    assert row["status"] == "ok" and row["fwd_ms"] > 0 and row["errors"]["counts"] == 0
    ctx.close()


def test_runner_end_to_end(tmp_path):
    from benchmarks.__main__ import main

    path = main(["--device", "cpu", "--quick", "--out", str(tmp_path),
                 "--families", "cpu-small,cpu-interp",
                 "--impls", "eager,torch,triton", "--e2e", "--commit", "test"])
    data = json.loads(path.read_text())
    for key in ("device", "torch", "triton", "commit", "date", "matmul_bf16_tflops", "cases"):
        assert key in data
    assert data["commit"] == "test" and data["device_type"] == "cpu"
    assert data["matmul_bf16_tflops"] > 0
    fields = {"impl", "tokens", "hidden", "vocab", "softcap", "dtype", "fwd_ms", "fwd_bwd_ms",
              "peak_mem_mib", "status"}
    for row in data["cases"]:
        assert fields <= set(row), row
        assert row["status"] == "ok" or row["status"].startswith(("skipped:", "oom", "mismatch:"))
    ok = [r for r in data["cases"] if r["status"] == "ok"]
    assert {r["impl"] for r in ok} >= {"eager", "torch"}
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in ok)
    assert any(r["impl"] == "triton" for r in data["cases"])  # present: ok or skipped with reason
    assert [p["status"] for p in data["e2e"]["paths"]] == ["ok", "ok"]
    for fam in ("cpu-small", "cpu-interp"):
        png = tmp_path / f"{path.stem}-{fam}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / f"{path.stem}.md").read_text()
    assert "| eager |" in md and "CPU smoke run" in md and "End to end" in md
    # report merges several files
    md2 = R.render([path, path], tmp_path / "merged", stem="merged")
    assert md2.count("### cpu-small ") == 1


def test_largest_batch_search(monkeypatch):
    fits = {"n": 11}
    monkeypatch.setattr(E, "try_step", lambda model, opt, cfg, p, seq, path, dev: p <= fits["n"])
    r = E.largest_batch(None, None, None, 8, "x", CPU, max_pairs=32)
    assert r["max_pairs"] == 11 and not r["capped"]
    fits["n"] = 100
    r = E.largest_batch(None, None, None, 8, "x", CPU, max_pairs=24)
    assert r["max_pairs"] == 24 and r["capped"]
    fits["n"] = 0
    assert E.largest_batch(None, None, None, 8, "x", CPU, max_pairs=4)["max_pairs"] == 0


def test_e2e_tiny_step_matches_paths():
    """The tiny Gemma-2 step runs through both loss paths and they give the same loss."""
    cfg = E.gemma2_2b_config(tiny=True)
    model = E.build_model(cfg, CPU)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = E.make_batch(cfg, 2, 32, CPU)
    with torch.no_grad():
        a = E.loss_of(model, batch, "eager").item()
        b = E.loss_of(model, batch, "torch").item()
    assert abs(a - b) < 2e-2 * max(1.0, abs(a))


def test_e2e_path_layouts_parse():
    assert E.layout_of("triton-fused-packed") == ("triton-fused", "packed")
    assert E.layout_of("torch-uf") == ("torch", "uf") and E.layout_of("triton-fused") == ("triton-fused", "full")
    assert E.split_path("triton-fused-packed") == ("triton", "fused") and E.split_path("torch-uf") == ("torch", "auto")
    for bad in ("eager-packed", "eager-uf"):
        with pytest.raises(ValueError, match="no .* layout"):
            E.split_path(bad)
    with pytest.raises(ValueError, match="unknown e2e path"):
        E.split_path("cuda-packed")


def test_e2e_packed_step_gives_the_padded_steps_loss():
    """The tiny Gemma-2 in float64: UltraFeedback-like pairs of unequal lengths, padded (official
    collator layout, attention_mask) and packed (position_ids, sequence_ids, fewer tokens), give the
    same loss and gradients; the packed path's measured step counts its tokens."""
    cfg = E.gemma2_2b_config(tiny=True)
    model = E.build_model(cfg, CPU, dtype=torch.float64)
    padded, packed = E.make_uf_batches(cfg, 4, 256, CPU, seed=2)
    lengths = padded[1].sum(1).tolist()
    assert len(set(lengths)) > 2  # unequal lengths, or packing would save nothing
    (tok_pad, real_pad), (tok_pk, real_pk) = E.batch_tokens(padded), E.batch_tokens(packed)
    assert real_pad == real_pk == sum(lengths) and tok_pk < tok_pad
    assert sorted(packed["sequence_ids"][packed["sequence_ids"] >= 0].unique().tolist()) == list(range(8))
    grads = []
    for batch, path in ((padded, "torch-uf"), (packed, "torch-packed")):
        model.zero_grad(set_to_none=True)
        loss = E.loss_of(model, batch, path)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert abs(grads[0][0] - grads[1][0]) < 1e-12 * abs(grads[0][0])
    # transformers' Gemma-2 RMSNorm computes in float32 even for float64 inputs: its weights'
    # gradients agree to float32 rounding (summed over positions in another order), the rest to 1e-9
    for a, b in zip(grads[0][1], grads[1][1]):
        assert (a - b).abs().max() <= 1e-6 * max(1.0, a.abs().max().item())
    opt = torch.optim.AdamW(model.parameters(), lr=8e-7)
    r = E.measure_step(model, opt, cfg, "torch-packed", pairs=4, seq=256, device=CPU, steps=1, seed=2)
    assert (r["tokens"], r["real_tokens"]) == (tok_pk, real_pk)
    assert r["first_loss"] == pytest.approx(grads[1][0], rel=1e-12)
    assert r["tokens_per_s"] == pytest.approx(real_pk / (r["step_ms"] * 1e-3))
