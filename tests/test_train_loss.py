"""The trainer's loss and metrics equal the official eager path; loss scaling under gradient
accumulation; the patched forward leaves ordinary use of the model alone."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from simpo.config import SimPOConfig  # noqa: E402
from simpo.data import SimPODataCollator, load_raw_datasets, prepare_dataset  # noqa: E402
from simpo.modeling import attach_simpo_head, build_tiny_model, build_tiny_tokenizer  # noqa: E402
from simpo.trainer import METRIC_NAMES, SimPOTrainer, metrics_from_outputs  # noqa: E402
from tests.reference import reference_from_logits, rel_err  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    raw = load_raw_datasets(None, ["train"])["train"].select(range(16))
    texts = [m["content"] for c in ("chosen", "rejected") for msgs in raw[c] for m in msgs]
    tok = build_tiny_tokenizer(texts)
    torch.manual_seed(0)
    model = build_tiny_model(tok, hidden_size=32, num_layers=2)
    # larger weights than the init, so that the softcap (30) really bends the logits
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(40.0)
    return raw, tok, model


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no",
                max_length=64, max_prompt_length=32, disable_tqdm=True, seed=0)
    base.update(kw)
    return SimPOConfig(**base)


@pytest.mark.parametrize("opts,schedule", [
    (dict(beta=10.0, gamma_beta_ratio=0.5), "auto"),
    (dict(beta=2.0, gamma_beta_ratio=0.25, label_smoothing=0.1, sft_weight=0.7), "auto"),
    (dict(beta=2.5, gamma_beta_ratio=0.3, loss_type="hinge"), "auto"),
    (dict(beta=10.0, gamma_beta_ratio=0.5, sft_weight=0.3), "pairs"),
    (dict(beta=2.0, gamma_beta_ratio=0.25, label_smoothing=0.1), "vocab"),
])
def test_trainer_loss_and_metrics_equal_official_path(tiny, tmp_path, opts, schedule):
    raw, tok, model = tiny
    model = copy.deepcopy(model)
    assert model.config.final_logit_softcapping == 30.0
    args = _args(tmp_path, loss_schedule=schedule, loss_memory_budget=20000, **opts)
    ds = prepare_dataset(raw, tok, args)
    trainer = SimPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([ds[i] for i in range(6)])
    # some pairs of unequal lengths -> padding in the batch
    assert (batch["attention_mask"] == 0).any()

    model.train()
    loss = trainer.compute_loss(model, batch)
    stored = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}

    # official path: ordinary forward (softcapped logits) -> log_softmax -> gather -> mean -> SimPO
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.abs().max() > 15.0  # the softcap is active on these logits
    ref = reference_from_logits(logits, batch["labels"], **opts)
    torch.testing.assert_close(loss.double(), ref["loss"], rtol=1e-5, atol=1e-5)
    expected = {
        "rewards/chosen": ref["chosen_rewards"].mean(),
        "rewards/rejected": ref["rejected_rewards"].mean(),
        "rewards/accuracies": (ref["chosen_rewards"] > ref["rejected_rewards"]).double().mean(),
        "rewards/margins": (ref["chosen_rewards"] - ref["rejected_rewards"]).mean(),
        "logps/chosen": ref["chosen_logps"].mean(),
        "logps/rejected": ref["rejected_logps"].mean(),
        "logits/chosen": ref["chosen_logits_mean"],
        "logits/rejected": ref["rejected_logits_mean"],
    }
    if opts.get("sft_weight", 0) > 0:
        expected["sft_loss"] = ref["sft_loss"]
    assert set(stored) == set(expected)
    for k, v in expected.items():
        assert stored[k] == pytest.approx(v.item(), rel=1e-5, abs=1e-5), k

    # gradients of the lm_head (tied embedding) agree too
    params = [p for p in model.parameters() if p.requires_grad]
    g_trainer = torch.autograd.grad(loss, params, allow_unused=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref_loss = reference_from_logits(logits, batch["labels"], **opts)["loss"]
    g_ref = torch.autograd.grad(ref_loss.float(), params, allow_unused=True)
    for a, b in zip(g_trainer, g_ref):
        if a is not None or b is not None:
            assert rel_err(a, b) < 1e-4


def test_eval_metrics_use_eval_prefix_and_window_average(tiny, tmp_path):
    raw, tok, model = tiny
    args = _args(tmp_path, per_device_eval_batch_size=4)
    ds = prepare_dataset(raw, tok, args)
    trainer = SimPOTrainer(model=copy.deepcopy(model), args=args, train_dataset=ds,
                           eval_dataset=ds, processing_class=tok)
    metrics = trainer.evaluate()
    for name in METRIC_NAMES:
        assert f"eval_{name}" in metrics
    # the logged value is the mean over the 4 eval batches of the per-batch metric
    per_batch = []
    m = trainer.model.eval()
    for i in range(0, 16, 4):
        batch = trainer.data_collator([ds[j] for j in range(i, i + 4)])
        with torch.no_grad():
            out = m(**batch, simpo=True)
        per_batch.append(metrics_from_outputs(out, "eval_"))
    for k in per_batch[0]:
        assert metrics[k] == pytest.approx(sum(p[k] for p in per_batch) / 4, rel=1e-5, abs=1e-6)
    assert not trainer._stored_metrics["eval"]  # consumed by log


@pytest.mark.parametrize("schedule", ["auto", "pairs"])
def test_gradient_accumulation_scaling(tiny, tmp_path, schedule):
    """One step of 4 pairs == two accumulated micro-batches of 2 pairs: same logged loss, same
    update (SGD, so the update is the gradient itself). With ``pairs`` the upstream gradient of
    each micro-batch's loss is 1/2: the stored gradients must be scaled by it."""
    raw, tok, model = tiny
    results = []
    for per_device, accum in ((4, 1), (2, 2)):
        args = _args(tmp_path / f"{per_device}", per_device_train_batch_size=per_device, loss_schedule=schedule,
                     gradient_accumulation_steps=accum, max_steps=1, learning_rate=0.5,
                     optim="sgd", lr_scheduler_type="constant", logging_steps=1,
                     max_grad_norm=0.0, beta=2.0, gamma_beta_ratio=0.5)
        ds = prepare_dataset(raw.select(range(4)), tok, args)
        m = copy.deepcopy(model)
        trainer = SimPOTrainer(model=m, args=args, train_dataset=ds, processing_class=tok)
        assert trainer.model_accepts_loss_kwargs is False
        trainer.train()
        logged = [h for h in trainer.state.log_history if "loss" in h][0]
        results.append((logged["loss"], [p.detach().clone() for p in m.parameters()]))
    # the loss of the whole batch, computed directly
    m0 = copy.deepcopy(model).eval()
    args = _args(tmp_path / "direct")
    ds = prepare_dataset(raw.select(range(4)), tok, args)
    batch = SimPODataCollator(tok.pad_token_id)([ds[i] for i in range(4)])
    attach_simpo_head(m0, beta=2.0, gamma_beta_ratio=0.5)
    with torch.no_grad():
        direct = m0(**batch, simpo=True)["loss"].item()
    assert results[0][0] == pytest.approx(direct, rel=1e-5)
    assert results[1][0] == pytest.approx(direct, rel=1e-5)
    moved = max((a - b).abs().max().item() for a, b in zip(results[0][1], model.parameters()))
    assert moved > 1e-4
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_patched_forward_keeps_ordinary_behaviour(tiny):
    raw, tok, model = tiny
    m = copy.deepcopy(model)
    ids = torch.tensor([[tok.bos_token_id, 5, 6, 7]])
    before = m(input_ids=ids).logits
    attach_simpo_head(m, beta=2.0, gamma_beta_ratio=0.5)
    attach_simpo_head(m, beta=3.0, gamma_beta_ratio=0.5)  # idempotent
    after = m(input_ids=ids).logits
    torch.testing.assert_close(before, after)
    assert m._simpo_options["options"]["beta"] == 3.0
    with pytest.raises(ValueError, match="labels"):
        m(input_ids=ids, simpo=True)


@pytest.mark.parametrize("mode", ["targets", "none"])
def test_logit_metrics_option_reaches_the_logs(tiny, tmp_path, mode):
    """--logit_metrics targets logs the mean logit over target positions; none logs no logits/*."""
    raw, tok, model = tiny
    args = _args(tmp_path, loss_schedule="pairs", logit_metrics=mode, beta=2.0, gamma_beta_ratio=0.5)
    ds = prepare_dataset(raw, tok, args)
    trainer = SimPOTrainer(model=copy.deepcopy(model), args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([ds[i] for i in range(4)])
    trainer.compute_loss(trainer.model, batch)
    stored = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}
    keys = trainer._metric_keys("train")
    if mode == "none":
        assert not any(k.startswith("logits/") for k in list(stored) + keys)
        return
    logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    mask = batch["labels"][:, 1:] != -100
    B = logits.shape[0] // 2
    for name, rows in (("logits/chosen", slice(0, B)), ("logits/rejected", slice(B, 2 * B))):
        want = logits[rows, :-1][mask[rows]].mean().item()
        assert stored[name] == pytest.approx(want, rel=1e-5, abs=1e-5), name
