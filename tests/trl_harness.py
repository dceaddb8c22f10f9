"""Call TRL's own loss code on given per-sequence log-probabilities (tests only import trl).

TRL 1.16 has the losses inside trainer methods, so each is called unbound with a stand-in
``self`` that carries exactly the attributes the method reads:

* CPO: ``trl.experimental.cpo.CPOTrainer.cpo_loss(self, chosen_logps, rejected_logps)``;
* ORPO: ``trl.experimental.orpo.ORPOTrainer.odds_ratio_loss(self, chosen_logps, rejected_logps)``
  (it casts its inputs to float32);
* DPO: no standalone function; the loss lives in ``DPOTrainer._compute_loss(self, model, inputs,
  return_outputs)``. :func:`trl_dpo` runs it with ``precompute_ref_logps=True`` (the reference
  sums as input columns) and a stand-in model whose output carries the per-token ``log_probs``
  ``[2B, T-1]`` (0 at masked positions, so that TRL's plain sum over the sequence is the policy's
  sum), ``mean_logits`` (for ``logits/*``), ``entropy`` and ``is_top1``. RPO (DPO + NLL) is TRL's
  loss list ``["sigmoid", "sft"]`` with weights ``[1, rpo_alpha]``.

An accelerator stub on one process gathers by identity.
"""

from __future__ import annotations

from collections import defaultdict
from types import MethodType, SimpleNamespace
from typing import Optional

import torch


class _Accelerator:
    """One process: gathering is the identity."""

    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def gather_for_metrics(x):
        return x


def trl_cpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, *, beta: float = 0.1,
                 label_smoothing: float = 0.0, loss_type: str = "sigmoid", simpo_gamma: float = 0.5):
    """TRL's ``CPOTrainer.cpo_loss`` on ``[B]`` logps -> ``(losses, chosen_rewards, rejected_rewards)``."""
    from trl.experimental.cpo import CPOTrainer

    self = SimpleNamespace(beta=beta, label_smoothing=label_smoothing, loss_type=loss_type,
                           simpo_gamma=simpo_gamma, alpha=0.0, accelerator=_Accelerator())
    return CPOTrainer.cpo_loss(self, chosen_logps, rejected_logps)


def trl_orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, *, beta: float = 0.1):
    """TRL's ``ORPOTrainer.odds_ratio_loss`` on ``[B]`` mean logps -> ``(beta * logsigmoid(log_odds)
    [B], chosen_rewards, rejected_rewards, mean logsigmoid(log_odds), mean log_odds)``; TRL's loss
    is ``nll - mean(first)``."""
    from trl.experimental.orpo import ORPOTrainer

    self = SimpleNamespace(beta=beta, accelerator=_Accelerator())
    return ORPOTrainer.odds_ratio_loss(self, chosen_logps, rejected_logps)


def trl_dpo(per_token_logps: torch.Tensor, mask: torch.Tensor, ref_chosen_logps: torch.Tensor,
            ref_rejected_logps: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
            label_smoothing: float = 0.0, rpo_alpha: float = 0.0,
            mean_logits: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
    """TRL's ``DPOTrainer._compute_loss`` on per-token target log-probs.

    Args:
        per_token_logps: ``[2B, T-1]`` target log-probs of positions ``0..T-2`` (predicting labels
            ``1..T-1``), chosen rows first.
        mask: ``[2B, T-1]`` bool, the target positions (TRL's shifted completion mask).
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference sums.
        mean_logits: ``[2B, T-1]`` per-position mean logit (default zeros).

    Returns ``(loss, metrics)`` with TRL's metric names -> float (its ``_metrics["train"]``).
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    R, Tm1 = per_token_logps.shape
    # completion_mask [2B, T]: position 0 is never a completion token of a shifted target
    completion = torch.cat([torch.zeros(R, 1, dtype=torch.long), mask.long()], dim=1)
    zeros = torch.zeros(R, Tm1, dtype=per_token_logps.dtype)
    outputs = SimpleNamespace(log_probs=per_token_logps * mask, entropy=zeros,
                              mean_logits=zeros if mean_logits is None else mean_logits,
                              is_top1=torch.zeros(R, Tm1, dtype=torch.bool))

    def model(**kwargs):
        assert kwargs.get("fused_lm_head") is True
        return outputs

    loss_types, weights = [loss_type], [1.0]
    if rpo_alpha:
        loss_types, weights = [loss_type, "sft"], [1.0, rpo_alpha]
    self = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=loss_types,
        loss_weights=weights, beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(R, Tm1 + 1, dtype=torch.long), "attention_mask": torch.ones(R, Tm1 + 1),
              "completion_mask": completion, "ref_chosen_logps": ref_chosen_logps,
              "ref_rejected_logps": ref_rejected_logps}
    loss = DPOTrainer._compute_loss(self, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in self._metrics["train"].items()}


def _paired_batch(labels: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> dict:
    """TRL's CPO/ORPO batch dict from ``[2B, T]`` labels (chosen rows first); ``input_ids`` are the
    labels with ignored positions set to token 0 (only ORPO's NLL reads them)."""
    B = labels.shape[0] // 2
    ids = labels.clamp_min(0)
    mask = torch.ones_like(labels) if attention_mask is None else attention_mask
    return {"chosen_input_ids": ids[:B], "chosen_attention_mask": mask[:B], "chosen_labels": labels[:B],
            "rejected_input_ids": ids[B:], "rejected_attention_mask": mask[B:], "rejected_labels": labels[B:]}


def _logits_model(logits: torch.Tensor):
    def model(input_ids, attention_mask=None, use_cache=False, **kwargs):
        assert input_ids.shape == logits.shape[:2]
        return SimpleNamespace(logits=logits)
    return model


def trl_cpo_batch(logits: torch.Tensor, labels: torch.Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0,
                  loss_type: str = "sigmoid", simpo_gamma: float = 0.5, cpo_alpha: float = 1.0):
    """TRL's whole ``CPOTrainer.get_batch_loss_metrics`` on given logits ``[2B, T, V]`` (its own
    ``concatenated_forward``: get_batch_logps, the NLL by ``nn.CrossEntropyLoss``, the metrics) ->
    ``(loss, metrics)``."""
    from trl.experimental.cpo import CPOTrainer

    self = SimpleNamespace(beta=beta, label_smoothing=label_smoothing, loss_type=loss_type, simpo_gamma=simpo_gamma,
                           alpha=0.0, cpo_alpha=cpo_alpha, accelerator=_Accelerator(), is_encoder_decoder=False,
                           pad_token_id=0, aux_loss_enabled=False, concatenated_inputs=CPOTrainer.concatenated_inputs,
                           get_batch_logps=CPOTrainer.get_batch_logps)
    self.concatenated_forward = MethodType(CPOTrainer.concatenated_forward, self)
    self.cpo_loss = MethodType(CPOTrainer.cpo_loss, self)
    return CPOTrainer.get_batch_loss_metrics(self, _logits_model(logits), _paired_batch(labels, None))


def trl_orpo_batch(logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor, *, beta: float = 0.1):
    """TRL's whole ``ORPOTrainer.get_batch_loss_metrics`` on given logits -> ``(loss, metrics)``.
    TRL's NLL covers the positions the attention mask keeps (prompt and response in TRL's data)."""
    from trl.experimental.orpo import ORPOTrainer

    self = SimpleNamespace(beta=beta, accelerator=_Accelerator(), is_encoder_decoder=False, padding_value=0,
                           aux_loss_enabled=False, concatenated_inputs=ORPOTrainer.concatenated_inputs,
                           get_batch_logps=ORPOTrainer.get_batch_logps)
    self.concatenated_forward = MethodType(ORPOTrainer.concatenated_forward, self)
    self.odds_ratio_loss = MethodType(ORPOTrainer.odds_ratio_loss, self)
    return ORPOTrainer.get_batch_loss_metrics(self, _logits_model(logits), _paired_batch(labels, attention_mask))


def trl_available() -> Optional[str]:
    """None when trl imports, else the reason it does not."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # trl.experimental's import-time notice
            import trl  # noqa: F401
            from trl.experimental.cpo import CPOTrainer  # noqa: F401
            from trl.experimental.orpo import ORPOTrainer  # noqa: F401
            from trl.trainer.dpo_trainer import DPOTrainer  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: cannot compare
        return f"trl is not importable: {type(exc).__name__}: {exc}"
    return None
