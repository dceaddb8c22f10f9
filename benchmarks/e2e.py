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

Reported per path: step time (median), tokens/s, peak memory, and the largest batch (pairs) that
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


def gemma2_2b_config(tiny: bool = False):
    from transformers import Gemma2Config

    dims = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                query_pre_attn_scalar=256)
    if tiny:
        dims = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                    query_pre_attn_scalar=32)
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


def loss_of(model, batch, path: str):
    from simpo_kernels import simpo_loss, simpo_loss_from_logits

    ids, mask, labels = batch
    if path == "eager":
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return simpo_loss_from_logits(logits, labels, beta=BETA, gamma_beta_ratio=GAMMA_BETA_RATIO,
                                      backend="eager").loss
    hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return simpo_loss(hidden, model.lm_head.weight, labels, beta=BETA,
                      gamma_beta_ratio=GAMMA_BETA_RATIO,
                      softcap=model.config.final_logit_softcapping, backend=path).loss


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
        batch = make_batch(cfg, pairs, seq, device, seed=pairs)
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


def largest_batch(model, opt, cfg, seq, path, device, max_pairs: int) -> dict:
    """Largest number of pairs whose step fits: double from 1, then bisect. ``capped`` when even
    ``max_pairs`` fit (always so on CPU, which has no memory limit here)."""
    lo, hi, trials = 0, None, []
    p = 1
    while p <= max_pairs:
        ok = try_step(model, opt, cfg, p, seq, path, device)
        trials.append((p, ok))
        if not ok:
            hi = p
            break
        lo = p
        p *= 2
    if hi is None and lo < max_pairs and lo * 2 > max_pairs:
        ok = try_step(model, opt, cfg, max_pairs, seq, path, device)
        trials.append((max_pairs, ok))
        lo, hi = (max_pairs, None) if ok else (lo, max_pairs)
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        ok = try_step(model, opt, cfg, mid, seq, path, device)
        trials.append((mid, ok))
        lo, hi = (mid, hi) if ok else (lo, mid)
    return {"max_pairs": lo, "capped": hi is None, "cap": max_pairs, "trials": trials}


def run_path(model, opt, cfg, path, *, pairs, seq, device, steps, search, max_pairs) -> dict:
    device = torch.device(device)
    out = {"path": path, "pairs": pairs, "seq": seq, "tokens": 2 * pairs * seq, "status": "ok",
           "step_ms": None, "tokens_per_s": None, "peak_mem_mib": None, "step_extra_mib": None}
    try:
        batch = make_batch(cfg, pairs, seq, device)
        train_step(model, opt, batch, path)  # warm-up: optimizer state, kernels, autotuning
        sync(device)
        times = []
        for i in range(steps):
            if device.type == "cuda" and i == steps - 1:
                free_memory(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            out["loss"] = train_step(model, opt, batch, path)
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            out["peak_mem_mib"] = peak / MIB
            out["step_extra_mib"] = (peak - base) / MIB
        times.sort()
        out["step_ms"] = times[len(times) // 2]
        out["step_ms_all"] = times
        out["tokens_per_s"] = out["tokens"] / (out["step_ms"] * 1e-3)
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        out["status"] = "oom"
    batch = None
    opt.zero_grad(set_to_none=True)
    free_memory(device)
    if search:
        out["largest_batch"] = largest_batch(model, opt, cfg, seq, path, device, max_pairs)
    return out


def default_paths(device) -> list:
    return ["eager", "triton"] if torch.device(device).type == "cuda" else ["eager", "torch"]


def run_e2e(device, *, paths=None, pairs: int = 2, seq: int = 2048, tiny: bool = False,
            steps: int = 3, search: bool = True, max_pairs: int = 64, log=print) -> dict:
    device = torch.device(device)
    paths = list(paths or default_paths(device))
    cfg = gemma2_2b_config(tiny)
    t0 = time.perf_counter()
    model = build_model(cfg, device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=8e-7, foreach=True)
    result = {"model": "gemma2-2b-shaped" + (" (tiny)" if tiny else ""), "params": n_params,
              "config": {k: getattr(cfg, k) for k in (
                  "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim",
                  "final_logit_softcapping", "attn_logit_softcapping", "tie_word_embeddings")},
              "dtype": "bfloat16", "optimizer": "AdamW (bf16 params, no fp32 master copy)",
              "gradient_checkpointing": True, "attn_implementation": "eager",
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
    ap.add_argument("--paths", default=None, help="comma list of eager,torch,triton")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-pairs", type=int, default=None)
    ap.add_argument("--no-search", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="toy config (default on CPU)")
    args = ap.parse_args(argv)
    tiny = args.tiny or args.device == "cpu"
    res = run_e2e(args.device, paths=args.paths.split(",") if args.paths else None,
                  pairs=args.pairs, seq=args.seq or (64 if tiny else 2048), tiny=tiny,
                  steps=args.steps, search=not args.no_search,
                  max_pairs=args.max_pairs or (4 if tiny else 64))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
