"""Row kernels: one program per token row streams a row of logits in ``BLOCK_V`` chunks.

* :func:`row_stats`: per row, the logsumexp, target logit and logit sum of the capped logits
  ``c = s tanh((z + b) / s)`` of a chunk ``z`` (float32 or the input dtype, upcast in registers;
  bias and softcap optional). It serves the schedules that form logits by matmul (``pairs``,
  ``vocab``: a float32 chunk of raw logits ``h W[v0:v1]^T``, whose statistics merge online with the
  other vocabulary chunks': ``lse = logaddexp``, sums add) and, without bias or softcap, logits the
  caller already holds (``simpo_loss_from_logits``: one read of the logits, no float32 copy).
* :func:`logprob_grad`: per row, ``dz = g (onehot(y) - exp(c - lse)) (1 - tanh^2)``, written in the
  matmul operand dtype, in place over the float32 logits (see the kernel for why that is safe).
* :func:`logits_backward`: given logits' gradient. A 2-D grid (rows x vocabulary chunks) writes

      d_logits[n, v] = g_n * (onehot(y_n)[v] - exp(z[n, v] - lse_n))

  straight in the logits' dtype. Rows with ``g_n == 0`` (prompt, padding, ignored targets) store
  zeros without reading the logits.

All are memory-bound: one read (plus one write for a gradient) of the logits is the floor, and
that is what they do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import KernelConfig, Launch
from .lse_forward import softcap_tanh


_OPTIONAL = {"HAS_BIAS": lambda args: args["b_ptr"] is not None,
             "HAS_SOFTCAP": lambda args: args["softcap"] is not None}


@triton.jit
def capped_chunk(z_row, b_ptr, v, v0, mask, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Columns ``v`` of a row of raw logits, in float32, plus bias, capped: ``(c, tanh(x / s))``
    (the second is ``c`` itself without softcap, unused then). Masked lanes hold finite garbage."""
    x = tl.load(z_row + v, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(b_ptr + v0 + v, mask=mask, other=0.0).to(tl.float32)
    t = x
    if HAS_SOFTCAP:
        t = softcap_tanh(x / softcap)
        x = softcap * t
    return x, t


@triton.heuristics(_OPTIONAL)
@triton.jit
def _row_stats_kernel(
    z_ptr, b_ptr, tgt_ptr, lse_out, t_out, sum_out, v0, Vc, stride_z, softcap,
    BLOCK_V: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_z
    target = tl.load(tgt_ptr + row) - v0  # column in this chunk; outside [0, Vc) when elsewhere or ignored
    offs = tl.arange(0, BLOCK_V)
    # Per-lane running statistics, reduced across lanes once at the end (fewer reductions in the loop).
    run_max = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    run_sum_exp = tl.zeros([BLOCK_V], dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    run_tgt = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, Vc, BLOCK_V):
        v = start + offs
        mask = v < Vc
        x, _ = capped_chunk(z_row, b_ptr, v, v0, mask, softcap, HAS_BIAS, HAS_SOFTCAP)
        z = tl.where(mask, x, float("-inf"))
        new_max = tl.maximum(run_max, z)
        # Lanes still at -inf (the final partial chunk, or a chunk of -inf logits) must not compute
        # exp(-inf - -inf) = nan.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum_exp = run_sum_exp * tl.exp(run_max - safe_max) + tl.exp(z - safe_max)
        run_max = new_max
        run_sum += tl.where(mask, x, 0.0)
        run_tgt += tl.where(v == target, x, 0.0)
    row_max = tl.max(run_max, axis=0)
    total = tl.sum(run_sum_exp * tl.exp(run_max - row_max), axis=0)
    tl.store(lse_out + row, row_max + tl.log(total))
    tl.store(t_out + row, tl.sum(run_tgt, axis=0))
    tl.store(sum_out + row, tl.sum(run_sum, axis=0))


@triton.heuristics(_OPTIONAL)
@triton.jit
def _logprob_grad_kernel(
    z_ptr, dz_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, v0, Vc, stride_z, stride_dz, softcap,
    BLOCK_V: tl.constexpr, IN_PLACE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_z
    dz_row = dz_ptr + row.to(tl.int64) * stride_dz
    target = tl.load(tgt_ptr + row) - v0
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, Vc, BLOCK_V):
        v = start + offs
        mask = v < Vc
        x, t = capped_chunk(z_row, b_ptr, v, v0, mask, softcap, HAS_BIAS, HAS_SOFTCAP)
        dz = g * (tl.where(v == target, 1.0, 0.0) - tl.exp(x - lse))
        if HAS_SOFTCAP:
            dz = dz * (1.0 - t * t)
        if IN_PLACE:
            # dz_row aliases z_row. A 16-bit dz element j lies in bytes of float32 element j / 2, so
            # this chunk's stores land on float32 elements [start/2, (start+BLOCK_V)/2): all loaded
            # in this or an earlier step, by this program only, but possibly by another warp. The
            # barrier makes every warp's loads of this step complete before any warp stores.
            tl.debug_barrier()
        tl.store(dz_row + v, dz.to(dz_ptr.dtype.element_ty), mask=mask)


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


def _row_args(z: torch.Tensor, bias, targets: torch.Tensor, v0: int, softcap) -> dict:
    return dict(z_ptr=z, b_ptr=bias, tgt_ptr=targets, v0=v0, Vc=z.shape[1], stride_z=z.stride(0),
                softcap=softcap)


def plan_row_stats(z: torch.Tensor, bias, targets: torch.Tensor, v0: int, softcap,
                   cfg: KernelConfig) -> tuple[Launch, torch.Tensor]:
    """The launch and its NaN-poisoned ``[3, n]`` float32 output (lse, target logit, sum)."""
    out = torch.full((3, z.shape[0]), float("nan"), dtype=torch.float32, device=z.device)
    args = _row_args(z, bias, targets, v0, softcap)
    args.update(lse_out=out[0], t_out=out[1], sum_out=out[2], BLOCK_V=cfg.logits_block_v)
    return Launch(_row_stats_kernel, (z.shape[0],), args, dict(num_warps=cfg.logits_num_warps)), out


def row_stats(z: torch.Tensor, bias, targets: torch.Tensor, v0: int, softcap, cfg: KernelConfig):
    """Statistics of a chunk of raw logits (or of given logits: no bias, no softcap, ``v0 = 0``).

    Args:
        z: ``[n, Vc]`` raw logits ``h W[v0:v0+Vc]^T``, float32 or 16-bit (unit column stride).
        bias: the full ``[V]`` bias or None (read at ``v0 + j``).
        targets: ``[n]`` int64 target ids (any id outside ``[v0, v0 + Vc)``, e.g. -1, adds nothing).
        v0: the chunk's first vocabulary id. softcap: float or None.

    Returns:
        float32 ``(lse [n], target_logit [n], logit_sum [n])`` of the capped logits of this chunk.
    """
    launch, out = plan_row_stats(z, bias, targets, v0, softcap, cfg)
    if z.shape[0] and z.shape[1]:
        launch.run()
    return out[0], out[1], out[2]


def plan_logprob_grad(z: torch.Tensor, dz: torch.Tensor, bias, targets: torch.Tensor, lse: torch.Tensor,
                      grad: torch.Tensor, v0: int, softcap, cfg: KernelConfig) -> Launch:
    """The launch writing ``dz`` (``[n, Vc]``; may alias ``z``: see :func:`logprob_grad`)."""
    args = _row_args(z, bias, targets, v0, softcap)
    args.update(dz_ptr=dz, lse_ptr=lse, g_ptr=grad, stride_dz=dz.stride(0), BLOCK_V=cfg.logits_block_v,
                IN_PLACE=dz.data_ptr() == z.data_ptr() and dz.dtype != z.dtype)
    return Launch(_logprob_grad_kernel, (z.shape[0],), args, dict(num_warps=cfg.logits_num_warps))


def logprob_grad(z: torch.Tensor, bias, targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
                 v0: int, softcap, dtype: torch.dtype, cfg: KernelConfig) -> torch.Tensor:
    """``dL/dz`` of a chunk of raw logits, written over them: ``z``'s storage is reused.

    Args:
        z: ``[n, Vc]`` float32 raw logits (a buffer of the caller's own; it is overwritten).
        bias, targets, v0, softcap: as in :func:`row_stats`.
        lse: ``[n]`` float32 logsumexp of each full row. grad: ``[n]`` float32 ``dL/dlogp``.
        dtype: the dtype of the result (float32, or the 16-bit matmul operand dtype).

    Returns:
        ``[n, Vc]`` ``dz`` in ``dtype``. For a 16-bit dtype it is a view of ``z``'s storage whose rows
        start where ``z``'s rows start (row stride ``2 * z.stride(0)``), a valid matmul operand.
    """
    n, Vc = z.shape
    if z.dtype != torch.float32 or z.stride(1) != 1:
        raise ValueError("logprob_grad needs float32 logits with unit column stride")
    if dtype == torch.float32:
        dz = z
    elif dtype in (torch.float16, torch.bfloat16):
        dz = z.view(dtype)[:, :Vc]
    else:
        raise TypeError(f"logprob_grad writes float32, float16 or bfloat16, not {dtype}")
    if n and Vc:
        plan_logprob_grad(z, dz, bias, targets, lse, grad, v0, softcap, cfg).run()
    return dz
