"""Backward pass from hidden states: recompute logit tiles, accumulate dH, dW and dbias.

For token ``n`` with upstream gradient ``g_n = dL/dlogp_n`` the gradient of its logits is

    dz[n, v] = g_n * (onehot(y_n)[v] - exp(z[n, v] - lse_n)) * (1 - tanh(z_raw[n, v] / s)^2)

(the last factor only with a softcap ``s``). The kernel never stores ``dz``: each program
recomputes one ``[BLOCK_N, BLOCK_V]`` logit tile with the forward's helper (same formula, float32
accumulation; equal to the forward's logits to float32 rounding, not bit for bit: see
:func:`.lse_forward.logit_tile`), forms ``dz`` in registers, and immediately contracts it:

    dH[rows, :] += dz @ W[v_tile, :]          dW[v_tile, :] += dz^T @ H[rows, :]

one ``BLOCK_H`` slice at a time, with float32 atomic adds into float32 accumulators (the host
casts them to the parameter dtype at the end). Many programs add into the same dH rows (one per
vocabulary tile) and dW rows (one per token block), hence the atomics; the order of the adds is
not fixed, so results are reproducible only to float32 rounding. The adds are ``relaxed``: each
is commutative and nothing reads an accumulator before the kernel ends, so no ordering is needed,
and the default ``acq_rel`` costs a ``MEMBAR.ALL.GPU`` and an L1 invalidation (``CCTL.IVALL``)
around every atomic on sm_90; relaxed adds compile to plain ``REDG`` reductions.
(``KernelConfig.atomic_sem="acq_rel"`` selects the default semantics, for the campaign's
microbenchmark of that cost; the compile gate refuses it.)

Raster: 1-D grid in groups of ``GROUP_N`` token blocks times all vocabulary tiles, token block
fastest (:func:`.lse_forward.grouped_pid`): the programs in flight touch ``GROUP_N`` blocks of
hidden rows and of dH and a run of consecutive weight tiles, which stay in L2.

Only tokens with a target and a non-zero ``g`` are launched: the host passes their row indices
(``rows_ptr``), so prompt and padding positions cost nothing. ``dz`` is cast to the input dtype
before the two products (tensor-core operands for bf16/fp16, as the chunked torch backend does);
float32 inputs stay float32.

Gradient filtering (``FILTER``, off by default): once ``dz`` of a tile is known, if no target
falls in the tile and every softmax probability in it is below ``filter_eps``, then every entry
of ``dz`` is below ``|g| * filter_eps`` and the tile's two products (2/3 of the backward FLOPs of
the tile) are skipped. This is the idea of Apple's Cut Cross-Entropy; it changes the gradient
by at most ``filter_eps * |g|`` per skipped entry, so it is an approximation and only an option.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import KernelConfig, Launch
from .lse_forward import grouped_pid, logit_tile


@triton.heuristics({
    "HAS_BIAS": lambda args: args["b_ptr"] is not None,
    "HAS_SOFTCAP": lambda args: args["softcap"] is not None,
    "COMPUTE_DH": lambda args: args["dh_ptr"] is not None,
    "COMPUTE_DW": lambda args: args["dw_ptr"] is not None,
    "COMPUTE_DB": lambda args: args["db_ptr"] is not None,
    "FILTER": lambda args: args["filter_eps"] is not None,
})
@triton.jit
def _logprob_backward_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, tgt_ptr, lse_ptr, g_ptr,
    dh_ptr, dw_ptr, db_ptr,  # float32 accumulators [N, H], [V, H], [V] (or None)
    softcap, filter_eps, M, V, H,
    stride_h, stride_w, stride_dh, stride_dw,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    FILTER: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ATOMIC_SEM: tl.constexpr,
):
    pid_n, pid_v = grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)

    offs_m = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_m < M
    rows = tl.load(rows_ptr + offs_m, mask=mask_n, other=0)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V

    z, t = logit_tile(h_ptr, w_ptr, b_ptr, rows, mask_n, offs_v, mask_v, softcap, H,
                      stride_h, stride_w, HAS_BIAS, HAS_SOFTCAP,
                      BLOCK_N, BLOCK_V, BLOCK_H, INPUT_PRECISION)
    lse = tl.load(lse_ptr + rows, mask=mask_n, other=0.0)
    g = tl.load(g_ptr + rows, mask=mask_n, other=0.0)
    target = tl.load(tgt_ptr + rows, mask=mask_n, other=-1)

    valid = mask_n[:, None] & mask_v[None, :]
    p = tl.where(valid, tl.exp(z - lse[:, None]), 0.0)
    hit = (offs_v[None, :] == target[:, None]) & valid
    dz = g[:, None] * (tl.where(hit, 1.0, 0.0) - p)
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)

    do_tile = True
    if FILTER:
        do_tile = (tl.max(tl.max(p, axis=1), axis=0) >= filter_eps) | (tl.sum(hit.to(tl.int32)) > 0)
    if do_tile:
        if COMPUTE_DB:
            tl.atomic_add(db_ptr + offs_v, tl.sum(dz, axis=0), mask=mask_v, sem=ATOMIC_SEM)
        dz_in = dz.to(h_ptr.dtype.element_ty)
        offs_h = tl.arange(0, BLOCK_H)
        for k in range(0, H, BLOCK_H):
            kh = k + offs_h
            mask_h = kh < H
            if COMPUTE_DH:
                w = tl.load(w_ptr + offs_v[:, None].to(tl.int64) * stride_w + kh[None, :],
                            mask=mask_v[:, None] & mask_h[None, :], other=0.0)
                dh = tl.dot(dz_in, w, input_precision=INPUT_PRECISION)
                tl.atomic_add(dh_ptr + rows[:, None].to(tl.int64) * stride_dh + kh[None, :], dh,
                              mask=mask_n[:, None] & mask_h[None, :], sem=ATOMIC_SEM)
            if COMPUTE_DW:
                h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + kh[None, :],
                            mask=mask_n[:, None] & mask_h[None, :], other=0.0)
                dw = tl.dot(tl.trans(dz_in), h, input_precision=INPUT_PRECISION)
                tl.atomic_add(dw_ptr + offs_v[:, None].to(tl.int64) * stride_dw + kh[None, :], dw,
                              mask=mask_v[:, None] & mask_h[None, :], sem=ATOMIC_SEM)


def plan_logprob_backward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], rows: torch.Tensor,
    targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, softcap: Optional[float], cfg: KernelConfig,
    *, need_dh: bool, need_dw: bool, need_db: bool, filter_eps: Optional[float], input_precision: Optional[str],
) -> tuple[Launch, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The backward launch and its zeroed float32 accumulators ``(dH [N, H], dW [V, H], dbias [V])``."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    dh = torch.zeros((N, H), dtype=torch.float32, device=dev) if need_dh else None
    dw = torch.zeros((V, H), dtype=torch.float32, device=dev) if need_dw else None
    db = torch.zeros((V,), dtype=torch.float32, device=dev) if need_db and bias is not None else None
    M = rows.numel()
    launch = Launch(
        _logprob_backward_kernel, (triton.cdiv(M, cfg.bwd_block_n) * triton.cdiv(V, cfg.bwd_block_v),),
        dict(h_ptr=hidden, w_ptr=weight, b_ptr=bias, rows_ptr=rows, tgt_ptr=targets, lse_ptr=lse, g_ptr=grad,
             dh_ptr=dh, dw_ptr=dw, db_ptr=db, softcap=softcap, filter_eps=filter_eps, M=M, V=V, H=H,
             stride_h=hidden.stride(0), stride_w=weight.stride(0),
             stride_dh=H if dh is None else dh.stride(0), stride_dw=H if dw is None else dw.stride(0),
             BLOCK_N=cfg.bwd_block_n, BLOCK_V=cfg.bwd_block_v, BLOCK_H=cfg.bwd_block_h, GROUP_N=cfg.bwd_group_n,
             INPUT_PRECISION=input_precision, ATOMIC_SEM=cfg.atomic_sem),
        dict(num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages))
    return launch, dh, dw, db


def logprob_backward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], rows: torch.Tensor,
    targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, softcap: Optional[float], cfg: KernelConfig,
    *, need_dh: bool, need_dw: bool, need_db: bool, filter_eps: Optional[float], input_precision: Optional[str],
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Run the backward kernel over the tokens ``rows`` (``[M]`` int64 indices into ``hidden``).

    Args:
        hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` or None, targets ``[N]`` int64,
        lse ``[N]`` float32 (from the forward), grad ``[N]`` float32 upstream ``dL/dlogp``.

    Returns:
        float32 ``(dH [N, H], dW [V, H], dbias [V])`` accumulators, each None when not requested.
        Rows of dH outside ``rows`` are 0.
    """
    launch, dh, dw, db = plan_logprob_backward(
        hidden, weight, bias, rows, targets, lse, grad, softcap, cfg, need_dh=need_dh, need_dw=need_dw,
        need_db=need_db, filter_eps=filter_eps, input_precision=input_precision)
    if rows.numel() and (dh is not None or dw is not None or db is not None):
        launch.run()
    return dh, dw, db
