"""Reruns into an existing run: what is compared (data content, process count and global batch,
every setting but the ignored ones, a foreign checkpoint's recorded settings), what is allowed
(extending the run, resume_anyway with a new learning rate: both train with the rate they say),
what cannot be resumed (save_only_model checkpoints), the whole run's train_loss after a resume,
and finished runs (detected from their final record, left untouched).

Real ``python -m simpo.train`` processes with the tiny model (32 rows, a few steps each);
``tests/crash_worker.py`` stops a run after a checkpoint, as a kill would.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from simpo import run_dir  # noqa: E402
from simpo.config import parse_args  # noqa: E402
from simpo.run_dir import (RUN_CONFIG_NAME, config_differences,  # noqa: E402
                           last_complete_checkpoint, run_config)
from tests.multiproc import ROOT, free_port  # noqa: E402
from tests.test_run_dir import WORKER, _checkpoints, _run, _state  # noqa: E402
from tests.test_run_dir import FAST as RUN_DIR_FAST  # noqa: E402

# 32 rows, 8 pairs per step: 4 steps per epoch; a checkpoint every 2 steps
FAST = [*RUN_DIR_FAST, "--max_train_samples", "32"]
FINAL_RECORD_NAME = "simpo_run_finished.json"  # run_dir.FINAL_RECORD_NAME: a finished run's record


def _args(out, steps, *extra):
    return ["--max_steps", str(steps), *FAST, "--output_dir", str(out), *extra]


def _train(out, steps, *extra, timeout=240):
    return _run([sys.executable, "-m", "simpo.train", *_args(out, steps, *extra)], timeout=timeout)


def _train_without_checkpoints(out, steps):
    """As the embedded default: the recipe's save_strategy "no"."""
    args = _args(out, steps)
    i = args.index("--save_strategy")
    return _run([sys.executable, "-m", "simpo.train", *args[:i], *args[i + 4:]])


def _ok(proc):
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


def _json(path):
    with open(path) as f:
        return json.load(f)


def _snapshot(out):
    """Every file below ``out`` with its size and modification time."""
    return {os.path.relpath(os.path.join(root, n), out): (os.path.getsize(os.path.join(root, n)),
                                                          os.stat(os.path.join(root, n)).st_mtime_ns)
            for root, _, names in os.walk(out) for n in names}


def _lrs(out):
    return {h["step"]: h["learning_rate"] for h in _state(out)["log_history"] if "loss" in h}


def _expected_lrs(learning_rate, steps):
    """learning_rate x the tiny recipe's schedule (cosine, warmup 0.1 of the steps) for a run of
    ``steps`` steps: the lr each step trains with, as the Trainer logs it."""
    import torch
    from transformers import get_scheduler

    from simpo.config import SimPOConfig

    warmup = SimPOConfig(output_dir="/tmp/unused", use_cpu=True, warmup_steps=0.1,
                         report_to="none").get_warmup_steps(steps)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=learning_rate)
    sched = get_scheduler("cosine", opt, num_warmup_steps=warmup, num_training_steps=steps)
    out = {}
    for step in range(1, steps + 1):
        out[step] = sched.get_last_lr()[0]
        opt.step()
        sched.step()
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run with checkpoint-2 and checkpoint-4 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    _ok(_train(out, 4))
    assert _checkpoints(out) == [2, 4]
    return out


def _copy(finished, tmp_path, name="out"):
    dst = tmp_path / name
    shutil.copytree(finished, dst)
    return dst


def _crash_after_checkpoint_2(out, steps, *extra):
    """Run ``steps`` steps, killed while publishing checkpoint-4: checkpoint-2 is the last."""
    proc = _run([sys.executable, WORKER, "--crash_stage", "before_rename", "--crash_step", "4",
                 "--", *_args(out, steps, *extra)])
    assert proc.returncode == 137, (proc.stdout + proc.stderr)[-3000:]
    assert _checkpoints(out) == [2]
    assert not os.path.exists(out / FINAL_RECORD_NAME)  # a run that stopped early is not finished


# ----------------------------------------------------------------------------- 3: data content

def test_data_fingerprint_covers_every_local_file(tmp_path):
    """The shipped data (dataset_name unset), a directory and a {split} pattern: each file the run
    reads, with its size and sha256; a hub dataset: nothing to hash."""
    _, data_args, _, _ = parse_args(["--use_cpu", "true"])
    prints = run_dir.data_fingerprint(data_args)
    shipped = os.path.join(ROOT, "simpo", "data")
    assert sorted(prints) == ["test", "train"]
    for split in ("train", "test"):
        path = os.path.join(shipped, f"{split}.jsonl")
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        assert prints[split] == {"path": path, "size": os.path.getsize(path), "sha256": digest}
    pattern = str(tmp_path / "{split}.jsonl")
    for split in ("train", "test"):
        shutil.copyfile(os.path.join(shipped, f"{split}.jsonl"), tmp_path / f"{split}.jsonl")
    for name in (pattern, str(tmp_path)):
        _, data_args, _, _ = parse_args(["--use_cpu", "true", "--dataset_name", name])
        got = run_dir.data_fingerprint(data_args)
        assert {s: v["sha256"] for s, v in got.items()} == {s: v["sha256"] for s, v in prints.items()}
        assert got["train"]["path"] == str(tmp_path / "train.jsonl")
    _, data_args, _, _ = parse_args(["--use_cpu", "true", "--dataset_name", "org/some-hub-data"])
    assert run_dir.data_fingerprint(data_args) == {}


def test_changed_data_content_is_refused(tmp_path):
    """Same path, chosen and rejected swapped (same size): the rerun is refused, naming the file."""
    data = tmp_path / "train.jsonl"
    shutil.copyfile(os.path.join(ROOT, "simpo", "data", "train.jsonl"), data)
    out = tmp_path / "out"
    _ok(_train(out, 4, "--dataset_name", str(data)))
    before = hashlib.sha256(data.read_bytes()).hexdigest()
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    with open(data, "w") as f:
        for row in rows:
            f.write(json.dumps({**row, "chosen": row["rejected"], "rejected": row["chosen"]}) + "\n")
    after = hashlib.sha256(data.read_bytes()).hexdigest()
    snapshot = _snapshot(out)

    proc = _train(out, 6, "--dataset_name", str(data))
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert (f"simpo-train: error: output_dir {out} holds a previous run with other settings "
            f"(max_steps: 4 -> 6; data file train.jsonl (split 'train'): content changed (sha256 "
            f"{before[:12]}.. -> {after[:12]}..))") in proc.stderr
    assert "Traceback" not in proc.stderr and "train split" not in proc.stdout
    assert _snapshot(out) == snapshot
    recorded = _json(out / RUN_CONFIG_NAME)["data_files"]["train"]
    assert recorded == {"path": str(data), "size": os.path.getsize(data), "sha256": before}


# ----------------------------------------------------------------------------- 4: world size

def test_resume_under_another_process_count_is_refused(finished, tmp_path):
    """A 1-process run resumed under torchrun --nproc_per_node 2: refused before any data is
    loaded, naming the process count and the global batch (8 -> 16), on both ranks."""
    out = _copy(finished, tmp_path)
    snapshot = _snapshot(out)
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                 "--master_port", str(free_port()), "-m", "simpo.train", *_args(out, 6)], timeout=300)
    assert proc.returncode != 0
    error = (f"simpo-train: error: output_dir {out} holds a previous run with other settings "
             f"(max_steps: 4 -> 6; world_size: 1 -> 2; global batch: 8 -> 16)")
    assert proc.stderr.count(error) == 2, proc.stderr[-3000:]
    assert "train split" not in proc.stdout
    assert _snapshot(out) == snapshot


def test_checkpoint_world_size_is_compared_for_older_configurations(finished, tmp_path):
    """A run configuration without the process count (older runs): the checkpoint's completion
    record tells."""
    out = _copy(finished, tmp_path)
    config = _json(out / RUN_CONFIG_NAME)
    del config["distributed"]
    run_dir.write_run_config(str(out), config)
    os.remove(out / FINAL_RECORD_NAME)
    new = dict(config, distributed={"world_size": 2, "global_batch": 16})
    with pytest.raises(run_dir.UserError, match=r"other settings \(world_size: 1 -> 2 \(checkpoint-4 "
                                                r"was saved by 1 process\(es\)\)\)"):
        run_dir.resolve_start(str(out), new)


# ----------------------------------------------------------------------------- 5, 9: lr schedule

def test_resume_anyway_with_a_new_learning_rate_trains_with_it(tmp_path):
    """The warning says the new rate applies, and it does: from the resumed step on, lr is the new
    rate x the schedule, as if the run had had that rate from the start."""
    out = tmp_path / "out"
    _crash_after_checkpoint_2(out, 8)
    log = _ok(_train(out, 8, "--learning_rate", "1e-2", "--existing_run", "resume_anyway"))
    assert "continuing with settings that differ from the previous run's: learning_rate: " \
           "0.003 -> 0.01" in log
    assert f"resuming from {out}/checkpoint-2 (step 2)" in log
    lrs = _lrs(out)
    assert sorted(lrs) == list(range(1, 9))
    expected_old, expected_new = _expected_lrs(3e-3, 8), _expected_lrs(1e-2, 8)
    for step in (1, 2):
        assert lrs[step] == pytest.approx(expected_old[step], rel=1e-12, abs=1e-15)
    for step in range(3, 9):
        assert lrs[step] == pytest.approx(expected_new[step], rel=1e-12, abs=1e-15), step
    assert _json(out / RUN_CONFIG_NAME)["training"]["learning_rate"] == 1e-2


def test_extending_a_finished_run(finished, tmp_path, capsys):
    """Raising max_steps continues a finished run without --existing_run, says once that the lr
    schedule is recomputed, and trains steps 5..8 with the 8-step schedule; the run configuration
    is updated. Another difference is still refused; lowering max_steps: nothing to train."""
    from simpo.train import main

    out = _copy(finished, tmp_path)
    proc = _train(out, 8, "--beta", "3")
    assert proc.returncode == 1
    assert "other settings (max_steps: 4 -> 8; beta: 2.0 -> 3.0)" in proc.stderr
    # what the restored optimizer state would silently override: refused even with resume_anyway
    capsys.readouterr()
    assert main(_args(out, 8, "--weight_decay", "0.1", "--existing_run", "resume_anyway")) == 1
    assert ("simpo-train: error: weight_decay: 0.0 -> 0.1: checkpoint-4's optimizer state keeps "
            "the earlier value(s), so the change would not take effect") in capsys.readouterr().err

    log = _ok(_train(out, 8))
    assert log.count("max_steps: 4 -> 8: the run continues from step 4 to the new length; the "
                     "learning-rate schedule is recomputed for it") == 1
    assert f"resuming from {out}/checkpoint-4 (step 4)" in log
    lrs, expected = _lrs(out), _expected_lrs(3e-3, 8)
    assert sorted(lrs) == list(range(1, 9))
    for step in range(5, 9):
        assert lrs[step] == pytest.approx(expected[step], rel=1e-12, abs=1e-15), step
    assert _state(out)["global_step"] == 8 and _checkpoints(out) == [2, 4, 6, 8]
    assert _json(out / RUN_CONFIG_NAME)["training"]["max_steps"] == 8
    assert _json(out / FINAL_RECORD_NAME)["global_step"] == 8

    snapshot = _snapshot(out)
    proc = _train(out, 6)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert (f"simpo-train: nothing left to train: output_dir {out} holds a run that finished at "
            f"step 8 (max_steps 6 asked for)") in proc.stdout
    assert _snapshot(out) == snapshot


# ----------------------------------------------------------------------------- 6: foreign checkpoint

def test_resume_from_another_runs_checkpoint_compares_its_settings(finished, tmp_path, capsys):
    from simpo.train import main

    foreign = str(finished / "checkpoint-2")
    new = tmp_path / "new"
    assert main(_args(new, 4, "--resume_from_checkpoint", foreign, "--beta", "5")) == 1
    err = capsys.readouterr().err
    assert f"simpo-train: error: output_dir {new} holds a previous run with other settings " \
           f"(beta: 2.0 -> 5.0)" in err
    assert "continue from checkpoint-2 with the new settings" in err
    assert not (new / RUN_CONFIG_NAME).exists()

    # a checkpoint that records no settings (an older or another tool's): refused, unless asked for
    bare = tmp_path / "bare" / "checkpoint-2"
    shutil.copytree(foreign, bare)
    os.remove(bare / RUN_CONFIG_NAME)
    os.remove(bare / run_dir.COMPLETION_RECORD_NAME)
    assert main(_args(tmp_path / "new2", 4, "--resume_from_checkpoint", str(bare))) == 1
    err = capsys.readouterr().err
    assert f"settings ({bare} records no settings to compare with ({RUN_CONFIG_NAME} is " \
           f"missing))" in err
    log = _ok(_train(tmp_path / "new2", 4, "--resume_from_checkpoint", str(bare),
                     "--existing_run", "resume_anyway"))
    assert f"continuing with settings that differ from the previous run's: {bare} records no " \
           f"settings to compare with" in log
    assert f"resuming from {bare} (step 2)" in log

    # the same settings: resumed, steps 3..4 only
    proc = _train(tmp_path / "same", 4, "--resume_from_checkpoint", foreign)
    log = _ok(proc)
    assert f"resuming from {foreign} (step 2)" in log
    assert [h["step"] for h in _state(tmp_path / "same")["log_history"] if "loss" in h] == [1, 2, 3, 4]
    assert _state(tmp_path / "same")["log_history"][-1]["train_loss"] == \
        _state(finished)["log_history"][-1]["train_loss"]


# ----------------------------------------------------------------------------- 7: save_only_model

def test_save_only_model_checkpoints_are_not_resumed(tmp_path):
    out = tmp_path / "out"
    _ok(_train(out, 4, "--save_only_model", "true"))
    assert _checkpoints(out) == [2, 4]
    snapshot = _snapshot(out)
    # extending needs a checkpoint to continue from: model-only ones are refused, not restarted
    proc = _train(out, 6, "--save_only_model", "true")
    assert proc.returncode == 1
    assert (f"simpo-train: error: output_dir {out} holds only checkpoints saved with "
            f"save_only_model (checkpoint-2, checkpoint-4): they have no optimizer, scheduler or "
            f"RNG state to resume from. Start again with --existing_run fresh") in proc.stderr
    assert _snapshot(out) == snapshot
    # named explicitly
    proc = _train(tmp_path / "new", 6, "--resume_from_checkpoint", str(out / "checkpoint-4"))
    assert proc.returncode == 1
    assert (f"simpo-train: error: resume_from_checkpoint {out}/checkpoint-4 was saved with "
            f"save_only_model: it holds the model weights but no optimizer, scheduler or RNG "
            f"state, so training cannot continue from it. To start a new run from its weights: "
            f"--model_name_or_path {out}/checkpoint-4") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_newest_model_only_checkpoint_is_skipped_with_a_warning(finished, tmp_path, caplog):
    import logging

    out = _copy(finished, tmp_path)
    record_path = out / "checkpoint-4" / run_dir.COMPLETION_RECORD_NAME
    record = _json(record_path)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        os.remove(out / "checkpoint-4" / name)
        del record["files"][name]
    record["save_only_model"] = True
    record_path.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="simpo.run_dir"):
        assert last_complete_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert (f"skipping checkpoint {out}/checkpoint-4: saved with save_only_model, it has no "
            "optimizer, scheduler or RNG state to resume from; trying an earlier one") in caplog.text


# ----------------------------------------------------------------------------- 8: compared keys

def test_every_setting_that_changes_results_is_compared(tmp_path):
    def config(*extra):
        model_args, data_args, args, recipe = parse_args(
            ["--use_cpu", "true", "--output_dir", str(tmp_path), *extra])
        return run_config(model_args, data_args, args, recipe)

    base = config()
    for flags, expected in (
            (["--neftune_noise_alpha", "5"], "neftune_noise_alpha: null -> 5.0"),
            (["--dataloader_drop_last", "true"], "dataloader_drop_last: false -> true"),
            (["--attn_implementation", "sdpa"], "attn_implementation: eager -> sdpa"),
            (["--tokenizer_name_or_path", "google/gemma-2-9b-it"],
             "tokenizer_name_or_path: null -> google/gemma-2-9b-it"),
            (["--auto_insert_empty_system_msg", "false"], "auto_insert_empty_system_msg: true -> false"),
            (["--per_device_train_batch_size", "4"],
             "per_device_train_batch_size: 8 -> 4; global batch: 8 -> 4")):
        got = "; ".join(config_differences(base, config(*flags)))
        assert got == expected, (flags, got)
    ignored = config("--logging_steps", "3", "--save_steps", "7", "--save_strategy", "steps",
                     "--eval_steps", "9", "--loss_backend", "torch", "--plot", "false",
                     "--disable_tqdm", "true", "--dataloader_num_workers", "2",
                     "--logit_metrics", "none", "--existing_run", "resume_anyway",
                     "--save_only_model", "true", "--per_device_eval_batch_size", "3",
                     "--padding_free", "true")  # padding_free: the same numbers, packed
    assert config_differences(base, ignored) == []
    # a setting nobody listed (a future transformers field) is compared by default
    future = json.loads(json.dumps(base))
    future["training"]["some_new_option"] = 1
    changed = json.loads(json.dumps(future))
    changed["training"]["some_new_option"] = 2
    assert config_differences(future, changed) == ["some_new_option: 1 -> 2"]
    assert config_differences(base, changed) == []  # recorded by one side only: not compared
    # every ignored key is a real setting (a misspelt one would silently compare it): a field of
    # this transformers, or a name of a renamed one (transformers 5.17, the GPU image's, has
    # gradient_checkpointing but not yet its new name activation_checkpointing)
    import dataclasses

    from simpo.config import ALIASES, ARG_CLASSES
    fields = {f.name for cls in ARG_CLASSES for f in dataclasses.fields(cls)}
    assert run_dir.IGNORED_KEYS - fields - set(ALIASES) - set(ALIASES.values()) == set()
    assert "activation_checkpointing" in run_dir.IGNORED_KEYS and "gradient_checkpointing" in run_dir.IGNORED_KEYS


# ----------------------------------------------------------------------------- 11: train_loss

def test_train_loss_after_a_resume_is_the_whole_runs(finished, tmp_path):
    """Killed after checkpoint-2 and rerun: train_loss is exactly the uninterrupted run's, not the
    mean of steps 3..4; a run killed after its last checkpoint (no final outputs) gets the same
    figure when rerun, not 0.0; a finished run's results are never rewritten."""
    reference = _json(finished / "train_results.json")["train_loss"]
    assert reference == _state(finished)["log_history"][-1]["train_loss"]
    out = tmp_path / "out"
    _crash_after_checkpoint_2(out, 4)
    _ok(_train(out, 4))
    assert [h["step"] for h in _state(out)["log_history"] if "loss" in h] == [1, 2, 3, 4]
    assert _json(out / "train_results.json")["train_loss"] == reference
    assert _json(out / "all_results.json")["train_loss"] == reference
    assert _state(out)["log_history"][-1]["train_loss"] == reference

    # killed after checkpoint-4 was published, before the final outputs
    late = _copy(finished, tmp_path, "late")
    for name in (FINAL_RECORD_NAME, "train_results.json", "all_results.json", "trainer_state.json",
                 "model.safetensors"):
        os.remove(late / name)
    log = _ok(_train(late, 4))
    assert "checkpoint-4 already completed the max_steps 4 asked for: nothing left to train; " \
           "writing the run's final outputs from it" in log
    assert _json(late / "train_results.json")["train_loss"] == reference
    assert _json(late / FINAL_RECORD_NAME)["global_step"] == 4


# ----------------------------------------------------------------------------- 12: finished runs

def test_finished_run_without_checkpoints_is_left_untouched(tmp_path):
    """The embedded default saves no checkpoint: its rerun says there is nothing left to train and
    changes nothing; a longer run cannot continue it (no checkpoint) and says how to start again."""
    out = tmp_path / "out"
    _ok(_train_without_checkpoints(out, 4))
    assert _checkpoints(out) == []
    snapshot = _snapshot(out)
    proc = _train_without_checkpoints(out, 4)
    assert proc.returncode == 0 and proc.stderr.count("simpo-train") == 0
    assert [line for line in proc.stdout.splitlines() if line.startswith("simpo-train:")] == [
        f"simpo-train: nothing left to train: output_dir {out} holds a run that finished at step 4 "
        f"(max_steps 4 asked for); its outputs are left as they are. To train more, start again "
        f"with --existing_run fresh (it saved no checkpoint to continue from)"]
    assert "train split" not in proc.stdout  # nothing loaded
    assert _snapshot(out) == snapshot

    proc = _train_without_checkpoints(out, 6)
    assert proc.returncode == 1
    assert (f"simpo-train: error: output_dir {out} holds a run that finished at step 4 without "
            f"saving a checkpoint, so it cannot be continued to max_steps 6: rerun with "
            f"--existing_run fresh") in proc.stderr
    assert _snapshot(out) == snapshot
    record = _json(out / FINAL_RECORD_NAME)
    assert record["global_step"] == 4 and record["max_steps"] == 4


def test_finished_checkpointed_run_is_left_untouched(finished, tmp_path):
    out = _copy(finished, tmp_path)
    snapshot = _snapshot(out)
    proc = _train(out, 4)
    assert proc.returncode == 0
    assert "simpo-train: nothing left to train: " in proc.stdout
    assert "To train more, raise --max_steps or --num_train_epochs (it continues from its last " \
           "checkpoint), or start again with --existing_run fresh" in proc.stdout
    assert _snapshot(out) == snapshot
    assert _json(out / FINAL_RECORD_NAME)["global_step"] == 4
    # --existing_run fresh moves the finished run (with its final record) aside
    _ok(_train(out, 2, "--existing_run", "fresh"))
    moved = glob.glob(str(out / "superseded-*" / FINAL_RECORD_NAME))
    assert len(moved) == 1 and _json(out / FINAL_RECORD_NAME)["global_step"] == 2
    assert math.isfinite(_json(out / "train_results.json")["train_loss"])
