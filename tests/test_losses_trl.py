"""The preference losses against TRL's own loss code on the same per-sequence log-probabilities.

TRL 1.16 (the ``peers`` extra) keeps its losses inside trainer methods; :mod:`tests.trl_harness`
calls them unbound with stand-ins (``CPOTrainer.cpo_loss``, ``ORPOTrainer.odds_ratio_loss``,
``DPOTrainer._compute_loss`` with a precomputed reference and a stand-in model that returns the
per-token log-probs) and, for CPO and ORPO, their whole ``get_batch_loss_metrics`` on given logits
(TRL's own get_batch_logps, NLL and metrics). The library runs on the torch backend in float64;
its per-sequence logps (for DPO the per-token log-probs of the float64 reference whose sums they
are; for the whole batches the float64 logits of the same inputs) go to TRL.
Tolerances: 1e-10 relative (float64 on both sides); ORPO 1e-6 (TRL casts to float32).

Where TRL's conventions differ from the spec, the test says so: TRL 1.16's DPO ``sigmoid`` has no
label smoothing (compared at eps = 0; ``robust`` at eps > 0). TRL's ORPO NLL covers prompt and
response (``input_ids`` under the attention mask), which the library computes with
``nll_labels``; its default NLL covers the labels (compared with TRL's attention mask on the
completion). ORPO's ``logits/*`` average every position but the last on both sides, as TRL's do.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.reference import reference_logits, rel_err
from tests.reference_losses import reference_preference_from_logits, target_logps
from tests.trl_harness import trl_available, trl_cpo_batch, trl_cpo_loss, trl_dpo, trl_orpo_batch, trl_orpo_loss

REASON = trl_available()
if REASON is not None:
    print(f"tests/test_losses_trl.py skipped: {REASON}")
    pytestmark = pytest.mark.skip(reason=REASON)

from tests.test_losses import make_problem  # noqa: E402

TOL = 1e-10
SOFTCAP = 30.0


@pytest.fixture(autouse=True)
def _quiet_trl():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental's import-time notices
        yield


def library(loss, hidden, weight, bias, labels, refs, **opts):
    from simpo_kernels import preference_loss

    return preference_loss(hidden, weight, labels, loss=loss, bias=bias, softcap=SOFTCAP, backend="torch",
                           **refs, **opts)


def per_token(hidden, weight, bias, labels):
    """Float64 per-token target log-probs ``[2B, T-1]``, mask, per-position mean logit."""
    logits = reference_logits(hidden.double(), weight.double(), None if bias is None else bias.double(), SOFTCAP)
    lp, mask = target_logps(logits, labels)
    return lp, mask, logits[:, :-1].mean(-1), logits


DPO_TYPES = [("sigmoid", 0.0, 0.0), ("hinge", 0.0, 0.0), ("ipo", 0.0, 0.0), ("robust", 0.2, 0.0),
             ("sigmoid_norm", 0.0, 0.0), ("sigmoid", 0.0, 0.5)]  # the last: RPO = sigmoid + sft weight 0.5


@pytest.mark.parametrize("loss_type,eps,rpo", DPO_TYPES, ids=[f"{t}-eps{e}-rpo{r}" for t, e, r in DPO_TYPES])
def test_dpo_matches_trl(loss_type, eps, rpo):
    hidden, weight, bias, labels, refs = make_problem("dpo", torch.float64, seed=21)
    opts = dict(beta=0.3 if loss_type != "hinge" else 0.05, loss_type=loss_type, label_smoothing=eps, rpo_alpha=rpo)
    out = library("dpo", hidden, weight, bias, labels, refs, **opts)
    lp, mask, mean_logits, _ = per_token(hidden, weight, bias, labels)
    B = hidden.shape[0] // 2
    assert rel_err(out.chosen_logps, lp.sum(-1)[:B]) <= 1e-12  # the same per-sequence log-probs
    loss, metrics = trl_dpo(lp, mask, refs["ref_chosen_logps"], refs["ref_rejected_logps"], beta=opts["beta"],
                            loss_type=loss_type, label_smoothing=eps, rpo_alpha=rpo, mean_logits=mean_logits)
    assert rel_err(out.loss, loss) <= TOL, (out.loss.item(), loss.item())
    ours = out.metrics()
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
              "logits/chosen", "logits/rejected"):  # TRL's logits/*: the completion tokens (our default)
        assert abs(ours[k] - metrics[k]) <= TOL * max(1.0, abs(metrics[k])), (k, ours[k], metrics[k])
    assert ours["rewards/accuracies"] == pytest.approx(metrics["rewards/accuracies"], abs=1e-7)  # TRL: float32


CPO_TYPES = [("sigmoid", 0.0), ("sigmoid", 0.15), ("hinge", 0.0), ("ipo", 0.0), ("simpo", 0.0), ("simpo", 0.1)]


@pytest.mark.parametrize("loss_type,eps", CPO_TYPES, ids=[f"{t}-eps{e}" for t, e in CPO_TYPES])
def test_cpo_matches_trl(loss_type, eps):
    hidden, weight, bias, labels, refs = make_problem("cpo", torch.float64, seed=22)
    opts = dict(beta=0.2 if loss_type not in ("simpo",) else 2.0, loss_type=loss_type, label_smoothing=eps,
                simpo_gamma=0.6, cpo_alpha=0.0)
    out = library("cpo", hidden, weight, bias, labels, refs, **opts)
    losses, chosen_rewards, rejected_rewards = trl_cpo_loss(
        out.chosen_logps.detach(), out.rejected_logps.detach(),
        **{k: v for k, v in opts.items() if k != "cpo_alpha"})
    assert rel_err(out.losses, losses) <= TOL
    assert rel_err(out.loss, losses.mean()) <= TOL  # cpo_alpha=0: TRL's loss is the mean
    assert rel_err(out.chosen_rewards, chosen_rewards) <= TOL
    assert rel_err(out.rejected_rewards, rejected_rewards) <= TOL
    # the logps TRL receives are what its get_batch_logps gives (means for ipo/simpo, else sums)
    lp, mask, _, _ = per_token(hidden, weight, bias, labels)
    B = hidden.shape[0] // 2
    want = lp.sum(-1) / mask.sum(-1) if loss_type in ("ipo", "simpo") else lp.sum(-1)
    assert rel_err(out.chosen_logps, want[:B]) <= 1e-12 and rel_err(out.rejected_logps, want[B:]) <= 1e-12


def test_cpo_simpo_nll_term_is_trls_cross_entropy():
    """CPO-SimPO (loss_type simpo, cpo_alpha > 0): TRL's ``losses.mean() + cpo_alpha * nll`` with its
    ``nn.CrossEntropyLoss`` over the chosen rows."""
    hidden, weight, bias, labels, refs = make_problem("cpo", torch.float64, seed=23)
    opts = dict(beta=2.0, loss_type="simpo", simpo_gamma=0.5, cpo_alpha=0.7)
    out = library("cpo", hidden, weight, bias, labels, refs, **opts)
    _, _, _, logits = per_token(hidden, weight, bias, labels)
    B = hidden.shape[0] // 2
    nll = torch.nn.CrossEntropyLoss()(logits[:B, :-1].reshape(-1, logits.shape[-1]), labels[:B, 1:].reshape(-1))
    losses, _, _ = trl_cpo_loss(out.chosen_logps.detach(), out.rejected_logps.detach(), beta=2.0, loss_type="simpo",
                                simpo_gamma=0.5)
    assert rel_err(out.loss, losses.mean() + 0.7 * nll) <= TOL
    assert abs(out.metrics()["nll_loss"] - nll.item()) <= TOL * nll.item()


def test_simpo_is_trls_cpo_simpo_on_means():
    """SimPO = TRL's CPO ``simpo`` loss type on the same mean logps with simpo_gamma = gamma_beta_ratio * beta."""
    hidden, weight, bias, labels, refs = make_problem("simpo", torch.float64, seed=24)
    out = library("simpo", hidden, weight, bias, labels, refs, beta=2.5, gamma_beta_ratio=0.4, label_smoothing=0.1)
    losses, cr, rr = trl_cpo_loss(out.chosen_logps.detach(), out.rejected_logps.detach(), beta=2.5,
                                  loss_type="simpo", simpo_gamma=1.0, label_smoothing=0.1)
    assert rel_err(out.losses, losses) <= TOL and rel_err(out.chosen_rewards, cr) <= TOL


def test_orpo_matches_trl():
    hidden, weight, bias, labels, refs = make_problem("orpo", torch.float64, seed=25)
    out = library("orpo", hidden, weight, bias, labels, refs, beta=0.25)
    ratio_term, cr, rr, log_odds_ratio, log_odds_chosen = trl_orpo_loss(
        out.chosen_logps.detach(), out.rejected_logps.detach(), beta=0.25)
    tol = 1e-6  # odds_ratio_loss computes in float32
    assert rel_err(out.losses, -ratio_term) <= tol  # TRL: loss = nll - mean(beta * logsigmoid(log_odds))
    assert rel_err(out.chosen_rewards, cr) <= tol and rel_err(out.rejected_rewards, rr) <= tol
    m = out.metrics()
    assert abs(m["log_odds_ratio"] - log_odds_ratio.item()) <= tol * abs(log_odds_ratio.item())
    assert abs(m["log_odds_chosen"] - log_odds_chosen.item()) <= tol * abs(log_odds_chosen.item())
    assert rel_err(out.loss - out.losses.mean(), torch.tensor(m["nll_loss"], dtype=torch.float64)) <= TOL


def assert_metrics_equal(ours: dict, theirs: dict, names, tol=TOL):
    for k in names:
        want = float(theirs[k])
        assert abs(ours[k] - want) <= tol * max(1.0, abs(want)), (k, ours[k], want)


CPO_BATCH = [("sigmoid", 0.1, 1.0), ("hinge", 0.0, 0.0), ("ipo", 0.0, 0.3), ("simpo", 0.1, 0.5)]


@pytest.mark.parametrize("loss_type,eps,cpo_alpha", CPO_BATCH, ids=[f"{t}-eps{e}-alpha{a}" for t, e, a in CPO_BATCH])
def test_cpo_whole_batch_matches_trl(loss_type, eps, cpo_alpha):
    """TRL's whole ``CPOTrainer.get_batch_loss_metrics`` (its get_batch_logps, NLL and metrics) on
    the float64 logits of the same inputs: the loss and every logged metric, ``logits/*`` and
    ``nll_loss`` included."""
    hidden, weight, bias, labels, refs = make_problem("cpo", torch.float64, seed=27)
    opts = dict(beta=0.2 if loss_type != "simpo" else 2.0, loss_type=loss_type, label_smoothing=eps,
                simpo_gamma=0.6, cpo_alpha=cpo_alpha)
    out = library("cpo", hidden, weight, bias, labels, refs, **opts)
    _, _, _, logits = per_token(hidden, weight, bias, labels)
    loss, metrics = trl_cpo_batch(logits, labels, **opts)
    assert rel_err(out.loss, loss) <= TOL, (out.loss.item(), loss.item())
    ours = out.metrics()
    names = set(metrics) - {"rewards/accuracies"} - ({"nll_loss"} if cpo_alpha == 0 else set())
    assert set(ours) == names | {"rewards/accuracies"}
    assert_metrics_equal(ours, metrics, names)
    assert ours["rewards/accuracies"] == pytest.approx(metrics["rewards/accuracies"], abs=1e-7)


def orpo_whole_batch(seed=28, prompt_nll=False):
    """The library's ORPO and TRL's whole ``ORPOTrainer.get_batch_loss_metrics`` on the same
    inputs. TRL's NLL reads ``input_ids`` under the attention mask: with the attention mask on the
    completion tokens it is the library's default NLL (labels); with ``prompt_nll`` the mask keeps
    the prompt too (TRL's data), and the library gets ``nll_labels`` = those ids."""
    hidden, weight, bias, labels, refs = make_problem("orpo", torch.float64, seed=seed)
    B = labels.shape[0] // 2
    _, _, _, logits = per_token(hidden, weight, bias, labels)
    if prompt_nll:
        # prompt positions (labels -100 before the completion) kept by the attention mask; the
        # token ids there are the harness's input ids (ignored labels -> token 0)
        attention = torch.ones_like(labels)
        ids = labels.clamp_min(0)
        extra = dict(nll_labels=ids[:B].clone())
    else:
        attention, extra = (labels != -100).long(), {}
    out = library("orpo", hidden, weight, bias, labels, refs, beta=0.25, **extra)
    loss, metrics = trl_orpo_batch(logits, labels, attention, beta=0.25)
    return out, loss, metrics


@pytest.mark.parametrize("prompt_nll", [False, True], ids=["completion-nll", "prompt-and-completion-nll"])
def test_orpo_whole_batch_matches_trl(prompt_nll):
    """Loss and every metric (logits/* included: TRL logs logits[:, :-1]) equal TRL's."""
    out, loss, metrics = orpo_whole_batch(prompt_nll=prompt_nll)
    tol = 1e-6  # odds_ratio_loss computes in float32
    assert rel_err(out.loss, loss) <= tol, (out.loss.item(), loss.item())
    ours = out.metrics()
    assert set(ours) == set(metrics)
    assert_metrics_equal(ours, metrics, set(metrics), tol)


def test_orpo_prompt_nll_differs_from_the_completion_nll():
    """The two NLL definitions are distinguishable here (so the test above can fail)."""
    a, _, _ = orpo_whole_batch(prompt_nll=False)
    b, _, _ = orpo_whole_batch(prompt_nll=True)
    assert rel_err(a.sft_loss, b.sft_loss) > 1e-3


def test_trl_harness_agrees_with_the_reference():
    """The harness and the float64 reference agree without the library (so a failure above points
    at the library, not at the harness)."""
    hidden, weight, bias, labels, refs = make_problem("dpo", torch.float64, seed=26)
    lp, mask, mean_logits, logits = per_token(hidden, weight, bias, labels)
    for loss_type, eps, rpo in DPO_TYPES:
        ref = reference_preference_from_logits(logits, labels, loss="dpo", beta=0.3, loss_type=loss_type,
                                               label_smoothing=eps, rpo_alpha=rpo, **refs)
        loss, metrics = trl_dpo(lp, mask, refs["ref_chosen_logps"], refs["ref_rejected_logps"], beta=0.3,
                                loss_type=loss_type, label_smoothing=eps, rpo_alpha=rpo, mean_logits=mean_logits)
        assert rel_err(loss, ref["loss"]) <= 1e-13, loss_type
        for k in ("rewards/chosen", "rewards/margins", "logits/chosen", "logps/rejected"):
            assert abs(metrics[k] - ref["metrics"][k]) <= 1e-12 * max(1, abs(metrics[k])), (loss_type, k)
    for loss_type, eps in CPO_TYPES:
        ref = reference_preference_from_logits(logits, labels, loss="cpo", beta=0.3, loss_type=loss_type,
                                               label_smoothing=eps, cpo_alpha=0.0)
        losses, _, _ = trl_cpo_loss(ref["chosen_logps"], ref["rejected_logps"], beta=0.3, loss_type=loss_type,
                                    label_smoothing=eps)
        assert rel_err(losses, ref["losses"]) <= 1e-13, loss_type
    ref = reference_preference_from_logits(logits, labels, loss="orpo", beta=0.3)
    ratio_term, _, _, lor, loc = trl_orpo_loss(ref["chosen_logps"], ref["rejected_logps"], beta=0.3)
    assert rel_err(-ratio_term, ref["losses"]) <= 1e-6 and rel_err(lor, ref["log_odds_ratio"]) <= 1e-6
