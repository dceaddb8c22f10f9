"""The output directory of a training run: its lock, its run configuration, and its checkpoints.

A run owns its ``output_dir`` while it holds :data:`LOCK_NAME` (``fcntl.flock``, released by the
kernel when the process dies, so a crash never leaves the directory locked). It records its
effective configuration in :data:`RUN_CONFIG_NAME`, so that a later run into the same directory can
tell whether resuming would mix two configurations in one training curve.

Checkpoints are written into :data:`STAGING_DIR_NAME` (same filesystem), get a completion record
(:data:`COMPLETION_RECORD_NAME`, written last: every file with its size) and are then renamed to
``checkpoint-N``: a ``checkpoint-N`` directory is therefore either complete or absent.
:func:`checkpoint_problems` still checks what a complete checkpoint holds, because checkpoints of
older runs, copied ones or ones cut by hand have no such guarantee.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
import zipfile
from typing import Any, Optional

from .config import UserError, error_text

logger = logging.getLogger(__name__)

LOCK_NAME = ".simpo-train.lock"
RUN_CONFIG_NAME = "simpo_run_config.json"
COMPLETION_RECORD_NAME = "simpo_checkpoint.json"
STAGING_DIR_NAME = ".simpo-staging"
SUPERSEDED_PREFIX = "superseded-"
FINAL_RECORD_NAME = "simpo_run_finished.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

# Settings that cannot change what a run learns: how it is logged, evaluated, saved, reported,
# published or computed (same numbers another way). Every other setting of the three argument
# dataclasses is compared when a run resumes, so an option a future transformers adds is compared
# until it is listed here; only keys both configurations record are compared.
IGNORED_KEYS = frozenset({
    # logging and reporting
    "logging_steps", "logging_strategy", "logging_first_step", "logging_nan_inf_filter",
    "log_level", "log_level_replica", "log_on_each_node", "report_to", "run_name", "project",
    "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "disable_tqdm",
    "skip_memory_metrics", "include_num_input_tokens_seen", "debug", "plot", "logit_metrics",
    "log_completions", "log_completions_prompts", "log_completions_max_new_tokens",
    # evaluation (never feeds back into training)
    "eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "eval_accumulation_steps",
    "eval_do_concat_batches", "eval_use_gather_object", "per_device_eval_batch_size",
    "prediction_loss_only", "batch_eval_metrics", "include_for_metrics", "bf16_full_eval",
    "fp16_full_eval", "do_train", "do_eval", "do_predict", "metric_for_best_model",
    "greater_is_better", "load_best_model_at_end", "label_names", "max_eval_samples",
    # saving, resuming, output
    "output_dir", "save_strategy", "save_steps", "save_total_limit", "save_on_each_node",
    "save_only_model", "restore_callback_states_from_checkpoint", "enable_jit_checkpoint",
    "resume_from_checkpoint", "existing_run",
    # hub
    "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo",
    "hub_always_push", "hub_revision",
    # how the same numbers are computed: loss backend, data loading, communication, memory
    "loss_backend", "loss_schedule", "loss_chunk_size", "loss_memory_budget", "padding_free",
    "use_liger_kernel", "liger_kernel_config", "torch_compile", "torch_compile_backend",
    "torch_compile_mode", "activation_checkpointing", "activation_checkpointing_kwargs",
    "gradient_checkpointing", "gradient_checkpointing_kwargs", "use_cache",
    "torch_empty_cache_steps", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor",
    "dataloader_multiprocessing_context", "dataloader_in_order", "preprocessing_num_workers",
    "ddp_backend", "ddp_timeout", "ddp_bucket_cap_mb", "ddp_broadcast_buffers",
    "ddp_find_unused_parameters", "ddp_static_graph", "local_rank", "use_cpu",
    "trust_remote_code", "precompute_ref_log_probs", "precompute_ref_batch_size",
    # not used by SimPOTrainer: its loss is a per-micro-batch mean (no num_items_in_batch), it
    # forces remove_unused_columns off and computes its own loss (no HF label smoother)
    "average_tokens_across_devices", "remove_unused_columns", "label_smoothing_factor",
})
# The run's length: changing it extends (or shortens) the run, which is allowed without
# --existing_run (the learning-rate schedule is recomputed for the new length, see resolve_start).
LENGTH_KEYS = ("max_steps", "num_train_epochs")
# Hyperparameters held by the optimizer's state: a resumed optimizer gets the checkpoint's values
# back (torch's load_state_dict restores its param groups), so a change cannot take effect and is
# refused even with resume_anyway. The learning rate is re-based by the trainer, so it may change.
OPTIMIZER_STATE_KEYS = ("optim", "optim_args", "weight_decay", "adam_beta1", "adam_beta2",
                        "adam_epsilon")

# Files a run writes at the top of output_dir (final model, tokenizer, state, results). A fresh
# run would overwrite them, so ``--existing_run fresh`` moves them aside with the checkpoints;
# anything else in output_dir is the user's and stays where it is.
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_SHARD_RE = re.compile(r"^(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)$")
# a LoRA run's model (peft): the adapter weights and their config; its final outputs add the merged
# model and, for the embedded tiny model, the base model, in directories of these names
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_ADAPTER_CONFIG = "adapter_config.json"
RUN_OUTPUT_NAMES = frozenset({
    RUN_CONFIG_NAME, FINAL_RECORD_NAME, "trainer_state.json", "all_results.json", "train_results.json",
    "eval_results.json", "training_curves.png", "training_args.bin", "config.json",
    "generation_config.json", *_WEIGHT_FILES, *_WEIGHT_INDEXES, "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "tokenizer.model", "vocab.json", "merges.txt", "runs", *_ADAPTER_FILES, _ADAPTER_CONFIG,
    "merged", "base", "README.md", "completions.jsonl",
})


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_problems(path: str) -> list[str]:
    """What the checkpoint directory ``path`` lacks to be resumed from; empty when complete.

    Checked: model weights (a single file, or an index whose shards all exist; or DeepSpeed's
    ``latest`` + ``global_stepN`` model and optimizer states; or FSDP's directories),
    ``trainer_state.json`` (valid JSON, ``global_step`` = N of ``checkpoint-N``), ``optimizer.pt`` and
    ``scheduler.pt`` (unless DeepSpeed or FSDP hold the optimizer), ``rng_state*.pth``,
    ``training_args.bin``; files cut short where their format tells (safetensors header, zip
    archives of ``torch.save``). When the directory has a completion record, every file it lists
    must exist with the recorded size.
    """
    if not os.path.isdir(path):
        return ["it does not exist" if not os.path.exists(path) else "it is not a directory"]
    problems: list[str] = []
    record, record_problem = _read_json(os.path.join(path, COMPLETION_RECORD_NAME))
    if record_problem and os.path.exists(os.path.join(path, COMPLETION_RECORD_NAME)):
        problems.append(f"{COMPLETION_RECORD_NAME} {record_problem}")
        record = None
    if record is not None:
        problems += _record_problems(path, record)
    save_only_model = bool(record.get("save_only_model")) if isinstance(record, dict) else False
    world_size = record.get("world_size", 1) if isinstance(record, dict) else 1

    deepspeed_problems, has_deepspeed = _deepspeed_problems(path, world_size)
    problems += deepspeed_problems
    has_fsdp = _has_fsdp(path)
    problems += _fsdp_problems(path) if has_fsdp else []
    problems += _weight_problems(path, has_deepspeed or has_fsdp)
    problems += _state_problems(path)
    if not save_only_model:
        # DeepSpeed keeps the optimizer (and its own scheduler) in global_stepN/, FSDP the
        # optimizer in optimizer_* next to scheduler.pt
        expected = () if has_deepspeed else ("scheduler.pt",) if _has_fsdp_optimizer(path) \
            else ("optimizer.pt", "scheduler.pt")
        problems += [f"{name} is missing" for name in expected
                     if not os.path.isfile(os.path.join(path, name))]
        problems += _rng_problems(path, world_size)
    # the base Trainer writes training_args.bin with the model's own files, which FSDP's sharded
    # checkpoints do not have (pytorch_model_fsdp_*/ instead)
    if not has_fsdp and not os.path.isfile(os.path.join(path, "training_args.bin")):
        problems.append("training_args.bin is missing")
    problems += _truncation_problems(path)
    return list(dict.fromkeys(problems))  # a file both missing and listed in the record: once


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The newest ``checkpoint-N`` of ``output_dir`` that :func:`checkpoint_problems` finds
    complete and that can be resumed from, or None. Each newer one that cannot is skipped with a
    warning saying what it lacks (files, or, saved with ``save_only_model``, the optimizer,
    scheduler and RNG state)."""
    for path in reversed(checkpoint_dirs(output_dir)):
        problems = checkpoint_problems(path)
        if not problems and not is_model_only(path):
            return path
        if problems:
            logger.warning("skipping incomplete checkpoint %s (%s); trying an earlier one", path,
                           "; ".join(problems))
        else:
            logger.warning("skipping checkpoint %s: saved with save_only_model, it has no "
                           "optimizer, scheduler or RNG state to resume from; trying an earlier "
                           "one", path)
    return None


def checkpoint_dirs(output_dir: str) -> list[str]:
    """The ``checkpoint-N`` directories of ``output_dir``, oldest (smallest N) first."""
    steps = sorted((int(m.group(1)), name) for name in _listdir(output_dir)
                   if (m := CHECKPOINT_RE.match(name))
                   and os.path.isdir(os.path.join(output_dir, name)))
    return [os.path.join(output_dir, name) for _, name in steps]


def write_completion_record(checkpoint_dir: str, global_step: int, world_size: int,
                            save_only_model: bool = False) -> dict:
    """Write the completion record of ``checkpoint_dir``: every file below it with its size. Call
    it after every process finished writing the checkpoint; it is the checkpoint's last file."""
    files = _file_sizes(checkpoint_dir)
    files.pop(COMPLETION_RECORD_NAME, None)
    record = {"format": 1, "global_step": int(global_step), "world_size": int(world_size),
              "save_only_model": bool(save_only_model), "written": _utc_now(),
              "files": dict(sorted(files.items()))}
    _write_json_atomically(os.path.join(checkpoint_dir, COMPLETION_RECORD_NAME), record)
    return record


def publish_checkpoint(staging: str, final: str) -> None:
    """Rename the finished checkpoint ``staging`` to ``final`` (one atomic rename on the same
    filesystem). A ``final`` already there (the same step saved again after resuming from an
    earlier checkpoint) is replaced."""
    if not os.path.isdir(staging) and os.path.isdir(final):
        return  # another node's saving process, sharing this filesystem, published it already
    replaced = None
    if os.path.lexists(final):
        # moved into the staging area first, so that a crash between the two renames leaves it
        # where the next start cleans up, never half-deleted under its real name
        replaced = os.path.join(os.path.dirname(staging), "replaced-" + os.path.basename(final))
        if os.path.lexists(replaced):
            shutil.rmtree(replaced)
        os.rename(final, replaced)
    os.rename(staging, final)
    _fsync_dir(os.path.dirname(final))
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def remove_leftover_staging(output_dir: str) -> None:
    """Remove the staging area of a run that stopped while saving a checkpoint (warning)."""
    staging = os.path.join(output_dir, STAGING_DIR_NAME)
    if os.path.lexists(staging):
        left = sorted(os.listdir(staging)) if os.path.isdir(staging) else []
        logger.warning("removing %s, left by a run that stopped while saving a checkpoint (%s)",
                       staging, ", ".join(left) or "empty")
        if os.path.isdir(staging) and not os.path.islink(staging):
            shutil.rmtree(staging)
        else:
            os.unlink(staging)


def _record_problems(path: str, record: Any) -> list[str]:
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict):
        return [f"{COMPLETION_RECORD_NAME} lists no files"]
    problems = []
    for rel, size in files.items():
        full = os.path.join(path, *rel.split("/"))
        if not os.path.isfile(full):
            problems.append(f"{rel} is missing")
        elif os.path.getsize(full) != size:
            problems.append(f"{rel} has {os.path.getsize(full)} bytes, "
                            f"{COMPLETION_RECORD_NAME} says {size}")
    return problems


def _deepspeed_problems(path: str, world_size: int) -> tuple[list[str], bool]:
    """DeepSpeed's part: ``latest`` names a ``global_stepN`` directory holding every rank's model
    and optimizer states. Returns (problems, whether this is a DeepSpeed checkpoint)."""
    latest = os.path.join(path, "latest")
    tags = [d for d in _listdir(path) if re.match(r"^global_step\d+$", d)]
    if not os.path.isfile(latest):
        if tags:
            return ["latest (DeepSpeed's pointer to its global_step directory) is missing"], True
        return [], False
    try:
        with open(latest) as f:
            tag = f.read().strip()
    except OSError as exc:
        return [f"latest cannot be read: {error_text(exc)}"], True
    tag_dir = os.path.join(path, tag)
    if not tag or not os.path.isdir(tag_dir):
        return [f"latest names {tag!r}, which is missing"], True
    names = _listdir(tag_dir)
    problems = []
    for kind in ("model_states", "optim_states"):
        found = [n for n in names if n.endswith(f"{kind}.pt")]
        if not found:
            problems.append(f"{tag}/ holds no *{kind}.pt")
        elif kind == "optim_states" and len(found) < world_size:
            problems.append(f"{tag}/ holds {len(found)} *{kind}.pt for {world_size} processes")
    return problems, True


def _has_fsdp(path: str) -> bool:
    return any(n.startswith("pytorch_model_fsdp") for n in _listdir(path))


def _fsdp_problems(path: str) -> list[str]:
    """FSDP's sharded (torch.distributed.checkpoint) directories, ``pytorch_model_fsdp_*/`` and
    ``optimizer_*/``: the ``.metadata`` file (written last, once every rank's shards are in) must
    read, and every byte range it records must lie in an existing shard file."""
    problems = []
    for name in _listdir(path):
        full = os.path.join(path, name)
        if not (name.startswith(("pytorch_model_fsdp", "optimizer_")) and os.path.isdir(full)):
            continue
        if not os.path.isfile(os.path.join(full, ".metadata")):
            problems.append(f"{name}/.metadata is missing")  # written last by a complete save
            continue
        try:
            from torch.distributed.checkpoint import FileSystemReader

            storage = FileSystemReader(full).read_metadata().storage_data
        except Exception as exc:  # unpickling a damaged file can raise nearly anything
            problems.append(f"{name}/.metadata cannot be read: {error_text(exc)}")
            continue
        ends: dict[str, int] = {}
        for info in storage.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
        for rel, end in sorted(ends.items()):
            shard = os.path.join(full, rel)
            if not os.path.isfile(shard):
                problems.append(f"{name}/{rel} is missing")
            elif os.path.getsize(shard) < end:
                problems.append(f"{name}/{rel} is cut short ({os.path.getsize(shard)} of {end} bytes)")
    return problems


def _has_fsdp_optimizer(path: str) -> bool:
    return _has_fsdp(path) and any(n.startswith("optimizer") and n != "optimizer.pt"
                                   for n in _listdir(path))


def _weight_problems(path: str, other_weights: bool) -> list[str]:
    if any(os.path.isfile(os.path.join(path, n)) for n in _WEIGHT_FILES):
        return []
    if any(os.path.isfile(os.path.join(path, n)) for n in _ADAPTER_FILES):
        # a LoRA run's checkpoint: the adapter weights need their config to be loaded
        config, problem = _read_json(os.path.join(path, _ADAPTER_CONFIG))
        if problem:
            return [f"{_ADAPTER_CONFIG} {problem}"]
        if not isinstance(config, dict) or not config.get("peft_type"):
            return [f"{_ADAPTER_CONFIG} names no peft_type"]
        return []
    for index_name in _WEIGHT_INDEXES:
        index_path = os.path.join(path, index_name)
        if os.path.isfile(index_path):
            index, problem = _read_json(index_path)
            if problem:
                return [f"{index_name} {problem}"]
            shards = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
            if not shards:
                return [f"{index_name} lists no weight shards"]
            return [f"weight shard {s} (listed in {index_name}) is missing" for s in shards
                    if not os.path.isfile(os.path.join(path, s))]
    if other_weights:  # DeepSpeed / FSDP hold the weights in their own files
        return []
    return ["model weights are missing (no model.safetensors, pytorch_model.bin or sharded index)"]


def _state_problems(path: str) -> list[str]:
    state_path = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state_path):
        return ["trainer_state.json is missing"]
    state, problem = _read_json(state_path)
    if problem:
        return [f"trainer_state.json {problem}"]
    match = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    step = state.get("global_step") if isinstance(state, dict) else None
    if not isinstance(step, int):
        return ["trainer_state.json has no global_step"]
    if match and step != int(match.group(1)):
        return [f"trainer_state.json says global_step {step}, not {match.group(1)}"]
    return []


def _rng_problems(path: str, world_size: int) -> list[str]:
    names = set(_listdir(path))
    if world_size > 1:
        missing = [f"rng_state_{i}.pth" for i in range(world_size) if f"rng_state_{i}.pth" not in names]
        return [f"{', '.join(missing)} missing"] if missing else []
    if not any(re.match(r"^rng_state(_\d+)?\.pth$", n) for n in names):
        return ["rng_state.pth is missing"]
    return []


def _truncation_problems(path: str) -> list[str]:
    """Files whose own format shows they were cut short: safetensors (the header gives the data
    size) and torch.save zip archives (the directory is at the end)."""
    problems = []
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if name.endswith(".safetensors"):
                if not _safetensors_whole(full):
                    problems.append(f"{rel} is cut short")
            elif name.endswith((".pt", ".pth", ".bin")):
                try:
                    with open(full, "rb") as f:
                        zipped = f.read(2) == b"PK"
                except OSError:
                    zipped = False
                if zipped and not zipfile.is_zipfile(full):
                    problems.append(f"{rel} is cut short")
    return problems


def _safetensors_whole(path: str) -> bool:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return False
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return 8 + n + max(ends, default=0) == size
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


# ----------------------------------------------------------------------------- a save without room

# A write refused for want of room: the filesystem is full, a quota is reached, or a file reached
# this process's file size limit (``ulimit -f``, RLIMIT_FSIZE)
NO_ROOM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# below this much free space, a write that failed without saying why failed for want of room
_LOW_FREE_BYTES = 16 * 2**20


def no_room_errno(exc: BaseException, directory: str) -> Optional[int]:
    """ENOSPC, EDQUOT or EFBIG when ``exc``, raised while writing below ``directory``, means that the
    filesystem, a quota or the file size limit left no room; None for any other failure.

    Writers say it differently: Python's files (json, shutil) raise an OSError with the errno,
    safetensors a ``SafetensorError`` whose text ends ``(os error 28)``, and torch.save's zip
    writer a ``RuntimeError`` ("unexpected pos 95168 vs 95056") that has lost the errno. For that
    last kind the filesystem is asked: (almost) no free space left, or a file below ``directory``
    that reached the file size limit.
    """
    seen: set[int] = set()
    link: Optional[BaseException] = exc
    while link is not None and id(link) not in seen:  # the exception and what it wraps
        seen.add(id(link))
        if isinstance(link, OSError) and link.errno in NO_ROOM_ERRNOS:
            return link.errno
        match = re.search(r"os error (\d+)\)|\[Errno (\d+)\]", str(link))
        if match and int(match.group(1) or match.group(2)) in NO_ROOM_ERRNOS:
            return int(match.group(1) or match.group(2))
        link = link.__cause__ or link.__context__
    if free_bytes(directory) < _LOW_FREE_BYTES:
        return errno.ENOSPC
    limit = _file_size_limit()
    if limit is not None and any(size >= limit for size in _file_sizes(directory).values()):
        return errno.EFBIG
    return None


def no_room_message(code: int, exc: BaseException, staging: str, run_root: str) -> str:
    """One line for a checkpoint save into ``staging`` that failed with ``code`` (see
    :func:`no_room_errno`): the cause, the path, what the save needs against what there is, and
    what the user can do. Call it before the staging directory is removed (its files say how far
    the save got)."""
    name = os.path.basename(staging)
    sizes = _file_sizes(staging)
    path = getattr(exc, "filename", None)
    if not path and sizes:  # the writer did not say: the file written last
        path = os.path.join(staging, max(sizes, key=lambda rel: _mtime(os.path.join(staging, rel))))
    previous = (checkpoint_dirs(run_root) or [None])[-1]  # published whole: complete
    text = f"cannot save {name} in {run_root}: {os.strerror(code)}"
    if path:
        text += f" (writing {path})"
    if code == errno.EFBIG:
        limit = _file_size_limit()
        if limit is not None:
            text += f"; this process may write files of at most {size_text(limit)} (ulimit -f)"
        if previous:
            biggest = max(_file_sizes(previous).values(), default=0)
            text += f", the largest file of {os.path.basename(previous)} has {size_text(biggest)}"
        advice = "raise the file size limit (ulimit -f)"
    else:
        if previous:
            text += (f"; a checkpoint needs about {size_text(sum(_file_sizes(previous).values()))}"
                     f" (the size of {os.path.basename(previous)})")
        else:
            text += f"; {size_text(sum(sizes.values()))} were written before it failed"
        text += f", {size_text(free_bytes(run_root))} are free there"
        advice = "free some space" if code == errno.ENOSPC else "free some space or raise the quota"
    if previous:
        return (f"{text}. The partial checkpoint was removed and {os.path.basename(previous)} is "
                f"intact: {advice}, then rerun the same command to resume from it")
    return (f"{text}. The partial checkpoint was removed (there is no earlier one): {advice}, "
            f"then rerun the same command")


def free_bytes(path: str) -> int:
    """Bytes an unprivileged process can still write on ``path``'s filesystem (statvfs)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 2**63 - 1  # unknown: never taken for a full disk
    return st.f_bavail * st.f_frsize


def _file_size_limit() -> Optional[int]:
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def _file_sizes(directory: str) -> dict[str, int]:
    """Every file below ``directory`` (its path relative to it, ``/``-separated) -> its size."""
    sizes = {}
    for root, _, names in os.walk(directory):
        for name in names:
            full = os.path.join(root, name)
            try:
                sizes[os.path.relpath(full, directory).replace(os.sep, "/")] = os.path.getsize(full)
            except OSError:
                pass
    return sizes


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


def size_text(n: int) -> str:
    """``n`` bytes for a message: ``512 bytes``, ``755.7 KiB``, ``12.0 GiB``."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ----------------------------------------------------------------------------- the lock

@dataclasses.dataclass
class RunLock:
    """The lock of an output directory, held by this process (see :func:`acquire_run_lock`)."""

    path: str
    fd: Optional[int]
    previous_holder: Optional[dict] = None  # a dead run's record, when its lock was taken over

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self.fd is None:
            return
        try:
            # unlinked while still locked: a run that opened this file meanwhile finds, once it
            # gets the lock, that the path no longer names it, and starts over on a new file
            if _names_open_file(self.path, self.fd):
                os.unlink(self.path)
        except OSError as exc:
            logger.warning("could not remove the lock file %s: %s", self.path, error_text(exc))
        finally:
            os.close(self.fd)
            self.fd = None


def acquire_run_lock(output_dir: str, command: Optional[list[str]] = None) -> RunLock:
    """Create ``output_dir`` if needed and take its lock, proving it writable.

    Raises :class:`~simpo.config.UserError` when the directory cannot be created or written, or
    when another live run holds it (naming that run). A lock file left by a dead run is taken over
    with a warning naming it.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"output_dir {output_dir} is not a directory")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output_dir {output_dir}: {error_text(exc)}") from None
    path = os.path.join(output_dir, LOCK_NAME)
    for _ in range(50):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise UserError(f"output_dir {output_dir} is not writable: {error_text(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            busy = exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
            holder = _read_holder(fd, wait=busy) if busy else None
            os.close(fd)
            if busy:
                raise UserError(_busy_message(output_dir, holder)) from None
            raise UserError(f"cannot lock output_dir {output_dir} ({path}): {error_text(exc)}") from None
        if _names_open_file(path, fd):
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock
    else:
        raise UserError(f"cannot lock output_dir {output_dir}: {path} keeps being replaced")
    previous = _read_holder(fd, wait=False)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": _utc_now(),
              "command": list(sys.argv if command is None else command)}
    try:
        data = json.dumps(holder).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        raise UserError(f"output_dir {output_dir} is not writable: {error_text(exc)}") from None
    if previous is not None:
        logger.warning("taking over the lock of output_dir %s left by a run that is no longer "
                       "running (%s)", output_dir, _describe_holder(previous, "started"))
    return RunLock(path=path, fd=fd, previous_holder=previous)


def _read_holder(fd: int, wait: bool) -> Optional[dict]:
    """The holder record in the lock file; a holder that just took the lock may not have written
    it yet, hence the short wait when the lock is busy."""
    deadline = time.monotonic() + (1.0 if wait else 0.0)
    while True:
        try:
            size = os.fstat(fd).st_size
            raw = os.pread(fd, max(size, 1), 0)
        except OSError:
            raw = b""
        if raw.strip():
            try:
                info = json.loads(raw)
                return info if isinstance(info, dict) else {"content": raw.decode(errors="replace")}
            except ValueError:
                if time.monotonic() >= deadline:
                    return {"content": raw.decode(errors="replace")[:200]}
        elif time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _describe_holder(holder: Optional[dict], since: str) -> str:
    if not holder:
        return "pid unknown: the lock file is empty"
    if "pid" not in holder:
        return f"pid unknown: the lock file holds {holder.get('content', holder)!r}"
    text = f"pid {holder['pid']} on host {holder.get('host', '?')}, {since} {holder.get('since', '?')}"
    command = holder.get("command")
    if command:
        text += f": {' '.join(map(str, command)) if isinstance(command, list) else command}"
    return text


def _busy_message(output_dir: str, holder: Optional[dict]) -> str:
    return (f"output_dir {output_dir} is in use by another simpo-train run "
            f"({_describe_holder(holder, 'running since')}). Wait for it to finish (or stop it), "
            f"or choose another --output_dir")


def _names_open_file(path: str, fd: int) -> bool:
    try:
        st_path, st_fd = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (st_path.st_dev, st_path.st_ino) == (st_fd.st_dev, st_fd.st_ino)


# ----------------------------------------------------------------------------- run configuration

class NothingToTrain(Exception):
    """A rerun with nothing left to train (a finished run, or a checkpoint already past the asked
    length): its message says so and how to train more; the run exits 0, outputs untouched."""


def run_config(model_args: Any, data_args: Any, training_args: Any,
               recipe_path: Optional[str] = None) -> dict:
    """The effective configuration of a run, JSON-safe: every field of the three argument
    dataclasses (tokens masked by ``TrainingArguments.to_dict``), the recipe and the command line,
    the process count and global batch, and a fingerprint of every local data file
    (:func:`data_fingerprint`). Call it on one process: it reads the data files whole."""
    world_size = int(getattr(training_args, "world_size", 1) or 1)
    return {
        "format": 2,
        "recipe": None if recipe_path is None else str(recipe_path),
        "command": list(sys.argv),
        "written": _utc_now(),
        "model": _json_safe({f.name: getattr(model_args, f.name) for f in dataclasses.fields(model_args)}),
        "data": _json_safe({f.name: getattr(data_args, f.name) for f in dataclasses.fields(data_args)}),
        "training": _json_safe(training_args.to_dict()),
        "distributed": {"world_size": world_size,
                        "global_batch": int(training_args.per_device_train_batch_size)
                        * int(training_args.gradient_accumulation_steps) * world_size},
        "data_files": data_fingerprint(data_args),
    }


def data_fingerprint(data_args: Any) -> dict:
    """``{split: {path, size, sha256}}`` for each local data file the run reads (the shipped data
    when no data is named; for a mixture, each of its local datasets' files, keyed
    ``"{split} (dataset N)"``); ``{}`` for a hub dataset (its name and config are settings).
    The hash is streamed in 1 MiB blocks, so a large file costs one sequential read. Data that
    cannot be found is left to the data loader, which reports it with its own message."""
    from .data import DataError, local_data_files

    try:
        files = local_data_files(data_args)
    except DataError:
        return {}
    out = {}
    for split, path in files.items():
        try:
            out[split] = {"path": os.path.abspath(path), "size": os.path.getsize(path),
                          "sha256": _sha256(path)}
        except OSError:
            continue  # unreadable: the data loader says why
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every setting that both configurations record with different
    values, except :data:`IGNORED_KEYS`; the process count and global batch; data files whose
    content changed."""
    return [text for _, text in _differences(old, new)]


def _differences(old: dict, new: dict) -> list[tuple[str, str]]:
    """(key, message) for each difference (see :func:`config_differences`)."""
    before, after = _flatten(old), _flatten(new)
    out = [(key, f"{key}: {_show(before[key])} -> {_show(value)}") for key, value in after.items()
           if key not in IGNORED_KEYS and key in before and before[key] != value]
    was, now = old.get("distributed"), new.get("distributed")
    if isinstance(was, dict) and isinstance(now, dict):
        parts = [f"{label}: {was.get(key)} -> {now.get(key)}"
                 for key, label in (("world_size", "world_size"), ("global_batch", "global batch"))
                 if was.get(key) != now.get(key)]
        if parts:
            out.append(("world_size", "; ".join(parts)))
    was, now = old.get("data_files"), new.get("data_files")
    if isinstance(was, dict) and isinstance(now, dict):
        for split, file in now.items():
            prev = was.get(split)
            if not (isinstance(prev, dict) and isinstance(file, dict)):
                continue
            if (prev.get("size"), prev.get("sha256")) != (file.get("size"), file.get("sha256")):
                size = "" if prev.get("size") == file.get("size") else \
                    f"size {prev.get('size')} -> {file.get('size')} bytes, "
                out.append(("data_files", f"data file {os.path.basename(str(file.get('path')))} "
                                          f"(split {split!r}): content changed ({size}sha256 "
                                          f"{str(prev.get('sha256'))[:12]}.. -> "
                                          f"{str(file.get('sha256'))[:12]}..)"))
    return out


def read_run_config(output_dir: str) -> tuple[Optional[dict], Optional[str]]:
    """(the previous run's configuration in ``output_dir`` or None, why it cannot be read)."""
    path = os.path.join(output_dir, RUN_CONFIG_NAME)
    if not os.path.exists(path):
        return None, None
    config, problem = _read_json(path)
    if problem is None and not isinstance(config, dict):
        problem = "does not hold a JSON object"
    return (config, None) if problem is None else (None, problem)


def write_run_config(output_dir: str, config: dict) -> str:
    """Write ``config`` as ``output_dir``'s run configuration; returns its path."""
    path = os.path.join(output_dir, RUN_CONFIG_NAME)
    _write_json_atomically(path, config)
    return path


def write_final_record(output_dir: str, state: Any) -> str:
    """Record that the run in ``output_dir`` finished (:data:`FINAL_RECORD_NAME`: its step, epoch
    and length). Call it last, once every output is written: a run that stops early (a signal, a
    divergence, a crash) never writes it, so a rerun resumes that run rather than declaring it
    done."""
    record = {"format": 1, "finished": _utc_now(), "global_step": int(state.global_step),
              "epoch": float(state.epoch or 0.0), "max_steps": int(state.max_steps),
              "num_train_epochs": float(state.num_train_epochs)}
    path = os.path.join(output_dir, FINAL_RECORD_NAME)
    _write_json_atomically(path, record)
    return path


def read_final_record(output_dir: str) -> Optional[dict]:
    """The finished run's record in ``output_dir`` (:func:`write_final_record`), or None."""
    record, problem = _read_json(os.path.join(output_dir, FINAL_RECORD_NAME))
    if problem is None and isinstance(record, dict) and isinstance(record.get("global_step"), int):
        return record
    if os.path.exists(os.path.join(output_dir, FINAL_RECORD_NAME)):
        logger.warning("ignoring %s: %s", os.path.join(output_dir, FINAL_RECORD_NAME),
                       problem or "it does not hold a global_step")
    return None


def supersede_previous_run(output_dir: str) -> Optional[str]:
    """Move a previous run's checkpoints, run configuration, state, results and final model out of
    the way, into ``output_dir/superseded-<UTC time>/``; other files stay. Returns that directory,
    or None when there was nothing to move."""
    if not os.path.isdir(output_dir):
        return None
    names = sorted(n for n in os.listdir(output_dir)
                   if n in RUN_OUTPUT_NAMES or _WEIGHT_SHARD_RE.match(n)
                   or (CHECKPOINT_RE.match(n) and os.path.isdir(os.path.join(output_dir, n))))
    if not names:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = os.path.join(output_dir, SUPERSEDED_PREFIX + stamp)
    suffix = 1
    while os.path.lexists(target):
        suffix += 1
        target = os.path.join(output_dir, f"{SUPERSEDED_PREFIX}{stamp}-{suffix}")
    os.mkdir(target)
    for name in names:
        os.rename(os.path.join(output_dir, name), os.path.join(target, name))
    return target


def resolve_start(output_dir: str, config: dict, existing_run: str = "resume",
                  resume_from_checkpoint: Optional[str] = None, max_steps: int = -1) -> Optional[str]:
    """Decide how a run starts in ``output_dir`` (call it holding the lock); returns the checkpoint
    to resume from, or None to start at step 0.

    Removes a crashed save's staging area. With ``existing_run`` ``fresh`` moves the previous run
    aside (:func:`supersede_previous_run`). Otherwise finds the checkpoint to continue (a given
    ``resume_from_checkpoint``, checked, or the last complete one; never a ``save_only_model``
    one) and compares ``config`` with the settings of the run it continues (the checkpoint's own
    recorded settings for a given one, and output_dir's previous run): any difference but the
    run's length (:data:`LENGTH_KEYS`) is refused (:class:`~simpo.config.UserError`) unless
    ``existing_run`` is ``resume_anyway``; a new length is allowed, and logged (the learning-rate
    schedule is recomputed for it). A finished run (:func:`write_final_record`) that already
    reached the asked length, or a checkpoint past it, raises :class:`NothingToTrain`. Finally the
    finished record is removed and ``config`` recorded as the run configuration.
    """
    if existing_run not in ("resume", "fresh", "resume_anyway"):
        raise UserError(f"existing_run: must be resume, fresh or resume_anyway, got {existing_run!r}")
    remove_leftover_staging(output_dir)
    if existing_run == "fresh":
        if resume_from_checkpoint:
            raise UserError(f"--existing_run fresh starts again from step 0, but "
                            f"resume_from_checkpoint is {resume_from_checkpoint}: drop one of them")
        moved = supersede_previous_run(output_dir)
        if moved:
            logger.warning("--existing_run fresh: moved the previous run's checkpoints and outputs "
                           "into %s", moved)
        write_run_config(output_dir, config)
        return None

    final = None if resume_from_checkpoint else read_final_record(output_dir)
    if resume_from_checkpoint:
        checkpoint = _check_explicit_checkpoint(resume_from_checkpoint)
    else:
        checkpoint = last_complete_checkpoint(output_dir)
    differences = _differences_to_continue(output_dir, config, checkpoint,
                                           bool(resume_from_checkpoint), final is not None)
    others = [text for key, text in differences if key not in LENGTH_KEYS]
    if others and existing_run == "resume":
        target = f"from {os.path.basename(checkpoint)}" if checkpoint else "in this output_dir"
        raise UserError(
            f"output_dir {output_dir} holds a previous run with other settings "
            f"({'; '.join(text for _, text in differences)}). Rerun with --existing_run fresh to "
            f"start again (its checkpoints and outputs are moved into "
            f"{output_dir}/{SUPERSEDED_PREFIX}<time>/), or with --existing_run resume_anyway to "
            f"continue {target} with the new settings")
    if checkpoint is not None and any(key == "world_size" for key, _ in differences):
        _refuse_resharding(checkpoint, config)
    frozen = [text for key, text in differences if key in OPTIMIZER_STATE_KEYS]
    if frozen and checkpoint is not None:
        raise UserError(
            f"{'; '.join(frozen)}: {os.path.basename(os.path.normpath(checkpoint))}'s optimizer "
            f"state keeps the earlier value(s), so the change would not take effect. Rerun with "
            f"the earlier value(s), or start again with --existing_run fresh")

    training = config.get("training") if isinstance(config.get("training"), dict) else {}
    length = [text for key, text in differences if key in LENGTH_KEYS]
    state = _checkpoint_state(checkpoint) if checkpoint is not None else {}
    step = state.get("global_step") if isinstance(state.get("global_step"), int) else None
    if final is not None and _reached(final.get("global_step"), final.get("epoch"), training):
        how = ("raise --max_steps or --num_train_epochs (it continues from its last "
               "checkpoint), or start again with --existing_run fresh" if checkpoint is not None
               else "start again with --existing_run fresh (it saved no checkpoint to continue "
                    "from)")
        raise NothingToTrain(
            f"nothing left to train: output_dir {output_dir} holds a run that finished at step "
            f"{final['global_step']} ({_asked(training)} asked for); its outputs are left as they "
            f"are. To train more, {how}")
    if final is not None and checkpoint is None:
        _refuse_model_only(output_dir)
        raise UserError(
            f"output_dir {output_dir} holds a run that finished at step {final['global_step']} "
            f"without saving a checkpoint, so it cannot be continued to {_asked(training)}: rerun "
            f"with --existing_run fresh to train again from step 0 (with --save_strategy steps to "
            f"be able to continue it later)")
    if checkpoint is None:
        _refuse_model_only(output_dir)
    elif step is not None and max_steps and 0 < max_steps < step:
        raise NothingToTrain(
            f"nothing left to train: {os.path.basename(os.path.normpath(checkpoint))} is already "
            f"at step {step}, past max_steps {max_steps}; output_dir {output_dir} is left as it "
            f"is. To train more raise --max_steps, or start again with --existing_run fresh")
    if others:
        logger.warning("--existing_run resume_anyway: continuing with settings that differ "
                       "from the previous run's: %s", "; ".join(others))
    if checkpoint is not None:
        logger.info("resuming from %s (step %s)", checkpoint, step)
        if length:
            logger.warning("%s: the run continues from step %s to the new length; the learning-rate "
                           "schedule is recomputed for it (from step %s on, lr follows the new "
                           "length's schedule, not the one the run started with)",
                           "; ".join(length), step, step)
        if step is not None and _reached(step, state.get("epoch"), training):
            logger.warning("%s already completed the %s asked for: nothing left to train; writing "
                           "the run's final outputs from it",
                           os.path.basename(os.path.normpath(checkpoint)), _asked(training))
    _remove(os.path.join(output_dir, FINAL_RECORD_NAME))  # this run is not finished until it ends
    write_run_config(output_dir, config)
    return checkpoint


def _differences_to_continue(output_dir: str, config: dict, checkpoint: Optional[str],
                             explicit: bool, finished: bool) -> list[tuple[str, str]]:
    """(key, message) for each way ``config`` differs from the run it would continue: an explicit
    checkpoint's own recorded settings (none recorded is a difference), output_dir's previous run,
    and the process count the checkpoint was saved with."""
    differences: list[tuple[str, str]] = []
    if explicit:
        recorded, unreadable = read_run_config(checkpoint)
        if recorded is not None:
            differences += _differences(recorded, config)
        else:
            differences.append((RUN_CONFIG_NAME, f"{checkpoint} records no settings to compare with "
                                                 f"({RUN_CONFIG_NAME} {unreadable or 'is missing'})"))
    # Only a previous run that left something (a checkpoint to resume, final outputs to overwrite)
    # is protected: one that failed before training (bad data path, ...) is not.
    if checkpoint is not None or finished or _has_run_outputs(output_dir):
        previous, unreadable = read_run_config(output_dir)
        if previous is not None:
            differences += _differences(previous, config)
        if unreadable:
            differences.append((RUN_CONFIG_NAME, f"{RUN_CONFIG_NAME}: {unreadable}"))
    if checkpoint is not None:
        differences += _checkpoint_world_size(checkpoint, config, differences)
    differences = list(dict.fromkeys(differences))  # the checkpoint's and output_dir's: once
    if _max_steps(config) > 0 and all(k != "max_steps" for k, _ in differences):
        # a fixed number of steps: the epoch count is not used, so not a new length
        differences = [(k, t) for k, t in differences if k != "num_train_epochs"]
    return differences


def _reached(step: Any, epoch: Any, training: dict) -> bool:
    """Whether a run at ``step`` (``epoch``) has reached the length ``training`` asks for."""
    max_steps = training.get("max_steps")
    if isinstance(max_steps, int) and max_steps > 0:
        return isinstance(step, int) and step >= max_steps
    epochs = training.get("num_train_epochs")
    return isinstance(epoch, (int, float)) and isinstance(epochs, (int, float)) \
        and epoch >= epochs - 1e-6


def _max_steps(config: dict) -> int:
    training = config.get("training") if isinstance(config.get("training"), dict) else {}
    value = training.get("max_steps")
    return value if isinstance(value, int) else -1


def _asked(training: dict) -> str:
    max_steps = training.get("max_steps")
    if isinstance(max_steps, int) and max_steps > 0:
        return f"max_steps {max_steps}"
    return f"num_train_epochs {training.get('num_train_epochs')}"


def _check_explicit_checkpoint(path: str) -> str:
    """A ``resume_from_checkpoint`` that can be resumed from, or a UserError saying why not."""
    problems = checkpoint_problems(path)
    if problems:
        raise UserError(f"resume_from_checkpoint {path} cannot be resumed from: {'; '.join(problems)}")
    if is_model_only(path):
        raise UserError(
            f"resume_from_checkpoint {path} was saved with save_only_model: it holds the model "
            f"weights but no optimizer, scheduler or RNG state, so training cannot continue from "
            f"it. To start a new run from its weights: --model_name_or_path {path} (without "
            f"--resume_from_checkpoint)")
    return path


def is_model_only(path: str) -> bool:
    """Whether checkpoint ``path`` was saved with ``save_only_model`` (its completion record says
    so): it cannot be resumed from."""
    return bool(_completion_record(path).get("save_only_model"))


def _completion_record(path: str) -> dict:
    """Checkpoint ``path``'s completion record, or ``{}`` when it has no readable one."""
    record, problem = _read_json(os.path.join(path, COMPLETION_RECORD_NAME))
    return record if problem is None and isinstance(record, dict) else {}


def _refuse_model_only(output_dir: str) -> None:
    """No checkpoint to resume from, but model-only ones: say so rather than start again."""
    model_only = [path for path in checkpoint_dirs(output_dir) if is_model_only(path)]
    if model_only:
        raise UserError(
            f"output_dir {output_dir} holds only checkpoints saved with save_only_model ("
            f"{', '.join(os.path.basename(p) for p in model_only)}): they have no optimizer, "
            f"scheduler or RNG state to resume from. Start again with --existing_run fresh, or "
            f"start a new run from their weights with --model_name_or_path {model_only[-1]} and "
            f"another --output_dir")


def _checkpoint_world_size(checkpoint: str, config: dict,
                           known: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The process count the checkpoint was saved with (its completion record) against this run's,
    when the run configurations did not already tell (configurations of older runs lack it)."""
    if any(key == "world_size" for key, _ in known):
        return []
    saved, now = _saved_and_current_world_size(checkpoint, config)
    if isinstance(saved, int) and isinstance(now, int) and saved != now:
        return [("world_size", f"world_size: {saved} -> {now} "
                               f"({os.path.basename(os.path.normpath(checkpoint))} was saved by "
                               f"{saved} process(es))")]
    return []


def _refuse_resharding(checkpoint: str, config: dict) -> None:
    """DeepSpeed's ZeRO checkpoints hold one optimizer partition per process and load only into
    the same process count: refused even with resume_anyway, before any work."""
    saved, now = _saved_and_current_world_size(checkpoint, config)
    if os.path.isfile(os.path.join(checkpoint, "latest")) and saved != now:
        raise UserError(f"{checkpoint} holds DeepSpeed optimizer partitions of {saved} process(es), "
                        f"which cannot be loaded by {now}: resume with {saved} process(es), or "
                        f"start again with --existing_run fresh")


def _saved_and_current_world_size(checkpoint: str, config: dict) -> tuple[Any, Any]:
    """(the process count ``checkpoint`` was saved by, per its completion record; ``config``'s)."""
    return (_completion_record(checkpoint).get("world_size"),
            (config.get("distributed") or {}).get("world_size"))


def _has_run_outputs(output_dir: str) -> bool:
    """Whether a previous run finished here (its final state, results or model are written)."""
    finished = {"trainer_state.json", "all_results.json", "train_results.json", *_WEIGHT_FILES,
                *_WEIGHT_INDEXES, *_ADAPTER_FILES}
    return any(n in finished for n in _listdir(output_dir))


def _checkpoint_state(checkpoint: str) -> dict:
    state, problem = _read_json(os.path.join(checkpoint, "trainer_state.json"))
    return state if problem is None and isinstance(state, dict) else {}


def _flatten(config: dict) -> dict:
    flat = {}
    for section in ("model", "data", "training"):
        values = config.get(section)
        if isinstance(values, dict):
            flat.update(values)
    return flat


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _json_safe(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return _json_safe(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _json_safe(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    return str(value)


# ----------------------------------------------------------------------------- small helpers

def _read_json(path: str) -> tuple[Any, Optional[str]]:
    try:
        with open(path) as f:
            return json.load(f), None
    except FileNotFoundError:
        return None, "is missing"
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cannot be read ({error_text(exc)})"
    except ValueError as exc:
        return None, f"is not valid JSON ({exc})"


def _write_json_atomically(path: str, value: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every filesystem can sync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
