"""A diverged run (a NaN or inf loss or gradient norm) stops at that step, before the optimizer
applies it, with one line naming the step and the last good checkpoint, and exit status 1; nothing
is saved after it and no non-finite loss is ever logged as a finite number.

The CLI runs are real ``python -m simpo.train`` processes (``--learning_rate 1e30``); a loss or a
gradient made non-finite at a chosen step comes from ``tests/crash_worker.py``'s
``nonfinite_compute_loss`` (in process, or on one rank of two under torchrun).
"""

from __future__ import annotations

import ast
import copy
import math
import os
import re
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from simpo import run_dir  # noqa: E402
from simpo.config import SimPOConfig, UserError  # noqa: E402
from simpo.run_dir import LOCK_NAME, checkpoint_problems  # noqa: E402
from tests.crash_worker import nonfinite_compute_loss  # noqa: E402
from tests.multiproc import ROOT, free_port, tiny_rows_and_tokenizer  # noqa: E402
from tests.test_run_dir import WORKER, _checkpoints, _cli, _run, _state, _train_args  # noqa: E402

FSDP2_JSON = os.path.join(ROOT, "configs", "fsdp", "fsdp2.json")
ZERO3_JSON = os.path.join(ROOT, "tests", "zero3_cpu.json")
FINAL_OUTPUTS = ("model.safetensors", "train_results.json", "all_results.json",
                 "trainer_state.json")


def _finite_weights(path) -> bool:
    from safetensors.torch import load_file

    return all(t.isfinite().all().item() for t in load_file(str(path)).values())


def _logged_losses(stdout: str) -> list[float]:
    """The training losses ``simpo-train`` printed, one per logging step (``{'loss': '6.2'...``)."""
    return [float(ast.literal_eval(line)["loss"]) for line in stdout.splitlines()
            if line.startswith("{'loss'")]


def _stop_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("simpo-train: ")]


def _assert_stopped_at(out, step: int, sharded: bool = False) -> None:
    """Nothing after ``step - 1`` was saved: the newest checkpoint is the last even step before
    it, complete and finite (whole weights; FSDP2's sharded ones: complete), every logged loss in
    it finite; no final outputs; lock released."""
    good = [s for s in range(2, step, 2)]
    assert _checkpoints(out) == good
    for s in good:
        path = out / f"checkpoint-{s}"
        assert checkpoint_problems(str(path)) == []
        if not sharded:
            assert _finite_weights(path / "model.safetensors")
        history = _state(path)["log_history"]
        assert [h["step"] for h in history if "loss" in h] == list(range(1, s + 1))
        assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"])
                   for h in history if "loss" in h)
    for name in FINAL_OUTPUTS:
        assert not os.path.exists(out / name), name
    assert not os.path.exists(out / run_dir.STAGING_DIR_NAME)
    assert not os.path.exists(out / LOCK_NAME)


@pytest.mark.parametrize("clip", ["1.0", "0"], ids=["clipped", "no-clipping"])
def test_learning_rate_1e30_stops_at_the_first_nonfinite_step(tmp_path, clip):
    """Step 1 is warm-up (lr 0), step 2 applies lr 1e30, step 3's gradient norm is NaN (its loss
    still finite): the run stops there, before step 3's update, with checkpoint-2 as the last good
    one. Today: NaN weights, the later NaN losses logged as 0 and "done" with exit status 0."""
    out = tmp_path / "out"
    proc = _run(_cli(out, 6, "--learning_rate", "1e30", "--max_grad_norm", clip))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = _stop_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert re.fullmatch(r"simpo-train: error: training diverged at step 3: loss [0-9.]+ "
                        r"\(grad_norm nan\); stopped before its update, the last good checkpoint "
                        rf"is {re.escape(str(out))}/checkpoint-2\. Lower --learning_rate \(now "
                        r"1e\+30\), .*--existing_run resume_anyway \(continue from checkpoint-2\) "
                        r"or fresh \(start again\)", lines[0]), lines[0]
    clipping = "lower --max_grad_norm (now 1)" if clip == "1.0" else \
        "set --max_grad_norm (now 0: no clipping)"
    assert clipping in lines[0]
    assert "Traceback" not in proc.stderr and "done in" not in proc.stdout
    # steps 1 and 2 logged, finite; the diverged step 3 never logged (as 0 or anything else)
    losses = _logged_losses(proc.stdout)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    _assert_stopped_at(out, 3)


@pytest.mark.parametrize("kind,clip,step", [("loss", 1.0, 3), ("grad", 1.0, 3), ("grad", 0.0, 1)],
                         ids=["inf-loss", "nan-grad", "nan-grad-no-clipping-step-1"])
def test_nonfinite_step_is_not_applied(tmp_path, monkeypatch, kind, clip, step):
    """An inf loss with finite gradients, or a finite loss with NaN gradients (clipping on or off),
    at optimizer step ``step``: TrainingDiverged names it, and the weights are exactly those
    before it (checkpoint-2's, or the initial ones at step 1): its update was not applied."""
    import torch
    from safetensors.torch import load_file

    from simpo.data import prepare_dataset
    from simpo.modeling import build_tiny_model
    from simpo.trainer import SimPOTrainer

    monkeypatch.setattr(SimPOTrainer, "compute_loss",
                        nonfinite_compute_loss(SimPOTrainer.compute_loss, kind, step))
    out = tmp_path / "out"
    raw, tok = tiny_rows_and_tokenizer(24)
    torch.manual_seed(0)
    args = SimPOConfig(output_dir=str(out), use_cpu=True, report_to="none", max_steps=5,
                       per_device_train_batch_size=4, save_strategy="steps", save_steps=2,
                       logging_steps=1, max_grad_norm=clip, learning_rate=1e-2,
                       max_length=64, max_prompt_length=32, disable_tqdm=True, seed=0)
    model = build_tiny_model(tok, hidden_size=32)
    initial = copy.deepcopy(model.state_dict())
    trainer = SimPOTrainer(model=model, args=args, train_dataset=prepare_dataset(raw, tok, args),
                           processing_class=tok)
    with pytest.raises(UserError) as caught:  # today: trains on, no error
        trainer.train()
    assert type(caught.value).__name__ == "TrainingDiverged" and caught.value.exit_code == 1
    message = str(caught.value)
    value = r"[0-9.]+"
    expected = (rf"loss inf \(grad_norm {value}\)" if kind == "loss"
                else rf"loss {value} \(grad_norm nan\)")
    assert re.match(rf"training diverged at step {step}: {expected}; stopped before its update, ",
                    message), message
    assert trainer.state.global_step == step - 1
    if step > 2:
        assert f"the last good checkpoint is {out}/checkpoint-2." in message
        before = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    else:
        assert "no checkpoint was saved before it" in message
        before = initial
    now = trainer.model.state_dict()
    moved = max((now[k] - initial[k]).abs().max().item() for k in before)
    assert (moved > 0) == (step > 1)  # the good steps did train
    for name, tensor in before.items():
        assert torch.equal(now[name], tensor), name
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == list(range(1, step))
    _assert_stopped_at(out, step)
    assert args.logging_nan_inf_filter is False  # a NaN loss is logged as NaN, never as a number


@pytest.mark.parametrize("kind,extra", [
    ("loss", []), ("grad", ["--fsdp", "true", "--fsdp_config", FSDP2_JSON]),
    ("grad", ["--deepspeed", ZERO3_JSON])], ids=["ddp", "fsdp2", "zero3"])
def test_two_ranks_stop_at_the_same_step(tmp_path, kind, extra):
    """Only rank 1's step 3 is non-finite. DDP, an inf loss with finite gradients: rank 0's loss
    and the reduced gradient norm are finite, only the all-reduced flag stops rank 0. FSDP2
    (sharded gradient norm, a DTensor) and DeepSpeed ZeRO-3 (the engine's norm; it steps inside
    backward, before the check), NaN gradients. Both ranks stop at step 3, each with the one
    line, and neither goes on to the next step (which would wait for the other rank)."""
    if "--deepspeed" in extra:
        pytest.importorskip("deepspeed")
    out = tmp_path / "out"
    # torchrun stops the other workers as soon as it sees one fail: polling every 3 s (not 0.1 s)
    # gives rank 0 time to print its line after rank 1 exited, however busy the machine
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                 "--monitor_interval", "3",
                 "--master_port", str(free_port()), WORKER, "--nonfinite", kind,
                 "--nonfinite_step", "3", "--nonfinite_rank", "1", "--",
                 *_train_args(out, 6, *extra)], timeout=300)
    assert proc.returncode != 0
    lines = _stop_lines(proc.stderr)
    assert len(lines) == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    # DDP: the loss is the mean over the ranks (inf), the gradient norm finite; FSDP2 and ZeRO-3:
    # a non-finite norm (DeepSpeed's is inf: it found the NaN gradients and skipped its step)
    shown = (r"loss inf \(grad_norm [0-9.]+\)" if kind == "loss"
             else r"loss [0-9.]+ \(grad_norm (nan|inf)\)")
    stopped = "stopped before any save" if "--deepspeed" in extra else "stopped before its update"
    for line in lines:
        assert re.match(rf"simpo-train: error: training diverged at step 3: {shown}; {stopped}, ",
                        line), line
        assert f"the last good checkpoint is {out}/checkpoint-2." in line
    assert len(_logged_losses(proc.stdout)) == 2
    _assert_stopped_at(out, 3, sharded="--fsdp" in extra)
    assert os.path.isfile(out / "checkpoint-2" / "rng_state_1.pth")  # a 2-process checkpoint
