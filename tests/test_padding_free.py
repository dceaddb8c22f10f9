"""Padding-free (packed) preference batches in the training system (``--padding_free true``).

* The collator (:class:`simpo.data.SimPODataCollator` with ``padding_free``) packs a step's
  sequences into rows of at most ``max_length`` (position_ids restarting per sequence,
  sequence_ids in the pair layout, no attention_mask), with the same pairs per batch.
* Exactness: a tiny Gemma-2 (softcaps on, a sliding window shorter than the sequences) in float64
  gives the same loss, metrics and gradients of every parameter, packed vs padded on the same
  pairs, through the patched model forward the trainer runs (eager attention to 1e-10;
  flex_attention to float tolerance where it runs on CPU). A negative control shows the check
  fails when packed sequences can see each other.
* The CLI trains with ``--padding_free true``; attention implementations that cannot keep packed
  sequences apart are refused in one line; 2 ZeRO-3 CPU ranks with packing equal 1 process.
"""

from __future__ import annotations

import torch
import pytest

from simpo.data import SimPODataCollator
from simpo.modeling import (ReferenceLogps, attach_simpo_head, packed_attention, tiny_gemma2_config)
from simpo.packing import plan_rows

PAD, IGNORE = 0, -100
# (prompt, chosen response, rejected response) lengths of 3 pairs: unequal, all longer than the
# sliding window below, one pair far longer than the others (the padded layout's worst case)
SHAPES = [(6, 5, 3), (4, 9, 7), (3, 2, 4)]
WINDOW = 3  # the tiny model's sliding window: shorter than every sequence


def _features(shapes=SHAPES, vocab=40, seed=0, ref=False) -> list[dict]:
    """Tokenised pairs as prepare_dataset writes them: prompt + response ids, prompt labels
    ignored, attention masks all ones."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (p, c, r) in enumerate(shapes):
        prompt = torch.randint(3, vocab, (p,), generator=g).tolist()
        f = {}
        for side, n in (("chosen", c), ("rejected", r)):
            ids = prompt + torch.randint(3, vocab, (n,), generator=g).tolist()
            f[f"{side}_input_ids"] = ids
            f[f"{side}_attention_mask"] = [1] * len(ids)
            f[f"{side}_labels"] = [IGNORE] * p + ids[p:]
        if ref:
            f["ref_chosen_logps"], f["ref_rejected_logps"] = -10.0 - i, -12.5 - i
        out.append(f)
    return out


def _sequences(features):
    """The pair layout: chosen of every pair, then rejected."""
    return [f[f"{side}_input_ids"] for side in ("chosen", "rejected") for f in features]


# ----------------------------------------------------------------------------- the collator

@pytest.mark.parametrize("max_length,one_row", [(16, False), (12, False), (16, True)])
def test_collator_packs_whole_sequences_with_restarting_positions(max_length, one_row):
    features = _features(ref=True)
    seqs = _sequences(features)
    lengths = [len(s) for s in seqs]
    batch = SimPODataCollator(PAD, IGNORE, padding_free=True, max_length=max_length,
                              one_row=one_row)(features)
    assert set(batch) == {"input_ids", "position_ids", "labels", "sequence_ids",
                          "ref_chosen_logps", "ref_rejected_logps"}  # no attention_mask
    plan = plan_rows(lengths, max_length, one_row=one_row)
    R, W = batch["input_ids"].shape
    assert (R, W) == (len(plan.rows), plan.width)
    assert all(t.dtype == torch.long and t.shape == (R, W)
               for k, t in batch.items() if not k.startswith("ref_"))
    if one_row:
        assert R == 1 and W == sum(lengths)
    else:
        assert W <= max(max_length, max(lengths))
    labels_of = [f[f"{side}_labels"] for side in ("chosen", "rejected") for f in features]
    seen = []
    for r, row in enumerate(plan.rows):
        at = 0
        for s in row:  # each sequence one contiguous run, in the plan's order
            n = lengths[s]
            assert batch["input_ids"][r, at:at + n].tolist() == seqs[s]
            assert batch["labels"][r, at:at + n].tolist() == labels_of[s]
            assert batch["position_ids"][r, at:at + n].tolist() == list(range(n))
            assert batch["sequence_ids"][r, at:at + n].tolist() == [s] * n
            seen.append(s)
            at += n
        pad = W - at  # the row's end: padding, numbered 0.. as a sequence of its own
        assert batch["input_ids"][r, at:].tolist() == [PAD] * pad
        assert batch["labels"][r, at:].tolist() == [IGNORE] * pad
        assert batch["sequence_ids"][r, at:].tolist() == [-1] * pad
        assert batch["position_ids"][r, at:].tolist() == list(range(pad))
    assert sorted(seen) == list(range(2 * len(features)))  # the same pairs, every sequence once
    # the reference columns are the padded batch's, unchanged
    padded = SimPODataCollator(PAD, IGNORE)(features)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        assert torch.equal(batch[key], padded[key]) and batch[key].dtype == torch.float64
    assert batch["input_ids"].numel() < padded["input_ids"].numel() or one_row


def test_collator_refuses_what_it_cannot_pack():
    with pytest.raises(ValueError, match="padding_free needs max_length"):
        SimPODataCollator(PAD, IGNORE, padding_free=True)
    features = _features()
    features[1]["rejected_attention_mask"][-1] = 0
    with pytest.raises(ValueError, match="rejected sequence of pair 1 has attention_mask zeros"):
        SimPODataCollator(PAD, IGNORE, padding_free=True, max_length=16)(features)
