"""Data pipeline: templating, masking, BOS/EOS, truncation (official rules), bad rows, collator."""

from __future__ import annotations

import json
import logging

import pytest

pytest.importorskip("datasets")

from simpo.data import (DataError, SimPODataCollator, apply_chat_template,  # noqa: E402
                        load_raw_datasets, prepare_dataset, tokenize_row)
from simpo.modeling import build_tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    words = "a b c d e f g h i j k l m n o p q r s t u v w x y z What is the answer yes no".split()
    return build_tiny_tokenizer([" ".join(words)])


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_gemma_template_prompt_and_responses(tok):
    row = {"prompt": "What is a ?",
           "chosen": [{"role": "user", "content": "What is a ?"}, {"role": "assistant", "content": "yes"}],
           "rejected": [{"role": "user", "content": "What is a ?"}, {"role": "assistant", "content": "no"}]}
    out = apply_chat_template(row, tok)
    assert out["prompt"] == "<bos><start_of_turn>user\nWhat is a ?<end_of_turn>\n"
    assert out["chosen"] == "<start_of_turn>model\nyes<end_of_turn>\n"  # BOS stripped
    assert out["rejected"] == "<start_of_turn>model\nno<end_of_turn>\n"


def test_masking_bos_eos(tok):
    bos, eos = tok.bos_token_id, tok.eos_token_id
    # no BOS in the prompt -> added; no EOS on responses -> appended
    out = tokenize_row("a b", " c d", " e", tok, max_length=32, max_prompt_length=16)
    p = ids(tok, "a b")
    assert out["chosen_input_ids"] == [bos] + p + ids(tok, "c d") + [eos]
    assert out["chosen_labels"] == [-100] * (len(p) + 1) + ids(tok, "c d") + [eos]
    assert out["rejected_input_ids"] == [bos] + p + ids(tok, "e") + [eos]
    assert out["rejected_labels"] == [-100] * 3 + ids(tok, "e") + [eos]
    assert out["chosen_attention_mask"] == [1] * len(out["chosen_input_ids"])
    # BOS already there, EOS already there -> not doubled
    out = tokenize_row("<bos>a b", " c<eos>", " e<eos>", tok, max_length=32, max_prompt_length=16)
    assert out["chosen_input_ids"] == [bos] + p + ids(tok, "c") + [eos]
    assert out["chosen_input_ids"].count(bos) == 1 and out["chosen_input_ids"].count(eos) == 1


def test_truncation_prompt_keep_end_then_responses(tok):
    bos, eos = tok.bos_token_id, tok.eos_token_id
    prompt = "a b c d e f g h"                  # 8 tokens + BOS = 9
    chosen, rejected = " i j k", " l m"        # 3 + EOS = 4 ; 2 + EOS = 3; longer = 4
    # fits: 9 + 4 = 13 <= 13
    out = tokenize_row(prompt, chosen, rejected, tok, max_length=13, max_prompt_length=5)
    assert len(out["chosen_input_ids"]) == 13
    # too long: prompt cut to its last 5 tokens (BOS is cut away, as the official keep_end does)
    out = tokenize_row(prompt, chosen, rejected, tok, max_length=12, max_prompt_length=5)
    assert out["chosen_input_ids"] == ids(tok, "d e f g h i j k") + [eos]
    assert out["chosen_labels"] == [-100] * 5 + ids(tok, "i j k") + [eos]
    assert out["rejected_input_ids"] == ids(tok, "d e f g h l m") + [eos]
    # keep_start keeps the head of the prompt instead
    out = tokenize_row(prompt, chosen, rejected, tok, max_length=12, max_prompt_length=5,
                       truncation_mode="keep_start")
    assert out["chosen_input_ids"] == [bos] + ids(tok, "a b c d i j k") + [eos]
    # still too long after the prompt cut: both responses cut to max_length - max_prompt_length
    out = tokenize_row(prompt, " i j k l m n o", " p", tok, max_length=8, max_prompt_length=5)
    assert out["chosen_input_ids"] == ids(tok, "d e f g h i j k")
    assert out["chosen_labels"] == [-100] * 5 + ids(tok, "i j k")  # EOS truncated away
    # the shorter response is cut too only if it exceeds the budget: 5 + 2 tokens stay
    assert out["rejected_input_ids"] == ids(tok, "d e f g h p") + [eos]
    assert len(out["rejected_input_ids"]) <= 8


def test_collator_pads_and_puts_chosen_first(tok):
    f1 = tokenize_row("a", " b c d", " e", tok, max_length=32, max_prompt_length=16)
    f2 = tokenize_row("f g", " h", " i j", tok, max_length=32, max_prompt_length=16)
    batch = SimPODataCollator(tok.pad_token_id)([f1, f2])
    T = max(len(f[k]) for f in (f1, f2) for k in ("chosen_input_ids", "rejected_input_ids"))
    assert batch["input_ids"].shape == (4, T)
    rows = [f1["chosen_input_ids"], f2["chosen_input_ids"], f1["rejected_input_ids"],
            f2["rejected_input_ids"]]
    labels = [f1["chosen_labels"], f2["chosen_labels"], f1["rejected_labels"], f2["rejected_labels"]]
    for i, (r, lab) in enumerate(zip(rows, labels)):
        n = len(r)
        assert batch["input_ids"][i, :n].tolist() == r
        assert batch["input_ids"][i, n:].tolist() == [tok.pad_token_id] * (T - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        assert batch["labels"][i].tolist() == lab + [-100] * (T - n)


def _msg(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def _args(**kw):
    from simpo.config import SimPOConfig
    return SimPOConfig(output_dir="/tmp/simpo-test-unused", use_cpu=True, report_to="none",
                       max_length=32, max_prompt_length=16, **kw)


def test_bad_rows_dropped_with_count(tok, tmp_path, caplog):
    good = {"prompt": "a", "chosen": _msg("a", "yes"), "rejected": _msg("a", "no")}
    rows = [good,
            {"prompt": "a", "chosen": _msg("a", ""), "rejected": _msg("a", "no")},       # empty
            {"prompt": "a", "chosen": _msg("a", "yes"), "rejected": _msg("a", "   ")},    # blank
            {"prompt": "a", "chosen": None, "rejected": _msg("a", "no")},                 # missing
            {"prompt": "a", "chosen": [{"role": "assistant", "content": "x"}],            # no prompt
             "rejected": _msg("a", "no")},
            good]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = load_raw_datasets(str(path), ["train"])["train"]
    with caplog.at_level(logging.WARNING, logger="simpo.data"):
        ds = prepare_dataset(raw, tok, _args())
    assert len(ds) == 2
    assert "dropped 4 of 6 rows" in caplog.text
    assert "response is empty" in caplog.text


def test_missing_column_is_an_error(tok, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": _msg("a", "yes")}) + "\n")
    raw = load_raw_datasets(str(path), ["train"])["train"]
    with pytest.raises(ValueError, match="missing column.*rejected"):
        prepare_dataset(raw, tok, _args())


def test_no_usable_rows_is_an_error(tok, tmp_path):
    path = tmp_path / "train.jsonl"
    # text without a prompt column: chosen and rejected must start with their common prompt
    path.write_text(json.dumps({"chosen": "yes", "rejected": "no"}) + "\n")
    raw = load_raw_datasets(str(path), ["train"])["train"]
    with pytest.raises(ValueError, match="no usable rows"):
        prepare_dataset(raw, tok, _args())


def test_local_loading_variants(tmp_path):
    row = {"prompt": "a", "chosen": _msg("a", "yes"), "rejected": _msg("a", "no")}
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    d = load_raw_datasets(str(tmp_path), ["train", "test"])
    assert set(d) == {"train", "test"} and len(d["train"]) == 1
    d = load_raw_datasets(str(tmp_path / "{split}.jsonl"), ["train", "test"])
    assert d["test"][0]["chosen"][1]["content"] == "yes"
    with pytest.raises(ValueError, match="single file"):
        load_raw_datasets(str(tmp_path / "train.jsonl"), ["train", "test"])
    # a user's data mistake: one-line DataError (not a FileNotFoundError traceback)
    with pytest.raises(DataError, match=r"no validation\.jsonl.*split 'validation'"):
        load_raw_datasets(str(tmp_path), ["train", "validation"])
    # parquet through the same code
    import datasets
    datasets.Dataset.from_list([row]).to_parquet(str(tmp_path / "p.parquet"))
    assert len(load_raw_datasets(str(tmp_path / "p.parquet"), ["train"])["train"]) == 1


def test_shipped_data_is_reproducible_and_in_schema():
    from simpo import tiny_data
    train, test = tiny_data.build()
    d = load_raw_datasets(None, ["train", "test"])
    assert d["train"].to_list() == train and d["test"].to_list() == test
    assert 200 <= len(train) <= 600 and len(test) >= 50
    for r in train + test:
        assert isinstance(r["prompt"], str)
        assert [m["role"] for m in r["chosen"]] == ["user", "assistant"]
        assert r["chosen"][0] == r["rejected"][0]
        assert r["chosen"][1]["content"] != r["rejected"][1]["content"]
