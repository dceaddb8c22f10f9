"""Property tests over every backend x path x dtype: the caller's tensors are never written, any
memory layout gives the contiguous answer, and other consumers of the same tensors still work.

backend x dtype: eager and torch in float64/float32/bfloat16/float16; triton (the interpreter on
CPU) in float32/float16. Path: hidden states + lm_head weight + bias (``simpo_loss``), or logits
(``simpo_loss_from_logits``).

* Bit-identical inputs: the whole storage behind every input (hidden, weight, bias, logits,
  labels) is compared bit for bit after forward, ``backward(retain_graph=True)`` and a second
  backward; the second backward gives the first one's gradients again.
* Layouts: each input in turn is passed as a transposed, column-strided, row-sliced or expanded
  view. The gaps of strided and sliced storage hold NaN (labels: an id far outside the
  vocabulary), so a backend that reads past a view's strides fails loudly. Results and the
  gradients w.r.t. the view must match the same values passed contiguously: relative norm error
  at most 1e-12 (float64), 1e-6 (float32), 5e-3 (float16), 2e-2 (bfloat16; a layout may change
  which matmul kernel rounds the bf16 logits).
* Other consumers: a second loss that saved the same logits (or hidden states) for its own
  backward still backpropagates, and the summed gradient is the sum of the separate ones.
"""

from __future__ import annotations

import pytest
import torch

from simpo_kernels import simpo_loss, simpo_loss_from_logits

from .reference import rel_err

#: "backend:schedule" x dtype (the schedule applies to the hidden-state path; the logits path runs
#: once per backend, under its first schedule's entry).
COMBOS = [("eager", d) for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)] + \
         [(f"torch:{s}", d) for s in ("tokens", "pairs", "vocab")
          for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)] + \
         [(f"triton:{s}", d) for s in ("fused", "pairs", "vocab") for d in (torch.float32, torch.float16)]
COMBO_IDS = [f"{b}-{str(d).replace('torch.', '')}" for b, d in COMBOS]
FIRST_SCHEDULE = {"eager": "auto", "torch": "tokens", "triton": "fused"}


def hidden_kwargs(spec: str) -> dict:
    """``"triton:pairs"`` -> ``{"backend": "triton", "schedule": "pairs"}``."""
    backend, _, schedule = spec.partition(":")
    return {"backend": backend, "schedule": schedule or "auto"}


def logits_backend(spec: str) -> str:
    """The backend of ``spec`` for the logits path (which has no schedules)."""
    return spec.partition(":")[0]


def on_path(spec: str, path: str) -> bool:
    """The logits path has no schedules: it is tested once per backend."""
    backend, _, schedule = spec.partition(":")
    return path == "hidden" or (schedule or "auto") == FIRST_SCHEDULE[backend]


LOGITS_COMBOS = [c for c in COMBOS if on_path(c[0], "logits")]
LOGITS_IDS = [f"{b}-{str(d).replace('torch.', '')}" for b, d in LOGITS_COMBOS]
PATH_COMBOS = [(b, d, p) for p in ("hidden", "logits") for b, d in COMBOS if on_path(b, p)]
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 5e-3, torch.bfloat16: 2e-2}
INT_VIEW_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
               torch.bfloat16: torch.int16, torch.int64: torch.int64}
OPTS = dict(beta=2.0, gamma_beta_ratio=0.4, sft_weight=0.3)
B, T, H, V = 2, 6, 10, 23
GAP_LABEL = 10 ** 6


def inputs(dtype, path, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = -100
    labels[1, -2:] = -100
    if path == "logits":
        return {"logits": (torch.randn(2 * B, T, V, generator=g, dtype=torch.float64) * 2).to(dtype),
                "labels": labels}
    return {"hidden": torch.randn(2 * B, T, H, generator=g, dtype=torch.float64).to(dtype),
            "weight": (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.6).to(dtype),
            "bias": (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype),
            "labels": labels}


def run(backend, path, tensors, softcap=30.0):
    """Forward + backward; returns (output values, gradients w.r.t. each float input)."""
    floats = {k: t for k, t in tensors.items() if k != "labels"}
    if path == "logits":
        out = simpo_loss_from_logits(floats["logits"], tensors["labels"], backend=logits_backend(backend),
                                     **OPTS)
    else:
        out = simpo_loss(floats["hidden"], floats["weight"], tensors["labels"], bias=floats["bias"],
                         softcap=softcap, **hidden_kwargs(backend), **OPTS)
    grads = torch.autograd.grad(out.loss, list(floats.values()))
    values = {k: getattr(out, k).detach() for k in ("loss", "losses", "chosen_logps", "rejected_logps",
                                                     "sft_loss", "chosen_logits_mean", "rejected_logits_mean")}
    return values, dict(zip(floats, grads))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits (NaN and -0.0 compare exactly)."""
    return t.detach().clone().view(INT_VIEW_OF[t.dtype])


def leaf(t):
    return t.clone().requires_grad_() if t.is_floating_point() else t.clone()


@pytest.mark.parametrize("backend,dtype,path", PATH_COMBOS,
                         ids=[f"{b}-{str(d).replace('torch.', '')}-{p}" for b, d, p in PATH_COMBOS])
def test_inputs_bit_identical_after_forward_and_two_backwards(backend, dtype, path):
    tensors = {k: leaf(t) for k, t in inputs(dtype, path).items()}
    before = {k: bits(t) for k, t in tensors.items()}
    floats = [t for k, t in tensors.items() if k != "labels"]
    if path == "logits":
        out = simpo_loss_from_logits(tensors["logits"], tensors["labels"], backend=logits_backend(backend),
                                     **OPTS)
    else:
        out = simpo_loss(tensors["hidden"], tensors["weight"], tensors["labels"], bias=tensors["bias"],
                         softcap=30.0, **hidden_kwargs(backend), **OPTS)
    out.loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in floats]
    for t in floats:
        t.grad = None
    if path == "hidden" and backend.endswith(":pairs"):
        # pairs scales its stored gradients in place: a second backward is refused, not wrong
        with pytest.raises(RuntimeError, match="can run backward once per forward"):
            out.loss.backward()
        for t, g in zip(floats, first):
            assert torch.isfinite(g).all() and g.abs().sum() > 0
    else:
        out.loss.backward()
        for t, g in zip(floats, first):
            assert torch.isfinite(g).all() and g.abs().sum() > 0
            assert torch.equal(t.grad, g), "the second backward differs from the first"
    for k, t in tensors.items():
        assert torch.equal(bits(t), before[k]), f"{backend}/{dtype}: {k} was modified"


def _view(kind: str, x: torch.Tensor):
    """``(view, contiguous twin)``: a view with the given layout and a contiguous tensor of the same
    values, and the storage behind the view (to check it stays untouched)."""
    gap = float("nan") if x.is_floating_point() else GAP_LABEL
    if kind == "transposed":
        base = x.transpose(0, 1).contiguous()
        return base.transpose(0, 1), x, base
    if kind == "strided":  # every other column; the gaps hold NaN / an impossible label
        base = torch.full((*x.shape[:-1], 2 * x.shape[-1]), gap, dtype=x.dtype)
        base[..., ::2] = x
        return base[..., ::2], x, base
    if kind == "sliced":  # rows 2..n+1 of a larger buffer
        base = torch.full((x.shape[0] + 3, *x.shape[1:]), gap, dtype=x.dtype)
        base[2:-1] = x
        return base[2:-1], x, base
    if kind == "expanded":  # a stride-0 dimension: the last for 1-D/2-D floats, positions otherwise
        if x.dim() == 3:
            base = x[:, :1, :].clone()
            view = base.expand(x.shape)
        elif x.is_floating_point():
            base = x[..., :1].clone()
            view = base.expand(x.shape)
        else:  # labels: every row is row 0
            base = x[:1].clone()
            view = base.expand(x.shape)
        return view, view.contiguous(), base
    raise AssertionError(kind)


LAYOUTS = {"hidden": ["hidden", "weight", "bias", "labels"], "logits": ["logits", "labels"]}
VIEW_CASES = [(path, name, kind) for path, names in LAYOUTS.items() for name in names
              for kind in ("transposed", "strided", "sliced", "expanded")
              if not (name == "bias" and kind == "transposed")]


VIEW_PARAMS = [(b, d, p, n, k) for p, n, k in VIEW_CASES for b, d in COMBOS if on_path(b, p)]


@pytest.mark.parametrize("backend,dtype,path,name,kind", VIEW_PARAMS,
                         ids=[f"{b}-{str(d).replace('torch.', '')}-{p}-{n}-{k}" for b, d, p, n, k in VIEW_PARAMS])
def test_non_contiguous_views_give_the_contiguous_answer(backend, dtype, path, name, kind):
    tensors = inputs(dtype, path, seed=1)
    view, twin, base = _view(kind, tensors[name])
    if name != "labels":
        base.requires_grad_()
        view, _, _ = _view_from_base(kind, base, tensors[name].shape)
    assert not view.is_contiguous() or view.storage_offset() > 0
    base_bits = bits(base)
    others = {k: leaf(t) for k, t in tensors.items() if k != name}
    got_vals, got_grads = run(backend, path, {**others, name: view})
    want_vals, want_grads = run(backend, path, {**others, name: leaf(twin)})
    tol = TOL[dtype]
    for k, want in want_vals.items():
        if want is None:
            assert got_vals[k] is None
            continue
        assert rel_err(got_vals[k], want) <= tol, f"{k}: {rel_err(got_vals[k], want):.2e}"
    for k, want in want_grads.items():
        assert got_grads[k].shape == want.shape
        assert rel_err(got_grads[k], want) <= tol, f"d_{k}: {rel_err(got_grads[k], want):.2e}"
    assert torch.equal(bits(base), base_bits), f"{name}'s storage was modified"


def _view_from_base(kind, base, shape):
    """The same view as :func:`_view`, taken from a ``base`` that requires grad (so that gradients
    flow through the view to it)."""
    if kind == "transposed":
        return base.transpose(0, 1), None, base
    if kind == "strided":
        return base[..., ::2], None, base
    if kind == "sliced":
        return base[2:-1], None, base
    return base.expand(shape), None, base


def _assert_gradients_add_up(dtype, simpo_term, other_term):
    """One backward through ``other + simpo`` equals the sum of the two separate backwards.

    ``other_term(h, w, shared)`` is built first, so its backward runs after simpo's and sees
    whatever the simpo backward left in the tensors it saved; ``shared`` is one dict per graph,
    for tensors both terms use."""
    t = inputs(dtype, "hidden", seed=2)

    def grads(use_simpo, use_other):
        h, w, b = leaf(t["hidden"]), leaf(t["weight"]), leaf(t["bias"])
        shared, total = {}, 0.0
        if use_other:
            total = total + other_term(h, w, shared)
        if use_simpo:
            total = total + simpo_term(h, w, b, t["labels"], shared)
        total.backward()
        return h.grad.double(), w.grad.double()

    both = grads(True, True)
    apart = [a + b for a, b in zip(grads(True, False), grads(False, True))]
    for got, want in zip(both, apart):
        assert rel_err(got, want) <= max(TOL[dtype], 1e-10)


@pytest.mark.parametrize("backend,dtype", LOGITS_COMBOS, ids=LOGITS_IDS)
def test_second_consumer_of_the_same_logits(backend, dtype):
    """Logits computed in the graph feed simpo_loss_from_logits and a loss that saved them (pow
    saves its input: the logits themselves for float32)."""
    def logits(h, w, shared):  # one logits tensor per graph, used by both terms
        if "logits" not in shared:
            shared["logits"] = h @ w.T
        return shared["logits"]

    _assert_gradients_add_up(
        dtype,
        lambda h, w, b, labels, shared: simpo_loss_from_logits(
            logits(h, w, shared), labels, backend=logits_backend(backend), **OPTS).loss,
        lambda h, w, shared: (logits(h, w, shared).float() ** 2).sum() * 1e-2)


@pytest.mark.parametrize("backend,dtype", COMBOS, ids=COMBO_IDS)
def test_second_consumer_of_the_same_hidden_states(backend, dtype):
    _assert_gradients_add_up(
        dtype,
        lambda h, w, b, labels, shared: simpo_loss(
            h, w, labels, bias=b, softcap=30.0, **hidden_kwargs(backend), **OPTS).loss,
        lambda h, w, shared: (h.float() ** 2).sum() * 1e-2 + (w.float() ** 3).sum() * 1e-2)


# -- the preference-loss family: inputs (incl. the reference values) never written ----------------

#: a few losses of the family; DPO with references (and RPO's NLL term), CPO-SimPO, ORPO
FAMILY = [("dpo", dict(beta=0.3, rpo_alpha=0.2)), ("rdpo", dict(alpha=0.1)), ("cpo", dict(loss_type="simpo")),
          ("orpo", {})]
#: one dtype per schedule (the hidden-state path), so that every schedule and dtype appears
FAMILY_COMBOS = [("eager", torch.float32), ("torch:tokens", torch.float64), ("torch:pairs", torch.bfloat16),
                 ("torch:vocab", torch.float16), ("triton:fused", torch.float32), ("triton:pairs", torch.float16),
                 ("triton:vocab", torch.float32)]
FAMILY_PARAMS = [(loss, opts, b, d, p) for p in ("hidden", "logits") for loss, opts in FAMILY
                 for b, d in FAMILY_COMBOS if on_path(b, p)]


def family_inputs(loss, dtype, path, seed=0):
    """:func:`inputs` plus the reference sums ``[B]`` (float32; float64 for float64 inputs) for a
    loss that takes them, as leaves that require grad (they must get none: the loss detaches them)."""
    from simpo_kernels import LOSSES

    tensors = {k: leaf(t) for k, t in inputs(dtype, path, seed).items()}
    if LOSSES[loss].needs_reference:
        rdt = torch.float64 if dtype == torch.float64 else torch.float32
        tensors["ref_chosen_logps"] = torch.tensor([-9.0, -14.0], dtype=rdt, requires_grad=True)
        tensors["ref_rejected_logps"] = torch.tensor([-12.5, -8.0], dtype=rdt, requires_grad=True)
    return tensors


def family_run(loss, opts, backend, path, tensors):
    from simpo_kernels import preference_loss, preference_loss_from_logits

    refs = {k: t for k, t in tensors.items() if k.startswith("ref_")}
    if path == "logits":
        return preference_loss_from_logits(tensors["logits"], tensors["labels"], loss=loss,
                                           backend=logits_backend(backend), **refs, **opts)
    return preference_loss(tensors["hidden"], tensors["weight"], tensors["labels"], bias=tensors["bias"],
                           softcap=30.0, loss=loss, **hidden_kwargs(backend), **refs, **opts)


@pytest.mark.parametrize("loss,opts,backend,dtype,path", FAMILY_PARAMS,
                         ids=[f"{lo}-{b}-{str(d).replace('torch.', '')}-{p}" for lo, _, b, d, p in FAMILY_PARAMS])
def test_family_inputs_bit_identical_and_references_detached(loss, opts, backend, dtype, path):
    tensors = family_inputs(loss, dtype, path)
    before = {k: bits(t) for k, t in tensors.items()}
    floats = [t for k, t in tensors.items() if k not in ("labels",) and not k.startswith("ref_")]
    out = family_run(loss, opts, backend, path, tensors)
    out.loss.backward()
    for t in floats:
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    for k, t in tensors.items():
        assert torch.equal(bits(t), before[k]), f"{loss}/{backend}/{dtype}: {k} was modified"
        if k.startswith("ref_"):
            assert t.grad is None, f"{k} got a gradient: the reference values must be detached"


@pytest.mark.parametrize("kind", ["strided", "sliced", "expanded"])
@pytest.mark.parametrize("backend", ["eager", "torch:pairs", "triton:fused"])
def test_family_reference_views_give_the_contiguous_answer(backend, kind):
    """The reference sums as a non-contiguous view (gaps holding NaN) give the contiguous answer;
    their storage stays untouched."""
    loss, opts = FAMILY[0]
    dtype = torch.float32
    tensors = family_inputs(loss, dtype, "hidden", seed=3)
    ref = tensors["ref_chosen_logps"].detach()
    if kind == "strided":
        base = torch.full((4,), float("nan"))
        base[::2] = ref
        view = base[::2]
    elif kind == "sliced":
        base = torch.full((5,), float("nan"))
        base[2:4] = ref
        view = base[2:4]
    else:  # both pairs read one value
        base = ref[:1].clone()
        view = base.expand(2)
        ref = view.contiguous()
    base_bits = bits(base)
    got = family_run(loss, opts, backend, "hidden", {**tensors, "ref_chosen_logps": view})
    want = family_run(loss, opts, backend, "hidden", {**tensors, "ref_chosen_logps": ref})
    for k in ("loss", "losses", "chosen_rewards", "rejected_rewards", "sft_loss"):
        assert rel_err(getattr(got, k), getattr(want, k)) <= TOL[dtype], k
    assert torch.equal(bits(base), base_bits)
