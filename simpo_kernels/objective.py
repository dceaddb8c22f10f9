"""The SimPO objective on per-token log-probabilities: the single source of truth.

Every backend reduces ``hidden_states @ weight.T`` (or given logits) to two per-position
quantities, ``token_logps[n] = z_n[target_n] - logsumexp(z_n)`` (0 where the target is ignored)
and ``logit_sums[n] = sum_v z_n[v]`` (for the ``logits/*`` metrics), and hands them to
:func:`simpo_objective`, which applies the official SimPO trainer's semantics
(princeton-nlp/SimPO ``scripts/simpo_trainer.py``) to the letter:

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
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge")
#: How the ``logits/*`` metrics are computed (see :func:`simpo_objective`).
LOGIT_METRICS = ("exact", "targets", "none")


@dataclass
class SimPOOutput:
    """Result of :func:`simpo_kernels.simpo_loss`.

    Shapes use ``B`` = number of preference pairs (half the rows of the batch).

    Attributes:
        loss: scalar, differentiable: ``mean(losses) + sft_weight * sft_loss``.
        losses: ``[B]`` per-pair SimPO loss (differentiable).
        chosen_logps, rejected_logps: ``[B]`` length-normalised log-probabilities (differentiable).
        chosen_rewards, rejected_rewards: ``[B]`` ``beta * logps``, detached.
        sft_loss: scalar chosen-row NLL (token mean) when ``sft_weight > 0``, else ``None``.
        chosen_logits_mean, rejected_logits_mean: scalar mean raw (softcapped) logit over the
            chosen / rejected rows, detached, as the official ``logits/*`` metrics define it
            (``logit_metrics="exact"``); over their target positions only with
            ``logit_metrics="targets"``; ``None`` with ``logit_metrics="none"``.
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

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """The official trainer's logged metrics (``prefix="eval_"`` in evaluation)."""
        return official_metrics(
            chosen_rewards=self.chosen_rewards, rejected_rewards=self.rejected_rewards,
            chosen_logps=self.chosen_logps, rejected_logps=self.rejected_logps,
            chosen_logits_mean=self.chosen_logits_mean, rejected_logits_mean=self.rejected_logits_mean,
            sft_loss=self.sft_loss, prefix=prefix)


#: The official trainer's metric names (``sft_loss`` is added when ``sft_weight > 0``).
METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/rejected", "logps/chosen", "logits/rejected", "logits/chosen")


def official_metrics(
    *, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor, chosen_logits_mean: Optional[torch.Tensor],
    rejected_logits_mean: Optional[torch.Tensor], sft_loss: Optional[torch.Tensor] = None, prefix: str = "",
) -> dict[str, float]:
    """``{prefix + name: value}`` for :data:`METRIC_NAMES` (+ ``sft_loss``), from ``[B]`` rewards and
    logps and scalar logit means, with one host transfer (this runs on every training step).
    The ``logits/*`` entries are left out when the logit means are None (``logit_metrics="none"``)."""
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    values = [c.mean(), r.mean(), (c > r).to(c.dtype).mean(), (c - r).mean(),
              rejected_logps.detach().mean(), chosen_logps.detach().mean()]
    names = list(METRIC_NAMES[:6])
    if chosen_logits_mean is not None and rejected_logits_mean is not None:
        values += [rejected_logits_mean.detach(), chosen_logits_mean.detach()]
        names += list(METRIC_NAMES[6:])
    if sft_loss is not None:
        values.append(sft_loss.detach())
        names.append("sft_loss")
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


def simpo_head(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    beta: float,
    gamma_beta_ratio: float,
    label_smoothing: float,
    loss_type: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official ``SimPOTrainer.simpo_loss``: ``[B]`` logps -> (losses, chosen_rewards, rejected_rewards)."""
    logits = (chosen_logps - rejected_logps) - gamma_beta_ratio
    if loss_type == "sigmoid":
        losses = (
            -F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:  # validated earlier; kept so the head never silently computes something else
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()


def simpo_objective(
    token_logps: torch.Tensor,
    targets: torch.Tensor,
    logit_sums: torch.Tensor,
    vocab_size: int,
    *,
    beta: float,
    gamma_beta_ratio: float,
    label_smoothing: float,
    loss_type: str,
    sft_weight: float,
    ignore_index: int,
    inputs_finite: bool = True,
    logit_metrics: str = "exact",
) -> SimPOOutput:
    """Apply the SimPO objective to per-position quantities of a ``[2B, T]`` batch.

    Args:
        token_logps: ``[2B, T]`` log p(target) per position, 0 where ``targets == ignore_index``.
        targets: ``[2B, T]`` shifted labels (see :func:`shift_targets`).
        logit_sums: ``[2B, T]`` sum of the (softcapped) logits over the vocabulary per position.
        vocab_size: ``V``, to turn logit sums into the mean raw logit.
        inputs_finite: False when an input (hidden states, weight, bias or logits) holds NaN or inf:
            every value of the result is then NaN. A softcap maps inf to a finite logit, and a
            backend that skips prompt positions never sees a NaN there, so without this a
            non-finite input could give a finite loss. (The gradients are poisoned by the caller,
            :mod:`simpo_kernels.api`.)
        logit_metrics: ``"exact"``: the official ``logits/*`` metrics, the mean logit over every
            position of the chosen / rejected rows (``logit_sums`` must hold every position).
            ``"targets"``: the mean over target positions only (only those entries of
            ``logit_sums`` are read). ``"none"``: no logit metrics (``logit_sums`` is not read).
    """
    if not inputs_finite:
        token_logps = token_logps + float("nan")
        logit_sums = logit_sums + float("nan")
    rows, T = token_logps.shape
    B = rows // 2
    mask = targets != ignore_index
    maskf = mask.to(token_logps.dtype)
    token_logps = token_logps * maskf  # backends already zero these; makes the spec self-evident
    counts = maskf.sum(-1)
    avg = token_logps.sum(-1) / counts
    chosen_logps, rejected_logps = avg[:B], avg[B:]
    losses, chosen_rewards, rejected_rewards = simpo_head(
        chosen_logps, rejected_logps, beta=beta, gamma_beta_ratio=gamma_beta_ratio,
        label_smoothing=label_smoothing, loss_type=loss_type,
    )
    loss = losses.mean()

    sft_loss = None
    if sft_weight > 0.0:
        # nn.CrossEntropyLoss over the chosen rows: mean of -l_t over their unmasked tokens.
        sft_loss = -token_logps[:B].sum() / counts[:B].sum()
        loss = loss + sft_weight * sft_loss

    chosen_logits_mean = rejected_logits_mean = None
    if logit_metrics == "exact":
        logit_sums = logit_sums.detach()
        # The official trainer reassigns the chosen logits to their shifted view [:, :-1] before
        # logging them, so with an SFT term logits/chosen excludes the last position.
        Tc = T - 1 if sft_weight > 0.0 else T
        chosen_logits_mean = logit_sums[:B, :Tc].sum() / (B * Tc * vocab_size)
        rejected_logits_mean = logit_sums[B:].sum() / (B * T * vocab_size)
    elif logit_metrics == "targets":
        # Target positions only (the last position is never one, so the SFT shift changes nothing).
        sums = torch.where(mask, logit_sums.detach(), 0.0)
        chosen_logits_mean = sums[:B].sum() / (counts[:B].sum() * vocab_size)
        rejected_logits_mean = sums[B:].sum() / (counts[B:].sum() * vocab_size)
    elif logit_metrics != "none":  # validated earlier
        raise ValueError(f"unknown logit_metrics {logit_metrics!r}; expected one of {LOGIT_METRICS}")

    return SimPOOutput(
        loss=loss,
        losses=losses,
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        chosen_logits_mean=chosen_logits_mean,
        rejected_logits_mean=rejected_logits_mean,
        sft_loss=sft_loss,
    )


def sequence_logp_grads(
    chosen_sums: torch.Tensor, chosen_counts: torch.Tensor,
    rejected_sums: torch.Tensor, rejected_counts: torch.Tensor,
    *, num_pairs: int, chosen_tokens: int, beta: float, gamma_beta_ratio: float,
    label_smoothing: float, loss_type: str, sft_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``d loss / d l_t`` for the tokens of ``b`` pairs, where ``loss`` is :func:`simpo_objective`'s.

    The gradient is pair-local: every target token ``t`` of a sequence gets the same value,

        chosen:   dL/da_c / n_c - sft_weight / chosen_tokens
        rejected: dL/da_r / n_r

    with ``a = sum_t l_t / n`` the length-normalised log-probability, ``dL/da`` the derivative of
    ``simpo_head(...)[0].sum() / num_pairs`` (taken by autograd through :func:`simpo_head`, so the
    head has one definition) and ``chosen_tokens`` the batch's total number of chosen targets (the
    SFT term's normaliser). This is what lets the ``pairs`` schedule form exact gradients in the
    forward, a chunk of whole pairs at a time.

    Args:
        chosen_sums, rejected_sums: ``[b]`` sums of the target log-probabilities of each sequence.
        chosen_counts, rejected_counts: ``[b]`` their numbers of target tokens (same dtype).
        num_pairs: ``B``, the batch's number of pairs. chosen_tokens: see above.

    Returns:
        ``(g_chosen [b], g_rejected [b])``: the per-token gradient of each sequence.
    """
    with torch.enable_grad():
        a_c = (chosen_sums / chosen_counts).detach().requires_grad_(True)
        a_r = (rejected_sums / rejected_counts).detach().requires_grad_(True)
        losses, _, _ = simpo_head(a_c, a_r, beta=beta, gamma_beta_ratio=gamma_beta_ratio,
                                  label_smoothing=label_smoothing, loss_type=loss_type)
        g_c, g_r = torch.autograd.grad(losses.sum() / num_pairs, (a_c, a_r))
    g_c = g_c / chosen_counts
    if sft_weight > 0.0:
        g_c = g_c - sft_weight / chosen_tokens
    return g_c, g_r / rejected_counts
