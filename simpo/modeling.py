"""Model side of the training system.

* :func:`attach_simpo_head` patches a causal LM *instance* so that its own ``forward`` computes the
  preference loss (:func:`simpo_kernels.simpo_loss` for SimPO, :func:`simpo_kernels.preference_loss`
  for the others) when called with ``simpo=True``, and a reference model's per-row log-probability
  sums (:func:`simpo_kernels.sequence_logps`) when called with ``simpo_reference=True``: the decoder
  runs, then the lm_head weight is read *inside that forward* and handed to the fused loss with the
  final hidden states. Because the read happens inside the forward that DeepSpeed / FSDP run
  through their engine, ZeRO-3 gathers the (otherwise ``[0]``-shaped) lm_head shard for forward and
  backward exactly as it would for ``lm_head(hidden)`` (DESIGN section 4), and under FSDP2 the
  head's group (the root, or accelerate's [final norm, lm_head] group, whose forward has run by
  then) is unsharded; a head still sharded there reaches ``simpo_loss`` as a DTensor, which it
  refuses. The forward returns a
  :class:`SimPOModelOutput` (a ``ModelOutput``) so engines can see the tensors in it. Without
  either keyword the model behaves as before (logits, generation, ...).
* :func:`build_tiny_tokenizer` / :func:`build_tiny_model`: the offline, in-code Gemma-2-architecture
  model and word-level tokenizer of the embedded default.
"""

from __future__ import annotations

import re
import types
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from transformers.utils import ModelOutput

from simpo_kernels import LOSSES, preference_loss, sequence_logps, simpo_loss

# Gemma-2 chat format as the official SimPO recipe sets it: a leading BOS, no system role (a system
# message is folded into the first turn), the assistant role called "model".
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] | trim + '\n\n' %}{% set messages = messages[1:] %}"
    "{% else %}{% set system_message = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if loop.index0 == 0 %}{% set content = system_message + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + content | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
CHAT_TEMPLATES = {"gemma": GEMMA_CHAT_TEMPLATE}

TINY_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
_WORD_RE = re.compile(r"\n|[A-Za-z]+|\d+|[^\sA-Za-z\d]")


@dataclass
class SimPOModelOutput(ModelOutput):
    """What a loss-patched forward returns: the differentiable loss and detached statistics.
    ``metrics``: the loss's official logged metrics (name -> float, no prefix)."""

    loss: Optional[torch.Tensor] = None
    chosen_logps: Optional[torch.Tensor] = None
    rejected_logps: Optional[torch.Tensor] = None
    chosen_rewards: Optional[torch.Tensor] = None
    rejected_rewards: Optional[torch.Tensor] = None
    chosen_logits_mean: Optional[torch.Tensor] = None
    rejected_logits_mean: Optional[torch.Tensor] = None
    sft_loss: Optional[torch.Tensor] = None
    metrics: Optional[dict] = None


@dataclass
class ReferenceModelOutput(ModelOutput):
    """What a reference forward (``simpo_reference=True``) returns: per-row sums of the target
    log-probabilities ``[R]`` (float32; float64 for a float64 model) and their token counts."""

    logps: Optional[torch.Tensor] = None
    counts: Optional[torch.Tensor] = None


class ReferenceLogps:
    """The reference model's per-sequence log-probability sums of a batch, ``chosen [B]`` and
    ``rejected [B]``, as the loss forward takes them (``reference=``).

    A plain object on purpose (not a tensor, tuple, dict or dataclass): the engines walk those
    among a forward's arguments and cast their floating-point tensors to the compute dtype (FSDP2
    mixed precision's ``cast_forward_inputs``, DeepSpeed's fp16 auto-cast), which in bf16 would
    round sums of hundreds of nats to whole nats. Whatever travels in here arrives as it was sent.
    """

    __slots__ = ("chosen", "rejected")

    def __init__(self, chosen: torch.Tensor, rejected: torch.Tensor):
        self.chosen, self.rejected = chosen, rejected


def _head_inputs(self, input_ids, attention_mask, kwargs):
    """The decoder's final hidden states and the lm_head weight and bias, read inside this
    forward: under ZeRO-3 DeepSpeed gathers the head as an external parameter. A head adapted by
    peft gives the weight its own forward would apply (:func:`simpo.lora.head_weight`: the
    trainable copy, or the base weight plus the LoRA update, differentiable)."""
    kwargs.pop("use_cache", None)
    # a PeftModel's forward passes its unused arguments on as None (inputs_embeds, return_dict...)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    decoder_out = self.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                     use_cache=False, **kwargs)
    hidden = decoder_out[0]
    head = self.get_output_embeddings()
    if getattr(self, "_simpo_peft", False):
        from .lora import head_weight

        weight, bias = head_weight(head)
    else:
        weight, bias = head.weight, getattr(head, "bias", None)
    if weight.dtype != hidden.dtype:  # e.g. autocast: match the matmul dtype autocast would use
        weight = weight.to(hidden.dtype)
        bias = None if bias is None else bias.to(hidden.dtype)
    return hidden, weight, bias


def _simpo_forward(self, input_ids=None, attention_mask=None, labels=None, *, simpo: bool = False,
                   simpo_reference: bool = False, reference: Optional[ReferenceLogps] = None,
                   sequence_ids: Optional[torch.Tensor] = None, **kwargs):
    if not (simpo or simpo_reference):
        return self._simpo_original_forward(input_ids=input_ids, attention_mask=attention_mask,
                                            labels=labels, **kwargs)
    if labels is None:
        raise ValueError("a preference-loss forward needs labels (chosen rows first, then "
                         "rejected rows)")
    if sequence_ids is not None and (attention_mask is not None or kwargs.get("position_ids") is None):
        # an attention_mask would stop transformers building the block-diagonal masks from
        # position_ids: the packed sequences would attend to each other
        raise ValueError("a packed batch (sequence_ids) needs position_ids (restarting per "
                         "sequence) and no attention_mask")
    opts = self._simpo_options
    hidden, weight, bias = _head_inputs(self, input_ids, attention_mask, kwargs)
    softcap = getattr(self.config, "final_logit_softcapping", None)
    if simpo_reference:  # the reference model's per-sequence sums: no graph, no [N, V] logits
        logps, counts = sequence_logps(hidden, weight, labels, softcap=softcap, bias=bias,
                                       ignore_index=opts["ignore_index"], backend=opts["backend"],
                                       sequence_ids=sequence_ids)
        return ReferenceModelOutput(logps=logps, counts=counts)
    common = dict(softcap=softcap, bias=bias, ignore_index=opts["ignore_index"],
                  backend=opts["backend"], schedule=opts["schedule"],
                  memory_budget=opts["memory_budget"], logit_metrics=opts["logit_metrics"],
                  chunk_size=opts["chunk_size"], sequence_ids=sequence_ids)
    if opts["loss"] == "simpo":  # exactly the call of the SimPO-only trainer: same numbers
        out = simpo_loss(hidden, weight, labels, **opts["options"], **common)
    else:
        extra = {}
        if opts["loss"] == "orpo" and sequence_ids is not None:  # packed: the chosen sequences
            B = (int(sequence_ids.max()) + 1) // 2  # one host sync; sequence i < B: chosen of pair i
            chosen = (sequence_ids >= 0) & (sequence_ids < B)
            extra["nll_labels"] = input_ids.masked_fill(~chosen, opts["ignore_index"])
        elif opts["loss"] == "orpo":  # TRL's ORPO NLL: prompt and response (input ids under the mask)
            B = input_ids.shape[0] // 2
            ids = input_ids[:B]
            extra["nll_labels"] = ids if attention_mask is None else \
                ids.masked_fill(attention_mask[:B] == 0, opts["ignore_index"])
        out = preference_loss(hidden, weight, labels, loss=opts["loss"],
                              ref_chosen_logps=None if reference is None else reference.chosen,
                              ref_rejected_logps=None if reference is None else reference.rejected,
                              **extra, **opts["options"], **common)
    return SimPOModelOutput(
        loss=out.loss,
        chosen_logps=out.chosen_logps.detach(),
        rejected_logps=out.rejected_logps.detach(),
        chosen_rewards=out.chosen_rewards,
        rejected_rewards=out.rejected_rewards,
        chosen_logits_mean=out.chosen_logits_mean,
        rejected_logits_mean=out.rejected_logits_mean,
        sft_loss=None if out.sft_loss is None else out.sft_loss.detach(),
        metrics=out.metrics(),
    )


def attach_simpo_head(model: torch.nn.Module, *, loss: str = "simpo", ignore_index: int = -100,
                      backend: str = "auto", chunk_size: Optional[int] = None,
                      schedule: str = "auto", memory_budget: Optional[int] = None,
                      logit_metrics: Optional[str] = None, **options) -> torch.nn.Module:
    """Patch ``model.forward`` (this instance only): called with ``simpo=True`` it computes the
    preference loss ``loss`` (a name in ``simpo_kernels.LOSSES``) with ``options`` (that loss's
    options, e.g. ``beta``; unset ones take the loss's defaults), and with
    ``reference=ReferenceLogps(chosen [B], rejected [B])`` for a loss with a reference; called with
    ``simpo_reference=True`` it returns the per-row sums of target log-probabilities
    (:class:`ReferenceModelOutput`), what a reference model contributes. ``loss="simpo"`` calls
    ``simpo_kernels.simpo_loss``. An unknown option is a TypeError naming it.

    Idempotent: patching again only updates the options. A peft model (LoRA) is patched in its
    base causal LM, whose forward peft's own forward calls with these keywords.
    """
    from .lora import causal_lm, is_peft_model

    peft = is_peft_model(model)
    outer, model = model, causal_lm(model)
    model._simpo_peft = peft
    if model.get_output_embeddings() is None or not hasattr(model, "get_decoder"):
        raise TypeError(f"{type(model).__name__} is not a causal LM with an output embedding")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r} (known: {', '.join(LOSSES)})")
    LOSSES[loss](**options)  # its own checks: an unknown option or a bad value fails here
    model._simpo_options = dict(
        loss=loss, options={**LOSSES[loss].defaults, **options}, ignore_index=int(ignore_index),
        backend=backend, chunk_size=chunk_size, schedule=schedule, memory_budget=memory_budget,
        logit_metrics=logit_metrics if logit_metrics is not None or loss != "simpo" else "exact")
    if not getattr(model, "_simpo_patched", False):
        model._simpo_original_forward = model.forward
        model.forward = types.MethodType(_simpo_forward, model)
        model._simpo_patched = True
    return outer


# attention implementations that keep packed sequences apart (see packed_attention)
PACKED_ATTENTION = ("eager", "flex_attention", "flash_attention_2", "sdpa")


def check_packed_attention(impl: Optional[str]) -> str:
    """``impl`` (None: eager) if padding-free batches can run through it (:data:`PACKED_ATTENTION`),
    else a one-line :class:`~simpo.config.ConfigError`; the command line checks it before a model
    loads, :func:`packed_attention` the loaded model's."""
    from .config import ConfigError

    impl = impl or "eager"
    if impl not in PACKED_ATTENTION:
        raise ConfigError(f"padding_free: attn_implementation {impl!r} cannot keep packed sequences "
                          f"apart; use {', '.join(PACKED_ATTENTION[:3])} (or sdpa without "
                          f"attention softcapping)")
    return impl


def packed_attention(model: torch.nn.Module) -> str:
    """The attention implementation padding-free batches run through, or a one-line
    :class:`~simpo.config.ConfigError` when it cannot keep the packed sequences apart.

    eager, sdpa and flex_attention get the block-diagonal (and, on sliding-window layers,
    windowed) causal masks transformers builds from ``position_ids`` when there is no
    ``attention_mask``; flash_attention_2 runs its varlen path from ``position_ids`` (one row).
    sdpa is refused for a model with attention softcapping (Gemma-2): SDPA has no softcap."""
    from .config import ConfigError
    from .lora import causal_lm

    config = causal_lm(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    impl = check_packed_attention(getattr(config, "_attn_implementation", None))
    if impl == "sdpa" and getattr(config, "attn_logit_softcapping", None) is not None:
        raise ConfigError("padding_free: attn_implementation 'sdpa' drops this model's attention "
                          "softcapping (attn_logit_softcapping); use eager, flex_attention or "
                          "flash_attention_2")
    return impl


def packed_attention_line(model: torch.nn.Module) -> str:
    """One line saying how packed batches attend (for the log)."""
    impl = packed_attention(model)
    if impl == "flash_attention_2":
        return ("attn_implementation flash_attention_2, varlen from position_ids, every sequence "
                "of a micro-batch in one row")
    return (f"attn_implementation {impl}, block-diagonal causal masks built from position_ids "
            f"(rows of at most max_length tokens)")


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (as the official trainer's ``disable_dropout``)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "attention_dropout"):
        config.attention_dropout = 0.0
    for module in model.modules():  # attention modules copy the rate at construction
        if hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
            module.attention_dropout = 0.0


# ----------------------------------------------------------------------------- embedded default

def words(text: str) -> list[str]:
    """The tiny tokenizer's pre-tokenization: words, numbers, single punctuation marks, newlines."""
    return _WORD_RE.findall(text)


def build_tiny_tokenizer(texts: Iterable[str], chat_template: str = GEMMA_CHAT_TEMPLATE):
    """A word-level ``PreTrainedTokenizerFast`` over the words of ``texts``, built offline.

    Gemma's special-token layout (pad 0, eos 1, bos 2, unk 3) plus ``<start_of_turn>`` /
    ``<end_of_turn>``; unknown words map to ``<unk>``. The vocabulary is sorted, so the same
    texts always give the same ids.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # words of the chat format itself ("user", "model", newline) plus those of the texts
    template_words = {"\n", "user", "model", "system"}
    vocab_words = sorted(({w for t in texts for w in words(t)} | template_words)
                         - set(TINY_SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS + vocab_words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(_WORD_RE.pattern), behavior="isolated"),
    ])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        model_max_length=1024)
    fast.chat_template = chat_template
    return fast


def tiny_gemma2_config(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2,
                       num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 256,
                       max_position_embeddings: int = 512, pad_token_id: int = 0,
                       eos_token_id: int = 1, bos_token_id: int = 2):
    """A small ``Gemma2Config``: softcaps on (final 30, attention 50), tied embeddings, eager attention."""
    from transformers import Gemma2Config

    head_dim = hidden_size // num_heads
    config = Gemma2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=head_dim, query_pre_attn_scalar=head_dim,
        max_position_embeddings=max_position_embeddings, sliding_window=128,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, tie_word_embeddings=True,
        pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=bos_token_id,
        attention_dropout=0.0, use_cache=False,
    )
    config._attn_implementation = "eager"
    return config


def build_tiny_model(tokenizer, *, torch_dtype: Optional[torch.dtype] = None, **config_kwargs):
    """A freshly initialised tiny ``Gemma2ForCausalLM`` for ``tokenizer``.

    Built whole in this process from the current torch RNG state, never under DeepSpeed's
    ``zero.Init``: ZeRO-3's partitioned init draws the weights in another order (rank 0 fills each
    gathered module), so the same seed would give a 2-process run other weights than a 1-process
    run. The model is tiny; DeepSpeed partitions it when its engine is built.
    """
    from transformers import Gemma2ForCausalLM

    config = tiny_gemma2_config(
        len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, **config_kwargs)
    model = Gemma2ForCausalLM(config)  # the class itself: from_config would enter zero.Init
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight, "untied"
    return model
