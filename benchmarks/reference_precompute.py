"""CPU throughput and peak memory of the reference precompute pass (``precompute_ref_log_probs``)
on the embedded tiny model: ``python -m benchmarks.reference_precompute [--pairs N] [--batch B]
[--hidden H] [--layers L] [--threads T]``.

The shipped train split, templated and tokenised as ``simpo-train`` does (max_length 128), repeated
to ``--pairs`` pairs, goes through :func:`simpo.reference.compute_reference_columns` with the tiny
Gemma-2 reference (softcap on) in float32, ``--batch`` pairs per forward, as the trainer runs it
(one process). Prints one JSON line: pairs/s, sequences/s (2 per pair), tokens/s (real, non-pad
tokens through the model, and the padded batch tokens), and the peak resident memory of the
process during the pass (``VmHWM`` after resetting it, Linux) next to the resident memory
before it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak_rss() -> bool:
    try:  # "5": reset the peak resident set size (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=2048)
    p.add_argument("--batch", type=int, default=16, help="pairs per reference forward")
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)

    import torch
    from datasets import concatenate_datasets

    from simpo.config import SimPOConfig
    from simpo.data import load_raw_datasets, prepare_dataset
    from simpo.modeling import build_tiny_model, build_tiny_tokenizer
    from simpo.reference import compute_reference_columns, prepare_reference_model
    from simpo.trainer import SimPOTrainer

    torch.set_num_threads(a.threads)
    raw = load_raw_datasets(None, ["train"])["train"]
    texts = [m["content"] for c in ("chosen", "rejected") for msgs in raw[c] for m in msgs]
    tok = build_tiny_tokenizer(texts)
    out_dir = f"/tmp/reference_precompute_{os.getpid()}"
    args = SimPOConfig(output_dir=out_dir, use_cpu=True, report_to="none", loss="dpo",
                       max_length=128, max_prompt_length=64, disable_tqdm=True,
                       precompute_ref_batch_size=a.batch, save_strategy="no")
    ds = prepare_dataset(raw, tok, args)
    ds = concatenate_datasets([ds] * (a.pairs // len(ds) + 1)).select(range(a.pairs))
    torch.manual_seed(0)
    model = build_tiny_model(tok, hidden_size=a.hidden, num_layers=a.layers)
    # a trainer for its collator, device and autocast context; one pair of data (its own
    # precompute is trivial), then the measured pass over the whole set
    trainer = SimPOTrainer(model=model, args=args, train_dataset=ds.select(range(1)),
                           processing_class=tok, ref_model=copy.deepcopy(model))
    ref = prepare_reference_model(copy.deepcopy(model), trainer)
    real = sum(len(r) for side in ("chosen", "rejected") for r in ds[f"{side}_input_ids"])
    padded = 0
    for start in range(0, len(ds), a.batch):
        rows = ds[start:start + a.batch]
        longest = max(len(r) for side in ("chosen", "rejected") for r in rows[f"{side}_input_ids"])
        padded += 2 * len(rows["chosen_input_ids"]) * longest
    before = _rss_kib("VmRSS")
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    chosen, rejected = compute_reference_columns(ref, ds, trainer.data_collator, trainer, a.batch,
                                                 "train")
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    assert torch.isfinite(chosen).all() and torch.isfinite(rejected).all()
    result = {
        "pairs": len(ds), "batch_pairs": a.batch, "hidden": a.hidden, "layers": a.layers,
        "vocab": len(tok), "threads": a.threads, "seconds": round(seconds, 3),
        "pairs_per_s": round(len(ds) / seconds, 1),
        "sequences_per_s": round(2 * len(ds) / seconds, 1),
        "tokens_per_s": round(real / seconds), "padded_tokens_per_s": round(padded / seconds),
        "rss_before_mib": round(before / 1024, 1),
        "peak_rss_mib": round(peak / 1024, 1) if reset else None,
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
