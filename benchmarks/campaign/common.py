"""The campaign's call: the time guard, the JSON and the tar written after each step, the
environment record and the closing tables.

A :class:`Call` owns ``<work>/campaign.json``. Work is done in steps, ``call.run_step(kind, fn, ...)``:
``fn(row)`` runs unless the step is skipped, and the row is appended when it ends, whatever its
outcome; then the JSON is rewritten (atomically) and copied to ``<out>/campaign.json``, and the whole
work folder (the JSON, the log, plots, tables, the tuned table, the pytest log) is packed into
``<out>/campaign.tar.gz`` (atomically), so a call killed at any point returns everything finished:

- ``ok``: the block finished;
- ``oom``: a CUDA out-of-memory error (a result, not a crash);
- ``error:<type>: <message>``: any other exception (traceback on stderr); the call goes on;
- ``skipped:<reason>``: ``fn`` called :meth:`Step.skip`, or did not run because the step's predicted
  time does not fit the time left (``predicted_s``), or the deadline had passed;
- ``stopped:deadline``: the deadline struck inside the block (a ``SIGALRM`` timer raises
  :class:`DeadlineReached` between Python bytecodes); every later block is skipped.

The deadline is ``limit_s - margin_s`` after the command started (``$SIMPO_CAMPAIGN_T0``, set by
``run.sh``): the device tool kills a command at its limit, so the call stops itself a margin before.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .. import measure as M

SCHEMA = 2
#: The device tool's per-command limit is 600 s; the call plans for 540 s and stops 30 s before
#: (a step is not started unless its predicted time fits, so the margin only covers an overrun).
DEFAULT_LIMIT_S = 540.0
DEFAULT_MARGIN_S = 30.0
#: What comes back from the device (at most 8 files): the summary JSON and one tar of everything.
SUMMARY, TARBALL = "campaign.json", "campaign.tar.gz"
#: Epoch seconds at which the command started (set by run.sh): the limit counts from there.
T0_ENV = "SIMPO_CAMPAIGN_T0"


class DeadlineReached(BaseException):
    """Raised by the deadline timer inside a step (a BaseException, so ``except Exception`` in the
    measured code cannot swallow it)."""


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def _cublas_version() -> Optional[str]:
    """cuBLAS as loaded by torch (``cublasGetVersion`` via ctypes after torch opened the library),
    else the version of the installed ``nvidia-cublas*`` wheel; None where neither is found."""
    if torch.cuda.is_available():
        try:
            import ctypes

            torch.ones(1, device="cuda") @ torch.ones(1, 1, device="cuda")  # loads cuBLAS
            with open("/proc/self/maps") as f:
                libs = sorted({line.split()[-1] for line in f if "libcublas.so" in line})
            if libs:
                lib = ctypes.CDLL(libs[0])
                v = ctypes.c_int()
                if lib.cublasGetProperty(0, ctypes.byref(v)) == 0:  # MAJOR_VERSION
                    parts = [v.value]
                    for prop in (1, 2):
                        lib.cublasGetProperty(prop, ctypes.byref(v))
                        parts.append(v.value)
                    return ".".join(map(str, parts)) + f" ({os.path.basename(libs[0])})"
        except Exception:  # noqa: BLE001 - a version string is never worth a failed call
            pass
    for dist in ("nvidia-cublas", "nvidia-cublas-cu13", "nvidia-cublas-cu12"):
        v = M.package_version(dist)
        if v:
            return f"{v} ({dist} wheel)"
    return None


NVIDIA_SMI_FIELDS = ("name", "driver_version", "memory.total", "clocks.sm", "clocks.max.sm", "clocks.mem",
                     "clocks.max.mem", "power.draw", "power.limit", "temperature.gpu", "pstate",
                     "clocks_throttle_reasons.active")


def nvidia_smi() -> dict[str, Any]:
    """The GPU's state as ``nvidia-smi`` reports it, read only (no setting is ever changed)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"status": "skipped:nvidia-smi not found"}
    try:
        out = subprocess.run([exe, f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"status": f"error:{type(exc).__name__}: {exc}"}
    if out.returncode:
        return {"status": f"error:rc {out.returncode}: {out.stderr.strip()[:200]}"}
    values = [v.strip() for v in out.stdout.splitlines()[0].split(",")] if out.stdout.strip() else []
    return {"status": "ok", **dict(zip(NVIDIA_SMI_FIELDS, values))}


def environment(device: torch.device) -> dict[str, Any]:
    """Device, driver, clocks, library versions: what a reader needs to compare two results."""
    env: dict[str, Any] = {
        "device": device_name(device), "device_type": device.type, "host": platform.node(),
        "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "cublas": _cublas_version() if device.type == "cuda" else None,
        "commit": M.git_commit(), "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }
    for dist in ("triton", "transformers", "accelerate", "datasets", "deepspeed", "trl", "liger-kernel",
                 "cut-cross-entropy", "numpy"):
        env[dist] = M.package_version(dist)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                   memory_gib=round(p.total_memory / 2**30, 2),
                   l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1) or None,
                   nvidia_smi=nvidia_smi())
    else:
        env.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


class Step(dict):
    """One row of a call's JSON (a dict), with :meth:`skip` to end the block early."""

    class _Skip(Exception):
        pass

    def skip(self, reason: str) -> None:
        self["status"] = f"skipped:{reason}"
        raise Step._Skip


class Call:
    """The campaign call: its JSON, its tar, its deadline, its steps.

    Args:
        out: what comes back (``$OUT`` on the device machine): ``campaign.json`` and ``campaign.tar.gz``.
        work: where the files are made, outside ``out`` (every file under ``out`` comes back on its
            own, at most 8): the tar packs this folder.
        device: where the work runs. dry_run: tiny shapes on CPU (recorded in the JSON).
        limit_s: the command's wall-clock limit; margin_s: how long before it the call stops.
    """

    def __init__(self, out: os.PathLike, work: os.PathLike, device: torch.device, *, dry_run: bool,
                 limit_s: float = DEFAULT_LIMIT_S, margin_s: float = DEFAULT_MARGIN_S,
                 argv: Optional[Sequence[str]] = None):
        if limit_s <= margin_s:
            raise ValueError(f"limit_s ({limit_s}) must exceed margin_s ({margin_s})")
        self.name, self.device, self.dry_run = "campaign", device, dry_run
        # the limit counts from when run.sh started (wheel install and imports included)
        started = os.environ.get(T0_ENV)
        self.t0 = time.monotonic() - (max(0.0, time.time() - float(started)) if started else 0.0)
        self.deadline = self.t0 + limit_s - margin_s
        self.out, self.work = Path(out), Path(work)
        if self.out.resolve() == self.work.resolve():
            raise ValueError("the work folder must differ from the output folder (the tar packs it)")
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.path = self.work / SUMMARY
        self.stopped = False
        self.result: dict[str, Any] = {
            "schema": SCHEMA, "call": self.name, "dry_run": dry_run,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "argv": list(sys.argv[1:] if argv is None else argv), "limit_s": limit_s, "margin_s": margin_s,
            "env": environment(device), "steps": [],
        }
        self.dump()

    # ---------------------------------------------------------------------------- time

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def time_left(self) -> float:
        """Seconds until the deadline (negative after it)."""
        return self.deadline - time.monotonic()

    # ---------------------------------------------------------------------------- output

    def dump(self, pack: bool = False) -> None:
        """Rewrite the JSON in the work folder and under ``out`` atomically (a kill mid-write leaves
        the previous version); ``pack``: also the tar of the work folder."""
        self.result["wall_s"] = round(self.elapsed(), 3)
        text = json.dumps(self.result, indent=1, default=_json_default)
        for path in (self.path, self.out / SUMMARY):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)
        if pack:
            pack_folder(self.work, self.out / TARBALL)

    def set(self, key: str, value: Any) -> None:
        """A top-level field of the JSON, written at once."""
        self.result[key] = value
        self.dump()

    # ---------------------------------------------------------------------------- steps

    def run_step(self, kind: str, fn: Callable[[Step], Any], predicted_s: Optional[float] = None,
                 **fields: Any) -> Step:
        """Run ``fn(row)`` as one row of ``steps`` and return the row.

        ``fields`` start the row; ``fn`` adds its results to it. ``predicted_s``: the step's expected
        wall time; ``fn`` does not run when that exceeds the time left, nor after the deadline.
        The row gets ``status`` and ``wall_s``.
        """
        row = Step(kind=kind, **fields)
        if predicted_s is not None:
            row["predicted_s"] = round(float(predicted_s), 3)
        left = self.time_left()
        if self.stopped or left <= 0:
            row["status"] = "skipped:deadline"
        elif predicted_s is not None and predicted_s > left:
            row["status"] = f"skipped:predicted {predicted_s:.0f} s > {left:.0f} s left"
        else:
            row["status"] = "running"
            try:
                self._run(row, fn)
            finally:  # an interrupt too leaves its row in the file
                self._append(row)
            return row
        self._append(row)
        return row

    def _run(self, row: Step, fn: Callable[[Step], Any]) -> None:
        t0 = time.monotonic()
        self._arm()
        try:
            fn(row)
            if row["status"] == "running":
                row["status"] = "ok"
        except Step._Skip:
            pass
        except DeadlineReached:
            self.stopped = True
            row["status"] = "stopped:deadline"
        except KeyboardInterrupt:  # `timeout --signal=INT`, the backstop of run.sh, or Ctrl-C
            self.stopped = True
            row["status"] = "stopped:interrupted"
            raise
        except Exception as exc:  # noqa: BLE001 - one failing step must not end a GPU call
            if M.is_oom(exc):
                row["status"] = "oom"
            else:
                traceback.print_exc()
                row["status"] = f"error:{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        finally:
            self._disarm()
            row["wall_s"] = round(time.monotonic() - t0, 3)
            if self.device.type == "cuda":
                M.free_memory(self.device)

    def _append(self, row: Step) -> None:
        self.result["steps"].append(row)
        self.dump(pack=True)

    def _arm(self) -> None:
        if not hasattr(signal, "setitimer"):
            return

        def on_alarm(signum, frame):
            raise DeadlineReached()

        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(self.time_left(), 1e-3))

    def _disarm(self) -> None:
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0)

    def rows(self, kind: Optional[str] = None) -> list[Step]:
        return [r for r in self.result["steps"] if kind is None or r["kind"] == kind]

    # ---------------------------------------------------------------------------- end

    def finish(self, table: str = "") -> dict[str, Any]:
        """Write the final JSON and print a status count and ``table`` (the reply shows the end)."""
        counts: dict[str, int] = {}
        for r in self.result["steps"]:
            key = r["status"].split(":")[0]
            counts[key] = counts.get(key, 0) + 1
        self.result["status_counts"] = counts
        if table:
            (self.work / "campaign.md").write_text(table + "\n")
        self.dump(pack=True)
        print(f"\n== {self.name}{' (dry run)' if self.dry_run else ''}: {self.result['env']['device']}, "
              f"{self.elapsed():.0f} s, steps {counts}; wrote {self.out / SUMMARY} and {self.out / TARBALL}",
              flush=True)
        if table:
            print(table, flush=True)
        return self.result


def pack_folder(folder: Path, tarball: Path) -> None:
    """``tar czf tarball -C folder .``, atomically (a temporary file renamed over the old tar)."""
    tmp = tarball.with_name(tarball.name + ".tmp")
    with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not p.name.endswith(".tmp"):
                tar.add(p, arcname="./" + p.relative_to(folder).as_posix(), recursive=False)  # as `tar -C folder .`
    tmp.replace(tarball)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    if isinstance(obj, (torch.device, Path)):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def fmt(v: Any, spec: str = ".3g") -> str:
    """A table cell: ``-`` for None, numbers by ``spec``."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def table(rows: Sequence[dict], columns: Sequence[str], headers: Optional[Sequence[str]] = None) -> str:
    """A markdown table of ``rows`` (dicts) over ``columns``."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)
