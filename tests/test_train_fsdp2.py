"""``SimPOTrainer`` and ``simpo-train`` under PyTorch FSDP2 on 2 CPU ranks (gloo).

accelerate enables FSDP only on accelerator devices; ``SimPOTrainer`` switches its state to FSDP
on CPU ranks, so the Trainer's own FSDP2 path (accelerate's ``fully_shard`` per decoder layer,
the [final norm, embedding = lm_head] group and the root; sharded checkpoints; loading) runs here
as it does on GPUs.

* Parity: the saved tiny Gemma-2 (tied embeddings, softcap) trained 5 steps under FSDP2 with the
  shipped ``configs/fsdp/fsdp2.json`` (FSDP activation checkpointing, sharded state dict) and
  with a variant (no activation checkpointing, no reshard after forward), global batch 4 (2 ranks
  x 2 pairs) and 8 (2 ranks x 2 pairs x 2 accumulation steps), against 1 plain process with the
  same global batch: per-step losses, gradient norms, metrics and the evaluation after training
  agree to 1e-4 (absolute) and the loss falls by more than 0.1. Outside the forward each rank
  holds part of the lm_head (a DTensor shard; the shards add up to the vocabulary).
* Resume: 6 steps with a sharded checkpoint at step 3, then a new launch resumed from it: steps
  4-6 give the same losses and gradient norms (1e-6). A sharded checkpoint cut short, or without
  or with a garbled ``.metadata``, is skipped for the one before it.
* The command line: ``accelerate launch --config_file configs/accelerate/fsdp2.yaml`` (the shipped
  file, with ``--num_processes 2 --mixed_precision no``) runs ``simpo.train`` on the embedded
  default; its first two losses equal 1 process with the same global batch; it leaves complete
  sharded checkpoints and a whole ``model.safetensors``; after its last checkpoint and outputs are
  removed, the same command resumes from the earlier checkpoint and ends with the same losses
  and the same weights (bitwise).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from tests.multiproc import (ROOT, TOL, WORKER, compare_runs, free_port, run_json, save_tiny_model,
                             subprocess_env, worker_options)

FSDP2_JSON = os.path.join(ROOT, "configs", "fsdp", "fsdp2.json")
ACCELERATE_FSDP2 = os.path.join(ROOT, "configs", "accelerate", "fsdp2.yaml")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def plain_fsdp2_json(tmp_path_factory):
    """The shipped config without FSDP's activation checkpointing, unsharded between forward and
    backward, and with whole-model checkpoints."""
    with open(FSDP2_JSON) as f:
        config = json.load(f)
    config.update(activation_checkpointing=False, reshard_after_forward=False,
                  state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False)
    path = tmp_path_factory.mktemp("fsdp_config") / "fsdp2_plain.json"
    path.write_text(json.dumps(config))
    return str(path)


def _worker(model_dir, d, rows, accum, *extra, nproc=2, steps=5):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port())] if nproc > 1 else [sys.executable]
    return run_json([*launcher, WORKER, str(d / "out.json"), "--work_dir", str(d / "w"),
                     "--grad_accum", str(accum), "--model_dir", model_dir,
                     *worker_options(rows, steps), *extra], d / "out.json")


@pytest.mark.parametrize("rows,accum,config", [(4, 1, "shipped"), (8, 2, "plain")],
                         ids=["global4-shipped-config", "global8-accum2-plain-config"])
def test_fsdp2_two_ranks_match_one_process(model_dir, plain_fsdp2_json, tmp_path, rows, accum,
                                           config):
    single = _worker(model_dir, tmp_path / "single", rows, 2 * accum, nproc=1)
    fsdp = _worker(model_dir, tmp_path / "fsdp2", rows, accum, "--fsdp",
                   FSDP2_JSON if config == "shipped" else plain_fsdp2_json)
    assert single["world_size"] == 1 and not single["fsdp"]
    assert fsdp["world_size"] == 2 and fsdp["fsdp"] and not fsdp["deepspeed"]
    # the lm_head (tied to the embedding) really is sharded: each rank holds some of its rows
    shapes, vocab = fsdp["lm_head_shapes_by_rank"], fsdp["vocab_size"]
    print("lm_head rows by rank", [s[0] for s in shapes], "of", vocab)
    assert fsdp["lm_head_is_dtensor"]
    assert all(0 < s[0] < vocab for s in shapes) and sum(s[0] for s in shapes) == vocab
    assert single["lm_head_shapes_by_rank"] == [[vocab, 32]]
    compare_runs(single, fsdp)


DPO = ["--loss", "dpo", "--beta", "0.5"]  # beta 0.5: the loss falls by > 0.1 in 5 steps at lr 1e-2


@pytest.mark.parametrize("reference", ["precomputed", "in_step"])
def test_fsdp2_dpo_two_ranks_match_one_process(model_dir, tmp_path, reference):
    """DPO under FSDP2 (shipped config) on 2 ranks == 1 process with the reference precomputed:
    with the reference log-probs precomputed by the FSDP2-sharded reference (each rank a share of
    the batches, gathered), and with the reference sharded like the policy (accelerate's FSDP2
    preparation) and run in every step. The first step's loss is log 2 (policy == reference)."""
    single = _worker(model_dir, tmp_path / "single", 4, 2, *DPO, nproc=1)
    # precomputed: the 4 pairs in one batch of 4, so rank 1 has no batch of its own and runs a
    # repeated one (a sharded forward is collective: both ranks must run as many)
    extra = ["--ref_in_step"] if reference == "in_step" else ["--precompute_batch", "4"]
    fsdp = _worker(model_dir, tmp_path / "fsdp2", 4, 1, "--fsdp", FSDP2_JSON, *DPO, *extra)
    assert fsdp["world_size"] == 2 and fsdp["fsdp"] and fsdp["lm_head_is_dtensor"]
    if reference == "in_step":
        assert fsdp["ref_model"].startswith("FSDP") and not fsdp["ref_columns"]
    else:
        assert fsdp["ref_model"] == "NoneType" and fsdp["ref_columns"] and single["ref_columns"]
    for run in (single, fsdp):
        assert abs(run["logs"][0]["loss"] - math.log(2)) < 1e-6
    compare_runs(single, fsdp)


@pytest.fixture(scope="module")
def six_steps(model_dir, tmp_path_factory):
    """6 steps under FSDP2 (shipped config: sharded checkpoints) saving at steps 3 and 6."""
    d = tmp_path_factory.mktemp("six_steps")
    return _worker(model_dir, d, 8, 1, "--fsdp", FSDP2_JSON, "--save_steps", "3", steps=6), d / "w"


def test_fsdp2_resume_continues_with_the_same_losses(model_dir, six_steps, tmp_path):
    full, work = six_steps
    checkpoint = work / "checkpoint-3"
    assert full["checkpoint_problems"] == {"checkpoint-3": [], "checkpoint-6": []}
    assert (checkpoint / "pytorch_model_fsdp_0" / ".metadata").is_file()  # sharded, as configured
    resumed = _worker(model_dir, tmp_path / "resumed", 8, 1, "--fsdp", FSDP2_JSON,
                      "--resume", str(checkpoint), steps=6)
    before = [(h["step"], h["loss"], h["grad_norm"]) for h in full["logs"]]
    # the resumed log history starts with the checkpoint's own (steps 1-3)
    after = [(h["step"], h["loss"], h["grad_norm"]) for h in resumed["logs"] if h["step"] > 3]
    assert [h["loss"] for h in resumed["logs"][:3]] == [loss for _, loss, _ in before[:3]]
    print("\nuninterrupted", before, "\nresumed", after)
    assert [s for s, _, _ in after] == [4, 5, 6]
    for (_, l1, g1), (_, l2, g2) in zip(before[3:], after):
        assert abs(l1 - l2) < 1e-6 and abs(g1 - g2) < 1e-6
    assert before[0][1] - before[-1][1] > 0.1, "the loss should fall at this learning rate"


@pytest.mark.parametrize("damage,problem", [
    ("cut", "pytorch_model_fsdp_0/__1_0.distcp is cut short"),
    ("metadata", "optimizer_0/.metadata is missing"),
    ("garbled", "pytorch_model_fsdp_0/.metadata cannot be read"),
], ids=["shard-cut-short", "metadata-missing", "metadata-garbled"])
def test_damaged_fsdp2_checkpoint_is_skipped(six_steps, tmp_path, damage, problem, caplog):
    """A sharded checkpoint is complete only when torch.distributed.checkpoint's .metadata reads
    and every byte range it records lies in its shard files, with or without the completion
    record (an FSDP checkpoint has no training_args.bin, which is not asked for)."""
    from simpo.run_dir import COMPLETION_RECORD_NAME, checkpoint_problems, last_complete_checkpoint

    _, work = six_steps
    out = tmp_path / "out"
    shutil.copytree(work, out)
    newest = out / "checkpoint-6"
    os.remove(newest / COMPLETION_RECORD_NAME)  # only the FSDP files' own evidence is left
    assert checkpoint_problems(str(newest)) == []
    if damage == "cut":
        shard = newest / "pytorch_model_fsdp_0" / "__1_0.distcp"
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    elif damage == "metadata":
        os.remove(newest / "optimizer_0" / ".metadata")
    else:
        (newest / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"not a pickle")
    problems = checkpoint_problems(str(newest))
    print(problems)
    assert any(p.startswith(problem) for p in problems), problems
    with caplog.at_level("WARNING", logger="simpo.run_dir"):
        assert last_complete_checkpoint(str(out)) == str(out / "checkpoint-3")
    assert problem in caplog.text


def _train_cli(cmd, output_dir):
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    return proc, [h["loss"] for h in history if "loss" in h]


def test_accelerate_launch_fsdp2_config_trains_saves_and_resumes(tmp_path):
    from safetensors.torch import load_file

    from simpo.run_dir import checkpoint_problems

    common = ["--max_steps", "4", "--logging_steps", "1", "--per_device_train_batch_size", "4",
              "--eval_strategy", "no", "--plot", "false", "--tiny_hidden_size", "32",
              "--learning_rate", "1e-2", "--disable_tqdm", "true", "--report_to", "none",
              "--save_strategy", "steps", "--save_steps", "2"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _, losses_one = _train_cli([sys.executable, "-m", "simpo.train", *common,
                                "--gradient_accumulation_steps", "2", "--output_dir", one], one)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", ACCELERATE_FSDP2,
              "--num_processes", "2", "--mixed_precision", "no", "--main_process_port",
              str(free_port()), "-m", "simpo.train", *common, "--use_cpu", "true",
              "--output_dir", two]
    proc, losses_two = _train_cli(launch, two)
    assert "FSDP2 on 2 CPU ranks" in proc.stdout + proc.stderr
    print("1 process", losses_one, "\n2 FSDP2 ranks", losses_two)
    assert len(losses_one) == len(losses_two) == 4
    for a, b in zip(losses_one[:2], losses_two[:2]):
        assert abs(a - b) < TOL
    for name in ("checkpoint-2", "checkpoint-4"):
        path = os.path.join(two, name)
        assert os.path.isdir(os.path.join(path, "pytorch_model_fsdp_0"))
        assert checkpoint_problems(path) == []
    final = load_file(os.path.join(two, "model.safetensors"))  # the whole model, not shards
    assert final["model.embed_tokens.weight"].shape[0] > 32

    # a rerun after the last checkpoint and the outputs are gone resumes from checkpoint-2
    shutil.rmtree(os.path.join(two, "checkpoint-4"))
    for name in os.listdir(two):
        if name not in ("checkpoint-2", "simpo_run_config.json"):
            path = os.path.join(two, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    launch[launch.index("--main_process_port") + 1] = str(free_port())
    proc, resumed = _train_cli(launch, two)
    assert "resuming from" in proc.stdout + proc.stderr
    assert resumed == losses_two
    again = load_file(os.path.join(two, "model.safetensors"))
    assert sorted(again) == sorted(final)
    assert all(bool((again[k] == final[k]).all()) for k in final)


SAVED_MODEL_RUN = ["--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "4",
                   "--eval_strategy", "no", "--plot", "false", "--save_strategy", "no",
                   "--learning_rate", "1e-2", "--disable_tqdm", "true", "--report_to", "none"]


@pytest.fixture(scope="module")
def one_process_saved_model(model_dir, tmp_path_factory):
    """2 steps of simpo.train on the saved tiny model: 1 process x 4 pairs x 2 accumulation."""
    out = str(tmp_path_factory.mktemp("one_saved") / "out")
    _, losses = _train_cli([sys.executable, "-m", "simpo.train", *SAVED_MODEL_RUN,
                            "--model_name_or_path", model_dir, "--gradient_accumulation_steps",
                            "2", "--output_dir", out], out)
    return losses


def test_torchrun_fsdp_flag_trains_a_saved_model_as_one_process(model_dir, one_process_saved_model,
                                                                  tmp_path):
    """`torchrun -m simpo.train --fsdp true --fsdp_config configs/fsdp/fsdp2.json` on a saved
    model (from_pretrained on every rank, rank 0's weights broadcast at wrapping), with
    padding-free batches (`--padding_free true`): the losses of the padded 1-process run."""
    out = str(tmp_path / "out")
    proc, losses = _train_cli(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(free_port()), "-m", "simpo.train", *SAVED_MODEL_RUN, "--model_name_or_path",
         model_dir, "--fsdp", "true", "--fsdp_config", FSDP2_JSON, "--use_cpu", "true",
         "--padding_free", "true", "--output_dir", out], out)
    assert "FSDP2 on 2 CPU ranks" in proc.stdout + proc.stderr
    assert "padding-free batches: attn_implementation eager," in proc.stdout + proc.stderr
    print("1 process", one_process_saved_model, "\n2 FSDP2 ranks", losses)
    assert len(losses) == 2
    for a, b in zip(one_process_saved_model, losses):
        assert abs(a - b) < TOL


def test_accelerate_fsdp2_config_as_shipped_trains_in_bf16(model_dir, one_process_saved_model,
                                                           tmp_path):
    """configs/accelerate/fsdp2.yaml unchanged but for the process count: bf16 FSDP2 mixed
    precision (bf16 gathered weights, compute and gradient reductions, float32 master weights) on a
    saved model loaded on rank 0 only. Its losses are the float32 ones to bf16 accuracy (2e-3
    relative; a wrong scale or a missing gradient would be far off by the second step)."""
    out = str(tmp_path / "out")
    proc, losses = _train_cli(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", ACCELERATE_FSDP2,
         "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "simpo.train",
         *SAVED_MODEL_RUN, "--model_name_or_path", model_dir, "--use_cpu", "true",
         "--output_dir", out], out)
    assert "FSDP2 on 2 CPU ranks" in proc.stdout + proc.stderr
    print("1 process float32", one_process_saved_model, "\n2 FSDP2 ranks bf16", losses)
    assert len(losses) == 2
    for a, b in zip(one_process_saved_model, losses):
        assert b == pytest.approx(a, rel=2e-3)
    # the loss and metrics leave the forward in float32, as the official trainer logs them, not
    # cast to bf16 by FSDP2's output_dtype (6.125 instead of 6.1236...)
    import torch

    assert any(torch.tensor(b).bfloat16().item() != b for b in losses), losses

