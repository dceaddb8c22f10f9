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
