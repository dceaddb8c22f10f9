"""simpo-train's configuration: recipe (YAML) values and command-line values are read by the same
rules (types, choices), then checked for ranges and relations; every mistake is one ConfigError
naming the key (exit status 2, no traceback), found before any data or model is loaded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from simpo.config import ConfigError, parse_args  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recipe(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text("output_dir: out\n" + ("" if "use_cpu" in text else "use_cpu: true\n") + text)
    return str(path)


@pytest.mark.parametrize("text,key,value", [
    ('plot: "false"\n', "plot", False),
    ('plot: "no"\n', "plot", False),
    ("plot: false\n", "plot", False),
    ('disable_dropout: "no"\n', "disable_dropout", False),
    ('disable_dropout: "true"\n', "disable_dropout", True),
    ('use_cpu: "false"\n', "use_cpu", False),
    ("learning_rate: 8e-7\n", "learning_rate", 8e-7),   # YAML 1.1 reads this as a string
    ("beta: 5\n", "beta", 5.0),
    ("max_steps: 7\n", "max_steps", 7),
    ("warmup_ratio: 0.25\n", "warmup_steps", 0.25),     # the official recipes' older name
])
def test_recipe_values_are_read_as_the_command_line_reads_them(tmp_path, text, key, value):
    _, _, args, _ = parse_args([_recipe(tmp_path, text)])
    got = getattr(args, key)
    assert got == value and type(got) is type(value), (got, value)
    # and the same token on the command line gives the same value
    token = text.split(":", 1)[1].strip().strip('"')
    _, _, args, _ = parse_args([_recipe(tmp_path, ""), f"--{text.split(':')[0]}", token])
    assert getattr(args, key) == value


@pytest.mark.parametrize("text,message", [
    ("beta: true\n", "recipe.yaml: beta: invalid float value: 'true'"),
    ("beta: [1, 2]\n", "recipe.yaml: beta: expects a single value, got a list [1, 2]"),
    ("beta: null\n", "recipe.yaml: beta: null is not allowed here"),
    ("loss_backend: cuda\n",
     "recipe.yaml: loss_backend: invalid choice: 'cuda' (choose from 'auto', 'eager', 'torch', 'triton')"),
    ("truncation_mode: keep_middle\n",
     "recipe.yaml: truncation_mode: invalid choice: 'keep_middle' (choose from 'keep_end', 'keep_start')"),
    ("torch_dtype: float8\n", "recipe.yaml: torch_dtype: invalid choice: 'float8'"),
    ("max_steps: 5.7\n", "recipe.yaml: max_steps: invalid int value: '5.7'"),
    ("max_length: -5\n", "recipe.yaml: max_length: must be > 0, got -5"),
    ("max_prompt_length: 0\n", "recipe.yaml: max_prompt_length: must be > 0, got 0"),
    ("max_steps: 0\n", "max_steps: must be a positive number of steps, or -1"),
    ("per_device_train_batch_size: 0\n", "per_device_train_batch_size: must be > 0, got 0"),
    ("learning_rate: -1.0e-3\n", "learning_rate: must be a finite number >= 0, got -0.001"),
    ("learning_rate: .inf\n", "recipe.yaml: learning_rate: must be a finite number >= 0, got inf"),
    ("eval_fraction: 1.5\n", "eval_fraction: must be in [0, 1), got 1.5"),
    ("dataset_splits: [a, b, c]\n", "dataset_splits: must be a train split, then optionally"),
    ("tiny_hidden_size: 30\n", "tiny_hidden_size: must be a positive multiple of 8"),
    ("max_length: 64\nmax_prompt_length: 64\n", "max_prompt_length (64) must be smaller than max_length (64)"),
    ("existing_run: overwrite\n", "existing_run: invalid choice: 'overwrite'"),
    ("beta: [1,\nfoo: 2\n", "recipe.yaml: not valid YAML (line 3, column 1)"),
    ("- beta\n- 2\n", "a recipe must be a mapping of option: value"),
    ("bogus_key: 1\n", "unknown key(s) bogus_key"),
    ("warmup_ratio: 0.1\nwarmup_steps: 5\n", "both warmup_ratio and its replacement warmup_steps are set"),
    # PyYAML would keep the later value silently
    ("beta: 1.0\nsft_weight: 1.0\nbeta: 3.0\n", "recipe.yaml: beta is given twice (lines 1 and 3): keep one"),
    ("fsdp_config:\n  version: 2\n  version: 1\n", "recipe.yaml: version is given twice (lines 2 and 3)"),
])
def test_recipe_mistakes_are_config_errors_naming_the_key(tmp_path, text, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        parse_args([str(path), "--use_cpu", "true"])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("argv,message", [
    (["--beta", "true"], "beta: invalid float value: 'true'"),
    (["--loss_backend", "cuda"], "loss_backend: invalid choice: 'cuda'"),
    (["--max-step", "5"], "unknown option --max-step"),      # no argparse abbreviations
    (["--max_step", "5"], "unknown option --max_step"),
    (["--max_steps", "5.7"], "max_steps: invalid int value: '5.7'"),
    (["--max_length", "-3"], "max_length: must be > 0, got -3"),
    (["--save_steps", "50"],
     "save_steps=50 has no effect: save_strategy is 'no' (from recipe tiny.yaml); add --save_strategy steps"),
    (["--model_name_or_path", "/no/such/model"],
     "model_name_or_path: no such file or directory: /no/such/model"),
    (["--eval_steps", "5", "--eval_strategy", "no"],
     "eval_steps=5 has no effect: eval_strategy is 'no' (from the command line)"),
])
def test_command_line_mistakes_are_config_errors(argv, message):
    with pytest.raises(ConfigError) as info:
        parse_args([*argv, "--use_cpu", "true"])
    assert message in str(info.value)


def test_command_line_keys_are_recorded_and_save_steps_works_with_a_strategy():
    _, _, args, _ = parse_args(["--save_steps", "50", "--save_strategy", "steps", "--use_cpu", "true"])
    assert args.save_steps == 50 and args.save_strategy == "steps"
    assert args.command_line_keys == {"save_steps", "save_strategy", "use_cpu"}
    _, _, args, _ = parse_args(["--use_cpu", "true", "--max-steps", "4"])  # HF's dashed spelling
    assert args.max_steps == 4


def _cli(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "simpo.train", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **(env or {})))


def test_cli_config_errors_exit_2_without_traceback_and_debug_shows_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("truncation_mode: keep_middle\n")
    proc = _cli(str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "simpo-train: error: bad.yaml: truncation_mode: invalid choice: 'keep_middle' "
        "(choose from 'keep_end', 'keep_start')"]
    proc = _cli(str(bad), "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    proc = _cli(str(bad), env={"SIMPO_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_help_shows_the_recipes_effective_defaults_without_markup():
    proc = _cli("gemma-2-9b-it-simpo", "--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("usage: simpo-train [RECIPE | --config RECIPE] [--key value ...]")
    lr = " ".join(text[text.index("--learning_rate"):][:400].split())
    assert "(default: 8e-07)" in lr            # the recipe's value, not TrainingArguments' 5e-05
    assert "``" not in text and ":class:" not in text and ":obj:" not in text
    assert "defaults from recipe" in text and "gemma-2-9b-it-simpo.yaml" in text
    assert "--existing_run" in text and "--eval_fraction" in text and "--debug" in text


FSDP2_JSON = os.path.join(ROOT, "configs", "fsdp", "fsdp2.json")


def test_fsdp_activation_checkpointing_replaces_the_recipes_gradient_checkpointing(tmp_path):
    """configs/fsdp/fsdp2.json turns FSDP's activation checkpointing on; the published recipe sets
    gradient_checkpointing, which the Trainer refuses next to it: the recipe's is turned off."""
    recipe = _recipe(tmp_path, "gradient_checkpointing: true\n")
    _, _, args, _ = parse_args([recipe])
    assert args.trainer_checkpointing is True  # without FSDP it stays
    _, _, args, _ = parse_args([recipe, "--fsdp", "true", "--fsdp_config", FSDP2_JSON])
    assert args.fsdp_plugin_args["activation_checkpointing"] is True
    assert args.trainer_checkpointing is False
    assert set(_checkpointing_fields(args).values()) == {False}


def _checkpointing_fields(args) -> dict:
    """The Trainer's checkpointing switches this transformers has: ``gradient_checkpointing``
    always, ``activation_checkpointing`` only after 5.17 (the GPU image's 5.17 has no such field)."""
    names = [n for n in ("activation_checkpointing", "gradient_checkpointing") if hasattr(args, n)]
    assert "gradient_checkpointing" in names
    return {n: getattr(args, n) for n in names}


def test_trainer_checkpointing_reads_and_sets_the_field_this_transformers_has(tmp_path):
    """``SimPOConfig.trainer_checkpointing`` is the one switch the code reads and sets: on every
    transformers it reflects the recipe's gradient_checkpointing and turns off every field that
    names it (both where the newer ``activation_checkpointing`` exists, so neither is left on)."""
    _, _, args, _ = parse_args([_recipe(tmp_path, "gradient_checkpointing: true\n")])
    assert args.trainer_checkpointing is True
    assert set(_checkpointing_fields(args).values()) == {True}
    args.trainer_checkpointing = False
    assert set(_checkpointing_fields(args).values()) == {False}
    _, _, args, _ = parse_args([_recipe(tmp_path, "")])
    assert args.trainer_checkpointing is False


def test_fsdp_activation_checkpointing_from_accelerate_launch_env(tmp_path, monkeypatch):
    """accelerate launch --config_file configs/accelerate/fsdp2.yaml reaches the processes as
    ACCELERATE_USE_FSDP / FSDP_ACTIVATION_CHECKPOINTING."""
    recipe = _recipe(tmp_path, "gradient_checkpointing: true\n")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    _, _, args, _ = parse_args([recipe])
    assert args.trainer_checkpointing is False
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "false")
    _, _, args, _ = parse_args([recipe])
    assert args.trainer_checkpointing is True


@pytest.mark.parametrize("extra,message", [
    (["--gradient_checkpointing", "true"],
     "--gradient_checkpointing true and FSDP's activation_checkpointing both recompute"),
    (["--deepspeed", os.path.join(ROOT, "tests", "zero3_cpu.json")],
     "FSDP and DeepSpeed were both asked for"),
])
def test_fsdp_conflicts_are_config_errors(tmp_path, extra, message):
    with pytest.raises(ConfigError) as err:
        parse_args([_recipe(tmp_path, ""), "--fsdp", "true", "--fsdp_config", FSDP2_JSON, *extra])
    assert message in str(err.value)


def test_fsdp1_without_a_gpu_is_a_config_error(tmp_path, monkeypatch):
    """Only FSDP2 runs on CPU ranks; accelerate's FSDP1 plugin would fail with "no available
    devices" after the data were loaded. accelerate launch's FSDP_VERSION defaults to 1."""
    config = tmp_path / "fsdp1.json"
    config.write_text('{"version": 1}')
    with pytest.raises(ConfigError, match="FSDP on CPU ranks runs FSDP2 only; this run asks for FSDP1"):
        parse_args([_recipe(tmp_path, ""), "--fsdp", "true", "--fsdp_config", str(config)])
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="asks for FSDP1"):
        parse_args([_recipe(tmp_path, "")])
    monkeypatch.setenv("FSDP_VERSION", "2")
    parse_args([_recipe(tmp_path, "")])


def test_a_recipe_key_given_twice_is_refused_and_merge_keys_still_override(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("use_cpu: true\nbeta: 1.0\nlearning_rate: 1.0e-3\n\nbeta: 3.0\n")
    with pytest.raises(ConfigError) as info:
        parse_args([str(path)])
    assert str(info.value) == f"{path}: beta is given twice (lines 2 and 5): keep one"
    # a YAML merge key is an explicit override, not a repeated key
    path.write_text("use_cpu: true\nfsdp: true\nfsdp_config:\n  <<: {version: 1}\n  version: 2\n")
    _, _, args, _ = parse_args([str(path)])
    assert args.fsdp_plugin_args["fsdp_version"] == 2


BAD_JSON = "{bad"


@pytest.mark.parametrize("argv,message", [
    # files that TrainingArguments would open with a traceback, or (fsdp_config without fsdp) ignore
    (["--fsdp", "true", "--fsdp_config", "missing.json"], "fsdp_config: no such file: missing.json"),
    (["--fsdp_config", "missing.json"], "fsdp_config: no such file: missing.json"),
    (["--fsdp", "true", "--fsdp_config", "bad.json"],
     "fsdp_config: bad.json is not valid JSON (line 1, column 2): Expecting property name enclosed in double quotes"),
    (["--fsdp_config", FSDP2_JSON], "fsdp_config has no effect: fsdp is off; add --fsdp true"),
    (["--deepspeed", "missing.json"], "deepspeed: no such file: missing.json"),
    (["--deepspeed", "bad.json"],
     "deepspeed: bad.json is not valid JSON (line 1, column 2): Expecting property name enclosed in double quotes"),
    (["--deepspeed", "list.json"], "deepspeed: list.json must hold a JSON object, got a list"),
    (["--lr_scheduler_kwargs", BAD_JSON],
     "lr_scheduler_kwargs: the inline value is not valid JSON (line 1, column 2): Expecting property name "
     "enclosed in double quotes"),
    # integrations the Trainer would refuse once data and model are loaded
    (["--report_to", "tensorbord"],  # KNOWN: this transformers' integrations
     "report_to: unknown integration 'tensorbord' (known: KNOWN; or all, none)"),
    (["--report_to", "tensorboard"],  # the test makes tensorboard unavailable
     "report_to tensorboard: the tensorboard package is not installed (pip install tensorboard), or choose "
     "another integration (none: no reporting)"),
    (["--use_liger_kernel", "true"],
     "use_liger_kernel: not supported: Liger replaces the model's forward with its fused linear "
     "cross-entropy, which would bypass the SimPO loss head (that head already fuses lm_head and loss "
     "without materialising the logits, on every backend)"),
    # optimizer and schedule values: non-finite or out of range
    (["--adam_beta1", "1.5"], "adam_beta1: must be in [0, 1), got 1.5"),
    (["--adam_beta2", "1"], "adam_beta2: must be in [0, 1), got 1.0"),
    (["--adam_beta1", "-0.1"], "adam_beta1: must be in [0, 1), got -0.1"),
    (["--adam_epsilon", "0"], "adam_epsilon: must be a finite number > 0, got 0.0"),
    (["--adam_epsilon", "nan"], "adam_epsilon: must be a finite number > 0, got nan"),
    (["--learning_rate", "inf"], "learning_rate: must be a finite number >= 0, got inf"),
    (["--learning_rate", "nan"], "learning_rate: must be a finite number >= 0, got nan"),
    (["--weight_decay", "inf"], "weight_decay: must be a finite number >= 0, got inf"),
    (["--max_grad_norm", "nan"], "max_grad_norm: must be a finite number >= 0 (0 turns clipping off), got nan"),
    (["--max_grad_norm", "inf"], "max_grad_norm: must be a finite number >= 0 (0 turns clipping off), got inf"),
    (["--warmup_steps", "inf"],
     "warmup_steps: must be a finite number >= 0 (below 1: a fraction of the steps), got inf"),
    (["--num_train_epochs", "inf"], "num_train_epochs: must be a finite number >= 0, got inf"),
    (["--logging_steps", "inf"], "logging_steps: must be a finite number > 0, got inf"),
    (["--eval_delay", "-1"], "eval_delay: must be a finite number >= 0, got -1.0"),
    (["--neftune_noise_alpha", "nan"], "neftune_noise_alpha: must be a finite number > 0 (or unset), got nan"),
    (["--neftune_noise_alpha", "-1"], "neftune_noise_alpha: must be a finite number > 0 (or unset), got -1.0"),
    (["--label_smoothing_factor", "0.1"],
     "label_smoothing_factor (0.1) is transformers' cross-entropy smoothing, which the SimPO loss never uses: "
     "set label_smoothing (SimPO's, in [0, 0.5]) instead"),
    (["--eval_accumulation_steps", "0"], "eval_accumulation_steps: must be > 0, got 0"),
    (["--seed", "-1"], "seed: must be in [0, 2**32 - 1], got -1"),
    (["--dataloader_num_workers", "-1"], "dataloader_num_workers: must be >= 0, got -1"),
    # SimPO options
    (["--loss_chunk_size", "64", "--loss_schedule", "pairs"],
     "loss_chunk_size applies only to the torch backend's tokens schedule; this run has loss_backend auto "
     "(torch on CPU), loss_schedule pairs (pairs/vocab chunks follow loss_memory_budget)"),
    (["--loss_chunk_size", "64", "--loss_backend", "eager"],
     "loss_chunk_size applies only to the torch backend's tokens schedule; this run has loss_backend eager, "
     "loss_schedule auto (pairs/vocab chunks follow loss_memory_budget)"),
    (["--padding_value", "-1"], "padding_value: must be a token id >= 0 (or unset), got -1"),
    (["--label_pad_token_id", "5"], "label_pad_token_id: must be negative (no token has this id), got 5"),
    (["--chat_template", "chatml"], "chat_template: 'chatml' is neither a template name (gemma, tokenizer) nor a Jinja template"),
    (["--chat_template", "None"],
     "chat_template: 'None' is not a template; for the tokenizer's own, leave chat_template unset or set it "
     "to 'tokenizer' (--chat_template tokenizer)"),
    (["--chat_template", "{{ messages"],
     "chat_template: not a valid Jinja template (line 1): unexpected end of template, expected 'end of print "
     "statement'."),
])
def test_cli_mistakes_are_one_line_exit_2_before_anything_is_loaded(tmp_path, monkeypatch, capsys, argv,
                                                                     message):
    """Each was a traceback (some after the data and the model were loaded), or silently ignored."""
    import transformers.integrations.integration_utils as integrations

    import simpo.train

    (tmp_path / "bad.json").write_text(BAD_JSON)
    (tmp_path / "list.json").write_text("[1]")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(integrations, "is_tensorboard_available", lambda: False)
    monkeypatch.setattr(simpo.train, "run", lambda *a, **k: pytest.fail("parse_args accepted it"))
    rc = simpo.train.main([*argv, "--output_dir", str(tmp_path / "out")])
    message = message.replace("KNOWN", ", ".join(sorted(integrations.INTEGRATION_TO_CALLBACK)))
    assert (rc, capsys.readouterr().err) == (2, f"simpo-train: error: {message}\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [
    ["--loss_chunk_size", "64"],                            # auto: the torch backend's tokens schedule
    ["--loss_chunk_size", "64", "--loss_schedule", "tokens", "--loss_backend", "torch"],
    ["--chat_template", "gemma"],
    ["--chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}"],
    ["--deepspeed", os.path.join(ROOT, "tests", "zero3_cpu.json")],
    ["--adam_beta1", "0", "--adam_beta2", "0.95", "--max_grad_norm", "0", "--neftune_noise_alpha", "5"],
    ["--report_to", "none"],
])
def test_valid_values_next_to_the_refused_ones_are_accepted(argv):
    parse_args([*argv, "--use_cpu", "true"])


def test_a_padding_value_the_tokenizer_lacks_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import simpo.train

    monkeypatch.setattr(simpo.train, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    rc = simpo.train.main(["--padding_value", "100000", "--output_dir", str(tmp_path / "out"),
                           "--max_train_samples", "8", "--max_eval_samples", "8"])
    # the last stderr line: datasets may print its progress bars first (when its cache is cold)
    err = capsys.readouterr().err.splitlines()[-1]
    # the embedded tokenizer is built from the words of the rows kept (8 + 8 of the shipped data)
    assert (rc, err) == (2, "simpo-train: error: padding_value: 100000 is not a token id of this "
                            "tokenizer (its vocabulary has 78 ids: 0..77)")
    assert not os.path.exists(tmp_path / "out" / ".simpo-train.lock")


@pytest.fixture
def torch_threads():
    """Restores torch's thread count after a test that changes it."""
    import torch

    before = torch.get_num_threads()
    yield torch
    torch.set_num_threads(before)


def test_the_embedded_tiny_model_runs_on_one_thread_unless_omp_num_threads_says(torch_threads, monkeypatch,
                                                                              caplog):
    """On a busy machine more threads only wait for each other on the tiny model's matrices."""
    import logging

    from simpo.train import choose_cpu_threads

    caplog.set_level(logging.INFO, logger="simpo.train")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    model_args, _, args, _ = parse_args([])  # the embedded default: tiny model, use_cpu
    torch_threads.set_num_threads(2)
    choose_cpu_threads(model_args, args)
    assert torch_threads.get_num_threads() == 1
    assert caplog.messages[-1] == ("torch threads: 1 (the embedded tiny model gains nothing from more; set "
                                   "OMP_NUM_THREADS to choose)")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice stands
    torch_threads.set_num_threads(2)
    choose_cpu_threads(model_args, args)
    assert torch_threads.get_num_threads() == 2
    assert caplog.messages[-1] == "torch threads: 2 (from OMP_NUM_THREADS)"
    monkeypatch.delenv("OMP_NUM_THREADS")
    model_args.model_name_or_path = "org/some-real-model"  # not the tiny model: torch's default
    n = len(caplog.messages)
    choose_cpu_threads(model_args, args)
    assert torch_threads.get_num_threads() == 2 and len(caplog.messages) == n


# ----------------------------------------------------------------------------- --loss and its options

def _loss_defaults(name):
    from simpo_kernels import LOSSES

    return dict(LOSSES[name].defaults)


@pytest.mark.parametrize("loss", ["simpo", "dpo", "rdpo", "cpo", "orpo", "rrhf", "slic"])
def test_each_loss_takes_its_own_defaults_for_unset_options(tmp_path, loss):
    """An option left unset takes the chosen loss's default (dpo beta 0.1, simpo beta 2.0); the
    options the loss does not have stay unset; logit_metrics and precompute_ref_log_probs default
    to the loss's official choice."""
    from simpo.config import LOSS_OPTION_FIELDS
    from simpo_kernels import LOSSES

    _, _, args, _ = parse_args([_recipe(tmp_path, ""), "--loss", loss])
    defaults = _loss_defaults(loss)
    assert args.loss_options == defaults
    assert all(getattr(args, k) is None for k in LOSS_OPTION_FIELDS if k not in defaults)
    assert args.logit_metrics == ("targets" if loss in ("dpo", "rdpo") else "exact")
    assert args.precompute_ref_log_probs is (True if loss in ("dpo", "rdpo") else None)
    assert args.needs_reference is LOSSES[loss].needs_reference
    assert (args.beta == 2.0) if loss == "simpo" else (args.beta in (None, 0.1))


def test_loss_names_and_loss_types_cover_the_library():
    from simpo.config import LOSS_NAMES, LOSS_OPTION_FIELDS, LOSS_TYPES
    from simpo_kernels import LOSSES

    assert set(LOSS_NAMES) == set(LOSSES)
    assert {t for cls in LOSSES.values() for t in cls.loss_types} == set(LOSS_TYPES)
    assert {k for cls in LOSSES.values() for k in cls.defaults} == set(LOSS_OPTION_FIELDS)


@pytest.mark.parametrize("argv,value", [
    (["--loss", "dpo", "--beta", "0.01", "--loss_type", "ipo"], dict(beta=0.01, loss_type="ipo")),
    (["--loss", "dpo", "--rpo_alpha", "0.5"], dict(rpo_alpha=0.5, beta=0.1)),
    (["--loss", "rdpo", "--alpha", "0.2"], dict(alpha=0.2, beta=0.1)),
    (["--loss", "cpo", "--loss_type", "simpo", "--simpo_gamma", "0.7", "--cpo_alpha", "0"],
     dict(loss_type="simpo", simpo_gamma=0.7, cpo_alpha=0.0)),
    (["--loss", "slic", "--delta", "2", "--nll_weight", "0.5"], dict(delta=2.0, nll_weight=0.5)),
    (["--loss", "orpo", "--beta", "0.25"], dict(beta=0.25)),
    (["--loss", "dpo", "--precompute_ref_log_probs", "false"], dict()),
])
def test_loss_options_from_the_command_line(tmp_path, argv, value):
    _, _, args, _ = parse_args([_recipe(tmp_path, ""), *argv])
    for k, v in value.items():
        assert args.loss_options[k] == v, k
    if "--precompute_ref_log_probs" in argv:
        assert args.precompute_ref_log_probs is False


@pytest.mark.parametrize("text,argv,message", [
    ("", ["--loss", "dpo", "--gamma_beta_ratio", "0.5"],
     "gamma_beta_ratio: not an option of loss dpo (its options: beta, label_smoothing, loss_type, "
     "rpo_alpha)"),
    ("", ["--sft_weight", "1"], None),  # simpo has it
    ("", ["--loss", "simpo", "--rpo_alpha", "1"], "rpo_alpha: not an option of loss simpo"),
    ("", ["--loss", "orpo", "--label_smoothing", "0.1"], "label_smoothing: not an option of loss orpo"),
    ("", ["--loss", "rrhf", "--beta", "1"], "beta: not an option of loss rrhf (its options: nll_weight)"),
    ("loss: dpo\nalpha: 0.1\n", [], "recipe.yaml: alpha: not an option of loss dpo"),
    ("", ["--loss", "dpo", "--loss_type", "simpo"],
     "loss_type: 'simpo' is not a loss_type of loss dpo (choose from sigmoid, hinge, ipo, robust, "
     "sigmoid_norm)"),
    ("", ["--loss_type", "ipo"], "loss_type: 'ipo' is not a loss_type of loss simpo (choose from "
                                 "sigmoid, hinge)"),
    ("", ["--loss", "cpo", "--loss_type", "robust"], "loss_type: 'robust' is not a loss_type of loss cpo"),
    ("", ["--loss_type", "bogus"], "loss_type: invalid choice: 'bogus'"),
    ("", ["--loss", "kto"], "loss: invalid choice: 'kto'"),
    ("", ["--loss", "dpo", "--beta", "0"], "loss dpo: beta must be > 0, got 0.0"),
    ("", ["--beta", "-1"], "beta"),  # simpo's own checks
    ("", ["--loss", "orpo", "--precompute_ref_log_probs", "true"],
     "precompute_ref_log_probs: loss orpo uses no reference model"),
    ("", ["--precompute_ref_batch_size", "4"], "precompute_ref_batch_size: loss simpo uses no reference"),
    ("", ["--loss", "dpo", "--precompute_ref_batch_size", "0"], "precompute_ref_batch_size: must be > 0"),
    ("", ["--ref_model_name_or_path", "org/model"],
     "ref_model_name_or_path: loss simpo uses no reference model"),
    ("", ["--loss", "dpo", "--ref_model_name_or_path", "./no/such/dir"],
     "ref_model_name_or_path: no such file or directory: ./no/such/dir"),
])
def test_loss_option_mistakes_are_one_line_config_errors(tmp_path, text, argv, message):
    recipe = _recipe(tmp_path, text)
    if message is None:
        parse_args([recipe, *argv])
        return
    with pytest.raises(ConfigError) as info:
        parse_args([recipe, *argv])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_another_loss_than_the_recipes_points_at_a_recipe_for_it():
    """`simpo-train --loss dpo` on the tiny (SimPO) recipe: its gamma_beta_ratio is not a dpo
    option; the error names the recipe's loss and the packaged recipes for dpo."""
    with pytest.raises(ConfigError) as info:
        parse_args(["--loss", "dpo"])
    text = str(info.value)
    assert text.startswith("tiny.yaml: gamma_beta_ratio: not an option of loss dpo")
    assert "the recipe's loss options are for loss simpo" in text
    assert "gemma-2-9b-it-dpo" in text and "tiny-dpo" in text


def test_dpo_recipes_are_the_simpo_ones_but_for_the_loss():
    """recipes/gemma-2-9b-it-dpo.yaml: official Gemma DPO (beta 0.01, lr 5e-7), everything else as
    the SimPO recipe; tiny-dpo: the embedded default with DPO (+ RPO's NLL term, as tiny's SFT)."""
    import yaml

    from simpo.config import RECIPES_DIR

    _, _, dpo, _ = parse_args(["gemma-2-9b-it-dpo", "--bf16", "false", "--use_cpu", "true"])
    assert (dpo.loss, dpo.beta, dpo.learning_rate, dpo.loss_type) == ("dpo", 0.01, 5e-7, "sigmoid")
    assert dpo.precompute_ref_log_probs is True and dpo.rpo_alpha == 0.0
    load = lambda name: yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())  # noqa: E731
    simpo, dpo_recipe = load("gemma-2-9b-it-simpo"), load("gemma-2-9b-it-dpo")
    differ = {k for k in set(simpo) | set(dpo_recipe) if simpo.get(k) != dpo_recipe.get(k)}
    assert differ == {"loss", "beta", "gamma_beta_ratio", "sft_weight", "rpo_alpha",
                      "precompute_ref_log_probs", "logit_metrics", "learning_rate", "output_dir",
                      "run_name"}
    tiny, tiny_dpo = load("tiny"), load("tiny-dpo")
    differ = {k for k in set(tiny) | set(tiny_dpo) if tiny.get(k) != tiny_dpo.get(k)}
    assert differ == {"loss", "beta", "gamma_beta_ratio", "sft_weight", "rpo_alpha",
                      "precompute_ref_log_probs", "output_dir"}
    # the top-level recipes/ is the package's directory (one copy)
    assert os.path.samefile(os.path.join(ROOT, "recipes"), RECIPES_DIR)
