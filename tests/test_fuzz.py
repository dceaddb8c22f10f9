"""Hypothesis fuzz: random shapes and options, torch and eager backends vs the float64 reference."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .reference import rel_err
from .test_api import VALUE_KEYS, run_backend, run_reference

TOL = 1e-10  # float64 everywhere


@st.composite
def problems(draw):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(2, 12))
    H = draw(st.integers(1, 20))
    V = draw(st.integers(2, 70))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 1.0, 4.0]))
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    bias = torch.randn(V, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    for r in range(2 * B):
        start = draw(st.integers(1, T - 1))        # first target position
        stop = draw(st.integers(start + 1, T))     # exclusive end of the response
        labels[r, :start] = -100
        labels[r, stop:] = -100
    loss_type = draw(st.sampled_from(["sigmoid", "hinge"]))
    opts = dict(
        beta=draw(st.floats(0.1, 20.0)),
        gamma_beta_ratio=draw(st.floats(-1.0, 2.0)),
        label_smoothing=draw(st.floats(0.0, 0.5)) if loss_type == "sigmoid" else 0.0,
        loss_type=loss_type,
        sft_weight=draw(st.sampled_from([0.0, 0.0, 0.5, 2.0])),
        softcap=draw(st.sampled_from([None, 30.0, 5.0, 1.0])),
    )
    chunk = draw(st.integers(1, 2 * B * T + 3))
    return hidden, weight, bias, labels, opts, chunk


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_fuzz_backends_match_reference(problem):
    hidden, weight, bias, labels, opts, chunk = problem
    ref, ref_grads = run_reference(hidden, weight, bias, labels, **opts)
    for backend, extra in (("eager", {}), ("torch", {"chunk_size": chunk})):
        out, grads = run_backend(backend, hidden, weight, bias, labels, **extra, **opts)
        for k in VALUE_KEYS:
            assert rel_err(getattr(out, k), ref[k]) <= TOL, (backend, k)
        if opts["sft_weight"] > 0:
            assert rel_err(out.sft_loss, ref["sft_loss"]) <= TOL
        for k, g in grads.items():
            if ref_grads[k] is not None:
                # hinge can have an exactly-zero gradient: rel_err then compares against 0 norm
                assert (g - ref_grads[k]).norm() <= TOL * max(ref_grads[k].norm(), 1e-30), (backend, k)
