"""``SimPOTrainer``: a ``transformers.Trainer`` whose loss is the SimPO loss of ``simpo_kernels``,
or another loss of its preference family (``args.loss``: dpo, rdpo, cpo, orpo, rrhf, slic).

Reference model (dpo, rdpo). The reference log-probs come from data set columns precomputed at
construction (``precompute_ref_log_probs``, cached in ``output_dir``) or from a frozen reference
model run in every step; either way the reference is sharded like the policy (a second DeepSpeed
engine in inference mode under ZeRO-3, FSDP2 under FSDP). See :mod:`simpo.reference`.

Loss computation. The trainer patches the model instance (:func:`simpo.modeling.attach_simpo_head`)
so that the model's own forward, as run by DeepSpeed / FSDP / DDP, computes the loss from the
decoder's last hidden state and ``lm_head.weight`` with ``softcap = config.final_logit_softcapping``;
``compute_loss`` only calls ``model(..., simpo=True)`` and takes ``outputs["loss"]``.

Loss scaling. The SimPO loss of a micro-batch is a mean over its pairs, like the official trainer's.
The trainer opts out of Hugging Face's ``num_items_in_batch`` path (``model_accepts_loss_kwargs =
False``, ``loss_is_scaled_for_ga = False``): nothing multiplies the loss by the number of processes,
``training_step`` divides it by the gradient-accumulation steps, and DDP / DeepSpeed average the
gradients over processes. The optimizer therefore sees the mean over all pairs of the global batch,
the same for any split of it into processes x accumulation steps x per-device batch.

FSDP2. accelerate enables FSDP only on accelerator devices; on CPU ranks the trainer switches it on
(FSDP2 only), so the same wrapping, sharded checkpoints and loading run there. Under bf16 mixed
precision the forward's outputs (loss, metrics) stay float32, and the model saved at the end of a
run is whole even when checkpoints are sharded.

Checkpoints. ``_save_checkpoint`` writes each checkpoint into ``output_dir/.simpo-staging/`` and,
once every process has written its part, adds a completion record and renames it to
``checkpoint-N`` (:mod:`simpo.run_dir`): a crash during a save never leaves a ``checkpoint-N`` that
auto-resume would pick up and fail on.

Resumes. ``train_loss`` covers the whole run: the sum of the per-step losses (mean over processes)
travels in every checkpoint (:class:`WholeRunLoss`), so a resumed run reports exactly what the
uninterrupted run would. On resume the learning-rate schedule is re-based on this run's settings
(:class:`ScheduleFromArgs`): lr(step) = ``learning_rate`` x the schedule for this run's length, so
an extended run or a ``resume_anyway`` with another ``learning_rate`` trains with what it says.

Metrics. Every ``compute_loss`` (train) and ``prediction_step`` (eval) stores the official metrics;
``log`` replaces them by their mean over the logging window (``eval_`` prefix in evaluation), as
the official ``store_metrics`` / ``log`` do, and additionally averages them over processes (the
official trainer logs rank 0's only).

Divergence. Before each optimizer step, the step's loss (mean over its micro-batches and over
processes) and its gradient norm (already global) must be finite: otherwise training stops there,
before the optimizer applies that step, with :class:`TrainingDiverged` naming the step and the last
complete checkpoint; nothing is saved after it. ``SimPOConfig`` also turns Hugging Face's
``logging_nan_inf_filter`` off, so a non-finite loss is never logged as a finite number.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import time
from collections import defaultdict
from typing import Iterator, Optional

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from simpo_kernels import LOSSES
from simpo_kernels.objective import METRIC_NAMES  # noqa: F401 (re-exported)

from . import run_dir
from .config import ConfigError, RunStopped, UserError, fsdp_requested
from .data import SimPODataCollator
from .modeling import (ReferenceLogps, attach_simpo_head, disable_dropout, packed_attention,
                       packed_attention_line)
from .reference import (BATCH_KEYS, CACHE_NAME, REF_COLUMNS, add_reference_columns,
                        compute_reference_columns, has_reference_columns, prepare_reference_model,
                        read_cache, reference_logps, release_reference_model, tokens_fingerprint,
                        write_cache)

logger = logging.getLogger(__name__)


def metrics_from_outputs(outputs, prefix: str = "") -> dict[str, float]:
    """The official metric dict from a :class:`~simpo.modeling.SimPOModelOutput` (its loss's
    official names: ``metrics``, computed by the loss)."""
    return {prefix + name: value for name, value in outputs["metrics"].items()}


class TrainingDiverged(UserError):
    """A training step's loss or gradient norm was not finite (NaN or inf): training stopped before
    the optimizer applied that step. ``simpo-train`` prints the message on one line and exits 1."""

    exit_code = 1


class _DivergenceGuard(TrainerCallback):
    """Calls :meth:`SimPOTrainer._stop_if_diverged` before every optimizer step (public hook)."""

    def __init__(self, trainer: "SimPOTrainer"):
        self._trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._trainer._stop_if_diverged()


def _show_value(value: Optional[float]) -> str:
    return "not computed" if value is None else f"{value:.4g}"


class WholeRunLoss(TrainerCallback, ExportableState):
    """The whole run's summed training loss across resumes.

    ``loss_sum`` is the sum of the per-step training losses (each the mean over processes) up to
    the last checkpoint, or None when the run resumed from a checkpoint that does not record it.
    It is saved with each checkpoint's trainer state (``stateful_callbacks``) and read back when a
    run resumes; :class:`SimPOTrainer` adds the steps since then."""

    def __init__(self, loss_sum: Optional[float] = 0.0):
        self.loss_sum = loss_sum

    def state(self) -> dict:
        return {"args": {}, "attributes": {"loss_sum": self.loss_sum}}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.loss_sum = 0.0
            return
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        value = saved.get("attributes", {}).get("loss_sum") if isinstance(saved, dict) else None
        self.loss_sum = float(value) if isinstance(value, (int, float)) else None
        if self.loss_sum is None:
            logger.warning("the checkpoint resumed from does not record the run's loss so far: "
                           "train_loss will cover steps %d.. only", state.global_step + 1)


class ScheduleFromArgs(TrainerCallback):
    """On resume, re-base the restored learning-rate schedule on this run's settings.

    The Trainer builds the schedule for this run's length, but restoring the checkpoint's
    scheduler and optimizer brings back the earlier run's base rate (``base_lrs``,
    ``initial_lr``) and its current lr. Set both from ``args.learning_rate`` and the schedule at
    the resumed step, so that lr(step) = learning_rate x schedule(step) for the whole resumed
    part; unchanged settings give exactly the restored values."""

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        from torch.optim.lr_scheduler import LambdaLR

        if state.global_step == 0 or not isinstance(lr_scheduler, LambdaLR):
            return
        if len(set(lr_scheduler.base_lrs)) != 1:
            return  # per-group rates of a custom optimizer: not ours to re-base
        base = [float(args.learning_rate)] * len(lr_scheduler.base_lrs)
        lrs = [b * fn(lr_scheduler.last_epoch) for b, fn in zip(base, lr_scheduler.lr_lambdas)]
        for group, lr in zip(lr_scheduler.optimizer.param_groups, lrs):
            group["initial_lr"] = float(args.learning_rate)
            group["lr"] = lr
        lr_scheduler.base_lrs = base
        lr_scheduler._last_lr = list(lrs)  # what get_last_lr() (the logged learning_rate) reads


class SimPOTrainer(Trainer):
    """Trainer for SimPO. ``args`` is a :class:`simpo.config.SimPOConfig`; the datasets are the
    tokenised output of :func:`simpo.data.prepare_dataset`."""

    # training_step divides the loss by the accumulation steps (see module docstring)
    loss_is_scaled_for_ga = False

    def __init__(self, model=None, args=None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, ref_model=None,
                 reference_key: Optional[dict] = None, **kwargs):
        """``ref_model`` (losses with a reference: dpo, rdpo): the reference model, or a function
        that loads it (called only when needed: not when every split's log-probs come from the
        cache); None: a copy of the initial ``model``. ``reference_key``: what identifies the
        reference model and precision (:func:`simpo.train.reference_key`); with it the
        precomputed log-probs are cached in ``output_dir`` and reused; without it they are
        computed at every start."""
        if args is None or not hasattr(args, "loss_options"):
            raise TypeError("SimPOTrainer needs args=SimPOConfig(...)")
        attach_simpo_head(
            model, loss=args.loss, ignore_index=args.label_pad_token_id,
            backend=args.loss_backend, chunk_size=args.loss_chunk_size, schedule=args.loss_schedule,
            memory_budget=args.loss_memory_budget, logit_metrics=args.logit_metrics,
            **args.loss_options)
        if args.disable_dropout:
            disable_dropout(model)
        if args.padding_free:
            logger.info("padding-free batches: %s", packed_attention_line(model))
        if args.remove_unused_columns:
            # The collator needs the chosen_*/rejected_* columns, which the forward does not name.
            args.remove_unused_columns = False
        if data_collator is None:
            pad = args.padding_value
            if pad is None and processing_class is not None:
                pad = processing_class.pad_token_id
            one_row = args.padding_free and packed_attention(model) == "flash_attention_2"
            data_collator = SimPODataCollator(pad, args.label_pad_token_id,
                                              padding_free=args.padding_free,
                                              max_length=args.max_length, one_row=one_row)
        self._stored_metrics = defaultdict(lambda: defaultdict(list))
        self._staging_parent: Optional[str] = None  # set while a checkpoint is being written
        self._run_loss_pending = None  # this process's summed step losses since the last fold
        self._saving_model = False  # inside save_model: its push_to_hub waits for the run's end
        self._checkpoint_push_pending = False  # a checkpoint to push once it is published
        super().__init__(model=model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)
        # The loss is a per-micro-batch mean over pairs: no num_items_in_batch, no x num_processes.
        self.model_accepts_loss_kwargs = False
        # this optimizer step's loss so far on this process, and its gradient norm (on device)
        self._step_loss: Optional[torch.Tensor] = None
        self._step_grad_norm = None
        self.add_callback(_DivergenceGuard(self))
        self.add_callback(WholeRunLoss())
        self.add_callback(ScheduleFromArgs())
        self.ref_model = None  # the in-step reference model (precompute_ref_log_probs false)
        self._ref_source = ref_model
        self._reference_available = True  # the module given, or the initial policy, is unused
        self._reference_key = reference_key
        if args.needs_reference:
            if args.precompute_ref_log_probs:
                self._precompute_reference_columns()
            else:
                self.ref_model = prepare_reference_model(self._load_reference(), self)
        self._reference_available = False  # from here on the policy trains: never copy it

    # -------------------------------------------------------------- the reference model

    def _load_reference(self) -> torch.nn.Module:
        """The reference model, unprepared: the one given, loaded by the function given, or a
        copy of the initial policy (refused when ZeRO-3 already partitioned it: pass ref_model)."""
        source = self._ref_source
        if source is not None and not isinstance(source, torch.nn.Module):
            return source()  # a loader: loads the reference afresh each time
        if not self._reference_available:
            # the module given was prepared (sharded) and freed, and the policy may have trained
            raise ValueError("the reference model is needed again (reference log-probs for an "
                             "eval set given after construction) but was used up: give the eval "
                             "sets at construction, or ref_model as a function that loads it")
        self._reference_available = False  # used once: prepared in place / the initial policy
        if source is not None:
            return source
        if any(hasattr(p, "ds_id") for p in self.model.parameters()):
            raise ValueError("the policy is already partitioned by ZeRO-3 (zero.Init): pass "
                             "ref_model (the reference model, or a function that loads it)")
        import copy

        return copy.deepcopy(self.model)

    def _precompute_reference_columns(self) -> None:
        """Give the train and eval data sets the reference log-prob columns (cached ones where
        the cache in output_dir matches, computed ones otherwise; see :mod:`simpo.reference`)."""
        splits = {"train": self.train_dataset}
        if isinstance(self.eval_dataset, dict):
            splits.update({f"eval_{k}": v for k, v in self.eval_dataset.items()})
        elif self.eval_dataset is not None:
            splits["eval"] = self.eval_dataset
        done = self._reference_columns(splits)
        self.train_dataset = done["train"]
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {k: done[f"eval_{k}"] for k in self.eval_dataset}
        elif self.eval_dataset is not None:
            self.eval_dataset = done["eval"]

    def _reference_columns(self, splits: dict) -> dict:
        """``splits`` (name -> tokenised data set) with reference columns. Collective: every
        process calls it with the same splits."""
        from accelerate.utils import broadcast_object_list

        todo = {name: ds for name, ds in splits.items()
                if ds is not None and not has_reference_columns(ds)}
        out = dict(splits)
        if not todo:
            return out
        key, output_dir = self._reference_key, self.args.output_dir
        tokens = {name: tokens_fingerprint(ds) for name, ds in todo.items()}
        found = {}
        if key is not None:
            box = [None]
            if self.args.process_index == 0:
                box = [{name: read_cache(output_dir, key, name, tokens[name], len(ds))
                        for name, ds in todo.items()}]
            if self.args.world_size > 1:
                broadcast_object_list(box, from_process=0)
            for name, (values, why) in box[0].items():
                if values is not None:
                    found[name] = values
                    logger.info("reference log-probs of split %r: reused from %s", name,
                                os.path.join(output_dir, CACHE_NAME))
                else:
                    logger.info("reference log-probs of split %r: computing (%s)", name, why)
        missing = [name for name in todo if name not in found]
        if missing:
            ref = prepare_reference_model(self._load_reference(), self)
            batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
            try:
                for name in missing:
                    found[name] = compute_reference_columns(ref, todo[name], self.data_collator,
                                                            self, batch_size, name)
            finally:
                release_reference_model(ref)
                del ref
            if key is not None and self.args.process_index == 0:
                write_cache(output_dir, key, {
                    name: {"tokens": tokens[name], "chosen": found[name][0],
                           "rejected": found[name][1]} for name in todo})
        for name, ds in todo.items():
            out[name] = add_reference_columns(ds, *found[name])
        return out

    def get_eval_dataloader(self, eval_dataset=None):
        # an eval set handed to evaluate() that has no reference columns yet gets them here
        if (self.args.needs_reference and self.args.precompute_ref_log_probs
                and eval_dataset is not None and not isinstance(eval_dataset, str)
                and not has_reference_columns(eval_dataset)):
            eval_dataset = self._reference_columns({"eval": eval_dataset})["eval"]
        return super().get_eval_dataloader(eval_dataset)

    def _prepare_inputs(self, inputs):
        # Under DeepSpeed the base class casts every float tensor to the engine's dtype (bf16):
        # the reference sums (hundreds of nats) would lose their digits. Move them as they are.
        ref = {k: inputs[k] for k in REF_COLUMNS if k in inputs}
        inputs = super()._prepare_inputs({k: v for k, v in inputs.items() if k not in ref})
        inputs.update({k: v.to(self.args.device) for k, v in ref.items()})
        return inputs

    def _reference_inputs(self, inputs) -> dict:
        """The reference log-probs of this batch for the loss (none for a loss without one): the
        precomputed columns, or the in-step reference model's forward (no gradients)."""
        if not self.args.needs_reference:
            return {}
        if all(k in inputs for k in REF_COLUMNS):
            return {"reference": ReferenceLogps(*(inputs[k] for k in REF_COLUMNS))}
        if self.ref_model is None:
            raise ValueError(f"loss {self.args.loss} needs reference log-probs: the batch has no "
                             f"ref_chosen_logps / ref_rejected_logps and there is no reference "
                             f"model (precompute_ref_log_probs false runs one in the step)")
        chosen, rejected = reference_logps(self.ref_model, inputs,
                                           self.compute_loss_context_manager)
        return {"reference": ReferenceLogps(chosen, rejected)}

    # -------------------------------------------------------------- FSDP on CPU ranks

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if not self.is_fsdp_enabled:
            self._enable_fsdp_on_cpu_ranks()
        if self.is_fsdp_enabled:
            self._keep_forward_outputs_float32()

    def _keep_forward_outputs_float32(self) -> None:
        """accelerate's FSDP2 mixed precision casts the root module's forward outputs to bf16
        (``output_dtype``). The SimPO forward's outputs are the float32 loss and the official
        metrics, which the official trainer computes and logs in float32: keep them so (logits of
        a plain forward are in the compute dtype anyway). Gradients are not affected either way."""
        plugin = self.accelerator.state.fsdp_plugin
        policy = getattr(plugin, "mixed_precision_policy", None)
        if getattr(plugin, "fsdp_version", 1) != 2 or getattr(policy, "output_dtype", None) is None:
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype, output_dtype=None,
            cast_forward_inputs=policy.cast_forward_inputs)

    def _enable_fsdp_on_cpu_ranks(self) -> None:
        """Run FSDP2 on CPU ranks when FSDP was asked for.

        accelerate turns FSDP on only for accelerator devices; on CPU ranks it quietly trains with
        DDP instead (every rank holding the whole model). ``fully_shard`` itself runs on CPU over
        gloo, so where FSDP was asked for (``--fsdp`` / ``fsdp_config``, or an accelerate launch
        config with ``distributed_type: FSDP``) and the processes are CPU ranks, this switches
        accelerate's state to FSDP: the Trainer's FSDP2 wrapping, sharded checkpoints and loading
        then run exactly as on GPUs.
        """
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        if not fsdp_requested(self.args):
            return
        state = self.accelerator.state
        if state.distributed_type != DistributedType.MULTI_CPU:
            logger.warning("FSDP was asked for, but accelerate runs %s (%d process(es)): nothing "
                           "is sharded", state.distributed_type.value, self.args.world_size)
            return
        # without trainer arguments, the plugin reads accelerate launch's FSDP_* variables (an
        # FSDP1 plugin cannot be built without a GPU: config.resolve_fsdp_options says so first)
        plugin = FullyShardedDataParallelPlugin(**(self.args.fsdp_plugin_args or {}))
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
        # as accelerate records it on GPUs: every later AcceleratorState() copies it from here
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.is_fsdp_enabled = True
        logger.info("FSDP2 on %d CPU ranks over %s", self.args.world_size,
                    self.accelerator.state.backend)
        # the base class checked these before FSDP was on
        if plugin.activation_checkpointing and self.args.trainer_checkpointing:
            raise ConfigError("FSDP's activation_checkpointing and the Trainer's "
                              "activation_checkpointing both recompute activations: keep one")
        if self.args.save_only_model and ("SHARDED_STATE_DICT" in str(plugin.state_dict_type)
                                          or self.args.load_best_model_at_end):
            raise ConfigError("save_only_model cannot be used with FSDP's SHARDED_STATE_DICT or "
                              "with load_best_model_at_end")

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """As the base Trainer's, except that under FSDP with sharded checkpoints the model a run
        leaves in ``output_dir`` is still a whole Hugging Face model (``model.safetensors``); the
        base class would write nothing there. Checkpoints keep FSDP's sharded files. The final
        model without room to write it (disk full, quota, file size limit) is one line
        (:class:`~simpo.config.UserError`); a checkpoint's is said by ``_save_checkpoint``."""
        self._saving_model = True  # the base save_model's own push waits for the run's end
        try:
            self._save_model(output_dir, _internal_call)
        except Exception as exc:
            target = output_dir if output_dir is not None else self.args.output_dir
            code = None if _internal_call else run_dir.no_room_errno(exc, target)
            if code is None:
                raise
            path = getattr(exc, "filename", None) or os.path.join(target, "model.safetensors")
            raise UserError(f"cannot write the final model in {target}: {os.strerror(code)} "
                            f"(writing {path}; {run_dir.size_text(run_dir.free_bytes(target))} are free "
                            f"there). "
                            f"The checkpoints are intact: make room, then rerun the same command "
                            f"to write it") from exc
        finally:
            self._saving_model = False

    # -------------------------------------------------------------- the Hub

    def push_to_hub(self, commit_message: Optional[str] = "End of training", blocking: bool = True,
                    token: Optional[str] = None, revision: Optional[str] = None,
                    private: Optional[bool] = None, **kwargs):
        """Upload ``output_dir`` to the Hub repo (created at construction, as the Trainer does;
        ``hub_model_id`` unset: named after ``output_dir``) without the checkpoints and
        simpo-train's own files (:data:`simpo.release.UPLOAD_IGNORE`), and without replacing the
        model card simpo-train wrote by the Trainer's. Inside ``save_model`` it does nothing:
        simpo-train pushes once, at the end, after the card and the results are written.
        Collective (the repo is created on process 0); uploads from process 0 only."""
        from . import release

        if self._saving_model:
            return None
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        if not self.is_world_process_zero():
            return None
        return release.push_output_dir(
            self.hub_model_id, self.args.output_dir, commit_message=commit_message,
            token=token if token is not None else self.args.hub_token,
            revision=revision if revision is not None else self.args.hub_revision)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # The base Trainer calls this on the staging copy of the checkpoint, copies its model
        # files into output_dir and uploads asynchronously; the staging copy is renamed at once.
        # Here the push waits until the checkpoint is published (see _save_checkpoint).
        self._checkpoint_push_pending = True

    def _save_model(self, output_dir: Optional[str], _internal_call: bool) -> None:
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if self.is_fsdp_enabled else None
        if _internal_call or plugin is None or "FULL_STATE_DICT" in str(plugin.state_dict_type):
            return super().save_model(output_dir, _internal_call)
        state_dict = self.accelerator.get_state_dict(self.model)  # collective: on every rank
        self._save(output_dir if output_dir is not None else self.args.output_dir,
                   state_dict=state_dict)  # no push here: simpo-train pushes once, at the end

    # -------------------------------------------------------------- checkpoints

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is saved, the base Trainer's checkpoint path (and its rotation, which
        # then sees only the staging area) lands in the staging area instead of output_dir.
        if self._staging_parent is not None:
            return self._staging_parent
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Save ``checkpoint-N`` as the base Trainer does, but into a staging directory renamed to
        ``checkpoint-N`` only when complete (every process done, completion record written)."""
        run_root = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_parent = os.path.join(run_root, run_dir.STAGING_DIR_NAME)
        staging, final = os.path.join(staging_parent, name), os.path.join(run_root, name)
        if self.args.should_save and os.path.lexists(staging):
            shutil.rmtree(staging)  # a previous attempt at this step, cut short
        self.accelerator.wait_for_everyone()  # nobody writes into it before it is cleared
        self._fold_run_loss()  # the run's loss so far travels in the checkpoint's trainer state
        self._staging_parent = staging_parent
        try:
            super()._save_checkpoint(model, trial)
        except Exception as exc:
            self._no_room(exc, staging, run_root)
            raise
        finally:
            self._staging_parent = None
        # every process's files (DeepSpeed shards, per-rank RNG states) are in before the record
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            try:
                self._finish_checkpoint(staging, final, run_root)
            except Exception as exc:
                self._no_room(exc, staging, run_root)
                raise
        if self._checkpoint_push_pending:
            self._checkpoint_push_pending = False
            if self.is_world_process_zero():
                from . import release

                release.push_checkpoint(self.hub_model_id, final, self.args,
                                        self.state.global_step, self.state.epoch)
        self.accelerator.wait_for_everyone()  # nobody reads checkpoint-N before it exists

    @staticmethod
    def _no_room(exc: Exception, staging: str, run_root: str) -> None:
        """A save that failed for want of room (disk full, quota, file size limit) becomes one
        line (:class:`~simpo.config.UserError`) naming the cause, the path and the sizes, and its
        staging directory is removed; earlier checkpoints are untouched. Any other failure is left
        to propagate as it is."""
        code = run_dir.no_room_errno(exc, staging)
        if code is None:
            return
        message = run_dir.no_room_message(code, exc, staging, run_root)
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(staging))  # the staging area, when nothing else is in it
        raise UserError(message) from exc

    def _finish_checkpoint(self, staging: str, final: str, run_root: str) -> None:
        if self.state.best_model_checkpoint == staging:
            # the base Trainer recorded the best checkpoint where it was written, not where it stays
            self.state.best_model_checkpoint = final
            self.state.save_to_json(os.path.join(staging, "trainer_state.json"))
        config = os.path.join(self.args.output_dir, run_dir.RUN_CONFIG_NAME)
        if os.path.isfile(config):  # the run's settings travel with each of its checkpoints
            shutil.copyfile(config, os.path.join(staging, run_dir.RUN_CONFIG_NAME))
        run_dir.write_completion_record(staging, self.state.global_step, self.args.world_size,
                                        save_only_model=self.args.save_only_model)
        run_dir.publish_checkpoint(staging, final)
        # rotation on the real checkpoints (the base Trainer's ran on the staging area)
        rotate_checkpoints(output_dir=run_root, save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        staging_parent = os.path.dirname(staging)
        if os.path.isdir(staging_parent) and not os.listdir(staging_parent):
            os.rmdir(staging_parent)

    def _run_epoch(self, *args, **kwargs):
        # Resumed from a checkpoint that already reached max_steps, the base loop would still take
        # one optimizer step (it checks for the end only after a step) and save checkpoint-(N+1)
        # past the requested end: train nothing instead.
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _issue_warnings_after_load(self, load_result) -> None:
        # A tied output embedding is not written to a checkpoint (it is the input embedding), so
        # its key is "missing" on every resume of such a model (Gemma-2 ties lm_head): expected,
        # not a warning. Any other missing key is still reported by the base Trainer.
        missing = list(load_result.missing_keys)
        if missing:
            params = dict(self.model.named_parameters(remove_duplicate=False))
            loaded = {id(p) for name, p in params.items() if name not in missing}
            tied = {name for name in missing if name in params and id(params[name]) in loaded}
            if tied:
                load_result = load_result._replace(
                    missing_keys=[k for k in missing if k not in tied])
                self.model.tie_weights()
        super()._issue_warnings_after_load(load_result)

    # -------------------------------------------------------------- step losses

    def training_step(self, model, inputs, *args, **kwargs) -> torch.Tensor:
        loss = super().training_step(model, inputs, *args, **kwargs)
        # The micro-batch losses are divided by the accumulation steps: their sum is the step's
        # loss. Kept on the device (no host sync here), in float64: the divergence check reads
        # this step's sum, the whole run's train_loss the sum since its last fold.
        value = loss.detach().to(torch.float64).reshape(())
        self._step_loss = value if self._step_loss is None else self._step_loss + value
        self._run_loss_pending = value if self._run_loss_pending is None \
            else self._run_loss_pending + value
        return loss

    # -------------------------------------------------------------- divergence

    def _get_grad_norm(self, model, grad_norm=None):
        # The base loop computes the step's gradient norm here (with max_grad_norm 0 too, clipping
        # off) and passes it to no callback: keep it for the check before the optimizer step. Under
        # DeepSpeed it is the engine's global norm (possibly None); without it the check uses the
        # loss alone (NaN gradients then make the next step's loss NaN).
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._step_grad_norm = grad_norm
        return grad_norm

    def _stop_if_diverged(self) -> None:
        """Raise :class:`TrainingDiverged` if this optimizer step's loss or gradient norm is NaN or
        inf; called before the optimizer applies the step (``on_pre_optimizer_step``).

        Every process decides on the same values: the loss is summed over processes and the
        gradient norm (the same on every process: it is taken over the reduced gradients) rides
        along in the same all-reduce, so all ranks stop at the same step. Cost: that one 2-element
        all-reduce and one host sync (``tolist``) per optimizer step, nothing per micro-batch."""
        loss, grad_norm = self._step_loss, self._step_grad_norm
        self._step_loss = self._step_grad_norm = None
        if loss is None:
            return
        has_norm = grad_norm is not None
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor (a collective, no host sync)
            grad_norm = grad_norm.full_tensor()
        norm = torch.as_tensor(grad_norm if has_norm else 0.0).to(loss.device, torch.float64)
        # float64: the sum over processes of float32-range values cannot overflow into a false inf
        values = torch.stack([loss, norm.reshape(())])
        if self.args.world_size > 1:
            values = self.accelerator.reduce(values, reduction="sum") / self.args.world_size
        loss_value, norm_value = values.tolist()  # the one host sync of the check
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            return
        raise TrainingDiverged(self._divergence_message(loss_value, norm_value if has_norm else None))

    def _divergence_message(self, loss: float, grad_norm: Optional[float]) -> str:
        step = self.state.global_step + 1
        checkpoint = run_dir.last_complete_checkpoint(self.args.output_dir)
        if self.is_deepspeed_enabled:  # its engine steps inside backward, before any callback
            stopped = "stopped before any save"
        else:
            stopped = "stopped before its update"
        if checkpoint is None:
            kept = "no checkpoint was saved before it"
            rerun = "then rerun"
        else:
            name = os.path.basename(checkpoint)
            kept = f"the last good checkpoint is {checkpoint}"
            rerun = (f"then rerun with --existing_run resume_anyway (continue from {name}) or "
                     f"fresh (start again)")
        clip = self.args.max_grad_norm
        clipping = (f"lower --max_grad_norm (now {clip:g})" if clip > 0
                    else "set --max_grad_norm (now 0: no clipping)")
        return (f"training diverged at step {step}: loss {_show_value(loss)} (grad_norm "
                f"{_show_value(grad_norm)}); {stopped}, {kept}. Lower --learning_rate (now "
                f"{self.args.learning_rate:g}), {clipping} or check the data, {rerun}")

    # -------------------------------------------------------------- the whole run's train_loss

    def _run_loss_callback(self) -> Optional[WholeRunLoss]:
        # looked up each time: restore_callback_states_from_checkpoint may replace the instance
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, WholeRunLoss)),
                    None)

    def _fold_run_loss(self) -> Optional[float]:
        """Add the step losses since the last fold (mean over processes) to the run's sum and
        return the sum. Collective under several processes: every rank calls it at the same
        points (each checkpoint save, the final log), so an uninterrupted and a resumed run add
        the same numbers in the same order."""
        callback = self._run_loss_callback()
        pending = self._run_loss_pending
        if pending is None:
            pending = torch.zeros((), dtype=torch.float64, device=self.args.device)
        if self.args.world_size > 1:
            pending = self.accelerator.gather(pending.reshape(1).to(self.args.device)).mean()
        self._run_loss_pending = None
        if callback is None or callback.loss_sum is None:
            return None
        callback.loss_sum += pending.item()
        return callback.loss_sum

    # -------------------------------------------------------------- loss and metrics

    def _simpo_forward(self, model, inputs):
        # padded: attention_mask; padding-free: position_ids and sequence_ids (no attention_mask)
        batch = {k: inputs[k] for k in BATCH_KEYS if k in inputs}
        return model(**batch, simpo=True, **self._reference_inputs(inputs))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = self._simpo_forward(model, inputs)
        loss = outputs["loss"]
        train_eval = "train" if model.training else "eval"
        self.store_metrics(metrics_from_outputs(outputs, "eval_" if train_eval == "eval" else ""),
                           train_eval)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = self._simpo_forward(model, inputs)
        self.store_metrics(metrics_from_outputs(outputs, "eval_"), "eval")
        return outputs["loss"].detach(), None, None

    def store_metrics(self, metrics: dict[str, float], train_eval: str = "train") -> None:
        for key, value in metrics.items():
            self._stored_metrics[train_eval][key].append(value)

    def _metric_keys(self, train_eval: str) -> list[str]:
        prefix = "eval_" if train_eval == "eval" else ""
        names = LOSSES[self.args.loss](**self.args.loss_options).metric_names(self.args.logit_metrics)
        return [prefix + n for n in names]

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "train_loss" in logs:  # the end of training: the whole run's, not this segment's
            total = self._fold_run_loss()
            if total is not None:
                logs["train_loss"] = total / max(self.state.global_step, 1)
        train_eval = "train" if "loss" in logs else "eval"
        stored = self._stored_metrics.pop(train_eval, None)
        if stored:
            keys = self._metric_keys(train_eval)
            local = torch.tensor([sum(stored[k]) / len(stored[k]) if stored.get(k) else float("nan")
                                  for k in keys], dtype=torch.float64)
            if self.args.world_size > 1:
                gathered = self.accelerator.gather(local.to(self.args.device).unsqueeze(0))
                local = gathered.double().nanmean(0).cpu()
            for k, v in zip(keys, local.tolist()):
                logs[k] = v
        super().log(logs, start_time)


# ------------------------------------------------------------------ stopping on a signal

class StopRequest:
    """A signal that asks the run to stop (SIGTERM: a scheduler's preemption, SIGINT: Ctrl-C), as
    the handler :meth:`handle` (installed by :func:`simpo.train.run`) records it, and the one line
    that each kind of stop ends with.

    Inside the training loop a signal only records itself: :class:`StopOnSignal` ends training at
    the end of the current optimizer step, with a checkpoint written the usual atomic way. While
    that stop is under way a repeated SIGTERM is ignored (schedulers repeat it; the checkpoint being
    written must not be cut short) and a second SIGINT (Ctrl-C again) stops at once. Outside the
    loop (loading data and model before it, writing the final outputs after it) no step is worth
    finishing: a signal stops at once. Stopping raises :class:`~simpo.config.RunStopped`.
    """

    def __init__(self, last_checkpoint: Optional[str] = None):
        self.signum = 0  # the signal the stop is for; 0: none
        self.agreed = False  # every process stops at the same step (see StopOnSignal)
        self.phase = "starting"  # "training" inside the loop, "finishing" after it
        self.step: Optional[int] = None  # the last finished optimizer step
        self.last_checkpoint = last_checkpoint  # the newest complete checkpoint of the run
        self._holding = False
        self._pending = 0  # a signal that came while holding
        # a stop raised at once by the handler: Python drops an exception raised while a weakref
        # callback or finaliser runs ("Exception ignored in ..."), so it is raised again before
        # training starts (raise_if_dropped) rather than lost
        self._raised = 0
        # forked helpers (DataLoader workers, datasets.map) inherit the handler; Ctrl-C reaches
        # them too, but only the training process acts (it shuts its helpers down)
        self._pid = os.getpid()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A block that a signal must not cut (taking output_dir's lock: cut between taking it and
        handing it over, the lock could not be released): a signal meanwhile stops the run (at
        once) only when the block is done."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        if self._pending:
            raise RunStopped(self._pending, self._at_once(signal.Signals(self._pending).name))

    def handle(self, signum: int, frame=None) -> None:
        """The signal handler."""
        if os.getpid() != self._pid:
            return
        name = signal.Signals(signum).name
        if self._holding:
            self._pending = self._pending or signum
            return
        if self.phase != "training":
            self._raised = signum
            raise RunStopped(signum, self._at_once(name))
        if not self.signum:
            self.signum = signum
            _say(f"{name} received: stopping at the end of the current optimizer step, with a "
                 f"checkpoint" + ("" if signum == signal.SIGTERM else
                                  " (press Ctrl-C again to stop at once, without it)"))
        elif signum == signal.SIGINT:
            raise RunStopped(signum, self._at_once(f"a second {name}" if self.signum == signum
                                                   else name))
        else:
            _say(f"{name} received again: ignored, the stop (and its checkpoint) is under way")

    def is_dropped_stop(self, unraisable) -> bool:
        """Whether an exception the interpreter could not raise (what ``sys.unraisablehook`` gets)
        is a stop of this run's that :meth:`raise_if_dropped` raises again: then reporting it
        would only add a traceback to stderr beside the run's one stop line."""
        return (isinstance(unraisable.exc_value, RunStopped) and self.phase == "starting"
                and self._raised == unraisable.exc_value.signum)

    def raise_if_dropped(self) -> None:
        """Raise again a stop the handler raised at once that never reached the run (dropped by
        the interpreter because it landed in a weakref callback or finaliser)."""
        if self._raised:
            raise RunStopped(self._raised, self._at_once(signal.Signals(self._raised).name))

    def raise_if_stopped(self) -> None:
        """After ``trainer.train()`` returned: raise the stop that ended it, if any."""
        if not self.signum:
            return
        name = signal.Signals(self.signum).name
        if self.agreed:
            raise RunStopped(self.signum, f"stopped by {name} after step {self.step}: checkpoint "
                                          f"saved to {self.last_checkpoint}; rerun the same command "
                                          f"to resume", agreed=True)
        self.phase = "finishing"  # the last step came before the signal could be acted on
        raise RunStopped(self.signum, self._at_once(name))

    def _at_once(self, what: str) -> str:
        if self.phase == "starting":
            return f"stopped by {what} before training started; nothing was trained"
        resume = (f"rerun the same command to resume from {self.last_checkpoint}"
                  if self.last_checkpoint else "a rerun starts again from step 0")
        if self.phase == "finishing":
            return (f"stopped by {what} after training (step {self.step}), while writing the final "
                    f"outputs, which may be incomplete; {resume}")
        since = f"after {os.path.basename(self.last_checkpoint)}" if self.last_checkpoint else ""
        return (f"stopped at once by {what} at step {self.step}: no checkpoint was written for the "
                f"steps {since or 'trained'}; {resume}")


def _say(message: str) -> None:
    """A warning from the signal handler, on stderr in the log's format, written with one
    ``os.write``: the handler may run in the middle of a print, and Python's buffered streams
    (hence logging's handlers) are not reentrant."""
    line = f"{time.strftime('%H:%M:%S')} WARNING {__name__}: {message}\n"
    try:
        os.write(2, line.encode())
    except OSError:
        pass  # no stderr: the stop itself still happens


def agree_on_signal(signum: int, args) -> int:
    """The largest signal number any process recorded (0: none), the same on every process, so that
    all of them stop at the same step even when the signal reached only some (or reached them at
    different moments). One scalar all-reduce when several processes train; none otherwise."""
    import torch.distributed as dist

    if args.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return signum
    flag = torch.tensor([signum], dtype=torch.int32, device=args.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


class StopOnSignal(TrainerCallback):
    """Ends training, with a checkpoint, at the end of the optimizer step during which a signal
    arrived (see :class:`StopRequest`). Every process asks the others at each step end
    (:func:`agree_on_signal`), so all stop after the same step and write one checkpoint together,
    through ``SimPOTrainer._save_checkpoint`` (staged, then renamed)."""

    def __init__(self, stop: StopRequest):
        self.stop = stop

    def on_train_begin(self, args, state, control, **kwargs):
        self.stop.step = state.global_step
        self.stop.phase = "training"

    def on_step_end(self, args, state, control, **kwargs):
        self.stop.step = state.global_step
        if self._agreed(args):
            control.should_save = True
            control.should_log = True  # the losses since the last log go into the checkpoint
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        self.stop.last_checkpoint = os.path.join(args.output_dir,
                                                 f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        # a signal during a scheduled save (after this step's check): that checkpoint serves
        if self._agreed(args):
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.stop.phase = "finishing"

    def _agreed(self, args) -> bool:
        if not self.stop.agreed:
            signum = agree_on_signal(self.stop.signum, args)
            if signum:
                self.stop.signum, self.stop.agreed = signum, True
        return self.stop.agreed
