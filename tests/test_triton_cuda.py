"""bf16 on a CUDA GPU vs the float64 reference (the interpreter cannot do bf16 arithmetic).

Skipped on machines without CUDA, with the reason printed by ``-ra``. Tolerances: ~1e-3 on the
loss and forward outputs, 1e-2 on dH/dW/dbias/d_logits (bf16 operands and bf16 gradients).
"""

from __future__ import annotations

import pytest
import torch

from simpo_kernels import simpo_loss, simpo_loss_from_logits
from tests.reference import reference_from_logits
from tests.triton_helpers import FORWARD_KEYS, TOL, check, make_batch, reference_with_grads, requires_cuda

pytestmark = requires_cuda

# Odd sizes, several blocks on every axis at the GPU defaults (128 x 128 x 64); Gemma-2 softcap.
CASES = [  # (name, B, T, H, V, prefix, softcap, bias, scale)
    ("gemma_like", 2, 150, 200, 3001, 40, 30.0, False, 20.0),
    ("bias_nocap", 1, 97, 130, 1000, 5, None, True, 4.0),
    ("tiny", 1, 2, 17, 13, 0, 5.0, True, 3.0),
]
OPTIONS = dict(beta=10.0, gamma_beta_ratio=0.5, sft_weight=0.2)


@pytest.mark.parametrize("schedule", ["fused", "pairs", "vocab"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cuda_schedule_vs_reference(case, dtype, schedule):
    name, B, T, H, V, prefix, softcap, bias, scale = case
    hidden, weight, b, labels = make_batch(B, T, H, V, dtype, prefix=prefix, bias=bias, scale=scale)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    bb = None if b is None else b.clone().requires_grad_()
    # a budget that gives the pairs and vocab schedules several chunks
    out = simpo_loss(h, w, labels, bias=bb, softcap=softcap, backend="triton", schedule=schedule,
                     memory_budget=T * V * 4 + 1, **OPTIONS)
    out.loss.backward()
    torch.cuda.synchronize()
    ref, (rh, rw, rb) = reference_with_grads(hidden, weight, b, labels, softcap=softcap, options=OPTIONS)
    fwd_tol = TOL[dtype]["fwd"] if dtype != torch.float32 else 1e-5
    for key in FORWARD_KEYS:
        check(f"cuda/{name}/{dtype}", key, getattr(out, key), ref[key], fwd_tol)
    tol = TOL[dtype]["grad"]
    check(f"cuda/{name}/{dtype}", "d_hidden", h.grad, rh, tol)
    check(f"cuda/{name}/{dtype}", "d_weight", w.grad, rw, tol)
    if b is not None:
        check(f"cuda/{name}/{dtype}", "d_bias", bb.grad, rb, tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_from_logits_vs_reference(dtype):
    _, _, _, labels = make_batch(2, 77, 8, 5003, torch.float32, prefix=9)
    logits = (torch.randn(4, 77, 5003, device="cuda") * 5).to(dtype).requires_grad_()
    out = simpo_loss_from_logits(logits, labels, backend="triton", **OPTIONS)
    out.loss.backward()
    zr = logits.detach().double().cpu().requires_grad_()
    ref = reference_from_logits(zr, labels.cpu(), **OPTIONS)
    ref["loss"].backward()
    for key in FORWARD_KEYS:
        check(f"cuda/logits/{dtype}", key, getattr(out, key), ref[key], 1e-5)  # fp32 math on exact inputs
    assert logits.grad.dtype == dtype
    check(f"cuda/logits/{dtype}", "d_logits", logits.grad, zr.grad, TOL[dtype]["grad"])


def test_auto_picks_triton_on_cuda(monkeypatch):
    import simpo_kernels.kernels.function as fn
    calls = []
    real = fn.LinearLogprobFunction.apply
    monkeypatch.setattr(fn.LinearLogprobFunction, "apply", lambda *a: calls.append(1) or real(*a))
    hidden, weight, _, labels = make_batch(1, 5, 32, 100, torch.bfloat16)
    simpo_loss(hidden, weight, labels, backend="auto", schedule="fused")
    assert calls


# -- the preference-loss family on the real kernels ------------------------------------------------

FAMILY = [("dpo", dict(beta=0.1)), ("dpo", dict(beta=0.3, loss_type="ipo", rpo_alpha=0.5)),
          ("cpo", dict(beta=2.0, loss_type="simpo", cpo_alpha=0.5)), ("orpo", dict(beta=0.25))]


def family_case(case, dtype, schedule, loss, opts):
    """The library on ``DEVICE`` and the float64 family reference on the CPU: (out, grads, ref,
    ref_grads). Reference sums for dpo are the policy's own plus a few nats."""
    from simpo_kernels import preference_loss
    from tests.reference import reference_logits
    from tests.reference_losses import reference_preference, reference_sums

    name, B, T, H, V, prefix, softcap, bias, scale = case
    hidden, weight, b, labels = make_batch(B, T, H, V, dtype, prefix=prefix, bias=bias, scale=scale)
    refs = {}
    if loss == "dpo":
        sums, _ = reference_sums(reference_logits(hidden.double().cpu(), weight.double().cpu(),
                                                  None if b is None else b.double().cpu(), softcap), labels.cpu())
        shift = torch.linspace(-3.0, 3.0, 2 * B, dtype=torch.float64)
        refs = dict(ref_chosen_logps=(sums[:B] + shift[:B]).float(), ref_rejected_logps=(sums[B:] + shift[B:]).float())
    leaves = [None if t is None else t.clone().requires_grad_() for t in (hidden, weight, b)]
    out = preference_loss(leaves[0], leaves[1], labels, bias=leaves[2], softcap=softcap, loss=loss, backend="triton",
                          schedule=schedule, memory_budget=T * V * 4 + 1,
                          **{k: v.to(hidden.device) for k, v in refs.items()}, **opts)
    out.loss.backward()
    cpu = [None if t is None else t.detach().double().cpu().requires_grad_() for t in (hidden, weight, b)]
    ref = reference_preference(cpu[0], cpu[1], labels.cpu(), bias=cpu[2], softcap=softcap, loss=loss, **refs, **opts)
    ref["loss"].backward()
    return out, [None if t is None else t.grad for t in leaves], ref, [None if t is None else t.grad for t in cpu]


@pytest.mark.parametrize("schedule", ["fused", "pairs", "vocab"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("loss,opts", FAMILY, ids=[f"{lo}-{o.get('loss_type', 'sigmoid')}" for lo, o in FAMILY])
def test_cuda_family_vs_reference(loss, opts, dtype, schedule):
    """Losses of the family on the Triton kernels, gemma-like shape with softcap, vs the float64
    family reference (tests/reference_losses.py); tolerances as above."""
    out, grads, ref, ref_grads = family_case(CASES[0], dtype, schedule, loss, opts)
    torch.cuda.synchronize()
    fwd_tol = TOL[dtype]["fwd"] if dtype != torch.float32 else 1e-5
    tag = f"cuda/{loss}/{dtype}/{schedule}"
    for key in FORWARD_KEYS:
        check(tag, key, getattr(out, key), ref[key], fwd_tol)
    if ref["nll"] is not None:
        check(tag, "nll", out.sft_loss, ref["nll"], fwd_tol)
    for name, g, want in zip(("d_hidden", "d_weight", "d_bias"), grads, ref_grads):
        if want is not None:
            check(tag, name, g, want, TOL[dtype]["grad"])
