"""The campaign's ``bench`` call (``benchmarks/campaign/bench.py``) on CPU: its dry run end to end
(every planned (case, impl) checked, timed and predicted; the realistic batch's target fraction;
bench.md and the plots), its deadline guard, its plan and predictions, and the pieces it added to
the runner (the ``ultrafeedback`` layout, ``cce-nofilter``, campaign JSON in the report)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import cases as C
from benchmarks import measure as M
from benchmarks import report as R
from benchmarks.campaign import bench as B

ROOT = Path(__file__).resolve().parent.parent
CAMPAIGN = ROOT / "benchmarks" / "campaign"

def _dry_run(out: Path, *extra: str) -> tuple[dict, str]:
    args = ["--dry-run", "--out", str(out), *extra]
    cmd = [sys.executable, "-m", "benchmarks.campaign", "bench", *args]
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "bench.json").read_text()), proc.stdout


def _interpreter_problem():
    script = ("from simpo_kernels.kernels.launch import interpreter_problem\n"
              "print(interpreter_problem() or '')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, TRITON_INTERPRET="1"), timeout=300)
    return proc.stdout.strip() or None if proc.returncode == 0 else f"import failed: {proc.stderr[-300:]}"


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-dry")
    data, stdout = _dry_run(out)
    return out, data, stdout


def test_dry_run_measures_every_planned_case(dry):
    out, data, stdout = dry
    assert data["call"] == "bench" and data["dry_run"] is True and data["env"]["device_type"] == "cpu"
    matmul = [s for s in data["steps"] if s["kind"] == "matmul"]
    assert [s["status"] for s in matmul] == ["ok"] and data["matmul_bf16_tflops"] > 0
    plan = B.plan_cases(dry_run=True)
    planned = {(case.id, impl) for case, impls in plan for impl in impls}
    rows = [s for s in data["steps"] if s["kind"] == "case"]
    assert {(r["case"], r["impl"]) for r in rows} == planned and len(rows) == len(planned)
    assert {r["family"] for r in rows} == {"cpu-small", "cpu-small-nocap", "cpu-small-uf", "cpu-interp-tiny"}
    assert {r["impl"] for r in rows} == set(C.ALL_IMPLS)
    inputs = [s for s in data["steps"] if s["kind"] == "inputs"]
    assert [s["case"] for s in inputs] == [case.id for case, _ in plan]
    assert all(s["status"] == "ok" and s["reference"] == "float64" for s in inputs), inputs
    problem = None
    for r in rows:
        # predictions beside every row, measured or not
        assert r["pred_fwd_ms"] > 0 and r["pred_fwd_bwd_ms"] > r["pred_fwd_ms"], r
        assert r["predicted_s"] > 0 and r["wall_s"] >= 0, r
        if r["status"] != "ok":
            # only a stated skip: the interpreter missing, a peer not installed
            assert r["status"].startswith("skipped:") and len(r["status"]) > len("skipped:") + 3, r
            assert r["impl"] in ("liger", "cce", "cce-nofilter") or r["impl"].startswith("triton"), r
            if r["impl"].startswith("triton"):
                problem = problem or _interpreter_problem()
                assert problem, f"triton skipped although the interpreter works: {r['status']}"
            continue
        tol_val, tol_grad = M.TOLERANCES[r["dtype"]]
        tol = {"loss": tol_val, "logps": tol_val, "dhidden": tol_grad, "dweight": tol_grad}
        assert set(r["errors"]) == set(tol), r
        for k, v in r["errors"].items():
            assert v <= tol[k], (r["case"], r["impl"], k, v)
        assert r["reference"] == "float64"
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["reps"] == 1, r
    # the peers run here (the venv has them); the schedules too where the interpreter works
    ok = {(r["family"], r["impl"]) for r in rows if r["status"] == "ok"}
    assert {("cpu-small", i) for i in ("eager", "torch", "liger", "cce", "cce-nofilter")} <= ok
    if _interpreter_problem() is None:
        assert {("cpu-interp-tiny", i) for i in ("triton", *C.TRITON_SCHEDULE_IMPLS)} <= ok
    # the deadline was never near: nothing skipped for time
    assert not any(s["status"].startswith(("skipped:deadline", "skipped:predicted", "stopped"))
                   for s in data["steps"])
    assert data["status_counts"].get("ok", 0) >= len(planned)


def test_dry_run_realistic_batch_target_fraction(dry):
    _, data, _ = dry
    uf = [s for s in data["steps"] if s.get("family") == "cpu-small-uf"]
    assert uf and all(s["layout"] == "ultrafeedback" for s in uf)
    for s in uf:
        assert abs(s["target_frac"] - 0.4) <= 0.08, s
    other = [s for s in data["steps"] if s.get("family") == "cpu-small"]
    assert all(s["layout"] == "random" and s["target_frac"] > 0.5 for s in other)


def test_dry_run_renders_table_and_plots(dry):
    out, data, stdout = dry
    md = (out / "bench.md").read_text()
    for text in ("| cce-nofilter |", "### cpu-small-uf", "ultrafeedback layout, target frac 0.4",
                 "pred_fwd_bwd_ms", "CPU smoke run"):
        assert text in md, text
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(f"bench-{f}.png" for f in ("cpu-small", "cpu-small-nocap", "cpu-small-uf",
                                                      "cpu-interp-tiny"))
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert len(list(out.iterdir())) <= 8  # the device returns at most 8 files
    assert data["render"]["status"] == "ok" and "bench.md" in data["render"]["files"]
    # the closing table: impl x case, measured/predicted, per-case wall time against the predicted
    tail = stdout[stdout.index("== bench"):]
    assert "| impl | cpu-small-N256 |" in tail and "| cce-nofilter |" in tail and "| wall s (pred) |" in tail
    line = next(ln for ln in tail.splitlines() if ln.startswith("| eager |"))
    meas, pred = line.split("|")[2].split()[0].split("/")
    assert float(meas) > 0 and float(pred) > 0


def test_deadline_guard_keeps_finished_rows(tmp_path, monkeypatch, capsys):
    """The deadline passes once three case rows are written (forced, so the test does not depend on
    this machine's speed): every later row is ``skipped:deadline``, every planned row is still
    there, the JSON valid, the table rendered. (A step the deadline interrupts is
    ``stopped:deadline``: ``benchmarks/test_campaign.py``.)"""
    import time

    from benchmarks.campaign.__main__ import parse_args
    from benchmarks.campaign.common import Call

    families, impls = "cpu-small,cpu-small-nocap,cpu-small-uf", "eager,torch,cce"
    args = parse_args(["bench", "--dry-run", "--out", str(tmp_path), "--families", families, "--impls", impls])
    call = Call("bench", tmp_path, torch.device("cpu"), dry_run=True, argv=[])
    append = call._append

    def append_then_expire(row):
        append(row)
        if sum(r["kind"] == "case" for r in call.result["steps"]) == 3:
            call.deadline = time.monotonic()

    monkeypatch.setattr(call, "_append", append_then_expire)
    call.finish(B.run(call, args))
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = [s for s in data["steps"] if s["kind"] == "case"]
    planned = {(c.id, i) for c, ii in B.plan_cases(families.split(","), None, impls.split(","), dry_run=True)
               for i in ii}
    assert {(r["case"], r["impl"]) for r in rows} == planned and len(rows) == len(planned) > 3
    statuses = [r["status"] for r in rows]
    assert statuses[:3] == ["ok"] * 3 and set(statuses[3:]) == {"skipped:deadline"}, statuses
    assert all(s["status"] == "skipped:deadline" for s in data["steps"][data["steps"].index(rows[3]):])
    assert (tmp_path / "bench.md").exists() and "wall s (pred)" in capsys.readouterr().out


def test_gpu_plan_and_predictions():
    plan = B.plan_cases()
    assert [c.id for c, _ in plan] == [
        "gemma2-9b-N2048", "gemma2-9b-N8192", "gemma2-9b-N32768", "gemma2-9b-N65536",
        "gemma2-9b-uf-N8192", "gemma2-2b-N8192", "gemma2-2b-N32768", "llama3-8b-N8192", "llama3-8b-N32768"]
    assert all(impls == list(C.ALL_IMPLS) for _, impls in plan)
    assert plan[4][0].layout == "ultrafeedback" and plan[3][0].rows == 32
    pred = B.predict_plan(plan)
    for entry in pred:
        assert entry["total_s"] > 0 and math.isfinite(entry["total_s"])
        for impl, (s, ms, oom) in entry["steps"].items():
            assert (oom == "predicted OOM") if s == 0 else (s > 0 and ms > 0), (entry["case"], impl)
    by = {e["case"]: e for e in pred}
    assert by["gemma2-9b-N2048"]["steps"]["eager"][2] is None
    assert by["gemma2-9b-N65536"]["steps"]["eager"][2] == "predicted OOM"
    assert abs(by["gemma2-9b-uf-N8192"]["target_frac"] - 0.4) < 0.01
    # a later step of an impl is cheaper than its first (compile once)
    assert by["gemma2-9b-N8192"]["steps"]["liger"][0] < by["gemma2-9b-N2048"]["steps"]["liger"][0]
    md = B.plan_markdown(pred, 480)
    assert "gemma2-9b-N65536" in md and "of 480 s usable" in md
    # overrides
    sub = B.plan_cases(["gemma2-9b", "llama3-8b"], [8192, 65536], ["triton", "cce-nofilter"])
    assert [c.id for c, _ in sub] == ["gemma2-9b-N8192", "gemma2-9b-N65536", "llama3-8b-N8192"]
    with pytest.raises(ValueError, match="unknown impls"):
        B.plan_cases(impls=["nope"])
    with pytest.raises(ValueError, match="CPU families only"):
        B.plan_cases(["gemma2-9b"], dry_run=True)


def test_predicted_oom_and_step_seconds():
    big = C.make_case(C.FAMILIES["gemma2-9b"], 65536)
    small = C.make_case(C.FAMILIES["gemma2-9b"], 2048)
    assert B.predicted_oom("eager", big, 79e9).startswith("predicted OOM (503 GB > 79 GB free)")
    assert B.predicted_oom("eager", small, 79e9) is None
    assert B.predicted_oom("triton", big, 1e9) is None and B.predicted_oom("eager", big, None) is None
    pred = {"pred_fwd_ms": 100.0, "pred_fwd_bwd_ms": 400.0}
    seen: set = set()
    first = B.step_seconds(small, "triton", pred, device_type="cuda", seen=seen, timing=B.GPU_TIMING)
    B.mark_seen(seen, "triton", small)
    later = B.step_seconds(small, "triton", pred, device_type="cuda", seen=seen, timing=B.GPU_TIMING)
    # fwd+bwd 600 ms (x1.5): check + warm-up + 3 reps + memory = 6 calls; fwd 150 ms: 2 + 3 calls
    calls = 6 * 0.6 + 5 * 0.15
    assert later == pytest.approx(calls + B.LATER_CALL_S + (256000 * 3584 + 2048 * 3584) * 4 / 5e9)
    assert first - later == pytest.approx(B.FIRST_CALL_S["triton"] - B.LATER_CALL_S)
    liger = B.step_seconds(small, "liger", pred, device_type="cuda", seen=seen, timing=B.GPU_TIMING)
    assert liger > first  # its own no-softcap reference on top


def test_ultrafeedback_layout():
    case = C.make_case(C.FAMILIES["gemma2-9b-uf"], 8192)
    assert case.layout == "ultrafeedback" and case.id == "gemma2-9b-uf-N8192"
    lab = C.make_labels(case, seed=3)
    B_ = case.rows // 2
    valid = lab != C.IGNORE_INDEX
    from benchmarks import cost_model as CM

    assert abs(CM.target_fraction(lab) - 0.4) < 0.01
    for i in range(B_):
        c, r = valid[i], valid[B_ + i]
        assert int(c.nonzero()[0]) == int(r.nonzero()[0])  # one prompt per pair
        for row in (c, r):
            idx = row.nonzero().flatten()
            assert (idx == torch.arange(int(idx[0]), int(idx[-1]) + 1)).all()  # one response, contiguous
            assert 0.5 * case.seq - 1 <= int(idx[0]) <= 0.54 * case.seq + 1
    # the random layout is unchanged: make_inputs' labels are make_labels'
    rnd = C.make_case(C.FAMILIES["cpu-small"], 256)
    assert rnd.layout == "random"
    assert torch.equal(C.make_inputs(rnd, "cpu", seed=5)[2], C.make_labels(rnd, seed=5))
    with pytest.raises(ValueError, match="unknown layout"):
        C.make_labels(C.Case("cpu-small", 64, 1000, None, "bfloat16", 256, 4, 64, "zigzag"))


def test_cce_nofilter_turns_filtering_off(monkeypatch):
    """On CUDA ``cce`` passes filter_eps="high" and ``cce-nofilter`` filter_eps=None (wiring checked
    with a stand-in for CCE's function: no GPU here); both are predicted by CCE's model."""
    cce = pytest.importorskip("cut_cross_entropy")
    seen = {}

    def fake(e, c, targets, **kw):
        seen[kw.get("impl")] = kw.get("filter_eps", "absent")
        return torch.zeros(targets.shape[0], targets.shape[1] - 1)

    monkeypatch.setattr(cce, "linear_cross_entropy", fake)
    case = C.make_case(C.FAMILIES["cpu-small"], 256)
    lab = C.make_labels(case)
    h, w = torch.randn(case.rows, case.seq, case.hidden), torch.randn(case.vocab, case.hidden)
    for name, eps in (("cce", "high"), ("cce-nofilter", None)):
        impl = C.build_impl(name, case, torch.device("cuda"))
        assert impl.name == name and impl.notes == []
        impl.fn(h, w, lab)
        assert seen.pop("cce") == eps, name
    C.build_impl("cce-nofilter", case, torch.device("cpu")).fn(h, w, lab)
    assert seen == {"torch_compile": "absent"}  # the CPU fallback has no filter
    from benchmarks.__main__ import prediction

    row = M.case_row(C.make_case(C.FAMILIES["gemma2-9b"], 8192), "cce-nofilter", 30.0, [])
    p = prediction(row, C.make_labels(C.make_case(C.FAMILIES["gemma2-9b"], 8192)), None)
    q = prediction({**row, "impl": "cce"}, C.make_labels(C.make_case(C.FAMILIES["gemma2-9b"], 8192)), None)
    assert p["pred_fwd_bwd_ms"] == q["pred_fwd_bwd_ms"] > 0 and "pred_error" not in p


def test_report_reads_campaign_json(tmp_path):
    row = {"kind": "case", "impl": "cce-nofilter", "family": "gemma2-9b-uf", "tokens": 8192, "rows": 4,
           "seq": 2048, "hidden": 3584, "vocab": 256000, "softcap": 30.0, "dtype": "bfloat16", "notes": [],
           "case": "gemma2-9b-uf-N8192", "layout": "ultrafeedback", "target_frac": 0.4, "status": "ok",
           "fwd_ms": 30.0, "fwd_bwd_ms": 90.0, "peak_mem_mib": 4000.0, "pred_fwd_ms": 8.0,
           "pred_fwd_bwd_ms": 78.0, "pred_matmul_tflops": 700.0, "pred_hbm_tbps": 3.0}
    campaign = {"schema": 1, "call": "bench", "dry_run": False, "date": "d",
                "env": {"device": "NVIDIA H100", "device_type": "cuda", "torch": "2", "triton": "3",
                        "commit": "c"},
                "matmul_bf16_tflops": 700.0,
                "steps": [{"kind": "matmul", "status": "ok"}, {"kind": "inputs", "case": "x", "status": "ok"},
                          row, {**row, "impl": "eager", "status": "skipped:predicted OOM (63 GB > 50 GB free)"}]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(campaign))
    data = R.load([path])
    assert data["device"] == "NVIDIA H100" and len(data["cases"]) == 2
    md = R.table(data)
    assert "### gemma2-9b-uf (H=3584, V=256000, bfloat16, softcap 30.0, ultrafeedback layout, target frac 0.40)" in md
    assert "| cce-nofilter | 90.0 / 30.0 / 4000 |" in md and "skipped:predicted OOM" in md
    assert md.index("| eager |") < md.index("| cce-nofilter |")
    # a runner file and a campaign file merge
    runner = {"device": "NVIDIA H100", "cases": [{**row, "family": "gemma2-9b", "layout": "random"}]}
    (tmp_path / "runner.json").write_text(json.dumps(runner))
    assert len(R.load([tmp_path / "runner.json", path])["cases"]) == 3
