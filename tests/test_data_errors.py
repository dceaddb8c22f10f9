"""Data loading: one-line DataErrors naming file, split and line; single-file training with an
optional held-out split; the official seed-42 data order (alignment-handbook ``mix_datasets``)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

datasets = pytest.importorskip("datasets")

from simpo.config import ConfigError, DataArguments, UserError  # noqa: E402
from simpo.data import (TOKENIZED_COLUMNS, DataError, LoadedSplits,  # noqa: E402
                        load_raw_datasets, load_splits, prepare_dataset)
from simpo.modeling import build_tiny_tokenizer  # noqa: E402


def _msg(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def _row(i: int) -> dict:
    return {"prompt": f"q{i}", "chosen": _msg(f"q{i}", f"yes {i}"), "rejected": _msg(f"q{i}", "no")}


def _line(i: int) -> str:
    return json.dumps(_row(i)) + "\n"


def _write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _load_error(**kw) -> DataError:
    with pytest.raises(DataError) as info:
        load_splits(DataArguments(**kw))
    return info.value


def _assert_one_short_line(message: str, path: str) -> None:
    assert "\n" not in message
    assert len(message) - len(path) < 120, message


def test_data_error_is_a_user_error():
    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)


# ----------------------------------------------------------------------------- broken files

def test_malformed_json_line_names_file_split_and_line(tmp_path, capfd):
    bad = '{"prompt": "q6" "chosen": []}\n'    # a comma expected before column 17
    path = tmp_path / "train.jsonl"
    path.write_text("".join(_line(i) for i in range(6)) + bad + "".join(_line(i) for i in range(3)))
    message = str(_load_error(dataset_name=str(path)))
    assert message == (f"data file {path} (split 'train'), line 7: invalid JSON: "
                       f"Expecting ',' delimiter (column 17)")
    _assert_one_short_line(message, str(path))
    # the JSON reader's own error log line is held back: the user sees only the DataError
    assert "Failed to load JSON" not in capfd.readouterr().err


def test_malformed_json_in_the_eval_split_of_a_directory(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(_line(i) for i in range(4)))
    (tmp_path / "test.jsonl").write_text(_line(0) + _line(1) + '{"prompt": \n')
    message = str(_load_error(dataset_name=str(tmp_path)))
    assert message.startswith(f"data file {tmp_path / 'test.jsonl'} (split 'test'), line 3: "
                              f"invalid JSON: ")


def test_malformed_json_array_file_names_the_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text("[\n" + json.dumps(_row(0)) + ",\n" + json.dumps(_row(1)) + ",\n]\n")
    message = str(_load_error(dataset_name=str(path)))
    assert message == (f"data file {path} (split 'train'), line 4: invalid JSON: "
                       f"Expecting value (column 1)")


def test_invalid_utf8_names_line_and_byte_offset(tmp_path):
    head = (_line(0) + _line(1)).encode()
    bad = b'{"prompt": "caf\xe9", "chosen": [], "rejected": []}\n'
    path = tmp_path / "train.jsonl"
    path.write_bytes(head + bad + _line(2).encode())
    message = str(_load_error(dataset_name=str(path)))
    offset = len(head) + bad.index(b"\xe9")
    assert message == (f"data file {path} (split 'train'), line 3: invalid UTF-8: byte 0xe9 at "
                       f"byte offset {offset} of the file (save it as UTF-8)")
    _assert_one_short_line(message, str(path))


def test_empty_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("")
    assert str(_load_error(dataset_name=str(path))) == \
        f"data file {path} (split 'train'): the file is empty"


def test_file_of_blank_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n   \n\n")
    assert str(_load_error(dataset_name=str(path))) == \
        f"data file {path} (split 'train'): no rows: the file holds only blank lines"


def test_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(_line(0) + "[1, 2]\n")
    assert str(_load_error(dataset_name=str(path))) == \
        f"data file {path} (split 'train'), line 2: expected one JSON object per line, got a list"


def test_missing_column_in_the_eval_split_only(tmp_path):
    _write_rows(tmp_path / "train.jsonl", [_row(i) for i in range(3)])
    _write_rows(tmp_path / "test.jsonl", [{"prompt": "q", "chosen": _msg("q", "yes")}])
    message = str(_load_error(dataset_name=str(tmp_path)))
    assert message.startswith(f"data file {tmp_path / 'test.jsonl'} (split 'test'): missing "
                              f"column(s) ['rejected']")
    # the splits load one by one (not one multi-split load that needs one schema: a CastError),
    # so prepare_dataset's own message names the split and the column too
    raw = load_raw_datasets(str(tmp_path), ["train", "test"])
    assert raw["test"].column_names == ["prompt", "chosen"] and len(raw["train"]) == 3
    tok = build_tiny_tokenizer(["q yes no"])
    args = SimpleNamespace(max_length=32, max_prompt_length=16, truncation_mode="keep_end",
                           label_pad_token_id=-100)
    with pytest.raises(DataError, match=r"^split 'test': missing column\(s\) \['rejected'\]"):
        prepare_dataset(raw["test"], tok, args, split_name="test")


def test_paths_and_formats(tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert str(_load_error(dataset_name=str(missing))) == f"data path not found: {missing}"
    (tmp_path / "train.csv").write_text("a,b\n1,2\n")
    assert "unsupported file type '.csv'" in str(_load_error(dataset_name=str(tmp_path / "train.csv")))
    _write_rows(tmp_path / "train.jsonl", [_row(0)])
    message = str(_load_error(dataset_name=str(tmp_path), dataset_splits=["train", "dev"]))
    assert message == (f"{tmp_path}: no dev.jsonl, dev.json or dev.parquet for split 'dev' "
                       f"(data files there: train.jsonl)")
    message = str(_load_error(dataset_name=str(tmp_path / "{split}.jsonl"),
                              dataset_splits=["train", "dev"]))
    assert message == f"data file for split 'dev' not found: {tmp_path / 'dev.jsonl'}"
    datasets.Dataset.from_list([_row(0)]).to_parquet(str(tmp_path / "test.parquet"))
    assert str(_load_error(dataset_name=str(tmp_path))).startswith("mixed data file types")


def test_bad_dataset_splits_and_eval_fraction():
    # refused where the options are made (DataArguments), before load_splits could see them
    with pytest.raises(ConfigError, match=r"^dataset_splits: must be a train split"):
        DataArguments(dataset_splits=["train", "test", "extra"])
    with pytest.raises(ConfigError, match=r"^dataset_splits: must be a train split"):
        DataArguments(dataset_splits=["train", "train"])
    with pytest.raises(ConfigError, match=r"^eval_fraction: must be in \[0, 1\), got 1\.0"):
        DataArguments(eval_fraction=1.0)


def test_hub_failure_is_one_line_with_the_cause(monkeypatch):
    cause = ConnectionError("Couldn't reach 'org/prefs' on the Hub\n(offline)")

    def failing_load(*args, **kwargs):
        raise cause

    monkeypatch.setattr(datasets, "load_dataset", failing_load)
    with pytest.raises(DataError) as info:
        load_splits(DataArguments(dataset_name="org/prefs", dataset_config="default"))
    assert str(info.value) == ("dataset 'org/prefs' (config 'default'), split 'train': cannot be "
                               "loaded: ConnectionError: Couldn't reach 'org/prefs' on the Hub "
                               "(offline)")
    assert info.value.__cause__ is cause
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: datasets.Dataset.from_list([_row(0)]).select([]))
    with pytest.raises(DataError, match=r"^dataset 'org/prefs' \(config None\), split 'train': "
                                        r"no rows$"):
        load_splits(DataArguments(dataset_name="org/prefs"))


# ----------------------------------------------------------------------------- single file

def test_single_file_trains_without_flags(tmp_path, caplog):
    path = _write_rows(tmp_path / "prefs.jsonl", [_row(i) for i in range(20)])
    with caplog.at_level("INFO", logger="simpo.data"):
        out = load_splits(DataArguments(dataset_name=path))   # dataset_splits: ["train", "test"]
    assert isinstance(out, LoadedSplits)
    assert (out.train_name, out.eval_name, out.eval) == ("train", None, None)
    assert sorted(out.train["prompt"]) == sorted(f"q{i}" for i in range(20))
    assert "is a single file" in caplog.text and "--eval_fraction" in caplog.text


def test_single_file_eval_fraction_holds_rows_out(tmp_path):
    path = _write_rows(tmp_path / "prefs.jsonl", [_row(i) for i in range(50)])
    first = load_splits(DataArguments(dataset_name=path, eval_fraction=0.1))
    again = load_splits(DataArguments(dataset_name=path, eval_fraction=0.1))
    assert (first.train_name, first.eval_name) == ("train", "heldout")
    assert (len(first.train), len(first.eval)) == (45, 5)
    assert first.eval["prompt"] == again.eval["prompt"]
    assert first.train["prompt"] == again.train["prompt"]
    assert not set(first.eval["prompt"]) & set(first.train["prompt"])
    assert set(first.eval["prompt"]) | set(first.train["prompt"]) == {f"q{i}" for i in range(50)}
    # which rows are held out does not depend on the shuffle; without it both keep file order
    unshuffled = load_splits(DataArguments(dataset_name=path, eval_fraction=0.1,
                                           dataset_shuffle=False))
    assert sorted(unshuffled.eval["prompt"]) == sorted(first.eval["prompt"])
    assert unshuffled.eval["prompt"] == sorted(first.eval["prompt"], key=lambda p: int(p[1:]))


def test_eval_fraction_with_an_eval_split_is_an_error(tmp_path):
    for split in ("train", "test"):
        _write_rows(tmp_path / f"{split}.jsonl", [_row(i) for i in range(4)])
    message = str(_load_error(dataset_name=str(tmp_path), eval_fraction=0.2))
    assert message == ("eval_fraction 0.2 holds train rows out for evaluation, but the data already "
                       "has the eval split 'test': set eval_fraction to 0, or dataset_splits to "
                       "['train'] alone")
    # with the train split alone, the fraction is held out of it
    out = load_splits(DataArguments(dataset_name=str(tmp_path), dataset_splits=["train"],
                                    eval_fraction=0.25))
    assert (len(out.train), len(out.eval), out.eval_name) == (3, 1, "heldout")


# ----------------------------------------------------------------------------- official order

@pytest.fixture
def split_dir(tmp_path):
    files = {"train": _write_rows(tmp_path / "train.jsonl", [_row(i) for i in range(30)]),
             "test": _write_rows(tmp_path / "test.jsonl", [_row(100 + i) for i in range(12)])}
    return tmp_path, files


def test_official_order_is_the_seed_42_shuffle_of_each_split(split_dir):
    directory, files = split_dir
    out = load_splits(DataArguments(dataset_name=str(directory)))
    reference = datasets.load_dataset("json", data_files=files)
    expected_train = reference["train"].shuffle(seed=42).to_list()
    expected_test = reference["test"].shuffle(seed=42).to_list()
    assert out.train.to_list() == expected_train
    assert out.eval.to_list() == expected_test
    assert (out.train_name, out.eval_name) == ("train", "test")
    assert expected_train != reference["train"].to_list()   # the shuffle really reorders


def test_dataset_shuffle_false_keeps_file_order(split_dir):
    directory, _ = split_dir
    out = load_splits(DataArguments(dataset_name=str(directory), dataset_shuffle=False))
    assert out.train["prompt"] == [f"q{i}" for i in range(30)]
    assert out.eval["prompt"] == [f"q{100 + i}" for i in range(12)]


def test_max_samples_take_the_first_rows_of_the_shuffled_order(split_dir):
    directory, files = split_dir
    out = load_splits(DataArguments(dataset_name=str(directory), max_train_samples=7,
                                    max_eval_samples=3))
    reference = datasets.load_dataset("json", data_files=files)
    assert out.train.to_list() == reference["train"].shuffle(seed=42).to_list()[:7]
    assert out.eval.to_list() == reference["test"].shuffle(seed=42).to_list()[:3]


def test_unusable_rows_still_load_and_are_dropped_later(tmp_path):
    rows = [_row(0), {"prompt": "q", "chosen": _msg("q", ""), "rejected": _msg("q", "no")},
            {"prompt": "q", "chosen": "yes", "rejected": _msg("q", "no")}]
    out = load_splits(DataArguments(dataset_name=_write_rows(tmp_path / "t.jsonl", rows),
                                    dataset_shuffle=False))
    assert len(out.train) == 3   # prepare_dataset drops (and counts) the two bad rows


# ----------------------------------------------------------------------------- nothing to learn

def _args(**kw):
    from simpo.config import SimPOConfig

    base = dict(output_dir="/tmp/simpo-test-unused", use_cpu=True, report_to="none",
                max_length=32, max_prompt_length=16)
    base.update(kw)
    return SimPOConfig(**base)


def test_identical_pairs_are_counted_as_the_model_sees_them(tmp_path, caplog):
    """chosen == rejected after templating, tokenisation and truncation: a pair identical as text,
    and one whose responses differ only past max_length, are counted in a warning; the split
    keeps them (and only the tokenised columns). All pairs identical, in the train or the eval
    split: refused."""
    alphabet = " ".join("abcdefghijklmnopqrstuvwxyz")
    tok = build_tiny_tokenizer([f"q0 q1 q2 q3 yes 0 1 2 3 no {alphabet}"])
    rows = [_row(0), _row(1),
            {"prompt": "q2", "chosen": _msg("q2", "yes 2"), "rejected": _msg("q2", "yes 2")},
            # 26 + 1 tokens each: cut to max_length - max_prompt_length = 16 tokens, equal
            {"prompt": "q3", "chosen": _msg("q3", f"{alphabet} yes"),
             "rejected": _msg("q3", f"{alphabet} no")}]
    raw = load_raw_datasets(_write_rows(tmp_path / "t.jsonl", rows), ["train"])["train"]
    with caplog.at_level("WARNING", logger="simpo.data"):
        ds = prepare_dataset(raw, tok, _args(), split_name="train")
    assert len(ds) == 4 and sorted(ds.column_names) == sorted(TOKENIZED_COLUMNS)
    assert ("split 'train': 2 of 4 pairs have chosen and rejected identical as the model sees "
            "them (the same token ids after the chat template and truncation to max_length 32)"
            in caplog.text)
    # a longer max_length keeps the last pair apart
    caplog.clear()
    with caplog.at_level("WARNING", logger="simpo.data"):
        prepare_dataset(raw, tok, _args(max_length=64, max_prompt_length=16))
    assert "1 of 4 pairs have chosen and rejected identical" in caplog.text

    same = _write_rows(tmp_path / "same.jsonl", rows[2:])
    for split in ("train", "test"):
        with pytest.raises(DataError) as info:
            prepare_dataset(load_raw_datasets(same, ["train"])["train"], tok, _args(),
                            split_name=split)
        assert str(info.value).startswith(
            f"split {split!r}: all 2 pairs have chosen and rejected identical as the model sees "
            f"them (the same token ids after the chat template and truncation to max_length 32): "
            f"there is no preference to learn or measure; check that the 'chosen' and 'rejected' "
            f"columns hold different responses")


def _geometry(**kw):
    base = dict(world_size=1, train_batch_size=8, eval_batch_size=16, dataloader_drop_last=True,
                max_steps=-1, num_train_epochs=1.0, gradient_accumulation_steps=1)
    base.update(kw)
    return SimpleNamespace(**base)


def test_optimizer_steps_as_the_trainer_counts_them():
    from simpo.data import check_optimizer_steps

    assert check_optimizer_steps(16, _geometry(world_size=2)) == 1
    assert check_optimizer_steps(47, _geometry(num_train_epochs=3)) == 15  # 5 full batches
    accumulated = _geometry(gradient_accumulation_steps=2, num_train_epochs=2.5)
    assert check_optimizer_steps(40, accumulated) == 8  # 5 batches: 3 steps an epoch
    assert check_optimizer_steps(3, _geometry(dataloader_drop_last=False)) == 1
    assert check_optimizer_steps(8, _geometry(max_steps=10)) == 10
    for rows, kw in ((12, dict(world_size=2)), (7, dict(max_steps=10))):
        with pytest.raises(DataError) as info:
            check_optimizer_steps(rows, _geometry(**kw), "train")
        processes = kw.get("world_size", 1)
        assert str(info.value) == (
            f"split 'train': {rows} row(s) do not fill one batch of 8 (per-device batch) x "
            f"{processes} process(es) and dataloader_drop_last drops it: 0 optimizer steps. Set "
            f"--dataloader_drop_last false, lower --per_device_train_batch_size, or use more data")
    # an eval split that drop_last would leave without a batch
    assert check_optimizer_steps(16, _geometry(), eval_rows=16) == 2
    with pytest.raises(DataError) as info:
        check_optimizer_steps(32, _geometry(world_size=2), eval_rows=20, eval_split_name="test")
    assert str(info.value).startswith(
        "split 'test': 20 row(s) do not fill one batch of 16 (per-device eval batch) x 2 "
        "process(es) and dataloader_drop_last drops it: evaluation would see no pair")


@pytest.mark.parametrize("length", [["--max_steps", "4"], []], ids=["max_steps", "epochs"])
def test_a_split_smaller_than_one_batch_with_drop_last_is_refused_before_training(
        tmp_path, capsys, length):
    """Today: with max_steps, 0 steps, an untrained model saved and exit 0; by epochs, a
    ValueError traceback from the Trainer."""
    from simpo.train import main

    data = _write_rows(tmp_path / "prefs.jsonl", [_row(i) for i in range(3)])
    out = tmp_path / "out"
    rc = main(["--dataset_name", data, "--dataloader_drop_last", "true", *length,
               "--tiny_hidden_size", "32", "--plot", "false", "--disable_tqdm", "true",
               "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert [line for line in err.splitlines() if line.startswith("simpo-train:")] == [
        "simpo-train: error: split 'train': 3 row(s) do not fill one batch of 8 (per-device "
        "batch) x 1 process(es) and dataloader_drop_last drops it: 0 optimizer steps. Set "
        "--dataloader_drop_last false, lower --per_device_train_batch_size, or use more data"]
    for name in ("model.safetensors", "train_results.json", "trainer_state.json"):
        assert not (out / name).exists()
