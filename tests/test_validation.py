"""Bad input is rejected with a clear message on every backend; non-finite input never gives a finite loss."""

from __future__ import annotations

import warnings

import pytest
import torch

from simpo_kernels import simpo_loss, simpo_loss_from_logits

from .test_api import make_batch

BACKENDS = ["eager", "torch", "auto"]


@pytest.fixture
def batch():
    hidden, weight, bias, labels = make_batch(2, 6, 5, 11, dtype=torch.float32, bias=True, seed=0)
    return hidden, weight, bias, labels


def call(batch, backend, **over):
    hidden, weight, bias, labels = batch
    args = dict(hidden_states=hidden, weight=weight, labels=labels, bias=bias)
    args.update(over)
    return simpo_loss(args.pop("hidden_states"), args.pop("weight"), args.pop("labels"), backend=backend, **args)


CASES = [
    # (overrides or callable(batch) -> overrides, exception, message fragment)
    (lambda b: dict(hidden_states=b[0][:3], labels=b[3][:3]), ValueError, "even, non-zero number of rows"),
    (lambda b: dict(hidden_states=b[0][:0], labels=b[3][:0]), ValueError, "even, non-zero number of rows"),
    (lambda b: dict(hidden_states=b[0][0]), ValueError, "hidden_states must be [2B, T, H]"),
    (lambda b: dict(labels=b[3][:, :5]), ValueError, "labels must have shape [2B, T] = [4, 6], got [4, 5]"),
    (lambda b: dict(labels=b[3][:2]), ValueError, "labels must have shape"),
    (lambda b: dict(weight=b[1][:, :4]), ValueError, "hidden size mismatch"),
    (lambda b: dict(weight=b[1][None]), ValueError, "weight must be the lm_head weight [V, H]"),
    (lambda b: dict(bias=b[2][:7]), ValueError, "bias must have shape [V] = [11], got [7]"),
    (lambda b: dict(labels=b[3].float()), TypeError, "labels must be an integer tensor"),
    (lambda b: dict(labels=b[3] > 0), TypeError, "labels must be an integer tensor"),
    (lambda b: dict(hidden_states=b[0].long()), TypeError, "hidden_states must be a floating tensor"),
    (lambda b: dict(weight=b[1].to(torch.int32)), TypeError, "weight must be a floating tensor"),
    (lambda b: dict(weight=b[1].double()), TypeError, "must have the same dtype"),
    (lambda b: dict(bias=b[2].double()), TypeError, "bias (torch.float64) must have the weight's dtype"),
    (lambda b: dict(hidden_states=b[0].tolist()), TypeError, "hidden_states must be a torch.Tensor"),
    (lambda b: dict(loss_type="ipo"), ValueError, "unknown loss_type 'ipo'"),
    (lambda b: dict(beta=0.0), ValueError, "beta must be > 0"),
    (lambda b: dict(beta=float("nan")), ValueError, "beta must be finite"),
    (lambda b: dict(label_smoothing=0.7), ValueError, "label_smoothing must be in [0, 0.5]"),
    (lambda b: dict(sft_weight=-1.0), ValueError, "sft_weight must be >= 0"),
    (lambda b: dict(softcap=0.0), ValueError, "softcap must be a positive finite number"),
    (lambda b: dict(softcap="30"), TypeError, "softcap must be a positive number or None"),
    (lambda b: dict(backend="cuda"), ValueError, "unknown backend 'cuda'"),
    (lambda b: dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_bad_input_is_rejected(batch, backend, case):
    make, exc, fragment = CASES[case]
    over = make(batch)
    if "backend" in over:
        backend = over.pop("backend")
    with pytest.raises(exc) as info:
        call(batch, backend, **over)
    assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [11, 12, -1, -7])
def test_label_out_of_range_names_row_and_position(batch, backend, bad):
    labels = batch[3].clone()
    labels[3, 4] = bad
    with pytest.raises(ValueError, match=rf"label id {bad} at row 3, position 4 is outside \[0, 11\)"):
        call(batch, backend, labels=labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_without_targets_is_named(batch, backend):
    labels = batch[3].clone()
    labels[2, 1:] = -100
    labels[2, 0] = 5  # a label at position 0 is never a target (nothing predicts it)
    with pytest.raises(ValueError, match=r"row 2 has no target token"):
        call(batch, backend, labels=labels)


def test_custom_ignore_index(batch):
    hidden, weight, bias, labels = batch
    relabelled = torch.where(labels == -100, torch.full_like(labels, 11 + 5), labels)
    with pytest.raises(ValueError, match="label id 16"):
        simpo_loss(hidden, weight, relabelled)
    a = simpo_loss(hidden, weight, relabelled, ignore_index=16, backend="torch")
    b = simpo_loss(hidden, weight, labels, backend="torch")
    assert torch.equal(a.loss, b.loss)


def test_sequence_of_length_one_is_rejected():
    h = torch.randn(2, 1, 4)
    with pytest.raises(ValueError, match="at least 2 positions"):
        simpo_loss(h, torch.randn(7, 4), torch.zeros(2, 1, dtype=torch.long))


def test_hinge_with_label_smoothing_warns(batch):
    with pytest.warns(UserWarning, match="hinge loss type that does not support label smoothing"):
        out = call(batch, "torch", loss_type="hinge", label_smoothing=0.1)
    plain = call(batch, "torch", loss_type="hinge")
    assert torch.equal(out.loss, plain.loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(batch, "torch", loss_type="sigmoid", label_smoothing=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["hidden", "weight", "bias", "rejected_hidden"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_non_finite_input_never_gives_finite_loss(batch, backend, where, value, softcap):
    hidden, weight, bias, labels = (t.clone() for t in batch)
    if where == "hidden":
        hidden[0, 3, 1] = value
    elif where == "rejected_hidden":
        hidden[3, 2, :] = value  # rejected side: without the guard a -inf logp gives loss 0
    elif where == "weight":
        weight[4, 2] = value
    else:
        bias[0] = value
    out = simpo_loss(hidden, weight, labels, bias=bias, softcap=softcap, backend=backend)
    assert not torch.isfinite(out.loss), f"finite loss {out.loss.item()} from {value} in {where}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_never_give_finite_loss(backend, value):
    logits = torch.randn(4, 5, 9)
    labels = torch.randint(0, 9, (4, 5))
    logits[2, 1, 3] = value
    out = simpo_loss_from_logits(logits, labels, backend=backend)
    assert not torch.isfinite(out.loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_logits_validation(backend):
    logits = torch.randn(4, 5, 9)
    labels = torch.randint(0, 9, (4, 5))
    with pytest.raises(ValueError, match="logits must have an even"):
        simpo_loss_from_logits(logits[:3], labels[:3], backend=backend)
    with pytest.raises(ValueError, match="logits must be"):
        simpo_loss_from_logits(logits[0], labels, backend=backend)
    with pytest.raises(TypeError, match="logits must be a floating tensor"):
        simpo_loss_from_logits(logits.long(), labels, backend=backend)
    with pytest.raises(ValueError, match="label id 9 at row 0, position 2"):
        simpo_loss_from_logits(logits, torch.where(torch.arange(5) == 2, 9, labels), backend=backend)
    with pytest.raises(ValueError, match="unknown loss_type"):
        simpo_loss_from_logits(logits, labels, loss_type="dpo", backend=backend)


# -- the preference-loss family ------------------------------------------------------------------

def family_call(batch, backend, loss, *, refs="auto", **options):
    """``preference_loss`` on the fixture batch; ``refs="auto"``: valid reference sums for a loss
    that needs them, none otherwise; else a dict of the reference arguments to pass."""
    from simpo_kernels import LOSSES, preference_loss

    hidden, weight, bias, labels = batch
    if refs == "auto":
        needs = isinstance(loss, str) and loss in LOSSES and LOSSES[loss].needs_reference
        refs = {}
        if needs:
            refs = dict(ref_chosen_logps=torch.full((2,), -9.0), ref_rejected_logps=torch.full((2,), -11.0))
    return preference_loss(hidden, weight, labels, bias=bias, loss=loss, backend=backend, **refs, **options)


REF = torch.full((2,), -9.0)
FAMILY_CASES = [
    # (loss, overrides, exception, message fragment)
    ("kto", {}, ValueError, "unknown loss 'kto'"),
    ("DPO", {}, ValueError, "unknown loss 'DPO'"),
    (None, {}, ValueError, "unknown loss None"),
    ("dpo", dict(gamma_beta_ratio=0.5), TypeError, "gamma_beta_ratio for loss='dpo'; its options are beta"),
    ("simpo", dict(rpo_alpha=0.5), TypeError, "rpo_alpha for loss='simpo'"),
    ("orpo", dict(label_smoothing=0.1), TypeError, "label_smoothing for loss='orpo'"),
    ("simpo", dict(refs=dict(ref_chosen_logps=REF, ref_rejected_logps=REF)), ValueError,
     "loss='simpo' uses no reference model, but ref_chosen_logps and ref_rejected_logps were given"),
    ("cpo", dict(refs=dict(ref_rejected_logps=REF)), ValueError, "uses no reference model"),
    ("dpo", dict(refs={}), ValueError, "ref_chosen_logps and ref_rejected_logps missing"),
    ("rdpo", dict(refs=dict(ref_chosen_logps=REF)), ValueError, "ref_rejected_logps missing"),
    ("dpo", dict(refs=dict(ref_chosen_logps=REF, ref_rejected_logps=torch.zeros(3))), ValueError,
     "ref_rejected_logps must have shape [B] = [2]"),
    ("dpo", dict(refs=dict(ref_chosen_logps=REF[:, None], ref_rejected_logps=REF)), ValueError,
     "ref_chosen_logps must have shape [B] = [2]"),
    ("dpo", dict(refs=dict(ref_chosen_logps=REF.long(), ref_rejected_logps=REF)), TypeError, "ref_chosen_logps"),
    ("dpo", dict(refs=dict(ref_chosen_logps=REF, ref_rejected_logps=REF > 0)), TypeError, "ref_rejected_logps"),
    ("dpo", dict(refs=dict(ref_chosen_logps=REF.tolist(), ref_rejected_logps=REF)), TypeError, "ref_chosen_logps"),
    ("dpo", dict(beta=0.0), ValueError, "beta must be > 0"),
    ("dpo", dict(beta=-0.1), ValueError, "beta must be > 0"),
    ("cpo", dict(beta=float("inf")), ValueError, "beta must be finite"),
    ("dpo", dict(loss_type="robust", label_smoothing=0.5), ValueError, "label_smoothing must be < 0.5"),
    ("dpo", dict(label_smoothing=0.7), ValueError, "label_smoothing must be in [0, 0.5]"),
    ("dpo", dict(loss_type="simpo"), ValueError, "unknown loss_type 'simpo' for loss='dpo'"),
    ("cpo", dict(loss_type="robust"), ValueError, "unknown loss_type 'robust' for loss='cpo'"),
    ("simpo", dict(loss_type="ipo"), ValueError, "unknown loss_type 'ipo'"),
    ("dpo", dict(rpo_alpha=-1.0), ValueError, "rpo_alpha must be >= 0"),
    ("cpo", dict(cpo_alpha=-0.5), ValueError, "cpo_alpha must be >= 0"),
    ("rrhf", dict(nll_weight=-1.0), ValueError, "nll_weight must be >= 0"),
    ("slic", dict(delta="1"), TypeError, "delta must be a real number"),
    ("rdpo", dict(alpha=True), TypeError, "alpha must be a real number"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(FAMILY_CASES)),
                         ids=[f"{c[0]}-{c[3][:30]}" for c in FAMILY_CASES])
def test_family_bad_input_is_rejected(batch, backend, case):
    loss, over, exc, fragment = FAMILY_CASES[case]
    over = dict(over)
    refs = over.pop("refs", "auto")
    with pytest.raises(exc) as info:
        family_call(batch, backend, loss, refs=refs, **over)
    assert fragment in str(info.value), str(info.value)


def _nll_cases(labels):
    """(loss, options, nll_labels, exception, fragment) for bad ``nll_labels``."""
    B, T = labels.shape[0] // 2, labels.shape[1]
    ok = labels[:B].clamp_min(0)  # prompt + response ids, no padding
    wrong = ok.clone()
    r, t = (labels[:B] != -100).nonzero()[0].tolist()
    wrong[r, t] = (int(labels[r, t]) + 1) % 5
    out_of_range = ok.clone()
    out_of_range[0, 0] = 10**6
    return [
        ("dpo", {}, ok, ValueError, "nll_labels was given, but loss='dpo' has no NLL term here"),
        ("simpo", {}, ok, ValueError, "has no NLL term"),
        ("orpo", {}, ok.float(), TypeError, "nll_labels must be an integer tensor"),
        ("orpo", {}, ok.tolist(), TypeError, "nll_labels must be a torch.Tensor"),
        ("orpo", {}, labels.clamp_min(0), ValueError, f"nll_labels must have shape [B, T] = [{B}, {T}]"),
        ("orpo", {}, wrong, ValueError, f"nll_labels and labels disagree at chosen row {r}, position {t}"),
        ("orpo", {}, out_of_range, ValueError, "nll_labels id 1000000 at row 0, position 0 is outside"),
        ("cpo", {}, torch.full_like(ok, -100), ValueError, "nll_labels has no target token"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_family_bad_nll_labels_are_rejected(batch, backend):
    from simpo_kernels import preference_loss_from_logits

    hidden, weight, bias, labels = batch
    for loss, opts, nll_labels, exc, fragment in _nll_cases(labels):
        with pytest.raises(exc) as info:
            family_call(batch, backend, loss, nll_labels=nll_labels, **opts)
        assert fragment in str(info.value), (loss, str(info.value))
    logits = torch.randn(*labels.shape, 7)
    with pytest.raises(ValueError, match="disagree"):
        preference_loss_from_logits(logits, labels.clamp_max(6), loss="orpo",
                                    nll_labels=_nll_cases(labels.clamp_max(6))[5][2].clamp_max(6))


def test_family_bad_input_from_logits_and_loss_objects(batch):
    from simpo_kernels import LOSSES, preference_loss_from_logits, sequence_logps

    logits = torch.randn(4, 6, 11)
    labels = batch[3]
    with pytest.raises(ValueError, match="needs the reference model's per-sequence log-prob sums"):
        preference_loss_from_logits(logits, labels, loss="dpo", backend="torch")
    with pytest.raises(ValueError, match="uses no reference model"):
        preference_loss_from_logits(logits, labels, loss="orpo", ref_chosen_logps=REF, ref_rejected_logps=REF)
    with pytest.raises(TypeError, match="unexpected option"):
        preference_loss_from_logits(logits, labels, loss="rrhf", beta=1.0)
    # a configured loss object takes no loose options beside it
    with pytest.raises(TypeError, match="cannot be given beside it"):
        family_call(batch, "torch", LOSSES["cpo"](beta=0.2), beta=0.3)
    # sequence_logps validates like the loss (any number of rows, but shapes and dtypes)
    hidden, weight, bias, labels = batch
    with pytest.raises(ValueError, match="labels must have shape"):
        sequence_logps(hidden, weight, labels[:, :5])
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        sequence_logps(hidden, weight, labels.float())
    sums, counts = sequence_logps(hidden[:3], weight, labels[:3], bias=bias)  # an odd number of rows is fine
    assert sums.shape == (3,) and counts.shape == (3,)


def test_family_ignored_label_smoothing_warns(batch):
    """As the official trainers: a loss type without label smoothing warns and ignores it."""
    with pytest.warns(UserWarning, match="does not support label smoothing") as record:
        out = family_call(batch, "torch", "dpo", loss_type="ipo", label_smoothing=0.1)
    assert record[0].filename == __file__  # points at the caller's line, not the library's
    assert torch.equal(out.loss, family_call(batch, "torch", "dpo", loss_type="ipo").loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        family_call(batch, "torch", "dpo", loss_type="robust", label_smoothing=0.1)
        family_call(batch, "torch", "cpo", loss_type="simpo", label_smoothing=0.1)
