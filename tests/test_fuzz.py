"""Hypothesis fuzz: random shapes and options, torch and eager backends vs the float64 reference.

Tolerance: float64 everywhere, ``|got - ref| <= max(1e-10 |ref|, 1e-13 scale)`` in norm. The
absolute floor is set by what the quantity is computed from, because a log-probability near 0 (a
confident token: ``z_target - logsumexp(z)`` with ``|z| ~ 10``) is a cancellation whose float64
result is exact only to about ``2^-53 |z|`` absolutely; against its own tiny size that is a
relative error of 1e-6 or more on any correct implementation. 1e-13 is ~900 units of float64
rounding of the scale. Scales: logps, logit means and the SFT term ``zmag = 1 + max_n (sum_k
|h_nk w_vk| + |b_v|)`` (the magnitude of the logit sums); rewards and losses ``beta`` times
that; gradients ``(beta + sft_weight)`` (the largest per-token upstream gradient) times ``zmag``
times the other factor's norm (``|W|`` for dH, ``|H|`` for dW, ``sqrt(N)`` for dbias).

The examples are derandomized (the same every run, so CI cannot flake on a new one); set
``SIMPO_FUZZ_EXPLORE=1`` to draw new examples each run when hunting for bugs.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .test_api import VALUE_KEYS, run_backend, run_reference

TOL = 1e-10  # relative to |ref| (float64 everywhere)
FLOOR = 1e-13  # relative to the scale the quantity is computed from: see the module docstring
EXPLORE = os.environ.get("SIMPO_FUZZ_EXPLORE") == "1"


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


def logit_scale(hidden, weight, bias) -> float:
    """``1 + max_n,v (sum_k |h_nk w_vk| + |b_v|)``: the size of the numbers a logit sums."""
    mag = hidden.abs() @ weight.abs().T
    if bias is not None:
        mag = mag + bias.abs()
    return 1.0 + mag.max().item()


def assert_matches_reference(hidden, weight, bias, labels, opts, chunk):
    ref, ref_grads = run_reference(hidden, weight, bias, labels, **opts)
    zscale = logit_scale(hidden, weight, bias)
    beta, g_max = opts["beta"], opts["beta"] + opts["sft_weight"]
    value_scale = {k: (beta * zscale if k in ("loss", "losses", "chosen_rewards", "rejected_rewards")
                       else zscale) for k in VALUE_KEYS}
    other_norm = {"hidden": weight.norm().item(), "weight": hidden.norm().item(),
                  "bias": hidden[..., 0].numel() ** 0.5}

    def close(got, want, scale):
        return (got.detach().double() - want.detach().double()).norm().item() <= \
            max(TOL * want.detach().double().norm().item(), FLOOR * scale)

    for backend, extra in (("eager", {}), ("torch", {"chunk_size": chunk})):
        out, grads = run_backend(backend, hidden, weight, bias, labels, **extra, **opts)
        for k in VALUE_KEYS:
            assert close(getattr(out, k), ref[k], value_scale[k]), (backend, k)
        if opts["sft_weight"] > 0:
            assert close(out.sft_loss, ref["sft_loss"], zscale), (backend, "sft_loss")
        for k, g in grads.items():
            if ref_grads[k] is not None:
                assert close(g, ref_grads[k], g_max * zscale * other_norm[k]), (backend, k)


@settings(max_examples=60, deadline=None, derandomize=not EXPLORE,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_fuzz_backends_match_reference(problem):
    assert_matches_reference(*problem)


def test_confident_tokens():
    """The case the fuzz once drew: every target is so likely that its log-probability is about
    -1e-10, computed by cancellation. The backends agree with the reference to float64 rounding
    of the logits, and a wrong logp (off by 1e-9) is still caught."""
    hidden = torch.tensor([[[-9.2416, -1.4930, -4.2433, 3.9980], [-3.5361, -5.1022, -2.4929, -3.4658]],
                           [[-5.1825, 6.0945, 1.2946, 8.0709], [4.5430, -4.9075, 0.2856, 1.3521]]],
                          dtype=torch.float64)
    weight = torch.tensor([[-0.5663, 0.3731, -0.8920, -1.5091], [0.3704, 1.4565, 0.9398, 0.7748]],
                          dtype=torch.float64)
    labels = torch.tensor([[-100, 1], [-100, 1]])
    opts = dict(beta=1.0, gamma_beta_ratio=0.0, label_smoothing=0.0, loss_type="hinge", sft_weight=0.0,
                softcap=None)
    out, _ = run_backend("torch", hidden, weight, None, labels, chunk_size=1, **opts)
    assert -1e-8 < out.rejected_logps.item() < 0  # the cancellation regime
    for chunk in (1, 2, 4):
        assert_matches_reference(hidden, weight, None, labels, opts, chunk)
    ref, _ = run_reference(hidden, weight, None, labels, **opts)
    wrong = out.rejected_logps - 1e-9
    assert (wrong - ref["rejected_logps"]).abs().item() > FLOOR * logit_scale(hidden, weight, None)


# -- the preference-loss family ------------------------------------------------------------------

FAMILY_TYPES = {"simpo": ["sigmoid", "hinge"], "dpo": ["sigmoid", "hinge", "ipo", "robust", "sigmoid_norm"],
                "rdpo": [None], "cpo": ["sigmoid", "hinge", "ipo", "simpo"], "orpo": [None], "rrhf": [None],
                "slic": [None]}
SMOOTHED = {("simpo", "sigmoid"), ("dpo", "sigmoid"), ("dpo", "robust"), ("cpo", "sigmoid"), ("cpo", "simpo")}


@st.composite
def family_problems(draw, loss):
    """A random problem as :func:`problems` draws it, then random options of ``loss`` (and
    reference sums within a few nats of the policy's for dpo/rdpo)."""
    hidden, weight, bias, labels, opts, chunk = draw(problems())
    softcap = opts["softcap"]
    loss_type = draw(st.sampled_from(FAMILY_TYPES[loss]))
    o = {} if loss_type is None else {"loss_type": loss_type}
    if loss in ("simpo", "dpo", "rdpo", "cpo", "orpo"):
        o["beta"] = draw(st.floats(0.05, 5.0))
    if (loss, loss_type) in SMOOTHED:
        o["label_smoothing"] = draw(st.floats(0.0, 0.45))
    weight_option = {"simpo": "sft_weight", "dpo": "rpo_alpha", "cpo": "cpo_alpha", "rrhf": "nll_weight",
                     "slic": "nll_weight"}.get(loss)
    if weight_option:
        o[weight_option] = draw(st.sampled_from([0.0, 0.5, 2.0]))
    if loss == "simpo":
        o["gamma_beta_ratio"] = draw(st.floats(-1.0, 2.0))
    if loss == "cpo":
        o["simpo_gamma"] = draw(st.floats(0.0, 2.0))
    if loss == "rdpo":
        o["alpha"] = draw(st.floats(-0.5, 0.5))
    if loss == "slic":
        o["delta"] = draw(st.floats(0.0, 5.0))
    refs = {}
    if loss in ("dpo", "rdpo"):
        B = hidden.shape[0] // 2
        shift = torch.tensor(draw(st.lists(st.floats(-3.0, 3.0), min_size=2 * B, max_size=2 * B)), dtype=torch.float64)
        from .reference import reference_logits
        from .reference_losses import reference_sums

        sums, _ = reference_sums(reference_logits(hidden, weight, bias, softcap), labels)
        refs = dict(ref_chosen_logps=sums[:B] + shift[:B], ref_rejected_logps=sums[B:] + shift[B:])
    return hidden, weight, bias, labels, loss, o, refs, softcap, chunk


@pytest.mark.parametrize("loss", sorted(FAMILY_TYPES))
@settings(max_examples=15, deadline=None, derandomize=not EXPLORE,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_family_matches_reference(loss, data):
    """torch (random chunk) and eager vs the float64 family reference. Same tolerance rule as
    above; the scales: values ``(1 + beta + 1/beta) * T * zmag`` (sums of up to T log-probs,
    IPO's ``1/(2 beta)``), gradients that times the other factor's norm."""
    from simpo_kernels import preference_loss

    from .reference_losses import reference_preference

    hidden, weight, bias, labels, loss, opts, refs, softcap, chunk = data.draw(family_problems(loss))
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    ref = reference_preference(leaves[0], leaves[1], labels, bias=leaves[2], softcap=softcap, loss=loss, **refs,
                               **opts)
    ref["loss"].backward()
    ref_grads = [None if t is None else t.grad for t in leaves]
    zscale = logit_scale(hidden, weight, bias)
    beta = opts.get("beta", 1.0)
    scale = (1 + beta + 1 / beta) * hidden.shape[1] * zscale
    other_norm = [weight.norm().item(), hidden.norm().item(), hidden[..., 0].numel() ** 0.5]

    def close(got, want, s):
        return (got.detach().double() - want.detach().double()).norm().item() <= \
            max(TOL * want.detach().double().norm().item(), FLOOR * s)

    for backend, extra in (("eager", {}), ("torch", {"chunk_size": chunk})):
        lv = [None if t is None else t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
        out = preference_loss(lv[0], lv[1], labels, bias=lv[2], softcap=softcap, loss=loss, backend=backend, **refs,
                              **extra, **opts)
        out.loss.backward()
        for k in ("loss", "losses", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
            assert close(getattr(out, k), ref[k], scale), (backend, loss, opts, k)
        if ref["nll"] is not None:
            assert close(out.sft_loss, ref["nll"], zscale), (backend, loss, "nll")
        for t, want, n in zip(lv, ref_grads, other_norm):
            if want is not None:
                assert close(t.grad, want, scale * n), (backend, loss, opts, "grad")
