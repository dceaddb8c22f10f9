"""The policy and the reward model of the pipeline: hub or local models through the ``Auto``
classes, or the embedded tiny ones built in code (the ``tiny`` of ``simpo-train``: a Gemma-2
architecture and a word-level tokenizer with Gemma-2's chat template, over the words of the
shipped data and of the prompts, so the same prompts always give the same models)."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from ..config import TOKENIZER_TEMPLATE, UserError, error_text
from ..modeling import CHAT_TEMPLATES, build_tiny_model, build_tiny_tokenizer, tiny_gemma2_config
from ..train import _dtype

logger = logging.getLogger("simpo.onpolicy")

TINY = "tiny"
TINY_POLICY_SEED = 1234
TINY_REWARD_SEED = 4321
TINY_SIZES = {"hidden_size": 64, "num_layers": 2}


def tiny_tokenizer(prompt_texts: list[str]):
    """The embedded tokenizer over the shipped data's words and those of ``prompt_texts``."""
    from ..data import data_texts, load_raw_datasets

    shipped = load_raw_datasets(None, ["train", "test"])
    return build_tiny_tokenizer(data_texts(shipped.values()) + list(prompt_texts))


def load_tokenizer(name: str, *, trust_remote_code: bool, chat_template: Optional[str],
                   prompt_texts: list[str], role: str):
    """``name``'s tokenizer with a pad token and the chat template the step uses."""
    from transformers import AutoTokenizer

    if name == TINY:
        tokenizer = tiny_tokenizer(prompt_texts)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise UserError(f"{role} tokenizer {name!r} cannot be loaded: {error_text(exc)}") from exc
    if chat_template not in (None, TOKENIZER_TEMPLATE):
        tokenizer.chat_template = CHAT_TEMPLATES.get(chat_template, chat_template)
    if tokenizer.chat_template is None:
        raise UserError(f"{role} {name!r} has no chat template: set chat_template (e.g. 'gemma')")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_pretrained(auto_class, name: str, role: str, *, dtype: str, trust_remote_code: bool):
    """``auto_class.from_pretrained`` that refuses what would silently compute something else: a
    model whose ``config.json`` maps ``auto_class`` to its own code while that code is not trusted
    (transformers would load the built-in architecture of its ``model_type`` instead, e.g. a plain
    LlamaForSequenceClassification for ArmoRM), and weights missing from the checkpoint (an
    untrained head gives random rewards)."""
    from transformers import AutoConfig

    option = "reward_trust_remote_code" if role == "reward model" else "trust_remote_code"
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        if not trust_remote_code and auto_class.__name__ in (getattr(config, "auto_map", None) or {}):
            raise UserError(f"{role} {name!r} comes with its own modelling code for "
                            f"{auto_class.__name__} ({config.auto_map[auto_class.__name__]}): set "
                            f"{option} true to use it (without it transformers would load a plain "
                            f"{config.model_type} model with other weights)")
        # Gemma-2's attention softcap is applied by the eager attention only (sdpa drops it), and
        # transformers' default for it differs between versions
        kwargs = ({"attn_implementation": "eager"}
                  if getattr(config, "attn_logit_softcapping", None) is not None else {})
        model, info = auto_class.from_pretrained(name, dtype=_dtype(dtype),
                                                 trust_remote_code=trust_remote_code,
                                                 output_loading_info=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"{role} {name!r} cannot be loaded: {error_text(exc)}") from exc
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise UserError(f"{role} {name!r} has no trained weights for {', '.join(missing[:4])}"
                        f"{' ...' if len(missing) > 4 else ''} (as {type(model).__name__}): it "
                        f"would run with freshly initialised ones")
    return model


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def load_policy(name: str, tokenizer, *, dtype: str, trust_remote_code: bool, device):
    """The policy as a causal LM in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    if name == TINY:
        model = _seeded(TINY_POLICY_SEED, lambda: build_tiny_model(tokenizer, **TINY_SIZES))
        if dtype != "auto":
            model = model.to(_dtype(dtype))
    else:
        model = _from_pretrained(AutoModelForCausalLM, name, "policy", dtype=dtype,
                                 trust_remote_code=trust_remote_code)
    return model.to(device).eval()


def build_tiny_reward_model(tokenizer):
    """A freshly initialised tiny ``Gemma2ForSequenceClassification`` with one label (a scalar
    reward), from a fixed seed."""
    from transformers import Gemma2ForSequenceClassification

    def build():
        config = tiny_gemma2_config(
            len(tokenizer), pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
            **TINY_SIZES)
        config.num_labels = 1
        return Gemma2ForSequenceClassification(config)

    return _seeded(TINY_REWARD_SEED, build)


def load_reward_model(name: str, tokenizer, *, dtype: str, trust_remote_code: bool, device):
    """The reward model as an ``AutoModelForSequenceClassification`` in eval mode on ``device``,
    checked to give one score per sequence."""
    from transformers import AutoModelForSequenceClassification

    if name == TINY:
        model = build_tiny_reward_model(tokenizer)
        if dtype != "auto":
            model = model.to(_dtype(dtype))
    else:
        model = _from_pretrained(AutoModelForSequenceClassification, name, "reward model",
                                 dtype=dtype, trust_remote_code=trust_remote_code)
    model.config.use_cache = False  # one forward per sequence: a KV cache would only take memory
    # batches are right-padded: the head reads the last token that is not padding
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval()


def reward_scores(output, rows: int, name: str) -> torch.Tensor:
    """One float32 score per row of a reward-model ``output``: its ``score`` field (ArmoRM's
    gated multi-objective reward) where it has one, else its logits with one label."""
    score = getattr(output, "score", None)
    source = "score"
    if score is None:
        score, source = output.logits, "logits"
    score = score.float().reshape(rows, -1)
    if score.shape[1] != 1:
        raise UserError(f"reward model {name!r} gives {score.shape[1]} {source} per sequence and no "
                        f"scalar `score` output: simpo-data needs one reward per response")
    return score[:, 0]
