"""``simpo-train`` with a fault or a pause injected, for the run-directory tests:

    python tests/crash_worker.py [--crash_stage STAGE --crash_step N] [--wait_for FILE] -- ARGS...

runs ``simpo.train.main(ARGS)`` in this process after patching:

* ``--crash_stage``: the save of ``checkpoint-N`` ends the process with ``os._exit(137)`` (no
  cleanup, as a kill would) right after one of its stages: ``weights`` (model files written),
  ``optimizer`` (optimizer and scheduler), ``rng`` (RNG states), ``trainer_state``
  (trainer_state.json) or ``before_rename`` (completion record written, not yet renamed to
  ``checkpoint-N``). It prints ``crash_worker: exiting after STAGE of step N`` first.
* ``--wait_for``: training waits, holding the output_dir lock, until FILE exists (at most 120 s),
  so that a test can run a second command against a run that is certainly in progress.
* ``--nonfinite loss|grad --nonfinite_step N [--nonfinite_rank R]``: optimizer step N (1-based)
  gets an inf loss with finite gradients (``loss``) or a finite loss with NaN gradients
  (``grad``), on every process or on global rank R only (see :func:`nonfinite_compute_loss`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STAGES = ("weights", "optimizer", "rng", "trainer_state", "before_rename")


def _exit(stage: str, step: int) -> None:
    print(f"crash_worker: exiting after {stage} of step {step}", flush=True)
    sys.stderr.flush()
    os._exit(137)


def _patch_crash(stage: str, step: int) -> None:
    from transformers.trainer_callback import TrainerState

    import simpo.trainer as trainer_module
    from simpo.trainer import SimPOTrainer

    def after(method_name):
        original = getattr(SimPOTrainer, method_name)

        def patched(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            # save_model also writes the final model after training: only its checkpoint calls count
            checkpoint_call = method_name != "save_model" or kwargs.get("_internal_call")
            if checkpoint_call and self.state.global_step == step:
                _exit(stage, step)
            return result
        setattr(SimPOTrainer, method_name, patched)

    if stage == "weights":
        after("save_model")
    elif stage == "optimizer":
        after("_save_optimizer_and_scheduler")
    elif stage == "rng":
        after("_save_rng_state")
    elif stage == "trainer_state":
        original_save = TrainerState.save_to_json

        def save_to_json(self, json_path):
            original_save(self, json_path)
            if os.path.basename(os.path.dirname(json_path)) == f"checkpoint-{step}":
                _exit(stage, step)
        TrainerState.save_to_json = save_to_json
    elif stage == "before_rename":
        original_publish = trainer_module.run_dir.publish_checkpoint

        def publish(staging, final):
            if os.path.basename(final) == f"checkpoint-{step}":
                _exit(stage, step)
            original_publish(staging, final)
        trainer_module.run_dir.publish_checkpoint = publish
    else:
        raise SystemExit(f"unknown stage {stage!r} (one of {', '.join(STAGES)})")


def _patch_wait(path: str) -> None:
    from simpo.trainer import SimPOTrainer

    original_train = SimPOTrainer.train

    def train(self, *args, **kwargs):
        deadline = time.monotonic() + 120
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        return original_train(self, *args, **kwargs)
    SimPOTrainer.train = train


def nonfinite_compute_loss(original, kind: str, step: int, rank=None):
    """``SimPOTrainer.compute_loss`` made non-finite at optimizer step ``step`` (training only):
    ``loss`` adds inf to the loss (its gradients stay finite), ``grad`` leaves the loss alone and
    makes its gradients NaN; on global rank ``rank`` only, or on every rank if None."""
    import torch

    class _NanGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = original(self, model, inputs, return_outputs, num_items_in_batch)
        if not model.training or self.state.global_step + 1 != step \
                or rank not in (None, self.args.process_index):
            return result
        loss, outputs = result if return_outputs else (result, None)
        loss = loss + float("inf") if kind == "loss" else _NanGradient.apply(loss)
        return (loss, outputs) if return_outputs else loss
    return compute_loss


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--crash_stage", choices=STAGES)
    p.add_argument("--crash_step", type=int)
    p.add_argument("--wait_for")
    p.add_argument("--nonfinite", choices=("loss", "grad"))
    p.add_argument("--nonfinite_step", type=int)
    p.add_argument("--nonfinite_rank", type=int)
    a = p.parse_args(argv[:split])
    if a.crash_stage:
        _patch_crash(a.crash_stage, a.crash_step)
    if a.wait_for:
        _patch_wait(a.wait_for)
    if a.nonfinite:
        from simpo.trainer import SimPOTrainer

        SimPOTrainer.compute_loss = nonfinite_compute_loss(
            SimPOTrainer.compute_loss, a.nonfinite, a.nonfinite_step, a.nonfinite_rank)
    from simpo.train import main as train_main

    return train_main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
