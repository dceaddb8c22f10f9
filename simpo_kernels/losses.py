"""The paired preference-loss family: one small class per loss, its formula in its docstring.

Every loss here is a function of per-sequence quantities only, which is why one no-logits path
serves them all: the backends produce per-token target log-probabilities, the objective
(:func:`simpo_kernels.objective.preference_objective`) reduces them to

    s = sum_t m_t l_t      (per sequence)        n = sum_t m_t      a = s / n
    NLL = - sum_{chosen rows} s / sum_{chosen rows} n   (token mean, as nn.CrossEntropyLoss)

and a head below turns the ``[B]`` pairs ``(s_c, n_c, s_r, n_r)`` (plus the reference model's sums
``r_c, r_r`` where the loss needs them) into ``[B]`` per-pair losses. The batch loss is

    loss = mean_i losses_i + w * NLL        (w = the loss's NLL weight; 0 leaves NLL out)

Each head is pair-local given the reference values, so the ``pairs`` schedule forms exact
gradients in the forward for all of them (:func:`simpo_kernels.objective.sequence_logp_grads`).

Reference values are always per-sequence SUMS of target log-probabilities (what
:func:`simpo_kernels.sequence_logps` returns and TRL's ``precompute_ref_log_probs`` writes);
length-normalised losses divide them by the policy's token count (the same tokens).

Formulas and defaults follow the official trainers: princeton-nlp/SimPO's ``SimPOTrainer`` for
``simpo``; TRL 1.16's ``DPOTrainer`` (``dpo``), ``CPOTrainer`` (``cpo``) and ``ORPOTrainer``
(``orpo``); the SimPO paper's table of objectives for ``rdpo``, ``rrhf`` and ``slic``, whose NLL
term is the same token-mean cross-entropy the official trainers use. KTO is not here: it is an
unpaired loss whose reference point needs a KL estimate over mismatched prompt/completion pairs,
a batch layout other than ``[chosen rows; rejected rows]``.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

#: The official logged metric names every loss shares (``logits/*`` only when computed).
METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/rejected", "logps/chosen", "logits/rejected", "logits/chosen")


@dataclass
class PairLogps:
    """Per-pair inputs of a head (``[b]`` each; counts in the sums' dtype).

    ``ref_chosen`` / ``ref_rejected`` are the reference model's sums, or None for losses without
    a reference."""

    chosen_sums: torch.Tensor
    chosen_counts: torch.Tensor
    rejected_sums: torch.Tensor
    rejected_counts: torch.Tensor
    ref_chosen: Optional[torch.Tensor] = None
    ref_rejected: Optional[torch.Tensor] = None

    @property
    def chosen_means(self) -> torch.Tensor:
        return self.chosen_sums / self.chosen_counts

    @property
    def rejected_means(self) -> torch.Tensor:
        return self.rejected_sums / self.rejected_counts


@dataclass
class HeadOutput:
    """What a head returns: ``[b]`` differentiable ``losses``, ``chosen_logps``/``rejected_logps``
    (the loss's reported log-probs: sums or means), detached ``[b]`` rewards, and ``extra``: scalar
    metrics beyond the shared ones (detached)."""

    losses: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    extra: dict = field(default_factory=dict)


def _sigmoid_loss(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Bradley-Terry with conservative label smoothing (cDPO): ``-(1-eps) logsig(x) - eps logsig(-x)``."""
    return -F.logsigmoid(x) * (1 - eps) - F.logsigmoid(-x) * eps


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _caller_level() -> int:
    """``stacklevel`` that points a warning at the first frame outside this package (the user's
    call, however deep the library's own calls are)."""
    package = os.path.dirname(__file__)
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def real_number(name: str, value, what: str = "a real number") -> float:
    """Any real number (Python, NumPy or other ``numbers.Real`` scalar) -> float; never a bool
    (``numpy.bool_`` is not a ``numbers.Real``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return float(value)


class PreferenceLoss:
    """Base class: holds a loss's validated options; subclasses state one formula each.

    Class attributes a subclass sets:
        name: the ``loss=`` name. defaults: option -> default (the options the loss accepts).
        loss_types: accepted ``loss_type`` values (first is the default) when it has that option.
        needs_reference: whether ``ref_chosen_logps``/``ref_rejected_logps`` are required.
        nll_option: the option holding the chosen-NLL weight (None: no NLL term, or see
            :attr:`nll_weight`). nll_metric: its logged name.
        official_logit_metrics: the ``logits/*`` definition of the loss's official trainer.
        label_smoothing_types: loss types that use ``label_smoothing`` (others warn and ignore it,
            as the official trainers do).
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict] = {}
    loss_types: ClassVar[tuple] = ()
    needs_reference: ClassVar[bool] = False
    nll_option: ClassVar[Optional[str]] = None
    nll_metric: ClassVar[str] = "nll_loss"
    official_logit_metrics: ClassVar[str] = "exact"
    label_smoothing_types: ClassVar[tuple] = ()
    #: options that must be > 0 / >= 0 (the rest: any finite real)
    positive: ClassVar[tuple] = ("beta",)
    non_negative: ClassVar[tuple] = ()

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise TypeError(f"unexpected option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for "
                            f"loss={self.name!r}; its options are {', '.join(self.defaults)}")
        merged = dict(self.defaults, **options)
        checked = {}
        for key, value in merged.items():
            if key == "loss_type":
                if not isinstance(value, str) or value not in self.loss_types:
                    raise ValueError(f"unknown loss_type {value!r} for loss={self.name!r}; "
                                     f"expected one of {self.loss_types}")
                checked[key] = value
                continue
            value = real_number(key, value)
            if not math.isfinite(value):
                raise ValueError(f"{key} must be finite, got {value}")
            if key in self.positive and value <= 0:
                raise ValueError(f"{key} must be > 0, got {value}")
            if key in self.non_negative and value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
            checked[key] = value
        self.options = checked
        self._check()

    def _check(self) -> None:
        """Cross-option checks (label smoothing by default)."""
        eps = self.options.get("label_smoothing")
        if eps is None:
            return
        if not 0.0 <= eps <= 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5], got {eps}")
        loss_type = self.options.get("loss_type")
        if eps > 0 and loss_type not in self.label_smoothing_types:
            # As the official trainers: the loss type ignores it; say so rather than stay silent.
            warnings.warn(f"You are using the {loss_type} loss type that does not support label smoothing; "
                          "label_smoothing is ignored.", UserWarning, stacklevel=_caller_level())

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"

    def __getattr__(self, key):  # options read as attributes: loss.beta
        options = self.__dict__.get("options", {})
        if key in options:
            return options[key]
        raise AttributeError(key)

    @property
    def nll_weight(self) -> float:
        """Weight ``w`` of the chosen-row NLL term in ``loss`` (0: the term is not computed)."""
        return self.options[self.nll_option] if self.nll_option else 0.0

    def logits_drop_last(self) -> tuple[bool, bool]:
        """Whether ``logits/chosen`` / ``logits/rejected`` (``"exact"``) leave out each row's last
        position, as the loss's official trainer slices its logits before logging them."""
        return False, False

    def metric_names(self, logit_metrics: Optional[str] = None) -> list[str]:
        """The names :meth:`SimPOOutput.metrics` returns for this loss (without prefix)."""
        lm = self.official_logit_metrics if logit_metrics is None else logit_metrics
        names = [n for n in METRIC_NAMES if lm != "none" or not n.startswith("logits/")]
        if self.nll_weight > 0:
            names.append(self.nll_metric)
        return names + list(self.extra_metrics)

    #: names of :attr:`HeadOutput.extra` entries logged as metrics
    extra_metrics: ClassVar[tuple] = ()

    def head(self, p: PairLogps) -> HeadOutput:
        raise NotImplementedError


class SimPOLoss(PreferenceLoss):
    """SimPO (official ``SimPOTrainer``): length-normalised, no reference.

        u = beta * (a_c - a_r - gamma_beta_ratio)
        sigmoid: -(1-eps) logsigmoid(u) - eps logsigmoid(-u)       hinge: relu(1 - u)
        loss = mean + sft_weight * NLL;   rewards = beta * a
    """

    name = "simpo"
    defaults = {"beta": 2.0, "gamma_beta_ratio": 0.25, "label_smoothing": 0.0, "loss_type": "sigmoid",
                "sft_weight": 0.0}
    loss_types = ("sigmoid", "hinge")
    label_smoothing_types = ("sigmoid",)
    nll_option = "sft_weight"
    nll_metric = "sft_loss"
    non_negative = ("sft_weight",)

    def logits_drop_last(self) -> tuple[bool, bool]:
        # The official trainer reassigns the chosen logits to their shifted view [:, :-1] before
        # logging them, so with an SFT term logits/chosen excludes the last position.
        return self.nll_weight > 0, False

    def head(self, p: PairLogps) -> HeadOutput:
        o = self.options
        a_c, a_r = p.chosen_means, p.rejected_means
        logits = (a_c - a_r) - o["gamma_beta_ratio"]
        if o["loss_type"] == "sigmoid":
            losses = _sigmoid_loss(o["beta"] * logits, o["label_smoothing"])
        else:
            losses = torch.relu(1 - o["beta"] * logits)
        return HeadOutput(losses, a_c, a_r, o["beta"] * a_c.detach(), o["beta"] * a_r.detach())


class DPOLoss(PreferenceLoss):
    """DPO and its loss types (TRL ``DPOTrainer``), sums against a reference model.

        d   = (s_c - r_c) - (s_r - r_r)                     (r: the reference's sums)
        d_n = (s_c - r_c) / n_c - (s_r - r_r) / n_r         (length-normalised)
        sigmoid:      -(1-eps) logsigmoid(beta d) - eps logsigmoid(-beta d)
        hinge:        relu(1 - beta d)
        robust:       (-(1-eps) logsigmoid(beta d) + eps logsigmoid(-beta d)) / (1 - 2 eps)
        ipo:          (d_n - 1 / (2 beta))^2                 (TRL's per-token normalisation)
        sigmoid_norm: -logsigmoid(beta d_n)
        loss = mean + rpo_alpha * NLL;   rewards = beta * (s - r);   logps = s

    ``eps`` (label_smoothing) is TRL's for ``robust``; for ``sigmoid`` it is conservative DPO
    (cDPO), which TRL 1.16 dropped: at its default 0 both agree.
    """

    name = "dpo"
    defaults = {"beta": 0.1, "label_smoothing": 0.0, "loss_type": "sigmoid", "rpo_alpha": 0.0}
    loss_types = ("sigmoid", "hinge", "ipo", "robust", "sigmoid_norm")
    label_smoothing_types = ("sigmoid", "robust")
    needs_reference = True
    nll_option = "rpo_alpha"
    non_negative = ("rpo_alpha",)
    official_logit_metrics = "targets"

    def _check(self) -> None:
        super()._check()
        if self.options["loss_type"] == "robust" and self.options["label_smoothing"] >= 0.5:
            raise ValueError("loss_type='robust' divides by 1 - 2 * label_smoothing: label_smoothing must be "
                             f"< 0.5, got {self.options['label_smoothing']}")

    def head(self, p: PairLogps) -> HeadOutput:
        o = self.options
        beta, eps, kind = o["beta"], o["label_smoothing"], o["loss_type"]
        ratio_c, ratio_r = p.chosen_sums - p.ref_chosen, p.rejected_sums - p.ref_rejected
        d = ratio_c - ratio_r
        if kind == "sigmoid":
            losses = _sigmoid_loss(beta * d, eps)
        elif kind == "hinge":
            losses = torch.relu(1 - beta * d)
        elif kind == "robust":
            losses = (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1 - 2 * eps)
        else:
            d_n = ratio_c / p.chosen_counts - ratio_r / p.rejected_counts
            losses = (d_n - 1 / (2 * beta)) ** 2 if kind == "ipo" else -F.logsigmoid(beta * d_n)
        return HeadOutput(losses, p.chosen_sums, p.rejected_sums, beta * ratio_c.detach(), beta * ratio_r.detach())


class RDPOLoss(PreferenceLoss):
    """R-DPO (Park et al. 2024; the SimPO paper's table): DPO with a length regulariser.

        u = beta * ((s_c - r_c) - (s_r - r_r)) + alpha * (n_c - n_r)
        losses = -logsigmoid(u);   rewards = beta * (s - r);   logps = s

    A longer chosen response raises ``u``, so length alone earns less of the gradient.
    """

    name = "rdpo"
    defaults = {"beta": 0.1, "alpha": 0.05}
    needs_reference = True
    official_logit_metrics = "targets"

    def head(self, p: PairLogps) -> HeadOutput:
        beta, alpha = self.options["beta"], self.options["alpha"]
        ratio_c, ratio_r = p.chosen_sums - p.ref_chosen, p.rejected_sums - p.ref_rejected
        u = beta * (ratio_c - ratio_r) + alpha * (p.chosen_counts - p.rejected_counts)
        return HeadOutput(-F.logsigmoid(u), p.chosen_sums, p.rejected_sums,
                          beta * ratio_c.detach(), beta * ratio_r.detach())


class CPOLoss(PreferenceLoss):
    """CPO (TRL ``CPOTrainer``), no reference; ``loss_type="simpo"`` with ``cpo_alpha`` is CPO-SimPO.

        x = s_c - s_r            (sigmoid, hinge)     x = a_c - a_r   (ipo, simpo: means)
        sigmoid: -(1-eps) logsigmoid(beta x) - eps logsigmoid(-beta x)     hinge: relu(1 - beta x)
        ipo:     (x - 1 / (2 beta))^2
        simpo:   sigmoid on x - simpo_gamma / beta
        loss = mean + cpo_alpha * NLL;   rewards = beta * logps (sums or means as x)
    """

    name = "cpo"
    defaults = {"beta": 0.1, "label_smoothing": 0.0, "loss_type": "sigmoid", "simpo_gamma": 0.5,
                "cpo_alpha": 1.0}
    loss_types = ("sigmoid", "hinge", "ipo", "simpo")
    label_smoothing_types = ("sigmoid", "simpo")
    nll_option = "cpo_alpha"
    non_negative = ("cpo_alpha",)

    def head(self, p: PairLogps) -> HeadOutput:
        o = self.options
        beta, eps, kind = o["beta"], o["label_smoothing"], o["loss_type"]
        if kind in ("ipo", "simpo"):
            lc, lr = p.chosen_means, p.rejected_means
        else:
            lc, lr = p.chosen_sums, p.rejected_sums
        x = lc - lr
        if kind == "sigmoid":
            losses = _sigmoid_loss(beta * x, eps)
        elif kind == "simpo":
            losses = _sigmoid_loss(beta * (x - o["simpo_gamma"] / beta), eps)
        elif kind == "hinge":
            losses = torch.relu(1 - beta * x)
        else:
            losses = (x - 1 / (2 * beta)) ** 2
        return HeadOutput(losses, lc, lr, beta * lc.detach(), beta * lr.detach())


class ORPOLoss(PreferenceLoss):
    """ORPO (TRL ``ORPOTrainer``): odds ratio on the length-normalised log-probs, NLL always on.

        log_odds = (a_c - a_r) - (log(1 - exp(a_c)) - log(1 - exp(a_r)))
        losses = -beta * logsigmoid(log_odds);   loss = NLL + mean(losses)
        rewards = beta * a;   metrics log_odds_ratio = mean logsigmoid(log_odds),
        log_odds_chosen = mean log_odds

    TRL's ORPO NLL covers the chosen rows' prompt and response tokens: pass
    ``nll_labels=input_ids[:B]`` with ``ignore_index`` on padding to ``preference_loss`` for that
    (the default, the response tokens only, is the ORPO paper's L_SFT). Its ``logits/*`` leave out
    each row's last position (TRL logs ``logits[:, :-1]``).
    """

    name = "orpo"
    defaults = {"beta": 0.1}
    extra_metrics = ("log_odds_ratio", "log_odds_chosen")

    @property
    def nll_weight(self) -> float:
        return 1.0

    def logits_drop_last(self) -> tuple[bool, bool]:
        return True, True

    def head(self, p: PairLogps) -> HeadOutput:
        beta = self.options["beta"]
        a_c, a_r = p.chosen_means, p.rejected_means
        log_odds = (a_c - a_r) - (_log1mexp(a_c) - _log1mexp(a_r))
        ratio = F.logsigmoid(log_odds)
        extra = {"log_odds_ratio": ratio.detach().mean(), "log_odds_chosen": log_odds.detach().mean()}
        return HeadOutput(-beta * ratio, a_c, a_r, beta * a_c.detach(), beta * a_r.detach(), extra)


class RRHFLoss(PreferenceLoss):
    """RRHF (Yuan et al. 2023; the SimPO paper's table) on a pair: ranking hinge on means + NLL.

        losses = relu(a_r - a_c);   loss = mean + nll_weight * NLL;   rewards = logps = a
    """

    name = "rrhf"
    defaults = {"nll_weight": 1.0}
    positive = ()
    non_negative = ("nll_weight",)
    nll_option = "nll_weight"

    def head(self, p: PairLogps) -> HeadOutput:
        a_c, a_r = p.chosen_means, p.rejected_means
        return HeadOutput(torch.relu(a_r - a_c), a_c, a_r, a_c.detach(), a_r.detach())


class SLiCLoss(PreferenceLoss):
    """SLiC-HF (Zhao et al. 2023; the SimPO paper's table): calibration hinge on sums + NLL.

        losses = relu(delta - s_c + s_r);   loss = mean + nll_weight * NLL;   rewards = logps = s
    """

    name = "slic"
    defaults = {"delta": 1.0, "nll_weight": 1.0}
    positive = ()
    non_negative = ("nll_weight",)
    nll_option = "nll_weight"

    def head(self, p: PairLogps) -> HeadOutput:
        s_c, s_r = p.chosen_sums, p.rejected_sums
        losses = torch.relu(self.options["delta"] - s_c + s_r)
        return HeadOutput(losses, s_c, s_r, s_c.detach(), s_r.detach())


#: ``loss=`` name -> class.
LOSSES: dict[str, type] = {cls.name: cls for cls in (SimPOLoss, DPOLoss, RDPOLoss, CPOLoss, ORPOLoss, RRHFLoss,
                                                      SLiCLoss)}


def make_loss(loss, options: dict) -> PreferenceLoss:
    """``loss`` (a name in :data:`LOSSES` or a :class:`PreferenceLoss`) and its options -> instance."""
    if isinstance(loss, PreferenceLoss):
        if options:
            raise TypeError(f"loss is already a configured {type(loss).__name__}; options "
                            f"{', '.join(sorted(options))} cannot be given beside it")
        return loss
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {tuple(LOSSES)} or a PreferenceLoss "
                         "(KTO is unpaired and not part of this family)")
    return LOSSES[loss](**options)
