"""Packed (padding-free) batches: ``sequence_ids`` (:mod:`simpo_kernels.packed`) give the padded
layout's results on every backend and schedule.

Each case takes a padded batch (:func:`tests.test_schedules.batch`: rows of unequal lengths,
prompts, padding, random masked positions), lays its sequences end to end in rows of a fixed
width in a shuffled order, with padding between and after them (junk hidden states there, which
must not matter), and compares the packed call with the padded call of the same backend and
schedule: every output, ``logit_metrics="targets"``, and the gradients w.r.t. hidden states
(each sequence's positions; zero on the padding), weight and bias. ``logit_metrics="exact"``
averages every real position of a packed batch: checked against that definition on the padded
logits. Tolerances: float64 1e-10 relative (eager, torch); float32 1e-5 (triton, interpreter).
"""

from __future__ import annotations

import pytest
import torch

from simpo_kernels import preference_loss, sequence_logps, simpo_loss
from tests.reference import reference_logits, rel_err
from tests.test_losses import prompt_and_completion
from tests.test_schedules import batch

RUNS = [("eager", "auto", torch.float64)] + \
       [("torch", s, torch.float64) for s in ("tokens", "pairs", "vocab")] + \
       [("triton", s, torch.float32) for s in ("pairs", "vocab", "fused")]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
B, T, H, V = 3, 9, 5, 37
BUDGET = 600  # pairs: about one pair per chunk; vocab: chunks of 16 columns
OUTPUTS = ("loss", "losses", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "sft_loss",
           "chosen_logits_mean", "rejected_logits_mean")


def _id(run):
    return f"{run[0]}-{run[1]}-{str(run[2])[6:]}"


def lengths_of(labels: torch.Tensor, seed: int) -> list[int]:
    """Each sequence's length: through its last target, plus some of its padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for row in labels:
        last = int((row != -100).nonzero().max())
        out.append(last + 1 + int(torch.randint(0, row.shape[0] - last, (1,), generator=g)))
    return out


def pack(lengths: list[int], width: int, seed: int):
    """A random packing: sequences in shuffled order, 0-2 padding positions before each, a new
    row when one does not fit. Returns ``(rows, starts)``: ``starts[s] = (row, column)``."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()
    starts, row, col = {}, 0, 0
    for s in order:
        gap = int(torch.randint(0, 3, (1,), generator=g))
        if col + gap + lengths[s] > width:
            row, col, gap = row + 1, 0, 0
        starts[s] = (row, col + gap)
        col += gap + lengths[s]
    return row + 1, starts


def packed_batch(hidden, labels, lengths, *, width=2 * T, seed=0, extra=None):
    """``hidden [S, T, H]``, ``labels [S, T]`` -> packed ``(hidden [R, W, H], labels, sequence_ids,
    extra)`` with junk hidden states and ``ignore_index`` labels on the padding. ``extra``: more
    ``[S, T]`` integer tensors packed like the labels."""
    rows, starts = pack(lengths, width, seed)
    g = torch.Generator().manual_seed(seed + 1)
    h = torch.randn(rows, width, hidden.shape[-1], generator=g, dtype=torch.float64).to(hidden.dtype) * 5
    lab = torch.full((rows, width), -100, dtype=labels.dtype)
    ids = torch.full((rows, width), -1, dtype=torch.long)
    more = None if extra is None else torch.full((rows, width), -100, dtype=extra.dtype)
    for s, (r, c) in starts.items():
        n = lengths[s]
        h[r, c:c + n] = hidden[s, :n]
        lab[r, c:c + n] = labels[s, :n]
        ids[r, c:c + n] = s
        if more is not None:
            more[r, c:c + n] = extra[s, :n]
    return h, lab, ids, more, starts


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def unpack_grad(grad: torch.Tensor, starts, lengths, T: int) -> torch.Tensor:
    """Packed hidden-state gradient -> the padded layout's ``[S, T, H]`` (zero past each end);
    asserts the padding positions got none."""
    out = torch.zeros(len(lengths), T, grad.shape[-1], dtype=grad.dtype)
    seen = torch.zeros(grad.shape[:2], dtype=torch.bool)
    for s, (r, c) in starts.items():
        out[s, :lengths[s]] = grad[r, c:c + lengths[s]]
        seen[r, c:c + lengths[s]] = True
    assert grad[~seen].abs().max().item() == 0.0, "gradient on padding"
    return out


def run_both(run, loss, opts, *, softcap=30.0, with_bias=True, seed=0, nll=False, refs=None):
    backend, schedule, dtype = run
    hidden, weight, bias, labels = batch(B, T, H, V, dtype, bias=with_bias, seed=seed)
    lengths = lengths_of(labels, seed)
    nll_padded = prompt_and_completion(labels, seed=seed + 5) if nll else None
    nll_full = None if nll_padded is None else torch.cat([nll_padded, torch.full_like(nll_padded, -100)])
    hp, lp, ids, nll_packed, starts = packed_batch(hidden, labels, lengths, seed=seed, extra=nll_full)
    common = dict(softcap=softcap, backend=backend, schedule=schedule, memory_budget=BUDGET, **opts)
    if refs is not None:
        common.update(ref_chosen_logps=refs[0], ref_rejected_logps=refs[1])
    outs, grads = [], []
    for h, lab, extra in ((hidden, labels, dict(nll_labels=nll_padded) if nll else {}),
                          (hp, lp, dict(sequence_ids=ids, nll_labels=nll_packed) if nll else dict(sequence_ids=ids))):
        h_, w_, b_ = leaves(h, weight, bias)
        out = preference_loss(h_, w_, lab, bias=b_, loss=loss, **extra, **common)
        out.loss.backward()
        outs.append(out)
        grads.append((h_.grad, w_.grad, None if b_ is None else b_.grad))
    return outs, grads, (hidden, weight, bias, labels, lengths, starts, softcap)


def assert_same(outs, grads, tol, starts, lengths, skip=()):
    padded, packed = outs
    for name in OUTPUTS:
        if name in skip:
            continue
        a, b = getattr(padded, name), getattr(packed, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert rel_err(b, a) <= tol, (name, rel_err(b, a))
    for key in padded.extra:
        assert rel_err(packed.extra[key], padded.extra[key]) <= tol, key
    (gh, gw, gb), (ph, pw, pb) = grads
    assert rel_err(unpack_grad(ph, starts, lengths, T), gh) <= tol
    assert rel_err(pw, gw) <= tol
    if gb is not None:
        assert rel_err(pb, gb) <= tol


@pytest.mark.parametrize("run", RUNS, ids=_id)
def test_packed_simpo_equals_padded(run):
    """SimPO with its SFT term, label smoothing, softcap and bias: the padded batch's results."""
    opts = dict(beta=2.5, gamma_beta_ratio=0.3, label_smoothing=0.1, sft_weight=0.5, logit_metrics="targets")
    outs, grads, (_, _, _, _, lengths, starts, _) = run_both(run, "simpo", opts)
    assert_same(outs, grads, TOL[run[2]], starts, lengths)


@pytest.mark.parametrize("run", [RUNS[0], RUNS[2], RUNS[4]], ids=_id)
@pytest.mark.parametrize("loss,opts,extra", [
    ("dpo", dict(beta=0.3, rpo_alpha=0.5), "refs"),
    ("orpo", dict(beta=0.25, logit_metrics="targets"), "nll"),
    ("cpo", dict(beta=0.2, logit_metrics="targets"), None),
], ids=["dpo-rpo", "orpo-nll_labels", "cpo"])
def test_packed_family_equals_padded(run, loss, opts, extra):
    """The family through the same layout: DPO's reference sums, ORPO's NLL over prompt and
    response (``nll_labels`` packed like the labels), CPO's NLL over the targets."""
    refs = (torch.tensor([-20.0, -31.5, -12.25]), torch.tensor([-22.0, -30.0, -15.5])) if extra == "refs" else None
    outs, grads, (_, _, _, _, lengths, starts, _) = run_both(run, loss, opts, seed=3, nll=extra == "nll", refs=refs,
                                                             with_bias=False, softcap=None)
    assert_same(outs, grads, TOL[run[2]], starts, lengths)


@pytest.mark.parametrize("run", [RUNS[0], RUNS[1], RUNS[5]], ids=_id)
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_exact_logit_metrics_average_every_real_position(run, softcap):
    """``logit_metrics="exact"`` on a packed batch: the mean logit over every position of the
    chosen (rejected) sequences, none of the padding (the padded batch's value averages its
    padding positions too); the other outputs still equal the padded batch's."""
    outs, grads, (hidden, weight, bias, _, lengths, starts, cap) = run_both(
        run, "simpo", dict(logit_metrics="exact"), softcap=softcap, seed=7)
    assert_same(outs, grads, TOL[run[2]], starts, lengths, skip=("chosen_logits_mean", "rejected_logits_mean"))
    logits = reference_logits(hidden.to(torch.float64), weight.to(torch.float64), bias.to(torch.float64), cap)
    for name, rows in (("chosen_logits_mean", range(B)), ("rejected_logits_mean", range(B, 2 * B))):
        real = torch.cat([logits[s, :lengths[s]].reshape(-1) for s in rows])
        assert rel_err(getattr(outs[1], name), real.mean()) <= TOL[run[2]], name
    assert rel_err(outs[0].chosen_logits_mean, logits[:B].mean()) <= TOL[run[2]]  # padded: padding included


@pytest.mark.parametrize("backend,dtype", [("eager", torch.float64), ("torch", torch.float64),
                                           ("triton", torch.float32)])
def test_packed_sequence_logps_equal_padded(backend, dtype):
    """A reference model's per-sequence sums, in sequence order, from packed rows (any number of
    sequences: here 5)."""
    hidden, weight, bias, labels = batch(3, T, H, V, dtype, seed=11)
    hidden, labels = hidden[:5], labels[:5]
    lengths = lengths_of(labels, 11)
    hp, lp, ids, _, _ = packed_batch(hidden, labels, lengths, seed=11)
    sums, counts = sequence_logps(hidden, weight, labels, bias=bias, softcap=30.0, backend=backend)
    psums, pcounts = sequence_logps(hp, weight, lp, bias=bias, softcap=30.0, backend=backend, sequence_ids=ids)
    assert torch.equal(pcounts, counts)
    assert rel_err(psums, sums) <= TOL[dtype]


def test_the_shift_stays_inside_each_sequence():
    """A sequence's last position predicts nothing, even with the next sequence right after it
    and a label at that one's first position: a shift across the boundary would add a target."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 8, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    labels = torch.tensor([[-100, 3, 4, 5, 6, 7, 8, 9]])
    ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    out = simpo_loss(hidden, weight, labels, sequence_ids=ids, backend="torch")
    logp = torch.log_softmax(hidden[0] @ weight.T, -1)
    chosen = (logp[0, 3] + logp[1, 4] + logp[2, 5]) / 3  # positions 0..2 predict labels 1..3
    rejected = (logp[4, 7] + logp[5, 8] + logp[6, 9]) / 3  # position 3 does not predict label 6
    assert rel_err(out.chosen_logps, chosen.reshape(1)) < 1e-12
    assert rel_err(out.rejected_logps, rejected.reshape(1)) < 1e-12


def test_inputs_are_not_modified():
    hidden, weight, bias, labels = batch(B, T, H, V, torch.float64, seed=2)
    lengths = lengths_of(labels, 2)
    hp, lp, ids, _, _ = packed_batch(hidden, labels, lengths, seed=2)
    kept = [t.clone() for t in (hp, lp, ids)]
    h_ = hp.clone().requires_grad_(True)
    simpo_loss(h_, weight, lp, bias=bias, sequence_ids=ids, backend="torch", schedule="pairs").loss.backward()
    assert all(torch.equal(a, b) for a, b in zip((h_.detach(), lp, ids), kept))


def _bad(ids=None, labels=None, **kw):
    hidden = torch.randn(2, 6, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64)
    if labels is None:
        labels = torch.tensor([[-100, 1, 2, -100, 4, 5], [-100, 1, 2, -100, 4, 5]])
    return lambda: simpo_loss(hidden, weight, labels, sequence_ids=ids, backend="torch", **kw)


GOOD = torch.tensor([[0, 0, 0, 2, 2, 2], [1, 1, 1, 3, 3, 3]])


@pytest.mark.parametrize("ids,labels,error,match", [
    (GOOD.float(), None, TypeError, "sequence_ids must be an integer tensor"),
    (GOOD[:, :5], None, ValueError, r"sequence_ids must have the packed batch's shape \[R, W\] = \[2, 6\]"),
    (torch.tensor([[0, 0, 2, 2, 3, 3], [3, 3, 1, 1, -1, -1]]), None, ValueError, "sequence 3 is not one contiguous run"),
    (torch.tensor([[0, 0, 1, 1, 0, 0], [2, 2, 2, 3, 3, 3]]), None, ValueError, "sequence 0 is not one contiguous"),
    (torch.tensor([[0, 0, 0, 3, 3, 3], [1, 1, 1, 4, 5, 5]]), None, ValueError, "sequence_ids skip sequence 2"),
    (torch.tensor([[0, 0, 0, 2, 2, 2], [1, 1, 1, -1, -1, -1]]), None, ValueError, "must number 2B sequences .*found 3"),
    (torch.tensor([[0, 0, 0, -2, 2, 2], [1, 1, 1, 3, 3, 3]]), None, ValueError, "must be >= 0 .* or -1"),
    (torch.tensor([[0, 0, 0, -1, 2, 2], [1, 1, 1, 3, 3, 3]]),
     torch.tensor([[-100, 1, 2, 7, 4, 5], [-100, 1, 2, -100, 4, 5]]), ValueError, "a label on padding: row 0, position 3"),
    (torch.full((2, 6), -1), None, ValueError, "holds no sequence"),
    (torch.tensor([[0, 0, 0, 2, 2, 2], [1, 1, 1, 3, 3, 3]]),
     torch.tensor([[-100, 1, 2, -100, -100, -100], [-100, 1, 2, -100, 4, 5]]), ValueError,
     "sequence 2 has no target token"),
], ids=["float", "shape", "split-rows", "split-runs", "skipped", "odd", "below", "pad-label", "empty", "no-target"])
def test_bad_sequence_ids_are_refused(ids, labels, error, match):
    with pytest.raises(error, match=match):
        _bad(ids, labels)()


def test_packed_references_and_nll_labels_are_checked_against_the_sequences():
    """Reference sums are ``[B]`` per pair of the packed batch (not per row); nll_labels must be
    packed like the labels."""
    with pytest.raises(ValueError, match=r"ref_chosen_logps must have shape \[B\] = \[2\]"):
        hidden, weight = torch.randn(2, 6, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
        labels = torch.tensor([[-100, 1, 2, -100, 4, 5], [-100, 1, 2, -100, 4, 5]])
        preference_loss(hidden, weight, labels, loss="dpo", sequence_ids=GOOD, backend="torch",
                        ref_chosen_logps=torch.zeros(1), ref_rejected_logps=torch.zeros(1))
    with pytest.raises(ValueError, match=r"nll_labels must have the packed batch's shape \[2, 6\]"):
        preference_loss(hidden, weight, labels, loss="orpo", sequence_ids=GOOD, backend="torch",
                        nll_labels=labels[:1])
