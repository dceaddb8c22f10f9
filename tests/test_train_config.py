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
    ("learning_rate: -1.0e-3\n", "learning_rate: must be >= 0, got -0.001"),
    ("eval_fraction: 1.5\n", "eval_fraction: must be in [0, 1), got 1.5"),
    ("dataset_splits: [a, b, c]\n", "dataset_splits: must be a train split, then optionally"),
    ("tiny_hidden_size: 30\n", "tiny_hidden_size: must be a positive multiple of 8"),
    ("max_length: 64\nmax_prompt_length: 64\n", "max_prompt_length (64) must be smaller than max_length (64)"),
    ("existing_run: overwrite\n", "existing_run: invalid choice: 'overwrite'"),
    ("beta: [1,\nfoo: 2\n", "recipe.yaml: not valid YAML (line 3, column 1)"),
    ("- beta\n- 2\n", "a recipe must be a mapping of option: value"),
    ("bogus_key: 1\n", "unknown key(s) bogus_key"),
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
    (["--max-step", "5"], "unknown option(s) --max-step"),      # no argparse abbreviations
    (["--max_step", "5"], "unknown option(s) --max_step"),
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
    assert text.startswith("usage: simpo-train [RECIPE] [--key value ...]")
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
    assert args.activation_checkpointing is True  # without FSDP it stays
    _, _, args, _ = parse_args([recipe, "--fsdp", "true", "--fsdp_config", FSDP2_JSON])
    assert args.fsdp_plugin_args["activation_checkpointing"] is True
    assert args.activation_checkpointing is False and args.gradient_checkpointing is False


def test_fsdp_activation_checkpointing_from_accelerate_launch_env(tmp_path, monkeypatch):
    """accelerate launch --config_file configs/accelerate/fsdp2.yaml reaches the processes as
    ACCELERATE_USE_FSDP / FSDP_ACTIVATION_CHECKPOINTING."""
    recipe = _recipe(tmp_path, "gradient_checkpointing: true\n")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    _, _, args, _ = parse_args([recipe])
    assert args.activation_checkpointing is False
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "false")
    _, _, args, _ = parse_args([recipe])
    assert args.activation_checkpointing is True


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
