"""``train-step``: one SimPO training step of a Gemma-2-2B-shaped model, the official logits path against ours.

The model of :mod:`benchmarks.e2e` (Gemma-2-2B dims, random weights, bf16, gradient checkpointing,
``attn_implementation="eager"``, AdamW), rebuilt with the same seed for every path so that each
path's first step sees the same weights and batch. Every measured thing is its own step of the
call's JSON (:mod:`.common`), written as it finishes:

=================  ===========================================================================
``build``          the model and its optimizer for one path (``params``, ``build_s``)
``measure``        one warm-up step (its loss: ``first_loss``), then the median of ``--steps``
                   steps at ``--pairs`` x ``--seq``: ``step_ms``, ``tokens_per_s``, peak memory,
                   the schedule ``auto`` resolved to
``profile``        (first triton path) ``torch.profiler`` over one step: the top-10 kernels by
                   device time (CPU ops on CPU) and the slowest kernel of ours
``batch-trial``    one step at ``pairs`` for the largest-batch search (doubling from the measured
                   batch, then bisection; ``fits``, ``seconds``); a trial starts only when its
                   time, predicted from the measured step time scaled by pairs, fits both the
                   call's time left and the path's ``--search-s`` budget
``ncu``            Nsight Compute on a subprocess that runs the slowest kernel of ours at a
                   reduced grid (``--ncu-tokens``; ``--clock-control none``: clocks are never
                   touched); the CSV of SpeedOfLight, MemoryWorkloadAnalysis and
                   ComputeWorkloadAnalysis, trimmed, and its metrics parsed
=================  ===========================================================================

Order: the paths up to the first triton one (build, measure, profile, search each), the ``ncu``
capture, then the remaining paths as time allows. Paths (``--paths``): ``eager`` (``model(...).logits``
-> the official loss), ``triton`` (``schedule="auto"``), ``triton-<schedule>``, ``torch``,
``torch-<schedule>`` (:func:`benchmarks.e2e.split_path`). The top-level ``summary`` holds each
path's numbers so far (the best known batch included), ``predictions`` the FLOP-model predictions.

``--dry-run``: the 2-layer toy config with a 256-token vocabulary, float32 (the Triton interpreter
has no bf16 arithmetic), 1 pair x 16 tokens; the ncu target runs in-process and the
ncu command is built but not run; search trials above 2 pairs count as out of memory (simulated,
marked so; CPU has no memory limit here), cap 4. ``python -m benchmarks.campaign.train_step`` runs this call alone
(same options); ``--ncu-target`` is the subprocess ncu profiles.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .. import e2e as E
from ..cases import BETA, GAMMA_BETA_RATIO, IGNORE_INDEX
from .common import Call, table

DEFAULT_PATHS = "eager,triton,triton-fused,torch"
#: The fused schedule's kernels (``schedule="fused"``); the row kernels run under pairs/vocab.
FUSED_KERNELS = ("_lse_forward_kernel", "_logprob_backward_kernel")
KERNEL_MODULES = ("lse_forward", "logprob_backward", "row_kernels")
NCU_SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "ComputeWorkloadAnalysis")
NCU_CSV_CHARS = 12000
ROOT = Path(__file__).resolve().parents[2]
GIB = 2.0 ** 30

#: Prediction model (H100 SXM, bf16): dense FLOPs at this effective rate, AdamW at this bandwidth.
PRED_TFLOPS = 450.0
PRED_OPT_BYTES_PER_S = 2.0e12
PRED_BUILD_S = 15.0
PRED_WARMUP_S = {"eager": 5.0, "torch": 10.0, "triton": 40.0}  # first step: cuBLAS, Triton compiles
PRED_NCU_S = 90.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("train-step")
    g.add_argument("--paths", default=DEFAULT_PATHS,
                   help="comma list: eager, triton, triton-<pairs|vocab|fused>, torch, torch-<schedule> "
                        "(default %(default)s)")
    g.add_argument("--pairs", type=int, default=None, help="pairs per measured step (default 2; dry run 1)")
    g.add_argument("--seq", type=int, default=None, help="tokens per row (default 2048; dry run 16)")
    g.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up (default 3; dry run 1)")
    g.add_argument("--max-pairs", type=int, default=None, help="largest-batch search cap (default 64; dry run 4)")
    g.add_argument("--search-s", type=float, default=None,
                   help="time budget of one path's largest-batch search (default 150; dry run and 0: none)")
    g.add_argument("--no-search", action="store_true", help="measure only, no largest-batch search")
    g.add_argument("--simulate-fit-pairs", type=int, default=None,
                   help="trials above this many pairs count as out of memory without running (default: "
                        "2 in a dry run, so that CPU, which has no memory limit here, exercises bisection)")
    g.add_argument("--ncu", action=argparse.BooleanOptionalAction, default=None,
                   help="Nsight Compute capture of our slowest kernel (default: on when ncu is found)")
    g.add_argument("--ncu-kernel", default="auto",
                   help="kernel to capture (default: the slowest of ours in the profiled step)")
    g.add_argument("--ncu-tokens", type=int, default=None, help="tokens of the ncu target (default 4096)")
    g.add_argument("--ncu-timeout-s", type=float, default=180.0)


# ------------------------------------------------------------------------------------------ settings


def settings(args: argparse.Namespace, call: Call) -> dict[str, Any]:
    dry = call.dry_run
    s = {
        "tiny": dry, "dtype": torch.float32 if dry else torch.bfloat16,
        "vocab": 256 if dry else None,
        "pairs": args.pairs or (1 if dry else 2), "seq": args.seq or (16 if dry else 2048),
        "steps": args.steps if args.steps is not None else (1 if dry else 3),
        "max_pairs": args.max_pairs or (4 if dry else 64),
        "simulate_fit_pairs": args.simulate_fit_pairs if args.simulate_fit_pairs is not None else (2 if dry else None),
        "search": not args.no_search,
        "search_s": args.search_s if args.search_s is not None else (None if dry else 150.0),
        "seed": args.seed, "paths": [p for p in args.paths.split(",") if p],
        "ncu": args.ncu, "ncu_kernel": args.ncu_kernel, "ncu_timeout_s": args.ncu_timeout_s,
        "ncu_tokens": args.ncu_tokens or (64 if dry else 4096),
    }
    if s["search_s"] is not None and s["search_s"] <= 0:
        s["search_s"] = None
    return s


def model_config(s: dict):
    return E.gemma2_2b_config(s["tiny"], **({"vocab_size": s["vocab"]} if s["vocab"] else {}))


# ------------------------------------------------------------------------------------------ predictions


def predict_step_s(cfg, n_params: int, pairs: int, seq: int, tflops: float = PRED_TFLOPS) -> float:
    """Predicted seconds of one step (a prediction, not a measurement): the decoder's matmuls at
    ``8 * body * tokens`` (``body``: the parameters besides the tied embedding; forward, the forward
    recomputed by gradient checkpointing, backward), the head's ``6 * V * H * tokens`` (the eager
    path and the pairs schedule; vocab/fused do ``8 * n * H * V`` on the ~0.7 of tokens that are
    targets, about the same), eager attention ``16 * L * rows * T^2 * heads * head_dim``, all at
    ``tflops``; plus AdamW reading and writing params, grads and two bf16 moments (7 accesses)."""
    tokens = 2 * pairs * seq
    V, H = cfg.vocab_size, cfg.hidden_size
    body = n_params - V * H  # tied embeddings: the head's weight is the embedding
    attn = 16 * cfg.num_hidden_layers * 2 * pairs * seq ** 2 * cfg.num_attention_heads * cfg.head_dim
    flops = 8 * body * tokens + 6 * V * H * tokens + attn
    opt_s = n_params * 2 * 7 / PRED_OPT_BYTES_PER_S
    return flops / (tflops * 1e12) + opt_s + 0.05


def trial_predict_s(step_s: Optional[float], pairs0: int, pairs: int, cuda: bool) -> Optional[float]:
    """A search trial: one step at ``pairs`` (no warm-up) plus batch set-up and freeing memory."""
    if step_s is None:
        return None
    return (1.0 if cuda else 0.1) + 1.3 * step_s * pairs / max(pairs0, 1)


# ------------------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def capture_schedules():
    """The schedules ``schedule="auto"`` resolves to inside the block (``simpo_kernels.api``'s
    ``resolve_schedule``, wrapped for the block's duration; nothing recorded if it is absent)."""
    seen: list = []
    try:
        from simpo_kernels import api
        orig = api.resolve_schedule
    except (ImportError, AttributeError):
        yield seen
        return

    def wrapped(*a, **k):
        r = orig(*a, **k)
        if r not in seen:
            seen.append(r)
        return r

    api.resolve_schedule = wrapped
    try:
        yield seen
    finally:
        api.resolve_schedule = orig


def our_kernel_names() -> list[str]:
    """Names of the Triton kernels in :mod:`simpo_kernels.kernels` (as profilers and ncu show them)."""
    names = set(FUSED_KERNELS)
    for mod in KERNEL_MODULES:
        try:
            m = importlib.import_module(f"simpo_kernels.kernels.{mod}")
        except Exception:  # noqa: BLE001 - a missing module only narrows the list
            continue
        for k, v in vars(m).items():
            if k.startswith("_") and k.endswith("_kernel") and (hasattr(v, "fn") or hasattr(v, "run")):
                names.add(k)
    return sorted(names)


def kernel_table(prof, cuda: bool) -> list[dict]:
    """Rows of ``prof.key_averages()``, slowest first: CUDA kernels by self device time on CUDA,
    CPU ops by self CPU time elsewhere."""
    from torch.autograd import DeviceType

    rows = []
    for e in prof.key_averages():
        if cuda:
            if getattr(e, "device_type", None) != DeviceType.CUDA:
                continue
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = getattr(e, "self_cuda_time_total", 0)
        else:
            t = e.self_cpu_time_total
        if t > 0:
            rows.append({"name": e.key, "calls": e.count, "total_ms": t / 1e3})
    rows.sort(key=lambda r: -r["total_ms"])
    return rows


def _compact(rows: list[dict], n: int = 10) -> list[list]:
    return [[r["name"][:100], r["calls"], round(r["total_ms"], 3)] for r in rows[:n]]


def find_ncu() -> Optional[str]:
    exe = shutil.which("ncu")
    if exe:
        return exe
    for cand in [Path("/usr/local/cuda/bin/ncu"), *sorted(Path("/opt/nvidia").glob("nsight-compute/*/ncu"))]:
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def target_argv(path: str, tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: str,
                seed: int) -> list[str]:
    return ["-m", "benchmarks.campaign.train_step", "--ncu-target", "--path", path, "--tokens", str(tokens),
            "--hidden", str(hidden), "--vocab", str(vocab), "--dtype", str(dtype).replace("torch.", ""),
            "--device", device, "--seed", str(seed)]


def ncu_command(exe: str, kernel: str, target: list[str]) -> list[str]:
    """ncu on one launch of ``kernel`` in ``python <target>``: three sections, CSV, clocks untouched."""
    cmd = [exe, "--clock-control", "none", "--target-processes", "all", "--kernel-name", f"regex:{kernel}",
           "--launch-count", "1"]
    for sec in NCU_SECTIONS:
        cmd += ["--section", sec]
    return cmd + ["--csv", sys.executable, *target]


def parse_ncu_csv(text: str) -> tuple[str, dict[str, str]]:
    """(the CSV lines of ncu's output, ``{"<section>: <metric> [<unit>]": value}``)."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    csv_text = "\n".join(lines)
    metrics: dict[str, str] = {}
    try:
        for rec in csv.DictReader(io.StringIO(csv_text)):
            name = rec.get("Metric Name")
            if not name:
                continue
            unit = rec.get("Metric Unit") or ""
            key = f"{rec.get('Section Name', '')}: {name}" + (f" [{unit}]" if unit else "")
            metrics[key] = rec.get("Metric Value", "")
            metrics.setdefault("kernel", rec.get("Kernel Name", ""))
            metrics.setdefault("grid", rec.get("Grid Size", ""))
            metrics.setdefault("block", rec.get("Block Size", ""))
    except csv.Error:
        pass
    return csv_text, metrics


def run_ncu(cmd: list[str], timeout_s: float) -> dict[str, Any]:
    """Run ``cmd`` in its own process group (killed whole on timeout or on the call's deadline)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except BaseException:  # timeout, or DeadlineReached from the call's timer
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return {"rc": proc.returncode, "output": out or ""}


# ------------------------------------------------------------------------------------------ ncu target


def ncu_target(path: str, tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device, seed: int = 0,
               softcap: float = 30.0) -> float:
    """One forward + backward of ``simpo_loss`` at ``tokens`` x ``hidden`` -> ``vocab`` on ``path``'s
    backend and schedule (what ncu profiles: the same kernels as the training step, a smaller grid)."""
    from simpo_kernels import simpo_loss

    backend, schedule = E.split_path(path)
    if backend == "eager":
        raise ValueError("the ncu target runs simpo_loss (backend torch or triton), not the eager path")
    device = torch.device(device)
    T = max(1, min(tokens // 2, 1024))
    rows = max(2, 2 * (tokens // (2 * T)))
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, T, hidden, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (rows, T), generator=g)
    labels[:, : T // 4] = IGNORE_INDEX
    out = simpo_loss(h, w, labels.to(device), beta=BETA, gamma_beta_ratio=GAMMA_BETA_RATIO, softcap=softcap,
                     backend=backend, schedule=schedule)
    out.loss.backward()
    E.sync(device)
    return out.loss.item()


# ------------------------------------------------------------------------------------------ the call


class TrainStep:
    def __init__(self, call: Call, s: dict):
        self.call, self.s = call, s
        self.device = call.device
        self.cuda = self.device.type == "cuda"
        self.cfg = model_config(s)
        self.n_params: Optional[int] = None
        self.summary: list[dict] = []
        self.profile: dict[str, Any] = {}

    # -------------------------------------------------------------------- predictions

    def params_estimate(self) -> int:
        c = self.cfg
        H, I, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        return c.vocab_size * H + L * (H * (q + 2 * kv) + q * H + 3 * H * I + 4 * H) + H

    def predicted_step_s(self, pairs: int) -> Optional[float]:
        if not self.cuda:
            return None
        return predict_step_s(self.cfg, self.n_params or self.params_estimate(), pairs, self.s["seq"])

    def predictions(self) -> dict[str, Any]:
        s, n = self.s, self.params_estimate()
        step = predict_step_s(self.cfg, n, s["pairs"], s["seq"])
        tokens = 2 * s["pairs"] * s["seq"]
        return {"note": "predictions (FLOP model), not measurements; apply to an H100 SXM in bf16",
                "params": n, "tflops": PRED_TFLOPS, "step_ms": round(step * 1e3, 1),
                "tokens_per_s": round(tokens / step), "build_s": PRED_BUILD_S, "warmup_s": PRED_WARMUP_S,
                "ncu_s": PRED_NCU_S}

    # -------------------------------------------------------------------- summary

    def publish(self) -> None:
        self.call.set("summary", self.summary)

    # -------------------------------------------------------------------- one path

    def run_path(self, path: str, profile: bool) -> dict:
        s, call, dev = self.s, self.call, self.device
        summ = {"path": path, "pairs": s["pairs"], "seq": s["seq"], "status": "-"}
        self.summary.append(summ)
        try:
            backend, schedule = E.split_path(path)
        except ValueError as exc:
            reason = str(exc)
            call.run_step("build", lambda row: row.skip(reason), path=path)
            summ["status"] = "skipped:unknown path"
            self.publish()
            return summ
        built: dict[str, Any] = {}

        def build(row):
            t0 = time.perf_counter()
            model = E.build_model(self.cfg, dev, dtype=s["dtype"], seed=s["seed"])
            opt = torch.optim.AdamW(model.parameters(), lr=8e-7, foreach=True)
            E.sync(dev)
            built.update(model=model, opt=opt)
            self.n_params = sum(p.numel() for p in model.parameters())
            row.update(params=self.n_params, build_s=round(time.perf_counter() - t0, 3))
            if self.cuda:
                row["allocated_gib"] = round(torch.cuda.memory_allocated(dev) / GIB, 3)

        row = call.run_step("build", build, predicted_s=PRED_BUILD_S if self.cuda else None, path=path,
                  dtype=s["dtype"], tiny=s["tiny"])
        if "model" not in built:
            summ["status"] = f"build {row['status']}"
            self.publish()
            return summ
        try:
            self._measure_profile_search(path, backend, built, summ, profile)
        finally:
            built.clear()
            E.free_memory(dev)
        return summ

    def _measure_profile_search(self, path, backend, built, summ, profile: bool) -> None:
        s, call, dev = self.s, self.call, self.device
        model, opt = built["model"], built["opt"]
        pairs, seq = s["pairs"], s["seq"]

        def measure(row):
            try:
                with capture_schedules() as seen:
                    r = E.measure_step(model, opt, self.cfg, path, pairs=pairs, seq=seq, device=dev,
                                       steps=s["steps"], seed=s["seed"])
            finally:
                opt.zero_grad(set_to_none=True)
            row.update(
                first_loss=r["first_loss"], loss=r.get("loss"), warmup_ms=round(r["warmup_ms"], 2),
                step_ms=_round(r["step_ms"], 3), step_ms_all=[round(t, 3) for t in r.get("step_ms_all", [])],
                tokens_per_s=_round(r["tokens_per_s"], 1),
                peak_gib=_round(r["peak_mem_mib"] and r["peak_mem_mib"] / 1024, 3),
                step_extra_gib=_round(r["step_extra_mib"] and r["step_extra_mib"] / 1024, 3),
                schedule_resolved=",".join(seen) or None)

        pred_step = self.predicted_step_s(pairs)
        pred = None if pred_step is None else PRED_WARMUP_S[backend] + (s["steps"] + 1) * pred_step
        mrow = call.run_step("measure", measure, predicted_s=pred, path=path, pairs=pairs, seq=seq,
                   tokens=2 * pairs * seq, steps=s["steps"])
        for k in ("step_ms", "tokens_per_s", "peak_gib", "first_loss", "schedule_resolved"):
            summ[k] = mrow.get(k)
        if pred_step is not None:
            summ["predicted_step_ms"] = round(pred_step * 1e3, 1)
        summ["status"] = mrow["status"]
        self.publish()
        measured = mrow["status"] == "ok" and mrow.get("step_ms")
        step_s = mrow["step_ms"] / 1e3 if measured else pred_step

        if profile and mrow["status"] == "ok":
            self._profile(path, model, opt, step_s)
        if s["search"] and mrow["status"] in ("ok", "oom"):  # an error would repeat in every trial
            self._search(path, model, opt, step_s, known_fit=pairs if mrow["status"] == "ok" else 0, summ=summ)

    def _profile(self, path, model, opt, step_s) -> None:
        s, dev, cuda = self.s, self.device, self.cuda
        ours = our_kernel_names()

        def body(row):
            from torch.profiler import ProfilerActivity, profile

            batch = E.make_batch(self.cfg, s["pairs"], s["seq"], dev, seed=s["seed"])
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            try:
                with profile(activities=acts) as prof:
                    E.train_step(model, opt, batch, path)
                    E.sync(dev)
            finally:
                opt.zero_grad(set_to_none=True)
            rows = kernel_table(prof, cuda)
            mine = [r for r in rows if any(r["name"].startswith(k) for k in ours)]
            total = sum(r["total_ms"] for r in rows)
            row.update(by="self device time (CUDA kernels)" if cuda else "self CPU time (CPU ops)",
                       total_ms=round(total, 3), events=len(rows), top=_compact(rows), ours=_compact(mine),
                       ours_share=round(sum(r["total_ms"] for r in mine) / total, 4) if total else None,
                       slowest_ours=mine[0]["name"] if mine else None)
            self.profile.update(path=path, slowest_ours=row["slowest_ours"])

        pred = None if step_s is None or not cuda else 3 * step_s + 5.0
        self.call.run_step("profile", body, predicted_s=pred, path=path, pairs=s["pairs"], seq=s["seq"])

    def _search(self, path, model, opt, step_s, known_fit: int, summ: dict) -> None:
        s, call, dev = self.s, self.call, self.device
        search = E.BatchSearch(s["max_pairs"], known_fit)
        t0 = time.monotonic()
        stopped = None

        def publish():
            r = search.result()
            r["trials"] = [list(t) for t in r["trials"]]
            r["stopped"] = stopped
            summ["largest_batch"] = r
            self.publish()

        while (p := search.next()) is not None:
            pred = trial_predict_s(step_s, s["pairs"], p, self.cuda)
            budget_left = None if s["search_s"] is None else s["search_s"] - (time.monotonic() - t0)
            fits: dict[str, bool] = {}

            def trial(row, p=p, pred=pred, budget_left=budget_left):
                if budget_left is not None and pred is not None and pred > budget_left:
                    row.skip(f"search budget: predicted {pred:.0f} s > {budget_left:.0f} s left of --search-s")
                t1 = time.perf_counter()
                sim = s["simulate_fit_pairs"]
                if sim is not None and p > sim:
                    ok, result = False, "oom (simulated)"
                else:
                    ok = E.try_step(model, opt, self.cfg, p, s["seq"], path, dev)
                    result = "fits" if ok else "oom"
                fits["ok"] = ok
                row.update(fits=ok, result=result, seconds=round(time.perf_counter() - t1, 3))

            row = call.run_step("batch-trial", trial, predicted_s=pred, path=path, pairs=p, seq=s["seq"],
                      known_fit=search.lo, known_oom=search.hi)
            if "ok" not in fits:
                stopped = row["status"]
                break
            search.record(p, fits["ok"])
            publish()
        publish()

    # -------------------------------------------------------------------- ncu

    def ncu(self) -> None:
        s, call = self.s, self.call
        exe = find_ncu()
        kernel = s["ncu_kernel"]
        if kernel == "auto":
            kernel = self.profile.get("slowest_ours") or "_logprob_backward_kernel"
        kernel = kernel.split("(")[0].strip()
        prof_path = self.profile.get("path")
        if kernel in FUSED_KERNELS and (prof_path is None or E.split_path(prof_path)[1] != "fused"):
            path = "triton-fused"
        else:
            path = prof_path or "triton-pairs"
        if self.s["dry_run"]:
            hidden, vocab, device = self.cfg.hidden_size, self.cfg.vocab_size, "cpu"
        else:
            full = E.gemma2_2b_config(False)
            hidden, vocab, device = full.hidden_size, full.vocab_size, "cuda"
        target = target_argv(path, s["ncu_tokens"], hidden, vocab, s["dtype"], device, s["seed"])
        cmd = ncu_command(exe or "ncu", kernel, target)
        enabled = s["ncu"] if s["ncu"] is not None else (exe is not None and self.cuda)

        def body(row):
            if s["ncu"] is False:
                row.skip("--no-ncu")
            if s["dry_run"]:  # the target's code path, in-process (interpreted kernels), no ncu
                t0 = time.perf_counter()
                row["target_loss"] = ncu_target(path, s["ncu_tokens"], hidden, vocab, s["dtype"], device,
                                                seed=s["seed"])
                row["target_s"] = round(time.perf_counter() - t0, 3)
                row.skip("ncu not found" if exe is None else "dry run (ncu needs CUDA)")
            if exe is None:
                row.skip("ncu not found")
            if not enabled:
                row.skip("no CUDA device")
            timeout = min(s["ncu_timeout_s"], call.time_left() - 5.0)
            if timeout <= 10:
                row.skip("no time left for ncu")
            row["timeout_s"] = round(timeout, 1)
            res = run_ncu(cmd, timeout)
            csv_text, metrics = parse_ncu_csv(res["output"])
            row.update(rc=res["rc"], csv=csv_text[:NCU_CSV_CHARS], csv_truncated=len(csv_text) > NCU_CSV_CHARS,
                       metrics=metrics)
            if res["rc"] != 0 or not metrics:
                tail = " ".join(res["output"].split())[-400:]
                row["output_tail"] = tail
                row["status"] = (f"error:ncu rc {res['rc']}" if res["rc"] else "error:ncu captured no kernel") \
                    + f": {tail[-200:]}"

        call.run_step("ncu", body, predicted_s=PRED_NCU_S if enabled and self.cuda else None, kernel=kernel,
            target_path=path, tokens=s["ncu_tokens"], hidden=hidden, vocab=vocab,
            command=shlex.join(cmd))

    # -------------------------------------------------------------------- all

    def run(self) -> str:
        s = self.s
        paths = s["paths"]
        first_triton = next((i for i, p in enumerate(paths) if p.split("-")[0] == "triton"), None)
        ncu_after = first_triton if first_triton is not None else len(paths) - 1
        ncu_done = False
        for i, path in enumerate(paths):
            self.run_path(path, profile=(i == first_triton))
            if i == ncu_after:
                self.ncu()
                ncu_done = True
        if not ncu_done:
            self.ncu()
        return self.closing()

    def closing(self) -> str:
        rows = []
        for r in self.summary:
            lb = r.get("largest_batch") or {}
            if not lb:
                largest = None
            elif lb.get("capped"):
                largest = f">={lb['max_pairs']} (cap)"
            elif lb.get("complete"):
                largest = str(lb["max_pairs"])
            else:
                largest = f"{lb['max_pairs']}..{lb['upper'] or '?'} ({(lb.get('stopped') or 'stopped')[:30]})"
            rows.append({"path": r["path"], "shape": f"{r['pairs']} x {r['seq']}",
                         "step_ms": _cell(r.get("step_ms"), ".1f"), "tokens_per_s": _cell(r.get("tokens_per_s"), ".0f"),
                         "peak_gib": _cell(r.get("peak_gib"), ".2f"), "largest": largest, "status": r["status"][:60]})
        out = table(rows, ["path", "shape", "step_ms", "tokens_per_s", "peak_gib", "largest", "status"],
                    ["path", "pairs x seq", "step ms", "tokens/s", "peak GiB", "largest batch (pairs)", "status"])
        ncu = next((r for r in reversed(self.call.rows("ncu"))), None)
        if ncu is not None:
            m = ncu.get("metrics") or {}
            sol = {k.split(": ", 1)[1]: v for k, v in m.items() if k.startswith("GPU Speed Of Light")}
            keep = {k: v for k, v in sol.items() if k.split(" [")[0] in (
                "Duration", "Compute (SM) Throughput", "Memory Throughput", "DRAM Throughput")}
            out += f"\n\nncu {ncu.get('kernel')} ({ncu.get('target_path')}, {ncu.get('tokens')} tokens): " \
                   f"{ncu['status'][:120]}" + ("".join(f"; {k} {v}" for k, v in keep.items()))
        if self.profile.get("slowest_ours"):
            out += f"\nslowest kernel of ours in the {self.profile['path']} step: {self.profile['slowest_ours']}"
        return out


def _cell(v, spec: str) -> Optional[str]:
    return None if v is None else format(v, spec)


def _round(v, nd):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return v
    return round(v, nd) if nd else int(round(v))


def run(call: Call, args: argparse.Namespace) -> str:
    s = settings(args, call)
    s["dry_run"] = call.dry_run
    ts = TrainStep(call, s)
    cfg = ts.cfg
    call.set("settings", {k: v for k, v in s.items()})
    info = E.model_info(cfg, s["tiny"], s["dtype"])
    call.set("model", {"name": info.pop("model"), **info, "params_estimate": ts.params_estimate()})
    if call.device.type == "cuda" and not s["tiny"]:
        call.set("predictions", ts.predictions())
    return ts.run()


# ------------------------------------------------------------------------------------------ standalone


def _target_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.campaign.train_step --ncu-target")
    ap.add_argument("--ncu-target", action="store_true")
    ap.add_argument("--path", default="triton-fused")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=2304)
    ap.add_argument("--vocab", type=int, default=256000)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    loss = ncu_target(a.path, a.tokens, a.hidden, a.vocab, getattr(torch, a.dtype), a.device, seed=a.seed)
    print(f"ncu target {a.path}: {a.tokens} tokens, H {a.hidden}, V {a.vocab}, {a.dtype}: loss {loss:.6g}", flush=True)


def main(argv=None) -> Optional[dict]:
    """This call alone (the options of ``python -m benchmarks.campaign train-step``), or the ncu target."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ncu-target" in argv:
        _target_main(argv)
        return None
    if "--dry-run" in argv:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    from .common import DEFAULT_LIMIT_S, DEFAULT_MARGIN_S

    ap = argparse.ArgumentParser(prog="python -m benchmarks.campaign.train_step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--limit-s", type=float, default=DEFAULT_LIMIT_S)
    ap.add_argument("--margin-s", type=float, default=DEFAULT_MARGIN_S)
    ap.add_argument("--seed", type=int, default=0)
    add_arguments(ap)
    args = ap.parse_args(argv)
    if not args.out:
        ap.error("--out is required when $OUT is unset")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("train-step: no CUDA device; use --dry-run to rehearse on CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    call = Call("train-step", args.out, device, dry_run=args.dry_run, limit_s=args.limit_s,
                margin_s=args.margin_s, argv=argv)
    return call.finish(run(call, args))


if __name__ == "__main__":
    main()
