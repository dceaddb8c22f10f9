"""Kernels for logits the caller already holds (``simpo_loss_from_logits``).

Forward: one program per token row streams the row once in ``BLOCK_V`` chunks, upcasting each
chunk to float32 in registers, and keeps the online logsumexp, the target logit and the logit
sum: one read of the logits, no float32 copy of them.

Backward: a 2-D grid (rows x vocabulary chunks) writes

    d_logits[n, v] = g_n * (onehot(y_n)[v] - exp(z[n, v] - lse_n))

straight in the logits' dtype. Rows with ``g_n == 0`` (prompt, padding, ignored targets) store
zeros without reading the logits. Both passes are memory-bound: one read (plus one write in
backward) of the ``[N, V]`` tensor is the floor, and that is what they do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import KernelConfig, Launch


@triton.jit
def _logits_forward_kernel(
    z_ptr, tgt_ptr, lse_out, t_out, sum_out, V, stride_z,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    base = z_ptr + row.to(tl.int64) * stride_z
    target = tl.load(tgt_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    # Per-lane running statistics; reduced across lanes once at the end (fewer reductions in the loop).
    run_max = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    run_sum_exp = tl.zeros([BLOCK_V], dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    run_tgt = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        v = start + offs
        mask = v < V
        z = tl.load(base + v, mask=mask, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, z)
        # Lanes still at -inf (only possible in the final partial chunk, or a chunk of -inf logits)
        # must not compute exp(-inf - -inf) = nan.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum_exp = run_sum_exp * tl.exp(run_max - safe_max) + tl.exp(z - safe_max)
        run_max = new_max
        run_sum += tl.where(mask, z, 0.0)
        run_tgt += tl.where(v == target, z, 0.0)
    row_max = tl.max(run_max, axis=0)
    total = tl.sum(run_sum_exp * tl.exp(run_max - row_max), axis=0)
    tl.store(lse_out + row, row_max + tl.log(total))
    tl.store(t_out + row, tl.sum(run_tgt, axis=0))
    tl.store(sum_out + row, tl.sum(run_sum, axis=0))


@triton.jit
def _logits_backward_kernel(
    z_ptr, dz_ptr, tgt_ptr, lse_ptr, g_ptr, V, stride_z, stride_dz,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = v < V
    g = tl.load(g_ptr + row)
    out = dz_ptr + row.to(tl.int64) * stride_dz + v
    if g == 0.0:
        tl.store(out, tl.zeros([BLOCK_V], dtype=dz_ptr.dtype.element_ty), mask=mask)
    else:
        z = tl.load(z_ptr + row.to(tl.int64) * stride_z + v, mask=mask, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + row)
        target = tl.load(tgt_ptr + row)
        dz = g * (tl.where(v == target, 1.0, 0.0) - tl.exp(z - lse))
        tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def plan_logits_forward(logits: torch.Tensor, targets: torch.Tensor, cfg: KernelConfig) -> tuple[Launch, torch.Tensor]:
    """The forward launch and its NaN-poisoned ``[3, N]`` float32 output (lse, target logit, sum)."""
    N, V = logits.shape
    out = torch.full((3, N), float("nan"), dtype=torch.float32, device=logits.device)
    launch = Launch(_logits_forward_kernel, (N,),
                    dict(z_ptr=logits, tgt_ptr=targets, lse_out=out[0], t_out=out[1], sum_out=out[2], V=V,
                         stride_z=logits.stride(0), BLOCK_V=cfg.logits_block_v),
                    dict(num_warps=cfg.logits_num_warps))
    return launch, out


def logits_forward(logits: torch.Tensor, targets: torch.Tensor, cfg: KernelConfig):
    """``[N, V]`` logits (unit column stride), ``[N]`` int64 targets -> float32 ``(lse, target_logit, sum)``."""
    launch, out = plan_logits_forward(logits, targets, cfg)
    if logits.shape[0]:
        launch.run()
    return out[0], out[1], out[2]


def plan_logits_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
                         cfg: KernelConfig) -> tuple[Launch, torch.Tensor]:
    """The backward launch and the ``[N, V]`` gradient it writes, in the logits' dtype."""
    N, V = logits.shape
    d_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    launch = Launch(_logits_backward_kernel, (N, triton.cdiv(V, cfg.logits_block_v)),
                    dict(z_ptr=logits, dz_ptr=d_logits, tgt_ptr=targets, lse_ptr=lse, g_ptr=grad, V=V,
                         stride_z=logits.stride(0), stride_dz=d_logits.stride(0), BLOCK_V=cfg.logits_block_v),
                    dict(num_warps=cfg.logits_num_warps))
    return launch, d_logits


def logits_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
                    cfg: KernelConfig) -> torch.Tensor:
    """``d_logits [N, V]`` in the logits' dtype; ``grad`` is float32 ``[N]``, 0 for ignored rows."""
    launch, d_logits = plan_logits_backward(logits, targets, lse, grad, cfg)
    if logits.shape[0]:
        launch.run()
    return d_logits
