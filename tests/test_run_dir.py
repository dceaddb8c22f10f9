"""The output directory of ``simpo-train``: checkpoints that are complete or absent, resuming after
a crash at any stage of a save, one run at a time, an unwritable directory found out before any
work, and reruns with other settings refused unless asked for.

Crashes, kills and concurrent runs are real subprocesses (``tests/crash_worker.py`` injects an
``os._exit(137)`` into one stage of a checkpoint save, or holds a run in progress); checkpoints
cut by hand are checked in process.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from simpo import run_dir  # noqa: E402
from simpo.config import SimPOConfig, UserError  # noqa: E402
from simpo.run_dir import (LOCK_NAME, RUN_CONFIG_NAME, acquire_run_lock,  # noqa: E402
                           checkpoint_problems, last_complete_checkpoint)
from tests.multiproc import (ROOT, free_port, run_json, save_tiny_model,  # noqa: E402
                             subprocess_env, tiny_rows_and_tokenizer)
from tests.multiproc import WORKER as TRAIN_WORKER  # noqa: E402

WORKER = os.path.join(ROOT, "tests", "crash_worker.py")
# no evaluation split, no plot, a small model: each run is mostly interpreter start-up
FAST = ["--dataset_splits", "train", "--eval_strategy", "no", "--plot", "false",
        "--disable_tqdm", "true", "--tiny_hidden_size", "32", "--logging_steps", "1",
        "--save_strategy", "steps", "--save_steps", "2"]


def _train_args(out, steps, *extra):
    return ["--max_steps", str(steps), *FAST, "--output_dir", str(out), *extra]


def _cli(out, steps, *extra):
    return [sys.executable, "-m", "simpo.train", *_train_args(out, steps, *extra)]


def _run(cmd, timeout=240):
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def _state(path):
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def _checkpoints(out):
    return sorted((int(p.rsplit("-", 1)[1]) for p in glob.glob(os.path.join(out, "checkpoint-*"))))


# ----------------------------------------------------------------------------- hand-cut checkpoints

@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """An output_dir holding checkpoint-2 and checkpoint-4, saved by SimPOTrainer."""
    import torch

    from simpo.data import prepare_dataset
    from simpo.modeling import build_tiny_model
    from simpo.trainer import SimPOTrainer

    out = tmp_path_factory.mktemp("saved") / "out"
    raw, tok = tiny_rows_and_tokenizer(16)
    torch.manual_seed(0)
    args = SimPOConfig(output_dir=str(out), use_cpu=True, report_to="none", max_steps=4,
                       per_device_train_batch_size=4, save_strategy="steps", save_steps=2,
                       max_length=64, max_prompt_length=32, disable_tqdm=True, seed=0)
    trainer = SimPOTrainer(model=build_tiny_model(tok, hidden_size=32), args=args,
                           train_dataset=prepare_dataset(raw, tok, args), processing_class=tok)
    trainer.train()
    assert _checkpoints(out) == [2, 4]
    assert not os.path.exists(out / run_dir.STAGING_DIR_NAME)
    return out


def _cut_copy(src, dst, cut):
    """A copy of the output_dir ``src`` whose checkpoint-4 is altered by ``cut(path)``."""
    shutil.copytree(src, dst)
    cut(os.path.join(dst, "checkpoint-4"))
    return str(dst)


def _remove(*names):
    def cut(path):
        for name in names:
            os.remove(os.path.join(path, name))
    return cut


def _truncate(name, keep=0.5):
    def cut(path):
        full = os.path.join(path, name)
        with open(full, "r+b") as f:
            f.truncate(int(os.path.getsize(full) * keep))
    return cut


REQUIRED = ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json", "training_args.bin"]


def test_saved_checkpoints_are_complete_and_recorded(two_checkpoints):
    for step in (2, 4):
        path = os.path.join(two_checkpoints, f"checkpoint-{step}")
        assert checkpoint_problems(path) == []
        with open(os.path.join(path, run_dir.COMPLETION_RECORD_NAME)) as f:
            record = json.load(f)
        assert record["global_step"] == step and record["world_size"] == 1
        for name in REQUIRED:
            assert record["files"][name] == os.path.getsize(os.path.join(path, name))
    assert last_complete_checkpoint(str(two_checkpoints)) == os.path.join(two_checkpoints,
                                                                          "checkpoint-4")


@pytest.mark.parametrize("with_record", [True, False], ids=["record", "no-record"])
@pytest.mark.parametrize("name", REQUIRED)
def test_checkpoint_missing_a_file_is_skipped_with_a_warning(two_checkpoints, tmp_path, caplog,
                                                             name, with_record):
    """checkpoint-4 lacking one file: resume picks checkpoint-2 and says what checkpoint-4 lacks,
    from the completion record, and without it (older or copied checkpoints) from what a
    checkpoint must hold."""
    extra = () if with_record else (run_dir.COMPLETION_RECORD_NAME,)
    out = _cut_copy(two_checkpoints, tmp_path / "out", _remove(name, *extra))
    cut = os.path.join(out, "checkpoint-4")
    expected = f"{name} is missing"
    if name == "model.safetensors" and not with_record:
        expected = "model weights are missing (no model.safetensors, pytorch_model.bin or sharded index)"
    assert expected in checkpoint_problems(cut)
    with caplog.at_level(logging.WARNING, logger="simpo.run_dir"):
        assert last_complete_checkpoint(out) == os.path.join(out, "checkpoint-2")
    assert f"skipping incomplete checkpoint {cut} (" in caplog.text
    assert expected in caplog.text


@pytest.mark.parametrize("with_record", [True, False], ids=["record", "no-record"])
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "rng_state.pth"])
def test_checkpoint_with_a_file_cut_short_is_skipped(two_checkpoints, tmp_path, caplog, name,
                                                    with_record):
    def cut(path):
        _truncate(name)(path)
        if not with_record:
            os.remove(os.path.join(path, run_dir.COMPLETION_RECORD_NAME))
    out = _cut_copy(two_checkpoints, tmp_path / "out", cut)
    problems = checkpoint_problems(os.path.join(out, "checkpoint-4"))
    assert f"{name} is cut short" in problems
    if with_record:
        assert any(p.startswith(f"{name} has ") and "simpo_checkpoint.json says" in p
                   for p in problems)
    with caplog.at_level(logging.WARNING, logger="simpo.run_dir"):
        assert last_complete_checkpoint(out) == os.path.join(out, "checkpoint-2")
    assert "checkpoint-4" in caplog.text and f"{name} is cut short" in caplog.text


def test_checkpoint_structure_problems(two_checkpoints, tmp_path):
    """What the record cannot tell: trainer_state.json that is not JSON or from another step,
    a sharded index naming a missing shard, DeepSpeed's pointer to a missing or half state."""
    def check(cut, expected, record=False):
        dst = tmp_path / f"case{len(os.listdir(tmp_path))}"

        def full_cut(path):
            if not record:
                os.remove(os.path.join(path, run_dir.COMPLETION_RECORD_NAME))
            cut(path)
        out = _cut_copy(two_checkpoints, dst, full_cut)
        problems = checkpoint_problems(os.path.join(out, "checkpoint-4"))
        assert any(expected in p for p in problems), problems
        assert last_complete_checkpoint(out) == os.path.join(out, "checkpoint-2")

    check(_truncate("trainer_state.json", 0.3), "trainer_state.json is not valid JSON")

    def other_step(path):
        shutil.copyfile(os.path.join(two_checkpoints, "checkpoint-2", "trainer_state.json"),
                        os.path.join(path, "trainer_state.json"))
    check(other_step, "trainer_state.json says global_step 2, not 4")

    def sharded(path):
        os.rename(os.path.join(path, "model.safetensors"),
                  os.path.join(path, "model-00001-of-00002.safetensors"))
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                      "b": "model-00002-of-00002.safetensors"}}, f)
    check(sharded, "weight shard model-00002-of-00002.safetensors (listed in "
                   "model.safetensors.index.json) is missing")

    def deepspeed_half(path):  # DeepSpeed holds the optimizer: only its own files are required
        for name in ("optimizer.pt", "scheduler.pt"):
            os.remove(os.path.join(path, name))
        os.mkdir(os.path.join(path, "global_step4"))
        open(os.path.join(path, "global_step4", "zero_pp_rank_0_mp_rank_00_model_states.pt"), "w").close()
        with open(os.path.join(path, "latest"), "w") as f:
            f.write("global_step4")
    check(deepspeed_half, "global_step4/ holds no *optim_states.pt")

    def deepspeed_pointer(path):
        with open(os.path.join(path, "latest"), "w") as f:
            f.write("global_step4")
    check(deepspeed_pointer, "latest names 'global_step4', which is missing")

    def deepspeed_whole(path):
        deepspeed_half(path)
        open(os.path.join(path, "global_step4", "zero_pp_rank_0_mp_rank_00_optim_states.pt"), "w").close()
    dst = _cut_copy(two_checkpoints, tmp_path / "ds", deepspeed_whole)
    os.remove(os.path.join(dst, "checkpoint-4", run_dir.COMPLETION_RECORD_NAME))
    assert checkpoint_problems(os.path.join(dst, "checkpoint-4")) == []


def test_incomplete_resume_from_checkpoint_is_a_user_error(two_checkpoints, tmp_path, capsys):
    from simpo.train import main

    out = _cut_copy(two_checkpoints, tmp_path / "out", _remove("optimizer.pt"))
    cut = os.path.join(out, "checkpoint-4")
    rc = main(_train_args(tmp_path / "new", 4, "--resume_from_checkpoint", cut))
    err = capsys.readouterr().err
    assert rc == 1
    assert f"simpo-train: error: resume_from_checkpoint {cut} cannot be resumed from: " in err
    assert "optimizer.pt is missing" in err
    assert not os.path.exists(tmp_path / "new" / LOCK_NAME)


# ----------------------------------------------------------------------------- the lock, in process

def test_lock_busy_stale_and_released(tmp_path, caplog):
    out = str(tmp_path / "out")
    lock = acquire_run_lock(out, command=["simpo-train", "--first"])
    with open(os.path.join(out, LOCK_NAME)) as f:
        holder = json.load(f)
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert holder["command"] == ["simpo-train", "--first"] and holder["since"]
    # flock conflicts between two open files even in one process
    with pytest.raises(UserError, match=rf"output_dir {out} is in use by another simpo-train run "
                                        rf"\(pid {os.getpid()} on host .*, running since .*: "
                                        r"simpo-train --first\)\. Wait for it to finish"):
        acquire_run_lock(out)
    lock.release()
    assert not os.path.exists(os.path.join(out, LOCK_NAME))

    with open(os.path.join(out, LOCK_NAME), "w") as f:  # left by a process that died
        json.dump({"pid": 999999, "host": "elsewhere", "since": "2020-01-01 00:00:00 UTC",
                   "command": ["simpo-train"]}, f)
    with caplog.at_level(logging.WARNING, logger="simpo.run_dir"):
        lock = acquire_run_lock(out)
    assert (f"taking over the lock of output_dir {out} left by a run that is no longer running "
            "(pid 999999 on host elsewhere, started 2020-01-01 00:00:00 UTC: simpo-train)"
            ) in caplog.text
    assert lock.previous_holder["pid"] == 999999
    with open(os.path.join(out, LOCK_NAME)) as f:
        assert json.load(f)["pid"] == os.getpid()
    lock.release()


def test_lock_retries_when_the_holder_removes_the_file_meanwhile(tmp_path, monkeypatch):
    """The holder's clean exit unlinks the lock file between our open and our flock: the lock we
    then get is on an orphan file, so the run must start over on the path's new file."""
    out = str(tmp_path / "out")
    path = os.path.join(out, LOCK_NAME)
    real_flock = run_dir.fcntl.flock
    calls = []

    def flock(fd, op):
        calls.append(fd)
        if len(calls) == 1:
            os.unlink(path)  # what a finishing holder's release does
        return real_flock(fd, op)
    monkeypatch.setattr(run_dir.fcntl, "flock", flock)
    lock = acquire_run_lock(out)
    assert len(calls) == 2
    assert os.stat(path).st_ino == os.fstat(lock.fd).st_ino
    lock.release()


def test_unwritable_lock_path_names_the_reason(tmp_path):
    out = tmp_path / "out"
    (out / LOCK_NAME).mkdir(parents=True)  # root ignores permissions: make the open itself fail
    with pytest.raises(UserError, match=rf"output_dir {out} is not writable: Is a directory"):
        acquire_run_lock(str(out))


def test_start_refusals(tmp_path):
    from simpo.run_dir import resolve_start

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match=r"--existing_run fresh starts again from step 0, but "
                                        r"resume_from_checkpoint is /x/checkpoint-2: drop one"):
        resolve_start(str(out), {}, existing_run="fresh", resume_from_checkpoint="/x/checkpoint-2")
    # a previous run that left nothing (it failed before training) is not protected ...
    (out / RUN_CONFIG_NAME).write_text(json.dumps({"training": {"beta": 5.0}}))
    assert resolve_start(str(out), {"training": {"beta": 2.0}}) is None
    # ... one that finished (or left checkpoints) is
    (out / "trainer_state.json").write_text("{}")
    with pytest.raises(UserError, match=r"holds a previous run with other settings \(beta: 2.0 -> 5.0\)"):
        resolve_start(str(out), {"training": {"beta": 5.0}})
    (out / RUN_CONFIG_NAME).write_text("{not json")
    with pytest.raises(UserError, match=rf"holds a previous run with other settings "
                                        rf"\({RUN_CONFIG_NAME}: is not valid JSON"):
        resolve_start(str(out), {"training": {"beta": 2.0}})
    assert resolve_start(str(out), {"training": {"beta": 2.0}}, existing_run="resume_anyway") is None
    with open(out / RUN_CONFIG_NAME) as f:
        assert json.load(f) == {"training": {"beta": 2.0}}
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=rf"output_dir {tmp_path}/file is not a directory"):
        acquire_run_lock(str(tmp_path / "file"))


# ----------------------------------------------------------------------------- real processes

def test_unwritable_output_dir_fails_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "out"
    start = time.monotonic()
    proc = _run(_cli(out, 4))
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert f"simpo-train: error: cannot create output_dir {out}: Not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "train split" not in proc.stdout  # no data was loaded
    assert elapsed < 60, elapsed


def test_crash_at_each_stage_of_a_save_then_rerun_resumes(tmp_path):
    """Each run is killed (os._exit) in one stage of a checkpoint save; the next run into the same
    output_dir takes over the dead run's lock, removes its half-written staging area, resumes from
    the last complete checkpoint and, at the end, finishes."""
    out = tmp_path / "out"
    steps = 14
    previous_pid = None
    for k, stage in enumerate(("weights", "optimizer", "rng", "trainer_state", "before_rename")):
        crash_step = 4 + 2 * k
        proc = _run([sys.executable, WORKER, "--crash_stage", stage, "--crash_step", str(crash_step),
                     "--", *_train_args(out, steps)])
        log = proc.stdout + proc.stderr
        assert proc.returncode == 137, log[-3000:]
        assert f"crash_worker: exiting after {stage} of step {crash_step}" in proc.stdout
        if k == 0:
            assert "resuming from" not in log
        else:
            assert f"resuming from {out}/checkpoint-{crash_step - 4} (step {crash_step - 4})" in log
            assert f"taking over the lock of output_dir {out} left by a run that is no longer " \
                   f"running (pid {previous_pid} on host" in log
            assert f"removing {out}/{run_dir.STAGING_DIR_NAME}" in log
        # the cut checkpoint never got its real name; everything named checkpoint-N is complete
        assert crash_step not in _checkpoints(out)
        assert os.path.isdir(out / run_dir.STAGING_DIR_NAME / f"checkpoint-{crash_step}")
        assert _checkpoints(out) == list(range(2, crash_step, 2))
        assert last_complete_checkpoint(str(out)) == str(out / f"checkpoint-{crash_step - 2}")
        with open(out / LOCK_NAME) as f:  # a killed run cannot clean up its lock file
            previous_pid = json.load(f)["pid"]

    proc = _run(_cli(out, steps))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert f"resuming from {out}/checkpoint-12 (step 12)" not in log
    assert f"resuming from {out}/checkpoint-10 (step 10)" in log
    assert f"no longer running (pid {previous_pid} on host" in log
    assert proc.stdout.count("{'loss'") == 4  # steps 11..14 only
    assert _state(out)["global_step"] == steps
    assert _checkpoints(out) == list(range(2, steps + 1, 2))
    assert all(checkpoint_problems(str(out / f"checkpoint-{s}")) == [] for s in _checkpoints(out))
    assert not os.path.exists(out / run_dir.STAGING_DIR_NAME)
    assert not os.path.exists(out / LOCK_NAME)


def test_sigkill_during_training_then_rerun_resumes(tmp_path):
    """A real SIGKILL after the first checkpoint; the rerun takes over the lock, resumes from the
    newest complete checkpoint and finishes; rotation (save_total_limit) works on real names."""
    out = tmp_path / "out"
    steps = 100
    cmd = _cli(out, steps, "--save_total_limit", "2")
    victim = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not os.path.isdir(out / "checkpoint-2") and victim.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint-2 in time"
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    complete = last_complete_checkpoint(str(out))
    assert complete is not None
    assert int(complete.rsplit("-", 1)[1]) < steps

    proc = _run(cmd)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert f"no longer running (pid {victim.pid} on host" in log
    assert f"resuming from {complete} (step " in log
    assert _state(out)["global_step"] == steps
    assert _checkpoints(out) == [steps - 2, steps]
    assert all(checkpoint_problems(str(out / f"checkpoint-{s}")) == [] for s in _checkpoints(out))
    assert not os.path.exists(out / LOCK_NAME)


def test_one_run_at_a_time_then_reruns_with_other_settings(tmp_path, capsys, caplog):
    """Run B into the output_dir of run A (in progress) is refused naming A; A finishes intact.
    Then reruns into A's output_dir: other settings are refused listing them; the same settings
    after the last step train nothing; resume_anyway continues; fresh starts again from step 0
    with A's outputs moved aside."""
    from simpo.train import main

    out = tmp_path / "out"
    gate = tmp_path / "go"
    a = subprocess.Popen([sys.executable, WORKER, "--wait_for", str(gate), "--",
                          *_train_args(out, 6)], cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # A holds the lock (its record written) and waits at the gate
            assert a.poll() is None and time.monotonic() < deadline
            try:
                with open(out / LOCK_NAME) as f:
                    if json.load(f).get("pid") == a.pid:
                        break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        start = time.monotonic()
        b = _run(_cli(out, 6), timeout=120)
        assert time.monotonic() - start < 60
        assert a.poll() is None  # B gave up while A was still running
        assert b.returncode != 0
        assert f"simpo-train: error: output_dir {out} is in use by another simpo-train run " \
               f"(pid {a.pid} on host {socket.gethostname()}, running since " in b.stderr
        assert "Wait for it to finish (or stop it), or choose another --output_dir" in b.stderr
        assert "Traceback" not in b.stderr
        gate.write_text("")
        a_out, _ = a.communicate(timeout=240)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert a.returncode == 0, a_out[-3000:]
    assert "taking over" not in a_out
    assert _state(out)["global_step"] == 6 and os.path.isfile(out / "model.safetensors")
    assert _checkpoints(out) == [2, 4, 6]
    assert all(checkpoint_problems(str(out / f"checkpoint-{s}")) == [] for s in (2, 4, 6))
    assert not os.path.exists(out / LOCK_NAME)
    with open(out / RUN_CONFIG_NAME) as f:
        config = json.load(f)
    assert config["training"]["beta"] == 2.0 and config["training"]["max_steps"] == 6
    assert config["model"]["tiny_hidden_size"] == 32 and config["data"]["dataset_splits"] == ["train"]
    assert config["recipe"].endswith("tiny.yaml") and config["command"]
    with open(out / "checkpoint-6" / RUN_CONFIG_NAME) as f:
        assert json.load(f)["training"] == config["training"]
    (out / "notes.txt").write_text("the user's own file")
    before = sorted(os.listdir(out))

    # other settings: refused before any work, nothing touched
    capsys.readouterr()
    assert main(_train_args(out, 6, "--beta", "5", "--learning_rate", "1e-2")) == 1
    err = capsys.readouterr().err
    assert f"simpo-train: error: output_dir {out} holds a previous run with other settings (" in err
    assert "beta: 2.0 -> 5.0" in err and "learning_rate: 0.003 -> 0.01" in err
    assert "--existing_run fresh" in err and "--existing_run resume_anyway" in err
    assert "continue from checkpoint-6" in err
    assert sorted(os.listdir(out)) == before

    # the same settings, already at max_steps: says so and trains nothing
    capsys.readouterr()
    assert main(_train_args(out, 6)) == 0
    assert f"simpo-train: nothing left to train: output_dir {out} holds a run that finished at " \
           f"step 6 (max_steps 6 asked for)" in capsys.readouterr().out
    assert _state(out)["global_step"] == 6 and _checkpoints(out) == [2, 4, 6]

    # resume_anyway: continues from checkpoint-6 with the new settings
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="simpo"):
        assert main(_train_args(out, 8, "--beta", "5", "--existing_run", "resume_anyway")) == 0
    assert "beta: 2.0 -> 5.0" in caplog.text and "max_steps: 6 -> 8" in caplog.text
    assert f"resuming from {out}/checkpoint-6 (step 6)" in caplog.text
    assert _state(out)["global_step"] == 8 and _checkpoints(out) == [2, 4, 6, 8]
    with open(out / RUN_CONFIG_NAME) as f:
        assert json.load(f)["training"]["beta"] == 5.0

    # fresh: the previous run's outputs are moved aside, training starts at step 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="simpo"):
        assert main(_train_args(out, 4, "--beta", "3", "--existing_run", "fresh")) == 0
    assert "resuming from" not in caplog.text
    superseded = glob.glob(str(out / "superseded-*"))
    assert len(superseded) == 1 and f"moved the previous run's checkpoints and outputs into " \
                                    f"{superseded[0]}" in caplog.text
    moved = set(os.listdir(superseded[0]))
    assert {"checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8", RUN_CONFIG_NAME,
            "trainer_state.json", "model.safetensors", "train_results.json"} <= moved
    assert (out / "notes.txt").read_text() == "the user's own file"
    state = _state(out)
    assert state["global_step"] == 4 and _checkpoints(out) == [2, 4]
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]
    with open(out / RUN_CONFIG_NAME) as f:
        assert json.load(f)["training"]["beta"] == 3.0


# ----------------------------------------------------------------------------- DeepSpeed ZeRO-3

def test_zero3_two_processes_save_complete_checkpoints(tmp_path):
    """Under DeepSpeed ZeRO-3 every process writes into the checkpoint (its partition of the
    optimizer state, its RNG state): the staged checkpoint is renamed only once all are in."""
    pytest.importorskip("deepspeed")
    model_dir = save_tiny_model(tmp_path / "model")
    work = tmp_path / "w"
    result = run_json([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                       "--master_port", str(free_port()), TRAIN_WORKER, str(tmp_path / "out.json"),
                       "--work_dir", str(work), "--model_dir", model_dir, "--rows", "8", "--steps", "4",
                       "--save_steps", "2", "--deepspeed", os.path.join(ROOT, "tests", "zero3_cpu.json")],
                      tmp_path / "out.json")
    assert result["deepspeed"] and result["world_size"] == 2
    assert result["checkpoint_problems"] == {"checkpoint-2": [], "checkpoint-4": []}
    with open(work / "checkpoint-4" / run_dir.COMPLETION_RECORD_NAME) as f:
        record = json.load(f)
    assert record["world_size"] == 2
    files = record["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "latest", "model.safetensors"} <= set(files)
    assert sum(name.startswith("global_step4/") and name.endswith("optim_states.pt")
               for name in files) == 2
    assert not os.path.exists(work / run_dir.STAGING_DIR_NAME)
    # the DeepSpeed checkpoint without its optimizer partition of rank 1 is incomplete
    victim = [n for n in files if n.startswith("global_step4/") and "rank_1" in n
              and n.endswith("optim_states.pt")][0]
    os.remove(work / "checkpoint-4" / victim)
    assert f"{victim} is missing" in checkpoint_problems(str(work / "checkpoint-4"))
    assert last_complete_checkpoint(str(work)) == str(work / "checkpoint-2")



def test_two_processes_decide_together(tmp_path):
    """Under torchrun only global rank 0 takes the lock and reads output_dir; its decision reaches
    the other rank: both proceed (and save complete checkpoints), or both stop with its error."""
    out = tmp_path / "out"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    proc = _run([*torchrun, "--master_port", str(free_port()), "-m", "simpo.train",
                 *_train_args(out, 4)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "checkpoint-4" / run_dir.COMPLETION_RECORD_NAME) as f:
        record = json.load(f)
    assert record["world_size"] == 2 and {"rng_state_0.pth", "rng_state_1.pth"} <= set(record["files"])
    assert checkpoint_problems(str(out / "checkpoint-4")) == []
    assert not os.path.exists(out / LOCK_NAME)

    # the same settings again: rank 0 finds the run finished, both ranks stop cleanly, one line
    mtime = os.stat(out / "model.safetensors").st_mtime_ns
    proc = _run([*torchrun, "--master_port", str(free_port()), "-m", "simpo.train",
                 *_train_args(out, 4)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("simpo-train: nothing left to train: ") == 1
    assert "train split" not in proc.stdout
    assert os.stat(out / "model.safetensors").st_mtime_ns == mtime
    assert not os.path.exists(out / LOCK_NAME)

    proc = _run([*torchrun, "--master_port", str(free_port()), "-m", "simpo.train",
                 *_train_args(out, 4, "--beta", "4")], timeout=300)
    assert proc.returncode != 0
    error = f"simpo-train: error: output_dir {out} holds a previous run with other settings (beta: 2.0 -> 4.0)"
    assert proc.stderr.count(error) == 2  # each rank stops with rank 0's reason
    assert "train split" not in proc.stdout  # neither loaded any data
