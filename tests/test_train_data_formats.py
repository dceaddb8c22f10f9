"""TRL's preference data formats (standard / conversational, implicit / explicit prompt) and the
dataset mixtures (the official recipes' ``dataset_mixer``, alignment-handbook's
``dataset_mixture``), down to the rows taken and the token ids produced."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

from simpo.config import ConfigError, DataArguments, parse_args  # noqa: E402
from simpo.data import (TOKENIZED_COLUMNS, DataError, apply_chat_template,  # noqa: E402
                        load_raw_datasets, load_splits, prepare_dataset, tokenize_row)
from simpo.modeling import CHAT_TEMPLATES, build_tiny_tokenizer  # noqa: E402
from tests.test_data_errors import _args  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OFFICIAL_RECIPE = FIXTURES / "princeton-nlp-SimPO" / "gemma-2-9b-it-simpo.yaml"


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(["What is a b c d the answer yes no maybe ?"])


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _tokenized(rows: list[dict], tok, **kw) -> list[dict]:
    """``rows`` as a real ``datasets.Dataset`` through prepare_dataset (template + tokenise)."""
    ds = prepare_dataset(datasets.Dataset.from_list(rows), tok, _args(**kw))
    assert sorted(ds.column_names) == sorted(TOKENIZED_COLUMNS)
    return ds.to_list()


# ----------------------------------------------------------------------------- formats

# a multi-turn conversation: the prompt is everything up to the last answer
CONVERSATION = [_user("What is a ?"), _assistant("b c"), _user("What is d ?")]


def test_conversational_formats_give_the_same_token_ids(tok):
    """Implicit prompt (whole conversations), the gemma2-ultrafeedback-armorm schema (a prompt
    text column beside them, ignored as the official pipeline does) and an explicit message-list
    prompt with one-message responses: the same six tokenised columns, as the official template
    makes them."""
    implicit = {"chosen": CONVERSATION + [_assistant("yes")],
                "rejected": CONVERSATION + [_assistant("no maybe")]}
    armorm = {"prompt": "What is d ?", **implicit}
    explicit = {"prompt": CONVERSATION, "chosen": [_assistant("yes")],
                "rejected": [_assistant("no maybe")]}
    reference = _tokenized([implicit], tok, max_length=64, max_prompt_length=48)
    assert _tokenized([armorm], tok, max_length=64, max_prompt_length=48) == reference
    assert _tokenized([explicit], tok, max_length=64, max_prompt_length=48) == reference
    # and those ids are the template's: prompt through the template (-100), each response alone
    prompt = ("<bos><start_of_turn>user\nWhat is a ?<end_of_turn>\n<start_of_turn>model\nb c"
              "<end_of_turn>\n<start_of_turn>user\nWhat is d ?<end_of_turn>\n")
    chosen = "<start_of_turn>model\nyes<end_of_turn>\n"
    assert apply_chat_template(explicit, tok)["prompt"] == prompt
    row, eos = reference[0], tok.eos_token_id
    n_prompt = len(_ids(tok, prompt))
    assert row["chosen_input_ids"] == _ids(tok, prompt + chosen) + [eos]
    assert row["chosen_labels"] == [-100] * n_prompt + _ids(tok, chosen) + [eos]
    assert row["rejected_labels"][n_prompt:] == _ids(
        tok, "<start_of_turn>model\nno maybe<end_of_turn>\n") + [eos]
    assert row["rejected_attention_mask"] == [1] * len(row["rejected_input_ids"])


def test_standard_formats_are_plain_text_with_trls_implicit_prompt(tok):
    """Text rows: no template. An explicit prompt, and the implicit one TRL's extract_prompt finds
    (the common prefix; the space before the first difference starts the responses), give the
    ids tokenize_row gives the three strings, truncation included."""
    prompt = "What is a ? b c What is d ?"
    explicit = {"prompt": prompt, "chosen": " yes", "rejected": " no maybe"}
    implicit = {"chosen": prompt + " yes", "rejected": prompt + " no maybe"}
    reference = _tokenized([explicit], tok)
    assert _tokenized([implicit], tok) == reference
    expected = tokenize_row(prompt, " yes", " no maybe", tok, max_length=32, max_prompt_length=16)
    assert reference == [expected]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert expected["chosen_input_ids"] == [bos] + _ids(tok, prompt + " yes") + [eos]
    assert expected["chosen_labels"] == [-100] * (1 + len(_ids(tok, prompt))) + _ids(tok, "yes") + [eos]
    # the same truncation as conversational rows: prompt cut to max_prompt_length, keep_end
    cut = _tokenized([explicit], tok, max_length=8, max_prompt_length=4)[0]
    assert cut["chosen_input_ids"] == _ids(tok, "What is d ? yes") + [eos]
    assert cut["chosen_labels"] == [-100] * 4 + _ids(tok, "yes") + [eos]
    # a text row holding a conversational row's templated strings gives that row's ids
    conversational = {"prompt": CONVERSATION, "chosen": [_assistant("yes")],
                      "rejected": [_assistant("no maybe")]}
    templated = apply_chat_template(conversational, tok)
    assert _tokenized([templated], tok) == _tokenized([conversational], tok)


def test_rows_that_cannot_be_used_are_dropped_and_counted_by_reason(tok, caplog, tmp_path):
    conversational = {"prompt": [_user("What is a ?")], "chosen": [_assistant("yes")],
                      "rejected": [_assistant("no")]}
    text = {"prompt": "What is a ?", "chosen": " yes", "rejected": " no"}
    rows = [
        conversational,
        # an explicit prompt whose response is not the assistant's
        {**conversational, "chosen": [_user("yes")]},
        {**conversational, "rejected": [_assistant("  ")]},         # an empty response
        {**conversational, "prompt": []},                          # an empty prompt list
    ]
    with caplog.at_level(logging.WARNING, logger="simpo.data"):
        assert len(_tokenized(rows, tok)) == 1
    assert ("dropped 3 of 4 rows that cannot be used: 1 x prompt is neither text nor a list of "
            "{role, content} messages; 1 x the last message of chosen is not an assistant "
            "message; 1 x the rejected response is empty") in caplog.text
    caplog.clear()
    text_rows = [text,
                 {"chosen": "yes a", "rejected": "no a"},          # no common prompt
                 {"chosen": "What is a ? yes", "rejected": "What is a ? yes"},  # nothing after it
                 {**text, "chosen": " "}]
    with caplog.at_level(logging.WARNING, logger="simpo.data"):
        assert len(_tokenized(text_rows, tok)) == 1
    assert ("dropped 3 of 4 rows that cannot be used: 2 x chosen and rejected texts share no "
            "prompt (without a prompt column each holds prompt + response); 1 x the chosen "
            "response is empty") in caplog.text
    # formats mixed within a row (a JSON file may hold anything: datasets reads it as Json)
    mixed = [text, {**text, "prompt": [_user("What is a ?")]},
             {**text, "rejected": [_assistant("no")]}, {**text, "chosen": 3}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    raw = load_raw_datasets(str(path), ["train"])["train"]
    with caplog.at_level(logging.WARNING, logger="simpo.data"):
        assert len(prepare_dataset(raw, tok, _args())) == 1
    assert ("1 x chosen and rejected mix text and messages; 1 x chosen is neither text nor a list "
            "of {role, content} messages; 1 x prompt is a message list but chosen and rejected "
            "are text") in caplog.text
    with pytest.raises(DataError, match=r"missing column\(s\) \['rejected'\]"):
        _tokenized([{"prompt": "a", "chosen": "b"}], tok)


def test_text_data_needs_no_chat_template(tmp_path):
    """A base model's tokenizer without a chat template trains on text rows (as TRL); on
    conversational rows it is refused with one line."""
    from simpo.config import ModelArguments
    from simpo.config import UserError
    from simpo.train import load_tokenizer

    plain = build_tiny_tokenizer(["What is a ? yes no"], chat_template=None)
    plain.save_pretrained(tmp_path / "base")
    model_args = ModelArguments(model_name_or_path=str(tmp_path / "base"))
    text = {"train": datasets.Dataset.from_list([{"prompt": "What is a ?", "chosen": " yes",
                                                  "rejected": " no"}])}
    loaded = load_tokenizer(model_args, DataArguments(), text)
    assert loaded.chat_template is None
    assert _tokenized(text["train"].to_list(), loaded) == [
        tokenize_row("What is a ?", " yes", " no", plain, max_length=32, max_prompt_length=16)]
    conversational = {"train": datasets.Dataset.from_list(
        [{"chosen": [_user("a"), _assistant("yes")], "rejected": [_user("a"), _assistant("no")]}])}
    with pytest.raises(UserError, match=r"has no chat template: set chat_template"):
        load_tokenizer(model_args, DataArguments(), conversational)


# ----------------------------------------------------------------------------- the official recipe

def _resolved_sources(data_args) -> list[tuple]:
    """(dataset, config, fraction of its train split) for each dataset the run reads."""
    from simpo.data import data_sources

    return [(s.name, s.config, 1.0 if s.fraction is None else s.fraction)
            for s in data_sources(data_args)]


def test_the_official_recipe_verbatim_is_our_packaged_recipe():
    """princeton-nlp/SimPO's training_configs/gemma-2-9b-it-simpo.yaml, unchanged (see
    fixtures/princeton-nlp-SimPO/SOURCE.md), parses to the packaged recipe's configuration: every
    field of the three argument classes is equal except the differences listed here."""
    # what cannot apply on this machine: wandb is not installed, and bf16 without a GPU needs
    # use_cpu (given to both)
    official = parse_args([str(OFFICIAL_RECIPE), "--report_to", "none", "--use_cpu", "true"])
    ours = parse_args(["gemma-2-9b-it-simpo", "--use_cpu", "true"])
    differences = {}
    for theirs, mine in zip(official[:3], ours[:3]):
        assert type(theirs) is type(mine)
        for f in dataclasses.fields(theirs):
            a, b = getattr(theirs, f.name), getattr(mine, f.name)
            if f.name == "chat_template":  # the YAML inlines the template our recipe names
                a, b = CHAT_TEMPLATES.get(a, a), CHAT_TEMPLATES.get(b, b)
            if a != b:
                differences[f.name] = (a, b)
    armorm = "princeton-nlp/gemma2-ultrafeedback-armorm"
    assert differences == {
        # the same data, spelled as the official mixer vs dataset_name (sources compared below)
        "dataset_mixer": ({armorm: 1.0}, None),
        "dataset_name": (None, armorm),
        # global batch 128 both: 4 processes x 2 x 16 in the published YAML, 8 x 2 x 8 in ours
        "gradient_accumulation_steps": (16, 8),
        # the authors' hub repository (push_to_hub is false in both)
        "hub_model_id": ("simpo-exps", None),
        # report_to was overridden on the command line for the published YAML only
        "command_line_keys": (frozenset({"report_to", "use_cpu"}), frozenset({"use_cpu"})),
    }
    assert _resolved_sources(official[1]) == _resolved_sources(ours[1]) == [(armorm, None, 1.0)]
    assert CHAT_TEMPLATES.get(official[1].chat_template) is None  # inlined, not a name
    assert official[2].report_to == ours[2].report_to == []
    assert OFFICIAL_RECIPE.read_text().count("dataset_mixer:") == 1  # the key that was refused


# ----------------------------------------------------------------------------- dataset_mixer

def _rows(tag: str, n: int) -> list[dict]:
    return [{"prompt": f"{tag}{i}", "chosen": [_user(f"{tag}{i}"), _assistant("yes")],
             "rejected": [_user(f"{tag}{i}"), _assistant("no")], "extra": i} for i in range(n)]


def _write(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _permuted(items: list, seed: int) -> list:
    """``Dataset.shuffle(seed)``'s order, from numpy directly."""
    import numpy as np

    return [items[i] for i in np.random.default_rng(seed).permutation(len(items))]


def test_mixer_of_one_dataset_at_fraction_1_is_dataset_name(tmp_path):
    _write(tmp_path / "train.jsonl", _rows("t", 30))
    _write(tmp_path / "test.jsonl", _rows("e", 12))
    for extra in ({}, {"max_train_samples": 7, "max_eval_samples": 5}, {"dataset_shuffle": False}):
        named = load_splits(DataArguments(dataset_name=str(tmp_path), **extra))
        mixed = load_splits(DataArguments(dataset_mixer={str(tmp_path): 1.0}, **extra))
        columns = ["prompt", "chosen", "rejected"]  # the mixer keeps the data columns only
        assert mixed.train.column_names == columns
        assert mixed.train.to_list() == named.train.select_columns(columns).to_list()
        assert mixed.eval.to_list() == named.eval.select_columns(columns).to_list()
        assert (mixed.train_name, mixed.eval_name) == (named.train_name, named.eval_name)
    assert named.train["prompt"][:3] == ["t0", "t1", "t2"]  # the last one: file order


def test_mixer_takes_the_official_rows_in_the_official_order(tmp_path):
    """mix_datasets: the first int(fraction * n) rows of each train split in file order,
    concatenated in the mixer's order and shuffled with seed 42; each eval split whole (a single
    file has none), concatenated and shuffled with seed 42."""
    a = tmp_path / "a"  # a directory of {split}.jsonl
    _write(a / "train.jsonl", _rows("a", 10))
    _write(a / "test.jsonl", _rows("ae", 4))
    _write(tmp_path / "b-train.jsonl", _rows("b", 20))  # a {split} pattern
    _write(tmp_path / "b-test.jsonl", _rows("be", 3))
    c = _write(tmp_path / "c.jsonl", _rows("c", 8))     # a single file: train rows only
    mixer = {str(a): 0.5, str(tmp_path / "b-{split}.jsonl"): 0.27, c: 1}
    out = load_splits(DataArguments(dataset_mixer=mixer))
    taken = [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)] + [f"c{i}" for i in range(8)]
    assert out.train["prompt"] == _permuted(taken, 42)  # int(0.27 * 20) = 5 rows of b
    assert out.eval["prompt"] == _permuted([f"ae{i}" for i in range(4)] + ["be0", "be1", "be2"], 42)
    assert (out.train_name, out.eval_name) == ("train", "test")
    unshuffled = load_splits(DataArguments(dataset_mixer=mixer, dataset_shuffle=False))
    assert unshuffled.train["prompt"] == taken
    # the chosen rows are those of the files (not just their prompts)
    assert unshuffled.train[5]["chosen"] == _rows("b", 1)[0]["chosen"]
    # held out of the mixed train rows when no dataset has an eval split
    held = load_splits(DataArguments(dataset_mixer={c: 1.0, str(tmp_path / "b-train.jsonl"): 0.5},
                                     eval_fraction=0.25))
    assert (len(held.train), len(held.eval), held.eval_name) == (13, 5, "heldout")
    assert sorted(list(held.train["prompt"]) + list(held.eval["prompt"])) == sorted(
        [f"c{i}" for i in range(8)] + [f"b{i}" for i in range(10)])


def test_mixer_data_errors_name_the_dataset(tmp_path):
    text = _write(tmp_path / "text.jsonl", [{"chosen": "a b", "rejected": "a c"}])
    conv = _write(tmp_path / "conv.jsonl", _rows("c", 4))
    with pytest.raises(DataError) as info:
        load_splits(DataArguments(dataset_mixer={conv: 1.0, text: 1.0}))
    assert str(info.value) == (f"dataset_mixer: data file {conv} (split 'train') and data file "
                               f"{text} (split 'train') cannot be mixed: column 'chosen' holds "
                               f"message lists in one and text in the other")
    with pytest.raises(DataError, match=r"^dataset_mixer: its fractions take no train row"):
        load_splits(DataArguments(dataset_mixer={conv: 0.1}))
    with pytest.raises(DataError, match=r"^data path not found: \./nowhere\.jsonl$"):
        load_splits(DataArguments(dataset_mixer={conv: 1.0, "./nowhere.jsonl": 0.5}))
    missing = str(tmp_path / "gone-{split}.jsonl")  # found before anything is loaded
    with pytest.raises(DataError, match=r"^data file for split 'train' not found: .*gone-train"):
        load_splits(DataArguments(dataset_mixer={conv: 1.0, missing: 0.5}))


def test_hub_datasets_of_a_mixture_get_their_configs_and_splits(monkeypatch, tmp_path):
    """Hub ids load with their own config and split (no network here: the hub call returns real
    Datasets and records what it was asked); only local files are fingerprinted."""
    from simpo.data import local_data_files

    calls = []

    def hub(name, config=None, split=None, **kwargs):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(_rows(f"{name[-1]}{split[:2]}", 4))

    monkeypatch.setattr(datasets, "load_dataset", hub)
    out = load_splits(DataArguments(dataset_mixer={"org/a": 0.5, "org/b": 1.0},
                                    dataset_configs=["x", "y"], dataset_shuffle=False))
    assert calls == [("org/a", "x", "train"), ("org/a", "x", "test"),
                     ("org/b", "y", "train"), ("org/b", "y", "test")]
    assert list(out.train["prompt"]) == ["atr0", "atr1"] + [f"btr{i}" for i in range(4)]
    assert len(out.eval) == 8
    calls.clear()
    load_splits(DataArguments(dataset_mixture={"datasets": [
        {"id": "org/c", "config": "default", "split": "train_prefs"}]}))
    assert calls == [("org/c", "default", "train_prefs")]
    local = _write(tmp_path / "l.jsonl", _rows("l", 2))
    assert local_data_files(DataArguments(dataset_mixer={"org/a": 1.0, local: 0.5})) == {
        "train (dataset 2)": local}


# ----------------------------------------------------------------------------- dataset_mixture

def test_mixture_follows_alignment_handbook(tmp_path):
    """get_dataset: each dataset's split, its columns, a seed-shuffled sample of int(n * weight)
    rows; concatenated, shuffled with the seed, then train_test_split(test_split_size, seed)."""
    _write(tmp_path / "hub-like" / "train_prefs.jsonl", _rows("p", 12))
    other = _write(tmp_path / "other.jsonl", _rows("o", 10))
    mixture = {"datasets": [{"id": str(tmp_path / "hub-like"), "split": "train_prefs",
                             "columns": ["chosen", "rejected"], "weight": 0.5},
                            {"id": other, "columns": ["rejected", "chosen"]}],
               "seed": 3, "test_split_size": 0.25}
    out = load_splits(DataArguments(dataset_mixture=mixture))
    assert _resolved_sources(DataArguments(dataset_mixture=mixture)) == [
        (str(tmp_path / "hub-like"), None, 0.5), (other, None, 1.0)]
    # the reference: alignment-handbook's steps on the same rows, in plain datasets calls
    pieces = [datasets.Dataset.from_list(_rows("p", 12)).shuffle(seed=3).select(range(6)),
              datasets.Dataset.from_list(_rows("o", 10)).shuffle(seed=3)]
    pieces = [p.select_columns(["chosen", "rejected"]) for p in pieces]
    combined = datasets.concatenate_datasets(pieces).shuffle(seed=3)
    expected = combined.train_test_split(test_size=0.25, seed=3)
    assert (len(out.train), len(out.eval)) == (12, 4)
    assert out.train.to_list() == expected["train"].to_list()
    assert out.eval.to_list() == expected["test"].to_list()
    assert (out.train_name, out.eval_name) == ("train", "test")
    assert out.train.column_names == ["chosen", "rejected"]  # columns selected
    # without test_split_size: no eval split; a row count as test_split_size
    no_test = load_splits(DataArguments(dataset_mixture={**mixture, "test_split_size": None}))
    assert no_test.eval is None and no_test.train.to_list() == combined.to_list()
    counted = load_splits(DataArguments(dataset_mixture={**mixture, "test_split_size": 5}))
    assert (len(counted.train), len(counted.eval)) == (11, 5)
    with pytest.raises(DataError, match=r"columns \['score'\] not found"):
        load_splits(DataArguments(dataset_mixture={"datasets": [{"id": other,
                                                                 "columns": ["score"]}]}))


# ----------------------------------------------------------------------------- options

BAD_OPTIONS = [
    ({"dataset_mixer": {"a": 1.5}},
     "dataset_mixer: a: must be a number in [0, 1] (the fraction of the dataset's rows), got "
     "float 1.5"),
    ({"dataset_mixer": {"a": float("nan")}}, "dataset_mixer: a: must be a number in [0, 1]"),
    ({"dataset_mixer": {"a": True}}, "dataset_mixer: a: must be a number in [0, 1]"),
    ({"dataset_mixer": {"a": "0.5"}}, "dataset_mixer: a: must be a number in [0, 1]"),
    ({"dataset_mixer": {}}, "dataset_mixer: empty: name at least one dataset with its fraction"),
    ({"dataset_mixer": {"a": 0, "b": 0.0}}, "dataset_mixer: every fraction is 0: no train rows"),
    ({"dataset_mixer": {"a": 1.0}, "dataset_name": "b"},
     "dataset_mixer: dataset_name already names the data: keep one of them"),
    ({"dataset_mixer": {"a": 1.0}, "dataset_mixture": {"datasets": [{"id": "b"}]}},
     "dataset_mixture: dataset_mixer already names the data: keep one of them"),
    ({"dataset_mixer": {"a": 1.0}, "dataset_config": "x"}, "dataset_config: applies to dataset_name"),
    ({"dataset_mixer": {"a": 1.0}, "dataset_configs": ["x", "y"]},
     "dataset_configs: 2 config(s) for 1 dataset(s) of dataset_mixer"),
    ({"dataset_configs": ["x"]}, "dataset_configs: applies to dataset_mixer"),
    ({"dataset_mixture": {}}, "dataset_mixture: datasets must be a non-empty list"),
    ({"dataset_mixture": {"datasets": [{"id": "a"}], "shuffle": True}},
     "dataset_mixture: unknown key(s) shuffle (keys: datasets, seed, test_split_size)"),
    ({"dataset_mixture": {"datasets": [{"config": "default"}]}},
     "dataset_mixture: datasets[1]: id (a hub id or a path) is missing"),
    ({"dataset_mixture": {"datasets": [{"id": "a", "name": "x"}]}},
     "dataset_mixture: datasets[1]: unknown key(s) name"),
    ({"dataset_mixture": {"datasets": [{"id": "a", "weight": 0}]}},
     "dataset_mixture: datasets[1]: weight: must be a number in (0, 1]"),
    ({"dataset_mixture": {"datasets": [{"id": "a", "columns": ["chosen", "rejected"]},
                                       {"id": "b", "columns": ["chosen"]}]}},
     "dataset_mixture: datasets[2]: columns ['chosen'] differ from an earlier dataset's"),
    ({"dataset_mixture": {"datasets": [{"id": "a"}], "seed": -1}},
     "dataset_mixture: seed must be an integer in [0, 2**32 - 1], got int -1"),
    ({"dataset_mixture": {"datasets": [{"id": "a"}], "test_split_size": 1.0}},
     "dataset_mixture: test_split_size must be a fraction in (0, 1) or a row count >= 1"),
    ({"dataset_mixture": {"datasets": [{"id": "a"}]}, "eval_fraction": 0.1},
     "eval_fraction: does not apply to dataset_mixture: use dataset_mixture's test_split_size"),
    ({"dataset_mixture": {"datasets": [{"id": "a"}]}, "dataset_shuffle": False},
     "dataset_shuffle: does not apply to dataset_mixture"),
]


@pytest.mark.parametrize("options,message", BAD_OPTIONS)
def test_mixture_options_are_checked_with_one_line(options, message):
    with pytest.raises(ConfigError) as info:
        DataArguments(**options)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_mixtures_from_the_command_line_are_json_objects(tmp_path):
    path = _write(tmp_path / "t.jsonl", _rows("t", 4))
    _, data_args, _, _ = parse_args(["--dataset_mixer", json.dumps({path: 0.5}), "--use_cpu", "true"])
    assert data_args.dataset_mixer == {path: 0.5}
    mixture = json.dumps({"datasets": [{"id": path, "weight": 0.5}], "seed": 1})
    _, data_args, _, _ = parse_args(["--dataset_mixture", mixture, "--use_cpu", "true"])
    assert data_args.dataset_mixture == {"datasets": [{"id": path, "config": None, "split": "train",
                                                       "columns": None, "weight": 0.5}],
                                         "seed": 1, "test_split_size": None}
    for text, message in (("{oops", "dataset_mixer: not a JSON object (column 2): Expecting "
                                    "property name enclosed in double quotes"),
                          ("[1]", "dataset_mixer: must be a mapping (a JSON object), got list")):
        with pytest.raises(ConfigError) as info:
            parse_args(["--dataset_mixer", text, "--use_cpu", "true"])
        assert str(info.value).startswith(message)


# ----------------------------------------------------------------------------- a run

def test_a_run_on_a_mixture_of_text_data_records_and_checks_its_files(tmp_path, capsys):
    """simpo-train on a dataset_mixer of two local text datasets (explicit and implicit prompt):
    it trains, records the mixer and each file's sha256 in the run configuration, and a rerun
    after one file changed is refused naming that file."""
    from simpo.run_dir import RUN_CONFIG_NAME
    from simpo.train import main
    from tests.test_run_dir import FAST

    words = "a b c d e f g h".split()
    explicit = [{"prompt": f"What is {w} ?", "chosen": f" {w} yes", "rejected": " no"}
                for w in words]
    implicit = [{"chosen": f"Is {w} the answer ? yes", "rejected": f"Is {w} the answer ? no {w}"}
                for w in words]
    first = _write(tmp_path / "explicit" / "train.jsonl", explicit)
    second = _write(tmp_path / "implicit.jsonl", implicit)
    mixer = json.dumps({str(tmp_path / "explicit"): 1.0, second: 0.5})
    out = tmp_path / "out"
    argv = ["--dataset_mixer", mixer, "--max_steps", "2", *FAST, "--tiny_num_layers", "1",
            "--per_device_train_batch_size", "4", "--output_dir", str(out)]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    recorded = json.loads((out / RUN_CONFIG_NAME).read_text())
    assert recorded["data"]["dataset_mixer"] == json.loads(mixer)
    assert sorted(recorded["data_files"]) == ["train (dataset 1)", "train (dataset 2)"]
    assert recorded["data_files"]["train (dataset 1)"]["path"] == first
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert state["global_step"] == 2 and len(losses) == 2 and all(0 < x < 10 for x in losses)
    card = (out / "README.md").read_text()  # the model card names each source and its fraction
    assert "- a mixture (`dataset_mixer`) of:" in card
    assert f"  - `{tmp_path / 'explicit'}`, fraction 1\n" in card
    assert f"  - `{second}`, fraction 0.5\n" in card

    _write(Path(second), implicit[::-1])  # same rows, another order: other data
    capsys.readouterr()
    assert main(argv + ["--max_steps", "4"]) == 1
    err = capsys.readouterr().err
    assert "data file implicit.jsonl (split 'train (dataset 2)'): content changed" in err


def test_data_named_on_the_command_line_replaces_the_recipes(tmp_path):
    """--dataset_name with the official recipe's dataset_mixer, --dataset_mixer with the packaged
    recipe's dataset_name: the command line's data is the run's; two in one place stay an error."""
    path = _write(tmp_path / "t.jsonl", _rows("t", 4))
    _, data_args, _, _ = parse_args([str(OFFICIAL_RECIPE), "--dataset_name", path,
                                     "--report_to", "none", "--use_cpu", "true"])
    assert (data_args.dataset_name, data_args.dataset_mixer) == (path, None)
    _, data_args, _, _ = parse_args(["gemma-2-9b-it-simpo", "--dataset_mixer", json.dumps({path: 1}),
                                     "--use_cpu", "true"])
    assert (data_args.dataset_name, data_args.dataset_mixer) == (None, {path: 1.0})
    recipe = tmp_path / "both.yaml"
    recipe.write_text(f"dataset_name: {path}\ndataset_mixer:\n  {path}: 0.5\n")
    with pytest.raises(ConfigError, match=r"^both\.yaml: dataset_mixer: dataset_name already names "
                                          r"the data: keep one of them$"):
        parse_args([str(recipe), "--use_cpu", "true"])
    with pytest.raises(ConfigError, match=r"^dataset_mixer: dataset_name already names the data"):
        parse_args(["--dataset_name", path, "--dataset_mixer", json.dumps({path: 1}),
                    "--use_cpu", "true"])
