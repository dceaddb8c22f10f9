"""Data pipeline (official SimPO semantics, DESIGN section 3).

1. :func:`load_splits` loads preference data through ``datasets`` (a hub name, a local
   JSON/JSONL/parquet file, a directory of ``{split}.<ext>`` files, or a path with ``{split}``) in
   the official order: each split shuffled with seed 42, as alignment-handbook's ``get_datasets``.
   A single file is the train split, with an optional seed-42 held-out eval fraction. Mixtures:
   the official recipes' ``dataset_mixer`` and alignment-handbook's ``dataset_mixture``, each
   dataset in any of those forms. Unusable data raises :class:`DataError`: one line naming the
   file, the split and the line at fault. :func:`load_raw_datasets` is the lower-level loader
   (file order, no held-out split).
2. :func:`apply_chat_template` turns a row of any of TRL's preference formats (:func:`split_row`)
   into three strings. Conversational rows (the gemma2-ultrafeedback-armorm schema, or an
   explicit message-list ``prompt``): the prompt messages through the chat template and each
   response alone through it, leading BOS stripped. Text rows: as they are. Rows that cannot be
   used (malformed messages, an empty response, mixed formats) are dropped and counted; a
   dataset missing a required column is an error.
3. :func:`tokenize_row` tokenises as the official trainer: ``enc(prompt) + enc(prompt + response)
   [len(enc(prompt)):]``; BOS prepended to the prompt only if missing; EOS appended to a response
   only if missing; if prompt + longer response exceeds ``max_length`` the prompt is cut to
   ``max_prompt_length`` (keeping its end under ``keep_end``), and if still too long both
   responses are cut to ``max_length - max_prompt_length``; prompt positions labelled -100.
4. :class:`SimPODataCollator` right-pads chosen and rejected rows to one length and stacks the
   chosen rows, then the rejected rows: ``input_ids``, ``attention_mask``, ``labels`` of ``[2B, T]``;
   with ``padding_free`` it packs the same ``2B`` sequences into rows of at most ``max_length``
   (``input_ids``, ``position_ids``, ``labels``, ``sequence_ids`` of ``[R, W]``, no attention mask).
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import torch

from .config import UserError, error_text, is_explicit_path

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

    from .config import DataArguments

logger = logging.getLogger(__name__)

EMBEDDED_DATA_DIR = Path(__file__).resolve().parent / "data"
REQUIRED_COLUMNS = ("chosen", "rejected")
TOKENIZED_COLUMNS = ("chosen_input_ids", "chosen_attention_mask", "chosen_labels",
                     "rejected_input_ids", "rejected_attention_mask", "rejected_labels")
_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# a dataset_name ending like this is meant as a local file, even when it does not exist
_FILE_LIKE_SUFFIXES = (*_FORMATS, ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zst")
# wrappers whose own message says nothing; the exception they wrap does
_UNINFORMATIVE_ERRORS = ("DatasetGenerationError",)
# alignment-handbook mix_datasets: concatenate_datasets(...).shuffle(seed=42) for train and test
OFFICIAL_SHUFFLE_SEED = 42
HELDOUT_SEED = 42
HELDOUT_SPLIT = "heldout"


# ----------------------------------------------------------------------------- loading

class DataError(UserError, ValueError):
    """Data the user pointed at cannot be used: a missing or unreadable file, malformed JSON or
    UTF-8 (the message names the file, the split and the line), an empty split, a missing column,
    a hub dataset that does not load. One line, printed without a traceback by ``simpo-train``."""


class LoadedSplits(NamedTuple):
    """What :func:`load_splits` decided: the train split, the eval split (None: no evaluation) and
    their names as they appear in messages and logs."""

    train: Dataset
    eval: Optional[Dataset]
    train_name: str
    eval_name: Optional[str]


@dataclass(frozen=True)
class _Problem:
    """What a scan of a data file found: the 1-based line it is on (None: the whole file)."""

    text: str
    line: Optional[int] = None


def _problem_message(where: str, problem: _Problem) -> str:
    at = f", line {problem.line}" if problem.line is not None else ""
    return f"{where}{at}: {problem.text}"


def _where_file(path: str, split: str) -> str:
    return f"data file {path} (split {split!r})"


def _where_hub(name: str, config: Optional[str], split: str) -> str:
    return f"dataset {name!r} (config {config!r}), split {split!r}"


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """The most specific message in ``exc``'s chain, on one line and at most ``limit`` characters.

    ``datasets`` wraps reader failures in a ``DatasetGenerationError`` whose own text says nothing
    ("An error occurred while generating the dataset"); its cause says what went wrong.
    """
    chain, seen, current = [], set(), exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    for candidate in chain:
        if type(candidate).__name__ in _UNINFORMATIVE_ERRORS:
            continue
        text = " ".join(line.strip() for line in str(candidate).splitlines() if line.strip())
        if text:
            text = f"{type(candidate).__name__}: {text}"
            return text if len(text) <= limit else text[: limit - 3] + "..."
    return type(exc).__name__


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "null" if value is None else type(value).__name__


def _diagnose_json_file(path: str) -> Optional[_Problem]:
    """The first problem that keeps ``datasets`` from reading a JSON or JSON Lines file, or None.

    Called only after a load failed, so good data never pays for it. The file is read line by
    line with strict UTF-8 decoding (invalid bytes are reported with their offset); a file whose
    first character is ``[`` is one JSON document, anything else is one JSON object per line.
    """
    first_char = None
    records = 0
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line_start = offset
            offset += len(raw)
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, line_start = raw[len(codecs.BOM_UTF8):], line_start + len(codecs.BOM_UTF8)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return _Problem(f"invalid UTF-8: byte 0x{raw[exc.start]:02x} at byte offset "
                                f"{line_start + exc.start} of the file (save it as UTF-8)", number)
            if not text.strip():
                continue
            if first_char is None:
                first_char = text.strip()[0]
            if first_char == "[":
                continue  # one JSON document: parsed whole once every line decoded
            records += 1
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                if records == 1:
                    # a pretty-printed document also fails on its first line; parsing the whole
                    # file tells the two apart and locates a document's error
                    return _diagnose_json_document(path)
                return _Problem(f"invalid JSON: {exc.msg} (column {exc.colno})", number)
            if not isinstance(value, dict):
                return _Problem(f"expected one JSON object per line, got {_json_kind(value)}", number)
    if first_char is None:
        return _Problem("no rows: the file holds only blank lines")
    if first_char == "[":
        return _diagnose_json_document(path)
    return None


def _diagnose_json_document(path: str) -> Optional[_Problem]:
    """Problems of a file holding a single JSON document (an array of row objects)."""
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return _Problem(f"invalid JSON: {exc.msg} (column {exc.colno})", exc.lineno)
    if isinstance(value, list):
        if not value:
            return _Problem("no rows: the file holds an empty JSON array")
        for index, row in enumerate(value):
            if not isinstance(row, dict):
                return _Problem(f"row {index + 1} of the JSON array is {_json_kind(row)}, "
                                f"not an object")
    return None


@contextlib.contextmanager
def _quiet_json_reader():
    """Hold back the JSON reader's own error log line while ``datasets`` loads a file: a failure
    is re-raised as one :class:`DataError` that says the same thing with the line number."""
    reader_logger = logging.getLogger("datasets.packaged_modules.json.json")

    def drop_errors(record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR

    reader_logger.addFilter(drop_errors)
    try:
        yield
    finally:
        reader_logger.removeFilter(drop_errors)


def _format_of(path: str, split: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in _FORMATS:
        raise DataError(f"{_where_file(path, split)}: unsupported file type {suffix or '(none)'!r} "
                        f"(use .json, .jsonl or .parquet)")
    return _FORMATS[suffix]


def _check_rows(dataset: Dataset, where: str) -> Dataset:
    if len(dataset) == 0:
        raise DataError(f"{where}: no rows")
    return dataset


def _check_columns(dataset: Dataset, where: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; preference data needs 'chosen' and "
                        f"'rejected' (texts or message lists; columns: {dataset.column_names})")


def _load_data_file(path: str, split: str) -> Dataset:
    """One local file as a ``Dataset``; every way it can fail is a one-line :class:`DataError`."""
    from datasets import load_dataset

    where = _where_file(path, split)
    fmt = _format_of(path, split)
    if os.path.getsize(path) == 0:
        raise DataError(f"{where}: the file is empty")
    try:
        with _quiet_json_reader():
            # one load per file (key "train" whatever the split is called): splits may differ in
            # schema, which a single multi-split load_dataset call refuses with a CastError
            dataset = load_dataset(fmt, data_files={"train": path}, split="train")
            # the JSON reader keeps invalid UTF-8 bytes in string columns and reading such a row
            # fails later, mid-preprocessing; arrow's full validation finds them now, in C++
            dataset.data.validate(full=True)
    except Exception as exc:
        problem = _diagnose_json_file(path) if fmt == "json" else None
        if problem is None:
            problem = _Problem(f"cannot be read: {_one_line(exc)}")
        raise DataError(_problem_message(where, problem)) from exc
    return _check_rows(dataset, where)


def _load_hub_split(name: str, config: Optional[str], split: str) -> Dataset:
    from datasets import load_dataset

    where = _where_hub(name, config, split)
    try:
        dataset = load_dataset(name, config, split=split)
    except Exception as exc:
        raise DataError(f"{where}: cannot be loaded: {_one_line(exc)}") from exc
    return _check_rows(dataset, where)


def _resolve_source(dataset_name: Optional[str]) -> tuple[str, Optional[str]]:
    """``(spec, layout)``: layout is ``"pattern"`` (a path with ``{split}``), ``"dir"``, ``"file"``,
    or None for a hub dataset name. A name that can only be a local path but names nothing is an
    error here rather than a confusing hub lookup."""
    if dataset_name is None:
        return str(EMBEDDED_DATA_DIR), "dir"
    spec = os.path.expanduser(dataset_name)
    if "{split}" in spec:
        return spec, "pattern"
    if os.path.isdir(spec):
        return spec, "dir"
    if os.path.isfile(spec):
        return spec, "file"
    if is_explicit_path(spec) or Path(spec).suffix.lower() in _FILE_LIKE_SUFFIXES:
        raise DataError(f"data path not found: {dataset_name}")
    return dataset_name, None


def _split_files(spec: str, layout: str, splits: list[str]) -> dict[str, str]:
    """Each split's local file, checked to exist and to share one supported format."""
    if layout == "file":
        files = {splits[0]: spec}
    elif layout == "pattern":
        files = {s: spec.replace("{split}", s) for s in splits}
    else:
        files = {}
        for s in splits:
            found = [str(Path(spec) / f"{s}{ext}") for ext in _FORMATS
                     if (Path(spec) / f"{s}{ext}").is_file()]
            if not found:
                present = sorted(p.name for p in Path(spec).iterdir()
                                 if p.suffix.lower() in _FORMATS and p.is_file())
                raise DataError(f"{spec}: no {s}.jsonl, {s}.json or {s}.parquet for split {s!r} "
                                f"(data files there: {', '.join(present) or 'none'})")
            files[s] = found[0]
    for s, path in files.items():
        if not os.path.isfile(path):
            raise DataError(f"data file for split {s!r} not found: {path}")
    formats = {path: _format_of(path, s) for s, path in files.items()}
    if len(set(formats.values())) > 1:
        raise DataError(f"mixed data file types ({', '.join(sorted(formats))}): use one format for "
                        f"all splits")
    return files


def _load_sources(spec: str, layout: Optional[str], splits: list[str],
                  config: Optional[str]) -> dict[str, tuple[Dataset, str]]:
    """Each split as ``(dataset, where)``, ``where`` naming its file or hub dataset for messages.
    Every file is located before any is loaded, so a missing one fails fast."""
    if layout is None:
        return {s: (_load_hub_split(spec, config, s), _where_hub(spec, config, s)) for s in splits}
    files = _split_files(spec, layout, splits)
    return {s: (_load_data_file(path, s), _where_file(path, s)) for s, path in files.items()}


def load_raw_datasets(dataset_name: Optional[str], splits: list[str],
                      config: Optional[str] = None) -> DatasetDict:
    """The requested splits, in file order, as a ``DatasetDict`` (default data: the shipped tiny
    set). Lower level than :func:`load_splits`: no shuffling, no held-out split, and a single
    local file serves exactly one split. Raises :class:`DataError` for unusable data."""
    from datasets import DatasetDict

    spec, layout = _resolve_source(dataset_name)
    if layout == "file" and len(splits) > 1:
        raise DataError(f"{spec} is a single file but splits {splits} were asked for: pass a "
                        f"directory of {{split}}.jsonl files, a path containing '{{split}}', or "
                        f"--dataset_splits train")
    out = DatasetDict()
    for s, (dataset, _) in _load_sources(spec, layout, list(splits), config).items():
        out[s] = dataset
    return out


def local_data_files(data_args: DataArguments) -> dict[str, str]:
    """The local file each split of :func:`load_splits` reads (``{split: path}``; the shipped data
    when no data is named), or ``{}`` for a hub dataset. For a mixture (``dataset_mixer`` /
    ``dataset_mixture``) each of its local datasets' files, keyed ``"{split} (dataset N)"`` (N: its
    place in the mixture); hub datasets in it have none. Raises :class:`DataError` where
    :func:`load_splits` would fail to find them."""
    splits = list(data_args.dataset_splits)
    if data_args.dataset_mixture is not None:
        wanted = [(entry["id"], [entry["split"]]) for entry in data_args.dataset_mixture["datasets"]]
    elif data_args.dataset_mixer is not None:
        wanted = [(name, splits) for name in data_args.dataset_mixer]
    else:
        spec, layout = _resolve_source(data_args.dataset_name)
        if layout is None:
            return {}
        return _split_files(spec, layout, splits[:1] if layout == "file" else splits)
    out = {}
    for number, (name, names) in enumerate(wanted, start=1):
        spec, layout = _resolve_source(name)
        if layout is not None:
            files = _split_files(spec, layout, names[:1] if layout == "file" else names)
            out.update({f"{split} (dataset {number})": path for split, path in files.items()})
    return out


class DataSource(NamedTuple):
    """One dataset a run reads, as named (a hub id or a path; None: the shipped data), its hub
    config, and the fraction of its rows taken (``dataset_mixer``: of its train split, a prefix;
    ``dataset_mixture``: its weight, a seeded sample; None: all of it, ``dataset_name``)."""

    name: Optional[str]
    config: Optional[str]
    fraction: Optional[float]


def data_sources(data_args: DataArguments) -> list[DataSource]:
    """The datasets of ``data_args`` (``dataset_name``, ``dataset_mixer`` or
    ``dataset_mixture``), in their order: e.g. what a model card names as the training data."""
    if data_args.dataset_mixture is not None:
        return [DataSource(e["id"], e["config"], e["weight"])
                for e in data_args.dataset_mixture["datasets"]]
    mixer = data_args.dataset_mixer
    if mixer is None:
        return [DataSource(data_args.dataset_name, data_args.dataset_config, None)]
    configs = data_args.dataset_configs or [None] * len(mixer)
    return [DataSource(name, config, fraction)
            for (name, fraction), config in zip(mixer.items(), configs)]


# the columns the pipeline reads; a mixture keeps only these (the official mix_datasets'
# columns_to_keep), so datasets with other extra columns concatenate
_DATA_COLUMNS = ("prompt", *REQUIRED_COLUMNS)


def _feature_kind(feature) -> str:
    from datasets import Value

    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        return "text"
    if type(feature).__name__ in ("List", "LargeList", "Sequence"):
        return "message lists"
    return str(feature)


def _concatenate(parts: list[tuple[Dataset, str]], label: str) -> Dataset:
    """The datasets of a mixture, their data columns only, one after the other; datasets of
    different formats (text in one, message lists in another) are a :class:`DataError` naming
    both."""
    from datasets import concatenate_datasets

    parts = [(ds.select_columns([c for c in ds.column_names if c in _DATA_COLUMNS]), where)
             for ds, where in parts]
    try:
        return concatenate_datasets([ds for ds, _ in parts])
    except (ValueError, TypeError) as exc:
        first, first_where = parts[0]
        for ds, where in parts[1:]:
            for column in _DATA_COLUMNS:
                a, b = first.features.get(column), ds.features.get(column)
                if a is not None and b is not None and a != b:
                    raise DataError(f"{label}: {first_where} and {where} cannot be mixed: column "
                                    f"{column!r} holds {_feature_kind(a)} in one and "
                                    f"{_feature_kind(b)} in the other") from exc
        raise DataError(f"{label}: the datasets cannot be concatenated: {_one_line(exc)}") from exc


def _hold_out(train: Dataset, fraction: float, where: str) -> tuple[Dataset, Dataset]:
    """``(rest, held_out)``: ``ceil(fraction * n)`` rows drawn with seed 42, both parts in file
    order, so the held-out rows depend only on the data and ``fraction``."""
    import numpy as np

    n = len(train)
    n_held = math.ceil(fraction * n)
    if n_held >= n:
        raise DataError(f"{where}: eval_fraction {fraction} of {n} row(s) leaves no row to train on")
    order = np.random.default_rng(HELDOUT_SEED).permutation(n)
    held, rest = np.sort(order[:n_held]), np.sort(order[n_held:])
    return train.select(rest.tolist()), train.select(held.tolist())


def load_splits(data_args: DataArguments) -> LoadedSplits:
    """Load the train and (optional) eval split as the official SimPO ``run_simpo.py`` does.

    * ``dataset_name`` is a hub dataset (loaded with ``dataset_config``), a local
      ``.json``/``.jsonl``/``.parquet`` file, a directory of ``{split}.<ext>`` files, a path
      containing ``{split}``, or None for the data shipped with the package.
      ``dataset_splits`` names the train split, then optionally the eval split.
    * A single local file is the train split whatever ``dataset_splits`` says; there is no eval
      split unless ``eval_fraction > 0``.
    * ``eval_fraction > 0`` holds ``ceil(eval_fraction * n)`` train rows out (drawn with seed 42,
      the same rows on every run) as the eval split ``"heldout"``; it is an error when the data
      already has an eval split.
    * ``dataset_mixer`` (``{dataset: fraction}``, the official recipes' key; each dataset as
      ``dataset_name`` takes it, ``dataset_configs`` their configs) is the official
      ``mix_datasets``: the first ``int(fraction * n)`` rows (file order) of each dataset's train
      split, concatenated in the mixer's order; each eval split whole, concatenated (a single
      file has none). One dataset at fraction 1.0 is exactly ``dataset_name``.
    * ``dataset_mixture`` is alignment-handbook's (:func:`_load_mixture`).
    * Official order: each split is shuffled with ``Dataset.shuffle(seed=42)``, as
      alignment-handbook's ``mix_datasets`` does (called by ``get_datasets`` in ``run_simpo.py``),
      before the trainer's own sampler; ``dataset_shuffle=False`` keeps file order.
    * ``max_train_samples`` / ``max_eval_samples`` then keep the first N rows of that order: with
      shuffling on, a seed-42 random subset that is a prefix of the full run's data order.

    Raises :class:`DataError` (one line naming the file or dataset, the split and, for malformed
    JSON, the line) for any data or data option that cannot be used.
    """
    if data_args.dataset_mixture is not None:
        return _load_mixture(data_args)
    # the options themselves (split count, eval_fraction range, ...) are DataArguments' checks
    splits = list(data_args.dataset_splits)
    fraction = data_args.eval_fraction
    sources = data_sources(data_args)
    mixer = data_args.dataset_mixer is not None
    resolved = [_resolve_source(source.name) for source in sources]

    train_name, eval_name = splits[0], (splits[1] if len(splits) == 2 else None)
    single_files = all(layout == "file" for _, layout in resolved)
    if single_files:
        eval_name = None
        what = ("every dataset of dataset_mixer is a single file: together they are"
                if mixer else f"{resolved[0][0]} is a single file: it is")
        if fraction > 0:
            logger.info("%s the %r split; eval_fraction %g of its rows is held out (seed %d) as "
                        "the eval split %r", what, train_name, fraction, HELDOUT_SEED,
                        HELDOUT_SPLIT)
        else:
            logger.info("%s the %r split, no eval split (set --eval_fraction to hold some rows "
                        "out)", what, train_name)
    elif fraction > 0 and eval_name is not None:
        raise DataError(f"eval_fraction {fraction} holds train rows out for evaluation, but the data "
                        f"already has the eval split {eval_name!r}: set eval_fraction to 0, or "
                        f"dataset_splits to [{train_name!r}] alone")

    def names(layout: Optional[str]) -> list[str]:
        return [train_name] + ([eval_name] if eval_name is not None and layout != "file" else [])

    local_data_files(data_args)  # every local file located before any dataset is loaded
    trains, evals = [], []
    for source, (spec, layout) in zip(sources, resolved):
        loaded = _load_sources(spec, layout, names(layout), source.config)
        for dataset, where in loaded.values():
            _check_columns(dataset, where)
        train, where = loaded[train_name]
        if source.fraction is not None:  # official mix_datasets: a prefix in file order
            train = train.select(range(int(source.fraction * len(train))))
            logger.info("dataset_mixer: %s: %d rows (fraction %g)%s", where, len(train),
                        source.fraction, "" if len(loaded) > 1 or eval_name is None
                        else "; a single file: no eval split from it")
        trains.append((train, where))
        if len(loaded) > 1:
            evals.append(loaded[eval_name])
    if mixer:
        train, train_where = _concatenate(trains, "dataset_mixer"), "dataset_mixer's train rows"
        if len(train) == 0:
            raise DataError("dataset_mixer: its fractions take no train row (each takes "
                            "int(fraction * rows) of its dataset): raise them")
        eval_ds = _concatenate(evals, "dataset_mixer") if evals else None
    else:
        (train, train_where), eval_ds = trains[0], (evals[0][0] if evals else None)
    if eval_ds is None and not single_files:
        eval_name = None
    if fraction > 0:
        train, eval_ds = _hold_out(train, fraction, train_where)
        eval_name = HELDOUT_SPLIT
    elif eval_name is None and not single_files:
        logger.info("dataset_splits names no eval split: no evaluation (set --eval_fraction to "
                    "hold some train rows out)")
    if data_args.dataset_shuffle:
        train = train.shuffle(seed=OFFICIAL_SHUFFLE_SEED)
        eval_ds = eval_ds.shuffle(seed=OFFICIAL_SHUFFLE_SEED) if eval_ds is not None else None
    order = (f"shuffled with seed {OFFICIAL_SHUFFLE_SEED} (official order)"
             if data_args.dataset_shuffle else "file order")
    return _capped(LoadedSplits(train, eval_ds, train_name, eval_name), data_args, order)


def _capped(loaded: LoadedSplits, data_args: DataArguments, order: str) -> LoadedSplits:
    """``max_train_samples`` / ``max_eval_samples``: the first rows of the final order."""
    train, eval_ds = loaded.train, loaded.eval
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if eval_ds is not None and data_args.max_eval_samples is not None:
        eval_ds = eval_ds.select(range(min(data_args.max_eval_samples, len(eval_ds))))
    logger.info("train split %r: %d rows; eval split %s; %s", loaded.train_name, len(train),
                f"{loaded.eval_name!r}: {len(eval_ds)} rows" if eval_ds is not None else "none",
                order)
    return loaded._replace(train=train, eval=eval_ds)


def _load_mixture(data_args: DataArguments) -> LoadedSplits:
    """alignment-handbook's ``get_dataset`` for a ``dataset_mixture`` (its defaults filled in by
    :class:`~simpo.config.DataArguments`): each dataset's ``split`` (hub id or local path, as
    ``dataset_name``), its ``columns`` selected, a sample of ``int(rows * weight)`` rows after a
    ``seed`` shuffle; all concatenated and shuffled with ``seed``; ``test_split_size`` (a fraction
    or a row count) then splits the eval split ``"test"`` off with
    ``train_test_split(seed=seed)``; without it there is no eval split."""
    mixture = data_args.dataset_mixture
    seed = mixture["seed"]
    local_data_files(data_args)  # every local file located before any dataset is loaded
    parts = []
    for entry in mixture["datasets"]:
        spec, layout = _resolve_source(entry["id"])
        ((dataset, where),) = _load_sources(spec, layout, [entry["split"]],
                                            entry["config"]).values()
        columns = entry["columns"]
        if columns is not None:
            missing = [c for c in columns if c not in dataset.column_names]
            if missing:
                raise DataError(f"{where}: dataset_mixture columns {missing} not found (columns: "
                                f"{dataset.column_names})")
            dataset = dataset.select_columns(columns)
        _check_columns(dataset, where)
        # every dataset is sampled (weight defaults to 1.0: then only shuffled), as the handbook
        dataset = dataset.shuffle(seed=seed).select(range(int(len(dataset) * entry["weight"])))
        logger.info("dataset_mixture: %s: %d rows (weight %g)", where, len(dataset), entry["weight"])
        parts.append((dataset, where))
    train = _concatenate(parts, "dataset_mixture").shuffle(seed=seed)
    if len(train) == 0:
        raise DataError("dataset_mixture: its weights take no row (each takes int(rows * weight) "
                        "of its dataset): raise them")
    eval_ds, eval_name, test = None, None, mixture["test_split_size"]
    if test is not None:
        try:
            split = train.train_test_split(test_size=test, seed=seed)
        except ValueError as exc:
            raise DataError(f"dataset_mixture: test_split_size {test} of {len(train)} rows: "
                            f"{error_text(exc)}") from exc
        train, eval_ds, eval_name = split["train"], split["test"], "test"
    else:
        logger.info("dataset_mixture has no test_split_size: no eval split")
    return _capped(LoadedSplits(train, eval_ds, "train", eval_name), data_args,
                   f"shuffled with seed {seed} (alignment-handbook dataset_mixture)")


# ----------------------------------------------------------------------------- templating

def _is_message_list(value) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str) for m in value))


class PreferenceParts(NamedTuple):
    """A row in TRL's explicit-prompt form: ``prompt`` and the two responses, message lists
    (``conversational``) or plain text."""

    conversational: bool
    prompt: Any
    chosen: Any
    rejected: Any


def _value_format(value) -> Optional[str]:
    if isinstance(value, str):
        return "text"
    return "messages" if _is_message_list(value) else None


def common_prompt(chosen: str, rejected: str) -> str:
    """The implicit prompt of a text pair, as TRL's ``extract_prompt``: the common prefix of
    ``chosen`` and ``rejected``, less a space just before their first difference (the space
    starts the responses). Empty when they differ from the first character, or when one is a
    prefix of the other (then a response would be empty)."""
    n = min(len(chosen), len(rejected))
    idx = next((i for i in range(n) if chosen[i] != rejected[i]), None)
    if idx is None:
        return ""
    if idx > 0 and chosen[idx - 1] == " ":
        idx -= 1
    return chosen[:idx]


def split_row(row: dict) -> tuple[Optional[PreferenceParts], Optional[str]]:
    """``(parts, None)`` for a usable row of any of TRL's preference formats, ``(None, why)`` else.

    * conversational, implicit prompt (the gemma2-ultrafeedback-armorm schema): ``chosen`` and
      ``rejected`` hold whole conversations; the prompt is ``chosen[:-1]`` and the responses the
      last messages, as the official ``apply_chat_template(task="simpo")``, which ignores a
      ``prompt`` text column beside them;
    * conversational, explicit prompt: ``prompt`` is a message list, ``chosen`` / ``rejected`` the
      response message(s);
    * standard, explicit prompt: ``prompt``, ``chosen`` and ``rejected`` are strings;
    * standard, implicit prompt: ``chosen`` and ``rejected`` are whole texts; the prompt is their
      common prefix (:func:`common_prompt`, TRL's ``extract_prompt``).
    """
    formats = {key: _value_format(row.get(key)) for key in REQUIRED_COLUMNS}
    for key, fmt in formats.items():
        if fmt is None:
            return None, f"{key} is neither text nor a list of {{role, content}} messages"
    if formats["chosen"] != formats["rejected"]:
        return None, "chosen and rejected mix text and messages"
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if formats["chosen"] == "text":
        if prompt is None:
            prompt = common_prompt(chosen, rejected)
            if not prompt:
                return None, ("chosen and rejected texts share no prompt (without a prompt column "
                              "each holds prompt + response)")
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
        elif not isinstance(prompt, str):
            return None, "prompt is a message list but chosen and rejected are text"
        for key, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                return None, f"the {key} response is empty"
        return PreferenceParts(False, prompt, chosen, rejected), None
    if prompt is not None and not isinstance(prompt, str):
        if not _is_message_list(prompt):
            return None, "prompt is neither text nor a list of {role, content} messages"
        parts = PreferenceParts(True, prompt, chosen, rejected)
    else:
        for key, msgs in (("chosen", chosen), ("rejected", rejected)):
            if len(msgs) < 2:
                return None, f"{key} has no prompt messages before the response"
        parts = PreferenceParts(True, chosen[:-1], chosen[-1:], rejected[-1:])
    for key, msgs in (("chosen", parts.chosen), ("rejected", parts.rejected)):
        if msgs[-1]["role"] != "assistant":
            return None, f"the last message of {key} is not an assistant message"
        if not msgs[-1]["content"].strip():
            return None, f"the {key} response is empty"
    return parts, None


def row_problem(row: dict) -> Optional[str]:
    """Why a row cannot be used (None if it can)."""
    return split_row(row)[1]


def data_texts(splits) -> list[str]:
    """Every text of the ``prompt`` / ``chosen`` / ``rejected`` columns of ``splits`` (strings, and
    message contents), e.g. the embedded tiny tokenizer's vocabulary."""
    texts = []
    for split in splits:
        for column in _DATA_COLUMNS:
            if column not in split.column_names:
                continue
            for value in split[column]:
                if isinstance(value, str):
                    texts.append(value)
                elif isinstance(value, list):
                    texts.extend(m["content"] for m in value
                                 if isinstance(m, dict) and isinstance(m.get("content"), str))
    return texts


def needs_chat_template(splits) -> bool:
    """Whether any of ``splits`` is conversational: text rows use no chat template, so a base
    model's tokenizer without one can train on them. Read off the column types (an Arrow column
    holds one type), without a pass over the rows."""
    return any("chosen" in split.column_names
               and _feature_kind(split.features["chosen"]) == "message lists" for split in splits)


def _template_mentions_system(tokenizer) -> bool:
    template = tokenizer.chat_template or ""
    return "system" in template or "<|im_start|>" in template


def apply_chat_template(row: dict, tokenizer, auto_insert_empty_system_msg: bool = True) -> dict:
    """A row of any accepted format -> ``{"prompt", "chosen", "rejected"}`` strings.

    Conversational rows as the official ``apply_chat_template(task="simpo")``: the prompt messages
    through the chat template, each response's messages alone through it with a leading BOS
    stripped. Standard (text) rows are used as they are, without a template (as TRL)."""
    parts, problem = split_row(row)
    if problem is not None:
        raise ValueError(problem)
    if not parts.conversational:
        return {"prompt": parts.prompt, "chosen": parts.chosen, "rejected": parts.rejected}
    prompt_messages = [dict(m) for m in parts.prompt]
    if auto_insert_empty_system_msg and prompt_messages[0]["role"] != "system" \
            and _template_mentions_system(tokenizer):
        prompt_messages.insert(0, {"role": "system", "content": ""})
    out = {"prompt": tokenizer.apply_chat_template(prompt_messages, tokenize=False)}
    bos = tokenizer.bos_token or ""
    for key in REQUIRED_COLUMNS:
        text = tokenizer.apply_chat_template(list(getattr(parts, key)), tokenize=False)
        if bos and text.startswith(bos):
            text = text[len(bos):]
        out[key] = text
    return out


# ----------------------------------------------------------------------------- tokenisation

def _split_answer(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """``enc(prompt + answer)`` split into prompt and answer ids (official ``build_tokenized_answer``).

    Some tokenizers merge the prompt's last token with the answer's first; then the boundary moves
    one token left, so the answer keeps every token that ``enc(prompt + answer)`` produced for it.
    """
    full = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    start = len(prompt_ids)
    if prompt_ids != full[:start]:
        start -= 1
    return list(full[:start]), list(full[start:])


def tokenize_row(prompt: str, chosen: str, rejected: str, tokenizer, *, max_length: int,
                 max_prompt_length: int, truncation_mode: str = "keep_end",
                 label_pad_token_id: int = -100) -> dict[str, list[int]]:
    """One templated row -> ``chosen_*`` / ``rejected_*`` ``input_ids``, ``attention_mask``, ``labels``."""
    if not isinstance(prompt, str) or not isinstance(chosen, str) or not isinstance(rejected, str):
        raise ValueError("prompt, chosen and rejected must be strings after templating")
    parts = {k: _split_answer(tokenizer, prompt, text) for k, text in (("chosen", chosen),
                                                                         ("rejected", rejected))}
    cp, rp = parts["chosen"][0], parts["rejected"][0]
    if sum(a != b for a, b in zip(cp, rp)) > 1 or abs(len(cp) - len(rp)) > 1:
        raise ValueError("chosen and rejected prompt ids may only differ in the last token "
                         "(tokenizer merges)")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    seqs = {}
    for key, (p_ids, a_ids) in parts.items():
        if bos is not None and (not p_ids or p_ids[0] != bos):
            p_ids = [bos] + p_ids
        if eos is not None and (not a_ids or a_ids[-1] != eos):
            a_ids = a_ids + [eos]
        seqs[key] = [p_ids, a_ids]
    longer = max(len(seqs["chosen"][1]), len(seqs["rejected"][1]))
    for key in seqs:  # first the prompt ...
        if len(seqs[key][0]) + longer > max_length:
            if truncation_mode == "keep_end":
                seqs[key][0] = seqs[key][0][-max_prompt_length:]
            elif truncation_mode == "keep_start":
                seqs[key][0] = seqs[key][0][:max_prompt_length]
            else:
                raise ValueError(f"unknown truncation_mode {truncation_mode!r}")
    for key in seqs:  # ... then, if still too long, the responses
        if len(seqs[key][0]) + longer > max_length:
            seqs[key][1] = seqs[key][1][: max_length - max_prompt_length]
    out = {}
    for key, (p_ids, a_ids) in seqs.items():
        out[f"{key}_input_ids"] = p_ids + a_ids
        out[f"{key}_attention_mask"] = [1] * (len(p_ids) + len(a_ids))
        out[f"{key}_labels"] = [label_pad_token_id] * len(p_ids) + a_ids
    return out


# ----------------------------------------------------------------------------- whole pipeline

def prepare_dataset(raw, tokenizer, args, *, auto_insert_empty_system_msg: bool = True,
                    num_proc: Optional[int] = None, split_name: str = "train"):
    """Validate, template and tokenise a raw preference ``Dataset``; returns the tokenised one.

    Rows that cannot be used are dropped with a warning counting them by reason; a missing
    ``chosen`` / ``rejected`` column, or no usable row at all, raises :class:`DataError`.

    Pairs whose chosen and rejected sides are identical as the model sees them (the same token
    ids after templating, tokenisation and truncation to ``max_length``) carry no preference: their
    rewards are equal, so the SimPO term of the loss is a constant for them with no gradient (only
    ``sft_weight``'s term learns from them), and in evaluation they count as wrongly ranked. Some
    of them: a warning with their count. All of them: :class:`DataError`, for an eval split as for the train split (the same data mistake,
    e.g. one column copied into the other, whose eval accuracy 0 and margin 0 would measure
    nothing), found before any model is loaded."""
    _check_columns(raw, f"split {split_name!r}")
    n_before = len(raw)
    problems = [row_problem(r) for r in raw]
    keep = [i for i, p in enumerate(problems) if p is None]
    if len(keep) < n_before:
        reasons = {}
        for p in problems:
            if p is not None:
                reasons[p] = reasons.get(p, 0) + 1
        logger.warning("%s: dropped %d of %d rows that cannot be used: %s", split_name,
                       n_before - len(keep), n_before,
                       "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items())))
        raw = raw.select(keep)
    if len(raw) == 0:
        raise DataError(f"split {split_name!r}: no usable rows (every row was dropped, see the "
                        f"warning above)")

    def _process(row):
        text = apply_chat_template(row, tokenizer, auto_insert_empty_system_msg)
        out = tokenize_row(text["prompt"], text["chosen"], text["rejected"], tokenizer,
                           max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                           truncation_mode=args.truncation_mode,
                           label_pad_token_id=args.label_pad_token_id)
        out[_SAME_PAIR] = all(out[f"chosen_{k}"] == out[f"rejected_{k}"]
                              for k in ("input_ids", "labels"))
        return out

    tokenized = raw.map(_process, remove_columns=raw.column_names, num_proc=num_proc,
                        desc=f"Templating and tokenising {split_name}")
    _check_identical_pairs(sum(tokenized[_SAME_PAIR]), len(tokenized), split_name, args.max_length)
    return tokenized.remove_columns(_SAME_PAIR)


_SAME_PAIR = "_chosen_equals_rejected"  # a temporary column of prepare_dataset


def _check_identical_pairs(same: int, total: int, split_name: str, max_length: int) -> None:
    if not same:
        return
    what = (f"chosen and rejected identical as the model sees them (the same token ids after the "
            f"chat template and truncation to max_length {max_length})")
    if same == total:
        raise DataError(f"split {split_name!r}: all {total} pairs have {what}: there is no "
                        f"preference to learn or measure; check that the 'chosen' and 'rejected' "
                        f"columns hold different responses (and that max_length keeps them apart)")
    logger.warning("split %r: %d of %d pairs have %s: they carry no preference (equal rewards: "
                   "no gradient from the SimPO term) and count as wrongly ranked in evaluation",
                   split_name, same, total, what)


def check_optimizer_steps(train_rows: int, args, split_name: str = "train",
                          eval_rows: Optional[int] = None, eval_split_name: str = "eval") -> int:
    """The number of optimizer steps a run of ``args`` takes on ``train_rows`` rows (as the
    Trainer counts them: per-process batches of ``train_batch_size`` over ``world_size``
    processes, the incomplete one dropped under ``dataloader_drop_last``, ``max_steps`` or
    ``num_train_epochs`` of ``ceil(batches / gradient_accumulation_steps)`` steps). Refuses with
    :class:`DataError` (before any model is loaded) when it is 0, and likewise an eval split that
    ``dataloader_drop_last`` would leave without a single batch."""
    processes = max(1, args.world_size)
    batch = args.train_batch_size
    batches = _batches(train_rows, batch * processes, args.dataloader_drop_last)
    if batches == 0:
        steps = 0
    elif args.max_steps > 0:
        steps = args.max_steps
    else:
        per_epoch = math.ceil(batches / args.gradient_accumulation_steps)
        steps = math.ceil(args.num_train_epochs * per_epoch)
    if steps == 0:
        raise DataError(f"split {split_name!r}: {train_rows} row(s) do not fill one batch of "
                        f"{batch} (per-device batch) x {processes} process(es) and "
                        f"dataloader_drop_last drops it: 0 optimizer steps. Set "
                        f"--dataloader_drop_last false, lower --per_device_train_batch_size, or "
                        f"use more data")
    if eval_rows is not None:
        eval_batch = args.eval_batch_size
        if _batches(eval_rows, eval_batch * processes, args.dataloader_drop_last) == 0:
            raise DataError(f"split {eval_split_name!r}: {eval_rows} row(s) do not fill one batch "
                            f"of {eval_batch} (per-device eval batch) x {processes} process(es) and "
                            f"dataloader_drop_last drops it: evaluation would see no pair. Set "
                            f"--dataloader_drop_last false, lower --per_device_eval_batch_size, or "
                            f"use more eval data")
    return steps


def _batches(rows: int, global_batch: int, drop_last: bool) -> int:
    """Batches each process gets (accelerate shards every global batch over the processes)."""
    return rows // global_batch if drop_last else math.ceil(rows / global_batch)


class SimPODataCollator:
    """Pads chosen and rejected rows to one length (right padding) and stacks chosen then rejected.
    Rows that carry reference log-probs (``ref_chosen_logps`` / ``ref_rejected_logps``, see
    :mod:`simpo.reference`) give the batch those two ``[B]`` float64 tensors too.

    ``padding_free=True``: the step's ``2B`` sequences (sequence ``i`` = chosen of pair ``i``,
    ``B + i`` = its rejected) are packed into rows of at most ``max_length`` tokens
    (:func:`simpo.packing.plan_rows`; ``one_row``: all in one row, for FlashAttention-2) instead:
    ``input_ids``, ``position_ids`` (restarting at 0 per sequence; the padding at a row's end
    numbered 0.. as a sequence of its own), ``labels`` (``label_pad_token_id`` on prompt and
    padding) and ``sequence_ids`` (the pair-layout index, -1 on padding), all ``[R, W]`` int64, and
    no ``attention_mask``: transformers builds block-diagonal causal masks from ``position_ids``.
    The same pairs per batch; only the padding goes."""

    def __init__(self, pad_token_id: int, label_pad_token_id: int = -100, *,
                 padding_free: bool = False, max_length: Optional[int] = None,
                 one_row: bool = False):
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token and no padding_value was given")
        if padding_free and not one_row and (max_length is None or int(max_length) < 1):
            raise ValueError(f"padding_free needs max_length >= 1 (the row capacity), got {max_length}")
        self.pad_token_id = int(pad_token_id)
        self.label_pad_token_id = int(label_pad_token_id)
        self.padding_free = bool(padding_free)
        self.max_length = None if max_length is None else int(max_length)
        self.one_row = bool(one_row)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._packed(features) if self.padding_free else self._padded(features)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in features[0]:
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float64)
        return batch

    def _padded(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [f[f"{side}_input_ids"] for side in ("chosen", "rejected") for f in features]
        T = max(len(r) for r in rows)
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": self.label_pad_token_id}
        batch = {}
        for key, pad in pads.items():
            data = [list(f[f"{side}_{key}"]) for side in ("chosen", "rejected") for f in features]
            batch[key] = torch.tensor([r + [pad] * (T - len(r)) for r in data], dtype=torch.long)
        return batch

    def _packed(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from .packing import pack_sequences

        ids = [list(f[f"{side}_input_ids"]) for side in ("chosen", "rejected") for f in features]
        labels = [list(f[f"{side}_labels"]) for side in ("chosen", "rejected") for f in features]
        for side in ("chosen", "rejected"):
            for i, f in enumerate(features):
                mask = f.get(f"{side}_attention_mask")
                # a sequence is its input ids: a masked token inside one would be attended to here
                if mask is not None and not all(int(m) == 1 for m in mask):
                    raise ValueError(f"padding_free: the {side} sequence of pair {i} has "
                                     f"attention_mask zeros; packed sequences must be unpadded")
        return pack_sequences(ids, labels, self.max_length or max(len(r) for r in ids), self.pad_token_id,
                              one_row=self.one_row, label_pad_token_id=self.label_pad_token_id)
