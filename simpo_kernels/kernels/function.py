"""Autograd glue and launch configuration for the Triton backend.

Two ``torch.autograd.Function`` classes wrap the kernels:

* :class:`LinearLogprobFunction`: ``(hidden [N, H], weight [V, H], bias [V] | None)`` ->
  ``(logps [N], logit_sums [N])`` via :mod:`.lse_forward` and :mod:`.logprob_backward`.
* :class:`LogitsLogprobFunction`: ``(logits [N, V])`` -> the same two outputs via
  :mod:`.row_kernels`.

The SimPO head (:mod:`simpo_kernels.objective`) is ordinary autograd on ``[2B, T]`` tensors; the
per-token upstream gradient ``g = dL/dlogps`` it hands to ``backward`` is the only thing the
kernels need from it. ``logit_sums`` feeds the detached ``logits/*`` metrics only and is marked
non-differentiable.

Precision: the kernels accumulate in float32 and return float32 ``logps``. Float32 inputs use
IEEE float32 ``tl.dot`` unless ``torch.backends.cuda.matmul.allow_tf32`` is set (then TF32, the
same choice ``F.linear`` makes). Float64 inputs are rejected with a TypeError: Triton has no
float64 tensor-core path worth having, and the ``torch``/``eager`` backends compute in float64.
Bfloat16 under the Triton interpreter (``TRITON_INTERPRET=1``) is rejected with a TypeError too:
the interpreter multiplies the raw bit patterns of bf16 ``tl.dot`` operands (triton issue 11584)
and would return garbage.

Not supported, and refused rather than computed wrongly: double backward (``create_graph=True``
raises a RuntimeError naming ``backend='eager'``). Under ``torch.compile`` the two entry points
run outside the graph (``torch.compiler.disable``): dynamo cannot trace a kernel launch through
the interpreter, and on a GPU the kernels gain nothing from being traced.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..validation import refuse_double_backward
from . import row_kernels, logprob_backward, lse_forward
from .launch import (InterpreterUnavailable, input_precision, interpreter_problem, interpreting, make_config,
                     resident_programs)

BACKEND = "triton"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_dtype(dtype: torch.dtype, device: Optional[torch.device] = None, name: str = "inputs") -> None:
    """TypeError unless the kernels compute ``dtype`` correctly where they run."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"backend='triton' supports float16/bfloat16/float32 {name}, got {dtype}; "
                        f"use backend='torch' or backend='eager' for float64")
    if interpreting() and (problem := interpreter_problem()):
        raise InterpreterUnavailable(f"backend='triton' cannot run here: {problem}")
    if dtype == torch.bfloat16 and interpreting():
        raise TypeError(
            f"backend='triton' cannot compute bfloat16 {name} in the Triton interpreter "
            f"(TRITON_INTERPRET=1): the interpreter multiplies the raw bit patterns of bf16 tl.dot "
            f"operands (triton issue 11584). Use float32 or float16 here (under autocast: "
            f"torch.autocast('cpu', dtype=torch.float16)), backend='torch', or a CUDA GPU.")


def _unit_stride(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The kernels index rows by stride and columns by 1; copy only when columns are strided."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def filter_threshold(grad_filter: Union[bool, float], dtype: torch.dtype) -> Optional[float]:
    """``grad_filter`` -> the probability below which a backward tile may be skipped, or None.

    ``False``: exact (no filtering). ``True``: the unit roundoff of the input dtype
    (``finfo.eps / 2``: 2^-9 for bf16, 2^-11 for fp16, 2^-24 for fp32): a skipped softmax entry is
    below the rounding unit of the token's target-column gradient. A float in (0, 1): that threshold.
    """
    if grad_filter is False or grad_filter is None:
        return None
    if grad_filter is True:
        return torch.finfo(dtype).eps / 2
    if isinstance(grad_filter, (int, float)) and 0.0 < float(grad_filter) < 1.0:
        return float(grad_filter)
    raise ValueError(f"grad_filter must be a bool or a float in (0, 1), got {grad_filter!r}")


class LinearLogprobFunction(torch.autograd.Function):
    """``(hidden [N, H], weight [V, H], bias [V] | None, targets [N])`` -> ``(logps [N], logit_sums [N])``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, ignore_index, cfg, filter_eps):
        hidden, weight, bias = _unit_stride(hidden), _unit_stride(weight), _unit_stride(bias)
        targets = targets.contiguous()
        lse, tgt, sums = lse_forward.lse_forward(
            hidden, weight, bias, targets, softcap, cfg, input_precision=input_precision(hidden.dtype),
            resident=resident_programs(hidden.device, cfg.ctas_per_sm))
        valid = targets != ignore_index
        logps = torch.where(valid, tgt - lse, 0.0)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.softcap, ctx.ignore_index, ctx.cfg, ctx.filter_eps = softcap, ignore_index, cfg, filter_eps
        ctx.mark_non_differentiable(sums)
        return logps, sums

    @staticmethod
    def backward(ctx, grad_logps, _grad_sums):
        refuse_double_backward(BACKEND)
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        nones = (None,) * 5
        if grad_logps is None or not (need_h or need_w or need_b):
            return (None, None, None) + nones
        g = torch.where(targets != ctx.ignore_index, grad_logps.to(torch.float32), 0.0).contiguous()
        # The API hands this schedule target positions only (target compaction), so every row is
        # launched; no nonzero() (a host sync) to drop rows without gradient.
        rows = torch.arange(g.shape[0], device=g.device)
        dh, dw, db = logprob_backward.logprob_backward(
            hidden, weight, bias, rows, targets, lse, g, ctx.softcap, ctx.cfg,
            need_dh=need_h, need_dw=need_w, need_db=need_b and bias is not None,
            filter_eps=ctx.filter_eps, input_precision=input_precision(hidden.dtype))
        dh = None if dh is None else dh.to(hidden.dtype)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return (dh, dw, db) + nones


class LogitsLogprobFunction(torch.autograd.Function):
    """``(logits [N, V], targets [N])`` -> ``(logps [N], logit_sums [N])``; grad in the logits dtype."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, cfg):
        logits = _unit_stride(logits)
        targets = targets.contiguous()
        lse, tgt, sums = row_kernels.row_stats(logits, None, targets, 0, None, cfg)
        valid = targets != ignore_index
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index, ctx.cfg = ignore_index, cfg
        ctx.mark_non_differentiable(sums)
        return torch.where(valid, tgt - lse, 0.0), sums

    @staticmethod
    def backward(ctx, grad_logps, _grad_sums):
        refuse_double_backward(BACKEND)
        if grad_logps is None or not ctx.needs_input_grad[0]:
            return None, None, None, None
        logits, targets, lse = ctx.saved_tensors
        g = torch.where(targets != ctx.ignore_index, grad_logps.to(torch.float32), 0.0).contiguous()
        d_logits = row_kernels.logits_backward(logits, targets, lse, g, ctx.cfg)
        return d_logits, None, None, None


@torch.compiler.disable
def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    *, softcap: Optional[float], ignore_index: int, grad_filter: Union[bool, float] = False, **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``[N, H]`` x ``[V, H]`` -> (logps ``[N]``, logit sums ``[N]``), both float32.

    Args:
        hidden: ``[N, H]`` float16/bfloat16/float32 (float64 raises TypeError: use
            backend='torch' or 'eager').
        weight: ``[V, H]``, same dtype. bias: ``[V]`` or None. targets: ``[N]`` int64.
        softcap: Gemma-2 final-logit softcap or None. ignore_index: targets to skip (logp 0).
        grad_filter: see :func:`filter_threshold`; False (default) is exact.
        options: :class:`KernelConfig` fields (block sizes, splits, warps) to override defaults.
    """
    check_dtype(hidden.dtype, hidden.device, "hidden states")
    cfg = make_config(hidden.device, hidden.dtype, options, schedule="fused",
                      shape=(hidden.shape[0], hidden.shape[1], weight.shape[0]))
    eps = filter_threshold(grad_filter, hidden.dtype)
    return LinearLogprobFunction.apply(hidden, weight, bias, targets.long(),
                                       None if softcap is None else float(softcap),
                                       int(ignore_index), cfg, eps)


@torch.compiler.disable
def token_logprobs_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int, **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, V]`` float16/bfloat16/float32 logits, ``[N]`` targets -> float32 (logps ``[N]``, sums ``[N]``)."""
    check_dtype(logits.dtype, logits.device, "logits")
    cfg = make_config(logits.device, logits.dtype, options)
    return LogitsLogprobFunction.apply(logits, targets.long(), int(ignore_index), cfg)
