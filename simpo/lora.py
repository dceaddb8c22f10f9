"""LoRA / QLoRA for ``simpo-train`` (peft), with TRL ``ModelConfig``'s option names.

* Options: :class:`simpo.config.ModelArguments` has TRL's fields (``use_peft``, ``lora_r``,
  ``lora_alpha``, ``lora_dropout``, ``lora_target_modules``, ``lora_modules_to_save``,
  ``use_rslora``, ``use_dora``, ``load_in_4bit``, ``load_in_8bit``, ``bnb_4bit_quant_type``,
  ``use_bnb_nested_quant``); :func:`check_model_options` and :func:`check_options_given` refuse bad
  values and combinations, :func:`check_quantization` a quantised load that this machine cannot
  do (no bitsandbytes, no CUDA device).
* Loading: :func:`quantization_kwargs` (TRL's ``get_quantization_config`` and
  ``get_kbit_device_map``) go to ``from_pretrained``; :func:`wrap_model` puts the adapters on the
  loaded policy (``peft.get_peft_model``; ``prepare_model_for_kbit_training`` first for a
  quantised one).
* The fused loss reads the lm_head inside the forward (:mod:`simpo.modeling`);
  :func:`head_weight` gives it the weight that peft's own forward would apply: the base weight
  (frozen head), the active trainable copy (``lora_modules_to_save`` includes the head), or the
  merged ``W + scaling * B @ A`` of every active adapter (a LoRA on the head; differentiable, so
  the gradient reaches ``lora_A`` / ``lora_B``). What that weight cannot express exactly (dropout
  on the head's LoRA while training, DoRA and other LoRA variants, LoRA biases) is refused.
* Saving: :func:`save_final_model` writes the adapter as the Trainer does (``adapter_config.json``,
  ``adapter_model.safetensors``) plus the tokenizer in ``output_dir``, and the merged model
  (``merge_and_unload``, loaded back from those files) in ``output_dir/merged/``. The embedded tiny
  model has no base on disk: it is saved in ``output_dir/base/`` and the adapter's
  ``base_model_name_or_path`` names that directory (absolute path).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator, Optional

import torch

from .config import ConfigError
from .release import restore_use_cache

logger = logging.getLogger(__name__)

# ModelArguments fields that only mean something with use_peft, with their defaults (TRL's)
LORA_DEFAULTS = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_target_modules": None,
                 "lora_modules_to_save": None, "use_rslora": False, "use_dora": False}
QUANT_DEFAULTS = {"load_in_4bit": False, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
                  "use_bnb_nested_quant": False}
MERGED_DIR = "merged"
BASE_DIR = "base"


# ----------------------------------------------------------------------------- options

def check_model_options(args: Any) -> None:
    """Value and combination checks of the LoRA / quantisation fields of ``args``
    (:class:`~simpo.config.ModelArguments`), one :class:`ConfigError` line each."""
    if not args.use_peft:
        changed = [k for k, v in {**LORA_DEFAULTS, **QUANT_DEFAULTS}.items()
                   if getattr(args, k) != v]
        if changed:
            _without_peft(changed[0])
    if args.lora_r is None or args.lora_r <= 0:
        raise ConfigError(f"lora_r: must be a positive integer, got {args.lora_r!r}")
    if args.lora_alpha is None or not args.lora_alpha > 0:
        raise ConfigError(f"lora_alpha: must be > 0, got {args.lora_alpha!r}")
    if args.lora_dropout is None or not 0.0 <= args.lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout: must be in [0, 1), got {args.lora_dropout!r}")
    for key in ("lora_target_modules", "lora_modules_to_save"):
        value = getattr(args, key)
        if value is not None and (not value or any(not isinstance(m, str) or not m.strip()
                                                   for m in value)):
            raise ConfigError(f"{key}: must be one or more module names, got {value!r}")
    if args.load_in_4bit and args.load_in_8bit:
        raise ConfigError("load_in_4bit and load_in_8bit: choose one")
    if args.bnb_4bit_quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"bnb_4bit_quant_type: must be nf4 or fp4, got {args.bnb_4bit_quant_type!r}")
    if not args.load_in_4bit:
        for key in ("bnb_4bit_quant_type", "use_bnb_nested_quant"):
            if getattr(args, key) != QUANT_DEFAULTS[key]:
                raise ConfigError(f"{key} applies to 4-bit loading only: add --load_in_4bit true "
                                  f"or drop {key}")
    quantised = args.load_in_4bit or args.load_in_8bit
    if quantised and args.model_name_or_path in (None, "tiny"):
        raise ConfigError("load_in_4bit / load_in_8bit: the embedded tiny model is built in code "
                          "and cannot be loaded quantised; name a model_name_or_path")


def _without_peft(key: str) -> None:
    what = ("a quantised model without adapters cannot train"
            if key in QUANT_DEFAULTS else "it configures the LoRA adapters")
    raise ConfigError(f"{key} has no effect without use_peft ({what}): add --use_peft true or "
                      f"drop {key}")


def check_options_given(keys, model_args: Any) -> None:
    """``keys``: the options the recipe and the command line set. A LoRA / quantisation option
    set (even to its default value) without ``use_peft`` is refused."""
    if model_args.use_peft:
        return
    given = [k for k in {**LORA_DEFAULTS, **QUANT_DEFAULTS} if k in keys]
    if given:
        _without_peft(given[0])


def check_peft_run(keys, model_args: Any, training_args: Any) -> None:
    """The checks of :func:`simpo.config.parse_args` that need the options given (``keys``) or
    the training arguments: the LoRA options without ``use_peft``, FSDP (refused), a LoRA on the
    head with dropout kept in training, a quantised load this machine cannot do."""
    from .config import fsdp_requested

    check_options_given(keys, model_args)
    if not model_args.use_peft:
        return
    if fsdp_requested(training_args):
        # tried on 2 CPU ranks (FSDP2, accelerate 1.15, peft 0.21): the adapters train, but the
        # final save writes an empty adapter file, and a LoRA on a tied lm_head fails in
        # accelerate's tie_weights; refused until both are handled
        raise ConfigError("use_peft with FSDP is not supported: use DeepSpeed ZeRO-3 "
                          "(--deepspeed) or DDP for LoRA runs")
    targets = model_args.lora_target_modules or []
    if any(t.split(".")[-1] == "lm_head" for t in targets) and model_args.lora_dropout > 0 \
            and not training_args.disable_dropout:
        raise ConfigError(f"a LoRA on lm_head with lora_dropout {model_args.lora_dropout:g} and "
                          f"disable_dropout false: the fused loss applies the head as one merged "
                          f"weight, which cannot drop the adapter's inputs; set lora_dropout 0 "
                          f"or keep disable_dropout true")
    check_quantization(model_args, training_args)


def check_quantization(model_args: Any, training_args: Any) -> None:
    """Refuse, before anything is loaded, a 4-bit / 8-bit load this machine cannot do:
    bitsandbytes must be installed and the run must be on a CUDA device."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return
    import importlib.util

    flag = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{flag}: quantised loading needs bitsandbytes, which is not installed "
                          f"here (pip install bitsandbytes); or train LoRA unquantised (drop {flag})")
    if training_args.use_cpu or not torch.cuda.is_available():
        where = "use_cpu is set" if training_args.use_cpu else "this machine has no CUDA device"
        raise ConfigError(f"{flag}: bitsandbytes quantisation runs on CUDA devices only and "
                          f"{where}; drop {flag} to train LoRA unquantised")


def quantization_kwargs(model_args: Any) -> dict:
    """What ``from_pretrained`` gets for a quantised load: ``quantization_config`` (a
    ``BitsAndBytesConfig`` as TRL's ``get_quantization_config`` builds it: compute and storage
    dtype = ``torch_dtype``) and ``device_map`` (TRL's ``get_kbit_device_map``: the whole model on
    this process's device); ``{}`` without quantisation."""
    from transformers import BitsAndBytesConfig

    if model_args.load_in_4bit:
        dtype = model_args.torch_dtype
        dtype = getattr(torch, dtype) if dtype not in (None, "auto") else None
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
            bnb_4bit_quant_storage=dtype)
    elif model_args.load_in_8bit:
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        return {}
    from accelerate import PartialState

    return {"quantization_config": config, "device_map": {"": PartialState().local_process_index}}


def lora_config(model_args: Any):
    """The ``peft.LoraConfig`` of the run (TRL's ``get_peft_config``: causal LM, no bias)."""
    from peft import LoraConfig

    targets = model_args.lora_target_modules
    if isinstance(targets, (list, tuple)) and len(targets) == 1:
        targets = targets[0]  # "all-linear" is a string to peft; one name works either way
    return LoraConfig(task_type="CAUSAL_LM", r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                      lora_dropout=model_args.lora_dropout, target_modules=targets, bias="none",
                      use_rslora=model_args.use_rslora, use_dora=model_args.use_dora,
                      modules_to_save=model_args.lora_modules_to_save)


# ----------------------------------------------------------------------------- the model

def wrap_model(model: torch.nn.Module, model_args: Any, training_args: Any) -> torch.nn.Module:
    """``model`` with LoRA adapters (``peft.get_peft_model``); a quantised model goes through
    ``prepare_model_for_kbit_training`` first. Logs the trainable parameter count."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    checkpointing = bool(training_args.trainer_checkpointing)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs)
    elif checkpointing:
        # frozen embeddings: activations recomputed by a reentrant checkpoint need an input
        # that requires grad, or the adapters inside get no gradient (what TRL does too)
        model.enable_input_require_grads()
    try:
        peft_model = get_peft_model(model, lora_config(model_args))
    except ValueError as exc:  # e.g. a target module name the model does not have
        raise ConfigError(f"lora_target_modules / lora_modules_to_save: {' '.join(str(exc).split())}"
                          ) from exc
    check_head(peft_model, training_args)
    trainable, total = peft_model.get_nb_trainable_parameters()
    targets = peft_model.peft_config["default"].target_modules
    logger.info("LoRA r=%d alpha=%g on %s%s: %d trainable parameters of %d (%.3f%%)",
                model_args.lora_r, model_args.lora_alpha,
                targets if isinstance(targets, str) else sorted(targets),
                f", training {model_args.lora_modules_to_save} whole"
                if model_args.lora_modules_to_save else "", trainable, total,
                100.0 * trainable / max(total, 1))
    return peft_model


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (peft is not imported to find out)."""
    import sys

    if "peft" not in sys.modules:  # then nothing can be a PeftModel yet
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside ``model`` (a ``PeftModel``'s base model, else ``model``):
    the module whose forward the loss is attached to."""
    return model.get_base_model() if is_peft_model(model) else model


def check_head(model: torch.nn.Module, training_args: Any) -> None:
    """Refuse an adapted lm_head whose effect the fused loss cannot reproduce exactly (see
    :func:`head_weight`): dropout on its LoRA in training (unless ``disable_dropout`` zeroes it),
    DoRA or another LoRA variant, a LoRA bias."""
    from peft.tuners.lora import LoraLayer

    head = causal_lm(model).get_output_embeddings()
    if not isinstance(head, LoraLayer):
        return
    for name in head.lora_A:
        dropout = head.lora_dropout[name]
        if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 \
                and not training_args.disable_dropout:
            raise ConfigError(f"a LoRA on lm_head with lora_dropout {dropout.p:g}: the fused loss "
                              f"applies the head as one merged weight, which cannot drop the "
                              f"adapter's inputs; set lora_dropout 0, keep disable_dropout true, "
                              f"or leave lm_head out of lora_target_modules")
        _check_plain_lora(head, name)


def _check_plain_lora(head, name: str) -> None:
    variant = getattr(head, "lora_variant", {}).get(name)
    if head.use_dora.get(name, False) or variant is not None:
        kind = "DoRA" if head.use_dora.get(name, False) else type(variant).__name__
        raise ConfigError(f"a LoRA on lm_head with {kind}: the fused loss applies the head as "
                          f"W + scaling * B @ A, which {kind} is not; drop use_dora or leave "
                          f"lm_head out of lora_target_modules")
    if getattr(head, "lora_bias", {}).get(name, False):
        raise ConfigError("a LoRA on lm_head with a LoRA bias: not supported by the fused loss")
    if getattr(head, "fan_in_fan_out", False) or not isinstance(head.get_base_layer(),
                                                                torch.nn.Linear):
        raise ConfigError(f"a LoRA on lm_head of type {type(head.get_base_layer()).__name__}: "
                          f"the fused loss supports a LoRA on an nn.Linear head only")


def head_weight(head: torch.nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight ``[V, H]``, bias or None) that ``head`` applies in its forward, as tensors the fused
    loss can use: a plain head's parameters; peft's ``ModulesToSaveWrapper``: the active adapter's
    trainable copy (the original when adapters are disabled); a LoRA layer: the base weight plus
    ``scaling * B @ A`` of every active adapter (the base alone when disabled or already merged).
    Read inside the model's forward, so that ZeRO-3 gathers every parameter it touches."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(head, ModulesToSaveWrapper):
        active = [a for a in head.active_adapters if a in head.modules_to_save]
        if head.disable_adapters or not active:
            return head_weight(head.original_module)
        return head_weight(head.modules_to_save[active[0]])
    if isinstance(head, LoraLayer):
        base = head.get_base_layer()
        weight, bias = base.weight, getattr(base, "bias", None)
        if head.disable_adapters or head.merged:
            return weight, bias
        for name in head.active_adapters:
            if name not in head.lora_A:
                continue
            _check_plain_lora(head, name)
            dropout = head.lora_dropout[name]
            if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 and dropout.training:
                raise ValueError(f"lm_head's LoRA adapter {name!r} has dropout {dropout.p:g} in "
                                 f"training: the fused loss cannot apply it as a merged weight")
            a, b = head.lora_A[name].weight, head.lora_B[name].weight
            delta = (b @ a.to(b.dtype)) * head.scaling[name]
            weight = weight + delta.to(weight.dtype)
        return weight, bias
    return head.weight, getattr(head, "bias", None)


# ----------------------------------------------------------------------------- saving

def save_final_model(trainer, model_args: Any, training_args: Any, tokenizer,
                     load_base=None) -> None:
    """The final model in ``output_dir``: the model (an adapter run: the adapter, as the Trainer
    writes it) and the tokenizer; for an adapter run also the merged model in
    ``output_dir/merged/`` (with the tokenizer), and for the embedded tiny model its base in
    ``output_dir/base/``. ``load_base()``: loads the base model (the policy before the adapters)
    in the run's dtype. Collective (the Trainer's save gathers ZeRO-3 / FSDP shards); files are
    written on the main process."""
    output_dir = training_args.output_dir
    adapters = is_peft_model(trainer.accelerator.unwrap_model(trainer.model))
    base_dir = None
    if adapters and trainer.is_world_process_zero() and model_args.model_name_or_path in (None, "tiny"):
        # the tiny model has no base on disk: save it, and point the adapter at it
        base_dir = os.path.abspath(os.path.join(output_dir, BASE_DIR))
        with _whole_model_loading(training_args):
            base = load_base()
        restore_use_cache(base)
        base.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        del base
        trainer.accelerator.unwrap_model(trainer.model).peft_config["default"] \
            .base_model_name_or_path = base_dir
    trainer.save_model(output_dir)
    if not trainer.is_world_process_zero():
        return
    tokenizer.save_pretrained(output_dir)
    if adapters:
        _check_adapter_file(output_dir, trainer.accelerator.unwrap_model(trainer.model))
        with _whole_model_loading(training_args):
            merged_dir = save_merged_model(output_dir, load_base(), tokenizer)
        logger.info("saved the LoRA adapter (adapter_config.json, adapter_model.safetensors) in "
                    "%s%s and the merged model (merge_and_unload) in %s", output_dir,
                    f", its base model in {base_dir}" if base_dir else "", merged_dir)


def _check_adapter_file(output_dir: str, model: torch.nn.Module) -> None:
    """The saved adapter holds a tensor for each trainable one (a save from gathered shards that
    matched no adapter key would write an empty file, and the merged model would be the base)."""
    from safetensors import safe_open

    path = os.path.join(output_dir, "adapter_model.safetensors")
    expected = sum(1 for p in model.parameters() if p.requires_grad)
    with safe_open(path, framework="pt") as f:
        saved = len(list(f.keys()))
    if saved < expected:
        raise RuntimeError(f"{path} holds {saved} tensors, fewer than the {expected} trainable "
                           f"ones: the adapter was not saved whole")


@contextlib.contextmanager
def _whole_model_loading(training_args: Any) -> Iterator[None]:
    """Models loaded in this block (on the main process only) are whole, ordinary models: under
    ZeRO-3, transformers would otherwise partition them at load time (``zero.Init``), a
    collective that the other processes do not join."""
    from transformers.integrations.deepspeed import (is_deepspeed_zero3_enabled,
                                                     set_hf_deepspeed_config,
                                                     unset_hf_deepspeed_config)

    config = getattr(training_args, "hf_deepspeed_config", None)
    if config is None or not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(config)


def save_merged_model(adapter_dir: str, base: torch.nn.Module, tokenizer) -> str:
    """Load the adapter saved in ``adapter_dir`` onto ``base``, merge it (``merge_and_unload``)
    and save the result, with ``tokenizer``, in ``adapter_dir/merged/``; returns that path.

    A LoRA on an lm_head tied to the input embedding (Gemma-2) would, merged in place, change the
    embedding as well: the head is untied first (and the saved config says so). A trained copy
    of a tied head (``lora_modules_to_save``) is untied by peft already."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(base, adapter_dir)
    inner = model.get_base_model()
    head, embed = inner.get_output_embeddings(), inner.get_input_embeddings()
    if isinstance(head, LoraLayer) and head.get_base_layer().weight is embed.weight:
        layer = head.get_base_layer()
        layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    merged = model.merge_and_unload()
    if merged.get_output_embeddings().weight is not merged.get_input_embeddings().weight:
        _untie(merged)
    path = os.path.join(adapter_dir, MERGED_DIR)
    restore_use_cache(merged)  # a release: generation with its KV cache (simpo.release)
    merged.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _untie(model: torch.nn.Module) -> None:
    """Record in ``model``'s config that its head and input embedding are separate weights, so
    that the saved model loads back with both (and does not tie them again)."""
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
