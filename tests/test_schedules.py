"""Every schedule (``pairs``, ``vocab``, ``fused``, ``tokens``) against the float64 reference.

The ``triton`` backend runs its row kernels (``pairs``, ``vocab``) and fused kernels in the Triton
interpreter on CPU, in float32 (the interpreter cannot do bf16 math); the ``torch`` backend runs the
same schedules with the row operations in PyTorch, which also covers float64. Tolerances: float32
1e-5 relative (measured ~1e-6), float64 1e-10 (measured ~1e-15). ``memory_budget`` is set small
so that ``pairs`` takes several chunks of pairs and ``vocab`` several vocabulary chunks.
"""

from __future__ import annotations

import pytest
import torch

from simpo_kernels import simpo_loss
from simpo_kernels.losses import LOSSES
from simpo_kernels.objective import METRIC_NAMES, Objective, sequence_logp_grads, simpo_objective
from simpo_kernels.schedules import SCHEDULES, resolve_schedule
from simpo_kernels.schedules.common import TargetLayout, vocab_chunk
from simpo_kernels.schedules.pairs import pair_chunks
from tests.reference import reference_simpo, rel_err

RUNS = [("triton", s, torch.float32) for s in SCHEDULES["triton"]] + \
       [("torch", s, d) for s in SCHEDULES["torch"] for d in (torch.float32, torch.float64)]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
KEYS = ("loss", "losses", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards")


def _id(run):
    return f"{run[0]}-{run[1]}-{str(run[2])[6:]}"


def batch(B, T, H, V, dtype, *, bias=True, seed=0, prompt=3, scale=3.0):
    """Rows of unequal lengths: prompts of varying length, random masked positions, padding."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (scale / H ** 0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    for r in range(2 * B):
        p = min(prompt + (3 * r) % 5, T - 2)
        labels[r, :p] = -100
        pad = (5 * r) % max(1, T - p - 1)  # right padding of varying length
        if pad:
            labels[r, T - pad:] = -100
    labels[torch.rand(2 * B, T, generator=g) < 0.1] = -100
    for r in range(2 * B):  # at least one target per row
        if (labels[r, 1:] == -100).all():
            labels[r, T - 1] = 0
    cast = [None if t is None else t.to(dtype) for t in (hidden, weight, b)]
    return cast[0], cast[1], cast[2], labels


def run(backend, schedule, hidden, weight, bias, labels, *, grad_scale=1.0, frozen=(), **opts):
    leaves = {}
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        leaves[name] = None if t is None else t.detach().clone().requires_grad_(name not in frozen)
    out = simpo_loss(leaves["hidden"], leaves["weight"], labels, bias=leaves["bias"], backend=backend,
                     schedule=schedule, **opts)
    (out.loss * grad_scale).backward()
    return out, {k: (None if v is None else v.grad) for k, v in leaves.items()}


def reference(hidden, weight, bias, labels, *, grad_scale=1.0, **opts):
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    ref = reference_simpo(leaves[0], leaves[1], labels, bias=leaves[2], **opts)
    (ref["loss"] * grad_scale).backward()
    return ref, dict(zip(("hidden", "weight", "bias"), (None if t is None else t.grad for t in leaves)))


def assert_close(case, out, grads, ref, ref_grads, tol, *, metrics=True, frozen=()):
    for key in KEYS:
        err = rel_err(getattr(out, key), ref[key])
        assert err <= tol, f"{case}: {key} rel err {err:.2e} > {tol:.0e}"
    if "sft_loss" in ref:
        assert rel_err(out.sft_loss, ref["sft_loss"]) <= tol, case
    if metrics:
        for key in ("chosen_logits_mean", "rejected_logits_mean"):
            err = rel_err(getattr(out, key), ref[key])
            assert err <= tol, f"{case}: {key} rel err {err:.2e} > {tol:.0e}"
    for name, g in grads.items():
        if name in frozen or ref_grads[name] is None:
            assert g is None, f"{case}: {name} should get no gradient"
            continue
        assert g is not None, case
        err = rel_err(g, ref_grads[name])
        assert err <= tol, f"{case}: d{name} rel err {err:.2e} > {tol:.0e}"


OPTION_GRID = [
    dict(beta=2.5, gamma_beta_ratio=0.3, softcap=None),
    dict(beta=10.0, gamma_beta_ratio=0.5, softcap=30.0, sft_weight=0.7),
    dict(beta=2.0, gamma_beta_ratio=0.25, softcap=5.0, label_smoothing=0.2),
    dict(beta=1.5, gamma_beta_ratio=0.1, softcap=30.0, loss_type="hinge", sft_weight=0.3),
]


@pytest.mark.parametrize("opts", OPTION_GRID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("run_", RUNS, ids=_id)
def test_schedule_matches_reference(run_, opts):
    backend, schedule, dtype = run_
    hidden, weight, bias, labels = batch(3, 11, 17, 53, dtype, seed=1)
    # ~2 pairs of float32 logits per pairs chunk; vocab chunks of 16 columns (53 = 16+16+16+5)
    out, grads = run(backend, schedule, hidden, weight, bias, labels, memory_budget=1800, grad_scale=1.7, **opts)
    ref, ref_grads = reference(hidden, weight, bias, labels, grad_scale=1.7, **opts)
    assert_close(f"{backend}/{schedule}/{dtype}", out, grads, ref, ref_grads, TOL[dtype])
    for g, t in zip(grads.values(), (hidden, weight, bias)):
        assert g.dtype == t.dtype and g.shape == t.shape


# (B, T, H, V, budget): odd shapes, one pair, V smaller than one vocab chunk, one token per chunk
SHAPES = [(1, 2, 5, 7, 10**9), (1, 9, 33, 150, 4 * 150 * 3), (4, 6, 16, 97, 10**9), (2, 13, 3, 300, 200)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("run_", RUNS, ids=_id)
def test_schedule_odd_shapes(run_, shape):
    backend, schedule, dtype = run_
    B, T, H, V, budget = shape
    hidden, weight, bias, labels = batch(B, T, H, V, dtype, seed=B + T, prompt=1, bias=V % 2 == 1)
    opts = dict(softcap=30.0 if V % 3 else None, beta=3.0, gamma_beta_ratio=0.4)
    out, grads = run(backend, schedule, hidden, weight, bias, labels, memory_budget=budget, **opts)
    ref, ref_grads = reference(hidden, weight, bias, labels, **opts)
    assert_close(f"{backend}/{schedule}/{shape}", out, grads, ref, ref_grads, TOL[dtype])


@pytest.mark.parametrize("frozen", [("weight",), ("hidden",), ("hidden", "bias")], ids="+".join)
@pytest.mark.parametrize("run_", RUNS, ids=_id)
def test_schedule_frozen_inputs(run_, frozen):
    backend, schedule, dtype = run_
    hidden, weight, bias, labels = batch(2, 8, 12, 40, dtype, seed=7)
    opts = dict(softcap=30.0, sft_weight=0.5)
    out, grads = run(backend, schedule, hidden, weight, bias, labels, memory_budget=700, frozen=frozen,
                     grad_scale=-0.5, **opts)
    ref, ref_grads = reference(hidden, weight, bias, labels, grad_scale=-0.5, **opts)
    assert_close(f"{backend}/{schedule}/frozen", out, grads, ref, ref_grads, TOL[dtype], frozen=frozen)


def _targets_mean(ref_logits, labels, rows):
    """Mean logit over the target positions of ``rows`` (float64)."""
    mask = (labels[rows, 1:] != -100)
    return ref_logits[rows, :-1][mask].mean()


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("run_", RUNS + [("eager", "auto", torch.float64)], ids=_id)
def test_logit_metrics_modes(run_, softcap):
    backend, schedule, dtype = run_
    hidden, weight, bias, labels = batch(2, 10, 9, 45, dtype, seed=3)
    from tests.reference import reference_logits

    logits = reference_logits(hidden.double(), weight.double(), bias.double(), softcap)
    B = 2
    for mode in ("exact", "targets", "none"):
        out = simpo_loss(hidden, weight, labels, bias=bias, softcap=softcap, backend=backend, schedule=schedule,
                         memory_budget=900, logit_metrics=mode, sft_weight=0.2)
        ref, _ = reference(hidden, weight, bias, labels, softcap=softcap, sft_weight=0.2)
        assert rel_err(out.loss, ref["loss"]) <= TOL[dtype]
        if mode == "exact":
            want = (ref["chosen_logits_mean"], ref["rejected_logits_mean"])
        elif mode == "targets":
            want = (_targets_mean(logits, labels, slice(0, B)), _targets_mean(logits, labels, slice(B, 2 * B)))
        if mode == "none":
            assert out.chosen_logits_mean is None and out.rejected_logits_mean is None
            names = set(out.metrics())
            assert names == set(METRIC_NAMES[:6]) | {"sft_loss"}
        else:
            for got, w in zip((out.chosen_logits_mean, out.rejected_logits_mean), want):
                assert rel_err(got, w) <= TOL[dtype], (mode, float(got), float(w))
            assert set(out.metrics()) == set(METRIC_NAMES) | {"sft_loss"}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_pairs_refuses_backward_through_other_outputs(backend):
    hidden, weight, bias, labels = batch(2, 7, 8, 30, torch.float32, seed=2)
    h = hidden.clone().requires_grad_()
    for name in ("losses", "chosen_logps", "rejected_logps"):
        out = simpo_loss(h, weight, labels, backend=backend, schedule="pairs", sft_weight=0.1)
        with pytest.raises(RuntimeError, match=rf"schedule='pairs'.*\['{name}'\]"):
            getattr(out, name).sum().backward()
    out = simpo_loss(h, weight, labels, backend=backend, schedule="pairs", sft_weight=0.1)
    with pytest.raises(RuntimeError, match="sft_loss"):
        (out.loss + out.sft_loss).backward()
    # a second backward through one forward is refused (the stored gradients are scaled in place)
    out = simpo_loss(h, weight, labels, backend=backend, schedule="pairs")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward once"):
        out.loss.backward()
    # the other schedules differentiate every output
    for schedule in ("vocab",):
        h.grad = None
        out = simpo_loss(h, weight, labels, backend=backend, schedule=schedule)
        out.chosen_logps.sum().backward()
        assert h.grad is not None and torch.isfinite(h.grad).all()


def test_pairs_without_grad_computes_no_gradients():
    hidden, weight, bias, labels = batch(2, 7, 8, 30, torch.float32, seed=2)
    h = hidden.clone().requires_grad_()
    with torch.no_grad():
        out = simpo_loss(h, weight, labels, backend="torch", schedule="pairs")
    ref, _ = reference(hidden, weight, None, labels)
    assert not out.loss.requires_grad and rel_err(out.loss, ref["loss"]) <= 1e-5


def test_sequence_logp_grads_is_the_objective_derivative():
    """The pair-local gradient equals autograd through the whole objective, float64."""
    g = torch.Generator().manual_seed(0)
    B, T = 3, 6
    labels = torch.randint(0, 5, (2 * B, T), generator=g)
    labels[:, :2] = -100
    labels[1, 4:] = -100
    targets = torch.cat([labels[:, 1:], torch.full((2 * B, 1), -100)], 1)
    mask = targets != -100
    logps = (-torch.rand(2 * B, T, generator=g, dtype=torch.float64) * mask).requires_grad_()
    opts = dict(beta=3.0, gamma_beta_ratio=0.4, label_smoothing=0.1, loss_type="sigmoid", sft_weight=0.6)
    out = simpo_objective(logps, targets, torch.zeros(2 * B, T, dtype=torch.float64), 5, ignore_index=-100, **opts)
    want, = torch.autograd.grad(out.loss, logps)
    sums, cnt = (logps * mask).sum(-1).detach(), mask.sum(-1).double()
    gc, gr = sequence_logp_grads(sums[:B], cnt[:B], sums[B:], cnt[B:], num_pairs=B,
                                 chosen_tokens=int(cnt[:B].sum()), objective=Objective(LOSSES["simpo"](**opts)))
    got = torch.cat([gc, gr])[:, None].expand(2 * B, T) * mask
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-15)


def test_pair_chunks_respect_the_budget():
    targets = torch.full((6, 5), -100)
    counts = [4, 1, 2, 3, 4, 1]  # pairs: 7, 5, 3 target rows
    for r, c in enumerate(counts):
        targets[r, :c] = 1
    layout = TargetLayout.build(targets, counts, -100)
    assert layout.idx.tolist() == [0, 1, 2, 3, 5, 10, 11, 15, 16, 17, 20, 21, 22, 23, 25]
    assert pair_chunks(layout, 7, 1) == [(0, 1), (1, 2), (2, 3)]
    assert pair_chunks(layout, 8, 1) == [(0, 1), (1, 3)]
    assert pair_chunks(layout, 12, 1) == [(0, 2), (2, 3)]
    assert pair_chunks(layout, 3, 1) == [(0, 1), (1, 2), (2, 3)]  # a pair over budget: alone
    assert pair_chunks(layout, 10**6, 1) == [(0, 3)]
    assert vocab_chunk(10, 1000, 10 * 4 * 300) == 256  # rounded to 128 columns
    assert vocab_chunk(10, 1000, 10 * 4 * 50) == 50
    assert vocab_chunk(10, 1000, 1) == 16  # floor
    assert vocab_chunk(10, 40, 10**9) == 40  # never more than V


def test_auto_schedule_follows_the_budget():
    targets = torch.full((4, 6), -100)
    counts = [5, 5, 2, 2]
    for r, c in enumerate(counts):
        targets[r, :c] = 1
    layout = TargetLayout.build(targets, counts, -100)
    cpu = torch.device("cpu")
    V = 1000
    assert resolve_schedule("triton", "auto", cpu, layout, V, 7 * V * 4) == "pairs"  # largest pair: 7 rows
    assert resolve_schedule("triton", "auto", cpu, layout, V, 7 * V * 4 - 1) == "vocab"
    assert resolve_schedule("triton", "auto", cpu, layout, V, 14 * 128 * 4 - 1) == "fused"
    assert resolve_schedule("torch", "auto", cpu, layout, V, 1) == "tokens"
    assert resolve_schedule("triton", "vocab", cpu, layout, V, 1) == "vocab"
    with pytest.raises(ValueError, match="unknown schedule 'tokens' for backend='triton'"):
        resolve_schedule("triton", "tokens", cpu, layout, V, 1)
    with pytest.raises(ValueError, match="unknown schedule 'fused' for backend='torch'"):
        resolve_schedule("torch", "fused", cpu, layout, V, 1)


@pytest.mark.parametrize("kwargs, exc, msg", [
    (dict(backend="torch", schedule="fused"), ValueError, "unknown schedule 'fused'"),
    (dict(backend="eager", schedule="pairs"), ValueError, "backend='eager' has no schedules"),
    (dict(backend="torch", schedule="pairs", chunk_size=4), ValueError, "chunk_size is an option"),
    (dict(backend="triton", schedule="vocab", grad_filter=True), ValueError, "grad_filter is an option"),
    (dict(backend="torch", memory_budget=0), ValueError, "memory_budget must be a positive int"),
    (dict(backend="torch", memory_budget=2.5), ValueError, "memory_budget must be a positive int"),
    (dict(backend="torch", logit_metrics="all"), ValueError, "unknown logit_metrics"),
])
def test_schedule_options_are_validated(kwargs, exc, msg):
    hidden, weight, bias, labels = batch(1, 5, 4, 9, torch.float32)
    with pytest.raises(exc, match=msg):
        simpo_loss(hidden, weight, labels, **kwargs)


@pytest.mark.parametrize("run_", RUNS, ids=_id)
def test_no_host_sync_beyond_the_label_check(run_, monkeypatch):
    """One ``.tolist()`` (the label check), no ``.item()``, no ``nonzero()`` per forward+backward."""
    backend, schedule, dtype = run_
    hidden, weight, bias, labels = batch(2, 9, 8, 33, dtype, seed=5)
    h = hidden.clone().requires_grad_()
    calls = {"tolist": 0, "item": 0, "nonzero": 0}
    for name in calls:
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            calls[_name] += 1
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    out = simpo_loss(h, weight, labels, bias=bias, softcap=30.0, backend=backend, schedule=schedule,
                     memory_budget=600)
    out.loss.backward()
    monkeypatch.undo()
    assert calls == {"tolist": 1, "item": 0, "nonzero": 0}, calls


def test_every_schedule_agrees_on_a_shared_batch():
    """All schedules, one batch, float32: pairwise within 1e-5 (a cross-check beside the reference)."""
    hidden, weight, bias, labels = batch(3, 12, 10, 70, torch.float32, seed=11)
    results = {}
    for backend, schedule, dtype in RUNS:
        if dtype != torch.float32:
            continue
        results[(backend, schedule)] = run(backend, schedule, hidden, weight, bias, labels, softcap=30.0,
                                           memory_budget=1500)
    base_out, base_grads = results[("torch", "tokens")]
    for key, (out, grads) in results.items():
        assert rel_err(out.loss, base_out.loss) <= 1e-5, key
        for name in grads:
            assert rel_err(grads[name], base_grads[name]) <= 1e-5, (key, name)

