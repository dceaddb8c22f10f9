"""An independent float64 implementation of the SimPO objective (DESIGN section 1).

Written to follow the official trainer's code path line by line (``get_batch_logps``,
``simpo_loss``, ``nn.CrossEntropyLoss`` for the SFT term, ``logits.mean()`` for the metrics) and
deliberately sharing no code with ``simpo_kernels``, so that every backend is checked against
something it could disagree with.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def reference_from_logits(logits, labels, *, beta=2.0, gamma_beta_ratio=0.25, label_smoothing=0.0,
                          loss_type="sigmoid", sft_weight=0.0, ignore_index=-100):
    """``logits [2B, T, V]`` (any float dtype, kept differentiable) -> dict of float64 results."""
    all_logits = logits.to(torch.float64)
    B = all_logits.shape[0] // 2
    # get_batch_logps (official)
    lab = labels[:, 1:].clone()
    lg = all_logits[:, :-1, :]
    loss_mask = lab != ignore_index
    lab[lab == ignore_index] = 0
    per_token = torch.gather(lg.log_softmax(-1), dim=2, index=lab.unsqueeze(2)).squeeze(2)
    all_logps = (per_token * loss_mask).sum(-1) / loss_mask.sum(-1)
    chosen_logps, rejected_logps = all_logps[:B], all_logps[B:]
    losses = _simpo_losses(chosen_logps, rejected_logps, beta, gamma_beta_ratio, label_smoothing, loss_type)
    loss = losses.mean()
    chosen_logits, rejected_logits = all_logits[:B], all_logits[B:]
    out = {}
    if sft_weight > 0:
        chosen_logits = chosen_logits[..., :-1, :].contiguous()
        chosen_labels = labels[:B][..., 1:].clone()
        sft = nn.CrossEntropyLoss(ignore_index=ignore_index)(
            chosen_logits.view(-1, chosen_logits.shape[-1]), chosen_labels.reshape(-1))
        loss = sft_weight * sft + loss
        out["sft_loss"] = sft
    out.update(
        loss=loss, losses=losses, chosen_logps=chosen_logps, rejected_logps=rejected_logps,
        chosen_rewards=beta * chosen_logps.detach(), rejected_rewards=beta * rejected_logps.detach(),
        chosen_logits_mean=chosen_logits.detach().mean(),
        rejected_logits_mean=rejected_logits.detach().mean(),
    )
    return out


def _simpo_losses(chosen_logps, rejected_logps, beta, gamma_beta_ratio, label_smoothing, loss_type):
    """The official ``simpo_loss`` per pair."""
    z = (chosen_logps - rejected_logps) - gamma_beta_ratio
    if loss_type == "sigmoid":
        return (-F.logsigmoid(beta * z) * (1 - label_smoothing)
                - F.logsigmoid(-beta * z) * label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - beta * z)
    raise ValueError(loss_type)


def reference_logits(hidden, weight, bias=None, softcap=None):
    """Float64 logits ``[2B, T, V]`` with the Gemma-2 softcap, differentiable."""
    z = hidden.to(torch.float64) @ weight.to(torch.float64).T
    if bias is not None:
        z = z + bias.to(torch.float64)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def reference_simpo(hidden, weight, labels, *, bias=None, softcap=None, **options):
    """Float64 SimPO from hidden states ``[2B, T, H]`` and weight ``[V, H]``."""
    return reference_from_logits(reference_logits(hidden, weight, bias, softcap), labels, **options)


class _TargetRows:
    """The target positions of ``hidden [R, T, H]`` / ``labels [R, T]`` in float64, ``chunk_tokens``
    at a time, for the chunked reference's two passes (the loss depends on no other position)."""

    def __init__(self, hidden, weight, labels, bias, softcap, ignore_index, chunk_tokens):
        R, T, H = hidden.shape
        self.shape, self.softcap, self.chunk = (R, T, H), softcap, chunk_tokens
        self.h64 = hidden.detach().reshape(R * T, H).to(torch.float64)
        self.w64 = weight.detach().to(torch.float64).requires_grad_(True)
        self.b64 = None if bias is None else bias.detach().to(torch.float64).requires_grad_(True)
        tgt = torch.full((R, T), ignore_index, dtype=torch.long, device=hidden.device)
        tgt[:, :-1] = labels[:, 1:]
        self.tgt = tgt.reshape(-1)
        self.idx = (self.tgt != ignore_index).nonzero().squeeze(1)
        self.row_of = self.idx // T

    def chunks(self):
        """``(flat positions, their rows)`` per chunk."""
        for s in range(0, self.idx.numel(), self.chunk):
            yield self.idx[s:s + self.chunk], self.row_of[s:s + self.chunk]

    def logps(self, h, i):
        """float64 logits (bias, softcap), ``log_softmax``, the target's log-probability."""
        z = reference_logits(h, self.w64, self.b64, self.softcap)
        return z.log_softmax(-1).gather(1, self.tgt[i][:, None]).squeeze(1)


def reference_row_sums_chunked(hidden, weight, labels, *, bias=None, softcap=None, ignore_index=-100,
                               chunk_tokens=1024):
    """Pass 1 of the chunked reference: per-row ``(sums [R], counts [R])`` float64 of the target
    log-probabilities, no gradient, no ``[R, T, V]`` tensor."""
    rows = _TargetRows(hidden, weight, labels, bias, softcap, ignore_index, chunk_tokens)
    R = rows.shape[0]
    sums = torch.zeros(R, dtype=torch.float64, device=hidden.device)
    with torch.no_grad():
        for i, r in rows.chunks():
            sums.index_add_(0, r, rows.logps(rows.h64[i], i))
    counts = torch.zeros(R, dtype=torch.float64, device=hidden.device).index_add_(
        0, rows.row_of, torch.ones_like(rows.row_of, dtype=torch.float64))
    return sums, counts


def reference_row_grads_chunked(hidden, weight, labels, g_sums, *, bias=None, softcap=None, ignore_index=-100,
                                chunk_tokens=1024):
    """Pass 2 of the chunked reference: the float64 gradients of ``sum_r g_sums[r] * sums[r]``
    (``g_sums = dL/dsum`` per row, from a head applied to pass 1's sums) w.r.t. hidden states,
    weight and bias: ``(dhidden [R, T, H], dweight [V, H], dbias [V] | None)``."""
    rows = _TargetRows(hidden, weight, labels, bias, softcap, ignore_index, chunk_tokens)
    g_sums = g_sums.detach().to(device=hidden.device, dtype=torch.float64)
    dh = torch.zeros_like(rows.h64)
    for i, r in rows.chunks():
        h = rows.h64[i].requires_grad_(True)
        (rows.logps(h, i) * g_sums[r]).sum().backward()
        dh.index_copy_(0, i, h.grad)
    dw = rows.w64.grad if rows.w64.grad is not None else torch.zeros_like(rows.w64)
    return dh.view(rows.shape), dw.detach(), None if rows.b64 is None else rows.b64.grad


def reference_simpo_chunked(hidden, weight, labels, *, bias=None, softcap=None, beta=2.0, gamma_beta_ratio=0.25,
                            label_smoothing=0.0, loss_type="sigmoid", sft_weight=0.0, ignore_index=-100,
                            chunk_tokens=1024):
    """:func:`reference_simpo` and its gradients in float64 without a ``[2B, T, V]`` tensor: the
    float64 reference at shapes where the full logits do not fit (Gemma-2-9B on one GPU).

    Runs on the inputs' device, ``chunk_tokens`` target positions at a time, in two passes over the
    target positions only (the loss does not depend on the others):

    1. no gradient: float64 logits (bias, softcap), ``log_softmax``, the target's log-probability;
       per-row sums and counts (:func:`reference_row_sums_chunked`);
    2. the head (:func:`_simpo_losses`, the SFT term as the mean negative log-probability of the
       chosen rows' targets) by autograd on the per-row sums gives ``dL/dsum`` per row; then per
       chunk the same logits with autograd, backpropagated with those weights into dH rows and the
       float64 ``dW`` (and ``dbias``) accumulators (:func:`reference_row_grads_chunked`).

    Returns a float64 dict: ``loss``, ``losses``, ``chosen_logps``, ``rejected_logps`` (and
    ``sft_loss`` when ``sft_weight > 0``), ``dhidden [2B, T, H]``, ``dweight [V, H]``, ``dbias``.
    """
    B = hidden.shape[0] // 2
    where = dict(bias=bias, softcap=softcap, ignore_index=ignore_index, chunk_tokens=chunk_tokens)
    sums, counts = reference_row_sums_chunked(hidden, weight, labels, **where)
    sums.requires_grad_(True)
    logps = sums / counts
    losses = _simpo_losses(logps[:B], logps[B:], beta, gamma_beta_ratio, label_smoothing, loss_type)
    loss = losses.mean()
    out = {}
    if sft_weight > 0:
        sft = -sums[:B].sum() / counts[:B].sum()
        loss = sft_weight * sft + loss
        out["sft_loss"] = sft.detach()
    (g_sums,) = torch.autograd.grad(loss, sums)
    dh, dw, db = reference_row_grads_chunked(hidden, weight, labels, g_sums, **where)
    out.update(loss=loss.detach(), losses=losses.detach(), chosen_logps=logps[:B].detach(),
               rejected_logps=logps[B:].detach(), dhidden=dh, dweight=dw, dbias=db)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative norm error ``|a - b| / max(|b|, tiny)`` computed in float64."""
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
