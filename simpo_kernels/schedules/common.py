"""What every schedule shares: target compaction, the row operations, the metric-only rows.

Target compaction: only target positions (``targets != ignore_index``) get log-probabilities and
gradient work. Their flat indices come from ``torch.nonzero_static`` with the count the label check
already brought to the host (:func:`simpo_kernels.validation.check_labels`), so compaction costs no
host sync. Prompt and padding positions matter only to the official ``logits/*`` metrics (mean logit
over every position); :func:`other_logit_sums` computes their logit sums when
``logit_metrics="exact"``: one GEMV without a softcap (``sum_v z_v = h . sum_v W_v + sum_v b_v``),
a forward-only pass over their logits with one.

Row operations: the ``pairs`` and ``vocab`` schedules form float32 logits by matmul and hand each
chunk to two row operations, ``stats`` (logsumexp, target logit, logit sum of the capped logits)
and ``grad`` (``dz``, written over the logits). :class:`TritonRows` runs them as the Triton row
kernels (:mod:`simpo_kernels.kernels.row_kernels`); :class:`TorchRows` is the same math in
PyTorch, for the ``torch`` backend and for float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..matmul import LinearHead


@dataclass
class TargetLayout:
    """Where the targets of a flattened ``[2B, T]`` batch are (row-major positions).

    A packed batch (:mod:`simpo_kernels.packed`) is described on its sequence grid: ``rows`` are
    its sequences and ``T`` the longest one, and :meth:`hidden_index` maps grid positions to the
    rows of the packed hidden states; for a padded batch the two coincide.

    Attributes:
        rows, T: batch shape (sequence grid). counts: host list, targets per row.
        targets: ``[rows * T]`` int64 targets with every ignored position set to -1.
        idx: ``[n_targets]`` sorted flat positions of the targets (rows stay contiguous).
        offsets: host list, ``offsets[r]`` = index into ``idx`` where row ``r``'s targets start.
        source: packed batches: ``[rows * T]`` the hidden-state row of each grid position; None.
        present: packed batches: ``[rows, T]`` bool, the grid positions a sequence has; None (all).
        num_positions: host int, the number of real positions (``rows * T`` when padded).
    """

    rows: int
    T: int
    counts: list
    targets: torch.Tensor
    idx: torch.Tensor
    offsets: list
    source: Optional[torch.Tensor] = None
    present: Optional[torch.Tensor] = None
    num_positions: int = 0

    @classmethod
    def build(cls, targets: torch.Tensor, counts: list, ignore_index: int, packed=None) -> "TargetLayout":
        """``targets [rows, T]`` (shifted labels); ``packed``: the batch's
        :class:`~simpo_kernels.packed.PackedLayout` (``targets`` then on its sequence grid), or None."""
        rows, T = targets.shape
        valid = (targets != ignore_index).reshape(-1)
        n = int(sum(counts))
        # Known size: no host sync (nonzero() would wait for the device to count).
        idx = torch.nonzero_static(valid, size=n).squeeze(1)
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + int(c))
        flat = torch.where(valid, targets.reshape(-1), -1)
        if packed is None:
            return cls(rows, T, list(counts), flat, idx, offsets, num_positions=rows * T)
        return cls(rows, T, list(counts), flat, idx, offsets, packed.source, packed.present,
                   int(sum(packed.lengths)))

    @property
    def num_targets(self) -> int:
        return self.offsets[-1]

    def hidden_index(self, pos: torch.Tensor) -> torch.Tensor:
        """Rows of the (flattened) hidden states that hold grid positions ``pos``."""
        return pos if self.source is None else self.source.index_select(0, pos)

    def others(self) -> torch.Tensor:
        """``[num_positions - n_targets]`` flat grid positions without a target (prompt, padding
        of a padded batch, each sequence's last position)."""
        free = self.targets < 0
        if self.present is not None:
            free = free & self.present.reshape(-1)
        return torch.nonzero_static(free, size=self.num_positions - self.num_targets).squeeze(1)


class TorchRows:
    """The row operations in PyTorch (any device, float32 or float64 logits)."""

    BACKEND = "torch"

    @staticmethod
    def _capped(z, bias, v0, softcap):
        x = z if bias is None else z + bias[v0:v0 + z.shape[1]].to(z.dtype)
        if softcap is None:
            return x, None
        t = torch.tanh(x / softcap)
        return t * softcap, t

    @staticmethod
    def _target_column(targets, v0: int, width: int):
        """Each row's target column in the chunk (0 when outside it) and whether it is inside."""
        local = targets - v0
        inside = (local >= 0) & (local < width)
        return torch.where(inside, local, 0), inside

    def stats(self, z, bias, targets, v0: int, softcap):
        """``[n, Vc]`` raw logits -> ``(lse, target logit, logit sum)`` of the capped chunk."""
        c, _ = self._capped(z, bias, v0, softcap)
        col, inside = self._target_column(targets, v0, z.shape[1])
        tgt = c.gather(1, col[:, None]).squeeze(1)
        return torch.logsumexp(c, dim=-1), torch.where(inside, tgt, 0.0), c.sum(-1)

    def grad(self, z, bias, targets, lse, g, v0: int, softcap, dtype):
        """``dz = g (onehot - p) (1 - tanh^2)`` of the chunk, in ``dtype``."""
        c, t = self._capped(z, bias, v0, softcap)
        dz = torch.exp(c - lse[:, None]).mul_(-g[:, None])
        col, inside = self._target_column(targets, v0, z.shape[1])
        dz[torch.arange(z.shape[0], device=z.device), col] += torch.where(inside, g, 0.0)
        if t is not None:
            dz.mul_(1.0 - t * t)
        return dz.to(dtype)


class TritonRows:
    """The row operations as the Triton row kernels (float32 logits; CUDA or the interpreter)."""

    BACKEND = "triton"

    def __init__(self, cfg):
        from ..kernels import row_kernels

        self._k, self.cfg = row_kernels, cfg

    def stats(self, z, bias, targets, v0: int, softcap):
        return self._k.row_stats(z, bias, targets, v0, softcap, self.cfg)

    def grad(self, z, bias, targets, lse, g, v0: int, softcap, dtype):
        return self._k.logprob_grad(z, bias, targets, lse.float(), g.float(), v0, softcap, dtype, self.cfg)


def vocab_chunk(n_rows: int, V: int, budget: int, elem_bytes: int = 4, multiple: int = 128) -> int:
    """Vocabulary columns per chunk so that ``n_rows x columns`` logits fit ``budget`` bytes.

    Rounded down to a multiple of ``multiple`` (tensor-core friendly slices of W) when above it; at
    least 16 columns, at most ``V``.
    """
    cols = budget // max(1, n_rows * elem_bytes)
    if cols >= multiple:
        cols -= cols % multiple
    return int(max(1, min(V, max(16, cols))))


def chunked_forward_stats(head: LinearHead, rows_op, h: torch.Tensor, bias, targets: torch.Tensor, softcap,
                          chunk: int):
    """Forward over vocabulary chunks: ``(lse, target logit, logit sum)`` of ``h``'s rows, merged
    online; one ``[n, chunk]`` logits buffer at a time."""
    V = head.w.shape[0]
    lse = tgt = sums = None
    for v0 in range(0, V, chunk):
        z = head.raw_logits(h, v0, v0 + chunk)
        l_c, t_c, s_c = rows_op.stats(z, bias, targets, v0, softcap)
        del z
        if lse is None:
            lse, tgt, sums = l_c, t_c, s_c
        else:
            lse, tgt, sums = torch.logaddexp(lse, l_c), tgt + t_c, sums + s_c
    return lse, tgt, sums


def other_logit_sums(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     positions: torch.Tensor, softcap, cdtype: torch.dtype,
                     forward_sums: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Logit sums ``[len(positions)]`` (``cdtype``) of the metric-only positions of ``hidden [N, H]``.

    Without softcap: ``h . sum_v W_v + sum_v b_v``, one pass over W and one GEMV, exact up to
    float32 summation order. With a softcap the sum needs every logit: ``forward_sums(h_rows)``
    (the schedule's own forward, no gradient) computes them.
    """
    with torch.no_grad():
        h = hidden.detach().index_select(0, positions)
        if softcap is None:
            w_sum = weight.detach().sum(0, dtype=cdtype)
            out = h.to(cdtype) @ w_sum
            if bias is not None:
                out += bias.detach().sum(dtype=cdtype)
            return out
        return forward_sums(h).to(cdtype)
