"""Measured launch choices per GPU model: written by the GPU campaign, read by the launchers.

One JSON file per GPU model, ``<slug of the device name>.json`` in this folder (for example
``nvidia-h100-80gb-hbm3.json``), written by the GPU campaign's sweep (``python -m
benchmarks.campaign``) on that GPU and committed::

    {"device": "NVIDIA H100 80GB HBM3", "triton": "3.6.0", "torch": "2.11.0+cu130", "commit": "...",
     "schedule_order": ["pairs", "vocab", "fused"],        # fastest first, at the sweep's shape
     "configs": [{"schedule": "fused", "dtype": "bfloat16", "hidden": 3584, "vocab": 256000,
                  "tokens": 8192, "options": {"block_n": 128, ...}, "ms": 151.0, "default_ms": 160.2}]}

``schedule_order`` replaces the fewest-FLOPs order of ``schedule="auto"``. ``configs`` hold
:class:`~simpo_kernels.kernels.KernelConfig` fields that beat the defaults for a schedule, dtype and
head shape; a launch takes the entry of its schedule and dtype nearest to its own ``(tokens,
hidden, vocab)`` (log distance), and options passed by the caller override it. Without a file for
the device, the defaults hold. ``$SIMPO_TUNED_DIR`` points the lookup at another folder (the
campaign's dry run writes one for ``cpu`` there and checks that the launchers follow it).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Optional

TUNED_DIR = Path(__file__).resolve().parent
ENV_DIR = "SIMPO_TUNED_DIR"
#: Schedules a table may order or tune (the ``triton`` backend's).
TUNABLE_SCHEDULES = ("pairs", "vocab", "fused")


def slug(device_name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def table_dir() -> Path:
    return Path(os.environ.get(ENV_DIR) or TUNED_DIR)


def table_path(device_name: str, directory: Optional[os.PathLike] = None) -> Path:
    return Path(directory or table_dir()) / f"{slug(device_name)}.json"


def load_table(device_name: str, directory: Optional[os.PathLike] = None) -> Optional[dict]:
    """The checked table for ``device_name`` or None when there is none (cached per file)."""
    path = table_path(device_name, directory)
    if not path.exists():
        return None
    stat = path.stat()
    return _load(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=None)
def _load(path: str, mtime_ns: int, size: int) -> dict:
    with open(path) as f:
        table = json.load(f)
    check_table(table, path)
    return table


def check_table(table: Any, where: str = "tuned table") -> None:
    """ValueError naming the first problem of a table's structure (unknown schedule, bad entry);
    the option names and values are checked where they are applied (``make_config``), against
    ``KernelConfig``, with the table's path in the message."""
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(table).__name__}")
    order = table.get("schedule_order")
    if order is not None:
        bad = [s for s in order if s not in TUNABLE_SCHEDULES] if isinstance(order, list) else [order]
        if bad or len(set(order)) != len(order):
            raise ValueError(f"{where}: schedule_order {order!r} must list distinct schedules of "
                             f"{TUNABLE_SCHEDULES}")
    for i, entry in enumerate(table.get("configs") or []):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: configs[{i}] is not an object")
        if entry.get("schedule") not in TUNABLE_SCHEDULES:
            raise ValueError(f"{where}: configs[{i}] has unknown schedule {entry.get('schedule')!r}")
        for key in ("tokens", "hidden", "vocab"):
            if not isinstance(entry.get(key), int) or entry[key] < 1:
                raise ValueError(f"{where}: configs[{i}].{key} must be a positive int, got {entry.get(key)!r}")
        if not isinstance(entry.get("dtype"), str):
            raise ValueError(f"{where}: configs[{i}].dtype must be a dtype name such as 'bfloat16'")
        if not isinstance(entry.get("options"), dict):
            raise ValueError(f"{where}: configs[{i}].options must be an object of KernelConfig fields")


def schedule_order(device_name: str, directory: Optional[os.PathLike] = None) -> Optional[tuple[str, ...]]:
    """The measured fastest-first schedule order for ``device_name``, or None."""
    table = load_table(device_name, directory)
    order = None if table is None else table.get("schedule_order")
    return None if not order else tuple(order)


def tuned_options(device_name: str, schedule: str, dtype: str, tokens: int, hidden: int, vocab: int,
                  directory: Optional[os.PathLike] = None) -> dict[str, Any]:
    """The measured ``KernelConfig`` overrides for a launch, ``{}`` without a matching entry."""
    table = load_table(device_name, directory)
    if table is None:
        return {}
    entries = [e for e in table.get("configs") or [] if e["schedule"] == schedule and e["dtype"] == dtype]
    if not entries:
        return {}

    def distance(e: dict) -> float:
        return sum(abs(math.log(max(a, 1) / e[k])) for a, k in ((tokens, "tokens"), (hidden, "hidden"),
                                                                 (vocab, "vocab")))

    return dict(min(entries, key=distance)["options"])
