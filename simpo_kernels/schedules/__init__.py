"""Schedules: how the ``N x V`` logits are formed, reduced and differentiated, chunk by chunk.

===========  ==========  =============================================  ==============================
schedule     FLOPs       scratch (n = target tokens)                    backends
===========  ==========  =============================================  ==============================
``pairs``    6nHV        one chunk of whole pairs' float32 logits       ``triton`` (row kernels), ``torch``
                         + float32 ``[V, H]`` dW accumulator
``vocab``    8nHV        ``[n, chunk]`` float32 logits + ``[n, H]``      ``triton`` (row kernels), ``torch``
                         float32 dH; dW written once per chunk
``fused``    8nHV        float32 dH/dW accumulators (atomics)           ``triton`` (fused kernels)
``tokens``   8nHV        ``[chunk_size, V]`` float32 logits + float32   ``torch``
                         ``[V, H]`` dW accumulator
===========  ==========  =============================================  ==============================

Each lives in one file (:mod:`.pairs`, :mod:`.vocab`; ``fused`` is :mod:`simpo_kernels.kernels`,
``tokens`` is :mod:`simpo_kernels.chunked`) with its autograd glue beside it. :mod:`.common` holds
target compaction and the row operations they share.

``schedule="auto"``: on the ``triton`` backend, the first schedule of the preference order whose
smallest chunk fits ``memory_budget``; the order is the measured one when a table for the device is
committed under ``simpo_kernels/tuned/`` (its ``schedule_order``, written by the GPU campaign's
``check`` call), else ``pairs, vocab, fused`` (fewest FLOPs first). On the ``torch`` backend, ``tokens``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import chunked
from ..eager import compute_dtype
from ..matmul import LinearHead
from ..objective import Objective, SimPOOutput, preference_objective
from ..tuned import schedule_order
from . import pairs, vocab
from .common import TargetLayout, TorchRows, TritonRows, chunked_forward_stats, other_logit_sums, vocab_chunk

SCHEDULES = {"triton": ("pairs", "vocab", "fused"), "torch": ("tokens", "pairs", "vocab"), "eager": ()}
#: Preference order without a measured table: fewest FLOPs first.
DEFAULT_ORDER = ("pairs", "vocab", "fused")
#: The narrowest vocabulary chunk ``auto`` accepts for the ``vocab`` schedule.
AUTO_MIN_VOCAB_CHUNK = 128
#: Default memory budget for the logits scratch on CPU (and the floor on CUDA).
CPU_BUDGET_BYTES = 256 * 2**20

__all__ = ["SCHEDULES", "TargetLayout", "TorchRows", "TritonRows", "check_memory_budget", "check_schedule_name",
           "default_memory_budget", "forward_logps", "resolve_schedule", "run_schedule", "run_schedule_triton"]


def default_memory_budget(device: torch.device) -> int:
    """Bytes of logits scratch a schedule may use: a quarter of the free device memory on CUDA
    (at least :data:`CPU_BUDGET_BYTES`), :data:`CPU_BUDGET_BYTES` elsewhere."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(CPU_BUDGET_BYTES, free // 4)
    return CPU_BUDGET_BYTES


def check_memory_budget(memory_budget) -> None:
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                      or memory_budget < 1):
        raise ValueError(f"memory_budget must be a positive int (bytes) or None, got {memory_budget!r}")


def fits(schedule: str, layout: TargetLayout, V: int, budget: int) -> bool:
    """Whether ``schedule``'s smallest chunk of float32 logits fits ``budget`` bytes."""
    if schedule == "pairs":
        B = layout.rows // 2
        largest = max(layout.counts[p] + layout.counts[B + p] for p in range(B))
        return largest * V * 4 <= budget
    if schedule == "vocab":
        # auto takes no chunk under AUTO_MIN_VOCAB_CHUNK columns (a sea of thin matmuls; fused is
        # better there); schedule="vocab" itself goes down to 16 (see vocab_chunk)
        return layout.num_targets * min(V, AUTO_MIN_VOCAB_CHUNK) * 4 <= budget
    return True


def check_schedule_name(backend: str, schedule: str) -> None:
    """ValueError unless ``schedule`` is ``"auto"`` or one of the (resolved) ``backend``'s schedules."""
    names = SCHEDULES[backend]
    if not isinstance(schedule, str) or schedule not in ("auto",) + names:
        if backend == "eager":
            raise ValueError(f"backend='eager' has no schedules (it materialises the logits); got "
                             f"schedule={schedule!r}, expected 'auto'")
        raise ValueError(f"unknown schedule {schedule!r} for backend={backend!r}; expected 'auto' or one of {names}")


def resolve_schedule(backend: str, schedule: str, device: torch.device, layout: TargetLayout, V: int,
                     budget: int) -> str:
    """The schedule to run (``"auto"`` resolved); ValueError for one the backend lacks."""
    check_schedule_name(backend, schedule)
    if schedule != "auto" or backend == "eager":
        return schedule
    if backend == "torch":
        return "tokens"
    order = None
    if device.type == "cuda":
        order = schedule_order(torch.cuda.get_device_name(device))
    for name in order or DEFAULT_ORDER:
        if fits(name, layout, V, budget):
            return name
    return "fused"


@torch.compiler.disable  # Triton launches (and the interpreter) cannot be traced by dynamo
def run_schedule_triton(*args, **kwargs) -> SimPOOutput:
    """:func:`run_schedule`, outside any ``torch.compile`` graph."""
    return run_schedule(*args, **kwargs)


def run_schedule(impl, sched: str, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 targets: torch.Tensor, layout: TargetLayout, *, softcap, budget: int, objective: Objective,
                 ignore_index: int,
                 logit_metrics: str, finite: bool, chunk_size: Optional[int], grad_filter,
                 kernel_options: Optional[dict] = None) -> SimPOOutput:
    """Run schedule ``sched`` of backend module ``impl`` on the target positions of ``hidden``.

    Args:
        impl: :mod:`simpo_kernels.chunked` or :mod:`simpo_kernels.kernels`. sched: a resolved schedule.
        hidden: ``[2B * T, H]`` (packed: ``[R * W, H]``); weight ``[V, H]``; bias ``[V]`` or None.
            targets: ``[2B, T]`` shifted labels (packed: on the sequence grid); layout: their
            :class:`TargetLayout`. objective: the loss and its reference values.

    Returns:
        The :class:`SimPOOutput` of :func:`preference_objective` (``pairs``: of its own Function).
    """
    if bias is not None and bias.stride(0) != 1:  # the row kernels index the bias with unit stride
        bias = bias.contiguous()
    rows, T = targets.shape
    N, V, H = rows * T, weight.shape[0], weight.shape[1]
    cdtype = compute_dtype(hidden.dtype)
    kernel_options = kernel_options or {}
    rows_op = None
    if sched in ("pairs", "vocab"):
        rows_op = TorchRows() if impl is chunked else TritonRows(impl.make_config(
            hidden.device, hidden.dtype, kernel_options, schedule=sched, shape=(layout.num_targets, H, V)))

    def forward_sums(h: torch.Tensor) -> torch.Tensor:
        """Logit sums of metric-only rows, by this schedule's forward (no gradient)."""
        none = torch.full((h.shape[0],), -1, dtype=torch.long, device=h.device)
        if sched == "tokens":
            return chunked.token_logprobs(h, weight.detach(), None if bias is None else bias.detach(), none,
                                          softcap=softcap, ignore_index=-1, chunk_size=chunk_size)[1]
        if sched == "fused":
            return impl.token_logprobs(h, weight.detach(), None if bias is None else bias.detach(), none,
                                       softcap=softcap, ignore_index=-1, **kernel_options)[1]
        head = LinearHead(weight.detach(), None, cdtype)
        b = None if bias is None else bias.detach()
        return chunked_forward_stats(head, rows_op, h, b, none, softcap, vocab_chunk(h.shape[0], V, budget))[2]

    other_sums = None
    if logit_metrics == "exact" and layout.num_targets < N:
        pos = layout.others()
        other_sums = torch.zeros(N, dtype=cdtype, device=hidden.device).index_copy_(
            0, pos, other_logit_sums(hidden, weight, bias, layout.hidden_index(pos), softcap, cdtype, forward_sums))

    if sched == "pairs":
        return pairs.loss_pairs(hidden, weight, bias, targets, layout, softcap=softcap, rows_op=rows_op,
                                memory_budget=budget, objective=objective, ignore_index=ignore_index,
                                logit_metrics=logit_metrics, other_sums=other_sums, finite=finite)
    h_t = hidden.index_select(0, layout.hidden_index(layout.idx))
    tgt_t = layout.targets.index_select(0, layout.idx)
    if sched == "tokens":
        logps_t, sums_t = chunked.token_logprobs(h_t, weight, bias, tgt_t, softcap=softcap, ignore_index=-1,
                                                 chunk_size=chunk_size)
    elif sched == "fused":
        logps_t, sums_t = impl.token_logprobs(h_t, weight, bias, tgt_t, softcap=softcap, ignore_index=-1,
                                              grad_filter=grad_filter, **kernel_options)
    else:
        logps_t, sums_t = vocab.token_logprobs(h_t, weight, bias, tgt_t, softcap=softcap, rows_op=rows_op,
                                                        memory_budget=budget)
    token_logps = torch.zeros(N, dtype=logps_t.dtype, device=hidden.device).index_copy(0, layout.idx, logps_t)
    sums = torch.zeros(N, dtype=cdtype, device=hidden.device) if other_sums is None else other_sums
    sums = sums.index_copy(0, layout.idx, sums_t.detach().to(cdtype))
    return preference_objective(token_logps.view(rows, T), targets, sums.view(rows, T), V, objective=objective,
                                ignore_index=ignore_index, inputs_finite=finite, logit_metrics=logit_metrics,
                                present=layout.present)


@torch.compiler.disable
def forward_logps(impl, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  targets: torch.Tensor, *, softcap) -> torch.Tensor:
    """Target log-probabilities ``[n]`` of ``hidden [n, H]`` (every row a target), forward only:
    token chunks on the ``torch`` backend, the fused log-sum-exp forward kernel on ``triton``."""
    with torch.no_grad():
        if impl is chunked:
            logps, _ = chunked.token_logprobs(hidden, weight, bias, targets, softcap=softcap, ignore_index=-1)
        else:
            logps, _ = impl.token_logprobs(hidden, weight, bias, targets, softcap=softcap, ignore_index=-1)
    return logps
