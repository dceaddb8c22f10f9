"""The GPU campaign's shared machinery (``benchmarks/campaign/common.py``) and its ``check`` call.

The call's dry run (``python -m benchmarks.campaign check --dry-run``) runs every code path of the
GPU call on CPU at the ``cpu-interp`` shape, the Triton kernels interpreted: what fails here would
have failed on the GPU. Its values are asserted: every backend and schedule within the float32
tolerances of the float64 reference (1e-4 loss/log-probs, 1e-3 gradients), a tuned table that the
library accepts and the launchers read back. The ``bench`` and ``train-step`` dry runs have their
own test files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.campaign.common import Call, DeadlineReached, table

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def read(call: Call) -> dict:
    return json.loads(call.path.read_text())


def test_steps_are_written_as_they_end_with_their_outcome(tmp_path):
    call = Call("unit", tmp_path, CPU, dry_run=True, limit_s=600, margin_s=60, argv=[])
    row = call.run_step("a", lambda row: row.update(value=2.5), x=1)
    assert read(call)["steps"][-1] == {"kind": "a", "x": 1, "status": "ok", "value": 2.5, "wall_s": row["wall_s"]}

    def fail(row):
        raise ValueError("bad   input\nhere")

    assert call.run_step("b", fail)["status"] == "error:ValueError: bad input here"

    def oom(row):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    call.run_step("c", oom)
    assert read(call)["steps"][-1]["status"] == "oom"

    def skip(row):
        row.skip("peer not installed")
        row["never"] = True

    call.run_step("d", skip)
    assert read(call)["steps"][-1]["status"] == "skipped:peer not installed"
    assert "never" not in read(call)["steps"][-1]
    ran = []
    call.run_step("e", lambda row: ran.append(1), predicted_s=1e6)
    assert not ran  # a step predicted not to fit never starts
    assert read(call)["steps"][-1]["status"].startswith("skipped:predicted 1000000 s >")
    result = call.finish("| t |")
    assert result["status_counts"] == {"ok": 1, "error": 1, "oom": 1, "skipped": 2}
    assert read(call)["env"]["device"] == "cpu" and read(call)["env"]["torch"] == torch.__version__


def test_the_deadline_interrupts_a_step_and_skips_the_rest(tmp_path):
    call = Call("unit", tmp_path, CPU, dry_run=True, limit_s=600, margin_s=60, argv=[])
    t0 = time.monotonic()
    call.deadline = t0 + 0.5  # half a second left, however long the Call took to set up

    def slow(row):
        while time.monotonic() - t0 < 30:  # would run 30 s; the deadline is 0.5 s away
            sum(range(1000))
        row["finished"] = True

    call.run_step("slow", slow)
    assert time.monotonic() - t0 < 5
    ran = []
    call.run_step("next", lambda row: ran.append(1))
    steps = read(call)["steps"]
    assert [s["status"] for s in steps] == ["stopped:deadline", "skipped:deadline"]
    assert "finished" not in steps[0] and not ran
    assert issubclass(DeadlineReached, BaseException) and not issubclass(DeadlineReached, Exception)


def test_an_interrupt_leaves_its_row_in_the_file(tmp_path):
    call = Call("unit", tmp_path, CPU, dry_run=True, limit_s=600, margin_s=60, argv=[])

    def interrupted(row):
        row["partial"] = 1
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        call.run_step("x", interrupted)
    assert read(call)["steps"][-1]["status"] == "stopped:interrupted"
    assert read(call)["steps"][-1]["partial"] == 1


def test_limit_must_exceed_margin(tmp_path):
    with pytest.raises(ValueError, match="limit_s"):
        Call("unit", tmp_path, CPU, dry_run=True, limit_s=60, margin_s=60)


def test_table():
    assert table([{"a": 1.23456, "b": None}], ["a", "b"]) == "| a | b |\n|---|---|\n| 1.23 | - |"


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT", "SIMPO_TUNED_DIR")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", "benchmarks.campaign", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_refuses_a_gpu_call_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal is for machines without one")
    proc = run_cli("check", "--out", str(tmp_path))
    assert proc.returncode != 0 and "no CUDA device; use --dry-run" in proc.stderr


@pytest.fixture(scope="module")
def check_dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("check")
    t0 = time.monotonic()
    proc = run_cli("check", "--dry-run", "--out", str(out))
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"check --dry-run: {wall:.0f} s")
    return out, json.loads((out / "check.json").read_text()), proc.stdout


def test_check_dry_run_every_step_ok(check_dry_run):
    out, result, stdout = check_dry_run
    bad = [(s["kind"], s.get("impl") or s.get("name") or s.get("options"), s["status"]) for s in result["steps"]
           if s["status"] != "ok"]
    assert not bad
    assert result["dry_run"] is True and result["status_counts"] == {"ok": len(result["steps"])}
    assert "== check (dry run)" in stdout and "| impl | loss |" in stdout


def test_check_dry_run_gemm_rates(check_dry_run):
    _, result, _ = check_dry_run
    gemms = {s["name"]: s for s in result["steps"] if s["kind"] == "gemm"}
    assert set(gemms) == {"square", "logits", "logits-f32out", "dH", "dW"}
    assert all(g["tflops"] > 0 and g["median_ms"] > 0 for g in gemms.values())
    assert (gemms["dW"]["m"], gemms["dW"]["n"], gemms["dW"]["k"]) == (300, 40, 64)  # V x H x N


def test_check_dry_run_every_backend_and_schedule_is_exact(check_dry_run):
    from benchmarks.campaign.check import EXACT_IMPLS

    _, result, _ = check_dry_run
    exact = {s["impl"]: s for s in result["steps"] if s["kind"] == "exact"}
    assert set(exact) == {name for name, *_ in EXACT_IMPLS}
    for name, row in exact.items():
        assert row["passed"] is True, name
        assert row["tolerances"] == {"loss": 1e-4, "logps": 1e-4, "dhidden": 1e-3, "dweight": 1e-3}
        assert all(0 <= e < 1e-4 for e in row["errors"].values()), (name, row["errors"])
        assert row["fwd_bwd"]["median_ms"] > 0
    ref = next(s for s in result["steps"] if s["kind"] == "reference")
    assert ref["status"] == "ok" and ref["loss"] > 0 and ref["reference"].startswith("float64")


def test_check_dry_run_variants_and_sweep(check_dry_run):
    from benchmarks.campaign.check import DRY_VARIANTS

    _, result, _ = check_dry_run
    variants = [s for s in result["steps"] if s["kind"] == "variant"]
    names = {s["name"] for s in variants}
    assert names == {"default"} | {n for n, *_ in DRY_VARIANTS}
    for v in variants:
        assert v["passed"] and v["fwd_ms"] > 0 and v["fwd_bwd_ms"] > 0
        if v["name"] != "default":
            assert v["vs_default"] > 0
    acq = next(v for v in variants if v["name"] == "acq_rel-atomics")
    assert acq["options"] == {"atomic_sem": "acq_rel"}
    sweep = [s for s in result["steps"] if s["kind"] == "sweep"]
    assert {s["schedule"] for s in sweep} >= {"fused", "vocab"}
    assert len({(s["schedule"], json.dumps(s["options"], sort_keys=True)) for s in variants + sweep}) == \
        len(variants + sweep)  # no configuration measured twice


def test_check_dry_run_tuned_table_is_valid_and_read_back(check_dry_run, monkeypatch):
    from simpo_kernels.kernels.launch import make_config
    from simpo_kernels.tuned import ENV_DIR, check_table

    out, result, _ = check_dry_run
    path = out / "tuned-cpu.json"
    tuned = json.loads(path.read_text())
    check_table(tuned, str(path))
    assert tuned["device"] == "cpu" and set(tuned["schedule_order"]) == {"pairs", "vocab", "fused"}
    readback = next(s for s in result["steps"] if s["kind"] == "readback")
    assert readback["status"] == "ok" and readback["problems"] == []
    # the launcher reads the table once it sits where the launchers look
    (out / "cpu.json").write_text(path.read_text())
    monkeypatch.setenv(ENV_DIR, str(out))
    shape = result["shape"]
    targets = round(shape["target_frac"] * shape["tokens"])  # the rows a launch is looked up by
    for e in tuned["configs"]:
        assert abs(e["tokens"] - targets) <= 1 and e["tokens"] < shape["tokens"]
        cfg = make_config(CPU, torch.float32, {}, schedule=e["schedule"], shape=(e["tokens"], e["hidden"], e["vocab"]))
        assert all(getattr(cfg, k) == v for k, v in e["options"].items())


def test_readme_block_is_regenerated_from_campaign_json(check_dry_run, tmp_path):
    """``python -m benchmarks.report ... --readme``: the block between the markers is replaced by the
    tables of the committed JSON; dry runs are refused (CPU numbers never reach the README)."""
    from benchmarks import report

    out, result, _ = check_dry_run
    results = tmp_path / "benchmarks" / "results" / "2026-11-25-gpu"
    results.mkdir(parents=True)
    real = dict(result, dry_run=False)
    (results / "check.json").write_text(json.dumps(real))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- perf:begin -->\npending\n<!-- perf:end -->\nafter\n")
    report.main([str(results / "check.json"), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n<!-- perf:begin -->\nMeasured on **cpu**") and text.endswith(
        "<!-- perf:end -->\nafter\n")
    assert "pending" not in text and "`benchmarks/results/2026-11-25-gpu/check.json`" in text
    assert "| triton-fused | " in text and "### cuBLAS rates" in text
    (results / "dry.json").write_text(json.dumps(result))
    with pytest.raises(ValueError, match="dry run"):
        report.main([str(results / "dry.json"), "--readme", str(readme)])
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="no <!-- perf:begin -->"):
        report.main([str(results / "check.json"), "--readme", str(readme)])


def test_run_sh_runs_a_call_and_keeps_its_log(tmp_path):
    """The GPU entry point itself (``benchmarks/campaign/run.sh``), on the shortest call's dry run:
    exit status, the call's JSON and the log under $OUT, the clock started by the script."""
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SIMPO_TUNED_DIR")}
    env.update(OUT=str(out), SIMPO_WHEELS=str(tmp_path / "no-wheels"), SIMPO_COMMIT="abc123",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    proc = subprocess.run(["bash", "benchmarks/campaign/run.sh", "train-step", "--dry-run", "--no-search"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "train-step.log").read_text()
    assert "no wheels in" in log and "== train-step (dry run)" in log
    result = json.loads((out / "train-step.json").read_text())
    assert result["env"]["commit"] == "abc123" and result["status_counts"].get("ok", 0) > 0
    assert sorted(p.name for p in out.iterdir()) == ["train-step.json", "train-step.log"]
