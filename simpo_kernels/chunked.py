"""The ``torch`` backend: a memory-lean PyTorch path that runs on any device.

It never holds more than one chunk of logits. Forward walks the tokens in chunks of
``chunk_size`` and keeps, per token, only the logsumexp, the target log-probability and the sum of
logits (for the metrics). Backward recomputes each chunk's logits and forms

    dL/dz_t = g_t * (onehot(y_t) - softmax(z_t)) * (1 - (z_t / s)^2)      (softcap s, capped z_t)

where ``g_t`` is the upstream gradient of token ``t``'s log-probability, then accumulates
``dH = dz W`` and ``dW = dz^T H`` (float32 accumulator across chunks, accumulated in place). The
API passes only target positions (target compaction), so backward visits every row it is given.

Precision: chunk logits are float32 for float16/bfloat16/float32 inputs (float64 for float64), so
float16 logits beyond 65504 are computed correctly (the ``eager`` reference, like ``nn.Linear``,
overflows there). On CUDA the 16-bit products run on tensor cores with float32 output
(``torch.mm(..., out_dtype=torch.float32)``); elsewhere, or where that is unavailable, the
16-bit weight is upcast once per pass (a ``[V, H]`` float32 copy; fine for the small models this
backend serves on CPU); see :mod:`simpo_kernels.matmul`. Nothing the caller passed in is ever
written to.
"""

from __future__ import annotations

from typing import Optional

import torch

from .eager import compute_dtype
from .matmul import LinearHead
from .validation import refuse_double_backward

BACKEND = "torch"

#: Bytes of per-chunk working memory the default chunk size aims for.
CHUNK_BUDGET_BYTES = 256 * 2**20

def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Every float dtype on every device."""


def default_chunk_size(vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Tokens per chunk so that one chunk's working set stays near :data:`CHUNK_BUDGET_BYTES`.

    Per token a chunk holds the logits in the input dtype, two float32 ``[V]`` buffers (capped
    logits / softcap derivative and the softmax-gradient) and a float32 ``[H]`` hidden-gradient
    row. At Gemma-2's V=256000 that is ~100 tokens (~2.5 MB each); at small vocabularies the
    chunk grows up to 8192 tokens.
    """
    in_bytes = torch.empty((), dtype=dtype).element_size()
    per_token = vocab_size * (in_bytes + 2 * 4) + hidden_size * 4
    c = max(1, CHUNK_BUDGET_BYTES // per_token)
    return int(min(8192, c if c < 8 else c - c % 8))


class ChunkedLinearLogprob(torch.autograd.Function):
    """(hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]``) -> (logps ``[N]``, logit sums ``[N]``)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, ignore_index, chunk_size):
        N = hidden.shape[0]
        cdtype = compute_dtype(hidden.dtype)
        head = LinearHead(weight, bias, cdtype)
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)
        logps = torch.empty(N, dtype=cdtype, device=hidden.device)
        lse = torch.empty(N, dtype=cdtype, device=hidden.device)
        sums = torch.empty(N, dtype=cdtype, device=hidden.device)
        for s in range(0, N, chunk_size):
            e = min(N, s + chunk_size)
            z, _ = head.logits(hidden[s:e], softcap)
            lse[s:e] = torch.logsumexp(z, dim=-1)
            sums[s:e] = z.sum(-1)
            logps[s:e] = z.gather(1, safe[s:e, None]).squeeze(1) - lse[s:e]
            del z
        logps = torch.where(valid, logps, 0.0)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.softcap, ctx.ignore_index, ctx.chunk_size = softcap, ignore_index, chunk_size
        ctx.mark_non_differentiable(sums)
        return logps, sums

    @staticmethod
    def backward(ctx, grad_logps, _grad_sums):
        refuse_double_backward(BACKEND)
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        with torch.autocast(hidden.device.type, enabled=False):
            return ChunkedLinearLogprob._backward(ctx, hidden, weight, bias, targets, lse, grad_logps)

    @staticmethod
    def _backward(ctx, hidden, weight, bias, targets, lse, grad_logps):
        softcap, C = ctx.softcap, ctx.chunk_size
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cdtype = lse.dtype
        d_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_h else None
        d_weight = torch.zeros(weight.shape, dtype=cdtype, device=weight.device) if need_w else None
        d_bias = torch.zeros(weight.shape[0], dtype=cdtype, device=weight.device) if need_b and bias is not None else None
        if grad_logps is None or not (need_h or need_w or need_b):
            return d_hidden, d_weight, d_bias, None, None, None, None

        head = LinearHead(weight, bias, cdtype)
        # The API hands this backend target positions only (target compaction), so every row is
        # visited; no nonzero() (a host sync) to find the rows that carry gradient.
        valid = targets != ctx.ignore_index
        g_all = torch.where(valid, grad_logps.to(cdtype), 0.0)
        safe = torch.where(valid, targets, 0)
        for s in range(0, hidden.shape[0], C):
            e = min(hidden.shape[0], s + C)
            h = hidden[s:e]
            g = g_all[s:e]
            z, t = head.logits(h, softcap)
            # dz = g * (onehot - softmax), built in place in the fresh logits buffer
            dz = z.sub_(lse[s:e, None]).exp_().mul_(-g[:, None])
            dz[torch.arange(e - s, device=dz.device), safe[s:e]] += g
            if t is not None:
                dz.mul_(t.mul_(t).neg_().add_(1.0))  # softcap derivative 1 - tanh^2
            del t
            if d_bias is not None:
                d_bias += dz.sum(0)
            dz_op = head.operand(dz)
            del dz
            if d_hidden is not None:
                d_hidden[s:e] = head.mm(dz_op, head.w)
            if d_weight is not None:
                head.addmm_(d_weight, dz_op.t(), head.operand(h))
            del dz_op
        if d_weight is not None:
            d_weight = d_weight.to(weight.dtype)
        if d_bias is not None:
            d_bias = d_bias.to(bias.dtype)
        return d_hidden, d_weight, d_bias, None, None, None, None


class ChunkedLogitsLogprob(torch.autograd.Function):
    """(logits ``[N, V]``) -> (logps ``[N]``, logit sums ``[N]``); grad written in the logits dtype."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, chunk_size):
        N = logits.shape[0]
        cdtype = compute_dtype(logits.dtype)
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)
        lse = torch.empty(N, dtype=cdtype, device=logits.device)
        sums = torch.empty(N, dtype=cdtype, device=logits.device)
        tgt = logits.gather(1, safe[:, None]).squeeze(1).to(cdtype)
        for s in range(0, N, chunk_size):
            z = logits[s:s + chunk_size].to(cdtype)  # may be the caller's storage: read only
            lse[s:s + chunk_size] = torch.logsumexp(z, dim=-1)
            sums[s:s + chunk_size] = z.sum(-1)
            del z
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index, ctx.chunk_size = ignore_index, chunk_size
        ctx.mark_non_differentiable(sums)
        return torch.where(valid, tgt - lse, 0.0), sums

    @staticmethod
    def backward(ctx, grad_logps, _grad_sums):
        refuse_double_backward(BACKEND)
        logits, targets, lse = ctx.saved_tensors
        if grad_logps is None or not ctx.needs_input_grad[0]:
            return None, None, None, None
        C = ctx.chunk_size
        valid = targets != ctx.ignore_index
        g_all = torch.where(valid, grad_logps.to(lse.dtype), 0.0)
        safe = torch.where(valid, targets, 0)
        d_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
        for s in range(0, logits.shape[0], C):
            g = g_all[s:s + C]
            # Out of place first: ``.to()`` returns the caller's own storage when the dtype already
            # matches, and the logits must survive (other losses, retain_graph) unchanged.
            dz = torch.sub(logits[s:s + C].to(lse.dtype), lse[s:s + C, None]).exp_().mul_(-g[:, None])
            dz[torch.arange(dz.shape[0], device=dz.device), safe[s:s + C]] += g
            d_logits[s:s + C] = dz
            del dz
        return d_logits, None, None, None


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    *, softcap: Optional[float], ignore_index: int, chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, H]``, ``[V, H]``, ``[V]``, ``[N]`` -> (logps ``[N]``, logit sums ``[N]``), chunked."""
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0], weight.shape[1], hidden.dtype)
    return ChunkedLinearLogprob.apply(hidden, weight, bias, targets, softcap, ignore_index, int(chunk_size))


def token_logprobs_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int, chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, V]`` logits, ``[N]`` targets -> (logps ``[N]``, logit sums ``[N]``), chunked."""
    if chunk_size is None:
        chunk_size = default_chunk_size(logits.shape[1], 0, logits.dtype)
    return ChunkedLogitsLogprob.apply(logits, targets, ignore_index, int(chunk_size))
