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
    # simpo_loss (official)
    z = (chosen_logps - rejected_logps) - gamma_beta_ratio
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * z) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * z) * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    else:
        raise ValueError(loss_type)
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


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative norm error ``|a - b| / max(|b|, tiny)`` computed in float64."""
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
