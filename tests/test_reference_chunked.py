"""The chunked float64 reference (``tests/reference.py: reference_simpo_chunked``, the GPU campaign's
reference at the Gemma-2-9B shape) equals the full-logits float64 reference and its autograd
gradients to 1e-12 relative (measured ~1e-15), on random inputs with odd shapes, every option."""

from __future__ import annotations

import pytest
import torch

from tests.reference import reference_simpo, reference_simpo_chunked, rel_err


@pytest.mark.parametrize("opts", [
    dict(softcap=30.0),
    dict(softcap=None, bias=True),
    dict(softcap=5.0, bias=True, sft_weight=0.7, label_smoothing=0.1),
    dict(softcap=None, loss_type="hinge", beta=0.3, gamma_beta_ratio=0.7),
])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 1000])
def test_chunked_reference_equals_full_reference(opts, chunk_tokens):
    g = torch.Generator().manual_seed(sum(map(ord, repr(opts))) + chunk_tokens)
    R, T, H, V = 6, 11, 13, 37
    opts = dict(opts)
    hidden = torch.randn(R, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 2.0
    bias = torch.randn(V, generator=g, dtype=torch.float64) if opts.pop("bias", False) else None
    labels = torch.randint(0, V, (R, T), generator=g)
    for r in range(R):  # prompts of different lengths, padding on some rows
        labels[r, : 1 + r % 4] = -100
        if r % 3 == 2:
            labels[r, T - 2:] = -100
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    b = None if bias is None else bias.clone().requires_grad_(True)
    full = reference_simpo(h, w, labels, bias=b, **opts)
    grads = torch.autograd.grad(full["loss"], [t for t in (h, w, b) if t is not None])
    before = [t.clone() for t in (hidden, weight, labels)]
    got = reference_simpo_chunked(hidden, weight, labels, bias=bias, chunk_tokens=chunk_tokens, **opts)
    assert all(torch.equal(a, c) for a, c in zip(before, (hidden, weight, labels)))
    tol = 1e-12
    for key in ("loss", "losses", "chosen_logps", "rejected_logps") + (("sft_loss",) if "sft_weight" in opts else ()):
        assert rel_err(got[key], full[key]) < tol, key
    assert rel_err(got["dhidden"], grads[0]) < tol
    assert rel_err(got["dweight"], grads[1]) < tol
    if bias is not None:
        assert rel_err(got["dbias"], grads[2]) < tol
    # a test that can fail: a wrong softcap moves the loss far beyond the tolerance
    other = reference_simpo_chunked(hidden, weight, labels, bias=bias, chunk_tokens=chunk_tokens,
                                    **dict(opts, softcap=(opts.get("softcap") or 50.0) / 2))
    assert rel_err(other["dweight"], grads[1]) > 1e-3
