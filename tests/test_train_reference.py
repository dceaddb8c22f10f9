"""Reference log-probs of the losses with a reference model (dpo, rdpo), in one process.

* Exactness (float64 tiny Gemma-2, softcap on): the precomputed ``ref_chosen_logps`` /
  ``ref_rejected_logps`` columns equal the per-row sums of the initial policy's target
  log-probabilities computed independently from its ordinary forward's (softcapped) logits, to
  1e-12; the collator carries them into the batch unchanged; the first DPO step's loss with
  policy == reference is log 2 (to 1e-12) both with the precomputed columns and with the in-step
  reference model, and DPO's rewards and margins are 0 there.
* In-step reference == precomputed: the loss and metrics of a batch after some training (policy
  != reference) agree (1e-12) between the two ways.
* The cache in output_dir: reused when the reference and the data are the same; recomputed when
  the data's token ids, or the reference, changed; a garbled cache is recomputed.
* Every loss of the family trains one step through SimPOTrainer and logs exactly its official
  metric names (``LOSSES[name](**options).metric_names(logit_metrics)``).
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from simpo.config import SimPOConfig  # noqa: E402
from simpo.data import load_raw_datasets, prepare_dataset  # noqa: E402
from simpo.modeling import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from simpo.reference import CACHE_NAME, REF_COLUMNS, read_cache, tokens_fingerprint  # noqa: E402
from simpo.trainer import SimPOTrainer  # noqa: E402

LOG2 = math.log(2.0)


@pytest.fixture(scope="module")
def tiny64():
    """The tiny model in float64 (larger embedding so that the softcap bends the logits), its
    tokenizer, and the first 12 rows of the shipped train split."""
    raw = load_raw_datasets(None, ["train"])["train"].select(range(12))
    texts = [m["content"] for c in ("chosen", "rejected") for msgs in raw[c] for m in msgs]
    tok = build_tiny_tokenizer(texts)
    torch.manual_seed(0)
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, torch_dtype=torch.float64)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(40.0)
    return raw, tok, model


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no",
                max_length=64, max_prompt_length=32, disable_tqdm=True, seed=0, loss="dpo",
                per_device_eval_batch_size=5)  # 5: the precompute batches are not the step's
    base.update(kw)
    return SimPOConfig(**base)


def _row_sums_from_logits(model, ds) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent float64 reference: each row alone through the ordinary forward (softcapped
    logits), log_softmax, the target of each position the next label, summed over the response."""
    out = {}
    for side in ("chosen", "rejected"):
        values = []
        for row in ds:
            ids = torch.tensor([row[f"{side}_input_ids"]])
            labels = torch.tensor(row[f"{side}_labels"])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0].double()
            logp = logits[:-1].log_softmax(-1)
            target = labels[1:]
            keep = target != -100
            values.append(logp[keep].gather(-1, target[keep].unsqueeze(-1)).sum())
        out[side] = torch.stack(values)
    return out["chosen"], out["rejected"]


def test_precomputed_columns_equal_the_policy_forward_and_step0_dpo_is_log2(tiny64, tmp_path):
    raw, tok, model = tiny64
    args = _args(tmp_path)
    assert args.precompute_ref_log_probs is True and args.beta == 0.1  # dpo's defaults
    ds = prepare_dataset(raw, tok, args)
    policy = copy.deepcopy(model)
    trainer = SimPOTrainer(model=policy, args=args, train_dataset=ds, eval_dataset=ds,
                           processing_class=tok)
    assert trainer.ref_model is None  # precomputed: no reference model kept
    for split in (trainer.train_dataset, trainer.eval_dataset):
        chosen = torch.tensor(split[REF_COLUMNS[0]], dtype=torch.float64)
        rejected = torch.tensor(split[REF_COLUMNS[1]], dtype=torch.float64)
        want_c, want_r = _row_sums_from_logits(model, ds)
        assert logits_softcapped(model, ds)
        torch.testing.assert_close(chosen, want_c, rtol=0, atol=1e-12)
        torch.testing.assert_close(rejected, want_r, rtol=0, atol=1e-12)
        assert (chosen != rejected).all() and (chosen < -1).all()

    rows = [trainer.train_dataset[i] for i in range(6)]
    batch = trainer.data_collator(rows)
    assert batch["ref_chosen_logps"].dtype == torch.float64
    assert batch["ref_chosen_logps"].tolist() == [r["ref_chosen_logps"] for r in rows]
    policy.train()
    loss = trainer.compute_loss(policy, trainer._prepare_inputs(batch))
    assert loss.dtype == torch.float64
    assert abs(loss.item() - LOG2) < 1e-12
    stored = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}
    assert abs(stored["rewards/margins"]) < 1e-12 and abs(stored["rewards/chosen"]) < 1e-12


def logits_softcapped(model, ds) -> bool:
    """The softcap (30) is active: some logit of the first row is beyond 15 in magnitude."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ds[0]["chosen_input_ids"]])).logits
    return bool(logits.abs().max() > 15.0)


def test_in_step_reference_model_step0_is_log2_and_equals_precomputed(tiny64, tmp_path):
    raw, tok, model = tiny64
    ds = prepare_dataset(raw, tok, _args(tmp_path))
    trainers = {}
    for how in ("precomputed", "in_step"):
        args = _args(tmp_path / how, precompute_ref_log_probs=how == "precomputed")
        trainers[how] = SimPOTrainer(model=copy.deepcopy(model), args=args, train_dataset=ds,
                                     processing_class=tok)
    in_step = trainers["in_step"]
    assert in_step.ref_model is not None and REF_COLUMNS[0] not in in_step.train_dataset.column_names
    assert not any(p.requires_grad for p in in_step.ref_model.parameters())
    batch = in_step.data_collator([ds[i] for i in range(6)])
    assert "ref_chosen_logps" not in batch
    in_step.model.train()
    loss = in_step.compute_loss(in_step.model, batch)
    assert abs(loss.item() - LOG2) < 1e-12

    # move both policies the same way (one SGD step on the same batch), then compare the losses
    # and metrics of another batch: reference from the columns vs from the in-step model
    pre = trainers["precomputed"]
    for tr in (pre, in_step):
        tr.model.train()
        b = tr.data_collator([tr.train_dataset[i] for i in range(6)])
        tr.compute_loss(tr.model, tr._prepare_inputs(b)).backward()
        with torch.no_grad():
            for p in tr.model.parameters():
                if p.grad is not None:
                    p -= 50.0 * p.grad
                    p.grad = None
    results = {}
    for how, tr in trainers.items():
        b = tr._prepare_inputs(tr.data_collator([tr.train_dataset[i] for i in range(6, 12)]))
        tr._stored_metrics.clear()
        loss = tr.compute_loss(tr.model, b)
        results[how] = (loss.item(), {k: v[-1] for k, v in tr._stored_metrics["train"].items()})
    assert abs(results["in_step"][0] - LOG2) > 1e-4  # the policy moved away from the reference
    assert results["in_step"][0] == pytest.approx(results["precomputed"][0], abs=1e-12)
    assert results["in_step"][1].keys() == results["precomputed"][1].keys()
    for k, v in results["precomputed"][1].items():
        assert results["in_step"][1][k] == pytest.approx(v, abs=1e-10), k


def test_reference_cache_is_reused_and_invalidated(tiny64, tmp_path, caplog):
    raw, tok, model = tiny64
    args = _args(tmp_path)
    ds = prepare_dataset(raw, tok, args)
    key = {"reference": {"test": 1}}
    loads = []

    def loader():
        loads.append(1)
        return copy.deepcopy(model)

    def make(data, key=key, ref=loader):
        return SimPOTrainer(model=copy.deepcopy(model), args=args, train_dataset=data,
                            eval_dataset=data.select(range(4)), processing_class=tok,
                            ref_model=ref, reference_key=key)

    first = make(ds)
    assert len(loads) == 1 and os.path.isfile(tmp_path / CACHE_NAME)
    with caplog.at_level("INFO", logger="simpo.trainer"):
        again = make(ds)
    assert len(loads) == 1, "the cached columns are reused without loading the reference"
    assert "reused from" in caplog.text
    for a, b in ((first.train_dataset, again.train_dataset), (first.eval_dataset, again.eval_dataset)):
        assert a[REF_COLUMNS[0]] == b[REF_COLUMNS[0]] and a[REF_COLUMNS[1]] == b[REF_COLUMNS[1]]

    # other data (one row fewer): recomputed, and the new values are those of the new rows
    fewer = make(ds.select(range(10)))
    assert len(loads) == 2
    assert fewer.train_dataset[REF_COLUMNS[0]] == first.train_dataset[REF_COLUMNS[0]][:10]
    # another reference (key): recomputed with that reference's values
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(1.5)
    moved = make(ds, key={"reference": {"test": 2}}, ref=lambda: (loads.append(1), other)[1])
    assert len(loads) == 3
    assert all(abs(a - b) > 1e-6 for a, b in zip(moved.train_dataset[REF_COLUMNS[0]],
                                                 first.train_dataset[REF_COLUMNS[0]]))
    tokens = tokens_fingerprint(ds)
    values, why = read_cache(str(tmp_path), {"reference": {"test": 1}}, "train", tokens, len(ds))
    assert values is None and "another reference" in why
    # a garbled cache: recomputed (and rewritten), not an error
    (tmp_path / CACHE_NAME).write_bytes(b"garbage")
    make(ds)
    assert len(loads) == 4
    values, why = read_cache(str(tmp_path), key, "train", tokens, len(ds))
    assert why is None and values[0].tolist() == first.train_dataset[REF_COLUMNS[0]]


LOSS_CASES = [
    ("simpo", dict(beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.5)),
    ("dpo", dict(loss_type="ipo", rpo_alpha=0.5)),
    ("dpo", dict(loss_type="sigmoid_norm", precompute_ref_log_probs=False)),
    ("rdpo", dict(alpha=0.2)),
    ("cpo", dict(loss_type="simpo", cpo_alpha=0.0)),
    ("cpo", dict()),
    ("orpo", dict()),
    ("rrhf", dict()),
    ("slic", dict(delta=2.0)),
]


@pytest.mark.parametrize("loss,opts", LOSS_CASES,
                         ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in o.items())}" for n, o in LOSS_CASES])
def test_every_loss_trains_a_step_and_logs_its_official_metrics(tiny64, tmp_path, loss, opts):
    from simpo_kernels import LOSSES

    raw, tok, model = tiny64
    args = _args(tmp_path, loss=loss, max_steps=2, logging_steps=1, learning_rate=1e-2,
                 per_device_train_batch_size=3, **opts)
    ds = prepare_dataset(raw.select(range(6)), tok, args)
    trainer = SimPOTrainer(model=copy.deepcopy(model).float(), args=args, train_dataset=ds,
                           eval_dataset=ds, processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    names = LOSSES[loss](**args.loss_options).metric_names(args.logit_metrics)
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    metric_keys = {k for k in logs[0] if k not in ("loss", "grad_norm", "learning_rate", "epoch",
                                                   "step")}
    assert metric_keys == set(names)
    assert all(math.isfinite(logs[0][n]) for n in names)
    evaluated = trainer.evaluate()
    assert {f"eval_{n}" for n in names} <= set(evaluated)
    if LOSSES[loss].needs_reference:
        assert ("logits/chosen" in names) == (args.logit_metrics != "none")


def _simpo_train(*argv, timeout=400):
    import subprocess
    import sys

    from tests.multiproc import ROOT, subprocess_env

    proc = subprocess.run([sys.executable, "-m", "simpo.train", *argv], env=subprocess_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def test_tiny_dpo_run_raises_eval_accuracy_and_a_resume_reuses_the_reference(tmp_path):
    """`simpo-train tiny-dpo` (DPO on the embedded tiny model and the shipped data, reference
    precomputed) for 100 steps: eval before training has DPO's step-0 values (policy ==
    reference: margins 0), and eval reward accuracy rises from there by > 0.25 to > 0.7 (observed
    0.33 -> 0.80). Extending the run (resume from checkpoint-100) reuses the cached reference
    log-probs instead of computing them again."""
    import json

    out = str(tmp_path / "out")
    common = ["tiny-dpo", "--eval_on_start", "true", "--eval_steps", "100", "--logging_steps", "20",
              "--save_strategy", "steps", "--save_steps", "100", "--plot", "false",
              "--disable_tqdm", "true", "--output_dir", out]
    text = _simpo_train(*common, "--max_steps", "100")
    assert "reference log-probs of split 'train': computing (no cache yet)" in text
    with open(os.path.join(out, "trainer_state.json")) as f:
        evals = [h for h in json.load(f)["log_history"] if "eval_rewards/accuracies" in h]
    before, after = evals[0], evals[-1]
    print("eval before", before, "\nafter", after)
    assert before["step"] == 0 and after["step"] == 100
    assert abs(before["eval_rewards/margins"]) < 1e-4 and abs(before["eval_rewards/chosen"]) < 1e-4
    assert "eval_nll_loss" in before and "eval_logits/chosen" in before
    acc0, acc1 = before["eval_rewards/accuracies"], after["eval_rewards/accuracies"]
    assert acc1 - acc0 > 0.25 and acc1 > 0.7, (acc0, acc1)
    assert after["eval_rewards/margins"] > 0.1
    assert os.path.isfile(os.path.join(out, CACHE_NAME))

    text = _simpo_train(*common, "--max_steps", "110")
    assert "resuming from" in text
    assert "reference log-probs of split 'train': reused from" in text
    assert "reference log-probs of split 'eval': reused from" in text
    assert "computing" not in text


_FSDP2_BF16_SCRIPT = r"""
import json, os, sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tests.multiproc import tiny_rows_and_tokenizer
from simpo.config import SimPOConfig
from simpo.data import SimPODataCollator, prepare_dataset
from simpo.modeling import ReferenceLogps, attach_simpo_head, build_tiny_model

dist.init_process_group("gloo", rank=0, world_size=1)
raw, tok = tiny_rows_and_tokenizer(4)
ds = prepare_dataset(raw, tok, SimPOConfig(output_dir="/tmp/unused", use_cpu=True, loss="dpo",
                                           max_length=64, max_prompt_length=32, report_to="none"))
batch = SimPODataCollator(tok.pad_token_id)([ds[i] for i in range(4)])
torch.manual_seed(0)
model = build_tiny_model(tok, hidden_size=32)
attach_simpo_head(model, loss="dpo", beta=0.5)
fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
# reference sums with digits that bf16 cannot hold (8 bits of mantissa: -123.4567 -> -123.5)
ref_c = torch.tensor([-123.4567, -98.7654, -77.0123, -150.3333])
ref_r = torch.tensor([-111.1111, -88.8888, -66.6666, -144.4444])
with torch.no_grad():
    out = model(**batch, simpo=True, reference=ReferenceLogps(ref_c, ref_r))
want_c = 0.5 * (out.chosen_logps.double() - ref_c.double())
want_r = 0.5 * (out.rejected_logps.double() - ref_r.double())
print(json.dumps({"err": max((out.chosen_rewards.double() - want_c).abs().max().item(),
                             (out.rejected_rewards.double() - want_r).abs().max().item()),
                  "logps_dtype": str(out.chosen_logps.dtype)}))
dist.destroy_process_group()
"""


def test_reference_values_reach_the_loss_unrounded_under_fsdp2_bf16():
    """FSDP2 mixed precision casts the floating-point tensors among a forward's arguments to bf16
    (``cast_forward_inputs``); the reference sums travel in :class:`ReferenceLogps`, which it does
    not enter: DPO's rewards beta (logps - ref) use the exact reference values (1e-4; a bf16-rounded
    -123.4567 would be off by 0.02)."""
    import json
    import subprocess
    import sys

    from tests.multiproc import ROOT, free_port, subprocess_env

    env = subprocess_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-c", _FSDP2_BF16_SCRIPT], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["err"] < 1e-4


def test_an_eval_set_given_later_gets_reference_columns_or_a_clear_error(tiny64, tmp_path):
    """evaluate(eval_dataset=...) on a set without reference columns: computed with a reference
    loader; with the initial policy as reference (no ref_model) it cannot be copied any more (the
    policy may have trained): a ValueError saying what to do, never the trained policy."""
    raw, tok, model = tiny64
    args = _args(tmp_path)
    ds = prepare_dataset(raw, tok, args)
    with_loader = SimPOTrainer(model=copy.deepcopy(model), args=args, train_dataset=ds,
                               processing_class=tok, ref_model=lambda: copy.deepcopy(model))
    metrics = with_loader.evaluate(eval_dataset=ds.select(range(5)))
    assert abs(metrics["eval_loss"] - LOG2) < 1e-12 and abs(metrics["eval_rewards/margins"]) < 1e-12
    without = SimPOTrainer(model=copy.deepcopy(model), args=args, train_dataset=ds,
                           processing_class=tok)
    with pytest.raises(ValueError, match="give the eval sets at construction, or ref_model as a "
                                         "function"):
        without.evaluate(eval_dataset=ds.select(range(5)))


def test_ref_model_name_or_path_is_the_reference_of_the_precomputed_columns(tmp_path):
    """`simpo-train --loss dpo --model_name_or_path A --ref_model_name_or_path B`: the cached
    columns are B's per-row sums (computed here from B's ordinary forward, float32: 1e-4), not A's,
    and the first step's loss is not log 2; with B = A it is log 2. The cache records B."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from simpo.config import DataArguments
    from simpo.data import load_splits
    from tests.multiproc import save_tiny_model

    a_dir = save_tiny_model(tmp_path / "a")

    b = AutoModelForCausalLM.from_pretrained(a_dir, attn_implementation="eager")
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(1.3)
    b_dir = str(tmp_path / "b")
    b.save_pretrained(b_dir)
    AutoTokenizer.from_pretrained(a_dir).save_pretrained(b_dir)
    common = ["--loss", "dpo", "--beta", "1.0", "--model_name_or_path", a_dir, "--max_steps", "1",
              "--logging_steps", "1", "--eval_strategy", "no", "--plot", "false",
              "--max_train_samples", "8", "--per_device_train_batch_size", "4",
              "--use_cpu", "true", "--max_length", "64", "--max_prompt_length", "32",
              "--disable_tqdm", "true", "--report_to", "none", "--save_strategy", "no"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("use_cpu: true\n")
    first = {}
    for name, ref in (("b", b_dir), ("a", a_dir)):
        out = str(tmp_path / f"out_{name}")
        _simpo_train(str(recipe), *common, "--ref_model_name_or_path", ref, "--output_dir", out)
        with open(os.path.join(out, "trainer_state.json")) as f:
            first[name] = [h["loss"] for h in json.load(f)["log_history"] if "loss" in h][0]
        if name == "b":
            cache = torch.load(os.path.join(out, CACHE_NAME), weights_only=True)
    # float32 sums of ~-60 nats, computed in other batches: a few ulps apart, times beta 1
    assert abs(first["a"] - LOG2) < 1e-5 and abs(first["b"] - LOG2) > 5e-4, first
    assert cache["key"]["reference"]["source"] == b_dir
    # B's sums from its ordinary forward over the same rows (the train split in the run's order)
    tok = AutoTokenizer.from_pretrained(a_dir)
    rows = load_splits(DataArguments(max_train_samples=8, dataset_splits=["train", "test"])).train
    ds = prepare_dataset(rows, tok, SimPOConfig(output_dir=str(tmp_path / "x"), use_cpu=True,
                                                loss="dpo", max_length=64, max_prompt_length=32,
                                                report_to="none"))
    want_c, want_r = _row_sums_from_logits(b.double(), ds)
    torch.testing.assert_close(cache["splits"]["train"]["chosen"], want_c, rtol=0, atol=1e-4)
    torch.testing.assert_close(cache["splits"]["train"]["rejected"], want_r, rtol=0, atol=1e-4)


def test_orpo_step_nll_covers_prompt_and_response_as_trl(tiny64, tmp_path):
    """``--loss orpo``: the trainer's NLL is TRL's ORPOTrainer's, the token-mean cross-entropy of the
    chosen rows' input ids under the attention mask (prompt and response), and the odds-ratio term
    uses the response means; checked against the ordinary forward's float64 logits of the batch."""
    import torch.nn.functional as F

    raw, tok, model = tiny64
    args = _args(tmp_path, loss="orpo", beta=0.3)
    ds = prepare_dataset(raw.select(range(6)), tok, args)
    trainer = SimPOTrainer(model=copy.deepcopy(model), args=args, train_dataset=ds, processing_class=tok)
    batch = trainer._prepare_inputs(trainer.data_collator([ds[i] for i in range(4)]))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    stored = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}

    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    B = ids.shape[0] // 2
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    nll_labels = ids[:B].masked_fill(mask[:B] == 0, -100)
    nll = F.cross_entropy(logits[:B, :-1].reshape(-1, logits.shape[-1]), nll_labels[:, 1:].reshape(-1))
    logp = logits[:, :-1].log_softmax(-1)
    target = labels[:, 1:]
    keep = target != -100
    tok_logp = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) * keep
    means = tok_logp.sum(-1) / keep.sum(-1)
    a_c, a_r = means[:B], means[B:]
    log_odds = (a_c - a_r) - (torch.log1p(-torch.exp(a_c)) - torch.log1p(-torch.exp(a_r)))
    want = nll - 0.3 * F.logsigmoid(log_odds).mean()
    response_only = F.cross_entropy(logits[:B, :-1].reshape(-1, logits.shape[-1]), labels[:B, 1:].reshape(-1))
    assert abs(nll.item() - response_only.item()) > 1e-3  # the prompt is in (the test can fail)
    assert abs(loss.item() - want.item()) < 1e-10, (loss.item(), want.item())
    assert abs(stored["nll_loss"] - nll.item()) < 1e-10
    assert abs(stored["log_odds_chosen"] - log_odds.mean().item()) < 1e-10
