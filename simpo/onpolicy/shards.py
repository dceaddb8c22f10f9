"""Resumable JSONL output of one pipeline step, written by one or more processes.

A step's directory holds ``manifest.json`` (what the step computes: its inputs and settings) and
``shard-RRR.jsonl`` files, one per process rank, of one JSON record per line, each keyed by the
``index`` of its prompt. Records are appended a whole unit of work (a batch) at a time with one
``os.write`` of complete lines, then ``fsync``: a ``kill -9`` lands between two batches, and the
batch it interrupted is simply done again. A line is a record only when it is complete (ends in a
newline and parses); a torn tail left by a crash inside a write (a full disk, a power loss) is cut
off before anything is appended. On a resume every rank reads every shard (the number of
processes may change between runs), skips the indices already there, and the merge keeps exactly
one record per index, so nothing is duplicated and nothing is lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterable

from ..config import UserError

MANIFEST = "manifest.json"
logger = logging.getLogger("simpo.onpolicy")


def canonical(value) -> str:
    """The JSON text that identifies ``value`` (sorted keys, no spaces)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old file
    or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def read_complete_lines(path: Path) -> tuple[list[dict], int]:
    """``(records, n_good_bytes)``: the complete, parseable lines of ``path`` from its start up to
    the first torn or unparseable one, and the byte length of that good prefix."""
    data = path.read_bytes()
    records, good = [], 0
    while good < len(data):
        end = data.find(b"\n", good)
        if end < 0:
            break
        try:
            record = json.loads(data[good:end])
        except ValueError:
            break
        if not isinstance(record, dict) or not isinstance(record.get("index"), int):
            break
        records.append(record)
        good = end + 1
    return records, good


class ShardStore:
    """The output directory of one step (see the module docstring).

    ``manifest``: what this step computes; a directory holding another step's or another
    setting's output is refused (one line naming the keys that differ) instead of being mixed in.
    """

    def __init__(self, directory: Path, manifest: dict, *, rank: int = 0, what: str = "step"):
        self.directory = Path(directory)
        self.manifest = manifest
        self.rank = rank
        self.what = what

    @property
    def shard(self) -> Path:
        return self.directory / f"shard-{self.rank:03d}.jsonl"

    def shards(self) -> list[Path]:
        return sorted(self.directory.glob("shard-*.jsonl"))

    def prepare(self) -> None:
        """Rank 0, before the others read: check or write the manifest, cut torn tails."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / MANIFEST
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except ValueError:
                old = None
            if old != self.manifest:
                differ = sorted(k for k in set(self.manifest) | set(old or {})
                                if (old or {}).get(k) != self.manifest.get(k))
                raise UserError(
                    f"{self.directory} holds the {self.what} output of other settings (differing: "
                    f"{', '.join(differ) or 'unreadable manifest'}): use another output_dir, or "
                    f"delete {self.directory} to start this step again")
        else:
            write_atomic(path, json.dumps(self.manifest, indent=1, sort_keys=True) + "\n")
        for shard in self.shards():
            _, good = read_complete_lines(shard)
            if good < shard.stat().st_size:
                with open(shard, "r+b") as f:
                    f.truncate(good)
                    os.fsync(f.fileno())

    def resume(self, state) -> dict[int, dict]:
        """Open the store on every rank of ``state`` (an accelerate ``PartialState``): rank 0
        prepares it, then every rank reads what is done, and none appends before all have read."""
        if state.is_main_process:
            self.prepare()
        state.wait_for_everyone()
        done = self.done()
        state.wait_for_everyone()
        return done

    def done(self) -> dict[int, dict]:
        """Every complete record of every shard, by index (the first one of an index wins)."""
        return self._read()[0]

    def _read(self) -> tuple[dict[int, dict], int]:
        out: dict[int, dict] = {}
        extra = 0  # records beyond the first of an index (0 unless something is wrong)
        for shard in self.shards():
            for record in read_complete_lines(shard)[0]:
                extra += record["index"] in out
                out.setdefault(record["index"], record)
        return out, extra

    def append(self, records: list[dict]) -> None:
        """Append ``records`` to this rank's shard as one write of whole lines, then fsync."""
        data = jsonl(records).encode("utf-8")
        fd = os.open(self.shard, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def merge(self, indices: list[int], path: Path) -> tuple[list[dict], int]:
        """Rank 0, after every rank finished: one record per index of ``indices`` in that order,
        written to ``path`` (atomically), and the number of duplicate records the shards held. A
        missing index is an error, not a shorter file."""
        done, duplicates = self._read()
        missing = [i for i in indices if i not in done]
        if missing:
            raise UserError(f"{self.directory}: {len(missing)} of {len(indices)} prompts have no "
                            f"{self.what} record (first: index {missing[0]}); run the step again "
                            f"to complete it")
        records = [done[i] for i in indices]
        write_atomic(path, jsonl(records))
        return records, duplicates


def read_jsonl(path: Path, what: str) -> list[dict]:
    """A merged step output, whole; a missing or torn file is a one-line error."""
    if not path.is_file():
        raise UserError(f"{path} not found: run the {what} step first (--steps {what})")
    records, good = read_complete_lines(path)
    if good != path.stat().st_size:
        raise UserError(f"{path} is damaged after record {len(records)}: run the {what} step again")
    return records


def run_batches(store, indices: list[int], done, batch_size: int, rank: int, world: int, work,
                label: str) -> dict:
    """Cut ``indices`` (every index of the step, in order) into batches of ``batch_size``; of the
    batches with an index not in ``done``, give the ``j``-th to rank ``j % world``, and append the
    records of its undone indices (``work(indices)``) as one unit. A resumed run thus redoes
    exactly the batches a kill interrupted, with the same rows in them. Returns this rank's
    ``{"prompts", "batches", "seconds"}``."""
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    pending = [[i for i in b if i not in done] for b in batches]
    mine = [b for b in pending if b][rank::world]
    start, items = time.perf_counter(), 0
    for j, batch in enumerate(mine):
        store.append(work(batch))
        items += len(batch)
        logger.info("%s: rank %d batch %d/%d (%d prompts) written", label, rank, j + 1, len(mine),
                    len(batch))
    return {"prompts": items, "batches": len(mine), "seconds": time.perf_counter() - start}
