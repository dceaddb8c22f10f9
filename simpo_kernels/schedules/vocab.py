"""The ``vocab`` schedule: exact and lean, over vocabulary chunks, with no atomics.

Forward, per vocabulary chunk ``[v0, v1)`` of the ``n`` target rows:

    z = H W[v0:v1]^T                 (matmul, float32 out)
    lse, target logit, logit sum     (row kernel on z; chunks merge online: logaddexp, +)

Backward, per chunk: recompute ``z``, form ``dz = g (onehot - p) (1 - tanh^2)`` over it in place
(row kernel, matmul-operand dtype), then

    dW[v0:v1] = dz^T H               written once, in the weight's dtype (no [V, H] float32
                                     accumulator, no atomics)
    dH       += dz W[v0:v1]          float32 accumulator [n, H]

FLOPs: ``2nHV`` forward + ``6nHV`` backward = ``8nHV`` (the recompute costs ``2nHV``). Scratch: one
``[n, chunk]`` float32 logits buffer (``memory_budget`` bytes sets ``chunk``; see
:func:`~simpo_kernels.schedules.common.vocab_chunk`) plus the ``[n, H]`` float32 dH accumulator.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..eager import compute_dtype
from ..matmul import LinearHead
from ..validation import refuse_double_backward
from .common import chunked_forward_stats, vocab_chunk


class VocabLinearLogprob(torch.autograd.Function):
    """``(hidden [n, H], weight [V, H], bias [V] | None, targets [n])`` -> ``(logps [n], logit_sums [n])``.

    ``targets`` are ids in ``[0, V)``, or -1 for a row whose log-probability is not wanted (its
    logp is 0 and it gets no gradient).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, rows_op, budget):
        cdtype = compute_dtype(hidden.dtype)
        head = LinearHead(weight, bias, cdtype)
        chunk = vocab_chunk(hidden.shape[0], weight.shape[0], budget)
        lse, tgt, sums = chunked_forward_stats(head, rows_op, hidden, bias, targets, softcap, chunk)
        logps = torch.where(targets >= 0, tgt - lse, 0.0).to(cdtype)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.softcap, ctx.rows_op, ctx.chunk = softcap, rows_op, chunk
        ctx.mark_non_differentiable(sums)
        return logps, sums.to(cdtype)

    @staticmethod
    def backward(ctx, grad_logps, _grad_sums):
        refuse_double_backward(ctx.rows_op.BACKEND)
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        nones = (None,) * 4
        if grad_logps is None or not (need_h or need_w or need_b):
            return (None, None, None) + nones
        with torch.autocast(hidden.device.type, enabled=False):
            dh, dw, db = _backward(hidden, weight, bias, targets, lse, grad_logps, ctx.softcap, ctx.rows_op,
                                   ctx.chunk, need_h, need_w, need_b and bias is not None)
        return (dh, dw, db) + nones


def _backward(hidden, weight, bias, targets, lse, grad_logps, softcap, rows_op, chunk, need_h, need_w, need_b):
    cdtype = compute_dtype(hidden.dtype)
    head = LinearHead(weight, bias, cdtype)
    g = torch.where(targets >= 0, grad_logps.to(cdtype), 0.0)
    V = weight.shape[0]
    d_h = torch.zeros(hidden.shape, dtype=cdtype, device=hidden.device) if need_h else None
    d_w = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else None
    d_b = torch.empty(V, dtype=cdtype, device=weight.device) if need_b else None
    h_op = head.operand(hidden)
    for v0 in range(0, V, chunk):
        v1 = min(V, v0 + chunk)
        z = head.mm(h_op, head.w[v0:v1].t())
        dz = rows_op.grad(z, bias, targets, lse, g, v0, softcap, head.grad_dtype)
        del z  # dz reuses its storage
        if d_b is not None:
            d_b[v0:v1] = dz.sum(0, dtype=cdtype)
        dz_op = head.operand(dz)
        if d_w is not None:
            if dz_op.dtype == d_w.dtype:
                # Written once, in the weight's dtype: cuBLAS accumulates in float32 and rounds once.
                torch.mm(dz_op.t(), h_op, out=d_w[v0:v1])
            else:
                d_w[v0:v1] = head.mm(dz_op.t(), h_op)
        if d_h is not None:
            head.addmm_(d_h, dz_op, head.w[v0:v1])
        del dz, dz_op
    return (None if d_h is None else d_h.to(hidden.dtype), d_w,
            None if d_b is None else d_b.to(bias.dtype))


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                   *, softcap: Optional[float], rows_op, memory_budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, H]`` target rows -> (logps ``[n]``, logit sums ``[n]``) over vocabulary chunks."""
    return VocabLinearLogprob.apply(hidden, weight, bias, targets, softcap, rows_op, int(memory_budget))
