"""What padding-free (packed) preference batches save: tokens per step, decoder FLOPs, CPU step time.

Three measurements, each labelled with what it is:

* **tokens per step** (counted): the official padded layout (``2B`` sequences, each padded to the
  step's longest: :func:`simpo.packing.padded_tokens`) against the packed one (the same sequences
  in rows of at most ``max_length``: :func:`simpo.packing.plan_rows`, ``rows x width``; also the
  naive first fit at ``max_length``, for comparison) and the
  one-row layout FlashAttention-2's varlen path takes (no padding at all), over every step of an
  epoch in the official order of batches (:func:`official_batches`), on

  (a) the data shipped with the package, tokenised as the embedded default (``recipes/tiny.yaml``)
      does: the embedded tiny tokenizer, the recipe's ``max_length`` 128 / ``max_prompt_length`` 64;
  (b) a **model** of UltraFeedback's length distribution at the official recipe's ``max_length``
      2048 / ``max_prompt_length`` 1800 (:data:`UF_SOURCE`: the published means, a log-normal
      shape of stated spread, the official truncation rule).

* **decoder FLOPs at the Gemma-2-9B shape** (computed, never measured): :func:`decoder_flops`.
* **CPU step time of the tiny model** (measured on this CPU): :func:`time_cpu_steps`.

    python -m benchmarks.packing [--out DIR] [--cpu-steps N] [--repeats K]

writes ``packing.json`` and ``packing.md`` (default ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from simpo.packing import first_fit, pack_sequences, padded_tokens, plan_rows

RESULTS = Path(__file__).resolve().parent / "results"
IGNORE_INDEX = -100

# ------------------------------------------------------------------------------------ the sources

#: The published statistics the synthetic distribution is fitted to. Only means are published
#: (tokens; the paper does not name the tokenizer), so the shape is chosen here: log-normal with
#: that mean and the stated spread (sigma of the log), a model of the distribution, not the data.
UF_SOURCE = {
    "title": "UltraFeedback: Boosting Language Models with Scaled AI Feedback (Cui et al., 2023; "
             "ICML 2024), Table 1: Statistics of existing preference and critique datasets",
    "url": "https://arxiv.org/abs/2310.01377",
    "also": "the same table as figures/dataset.png of https://github.com/OpenBMB/UltraFeedback "
            "(commit cd5cb080cf8b1abffd369cde3de4b90c93bc3cca), README 'Comparison with Previous "
            "Preference Datasets'",
    "conversations": 255864,
    "comparisons": 340025,
    "instruction_mean_tokens": 185.1,
    "completion_mean_tokens": 305.3,
}

#: The shape chosen for the model (not published): log-normal, sigma of the natural log. The
#: prompts mix one-line questions (TruthfulQA, FLAN) with long ShareGPT/UltraChat turns, hence the
#: wider spread; completions of the same prompt differ in length (chosen and rejected are drawn
#: independently), which is what makes a pair's padding.
UF_SIGMA = {"instruction": 1.0, "completion": 0.8}

#: Tokens the Gemma chat template adds around them (``<bos><start_of_turn>user\\n`` ...
#: ``<end_of_turn>\\n<start_of_turn>model\\n`` before the response; ``<end_of_turn>\\n`` + EOS
#: after it): a count of the template's pieces, each one token in Gemma's tokenizer.
GEMMA_TEMPLATE_TOKENS = {"prompt": 9, "response": 3}

#: The official recipe (DESIGN section 2): per-device batch 2 pairs, max_length 2048,
#: max_prompt_length 1800, seed 42.
OFFICIAL = {"per_device_batch": 2, "max_length": 2048, "max_prompt_length": 1800, "seed": 42}

#: The size of the synthetic epoch (the recipe's train split, princeton-nlp/gemma2-ultrafeedback-
#: armorm, has about 59.6k rows; the exact count does not matter for per-step means).
UF_PAIRS = 60000

#: The CPU timing's synthetic rows: UltraFeedback-like lengths scaled to this max_length (the
#: tiny model's cost is dominated by fixed overheads at the shipped data's 25-token sequences).
SYNTHETIC_CPU_MAX_LENGTH = 512

#: Gemma-2-9B (the public config, google/gemma-2-9b config.json; DESIGN section 2).
GEMMA2_9B = {"hidden_size": 3584, "num_hidden_layers": 42, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 256, "intermediate_size": 14336,
             "vocab_size": 256000, "sliding_window": 4096}


# ------------------------------------------------------------------------------ order of batches

def official_batches(n_rows: int, batch: int, seed: int = 42) -> list[list[int]]:
    """Per-device batches of one epoch, in the order the official run sees them (one process).

    The rows are those of the already seed-42-shuffled split (:func:`simpo.data.load_splits`); the
    Trainer then draws them through accelerate's ``SeedableRandomSampler``, seeded with the run's
    seed: ``torch.randperm(n, generator=Generator().manual_seed(seed))``, cut into batches of
    ``batch`` (the last one shorter: ``dataloader_drop_last`` is off). With several processes,
    accelerate deals these same batches out in turn, so the set of per-device batches is the same.
    """
    if n_rows < 1 or batch < 1:
        raise ValueError(f"need at least one row and a batch of at least 1, got {n_rows} rows, batch {batch}")
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i:i + batch] for i in range(0, n_rows, batch)]


def step_sequence_lengths(pairs: Sequence[tuple[int, int]], rows: Sequence[int]) -> list[int]:
    """The step's sequence lengths in the pair layout: chosen of each pair, then rejected."""
    return [pairs[i][0] for i in rows] + [pairs[i][1] for i in rows]


# ---------------------------------------------------------------------------------- token counts

def min_token_plan(lengths: Sequence[int], max_length: int):
    """The collator's plan (:func:`simpo.packing.plan_rows`: first fit at the row capacity that
    gives the fewest tokens), kept under this name for the ``packed_min`` columns."""
    return plan_rows(lengths, max_length)


def step_tokens(lengths: Sequence[int], max_length: int) -> dict:
    """One step's tokens: ``real`` (sequence tokens), ``padded`` (official layout), ``packed``
    (:func:`plan_rows` rows x width, with its ``rows`` and ``width``), ``packed_min``
    (:func:`min_token_plan`), ``one_row`` (every sequence in one row: FlashAttention-2 varlen,
    equal to ``real``)."""
    plan = first_fit(lengths, max_length)
    one = plan_rows(lengths, max_length, one_row=True)
    best = min_token_plan(lengths, max_length)
    return {"real": int(sum(lengths)), "padded": padded_tokens(lengths), "packed": plan.tokens,
            "rows": len(plan.rows), "width": plan.width, "packed_min": best.tokens,
            "rows_min": len(best.rows), "one_row": one.tokens,
            "row_lengths": [sum(int(lengths[i]) for i in row) for row in plan.rows]}


def attention_blocks(lengths: Sequence[int], max_length: int) -> dict:
    """Query-key pairs each attention layout computes (per head, per layer), for one step:

    * ``padded_eager``: eager attention on the padded batch computes every row's full ``T x T``
      scores (the mask only zeroes them): ``2B * T^2``;
    * ``padded_causal``: a causal kernel (FlashAttention/SDPA) on padded rows: ``T(T+1)/2`` per row;
    * ``packed_eager``: eager attention on the packed rows: each row's full ``W x W`` (the
      block-diagonal mask, too, only zeroes scores); ``packed_min_eager`` the same for
      :func:`min_token_plan`'s rows;
    * ``varlen``: FlashAttention-2's varlen path: only each sequence's causal triangle,
      ``n(n+1)/2``.
    """
    T = max(int(n) for n in lengths)
    plan = first_fit(lengths, max_length)
    return {"padded_eager": len(lengths) * T * T, "padded_causal": len(lengths) * T * (T + 1) // 2,
            "packed_eager": len(plan.rows) * plan.width ** 2,
            "packed_min_eager": (lambda p: len(p.rows) * p.width ** 2)(min_token_plan(lengths, max_length)),
            "varlen": sum(int(n) * (int(n) + 1) // 2 for n in lengths)}


# ------------------------------------------------------------------------------------------ FLOPs

def non_embedding_params(cfg: dict) -> int:
    """Decoder matmul parameters (attention q/k/v/o and the gated MLP; norms are negligible)."""
    H, I, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    return L * (H * (q + 2 * kv) + q * H + 3 * H * I)


def decoder_flops(tokens: int, qk_pairs: int, cfg: dict) -> dict:
    """Decoder FLOPs of one forward + backward (computed, not measured; no recomputation:
    gradient checkpointing adds one more forward, 4/3 of these). ``linear``: ``6 x params`` per
    token (forward 2, backward 4); ``attention``: ``QK^T`` and ``PV`` forward (``4 d`` per
    query-key pair and head) and their four backward matmuls (``8 d``): ``12 d heads layers`` per
    query-key pair. The lm_head is left out: the fused loss computes it on target positions
    only, in both layouts alike."""
    linear = 6 * non_embedding_params(cfg) * int(tokens)
    attention = 12 * cfg["head_dim"] * cfg["num_attention_heads"] * cfg["num_hidden_layers"] * int(qk_pairs)
    return {"linear": linear, "attention": attention, "total": linear + attention}


# ---------------------------------------------------------------------------------- the two data

def truncated_parts(prompt: int, chosen: int, rejected: int, max_length: int,
                    max_prompt_length: int) -> tuple[int, int, int]:
    """The official truncation rule (DESIGN section 3, :func:`simpo.data.tokenize_row`) on token
    counts: if prompt + the longer response exceeds ``max_length``, the prompt is cut to
    ``max_prompt_length``; if still too long, both responses to ``max_length - max_prompt_length``.
    Returns the prompt, chosen and rejected token counts after it."""
    longer = max(chosen, rejected)
    if prompt + longer > max_length:
        prompt = min(prompt, max_prompt_length)
        if prompt + longer > max_length:
            cap = max_length - max_prompt_length
            chosen, rejected = min(chosen, cap), min(rejected, cap)
    return prompt, chosen, rejected


def truncated_lengths(prompt: int, chosen: int, rejected: int, max_length: int,
                      max_prompt_length: int) -> tuple[int, int]:
    """The chosen and rejected sequence lengths (prompt + response) after :func:`truncated_parts`."""
    p, c, r = truncated_parts(prompt, chosen, rejected, max_length, max_prompt_length)
    return p + c, p + r


def lognormal_draws(n: int, mean: float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` float64 draws of a log-normal with this mean and log-space ``sigma``."""
    mu = math.log(mean) - sigma * sigma / 2
    return torch.exp(mu + sigma * torch.randn(n, generator=generator, dtype=torch.float64))


def ultrafeedback_like(n_pairs: int = UF_PAIRS, *, seed: int = 42, max_length: int = 2048,
                       max_prompt_length: int = 1800, scale: float = 1.0,
                       sigma: Optional[dict] = None) -> dict:
    """Synthetic pairs whose prompt and response lengths model UltraFeedback (:data:`UF_SOURCE`).

    Instruction (prompt) and completion (response) content lengths are log-normal with the
    published means (times ``scale``) and :data:`UF_SIGMA` spreads; chosen and rejected responses
    are drawn independently; the Gemma template's tokens are added (:data:`GEMMA_TEMPLATE_TOKENS`,
    times ``scale``) and the official truncation rule applied. Seeded, deterministic.

    Returns ``pairs`` (``[(chosen_len, rejected_len)]``), ``parts`` (``[(prompt, chosen,
    rejected)]`` token counts after truncation, template tokens included) and the untruncated content draws
    (``prompt``, ``chosen``, ``rejected``: float64 tensors), whose means the tests hold to the
    source.
    """
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length, got {max_prompt_length}, {max_length}")
    sig = {**UF_SIGMA, **(sigma or {})}
    g = torch.Generator().manual_seed(seed)
    prompt = lognormal_draws(n_pairs, UF_SOURCE["instruction_mean_tokens"] * scale, sig["instruction"], g)
    chosen = lognormal_draws(n_pairs, UF_SOURCE["completion_mean_tokens"] * scale, sig["completion"], g)
    rejected = lognormal_draws(n_pairs, UF_SOURCE["completion_mean_tokens"] * scale, sig["completion"], g)
    tp = max(1, round(GEMMA_TEMPLATE_TOKENS["prompt"] * scale))
    tr = max(1, round(GEMMA_TEMPLATE_TOKENS["response"] * scale))

    def tokens(x):
        return (x.round().clamp(min=1).long()).tolist()

    parts = [truncated_parts(p + tp, c + tr, r + tr, max_length, max_prompt_length)
             for p, c, r in zip(tokens(prompt), tokens(chosen), tokens(rejected))]
    pairs = [(p + c, p + r) for p, c, r in parts]
    return {"pairs": pairs, "parts": parts, "prompt": prompt, "chosen": chosen, "rejected": rejected}


def shipped_data(batch: Optional[int] = None):
    """The shipped data (``simpo/data/*.jsonl``) as the embedded default loads and tokenises it.

    Returns ``(train, tokenizer, args)``: the tokenised train split in its official (seed-42
    shuffled) order, the embedded tiny tokenizer (built, as ``simpo-train`` does, from every
    loaded split) and the recipe's arguments."""
    from simpo.config import parse_args
    from simpo.data import load_splits, prepare_dataset
    from simpo.train import load_tokenizer

    argv = ["--output_dir", "/nonexistent-simpo-packing-measure"]  # parsed, never created
    if batch is not None:
        argv += ["--per_device_train_batch_size", str(batch)]
    model_args, data_args, args, _ = parse_args(argv)
    loaded = load_splits(data_args)
    raw = {loaded.train_name: loaded.train}
    if loaded.eval is not None:
        raw[loaded.eval_name] = loaded.eval
    tokenizer = load_tokenizer(model_args, data_args, raw)
    train = prepare_dataset(loaded.train, tokenizer, args, split_name=loaded.train_name)
    return train, tokenizer, (model_args, data_args, args)


def pair_lengths(dataset) -> list[tuple[int, int]]:
    return [(len(c), len(r)) for c, r in zip(dataset["chosen_input_ids"], dataset["rejected_input_ids"])]


# ------------------------------------------------------------------------------ an epoch, summed

def epoch_summary(pairs: Sequence[tuple[int, int]], batch: int, max_length: int, seed: int = 42,
                  cfg: Optional[dict] = None) -> dict:
    """Every step of one epoch (:func:`official_batches`): tokens per step in each layout (means
    and totals) and, with ``cfg``, the decoder FLOPs of each layout (computed)."""
    steps = official_batches(len(pairs), batch, seed)
    tot = {k: 0 for k in ("real", "padded", "packed", "packed_min", "one_row", "rows")}
    attn = {k: 0 for k in ("padded_eager", "padded_causal", "packed_eager", "packed_min_eager", "varlen")}
    one_row_steps = 0
    for rows in steps:
        lengths = step_sequence_lengths(pairs, rows)
        t = step_tokens(lengths, max_length)
        for k in tot:
            tot[k] += t[k]
        one_row_steps += t["rows"] == 1
        for k, v in attention_blocks(lengths, max_length).items():
            attn[k] += v
    n = len(steps)
    out = {"pairs": len(pairs), "per_device_batch": batch, "max_length": max_length, "steps": n,
           "tokens_total": tot, "tokens_per_step": {k: tot[k] / n for k in ("real", "padded", "packed", "packed_min", "one_row")},
           "rows_per_step": tot["rows"] / n, "steps_packed_in_one_row": one_row_steps,
           "padding_share_padded": 1 - tot["real"] / tot["padded"],
           "padding_share_packed": 1 - tot["real"] / tot["packed"],
           "tokens_saved_packed": 1 - tot["packed"] / tot["padded"],
           "tokens_saved_packed_min": 1 - tot["packed_min"] / tot["padded"],
           "tokens_saved_one_row": 1 - tot["one_row"] / tot["padded"],
           "attention_qk_pairs_total": attn}
    if cfg is not None:
        layouts = {"padded, eager attention": (tot["padded"], attn["padded_eager"]),
                   "first fit at max_length, eager attention": (tot["packed"], attn["packed_eager"]),
                   "packed (plan_rows), eager attention": (tot["packed_min"], attn["packed_min_eager"]),
                   "padded, causal kernel (FlashAttention/SDPA)": (tot["padded"], attn["padded_causal"]),
                   "one row, FlashAttention-2 varlen": (tot["one_row"], attn["varlen"])}
        flops = {name: decoder_flops(tk, qk, cfg) for name, (tk, qk) in layouts.items()}
        out["flops_per_step_computed"] = {k: {kk: v / n for kk, v in f.items()} for k, f in flops.items()}
        out["flops_saved_computed"] = {
            "first fit at max_length eager vs padded eager": 1 - flops["first fit at max_length, eager attention"]["total"]
            / flops["padded, eager attention"]["total"],
            "packed (plan_rows) eager vs padded eager": 1 - flops[
                "packed (plan_rows), eager attention"]["total"] / flops["padded, eager attention"]["total"],
            "varlen vs padded causal": 1 - flops["one row, FlashAttention-2 varlen"]["total"]
            / flops["padded, causal kernel (FlashAttention/SDPA)"]["total"],
            "varlen vs padded eager": 1 - flops["one row, FlashAttention-2 varlen"]["total"]
            / flops["padded, eager attention"]["total"]}
    return out


# ------------------------------------------------------------------------------ the packed batch

def padded_batch(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
                 pad_token_id: int) -> dict[str, torch.Tensor]:
    """The official padded layout of the same sequences (right padding to the longest)."""
    T = max(len(s) for s in input_ids)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids, lab in zip(input_ids, labels):
        pad = T - len(ids)
        out["input_ids"].append(list(ids) + [int(pad_token_id)] * pad)
        out["attention_mask"].append([1] * len(ids) + [0] * pad)
        out["labels"].append(list(lab) + [IGNORE_INDEX] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def step_sequences(dataset, rows: Sequence[int]) -> tuple[list, list]:
    """A step's ``input_ids`` and ``labels`` in the pair layout (chosen rows, then rejected)."""
    feats = [dataset[int(i)] for i in rows]
    ids = [f[f"{side}_input_ids"] for side in ("chosen", "rejected") for f in feats]
    labels = [f[f"{side}_labels"] for side in ("chosen", "rejected") for f in feats]
    return ids, labels


# --------------------------------------------------------------------------------- CPU step time

def layout_loss(model, batch: dict, *, packed: bool, loss_kwargs: dict):
    """The SimPO loss of ``batch`` through the decoder and :func:`simpo_kernels.simpo_loss`."""
    from simpo_kernels import simpo_loss

    if packed:
        h = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                        use_cache=False).last_hidden_state
        extra = {"sequence_ids": batch["sequence_ids"]}
    else:
        h = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        use_cache=False).last_hidden_state
        extra = {}
    return simpo_loss(h, model.lm_head.weight, batch["labels"],
                      softcap=model.config.final_logit_softcapping, **loss_kwargs, **extra).loss


def synthetic_sequences(n_pairs: int, max_length: int, vocab_size: int, seed: int = 42) -> list[tuple]:
    """``n_pairs`` UltraFeedback-like pairs (:func:`ultrafeedback_like` scaled to ``max_length``,
    ``max_prompt_length = max_length * 1800 / 2048``) of random token ids in ``[4, vocab_size)``:
    ``[(chosen_ids, chosen_labels, rejected_ids, rejected_labels)]``, the prompt shared and labelled -100."""
    uf = ultrafeedback_like(n_pairs, seed=seed, max_length=max_length,
                            max_prompt_length=max(1, max_length * 1800 // 2048), scale=max_length / 2048)
    g = torch.Generator().manual_seed(seed)
    out = []
    for p, c, r in uf["parts"]:
        prompt = torch.randint(4, vocab_size, (p,), generator=g).tolist()
        resp = [torch.randint(4, vocab_size, (n,), generator=g).tolist() for n in (c, r)]
        out.append((prompt + resp[0], [IGNORE_INDEX] * p + resp[0], prompt + resp[1], [IGNORE_INDEX] * p + resp[1]))
    return out


def time_cpu_steps(dataset, tokenizer, args, model_args, *, batch: int, steps: int, repeats: int,
                   seed: int = 42, synthetic_max_length: Optional[int] = None) -> dict:
    """CPU forward + backward time of the tiny model (the recipe's shape, float32, eager
    attention), padded vs packed (``plan_rows`` at max_length, and :func:`min_token_plan`), on the
    first ``steps`` steps of the official order: per layout, the median over ``repeats`` of the
    summed step times (layouts interleaved, so drift hits all alike), and the largest loss
    difference between the layouts (the same pairs give the same loss). ``synthetic_max_length``:
    UltraFeedback-like pairs of random ids at that max_length (:func:`synthetic_sequences`)
    instead of the shipped data."""
    from simpo.modeling import build_tiny_model

    torch.manual_seed(seed)
    model = build_tiny_model(tokenizer, torch_dtype=torch.float32, hidden_size=model_args.tiny_hidden_size,
                             num_layers=model_args.tiny_num_layers,
                             **({"max_position_embeddings": synthetic_max_length} if synthetic_max_length else {}))
    model.train()
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    loss_kwargs = {"beta": args.beta, "gamma_beta_ratio": args.gamma_beta_ratio, "backend": "torch",
                   "sft_weight": getattr(args, "sft_weight", 0.0)}
    max_length = synthetic_max_length or args.max_length
    if synthetic_max_length:
        pairs = synthetic_sequences(steps * batch, synthetic_max_length, len(tokenizer), seed)
    batches = []
    for rows in official_batches(steps * batch if synthetic_max_length else len(dataset), batch, seed)[:steps]:
        if synthetic_max_length:
            ids = [pairs[i][0] for i in rows] + [pairs[i][2] for i in rows]
            labels = [pairs[i][1] for i in rows] + [pairs[i][3] for i in rows]
        else:
            ids, labels = step_sequences(dataset, rows)
        best = min_token_plan([len(x) for x in ids], max_length)
        batches.append({"padded": padded_batch(ids, labels, tokenizer.pad_token_id),
                         "packed": pack_sequences(ids, labels, max_length, tokenizer.pad_token_id,
                                                  plan=first_fit([len(x) for x in ids], max_length)),
                         "packed_min": pack_sequences(ids, labels, max_length, tokenizer.pad_token_id,
                                                      plan=best)})
    names = ("padded", "packed", "packed_min")
    totals = {k: [] for k in names}
    max_dloss = 0.0
    for rep in range(repeats + 1):  # the first round warms up and is not counted
        t = dict.fromkeys(names, 0.0)
        for step in batches:
            losses = {}
            for name in names:
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                loss = layout_loss(model, step[name], packed=name != "padded", loss_kwargs=loss_kwargs)
                loss.backward()
                t[name] += time.perf_counter() - t0
                losses[name] = loss.item()
            max_dloss = max(max_dloss, *(abs(losses["padded"] - losses[k]) for k in names))
        if rep:
            for k in totals:
                totals[k].append(t[k])
    tokens = {k: sum(int(step[k]["input_ids"].numel()) for step in batches) for k in names}
    med = {k: statistics.median(v) for k, v in totals.items()}
    return {"what": "CPU, tiny model (measured): forward + backward, float32, eager attention",
            "data": (f"UltraFeedback-like model, random ids, max_length {synthetic_max_length}"
                     if synthetic_max_length else "shipped"), "max_length": max_length,
            "model": {"hidden_size": model.config.hidden_size, "layers": model.config.num_hidden_layers,
                      "vocab_size": model.config.vocab_size},
            "per_device_batch": batch, "steps": len(batches), "repeats": repeats,
            "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "tokens": tokens, "seconds_median": med, "seconds_all": totals,
            "ms_per_step": {k: 1e3 * v / len(batches) for k, v in med.items()},
            "speedup": med["padded"] / med["packed"], "speedup_min": med["padded"] / med["packed_min"],
            "max_abs_loss_difference": max_dloss}


# ----------------------------------------------------------------------------------------- report

def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def render(result: dict) -> str:
    """The markdown table of a :func:`run` result."""
    lines = ["# What padding-free batches save", "",
             f"Written by `python -m benchmarks.packing` ({result['date']}, torch {result['torch']}). "
             "Token counts are counted; FLOPs are **computed** from the Gemma-2-9B shape, never measured; "
             "step times are **measured on a CPU, tiny model**. No GPU number appears here.", "",
             "## Tokens per step (counted, every step of one epoch in the official order)", "",
             "| data | per-device batch | max_length | steps | real | padded | first fit at max_length | "
             "padding share (padded) | saved by it | its rows per step | packed (`plan_rows`, the collator) "
             "| saved by packing |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, e in result["epochs"].items():
        t = e["tokens_per_step"]
        lines.append(f"| {e['label']} | {e['per_device_batch']} | {e['max_length']} | {e['steps']} | "
                     f"{t['real']:.0f} | {t['padded']:.0f} | {t['packed']:.0f} | "
                     f"{_pct(e['padding_share_padded'])} | {_pct(e['tokens_saved_packed'])} | "
                     f"{e['rows_per_step']:.2f} | {t['packed_min']:.0f} | {_pct(e['tokens_saved_packed_min'])} |")
    lines += ["", "Mean tokens per step. *real*: the sequences' own tokens (also the one-row layout "
              "FlashAttention-2's varlen path takes); *padded*: the official layout, every sequence padded to "
              "the step's longest; *first fit at max_length*: `simpo.packing.first_fit(lengths, max_length)`, rows "
              "filled up to max_length, rows x width (the naive plan, for comparison); *packed*: "
              "`simpo.packing.plan_rows`, what `--padding_free` uses: first fit at the capacity between the "
              "longest sequence and max_length that gives the fewest tokens (never more than padded). A "
              "negative saving means the rows hold more tokens than the padded batch: short, alike sequences "
              "fill rows up to max_length unevenly and the longest row sets the width."]
    uf = result["epochs"]["ultrafeedback_like"]
    lines += ["", "## Decoder FLOPs per step at the Gemma-2-9B shape (computed)", "",
              f"Synthetic UltraFeedback-like steps (per-device batch {uf['per_device_batch']}, max_length "
              f"{uf['max_length']}); forward + backward, no recomputation; lm_head excluded. "
              f"Non-embedding parameters: {result['gemma2_9b']['non_embedding_params'] / 1e9:.3f} B.", "",
              "| layout | linear TFLOP | attention TFLOP | total TFLOP |", "|---|---|---|---|"]
    for name, f in uf["flops_per_step_computed"].items():
        lines.append(f"| {name} | {f['linear'] / 1e12:.2f} | {f['attention'] / 1e12:.3f} | {f['total'] / 1e12:.2f} |")
    lines += [""] + [f"- {k}: {_pct(v)} fewer FLOPs (computed)" for k, v in uf["flops_saved_computed"].items()]
    lines += ["", "## CPU step time (measured: CPU, tiny model)", "",
              "| data | max_length | per-device batch | steps | padded ms/step | first fit at max_length ms/step "
              "(speedup) | packed (`plan_rows`) ms/step (speedup) | tokens padded / first fit / packed | "
              "max loss difference |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in result["cpu"]:
        ms, tk = c["ms_per_step"], c["tokens"]
        lines.append(f"| {c['data']} | {c['max_length']} | {c['per_device_batch']} | {c['steps']} | {ms['padded']:.1f} | {ms['packed']:.1f} "
                     f"({c['speedup']:.2f}x) | {ms['packed_min']:.1f} ({c['speedup_min']:.2f}x) | "
                     f"{tk['padded']} / {tk['packed']} / {tk['packed_min']} | {c['max_abs_loss_difference']:.1e} |")
    c0 = result["cpu"][0]
    src = result["ultrafeedback_model"]
    lines += ["", f"{c0['what']}; hidden {c0['model']['hidden_size']}, {c0['model']['layers']} layers, vocab "
              f"{c0['model']['vocab_size']}; {c0['torch_threads']} torch thread(s), {c0['cpu']}; median of "
              f"{c0['repeats']} repeats of the summed step times.", "",
              "## The synthetic distribution (a model)", "",
              f"Source: {src['source']['title']}, {src['source']['url']} ({src['source']['also']}): average "
              f"instruction length {src['source']['instruction_mean_tokens']} tokens, average completion length "
              f"{src['source']['completion_mean_tokens']} tokens (only means are published). Shape chosen here: "
              f"log-normal with those means, sigma (of the log) {src['sigma']['instruction']} for prompts and "
              f"{src['sigma']['completion']} for responses, chosen and rejected drawn independently; Gemma "
              f"template tokens added ({src['template_tokens']['prompt']} around the prompt, "
              f"{src['template_tokens']['response']} after a response); the official truncation rule at "
              f"max_length {OFFICIAL['max_length']} / max_prompt_length {OFFICIAL['max_prompt_length']}; "
              f"{src['pairs']} pairs, seed {src['seed']}. Drawn means: prompt {src['drawn_means']['prompt']:.1f}, "
              f"response {src['drawn_means']['response']:.1f}.", "",
              "Sensitivity of the tokens saved by packing to the assumed spread (per-device batch 2):", "",
              "| sigma prompt | sigma response | padding share (padded) | saved by first fit at max_length | saved by packing (plan_rows) |",
              "|---|---|---|---|---|"]
    for s in result["sensitivity"]:
        lines.append(f"| {s['sigma']['instruction']} | {s['sigma']['completion']} | {_pct(s['padding_share_padded'])} | "
                     f"{_pct(s['tokens_saved_packed'])} | {_pct(s['tokens_saved_packed_min'])} |")
    return "\n".join(lines) + "\n"


def run(out: Path = RESULTS, *, cpu_steps: int = 16, repeats: int = 5, uf_pairs: int = UF_PAIRS,
        log=print) -> dict:
    """All three measurements; writes ``packing.json`` and ``packing.md`` under ``out``."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, tokenizer, (model_args, data_args, args) = shipped_data()
    shipped = pair_lengths(train)
    epochs = {}
    for batch in sorted({OFFICIAL["per_device_batch"], args.per_device_train_batch_size}):
        e = epoch_summary(shipped, batch, args.max_length, OFFICIAL["seed"])
        e["label"] = (f"shipped (simpo/data/train.jsonl, tiny tokenizer, "
                      f"{'official' if batch == OFFICIAL['per_device_batch'] else 'tiny recipe'} batch)")
        epochs[f"shipped_b{batch}"] = e
        log(f"shipped, batch {batch}: packing saved {_pct(e['tokens_saved_packed_min'])} of the padded tokens")
    uf = ultrafeedback_like(uf_pairs, seed=OFFICIAL["seed"], max_length=OFFICIAL["max_length"],
                            max_prompt_length=OFFICIAL["max_prompt_length"])
    e = epoch_summary(uf["pairs"], OFFICIAL["per_device_batch"], OFFICIAL["max_length"], OFFICIAL["seed"],
                      cfg=GEMMA2_9B)
    e["label"] = "UltraFeedback-like model (synthetic)"
    epochs["ultrafeedback_like"] = e
    log(f"UltraFeedback-like: packing saved {_pct(e['tokens_saved_packed_min'])} tokens, FLOPs (computed) "
        + ", ".join(f"{k} {_pct(v)}" for k, v in e["flops_saved_computed"].items()))
    sensitivity = []
    for sp, sr in ((0.5, 0.5), (1.0, 0.8), (1.2, 1.0)):
        s = ultrafeedback_like(uf_pairs, seed=OFFICIAL["seed"], sigma={"instruction": sp, "completion": sr})
        se = epoch_summary(s["pairs"], OFFICIAL["per_device_batch"], OFFICIAL["max_length"], OFFICIAL["seed"])
        sensitivity.append({"sigma": {"instruction": sp, "completion": sr},
                            "tokens_saved_packed": se["tokens_saved_packed"],
                            "tokens_saved_packed_min": se["tokens_saved_packed_min"],
                            "padding_share_padded": se["padding_share_padded"]})
    cpu = []
    for batch in sorted({OFFICIAL["per_device_batch"], args.per_device_train_batch_size}):
        c = time_cpu_steps(train, tokenizer, args, model_args, batch=batch, steps=cpu_steps, repeats=repeats)
        cpu.append(c)
        log(f"CPU, tiny model, shipped, batch {batch}: padded {c['ms_per_step']['padded']:.1f} ms/step, packed "
            f"{c['ms_per_step']['packed']:.1f} ms/step ({c['speedup']:.2f}x) first fit at max_length, packed (plan_rows) "
            f"{c['ms_per_step']['packed_min']:.1f} ms/step ({c['speedup_min']:.2f}x)")
    c = time_cpu_steps(train, tokenizer, args, model_args, batch=OFFICIAL["per_device_batch"], steps=cpu_steps,
                       repeats=repeats, synthetic_max_length=SYNTHETIC_CPU_MAX_LENGTH)
    cpu.append(c)
    log(f"CPU, tiny model, UltraFeedback-like at {SYNTHETIC_CPU_MAX_LENGTH}: padded "
        f"{c['ms_per_step']['padded']:.1f} ms/step, first fit at max_length {c['ms_per_step']['packed']:.1f} "
        f"ms/step ({c['speedup']:.2f}x), packed (plan_rows) {c['ms_per_step']['packed_min']:.1f} ms/step "
        f"({c['speedup_min']:.2f}x)")
    result = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "torch": torch.__version__,
        "official": OFFICIAL,
        "gemma2_9b": {**GEMMA2_9B, "non_embedding_params": non_embedding_params(GEMMA2_9B),
                      "source": "google/gemma-2-9b config.json (public); DESIGN section 2"},
        "ultrafeedback_model": {"source": UF_SOURCE, "sigma": UF_SIGMA, "template_tokens": GEMMA_TEMPLATE_TOKENS,
                                "pairs": uf_pairs, "seed": OFFICIAL["seed"], "label": "a model of the distribution",
                                "drawn_means": {"prompt": float(uf["prompt"].mean()),
                                                "response": float(torch.cat([uf["chosen"], uf["rejected"]]).mean())}},
        "shipped_recipe": {"max_length": args.max_length, "max_prompt_length": args.max_prompt_length,
                           "pairs": len(shipped), "vocab": len(tokenizer)},
        "epochs": epochs, "sensitivity": sensitivity, "cpu": cpu}
    (out / "packing.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    (out / "packing.md").write_text(render(result))
    log(f"wrote {out / 'packing.json'} and {out / 'packing.md'}")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory for packing.json and packing.md")
    ap.add_argument("--cpu-steps", type=int, default=16, help="shipped-data steps timed per layout")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    ap.add_argument("--uf-pairs", type=int, default=UF_PAIRS, help="synthetic UltraFeedback-like pairs")
    a = ap.parse_args(argv)
    if a.cpu_steps < 1 or a.repeats < 1 or a.uf_pairs < 1:
        ap.error("--cpu-steps, --repeats and --uf-pairs must be >= 1")
    run(a.out, cpu_steps=a.cpu_steps, repeats=a.repeats, uf_pairs=a.uf_pairs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
