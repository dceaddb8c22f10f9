"""Public API: :func:`simpo_loss`, :func:`preference_loss` (the paired family), their
``*_from_logits`` forms, and :func:`sequence_logps` (a reference model's per-sequence sums).

Each call validates its inputs, shifts the labels, resolves the backend and its schedule
(:mod:`simpo_kernels.schedules`), which computes per-token log-probabilities and logit sums of
the target positions, and applies :func:`simpo_kernels.objective.preference_objective` with the
loss's head (:mod:`simpo_kernels.losses`).

Guarantees every backend shares, enforced here once:

* Inputs are never modified (no backend writes into a caller's tensor, in forward or backward).
* Autocast: inside ``torch.autocast(device_type, dtype)`` the lm_head matmul inputs (float16,
  bfloat16 and float32 hidden states, weight and bias) are cast to the autocast dtype, as
  ``nn.Linear`` would be; the backend then runs with autocast off, so its own float32 accumulation
  is kept, and its backward runs with autocast off wherever ``backward()`` is called.
  Given logits are not cast (``log_softmax`` runs in float32 under autocast).
* Non-finite inputs: a NaN or inf anywhere in hidden states, weight, bias, logits or the
  reference values makes every
  value of the result NaN, and every gradient entirely NaN, on every backend. (Stricter than
  the official trainer, whose gradient is NaN only in the rows the value reaches.)

Backends:
    ``"eager"``  the reference: materialises the logits (the spec).
    ``"torch"``  chunked PyTorch, any device, never more than one chunk of logits.
    ``"triton"`` Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``): the ``pairs`` and
                 ``vocab`` schedules (cuBLAS matmuls + Triton row kernels) or ``fused``.
    ``"auto"``   ``"triton"`` for CUDA tensors when Triton is importable, else ``"torch"``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Optional, Union

import torch

from . import chunked, eager
from .eager import compute_dtype
from .losses import PreferenceLoss, SimPOLoss, make_loss
from .objective import LOGIT_METRICS, Objective, SimPOOutput, preference_objective, shift_targets
from .schedules import (TargetLayout, check_memory_budget, check_schedule_name, default_memory_budget,
                        forward_logps, resolve_schedule, run_schedule, run_schedule_triton)
from .validation import check_hidden_inputs, check_logits_inputs, check_packed_batch, check_nll_labels, check_references, check_softcap

BACKENDS = ("auto", "eager", "torch", "triton")


def _triton_module():
    try:
        return importlib.import_module("simpo_kernels.kernels")
    except ImportError as exc:  # triton missing, or kernels not importable on this platform
        raise ValueError(f"backend='triton' is unavailable here: {exc}") from exc


def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return importlib.util.find_spec("simpo_kernels.kernels") is not None


def _resolve_backend(backend: str, device: torch.device):
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "eager":
        return eager
    if backend == "torch":
        return chunked
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device.type}); on CPU set TRITON_INTERPRET=1 "
            f"to run the kernels in the Triton interpreter, or use backend='torch'")
    return _triton_module()


def check_backend(backend: str, device: Union[str, torch.device], dtype: torch.dtype,
                  schedule: str = "auto") -> str:
    """Raise the error :func:`simpo_loss` would raise for ``backend`` (and ``schedule``) with inputs
    of ``dtype`` on ``device`` (ValueError: backend or schedule unavailable there; TypeError: dtype
    unsupported by it), before any data exists; returns the resolved backend name. The trainer
    calls it at start-up."""
    device = torch.device(device)
    impl = _resolve_backend(backend, device)
    impl.check_dtype(dtype, device)
    check_schedule_name(impl.BACKEND, schedule)
    return impl.BACKEND


def _check_chunk_size(chunk_size: Optional[int]) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _backend_options(impl, backend: str, chunk_size: Optional[int], grad_filter) -> dict:
    """Validate the backend-specific keywords of :func:`simpo_loss_from_logits`."""
    _check_chunk_size(chunk_size)
    kwargs = {"chunk_size": chunk_size} if impl is chunked else {}
    if grad_filter is not False:
        if impl is chunked or impl is eager:
            raise ValueError("grad_filter is an option of backend='triton' only (the other backends are "
                             f"always exact); got backend={backend!r} resolving to {impl.__name__}")
        kwargs["grad_filter"] = grad_filter
    return kwargs


def _schedule_options(schedule: str, backend: str, chunk_size: Optional[int], grad_filter) -> None:
    """``chunk_size`` belongs to the ``tokens`` schedule and ``grad_filter`` to ``fused``."""
    _check_chunk_size(chunk_size)
    if chunk_size is not None and schedule != "tokens":
        raise ValueError(f"chunk_size is an option of the torch backend's 'tokens' schedule; this call runs "
                         f"backend={backend!r} schedule={schedule!r} (its chunks follow memory_budget)")
    if grad_filter is not False and schedule != "fused":
        raise ValueError("grad_filter is an option of backend='triton' with schedule='fused' only (the other "
                         f"schedules are always exact); this call runs backend={backend!r} schedule={schedule!r}")


def _check_kernel_options(kernel_options: Optional[dict], impl, backend: str) -> None:
    """``kernel_options`` is a dict, and only for the triton backend (its fields are checked where
    the configuration is made: TypeError for an unknown field, ValueError for a bad value)."""
    if kernel_options is None:
        return
    if not isinstance(kernel_options, dict):
        raise TypeError(f"kernel_options must be a dict of KernelConfig fields, got {type(kernel_options).__name__}")
    if kernel_options and (impl is chunked or impl is eager):
        raise ValueError(f"kernel_options is an option of backend='triton' only; got backend={backend!r} "
                         f"resolving to {impl.__name__}")


class _PoisonGradients(torch.autograd.Function):
    """Identity in forward; in backward every gradient is NaN. Inserted only for non-finite inputs,
    so that no backend (the chunked and fused ones skip prompt positions) ever hands an optimizer a
    finite gradient computed from a NaN or inf input."""

    @staticmethod
    def forward(ctx, *tensors):
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        return tuple(None if g is None else torch.full_like(g, float("nan")) for g in grads)


def _poison_gradients(*tensors: Optional[torch.Tensor]) -> list:
    idx = [i for i, t in enumerate(tensors) if t is not None and t.requires_grad]
    out = list(tensors)
    if idx and torch.is_grad_enabled():
        for i, t in zip(idx, _PoisonGradients.apply(*(tensors[i] for i in idx))):
            out[i] = t
    return out


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The active autocast dtype for ``device``'s type, or None when autocast is off there."""
    if device.type not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _no_autocast(device: torch.device):
    """Autocast off for ``device``'s type (backends keep their own precision choices)."""
    if device.type not in _AUTOCAST_DEVICES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def _autocast_inputs(dtype: Optional[torch.dtype], *tensors):
    """Cast what autocast would cast for ``F.linear`` (float16/bfloat16/float32, never float64)."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor)
                 and t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t for t in tensors)


def _device_of(t) -> torch.device:
    return t.device if isinstance(t, torch.Tensor) else torch.device("cpu")


def simpo_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.25,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    sft_weight: float = 0.0,
    softcap: Optional[float] = None,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    backend: str = "auto",
    schedule: str = "auto",
    memory_budget: Optional[int] = None,
    logit_metrics: str = "exact",
    chunk_size: Optional[int] = None,
    grad_filter: Union[bool, float] = False,
    kernel_options: Optional[dict] = None,
    sequence_ids: Optional[torch.Tensor] = None,
) -> SimPOOutput:
    """SimPO loss straight from the final hidden states and the lm_head weight.

    Args:
        hidden_states: ``[2B, T, H]`` final hidden states (after the final norm); rows ``0..B-1``
            are the chosen responses, rows ``B..2B-1`` the rejected ones (pair ``i`` is ``(i, B+i)``).
        weight: ``[V, H]`` lm_head weight (same dtype as ``hidden_states``).
        labels: ``[2B, T]`` integer labels aligned with the input ids, ``ignore_index`` on prompt and
            padding; the shift (position ``t`` predicts ``labels[t+1]``) happens inside.
        beta, gamma_beta_ratio, label_smoothing, loss_type, sft_weight: the official SimPO options.
        softcap: final-logit softcap ``s`` (Gemma-2: 30.0) or None.
        bias: optional ``[V]`` lm_head bias.
        backend: ``"auto"``, ``"eager"``, ``"torch"`` or ``"triton"`` (see module docstring).
        schedule: how the logits are chunked and differentiated (:mod:`simpo_kernels.schedules`):
            ``"pairs"`` (gradients formed in the forward, 6NHV; backward through ``loss`` only),
            ``"vocab"`` (vocabulary chunks, 8NHV, no atomics), ``"fused"`` (``triton`` only: the
            fused kernels), ``"tokens"`` (``torch`` only: token chunks). ``"auto"``: by
            ``memory_budget`` on ``triton``, ``"tokens"`` on ``torch``.
        memory_budget: bytes of float32 logits scratch a ``pairs``/``vocab`` chunk may take (default:
            a quarter of free CUDA memory; 256 MiB on CPU).
        logit_metrics: ``"exact"`` (default): the official ``logits/*`` metrics, every position's
            logits (a GEMV for prompt positions without softcap, their forward logits with one;
            with ``sft_weight > 0`` every chosen position but the last, as the official trainer's
            code does). ``"targets"``: mean logit over target positions only (free). ``"none"``:
            not computed (``chosen_logits_mean``/``rejected_logits_mean`` are None).
        chunk_size: tokens per chunk of the ``"tokens"`` schedule (default from V and H).
        grad_filter: ``"fused"`` schedule only (a ValueError elsewhere). ``False`` (default): exact
            gradients. ``True``: skip backward tiles whose softmax probabilities are all below the
            input dtype's unit roundoff (and hold no target), as Cut Cross-Entropy does; a float in
            ``(0, 1)`` sets that threshold. An approximation: see ``simpo_kernels.kernels``.
        kernel_options: ``triton`` backend only: :class:`simpo_kernels.kernels.KernelConfig` fields
            (tiles, warps, stages, raster groups, splits, atomic semantics) over the defaults and
            the committed measured table (``simpo_kernels/tuned``); for benchmarks and tuning.
        sequence_ids: a packed (padding-free) batch, :mod:`simpo_kernels.packed`: ``[R, W]``
            integers, for every position of ``hidden_states [R, W, H]`` and ``labels [R, W]`` the
            index of its sequence in the pair layout (``i``: chosen of pair ``i``, ``B + i``:
            rejected of pair ``i``), ``-1`` on padding. Each sequence is one contiguous run inside
            one row; the shift stays inside it. The result is the padded layout's on the same
            pairs, on every backend and schedule, except that ``logit_metrics="exact"`` averages
            every real position (there is no padding to average). None (default): one sequence
            per row, chosen rows first.

    Returns:
        :class:`SimPOOutput`; ``loss`` is differentiable w.r.t. hidden states, weight and bias.
    """
    loss = SimPOLoss(beta=beta, gamma_beta_ratio=gamma_beta_ratio, label_smoothing=label_smoothing,
                     loss_type=loss_type, sft_weight=sft_weight)
    return _loss_from_hidden(loss, None, None, hidden_states, weight, labels, softcap=softcap, bias=bias,
                             ignore_index=ignore_index, backend=backend, schedule=schedule,
                             memory_budget=memory_budget, logit_metrics=logit_metrics, chunk_size=chunk_size,
                             grad_filter=grad_filter, kernel_options=kernel_options, sequence_ids=sequence_ids)


def preference_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss: Union[str, PreferenceLoss] = "simpo",
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    nll_labels: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    backend: str = "auto",
    schedule: str = "auto",
    memory_budget: Optional[int] = None,
    logit_metrics: Optional[str] = None,
    chunk_size: Optional[int] = None,
    grad_filter: Union[bool, float] = False,
    kernel_options: Optional[dict] = None,
    sequence_ids: Optional[torch.Tensor] = None,
    **options,
) -> SimPOOutput:
    """Any loss of the paired preference family, straight from hidden states and the lm_head weight.

    Same inputs, backends, schedules and guarantees as :func:`simpo_loss` (which equals
    ``preference_loss(..., loss="simpo")``); see :mod:`simpo_kernels.losses` for each loss's formula.

    Args:
        hidden_states, weight, labels, softcap, bias, ignore_index, backend, schedule, memory_budget,
            chunk_size, grad_filter, kernel_options, sequence_ids: as in :func:`simpo_loss`.
        loss: a name in :data:`simpo_kernels.losses.LOSSES` (``"simpo"``, ``"dpo"``, ``"rdpo"``,
            ``"cpo"``, ``"orpo"``, ``"rrhf"``, ``"slic"``) or a configured
            :class:`~simpo_kernels.losses.PreferenceLoss`.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` the reference model's per-sequence SUMS of
            target log-probabilities (:func:`sequence_logps`); required by ``dpo`` and ``rdpo``, an
            error for the others. Constants: never written, no gradient flows into them.
        nll_labels: ``[B, T]`` labels of the chosen rows for the NLL term, when it should cover other
            positions than the targets (TRL's ORPO: ``input_ids[:B]`` with ``ignore_index`` on
            padding, i.e. prompt and response); they must agree with ``labels`` where both hold a
            target, and the loss must have an NLL term. Default: the chosen rows' targets. With
            ``sequence_ids``: ``[R, W]`` in the packed layout (only the chosen sequences' positions
            are read).
        logit_metrics: ``None`` (default): the loss's official ``logits/*`` definition (``"exact"``
            for SimPO, CPO, ORPO, RRHF, SLiC; ``"targets"`` for DPO and R-DPO, as TRL's
            ``DPOTrainer``); or ``"exact"``, ``"targets"``, ``"none"`` as in :func:`simpo_loss`.
        **options: the loss's options (e.g. ``beta``, ``loss_type``); an unknown one is a TypeError.

    Returns:
        :class:`SimPOOutput` (= ``PreferenceOutput``); ``metrics()`` gives the loss's official names.
    """
    loss_fn = make_loss(loss, options)
    return _loss_from_hidden(loss_fn, ref_chosen_logps, ref_rejected_logps, hidden_states, weight, labels,
                             nll_labels=nll_labels, softcap=softcap, bias=bias, ignore_index=ignore_index, backend=backend,
                             schedule=schedule, memory_budget=memory_budget, logit_metrics=logit_metrics,
                             chunk_size=chunk_size, grad_filter=grad_filter, kernel_options=kernel_options,
                             sequence_ids=sequence_ids)


def _check_logit_metrics(logit_metrics: Optional[str], loss: PreferenceLoss) -> str:
    if logit_metrics is None:
        return loss.official_logit_metrics
    if not isinstance(logit_metrics, str) or logit_metrics not in LOGIT_METRICS:
        raise ValueError(f"unknown logit_metrics {logit_metrics!r}; expected one of {LOGIT_METRICS}")
    return logit_metrics


def _objective(loss_fn: PreferenceLoss, refs, nll_labels, labels, rows: int, T: int, V: int, ignore_index: int,
               cdtype: torch.dtype):
    """The call's :class:`Objective` (reference sums in the compute dtype, so a loss's outputs have
    one dtype whatever the caller's column holds), and, with ``nll_labels``, ``(labels to compute,
    their per-row counts)`` (else None)."""
    refs = tuple(None if r is None else r.to(cdtype) for r in refs)
    if nll_labels is None:
        return Objective(loss_fn, *refs), None
    union, nll_mask, nll_tokens, counts = check_nll_labels(loss_fn, nll_labels, labels, rows, T, V, ignore_index)
    return Objective(loss_fn, *refs, nll_mask=nll_mask, nll_tokens=nll_tokens), (union, counts)


def _rows_of(t) -> int:
    return t.shape[0] if isinstance(t, torch.Tensor) and t.dim() >= 1 else 0


def _loss_from_hidden(loss_fn: PreferenceLoss, ref_chosen, ref_rejected, hidden_states, weight, labels, *,
                      nll_labels=None, softcap, bias, ignore_index, backend, schedule, memory_budget, logit_metrics, chunk_size,
                      grad_filter, kernel_options, sequence_ids=None) -> SimPOOutput:
    softcap = check_softcap(softcap)
    logit_metrics = _check_logit_metrics(logit_metrics, loss_fn)
    check_memory_budget(memory_budget)
    device = _device_of(hidden_states)
    packed = check_packed_batch(hidden_states, labels, sequence_ids, ignore_index)
    refs = check_references(loss_fn, ref_chosen, ref_rejected,
                            _rows_of(hidden_states) if packed is None else packed.num_sequences, device)
    hidden_states, weight, bias = _autocast_inputs(_autocast_dtype(device), hidden_states, weight, bias)
    rows, T, H, V, finite, counts, labels = check_hidden_inputs(
        hidden_states, weight, bias, labels, ignore_index, also_finite=tuple(r for r in refs if r is not None),
        packed=packed)
    if packed is not None and nll_labels is not None:
        if not isinstance(nll_labels, torch.Tensor) or nll_labels.shape != sequence_ids.shape:
            shape = list(nll_labels.shape) if isinstance(nll_labels, torch.Tensor) else type(nll_labels).__name__
            raise ValueError(f"with sequence_ids, nll_labels must have the packed batch's shape "
                             f"{list(sequence_ids.shape)}, got {shape}")
        nll_labels = packed.unpack(nll_labels, ignore_index)[:rows // 2]
    objective, computed = _objective(loss_fn, refs, nll_labels, labels, rows, T, V, ignore_index,
                                     compute_dtype(hidden_states.dtype))
    impl = _resolve_backend(backend, device)
    impl.check_dtype(hidden_states.dtype, device)
    targets = shift_targets(labels.long(), ignore_index)
    if computed is not None:  # the NLL's positions beyond the targets are computed too
        computed, counts = computed
    layout = TargetLayout.build(targets if computed is None else shift_targets(computed, ignore_index), counts,
                                ignore_index, packed)
    budget = memory_budget if memory_budget is not None else default_memory_budget(device)
    sched = resolve_schedule(impl.BACKEND, schedule, device, layout, V, budget)
    if impl is eager:
        _backend_options(impl, backend, chunk_size, grad_filter)
    else:
        _schedule_options(sched, impl.BACKEND, chunk_size, grad_filter)
    _check_kernel_options(kernel_options, impl, backend)
    if not finite:
        hidden_states, weight, bias = _poison_gradients(hidden_states, weight, bias)
    with _no_autocast(device):
        hidden = hidden_states.reshape(-1, H)
        if impl is eager:  # the spec: every position's logits, materialised
            token_logps, logit_sums = _eager_grid(hidden, weight, bias, layout, softcap)
            return preference_objective(token_logps.view(rows, T), targets, logit_sums.view(rows, T), V,
                                        objective=objective, ignore_index=ignore_index, inputs_finite=finite,
                                        logit_metrics=logit_metrics, present=layout.present)
        run = run_schedule if impl is chunked else run_schedule_triton
        return run(impl, sched, hidden, weight, bias, targets, layout,
                   softcap=softcap, budget=budget, objective=objective, ignore_index=ignore_index,
                   logit_metrics=logit_metrics, finite=finite, chunk_size=chunk_size, grad_filter=grad_filter,
                   kernel_options=dict(kernel_options or {}))


def _eager_grid(hidden: torch.Tensor, weight, bias, layout: TargetLayout, softcap):
    """The eager spec on every row of ``hidden`` (packed: padding included), as the per-position
    ``(logps, logit sums)`` of the layout's grid."""
    targets = layout.targets
    if layout.source is not None:  # the targets of the packed rows, -1 elsewhere
        at = layout.hidden_index(layout.idx)
        targets = torch.full((hidden.shape[0],), -1, dtype=targets.dtype, device=targets.device).index_copy_(
            0, at, targets.index_select(0, layout.idx))
    token_logps, logit_sums = eager.token_logprobs(hidden, weight, bias, targets, softcap=softcap, ignore_index=-1)
    if layout.source is None:
        return token_logps, logit_sums
    present = layout.present.reshape(-1)
    return (torch.where(present, token_logps.index_select(0, layout.source), 0.0),
            torch.where(present, logit_sums.index_select(0, layout.source), 0.0))


def simpo_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.25,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    sft_weight: float = 0.0,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> SimPOOutput:
    """SimPO loss from logits the caller already holds (softcap, if any, already applied).

    Args:
        logits: ``[2B, T, V]`` float16/bfloat16/float32/float64, chosen rows first.
        labels: ``[2B, T]`` as in :func:`simpo_loss`.
        Other arguments as in :func:`simpo_loss`. The gradient w.r.t. ``logits`` comes back in the
        logits' dtype; no float32 copy of the full logits is made by the ``torch``/``triton`` backends.
    """
    loss = SimPOLoss(beta=beta, gamma_beta_ratio=gamma_beta_ratio, label_smoothing=label_smoothing,
                     loss_type=loss_type, sft_weight=sft_weight)
    return _loss_from_logits(loss, None, None, logits, labels, ignore_index=ignore_index, backend=backend,
                             chunk_size=chunk_size, logit_metrics="exact")


def preference_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss: Union[str, PreferenceLoss] = "simpo",
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    nll_labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    logit_metrics: Optional[str] = None,
    **options,
) -> SimPOOutput:
    """:func:`preference_loss` from logits the caller already holds (softcap already applied);
    arguments as in :func:`simpo_loss_from_logits` and :func:`preference_loss`."""
    loss_fn = make_loss(loss, options)
    return _loss_from_logits(loss_fn, ref_chosen_logps, ref_rejected_logps, logits, labels,
                             ignore_index=ignore_index, backend=backend, chunk_size=chunk_size,
                             logit_metrics=logit_metrics, nll_labels=nll_labels)


def _loss_from_logits(loss_fn: PreferenceLoss, ref_chosen, ref_rejected, logits, labels, *, ignore_index, backend,
                      chunk_size, logit_metrics, nll_labels=None) -> SimPOOutput:
    logit_metrics = _check_logit_metrics(logit_metrics, loss_fn)
    device = _device_of(logits)
    refs = check_references(loss_fn, ref_chosen, ref_rejected, _rows_of(logits), device)
    rows, T, V, finite = check_logits_inputs(logits, labels, ignore_index,
                                             also_finite=tuple(r for r in refs if r is not None))
    objective, computed = _objective(loss_fn, refs, nll_labels, labels, rows, T, V, ignore_index,
                                     compute_dtype(logits.dtype))
    impl = _resolve_backend(backend, device)
    kwargs = _backend_options(impl, backend, chunk_size, False)
    impl.check_dtype(logits.dtype, device)
    if not finite:
        logits, = _poison_gradients(logits)
    targets = shift_targets(labels.long(), ignore_index)
    computed_targets = targets if computed is None else shift_targets(computed[0], ignore_index)
    with _no_autocast(device):
        token_logps, logit_sums = impl.token_logprobs_from_logits(
            logits.reshape(rows * T, V), computed_targets.reshape(-1), ignore_index=ignore_index, **kwargs)
        return preference_objective(token_logps.view(rows, T), targets, logit_sums.view(rows, T), V,
                                    objective=objective, ignore_index=ignore_index,
                                    inputs_finite=finite, logit_metrics=logit_metrics)


@torch.no_grad()
def sequence_logps(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    softcap: Optional[float] = None,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    backend: str = "auto",
    sequence_ids: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of target log-probabilities, forward only, without the ``[N, V]`` logits:
    the reference model's values for DPO-style losses (``ref_chosen_logps``, ``ref_rejected_logps``).

    Only target positions are computed (2 n H V FLOPs for n targets): the ``torch`` backend in token
    chunks, ``triton`` with the fused log-sum-exp forward kernel, ``eager`` by materialising logits.

    Args:
        hidden_states: ``[R, T, H]`` final hidden states of any ``R >= 1`` rows (no pairing needed).
        weight, labels, softcap, bias, ignore_index, backend: as in :func:`simpo_loss` (``labels``
            ``[R, T]``, shifted inside; every row needs at least one target).
        sequence_ids: a packed batch (``[R, W]``, see :func:`simpo_loss`; here any number ``S`` of
            sequences, numbered ``0..S-1``): the results are per sequence, in that order.

    Returns:
        ``(sums [R], counts [R])`` (packed: ``[S]``): float32 sums (float64 for float64 inputs; NaN
        for a row whose inputs are not finite) and int64 target counts.
    """
    softcap = check_softcap(softcap)
    device = _device_of(hidden_states)
    packed = check_packed_batch(hidden_states, labels, sequence_ids, ignore_index, paired=False)
    hidden_states, weight, bias = _autocast_inputs(_autocast_dtype(device), hidden_states, weight, bias)
    rows, T, H, V, finite, counts, labels = check_hidden_inputs(hidden_states, weight, bias, labels, ignore_index,
                                                                paired=False, packed=packed)
    impl = _resolve_backend(backend, device)
    impl.check_dtype(hidden_states.dtype, device)
    targets = shift_targets(labels.long(), ignore_index)
    layout = TargetLayout.build(targets, counts, ignore_index, packed)
    h_t = hidden_states.reshape(-1, H).index_select(0, layout.hidden_index(layout.idx))
    with _no_autocast(device):
        if impl is eager:
            logps, _ = eager.token_logprobs(h_t, weight, bias, layout.targets.index_select(0, layout.idx),
                                            softcap=softcap, ignore_index=-1)
        else:
            logps = forward_logps(impl, h_t, weight, bias, layout.targets.index_select(0, layout.idx),
                                  softcap=softcap)
    # Reduced as the objective reduces a loss's sums (scatter to [R, T], sum over T), so that a
    # policy used as its own reference gets bit-identical sums from the same per-token values.
    sums = torch.zeros(rows * T, dtype=logps.dtype, device=logps.device).index_copy_(0, layout.idx, logps)
    sums = sums.view(rows, T).sum(-1)
    if not finite:
        sums = sums + float("nan")
    return sums, torch.tensor(counts, dtype=torch.int64, device=sums.device)
