"""simpo-train's command line as TRL / alignment-handbook users type it: ``--config RECIPE`` as the
positional recipe, the chat template a run uses (the model's own unless one is named), and a
``--help`` that lists the project's options first, in groups, with switches that read right.
In-process (parse_args, help_text, load_tokenizer): no training run."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from simpo.config import ConfigError, help_text, parse_args  # noqa: E402

CPU = ["--use_cpu", "true", "--bf16", "false"]  # the gemma recipe's bf16 needs a GPU


# ----------------------------------------------------------------------------- --config RECIPE

def _recipe(tmp_path, text: str = "", name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text("output_dir: out\nuse_cpu: true\n" + text)
    return str(path)


@pytest.mark.parametrize("form", ["positional", "--config", "--config="])
def test_config_is_the_positional_recipe(tmp_path, form):
    """`--config FILE` / `--config=FILE` anywhere on the line reads the same recipe, with the same
    command-line overrides, as `simpo-train FILE`."""
    recipe = _recipe(tmp_path, "beta: 7.0\nmax_steps: 11\n")
    overrides = ["--gamma_beta_ratio", "0.3", "--output_dir", str(tmp_path / "run")]
    argv = {"positional": [recipe, *overrides],
            "--config": [*overrides[:2], "--config", recipe, *overrides[2:]],
            "--config=": [*overrides, f"--config={recipe}"]}[form]
    model_args, data_args, args, path = parse_args(argv)
    assert str(path) == recipe
    assert (args.beta, args.max_steps, args.gamma_beta_ratio) == (7.0, 11, 0.3)
    assert args.output_dir == str(tmp_path / "run")
    assert args.command_line_keys == {"gamma_beta_ratio", "output_dir"}  # --config is no option


def test_config_takes_a_packaged_recipe_name():
    _, _, args, path = parse_args(["--config", "gemma-2-9b-it-simpo", *CPU])
    assert path.name == "gemma-2-9b-it-simpo.yaml"
    assert (args.beta, args.learning_rate, args.max_length) == (10.0, 8e-7, 2048)


@pytest.mark.parametrize("argv,message", [
    (["tiny", "--config", "tiny-dpo"],
     "the recipe is given twice (tiny and tiny-dpo): give it once, as the first argument or as "
     "--config FILE"),
    (["--config", "tiny", "--config=tiny"], "the recipe is given twice (tiny and tiny)"),
    (["--config"], "--config needs a value: a recipe file or packaged recipe name"),
    (["--config", "--beta", "3"], "--config needs a value"),
    (["--config="], "--config needs a value"),
    (["--config", "no-such-recipe"], "recipe 'no-such-recipe' is neither a file nor a packaged recipe"),
    (["--recipe", "x.yaml"],
     "unknown option --recipe (the recipe is the first argument or --config FILE; see simpo-train --help)"),
    (["--config_file", "x.yaml", "--beta_x", "1"],
     "unknown options --config_file --beta_x (the recipe is the first argument or --config FILE"),
    # a recipe after an option is not the recipe: say where it goes
    (["--beta", "3", "tiny"], "unknown option tiny (the recipe is the first argument or --config FILE"),
])
def test_config_mistakes_are_one_line_config_errors(argv, message):
    with pytest.raises(ConfigError) as info:
        parse_args([*argv, "--use_cpu", "true"])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_help_with_config_shows_that_recipes_defaults():
    """`simpo-train --config R --help` documents R's values, as `simpo-train R --help` does."""
    by_config = help_text(["--config", "gemma-2-9b-it-dpo", "--help"])
    assert by_config == help_text(["gemma-2-9b-it-dpo", "--help"])
    assert by_config == help_text(["--help", "--config=gemma-2-9b-it-dpo"])
    assert "gemma-2-9b-it-dpo.yaml" in by_config
    beta = " ".join(by_config[by_config.index("\n  --beta "):][:300].split())
    assert "(default: 0.01)" in beta  # the DPO recipe's, not tiny's 2.0
    with pytest.raises(ConfigError, match="the recipe is given twice"):
        help_text(["tiny", "--config", "tiny-dpo", "--help"])
