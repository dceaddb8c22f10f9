"""Padding-free (packed) preference batches in the training system (``--padding_free true``).

* The collator (:class:`simpo.data.SimPODataCollator` with ``padding_free``) packs a step's
  sequences into rows of at most ``max_length`` (position_ids restarting per sequence,
  sequence_ids in the pair layout, no attention_mask), with the same pairs per batch.
* Exactness: a tiny Gemma-2 (softcaps on, a sliding window shorter than the sequences) in float64
  gives the same loss, metrics and gradients of every parameter, packed vs padded on the same
  pairs, through the patched model forward the trainer runs (eager attention to 1e-10;
  flex_attention to float tolerance where it runs on CPU). A negative control shows the check
  fails when packed sequences can see each other.
* The CLI trains with ``--padding_free true``; attention implementations that cannot keep packed
  sequences apart are refused in one line; 2 ZeRO-3 CPU ranks with packing equal 1 process.
"""

from __future__ import annotations

import torch
import pytest

from simpo.data import SimPODataCollator
from simpo.modeling import (ReferenceLogps, attach_simpo_head, packed_attention,
                            packed_attention_line, tiny_gemma2_config)
from simpo.packing import plan_rows

PAD, IGNORE = 0, -100
# (prompt, chosen response, rejected response) lengths of 3 pairs: unequal, all longer than the
# sliding window below, one pair far longer than the others (the padded layout's worst case)
SHAPES = [(6, 5, 3), (4, 9, 7), (3, 2, 4)]
WINDOW = 3  # the tiny model's sliding window: shorter than every sequence
# the pairs of the model tests: every sequence longer than the window, and no padding run of the
# padded batch as long as it (a padding position whose window holds only padding attends to
# nothing: transformers' eager attention gives it NaN, which reaches the padded loss's gradients)
EXACT_SHAPES = [(5, 4, 3), (3, 5, 4), (4, 3, 4)]


def _features(shapes=SHAPES, vocab=40, seed=0, ref=False) -> list[dict]:
    """Tokenised pairs as prepare_dataset writes them: prompt + response ids, prompt labels
    ignored, attention masks all ones."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (p, c, r) in enumerate(shapes):
        prompt = torch.randint(3, vocab, (p,), generator=g).tolist()
        f = {}
        for side, n in (("chosen", c), ("rejected", r)):
            ids = prompt + torch.randint(3, vocab, (n,), generator=g).tolist()
            f[f"{side}_input_ids"] = ids
            f[f"{side}_attention_mask"] = [1] * len(ids)
            f[f"{side}_labels"] = [IGNORE] * p + ids[p:]
        if ref:
            f["ref_chosen_logps"], f["ref_rejected_logps"] = -10.0 - i, -12.5 - i
        out.append(f)
    return out


def _sequences(features):
    """The pair layout: chosen of every pair, then rejected."""
    return [f[f"{side}_input_ids"] for side in ("chosen", "rejected") for f in features]


# ----------------------------------------------------------------------------- the collator

@pytest.mark.parametrize("max_length,one_row", [(16, False), (12, False), (16, True)])
def test_collator_packs_whole_sequences_with_restarting_positions(max_length, one_row):
    features = _features(ref=True)
    seqs = _sequences(features)
    lengths = [len(s) for s in seqs]
    batch = SimPODataCollator(PAD, IGNORE, padding_free=True, max_length=max_length,
                              one_row=one_row)(features)
    assert set(batch) == {"input_ids", "position_ids", "labels", "sequence_ids",
                          "ref_chosen_logps", "ref_rejected_logps"}  # no attention_mask
    plan = plan_rows(lengths, max_length, one_row=one_row)
    R, W = batch["input_ids"].shape
    assert (R, W) == (len(plan.rows), plan.width)
    assert all(t.dtype == torch.long and t.shape == (R, W)
               for k, t in batch.items() if not k.startswith("ref_"))
    if one_row:
        assert R == 1 and W == sum(lengths)
    else:
        assert W <= max(max_length, max(lengths))
    labels_of = [f[f"{side}_labels"] for side in ("chosen", "rejected") for f in features]
    seen = []
    for r, row in enumerate(plan.rows):
        at = 0
        for s in row:  # each sequence one contiguous run, in the plan's order
            n = lengths[s]
            assert batch["input_ids"][r, at:at + n].tolist() == seqs[s]
            assert batch["labels"][r, at:at + n].tolist() == labels_of[s]
            assert batch["position_ids"][r, at:at + n].tolist() == list(range(n))
            assert batch["sequence_ids"][r, at:at + n].tolist() == [s] * n
            seen.append(s)
            at += n
        pad = W - at  # the row's end: padding, numbered 0.. as a sequence of its own
        assert batch["input_ids"][r, at:].tolist() == [PAD] * pad
        assert batch["labels"][r, at:].tolist() == [IGNORE] * pad
        assert batch["sequence_ids"][r, at:].tolist() == [-1] * pad
        assert batch["position_ids"][r, at:].tolist() == list(range(pad))
    assert sorted(seen) == list(range(2 * len(features)))  # the same pairs, every sequence once
    # the reference columns are the padded batch's, unchanged
    padded = SimPODataCollator(PAD, IGNORE)(features)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        assert torch.equal(batch[key], padded[key]) and batch[key].dtype == torch.float64
    assert batch["input_ids"].numel() < padded["input_ids"].numel() or one_row


def test_collator_refuses_what_it_cannot_pack():
    with pytest.raises(ValueError, match="padding_free needs max_length"):
        SimPODataCollator(PAD, IGNORE, padding_free=True)
    features = _features()
    features[1]["rejected_attention_mask"][-1] = 0
    with pytest.raises(ValueError, match="rejected sequence of pair 1 has attention_mask zeros"):
        SimPODataCollator(PAD, IGNORE, padding_free=True, max_length=16)(features)


# ----------------------------------------------------------------------------- exactness

VOCAB = 40


@pytest.fixture(autouse=True)
def gemma2_in_float64(monkeypatch):
    """Gemma-2's eager attention takes its softmax, and its RMSNorm its products, in float32 even
    for a float64 model; rows of other lengths (9 padded vs 16 packed) then round differently
    (~1e-9 on the loss, 1e-7 relative on the norm weights' gradients, which sum over tokens). The
    same code in the model's dtype makes the comparison exact in float64 (the masks, the softcap
    and everything else stay transformers')."""
    from transformers.models.gemma2 import modeling_gemma2 as gemma2

    def eager(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
              **kwargs):
        key = gemma2.repeat_kv(key, module.num_key_value_groups)
        value = gemma2.repeat_kv(value, module.num_key_value_groups)
        scores = torch.matmul(query, key.transpose(2, 3)) * (scaling or module.head_dim ** -0.5)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32))
        return torch.matmul(probs.to(query.dtype), value).transpose(1, 2).contiguous(), probs

    def rms_norm(self, x):  # Gemma2RMSNorm in the input's dtype (it casts to float32)
        dtype = torch.promote_types(x.dtype, torch.float32)
        out = self._norm(x.to(dtype)) * (1.0 + self.weight.to(dtype))
        return out.type_as(x)

    monkeypatch.setattr(gemma2, "eager_attention_forward", eager)
    monkeypatch.setattr(gemma2.Gemma2RMSNorm, "forward", rms_norm)


def _tiny_model(attn: str = "eager", dtype=torch.float64, **options):
    """A (float64) tiny Gemma-2 (softcaps on; 2 layers: the first sliding-window, the second
    global) with the preference loss attached, built the same way each call."""
    from transformers import Gemma2ForCausalLM

    torch.manual_seed(0)
    config = tiny_gemma2_config(VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                intermediate_size=64)
    config.sliding_window = WINDOW
    config._attn_implementation = attn
    model = Gemma2ForCausalLM(config).to(dtype)
    assert "sliding_attention" in config.layer_types
    return attach_simpo_head(model, backend="torch", **options)


def _step(model, batch, reference=None):
    """One forward and backward through the patched forward the trainer calls: the output and
    every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if not k.startswith("ref_")}
    out = model(**inputs, simpo=True, reference=reference)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _reference(model, batch):
    """The reference pass (simpo_reference=True) of a batch: (chosen [B], rejected [B])."""
    from simpo.reference import reference_logps

    return reference_logps(model, {k: v for k, v in batch.items() if not k.startswith("ref_")})


def _assert_same_step(a, b, atol):
    (out_a, grads_a), (out_b, grads_b) = a, b
    for name in ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        torch.testing.assert_close(getattr(out_b, name), getattr(out_a, name), rtol=0, atol=atol)
    assert out_a.metrics.keys() == out_b.metrics.keys() and out_a.metrics
    for key, value in out_a.metrics.items():
        assert out_b.metrics[key] == pytest.approx(value, rel=0, abs=atol), key
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")
    assert max(g.abs().max().item() for g in grads_a.values()) > 1e-3  # real gradients


def _padded_and_packed(features=None, max_length=16):
    """The padded and the packed batch of EXACT_SHAPES' pairs (3 rows of 16 vs 6 rows of 9)."""
    features = _features(EXACT_SHAPES) if features is None else features
    lengths = [len(s) for s in _sequences(features)]
    assert WINDOW < min(lengths) and max(lengths) - min(lengths) < WINDOW
    return (SimPODataCollator(PAD, IGNORE)(features),
            SimPODataCollator(PAD, IGNORE, padding_free=True, max_length=max_length)(features))


@pytest.mark.parametrize("loss,options", [
    ("simpo", {"beta": 2.0, "gamma_beta_ratio": 0.5, "sft_weight": 0.3}),
    ("dpo", {"beta": 0.5}),
    ("orpo", {"beta": 0.2}),
])
def test_packed_step_equals_padded_step_in_float64(loss, options):
    """Loss, logged metrics (logits/* as "targets") and every parameter's gradient, packed vs
    padded, to 1e-10; dpo's reference sums come from the packed reference pass."""
    model = _tiny_model(loss=loss, logit_metrics="targets", **options)
    padded, packed = _padded_and_packed()
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # really packed
    ref_padded = ref_packed = None
    if loss == "dpo":
        ref_padded, ref_packed = (ReferenceLogps(*_reference(model, b)) for b in (padded, packed))
        torch.testing.assert_close(ref_packed.chosen, ref_padded.chosen, rtol=0, atol=1e-10)
        torch.testing.assert_close(ref_packed.rejected, ref_padded.rejected, rtol=0, atol=1e-10)
        # a reference that differs from the policy (else the DPO logits are 0 at this point)
        ref_padded = ReferenceLogps(ref_padded.chosen + 1.5, ref_padded.rejected - 0.5)
        ref_packed = ReferenceLogps(ref_packed.chosen + 1.5, ref_packed.rejected - 0.5)
    _assert_same_step(_step(model, padded, ref_padded), _step(model, packed, ref_packed), 1e-10)


def test_exact_logit_metrics_average_every_real_position():
    """logit_metrics="exact" on a packed batch: the mean of the (softcapped) logits over every
    position of the chosen (rejected) sequences and the whole vocabulary, no padding in it."""
    model = _tiny_model(loss="simpo", logit_metrics="exact")
    _, packed = _padded_and_packed()
    out, _ = _step(model, packed)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
    ids, B = packed["sequence_ids"], len(EXACT_SHAPES)
    chosen = logits[(ids >= 0) & (ids < B)].mean().item()
    rejected = logits[ids >= B].mean().item()
    assert out.metrics["logits/chosen"] == pytest.approx(chosen, rel=0, abs=1e-10)
    assert out.metrics["logits/rejected"] == pytest.approx(rejected, rel=0, abs=1e-10)


def test_the_exactness_check_fails_when_sequences_see_each_other():
    """Negative control: positions counted through the whole row (not restarting per sequence)
    make transformers see one sequence per row, so packed sequences attend to each other; the loss
    is then far from the padded one. An attention_mask next to sequence_ids (which would do the
    same) is refused."""
    model = _tiny_model(loss="simpo", logit_metrics="targets")
    padded, packed = _padded_and_packed()
    exact, _ = _step(model, padded)
    R, W = packed["input_ids"].shape
    leaky = dict(packed, position_ids=torch.arange(W).expand(R, W).clone())
    out, _ = _step(model, leaky)
    assert abs(out.loss.item() - exact.loss.item()) > 1e-4
    with pytest.raises(ValueError, match="needs position_ids .* and no attention_mask"):
        _step(model, dict(packed, attention_mask=torch.ones(R, W, dtype=torch.long)))


def test_flex_attention_packed_forward_equals_eager_padded_forward():
    """flex_attention (softcap in its score_mod, the block-diagonal sliding/causal masks as block
    masks) on the packed batch == eager on the padded batch: loss, logps and every metric, to
    float32 tolerance (1e-5). Forward only: FlexAttention has no backward on CPU (the gradients are the
    eager test's)."""
    padded, packed = _padded_and_packed()
    strip = lambda b: {k: v for k, v in b.items() if not k.startswith("ref_")}  # noqa: E731
    with torch.no_grad():
        eager = _tiny_model(loss="simpo", logit_metrics="targets", dtype=torch.float32)(
            **strip(padded), simpo=True)
        try:  # float32: FlexAttention on CPU takes float32, float16, bfloat16
            flex = _tiny_model(attn="flex_attention", loss="simpo", logit_metrics="targets",
                               dtype=torch.float32)(**strip(packed), simpo=True)
        except Exception as exc:  # noqa: BLE001 - the reason is printed with the skip
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"flex_attention does not run on this CPU: {why}")
            pytest.skip(f"flex_attention does not run on CPU here: {why}")
    for name in ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        torch.testing.assert_close(getattr(flex, name), getattr(eager, name), rtol=0, atol=1e-5)
    for key, value in eager.metrics.items():
        assert flex.metrics[key] == pytest.approx(value, rel=0, abs=1e-5), key


# ----------------------------------------------------------------------------- the trainer

def test_attention_paths_for_packed_batches():
    """eager, flex_attention, flash_attention_2 keep packed sequences apart; sdpa only without
    attention softcapping (Gemma-2's is dropped by SDPA); anything else is refused in one line."""
    from transformers import LlamaConfig

    from simpo.config import ConfigError

    class Holder(torch.nn.Module):  # what packed_attention reads: the model's config
        def __init__(self, config):
            super().__init__()
            self.config = config

    gemma = tiny_gemma2_config(VOCAB, hidden_size=32, num_layers=1)
    for impl in ("eager", "flex_attention", "flash_attention_2"):
        gemma._attn_implementation = impl
        assert packed_attention(Holder(gemma)) == impl
        line = packed_attention_line(Holder(gemma))
        assert line.startswith(f"attn_implementation {impl}, ")
        assert ("in one row" in line) == (impl == "flash_attention_2")  # FA2's varlen: one row
    gemma._attn_implementation = "sdpa"
    with pytest.raises(ConfigError, match="^padding_free: attn_implementation 'sdpa' drops this "
                                          "model's attention softcapping") as info:
        packed_attention(Holder(gemma))
    assert "\n" not in str(info.value)
    llama = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64)
    llama._attn_implementation = "sdpa"
    assert packed_attention(Holder(llama)) == "sdpa"
    llama._attn_implementation = "paged|sdpa"
    with pytest.raises(ConfigError, match="^padding_free: attn_implementation 'paged|sdpa' cannot "
                                          "keep packed sequences apart") as info:
        packed_attention(Holder(llama))
    assert "\n" not in str(info.value)


def test_cli_refuses_an_attention_that_cannot_pack_before_loading(tmp_path, capsys):
    import simpo.train

    rc = simpo.train.main(["--padding_free", "true", "--attn_implementation", "flash_attention_3",
                           "--use_cpu", "true", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert (rc, err) == (2, "simpo-train: error: padding_free: attn_implementation "
                            "'flash_attention_3' cannot keep packed sequences apart; use eager, "
                            "flex_attention, flash_attention_2 (or sdpa without attention "
                            "softcapping)")
    assert not (tmp_path / "out").exists()


CLI_TINY = ["--tiny_hidden_size", "32", "--tiny_num_layers", "1", "--report_to", "none",
            "--disable_tqdm", "true", "--plot", "false", "--max_steps", "2", "--logging_steps", "1",
            "--per_device_train_batch_size", "4", "--save_strategy", "no", "--learning_rate", "1e-2"]


def _history(out) -> list[dict]:
    import json

    with open(out / "trainer_state.json") as f:
        return json.load(f)["log_history"]


def test_cli_padding_free_trains_like_the_padded_layout(tmp_path, caplog):
    """`simpo-train --padding_free true` on the embedded default: the same logged losses, metrics
    (logits/* aside: "exact" averages the padded layout's padding too) and eval loss as the padded
    run, to float32 accuracy; the log says which attention path the packed batches take; the run
    record has the setting."""
    import json
    import logging

    import simpo.train

    runs = {}
    for name, extra in (("padded", []), ("packed", ["--padding_free", "true"])):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="simpo.trainer"):
            assert simpo.train.main([*CLI_TINY, "--use_cpu", "true", "--max_train_samples", "16",
                                     "--max_eval_samples", "8", "--eval_strategy", "steps",
                                     "--eval_steps", "2", *extra,
                                     "--output_dir", str(tmp_path / name)]) == 0
        lines = [m for m in caplog.messages if m.startswith("padding-free batches:")]
        runs[name] = (_history(tmp_path / name), lines)
    (padded, none), (packed, lines) = runs["padded"], runs["packed"]
    assert none == [] and lines == ["padding-free batches: attn_implementation eager, "
                                    "block-diagonal causal masks built from position_ids (rows of "
                                    "at most max_length tokens)"]
    assert len(padded) == len(packed) and sum("loss" in h for h in packed) == 2
    compared = 0
    for a, b in zip(padded, packed):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if "loss" in key or "rewards" in key or "logps" in key:
                assert b[key] == pytest.approx(value, rel=0, abs=2e-5), key
                compared += 1
    assert compared > 10
    for name, value in (("padded", False), ("packed", True)):
        with open(tmp_path / name / "simpo_run_config.json") as f:
            assert json.load(f)["training"]["padding_free"] is value



def test_two_zero3_ranks_with_packing_train_like_one_process(tmp_path):
    """`--padding_free true` under ZeRO-3 on 2 CPU ranks x 4 pairs == 1 process x 4 pairs x 2
    accumulation steps (DESIGN section 4's parity: the same global batch), for DPO, whose
    precomputed reference pass packs too: the same step losses and rewards."""
    from tests.multiproc import TOL
    from tests.test_train_multiproc import _one_rank_and_two_zero3_ranks

    common = ["tiny-dpo", *CLI_TINY, "--eval_strategy", "no", "--max_train_samples", "8",
              "--dataset_splits", "train", "--beta", "0.5", "--padding_free", "true"]
    outs = _one_rank_and_two_zero3_ranks(tmp_path, common)
    steps = {name: [h for h in _history(out) if "loss" in h] for name, out in outs.items()}
    print("1 rank", [h["loss"] for h in steps["one"]], "\n2 ZeRO-3 ranks",
          [h["loss"] for h in steps["two"]])
    assert len(steps["one"]) == len(steps["two"]) == 2
    import json

    for out in outs.values():
        with open(out / "simpo_run_config.json") as f:
            assert json.load(f)["training"]["padding_free"] is True
    for a, b in zip(steps["one"], steps["two"]):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert abs(a[key] - b[key]) < TOL, key
