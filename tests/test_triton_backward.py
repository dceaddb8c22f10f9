"""Backward of the fused Triton kernels from hidden states: dH, dW, dbias vs the float64 reference.

Runs the full public path (``simpo_loss(..., backend="triton").loss.backward()``) so the per-token
upstream gradient comes from the real SimPO head. Exact mode is the default and is held to the
tight tolerances of :data:`tests.triton_helpers.TOL`; gradient filtering is tested separately
with its own, looser, stated tolerance.
"""

from __future__ import annotations

import pytest
import torch

from simpo_kernels import simpo_loss
from tests.reference import rel_err
from tests.triton_helpers import DEVICE, ON_CPU, TOL, check, make_batch, reference_with_grads

kernels = pytest.importorskip("simpo_kernels.kernels")
from simpo_kernels.kernels import logprob_backward as bwd_module  # noqa: E402

CASES = [  # (name, B, T, H, V, prefix, softcap, bias, logit scale)
    ("tiny_V_lt_block", 1, 2, 17, 13, 0, None, True, 2.0),
    ("softcap30_bias", 2, 9, 17, 150, 3, 30.0, True, 40.0),
    ("softcap5", 1, 11, 40, 77, 0, 5.0, False, 8.0),
    ("long_prefix", 2, 13, 33, 45, 10, None, True, 3.0),
]
DTYPES = [torch.float32, torch.float16]
OPTIONS = dict(beta=2.5, gamma_beta_ratio=0.3, sft_weight=0.4)


def _leaves(hidden, weight, bias, *, need_h=True, need_w=True):
    return (hidden.clone().requires_grad_(need_h), weight.clone().requires_grad_(need_w),
            None if bias is None else bias.clone().requires_grad_())


@pytest.fixture
def spy(monkeypatch):
    """Record the arguments and results of every backward launch."""
    calls = []
    real = bwd_module.logprob_backward

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    monkeypatch.setattr(bwd_module, "logprob_backward", wrapped)
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_backward_matches_reference(case, dtype):
    name, B, T, H, V, prefix, softcap, bias, scale = case
    hidden, weight, b, labels = make_batch(B, T, H, V, dtype, prefix=prefix, bias=bias, scale=scale, seed=1)
    h, w, bb = _leaves(hidden, weight, b)
    out = simpo_loss(h, w, labels, bias=bb, softcap=softcap, backend="triton", schedule="fused", **OPTIONS)
    out.loss.backward()
    ref, (rh, rw, rb) = reference_with_grads(hidden, weight, b, labels, softcap=softcap, options=OPTIONS)
    check(f"bwd/{name}/{dtype}", "loss", out.loss, ref["loss"], TOL[dtype]["fwd"])
    tol = TOL[dtype]["grad"]
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    check(f"bwd/{name}/{dtype}", "d_hidden", h.grad, rh, tol)
    check(f"bwd/{name}/{dtype}", "d_weight", w.grad, rw, tol)
    if b is not None:
        assert bb.grad.dtype == dtype
        check(f"bwd/{name}/{dtype}", "d_bias", bb.grad, rb, tol)
    # prompt / padding positions get exactly zero gradient (they are never launched)
    first_target = (labels[:, 1:] != -100).int().argmax(1)
    for r in range(labels.shape[0]):
        assert (h.grad[r, : first_target[r]] == 0).all()


def test_frozen_weight_skips_dw(spy):
    hidden, weight, b, labels = make_batch(2, 7, 17, 60, torch.float32, prefix=2, bias=True, scale=5.0)
    h, w, bb = _leaves(hidden, weight, b, need_w=False)
    simpo_loss(h, w, labels, bias=bb, softcap=30.0, backend="triton", schedule="fused", **OPTIONS).loss.backward()
    assert w.grad is None
    (_, kwargs, (dh, dw, db)), = spy
    assert kwargs["need_dw"] is False and dw is None  # no dW accumulator, COMPUTE_DW constexpr False
    assert kwargs["need_dh"] and dh is not None and db is not None
    ref, (rh, _, rb) = reference_with_grads(hidden, weight, b, labels, softcap=30.0, options=OPTIONS)
    check("bwd/frozen_weight", "d_hidden", h.grad, rh, 1e-5)
    check("bwd/frozen_weight", "d_bias", bb.grad, rb, 1e-5)


def test_frozen_hidden_skips_dh(spy):
    hidden, weight, _, labels = make_batch(1, 9, 17, 60, torch.float32, prefix=3, scale=3.0)
    h, w, _ = _leaves(hidden, weight, None, need_h=False)
    simpo_loss(h, w, labels, softcap=5.0, backend="triton", schedule="fused", **OPTIONS).loss.backward()
    assert h.grad is None
    (_, kwargs, (dh, dw, db)), = spy
    assert kwargs["need_dh"] is False and dh is None and db is None
    ref, (_, rw, _) = reference_with_grads(hidden, weight, None, labels, softcap=5.0, options=OPTIONS)
    check("bwd/frozen_hidden", "d_weight", w.grad, rw, 1e-5)


def test_only_target_tokens_are_launched(spy):
    """Prompt/padding positions (g = 0) never reach the backward: the API compacts the target rows
    (``hidden[targets]``) and the backward launches every compacted row."""
    hidden, weight, _, labels = make_batch(1, 12, 17, 40, torch.float32, prefix=8)
    h, w, _ = _leaves(hidden, weight, None)
    simpo_loss(h, w, labels, backend="triton", schedule="fused").loss.backward()
    (args, kwargs, _), = spy
    hid, rows, tgt = args[0], args[3], args[4]  # logprob_backward(hidden, weight, bias, rows, targets, ...)
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1).reshape(-1)
    valid = targets != -100
    assert hid.shape[0] == int(valid.sum()) < labels.numel()
    assert torch.equal(hid.detach().cpu(), hidden.reshape(-1, 17)[valid.to(hidden.device)].cpu())
    assert torch.equal(tgt.cpu(), targets[valid].cpu())
    assert torch.equal(rows.cpu(), torch.arange(hid.shape[0]))
    assert kwargs["filter_eps"] is None  # exact mode by default


@pytest.mark.parametrize("block_cfg", [dict(bwd_block_n=16, bwd_block_v=16, bwd_block_h=16),
                                       dict(bwd_block_n=32, bwd_block_v=64, bwd_block_h=32),
                                       # 32 target rows / 16 = 2 token blocks; groups of 3, 1 and 2
                                       dict(bwd_block_n=16, bwd_block_v=16, bwd_block_h=16, bwd_group_n=3),
                                       dict(bwd_block_n=16, bwd_block_v=32, bwd_block_h=16, bwd_group_n=1),
                                       dict(bwd_block_n=16, bwd_block_v=16, bwd_block_h=16, bwd_group_n=2)],
                         ids=["small", "wide", "group3_partial", "group1", "group2"])
def test_backward_block_configs(block_cfg):
    g = torch.Generator().manual_seed(11)
    N, H, V = 39, 29, 83
    hidden = torch.randn(N, H, generator=g).to(DEVICE).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / 3).to(DEVICE).requires_grad_()
    bias = torch.randn(V, generator=g).to(DEVICE).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    targets[:7] = -100
    up = torch.randn(N, generator=g).to(DEVICE)
    logps, _ = kernels.token_logprobs(hidden, weight, bias, targets, softcap=30.0, ignore_index=-100,
                                      **block_cfg)
    grads = torch.autograd.grad((logps * up).sum(), (hidden, weight, bias))
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    z = 30.0 * torch.tanh((leaves[0] @ leaves[1].T + leaves[2]) / 30.0)
    ref = torch.where(targets >= 0, z.log_softmax(-1).gather(1, targets.clamp_min(0)[:, None])[:, 0], 0.0)
    rgrads = torch.autograd.grad((ref * up.double()).sum(), leaves)
    for nm, a, r in zip(("d_hidden", "d_weight", "d_bias"), grads, rgrads):
        check(f"bwd/blocks/{block_cfg}", nm, a, r, 1e-5)


# Gradient filtering: the error it may introduce is bounded by the threshold times |g| per skipped
# entry (threshold 1e-3 in fp32, the fp16 unit roundoff 2^-11 with grad_filter=True); on these
# peaked random logits it stays under the stated, looser tolerance, and it must actually
# skip work (the filtered gradient differs from the exact one).
FILTER_TOL = {torch.float32: 2e-3, torch.float16: 5e-3}  # measured ~1.5e-4 and ~2.6e-4


@pytest.mark.parametrize("dtype,grad_filter", [(torch.float32, 1e-3), (torch.float16, True)],
                         ids=["fp32_eps1e-3", "fp16_auto"])
def test_grad_filter_is_close_and_skips(dtype, grad_filter):
    hidden, weight, b, labels = make_batch(2, 9, 17, 300, dtype, prefix=2, bias=True, scale=12.0, seed=4)
    grads = {}
    for mode in (False, grad_filter):
        h, w, bb = _leaves(hidden, weight, b)
        simpo_loss(h, w, labels, bias=bb, backend="triton", schedule="fused", grad_filter=mode, **OPTIONS).loss.backward()
        grads[mode] = (h.grad, w.grad, bb.grad)
    ref, rgrads = reference_with_grads(hidden, weight, b, labels, softcap=None, options=OPTIONS)
    for nm, exact, filt, r in zip(("d_hidden", "d_weight", "d_bias"), grads[False], grads[grad_filter], rgrads):
        check(f"bwd/filter/{dtype}", f"{nm}_exact", exact, r, TOL[dtype]["grad"])
        check(f"bwd/filter/{dtype}", f"{nm}_filtered", filt, r, FILTER_TOL[dtype])
    assert any(rel_err(f, e) > 0 for f, e in zip(grads[grad_filter], grads[False])), "filter skipped nothing"


def test_grad_filter_needs_triton_backend():
    hidden, weight, _, labels = make_batch(1, 3, 17, 20, torch.float32)
    for backend in ("torch", "eager"):
        with pytest.raises(ValueError, match="grad_filter"):
            simpo_loss(hidden, weight, labels, backend=backend, grad_filter=True)
    with pytest.raises(ValueError, match="grad_filter must be"):
        simpo_loss(hidden, weight, labels, backend="triton", schedule="fused", grad_filter=2.0)


def test_random_shapes_and_blocks():
    """Seeded sweep: random N, H, V (incl. V=1, H=1), softcap, bias, block shapes and split counts."""
    import random

    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    for it in range(12):
        N, H, V = rng.randint(1, 60), rng.randint(1, 60), rng.choice([1, rng.randint(2, 250)])
        softcap = rng.choice([None, 5.0, 30.0])
        cfg = dict(block_n=rng.choice([16, 32]), block_v=rng.choice([16, 32, 64]), block_h=rng.choice([16, 32]),
                   v_splits=rng.randint(1, 9), bwd_block_n=rng.choice([16, 32]),
                   bwd_block_v=rng.choice([16, 32, 64]), bwd_block_h=rng.choice([16, 32]))
        hidden = torch.randn(N, H, generator=g).to(DEVICE).requires_grad_()
        weight = (torch.randn(V, H, generator=g) * 2 / H ** 0.5).to(DEVICE).requires_grad_()
        bias = torch.randn(V, generator=g).to(DEVICE).requires_grad_()
        targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)
        targets[torch.rand(N, generator=g).to(DEVICE) < 0.3] = -100
        up = torch.randn(N, generator=g).to(DEVICE)
        logps, sums = kernels.token_logprobs(hidden, weight, bias, targets, softcap=softcap, ignore_index=-100, **cfg)
        grads = torch.autograd.grad((logps * up).sum(), (hidden, weight, bias))
        leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
        z = leaves[0] @ leaves[1].T + leaves[2]
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        ref = torch.where(targets >= 0, z.log_softmax(-1).gather(1, targets.clamp_min(0)[:, None])[:, 0], 0.0)
        rgrads = torch.autograd.grad((ref * up.double()).sum(), leaves)
        case = f"bwd/random{it}"
        check(case, "logit_sums", sums, z.detach().sum(-1), 1e-5)
        if V > 1:
            for nm, a, r in zip(("token_logps", "d_hidden", "d_weight", "d_bias"), (logps,) + grads,
                                (ref,) + rgrads):
                check(case, nm, a, r, 1e-5)
        else:
            _check_one_token_vocabulary(case, hidden, weight, bias, targets, up, softcap, logps, grads)


def _check_one_token_vocabulary(case, hidden, weight, bias, targets, up, softcap, logps, grads):
    """V == 1: the exact log-prob and every gradient are 0, so a relative error has no meaning.

    The forward and backward compute each logit twice, with different tile shapes, so the two
    agree only to float32 rounding (see ``lse_forward.logit_tile``): ``softmax = exp(z_bwd - lse)``
    with ``lse = z_fwd`` is 1 +- that difference and the kernels' gradient is of its size. Bound it
    from the inputs: a float32 dot product of length H errs by at most ``H u sum_k |h_k w_k|``
    (``u = 2^-24``), twice (forward and backward), plus a few ``u`` for the bias add, ``tanh``,
    ``exp`` and ``log``; the softcap derivative is at most 1. Per token:
    ``|dz_n| <= |g_n| delta_n``, ``delta_n = u (2 (H + 2) (sum_k |h_nk w_k| + |b|) + 4 |z_n| + 4)``.
    Then ``|dH[n]| <= |dz_n| |w|``, ``|dW| <= sum_n |dz_n| |h_n|``, ``|db| <= sum_n |dz_n|``.
    """
    u = 2.0 ** -24
    H = hidden.shape[1]
    h64, w64, b64 = (t.detach().double() for t in (hidden, weight, bias))
    valid = targets >= 0
    zmag = (h64.abs() @ w64.abs().T)[:, 0] + b64.abs()[0]
    zcap = (h64 @ w64.T)[:, 0] + b64[0]
    if softcap is not None:
        zcap = softcap * torch.tanh(zcap / softcap)
    delta = u * (2 * (H + 2) * zmag + 4 * zcap.abs() + 4)
    dz = torch.where(valid, up.double().abs() * delta, 0.0)
    slack = 1 + 4 * u * max(1, hidden.shape[0])  # the products and sums of the bounds themselves
    d_hidden, d_weight, d_bias = (g.double() for g in grads)
    assert (logps.double().abs() <= delta * slack).all(), (case, "token_logps")
    assert (d_hidden.abs() <= dz[:, None] * w64.abs() * slack).all(), (case, "d_hidden")
    assert (d_weight.abs() <= (dz[:, None] * h64.abs()).sum(0) * slack).all(), (case, "d_weight")
    assert (d_bias.abs() <= dz.sum() * slack).all(), (case, "d_bias")
    # and the bound is not vacuous: it is small next to the gradient scale |g| |w|
    assert (delta[valid] < 1e-3).all(), (case, delta.max())


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_one_token_vocabulary_gradient_is_recompute_rounding(softcap):
    """V == 1 with different forward and backward hidden slices (block_h 16 vs 32): the backward's
    logits are summed in another order than the forward's, so the gradient (exactly 0 in exact
    arithmetic) is float32 rounding, visibly non-zero here, and within the input-scaled bound.
    The bound must also be able to fail: a gradient off by 1e-2 of its scale is caught."""
    g = torch.Generator().manual_seed(3)
    N, H = 40, 48
    hidden = (torch.randn(N, H, generator=g) * 2).to(DEVICE).requires_grad_()
    weight = torch.randn(1, H, generator=g).to(DEVICE).requires_grad_()
    bias = torch.randn(1, generator=g).to(DEVICE).requires_grad_()
    targets = torch.zeros(N, dtype=torch.long, device=DEVICE)
    targets[::7] = -100
    up = torch.randn(N, generator=g).to(DEVICE)
    logps, _ = kernels.token_logprobs(hidden, weight, bias, targets, softcap=softcap, ignore_index=-100,
                                      block_n=16, block_h=16, bwd_block_n=32, bwd_block_h=32)
    grads = torch.autograd.grad((logps * up).sum(), (hidden, weight, bias))
    if ON_CPU:  # the interpreter's np.matmul rounds each slice product: the orders really differ
        assert grads[1].abs().max() > 0
    _check_one_token_vocabulary("bwd/V1", hidden, weight, bias, targets, up, softcap, logps, grads)
    wrong = grads[0] + 1e-2 * up[:, None].abs() * weight.detach().abs()
    with pytest.raises(AssertionError, match="d_hidden"):
        _check_one_token_vocabulary("bwd/V1", hidden, weight, bias, targets, up, softcap, logps,
                                    (wrong,) + grads[1:])
