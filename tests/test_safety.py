"""Regression tests for issue 9: each defect a new user hit, held by a test that failed before.

Never a silently wrong number: every case either computes what the float64 reference computes
(within the stated relative-norm tolerance) or raises an error that names the problem.

Tolerances (relative norm error against tests/reference.py in float64):
    float32 inputs: 1e-5 on values, 1e-4 on gradients.
    float16 inputs / float16 autocast: 2e-3 on values, 1e-2 on gradients.
    bfloat16 autocast: 1e-2 on values, 3e-2 on gradients (the reference sees the same
        bf16-rounded matmul inputs, so this measures only rounding inside the backends).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from simpo_kernels import api, simpo_loss, simpo_loss_from_logits

from .reference import reference_from_logits, reference_simpo, rel_err

BACKENDS = ["eager", "torch", "triton"]  # triton runs in the interpreter on CPU (conftest)
#: "backend:schedule" for the hidden-state path: every schedule of every backend.
SCHEDULED = ["eager", "torch:tokens", "torch:pairs", "torch:vocab", "triton:fused", "triton:pairs", "triton:vocab"]


def kw(spec: str) -> dict:
    """``"triton:pairs"`` -> ``{"backend": "triton", "schedule": "pairs"}``."""
    backend, _, schedule = spec.partition(":")
    return {"backend": backend, "schedule": schedule or "auto"}
OPTS = dict(beta=2.5, gamma_beta_ratio=0.3, sft_weight=0.5)


def batch(B=2, T=7, H=12, V=19, *, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(2 * B, T, H, generator=g, dtype=torch.float64) * scale).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * (2 / H ** 0.5)).to(dtype)
    bias = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :3] = -100  # a prompt of 2 predicted positions in every row
    labels[0, -1] = -100  # and some padding
    return hidden, weight, bias, labels


def reference(hidden, weight, bias, labels, softcap=None, **opts):
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    ref = reference_simpo(leaves[0], leaves[1], labels, bias=leaves[2], softcap=softcap, **{**OPTS, **opts})
    ref["loss"].backward()
    return ref, [None if t is None else t.grad for t in leaves]


# -- 2. the torch backend wrote gradient values into the caller's logits -----------------------

LOGITS_CASES = [(b, d) for b in ("torch", "auto", "eager", "triton") for d in (torch.float32, torch.float64)
                if not (b == "triton" and d == torch.float64)]  # triton refuses float64 (test_validation)


@pytest.mark.parametrize("backend,dtype", LOGITS_CASES, ids=[f"{b}-{d}" for b, d in LOGITS_CASES])
def test_from_logits_backward_leaves_logits_untouched(backend, dtype):
    _, _, _, labels = batch()
    logits = torch.randn(4, 7, 19, dtype=dtype, requires_grad=True)
    before = logits.detach().clone()
    other = (logits * logits).sum()  # a second loss that saved the same logits for its backward
    out = simpo_loss_from_logits(logits, labels, backend=backend)
    (out.loss + other).backward()  # raised "modified by an inplace operation" before the fix
    assert torch.equal(logits.detach(), before)
    x = before.double().requires_grad_()
    (reference_from_logits(x, labels)["loss"] + (x * x).sum()).backward()
    assert rel_err(logits.grad, x.grad) < 1e-5


# -- 3. a strided bias gave a wrong loss on backend="triton" -----------------------------------

@pytest.mark.parametrize("backend", SCHEDULED)
def test_strided_bias(backend):
    hidden, weight, _, labels = batch()
    base = torch.randn(2 * weight.shape[0], dtype=torch.float32, requires_grad=True)
    bias = base[::2]  # the caller's strided view (a clone would be contiguous)
    assert bias.stride(0) == 2
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = simpo_loss(h, w, labels, bias=bias, softcap=30.0, **kw(backend), **OPTS)
    out.loss.backward()
    ref, (rh, rw, rb) = reference(hidden, weight, bias, labels, softcap=30.0)
    assert rel_err(out.loss, ref["loss"]) < 1e-5
    for got, want in ((h.grad, rh), (w.grad, rw), (base.grad[::2], rb)):
        assert rel_err(got, want) < 1e-4
    assert (base.grad[1::2] == 0).all()


# -- 4. bfloat16 in the Triton interpreter computed garbage --------------------------------------

def test_triton_interpreter_refuses_bfloat16():
    hidden, weight, bias, labels = batch(dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="cannot compute bfloat16 .* Triton interpreter"):
        simpo_loss(hidden, weight, labels, bias=bias, backend="triton")
    with pytest.raises(TypeError, match="cannot compute bfloat16 .* Triton interpreter"):
        simpo_loss_from_logits(torch.randn(4, 7, 19, dtype=torch.bfloat16), labels, backend="triton")
    with pytest.raises(TypeError, match="Triton interpreter"):
        api.check_backend("triton", "cpu", torch.bfloat16)
    assert api.check_backend("triton", "cpu", torch.float16) == "triton"
    assert api.check_backend("auto", "cpu", torch.bfloat16) == "torch"


# -- 4b. an interpreter that cannot run the kernels (triton <= 3.6 under numpy >= 2.4) ------------

FAKE_PROBLEM = "the Triton 0.0 interpreter cannot run loops (a stand-in for the probe's answer)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is of the CPU interpreter")
def test_unusable_interpreter_is_refused_with_the_probes_reason(monkeypatch):
    """Where ``interpreter_problem()`` finds the interpreter unusable, the triton backend refuses
    before any launch with :class:`InterpreterUnavailable` (a RuntimeError) naming the probe's
    reason, from both entry points and from ``check_backend``; ``auto`` picks torch instead."""
    from simpo_kernels.kernels import InterpreterUnavailable, function

    monkeypatch.setattr(function, "interpreter_problem", lambda: FAKE_PROBLEM)
    hidden, weight, bias, labels = batch()
    message = f"backend='triton' cannot run here: {FAKE_PROBLEM}"
    for call in (lambda: simpo_loss(hidden, weight, labels, bias=bias, backend="triton"),
                 lambda: simpo_loss_from_logits(torch.randn(4, 7, 19), labels, backend="triton"),
                 lambda: api.check_backend("triton", "cpu", torch.float32)):
        with pytest.raises(InterpreterUnavailable) as err:
            call()
        assert str(err.value) == message and isinstance(err.value, RuntimeError)
    assert api.check_backend("auto", "cpu", torch.float32) == "torch"


SKIP_SESSION = f"""
import pytest, torch
from simpo_kernels import simpo_loss
from simpo_kernels.kernels import function

@pytest.fixture(autouse=True)
def unusable(monkeypatch):
    monkeypatch.setattr(function, "interpreter_problem", lambda: {FAKE_PROBLEM!r})

def triton_loss():
    g = torch.Generator().manual_seed(0)
    return simpo_loss(torch.randn(2, 5, 8, generator=g), torch.randn(11, 8, generator=g),
                      torch.randint(0, 11, (2, 5), generator=g), backend="triton")

def test_needs_the_interpreter():
    triton_loss()

def test_expects_another_error_first():
    with pytest.raises(ValueError, match="never raised"):
        triton_loss()

def test_fails_on_its_own():
    assert 1 == 2

def test_other_runtime_error():
    raise RuntimeError("backend='triton' cannot run here: not the library's refusal type")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is of the CPU interpreter")
def test_a_test_refused_the_interpreter_is_skipped_with_the_reason(tmp_path):
    """The suite's hook (``tests/triton_helpers.py``, loaded by both conftests): a test that meets
    the library's refusal, directly or while expecting another error, is reported SKIPPED with
    the refusal as the reason; every other failure still fails."""
    import subprocess
    import sys

    from .multiproc import ROOT, subprocess_env

    (tmp_path / "test_session.py").write_text(SKIP_SESSION)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           "-rfs", "-q", "--rootdir", str(tmp_path), str(tmp_path / "test_session.py")],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr[-3000:]
    assert out.splitlines()[-1].startswith("2 failed, 2 skipped"), out
    failed = sorted(line.split("::")[1].split()[0] for line in out.splitlines() if line.startswith("FAILED"))
    assert failed == ["test_fails_on_its_own", "test_other_runtime_error"], out
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 2, out
    for line in skipped:  # one per test, at its definition, with the library's refusal
        assert line.endswith(f"needs the Triton interpreter: backend='triton' cannot run here: {FAKE_PROBLEM}"), out


# -- 5. double backward: silently first-order (triton) or an unrelated error (torch) ------------

def _hvp(backend, path):
    hidden, weight, bias, labels = batch(dtype=torch.float64 if not backend.startswith("triton") else torch.float32)
    v = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(5), dtype=hidden.dtype)
    h = hidden.clone().requires_grad_()
    if path == "hidden":
        loss = simpo_loss(h, weight, labels, bias=bias, softcap=5.0, **kw(backend), **OPTS).loss
    else:
        logits = h @ weight.T + bias
        loss = simpo_loss_from_logits(logits, labels, backend=kw(backend)["backend"], **OPTS).loss
    g, = torch.autograd.grad(loss, h, create_graph=True)
    hv, = torch.autograd.grad((g * v).sum(), h)
    return hv, (hidden, weight, bias, labels, v)


@pytest.mark.parametrize("path", ["hidden", "logits"])
def test_double_backward_eager_matches_reference(path):
    hv, (hidden, weight, bias, labels, v) = _hvp("eager", path)
    h = hidden.double().requires_grad_()
    softcap = 5.0 if path == "hidden" else None
    ref = reference_simpo(h, weight.double(), labels, bias=bias.double(), softcap=softcap, **OPTS)
    g, = torch.autograd.grad(ref["loss"], h, create_graph=True)
    ref_hv, = torch.autograd.grad((g * v).sum(), h)
    assert ref_hv.norm() > 0
    assert rel_err(hv, ref_hv) < 1e-10


HVP_CASES = [(b, "hidden") for b in SCHEDULED[1:]] + [("torch", "logits"), ("triton", "logits")]


@pytest.mark.parametrize("backend,path", HVP_CASES, ids=[f"{b}-{p}" for b, p in HVP_CASES])
def test_double_backward_refused_clearly(backend, path):
    name = kw(backend)["backend"]
    with pytest.raises(RuntimeError, match=f"backend='{name}' does not support double backward.*"
                                           f"backend='eager'"):
        _hvp(backend, path)


# -- 6. backward under torch.autocast crashed on the torch backend -------------------------------

AUTOCAST_CASES = [("eager", torch.bfloat16), ("torch", torch.bfloat16), ("eager", torch.float16),
                  ("torch", torch.float16), ("triton", torch.float16)]


@pytest.mark.parametrize("backward_inside", [True, False], ids=["backward-in-autocast", "backward-after"])
@pytest.mark.parametrize("backend,ac_dtype", AUTOCAST_CASES, ids=[f"{b}-{d}" for b, d in AUTOCAST_CASES])
def test_autocast_cpu(backend, ac_dtype, backward_inside):
    """Under autocast the matmul inputs are cast to the autocast dtype (as nn.Linear's would be);
    the result equals the float64 reference on those cast inputs, and the float32 leaves get
    float32 gradients."""
    hidden, weight, bias, labels = batch()
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    with torch.autocast("cpu", dtype=ac_dtype):
        out = simpo_loss(h, w, labels, bias=b, softcap=30.0, backend=backend, **OPTS)
        if backward_inside:
            out.loss.backward()
    if not backward_inside:
        out.loss.backward()
    cast = [t.to(ac_dtype) for t in (hidden, weight, bias)]
    ref, ref_grads = reference(*cast, labels, softcap=30.0)
    tol_val, tol_grad = (1e-2, 3e-2) if ac_dtype == torch.bfloat16 else (2e-3, 1e-2)
    assert rel_err(out.loss, ref["loss"]) < tol_val
    assert rel_err(out.chosen_logps, ref["chosen_logps"]) < tol_val
    for leaf_, want in zip((h, w, b), ref_grads):
        assert leaf_.grad.dtype == torch.float32
        assert rel_err(leaf_.grad, want) < tol_grad


def test_autocast_bf16_triton_interpreter_refused():
    hidden, weight, _, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="Triton interpreter"):
            simpo_loss(hidden, weight, labels, backend="triton")


def test_autocast_mixed_dtypes_accepted_as_linear_would():
    """bf16 hidden states with a float32 weight: an error without autocast, as nn.Linear does
    under autocast they are both cast."""
    hidden, weight, _, labels = batch()
    with pytest.raises(TypeError, match="same dtype"):
        simpo_loss(hidden.bfloat16(), weight, labels, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = simpo_loss(hidden.bfloat16(), weight, labels, backend="torch").loss
    want = simpo_loss(hidden.bfloat16(), weight.bfloat16(), labels, backend="torch").loss
    assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA autocast")
@pytest.mark.parametrize("backend", ["eager", "torch", "triton"])
def test_autocast_cuda(backend):
    hidden, weight, bias, labels = (t.cuda() for t in batch())
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = simpo_loss(h, w, labels, bias=b, softcap=30.0, backend=backend, **OPTS)
        out.loss.backward()
    ref, ref_grads = reference(*(t.bfloat16().cpu() for t in (hidden, weight, bias)), labels.cpu(), softcap=30.0)
    assert rel_err(out.loss.cpu(), ref["loss"]) < 1e-2
    for leaf_, want in zip((h, w, b), ref_grads):
        assert leaf_.grad.dtype == torch.float32 and rel_err(leaf_.grad.cpu(), want) < 3e-2


# -- 7. non-finite inputs: finite gradients on the torch/triton backends --------------------------

@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets the NaN
@pytest.mark.parametrize("backend", SCHEDULED)
@pytest.mark.parametrize("where", ["prompt_hidden", "pad_hidden", "target_hidden", "weight", "bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_poisons_loss_and_every_gradient(backend, where, value):
    hidden, weight, bias, labels = batch()
    if where == "prompt_hidden":
        hidden[1, 0, 3] = value  # position 0 predicts a prompt label: never a target
    elif where == "pad_hidden":
        hidden[0, -2, 0] = value  # predicts the padded last label of row 0
    elif where == "target_hidden":
        hidden[2, 4, 1] = value
    elif where == "weight":
        weight[3, 2] = value
    else:
        bias[5] = value
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = simpo_loss(*leaves[:2], labels, bias=leaves[2], softcap=30.0, **kw(backend), **OPTS)
    out.loss.backward()
    assert torch.isnan(out.loss) and torch.isnan(out.losses).all()
    assert torch.isnan(out.chosen_logps).all() and torch.isnan(out.rejected_rewards).all()
    for name, leaf_ in zip(("hidden", "weight", "bias"), leaves):
        assert torch.isnan(leaf_.grad).all(), f"{backend}: d_{name} not poisoned by {value} in {where}"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_logits_poison_the_gradient(backend):
    _, _, _, labels = batch()
    logits = torch.randn(4, 7, 19)
    logits[1, 0, 2] = float("nan")  # a prompt position
    logits.requires_grad_()
    out = simpo_loss_from_logits(logits, labels, backend=backend)
    out.loss.backward()
    assert torch.isnan(out.loss) and torch.isnan(logits.grad).all()


def test_finite_inputs_add_no_poison_node():
    """The guard costs nothing when inputs are finite: the graph is the backend's own."""
    hidden, weight, _, labels = batch()
    h = hidden.clone().requires_grad_()
    out = simpo_loss(h, weight, labels, backend="torch")
    names = set()
    stack = [out.loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and type(fn).__name__ not in names:
            names.add(type(fn).__name__)
            stack.extend(f for f, _ in fn.next_functions)
    assert not any("Poison" in n for n in names), names


# -- 8. float16 logits beyond 65504: NaN on the torch backend ------------------------------------

@pytest.mark.parametrize("backend", SCHEDULED[1:])
def test_float16_logits_beyond_float16_range(backend):
    g = torch.Generator().manual_seed(2)
    hidden = (torch.randn(4, 7, 12, generator=g) * 100).half()
    weight = (torch.randn(19, 12, generator=g) * 100).half()
    _, _, _, labels = batch()
    ref_logits = hidden.double() @ weight.double().T
    assert ref_logits.abs().max() > 65504  # the case: logits a float16 cannot hold
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = simpo_loss(h, w, labels, **kw(backend), **OPTS)
    out.loss.backward()
    ref, (rh, rw, _) = reference(hidden, weight, None, labels)
    assert torch.isfinite(out.loss)
    assert rel_err(out.loss, ref["loss"]) < 2e-3
    assert rel_err(out.chosen_logps, ref["chosen_logps"]) < 2e-3
    assert rel_err(h.grad, rh) < 1e-2 and rel_err(w.grad, rw) < 1e-2


def test_float16_overflow_eager_follows_nn_linear():
    """The eager reference keeps nn.Linear semantics (documented): float16 logits overflow."""
    g = torch.Generator().manual_seed(2)
    hidden = (torch.randn(4, 7, 12, generator=g) * 100).half()
    weight = (torch.randn(19, 12, generator=g) * 100).half()
    _, _, _, labels = batch()
    assert not torch.isfinite(simpo_loss(hidden, weight, labels, backend="eager").loss)


# -- 9. NumPy scalars refused; torch.compile of a triton call failed ----------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_and_other_real_scalars_accepted(backend):
    hidden, weight, _, labels = batch()
    want = simpo_loss(hidden, weight, labels, beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.25,
                      softcap=30.0, backend=backend)
    got = simpo_loss(hidden, weight, labels, beta=np.float32(2.0), gamma_beta_ratio=np.float64(0.5),
                     sft_weight=np.float16(0.25), softcap=np.int64(30), label_smoothing=np.float32(0),
                     backend=backend)
    assert isinstance(got.loss, torch.Tensor) and torch.equal(got.loss, want.loss)
    assert got.metrics() == want.metrics()


@pytest.mark.parametrize("value", [True, np.bool_(True), torch.tensor(2.0), "2.0", None])
def test_non_real_options_refused(value):
    hidden, weight, _, labels = batch()
    with pytest.raises(TypeError, match="beta must be a real number"):
        simpo_loss(hidden, weight, labels, beta=value, backend="torch")


COMPILE_CASES = [(b, "hidden") for b in SCHEDULED] + [(b, "logits") for b in BACKENDS]


@pytest.mark.parametrize("backend,path", COMPILE_CASES, ids=[f"{b}-{p}" for b, p in COMPILE_CASES])
def test_torch_compile(backend, path):
    """torch.compile of a training step calling simpo_loss: same loss and gradients. (triton failed
    inside dynamo's fake-tensor tracing of the interpreter; its entry points now run outside the
    graph.)"""
    hidden, weight, bias, labels = batch()
    torch._dynamo.reset()

    def step(h, w, b):
        if path == "hidden":
            return simpo_loss(h, w, labels, bias=b, softcap=30.0, **kw(backend), **OPTS).loss
        return simpo_loss_from_logits(h @ w.T + b, labels, backend=backend, **OPTS).loss

    compiled = torch.compile(step)
    results = []
    for fn in (step, compiled):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss = fn(*leaves)
        loss.backward()
        results.append((loss.detach(), [t.grad for t in leaves]))
    (l0, g0), (l1, g1) = results
    ref, ref_grads = reference(hidden, weight, bias, labels, softcap=30.0 if path == "hidden" else None)
    assert rel_err(l1, ref["loss"]) < 1e-5 and rel_err(l1, l0) < 1e-6
    for a, b, r in zip(g1, g0, ref_grads):
        assert rel_err(a, r) < 1e-4 and rel_err(a, b) < 1e-6


# -- 10. the preference-loss family: non-finite poisoning and autocast ---------------------------

#: (loss, options): a few losses of the family, DPO with references.
FAMILY = [("dpo", dict(beta=0.3, rpo_alpha=0.2)), ("dpo", dict(loss_type="ipo", beta=0.4)), ("rdpo", {}),
          ("cpo", dict(loss_type="simpo", beta=2.0)), ("orpo", {}), ("slic", {})]
FAMILY_IDS = [loss + "".join(f"-{v}" for v in o.values()) for loss, o in FAMILY]


def family_refs(loss, B=2, dtype=torch.float32):
    """Reference sums ``[B]`` for a loss that needs them (a few nats from the policy's), else {}."""
    from simpo_kernels import LOSSES

    if not LOSSES[loss].needs_reference:
        return {}
    return dict(ref_chosen_logps=torch.tensor([-9.5, -12.0], dtype=dtype)[:B],
                ref_rejected_logps=torch.tensor([-10.0, -8.5], dtype=dtype)[:B])


def family_reference(loss, hidden, weight, bias, labels, refs, softcap, **opts):
    from .reference_losses import reference_preference

    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    ref = reference_preference(leaves[0], leaves[1], labels, bias=leaves[2], softcap=softcap, loss=loss, **refs,
                               **opts)
    ref["loss"].backward()
    return ref, [None if t is None else t.grad for t in leaves]


#: (FAMILY index, where, value): the hidden states for every loss, the reference values for those
#: that take them (+inf rejected / -inf chosen: a finite loss 0 on that pair without the guard).
POISON_CASES = [(f, "target_hidden", float("nan")) for f in range(len(FAMILY))] + \
               [(f, where, value) for f, (loss, _) in enumerate(FAMILY) if loss in ("dpo", "rdpo")
                for where, value in (("ref_chosen", float("nan")), ("ref_rejected", float("inf")),
                                     ("ref_chosen", float("-inf")))]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", SCHEDULED)
@pytest.mark.parametrize("family,where,value", POISON_CASES,
                         ids=[f"{FAMILY_IDS[f]}-{w}-{v}" for f, w, v in POISON_CASES])
def test_family_non_finite_input_poisons_every_output_and_gradient(backend, family, where, value):
    """A NaN/inf in the hidden states or in one reference value: the loss, every per-pair value,
    every reported logp, reward, NLL and extra, and every gradient is NaN (a +inf rejected
    reference alone would otherwise give the finite loss 0 on that pair)."""
    from simpo_kernels import preference_loss

    loss, opts = FAMILY[family]
    hidden, weight, bias, labels = batch()
    refs = family_refs(loss)
    if where.startswith("ref"):
        refs[f"{where}_logps"][1] = value  # pair 1 only
    else:
        hidden[2, 4, 1] = value
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = preference_loss(*leaves[:2], labels, bias=leaves[2], softcap=30.0, loss=loss, **refs, **kw(backend), **opts)
    out.loss.backward()
    values = {k: getattr(out, k) for k in ("loss", "losses", "chosen_logps", "rejected_logps", "chosen_rewards",
                                           "rejected_rewards", "sft_loss")}
    values.update(out.extra)
    for name, v in values.items():
        if v is not None:
            assert torch.isnan(v).all(), f"{loss}/{backend}: {name} = {v} not poisoned by {value} in {where}"
    assert all(math.isnan(v) for k, v in out.metrics().items() if not k.startswith(("logits/", "rewards/acc"))), \
        out.metrics()
    for name, leaf_ in zip(("hidden", "weight", "bias"), leaves):
        assert torch.isnan(leaf_.grad).all(), f"{loss}/{backend}: d_{name} not poisoned by {value} in {where}"


@pytest.mark.parametrize("backward_inside", [True, False], ids=["backward-in-autocast", "backward-after"])
@pytest.mark.parametrize("backend", ["eager", "torch"])
@pytest.mark.parametrize("family", range(len(FAMILY)), ids=FAMILY_IDS)
def test_family_autocast_bf16_cpu(family, backend, backward_inside):
    """bf16 autocast on CPU, as for simpo_loss (test_autocast_cpu): the float64 reference on the
    bf16-cast matmul inputs (reference sums unchanged, float32), float32 gradients.
    Tolerances as simpo's: 1e-2 on values (loss, logps), 3e-2 on gradients."""
    from simpo_kernels import preference_loss

    loss, opts = FAMILY[family]
    hidden, weight, bias, labels = batch()
    refs = family_refs(loss)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = preference_loss(h, w, labels, bias=b, softcap=30.0, loss=loss, backend=backend, **refs, **opts)
        if backward_inside:
            out.loss.backward()
    if not backward_inside:
        out.loss.backward()
    cast = [t.to(torch.bfloat16) for t in (hidden, weight, bias)]
    ref, ref_grads = family_reference(loss, *cast, labels, refs, 30.0, **opts)
    assert out.loss.dtype == torch.float32
    assert rel_err(out.loss, ref["loss"]) < 1e-2, (float(out.loss), float(ref["loss"]))
    assert rel_err(out.chosen_logps, ref["chosen_logps"]) < 1e-2
    for leaf_, want in zip((h, w, b), ref_grads):
        assert leaf_.grad.dtype == torch.float32
        assert rel_err(leaf_.grad, want) < 3e-2, rel_err(leaf_.grad, want)


@pytest.mark.parametrize("family", range(len(FAMILY)), ids=FAMILY_IDS)
def test_family_autocast_bf16_triton_interpreter_refused(family):
    from simpo_kernels import preference_loss

    loss, opts = FAMILY[family]
    hidden, weight, _, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="Triton interpreter"):
            preference_loss(hidden, weight, labels, loss=loss, backend="triton", **family_refs(loss), **opts)
