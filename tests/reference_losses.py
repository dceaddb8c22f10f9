"""An independent float64 implementation of the preference-loss family (DESIGN section 6b).

Written from the formulas of the official trainers (TRL 1.16's ``DPOTrainer._compute_loss``,
``CPOTrainer.cpo_loss``/``concatenated_forward``, ``ORPOTrainer.odds_ratio_loss``, the SimPO
trainer and the SimPO paper's table for R-DPO, RRHF and SLiC-HF), following their code paths
(shift the labels, mask, per-sequence sum or mean of the target log-probabilities,
``nn.CrossEntropyLoss`` token mean over the chosen rows for the NLL term, ``logits.mean()`` for the
metrics), from full float64 logits ``[2B, T, V]``. It shares no code with ``simpo_kernels``; the
only helper it takes from :mod:`tests.reference` is the float64 logits (``reference_logits``).

Notation (per pair i): ``s`` the SUM of the target log-probabilities of a row, ``n`` its number of
targets, ``a = s / n``, ``r`` the reference model's SUM for that row (given), ``NLL`` the token mean
of ``-log p`` over every target of the chosen rows. ``loss = mean_i losses_i + w * NLL`` with ``w``
the loss's NLL weight (sft_weight, rpo_alpha, cpo_alpha, 1 for orpo, nll_weight).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.reference import reference_logits

#: Each loss's options and defaults, as the spec states them (issue 25, CONTEXT.md).
DEFAULTS = {
    "simpo": dict(beta=2.0, gamma_beta_ratio=0.25, label_smoothing=0.0, loss_type="sigmoid", sft_weight=0.0),
    "dpo": dict(beta=0.1, label_smoothing=0.0, loss_type="sigmoid", rpo_alpha=0.0),
    "rdpo": dict(beta=0.1, alpha=0.05),
    "cpo": dict(beta=0.1, label_smoothing=0.0, loss_type="sigmoid", simpo_gamma=0.5, cpo_alpha=1.0),
    "orpo": dict(beta=0.1),
    "rrhf": dict(nll_weight=1.0),
    "slic": dict(delta=1.0, nll_weight=1.0),
}
#: Losses that take the reference model's per-sequence sums.
NEEDS_REFERENCE = ("dpo", "rdpo")
#: The option that weighs the chosen NLL term (None: always weight 1).
NLL_OPTION = {"simpo": "sft_weight", "dpo": "rpo_alpha", "rdpo": None, "cpo": "cpo_alpha", "orpo": None,
              "rrhf": "nll_weight", "slic": "nll_weight"}
#: Official ``logits/*`` definition: every position, or the completion (target) positions.
DEFAULT_LOGIT_METRICS = {"simpo": "exact", "cpo": "exact", "orpo": "exact", "rrhf": "exact", "slic": "exact",
                         "dpo": "targets", "rdpo": "targets"}
BASE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/rejected", "logps/chosen", "logits/rejected", "logits/chosen")


def nll_weight(loss: str, options: dict) -> float:
    """The weight of the chosen NLL term of ``loss`` under ``options`` (defaults filled in)."""
    name = NLL_OPTION[loss]
    if name is None:
        return 1.0 if loss == "orpo" else 0.0
    return float({**DEFAULTS[loss], **options}[name])


def target_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """``get_batch_logps`` of the official trainers in float64: ``logits [R, T, V]`` -> per-token
    target log-probabilities ``[R, T-1]`` (0 where masked) and the mask ``[R, T-1]``."""
    lab = labels[:, 1:].clone()
    lg = logits.to(torch.float64)[:, :-1, :]
    mask = lab != ignore_index
    lab[~mask] = 0  # a dummy id; masked below
    per_token = torch.gather(lg.log_softmax(-1), 2, lab.unsqueeze(2)).squeeze(2)
    return per_token * mask, mask


def reference_sums(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """Per-row SUM of target log-probs ``[R]`` (float64) and counts ``[R]`` (int64)."""
    per_token, mask = target_logps(logits, labels, ignore_index)
    return per_token.sum(-1), mask.sum(-1)


def _logsig(x):
    return F.logsigmoid(x)


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(a))`` for ``a < 0``, in the two-branch stable form (Maechler 2012)."""
    return torch.where(a > -math.log(2), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def _smoothed_sigmoid(x, beta, eps):
    return -(1 - eps) * _logsig(beta * x) - eps * _logsig(-beta * x)


def pair_losses(loss: str, s_c, s_r, n_c, n_r, r_c=None, r_r=None, **options):
    """The per-pair head of ``loss`` on float64 ``[B]`` sums/counts (and reference sums).

    Returns ``(losses, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards, extras)``
    where ``*_logps`` is the quantity the loss reports (sums or means) and ``extras`` a dict of
    additional scalar metrics (orpo).
    """
    o = {**DEFAULTS[loss], **options}
    n_c, n_r = n_c.to(torch.float64), n_r.to(torch.float64)
    a_c, a_r = s_c / n_c, s_r / n_r
    extras = {}
    if loss == "simpo":
        beta, eps = o["beta"], o["label_smoothing"]
        z = (a_c - a_r) - o["gamma_beta_ratio"]
        if o["loss_type"] == "sigmoid":
            losses = _smoothed_sigmoid(z, beta, eps)
        elif o["loss_type"] == "hinge":
            losses = torch.relu(1 - beta * z)
        else:
            raise ValueError(o["loss_type"])
        return losses, a_c, a_r, beta * a_c.detach(), beta * a_r.detach(), extras
    if loss in ("dpo", "rdpo"):
        beta = o["beta"]
        lr_c, lr_r = s_c - r_c, s_r - r_r  # log-ratios against the reference (sums)
        d = lr_c - lr_r
        if loss == "rdpo":
            losses = -_logsig(beta * d + o["alpha"] * (n_c - n_r))
        else:
            eps, lt = o["label_smoothing"], o["loss_type"]
            d_n = lr_c / n_c - lr_r / n_r  # TRL's length normalisation: the policy's token counts
            if lt == "sigmoid":
                losses = _smoothed_sigmoid(d, beta, eps)
            elif lt == "hinge":
                losses = torch.relu(1 - beta * d)
            elif lt == "ipo":
                losses = (d_n - 1 / (2 * beta)) ** 2
            elif lt == "robust":
                losses = (-(1 - eps) * _logsig(beta * d) + eps * _logsig(-beta * d)) / (1 - 2 * eps)
            elif lt == "sigmoid_norm":
                losses = -_logsig(beta * d_n)
            else:
                raise ValueError(lt)
        return losses, s_c, s_r, beta * lr_c.detach(), beta * lr_r.detach(), extras
    if loss == "cpo":
        beta, eps, lt = o["beta"], o["label_smoothing"], o["loss_type"]
        x_c, x_r = (a_c, a_r) if lt in ("ipo", "simpo") else (s_c, s_r)
        x = x_c - x_r
        if lt == "sigmoid":
            losses = _smoothed_sigmoid(x, beta, eps)
        elif lt == "hinge":
            losses = torch.relu(1 - beta * x)
        elif lt == "ipo":
            losses = (x - 1 / (2 * beta)) ** 2
        elif lt == "simpo":
            losses = _smoothed_sigmoid(x - o["simpo_gamma"] / beta, beta, eps)
        else:
            raise ValueError(lt)
        return losses, x_c, x_r, beta * x_c.detach(), beta * x_r.detach(), extras
    if loss == "orpo":
        beta = o["beta"]
        log_odds = (a_c - a_r) - (_log1mexp(a_c) - _log1mexp(a_r))
        ratio = _logsig(log_odds)
        extras = {"log_odds_ratio": ratio.detach().mean(), "log_odds_chosen": log_odds.detach().mean()}
        return -beta * ratio, a_c, a_r, beta * a_c.detach(), beta * a_r.detach(), extras
    if loss == "rrhf":
        return torch.relu(a_r - a_c), a_c, a_r, a_c.detach(), a_r.detach(), extras
    if loss == "slic":
        return torch.relu(o["delta"] - s_c + s_r), s_c, s_r, s_c.detach(), s_r.detach(), extras
    raise ValueError(loss)


def reference_preference_from_logits(logits: torch.Tensor, labels: torch.Tensor, *, loss: str = "simpo",
                                     ref_chosen_logps: Optional[torch.Tensor] = None,
                                     ref_rejected_logps: Optional[torch.Tensor] = None,
                                     ignore_index: int = -100, logit_metrics: Optional[str] = None,
                                     nll_labels: Optional[torch.Tensor] = None, **options) -> dict:
    """``logits [2B, T, V]`` (any float dtype, kept differentiable) -> dict of float64 results:
    ``loss``, ``losses``, ``chosen_logps``, ``rejected_logps``, ``chosen_rewards``,
    ``rejected_rewards``, ``chosen_logits_mean``, ``rejected_logits_mean`` (None for
    ``logit_metrics="none"``), ``nll`` (the chosen NLL, or None when its weight is 0), the extras
    (orpo's ``log_odds_ratio``, ``log_odds_chosen``), ``sums``/``counts`` ``[2B]`` and
    ``metrics`` (the official metric names -> float)."""
    unknown = set(options) - set(DEFAULTS[loss])
    if unknown:
        raise TypeError(f"reference: unknown options {unknown} for {loss}")
    o = {**DEFAULTS[loss], **options}
    all_logits = logits.to(torch.float64)
    B = all_logits.shape[0] // 2
    per_token, mask = target_logps(all_logits, labels, ignore_index)
    sums, counts = per_token.sum(-1), mask.sum(-1)
    r_c = r_r = None
    if loss in NEEDS_REFERENCE:
        r_c, r_r = ref_chosen_logps.detach().to(torch.float64), ref_rejected_logps.detach().to(torch.float64)
    losses, c_logps, r_logps, c_rew, r_rew, extras = pair_losses(
        loss, sums[:B], sums[B:], counts[:B], counts[B:], r_c, r_r, **o)
    total = losses.mean()
    w = nll_weight(loss, o)
    nll = None
    if w > 0:
        # nn.CrossEntropyLoss over the chosen rows, shifted: the official trainers' code path
        ch = all_logits[:B, :-1, :].contiguous()
        nll_lab = labels[:B] if nll_labels is None else nll_labels  # TRL's ORPO: prompt + response
        nll = nn.CrossEntropyLoss(ignore_index=ignore_index)(ch.view(-1, ch.shape[-1]),
                                                             nll_lab[:, 1:].reshape(-1))
        total = total + w * nll
    mode = logit_metrics or DEFAULT_LOGIT_METRICS[loss]
    det = all_logits.detach()
    if mode == "none":
        c_mean = r_mean = None
    elif mode == "targets":  # TRL 1.16 DPOTrainer: mean over the completion (target) positions
        c_mean, r_mean = det[:B, :-1][mask[:B]].mean(), det[B:, :-1][mask[B:]].mean()
    elif mode == "exact":
        # every position; the SimPO trainer with sft_weight > 0 replaces the chosen logits by
        # logits[..., :-1, :] before the metric (its code path; issue 25 item 5)
        # TRL's ORPOTrainer logs all_logits[:, :-1] on both sides
        chosen = det[:B, :-1] if (loss == "simpo" and w > 0) or loss == "orpo" else det[:B]
        rejected = det[B:, :-1] if loss == "orpo" else det[B:]
        c_mean, r_mean = chosen.mean(), rejected.mean()
    else:
        raise ValueError(mode)
    metrics = {"rewards/chosen": c_rew.mean(), "rewards/rejected": r_rew.mean(),
               "rewards/accuracies": (c_rew > r_rew).to(torch.float64).mean(),
               "rewards/margins": (c_rew - r_rew).mean(),
               "logps/rejected": r_logps.detach().mean(), "logps/chosen": c_logps.detach().mean()}
    if c_mean is not None:
        metrics.update({"logits/rejected": r_mean, "logits/chosen": c_mean})
    if nll is not None:
        metrics["sft_loss" if loss == "simpo" else "nll_loss"] = nll.detach()
    metrics.update(extras)
    return dict(loss=total, losses=losses, chosen_logps=c_logps, rejected_logps=r_logps,
                chosen_rewards=c_rew, rejected_rewards=r_rew, chosen_logits_mean=c_mean,
                rejected_logits_mean=r_mean, nll=nll, sums=sums, counts=counts, **extras,
                metrics={k: float(v) for k, v in metrics.items()})


def reference_preference(hidden, weight, labels, *, bias=None, softcap=None, **kwargs) -> dict:
    """:func:`reference_preference_from_logits` on float64 logits of ``hidden [2B, T, H]``,
    ``weight [V, H]`` (optional ``bias [V]``, Gemma-2 ``softcap``), differentiable."""
    return reference_preference_from_logits(reference_logits(hidden, weight, bias, softcap), labels, **kwargs)
