"""LoRA / QLoRA in simpo-train (peft): the options and their refusals, the fused loss with an
adapted lm_head against peft's own forward in float64, adapter checkpoints and exact resume, the
final adapter and merged model, and DPO's reference (the base model) in an adapter run."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch

pytest.importorskip("peft")

from peft import LoraConfig, get_peft_model  # noqa: E402

from simpo.config import ConfigError, SimPOConfig, parse_args  # noqa: E402
from simpo.data import prepare_dataset  # noqa: E402
from simpo.modeling import attach_simpo_head, build_tiny_model, disable_dropout  # noqa: E402
from tests.multiproc import tiny_rows_and_tokenizer  # noqa: E402
from tests.reference import reference_from_logits  # noqa: E402

SIMPO = dict(beta=2.5, gamma_beta_ratio=0.3)


# ----------------------------------------------------------------------------- options

def test_lora_options_parse_with_trl_names_and_defaults():
    model_args, _, _, _ = parse_args(["--use_peft", "true"])
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == (16, 32, 0.05)
    assert model_args.lora_target_modules is None and model_args.lora_modules_to_save is None
    assert not (model_args.use_rslora or model_args.use_dora or model_args.load_in_4bit)
    model_args, _, _, _ = parse_args(
        ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0",
         "--lora_target_modules", "q_proj", "lm_head", "--lora_modules_to_save", "embed_tokens",
         "--use_rslora", "true"])
    assert model_args.lora_target_modules == ["q_proj", "lm_head"]
    assert model_args.lora_modules_to_save == ["embed_tokens"]
    from simpo.lora import lora_config

    config = lora_config(model_args)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora) == (4, 8, 0.0, True)
    assert config.target_modules == {"q_proj", "lm_head"} and config.task_type == "CAUSAL_LM"
    all_linear, _, _, _ = parse_args(["--use_peft", "true", "--lora_target_modules", "all-linear"])
    assert lora_config(all_linear).target_modules == "all-linear"


@pytest.mark.parametrize("argv,message", [
    (["--lora_r", "8"], "lora_r has no effect without use_peft"),
    (["--lora_r", "16"], "lora_r has no effect without use_peft"),  # set, even to the default
    (["--load_in_4bit", "true"], "load_in_4bit has no effect without use_peft (a quantised model "
                                 "without adapters cannot train)"),
    (["--use_peft", "true", "--lora_r", "0"], "lora_r: must be a positive integer, got 0"),
    (["--use_peft", "true", "--lora_dropout", "1"], "lora_dropout: must be in [0, 1), got 1.0"),
    (["--use_peft", "true", "--lora_alpha", "-1"], "lora_alpha: must be > 0, got -1.0"),
    (["--use_peft", "true", "--model_name_or_path", "org/model", "--load_in_4bit", "true",
      "--load_in_8bit", "true"], "load_in_4bit and load_in_8bit: choose one"),
    (["--use_peft", "true", "--bnb_4bit_quant_type", "fp4"],
     "bnb_4bit_quant_type applies to 4-bit loading only"),
    (["--use_peft", "true", "--load_in_4bit", "true"], "the embedded tiny model is built in code"),
    (["--use_peft", "true", "--fsdp", "full_shard"], "use_peft with FSDP is not supported"),
    (["--use_peft", "true", "--lora_target_modules", "lm_head", "--disable_dropout", "false"],
     "a LoRA on lm_head with lora_dropout 0.05 and disable_dropout false"),
])
def test_lora_option_errors_are_one_line(argv, message):
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_quantisation_refused_here_with_the_reason_and_its_config_built():
    """No bitsandbytes (and no CUDA device) on this machine: refused at parse time, naming why;
    the BitsAndBytesConfig and device map a CUDA machine with bitsandbytes gets are TRL's."""
    import importlib.util

    from simpo.lora import quantization_kwargs

    argv = ["--use_peft", "true", "--model_name_or_path", "org/model", "--load_in_4bit", "true"]
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "quantised loading needs bitsandbytes, which is not installed here" in str(err.value)
    else:
        assert "runs on CUDA devices only" in str(err.value)
    from simpo.config import ModelArguments

    args = ModelArguments(model_name_or_path="org/model", use_peft=True, load_in_4bit=True,
                          bnb_4bit_quant_type="fp4", use_bnb_nested_quant=True,
                          torch_dtype="bfloat16")
    kwargs = quantization_kwargs(args)
    q = kwargs["quantization_config"]
    assert q.load_in_4bit and not q.load_in_8bit and q.bnb_4bit_quant_type == "fp4"
    assert q.bnb_4bit_use_double_quant and q.bnb_4bit_compute_dtype == torch.bfloat16
    assert q.bnb_4bit_quant_storage == torch.bfloat16
    assert kwargs["device_map"] == {"": 0}
    eight = quantization_kwargs(ModelArguments(model_name_or_path="org/model", use_peft=True,
                                               load_in_8bit=True))
    assert eight["quantization_config"].load_in_8bit
    assert quantization_kwargs(ModelArguments()) == {}


def test_run_config_records_the_lora_options(tmp_path):
    from simpo.run_dir import run_config

    model_args, data_args, training_args, recipe = parse_args(
        ["--use_peft", "true", "--lora_r", "4", "--output_dir", str(tmp_path)])
    config = run_config(model_args, data_args, training_args, recipe)
    assert config["model"]["use_peft"] is True and config["model"]["lora_r"] == 4
    assert config["model"]["lora_target_modules"] is None
    from simpo.run_dir import config_differences

    other = run_config(*parse_args(["--use_peft", "true", "--lora_r", "8", "--lora_target_modules",
                                    "all-linear", "--output_dir", str(tmp_path)]))
    differences = config_differences(config, other)
    assert any(d.startswith("lora_r: 4 -> 8") for d in differences), differences
    assert any(d.startswith("lora_target_modules") for d in differences), differences


# ----------------------------------------------------------------------------- the fused loss

@pytest.fixture(scope="module")
def batch64():
    """A collated float64 batch of 4 pairs (unequal lengths) and the tokenizer."""
    raw, tok = tiny_rows_and_tokenizer(8)
    args = SimPOConfig(output_dir="/tmp/unused", use_cpu=True, report_to="none", max_length=48,
                       max_prompt_length=24)
    ds = prepare_dataset(raw, tok, args)
    from simpo.data import SimPODataCollator

    batch = SimPODataCollator(tok.pad_token_id, -100)([ds[i] for i in range(4)])
    return batch, tok


def _peft_tiny(tok, **lora):
    torch.manual_seed(0)
    model = build_tiny_model(tok, torch_dtype=torch.float64, hidden_size=32, num_layers=1)
    with torch.no_grad():  # larger weights than the init, so that the softcap really bends
        model.get_input_embeddings().weight.mul_(40.0)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                  init_lora_weights=False, **lora))
    torch.manual_seed(1)
    with torch.no_grad():  # every trainable tensor away from its initial value
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    disable_dropout(peft_model)  # as the trainer does (disable_dropout true)
    return peft_model.train()


@pytest.mark.parametrize("backend", ["torch", "eager"])
@pytest.mark.parametrize("case,lora", [
    ("frozen_head", dict(target_modules=["q_proj", "v_proj"])),
    ("head_in_modules_to_save", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    ("lora_on_head", dict(target_modules=["q_proj", "lm_head"], lora_dropout=0.1)),
    ("lora_on_head_rslora", dict(target_modules=["lm_head"], use_rslora=True)),
])
def test_fused_loss_with_adapted_head_equals_peft_forward(batch64, case, lora, backend):
    """The patched forward's loss and its gradients w.r.t. every trainable tensor (LoRA A/B, the
    lm_head copy) equal an eager float64 SimPO on peft's own forward logits, to 1e-10."""
    batch, tok = batch64
    model = _peft_tiny(tok, **lora)
    head = model.get_base_model().lm_head
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if case == "frozen_head":
        assert isinstance(head, torch.nn.Linear) and not head.weight.requires_grad
    elif case == "head_in_modules_to_save":
        assert any("lm_head.modules_to_save" in n for n in trainable)
        # the tied original stays the (frozen) input embedding; the copy is trained
        assert head.original_module.weight is model.get_base_model().model.embed_tokens.weight
    else:
        assert any("lm_head.lora_B" in n for n in trainable)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]

    logits = model(input_ids=ids, attention_mask=mask).logits  # peft's forward applies LoRA
    ref = reference_from_logits(logits, labels, **SIMPO)
    ref_grads = torch.autograd.grad(ref["loss"], list(trainable.values()))

    attach_simpo_head(model, backend=backend, **SIMPO)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, simpo=True)
    grads = torch.autograd.grad(out.loss, list(trainable.values()))
    assert out.loss.dtype == torch.float64
    assert abs(out.loss.item() - ref["loss"].item()) < 1e-10
    for (name, _), g, r in zip(trainable.items(), grads, ref_grads):
        assert r.abs().max() > 0, name  # every adapter tensor gets a gradient
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10, msg=name)
    # the adapted head really matters: with the adapters off the loss is another number
    with model.disable_adapter():
        base = model(input_ids=ids, attention_mask=mask, labels=labels, simpo=True).loss
        base_ref = reference_from_logits(model(input_ids=ids, attention_mask=mask).logits,
                                         labels, **SIMPO)["loss"]
    assert abs(base.item() - base_ref.item()) < 1e-10
    assert abs(base.item() - out.loss.item()) > 1e-4


def test_lora_on_head_with_dropout_in_training_is_refused(batch64):
    batch, tok = batch64
    torch.manual_seed(0)
    model = get_peft_model(build_tiny_model(tok, hidden_size=32, num_layers=1),
                           LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["lm_head"],
                                      lora_dropout=0.1))
    attach_simpo_head(model.train(), **SIMPO)
    with pytest.raises(ValueError, match="lm_head's LoRA adapter 'default' has dropout 0.1"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              labels=batch["labels"], simpo=True)
    model.eval()  # in evaluation dropout is off: the merged weight is exact
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
          labels=batch["labels"], simpo=True)


def test_dora_on_head_is_refused(batch64):
    from simpo.lora import check_head

    _, tok = batch64
    model = get_peft_model(build_tiny_model(tok, hidden_size=32, num_layers=1),
                           LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["lm_head"],
                                      use_dora=True))
    with pytest.raises(ConfigError, match="a LoRA on lm_head with DoRA"):
        check_head(model, SimPOConfig(output_dir="/tmp/unused", use_cpu=True, report_to="none"))


# ----------------------------------------------------------------------------- a run, its outputs

COMMON = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0",
          "--lora_target_modules", "q_proj", "v_proj", "lm_head",
          "--tiny_hidden_size", "32", "--tiny_num_layers", "1", "--max_train_samples", "16",
          "--dataset_splits", "train", "--eval_strategy", "no", "--plot", "false",
          "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--logging_steps", "1",
          "--report_to", "none", "--disable_tqdm", "true"]
RUN = [*COMMON, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]


def _train(out, monkeypatch, argv=RUN, kept_all=False):
    """``simpo.train.run`` in this process; returns the trained in-memory model (float32)."""
    import simpo.train as train

    kept = {}
    save = train.save_final_model

    def keep(trainer, *args):
        kept["model"] = copy.deepcopy(trainer.model).eval()
        kept["ref_model"] = trainer.ref_model
        return save(trainer, *args)

    monkeypatch.setattr(train, "save_final_model", keep)
    train.run(*parse_args([*argv, "--output_dir", str(out)]))
    return kept["model"] if not kept_all else kept


def _state(out):
    with open(os.path.join(out, "trainer_state.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_run")
    with pytest.MonkeyPatch.context() as mp:
        model = _train(out, mp)
    return out, model


def test_adapter_checkpoints_are_complete_and_refused_when_cut(lora_run, tmp_path):
    from simpo.run_dir import checkpoint_problems

    out, _ = lora_run
    ckpt = os.path.join(out, "checkpoint-2")
    names = set(os.listdir(ckpt))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names
    assert "model.safetensors" not in names
    assert checkpoint_problems(ckpt) == []
    for damage, expected in (("cut", "adapter_model.safetensors is cut short"),
                             ("no_config", "adapter_config.json is missing"),
                             ("no_weights", "model weights are missing")):
        bad = tmp_path / damage
        shutil.copytree(ckpt, bad)
        os.remove(bad / "simpo_checkpoint.json")  # the record would name the damage itself
        if damage == "cut":
            with open(bad / "adapter_model.safetensors", "r+b") as f:
                f.truncate(os.path.getsize(bad / "adapter_model.safetensors") - 10)
        else:
            os.remove(bad / ("adapter_config.json" if damage == "no_config"
                             else "adapter_model.safetensors"))
        problems = checkpoint_problems(str(bad))
        assert any(expected in p for p in problems), problems


def test_adapter_run_resumes_exactly(lora_run, tmp_path, monkeypatch):
    """4 steps straight == 2 steps, a stop (only checkpoint-2 and the run's settings left), and
    a rerun of the same command to 4: the same logged losses and the same adapter weights."""
    from safetensors.torch import load_file

    out, _ = lora_run
    cut = tmp_path / "cut"
    os.mkdir(cut)
    shutil.copytree(os.path.join(out, "checkpoint-2"), cut / "checkpoint-2")
    shutil.copy(os.path.join(out, "simpo_run_config.json"), cut)
    _train(cut, monkeypatch)
    straight, resumed = _state(out)["log_history"], _state(cut)["log_history"]
    losses = [h["loss"] for h in straight if "loss" in h]
    assert len(losses) == 4 and losses[0] != losses[-1]
    # steps 1-2 come with checkpoint-2's state, steps 3-4 were trained after the resume
    assert [h["loss"] for h in resumed if "loss" in h] == losses
    assert straight[-1]["train_loss"] == resumed[-1]["train_loss"]  # the whole run's
    a = load_file(os.path.join(out, "adapter_model.safetensors"))
    b = load_file(os.path.join(cut, "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("lm_head.lora_B" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_final_adapter_and_merged_model_load_and_generate(lora_run):
    """output_dir: the adapter (peft loads it over the saved tiny base, which adapter_config.json
    names) and merged/ (a plain transformers model): the same logits as the trained in-memory
    model (1e-5, float32), and both generate."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, trained = lora_run
    names = set(os.listdir(out))
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "merged",
            "base"} <= names and "model.safetensors" not in names
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == os.path.join(str(out), "base")
    adapter = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "merged")).eval()
    assert type(merged).__name__ == "Gemma2ForCausalLM"
    # the trained head LoRA is in the merged head, which is no longer the input embedding
    assert not merged.config.tie_word_embeddings
    assert not torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "merged"))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        expected = trained(**ids).logits
        with trained.disable_adapter():
            base = trained(**ids).logits
        assert (expected - base).abs().max() > 1e-3  # training changed the model
        for model in (adapter, merged):
            torch.testing.assert_close(model(**ids).logits, expected, rtol=0, atol=1e-5)
            generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
            assert generated.shape == (1, ids["input_ids"].shape[1] + 4)
    # a release: the merged model (and the saved tiny base) generate with their KV cache, and
    # the card says what the folder holds and how to load it
    for sub in ("merged", "base"):
        for name in ("config.json", "generation_config.json"):
            with open(os.path.join(out, sub, name)) as f:
                assert json.load(f)["use_cache"] is True, (sub, name)
    with open(os.path.join(out, "README.md")) as f:
        card = f.read()
    assert "library_name: peft" in card and "## LoRA adapter" in card
    assert "| lora_r | 4 |" in card and "| lora_alpha | 8 |" in card
    assert "AutoPeftModelForCausalLM.from_pretrained" in card


def test_merge_of_a_trained_head_copy(batch64, tmp_path):
    """lora_modules_to_save lm_head on tied Gemma-2 embeddings: the merged model keeps the
    trained copy as its head and the original embedding as input (1e-5, float32)."""
    from transformers import AutoModelForCausalLM

    from simpo.lora import save_merged_model

    batch, tok = batch64
    model = _peft_tiny(tok, target_modules=["q_proj"], modules_to_save=["lm_head"]).float().eval()
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    base = build_tiny_model(tok, hidden_size=32, num_layers=1)
    with torch.no_grad():
        base.get_input_embeddings().weight.mul_(40.0)
    merged = AutoModelForCausalLM.from_pretrained(save_merged_model(str(tmp_path), base, tok))
    ids = batch["input_ids"][:2]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("precompute", ["true", "false"])
def test_dpo_reference_of_an_adapter_run_is_the_base_model(tmp_path, monkeypatch, precompute):
    """DPO with use_peft: the reference is the base model (no adapters), precomputed or run in
    the step; the adapters start as the identity, so the first step's loss is log 2."""
    import math

    from simpo.lora import is_peft_model

    argv = ["tiny-dpo", *COMMON, "--max_steps", "1", "--rpo_alpha", "0",
            "--precompute_ref_log_probs", precompute]
    kept = _train(tmp_path, monkeypatch, argv, kept_all=True)
    assert is_peft_model(kept["model"])
    if precompute == "false":
        assert kept["ref_model"] is not None and not is_peft_model(kept["ref_model"])
        assert not any("lora" in n for n, _ in kept["ref_model"].named_parameters())
    losses = [h["loss"] for h in _state(tmp_path)["log_history"] if "loss" in h]
    assert len(losses) == 1 and abs(losses[0] - math.log(2)) < 1e-6
