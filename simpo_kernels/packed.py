"""Packed (padding-free) batches: several sequences laid end to end in each row.

A padded batch has one sequence per row (``[2B, T]``, chosen rows first). A packed batch has rows
``[R, W]`` holding any number of sequences each, and ``sequence_ids [R, W]`` saying, for every
position, which sequence it belongs to: its index in the pair layout (``i`` = chosen of pair
``i``, ``B + i`` = rejected of pair ``i``), or ``-1`` on padding. Every sequence is one contiguous
run inside one row.

The loss never copies hidden states into a padded layout. :class:`PackedLayout` maps the
*sequence grid* ``[S, L]`` (sequence ``s``'s ``j``-th position, ``L`` the longest sequence) to the
flat position in the packed rows that holds it. Labels (small integers) are unpacked onto the
grid, where the shift (position ``t`` predicts label ``t + 1``) stays inside each sequence by
construction and every per-sequence reduction of the objective is the padded layout's; the
schedules then gather hidden-state rows through :attr:`PackedLayout.source` for the target
positions only, exactly as they gather them from a padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedLayout:
    """Where the sequences of a packed batch are.

    Attributes:
        num_sequences: ``S``. length: ``L``, the longest sequence. lengths: host list ``[S]``.
        source: ``[S * L]`` int64, the flat packed position (``row * W + column``) of grid slot
            ``(s, j)``; slots past a sequence's end point at its first position (never read: see
            ``present``).
        present: ``[S, L]`` bool, ``j < lengths[s]``.
    """

    num_sequences: int
    length: int
    lengths: list
    source: torch.Tensor
    present: torch.Tensor

    def unpack(self, values: torch.Tensor, fill) -> torch.Tensor:
        """``[R, W]`` packed values -> ``[S, L]`` on the sequence grid, ``fill`` past each end."""
        grid = values.reshape(-1).index_select(0, self.source).view(self.num_sequences, self.length)
        return torch.where(self.present, grid, fill)


def check_sequence_ids(sequence_ids, labels: torch.Tensor, rows: int, width: int, ignore_index: int,
                       paired: bool = True) -> PackedLayout:
    """Validate ``sequence_ids`` against ``labels`` (``[rows, width]`` both) and build the layout.

    Refused (ValueError/TypeError naming the problem): a non-integer or misshapen tensor, an id
    below -1, ids that skip a sequence (every ``0..S-1`` must occur), a sequence split into
    several runs or across rows, a label on padding (``sequence_ids == -1`` with a label other than
    ``ignore_index``: it would be silently dropped), and for a paired loss an odd or zero ``S``.
    Two small host transfers (the number of sequences, then every statistic at once).
    """
    if not isinstance(sequence_ids, torch.Tensor):
        raise TypeError(f"sequence_ids must be a torch.Tensor, got {type(sequence_ids).__name__}")
    if sequence_ids.dtype.is_floating_point or sequence_ids.dtype.is_complex or sequence_ids.dtype == torch.bool:
        raise TypeError(f"sequence_ids must be an integer tensor, got {sequence_ids.dtype}")
    if tuple(sequence_ids.shape) != (rows, width):
        raise ValueError(f"sequence_ids must have the packed batch's shape [R, W] = {[rows, width]} "
                         f"(as hidden_states[:, :, 0] and labels), got {list(sequence_ids.shape)}")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (rows, width):
        shape = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must have the packed batch's shape [R, W] = {[rows, width]}, got {shape}")
    if sequence_ids.device != labels.device:
        raise ValueError(f"sequence_ids ({sequence_ids.device}) and labels ({labels.device}) must be on one device")
    ids = sequence_ids.reshape(-1).long()
    lo_hi = torch.stack([ids.min(), ids.max()]).tolist() if ids.numel() else [-1, -1]
    if lo_hi[0] < -1:
        raise ValueError(f"sequence_ids must be >= 0 (a sequence's index) or -1 (padding), found {lo_hi[0]}")
    S = lo_hi[1] + 1
    if S == 0:
        raise ValueError("sequence_ids holds no sequence (every position is padding, -1)")
    if paired and S % 2:
        raise ValueError(f"sequence_ids must number 2B sequences (0..B-1 chosen, B..2B-1 rejected of pair i), "
                         f"found {S} (ids 0..{S - 1})")
    dev = ids.device
    real = ids >= 0
    seq = torch.where(real, ids, S)  # padding into a spare bucket
    pos = torch.arange(ids.numel(), device=dev)
    counts = torch.bincount(seq, minlength=S + 1)[:S]
    first = torch.full((S + 1,), ids.numel(), dtype=torch.long, device=dev).scatter_reduce(
        0, seq, pos, "amin")[:S]
    last = torch.full((S + 1,), -1, dtype=torch.long, device=dev).scatter_reduce(0, seq, pos, "amax")[:S]
    pad_label = (~real) & (labels.reshape(-1).long() != ignore_index)
    stats = torch.cat([counts, first, last, pad_label.any().reshape(1).long()]).tolist()
    counts, first, last, pad_labelled = stats[:S], stats[S:2 * S], stats[2 * S:3 * S], stats[-1]
    missing = [s for s in range(S) if counts[s] == 0]
    if missing:
        raise ValueError(f"sequence_ids skip sequence {missing[0]} (ids must be 0..S-1 with S={S}; missing: "
                         f"{missing[:8]}{'...' if len(missing) > 8 else ''})")
    for s in range(S):
        if last[s] - first[s] + 1 != counts[s] or first[s] // width != last[s] // width:
            raise ValueError(f"sequence {s} is not one contiguous run inside one row (positions {first[s]} to "
                             f"{last[s]} of the flattened rows hold {counts[s]} of its tokens): pack each "
                             f"sequence whole")
    if pad_labelled:
        bad = int(pad_label.nonzero()[0].item())
        raise ValueError(f"a label on padding: row {bad // width}, position {bad % width} has sequence_ids -1 and "
                         f"label {int(labels.reshape(-1)[bad])}; padding must be labelled ignore_index={ignore_index}")
    L = max(counts)
    j = torch.arange(L, device=dev)
    lengths = torch.tensor(counts, device=dev)
    starts = torch.tensor(first, device=dev)
    present = j[None, :] < lengths[:, None]
    source = torch.where(present, starts[:, None] + j[None, :], starts[:, None]).reshape(-1)
    return PackedLayout(S, L, counts, source, present)
