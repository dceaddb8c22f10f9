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
not fixed, so results are reproducible only to float32 rounding.

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

from .lse_forward import logit_tile


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
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # Token blocks vary fastest: programs that run together share one weight tile through L2
    # and add into the same dW rows close in time.
    num_n_blocks = tl.cdiv(M, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % num_n_blocks
    pid_v = pid // num_n_blocks

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
            tl.atomic_add(db_ptr + offs_v, tl.sum(dz, axis=0), mask=mask_v)
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
                              mask=mask_n[:, None] & mask_h[None, :])
            if COMPUTE_DW:
                h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + kh[None, :],
                            mask=mask_n[:, None] & mask_h[None, :], other=0.0)
                dw = tl.dot(tl.trans(dz_in), h, input_precision=INPUT_PRECISION)
                tl.atomic_add(dw_ptr + offs_v[:, None].to(tl.int64) * stride_dw + kh[None, :], dw,
                              mask=mask_v[:, None] & mask_h[None, :])


def logprob_backward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], rows: torch.Tensor,
    targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, softcap: Optional[float],
    *, need_dh: bool, need_dw: bool, need_db: bool, filter_eps: Optional[float],
    block_n: int, block_v: int, block_h: int, input_precision: str,
    num_warps: int = 4, num_stages: int = 2,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the backward kernel over the tokens ``rows`` (``[M]`` int64 indices into ``hidden``).

    Args:
        hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` or None, targets ``[N]`` int64,
        lse ``[N]`` float32 (from the forward), grad ``[N]`` float32 upstream ``dL/dlogp``.

    Returns:
        float32 ``(dH [N, H], dW [V, H], dbias [V])`` accumulators, each None when not requested.
        Rows of dH outside ``rows`` are 0.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    dh = torch.zeros((N, H), dtype=torch.float32, device=dev) if need_dh else None
    dw = torch.zeros((V, H), dtype=torch.float32, device=dev) if need_dw else None
    db = torch.zeros((V,), dtype=torch.float32, device=dev) if need_db and bias is not None else None
    M = rows.numel()
    if M == 0 or not (need_dh or need_dw or db is not None):
        return dh, dw, db
    grid = (triton.cdiv(M, block_n) * triton.cdiv(V, block_v),)
    _logprob_backward_kernel[grid](
        hidden, weight, bias, rows, targets, lse, grad, dh, dw, db,
        softcap, filter_eps, M, V, H,
        hidden.stride(0), weight.stride(0),
        H if dh is None else dh.stride(0), H if dw is None else dw.stride(0),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, INPUT_PRECISION=input_precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    return dh, dw, db
