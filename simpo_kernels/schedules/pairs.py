"""The ``pairs`` schedule: exact gradients formed in the forward, a chunk of whole pairs at a time.

Every paired loss's gradient is pair-local: a token's ``g_t = dL/dl_t`` depends only on its own
pair's two per-sequence sums and counts and the pair's reference values (plus the NLL term, whose
normaliser the labels give), see
:func:`simpo_kernels.objective.sequence_logp_grads`. So once a chunk's logits exist, everything
its gradient needs is known, and they are used once, never recomputed. Per chunk of whole pairs
(as many as ``memory_budget`` bytes of float32 logits allow, at least one), target rows only:

    z = H_c W^T                                   matmul, float32 out          2 n_c H V
    lse, target logit, logit sum                  row kernel on z
    s = segment sums of logp; g = dL/ds           the loss's head, on 2b numbers
    dz = g (onehot - p) (1 - tanh^2)              row kernel, written over z in the operand dtype
    dH[rows] = dz W                               matmul, float32 out          2 n_c H V
    dW      += dz^T H_c                           matmul, float32 accumulator  2 n_c H V

``6nHV`` FLOPs in all (the floor), plus a few passes over one chunk's logits; no atomics. Scratch:
one chunk of float32 logits, the ``[V, H]`` float32 dW accumulator (when the weight is trained)
and the stored gradients until backward.

Backward only scales the stored gradients by the upstream scalar. The schedule therefore serves
``loss`` only: a backward that reaches ``losses``, ``chosen_logps``, ``rejected_logps`` or
``sft_loss`` is refused with a RuntimeError (use ``schedule="vocab"`` or ``"fused"`` for those), and
so is a second backward through the same forward (the scaling is done in place, to avoid a second
``[V, H]`` copy).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..eager import compute_dtype
from ..matmul import LinearHead
from ..objective import Objective, SimPOOutput, preference_objective, sequence_logp_grads
from ..validation import refuse_double_backward
from .common import TargetLayout

_OUTPUTS = ("loss", "losses", "chosen_logps", "rejected_logps", "sft_loss", "chosen_rewards", "rejected_rewards",
            "chosen_logits_mean", "rejected_logits_mean")
_DIFFERENTIABLE = 5  # the first five outputs carry autograd history


def pair_chunks(layout: TargetLayout, budget: int, row_bytes: int) -> list[tuple[int, int]]:
    """``[(p0, p1), ...]``: consecutive pairs whose target rows' logits (``row_bytes`` per row) fit
    ``budget`` bytes together; a single pair that alone exceeds it gets a chunk of its own."""
    B = layout.rows // 2
    chunks, p0, used = [], 0, 0
    for p in range(B):
        need = (layout.counts[p] + layout.counts[B + p]) * row_bytes
        if p > p0 and used + need > budget:
            chunks.append((p0, p))
            p0, used = p, 0
        used += need
    chunks.append((p0, B))
    return chunks


class PairsLoss(torch.autograd.Function):
    """``(hidden [N, H], weight [V, H], bias [V] | None)`` -> the loss's outputs (see :data:`_OUTPUTS`)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, layout, softcap, rows_op, budget, objective, ignore_index,
                logit_metrics, other_sums, finite, needs, holder):
        ctx.set_materialize_grads(False)
        ctx.backend = rows_op.BACKEND
        need_h, need_w, need_b = needs
        need_b = need_b and bias is not None
        N, H = hidden.shape
        V = weight.shape[0]
        B = layout.rows // 2
        T = layout.T
        cdtype = compute_dtype(hidden.dtype)
        head = LinearHead(weight, bias, cdtype)
        dev = hidden.device
        chosen_tokens = layout.offsets[B]  # the NLL normaliser: targets of all chosen rows
        # With nll_labels the computed positions are the union of the targets and the NLL's
        # positions: sequence sums take the targets, the NLL term its own positions.
        split = objective.nll_mask is not None
        if split:
            seq_flags = (targets != ignore_index).reshape(-1)
            nll_flags = objective.nll_mask.reshape(-1)

        grid = layout.rows * T  # positions of the (sequence) grid the objective reduces over
        logps = torch.zeros(grid, dtype=cdtype, device=dev)
        sums = torch.zeros(grid, dtype=cdtype, device=dev) if other_sums is None else other_sums.to(cdtype).clone()
        d_h = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_h else None
        d_w = torch.zeros(weight.shape, dtype=cdtype, device=dev) if need_w else None
        d_b = torch.zeros(V, dtype=cdtype, device=dev) if need_b else None
        any_grad = need_h or need_w or need_b
        elem = torch.empty((), dtype=cdtype).element_size()

        for p0, p1 in pair_chunks(layout, budget, V * elem):
            b = p1 - p0
            o = layout.offsets
            pos = torch.cat([layout.idx[o[p0]:o[p1]], layout.idx[o[B + p0]:o[B + p1]]])
            # Sequence of each row within the chunk: chosen p0..p1-1 -> 0..b-1, rejected -> b..2b-1.
            r = torch.div(pos, T, rounding_mode="floor")
            seq = torch.where(r < B, r - p0, r - B - p0 + b)
            tgt = layout.targets.index_select(0, pos)
            rows_h = layout.hidden_index(pos)  # the same as pos unless the batch is packed
            h = head.operand(hidden.index_select(0, rows_h))
            z = head.mm(h, head.w.t())
            lse, t_logit, row_sums = rows_op.stats(z, bias, tgt, 0, softcap)
            logp = (t_logit - lse).to(cdtype)
            logps.index_copy_(0, pos, logp)
            sums.index_copy_(0, pos, row_sums.to(cdtype))
            if not any_grad:
                continue
            if split:
                in_seq = seq_flags.index_select(0, pos).to(cdtype)
                in_nll = nll_flags.index_select(0, pos).to(cdtype)
                seq_sum = torch.zeros(2 * b, dtype=cdtype, device=dev).index_add_(0, seq, logp * in_seq)
                seq_len = torch.zeros(2 * b, dtype=cdtype, device=dev).index_add_(0, seq, in_seq)
            else:
                seq_sum = torch.zeros(2 * b, dtype=cdtype, device=dev).index_add_(0, seq, logp)
                seq_len = torch.zeros(2 * b, dtype=cdtype, device=dev).index_add_(0, seq, torch.ones_like(logp))
            g_c, g_r = sequence_logp_grads(seq_sum[:b], seq_len[:b], seq_sum[b:], seq_len[b:], num_pairs=B,
                                           chosen_tokens=None if split else chosen_tokens, objective=objective,
                                           p0=p0)
            g = torch.cat([g_c, g_r]).index_select(0, seq)
            if split:
                g = g * in_seq - in_nll * (objective.loss.nll_weight / objective.nll_tokens)
            dz = rows_op.grad(z, bias, tgt, lse, g, 0, softcap, head.grad_dtype)
            del z  # dz reuses its storage
            if d_b is not None:
                d_b += dz.sum(0, dtype=cdtype)
            dz = head.operand(dz)
            if d_h is not None:
                d_h.index_copy_(0, rows_h, head.mm(dz, head.w).to(hidden.dtype))
            if d_w is not None:
                head.addmm_(d_w, dz.t(), h)
            del dz, h

        out = preference_objective(logps.view(layout.rows, T), targets, sums.view(layout.rows, T), V,
                                   objective=objective, ignore_index=ignore_index, inputs_finite=finite,
                                   logit_metrics=logit_metrics, present=layout.present)
        holder["extra"] = out.extra  # scalar metrics (detached), returned beside the outputs
        ctx.grads = [d_h, None if d_w is None else d_w.to(weight.dtype), None if d_b is None else d_b.to(bias.dtype)]
        ctx.used = False
        values = [getattr(out, k) for k in _OUTPUTS]
        if values[4] is None:  # no SFT term: a placeholder keeps the output arity fixed
            values[4] = torch.zeros((), dtype=cdtype, device=dev)
        ctx.mark_non_differentiable(*[v for v in values[_DIFFERENTIABLE:] if v is not None])
        return tuple(values)

    @staticmethod
    def backward(ctx, grad_loss, *other_grads):
        refuse_double_backward(ctx.backend)
        names = [n for n, g in zip(_OUTPUTS[1:_DIFFERENTIABLE], other_grads) if g is not None]
        if names:
            raise RuntimeError(
                f"schedule='pairs' forms the gradient of `loss` during the forward and can only "
                f"backpropagate `loss`; this backward also reaches {names}. Use schedule='vocab' or "
                f"schedule='fused' (or backend='torch') to differentiate those.")
        nones = (None,) * 12
        if grad_loss is None:
            return (None, None, None) + nones
        if ctx.used:
            raise RuntimeError(
                "schedule='pairs' scales its stored gradients in place and can run backward once per "
                "forward (retain_graph=True and a second backward is not supported); use "
                "schedule='vocab' or 'fused' for that.")
        ctx.used = True
        grads = []
        for gr in ctx.grads:
            grads.append(None if gr is None else gr.mul_(grad_loss.to(gr.dtype)))
        ctx.grads = None
        return tuple(grads) + nones


def loss_pairs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
               layout: TargetLayout, *, softcap: Optional[float], rows_op, memory_budget: int, objective: Objective,
               ignore_index: int, logit_metrics: str, other_sums: Optional[torch.Tensor],
               finite: bool) -> SimPOOutput:
    """The whole loss of a ``[2B, T]`` batch by the pairs schedule.

    Args:
        hidden: ``[2B * T, H]``. weight ``[V, H]``, bias ``[V]`` or None. targets: ``[2B, T]`` shifted
            labels. layout: their :class:`TargetLayout`. objective: the loss and its reference values.
        other_sums: ``[2B * T]`` logit sums already computed for the metric-only positions, or None.
    """
    grad = torch.is_grad_enabled()
    needs = tuple(bool(grad and t is not None and t.requires_grad) for t in (hidden, weight, bias))
    holder = {}
    values = PairsLoss.apply(hidden, weight, bias, targets, layout, softcap, rows_op, int(memory_budget),
                             objective, ignore_index, logit_metrics, other_sums, finite, needs, holder)
    out = dict(zip(_OUTPUTS, values))
    if objective.loss.nll_weight <= 0.0:
        out["sft_loss"] = None
    return SimPOOutput(**out, extra=holder.get("extra", {}), nll_metric=objective.loss.nll_metric)
