"""The preference-loss family (``preference_loss``, ``preference_loss_from_logits``,
``sequence_logps``) against the independent float64 reference (:mod:`tests.reference_losses`).

Every loss and loss type of the spec table runs on every backend and schedule: ``eager`` and
``torch`` (``tokens``, ``pairs``, ``vocab``) in float64, ``triton`` (``pairs``, ``vocab``,
``fused``; the interpreter on CPU, which has no float64) in float32. Odd shapes (B=3 pairs, T=7,
H=5, V=37), rows of unequal lengths (prompts and padding of varying length, random masked
positions), softcap and bias in turn, a ``memory_budget`` small enough that ``pairs`` takes
several chunks and ``vocab`` several vocabulary chunks. Checked: the loss, every output field
(``losses``, logps, rewards, the NLL term, the logit means, the loss's extras), ``metrics()``
(names and values), and the gradients w.r.t. hidden states, weight and bias.

Tolerances (relative norm error, :func:`tests.reference.rel_err`): float64 1e-10 for values and
gradients; float32 (triton) 1e-5 for values, 2e-5 for gradients (the schedules' float32 error is
~1e-6, test_schedules.py). ``rewards/accuracies`` to 1e-7 absolute (a fraction of B rounded to
float32; no margin is near 0 here).
"""

from __future__ import annotations

import math

import pytest
import torch

from simpo_kernels import LOSSES, preference_loss, preference_loss_from_logits, sequence_logps, simpo_loss
from tests.reference import reference_logits, rel_err
from tests.reference_losses import (DEFAULTS, NEEDS_REFERENCE, reference_preference,
                                    reference_preference_from_logits, reference_sums)
from tests.test_schedules import batch

#: (backend, schedule, dtype): every schedule of every backend.
RUNS = [("eager", "auto", torch.float64)] + \
       [("torch", s, torch.float64) for s in ("tokens", "pairs", "vocab")] + \
       [("triton", s, torch.float32) for s in ("pairs", "vocab", "fused")]
TOL = {torch.float64: {"val": 1e-10, "grad": 1e-10}, torch.float32: {"val": 1e-5, "grad": 2e-5}}
SHAPE = dict(B=3, T=7, H=5, V=37)
BUDGET = 600  # bytes: pairs takes ~one pair per chunk, vocab chunks of 16 columns (37 = 16+16+5)

#: (loss, options): every loss and loss type, with and without the NLL term, label smoothing,
#: and the two non-default logit_metrics modes.
CASES = [
    ("simpo", dict(beta=2.5, gamma_beta_ratio=0.3)),
    ("simpo", dict(loss_type="hinge", beta=1.5, gamma_beta_ratio=0.1, sft_weight=0.3)),
    ("simpo", dict(beta=10.0, gamma_beta_ratio=0.5, label_smoothing=0.2, sft_weight=0.7)),
    ("dpo", dict(beta=0.3)),
    ("dpo", dict(beta=0.2, label_smoothing=0.1, rpo_alpha=0.5)),  # cDPO + RPO's NLL term
    ("dpo", dict(loss_type="hinge", beta=0.05)),
    ("dpo", dict(loss_type="ipo", beta=0.4)),
    ("dpo", dict(loss_type="robust", beta=0.3, label_smoothing=0.2, logit_metrics="exact")),
    ("dpo", dict(loss_type="sigmoid_norm", beta=2.0)),
    ("rdpo", dict(beta=0.3, alpha=0.2)),
    ("cpo", dict(beta=0.2)),  # cpo_alpha=1 by default
    ("cpo", dict(loss_type="hinge", beta=0.05, cpo_alpha=0.0)),
    ("cpo", dict(loss_type="ipo", beta=0.5, cpo_alpha=0.3)),
    ("cpo", dict(loss_type="simpo", beta=2.0, simpo_gamma=0.7, label_smoothing=0.1, cpo_alpha=0.0)),
    ("cpo", dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.5)),  # CPO-SimPO
    ("orpo", dict(beta=0.25)),
    ("orpo", dict(beta=0.1, logit_metrics="none")),
    ("rrhf", dict(nll_weight=0.5)),
    ("rrhf", dict(nll_weight=0.0, logit_metrics="targets")),
    ("slic", dict(delta=3.0, nll_weight=0.2)),
]
#: Output fields compared with the reference's of the same name.
FIELDS = ("loss", "losses", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards",
          "chosen_logits_mean", "rejected_logits_mean")
EXTRAS = {"orpo": ("log_odds_ratio", "log_odds_chosen")}


def case_id(case) -> str:
    loss, opts = case
    return loss + "".join(f"-{k}={v}" for k, v in opts.items())


def run_id(run) -> str:
    return f"{run[0]}-{run[1]}-{str(run[2])[6:]}"


def head_options(case_index: int) -> dict:
    """Softcap and bias in turn over the cases."""
    return dict(softcap=(None, 30.0, 5.0)[case_index % 3], bias=case_index % 2 == 0)


def make_problem(loss: str, dtype: torch.dtype, *, bias: bool = True, seed: int = 0, B=None, T=None, H=None,
                 V=None):
    """``(hidden, weight, bias, labels, refs)``: the shared unequal-length batch of
    test_schedules.py and, for losses with a reference, reference sums ``[B]`` near the policy's
    (log-ratios of a few nats, as a trained policy's are)."""
    shape = {**SHAPE, **{k: v for k, v in dict(B=B, T=T, H=H, V=V).items() if v is not None}}
    hidden, weight, b, labels = batch(shape["B"], shape["T"], shape["H"], shape["V"], dtype, bias=bias,
                                      seed=seed, prompt=2)
    refs = {}
    if loss in NEEDS_REFERENCE:
        sums, _ = reference_sums(reference_logits(hidden.double(), weight.double(),
                                                  None if b is None else b.double(), None), labels)
        g = torch.Generator().manual_seed(seed + 100)
        noisy = sums + 2.0 * torch.randn(sums.shape, generator=g, dtype=torch.float64)
        Bn = shape["B"]
        refs = dict(ref_chosen_logps=noisy[:Bn].to(dtype), ref_rejected_logps=noisy[Bn:].to(dtype))
    return hidden, weight, b, labels, refs


def split_options(opts: dict):
    """``(loss options, call options)``: ``logit_metrics`` is an argument of the call."""
    opts = dict(opts)
    call = {k: opts.pop(k) for k in ("logit_metrics",) if k in opts}
    return opts, call


def leaves_of(hidden, weight, bias):
    return {name: None if t is None else t.detach().clone().requires_grad_()
            for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias))}


def run_library(backend, schedule, hidden, weight, bias, labels, loss, opts, refs, *, softcap,
                grad_scale=1.0):
    """Forward + backward of ``preference_loss``: ``(output, {name: grad})``."""
    leaves = leaves_of(hidden, weight, bias)
    where = dict(backend=backend)
    if backend != "eager":
        where.update(schedule=schedule, memory_budget=BUDGET)
    out = preference_loss(leaves["hidden"], leaves["weight"], labels, loss=loss, bias=leaves["bias"],
                          softcap=softcap, **refs, **where, **opts)
    (out.loss * grad_scale).backward()
    return out, {k: None if v is None else v.grad for k, v in leaves.items()}


def run_reference(hidden, weight, bias, labels, loss, opts, refs, *, softcap, grad_scale=1.0, nll_labels=None):
    leaves = {k: None if t is None else t.detach().double().requires_grad_()
              for k, t in (("hidden", hidden), ("weight", weight), ("bias", bias))}
    extra = {} if nll_labels is None else dict(nll_labels=nll_labels)
    ref = reference_preference(leaves["hidden"], leaves["weight"], labels, bias=leaves["bias"], softcap=softcap,
                               loss=loss, **refs, **opts, **extra)
    (ref["loss"] * grad_scale).backward()
    return ref, {k: None if v is None else v.grad for k, v in leaves.items()}


def nll_of(out):
    """The library's chosen-NLL output (``sft_loss`` field, named ``nll_loss`` in metrics for the
    losses other than simpo)."""
    return out.sft_loss


def extra_of(out, name):
    return out.extra[name]


def assert_outputs_match(case, loss, out, ref, tol):
    for key in FIELDS:
        got, want = getattr(out, key), ref[key]
        if want is None:
            assert got is None, f"{case}: {key} should be None"
            continue
        assert got is not None, f"{case}: {key} missing"
        assert got.shape == want.shape, f"{case}: {key} shape {tuple(got.shape)} != {tuple(want.shape)}"
        err = rel_err(got, want)
        assert err <= tol, f"{case}: {key} rel err {err:.2e} > {tol:.0e} (got {got.tolist()}, want {want.tolist()})"
    if ref["nll"] is None:
        assert nll_of(out) is None, f"{case}: an NLL term with weight 0"
    else:
        err = rel_err(nll_of(out), ref["nll"])
        assert err <= tol, f"{case}: NLL rel err {err:.2e}"
    for name in EXTRAS.get(loss, ()):
        err = rel_err(extra_of(out, name), ref[name])
        assert err <= tol, f"{case}: {name} rel err {err:.2e}"
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert_metrics_match(case, out.metrics(), ref["metrics"], tol)
    assert_metrics_match(case, out.metrics("eval_"), {"eval_" + k: v for k, v in ref["metrics"].items()}, tol)


def assert_metrics_match(case, got: dict, want: dict, tol: float):
    assert set(got) == set(want), f"{case}: metric names {sorted(got)} != {sorted(want)}"
    for k, v in want.items():
        if k.endswith("rewards/accuracies"):
            assert got[k] == pytest.approx(v, abs=1e-7), f"{case}: {k} {got[k]} != {v}"  # float32: 2/3 rounded
        else:
            assert abs(got[k] - v) <= tol * max(abs(v), 1.0), f"{case}: {k} {got[k]} != {v}"


def assert_grads_match(case, grads, ref_grads, inputs, tol):
    for (name, g), t in zip(grads.items(), inputs):
        if ref_grads[name] is None:
            assert g is None, f"{case}: d{name} should be None"
            continue
        assert g is not None and g.dtype == t.dtype and g.shape == t.shape, f"{case}: d{name} missing or mistyped"
        err = rel_err(g, ref_grads[name])
        assert err <= tol, f"{case}: d{name} rel err {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("run", RUNS, ids=run_id)
@pytest.mark.parametrize("index", range(len(CASES)), ids=[case_id(c) for c in CASES])
def test_loss_matches_reference(index, run):
    backend, schedule, dtype = run
    loss, all_opts = CASES[index]
    opts, call = split_options(all_opts)
    head = head_options(index)
    hidden, weight, bias, labels, refs = make_problem(loss, dtype, bias=head["bias"], seed=index)
    case = f"{loss}{opts}/{backend}:{schedule}"
    out, grads = run_library(backend, schedule, hidden, weight, bias, labels, loss, {**opts, **call}, refs,
                             softcap=head["softcap"], grad_scale=1.3)
    ref, ref_grads = run_reference(hidden, weight, bias, labels, loss, {**opts, **call}, refs,
                                   softcap=head["softcap"], grad_scale=1.3)
    assert_outputs_match(case, loss, out, ref, TOL[dtype]["val"])
    assert_grads_match(case, grads, ref_grads, (hidden, weight, bias), TOL[dtype]["grad"])
    # the hidden-state gradient is not trivially zero (the loss reaches every target row)
    assert grads["hidden"].abs().sum() > 0


LOGIT_RUNS = [("eager", torch.float64), ("torch", torch.float64), ("triton", torch.float32)]


@pytest.mark.parametrize("backend,dtype", LOGIT_RUNS, ids=[b for b, _ in LOGIT_RUNS])
@pytest.mark.parametrize("index", range(len(CASES)), ids=[case_id(c) for c in CASES])
def test_from_logits_matches_reference(index, backend, dtype):
    loss, all_opts = CASES[index]
    hidden, weight, bias, labels, refs = make_problem(loss, dtype, seed=50 + index)
    logits = reference_logits(hidden.double(), weight.double(), bias.double(), 30.0).to(dtype)
    x = logits.clone().requires_grad_()
    chunk = 5 if backend == "torch" else None
    out = preference_loss_from_logits(x, labels, loss=loss, backend=backend, chunk_size=chunk,
                                      **refs, **all_opts)
    (out.loss * 0.7).backward()
    y = logits.detach().double().requires_grad_()
    ref = reference_preference_from_logits(y, labels, loss=loss, **refs, **all_opts)
    (ref["loss"] * 0.7).backward()
    case = f"{loss}{all_opts}/logits-{backend}"
    assert_outputs_match(case, loss, out, ref, TOL[dtype]["val"])
    assert rel_err(x.grad, y.grad) <= TOL[dtype]["grad"], f"{case}: dlogits {rel_err(x.grad, y.grad):.2e}"


@pytest.mark.parametrize("run", RUNS, ids=run_id)
def test_simpo_through_preference_loss_is_simpo_loss(run):
    """``preference_loss(loss="simpo", ...)`` is ``simpo_loss(...)``: bit-identical outputs and grads."""
    backend, schedule, dtype = run
    hidden, weight, bias, labels, _ = make_problem("simpo", dtype, seed=7)
    opts = dict(beta=3.0, gamma_beta_ratio=0.4, label_smoothing=0.1, sft_weight=0.4, softcap=30.0)
    where = dict(backend=backend) if backend == "eager" else dict(backend=backend, schedule=schedule,
                                                                   memory_budget=BUDGET)
    results = []
    for fn in (lambda *a, **k: preference_loss(*a, loss="simpo", **k), simpo_loss):
        leaves = leaves_of(hidden, weight, bias)
        out = fn(leaves["hidden"], leaves["weight"], labels, bias=leaves["bias"], **where, **opts)
        out.loss.backward()
        results.append((out, [t.grad for t in leaves.values()]))
    (a, ga), (b, gb) = results
    for key in FIELDS + ("sft_loss",):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert a.metrics() == b.metrics()
    for x, y in zip(ga, gb):
        assert torch.equal(x, y)


@pytest.mark.parametrize("run", RUNS, ids=run_id)
def test_dpo_with_the_policy_as_reference_is_log_2(run):
    """Reference sums from ``sequence_logps`` of the same inputs: every log-ratio is 0, the DPO
    sigmoid loss is log 2, the rewards and margins 0 (item 2's step-0 exactness)."""
    backend, schedule, dtype = run
    hidden, weight, bias, labels, _ = make_problem("dpo", dtype, seed=3)
    B = SHAPE["B"]
    sums, counts = sequence_logps(hidden, weight, labels, bias=bias, softcap=30.0, backend=backend)
    refs = dict(ref_chosen_logps=sums[:B], ref_rejected_logps=sums[B:])
    out, _ = run_library(backend, schedule, hidden, weight, bias, labels, "dpo", dict(beta=0.1), refs, softcap=30.0)
    exact = float(torch.tensor(math.log(2), dtype=dtype))
    if dtype == torch.float64:
        # the loss is log 2 to the last bit; sequence_logps reduces as the loss does, so where the
        # per-token values come from the same computation (eager, torch's token chunks) the sums
        # and rewards are bit-identical; the pairs/vocab schedules form their per-token values by
        # another matmul order (1 ulp apart on some rows), so rewards are 0 to ~1e-16 there
        assert out.loss.item() == exact, (out.loss.item(), exact)
        if schedule in ("auto", "tokens"):
            assert torch.equal(torch.cat([out.chosen_logps, out.rejected_logps]), sums)
            assert not out.chosen_rewards.any() and not out.rejected_rewards.any()
        tol_sums = 1e-15
    else:
        assert abs(out.loss.item() - exact) <= 1e-6 * exact, (out.loss.item(), exact)
        tol_sums = 1e-6
    assert rel_err(torch.cat([out.chosen_logps, out.rejected_logps]), sums) <= tol_sums
    assert out.chosen_rewards.abs().max().item() <= 0.1 * tol_sums * sums.abs().max().item()
    assert out.rejected_rewards.abs().max().item() <= 0.1 * tol_sums * sums.abs().max().item()
    assert torch.equal(counts, (labels[:, 1:] != -100).sum(-1))


@pytest.mark.parametrize("backend,dtype", LOGIT_RUNS, ids=[b for b, _ in LOGIT_RUNS])
@pytest.mark.parametrize("softcap,bias", [(None, False), (30.0, True)], ids=["plain", "softcap-bias"])
def test_sequence_logps_matches_reference(backend, dtype, softcap, bias):
    """Any number of rows (here 5, odd), sums and counts of the shifted targets, no graph."""
    g = torch.Generator().manual_seed(11)
    R, T, H, V = 5, 7, 5, 37
    hidden = torch.randn(R, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.8
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, V, (R, T), generator=g)
    for r in range(R):
        labels[r, : 1 + r % 3] = -100
        labels[r, T - r % 2:] = -100
    want_sums, want_counts = reference_sums(reference_logits(hidden, weight, b, softcap), labels)
    h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    sums, counts = sequence_logps(h, w, labels, bias=None if b is None else b.to(dtype), softcap=softcap,
                                  backend=backend)
    assert sums.dtype == dtype and sums.shape == (R,) and not sums.requires_grad
    assert counts.dtype == torch.int64 and torch.equal(counts, want_counts)
    assert rel_err(sums, want_sums) <= TOL[dtype]["val"], rel_err(sums, want_sums)


def test_loss_table_and_metric_names():
    """``LOSSES`` holds exactly the spec's losses with its defaults; ``metric_names`` lists the keys
    ``metrics()`` returns."""
    assert set(LOSSES) == set(DEFAULTS)
    for name, defaults in DEFAULTS.items():
        cls = LOSSES[name]
        assert dict(cls.defaults) == defaults, name
        head = cls()
        assert head.name == name and head.needs_reference == (name in NEEDS_REFERENCE)
        assert head.options == defaults
    base = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/rejected",
            "logps/chosen"]
    logits = ["logits/rejected", "logits/chosen"]
    assert set(LOSSES["dpo"]().metric_names(None)) == set(base + logits)
    assert set(LOSSES["dpo"](rpo_alpha=0.5).metric_names(None)) == set(base + logits + ["nll_loss"])
    assert set(LOSSES["simpo"](sft_weight=0.5).metric_names("none")) == set(base + ["sft_loss"])
    assert set(LOSSES["orpo"]().metric_names("exact")) == set(base + logits + ["nll_loss", "log_odds_ratio",
                                                                              "log_odds_chosen"])
    assert set(LOSSES["cpo"](cpo_alpha=0.0).metric_names(None)) == set(base + logits)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case_id(c) for c in CASES])
def test_metric_names_are_what_metrics_returns(index):
    loss, all_opts = CASES[index]
    opts, call = split_options(all_opts)
    hidden, weight, bias, labels, refs = make_problem(loss, torch.float64, seed=index)
    out = preference_loss(hidden, weight, labels, loss=loss, bias=bias, backend="torch", **refs, **all_opts)
    assert list(LOSSES[loss](**opts).metric_names(call.get("logit_metrics"))) == list(out.metrics())


def test_loss_instance_equals_name():
    hidden, weight, bias, labels, refs = make_problem("dpo", torch.float64, seed=4)
    by_name = preference_loss(hidden, weight, labels, loss="dpo", beta=0.3, loss_type="ipo", bias=bias,
                              backend="torch", **refs)
    by_instance = preference_loss(hidden, weight, labels, loss=LOSSES["dpo"](beta=0.3, loss_type="ipo"), bias=bias,
                                  backend="torch", **refs)
    assert torch.equal(by_name.loss, by_instance.loss) and by_name.metrics() == by_instance.metrics()


@pytest.mark.parametrize("run", [RUNS[0], RUNS[2], RUNS[4]], ids=run_id)
@pytest.mark.parametrize("ref_dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d)[6:])
def test_reference_dtype_does_not_change_the_outputs(run, ref_dtype):
    """The reference sums enter in the objective's compute dtype (float32; float64 for float64
    inputs): whatever dtype the caller's column holds, the outputs have the inputs' compute dtype and
    equal the call with the sums cast to it first."""
    backend, schedule, dtype = run
    hidden, weight, bias, labels, refs = make_problem("dpo", dtype, seed=9)
    given = {k: v.to(ref_dtype) for k, v in refs.items()}
    cast = {k: v.to(dtype) for k, v in given.items()}
    got, grads = run_library(backend, schedule, hidden, weight, bias, labels, "dpo", dict(beta=0.3), given,
                             softcap=30.0)
    want, want_grads = run_library(backend, schedule, hidden, weight, bias, labels, "dpo", dict(beta=0.3), cast,
                                   softcap=30.0)
    for key in FIELDS:
        assert getattr(got, key).dtype == dtype, (key, getattr(got, key).dtype)
        assert torch.equal(getattr(got, key), getattr(want, key)), key
    for name in grads:
        assert torch.equal(grads[name], want_grads[name]), name


@pytest.mark.parametrize("run", RUNS, ids=run_id)
@pytest.mark.parametrize("loss,opts", [("dpo", dict(beta=0.3)), ("cpo", dict(loss_type="ipo")), ("orpo", {})],
                         ids=["dpo", "cpo-ipo", "orpo"])
def test_other_outputs_differentiable_except_on_pairs(run, loss, opts):
    """``losses`` and the logps are differentiable outputs on every schedule but ``pairs``, which
    forms the gradient of ``loss`` in the forward and refuses a backward through anything else
    (never a silently wrong gradient); under no_grad ``pairs`` gives the values without a graph."""
    backend, schedule, dtype = run
    hidden, weight, bias, labels, refs = make_problem(loss, dtype, seed=13)
    h = hidden.clone().requires_grad_()
    where = dict(backend=backend) if backend == "eager" else dict(backend=backend, schedule=schedule,
                                                                   memory_budget=BUDGET)
    out = preference_loss(h, weight, labels, bias=bias, softcap=30.0, loss=loss, **refs, **where, **opts)

    def combo(o):
        return o["losses"].sum() * 0.3 + o["chosen_logps"].sum() - 0.5 * o["rejected_logps"].sum()

    if schedule == "pairs":
        with pytest.raises(RuntimeError, match="schedule='pairs'"):
            combo(vars(out)).backward()
        with torch.no_grad():
            quiet = preference_loss(h, weight, labels, bias=bias, softcap=30.0, loss=loss, **refs, **where, **opts)
        assert not quiet.loss.requires_grad and torch.equal(quiet.loss, out.loss.detach())
        return
    combo(vars(out)).backward()
    x = hidden.detach().double().requires_grad_()
    ref = reference_preference(x, weight.double(), labels, bias=bias.double(), softcap=30.0, loss=loss, **refs, **opts)
    combo(ref).backward()
    assert rel_err(h.grad, x.grad) <= TOL[dtype]["grad"], rel_err(h.grad, x.grad)


#: (B, T, H, V): one pair with a single target per row; V smaller than a vocab chunk; long rows
ODD_SHAPES = [(1, 2, 5, 7), (1, 9, 3, 13), (2, 11, 3, 70)]


@pytest.mark.parametrize("run", RUNS, ids=run_id)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("loss,opts", [("dpo", dict(beta=0.3, loss_type="sigmoid_norm", rpo_alpha=0.4)),
                                       ("rdpo", dict(alpha=0.3)), ("orpo", {}), ("slic", dict(delta=30.0))],
                         ids=["dpo-sigmoid_norm-rpo", "rdpo", "orpo", "slic"])
def test_family_odd_shapes(run, shape, loss, opts):
    backend, schedule, dtype = run
    B, T, H, V = shape
    hidden, weight, bias, labels, refs = make_problem(loss, dtype, seed=B + T + V, B=B, T=T, H=H, V=V)
    out, grads = run_library(backend, schedule, hidden, weight, bias, labels, loss, opts, refs, softcap=30.0)
    ref, ref_grads = run_reference(hidden, weight, bias, labels, loss, opts, refs, softcap=30.0)
    case = f"{loss}/{shape}/{backend}:{schedule}"
    assert_outputs_match(case, loss, out, ref, TOL[dtype]["val"])
    assert_grads_match(case, grads, ref_grads, (hidden, weight, bias), TOL[dtype]["grad"])


def prompt_and_completion(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """``[B, T]`` NLL labels of the chosen rows as TRL's ORPO forms them: the input ids of prompt
    and response (here random ids on the prompt positions before each row's first target, the
    labels after), ``-100`` on the padding after the last target."""
    B = labels.shape[0] // 2
    g = torch.Generator().manual_seed(seed)
    lab = labels[:B]
    valid = lab != -100
    idx = torch.arange(lab.shape[1]).expand_as(lab)
    first = torch.where(valid, idx, lab.shape[1]).min(1).values
    last = torch.where(valid, idx, -1).max(1).values
    prompt = idx < first[:, None]
    ids = torch.randint(0, SHAPE["V"], lab.shape, generator=g)
    out = torch.where(valid, lab, torch.where(prompt, ids, -100))
    out[idx > last[:, None]] = -100  # padding stays out
    return out


NLL_CASES = [("orpo", dict(beta=0.25)), ("cpo", dict(loss_type="simpo", beta=2.0, cpo_alpha=0.5)),
             ("simpo", dict(beta=2.0, sft_weight=0.4)), ("dpo", dict(beta=0.2, rpo_alpha=0.7))]


@pytest.mark.parametrize("run", RUNS, ids=run_id)
@pytest.mark.parametrize("loss,opts", NLL_CASES, ids=[c[0] for c in NLL_CASES])
def test_nll_labels_match_reference(run, loss, opts):
    """``nll_labels`` (TRL's ORPO NLL over prompt and response): the NLL's extra positions are
    computed beside the targets on every schedule; sums, rewards and metrics stay the targets'."""
    backend, schedule, dtype = run
    hidden, weight, bias, labels, refs = make_problem(loss, dtype, seed=61)
    nll_labels = prompt_and_completion(labels, seed=62)
    kept = nll_labels.clone()
    assert ((nll_labels != -100) & (labels[:SHAPE["B"]] == -100)).any()  # positions beyond the targets
    case = f"{loss}{opts}+nll_labels/{backend}:{schedule}"
    out, grads = run_library(backend, schedule, hidden, weight, bias, labels, loss, {**opts, "nll_labels": nll_labels},
                             refs, softcap=30.0, grad_scale=0.9)
    ref, ref_grads = run_reference(hidden, weight, bias, labels, loss, {**opts}, refs, softcap=30.0,
                                   grad_scale=0.9, nll_labels=nll_labels)
    assert torch.equal(nll_labels, kept)
    assert_outputs_match(case, loss, out, ref, TOL[dtype]["val"])
    assert_grads_match(case, grads, ref_grads, (hidden, weight, bias), TOL[dtype]["grad"])
    plain, _ = run_reference(hidden, weight, bias, labels, loss, {**opts}, refs, softcap=30.0)
    assert rel_err(ref["nll"], plain["nll"]) > 1e-3  # the two NLL definitions differ here


@pytest.mark.parametrize("backend,dtype", LOGIT_RUNS, ids=[b for b, _ in LOGIT_RUNS])
def test_nll_labels_from_logits(backend, dtype):
    hidden, weight, bias, labels, _ = make_problem("orpo", dtype, seed=63)
    nll_labels = prompt_and_completion(labels, seed=64)
    logits = reference_logits(hidden.double(), weight.double(), bias.double(), 30.0).to(dtype)
    x = logits.clone().requires_grad_()
    out = preference_loss_from_logits(x, labels, loss="orpo", backend=backend, nll_labels=nll_labels)
    out.loss.backward()
    y = logits.detach().double().requires_grad_()
    ref = reference_preference_from_logits(y, labels, loss="orpo", nll_labels=nll_labels)
    ref["loss"].backward()
    assert_outputs_match(f"orpo+nll_labels/logits-{backend}", "orpo", out, ref, TOL[dtype]["val"])
    assert rel_err(x.grad, y.grad) <= TOL[dtype]["grad"]
