"""Configuration: model, data and preference-loss training arguments, and the recipe + CLI parser.

``simpo-train [RECIPE] [--key value ...]``: RECIPE is a YAML file, or the name of a recipe shipped
with the package (``tiny``, ``tiny-dpo``, ``gemma-2-9b-it-simpo``, ``gemma-2-9b-it-dpo``); without
one the embedded ``tiny`` recipe is used. Every field of :class:`ModelArguments`,
:class:`DataArguments` and :class:`SimPOConfig` (which extends ``transformers.TrainingArguments``)
can be set in the recipe and overridden on the command line; command-line values win. An unknown
key, in the recipe or on the command line, is an error naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

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

    def __post_init__(self):
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


def _check_chat_template(template: Optional[str]) -> None:
    """A template name must be known and a Jinja template must parse: otherwise the name itself
    would be used as the template (every row templated to the same text), or the syntax error
    would surface as a traceback after the data were loaded."""
    from .modeling import CHAT_TEMPLATES

    if template is None or template in CHAT_TEMPLATES:
        return
    if "{" not in template:
        raise ConfigError(f"chat_template: {template!r} is neither a template name "
                          f"({', '.join(sorted(CHAT_TEMPLATES))}) nor a Jinja template")
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


USAGE = "simpo-train [RECIPE] [--key value ...] [--debug]"
DESCRIPTION = (
    "Train with SimPO (or another preference loss: --loss dpo, rdpo, cpo, orpo, rrhf, slic). "
    "RECIPE is a YAML file or a packaged recipe name (tiny, tiny-dpo, gemma-2-9b-it-simpo, "
    "gemma-2-9b-it-dpo); without one the embedded tiny recipe runs. Every option below can be set "
    "in the recipe (key: value) and overridden here (--key value); both are read by the same rules. "
    "The defaults shown are the recipe's. --debug (or SIMPO_DEBUG=1) shows tracebacks of user errors.")


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


def parse_args(argv: Optional[list[str]] = None):
    """``argv`` (default ``sys.argv[1:]``) -> ``(ModelArguments, DataArguments, SimPOConfig, recipe)``.

    Recipe values and command-line values go through the same argparse types and choices (one set
    of rules), then the dataclasses' own range and relation checks. Every problem is a
    :class:`ConfigError` naming the key. ``SimPOConfig.command_line_keys`` records which options
    the command line set (the trainer treats those as explicit requests).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = None
    if argv and not argv[0].startswith("-"):
        recipe = argv.pop(0)
    recipe_path = resolve_recipe(recipe)
    types_ = _field_types()
    parser = _override_parser()
    values = _read_recipe_values(recipe_path, parser, types_)

    namespace, unknown = parser.parse_known_args(_cli_alias_argv(argv, types_))
    if unknown:
        flags = [u for u in unknown if u.startswith("-")] or unknown
        raise ConfigError(f"unknown option(s) {' '.join(flags)} (see simpo-train --help)")
    overrides = vars(namespace)
    recipe_loss = values.get("loss", "simpo")
    values.update(overrides)
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
    return model_args, data_args, training_args, recipe_path


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
    """``--help``: every option with the effective default of the recipe named first in ``argv``."""
    recipe = argv[0] if argv and not argv[0].startswith("-") else None
    types_ = _field_types()
    path = resolve_recipe(recipe)
    defaults = _read_recipe_values(path, _override_parser(), types_)
    text = _cli_parser(defaults).format_help()
    return text + f"\n(defaults from recipe {path})\n"


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
