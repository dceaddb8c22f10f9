"""Input checks shared by every backend, run before any heavy work.

A wrong loss that trains silently is the worst failure this library can have, so every
malformed input is rejected with a ValueError/TypeError naming the problem and the offending row
or shape. The label checks need one small host sync (per-row flags and counts, and the inputs'
finiteness flag, in a single transfer). It must stay: an error can only be raised from the host,
and the per-row target counts it brings back let every schedule size its compaction
(``nonzero_static``) and its chunks without a second sync. It is negligible next to the
``N x V`` matmul it guards.
"""

from __future__ import annotations

from typing import Optional

import torch

from .losses import PreferenceLoss, real_number
from .packed import PackedLayout, check_sequence_ids

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_softcap(softcap) -> Optional[float]:
    """``None`` or a positive finite real -> float or None."""
    if softcap is None:
        return None
    softcap = real_number("softcap", softcap, "a positive number or None")
    if not (softcap > 0 and softcap != float("inf")):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap}")
    return softcap


def check_references(loss: PreferenceLoss, ref_chosen, ref_rejected, rows: int,
                     device: torch.device) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The reference model's per-sequence sums: both ``[B]`` float tensors for a loss that needs
    them, both None for one that does not (a value it would ignore is an error, not a silent no-op).
    Returns them detached, on ``device``, in at least float32 (never the caller's tensors)."""
    given = [n for n, t in (("ref_chosen_logps", ref_chosen), ("ref_rejected_logps", ref_rejected)) if t is not None]
    if not loss.needs_reference:
        if given:
            raise ValueError(f"loss={loss.name!r} uses no reference model, but {' and '.join(given)} "
                             f"{'were' if len(given) > 1 else 'was'} given")
        return None, None
    if len(given) < 2:
        missing = [n for n in ("ref_chosen_logps", "ref_rejected_logps") if n not in given]
        raise ValueError(f"loss={loss.name!r} needs the reference model's per-sequence log-prob sums: "
                         f"{' and '.join(missing)} missing (compute them with simpo_kernels.sequence_logps)")
    B = rows // 2
    out = []
    for name, t in (("ref_chosen_logps", ref_chosen), ("ref_rejected_logps", ref_rejected)):
        _check_float(name, t)
        if tuple(t.shape) != (B,):
            raise ValueError(f"{name} must have shape [B] = [{B}] (one value per pair), got {list(t.shape)}")
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        out.append(t.detach().to(device=device, dtype=dtype, copy=True))
    return out[0], out[1]


def check_nll_labels(loss: PreferenceLoss, nll_labels, labels: torch.Tensor, rows: int, T: int, vocab_size: int,
                     ignore_index: int):
    """``nll_labels``: ``[B, T]`` integer labels of the chosen rows whose (shifted) positions form the
    NLL term instead of the targets (TRL's ORPO: the prompt and the response). They must agree with
    ``labels`` wherever both hold a target, and the loss must have an NLL term.

    Returns ``(union_labels [2B, T], nll_mask [2B, T] bool (shifted, rejected rows False),
    nll_tokens, union_counts)``: the labels every backend computes (targets, plus the NLL's
    positions of the chosen rows), with one host transfer of their statistics.
    """
    if loss.nll_weight <= 0:
        raise ValueError(f"nll_labels was given, but loss={loss.name!r} has no NLL term here "
                         f"(its weight {loss.nll_option or 'is fixed'} is 0)")
    if not isinstance(nll_labels, torch.Tensor):
        raise TypeError(f"nll_labels must be a torch.Tensor, got {type(nll_labels).__name__}")
    _refuse_dtensor("nll_labels", nll_labels)
    if nll_labels.dtype.is_floating_point or nll_labels.dtype.is_complex or nll_labels.dtype == torch.bool:
        raise TypeError(f"nll_labels must be an integer tensor, got {nll_labels.dtype}")
    B = rows // 2
    if tuple(nll_labels.shape) != (B, T):
        raise ValueError(f"nll_labels must have shape [B, T] = {[B, T]} (the chosen rows), got "
                         f"{list(nll_labels.shape)}")
    if nll_labels.device != labels.device:
        raise ValueError(f"nll_labels ({nll_labels.device}) and labels ({labels.device}) must be on one device")
    nll = nll_labels.long()
    lab = labels[:B].long()
    nll_valid = nll != ignore_index
    both = nll_valid & (lab != ignore_index)
    bad = nll_valid & ((nll < 0) | (nll >= vocab_size))
    nll_valid_shifted = nll_valid[:, 1:]
    union = torch.cat([torch.where(lab != ignore_index, lab, nll), labels[B:].long()])
    counts = (union != ignore_index)[:, 1:].sum(-1)
    stats = torch.cat([torch.stack([bad.any(), (both & (nll != lab)).any(), nll_valid_shifted.sum() == 0,
                                    nll_valid_shifted.sum()]).to(torch.int64), counts.to(torch.int64)]).tolist()
    if stats[0]:
        r, pos = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"nll_labels id {int(nll[r, pos])} at row {r}, position {pos} is outside "
                         f"[0, {vocab_size}) and is not ignore_index={ignore_index}")
    if stats[1]:
        r, pos = (int(v) for v in (both & (nll != lab)).nonzero()[0])
        raise ValueError(f"nll_labels and labels disagree at chosen row {r}, position {pos} ({int(nll[r, pos])} vs "
                         f"{int(lab[r, pos])}): where both hold a target it is the same token")
    if stats[2]:
        raise ValueError(f"nll_labels has no target token (nll_labels[:, 1:] are all ignore_index={ignore_index})")
    nll_mask = torch.zeros(rows, T, dtype=torch.bool, device=labels.device)
    nll_mask[:B, :-1] = nll_valid_shifted
    return union, nll_mask, int(stats[3]), stats[4:]


def _refuse_dtensor(name: str, t: torch.Tensor) -> None:
    # A DTensor here is a shard (FSDP2, tensor parallelism): the kernels would see only this rank's
    # rows, and `.full_tensor()` would all-gather it outside FSDP2's hooks, so its gradient would
    # never be reduce-scattered into the sharded parameter. Refuse it rather than guess.
    if type(t).__name__ != "DTensor":
        return
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        raise TypeError(
            f"{name} is a DTensor (placements {list(t.placements)}, global shape {list(t.shape)}): "
            f"it is still sharded where simpo_loss reads it. Compute the loss inside the forward of "
            f"the FSDP2 module that holds the lm_head (the root, or a group whose forward has run, "
            f"such as accelerate's [final norm, lm_head] group), where FSDP2 has all-gathered it; "
            f"never pass {name}.full_tensor(), whose gradient would not reach the shards")


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _refuse_dtensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def check_labels(labels: torch.Tensor, rows: int, T: int, vocab_size: int, ignore_index: int,
                 finite: Optional[torch.Tensor] = None, paired: bool = True,
                 what: str = "row") -> tuple[bool, list[int]]:
    """Labels: integer ``[rows, T]``, ids in ``[0, V)`` or ``ignore_index``, >= 1 target per row.

    ``finite`` (a 0-dim bool tensor from :func:`all_finite`) rides along in the same host transfer.
    Returns its Python bool (True when not given) and the number of target tokens of each row
    (``labels[:, 1:] != ignore_index``), which the schedules use to compact and chunk the batch
    without another host sync.
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    _refuse_dtensor("labels", labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.dim() != 2 or tuple(labels.shape) != (rows, T):
        raise ValueError(f"labels must have shape [{'2B' if paired else 'R'}, T] = {[rows, T]}, "
                         f"got {list(labels.shape)}")
    if T < 2:
        raise ValueError(f"sequences need at least 2 positions (position t predicts label t+1), got T={T}")
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab_size))
    targets_per_row = valid[:, 1:].sum(-1)
    flag = torch.ones(1, dtype=torch.int64, device=labels.device) if finite is None else \
        finite.reshape(1).to(device=labels.device, dtype=torch.int64)
    # one host transfer for all checks
    stats = torch.cat([bad.any(-1).to(torch.int64), targets_per_row.to(torch.int64), flag]).tolist()
    bad_rows, counts = stats[:rows], stats[rows:2 * rows]
    if any(bad_rows):
        r = bad_rows.index(1)
        pos = int(bad[r].nonzero()[0].item())
        raise ValueError(
            f"label id {int(labels[r, pos])} at {what} {r}, position {pos} is outside [0, {vocab_size}) "
            f"and is not ignore_index={ignore_index}")
    empty = [r for r, c in enumerate(counts) if c == 0]
    if empty:
        raise ValueError(
            f"{what} {empty[0]} has no target token (its labels after the first position are all "
            f"ignore_index={ignore_index}); {what}s without targets: {empty[:8]}{'...' if len(empty) > 8 else ''}")
    return bool(stats[-1]), counts


def check_pair_rows(rows: int, what: str) -> None:
    if rows == 0 or rows % 2:
        raise ValueError(
            f"{what} must have an even, non-zero number of rows (chosen rows first, then rejected), "
            f"got {rows}")


def check_hidden_inputs(
    hidden_states: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    labels: torch.Tensor, ignore_index: int, also_finite: tuple = (), paired: bool = True,
    packed: Optional[PackedLayout] = None,
) -> tuple[int, int, int, int, bool, list[int], torch.Tensor]:
    """Returns ``(rows, T, H, V, inputs_finite, target_counts, labels)``; ``inputs_finite`` is
    False when any element of hidden states, weight, bias or ``also_finite`` (reference values) is
    NaN or infinite (found in the labels' host transfer); ``target_counts[r]`` is row ``r``'s
    number of target tokens. ``paired=False`` accepts any number of rows (``sequence_logps``).

    ``packed`` (a packed batch's layout, :func:`check_packed_batch`): rows are its sequences and
    ``T`` the longest one, and ``labels`` come back unpacked onto that sequence grid; None:
    ``labels`` come back as given."""
    _check_float("hidden_states", hidden_states)
    _check_float("weight", weight)
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be [2B, T, H], got shape {list(hidden_states.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be the lm_head weight [V, H], got shape {list(weight.shape)}")
    rows, T, H = hidden_states.shape
    V, Hw = weight.shape
    if packed is not None:
        labels = packed.unpack(labels, ignore_index)
        rows, T = packed.num_sequences, packed.length
    if paired:
        check_pair_rows(rows, "hidden_states")
    elif rows == 0:
        raise ValueError("hidden_states has no rows")
    if Hw != H:
        raise ValueError(f"hidden size mismatch: hidden_states {list(hidden_states.shape)} has H={H} "
                         f"but weight {list(weight.shape)} has H={Hw}")
    if V == 0 or H == 0:
        raise ValueError(f"empty weight: shape {list(weight.shape)}")
    if weight.dtype != hidden_states.dtype:
        raise TypeError(f"hidden_states ({hidden_states.dtype}) and weight ({weight.dtype}) must have the "
                        f"same dtype; cast one of them explicitly")
    if bias is not None:
        _check_float("bias", bias)
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must have shape [V] = [{V}], got {list(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias ({bias.dtype}) must have the weight's dtype ({weight.dtype})")
    devices = {t.device for t in (hidden_states, weight, labels, bias) if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    finite, counts = check_labels(labels, rows, T, V, ignore_index,
                                  all_finite(hidden_states, weight, bias, *also_finite), paired=paired,
                                  what="row" if packed is None else "sequence")
    return rows, T, H, V, finite, counts, labels


def check_packed_batch(hidden_states, labels, sequence_ids, ignore_index: int,
                       paired: bool = True) -> Optional[PackedLayout]:
    """None for a padded batch (``sequence_ids`` None), else the packed batch's
    :class:`PackedLayout` (:func:`simpo_kernels.packed.check_sequence_ids`); ``hidden_states`` must
    then be ``[R, W, H]`` with ``labels`` and ``sequence_ids`` ``[R, W]``."""
    if sequence_ids is None:
        return None
    _check_float("hidden_states", hidden_states)
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be [R, W, H] (packed rows), got shape {list(hidden_states.shape)}")
    _refuse_dtensor("sequence_ids", sequence_ids)
    return check_sequence_ids(sequence_ids, labels, hidden_states.shape[0], hidden_states.shape[1], ignore_index,
                              paired)


def check_logits_inputs(logits: torch.Tensor, labels: torch.Tensor,
                        ignore_index: int, also_finite: tuple = ()) -> tuple[int, int, int, bool]:
    """Returns ``(rows, T, V, logits_finite)``."""
    _check_float("logits", logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [2B, T, V], got shape {list(logits.shape)}")
    rows, T, V = logits.shape
    check_pair_rows(rows, "logits")
    if V == 0:
        raise ValueError(f"empty vocabulary: logits shape {list(logits.shape)}")
    if isinstance(labels, torch.Tensor) and labels.device != logits.device:
        raise ValueError(f"logits ({logits.device}) and labels ({labels.device}) must be on one device")
    finite, _ = check_labels(labels, rows, T, V, ignore_index, all_finite(logits, *also_finite))
    return rows, T, V, finite


def all_finite(*tensors: Optional[torch.Tensor]) -> torch.Tensor:
    """0-dim bool tensor, True when every element of every given tensor is finite (no host sync by
    itself: :func:`check_labels` carries it to the host with the label statistics).

    Uses min/max reductions (which propagate NaN) rather than ``isfinite(t).all()`` so that no
    tensor of the input's size is allocated: the weight alone is ~1 GB of bools at Gemma-2 scale.
    """
    flags = []
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        lo, hi = torch.aminmax(t.detach())
        flags.append(torch.isfinite(lo) & torch.isfinite(hi))
    if not flags:
        return torch.tensor(True)
    out = flags[0]
    for f in flags[1:]:
        out = out & f
    return out


def refuse_double_backward(backend: str) -> None:
    """Called at the top of a custom backward: refuse ``create_graph=True`` instead of returning a
    first-order gradient that silently lacks its second-order term."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"backend={backend!r} does not support double backward (a backward with create_graph=True, "
            f"e.g. a Hessian-vector product or a gradient penalty through simpo_loss): its backward is a "
            f"hand-written first-order kernel. Use backend='eager', which is plain autograd and "
            f"differentiates twice.")
