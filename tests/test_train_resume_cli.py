"""Resuming from a checkpoint; the CLI (recipes, overrides, unknown keys); the embedded default."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from simpo.config import ConfigError, parse_args  # noqa: E402
from simpo.data import load_raw_datasets, prepare_dataset  # noqa: E402
from simpo.modeling import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from simpo.trainer import SimPOTrainer  # noqa: E402
from simpo.config import SimPOConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_resume_gives_the_same_next_steps(tmp_path, caplog):
    raw = load_raw_datasets(None, ["train"])["train"].select(range(24))
    texts = [m["content"] for c in ("chosen", "rejected") for msgs in raw[c] for m in msgs]
    tok = build_tiny_tokenizer(texts)
    torch.manual_seed(0)
    base = build_tiny_model(tok, hidden_size=32)

    def make(out_dir, max_steps):
        args = SimPOConfig(output_dir=str(out_dir), use_cpu=True, report_to="none", seed=3,
                           max_steps=max_steps, per_device_train_batch_size=4, learning_rate=5e-3,
                           lr_scheduler_type="cosine", warmup_steps=1, logging_steps=1,
                           save_strategy="steps", save_steps=3, max_length=64,
                           max_prompt_length=32, disable_tqdm=True, beta=2.0,
                           gamma_beta_ratio=0.5)
        ds = prepare_dataset(raw, tok, args)  # 24 rows / 4 = 6 steps per epoch
        return SimPOTrainer(model=copy.deepcopy(base), args=args, train_dataset=ds,
                            processing_class=tok)

    full = make(tmp_path / "full", 8)  # crosses an epoch boundary after step 6
    full.train()
    reference = _losses(full)
    assert os.path.isdir(tmp_path / "full" / "checkpoint-3")

    resumed = make(tmp_path / "full", 8)
    caplog.clear()
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    # the tied lm_head is not in the checkpoint (it is the embedding): no "missing keys" warning
    assert not [r for r in caplog.records if "missing keys" in r.getMessage()]
    after = _losses(resumed)
    print("uninterrupted", reference, "\nresumed", after)
    assert sorted(k for k in after if k > 3) == [4, 5, 6, 7, 8]
    for step in range(4, 9):
        assert after[step] == pytest.approx(reference[step], abs=1e-6), step
    final_a = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        torch.testing.assert_close(p, final_a[name], rtol=0, atol=1e-6)


def test_cli_recipe_and_overrides(tmp_path):
    model_args, data_args, args, recipe = parse_args(
        ["--max_steps", "3", "--beta", "5", "--output_dir", str(tmp_path), "--use_cpu", "true",
         "--dataset_splits", "train"])
    assert recipe.name == "tiny.yaml"  # the embedded default recipe
    assert args.max_steps == 3 and args.beta == 5.0 and args.use_cpu is True
    assert args.output_dir == str(tmp_path) and data_args.dataset_splits == ["train"]
    assert args.sft_weight == 1.0  # from the recipe
    _, _, args, recipe = parse_args(["gemma-2-9b-it-simpo", "--gradient_accumulation_steps", "16",
                                  "--use_cpu", "true"])
    assert (args.beta, args.gamma_beta_ratio, args.learning_rate) == (10.0, 0.5, 8e-7)
    assert args.gradient_accumulation_steps == 16 and args.max_length == 2048
    assert args.max_prompt_length == 1800 and args.seed == 42 and args.bf16
    assert args.lr_scheduler_type.value == "cosine" and args.warmup_steps == 0.1
    assert args.per_device_train_batch_size == 2 and args.num_train_epochs == 1


def test_cli_unknown_keys_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown option.*--no_such_option"):
        parse_args(["--no_such_option", "1"])
    with pytest.raises(ConfigError, match="beta must be > 0"):
        parse_args(["--beta", "0", "--use_cpu", "true"])
    with pytest.raises(ConfigError, match="max_prompt_length"):
        parse_args(["--max_prompt_length", "500", "--max_length", "100"])
    with pytest.raises(ConfigError, match="neither a file nor a packaged recipe"):
        parse_args(["no-such-recipe"])
    proc = subprocess.run([sys.executable, "-m", "simpo.train", "--bogus", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown option --bogus" in proc.stderr


def test_embedded_default_end_to_end_short(tmp_path):
    """The no-recipe entry point on a short budget: trains, evaluates, writes its outputs."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "simpo.train", "--max_steps", "30", "--eval_steps", "15",
         "--logging_steps", "5", "--output_dir", str(out), "--disable_tqdm", "true"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.json",
                 "training_curves.png", "eval_results.json"):
        assert (out / name).is_file(), name
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [h for h in state["log_history"] if "eval_rewards/accuracies" in h]
    assert evals and all("eval_logits/chosen" in h and "eval_sft_loss" in h for h in evals)
    trains = [h for h in state["log_history"] if "loss" in h]
    assert trains and all("rewards/margins" in h for h in trains)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["final_logit_softcapping"] == 30.0 and cfg["tie_word_embeddings"] is True
    assert "eval reward accuracy" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is about CPU runs")
def test_loss_backend_that_cannot_run_is_refused_before_any_work(monkeypatch):
    """triton on CPU computes only in the Triton interpreter, which cannot do bfloat16: refused at
    parse time (torch_dtype or bf16 autocast), not after data processing or with garbage."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for flags in (["--torch_dtype", "bfloat16"], ["--bf16", "true"]):
        with pytest.raises(ConfigError, match="loss_backend triton cannot run.*bfloat16 on CPU.*interpreter"):
            parse_args(["--loss_backend", "triton", "--use_cpu", "true", *flags])
    for flags in ([], ["--torch_dtype", "float16"], ["--torch_dtype", "float32"]):
        parse_args(["--loss_backend", "triton", "--use_cpu", "true", *flags])
    parse_args(["--loss_backend", "torch", "--use_cpu", "true", "--bf16", "true"])
    parse_args(["--loss_backend", "torch", "--loss_schedule", "pairs", "--use_cpu", "true"])
    with pytest.raises(ConfigError, match="unknown schedule 'fused' for backend='torch'"):
        parse_args(["--loss_backend", "torch", "--loss_schedule", "fused", "--use_cpu", "true"])
    with pytest.raises(ConfigError, match="backend='eager' has no schedules"):
        parse_args(["--loss_backend", "eager", "--loss_schedule", "vocab", "--use_cpu", "true"])
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match="needs CUDA tensors"):
        parse_args(["--loss_backend", "triton", "--use_cpu", "true"])
    proc = subprocess.run([sys.executable, "-m", "simpo.train", "--loss_backend", "triton",
                           "--torch_dtype", "bfloat16"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "simpo-train: error: loss_backend triton cannot run" in proc.stderr


def test_bf16_autocast_training_on_cpu(tmp_path):
    """--bf16 true on CPU: the Trainer runs the forward under torch.autocast (backward outside it),
    and the torch backend casts the head's matmul inputs to bfloat16 as nn.Linear's would."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "simpo.train", "--bf16", "true", "--max_steps", "4", "--logging_steps", "1",
         "--eval_strategy", "no", "--plot", "false", "--output_dir", str(out), "--disable_tqdm", "true"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    grads = [h["grad_norm"] for h in state["log_history"] if "grad_norm" in h]
    assert len(losses) == 4 and all(0 < x < 100 for x in losses)
    assert grads and all(0 < g < float("inf") for g in grads)


def test_single_data_file_trains_with_no_extra_flags(tmp_path):
    """One .jsonl file is the train split: the recipe's dataset_splits [train, test] and its
    eval_strategy steps need no overriding (evaluation is off, and says so); --eval_fraction holds
    a seed-42 fraction out to evaluate on; an explicit --eval_strategy without eval data is an
    error, not ignored."""
    data = os.path.join(ROOT, "simpo", "data", "train.jsonl")
    common = ["--dataset_name", data, "--max_steps", "2", "--logging_steps", "1", "--plot", "false",
              "--tiny_hidden_size", "32", "--disable_tqdm", "true"]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")

    def cli(out, *extra):
        return subprocess.run([sys.executable, "-m", "simpo.train", *common, "--output_dir",
                               str(tmp_path / out), *extra], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env=env)

    proc = cli("plain")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "no eval split: evaluation off" in proc.stdout + proc.stderr
    assert (tmp_path / "plain" / "train_results.json").is_file()
    assert not (tmp_path / "plain" / "eval_results.json").exists()

    proc = cli("heldout", "--eval_fraction", "0.1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    evals = json.loads((tmp_path / "heldout" / "eval_results.json").read_text())
    assert evals["eval_samples"] == 31  # ceil(0.1 * 303 rows)
    assert json.loads((tmp_path / "heldout" / "train_results.json").read_text())["train_samples"] == 272

    proc = cli("asked", "--eval_strategy", "steps")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert ("simpo-train: error: --eval_strategy steps asks for evaluation but the data has no eval "
            "split") in proc.stderr
