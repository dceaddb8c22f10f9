"""The eager backend: the reference path, and the spec every other backend is tested against.

It does what the official trainer does (``model(...).logits`` -> softcap -> ``log_softmax`` ->
``gather``), materialising the full ``[N, V]`` logits. The lm_head matmul runs in the input dtype
(as ``nn.Linear`` does inside the model); everything after it runs in float32 (float64 for float64
inputs), which is the exact value the official bf16 pipeline approximates. Keeping ``nn.Linear``
semantics means float16 logits beyond 65504 overflow to inf (and the loss is NaN), exactly as the
official model's would; the ``torch`` and ``triton`` backends compute those logits in float32.
Being plain autograd, it is the one backend that supports double backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

BACKEND = "eager"


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Every float dtype on every device (the lm_head matmul follows ``nn.Linear``: in float16 it
    overflows to inf beyond 65504, as the official model's logits would)."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every narrower float type is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_softcap(z: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """Gemma-2 final-logit softcapping: ``s * tanh(z / s)``."""
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _logprobs_of_logits(z: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    logp = z.log_softmax(-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logp, 0.0), z.detach().sum(-1)


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    *, softcap: Optional[float], ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, H]``, ``[V, H]``, ``[V]``, ``[N]`` -> (logps ``[N]``, logit sums ``[N]``)."""
    z = F.linear(hidden, weight, bias).to(compute_dtype(hidden.dtype))
    return _logprobs_of_logits(apply_softcap(z, softcap), targets, ignore_index)


def token_logprobs_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, V]`` logits, ``[N]`` targets -> (logps ``[N]``, logit sums ``[N]``)."""
    return _logprobs_of_logits(logits.to(compute_dtype(logits.dtype)), targets, ignore_index)
