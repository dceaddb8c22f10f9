"""simpo-train's command line as TRL / alignment-handbook users type it: ``--config RECIPE`` as the
positional recipe, the chat template a run uses (the model's own unless one is named), and a
``--help`` that lists the project's options first, in groups, with switches that read right.
In-process (parse_args, help_text, load_tokenizer): no training run."""

from __future__ import annotations

import io
import logging
import sys

import pytest

pytest.importorskip("transformers")

from simpo.config import ConfigError, help_text, parse_args  # noqa: E402
from simpo.train import main  # noqa: E402

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


# ----------------------------------------------------------------------------- the chat template

# a template of the user's model (ChatML-like), which the tiny recipe must not replace
OWN_TEMPLATE = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
ROW = {"chosen": [{"role": "user", "content": "What is one plus one?"},
                  {"role": "assistant", "content": "two"}],
       "rejected": [{"role": "user", "content": "What is one plus one?"},
                    {"role": "assistant", "content": "three"}]}


@pytest.fixture(scope="module")
def own_tokenizer_dirs(tmp_path_factory):
    """Two saved tokenizers, loaded through AutoTokenizer as a user's model's would be: one with
    its own chat template, one without any."""
    from simpo.modeling import build_tiny_tokenizer

    texts = ["What is one plus one ?", "two three"]
    dirs = {}
    for name, template in (("own", OWN_TEMPLATE), ("none", None)):
        tok = build_tiny_tokenizer(texts)
        tok.chat_template = template
        dirs[name] = tmp_path_factory.mktemp(f"tokenizer-{name}")
        tok.save_pretrained(dirs[name])
    return dirs


def _tokenizer(argv, caplog):
    """parse_args + load_tokenizer as simpo-train calls them; -> (tokenizer, its log line)."""
    from datasets import Dataset

    from simpo.train import load_tokenizer

    model_args, data_args, args, _ = parse_args([*argv, "--use_cpu", "true"])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="simpo.train"):
        tok = load_tokenizer(model_args, data_args, {"train": Dataset.from_list([ROW])},
                             args.command_line_keys)
    lines = [m for m in caplog.messages if m.startswith("chat template:")]
    assert len(lines) == 1, caplog.messages
    return tok, lines[0]


def _prompt(tok) -> str:
    from simpo.data import apply_chat_template

    return apply_chat_template(ROW, tok)["prompt"]


@pytest.mark.parametrize("recipe,argv,own,line", [
    # the default (tiny) recipe names no template: a user's model keeps its own
    ([], [], True, "chat template: the tokenizer's own, from {dir} (chat_template unset)"),
    (["tiny-dpo"], [], True, "chat template: the tokenizer's own, from {dir} (chat_template unset)"),
    ([], ["--chat_template", "gemma"], False, "chat template: gemma (chat_template from the command line)"),
    # the published recipe names Gemma's inline, as the official one: it applies ...
    (["gemma-2-9b-it-simpo"], [], False, "chat template: gemma (chat_template from the recipe)"),
    # ... unless the user asks for the tokenizer's own
    (["gemma-2-9b-it-simpo"], ["--chat_template", "tokenizer"], True,
     "chat template: the tokenizer's own, from {dir} (chat_template tokenizer from the command line)"),
])
def test_a_user_models_own_template_is_kept_unless_one_is_named(own_tokenizer_dirs, caplog, recipe,
                                                                argv, own, line):
    from simpo.modeling import GEMMA_CHAT_TEMPLATE

    path = str(own_tokenizer_dirs["own"])
    extra = ["--bf16", "false"] if recipe and recipe[0].startswith("gemma") else []
    tok, logged = _tokenizer([*recipe, "--model_name_or_path", path, *extra, *argv], caplog)
    assert tok.chat_template == (OWN_TEMPLATE if own else GEMMA_CHAT_TEMPLATE)
    assert _prompt(tok) == ("user: What is one plus one?\n" if own
                            else "<bos><start_of_turn>user\nWhat is one plus one?<end_of_turn>\n")
    assert logged == line.format(dir=path)


def test_a_tokenizer_without_a_template_still_needs_one_named(own_tokenizer_dirs, caplog):
    from simpo.config import UserError

    path = str(own_tokenizer_dirs["none"])
    for argv in ([], ["--chat_template", "tokenizer"]):
        with pytest.raises(UserError) as info:
            _tokenizer(["--model_name_or_path", path, *argv], caplog)
        assert str(info.value) == (f"tokenizer {path!r} has no chat template: set chat_template "
                                   f"(e.g. 'gemma')")
    tok, logged = _tokenizer(["--model_name_or_path", path, "--chat_template", OWN_TEMPLATE], caplog)
    assert tok.chat_template == OWN_TEMPLATE
    assert logged == "chat template: the Jinja template given (chat_template from the command line)"


@pytest.mark.parametrize("recipe", ["tiny", "tiny-dpo"])
def test_the_embedded_default_still_templates_with_gemma_to_the_same_ids(recipe, caplog):
    """The tiny recipes name no template now; the embedded tokenizer carries Gemma-2's, so the
    shipped data get the token ids they got when the recipes named `gemma`."""
    from simpo.data import load_splits, prepare_dataset
    from simpo.modeling import GEMMA_CHAT_TEMPLATE
    from simpo.train import load_tokenizer

    caplog.set_level(logging.INFO, logger="simpo.train")
    few = ["--max_train_samples", "12", "--max_eval_samples", "4"]
    ids = {}
    for named in ([], ["--chat_template", "gemma"]):
        model_args, data_args, args, _ = parse_args([recipe, *few, *named])
        assert data_args.chat_template == (None if not named else "gemma")
        loaded = load_splits(data_args)
        raw = {"train": loaded.train, "test": loaded.eval}
        tok = load_tokenizer(model_args, data_args, raw, args.command_line_keys)
        assert tok.chat_template == GEMMA_CHAT_TEMPLATE
        rows = prepare_dataset(loaded.train, tok, args)
        ids[bool(named)] = [rows[k] for k in ("chosen_input_ids", "rejected_input_ids", "chosen_labels")]
        question = loaded.train[0]["chosen"][0]["content"]
        assert _prompt_of(loaded.train[0], tok) == (
            f"<bos><start_of_turn>user\n{question}<end_of_turn>\n")
        assert tok.convert_ids_to_tokens(rows[0]["chosen_input_ids"][:3]) == [
            "<bos>", "<start_of_turn>", "user"]
    assert ids[False] == ids[True]
    assert [m for m in caplog.messages if m.startswith("chat template")] == [
        "chat template: the embedded tiny tokenizer's own, Gemma-2's (chat_template unset)",
        "chat template: gemma (chat_template from the command line)"]


def _prompt_of(row, tok) -> str:
    from simpo.data import apply_chat_template

    return apply_chat_template(row, tok)["prompt"]


NOT_A_TEMPLATE = ("is not a template; for the tokenizer's own, leave chat_template unset or set "
                  "it to 'tokenizer' (--chat_template tokenizer)")


@pytest.mark.parametrize("value", ["None", "null", "NULL", "none", "", "  ", "\t"])
def test_none_null_and_empty_chat_templates_are_refused(tmp_path, value):
    with pytest.raises(ConfigError) as info:
        parse_args(["--chat_template", value, "--use_cpu", "true"])
    assert str(info.value) == f"chat_template: {value!r} {NOT_A_TEMPLATE}"
    recipe = _recipe(tmp_path, f"chat_template: {value!r}\n".replace("'\\t'", '"\\t"'))
    with pytest.raises(ConfigError) as info:
        parse_args([recipe])
    assert str(info.value) == f"recipe.yaml: chat_template: {value!r} {NOT_A_TEMPLATE}"


def test_a_yaml_null_chat_template_is_unset(tmp_path):
    _, data_args, _, _ = parse_args([_recipe(tmp_path, "chat_template: null\n")])
    assert data_args.chat_template is None
    # YAML's None is a string, not null: refused, not used as a template
    with pytest.raises(ConfigError) as info:
        parse_args([_recipe(tmp_path, "chat_template: None\n")])
    assert str(info.value) == f"recipe.yaml: chat_template: 'None' {NOT_A_TEMPLATE}"
    _, data_args, _, _ = parse_args(["gemma-2-9b-it-simpo", *CPU, "--chat_template", "tokenizer"])
    assert data_args.chat_template == "tokenizer"


# ----------------------------------------------------------------------------- --help

HEADINGS = ["general", "loss options", "data options", "model options", "run options",
            "transformers TrainingArguments"]


def _sections(text: str) -> dict[str, list[str]]:
    """--help's option names (without --) by group heading, in the order listed."""
    import re

    sections, current = {}, None
    for line in text.splitlines():
        if re.match(r"^\S.*:$", line) and not line.startswith("usage"):
            current = line[:-1]
            sections[current] = []
        elif current and (m := re.match(r"^  (--[\w-]+|-h)", line)):
            sections[current].append(m.group(1).lstrip("-"))
    return sections


@pytest.fixture(scope="module")
def tiny_help():
    return help_text([])


def test_help_lists_the_projects_options_first_in_groups(tiny_help):
    """loss, data, model, run, then TrainingArguments; each group by the dataclass that defines
    the option, so a field added to ModelArguments or DataArguments lands in its group."""
    import dataclasses
    import inspect

    from simpo.config import LOSS_OPTION_FIELDS, DataArguments, ModelArguments, SimPOConfig

    sections = _sections(tiny_help)
    assert list(sections) == HEADINGS
    assert sections["general"] == ["h", "debug", "config"]
    assert sections["loss options"] == [
        "loss", "beta", "gamma_beta_ratio", "label_smoothing", "loss_type", "sft_weight", "rpo_alpha",
        "alpha", "simpo_gamma", "cpo_alpha", "delta", "nll_weight", "precompute_ref_log_probs",
        "precompute_ref_batch_size", "loss_backend", "loss_schedule", "loss_memory_budget",
        "logit_metrics", "loss_chunk_size"]
    assert set(LOSS_OPTION_FIELDS) < set(sections["loss options"])  # every loss's options
    assert sections["data options"] == [
        *(f.name for f in dataclasses.fields(DataArguments)),
        "max_length", "max_prompt_length", "truncation_mode", "label_pad_token_id", "padding_value",
        "padding_free"]
    assert sections["model options"] == [f.name for f in dataclasses.fields(ModelArguments)]
    run = set(sections["run options"])  # SimPOConfig's own fields that are neither loss nor data
    assert {"disable_dropout", "existing_run", "plot", "logging_nan_inf_filter"} <= run
    assert run <= set(inspect.get_annotations(SimPOConfig))
    trainer = sections["transformers TrainingArguments"]
    assert {"per_device_train_batch_size", "learning_rate", "output_dir", "deepspeed"} <= set(trainer)
    assert tiny_help.index("\n  --loss ") < tiny_help.index("\n  --max_length ") \
        < tiny_help.index("\n  --model_name_or_path ") < tiny_help.index("\n  --plot ") \
        < tiny_help.index("\n  --per_device_train_batch_size ")


def test_help_lists_every_option_once(tiny_help):
    """Every field of the three dataclasses once (their --dashed-spelling and --no_X twins are
    accepted, not listed), and nothing that is not one."""
    from simpo.config import _field_types

    listed = [name for names in _sections(tiny_help).values() for name in names]
    assert sorted(listed) == sorted([*_field_types(), "h", "config"])  # debug: a field too
    assert "--max-steps" not in tiny_help and "--model-name-or-path" not in tiny_help


def test_help_switches_read_right(tiny_help):
    """`--no_plot ... (default: False)` read as "plot is off by default"; the switch now reads
    `--plot [true|false] ... --no_plot turns it off. (default: true)`, and defaults are written
    as in a recipe (true, false, unset), never Python's True / False / None."""
    assert "\n  --no_" not in tiny_help and "\n  --no-" not in tiny_help
    for word in ("False", "True", "None"):
        assert f"(default: {word})" not in tiny_help
    plot = " ".join(tiny_help[tiny_help.index("\n  --plot "):].split("\n  --")[1].split())
    assert plot == ("plot [true|false] Write training_curves.png (loss, learning rate, reward "
                    "accuracy and margins) to output_dir. --no_plot turns it off. (default: true)")
    template = " ".join(tiny_help[tiny_help.index("\n  --chat_template "):].split("\n  --")[1].split())
    assert template.endswith("(default: unset)")


@pytest.mark.parametrize("argv,plot,dropout", [
    ([], True, True),
    (["--no_plot"], False, True),
    (["--no-plot", "--no_disable_dropout"], False, False),
    (["--plot", "false", "--disable_dropout", "no"], False, False),
    (["--plot"], True, True),
])
def test_negative_switches_still_parse(argv, plot, dropout):
    _, _, args, _ = parse_args([*argv, "--use_cpu", "true"])
    assert (args.plot, args.disable_dropout) == (plot, dropout)


def test_help_of_a_recipe_shows_its_values_in_the_groups():
    text = help_text(["gemma-2-9b-it-simpo", "--help"])
    assert list(_sections(text)) == HEADINGS

    def entry(name):
        return " ".join(text[text.index(f"\n  --{name} "):].split("\n  --")[1].split())

    assert entry("beta").endswith("(default: 10.0)")
    assert entry("chat_template").endswith("(default: gemma)")
    assert entry("bf16").startswith("bf16 [true|false]") and entry("bf16").endswith("(default: true)")
    assert entry("dataset_splits").endswith("(default: train test)")
    assert entry("lr_scheduler_type").endswith("(default: cosine)")
    assert entry("learning_rate").endswith("(default: 8e-07)")


class _Writes(io.StringIO):
    """A stream that records each write call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def write(self, text):
        self.calls.append(text)
        return super().write(text)


def test_an_error_line_is_one_write(monkeypatch):
    """Ranks stopping together share one stderr pipe: a line written as text then newline (two
    writes, as ``print`` does) came out as ``...againsimpo-train: error: ...`` on one line."""
    stream = _Writes()
    monkeypatch.setattr(sys, "stderr", stream)
    assert main(["tiny", "--no_such_option", "1"]) == 2
    assert len(stream.calls) == 1
    assert stream.calls[0].startswith("simpo-train: error: ") and stream.calls[0].endswith("\n")
    assert stream.calls[0].count("\n") == 1
