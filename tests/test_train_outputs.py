"""What a run leaves behind: the released model (use_cache back on), its model card, the push to
the Hub (intercepted at huggingface_hub's create_repo / upload_folder: no network here), the
training curves, and evaluation-only runs (do_train false)."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import yaml

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import simpo.train  # noqa: E402
from simpo.config import ConfigError, parse_args  # noqa: E402
from simpo.plotting import curve_points, plot_training_curves, training_figure  # noqa: E402
from simpo.release import UPLOAD_IGNORE  # noqa: E402

TINY = ["--tiny_hidden_size", "32", "--tiny_num_layers", "1", "--max_train_samples", "16",
        "--max_eval_samples", "8", "--use_cpu", "true", "--report_to", "none",
        "--disable_tqdm", "true"]
# timings and the like, which differ between two evaluations of the same model
VOLATILE = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
            "eval_model_preparation_time", "epoch")


class FakeHub:
    """huggingface_hub.HfApi's create_repo and upload_folder, recording what they were asked to
    do: for each upload, the files that would go (huggingface_hub's own pattern filter) and the
    model card as it was at that moment."""

    def __init__(self):
        self.repos, self.uploads = [], []

    def create_repo(self, api, repo_id, token=None, private=None, exist_ok=False, **kwargs):
        from huggingface_hub import RepoUrl

        self.repos.append(dict(repo_id=repo_id, token=token, private=private, exist_ok=exist_ok))
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")

    def upload_folder(self, api, *, repo_id, folder_path, path_in_repo=None, commit_message=None,
                      allow_patterns=None, ignore_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        names = sorted(os.path.relpath(os.path.join(d, f), folder_path).replace(os.sep, "/")
                       for d, _, files in os.walk(folder_path) for f in files)
        files = list(filter_repo_objects(names, allow_patterns=allow_patterns,
                                         ignore_patterns=ignore_patterns))
        card = os.path.join(folder_path, "README.md")
        self.uploads.append(dict(
            repo_id=repo_id, folder=folder_path, path_in_repo=path_in_repo,
            message=commit_message, files=files, kwargs=kwargs,
            card=open(card).read() if "README.md" in files else None))
        return "commit"


def _run(argv) -> int:
    return simpo.train.main(argv)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 2-step tiny run, a checkpoint per step, evaluated at the end (with completions logged),
    pushed to the Hub (hub_model_id unset: the repo is named after output_dir, as the Trainer
    does)."""
    from huggingface_hub import HfApi

    out = tmp_path_factory.mktemp("run") / "tiny-simpo-out"
    hub = FakeHub()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HfApi, "create_repo", lambda api, *a, **k: hub.create_repo(api, *a, **k))
        mp.setattr(HfApi, "upload_folder", lambda api, **k: hub.upload_folder(api, **k))
        rc = _run([*TINY, "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "steps",
                   "--save_steps", "1", "--push_to_hub", "true", "--hub_private_repo", "true",
                   "--hub_token", "hf_secret", "--log_completions", "true",
                   "--log_completions_prompts", "2", "--log_completions_max_new_tokens", "4",
                   "--output_dir", str(out)])
    assert rc == 0
    return out, hub


def _json(path):
    with open(path) as f:
        return json.load(f)


def test_the_saved_model_generates_with_its_kv_cache(trained):
    from transformers import AutoModelForCausalLM

    out, _ = trained
    assert _json(out / "config.json")["use_cache"] is True
    assert _json(out / "generation_config.json")["use_cache"] is True
    assert AutoModelForCausalLM.from_pretrained(out).config.use_cache is True


def _front_matter(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    meta, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(meta), body


def test_the_model_card_states_the_run(trained):
    from simpo.release import _value

    out, _ = trained
    meta, body = _front_matter((out / "README.md").read_text())
    assert meta["library_name"] == "transformers"
    assert {"simpo", "simpo-kernels"} <= set(meta["tags"])
    assert "base_model" not in meta  # the tiny model is on no hub
    assert meta["model_name"] == "me/tiny-simpo-out"
    train, evals = _json(out / "train_results.json"), _json(out / "eval_results.json")
    assert f"| train_loss | {_value(train['train_loss'])} |" in body
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_samples"):
        assert f"| {key} | {_value(evals[key])} |" in body
    assert "- train split `train`: 16 pairs" in body and "- eval split `test`: 8 pairs" in body
    for row in ("| beta | 2 |", "| gamma_beta_ratio | 0.5 |", "| max_steps | 2 |",
                "| global_batch_size | 8 |"):
        assert row in body
    assert "Trained for 2 optimizer steps." in body
    assert "@inproceedings{meng2024simpo," in body
    assert "![training curves](training_curves.png)" in body
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-simpo-out")' in body
    import transformers

    assert f"- transformers: {transformers.__version__}" in body


def test_push_to_hub_uploads_each_published_checkpoint_and_the_release(trained):
    out, hub = trained
    # hub_model_id unset: named after output_dir, created once, private as asked
    assert hub.repos == [dict(repo_id="tiny-simpo-out", token="hf_secret", private=True,
                              exist_ok=True)]
    assert [u["message"] for u in hub.uploads] == [
        "Training in progress, step 1", "Training in progress, step 2", "End of training"]
    for step, upload in zip((1, 2), hub.uploads):
        # the published checkpoint (not its staging copy, renamed away right after), model files only
        assert upload["folder"] == str(out / f"checkpoint-{step}")
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(upload["files"])
        assert "optimizer.pt" not in upload["files"] and "simpo_checkpoint.json" not in upload["files"]
    final = hub.uploads[-1]
    assert final["repo_id"] == "me/tiny-simpo-out" and final["folder"] == str(out)
    assert final["kwargs"]["token"] == "hf_secret"
    assert {"README.md", "model.safetensors", "config.json", "tokenizer.json", "eval_results.json",
            "train_results.json", "training_curves.png", "completions.jsonl"} <= set(final["files"])
    # never the checkpoints, the run configuration (its command line holds the token), the lock
    assert not [f for f in final["files"] if f.startswith(("checkpoint-", "simpo_", ".simpo"))]
    # nor the pickled arguments, which hold the hub_token given
    assert "training_args.bin" not in final["files"] and (out / "training_args.bin").is_file()
    assert os.path.isdir(out / "checkpoint-2") and os.path.isfile(out / "simpo_run_config.json")
    assert final["card"] == (out / "README.md").read_text()  # the card was written before the push
    assert final["kwargs"]["revision"] is None


@pytest.mark.parametrize("strategy,extra", [
    ("checkpoint", "last-checkpoint"), ("all_checkpoints", "checkpoint-2"), ("end", None)])
def test_hub_strategies_push_a_published_checkpoint(trained, monkeypatch, strategy, extra):
    import types

    from huggingface_hub import HfApi

    from simpo.release import push_checkpoint

    out, _ = trained
    hub = FakeHub()
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **k: hub.upload_folder(api, **k))
    args = types.SimpleNamespace(hub_strategy=strategy, save_strategy="steps", hub_token="t",
                                 hub_revision=None)
    push_checkpoint("me/x", str(out / "checkpoint-2"), args, step=2, epoch=1.0)
    if extra is None:
        assert hub.uploads == []
        return
    root, whole = hub.uploads
    assert root["path_in_repo"] is None and "optimizer.pt" not in root["files"]
    assert whole["path_in_repo"] == extra and whole["message"] == "Training in progress, step 2, checkpoint"
    assert {"optimizer.pt", "model.safetensors", "trainer_state.json"} <= set(whole["files"])
    assert "training_args.bin" not in whole["files"]  # it holds the hub_token


def test_the_plot_has_loss_lr_accuracy_and_margin_panels(trained):
    import matplotlib.pyplot as plt

    out, _ = trained
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = _json(out / "trainer_state.json")["log_history"]
    fig = training_figure(history, title="DPO training")
    try:
        assert [t.get_text() for t in fig.texts] == ["DPO training"]  # the run's loss names it
        titles = [ax.get_title() for ax in fig.axes]
        assert titles == ["loss", "learning rate", "reward accuracy", "reward margin"]
        loss_ax, lr_ax = fig.axes[0], fig.axes[1]
        lines = {line.get_label(): line for line in loss_ax.lines}
        assert list(lines["train"].get_xdata()) == [1, 2]
        assert list(lines["train"].get_ydata()) == [h["loss"] for h in history if "loss" in h]
        assert list(lines["eval"].get_ydata()) == [h["eval_loss"] for h in history
                                                  if "eval_loss" in h]
        assert list(lr_ax.lines[0].get_ydata()) == [h["learning_rate"] for h in history
                                                   if "learning_rate" in h]
    finally:
        plt.close(fig)


def test_completions_are_the_saved_models_greedy_continuations_of_the_first_eval_prompts(trained):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from simpo.config import DataArguments
    from simpo.data import load_splits

    out, _ = trained
    lines = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 2]  # one evaluation (the final one), 2 prompts
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    rows = load_splits(DataArguments(max_eval_samples=8)).eval
    for line, row in zip(lines, rows):
        assert row["chosen"][0]["content"] in line["prompt"]  # the eval split's order
        ids = tok(line["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        assert line["completion"] == tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)


def test_nothing_logged_writes_no_plot(tmp_path, caplog):
    summary_only = [{"step": 2, "epoch": 1.0, "train_loss": 0.7, "train_runtime": 1.0}]
    assert not any(curve_points(summary_only).values())
    with caplog.at_level("INFO", logger="simpo.plotting"):
        assert plot_training_curves(summary_only, tmp_path / "c.png") is None
    assert not (tmp_path / "c.png").exists()
    assert "nothing was logged" in caplog.text


def _eval_metrics(path) -> dict:
    return {k: v for k, v in _json(path).items() if k not in VOLATILE}


def test_evaluate_only_gives_the_training_runs_final_eval_and_writes_nothing_else(trained, tmp_path):
    out, _ = trained
    # in a fresh output_dir: eval_results.json alone, with the training run's final numbers
    fresh = tmp_path / "eval"
    assert _run([*TINY, "--do_train", "false", "--model_name_or_path", str(out),
                 "--output_dir", str(fresh)]) == 0
    assert os.listdir(fresh) == ["eval_results.json"]
    got, want = _eval_metrics(fresh / "eval_results.json"), _eval_metrics(out / "eval_results.json")
    assert got.keys() == want.keys() and got["eval_samples"] == 8
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key
    # a later training run there starts as in an empty output_dir: no run was recorded
    from simpo.run_dir import resolve_start

    assert resolve_start(str(fresh), {"training": {"max_steps": 2}}) is None

    # in the training run's own output_dir (a copy): nothing moved, refused or written but
    # eval_results.json
    again = tmp_path / "again"
    shutil.copytree(out, again)
    before = {p: os.path.getmtime(os.path.join(again, p)) for p in os.listdir(again)}
    assert _run([*TINY, "--do_train", "false", "--model_name_or_path", str(out),
                 "--output_dir", str(again)]) == 0
    after = {p: os.path.getmtime(os.path.join(again, p)) for p in os.listdir(again)}
    assert after.keys() == before.keys()
    assert [p for p in after if after[p] != before[p]] == ["eval_results.json"]


def test_evaluate_only_with_a_reference_model(tmp_path, capsys):
    # dpo on the untrained tiny model: the reference is the policy, so every reward is 0 exactly
    out = tmp_path / "dpo"
    assert _run(["tiny-dpo", *TINY, "--do_train", "false", "--output_dir", str(out)]) == 0
    metrics = _json(out / "eval_results.json")
    assert os.listdir(out) == ["eval_results.json"]  # the reference log-probs are not cached
    assert metrics["eval_rewards/chosen"] == 0.0 and metrics["eval_rewards/margins"] == 0.0
    _, _, args, _ = parse_args(["tiny-dpo", "--output_dir", str(out), "--use_cpu", "true"])
    # -log sigmoid(0) plus the recipe's RPO term (rpo_alpha x the chosen rows' NLL)
    assert metrics["eval_loss"] == pytest.approx(
        math.log(2) + args.rpo_alpha * metrics["eval_nll_loss"], abs=1e-5)
    assert "evaluated only (do_train false): 8 pairs" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--do_train", "false", "--do_eval", "false"], "do_train false and do_eval false: nothing to do"),
    (["--do_eval", "false", "--eval_strategy", "steps"], "asks for evaluation but do_eval is false"),
    (["--do_eval", "false", "--eval_steps", "5"], "eval_steps has no effect: do_eval is false"),
    (["--do_train", "false", "--push_to_hub", "true"], "push_to_hub: do_train false evaluates only"),
    (["--do_train", "false", "--resume_from_checkpoint", "x"], "pass it as --model_name_or_path"),
    (["--do_train", "false", "--max_steps", "5"], "max_steps has no effect: do_train false"),
    (["--do_train", "false", "--existing_run", "fresh"], "existing_run has no effect"),
    (["--log_completions_prompts", "2"], "has no effect: log_completions is off"),
    (["--log_completions", "true", "--do_eval", "false"], "log_completions: completions are logged"),
    (["--hub_model_id", "me/x"], "hub_model_id has no effect: push_to_hub is off"),
    (["--hub_strategy", "checkpoint"], "hub_strategy has no effect: push_to_hub is off"),
])
def test_option_combinations_that_would_do_nothing_are_refused(tmp_path, argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args([*argv, "--output_dir", str(tmp_path), "--use_cpu", "true"])


def test_do_train_and_do_eval_defaults(tmp_path):
    base = ["--output_dir", str(tmp_path), "--use_cpu", "true"]
    _, _, args, _ = parse_args(base)
    assert args.do_train is True and args.do_eval is None  # trains; evaluates when it has data
    _, _, args, _ = parse_args([*base, "--do_eval", "false"])
    assert args.eval_strategy == "no"  # no evaluation at all
    _, _, args, _ = parse_args([*base, "--do_train", "false", "--do_eval"])
    assert args.do_train is False and args.do_eval is True


def test_do_eval_false_trains_without_any_evaluation(tmp_path):
    out = tmp_path / "out"
    argv = [a for a in TINY if a not in ("--max_eval_samples", "8")]
    assert _run([*argv, "--max_steps", "2", "--logging_steps", "1", "--do_eval", "false",
                 "--output_dir", str(out)]) == 0
    history = _json(out / "trainer_state.json")["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2]
    assert not [h for h in history if any(k.startswith("eval_") for k in h)]
    assert not (out / "eval_results.json").exists()
    assert not [k for k in _json(out / "all_results.json") if k.startswith("eval_")]
    assert "- no evaluation (do_eval false)" in (out / "README.md").read_text()


def test_evaluate_only_without_an_eval_split_is_one_line(tmp_path, capsys):
    rc = _run([*TINY, "--do_train", "false", "--dataset_splits", "train",
               "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert "do_train false evaluates only, but the data has no eval split" in err
    assert not os.path.exists(tmp_path / "out" / "eval_results.json")


def test_upload_ignore_keeps_the_run_bookkeeping_out():
    from huggingface_hub.utils import filter_repo_objects

    names = ["README.md", "model.safetensors", "checkpoint-4/model.safetensors",
             ".simpo-train.lock", ".simpo-staging/checkpoint-5/x", "simpo_run_config.json",
             "simpo_ref_logps.pt", "superseded-20260101T000000Z/model.safetensors",
             "runs/events.out", "completions.jsonl"]
    assert list(filter_repo_objects(names, ignore_patterns=UPLOAD_IGNORE)) == [
        "README.md", "model.safetensors", "runs/events.out", "completions.jsonl"]


def test_a_failed_push_is_one_line_after_a_complete_run(tmp_path, capsys, monkeypatch):
    from huggingface_hub import HfApi

    hub = FakeHub()

    def refuse(api, **kwargs):
        raise OSError("403 Forbidden: no write access")

    monkeypatch.setattr(HfApi, "create_repo", lambda api, *a, **k: hub.create_repo(api, *a, **k))
    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    out = tmp_path / "out"
    rc = _run([*TINY, "--max_steps", "1", "--push_to_hub", "true", "--hub_model_id", "org/name",
               "--hub_strategy", "end", "--output_dir", str(out)])
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bars: one line
    assert rc == 1 and err.startswith("simpo-train: error: "), err
    assert "the push to the Hub repo org/name failed: 403 Forbidden: no write access" in err
    assert "hf upload org/name" in err
    assert hub.repos[0]["repo_id"] == "org/name"
    # the run itself is complete and recorded as finished: a rerun has nothing left to train
    assert (out / "README.md").is_file() and (out / "simpo_run_finished.json").is_file()
    assert 'from_pretrained("org/name")' in (out / "README.md").read_text()
