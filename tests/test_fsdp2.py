"""The fused SimPO loss is exact under PyTorch FSDP2 (``fully_shard``) on 2 CPU ranks (gloo).

Models: the saved tiny Gemma-2 (float32, softcap 30, tied embeddings, ``torch.manual_seed(0)``) and
an untied copy of it (same weights, the lm_head a separate parameter initialised as a copy of the
embedding), patched with ``attach_simpo_head(beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.0)``.
Data: the first 4 pairs of the shipped preference data are the global batch of every step; each
run splits them deterministically over (rank, micro-step). The 1-process reference runs in a plain
process (no process group, no FSDP). Every FSDP2 run is launched with
``torch.distributed.run --nproc_per_node 2 tests/fsdp2_worker.py`` (see that file); one launch runs
several configurations in sequence.

* Training (AdamW, lr 1e-2, 5 steps, global batch 4 pairs as 2 ranks x 2 pairs and as 2 ranks x
  1 pair x 2 accumulation steps with ``set_requires_gradient_sync(False)`` on the first micro-step)
  for four wrappings -- tied: layers + root, accelerate's ``[norm, embed, lm_head]`` group
  (``reshard_after_forward=False``) + root; untied: accelerate's embed group + ``[norm, lm_head]``
  group + root, layers + root -- equals 1 process x 4 pairs: per-step loss (mean over ranks)
  within 1e-4 absolute, total gradient norm within 1e-4 x max(1, norm), metrics
  (rewards/accuracies, rewards/margins, logps/chosen; mean over ranks) within 1e-4 absolute. The
  loss must fall by more than 0.1 over the run.
* After training, outside any forward, the lm_head weight is a DTensor on each rank whose local
  shards have fewer rows than the vocabulary and sum to it.
* Every (backend, schedule) -- eager/auto, torch/pairs|vocab|tokens, triton/pairs|vocab|fused (the
  Triton interpreter, float32) -- under FSDP2 (tied, accelerate-style tail group): one forward +
  backward gives the loss of the 1-process eager reference within 1e-5 absolute and the full
  gradients of the (tied) embedding and of ``model.layers.0.mlp.down_proj.weight`` within 1e-5 of
  the largest reference gradient entry (observed ~1e-6).
* An lm_head sharded in a group of its own, whose forward never runs, is refused with the
  TypeError "... is a DTensor ..." raised by simpo_kernels' input validation, on both ranks.
* torch.distributed.checkpoint: run A trains 6 steps and saves model + optimizer
  (``get_state_dict`` + ``dcp.save``) after step 3 (so B, "3 steps then save", is A's first half);
  run C, a new launch, builds, wraps, creates the optimizer, loads (``dcp.load`` +
  ``set_state_dict``) and trains steps 4..6: its losses equal A's steps 4..6 within 1e-5, and A's
  6 losses equal the 1-process reference within 1e-4 (saving does not disturb training).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time

import pytest

from tests.multiproc import ROOT, free_port, save_tiny_model, subprocess_env

WORKER = os.path.join(ROOT, "tests", "fsdp2_worker.py")
TOL = 1e-4           # training parity: losses, metrics (absolute), grad norms (x max(1, norm))
TOL_STEP = 1e-5      # one forward + backward: loss (absolute), gradients (x max |reference grad|)
TOL_RESUME = 1e-5    # resumed losses vs the uninterrupted run (same split, same ranks)
STEPS = 5
CKPT_STEPS = 6
LAUNCH_TIMEOUT = 300
WRAPPINGS = {"tied-root": "tied", "tied-tail": "tied", "untied-tail": "untied",
             "untied-root": "untied"}
BACKENDS = ["eager/auto", "torch/pairs", "torch/vocab", "torch/tokens", "triton/pairs",
            "triton/vocab", "triton/fused"]
METRICS = ("rewards/accuracies", "rewards/margins", "logps/chosen")


def _launch(out, mode, dirs, *extra, ranks=2):
    """Run the worker (``ranks`` 2: torchrun; 1: one plain process); returns its JSON (and the
    gradients it saved, if any). A nonzero exit is accepted only as gloo's C++ teardown abort
    after the results were completely written."""
    cmd = [WORKER, str(out), "--mode", mode, "--model_dir", dirs["tied"],
           "--untied_dir", dirs["untied"], *extra]
    if ranks == 2:
        cmd = ["-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *cmd], env=subprocess_env(TRITON_INTERPRET="1"),
                          cwd=ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    seconds = time.perf_counter() - t0
    written = os.path.isfile(out)  # the worker renames it into place once complete
    teardown = written and "terminate called" in proc.stderr
    if proc.returncode != 0 and teardown:
        print(f"{mode}: gloo teardown abort after the results were written (rc {proc.returncode})")
    assert proc.returncode == 0 or teardown, proc.stdout[-3000:] + proc.stderr[-6000:]
    with open(out) as f:
        result = json.load(f)
    print(f"launch {mode} ({ranks} process(es)): {seconds:.1f} s")
    result["launch_seconds"] = seconds
    assert result["mode"] == mode and result["world_size"] == ranks
    assert result["fsdp"] == (ranks == 2)
    if os.path.isfile(str(out) + ".pt"):
        import torch

        result["tensors"] = torch.load(str(out) + ".pt")
    return result


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """The tiny tied Gemma-2 (seed 0) + tokenizer, and an untied copy of the same weights."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma2ForCausalLM

    base = tmp_path_factory.mktemp("fsdp2_models")
    tied = AutoModelForCausalLM.from_pretrained(save_tiny_model(base / "tied"),
                                                attn_implementation="eager")
    assert tied.dtype == torch.float32

    config = copy.deepcopy(tied.config)
    config.tie_word_embeddings = False
    untied = Gemma2ForCausalLM(config)
    state = {k: v.detach().clone() for k, v in tied.state_dict().items()}
    state["lm_head.weight"] = tied.get_input_embeddings().weight.detach().clone()
    untied.load_state_dict(state, strict=True)
    assert untied.lm_head.weight is not untied.get_input_embeddings().weight
    assert untied.lm_head.weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()
    untied.save_pretrained(base / "untied")
    return {"tied": str(base / "tied"), "untied": str(base / "untied")}


@pytest.fixture(scope="module")
def reference(model_dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp2_reference")
    return _launch(d / "out.json", "reference", model_dirs, "--steps", str(CKPT_STEPS), ranks=1)


@pytest.fixture(scope="module")
def fsdp_train(model_dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp2_train")
    return _launch(d / "out.json", "train", model_dirs, "--steps", str(STEPS))


@pytest.fixture(scope="module")
def fsdp_backends(model_dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp2_backends")
    return _launch(d / "out.json", "backends", model_dirs)


@pytest.fixture(scope="module")
def fsdp_checkpoint(model_dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp2_checkpoint")
    ckpt = ["--steps", str(CKPT_STEPS), "--ckpt_dir", str(d / "dcp")]
    saved = _launch(d / "save.json", "ckpt_save", model_dirs, *ckpt)
    resumed = _launch(d / "resume.json", "ckpt_resume", model_dirs, *ckpt)
    return saved, resumed


def _maxdiff(a_logs, b_logs, key):
    assert len(a_logs) == len(b_logs)
    return max(abs(a[key] - b[key]) for a, b in zip(a_logs, b_logs))


@pytest.mark.parametrize("wrapping", list(WRAPPINGS))
def test_fsdp2_training_matches_one_process(reference, fsdp_train, wrapping):
    ref_runs = reference["runs"]
    which = WRAPPINGS[wrapping]
    ref = ref_runs[f"{which}-accum1"]["logs"][:STEPS]
    ref_losses = [h["loss"] for h in ref]
    assert ref_losses[0] - ref_losses[-1] > 0.1, f"the loss should fall at lr 1e-2: {ref_losses}"
    # noise floor: the 1-process run with 2 pairs x 2 accumulation steps agrees with 4 pairs
    floor = ref_runs[f"{which}-accum2"]["logs"][:STEPS]
    print(f"\n{wrapping}: reference 4 pairs vs 2 x 2 accumulation: loss "
          f"{_maxdiff(ref, floor, 'loss'):.1e}, grad norm {_maxdiff(ref, floor, 'grad_norm'):.1e}")
    for accum in (1, 2):
        run = fsdp_train["runs"][f"{wrapping}-accum{accum}"]
        logs = run["logs"]
        assert len(logs) == STEPS and run["accum"] == accum
        diffs = {k: _maxdiff(logs, ref, k) for k in ("loss", "grad_norm", *METRICS)}
        print(f"{wrapping} 2 ranks x {2 // accum} pair(s) x {accum} micro-step(s) "
              f"({run['seconds']:.2f} s): losses {[round(h['loss'], 6) for h in logs]}; max abs "
              f"diff vs 1 process: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
        assert logs[0]["loss"] - logs[-1]["loss"] > 0.1
        for h, r in zip(logs, ref):
            assert abs(h["loss"] - r["loss"]) < TOL, (h["step"], h["loss"], r["loss"])
            assert abs(h["grad_norm"] - r["grad_norm"]) < TOL * max(1.0, r["grad_norm"]), \
                (h["step"], h["grad_norm"], r["grad_norm"])
            for name in METRICS:
                assert abs(h[name] - r[name]) < TOL, (h["step"], name, h[name], r[name])


def test_lm_head_is_sharded_outside_the_forward(fsdp_train):
    vocab = None
    for name, run in fsdp_train["runs"].items():
        facts = run["head_after_training"]  # one entry per rank
        assert len(facts) == 2, name
        shapes = [f["local_shape"] for f in facts]
        print(f"{name}: lm_head weight after training: {facts[0]['type']} of global shape "
              f"{facts[0]['global_shape']}, local shards {shapes}")
        vocab = facts[0]["global_shape"][0]
        for f in facts:
            assert f["type"] == "DTensor", (name, f)
            assert f["global_shape"] == facts[0]["global_shape"]
            assert 0 < f["local_shape"][0] < vocab, (name, f)
            assert f["local_shape"][1] == f["global_shape"][1]
        assert sum(s[0] for s in shapes) == vocab, (name, shapes)
    assert vocab is not None and vocab > 2


@pytest.mark.parametrize("key", BACKENDS)
def test_every_backend_and_schedule_matches_eager_under_fsdp2(reference, fsdp_backends, key):
    ref_t, t = reference["tensors"], fsdp_backends["tensors"]
    run = fsdp_backends["runs"][key]
    if "skipped" in run:  # the worker's interpreter_problem(): the Triton interpreter cannot run here
        pytest.skip(f"needs the Triton interpreter: {run['skipped']}")
    loss_diff = abs(run["loss"] - reference["eager"]["loss"])
    report = [f"loss {run['loss']:.7f} vs {reference['eager']['loss']:.7f} (diff {loss_diff:.1e})"]
    assert loss_diff < TOL_STEP
    for part in ("embed", "layer"):
        got, want = t[f"{key}/{part}"], ref_t[f"eager/{part}"]
        assert got.shape == want.shape and got.dtype == want.dtype
        scale = want.abs().max().item()
        rel = (got - want).abs().max().item() / scale
        report.append(f"{part} grad max diff / max |grad| {rel:.1e}")
        assert scale > 0 and rel < TOL_STEP, (key, part, rel)
    print(f"\n{key} ({run['seconds']:.2f} s): " + "; ".join(report))


def test_sharded_head_whose_group_never_runs_is_refused(fsdp_train):
    assert "head_alone_loss" not in fsdp_train, "a sharded head gave a loss instead of an error"
    errors = fsdp_train["head_alone_errors"]
    assert len(errors) == 2
    for e in errors:  # both ranks
        assert e is not None, "no error: simpo_loss accepted a still-sharded lm_head"
        print(f"\n{e['type']} from {e['raised_in']}:{e['function']}: {e['message']}")
        assert e["type"] == "TypeError", e
        assert "weight is a DTensor" in e["message"], e
        assert e["raised_in"].startswith("simpo_kernels"), e


def test_dcp_checkpoint_resume_matches_uninterrupted(reference, fsdp_checkpoint):
    saved, resumed = fsdp_checkpoint
    for name, run in saved["runs"].items():
        which = name.split("-")[0]
        full = [h["loss"] for h in run["logs"]]                       # A (B = its first 3 steps)
        ref = [h["loss"] for h in reference["runs"][f"{which}-accum1"]["logs"]]
        after = [h["loss"] for h in resumed["runs"][name]["logs"]]    # C: steps 4..6
        steps = [h["step"] for h in resumed["runs"][name]["logs"]]
        print(f"\n{name}: uninterrupted {full}\n{name}: resumed at 3  {after}\n"
              f"{name}: max diff resumed vs uninterrupted "
              f"{max(abs(a - b) for a, b in zip(after, full[3:])):.1e}, uninterrupted vs 1 "
              f"process {max(abs(a - b) for a, b in zip(full, ref)):.1e}")
        assert len(full) == len(ref) == CKPT_STEPS and steps == [4, 5, 6]
        assert resumed["runs"][name]["optimizer_steps_after_load"] == [3.0]
        assert full[0] - full[-1] > 0.1
        for a, b in zip(full, ref):
            assert abs(a - b) < TOL
        for a, b in zip(after, full[3:]):
            assert abs(a - b) < TOL_RESUME
