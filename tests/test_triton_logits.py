"""Logits-input Triton kernels (``simpo_loss_from_logits(..., backend="triton")``) vs float64.

The gradient must come back in the logits' dtype; fp16 gradients are rounded once from float32,
hence the 2e-3 tolerance there (measured ~3e-4); float32 is held to 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from simpo_kernels import simpo_loss_from_logits
from tests.reference import reference_from_logits
from tests.triton_helpers import DEVICE, FORWARD_KEYS, TOL, check, make_batch, poison_uninitialized

kernels = pytest.importorskip("simpo_kernels.kernels")

CASES = [  # (name, B, T, V, prefix, logit scale, beta); interpreter logits block: 64
    ("tiny_V_lt_block", 1, 2, 13, 0, 2.0, 2.0),
    ("V150", 2, 9, 150, 3, 6.0, 2.0),
    ("long_prefix", 2, 13, 77, 10, 3.0, 2.0),
    # Large logits give |logps| ~ 40-80; a small beta keeps the pair loss O(0.1): at beta=2 it
    # would be ~1e-36, whose relative error is the absolute error of the margin (ill-conditioned
    # for every backend, torch included), not a property of the kernels.
    ("peaked", 1, 7, 200, 1, 25.0, 0.05),
]
OPTIONS = dict(gamma_beta_ratio=0.25, sft_weight=0.3)


def _logits(B, T, V, dtype, prefix, scale, seed):
    _, _, _, labels = make_batch(B, T, 17, V, torch.float32, prefix=prefix, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    logits = (torch.randn(2 * B, T, V, generator=g) * scale).to(DEVICE, dtype)
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_from_logits_matches_reference(case, dtype):
    name, B, T, V, prefix, scale, beta = case
    options = dict(OPTIONS, beta=beta)
    logits, labels = _logits(B, T, V, dtype, prefix, scale, seed=2)
    z = logits.clone().requires_grad_()
    with poison_uninitialized():  # torch.empty* return NaN: an unwritten gradient entry fails
        out = simpo_loss_from_logits(z, labels, backend="triton", **options)
        out.loss.backward()
    zr = logits.detach().double().cpu().requires_grad_()
    ref = reference_from_logits(zr, labels.cpu(), **options)
    ref["loss"].backward()
    for key in FORWARD_KEYS + ("sft_loss",):
        check(f"logits/{name}/{dtype}", key, getattr(out, key), ref[key], TOL[dtype]["fwd"])
    assert z.grad.dtype == dtype and z.grad.shape == logits.shape
    check(f"logits/{name}/{dtype}", "d_logits", z.grad, zr.grad, TOL[dtype]["grad"])
    # positions without a target get exactly zero gradient
    no_target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1) == -100
    assert (z.grad[no_target] == 0).all()


@pytest.mark.parametrize("block_v", [16, 32, 256])
def test_from_logits_block_sizes(block_v):
    g = torch.Generator().manual_seed(7)
    N, V = 21, 99
    logits = (torch.randn(N, V, generator=g) * 4).to(DEVICE).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    targets[5:9] = -3
    up = torch.randn(N, generator=g).to(DEVICE)
    logps, sums = kernels.token_logprobs_from_logits(logits, targets, ignore_index=-3, logits_block_v=block_v)
    (grad,) = torch.autograd.grad((logps * up).sum(), (logits,))
    zr = logits.detach().double().requires_grad_()
    ref = torch.where(targets >= 0, zr.log_softmax(-1).gather(1, targets.clamp_min(0)[:, None])[:, 0], 0.0)
    (rgrad,) = torch.autograd.grad((ref * up.double()).sum(), (zr,))
    check(f"logits/block{block_v}", "token_logps", logps, ref, 1e-5)
    check(f"logits/block{block_v}", "logit_sums", sums, zr.detach().sum(-1), 1e-5)
    check(f"logits/block{block_v}", "d_logits", grad, rgrad, 1e-5)
    assert not sums.requires_grad


def test_from_logits_non_contiguous_rows():
    """A row-strided view (e.g. a slice of a wider buffer) is read in place."""
    g = torch.Generator().manual_seed(8)
    base = torch.randn(10, 90, generator=g).to(DEVICE)
    logits = base[:, :70].requires_grad_()
    targets = torch.randint(0, 70, (10,), generator=g).to(DEVICE)
    logps, _ = kernels.token_logprobs_from_logits(logits, targets, ignore_index=-100)
    ref = logits.detach().double().log_softmax(-1).gather(1, targets[:, None])[:, 0]
    check("logits/strided", "token_logps", logps, ref, 1e-5)


def test_from_logits_float64_rejected():
    logits = torch.randn(2, 3, 10, dtype=torch.float64, device=DEVICE)
    labels = torch.randint(0, 10, (2, 3), device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        simpo_loss_from_logits(logits, labels, backend="triton")
