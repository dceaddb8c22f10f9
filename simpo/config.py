"""Configuration: model, data and preference-loss training arguments, and the recipe + CLI parser.

``simpo-train [RECIPE] [--key value ...]``: RECIPE (or ``--config RECIPE``) is a YAML file, or the
name of a recipe shipped with the package (``tiny``, ``tiny-dpo``, ``gemma-2-9b-it-simpo``,
``gemma-2-9b-it-dpo``); without one the embedded ``tiny`` recipe is used. Every field of
:class:`ModelArguments`, :class:`DataArguments` and :class:`SimPOConfig` (which extends
``transformers.TrainingArguments``) can be set in the recipe and overridden on the command line;
command-line values win. An unknown key, in the recipe or on the command line, is an error naming
it.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import inspect
import json
import logging
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import yaml
from transformers import HfArgumentParser, TrainingArguments

from simpo_kernels.losses import LOSSES

logger = logging.getLogger("simpo.config")

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
DEFAULT_RECIPE = "tiny"

# The losses, every loss_type value and every loss option, as --help lists them: read off the
# library's loss classes (simpo_kernels.losses.LOSSES), the one source of truth.
LOSS_NAMES = tuple(LOSSES)
LOSS_TYPES = tuple(dict.fromkeys(t for cls in LOSSES.values() for t in cls.loss_types))
# every loss option simpo-train has a field for (each belongs to one or more losses)
LOSS_OPTION_FIELDS = tuple(dict.fromkeys(k for cls in LOSSES.values() for k in cls.defaults))


class UserError(Exception):
    """A mistake of the user's (configuration, data, paths, a busy output_dir): ``simpo-train``
    prints its message on one line, without a traceback (``--debug`` shows it), and exits with
    :attr:`exit_code`."""

    exit_code = 1


class RunStopped(BaseException):
    """The run stopped on a signal before it finished (SIGTERM: a scheduler's preemption, SIGINT:
    Ctrl-C): ``simpo-train`` prints its message on one line and exits with 128 + the signal number
    (143, 130). A ``BaseException``, like ``KeyboardInterrupt``, so that no library's
    ``except Exception`` swallows it on its way out. ``agreed``: every process stopped at the same
    point (a checkpoint was written together), so they can still close the process group."""

    def __init__(self, signum: int, message: str, agreed: bool = False):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        self.agreed = agreed


def is_explicit_path(text: str) -> bool:
    """A name the user wrote as a filesystem path (``/x``, ``./x``, ``../x``, ``~/x``), never a
    hub id (``org/name``)."""
    return text.startswith(("/", "./", "../", "~"))


def error_text(exc: BaseException) -> str:
    """``exc`` for a one-line message: an OSError's ``strerror`` ("Not a directory"), else the first
    non-empty line of its text, else its type's name."""
    strerror = getattr(exc, "strerror", None)
    if strerror:
        return strerror
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class ConfigError(UserError, ValueError):
    """A recipe or command line that cannot be turned into a configuration."""

    exit_code = 2


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Hub id or local path of a causal LM; 'tiny' or unset builds the embedded "
                          "tiny Gemma-2-architecture model and word-level tokenizer in code."})
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer, if not the model's."})
    ref_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "dpo, rdpo: hub id or local path of the reference model (unset: the "
                          "initial policy, model_name_or_path); loaded like the policy."})
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
    # LoRA / QLoRA: TRL ModelConfig's names and defaults (simpo.lora)
    use_peft: bool = field(default=False, metadata={
        "help": "Train LoRA adapters (peft) instead of the whole model; output_dir gets the adapter "
                "and output_dir/merged the merged model."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (use_peft)."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA alpha (use_peft)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (use_peft)."})
    lora_target_modules: Optional[list[str]] = field(default=None, metadata={
        "help": "Modules that get LoRA adapters, or all-linear (use_peft; unset: peft's default "
                "for the model type)."})
    lora_modules_to_save: Optional[list[str]] = field(default=None, metadata={
        "help": "Modules trained whole and saved with the adapter, e.g. lm_head (use_peft)."})
    use_rslora: bool = field(default=False, metadata={
        "help": "Rank-stabilised LoRA: scaling lora_alpha/sqrt(r) (use_peft)."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA adapters (use_peft)."})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA: load the model 4-bit quantised (bitsandbytes, CUDA; with use_peft)."})
    load_in_8bit: bool = field(default=False, metadata={
        "help": "Load the model 8-bit quantised (bitsandbytes, CUDA; with use_peft)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={
        "help": "4-bit quantisation type (load_in_4bit).", "choices": ["nf4", "fp4"]})
    use_bnb_nested_quant: bool = field(default=False, metadata={
        "help": "Nested (double) 4-bit quantisation (load_in_4bit)."})

    def __post_init__(self):
        from .lora import check_model_options

        check_model_options(self)
        _check(self.tiny_hidden_size > 0 and self.tiny_hidden_size % 8 == 0, "tiny_hidden_size",
               self.tiny_hidden_size, "a positive multiple of 8 (4 heads of an even size)")
        _check(self.tiny_num_layers >= 1, "tiny_num_layers", self.tiny_num_layers, ">= 1")
        for key in ("model_name_or_path", "tokenizer_name_or_path", "ref_model_name_or_path"):
            value = getattr(self, key)
            # an explicit filesystem path (a hub id is "org/name") must exist: say so now, not
            # after the data has been processed
            if value and is_explicit_path(value) \
                    and not os.path.exists(os.path.expanduser(value)):
                raise ConfigError(f"{key}: no such file or directory: {value}")


@dataclass
class DataArguments:
    dataset_name: Optional[str] = field(
        default=None,
        metadata={"help": "Hub dataset name, or a local JSON/JSONL/parquet file, a directory holding "
                          "{split}.jsonl/.json/.parquet files, or a path containing '{split}'. Unset: "
                          "the preference data shipped with the package."})
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Hub dataset config."})
    # dict-valued (a recipe mapping, or a JSON object on the command line); str is the command
    # line's form, turned into the dict by __post_init__
    dataset_mixer: Optional[Union[dict, str]] = field(
        default=None,
        metadata={"help": "The official recipes' mixture {dataset: fraction}: the first fraction "
                          "of each dataset's train split (file order), concatenated and shuffled "
                          "with seed 42; eval splits whole. Datasets as dataset_name accepts them. "
                          "On the command line a JSON object. Replaces dataset_name."})
    dataset_configs: Optional[list[str]] = field(
        default=None, metadata={"help": "dataset_mixer: the hub config of each dataset, in order."})
    dataset_mixture: Optional[Union[dict, str]] = field(
        default=None,
        metadata={"help": "alignment-handbook's mixture {datasets: [{id, config, split, columns, "
                          "weight}], seed, test_split_size}: weight is the fraction of each "
                          "dataset's rows (a seed-shuffled sample), concatenated and shuffled with "
                          "seed; test_split_size (a fraction or a row count) splits off the eval "
                          "split. On the command line a JSON object. Replaces dataset_name."})
    dataset_splits: list[str] = field(
        default_factory=lambda: ["train", "test"],
        metadata={"help": "Train split, then (optionally) the eval split."})
    chat_template: Optional[str] = field(
        default=None,
        metadata={"help": "A Jinja chat template, 'gemma' (the official Gemma-2 SimPO template) or "
                          "'tokenizer' (the tokenizer's own, over a recipe's). Unset: the "
                          "tokenizer's own (the embedded tiny tokenizer's is Gemma's)."})
    auto_insert_empty_system_msg: bool = field(
        default=True, metadata={"help": "Insert an empty system message when the template knows one "
                                        "(as the official pipeline)."})
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "Processes for dataset templating/tokenisation."})
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first N training rows."})
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first N evaluation rows."})
    dataset_shuffle: bool = field(
        default=True, metadata={"help": "Shuffle the loaded train and eval splits with seed 42 "
                                        "before the trainer's own sampler, as the official "
                                        "run_simpo.py (alignment-handbook get_datasets) does."})
    eval_fraction: float = field(
        default=0.0, metadata={"help": "Hold out this fraction of the train split (a deterministic "
                                       "seed-42 split) for evaluation when the data has no eval "
                                       "split; 0 means no evaluation."})

    def __post_init__(self):
        splits = self.dataset_splits
        _check(1 <= len(splits) <= 2 and len(set(splits)) == len(splits), "dataset_splits", splits,
               "a train split, then optionally another (eval) split")
        _check(0.0 <= self.eval_fraction < 1.0, "eval_fraction", self.eval_fraction, "in [0, 1)")
        for key in ("max_train_samples", "max_eval_samples", "preprocessing_num_workers"):
            value = getattr(self, key)
            _check(value is None or value >= 1, key, value, ">= 1 (or unset)")
        _check_chat_template(self.chat_template)
        self._check_mixtures()

    def _check_mixtures(self) -> None:
        """dataset_mixer / dataset_mixture: a JSON object from the command line becomes the dict a
        recipe gives; both are checked (and the mixture's defaults filled in) here, so a mistake
        is one line before any data is loaded."""
        for key in ("dataset_mixer", "dataset_mixture"):
            setattr(self, key, _json_object(key, getattr(self, key)))
        given = [k for k in DATA_SOURCE_KEYS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ConfigError(f"{given[-1]}: {' and '.join(given[:-1])} already names the data: "
                              f"keep one of them")
        if self.dataset_configs is not None and self.dataset_mixer is None:
            raise ConfigError("dataset_configs: applies to dataset_mixer (one config per dataset); "
                              "use dataset_config with dataset_name")
        if self.dataset_mixer is not None:
            self.dataset_mixer = _checked_mixer(self.dataset_mixer)
            if self.dataset_config is not None:
                raise ConfigError("dataset_config: applies to dataset_name; with dataset_mixer give "
                                  "dataset_configs, one per dataset")
            if self.dataset_configs is not None \
                    and len(self.dataset_configs) != len(self.dataset_mixer):
                raise ConfigError(f"dataset_configs: {len(self.dataset_configs)} config(s) for "
                                  f"{len(self.dataset_mixer)} dataset(s) of dataset_mixer: give "
                                  f"one per dataset, in order")
        if self.dataset_mixture is not None:
            self.dataset_mixture = _checked_mixture(self.dataset_mixture)
            for key, bad, why in (
                    ("dataset_config", self.dataset_config is not None,
                     "give each dataset's config in dataset_mixture"),
                    ("eval_fraction", self.eval_fraction > 0,
                     "use dataset_mixture's test_split_size"),
                    ("dataset_shuffle", not self.dataset_shuffle,
                     "dataset_mixture always shuffles with its seed, as alignment-handbook")):
                if bad:
                    raise ConfigError(f"{key}: does not apply to dataset_mixture: {why}")


MIXTURE_KEYS = ("datasets", "seed", "test_split_size")
MIXTURE_DATASET_KEYS = ("id", "config", "split", "columns", "weight")


def _json_object(key: str, value):
    """A dict option as the command line gives it (JSON text) -> the dict; a dict stays."""
    if not isinstance(value, str):
        return value
    try:
        value = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{key}: not a JSON object (column {exc.colno}): {exc.msg}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a mapping (a JSON object), got {_kind(value)}")
    return value


def _kind(value) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _fraction(key: str, value, *, zero: bool) -> float:
    """A mixture fraction: a finite number in [0, 1] (``zero``) or (0, 1]."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (0 <= value <= 1 if zero else 0 < value <= 1)
    if not ok:
        raise ConfigError(f"{key}: must be a number in {'[0, 1]' if zero else '(0, 1]'} (the "
                          f"fraction of the dataset's rows), got {_kind(value)}")
    return float(value)


def _checked_mixer(mixer: dict) -> dict:
    """``{dataset: fraction}``, fractions as floats. The official ``mix_datasets`` takes the first
    ``int(fraction * rows)`` rows of each train split: a fraction above 1 asks for rows that do not
    exist; 0 is allowed (the dataset then gives only its eval split), all 0 is not."""
    if not mixer:
        raise ConfigError("dataset_mixer: empty: name at least one dataset with its fraction")
    out = {}
    for name, fraction in mixer.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"dataset_mixer: a dataset must be a hub id or a path, got "
                              f"{_kind(name)}")
        out[name] = _fraction(f"dataset_mixer: {name}", fraction, zero=True)
    if not any(out.values()):
        raise ConfigError("dataset_mixer: every fraction is 0: no train rows")
    return out


def _checked_mixture(mixture: dict) -> dict:
    """alignment-handbook's ``DatasetMixtureConfig`` with its defaults filled in (split ``train``,
    weight 1.0, seed 0, no test split) and each value checked."""
    unknown = [str(k) for k in mixture if k not in MIXTURE_KEYS]
    if unknown:
        raise ConfigError(f"dataset_mixture: unknown key(s) {', '.join(unknown)} (keys: "
                          f"{', '.join(MIXTURE_KEYS)})")
    entries = mixture.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"dataset_mixture: datasets must be a non-empty list of {{id, config, "
                          f"split, columns, weight}}, got {_kind(entries)}")
    datasets, columns_seen = [], None
    for number, entry in enumerate(entries, start=1):
        where = f"dataset_mixture: datasets[{number}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a mapping {{id, config, split, columns, weight}}, "
                              f"got {_kind(entry)}")
        unknown = [str(k) for k in entry if k not in MIXTURE_DATASET_KEYS]
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (keys: "
                              f"{', '.join(MIXTURE_DATASET_KEYS)})")
        ident = entry.get("id")
        if not isinstance(ident, str) or not ident.strip():
            raise ConfigError(f"{where}: id (a hub id or a path) is missing")
        config, split = entry.get("config"), entry.get("split", "train")
        if config is not None and not isinstance(config, str):
            raise ConfigError(f"{where}: config must be a name, got {_kind(config)}")
        if not isinstance(split, str) or not split:
            raise ConfigError(f"{where}: split must be a split name, got {_kind(split)}")
        columns = entry.get("columns")
        if columns is not None:
            if not isinstance(columns, list) or not columns \
                    or not all(isinstance(c, str) and c for c in columns):
                raise ConfigError(f"{where}: columns must be a list of column names, got "
                                  f"{_kind(columns)}")
            # alignment-handbook's check: the datasets are concatenated, so one set of columns
            if columns_seen is not None and set(columns) != set(columns_seen):
                raise ConfigError(f"{where}: columns {columns} differ from an earlier dataset's "
                                  f"{columns_seen}: a mixture has one set of columns")
            columns_seen = columns
        weight = _fraction(f"{where}: weight", entry.get("weight", 1.0), zero=False)
        datasets.append({"id": ident, "config": config, "split": split, "columns": columns,
                         "weight": weight})
    seed = mixture.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 32:
        raise ConfigError(f"dataset_mixture: seed must be an integer in [0, 2**32 - 1], got "
                          f"{_kind(seed)}")
    test = mixture.get("test_split_size")
    if test is not None:
        is_number = isinstance(test, (int, float)) and not isinstance(test, bool)
        if not is_number or not ((isinstance(test, int) and test >= 1)
                                 or (isinstance(test, float) and 0 < test < 1)):
            raise ConfigError(f"dataset_mixture: test_split_size must be a fraction in (0, 1) or a "
                              f"row count >= 1, got {_kind(test)}")
    return {"datasets": datasets, "seed": seed, "test_split_size": test}


# chat_template's name for the tokenizer's own template: what unset means, but it also overrides a
# recipe that names one (`simpo-train gemma-2-9b-it-simpo --model_name_or_path X --chat_template
# tokenizer`)
TOKENIZER_TEMPLATE = "tokenizer"


def _check_chat_template(template: Optional[str]) -> None:
    """A template name must be known and a Jinja template must parse: otherwise the name itself
    would be used as the template (every row templated to the same text), or the syntax error
    would surface as a traceback after the data were loaded. "None", "null" and "" (what a user
    types to mean "no template of mine") are refused with the way to say that."""
    from .modeling import CHAT_TEMPLATES

    if template is None or template in CHAT_TEMPLATES or template == TOKENIZER_TEMPLATE:
        return
    if template.strip().lower() in ("", "none", "null"):
        raise ConfigError(f"chat_template: {template!r} is not a template; for the tokenizer's own, "
                          f"leave chat_template unset or set it to {TOKENIZER_TEMPLATE!r} "
                          f"(--chat_template {TOKENIZER_TEMPLATE})")
    if "{" not in template:
        names = ", ".join([*sorted(CHAT_TEMPLATES), TOKENIZER_TEMPLATE])
        raise ConfigError(f"chat_template: {template!r} is neither a template name ({names}) nor a "
                          f"Jinja template")
    import jinja2

    try:
        jinja2.Environment().parse(template)  # syntax only: filters and globals are the tokenizer's
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"chat_template: not a valid Jinja template (line {exc.lineno}): "
                          f"{exc.message}") from None


@dataclass
class SimPOConfig(TrainingArguments):
    """``TrainingArguments`` plus the official SimPO options."""

    # The preference loss and its options. Every option is unset (None) by default: the chosen
    # loss's own default applies (dpo's beta is 0.1, simpo's 2.0); an option the chosen loss does
    # not have, set in the recipe or on the command line, is an error (resolve_loss_options).
    loss: str = field(default="simpo", metadata={
        "help": "The preference loss: simpo, dpo, rdpo, cpo, orpo, rrhf or slic (the options each "
                "takes, and their defaults, are listed in README's loss table).",
        "choices": list(LOSS_NAMES)})
    beta: float = field(default=None, metadata={
        "help": "Reward scale (simpo 2.0, dpo/rdpo/cpo/orpo 0.1 when unset; orpo: the odds-ratio "
                "weight lambda)."})
    gamma_beta_ratio: float = field(default=None, metadata={
        "help": "simpo: gamma / beta, the target margin (unset: 0.25)."})
    label_smoothing: float = field(default=None, metadata={
        "help": "simpo, dpo, cpo: label smoothing of the sigmoid (and robust) loss (unset: 0)."})
    loss_type: str = field(default=None, metadata={
        "help": "simpo: sigmoid, hinge; dpo: sigmoid, hinge, ipo, robust, sigmoid_norm; cpo: "
                "sigmoid, hinge, ipo, simpo (unset: sigmoid).",
        "choices": list(LOSS_TYPES)})
    sft_weight: float = field(default=None, metadata={
        "help": "simpo: weight of the chosen-row NLL term (unset: 0)."})
    rpo_alpha: float = field(default=None, metadata={
        "help": "dpo: weight of the chosen-row NLL term (RPO; unset: 0)."})
    alpha: float = field(default=None, metadata={
        "help": "rdpo: weight of the length term alpha (|chosen| - |rejected|) (unset: 0.05)."})
    simpo_gamma: float = field(default=None, metadata={
        "help": "cpo with loss_type simpo: the target reward margin gamma (unset: 0.5)."})
    cpo_alpha: float = field(default=None, metadata={
        "help": "cpo: weight of the chosen-row NLL term (unset: 1.0; 0 with loss_type simpo is "
                "SimPO with sums)."})
    delta: float = field(default=None, metadata={"help": "slic: the hinge margin (unset: 1.0)."})
    nll_weight: float = field(default=None, metadata={
        "help": "rrhf, slic: weight of the chosen-row NLL term (unset: 1.0)."})
    precompute_ref_log_probs: Optional[bool] = field(default=None, metadata={
        "help": "dpo, rdpo: compute the reference model's log-probs once, before training, over "
                "the train and eval data (cached in output_dir, reused on resume) instead of "
                "running the reference model in every step (unset: true)."})
    precompute_ref_batch_size: Optional[int] = field(default=None, metadata={
        "help": "Pairs per reference forward of the precompute pass (unset: "
                "per_device_eval_batch_size)."})
    max_length: int = field(default=512, metadata={"help": "Max prompt + response tokens."})
    max_prompt_length: int = field(default=128, metadata={"help": "Prompt length after truncation."})
    truncation_mode: str = field(default="keep_end", metadata={
        "help": "How the prompt is truncated: keep_end (official) or keep_start.",
        "choices": ["keep_end", "keep_start"]})
    label_pad_token_id: int = field(default=-100, metadata={"help": "Ignore index of labels."})
    padding_value: Optional[int] = field(default=None, metadata={
        "help": "Input-id padding value (default: the tokenizer's pad token)."})
    padding_free: bool = field(default=False, metadata={
        "help": "Pack each step's chosen and rejected sequences into rows of at most max_length "
                "with no padding between them (position_ids restart per sequence; no "
                "cross-sequence attention): the same pairs, loss and gradients, fewer tokens. "
                "Attention: eager, flex_attention, flash_attention_2 (one row), or sdpa for a "
                "model without attention softcapping."})
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
    logit_metrics: str = field(default=None, metadata={
        "help": "logits/* metrics: exact (every position), targets (target positions only, free) "
                "or none (unset: the loss's official one: targets for dpo and rdpo, exact for "
                "the others).",
        "choices": ["exact", "targets", "none"]})
    loss_chunk_size: Optional[int] = field(default=None, metadata={
        "help": "Tokens per chunk of the torch backend's tokens schedule."})
    existing_run: str = field(default="resume", metadata={
        "help": "What to do with a previous run in output_dir: resume (from its last complete "
                "checkpoint; refused if a setting that changes what is trained differs, except a "
                "longer max_steps / num_train_epochs, which extends the run; a finished run has "
                "nothing left to train), fresh (move its checkpoints and outputs aside and start "
                "again) or resume_anyway (resume despite different settings).",
        "choices": ["resume", "fresh", "resume_anyway"]})
    plot: bool = field(default=True, metadata={
        "help": "Write training_curves.png (loss, learning rate, reward accuracy and margins) to "
                "output_dir."})
    log_completions: bool = field(default=False, metadata={
        "help": "At each evaluation, append greedy completions of the first "
                "log_completions_prompts eval prompts to output_dir/completions.jsonl (step, "
                "prompt, completion)."})
    log_completions_prompts: int = field(default=4, metadata={
        "help": "log_completions: how many eval prompts."})
    log_completions_max_new_tokens: int = field(default=32, metadata={
        "help": "log_completions: new tokens per completion."})
    # TrainingArguments' do_train (False) and do_eval are flags for example scripts that the
    # Trainer itself never reads; simpo-train trains unless told otherwise, as the official
    # run_simpo.py (which ignores do_train), and evaluates whenever the data has an eval split.
    do_train: bool = field(default=True, metadata={
        "help": "Train (false: evaluate the model on the eval split only: no training, no "
                "checkpoint, no model written; do_eval must not be false)."})
    do_eval: Optional[bool] = field(default=None, metadata={
        "help": "Evaluate on the eval split (during training per eval_strategy, and at the end). "
                "Unset: whenever the data has an eval split; false: never (the eval split is not "
                "used and eval_strategy becomes no)."})
    # Hugging Face's default (True) replaces a non-finite training loss by the logging window's
    # running mean (0.0 at its start) and drops non-finite eval batches from eval_loss: a diverged
    # run would look fine. Off, it also saves the filter's host sync on every micro-batch.
    logging_nan_inf_filter: bool = field(default=False, metadata={
        "help": "Replace non-finite losses in the logs by finite ones (Hugging Face's default; off: "
                "a NaN is logged as NaN, and training stops at the first non-finite step anyway)."})

    # which options the command line set (parse_args fills it): explicit requests, e.g. an
    # --eval_strategy that data without an eval split cannot honour is an error, not ignored
    command_line_keys: frozenset = field(default=frozenset(), init=False, repr=False)

    def __post_init__(self):
        positive = ("max_length", "max_prompt_length", "per_device_train_batch_size",
                    "per_device_eval_batch_size", "gradient_accumulation_steps", "logging_steps",
                    "save_steps", "eval_steps", "loss_chunk_size", "loss_memory_budget",
                    "eval_accumulation_steps", "precompute_ref_batch_size",
                    "log_completions_prompts", "log_completions_max_new_tokens")
        for key in positive:
            value = getattr(self, key)
            _check(value is None or (value > 0 and math.isfinite(value)), key, value,
                   "a finite number > 0" if isinstance(value, float) else "> 0")
        self._check_numbers()
        _check(self.max_steps == -1 or self.max_steps > 0, "max_steps", self.max_steps,
               "a positive number of steps, or -1 to train num_train_epochs")
        _check(self.max_steps > 0 or self.num_train_epochs > 0, "num_train_epochs",
               self.num_train_epochs, "> 0 when max_steps is -1")
        for key in (*_JSON_FILE_OPTIONS, "lr_scheduler_kwargs"):
            _check_json_option(key, getattr(self, key))
        if self.use_liger_kernel:  # on any device: it cannot help here, and it breaks the loss
            raise ConfigError(
                "use_liger_kernel: not supported: Liger replaces the model's forward with its fused "
                "linear cross-entropy, which would bypass the SimPO loss head (that head already "
                "fuses lm_head and loss without materialising the logits, on every backend)")
        if self.do_eval is False and self.eval_strategy not in ("no", None):
            self.eval_strategy = "no"  # do_eval false: no evaluation at all (see _check_relations)
        super().__post_init__()
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"max_prompt_length ({self.max_prompt_length}) must be smaller than "
                              f"max_length ({self.max_length})")
        self._resolve_loss_options()
        _check_report_to(self.report_to)

    @property
    def trainer_checkpointing(self) -> bool:
        """Whether the Trainer's own activation checkpointing is on. transformers after 5.17 names
        it ``activation_checkpointing`` (``gradient_checkpointing`` stays as an alias that mirrors
        it); 5.17, the GPU image's, has only ``gradient_checkpointing``. Read and set it here,
        never through either name directly."""
        return bool(getattr(self, "activation_checkpointing", self.gradient_checkpointing))

    @trainer_checkpointing.setter
    def trainer_checkpointing(self, on: bool) -> None:
        for name in ("activation_checkpointing", "gradient_checkpointing"):
            if hasattr(self, name):  # both where both exist, so the alias mirrors the new name
                setattr(self, name, on)

    @property
    def loss_options(self) -> dict:
        """The chosen loss's options (every one resolved: set, or the loss's default)."""
        return {key: getattr(self, key) for key in loss_defaults(self.loss)}

    @property
    def needs_reference(self) -> bool:
        """Whether the chosen loss compares with a reference model (dpo, rdpo)."""
        return _loss_class(self.loss).needs_reference

    def _resolve_loss_options(self) -> None:
        """Each option of the chosen loss that is unset takes the loss's default; an option the
        loss does not have, set anyway (recipe, command line or code), is a ConfigError naming
        it, never ignored; the loss checks its values itself (a bad one is a ConfigError too).
        ``logit_metrics`` unset becomes the loss's official definition, and
        ``precompute_ref_log_probs`` unset becomes true for a loss with a reference."""
        defaults = loss_defaults(self.loss)
        foreign = [key for key in LOSS_OPTION_FIELDS
                   if key not in defaults and getattr(self, key) is not None]
        if foreign:
            key = foreign[0]
            raise ConfigError(f"{key}: not an option of loss {self.loss} (its options: "
                              f"{', '.join(defaults) or 'none'}); drop {key}, or choose a loss "
                              f"that has it")
        for key, default in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, default)
        types = _loss_class(self.loss).loss_types
        if "loss_type" in defaults and self.loss_type not in types:
            raise ConfigError(f"loss_type: {self.loss_type!r} is not a loss_type of loss "
                              f"{self.loss} (choose from {', '.join(types)})")
        for key in ("precompute_ref_log_probs", "precompute_ref_batch_size"):
            if not self.needs_reference and getattr(self, key) is not None:
                raise ConfigError(f"{key}: loss {self.loss} uses no reference model; drop {key}")
        if self.needs_reference and self.precompute_ref_log_probs is None:
            self.precompute_ref_log_probs = True
        if self.logit_metrics is None:
            self.logit_metrics = _loss_class(self.loss).official_logit_metrics
        try:  # the loss checks its own values (simpo's hinge + label_smoothing warns, as the official one)
            _loss_class(self.loss)(**self.loss_options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"loss {self.loss}: {error_text(exc)}") from exc

    def _check_numbers(self) -> None:
        """Optimizer and schedule values that torch or the Trainer would take as they are, and
        fail on only after the data and model were loaded, or train garbage with (``inf`` and
        ``nan`` parse as floats): each must be finite and in its range."""
        def finite(lo: float, *, above: bool = False, below: Optional[float] = None):
            return lambda v: (math.isfinite(v) and (v > lo if above else v >= lo)
                              and (below is None or v < below))

        rules = (  # key, accepted values, description
            ("learning_rate", finite(0), "a finite number >= 0"),
            ("weight_decay", finite(0), "a finite number >= 0"),
            ("adam_beta1", finite(0, below=1), "in [0, 1)"),
            ("adam_beta2", finite(0, below=1), "in [0, 1)"),
            ("adam_epsilon", finite(0, above=True), "a finite number > 0"),
            ("max_grad_norm", finite(0), "a finite number >= 0 (0 turns clipping off)"),
            ("warmup_steps", finite(0), "a finite number >= 0 (below 1: a fraction of the steps)"),
            ("num_train_epochs", finite(0), "a finite number >= 0"),
            ("eval_delay", finite(0), "a finite number >= 0"),
            ("seed", lambda v: 0 <= v < 2 ** 32, "in [0, 2**32 - 1]"),
            ("dataloader_num_workers", lambda v: v >= 0, ">= 0"),
            ("neftune_noise_alpha", lambda v: v is None or finite(0, above=True)(v),
             "a finite number > 0 (or unset)"),
            # the labels of prompt and padding positions, which the loss ignores: a token id here
            # would silently drop that token from every response's log-probability
            ("label_pad_token_id", lambda v: v < 0, "negative (no token has this id)"),
            ("padding_value", lambda v: v is None or v >= 0, "a token id >= 0 (or unset)"),
        )
        for key, ok, accepted in rules:
            _check(ok(getattr(self, key)), key, getattr(self, key), accepted)
        if self.label_smoothing_factor != 0:
            raise ConfigError(f"label_smoothing_factor ({self.label_smoothing_factor:g}) is "
                              f"transformers' cross-entropy smoothing, which the SimPO loss never "
                              f"uses: set label_smoothing (SimPO's, in [0, 0.5]) instead")


def _check(ok: bool, key: str, value, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: must be {accepted}, got {value!r}")


def _loss_class(name: str):
    return LOSSES[name]


def loss_defaults(name: str) -> dict:
    """The options of loss ``name`` with their defaults (the library's, one source of truth)."""
    return dict(_loss_class(name).defaults)


# dict options that TrainingArguments also reads from a JSON file named by the value
_JSON_FILE_OPTIONS = ("fsdp_config", "deepspeed", "accelerator_config")


def _check_json_option(key: str, value) -> None:
    """A dict option given as text (``deepspeed``, ``fsdp_config``, ...): inline JSON (``{...}``)
    must parse, and a file must exist and hold a JSON object; TrainingArguments would otherwise
    fail with a bare FileNotFoundError / JSONDecodeError, or (``fsdp_config`` without ``fsdp``)
    never look. A ``deepspeed`` value may also be base64-encoded JSON (accelerate reads that)."""
    if not isinstance(value, str):
        return
    if value.lstrip().startswith("{") or key not in _JSON_FILE_OPTIONS:
        text, where = value, "the inline value"
    elif os.path.isfile(value):  # opened as given, as TrainingArguments does (no ~ expansion)
        try:
            with open(value, encoding="utf-8") as f:
                text, where = f.read(), value
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{key}: cannot read {value}: {error_text(exc)}") from None
    elif key == "deepspeed" and _base64_json(value):
        return
    else:
        what = "a directory, not a JSON file" if os.path.isdir(value) else "no such file"
        raise ConfigError(f"{key}: {what}: {value}")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{key}: {where} is not valid JSON (line {exc.lineno}, column "
                          f"{exc.colno}): {exc.msg}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{key}: {where} must hold a JSON object, got a {type(config).__name__}")


def _base64_json(text: str) -> bool:
    import base64
    import binascii

    try:
        return isinstance(json.loads(base64.urlsafe_b64decode(text).decode("utf-8")), dict)
    except (binascii.Error, ValueError):
        return False


# pip package of each report_to integration (when it is not the integration's own name), and the
# transformers function that says whether it is installed
_REPORT_TO = {"azure_ml": ("azureml-core", "is_azureml_available"),
              "comet_ml": ("comet-ml", "is_comet_available"),
              "mlflow": ("mlflow", "is_mlflow_available"),
              "neptune": ("neptune", "is_neptune_available"),
              "tensorboard": ("tensorboard", "is_tensorboard_available"),
              "trackio": ("trackio", "is_trackio_available"),
              "wandb": ("wandb", "is_wandb_available"),
              "codecarbon": ("codecarbon", "is_codecarbon_available"),
              "clearml": ("clearml", "is_clearml_available"),
              "dagshub": ("dagshub", "is_dagshub_available"),
              "flyte": ("flytekit", "is_flytekit_available"),
              "dvclive": ("dvclive", "is_dvclive_available"),
              "swanlab": ("swanlab", "is_swanlab_available")}


def _check_report_to(report_to: list) -> None:
    """Each ``report_to`` integration is one transformers knows and whose package is installed:
    the Trainer would raise either only once the data and model are loaded."""
    from transformers.integrations import integration_utils

    known = integration_utils.INTEGRATION_TO_CALLBACK
    for name in report_to or []:
        if name not in known:
            raise ConfigError(f"report_to: unknown integration {name!r} (known: "
                              f"{', '.join(sorted(known))}; or all, none)")
        package, available = _REPORT_TO.get(name, (None, None))
        is_available = getattr(integration_utils, available, None) if available else None
        if is_available is not None and not is_available():
            raise ConfigError(f"report_to {name}: the {package} package is not installed (pip "
                              f"install {package}), or choose another integration (none: no "
                              f"reporting)")


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


def _packaged_recipes(loss: str) -> list[str]:
    """The packaged recipes whose ``loss`` is ``loss`` (a recipe without one is a simpo recipe)."""
    names = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        try:
            with open(path) as f:
                recipe = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(recipe, dict) and recipe.get("loss", "simpo") == loss:
            names.append(path.stem)
    return names


def _field_types():
    types_ = {}
    for cls in ARG_CLASSES:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                types_[f.name] = hints.get(f.name, f.type)
    return types_


def _admits(tp, kind: type) -> bool:
    """Whether a field annotation accepts ``kind`` (``dict`` / ``list``) values as they are."""
    return any(a is kind or typing.get_origin(a) is kind for a in (typing.get_args(tp) or (tp,)))


def _clean_help(text: str) -> str:
    """reST markup of docstrings (``x``, :class:`x`, `x`) -> plain text for --help."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return re.sub(r"``?([^`]+)``?", r"\1", text)


def _fsdp_value(text: str):
    """``fsdp``: true/false as every other switch; any other text is TrainingArguments' own
    (FSDP1-era option strings, which it checks)."""
    word = text.strip().lower()
    if word in ("true", "yes", "1"):
        return True
    if word in ("false", "no", "0", ""):
        return None
    return text


class _Parser(HfArgumentParser):
    """HfArgumentParser whose errors are ConfigErrors (no argparse exit, no usage dump) and whose
    long options are never abbreviated (``--max-step 5`` is an unknown option, not max_steps)."""

    def error(self, message):
        # "argument --beta: invalid float value: 'x'" -> "beta: invalid float value: 'x'"
        message = re.sub(r"^argument --([\w-]+)(/--[\w-]+)*: ", lambda m: m.group(1).replace("-", "_")
                         + ": ", message)
        raise ConfigError(message)


USAGE = "simpo-train [RECIPE | --config RECIPE] [--key value ...] [--debug]"
DESCRIPTION = (
    "Train with SimPO (or another preference loss: --loss dpo, rdpo, cpo, orpo, rrhf, slic). "
    "RECIPE is a YAML file or a packaged recipe name (tiny, tiny-dpo, gemma-2-9b-it-simpo, "
    "gemma-2-9b-it-dpo); without one the embedded tiny recipe runs. Every option below can be set "
    "in the recipe (key: value) and overridden here (--key value, or --key-name value); both are "
    "read by the same rules. The defaults shown are the recipe's. --debug (or SIMPO_DEBUG=1) shows "
    "tracebacks of user errors.")


def _cli_parser(defaults: Optional[dict] = None) -> _Parser:
    parser = _Parser(ARG_CLASSES, prog="simpo-train", usage=USAGE, description=DESCRIPTION,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    for action in parser._actions:
        if action.help:
            action.help = _clean_help(action.help)
        if action.dest == "fsdp":  # `--fsdp true` / `fsdp: true` as well as a bare `--fsdp`
            action.type = _fsdp_value
        if action.dest == "do_eval":  # unset by default, and a bare `--do_eval` as every switch
            action.nargs, action.const = "?", True
        if defaults and action.dest in defaults and action.const is not False:
            action.default = defaults[action.dest]
    return parser


def _override_parser() -> _Parser:
    """The CLI parser with every default suppressed: a namespace then holds exactly what was given."""
    parser = _cli_parser()
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
            action.required = False
    return parser


def _yaml_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class _DuplicateKey(Exception):
    """A key given twice in one mapping of a recipe."""


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the later
    value silently). Merge keys (``<<: *base``) still override, as YAML means them to."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, typing.Hashable):
                    continue  # the base loader says what is wrong with it
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _DuplicateKey(f"{key} is given twice (lines {seen[key]} and {line}): "
                                        f"keep one")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_recipe_values(path: Path, parser: _Parser, types_: dict) -> dict:
    """The recipe's values, each read by the command line's own rules (``plot: "false"`` is False,
    ``beta: true`` is an error, choices are checked)."""
    try:
        with open(path) as f:
            raw = yaml.load(f, Loader=_RecipeLoader)
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or error_text(exc)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the recipe: {error_text(exc)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of option: value")
    raw = _apply_aliases(raw, types_, str(path))
    bad = sorted(str(k) for k in set(raw) - set(types_))
    if bad:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(bad)}")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.const is not False}
    values = {}
    for key, value in raw.items():
        tp, action = types_[key], actions[key]
        optional = type(None) in typing.get_args(tp)
        many = action.nargs in ("+", "*")
        if value is None:
            if not optional:
                raise ConfigError(f"{path.name}: {key}: null is not allowed here (expects "
                                  f"{getattr(tp, '__name__', tp)})")
            values[key] = None
            continue
        if isinstance(value, dict) or (isinstance(value, list) and not many):
            kind = type(value)
            if not _admits(tp, kind):
                raise ConfigError(f"{path.name}: {key}: expects a single value, got a {kind.__name__} "
                                  f"{value!r}")
            values[key] = value  # e.g. deepspeed / fsdp_config / report_to given inline
            continue
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, (list, dict)) or v is None for v in items):
            raise ConfigError(f"{path.name}: {key}: expects a list of plain values, got {value!r}")
        try:
            ns = parser.parse_args([action.option_strings[0], *map(_yaml_scalar, items)])
        except ConfigError as exc:
            raise ConfigError(f"{path.name}: {exc}") from None
        values[key] = getattr(ns, key)
    return values


def _apply_aliases(values: dict, types_: dict, where: str) -> dict:
    values = dict(values)
    for old, new in ALIASES.items():  # older TrainingArguments names used by published recipes
        if old in values and new in types_:
            if new in values:
                raise ConfigError(f"{where}: both {old} and its replacement {new} are set")
            values[new] = values.pop(old)
    return values


def _cli_alias_argv(argv: list[str], types_: dict) -> list[str]:
    """``--warmup_ratio 0.1`` -> ``--warmup_steps 0.1`` (published recipes' older names)."""
    out = []
    for tok in argv:
        if tok.startswith("--"):
            name, eq, rest = tok[2:].partition("=")
            name = name.replace("-", "_")
            if name in ALIASES and ALIASES[name] in types_ and name not in types_:
                tok = f"--{ALIASES[name]}{eq}{rest}"
        out.append(tok)
    return out


def _build(values: dict):
    outputs = []
    for cls in ARG_CLASSES:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        try:
            outputs.append(cls(**{k: v for k, v in values.items() if k in names}))
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError) as exc:  # TrainingArguments' own checks
            # they relate several options, from the recipe or the command line: no source named
            raise ConfigError(" ".join(str(exc).split())) from exc
    return outputs


def split_recipe(argv: list[str]) -> tuple[Optional[str], list[str]]:
    """``argv`` -> ``(recipe or None, the other arguments)``. The recipe is the first argument
    when it is not an option, or ``--config FILE`` / ``--config=FILE`` anywhere (TRL's and
    alignment-handbook's spelling); both, or ``--config`` twice, is a ConfigError."""
    rest, given = [], []
    if argv and not argv[0].startswith("-"):
        given.append(argv[0])
        argv = argv[1:]
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--config" or tok.startswith("--config="):
            if tok == "--config":
                if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                    raise ConfigError("--config needs a value: a recipe file or packaged recipe name")
                value, i = argv[i + 1], i + 2
            else:
                value, i = tok.partition("=")[2], i + 1
            if not value:
                raise ConfigError("--config needs a value: a recipe file or packaged recipe name")
            given.append(value)
            continue
        rest.append(tok)
        i += 1
    if len(given) > 1:
        raise ConfigError(f"the recipe is given twice ({' and '.join(given)}): give it once, as the "
                          f"first argument or as --config FILE")
    return (given[0] if given else None), rest


def parse_args(argv: Optional[list[str]] = None):
    """``argv`` (default ``sys.argv[1:]``) -> ``(ModelArguments, DataArguments, SimPOConfig, recipe)``.
    The recipe is named first or by ``--config`` (:func:`split_recipe`).

    Recipe values and command-line values go through the same argparse types and choices (one set
    of rules), then the dataclasses' own range and relation checks. Every problem is a
    :class:`ConfigError` naming the key. ``SimPOConfig.command_line_keys`` records which options
    the command line set (the trainer treats those as explicit requests).
    """
    recipe, argv = split_recipe(list(sys.argv[1:] if argv is None else argv))
    recipe_path = resolve_recipe(recipe)
    types_ = _field_types()
    parser = _override_parser()
    values = _read_recipe_values(recipe_path, parser, types_)

    namespace, unknown = parser.parse_known_args(_cli_alias_argv(argv, types_))
    if unknown:
        flags = [u for u in unknown if u.startswith("-")] or unknown
        raise ConfigError(f"unknown option{'s' if len(flags) > 1 else ''} {' '.join(flags)} (the "
                          f"recipe is the first argument or --config FILE; see simpo-train --help)")
    overrides = vars(namespace)
    recipe_loss = values.get("loss", "simpo")
    values.update(overrides)
    _command_line_data_replaces_the_recipes(values, overrides)
    try:
        model_args, data_args, training_args = _build(values)
    except ConfigError as exc:
        key = str(exc).split(":", 1)[0]
        if key in values and key not in overrides:  # say where a bad recipe value comes from
            hint = ""
            if key in LOSS_OPTION_FIELDS and "loss" in overrides and "not an option" in str(exc):
                packaged = _packaged_recipes(overrides["loss"])
                hint = (f" (the recipe's loss options are for loss {recipe_loss}; use a recipe "
                        f"written for loss {overrides['loss']}"
                        + (f", e.g. {' or '.join(packaged)}" if packaged else "") + ")")
            raise ConfigError(f"{recipe_path.name}: {exc}{hint}") from None
        raise
    training_args.command_line_keys = frozenset(overrides)
    if model_args.ref_model_name_or_path and not training_args.needs_reference:
        raise ConfigError(f"ref_model_name_or_path: loss {training_args.loss} uses no reference "
                          f"model; drop ref_model_name_or_path")
    _check_relations(overrides, training_args, recipe_path.name)
    resolve_fsdp_options(training_args)
    check_loss_backend(model_args, training_args)
    if training_args.padding_free:  # before a model is loaded (softcap + sdpa: once it is)
        from .modeling import check_packed_attention

        check_packed_attention(model_args.attn_implementation)
    from .lora import check_peft_run

    check_peft_run(values, model_args, training_args)
    return model_args, data_args, training_args, recipe_path


# the keys that name a run's data (one run reads one of them), and what belongs to each
DATA_SOURCE_KEYS = ("dataset_name", "dataset_mixer", "dataset_mixture")
_DATA_SOURCE_DETAILS = ("dataset_config", "dataset_configs")


def _command_line_data_replaces_the_recipes(values: dict, overrides: dict) -> None:
    """Data named on the command line (``--dataset_name``, ``--dataset_mixer`` or
    ``--dataset_mixture``) replaces the recipe's, whichever key the recipe used, with the recipe's
    hub configs for it (e.g. ``--dataset_name /data/armorm`` with the official recipe's
    ``dataset_mixer``). Two of them in the recipe, or on the command line, stay an error."""
    if any(key in overrides for key in DATA_SOURCE_KEYS):
        for key in DATA_SOURCE_KEYS + _DATA_SOURCE_DETAILS:
            if key not in overrides:
                values.pop(key, None)


def _check_relations(overrides: dict, args: "SimPOConfig", recipe: str) -> None:
    """Options asked for on the command line that the recipe's other settings would ignore."""
    if args.fsdp_config and not args.fsdp:
        raise ConfigError("fsdp_config has no effect: fsdp is off; add --fsdp true")
    _check_run_kind(overrides, args)
    for key, strategy in (("save_steps", "save_strategy"), ("eval_steps", "eval_strategy"),
                          ("logging_steps", "logging_strategy")):
        if key in overrides and getattr(args, strategy) == "no":
            source = "the command line" if strategy in overrides else f"recipe {recipe}"
            raise ConfigError(f"{key}={overrides[key]:g} has no effect: {strategy} is 'no' (from "
                              f"{source}); add --{strategy} steps")


def _check_run_kind(overrides: dict, args: "SimPOConfig") -> None:
    """Combinations of do_train, do_eval and the hub and resume options that would do nothing
    (or contradict each other): each is one line."""
    if not args.do_train and args.do_eval is False:
        raise ConfigError("do_train false and do_eval false: nothing to do (do_train false "
                          "evaluates only, with do_eval unset or true)")
    if "eval_strategy" in overrides and overrides["eval_strategy"] != "no" \
            and args.do_eval is False:
        raise ConfigError(f"eval_strategy {overrides['eval_strategy']} asks for evaluation but "
                          f"do_eval is false: drop one of them")
    for key in ("eval_steps", "eval_on_start", "eval_delay", "max_eval_samples"):
        if key in overrides and args.do_eval is False:
            raise ConfigError(f"{key} has no effect: do_eval is false (no evaluation); drop {key}")
    if not args.do_train:
        eval_only = "do_train false evaluates only"
        if args.push_to_hub:
            raise ConfigError(f"push_to_hub: {eval_only} and writes no model to push; drop "
                              f"push_to_hub (or train)")
        if args.resume_from_checkpoint:
            raise ConfigError(f"resume_from_checkpoint: {eval_only}; to evaluate a checkpoint, "
                              f"pass it as --model_name_or_path")
        for key in ("existing_run", "save_strategy", "save_steps", "plot", "max_steps",
                    "num_train_epochs"):
            if key in overrides:
                raise ConfigError(f"{key} has no effect: {eval_only} (no training, no checkpoint, "
                                  f"no model or plot written); drop {key}")
    if args.log_completions:
        if args.do_eval is False:
            raise ConfigError("log_completions: completions are logged at each evaluation, and "
                              "do_eval is false")
        if args.deepspeed or fsdp_requested(args):
            raise ConfigError("log_completions: not supported with DeepSpeed or FSDP (it generates "
                              "on the main process alone, with the whole model)")
    else:
        for key in ("log_completions_prompts", "log_completions_max_new_tokens"):
            if key in overrides:
                raise ConfigError(f"{key} has no effect: log_completions is off; add "
                                  f"--log_completions true")
    if not args.push_to_hub:
        for key in ("hub_model_id", "hub_strategy", "hub_private_repo", "hub_token",
                    "hub_revision", "hub_always_push"):
            if key in overrides:
                raise ConfigError(f"{key} has no effect: push_to_hub is off; add --push_to_hub "
                                  f"true")


def fsdp_requested(args: "SimPOConfig") -> bool:
    """Whether this run asks for FSDP: ``--fsdp`` / ``fsdp_config``, or an ``accelerate launch``
    config with ``distributed_type: FSDP`` (which reaches the processes as ``ACCELERATE_USE_FSDP``)."""
    return args.fsdp_plugin_args is not None or env_flag("ACCELERATE_USE_FSDP")


def env_flag(name: str) -> bool:
    """An on/off environment variable: on for 1/true/yes/on (any case)."""
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes", "on")


def resolve_fsdp_options(args: "SimPOConfig") -> None:
    """FSDP with DeepSpeed is an error, and so is FSDP1 without a GPU (only FSDP2 runs on CPU
    ranks). FSDP's own activation checkpointing (``fsdp_config`` ``activation_checkpointing``, or
    ``fsdp_activation_checkpointing`` in an accelerate config) and the Trainer's
    ``gradient_checkpointing`` recompute the same activations, and the Trainer refuses both: the
    one a recipe sets is turned off in favour of FSDP's (which skips a redundant all-gather in
    backward); both asked for on the command line is an error."""
    if not fsdp_requested(args):
        return
    if args.deepspeed:
        raise ConfigError("FSDP and DeepSpeed were both asked for: choose one (drop --deepspeed, or "
                          "--fsdp / fsdp_config / the accelerate FSDP config)")
    plugin_args = args.fsdp_plugin_args
    if plugin_args is not None:
        fsdp_checkpointing = bool(plugin_args.get("activation_checkpointing", False))
        version = str(plugin_args.get("fsdp_version", 2))
    else:
        fsdp_checkpointing = env_flag("FSDP_ACTIVATION_CHECKPOINTING")
        version = os.environ.get("FSDP_VERSION", "1")  # accelerate's own default
    import torch

    if version != "2" and (args.use_cpu or not torch.cuda.is_available()):
        raise ConfigError(f"FSDP on CPU ranks runs FSDP2 only; this run asks for FSDP{version} (set "
                          f"fsdp_config version 2, or fsdp_version: 2 in the accelerate config)")
    if not (fsdp_checkpointing and args.trainer_checkpointing):
        return
    keys = {"activation_checkpointing", "gradient_checkpointing"} & set(args.command_line_keys)
    if keys:
        raise ConfigError(f"--{sorted(keys)[0]} true and FSDP's activation_checkpointing both "
                          f"recompute activations: keep one")
    logger.info("FSDP's activation checkpointing replaces the recipe's gradient_checkpointing")
    args.trainer_checkpointing = False


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
    where = "CPU" if on_cpu else "CUDA"
    try:
        backend = check_backend(training_args.loss_backend, "cpu" if on_cpu else "cuda", dtype,
                                schedule=training_args.loss_schedule)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"loss_backend {training_args.loss_backend} cannot run this configuration "
                          f"({str(dtype).replace('torch.', '')} on {where}): {exc}") from exc
    # the torch backend's "auto" schedule is "tokens"; the loss would refuse any other at step 1
    if training_args.loss_chunk_size is not None and not (
            backend == "torch" and training_args.loss_schedule in ("auto", "tokens")):
        resolved = "" if backend == training_args.loss_backend else f" ({backend} on {where})"
        raise ConfigError(f"loss_chunk_size applies only to the torch backend's tokens schedule; "
                          f"this run has loss_backend {training_args.loss_backend}{resolved}, "
                          f"loss_schedule {training_args.loss_schedule} (pairs/vocab chunks "
                          f"follow loss_memory_budget)")


def check_padding_value(training_args: SimPOConfig, tokenizer) -> None:
    """``padding_value`` must be an id of ``tokenizer`` (negative ones are refused at parse time);
    checked once the tokenizer is loaded and before the model is, rather than as an embedding
    IndexError at the first step."""
    pad, vocab = training_args.padding_value, len(tokenizer)
    if pad is not None and pad >= vocab:
        raise ConfigError(f"padding_value: {pad} is not a token id of this tokenizer (its vocabulary "
                          f"has {vocab} ids: 0..{vocab - 1})")


def help_text(argv: Optional[list[str]] = None) -> str:
    """``--help``: every option, the project's own first in groups (:data:`HELP_GROUPS`), with the
    effective default of the recipe ``argv`` names (first, or ``--config``)."""
    recipe, _ = split_recipe(list(argv or []))
    types_ = _field_types()
    path = resolve_recipe(recipe)
    defaults = _read_recipe_values(path, _override_parser(), types_)
    text = _help_parser(defaults).format_help()
    return text + f"\n(defaults from recipe {path})\n"


# --help's groups of options, in the order shown: the project's own, then transformers'.
HELP_GROUPS = {
    "loss": ("loss options", "The preference loss (--loss) and its options (an option the chosen "
                             "loss does not have is an error), and how it is computed."),
    "data": ("data options", None),
    "model": ("model options", None),
    "run": ("run options", None),
    "trainer": ("transformers TrainingArguments", "The Trainer's own options (some refused or "
                                                  "checked further, see README)."),
}
# SimPOConfig's own fields shown with the loss's or the data's options (the rest: run options);
# fields named loss_* or precompute_ref_* join the loss's as well
_LOSS_HELP_FIELDS = frozenset({"loss", "logit_metrics", *LOSS_OPTION_FIELDS})
_DATA_HELP_FIELDS = frozenset({"max_length", "max_prompt_length", "truncation_mode",
                               "label_pad_token_id", "padding_value", "padding_free"})


def help_group(name: str) -> str:
    """The :data:`HELP_GROUPS` key of option ``name``: by the dataclass that defines it, so that a
    new field lands in its group unlisted (ModelArguments: model, DataArguments: data,
    SimPOConfig's own: loss, data or run, TrainingArguments': trainer)."""
    if name in {f.name for f in dataclasses.fields(ModelArguments)}:
        return "model"
    if name in {f.name for f in dataclasses.fields(DataArguments)}:
        return "data"
    if name in inspect.get_annotations(SimPOConfig):  # its own fields, not the inherited ones
        if name in _LOSS_HELP_FIELDS or name.startswith(("loss_", "precompute_ref_")):
            return "loss"
        return "data" if name in _DATA_HELP_FIELDS else "run"
    return "trainer"


def _show_default(value) -> str:
    """A default as it is written in a recipe or on the command line."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "[]"
    if isinstance(value, dict):
        return json.dumps(value)
    if value == "":
        return '""'
    return str(value)


class _HelpFormatter(argparse.HelpFormatter):
    """Each option once (``--max_steps``, not also ``--max-steps``, which is still accepted), and
    its default as a recipe writes it (``true``, ``unset``) rather than as Python prints it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is argparse.SUPPRESS or not action.option_strings or action.nargs == 0:
            return text
        return text + f" (default: {_show_default(action.default)})".replace("%", "%%")

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        strings = list(dict.fromkeys("--" + s[2:].replace("-", "_") if s.startswith("--") else s
                                     for s in action.option_strings))
        if action.nargs == 0:
            return ", ".join(strings)
        args = self._format_args(action, self._get_default_metavar_for_optional(action))
        return ", ".join(f"{s} {args}" for s in strings)


def _help_parser(defaults: dict) -> _Parser:
    """The CLI parser laid out for ``--help`` (never for parsing): the options in
    :data:`HELP_GROUPS`; ``--config`` and ``--debug`` (handled before argparse) documented; a
    switch reads ``--plot [true|false]``, and HfArgumentParser's ``--no_plot`` twin (still
    accepted) is named in its help instead of listed with a backwards default."""
    from transformers.hf_argparser import string_to_bool

    parser = _cli_parser(defaults)
    parser.formatter_class = _HelpFormatter
    general = parser._optionals
    general.title = "general"
    general.add_argument("--config", metavar="RECIPE", default=argparse.SUPPRESS,
                         help="The recipe (a YAML file or a packaged recipe name), as the first "
                              "argument does; give one or the other.")
    groups = {key: parser.add_argument_group(title, description)
              for key, (title, description) in HELP_GROUPS.items()}
    negated = {a.dest for a in general._group_actions if a.option_strings
               and a.option_strings[0] == f"--no_{a.dest}"}
    for action in list(general._group_actions):
        if action.dest in ("help", "config"):
            continue
        if action.dest == "debug":  # simpo-train takes a bare --debug before argparse sees it
            action.help = ("Show the traceback of a user error (also SIMPO_DEBUG=1). "
                           "TrainingArguments' debug features are a recipe key (debug: "
                           "underflow_overflow).")
            action.nargs, action.default = 0, argparse.SUPPRESS
            continue
        if action.option_strings[0] == f"--no_{action.dest}":
            action.help = argparse.SUPPRESS
        elif action.type is string_to_bool:
            action.metavar = "true|false"
            if action.dest in negated:
                text = (action.help or "").rstrip()
                action.help = (f"{text}{'' if text.endswith('.') or not text else '.'} "
                               f"--no_{action.dest} turns it off.").lstrip()
        general._group_actions.remove(action)
        groups[help_group(action.dest)]._group_actions.append(action)
    # SimPOConfig's own fields in the order of its class body (logging_nan_inf_filter, which
    # overrides TrainingArguments' default, would otherwise come first in its inherited place)
    own = list(inspect.get_annotations(SimPOConfig))
    groups["run"]._group_actions.sort(key=lambda a: own.index(a.dest))
    return parser


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
