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
multiplies the programs while the combine costs ``O(S * N)``.

Raster: the grid is 1-D and ordered in groups of ``GROUP_N`` token blocks; within a group the
token block varies fastest, then the split. The programs in flight are then one group: they read
``GROUP_N`` hidden blocks (kept in L2 across the whole vocabulary walk) and, at each step, one
weight tile per split, shared by the group's token blocks. Token-block-fastest order over the whole
grid instead keeps every hidden block in flight (59 MB at the Gemma-2-9B shape, above the H100's
50 MB L2) and re-reads ``hidden`` from HBM for every vocabulary tile. The launcher picks the splits
so that one group fills the resident programs (:func:`plan_splits`).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import KernelConfig, Launch


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


@triton.jit
def grouped_pid(pid, num_n_blocks, num_inner, GROUP_N: tl.constexpr):
    """``pid`` -> ``(token block, inner index)`` in groups of ``GROUP_N`` token blocks.

    A group spans ``GROUP_N`` token blocks (fewer in the last group) times ``num_inner`` (vocabulary
    splits or tiles), token block fastest: consecutive programs, which the GPU runs together, share
    their weight tile and a small set of hidden rows.
    """
    per_group = GROUP_N * num_inner
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n_blocks - first_n, GROUP_N)
    local = pid % per_group
    return first_n + local % group_size, local // group_size


@triton.heuristics({
    "HAS_BIAS": lambda args: args["b_ptr"] is not None,
    "HAS_SOFTCAP": lambda args: args["softcap"] is not None,
})
@triton.jit
def _lse_forward_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr,
    m_out, s_out, t_out, sum_out,  # [S, N] float32 partials
    softcap, N, V, H, splits, tiles_per_split,
    stride_h, stride_w,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_n, split = grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), splits, GROUP_N)
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


@functools.lru_cache(maxsize=256)  # a few hundred plan_splits calls: once per shape, not per step
def auto_splits(V: int, block_v: int, n_token_blocks: int, group_n: int, resident: int) -> int:
    """Vocabulary splits for ``resident`` programs running at once.

    At least enough splits for one raster group (``min(group_n, n_token_blocks)`` token blocks)
    to fill the resident programs; among up to 4x that many, the count that wastes least of the
    last wave (every program walks ``tiles_per_split`` tiles, so a grid of 1.3 waves runs as 2).
    Ties go to fewer splits (less combine work).
    """
    least = max(1, triton.cdiv(resident, max(1, min(group_n, n_token_blocks))))
    n_tiles = triton.cdiv(V, block_v)
    best, best_eff = least, -1.0
    for max_splits in range(least, min(4 * least, n_tiles) + 1):
        splits, per_split = plan_splits(V, block_v, max_splits)
        waves = triton.cdiv(n_token_blocks * splits, resident)
        eff = n_token_blocks * n_tiles / (waves * resident * per_split)
        if eff > best_eff + 1e-9:
            best, best_eff = max_splits, eff
    return best


def plan_lse_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    softcap: Optional[float], cfg: KernelConfig, *, input_precision: Optional[str], resident: int,
) -> tuple[Launch, torch.Tensor]:
    """The forward launch and its ``[4, S, N]`` float32 partials (max, sum of exp, target logit, logit sum).

    The partials are poisoned with NaN: any (split, token) the kernel fails to write turns the
    result into NaN. ``resident``: programs that run at once (for the automatic split count).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    n_blocks = triton.cdiv(N, cfg.block_n)
    max_splits = cfg.v_splits or auto_splits(V, cfg.block_v, n_blocks, cfg.group_n, resident)
    splits, tiles_per_split = plan_splits(V, cfg.block_v, max_splits)
    part = torch.full((4, splits, N), float("nan"), dtype=torch.float32, device=hidden.device)
    launch = Launch(
        _lse_forward_kernel, (n_blocks * splits,),
        dict(h_ptr=hidden, w_ptr=weight, b_ptr=bias, tgt_ptr=targets,
             m_out=part[0], s_out=part[1], t_out=part[2], sum_out=part[3],
             softcap=softcap, N=N, V=V, H=H, splits=splits, tiles_per_split=tiles_per_split,
             stride_h=hidden.stride(0), stride_w=weight.stride(0),
             BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, GROUP_N=cfg.group_n,
             INPUT_PRECISION=input_precision),
        dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return launch, part


def lse_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    softcap: Optional[float], cfg: KernelConfig, *, input_precision: Optional[str], resident: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the forward kernel and combine its vocabulary splits.

    Args:
        hidden: ``[N, H]`` (row stride free, unit column stride), weight: ``[V, H]`` likewise,
        bias: ``[V]`` or None, targets: ``[N]`` int64 (any value outside ``[0, V)`` gathers 0).

    Returns:
        ``(lse, target_logit, logit_sum)``, each ``[N]`` float32.
    """
    launch, part = plan_lse_forward(hidden, weight, bias, targets, softcap, cfg,
                                    input_precision=input_precision, resident=resident)
    if hidden.shape[0] == 0:
        return part[0, 0], part[2, 0], part[3, 0]
    launch.run()
    m, s, t, sums = part
    m_all = m.max(0).values
    lse = m_all + torch.log((s * torch.exp(m - m_all)).sum(0))
    return lse, t.sum(0), sums.sum(0)
