"""The preference objective on per-token log-probabilities: the single source of truth.

Every backend reduces ``hidden_states @ weight.T`` (or given logits) to two per-position
quantities, ``token_logps[n] = z_n[target_n] - logsumexp(z_n)`` (0 where the target is ignored)
and ``logit_sums[n] = sum_v z_n[v]`` (for the ``logits/*`` metrics), and hands them to
:func:`preference_objective`, which reduces them to per-sequence sums and counts and applies one
head of :mod:`simpo_kernels.losses` (each states its formula). For SimPO this is the official
SimPO trainer's semantics (princeton-nlp/SimPO ``scripts/simpo_trainer.py``) to the letter:

    a_i      = sum_t m_it * l_it / sum_t m_it                      (length-normalised logp)
    u_i      = beta * (a_chosen_i - a_rejected_i - gamma_beta_ratio)
    sigmoid:   loss_i = -(1 - eps) * logsigmoid(u_i) - eps * logsigmoid(-u_i)
    hinge:     loss_i = relu(1 - u_i)
    loss     = mean_i loss_i + sft_weight * NLL(chosen rows, token mean)
    rewards  = beta * a (detached)

Because everything here is ordinary autograd on ``[2B, T]`` tensors, the per-token upstream
gradient ``g_t = dL/dl_t`` that the fused backward kernels consume is exactly what autograd hands
to the backend's ``backward``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .losses import METRIC_NAMES, PairLogps, PreferenceLoss, SimPOLoss

LOSS_TYPES = SimPOLoss.loss_types
#: How the ``logits/*`` metrics are computed (see :func:`preference_objective`).
LOGIT_METRICS = ("exact", "targets", "none")


@dataclass
class SimPOOutput:
    """Result of :func:`simpo_kernels.simpo_loss` and :func:`simpo_kernels.preference_loss`
    (``PreferenceOutput`` is this class).

    Shapes use ``B`` = number of preference pairs (half the rows of the batch).

    Attributes:
        loss: scalar, differentiable: ``mean(losses) + w * sft_loss`` (``w``: the loss's NLL weight).
        losses: ``[B]`` per-pair loss (differentiable).
        chosen_logps, rejected_logps: ``[B]`` the loss's log-probabilities (differentiable):
            length-normalised for SimPO, sums for DPO, see :mod:`simpo_kernels.losses`.
        chosen_rewards, rejected_rewards: ``[B]`` the loss's rewards (SimPO: ``beta * logps``), detached.
        sft_loss: scalar chosen-row NLL (token mean) when the loss's NLL weight is > 0
            (``sft_weight``, ``rpo_alpha``, ``cpo_alpha``, ``nll_weight``; always for ORPO), else
            ``None``. Logged as ``nll_metric`` (``sft_loss`` for SimPO, ``nll_loss`` otherwise).
        chosen_logits_mean, rejected_logits_mean: scalar mean raw (softcapped) logit over the
            chosen / rejected rows, detached, as the official ``logits/*`` metrics define it
            (``logit_metrics="exact"``: every position, but with a SimPO SFT term every chosen
            position except the last, as the official trainer's code does); over their target
            positions only with ``logit_metrics="targets"``; ``None`` with ``logit_metrics="none"``.
        extra: further scalar metrics of the loss (ORPO: ``log_odds_ratio``, ``log_odds_chosen``).
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logits_mean: Optional[torch.Tensor]
    rejected_logits_mean: Optional[torch.Tensor]
    sft_loss: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)
    nll_metric: str = "sft_loss"

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """The official trainer's logged metrics (``prefix="eval_"`` in evaluation)."""
        return official_metrics(
            chosen_rewards=self.chosen_rewards, rejected_rewards=self.rejected_rewards,
            chosen_logps=self.chosen_logps, rejected_logps=self.rejected_logps,
            chosen_logits_mean=self.chosen_logits_mean, rejected_logits_mean=self.rejected_logits_mean,
            sft_loss=self.sft_loss, prefix=prefix, nll_metric=self.nll_metric, extra=self.extra)


#: The same class under the family's name.
PreferenceOutput = SimPOOutput


def official_metrics(
    *, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor, chosen_logits_mean: Optional[torch.Tensor],
    rejected_logits_mean: Optional[torch.Tensor], sft_loss: Optional[torch.Tensor] = None, prefix: str = "",
    nll_metric: str = "sft_loss", extra: Optional[dict] = None,
) -> dict[str, float]:
    """``{prefix + name: value}`` for :data:`METRIC_NAMES` (+ the NLL term, + a loss's extras), from
    ``[B]`` rewards and logps and scalar logit means, with one host transfer (this runs on every
    training step). The ``logits/*`` entries are left out when the logit means are None."""
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    values = [c.mean(), r.mean(), (c > r).to(c.dtype).mean(), (c - r).mean(),
              rejected_logps.detach().mean(), chosen_logps.detach().mean()]
    names = list(METRIC_NAMES[:6])
    if chosen_logits_mean is not None and rejected_logits_mean is not None:
        values += [rejected_logits_mean.detach(), chosen_logits_mean.detach()]
        names += list(METRIC_NAMES[6:])
    if sft_loss is not None:
        values.append(sft_loss.detach())
        names.append(nll_metric)
    for name, value in (extra or {}).items():
        values.append(value.detach())
        names.append(name)
    host = torch.stack([v.to(torch.float64) for v in values]).tolist()
    return {prefix + n: v for n, v in zip(names, host)}


def shift_targets(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``[R, T]`` labels -> ``[R, T]`` targets: position ``t`` predicts ``labels[t + 1]``.

    The last position of every row has no successor and gets ``ignore_index``; keeping it (rather
    than slicing it off) lets backends produce the logit sums of all ``T`` positions, which the
    official ``logits/*`` metrics average over.
    """
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


@dataclass(frozen=True)
class Objective:
    """A configured loss and this call's reference sums (``[B]`` each, or None): what a schedule
    needs to apply the head.

    ``nll_mask``: ``[2B, T]`` bool, the positions (in shifted-target coordinates, rejected rows all
    False) whose log-probs form the NLL term when they differ from the chosen rows' targets
    (``preference_loss(nll_labels=...)``); ``nll_tokens`` their number. None: the NLL term is over
    the chosen rows' targets.
    """

    loss: PreferenceLoss
    ref_chosen: Optional[torch.Tensor] = None
    ref_rejected: Optional[torch.Tensor] = None
    nll_mask: Optional[torch.Tensor] = None
    nll_tokens: int = 0

    def pairs(self, chosen_sums, chosen_counts, rejected_sums, rejected_counts, p0: int = 0,
              p1: Optional[int] = None) -> PairLogps:
        """The head's input for pairs ``p0..p1-1`` (the reference values sliced to match)."""
        ref_c = ref_r = None
        if self.ref_chosen is not None:
            ref_c, ref_r = self.ref_chosen[p0:p1], self.ref_rejected[p0:p1]
        return PairLogps(chosen_sums, chosen_counts, rejected_sums, rejected_counts, ref_c, ref_r)


def preference_objective(
    token_logps: torch.Tensor,
    targets: torch.Tensor,
    logit_sums: torch.Tensor,
    vocab_size: int,
    *,
    objective: Objective,
    ignore_index: int,
    inputs_finite: bool = True,
    logit_metrics: str = "exact",
    present: Optional[torch.Tensor] = None,
) -> SimPOOutput:
    """Apply ``objective`` to per-position quantities of a ``[2B, T]`` batch.

    Args:
        token_logps: ``[2B, T]`` log p(target) per position, 0 where ``targets == ignore_index``.
        targets: ``[2B, T]`` shifted labels (see :func:`shift_targets`).
        logit_sums: ``[2B, T]`` sum of the (softcapped) logits over the vocabulary per position.
        vocab_size: ``V``, to turn logit sums into the mean raw logit.
        objective: the loss and the reference sums (:class:`Objective`).
        inputs_finite: False when an input (hidden states, weight, bias, logits or a reference
            value) holds NaN or inf: every value of the result is then NaN. A softcap maps inf to a
            finite logit, and a backend that skips prompt positions never sees a NaN there, so
            without this a non-finite input could give a finite loss. (The gradients are poisoned
            by the caller, :mod:`simpo_kernels.api`.)
        logit_metrics: ``"exact"``: the official ``logits/*`` metrics, the mean logit over every
            position of the chosen / rejected rows (``logit_sums`` must hold every position).
            ``"targets"``: the mean over target positions only (only those entries of
            ``logit_sums`` are read). ``"none"``: no logit metrics (``logit_sums`` is not read).
        present: a packed batch's ``[2B, T]`` sequence grid (:mod:`simpo_kernels.packed`): True on
            the positions a sequence has. ``"exact"`` then averages those positions (a packed batch
            has no padding to average; the SFT term's last-column quirk has no counterpart).
            None: every position of a padded batch.
    """
    if not inputs_finite:
        token_logps = token_logps + float("nan")
        logit_sums = logit_sums + float("nan")
    loss_fn = objective.loss
    rows, T = token_logps.shape
    B = rows // 2
    mask = targets != ignore_index
    maskf = mask.to(token_logps.dtype)
    position_logps = token_logps  # every computed position (the NLL's may reach beyond the targets)
    token_logps = token_logps * maskf  # backends already zero these; makes the spec self-evident
    counts = maskf.sum(-1)
    sums = token_logps.sum(-1)
    out = loss_fn.head(objective.pairs(sums[:B], counts[:B], sums[B:], counts[B:]))
    loss = out.losses.mean()

    sft_loss = None
    if loss_fn.nll_weight > 0.0:
        # nn.CrossEntropyLoss over the chosen rows: mean of -l_t over their unmasked tokens.
        if objective.nll_mask is None:
            sft_loss = -sums[:B].sum() / counts[:B].sum()
        else:
            nll_mask = objective.nll_mask[:B].to(position_logps.dtype)
            sft_loss = -(position_logps[:B] * nll_mask).sum() / nll_mask.sum()
        loss = loss + loss_fn.nll_weight * sft_loss

    chosen_logits_mean = rejected_logits_mean = None
    if logit_metrics == "exact" and present is not None:
        real = torch.where(present, logit_sums.detach(), 0.0)
        n = present.sum(-1).to(real.dtype)
        chosen_logits_mean = real[:B].sum() / (n[:B].sum() * vocab_size)
        rejected_logits_mean = real[B:].sum() / (n[B:].sum() * vocab_size)
    elif logit_metrics == "exact":
        logit_sums = logit_sums.detach()
        drop_c, drop_r = loss_fn.logits_drop_last()
        Tc, Tr = T - drop_c, T - drop_r
        chosen_logits_mean = logit_sums[:B, :Tc].sum() / (B * Tc * vocab_size)
        rejected_logits_mean = logit_sums[B:, :Tr].sum() / (B * Tr * vocab_size)
    elif logit_metrics == "targets":
        # Target positions only (the last position is never one, so the SFT shift changes nothing).
        tsums = torch.where(mask, logit_sums.detach(), 0.0)
        chosen_logits_mean = tsums[:B].sum() / (counts[:B].sum() * vocab_size)
        rejected_logits_mean = tsums[B:].sum() / (counts[B:].sum() * vocab_size)
    elif logit_metrics != "none":  # validated earlier
        raise ValueError(f"unknown logit_metrics {logit_metrics!r}; expected one of {LOGIT_METRICS}")

    extra = out.extra
    if not inputs_finite:
        extra = {k: v + float("nan") for k, v in extra.items()}
    return SimPOOutput(
        loss=loss,
        losses=out.losses,
        chosen_logps=out.chosen_logps,
        rejected_logps=out.rejected_logps,
        chosen_rewards=out.chosen_rewards,
        rejected_rewards=out.rejected_rewards,
        chosen_logits_mean=chosen_logits_mean,
        rejected_logits_mean=rejected_logits_mean,
        sft_loss=sft_loss,
        extra=extra,
        nll_metric=loss_fn.nll_metric,
    )


def simpo_objective(token_logps: torch.Tensor, targets: torch.Tensor, logit_sums: torch.Tensor, vocab_size: int, *,
                    beta: float, gamma_beta_ratio: float, label_smoothing: float, loss_type: str, sft_weight: float,
                    ignore_index: int, inputs_finite: bool = True, logit_metrics: str = "exact") -> SimPOOutput:
    """:func:`preference_objective` with the SimPO loss (its options as keywords)."""
    loss = SimPOLoss(beta=beta, gamma_beta_ratio=gamma_beta_ratio, label_smoothing=label_smoothing,
                     loss_type=loss_type, sft_weight=sft_weight)
    return preference_objective(token_logps, targets, logit_sums, vocab_size, objective=Objective(loss),
                                ignore_index=ignore_index, inputs_finite=inputs_finite, logit_metrics=logit_metrics)


def sequence_logp_grads(
    chosen_sums: torch.Tensor, chosen_counts: torch.Tensor,
    rejected_sums: torch.Tensor, rejected_counts: torch.Tensor,
    *, num_pairs: int, chosen_tokens: Optional[int], objective: Objective, p0: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``d loss / d l_t`` for the tokens of ``b`` pairs (pairs ``p0..p0+b-1`` of the batch), where
    ``loss`` is :func:`preference_objective`'s.

    The gradient is pair-local: every target token ``t`` of a sequence gets the same value,

        chosen:   dL/ds_c - w / chosen_tokens
        rejected: dL/ds_r

    with ``s = sum_t l_t`` the sequence's sum, ``dL/ds`` the derivative of
    ``head(...).losses.sum() / num_pairs`` (taken by autograd through the loss's head, so each
    head has one definition), ``w`` the loss's NLL weight and ``chosen_tokens`` the batch's total
    number of chosen targets (the NLL term's normaliser). This is what lets the ``pairs`` schedule
    form exact gradients in the forward, a chunk of whole pairs at a time.

    Args:
        chosen_sums, rejected_sums: ``[b]`` sums of the target log-probabilities of each sequence.
        chosen_counts, rejected_counts: ``[b]`` their numbers of target tokens (same dtype).
        num_pairs: ``B``, the batch's number of pairs. chosen_tokens: see above; None leaves the NLL
            term out (the caller adds it per token when its positions are not the targets).

    Returns:
        ``(g_chosen [b], g_rejected [b])``: the per-token gradient of each sequence.
    """
    b = chosen_sums.shape[0]
    with torch.enable_grad():
        s_c = chosen_sums.detach().requires_grad_(True)
        s_r = rejected_sums.detach().requires_grad_(True)
        out = objective.loss.head(objective.pairs(s_c, chosen_counts, s_r, rejected_counts, p0, p0 + b))
        g_c, g_r = torch.autograd.grad(out.losses.sum() / num_pairs, (s_c, s_r))
    w = objective.loss.nll_weight
    if w > 0.0 and chosen_tokens is not None:
        g_c = g_c - w / chosen_tokens
    return g_c, g_r
