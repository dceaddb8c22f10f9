"""The GPU campaign's ``train-step`` call (:mod:`benchmarks.campaign.train_step`) on CPU.

The full dry run runs in a subprocess (the Triton interpreter must be chosen before
``simpo_kernels.kernels`` is first imported); the time guards and the ncu plumbing run in-process on
the eager/torch paths, which need no kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import e2e as E
from benchmarks.campaign import common
from benchmarks.campaign import train_step as TS

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _dry_run(out: Path, *extra: str, timeout: float = 300, **env_extra: str) -> tuple[dict, str]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), **env_extra)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.campaign.train_step", "--dry-run", "--out", str(out),
                           *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "train-step.json").read_text()), proc.stdout


def _args(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    TS.add_arguments(ap)
    return ap.parse_args(list(argv))


def _call(tmp_path, limit_s=540.0, margin_s=60.0, dry_run=True) -> common.Call:
    return common.Call("train-step", tmp_path, CPU, dry_run=dry_run, limit_s=limit_s, margin_s=margin_s, argv=[])


def _rows(data, kind, path=None):
    return [r for r in data["steps"] if r["kind"] == kind and (path is None or r.get("path") == path)]


def test_dry_run_every_path(tmp_path):
    data, stdout = _dry_run(tmp_path)
    assert data["call"] == "train-step" and data["dry_run"] and data["settings"]["dtype"] == "float32"
    paths = data["settings"]["paths"]
    assert paths == ["eager", "triton", "triton-fused", "torch"]
    assert data["model"]["config"]["vocab_size"] == 256
    builds = _rows(data, "build")
    assert [r["path"] for r in builds] == paths and all(r["status"] == "ok" for r in builds)
    assert len({r["params"] for r in builds}) == 1 and builds[0]["params"] == data["model"]["params_estimate"]

    losses = {}
    for path in paths:
        (m,) = _rows(data, "measure", path)
        assert m["status"] == "ok", m
        assert math.isfinite(m["first_loss"]) and math.isfinite(m["loss"])
        assert m["step_ms"] > 0 and m["tokens_per_s"] > 0 and m["tokens"] == 32
        assert m["tokens_per_s"] == pytest.approx(m["tokens"] / (m["step_ms"] / 1e3), rel=1e-3, abs=0.06)
        losses[path] = m["first_loss"]
    # same seed, same batch, float32: the official logits path and ours agree on the first step
    for path in paths[1:]:
        assert losses[path] == pytest.approx(losses["eager"], rel=1e-4), (path, losses)
    assert _rows(data, "measure", "triton")[0]["schedule_resolved"] in ("pairs", "vocab", "fused")
    assert _rows(data, "measure", "triton-fused")[0]["schedule_resolved"] == "fused"
    assert _rows(data, "measure", "eager")[0]["schedule_resolved"] is None

    # the largest-batch search: each trial its own row; 2 pairs run, above that simulated out of memory
    for path in paths:
        trials = _rows(data, "batch-trial", path)
        assert [(t["pairs"], t["fits"]) for t in trials] == [(2, True), (4, False), (3, False)], trials
        assert trials[0]["result"] == "fits" and trials[1]["result"] == "oom (simulated)"
        assert all(t["status"] == "ok" and t["predicted_s"] > 0 for t in trials)
    summary = {r["path"]: r for r in data["summary"]}
    for path in paths:
        lb = summary[path]["largest_batch"]
        assert lb["max_pairs"] == 2 and lb["upper"] == 3 and lb["complete"] and not lb["capped"]
        assert summary[path]["first_loss"] == losses[path]

    (prof,) = _rows(data, "profile")
    assert prof["status"] == "ok" and prof["path"] == "triton" and 0 < len(prof["top"]) <= 10
    assert prof["total_ms"] > 0 and all(len(r) == 3 for r in prof["top"])

    (ncu,) = _rows(data, "ncu")
    assert ncu["status"].startswith("skipped:")  # ncu not found here, or dry run where it is
    assert ncu["kernel"] == "_logprob_backward_kernel" and ncu["target_path"] == "triton-fused"
    assert math.isfinite(ncu["target_loss"])  # the ncu target ran in-process, interpreted
    for piece in ("--clock-control none", "--kernel-name regex:_logprob_backward_kernel", "--launch-count 1",
                  "--section SpeedOfLight", "--section MemoryWorkloadAnalysis",
                  "--section ComputeWorkloadAnalysis", "--csv", "--ncu-target", "--path triton-fused"):
        assert piece in ncu["command"], piece
    # order: eager, triton (+ profile), ncu, then the rest
    kinds = [(r["kind"], r.get("path")) for r in data["steps"]]
    assert kinds.index(("ncu", None)) < kinds.index(("build", "triton-fused"))
    assert kinds.index(("profile", "triton")) < kinds.index(("batch-trial", "triton"))

    assert data["status_counts"] == {"ok": len(data["steps"]) - 1, "skipped": 1}
    table = stdout[stdout.index("| path |"):]
    assert "| eager | 1 x 16 |" in table and "| triton-fused | 1 x 16 |" in table
    assert "largest batch (pairs)" in table and "ncu _logprob_backward_kernel" in table

    # the report (and so the README block) reads the call's JSON as the end-to-end table
    from benchmarks import report

    (tmp_path / "ts.json").write_text(json.dumps(data))
    e2e = report.read(tmp_path / "ts.json")["e2e"]
    assert [p["path"] for p in e2e["paths"]] == paths
    md = report.table(report.load([tmp_path / "ts.json"]))
    assert "### End to end" in md and "| triton-fused (ok) | 1 x 16 |" in md


def test_deadline_ends_the_call_with_later_steps_skipped(tmp_path):
    """The command started 100 s ago (run.sh's clock) with a 90 s limit: the call has no time left
    at all, whatever this machine's speed; it still writes every row and its table."""
    import time

    data, stdout = _dry_run(tmp_path, "--limit-s", "90", "--margin-s", "60",
                            SIMPO_CAMPAIGN_T0=str(time.time() - 100))
    statuses = [r["status"] for r in data["steps"]]
    assert statuses and not any(s == "ok" for s in statuses)
    first = next(i for i, s in enumerate(statuses) if s.startswith(("stopped:", "skipped:")))
    assert all(s.startswith("skipped:deadline") for s in statuses[first + 1:]), statuses
    assert [r["kind"] for r in data["steps"]].count("build") == 4 and _rows(data, "ncu")
    assert set(data["status_counts"]) <= {"stopped", "skipped"}
    assert "| path |" in stdout


def test_deadline_mid_search_keeps_trials_and_best_batch(tmp_path, monkeypatch):
    def try_step(model, opt, cfg, p, seq, path, dev):
        if p >= 4:
            raise common.DeadlineReached()
        return True

    monkeypatch.setattr(E, "try_step", try_step)
    call = _call(tmp_path)
    closing = TS.run(call, _args("--paths", "eager,torch", "--max-pairs", "16", "--simulate-fit-pairs", "100",
                                 "--no-ncu"))
    call.finish(closing)
    data = json.loads((tmp_path / "train-step.json").read_text())
    trials = _rows(data, "batch-trial", "eager")
    assert [(t["pairs"], t["status"]) for t in trials] == [(2, "ok"), (4, "stopped:deadline")]
    (eager, torch_) = data["summary"]
    assert eager["status"] == "ok" and eager["step_ms"] > 0
    lb = eager["largest_batch"]
    assert lb["max_pairs"] == 2 and lb["stopped"] == "stopped:deadline" and not lb["complete"]
    assert lb["trials"] == [[2, True]]
    assert torch_["status"] == "build skipped:deadline"
    assert _rows(data, "ncu")[0]["status"] == "skipped:deadline"
    assert "| eager | 1 x 16 |" in closing and "2..? (stopped:deadline)" in closing


def test_search_stops_on_predicted_time(tmp_path, monkeypatch):
    """A trial whose predicted time exceeds the path's --search-s budget, or the call's time left,
    is not started; the best known batch is kept."""
    call = _call(tmp_path)
    TS.run(call, _args("--paths", "eager", "--search-s", "1e-9", "--no-ncu"))
    (trial,) = _rows(call.result, "batch-trial")
    assert trial["status"].startswith("skipped:search budget") and "fits" not in trial
    lb = call.result["summary"][0]["largest_batch"]
    assert lb["max_pairs"] == 1 and lb["stopped"].startswith("skipped:search budget") and lb["trials"] == []

    monkeypatch.setattr(TS, "trial_predict_s", lambda step_s, pairs0, pairs, cuda: 1e6)
    call = _call(tmp_path / "b")
    TS.run(call, _args("--paths", "torch", "--no-ncu"))
    (trial,) = _rows(call.result, "batch-trial")
    assert trial["status"].startswith("skipped:predicted 1000000 s >") and trial["predicted_s"] == 1e6
    (m,) = _rows(call.result, "measure")
    assert m["status"] == "ok" and m["schedule_resolved"] == "tokens"


FAKE_CSV = '''"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","1","python","host","_logprob_backward_kernel","1","7","(128, 1, 1)","(264, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","ms","12.5"
"0","1","python","host","_logprob_backward_kernel","1","7","(128, 1, 1)","(264, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Compute (SM) Throughput","%","71.2"
"0","1","python","host","_logprob_backward_kernel","1","7","(128, 1, 1)","(264, 1, 1)","0","9.0","Memory Workload Analysis","Memory Throughput","Gbyte/s","1,234.5"'''


def test_parse_ncu_csv_and_command():
    text, metrics = TS.parse_ncu_csv("==PROF== Connected to process 1\nncu target ...\n" + FAKE_CSV + "\n==PROF== Disconnected")
    assert text.count("\n") == 3 and not text.startswith("==")
    assert metrics["GPU Speed Of Light Throughput: Duration [ms]"] == "12.5"
    assert metrics["Memory Workload Analysis: Memory Throughput [Gbyte/s]"] == "1,234.5"
    assert metrics["kernel"] == "_logprob_backward_kernel" and metrics["grid"] == "(264, 1, 1)"
    assert TS.parse_ncu_csv("==ERROR== no kernels") == ("", {})
    cmd = TS.ncu_command("/x/ncu", "_row_stats_kernel", ["-m", "mod"])
    assert cmd[:3] == ["/x/ncu", "--clock-control", "none"] and cmd[-3:] == [sys.executable, "-m", "mod"]
    assert "regex:_row_stats_kernel" in cmd and cmd.count("--section") == 3


def test_ncu_step_with_a_stand_in_ncu(tmp_path, monkeypatch):
    """The non-dry-run ncu branch: the command runs (here a script printing ncu-style CSV), its CSV
    is stored and parsed, and the closing table quotes the speed-of-light numbers."""
    fake = tmp_path / "ncu"
    fake.write_text("#!/bin/sh\necho '==PROF== Connected'\ncat <<'EOF'\n" + FAKE_CSV + "\nEOF\n")
    fake.chmod(0o755)
    monkeypatch.setattr(TS, "find_ncu", lambda: str(fake))
    call = _call(tmp_path / "out", dry_run=False)
    ts = TS.TrainStep(call, dict(TS.settings(_args("--ncu"), call), dry_run=False))
    ts.profile.update(path="triton", slowest_ours="_row_stats_kernel")
    ts.ncu()
    (row,) = call.rows("ncu")
    assert row["status"] == "ok" and row["rc"] == 0 and row["kernel"] == "_row_stats_kernel"
    assert row["target_path"] == "triton" and row["tokens"] == 4096 and row["vocab"] == 256000
    assert row["metrics"]["GPU Speed Of Light Throughput: Duration [ms]"] == "12.5"
    assert row["csv"].startswith('"ID"') and "--device cuda" in row["command"]
    assert "Duration [ms] 12.5" in ts.closing()

    fake.write_text("#!/bin/sh\necho '==ERROR== ERR_NVGPUCTRPERM' \nexit 1\n")
    ts.ncu()
    assert call.rows("ncu")[-1]["status"].startswith("error:ncu rc 1") and "ERR_NVGPUCTRPERM" in call.rows("ncu")[-1]["status"]


def test_run_ncu_kills_its_process_group_on_timeout():
    with pytest.raises(subprocess.TimeoutExpired):
        TS.run_ncu(["sh", "-c", "sleep 30 & sleep 30"], timeout_s=0.5)


def test_batch_search_from_a_known_fit():
    s = E.BatchSearch(64, known_fit=2)
    fits = 11
    while (p := s.next()) is not None:
        s.record(p, p <= fits)
    r = s.result()
    assert r["max_pairs"] == 11 and r["upper"] == 12 and r["complete"] and not r["capped"]
    assert [t[0] for t in r["trials"]] == [4, 8, 16, 12, 10, 11]
    s = E.BatchSearch(5, known_fit=2)
    while (p := s.next()) is not None:
        s.record(p, True)
    assert s.result()["max_pairs"] == 5 and s.result()["capped"] and [t[0] for t in s.trials] == [4, 5]
    part = E.BatchSearch(64, known_fit=2)
    part.record(part.next(), True)
    assert part.result() | {"trials": None} == {"max_pairs": 4, "capped": False, "cap": 64, "upper": None,
                                                "complete": False, "trials": None}


def test_split_path_and_predictions():
    assert E.split_path("triton") == ("triton", "auto") and E.split_path("triton-fused") == ("triton", "fused")
    assert E.split_path("torch-pairs") == ("torch", "pairs") and E.split_path("eager") == ("eager", "auto")
    for bad in ("eager-pairs", "liger", ""):
        with pytest.raises(ValueError):
            E.split_path(bad)
    cfg = E.gemma2_2b_config()
    call_s = {"tiny": False, "vocab": None, "seq": 2048, "pairs": 2}
    ts = TS.TrainStep.__new__(TS.TrainStep)
    ts.cfg, ts.s = cfg, call_s
    n = ts.params_estimate()
    assert 2.60e9 < n < 2.62e9  # Gemma-2-2B: 2.61B parameters with tied embeddings
    t = TS.predict_step_s(cfg, n, 2, 2048)
    assert 0.3 < t < 0.6  # ~1.8e14 FLOPs at 450 TFLOP/s plus AdamW
    assert TS.trial_predict_s(t, 2, 8, True) == pytest.approx(1.0 + 1.3 * t * 4)
    assert TS.trial_predict_s(None, 2, 8, True) is None
