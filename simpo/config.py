"""Configuration: model, data and SimPO training arguments, and the recipe + CLI parser.

``simpo-train [RECIPE] [--key value ...]``: RECIPE is a YAML file, or the name of a recipe shipped
with the package (``tiny``, ``gemma-2-9b-it-simpo``); without one the embedded ``tiny`` recipe is
used. Every field of :class:`ModelArguments`, :class:`DataArguments` and :class:`SimPOConfig`
(which extends ``transformers.TrainingArguments``) can be set in the recipe and overridden on the
command line; command-line values win. An unknown key, in the recipe or on the command line, is an
error naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from transformers import HfArgumentParser, TrainingArguments

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
DEFAULT_RECIPE = "tiny"


class ConfigError(ValueError):
    """A recipe or command line that cannot be turned into a configuration."""


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Hub id or local path of a causal LM; 'tiny' or unset builds the embedded "
                          "tiny Gemma-2-architecture model and word-level tokenizer in code."})
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer, if not the model's."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision."})
    torch_dtype: Optional[str] = field(
        default=None,
        metadata={"help": "Load dtype: auto, bfloat16, float16, float32 (unset: the default).",
                  "choices": ["auto", "bfloat16", "float16", "float32"]})
    attn_implementation: Optional[str] = field(
        default="eager",
        metadata={"help": "eager (Gemma-2: needed for attention softcapping), sdpa or "
                          "flash_attention_2 (>= 2.6.3)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code."})
    tiny_hidden_size: int = field(default=96, metadata={"help": "Embedded tiny model: hidden size."})
    tiny_num_layers: int = field(default=2, metadata={"help": "Embedded tiny model: layers."})


@dataclass
class DataArguments:
    dataset_name: Optional[str] = field(
        default=None,
        metadata={"help": "Hub dataset name, or a local JSON/JSONL/parquet file, a directory holding "
                          "{split}.jsonl/.json/.parquet files, or a path containing '{split}'. Unset: "
                          "the preference data shipped with the package."})
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Hub dataset config."})
    dataset_splits: list[str] = field(
        default_factory=lambda: ["train", "test"],
        metadata={"help": "Train split, then (optionally) the eval split."})
    chat_template: Optional[str] = field(
        default=None,
        metadata={"help": "A Jinja chat template, or 'gemma' for the official Gemma-2 SimPO template; "
                          "unset keeps the tokenizer's."})
    auto_insert_empty_system_msg: bool = field(
        default=True, metadata={"help": "Insert an empty system message when the template knows one "
                                        "(as the official pipeline)."})
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "Processes for dataset templating/tokenisation."})
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first N training rows."})
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first N evaluation rows."})


@dataclass
class SimPOConfig(TrainingArguments):
    """``TrainingArguments`` plus the official SimPO options."""

    beta: float = field(default=2.0, metadata={"help": "SimPO beta (reward scale)."})
    gamma_beta_ratio: float = field(default=0.25, metadata={"help": "gamma / beta (target margin)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing (sigmoid loss)."})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid or hinge.",
                                                          "choices": ["sigmoid", "hinge"]})
    sft_weight: float = field(default=0.0, metadata={"help": "Weight of the chosen-row NLL term."})
    max_length: int = field(default=512, metadata={"help": "Max prompt + response tokens."})
    max_prompt_length: int = field(default=128, metadata={"help": "Prompt length after truncation."})
    truncation_mode: str = field(default="keep_end", metadata={
        "help": "How the prompt is truncated: keep_end (official) or keep_start.",
        "choices": ["keep_end", "keep_start"]})
    label_pad_token_id: int = field(default=-100, metadata={"help": "Ignore index of labels."})
    padding_value: Optional[int] = field(default=None, metadata={
        "help": "Input-id padding value (default: the tokenizer's pad token)."})
    disable_dropout: bool = field(default=True, metadata={"help": "Zero every dropout."})
    loss_backend: str = field(default="auto", metadata={
        "help": "simpo_kernels backend: auto, eager, torch or triton.",
        "choices": ["auto", "eager", "torch", "triton"]})
    loss_schedule: str = field(default="auto", metadata={
        "help": "simpo_kernels schedule: auto, pairs (gradients formed in the forward), vocab "
                "(vocabulary chunks), fused (triton) or tokens (torch).",
        "choices": ["auto", "pairs", "vocab", "fused", "tokens"]})
    loss_memory_budget: Optional[int] = field(default=None, metadata={
        "help": "Bytes of float32 logits scratch per chunk of the pairs/vocab schedules "
                "(default: a quarter of free GPU memory; 256 MiB on CPU)."})
    logit_metrics: str = field(default="exact", metadata={
        "help": "logits/* metrics: exact (official: every position), targets (target positions "
                "only, free) or none.",
        "choices": ["exact", "targets", "none"]})
    loss_chunk_size: Optional[int] = field(default=None, metadata={
        "help": "Tokens per chunk of the torch backend's tokens schedule."})
    plot: bool = field(default=True, metadata={
        "help": "Write training_curves.png (reward accuracy and margins) to output_dir."})

    def __post_init__(self):
        super().__post_init__()
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"max_prompt_length ({self.max_prompt_length}) must be smaller than "
                              f"max_length ({self.max_length})")
        from simpo_kernels.validation import check_options

        try:  # the loss's own checks, early (hinge + label_smoothing warns, as the official one)
            check_options(beta=float(self.beta), gamma_beta_ratio=float(self.gamma_beta_ratio),
                          label_smoothing=float(self.label_smoothing), loss_type=self.loss_type,
                          sft_weight=float(self.sft_weight))
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from exc


ARG_CLASSES = (ModelArguments, DataArguments, SimPOConfig)
# Names of earlier transformers releases (used by the official SimPO recipes) -> current names.
# Renamed (transformers 5.x): the recipe may use either name; the current one is used when it exists.
ALIASES = {"warmup_ratio": "warmup_steps", "evaluation_strategy": "eval_strategy",
           "gradient_checkpointing": "activation_checkpointing",
           "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}


def resolve_recipe(recipe: Optional[str]) -> Path:
    """A recipe path, or the name of a packaged recipe (``tiny``, ``gemma-2-9b-it-simpo``)."""
    if recipe is None:
        recipe = DEFAULT_RECIPE
    path = Path(recipe)
    if path.is_file():
        return path
    packaged = RECIPES_DIR / (recipe if recipe.endswith((".yaml", ".yml")) else f"{recipe}.yaml")
    if packaged.is_file():
        return packaged
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(f"recipe {recipe!r} is neither a file nor a packaged recipe ({', '.join(known)})")


def _field_types():
    types_ = {}
    for cls in ARG_CLASSES:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                types_[f.name] = hints.get(f.name, f.type)
    return types_


def _coerce(name, value, tp):
    """YAML reads ``8e-7`` (no dot) as a string; turn such scalars into the field's numeric type."""
    if not isinstance(value, str):
        return value
    candidates = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    for target in (float, int):
        if target in candidates:
            try:
                return target(value)
            except ValueError as exc:
                raise ConfigError(f"{name}: cannot read {value!r} as {target.__name__}") from exc
    return value


def _cli_parser() -> HfArgumentParser:
    parser = HfArgumentParser(ARG_CLASSES, prog="simpo-train", description=__doc__,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    return parser


def parse_args(argv: Optional[list[str]] = None):
    """``argv`` (default ``sys.argv[1:]``) -> ``(ModelArguments, DataArguments, SimPOConfig, recipe)``."""
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = None
    if argv and not argv[0].startswith("-"):
        recipe = argv.pop(0)
    recipe_path = resolve_recipe(recipe)
    with open(recipe_path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{recipe_path}: a recipe must be a mapping of option: value")

    # Parse only what was given on the command line: with every default suppressed, the namespace
    # holds exactly the overrides, typed by HfArgumentParser's rules (bools, lists, choices, ...).
    parser = _cli_parser()
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
            action.required = False
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [u for u in unknown if u.startswith("-")] or unknown
        raise ConfigError(f"unknown option(s) {' '.join(flags)} (see simpo-train --help)")
    values.update(vars(namespace))

    types_ = _field_types()
    for old, new in ALIASES.items():  # older TrainingArguments names used by published recipes
        if old in values and new in types_:
            if new in values and old in values:
                raise ConfigError(f"both {old} and its replacement {new} are set")
            values[new] = values.pop(old)
    bad = sorted(set(values) - set(types_))
    if bad:
        raise ConfigError(f"{recipe_path}: unknown key(s) {', '.join(bad)}")
    values = {k: _coerce(k, v, types_[k]) for k, v in values.items()}
    outputs = []
    for cls in ARG_CLASSES:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        try:
            outputs.append(cls(**{k: v for k, v in values.items() if k in names}))
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:  # e.g. TrainingArguments' own consistency checks
            raise ConfigError(f"{recipe_path.name}: {exc}") from exc
    model_args, data_args, training_args = outputs
    check_loss_backend(model_args, training_args)
    return model_args, data_args, training_args, recipe_path


def check_loss_backend(model_args: ModelArguments, training_args: SimPOConfig) -> None:
    """Refuse, before any data or model is loaded, a ``loss_backend`` that cannot compute the
    loss in this run's dtype on this run's device (e.g. ``triton`` in bfloat16 on a CPU, where
    the Triton interpreter would compute garbage). The dtype is the autocast one when ``bf16`` /
    ``fp16`` is set, else ``torch_dtype`` (unset or ``auto``: float32 is assumed here; the loss
    checks the real dtype again on the first step)."""
    import torch

    from simpo_kernels.api import check_backend

    on_cpu = training_args.use_cpu or not torch.cuda.is_available()
    if training_args.bf16:
        dtype = torch.bfloat16
    elif training_args.fp16:
        dtype = torch.float16
    elif model_args.torch_dtype in ("bfloat16", "float16", "float32"):
        dtype = getattr(torch, model_args.torch_dtype)
    else:
        dtype = torch.float32
    try:
        check_backend(training_args.loss_backend, "cpu" if on_cpu else "cuda", dtype,
                      schedule=training_args.loss_schedule)
    except (TypeError, ValueError, RuntimeError) as exc:
        where = "CPU" if on_cpu else "CUDA"
        raise ConfigError(f"loss_backend {training_args.loss_backend} cannot run this configuration "
                          f"({str(dtype).replace('torch.', '')} on {where}): {exc}") from exc


def help_text() -> str:
    return _cli_parser().format_help()


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
