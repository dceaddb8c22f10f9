"""Forward pass from hidden states: per-token logsumexp, target logit and logit sum.

Nothing of size ``N x V`` is ever written. Each program owns a block of ``BLOCK_N`` tokens and a
contiguous *split* of the vocabulary; it walks that split in ``BLOCK_V`` tiles, computes each
``[BLOCK_N, BLOCK_V]`` logit tile in registers (``tl.dot`` over ``BLOCK_H`` slices of the hidden
size, float32 accumulation), applies bias and softcap to the tile, and folds it into four running
per-token statistics: the max, the rescaled sum of exponentials (online logsumexp), the target
logit (gathered when the target id falls in the tile) and the plain logit sum. It writes those
four numbers per (split, token); :func:`lse_forward` combines the splits in a few ``[S, N]``
torch ops.

Why vocabulary splits: at Gemma-2 scale (V=256000) a grid over token blocks alone has only
``N / BLOCK_N`` programs (64 at N=8192), too few to fill 132 SMs; splitting the vocabulary
multiplies the programs while the combine costs ``O(S * N)``. Token blocks vary fastest in the
grid, so the programs that run together read the same weight tiles and share them through L2.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def softcap_tanh(x):
    """``tanh(x)`` for float32 ``x`` from ``exp`` only (the interpreter has no libdevice tanh).

    ``1 - 2 / (exp(2x) + 1)`` is exact at both tails (exp overflows to inf -> 1, underflows to 0 ->
    -1) but loses relative accuracy near 0 by cancellation, so below |x| = 0.25 the odd Taylor
    series up to x^9 is used instead (truncation < 1e-8 relative there).
    """
    big = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
    x2 = x * x
    small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    return tl.where(tl.abs(x) < 0.25, small, big)


@triton.jit
def logit_tile(h_ptr, w_ptr, b_ptr, rows, mask_n, offs_v, mask_v, softcap, H,
               stride_h, stride_w,
               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
               INPUT_PRECISION: tl.constexpr):
    """One ``[BLOCK_N, BLOCK_V]`` tile of (capped) logits in float32, and ``tanh(z/s)``.

    ``rows`` are the token row indices (the backward pass gathers a compacted set of tokens);
    ``h`` rows beyond ``mask_n`` and ``w`` rows beyond ``mask_v`` load as 0, so padded entries hold
    the bias (or 0) and are masked by the caller. Shared by the forward and backward kernels so
    that both compute the same formula in the same ``BLOCK_H`` slices, but the two recomputations
    are NOT bit-identical: the backward's tile is ``bwd_block_n x bwd_block_v`` over a compacted row
    set, the forward's ``block_n x block_v``, and each ``tl.dot`` rounds its slice product to float32
    before the add into ``acc`` in an order that depends on the tile shape (the interpreter calls
    ``np.matmul(a, b) + acc``, whose BLAS kernel, FMA use and reduction order vary with the operand
    shapes and the CPU; on a GPU the MMA instruction shape follows the tile). So the backward's
    logits differ from the forward's by float32 rounding, about ``H * 2^-24 * sum_k |h_k w_k|``
    at worst, and ``softmax = exp(z - lse)`` is 1 only to that accuracy: where the exact gradient is
    0 (a one-token vocabulary) the kernels give a gradient of that size, not 0.
    """
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    h_base = h_ptr + rows[:, None].to(tl.int64) * stride_h
    w_base = w_ptr + offs_v[:, None].to(tl.int64) * stride_w
    for k in range(0, H, BLOCK_H):
        kh = k + offs_h
        mask_h = kh < H
        h = tl.load(h_base + kh[None, :], mask=mask_n[:, None] & mask_h[None, :], other=0.0)
        w = tl.load(w_base + kh[None, :], mask=mask_v[:, None] & mask_h[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    t = acc  # placeholder when there is no softcap (never read then)
    if HAS_SOFTCAP:
        t = softcap_tanh(acc / softcap)
        acc = softcap * t
    return acc, t


@triton.heuristics({
    "HAS_BIAS": lambda args: args["b_ptr"] is not None,
    "HAS_SOFTCAP": lambda args: args["softcap"] is not None,
})
@triton.jit
def _lse_forward_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr,
    m_out, s_out, t_out, sum_out,  # [S, N] float32 partials
    softcap, N, V, H, tiles_per_split,
    stride_h, stride_w,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    target = tl.load(tgt_ptr + offs_n, mask=mask_n, other=-1)

    run_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    run_sum_exp = tl.zeros([BLOCK_N], dtype=tl.float32)
    run_tgt = tl.zeros([BLOCK_N], dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    v_start = split * tiles_per_split * BLOCK_V
    for i in range(0, tiles_per_split):
        offs_v = v_start + i * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z, _t = logit_tile(h_ptr, w_ptr, b_ptr, offs_n, mask_n, offs_v, mask_v, softcap, H,
                           stride_h, stride_w, HAS_BIAS, HAS_SOFTCAP,
                           BLOCK_N, BLOCK_V, BLOCK_H, INPUT_PRECISION)
        # Every tile the host schedules holds >= 1 real column, so the tile max is finite and
        # exp(-inf - finite) below is a clean 0 (never inf - inf).
        z_m = tl.where(mask_v[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z_m, axis=1))
        run_sum_exp = run_sum_exp * tl.exp(run_max - new_max) + tl.sum(tl.exp(z_m - new_max[:, None]), axis=1)
        run_max = new_max
        run_sum += tl.sum(tl.where(mask_v[None, :], z, 0.0), axis=1)
        hit = (offs_v[None, :] == target[:, None]) & mask_v[None, :]
        run_tgt += tl.sum(tl.where(hit, z, 0.0), axis=1)

    out = split * N + offs_n
    tl.store(m_out + out, run_max, mask=mask_n)
    tl.store(s_out + out, run_sum_exp, mask=mask_n)
    tl.store(t_out + out, run_tgt, mask=mask_n)
    tl.store(sum_out + out, run_sum, mask=mask_n)


def plan_splits(V: int, block_v: int, max_splits: int) -> tuple[int, int]:
    """``(splits, tiles_per_split)`` with every split non-empty and covering all ``cdiv(V, block_v)`` tiles."""
    n_tiles = triton.cdiv(V, block_v)
    splits = max(1, min(max_splits, n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split


def lse_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    softcap: Optional[float], *, block_n: int, block_v: int, block_h: int, v_splits: int,
    input_precision: str, num_warps: int = 4, num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel and combine its vocabulary splits.

    Args:
        hidden: ``[N, H]`` (row stride free, unit column stride), weight: ``[V, H]`` likewise,
        bias: ``[V]`` or None, targets: ``[N]`` int64 (any value outside ``[0, V)`` gathers 0).

    Returns:
        ``(lse, target_logit, logit_sum)``, each ``[N]`` float32.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    splits, tiles_per_split = plan_splits(V, block_v, v_splits)
    # Poisoned partials: any (split, token) the kernel fails to write turns the result into NaN.
    part = torch.full((4, splits, N), float("nan"), dtype=torch.float32, device=hidden.device)
    if N == 0:
        return part[0, 0], part[2, 0], part[3, 0]
    grid = (triton.cdiv(N, block_n), splits)
    _lse_forward_kernel[grid](
        hidden, weight, bias, targets, part[0], part[1], part[2], part[3],
        softcap, N, V, H, tiles_per_split, hidden.stride(0), weight.stride(0),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, INPUT_PRECISION=input_precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    m, s, t, sums = part
    m_all = m.max(0).values
    lse = m_all + torch.log((s * torch.exp(m - m_all)).sum(0))
    return lse, t.sum(0), sums.sum(0)
