"""Data pipeline (official SimPO semantics, DESIGN section 3).

1. :func:`load_raw_datasets` loads preference data through ``datasets``: a hub name, a local
   JSON/JSONL/parquet file, a directory of ``{split}.<ext>`` files, or a path with ``{split}``.
2. :func:`apply_chat_template` turns a row of the gemma2-ultrafeedback-armorm schema (``chosen`` /
   ``rejected`` as message lists) into three strings: the prompt (all messages but the last,
   through the chat template) and the two responses (the last message alone through the template,
   leading BOS stripped). Rows that cannot be formatted (missing or malformed messages, an empty
   response) are dropped and counted; a dataset missing a required column is an error.
3. :func:`tokenize_row` tokenises as the official trainer: ``enc(prompt) + enc(prompt + response)
   [len(enc(prompt)):]``; BOS prepended to the prompt only if missing; EOS appended to a response
   only if missing; if prompt + longer response exceeds ``max_length`` the prompt is cut to
   ``max_prompt_length`` (keeping its end under ``keep_end``), and if still too long both
   responses are cut to ``max_length - max_prompt_length``; prompt positions labelled -100.
4. :class:`SimPODataCollator` right-pads chosen and rejected rows to one length and stacks the
   chosen rows, then the rejected rows: ``input_ids``, ``attention_mask``, ``labels`` of ``[2B, T]``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)

EMBEDDED_DATA_DIR = Path(__file__).resolve().parent / "data"
REQUIRED_COLUMNS = ("chosen", "rejected")
TOKENIZED_COLUMNS = ("chosen_input_ids", "chosen_attention_mask", "chosen_labels",
                     "rejected_input_ids", "rejected_attention_mask", "rejected_labels")
_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


# ----------------------------------------------------------------------------- loading

def _format_of(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in _FORMATS:
        raise ValueError(f"{path}: unsupported data file type {suffix!r} (use .json, .jsonl or .parquet)")
    return _FORMATS[suffix]


def _local_split_files(spec: str, splits: list[str]) -> Optional[dict[str, str]]:
    """Map each split to a local file, or None if ``spec`` does not name local data."""
    if "{split}" in spec:
        files = {s: spec.format(split=s) for s in splits}
    elif os.path.isdir(spec):
        files = {}
        for s in splits:
            found = [str(Path(spec) / f"{s}{ext}") for ext in _FORMATS
                     if (Path(spec) / f"{s}{ext}").is_file()]
            if not found:
                raise FileNotFoundError(f"{spec}: no {s}.jsonl / {s}.json / {s}.parquet for split {s!r}")
            files[s] = found[0]
    elif os.path.isfile(spec):
        if len(splits) > 1:
            raise ValueError(
                f"{spec} is a single file but splits {splits} were asked for: pass a directory of "
                f"{{split}}.jsonl files, a path containing '{{split}}', or --dataset_splits train")
        files = {splits[0]: spec}
    else:
        return None
    for s, f in files.items():
        if not os.path.isfile(f):
            raise FileNotFoundError(f"data file for split {s!r} not found: {f}")
    return files


def load_raw_datasets(dataset_name: Optional[str], splits: list[str], config: Optional[str] = None):
    """A ``DatasetDict`` with the requested splits (default data: the shipped tiny set)."""
    from datasets import DatasetDict, load_dataset

    spec = str(EMBEDDED_DATA_DIR) if dataset_name is None else dataset_name
    files = _local_split_files(spec, splits)
    out = DatasetDict()
    if files is not None:
        formats = {_format_of(f) for f in files.values()}
        if len(formats) != 1:
            raise ValueError(f"mixed data file types {sorted(formats)}: use one format for all splits")
        loaded = load_dataset(formats.pop(), data_files=files)
        for s in splits:
            out[s] = loaded[s]
    else:
        for s in splits:
            out[s] = load_dataset(spec, config, split=s)
    return out


# ----------------------------------------------------------------------------- templating

def _is_message_list(value) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str) for m in value))


def row_problem(row: dict) -> Optional[str]:
    """Why a row cannot be used (None if it can)."""
    for key in REQUIRED_COLUMNS:
        msgs = row.get(key)
        if not _is_message_list(msgs):
            return f"{key} is not a list of {{role, content}} messages"
        if len(msgs) < 2:
            return f"{key} has no prompt messages before the response"
        if msgs[-1]["role"] != "assistant":
            return f"the last message of {key} is not an assistant message"
        if not msgs[-1]["content"].strip():
            return f"the {key} response is empty"
    return None


def _template_mentions_system(tokenizer) -> bool:
    template = tokenizer.chat_template or ""
    return "system" in template or "<|im_start|>" in template


def apply_chat_template(row: dict, tokenizer, auto_insert_empty_system_msg: bool = True) -> dict:
    """Official ``apply_chat_template(task="simpo")``: -> ``{"prompt", "chosen", "rejected"}`` strings."""
    prompt_messages = [dict(m) for m in row["chosen"][:-1]]
    if auto_insert_empty_system_msg and prompt_messages[0]["role"] != "system" \
            and _template_mentions_system(tokenizer):
        prompt_messages.insert(0, {"role": "system", "content": ""})
    out = {"prompt": tokenizer.apply_chat_template(prompt_messages, tokenize=False)}
    bos = tokenizer.bos_token or ""
    for key in REQUIRED_COLUMNS:
        text = tokenizer.apply_chat_template(row[key][-1:], tokenize=False)
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
    """Validate, template and tokenise a raw preference ``Dataset``; returns the tokenised one."""
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.column_names]
    if missing:
        raise ValueError(f"{split_name} split is missing column(s) {missing}; preference data needs "
                         f"'chosen' and 'rejected' message lists (columns: {raw.column_names})")
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
        raise ValueError(f"{split_name} split has no usable rows")

    def _process(row):
        text = apply_chat_template(row, tokenizer, auto_insert_empty_system_msg)
        return tokenize_row(text["prompt"], text["chosen"], text["rejected"], tokenizer,
                            max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                            truncation_mode=args.truncation_mode,
                            label_pad_token_id=args.label_pad_token_id)

    return raw.map(_process, remove_columns=raw.column_names, num_proc=num_proc,
                   desc=f"Templating and tokenising {split_name}")


class SimPODataCollator:
    """Pads chosen and rejected rows to one length (right padding) and stacks chosen then rejected."""

    def __init__(self, pad_token_id: int, label_pad_token_id: int = -100):
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token and no padding_value was given")
        self.pad_token_id = int(pad_token_id)
        self.label_pad_token_id = int(label_pad_token_id)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [f[f"{side}_input_ids"] for side in ("chosen", "rejected") for f in features]
        T = max(len(r) for r in rows)
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": self.label_pad_token_id}
        batch = {}
        for key, pad in pads.items():
            data = [list(f[f"{side}_{key}"]) for side in ("chosen", "rejected") for f in features]
            batch[key] = torch.tensor([r + [pad] * (T - len(r)) for r in data], dtype=torch.long)
        return batch
