"""Padding-free batches: the sequences of a step's pairs packed into rows, with no padding between
them.

The official pipeline pads the ``2B`` sequences of a micro-batch (chosen rows, then rejected rows)
to the longest one. Here the same ``2B`` sequences are laid end to end in rows of at most
``max_length`` tokens (first-fit decreasing on their lengths, at the row capacity that gives the
fewest tokens), so a step holds the same pairs and computes the same loss, and only the padding
goes. Each token carries

* ``position_ids``: its position inside its own sequence (restarting at 0 per sequence), which is
  what the rotary embeddings see in the padded layout too (right padding), and from which
  transformers builds the block-diagonal causal masks (``masking_utils``: a position that does not
  follow its predecessor starts a new sequence; sliding windows stay inside a sequence);
* ``sequence_ids``: its sequence's index in the pair layout (``i`` = chosen of pair ``i``,
  ``B + i`` = rejected of pair ``i``; ``-1`` on the padding at the end of a row), which the loss
  (:func:`simpo_kernels.simpo_loss` with ``sequence_ids=``) pairs by.

Rows are never longer than ``max_length`` (or the longest sequence, if longer), so eager attention,
whose cost grows with the square of the row length, never does more work per row than the padded
layout would. ``one_row=True`` lays every sequence in a single row (FlashAttention-2's varlen path
takes one row; it skips the other sequences' blocks itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class PackPlan:
    """Where each sequence goes. ``rows[r]`` lists the sequence indices laid in row ``r``, in
    order; ``width`` is the longest row (the batch's second dimension)."""

    rows: tuple
    width: int

    @property
    def tokens(self) -> int:
        """Tokens in the packed batch, padding at the ends of rows included: ``len(rows) * width``."""
        return len(self.rows) * self.width


def first_fit(lengths: Sequence[int], capacity: int) -> PackPlan:
    """First-fit decreasing into rows of ``capacity`` tokens: sequences in order of decreasing
    length (ties by index), each into the first row with room, a new row when none has."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    used: list[int] = []
    for i in order:
        n = int(lengths[i])
        for r, u in enumerate(used):
            if u + n <= capacity:
                rows[r].append(i)
                used[r] += n
                break
        else:
            rows.append([i])
            used.append(n)
    return PackPlan(rows=tuple(tuple(r) for r in rows), width=max(used))


def plan_rows(lengths: Sequence[int], max_length: int, one_row: bool = False) -> PackPlan:
    """Pack sequences of ``lengths`` into the rows with the fewest tokens (rows x width), each row
    at most ``max(max_length, longest)`` tokens.

    :func:`first_fit` at each candidate capacity between the longest sequence and ``max_length``
    (``ceil(total / k)`` for ``k`` rows, and the two ends), keeping the plan with the fewest
    tokens (ties: fewer rows, then the smaller capacity). The longest sequence's capacity never
    needs more rows than sequences nor a row longer than the padded batch's, so the packed batch
    never holds more tokens than the padded one; filling rows up to ``max_length`` alone can (short
    sequences of similar length: one long row sets every row's width), and costs eager attention,
    quadratic in the row length, more. Deterministic: the same lengths give the same plan on every
    rank and every run.

    Args:
        lengths: token count of each sequence (each ``>= 1``).
        max_length: the largest row capacity (the recipe's ``max_length``).
        one_row: every sequence in one row, in index order (FlashAttention-2's varlen path).
    """
    if not lengths:
        raise ValueError("nothing to pack: no sequences")
    if any(int(n) < 1 for n in lengths):
        raise ValueError(f"every sequence needs at least one token, got lengths {list(lengths)}")
    if int(max_length) < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if one_row:
        return PackPlan(rows=(tuple(range(len(lengths))),), width=int(sum(lengths)))
    longest, total = max(int(n) for n in lengths), sum(int(n) for n in lengths)
    top = max(longest, int(max_length))
    caps = {longest, top} | {min(max(longest, -(-total // k)), top) for k in range(1, len(lengths) + 1)}
    plans = [first_fit(lengths, c) for c in sorted(caps)]
    return min(plans, key=lambda p: (p.tokens, len(p.rows)))  # min keeps the first (smallest) of ties


def padded_tokens(lengths: Sequence[int]) -> int:
    """Tokens of the official padded batch of these sequences: each padded to the longest."""
    return len(lengths) * max(int(n) for n in lengths)


def pack_sequences(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], max_length: int,
                   pad_token_id: int, one_row: bool = False, plan: Optional[PackPlan] = None,
                   label_pad_token_id: int = -100) -> dict[str, torch.Tensor]:
    """Sequences in the pair layout (chosen of every pair, then rejected) -> a padding-free batch:
    ``input_ids``, ``position_ids`` (restarting at 0 per sequence; a row's end padding numbered
    0.. as a sequence of its own), ``labels`` (``label_pad_token_id`` on padding), ``sequence_ids`` (``-1`` on
    padding), all ``[R, W]`` int64, laid out by :func:`plan_rows`; no
    ``attention_mask`` (transformers builds the block-diagonal causal masks from ``position_ids``).
    ``plan``: a :class:`PackPlan` of these sequences to use instead."""
    if len(input_ids) != len(labels):
        raise ValueError(f"{len(input_ids)} id sequences but {len(labels)} label sequences")
    for k, (ids, lab) in enumerate(zip(input_ids, labels)):
        if len(ids) != len(lab):
            raise ValueError(f"sequence {k}: {len(ids)} ids but {len(lab)} labels")
    if plan is None:
        plan = plan_rows([len(s) for s in input_ids], max_length, one_row=one_row)
    R, W = len(plan.rows), plan.width
    batch = {"input_ids": torch.full((R, W), int(pad_token_id), dtype=torch.long),
             "position_ids": torch.zeros((R, W), dtype=torch.long),
             "labels": torch.full((R, W), int(label_pad_token_id), dtype=torch.long),
             "sequence_ids": torch.full((R, W), -1, dtype=torch.long)}
    for r, row in enumerate(plan.rows):
        col = 0
        for s in row:
            n = len(input_ids[s])
            batch["input_ids"][r, col:col + n] = torch.as_tensor(list(input_ids[s]), dtype=torch.long)
            batch["labels"][r, col:col + n] = torch.as_tensor(list(labels[s]), dtype=torch.long)
            batch["position_ids"][r, col:col + n] = torch.arange(n)
            batch["sequence_ids"][r, col:col + n] = s
            col += n
        batch["position_ids"][r, col:] = torch.arange(W - col)
    return batch
