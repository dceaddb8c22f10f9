"""End-to-end benchmark: one SimPO training step of a Gemma-2-2B-shaped model.

The model is built from its config with random weights (nothing is downloaded): hidden 2304,
26 layers, 8 heads, 4 KV heads, head_dim 256, intermediate 9216, vocab 256000, attention softcap
50, final softcap 30, tied embeddings; bf16 parameters, gradient checkpointing,
``attn_implementation="eager"``, AdamW. One step = forward, backward, optimizer step on
``pairs`` preference pairs of ``seq`` tokens (rows: chosen first, then rejected).

Loss paths:
    eager            ``model(...).logits`` -> the official path (``simpo_loss_from_logits``,
                     backend "eager": log_softmax + gather on the materialised logits)
    triton / torch   decoder hidden states (``model.model(...)``) -> ``simpo_loss(h, lm_head.weight,
                     labels, softcap=30, backend=...)``: no logits
    triton-<sched>   the same with ``schedule=<sched>`` pinned (``triton-pairs``, ``triton-vocab``,
    torch-<sched>    ``triton-fused``, ``torch-pairs``, ...); plain ``triton``/``torch``: ``auto``

Batch layouts (a suffix of a triton/torch path):
    (none)           every row ``seq`` tokens long, a prompt of 1/8 .. 1/2 of the row
    -uf              pairs of UltraFeedback-like lengths (:func:`benchmarks.packing.ultrafeedback_like`,
                     the official truncation rule at ``max_length = seq``), padded to the longest
                     as the official collator does
    -packed          the same pairs padding-free: rows of at most ``seq`` tokens
                     (:func:`simpo.packing.plan_rows`), ``position_ids`` restarting per sequence, no
                     ``attention_mask``, ``sequence_ids`` into ``simpo_loss``: ``triton-packed``
                     against ``triton-uf`` is what packing saves in a step

Reported per path: step time (median), tokens/s (the sequences' own tokens: padding not counted), peak memory, and the largest batch (pairs) that
fits in GPU memory (doubling, then bisection; OOM-safe). On CPU, ``tiny=True`` runs the same code
on a few-layer toy config so CI exercises it (no memory limit there: the search stops at its cap).

    python -m benchmarks.e2e [--paths eager,triton] [--pairs 2] [--seq 2048] [--max-pairs 32]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

from .cases import BETA, GAMMA_BETA_RATIO, IGNORE_INDEX
from .measure import MIB, free_memory, is_oom, sync


def gemma2_2b_config(tiny: bool = False, **overrides):
    """The Gemma-2-2B config (``tiny``: a 2-layer toy); ``overrides`` replace dims (``vocab_size=256``)."""
    from transformers import Gemma2Config

    dims = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                query_pre_attn_scalar=256)
    if tiny:
        dims = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                    query_pre_attn_scalar=32)
    dims.update(overrides)
    cfg = Gemma2Config(**dims, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                       tie_word_embeddings=True, sliding_window=4096, use_cache=False,
                       attn_implementation="eager")
    if getattr(cfg, "_attn_implementation", None) != "eager":  # older 5.x releases
        cfg._attn_implementation = "eager"
    return cfg


def build_model(cfg, device, dtype=torch.bfloat16, seed: int = 0):
    from transformers import Gemma2ForCausalLM

    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Gemma2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.config.use_cache = False
    with warnings.catch_warnings():  # renamed activation_checkpointing_enable in newer releases
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    return model


def make_batch(cfg, pairs: int, seq: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    ids = torch.randint(3, cfg.vocab_size, (rows, seq), generator=g)
    labels = ids.clone()
    for r in range(rows):  # a prompt of 1/8 .. 1/2 of the row, labelled -100
        p = int(torch.randint(seq // 8, seq // 2 + 1, (1,), generator=g))
        labels[r, :p] = IGNORE_INDEX
    return ids.to(device), torch.ones_like(ids).to(device), labels.to(device)


LAYOUTS = ("uf", "packed")  # path suffixes; none: full rows


def layout_of(path: str) -> tuple:
    """``"triton-fused-packed"`` -> ``("triton-fused", "packed")``; ``"triton"`` -> ``("triton", "full")``."""
    base, _, suffix = path.rpartition("-")
    if suffix in LAYOUTS and base:
        if base.partition("-")[0] == "eager":
            raise ValueError(f"e2e path {path!r}: the eager path (logits) has no {suffix} layout; use "
                             f"torch-{suffix} or triton-{suffix}")
        return base, suffix
    return path, "full"


def split_path(path: str) -> tuple:
    """``"triton-fused"`` -> ``("triton", "fused")``; ``"triton"`` -> ``("triton", "auto")``; a
    layout suffix (``-uf``, ``-packed``: :func:`layout_of`) is dropped."""
    backend, _, schedule = layout_of(path)[0].partition("-")
    if backend not in ("eager", "torch", "triton") or (backend == "eager" and schedule):
        raise ValueError(f"unknown e2e path {path!r}; expected eager, torch[-<schedule>][-uf|-packed] or "
                         f"triton[-<schedule>][-uf|-packed]")
    return backend, schedule or "auto"


def make_uf_batches(cfg, pairs: int, seq: int, device, seed: int = 0) -> tuple:
    """The same ``pairs`` of UltraFeedback-like lengths (the model of
    :func:`benchmarks.packing.ultrafeedback_like`, scaled to ``max_length = seq`` and
    ``max_prompt_length = seq * 1800 / 2048``) in both layouts: ``(padded, packed)``. ``padded``:
    ``(ids, attention_mask, labels)`` ``[2B, T]`` (right padding to the longest, as the official
    collator); ``packed``: :func:`simpo.packing.pack_sequences` rows of at most ``seq`` tokens.
    Random token ids; a pair's chosen and rejected share the prompt; prompts labelled -100."""
    from simpo.packing import pack_sequences

    from .packing import padded_batch, ultrafeedback_like

    uf = ultrafeedback_like(pairs, seed=seed, max_length=seq, max_prompt_length=max(1, seq * 1800 // 2048),
                            scale=seq / 2048)
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = [], []
    for p, c, r in uf["parts"]:
        prompt = torch.randint(3, cfg.vocab_size, (p,), generator=g).tolist()
        for out, n in ((chosen, c), (rejected, r)):
            resp = torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist()
            out.append((prompt + resp, [IGNORE_INDEX] * p + resp))
    seqs = chosen + rejected  # the pair layout: chosen of every pair, then rejected
    ids, labels = [s[0] for s in seqs], [s[1] for s in seqs]
    padded = padded_batch(ids, labels, pad_token_id=0)
    packed = pack_sequences(ids, labels, seq, pad_token_id=0)
    return ((padded["input_ids"].to(device), padded["attention_mask"].to(device), padded["labels"].to(device)),
            {k: v.to(device) for k, v in packed.items()})


def make_path_batch(cfg, path: str, pairs: int, seq: int, device, seed: int = 0):
    """The batch ``path``'s layout takes (:func:`layout_of`): full rows (:func:`make_batch`), or the
    UltraFeedback-like pairs padded (``-uf``) or packed (``-packed``, a dict)."""
    layout = layout_of(path)[1]
    if layout == "full":
        return make_batch(cfg, pairs, seq, device, seed=seed)
    padded, packed = make_uf_batches(cfg, pairs, seq, device, seed=seed)
    return packed if layout == "packed" else padded


def batch_tokens(batch) -> tuple:
    """``(tokens, real_tokens)`` of a batch: its positions, and those of its sequences (padding
    not counted)."""
    if isinstance(batch, dict):
        return batch["input_ids"].numel(), int((batch["sequence_ids"] >= 0).sum())
    ids, mask, _ = batch
    return ids.numel(), int(mask.sum())


def loss_of(model, batch, path: str):
    from simpo_kernels import simpo_loss, simpo_loss_from_logits

    backend, schedule = split_path(path)
    if layout_of(path)[1] == "packed":  # no attention_mask: transformers masks by position_ids
        hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                             use_cache=False).last_hidden_state
        return simpo_loss(hidden, model.lm_head.weight, batch["labels"], beta=BETA,
                          gamma_beta_ratio=GAMMA_BETA_RATIO, softcap=model.config.final_logit_softcapping,
                          backend=backend, schedule=schedule, sequence_ids=batch["sequence_ids"]).loss
    ids, mask, labels = batch
    if backend == "eager":
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return simpo_loss_from_logits(logits, labels, beta=BETA, gamma_beta_ratio=GAMMA_BETA_RATIO,
                                      backend="eager").loss
    hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return simpo_loss(hidden, model.lm_head.weight, labels, beta=BETA,
                      gamma_beta_ratio=GAMMA_BETA_RATIO,
                      softcap=model.config.final_logit_softcapping, backend=backend,
                      schedule=schedule).loss


def train_step(model, opt, batch, path: str) -> float:
    opt.zero_grad(set_to_none=True)
    loss = loss_of(model, batch, path)
    loss.backward()
    opt.step()
    return loss.item()


def try_step(model, opt, cfg, pairs, seq, path, device) -> bool:
    """One step at ``pairs``; False on out-of-memory (memory is freed either way)."""
    ok = True
    try:
        batch = make_path_batch(cfg, path, pairs, seq, device, seed=pairs)
        train_step(model, opt, batch, path)
        sync(device)
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        ok = False
    batch = None
    opt.zero_grad(set_to_none=True)
    free_memory(device)
    return ok


class BatchSearch:
    """The largest number of pairs whose step fits: double from ``known_fit`` (from 1 when 0), then
    bisect; ``max_pairs`` caps it. Drive it with ``while (p := s.next()) is not None: s.record(p, ok)``
    (each trial may be its own timed, guarded step); :meth:`result` at any point gives the best known
    batch (``complete`` False when the search was stopped before it converged)."""

    def __init__(self, max_pairs: int, known_fit: int = 0):
        self.cap = int(max_pairs)
        self.lo = min(int(known_fit), self.cap)  # largest known to fit
        self.hi = None  # smallest known not to fit
        self.trials = []

    def next(self):
        """The next batch to try, or None when the search is done."""
        if self.hi is None:
            return None if self.lo >= self.cap else min(self.cap, 2 * self.lo if self.lo else 1)
        return (self.lo + self.hi) // 2 if self.hi - self.lo > 1 else None

    def record(self, pairs: int, ok: bool) -> None:
        self.trials.append((pairs, bool(ok)))
        if ok:
            self.lo = max(self.lo, pairs)
        else:
            self.hi = pairs if self.hi is None else min(self.hi, pairs)

    def result(self) -> dict:
        return {"max_pairs": self.lo, "capped": self.hi is None and self.lo >= self.cap,
                "cap": self.cap, "upper": self.hi, "complete": self.next() is None,
                "trials": list(self.trials)}


def model_info(cfg, tiny: bool, dtype) -> dict:
    """What a result records of the model a step trains (:func:`gemma2_2b_config` ``cfg``)."""
    return {"model": "gemma2-2b-shaped" + (" (tiny)" if tiny else ""),
            "config": {k: getattr(cfg, k) for k in (
                "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim",
                "final_logit_softcapping", "attn_logit_softcapping", "tie_word_embeddings")},
            "dtype": str(dtype).replace("torch.", ""),
            "optimizer": "AdamW (params' dtype, no fp32 master copy)",
            "gradient_checkpointing": True, "attn_implementation": "eager"}


def largest_batch(model, opt, cfg, seq, path, device, max_pairs: int) -> dict:
    """Largest number of pairs whose step fits: double from 1, then bisect.
    ``capped`` when even ``max_pairs`` fit (always so on CPU, which has no memory limit here)."""
    search = BatchSearch(max_pairs)
    while (p := search.next()) is not None:
        search.record(p, try_step(model, opt, cfg, p, seq, path, device))
    return search.result()


def measure_step(model, opt, cfg, path, *, pairs, seq, device, steps, seed: int = 0) -> dict:
    """Step time of ``path`` at ``pairs`` x ``seq``: one warm-up step (optimizer state, kernels,
    autotuning; its loss is ``first_loss``, on the weights the model was built with), then the median
    of ``steps`` timed steps; peak memory (CUDA) over the last. OOM propagates (the caller decides)."""
    device = torch.device(device)
    batch = make_path_batch(cfg, path, pairs, seq, device, seed=seed)
    tokens, real = batch_tokens(batch)
    out = {"path": path, "pairs": pairs, "seq": seq, "tokens": tokens, "real_tokens": real, "status": "ok",
           "step_ms": None, "tokens_per_s": None, "peak_mem_mib": None, "step_extra_mib": None}
    t0 = time.perf_counter()
    out["first_loss"] = train_step(model, opt, batch, path)
    sync(device)
    out["warmup_ms"] = (time.perf_counter() - t0) * 1e3
    times = []
    base = 0
    for i in range(steps):
        if device.type == "cuda" and i == steps - 1:
            free_memory(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        out["loss"] = train_step(model, opt, batch, path)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda" and steps:
        peak = torch.cuda.max_memory_allocated(device)
        out["peak_mem_mib"] = peak / MIB
        out["step_extra_mib"] = (peak - base) / MIB
    if times:
        times.sort()
        out["step_ms"] = times[len(times) // 2]
        out["step_ms_all"] = times
        out["tokens_per_s"] = out["real_tokens"] / (out["step_ms"] * 1e-3)
    return out


def run_path(model, opt, cfg, path, *, pairs, seq, device, steps, search, max_pairs) -> dict:
    device = torch.device(device)
    try:
        out = measure_step(model, opt, cfg, path, pairs=pairs, seq=seq, device=device, steps=steps)
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        out = {"path": path, "pairs": pairs, "seq": seq, "tokens": 2 * pairs * seq, "status": "oom",
               "step_ms": None, "tokens_per_s": None, "peak_mem_mib": None, "step_extra_mib": None}
    opt.zero_grad(set_to_none=True)
    free_memory(device)
    if search:
        out["largest_batch"] = largest_batch(model, opt, cfg, seq, path, device, max_pairs)
    return out


def default_paths(device) -> list:
    return ["eager", "triton"] if torch.device(device).type == "cuda" else ["eager", "torch"]


def run_e2e(device, *, paths=None, pairs: int = 2, seq: int = 2048, tiny: bool = False,
            steps: int = 3, search: bool = True, max_pairs: int = 64, dtype=torch.bfloat16,
            log=print) -> dict:
    """Every path on one model (the optimizer state carries over between paths); results at the end.
    The GPU campaign's ``train`` group (:func:`benchmarks.campaign.steps.run_train`) runs the same
    pieces as separate time-guarded steps, a fresh model per path, without the batch search."""
    device = torch.device(device)
    paths = list(paths or default_paths(device))
    cfg = gemma2_2b_config(tiny)
    t0 = time.perf_counter()
    model = build_model(cfg, device, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=8e-7, foreach=True)
    result = {**model_info(cfg, tiny, dtype), "params": n_params,
              "build_s": time.perf_counter() - t0, "paths": []}
    log(f"e2e: {result['model']}, {n_params / 1e9:.3f}B params, built in {result['build_s']:.1f}s")
    for path in paths:
        try:
            r = run_path(model, opt, cfg, path, pairs=pairs, seq=seq, device=device, steps=steps,
                         search=search, max_pairs=max_pairs)
        except (ValueError, ImportError) as exc:  # e.g. backend unavailable here
            r = {"path": path, "status": f"skipped:{exc}"}
        result["paths"].append(r)
        log(f"e2e {path}: status={r['status']} step_ms={r.get('step_ms')} "
            f"tokens/s={r.get('tokens_per_s')} peak_MiB={r.get('peak_mem_mib')} "
            f"largest={r.get('largest_batch', {}).get('max_pairs')}")
    del model, opt
    free_memory(device)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--paths", default=None,
                    help="comma list of eager,torch,triton (or triton-pairs, triton-fused, ...; a "
                         "-uf / -packed suffix: UltraFeedback-like pairs padded / packed)")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-pairs", type=int, default=None)
    ap.add_argument("--no-search", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="toy config (default on CPU)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="parameters' dtype (float32 for triton paths under TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    tiny = args.tiny or args.device == "cpu"
    res = run_e2e(args.device, paths=args.paths.split(",") if args.paths else None,
                  pairs=args.pairs, seq=args.seq or (64 if tiny else 2048), tiny=tiny,
                  steps=args.steps, search=not args.no_search,
                  max_pairs=args.max_pairs or (4 if tiny else 64), dtype=getattr(torch, args.dtype))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
