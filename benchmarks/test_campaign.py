"""The GPU campaign's one call (``benchmarks/campaign/``): its machinery, its plan, and its dry run.

The dry run (``OUT=... bash benchmarks/campaign/run.sh --dry-run``) runs every code path of the GPU
call on CPU at tiny shapes, the Triton kernels interpreted: what fails here would have failed on the
GPU. Its values are asserted: every backend and schedule within the float32 tolerances of the float64
reference (1e-4 loss/log-probs, 1e-3 gradients), every peer row checked, both training-step paths on
the same first loss, a tuned table the launchers read back, and exactly two files under ``$OUT``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from benchmarks.campaign import plan as P
from benchmarks.campaign.common import SUMMARY, TARBALL, Call, DeadlineReached, table

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def new_call(tmp_path: Path, **kw) -> Call:
    return Call(tmp_path / "out", tmp_path / "work", CPU, dry_run=True, argv=[], **{"limit_s": 600, "margin_s": 60, **kw})


def read(call: Call) -> dict:
    return json.loads((call.out / SUMMARY).read_text())


def tar_json(tarball: Path) -> dict:
    with tarfile.open(tarball) as tar:
        return json.load(tar.extractfile("./" + SUMMARY))


# ------------------------------------------------------------------------------------------ machinery


def test_steps_are_written_and_packed_as_they_end_with_their_outcome(tmp_path):
    call = new_call(tmp_path)
    row = call.run_step("a", lambda row: row.update(value=2.5), x=1)
    assert read(call)["steps"][-1] == {"kind": "a", "x": 1, "status": "ok", "value": 2.5, "wall_s": row["wall_s"]}
    # the tar under $OUT holds the same JSON after every step (a kill keeps what finished)
    assert tar_json(call.out / TARBALL)["steps"] == read(call)["steps"]

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
    (call.work / "extra.txt").write_text("x")
    result = call.finish("| t |")
    assert result["status_counts"] == {"ok": 1, "error": 1, "oom": 1, "skipped": 2}
    assert read(call)["env"]["device"] == "cpu" and read(call)["env"]["torch"] == torch.__version__
    assert sorted(p.name for p in call.out.iterdir()) == [SUMMARY, TARBALL]
    with tarfile.open(call.out / TARBALL) as tar:
        assert {"./campaign.json", "./campaign.md", "./extra.txt"} <= set(tar.getnames())
    assert tar_json(call.out / TARBALL) == read(call)


def test_the_deadline_interrupts_a_step_and_skips_the_rest(tmp_path):
    call = new_call(tmp_path)
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
    call = new_call(tmp_path)

    def interrupted(row):
        row["partial"] = 1
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        call.run_step("x", interrupted)
    assert read(call)["steps"][-1]["status"] == "stopped:interrupted"
    assert read(call)["steps"][-1]["partial"] == 1


def test_call_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="limit_s"):
        new_call(tmp_path, limit_s=60, margin_s=60)
    with pytest.raises(ValueError, match="work folder must differ"):
        Call(tmp_path, tmp_path, CPU, dry_run=True)


def test_table():
    assert table([{"a": 1.23456, "b": None}], ["a", "b"]) == "| a | b |\n|---|---|\n| 1.23 | - |"


# ------------------------------------------------------------------------------------------ the plan


def test_the_plan_runs_the_decisive_steps_first_and_fits_the_device_budget():
    steps = P.predict_plan()
    groups = [g for g, _, _ in steps]
    assert groups == sorted(groups, key=P.GROUPS.index)  # env, exact, head, memory, train, sweep
    what = [w for _, w, _ in steps]
    for name, *_ in P.EXACT_IMPLS:  # every backend and schedule at the small and the 9B shape
        assert f"cpu-small-N256 {name} check" in what and f"gemma2-9b-N8192 {name} check" in what
    for case in ("gemma2-9b-full-N8192", "gemma2-9b-uf-N8192"):
        for impl in ("triton-pairs", "triton-vocab", "triton-fused", "eager", "liger", "cce", "cce-nofilter",
                     "torch-lce"):
            assert f"{case} {impl}" in what
    # DPO with a precomputed reference at the 9B head, then the precompute pass on the same inputs
    dpo = [w for g, w, _ in steps if g == "head" and w.startswith("gemma2-9b-uf-dpo-N8192")]
    assert dpo == ["gemma2-9b-uf-dpo-N8192 inputs + float64 reference"] + [
        f"gemma2-9b-uf-dpo-N8192 {i}" for i in ("triton", "eager", "cce-nofilter", "torch-lce")] + [
        f"gemma2-9b-uf-dpo-N8192 precompute {i}" for i in ("triton", "eager", "cce")]
    pred = {w: p for _, w, p in steps}
    assert all(0 < pred[w] < 15 for w in dpo), {w: pred[w] for w in dpo}
    case = P.case_of("gemma2-9b-uf-dpo", 8192)
    frac = P.target_frac(case)
    # the DPO rows' predictions are the cost model's DPO ones (official "targets": below SimPO's on the same batch)
    simpo = P.predicted_ms(P.case_of("gemma2-9b-uf", 8192), frac, "triton")
    assert 0 < P.predicted_ms(case, frac, "triton") < simpo
    assert 0 < P.predicted_ms(case, frac, "triton", precompute=True) < P.predicted_ms(case, frac, "triton")
    for case in ("gemma2-9b-N32768", "gemma2-9b-N65536"):
        assert f"{case} triton-fused" in what and f"{case} eager" not in what  # eager cannot fit there
    fixed = P.load_fixed()
    before_sweep = sum(s for g, _, s in steps if g != "sweep")
    usable = 540 - 30 - fixed["startup_s"]
    assert 0 < before_sweep <= usable, (before_sweep, usable)
    assert P.device_seconds(540.0, fixed) <= P.DEVICE_BUDGET_S <= 13 * 60
    assert all(s >= 0 for _, _, s in steps)


def test_plan_cli_prints_the_predicted_device_time():
    proc = run_cli("--plan")
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("predicted device time"))
    minutes = float(line.split("(")[1].split(" min")[0])
    assert 10 <= minutes <= 13, line
    assert "| exact |" in proc.stdout and "| sweep |" in proc.stdout


def test_groups_option(tmp_path):
    from benchmarks.campaign.__main__ import parse_args

    assert parse_args(["--out", str(tmp_path), "--groups", "sweep"]).groups == ("env", "sweep")
    assert parse_args(["--out", str(tmp_path), "--groups", "train,exact"]).groups == ("env", "exact", "train")
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path), "--groups", "exact,nope"])


def test_calibrate_takes_the_measured_fixed_costs(tmp_path):
    table_path = tmp_path / "fixed.json"
    table_path.write_text(P.FIXED_COSTS.read_text())
    result = {"dry_run": False, "date": "2026-12-02", "startup_s": 12.5,
              "env": {"device": "NVIDIA H200", "commit": "abc"},
              "steps": [
                  {"kind": "exact", "impl": "triton-fused", "status": "ok", "check_s": 21.0, "new_shape": True},
                  {"kind": "exact", "impl": "triton-fused", "status": "ok", "check_s": 4.5, "new_shape": True},
                  {"kind": "case", "impl": "liger", "status": "ok", "check_s": 44.0, "new_shape": True},
                  {"kind": "case", "impl": "cce", "status": "error:x", "check_s": 99.0},
                  {"kind": "precompute", "impl": "triton", "status": "ok", "check_s": 2.5},
                  {"kind": "precompute", "impl": "triton", "status": "ok", "check_s": 0.4},
                  {"kind": "pytest", "status": "ok", "wall_s": 77.0},
                  {"kind": "train-build", "status": "ok", "wall_s": 9.0},
                  {"kind": "train", "path": "triton", "status": "ok", "warmup_ms": 31000.0}]}
    before = json.loads(table_path.read_text())
    fixed = P.calibrate(result, table_path)
    assert fixed == json.loads(table_path.read_text())
    assert fixed["first_call_s"]["triton-fused"] == 21.0 and fixed["new_shape_s"]["triton-fused"] == 4.5
    assert fixed["first_call_s"]["liger"] == 44.0
    assert fixed["first_call_s"]["precompute-triton"] == 2.5  # the first precompute call of triton
    assert fixed["first_call_s"]["cce"] == before["first_call_s"]["cce"]  # a failed step measures nothing
    assert (fixed["pytest_cuda_s"], fixed["train_build_s"], fixed["train_first_step_s"]["triton"],
            fixed["startup_s"]) == (77.0, 9.0, 31.0, 12.5)
    assert fixed["source"].startswith("measured on NVIDIA H200") and fixed["device"] == "NVIDIA H200"
    with pytest.raises(ValueError, match="dry run"):
        P.calibrate(dict(result, dry_run=True), table_path)


# ------------------------------------------------------------------------------------------ the dry run


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT", "SIMPO_TUNED_DIR")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra)
    return env


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.campaign", *args], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def run_sh(out: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """The GPU entry point itself, as the device runs it (no wheels here: the peers are installed)."""
    env = clean_env(OUT=str(out), SIMPO_WHEELS=str(out.parent / "no-wheels"), SIMPO_COMMIT="abc123",
                    TMPDIR=str(out.parent))
    return subprocess.run(["bash", "benchmarks/campaign/run.sh", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_refuses_a_gpu_call_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal is for machines without one")
    proc = run_cli("--out", str(tmp_path))
    assert proc.returncode != 0 and "no CUDA device; use --dry-run" in proc.stderr


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("campaign") / "out"
    t0 = time.monotonic()
    proc = run_sh(out, "--dry-run")
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"run.sh --dry-run: {wall:.0f} s")
    result = json.loads((out / SUMMARY).read_text())
    with tarfile.open(out / TARBALL) as tar:
        names = set(tar.getnames())
        log = tar.extractfile("./campaign.log").read().decode()
    return {"out": out, "result": result, "names": names, "log": log, "wall": wall, "stdout": proc.stdout}


REFUSED = "the Triton interpreter cannot run here"


def skip_if_interpreter_refused(result: dict) -> None:
    """Where the library refuses the Triton interpreter (triton <= 3.6 under numpy >= 2.4) the dry
    run states it in every triton row (``skipped:<the probe's reason>``): the values below need those
    rows, so the test is skipped with that reason."""
    reason = next((s["status"] for s in result["steps"] if REFUSED in s["status"]), None)
    if reason:
        pytest.skip("needs the Triton interpreter: " + reason[len("skipped:"):])


def rows(result: dict, kind: str) -> list[dict]:
    return [s for s in result["steps"] if s["kind"] == kind]


def test_dry_run_two_files_come_back_holding_everything(dry_run):
    result = dry_run["result"]
    assert result["dry_run"] is True and result["env"]["commit"] == "abc123"
    assert sorted(p.name for p in dry_run["out"].iterdir()) == [SUMMARY, TARBALL]
    assert {"./campaign.json", "./campaign.log", "./campaign.md", "./pytest-triton-cuda.log"} <= dry_run["names"]
    assert tar_json(dry_run["out"] / TARBALL) == result  # the last pack is the final JSON
    assert "no wheels in" in dry_run["log"] and "== campaign (dry run)" in dry_run["log"]


def test_dry_run_every_step_ok(dry_run):
    result = dry_run["result"]
    skip_if_interpreter_refused(result)
    assert result["status_counts"] == {"ok": len(result["steps"])}, [
        (s["kind"], s.get("impl"), s["status"]) for s in result["steps"] if s["status"] != "ok"]
    assert {"./bench.md", "./tuned-cpu.json"} <= dry_run["names"]
    assert any(n.startswith("./bench-") and n.endswith(".png") for n in dry_run["names"])
    assert "predicted device time" in dry_run["log"]  # the GPU plan, printed first
    plan = result["plan"]
    assert plan["device_s"] <= P.DEVICE_BUDGET_S and plan["before_sweep_s"] <= plan["usable_s"]
    # within the call's own limit, every row timed
    assert result["wall_s"] < result["limit_s"] and all("wall_s" in s for s in result["steps"])
    kinds = [s["kind"] for s in result["steps"]]
    assert result["copy_tbps"] > 0 and result["matmul_bf16_tflops"] > 0
    assert kinds.index("copy") < kinds.index("gemm") < kinds.index("exact") < kinds.index("pytest") < kinds.index("case") < \
        kinds.index("train") < kinds.index("sweep")


def test_dry_run_every_backend_and_schedule_is_exact(dry_run):
    skip_if_interpreter_refused(dry_run["result"])
    exact = rows(dry_run["result"], "exact")
    for family, tokens in P.settings(True).exact_cases:
        case = f"{family}-N{tokens}"
        assert [r["impl"] for r in exact if r["case"] == case] == [n for n, *_ in P.EXACT_IMPLS]
    for r in exact:  # float32 under the interpreter: the float32 tolerances
        e = r["errors"]
        assert r["passed"] and e["loss"] < 1e-4 and e["logps"] < 1e-4, r
        assert e["dhidden"] < 1e-3 and e["dweight"] < 1e-3, r
        assert r["check_s"] > 0 and r["reference"] == "float64"
    pytest_row = rows(dry_run["result"], "pytest")[0]
    assert pytest_row["returncode"] == 0 and "skipped" in pytest_row["summary"]  # no CUDA here


def test_dry_run_heads_check_every_peer(dry_run):
    skip_if_interpreter_refused(dry_run["result"])
    cases = rows(dry_run["result"], "case")
    by = {(r["case"], r["impl"]): r for r in cases}
    for impl in ("eager", "liger", "cce", "cce-nofilter", "torch-lce"):
        for case in ("cpu-small-full-N256", "cpu-small-uf-N256"):
            r = by[(case, impl)]
            assert r["passed"] and r["fwd_bwd_ms"] > 0 and r["pred_fwd_bwd_ms"] is not None, r
    for impl in ("triton", "triton-pairs", "triton-vocab", "triton-fused"):
        assert by[("cpu-interp-tiny-N32", impl)]["passed"]
    for impl in ("liger", "torch-lce"):  # no softcap: checked against the no-softcap reference
        r = by[("cpu-small-full-N256", impl)]
        assert r["softcap"] is None and "softcap_unsupported" in r["notes"]
    assert by[("cpu-small-full-N256", "cce")]["softcap"] == 30.0
    assert by[("cpu-small-full-N256", "eager")]["target_frac"] > 0.98  # every position a target
    assert abs(by[("cpu-small-uf-N256", "eager")]["target_frac"] - 0.4) < 0.03
    assert {r["group"] for r in cases} == {"head", "memory"}


def test_dry_run_dpo_and_precompute_rows_are_exact(dry_run):
    """DPO (precomputed reference) rows at both dry-run DPO families, and the reference precompute
    pass on the same inputs, checked against float64 before they were timed; predictions beside."""
    skip_if_interpreter_refused(dry_run["result"])
    from benchmarks import cost_model as CM
    from benchmarks import measure as M

    by = {(r["case"], r["impl"]): r for r in rows(dry_run["result"], "case")}
    tiny, small = "cpu-interp-tiny-dpo-N32", "cpu-small-dpo-N256"
    assert [i for c, i in by if c == small] == ["eager", "cce-nofilter", "torch-lce"]
    assert [i for c, i in by if c == tiny] == ["triton", "eager"]
    for (case, impl), r in by.items():
        if case not in (tiny, small):
            continue
        tol_val, tol_grad = M.TOLERANCES[r["dtype"]]
        e = r["errors"]
        assert r["passed"] and r["loss"] == "dpo" and r["reference"] == "float64", r
        assert e["loss"] < tol_val and e["logps"] < tol_val and e["dhidden"] < tol_grad and e["dweight"] < tol_grad, r
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["pred_fwd_bwd_ms"] > 0, r
    # float32 under the interpreter: our DPO on the pairs schedule (auto) is float32-exact
    assert by[(tiny, "triton")]["errors"]["loss"] < 1e-5 and by[(tiny, "triton")]["errors"]["dweight"] < 1e-4
    assert by[(small, "torch-lce")]["softcap"] is None  # checked against the no-softcap DPO reference
    # the DPO rows are predicted as DPO: the cost model at loss="dpo" (its official logit_metrics)
    r = by[(tiny, "triton")]
    shape = CM.Shape(tokens=r["tokens"], hidden=r["hidden"], vocab=r["vocab"], dtype_bytes=4, softcap=True,
                     target_frac=r["target_frac"], row_len=r["seq"])
    assert r["pred_fwd_bwd_ms"] == pytest.approx(CM.predict("triton", shape, loss="dpo").fwd_bwd.ms, rel=1e-3)
    inputs = [s for s in rows(dry_run["result"], "reference") if s["case"] in (tiny, small)]
    assert [s["objective"] for s in inputs] == ["dpo", "dpo"] and all(s["status"] == "ok" for s in inputs)
    assert all(0.1 < s["loss"] < 3 for s in inputs)  # the float64 DPO loss: not saturated by the reference values
    pre = {(r["case"], r["impl"]): r for r in rows(dry_run["result"], "precompute")}
    assert set(pre) == {(small, "eager"), (small, "cce"), (tiny, "triton"), (tiny, "eager")}
    for (case, impl), r in pre.items():
        tol = M.TOLERANCES[r["dtype"]][0]
        assert r["status"] == "ok" and r["passed"] and r["reference"] == "float64", r
        assert r["errors"]["counts"] == 0 and r["errors"]["sums"] < tol, r  # exact counts, sums to the dtype
        assert r["fwd_ms"] > 0 and r["check_s"] > 0 and "fwd_bwd_ms" not in r, r  # forward only
        assert r["pred_fwd_ms"] > 0 and r["pred_fwd_tflop"] > 0, r
    assert pre[(tiny, "triton")]["errors"]["sums"] < 1e-5  # float32: sums to float32 rounding
    with tarfile.open(dry_run["out"] / TARBALL) as tar:
        bench = tar.extractfile("./bench.md").read().decode()
    assert "### Reference precompute pass" in bench and "### cpu-small-dpo " in bench
    assert "reference precompute pass (sequence_logps, forward only)" in dry_run["stdout"]


def test_dry_run_train_step_paths_agree(dry_run):
    skip_if_interpreter_refused(dry_run["result"])
    train = {r["path"]: r for r in rows(dry_run["result"], "train")}
    assert set(train) == {"eager", "triton"}
    # the same weights and batch: the first step's loss is the same through both paths
    assert abs(train["eager"]["first_loss"] - train["triton"]["first_loss"]) < 1e-4
    assert all(r["step_ms"] > 0 and r["tokens"] == 32 for r in train.values())


def test_dry_run_tuned_table_is_valid_and_read_back(dry_run, tmp_path, monkeypatch):
    from simpo_kernels.kernels.launch import make_config
    from simpo_kernels.tuned import ENV_DIR, check_table

    skip_if_interpreter_refused(dry_run["result"])
    with tarfile.open(dry_run["out"] / TARBALL) as tar:
        tuned = json.load(tar.extractfile("./tuned-cpu.json"))
    check_table(tuned, "tuned-cpu.json")
    assert tuned["device"] == "cpu" and set(tuned["schedule_order"]) == set(P.DRY_SWEEP)
    readback = rows(dry_run["result"], "readback")[0]
    assert readback["status"] == "ok" and readback["problems"] == []
    (tmp_path / "cpu.json").write_text(json.dumps(tuned))
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    for e in tuned["configs"]:
        cfg = make_config(CPU, torch.float32, {}, schedule=e["schedule"], shape=(e["tokens"], e["hidden"], e["vocab"]))
        assert all(getattr(cfg, k) == v for k, v in e["options"].items())


def test_readme_block_is_regenerated_from_campaign_json(dry_run, tmp_path):
    """``python -m benchmarks.report ... --readme``: the block between the markers is replaced by the
    tables of the committed JSON; dry runs are refused (CPU numbers never reach the README)."""
    from benchmarks import report

    skip_if_interpreter_refused(dry_run["result"])
    results = tmp_path / "benchmarks" / "results" / "2026-12-02-gpu"
    results.mkdir(parents=True)
    (results / "campaign.json").write_text(json.dumps(dict(dry_run["result"], dry_run=False)))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- perf:begin -->\npending\n<!-- perf:end -->\nafter\n")
    report.main([str(results / "campaign.json"), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n<!-- perf:begin -->\nMeasured on **cpu**") and text.endswith(
        "<!-- perf:end -->\nafter\n")
    assert "pending" not in text and "`benchmarks/results/2026-12-02-gpu/campaign.json`" in text
    assert "| triton-fused | " in text and "### cuBLAS rates" in text and "| torch-lce |" in text
    assert "### End to end" in text and "| triton (ok) |" in text
    (results / "dry.json").write_text(json.dumps(dry_run["result"]))
    with pytest.raises(ValueError, match="dry run"):
        report.main([str(results / "dry.json"), "--readme", str(readme)])


def test_a_call_cut_anywhere_keeps_what_finished(tmp_path):
    """A limit far too short for the plan: the call stops itself at its deadline, exits 0, and
    returns the steps that finished (most decisive first), the rest marked, in the JSON and the tar."""
    out = tmp_path / "out"
    proc = run_sh(out, "--dry-run", "--limit-s", "12", "--margin-s", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / SUMMARY).read_text())
    skip_if_interpreter_refused(result)
    statuses = [s["status"] for s in result["steps"]]
    assert statuses[0] == "ok" and result["wall_s"] < 60
    cut = next(i for i, s in enumerate(statuses) if s != "ok")
    assert statuses[cut] in ("stopped:deadline", "skipped:deadline")
    assert all(s == "skipped:deadline" for s in statuses[cut + 1:])
    assert not rows(result, "sweep") or all(r["status"] == "skipped:deadline" for r in rows(result, "sweep"))
    assert tar_json(out / TARBALL) == result
