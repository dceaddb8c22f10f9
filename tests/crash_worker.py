"""``simpo-train`` with a fault or a pause injected, for the run-directory and signal tests:

    python tests/crash_worker.py [--crash_stage STAGE --crash_step N] [--wait_for FILE]
        [--pause_at_step N --pause_file FILE] [--signal_stage STAGE --signal_step N --signal SIG]
        [--fsize_limit_at_step N --fsize_limit BYTES] -- ARGS...

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
* ``--pause_at_step``: when step N is done and step N+1 about to start, global rank 0 writes its
  pid into ``--pause_file`` and waits until the test removes that file (at most 120 s): a signal
  the test sends meanwhile certainly lands inside step N+1.
* ``--signal_stage``: the save of ``checkpoint-N`` sends SIG (``SIGTERM``, ``SIGINT``) to this
  process right after STAGE (as ``--crash_stage``), printing ``crash_worker: SIG after STAGE of
  step N`` first: a second signal while the checkpoint of a stop is written.
* ``--fsize_limit_at_step``: from the save of ``checkpoint-N`` on, this process may write files of
  at most BYTES (``RLIMIT_FSIZE``, SIGXFSZ ignored): its writes then fail with EFBIG, as on a
  full disk, without needing a small filesystem.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STAGES = ("weights", "optimizer", "rng", "trainer_state", "before_rename")


def _exit(stage: str, step: int) -> None:
    print(f"crash_worker: exiting after {stage} of step {step}", flush=True)
    sys.stderr.flush()
    os._exit(137)


def _patch_crash(stage: str, step: int, action=None) -> None:
    """Call ``action`` (default: exit as a kill would) after ``stage`` of the save of step ``step``."""
    from transformers.trainer_callback import TrainerState

    if action is None:
        def action():
            _exit(stage, step)

    import simpo.trainer as trainer_module
    from simpo.trainer import SimPOTrainer

    def after(method_name):
        original = getattr(SimPOTrainer, method_name)

        def patched(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            # save_model also writes the final model after training: only its checkpoint calls count
            checkpoint_call = method_name != "save_model" or kwargs.get("_internal_call")
            if checkpoint_call and self.state.global_step == step:
                action()
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
                action()
        TrainerState.save_to_json = save_to_json
    elif stage == "before_rename":
        original_publish = trainer_module.run_dir.publish_checkpoint

        def publish(staging, final):
            if os.path.basename(final) == f"checkpoint-{step}":
                action()
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


def _patch_pause(step: int, path: str) -> None:
    from simpo.trainer import SimPOTrainer

    original = SimPOTrainer.training_step
    paused = []

    def training_step(self, *args, **kwargs):
        if self.state.global_step == step and not paused and self.is_world_process_zero():
            paused.append(True)
            with open(path + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(path + ".tmp", path)  # the test never reads a half-written pid
            deadline = time.monotonic() + 120
            while os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.02)
        return original(self, *args, **kwargs)
    SimPOTrainer.training_step = training_step


def _signal_action(name: str, stage: str, step: int):
    def action():
        print(f"crash_worker: {name} after {stage} of step {step}", flush=True)
        os.kill(os.getpid(), getattr(signal, name))
    return action


def _patch_fsize_limit(step: int, limit: int) -> None:
    from simpo.trainer import SimPOTrainer

    original = SimPOTrainer._save_checkpoint

    def save_checkpoint(self, *args, **kwargs):
        if self.state.global_step >= step:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return original(self, *args, **kwargs)
    SimPOTrainer._save_checkpoint = save_checkpoint


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
    p.add_argument("--pause_at_step", type=int)
    p.add_argument("--pause_file")
    p.add_argument("--signal_stage", choices=STAGES)
    p.add_argument("--signal_step", type=int)
    p.add_argument("--signal", choices=("SIGTERM", "SIGINT"))
    p.add_argument("--fsize_limit_at_step", type=int)
    p.add_argument("--fsize_limit", type=int)
    a = p.parse_args(argv[:split])
    if a.crash_stage:
        _patch_crash(a.crash_stage, a.crash_step)
    if a.wait_for:
        _patch_wait(a.wait_for)
    if a.nonfinite:
        from simpo.trainer import SimPOTrainer

        SimPOTrainer.compute_loss = nonfinite_compute_loss(
            SimPOTrainer.compute_loss, a.nonfinite, a.nonfinite_step, a.nonfinite_rank)
    if a.pause_at_step is not None:
        _patch_pause(a.pause_at_step, a.pause_file)
    if a.signal_stage:
        _patch_crash(a.signal_stage, a.signal_step, _signal_action(a.signal, a.signal_stage,
                                                                   a.signal_step))
    if a.fsize_limit_at_step is not None:
        _patch_fsize_limit(a.fsize_limit_at_step, a.fsize_limit)
    from simpo.train import main as train_main

    return train_main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
