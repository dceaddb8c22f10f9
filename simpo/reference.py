"""The reference model of the losses that compare with one (dpo, rdpo), both ways TRL offers.

* Precomputed (``precompute_ref_log_probs``, the default): before training, the reference model
  (the initial policy, or ``ref_model_name_or_path``) runs once over the train and eval data, in
  the run's precision, batched and without gradients, through the same no-logits forward as the
  loss (:func:`simpo_kernels.sequence_logps` on the final hidden states and the lm_head weight,
  read inside the forward). The per-row sums of target log-probabilities become the data set
  columns ``ref_chosen_logps`` / ``ref_rejected_logps`` (TRL's names), which the collator carries
  into each batch. The columns are cached in ``output_dir`` (:data:`CACHE_NAME`), keyed by a
  fingerprint of the reference (its source and weight files, the precision) and of each split's
  token ids: a resumed run reuses them; another reference or other data recomputes them.
* In the step (``precompute_ref_log_probs false``): the frozen reference model runs under
  ``no_grad`` on every micro-batch.

Either way the reference model is sharded like the policy: under DeepSpeed ZeRO-3 a second
DeepSpeed engine in inference mode (the run's config without optimizer and scheduler, as TRL's
``prepare_deepspeed``), under FSDP2 ``fully_shard`` through accelerate's own FSDP2 preparation (the
policy's wrapping, mixed precision and rank-0 loading). A forward of a sharded model is collective:
in the precompute pass every process runs the same number of forwards (the batches are dealt round
robin, the last round padded with a repeated batch whose results are dropped), then the results
are gathered, so each process holds every row's values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from typing import Any, Callable, Optional, Union

import torch

logger = logging.getLogger(__name__)

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
CACHE_NAME = "simpo_ref_logps.pt"
CACHE_FORMAT = 1
# a collated batch's model inputs: padded (attention_mask) or padding-free (position_ids,
# sequence_ids; see simpo.data.SimPODataCollator)
BATCH_KEYS = ("input_ids", "attention_mask", "position_ids", "labels", "sequence_ids")
_TOKEN_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


# ----------------------------------------------------------------------------- preparing the model

def prepare_reference_model(model: torch.nn.Module, trainer) -> torch.nn.Module:
    """``model`` frozen (eval mode, no gradients, dropout off), patched for reference forwards
    (``simpo_reference=True``) with the trainer's loss options, and placed like the policy:
    a ZeRO-3 inference engine under DeepSpeed, FSDP2-sharded under FSDP, else on the device."""
    from .modeling import attach_simpo_head, disable_dropout

    args = trainer.args
    attach_simpo_head(model, loss=args.loss, ignore_index=args.label_pad_token_id,
                      backend=args.loss_backend, chunk_size=args.loss_chunk_size,
                      schedule=args.loss_schedule, memory_budget=args.loss_memory_budget,
                      logit_metrics=args.logit_metrics, **args.loss_options)
    disable_dropout(model)
    model.eval()
    model.requires_grad_(False)
    if trainer.is_deepspeed_enabled:
        return _deepspeed_inference_engine(model, trainer.accelerator)
    if trainer.is_fsdp_enabled:
        from accelerate.utils import fsdp2_prepare_model

        model = fsdp2_prepare_model(trainer.accelerator, model)
        model.eval()
        return model
    return model.to(args.device)


def _deepspeed_inference_engine(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """A DeepSpeed engine for ``model`` in inference mode: the run's config minus the training-only
    blocks (optimizer, scheduler, optimizer offload); ZeRO-3 shards it like the policy, a lower
    stage keeps it whole on every process (stage 0). The bucket sizes that the policy's engine
    derives from the model ("auto") are set from the hidden size, as transformers does."""
    import copy

    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    if zero.get("stage", 0) == 3:
        hidden = getattr(model.config, "hidden_size", None)
        auto = {"reduce_bucket_size": lambda h: h * h,
                "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
                "stage3_param_persistence_threshold": lambda h: 10 * h}
        for key, value in auto.items():
            if zero.get(key) == "auto":
                if hidden is None:
                    zero.pop(key)
                else:
                    zero[key] = value(hidden)
    else:
        zero["stage"] = 0
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def release_reference_model(model: Optional[torch.nn.Module]) -> None:
    """Free what a prepared reference model holds (a DeepSpeed engine's hooks and partitions)."""
    destroy = getattr(model, "destroy", None)
    if callable(destroy):
        destroy()


# ----------------------------------------------------------------------------- forwards

@torch.no_grad()
def reference_logps(ref_model: torch.nn.Module, batch: dict,
                    context: Optional[Callable] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference model's per-sequence sums of target log-probabilities for a collated batch
    (chosen rows first, then rejected; or a padding-free batch, whose sums come in the pair
    layout's order): ``([B], [B])``, float32 (float64 for a float64 model).
    ``context``: makes the context the policy's forward runs in (the Trainer's autocast)."""
    import contextlib

    with context() if context is not None else contextlib.nullcontext():
        out = ref_model(**{k: batch[k] for k in BATCH_KEYS if k in batch}, simpo_reference=True)
    logps = out["logps"].detach()
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


def compute_reference_columns(ref_model: torch.nn.Module, dataset, collator, trainer,
                              batch_size: int, split_name: str
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen [N], rejected [N])`` float64: the reference sums of every row of ``dataset``,
    the same on every process. The batches (of ``batch_size`` pairs, in row order) are dealt round
    robin over the processes; every process runs the same number of forwards (a sharded model's
    forward is collective), the last round padded with a repeat of the process's first batch whose
    results are dropped; then every process gathers all results."""
    import time

    args = trainer.args
    rank, world = max(args.process_index, 0), max(args.world_size, 1)
    n = len(dataset)
    starts = list(range(0, n, batch_size))
    rounds = math.ceil(len(starts) / world)
    mine = starts[rank::world]
    chosen = torch.zeros(n, dtype=torch.float64)
    rejected = torch.zeros(n, dtype=torch.float64)
    done = torch.zeros(n, dtype=torch.float64)
    t0 = time.perf_counter()
    for i in range(rounds):
        start = mine[i] if i < len(mine) else (mine[0] if mine else starts[0])
        rows = list(range(start, min(start + batch_size, n)))
        batch = collator([dataset[j] for j in rows])
        batch = {k: v.to(args.device) for k, v in batch.items() if k in BATCH_KEYS}
        c, r = reference_logps(ref_model, batch, trainer.compute_loss_context_manager)
        if i < len(mine):  # a padding round's results are dropped
            chosen[rows] = c.double().cpu()
            rejected[rows] = r.double().cpu()
            done[rows] = 1.0
    if world > 1:  # every row is computed by exactly one process: the sum over processes
        import torch.distributed as dist

        stacked = torch.stack([chosen, rejected, done]).to(args.device)
        dist.all_reduce(stacked)
        chosen, rejected, done = stacked.cpu().unbind(0)
    seconds = time.perf_counter() - t0
    if not bool((done == 1).all()):
        raise RuntimeError(f"reference log-probs of split {split_name!r}: some rows were computed "
                           f"{'never' if bool((done == 0).any()) else 'twice'}")
    logger.info("reference log-probs of split %r: %d pairs in %.1f s (%.1f pairs/s, %d forwards "
                "per process)", split_name, n, seconds, n / max(seconds, 1e-9), rounds)
    return chosen, rejected


def add_reference_columns(dataset, chosen: torch.Tensor, rejected: torch.Tensor):
    """``dataset`` with the columns ``ref_chosen_logps`` / ``ref_rejected_logps`` (float64)
    replaced or added."""
    present = [c for c in REF_COLUMNS if c in dataset.column_names]
    if present:
        dataset = dataset.remove_columns(present)
    dataset = dataset.add_column(REF_COLUMNS[0], chosen.tolist())
    return dataset.add_column(REF_COLUMNS[1], rejected.tolist())


def has_reference_columns(dataset) -> bool:
    return dataset is not None and all(c in dataset.column_names for c in REF_COLUMNS)


# ----------------------------------------------------------------------------- the cache

def tokens_fingerprint(dataset) -> str:
    """sha256 of a tokenised split's rows (chosen and rejected ids and labels, in row order):
    what the reference log-probs of its rows depend on, besides the reference model."""
    import numpy as np

    digest = hashlib.sha256()
    digest.update(str(len(dataset)).encode())
    table = dataset.with_format("numpy")
    for name in _TOKEN_COLUMNS:
        digest.update(name.encode())
        for row in table[name]:
            arr = np.asarray(row, dtype=np.int64)
            digest.update(str(arr.shape[0]).encode())
            digest.update(arr.tobytes())
    return digest.hexdigest()


def weight_files_fingerprint(name_or_path: Optional[str], revision: str = "main") -> dict:
    """What identifies a saved model's weights without loading them: for a local directory (or a
    hub model already in the local cache, by its snapshot: the commit) the name, size and
    modification time of every file in it; otherwise its name and revision alone."""
    out: dict[str, Any] = {"source": name_or_path, "revision": revision}
    if not name_or_path:
        return out
    directory = os.path.expanduser(name_or_path)
    if not os.path.isdir(directory):
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
        except Exception:  # an id the hub library refuses, no cache: name and revision only
            found = None
        if not isinstance(found, str):
            return out
        directory = os.path.dirname(found)
        out["snapshot"] = os.path.basename(directory)  # the commit the cache holds
    files = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            st = os.stat(path)
            files[name] = [st.st_size, st.st_mtime_ns]
    out["files"] = files
    return out


def cache_key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def read_cache(output_dir: str, key: dict, split: str, tokens: str, rows: int
               ) -> tuple[Optional[tuple[torch.Tensor, torch.Tensor]], Optional[str]]:
    """The cached columns of ``split`` if they were computed for this reference (``key``) and these
    token ids, else ``(None, why not)``."""
    path = os.path.join(output_dir, CACHE_NAME)
    if not os.path.exists(path):
        return None, "no cache yet"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # cut short, garbled: recompute (and rewrite it)
        return None, f"{CACHE_NAME} cannot be read ({type(exc).__name__})"
    if not isinstance(saved, dict) or saved.get("format") != CACHE_FORMAT:
        return None, f"{CACHE_NAME} has another format"
    if saved.get("key_digest") != cache_key_digest(key):
        return None, "it was computed with another reference model or precision"
    entry = saved.get("splits", {}).get(split)
    if not isinstance(entry, dict):
        return None, f"it holds no split {split!r}"
    if entry.get("tokens") != tokens:
        return None, f"split {split!r} has other token ids now"
    chosen, rejected = entry.get("chosen"), entry.get("rejected")
    if not (isinstance(chosen, torch.Tensor) and isinstance(rejected, torch.Tensor)
            and chosen.shape == rejected.shape == (rows,)):
        return None, f"its split {split!r} has the wrong size"
    return (chosen.double(), rejected.double()), None


def write_cache(output_dir: str, key: dict, splits: dict[str, dict]) -> str:
    """Write the cache (atomically: a temporary file renamed into place). ``splits``: name ->
    ``{"tokens": fingerprint, "chosen": [N], "rejected": [N]}``."""
    path = os.path.join(output_dir, CACHE_NAME)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save({"format": CACHE_FORMAT, "key": json.loads(json.dumps(key, default=str)),
                "key_digest": cache_key_digest(key), "splits": splits}, tmp)
    os.replace(tmp, path)
    return path


ReferenceSource = Union[torch.nn.Module, Callable[[], torch.nn.Module], None]
