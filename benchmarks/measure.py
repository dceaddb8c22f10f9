"""Checking, timing and memory measurement, shared by the pytest suites and the runner.

Method (/work/.library/device/METHOD.md):
- **Correct first.** Every (case, impl) is run once forward+backward and its loss, per-row
  log-probabilities and the gradients of hidden states and weight are compared with a reference by
  relative norm error ``|a - b| / |b|`` (:data:`TOLERANCES`). The reference is the float64
  ``tests/reference.py`` (chunked: :func:`float64_reference`) on CPU; on CUDA the ``eager`` backend on float32 copies of the inputs
  with full-precision (non-tf32) matmuls, or the chunked ``torch`` backend in float32 where that
  does not fit in memory (both ~1e-6 from float64, far below the bf16 tolerances, so every impl,
  eager included, is judged against the exact value). A mismatch is reported as
  ``mismatch:<detail>`` and never timed.
- **Time properly.** The first call (compilation, autotuning) is a warm-up; then the median over
  repeated calls. On CUDA each call sits between two CUDA events (device time, synchronised); on
  CPU a host clock. ``fwd`` is the forward with no gradient (inputs detached, ``no_grad``);
  ``fwd_bwd`` is forward + ``torch.autograd.grad`` for hidden and weight.
- **Peak extra memory** (CUDA only): ``max_memory_allocated`` during one call, after
  ``reset_peak_memory_stats``, minus ``memory_allocated`` before it. For ``fwd_bwd`` it includes
  the returned gradients (``dW`` is ``V*H`` in the input dtype for every impl).
- **OOM is a result**: ``torch.cuda.OutOfMemoryError`` becomes status ``oom``, not a crash; in the
  runner any other exception of an impl becomes ``error:<type>: <message>``.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import subprocess
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

from . import cases as C

#: Relative-norm tolerances by input dtype: (loss and log-probs, gradients). bf16 operands land
#: between 1e-3 and 1e-2 against float64; two bf16 implementations may each be that far off.
TOLERANCES = {
    "bfloat16": (1e-2, 2e-2),
    "float16": (5e-3, 1e-2),
    "float32": (1e-4, 1e-3),  # tf32 matmuls on GPU land near 3e-4
}

MIB = 2.0 ** 20


def package_version(dist: str) -> Optional[str]:
    """The installed version of distribution ``dist``, None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def rel_err(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 24) -> float:
    """``|a - b| / |b|`` in float64, in chunks (b may live on another device); inf if non-finite."""
    a = a.detach().reshape(-1)
    b = b.detach().reshape(-1)
    if a.numel() != b.numel():
        return math.inf
    num = den = 0.0
    for s in range(0, a.numel(), chunk):
        x = a[s:s + chunk].to(torch.float64)
        y = b[s:s + chunk].to(device=x.device, dtype=torch.float64)
        num += (x - y).square().sum().item()
        den += y.square().sum().item()
    if not (math.isfinite(num) and math.isfinite(den)):
        return math.inf
    return math.sqrt(num) / max(math.sqrt(den), 1e-300)


# --------------------------------------------------------------------------------------------
# Timing and memory


def time_fn(fn: Callable[[], object], device, *, warmup: int = 1, target_s: float = 0.5,
            min_reps: int = 3, max_reps: int = 20) -> dict:
    """Median milliseconds of ``fn()`` over repeated calls after ``warmup`` calls."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []

    def one():
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    times.append(one())
    reps = int(min(max_reps, max(min_reps, target_s * 1e3 / max(times[0], 1e-3))))
    for _ in range(reps - 1):
        times.append(one())
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "reps": len(times)}


def peak_extra_mib(fn: Callable[[], object], device) -> Optional[float]:
    """Peak memory allocated during ``fn()`` minus memory allocated before it (CUDA); None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        fn()
        return None
    free_memory(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / MIB


# --------------------------------------------------------------------------------------------
# One case: inputs, references, check, measurements


def _fwd_bwd(impl_fn, hidden, weight, labels):
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    loss, logps = impl_fn(h, w, labels)
    dh, dw = torch.autograd.grad(loss, (h, w))
    return loss.detach(), logps.detach(), dh, dw


def _fwd(impl_fn, hidden, weight, labels):
    with torch.no_grad():
        return impl_fn(hidden.detach(), weight.detach(), labels)


#: float64 logits per chunk of the chunked reference: 256 Mi elements (2 GiB), ~1000 tokens at V=256000.
REFERENCE_CHUNK_ELEMENTS = 1 << 28


def float64_reference(hidden, weight, labels, softcap, *, beta: float = C.BETA,
                      gamma_beta_ratio: float = C.GAMMA_BETA_RATIO) -> dict:
    """The exact float64 loss, per-row log-probs (chosen first), dL/dhidden and dL/dweight, on the
    inputs' device, chunk by chunk (``tests/reference.py: reference_simpo_chunked``, which the test
    suite holds to the full-logits float64 reference): it fits at the Gemma-2-9B shape on one GPU."""
    from tests.reference import reference_simpo_chunked

    chunk = max(1, REFERENCE_CHUNK_ELEMENTS // weight.shape[0])
    out = reference_simpo_chunked(hidden, weight, labels, softcap=softcap, beta=beta,
                                  gamma_beta_ratio=gamma_beta_ratio, ignore_index=C.IGNORE_INDEX,
                                  chunk_tokens=chunk)
    return {"kind": "float64", "loss": out["loss"], "logps": torch.cat([out["chosen_logps"], out["rejected_logps"]]),
            "dh": out["dhidden"], "dw": out["dweight"]}


def _float64_row_sums(hidden, weight, labels, softcap):
    """Per-row ``(sums [R], counts [R])`` float64 of the target log-probabilities, chunked as
    :func:`float64_reference` (pass 1 of ``tests/reference.py``'s chunked reference)."""
    from tests.reference import reference_row_sums_chunked

    return reference_row_sums_chunked(hidden, weight, labels, softcap=softcap, ignore_index=C.IGNORE_INDEX,
                                      chunk_tokens=max(1, REFERENCE_CHUNK_ELEMENTS // weight.shape[0]))


def make_ref_logps(case: C.Case, sums: torch.Tensor, seed: int = 0) -> tuple:
    """The fixed reference values of a ``-dpo`` case: the float64 per-row sums of its own inputs
    (``sums [2B]``, :func:`_float64_row_sums`), each moved by ``N(0, 1) / beta`` (a seeded CPU draw),
    as ``(ref_chosen_logps [B], ref_rejected_logps [B])`` float32 on the sums' device. A policy equal
    to its reference would give ``d = 0`` and the loss ``log 2`` exactly; this keeps ``beta * d``
    O(1) (``N(0, 2)``), so the loss and its gradients are neither trivial nor saturated."""
    g = torch.Generator().manual_seed(seed + 2)
    noise = torch.randn(sums.shape[0], generator=g, dtype=torch.float64) / case.beta
    ref = (sums.detach().to(torch.float64) + noise.to(sums.device)).to(torch.float32)
    B = sums.shape[0] // 2
    return ref[:B].clone(), ref[B:].clone()


def float64_reference_dpo(hidden, weight, labels, softcap, ref_logps, beta: float = C.DPO_BETA,
                          sums: Optional[torch.Tensor] = None) -> dict:
    """The exact float64 DPO loss (:func:`benchmarks.cases.dpo_loss` on the per-row sums), its per-row
    log-probs (SUMS, chosen first), dL/dhidden and dL/dweight: the float64 pass for the sums (or
    ``sums``, that pass's output already made), the head by autograd on them (``dL/dsum`` per row),
    then the weighted float64 pass for the gradients."""
    from tests.reference import reference_row_grads_chunked

    if sums is None:
        sums, _ = _float64_row_sums(hidden, weight, labels, softcap)
    s = sums.clone().requires_grad_(True)
    loss = C.dpo_loss(s, ref_logps[0].to(s.device, torch.float64), ref_logps[1].to(s.device, torch.float64), beta)
    (g_rows,) = torch.autograd.grad(loss, s)
    dh, dw, _ = reference_row_grads_chunked(hidden, weight, labels, g_rows, softcap=softcap,
                                            ignore_index=C.IGNORE_INDEX,
                                            chunk_tokens=max(1, REFERENCE_CHUNK_ELEMENTS // weight.shape[0]))
    return {"kind": "float64", "loss": loss.detach(), "logps": sums, "dh": dh, "dw": dw}


def _float32_reference(backend, case, hidden, weight, labels, softcap, ref_logps=None):
    """``backend`` ("eager" or "torch") on float32 copies of the inputs, full-precision matmuls
    (no tf32): error ~1e-6 against float64, far below the bf16 tolerances, and it runs on the GPU.
    """
    from simpo_kernels import simpo_loss

    def fn(h, w, lab):
        if case.loss == "simpo":
            out = simpo_loss(h, w, lab, beta=C.BETA, gamma_beta_ratio=C.GAMMA_BETA_RATIO,
                             softcap=softcap, backend=backend)
        else:
            from simpo_kernels import preference_loss

            out = preference_loss(h, w, lab, loss=case.loss, ref_chosen_logps=ref_logps[0],
                                  ref_rejected_logps=ref_logps[1], beta=case.beta, softcap=softcap,
                                  backend=backend)
        return out.loss, torch.cat([out.chosen_logps, out.rejected_logps])

    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        loss, logps, dh, dw = _fwd_bwd(fn, hidden.float(), weight.float(), labels)
    finally:
        torch.set_float32_matmul_precision(prec)
    # Keep the large reference gradients off the GPU while other impls are measured (so they
    # don't shrink the memory the impls may use), in pinned host memory for fast comparisons.
    return {"kind": f"float32-{backend}", "loss": _to_host(loss), "logps": _to_host(logps),
            "dh": _to_host(dh), "dw": _to_host(dw)}


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t)
    return host


class CaseContext:
    """Inputs of one case on one device, and its references (computed lazily, per softcap).

    A ``-dpo`` case also holds its precomputed reference values, ``ref_logps`` (made once, at
    construction, from :meth:`float64_sums`: :func:`make_ref_logps`); None for the others."""

    def __init__(self, case: C.Case, device, seed: int = 0, reference: str = "auto"):
        """``reference``: "auto" (float64 on CPU, float32 on CUDA), "float64" or "float32"."""
        if reference not in ("auto", "float64", "float32"):
            raise ValueError(f"unknown reference {reference!r}")
        self.case, self.device = case, torch.device(device)
        self.reference_mode = reference
        self.hidden, self.weight, self.labels = C.make_inputs(case, self.device, seed)
        self._refs: dict = {}
        self._sums: dict = {}
        self.ref_logps = make_ref_logps(case, self.float64_sums(case.softcap)[0], seed) if case.needs_reference \
            else None

    def float64_sums(self, softcap) -> tuple:
        """``(sums [2B], counts [2B])`` float64 of the target log-probs at ``softcap`` (cached): what
        the precompute pass (``sequence_logps``) must return."""
        if softcap not in self._sums:
            self._sums[softcap] = _float64_row_sums(self.hidden, self.weight, self.labels, softcap)
        return self._sums[softcap]

    def reference(self, softcap):
        if softcap not in self._refs:
            self._refs[softcap] = self._make_reference(softcap)
        return self._refs[softcap]

    def _make_reference(self, softcap):
        args = (self.case, self.hidden, self.weight, self.labels, softcap)
        mode = self.reference_mode
        if mode == "float64" or (mode == "auto" and self.device.type != "cuda"):
            if self.case.loss == "dpo":
                return float64_reference_dpo(self.hidden, self.weight, self.labels, softcap, self.ref_logps,
                                             self.case.beta, sums=self.float64_sums(softcap)[0])
            return float64_reference(self.hidden, self.weight, self.labels, softcap)
        backends = ["eager", "torch"]  # eager where it fits, else chunked
        # float32 eager holds ~8 [N, V] float32 buffers (logits, softcap, log-softmax, grads):
        # don't try it where that cannot fit (an OOM attempt costs seconds).
        need = 8 * self.case.tokens * self.case.vocab * 4
        if need > torch.cuda.mem_get_info(self.device)[0]:
            backends.remove("eager")
        for backend in backends:
            try:
                return _float32_reference(backend, *args, ref_logps=self.ref_logps)
            except Exception as exc:  # noqa: BLE001 - OOM is expected at large N
                if not is_oom(exc):
                    raise
            free_memory(self.device)
        return {"kind": "none", "error": "reference out of memory (float32 eager and torch)"}

    def close(self):
        self.hidden = self.weight = self.labels = self.ref_logps = None
        self._refs.clear()
        self._sums.clear()
        free_memory(self.device)


def check(impl: C.Impl, ctx: CaseContext) -> dict:
    """Run ``impl`` once forward+backward and compare with the reference. Returns a dict with
    ``ok`` (bool), ``errors`` (name -> rel err), ``reference`` (kind) and ``detail`` (on failure)."""
    ref = ctx.reference(impl.softcap)
    if ref["kind"] == "none":
        return {"ok": False, "errors": {}, "reference": "none", "detail": ref["error"]}
    loss, logps, dh, dw = _fwd_bwd(impl.fn, ctx.hidden, ctx.weight, ctx.labels)
    errors = {
        "loss": rel_err(loss.reshape(1), ref["loss"].reshape(1)),
        "logps": rel_err(logps, ref["logps"]),
        "dhidden": rel_err(dh, ref["dh"]),
        "dweight": rel_err(dw, ref["dw"]),
    }
    del loss, logps, dh, dw
    tol_val, tol_grad = TOLERANCES[ctx.case.dtype]
    tol = {"loss": tol_val, "logps": tol_val, "dhidden": tol_grad, "dweight": tol_grad}
    bad = [f"{k} {v:.2e}>{tol[k]:.0e}" for k, v in errors.items() if not v <= tol[k]]
    return {"ok": not bad, "errors": errors, "reference": ref["kind"],
            "detail": ";".join(bad) if bad else None}


def measure(impl: C.Impl, ctx: CaseContext, *, target_s: float = 0.5, min_reps: int = 3,
            max_reps: int = 20, check_first: bool = True, timing: bool = True) -> dict:
    """Check, then time forward and forward+backward and measure peak extra memory.

    Returns the result row's measured fields: ``status`` (ok / oom / mismatch:<detail>),
    ``fwd_ms``, ``fwd_bwd_ms``, ``peak_mem_mib`` (fwd+bwd), ``fwd_peak_mem_mib``, ``errors``,
    ``reference`` and timing spreads.
    """
    row = {"status": "ok", "fwd_ms": None, "fwd_bwd_ms": None, "peak_mem_mib": None,
           "fwd_peak_mem_mib": None, "errors": None, "reference": None}
    h, w, lab = ctx.hidden, ctx.weight, ctx.labels
    phase = "check"
    try:
        if check_first:
            res = check(impl, ctx)
            row["errors"], row["reference"] = res["errors"], res["reference"]
            if res["reference"] == "none":  # nothing to check against: not reported as a time
                row["status"] = f"skipped:{res['detail']}"
                return row
            if not res["ok"]:
                row["status"] = f"mismatch:{res['detail']}"
                return row
        if not timing:
            return row
        kw = dict(target_s=target_s, min_reps=min_reps, max_reps=max_reps)
        phase = "fwd"
        t = time_fn(lambda: _fwd(impl.fn, h, w, lab), ctx.device, **kw)
        row["fwd_ms"], row["fwd_ms_range"] = t["median_ms"], [t["min_ms"], t["max_ms"]]
        row["fwd_peak_mem_mib"] = peak_extra_mib(lambda: _fwd(impl.fn, h, w, lab), ctx.device)
        phase = "fwd_bwd"
        t = time_fn(lambda: _fwd_bwd(impl.fn, h, w, lab), ctx.device, **kw)
        row["fwd_bwd_ms"], row["fwd_bwd_ms_range"] = t["median_ms"], [t["min_ms"], t["max_ms"]]
        row["reps"] = t["reps"]
        row["peak_mem_mib"] = peak_extra_mib(lambda: _fwd_bwd(impl.fn, h, w, lab), ctx.device)
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        row["status"] = "oom"
        row["oom_phase"] = phase
    finally:
        free_memory(ctx.device)
    return row


def check_precompute(impl: C.Impl, ctx: CaseContext) -> dict:
    """Run the precompute pass ``impl`` (:func:`benchmarks.cases.build_precompute`) once without
    gradient and compare with the float64 per-row sums (relative norm error, the loss tolerance of
    the dtype) and counts (exactly). Returns ``ok``, ``errors`` (``sums``, ``counts``: the number of
    rows whose count differs), ``reference`` and ``detail``."""
    sums64, counts64 = ctx.float64_sums(impl.softcap)
    sums, counts = _fwd(impl.fn, ctx.hidden, ctx.weight, ctx.labels)
    bad = []
    want = torch.float64 if ctx.case.dtype == "float64" else torch.float32
    if sums.dtype != want or counts.dtype != torch.int64:
        bad.append(f"dtypes {sums.dtype}/{counts.dtype}, expected {want}/torch.int64")
    errors = {"sums": rel_err(sums, sums64),
              "counts": int((counts.detach().to(counts64.device, torch.float64) != counts64).sum())
              if counts.shape == counts64.shape else counts64.numel()}
    tol = TOLERANCES[ctx.case.dtype][0]
    if not errors["sums"] <= tol:
        bad.append(f"sums {errors['sums']:.2e}>{tol:.0e}")
    if errors["counts"]:
        bad.append(f"counts differ in {errors['counts']} rows")
    return {"ok": not bad, "errors": errors, "reference": "float64", "detail": ";".join(bad) or None}


def measure_precompute(impl: C.Impl, ctx: CaseContext, *, target_s: float = 0.5, min_reps: int = 3,
                       max_reps: int = 20, check_first: bool = True) -> dict:
    """The precompute pass: check (:func:`check_precompute`), then the median forward time
    (``fwd_ms``; no gradient) and its peak extra memory (``fwd_peak_mem_mib``, CUDA). Status as
    :func:`measure`."""
    row = {"status": "ok", "fwd_ms": None, "fwd_peak_mem_mib": None, "errors": None, "reference": None}
    try:
        if check_first:
            res = check_precompute(impl, ctx)
            row["errors"], row["reference"] = res["errors"], res["reference"]
            if not res["ok"]:
                row["status"] = f"mismatch:{res['detail']}"
                return row
        h, w, lab = ctx.hidden, ctx.weight, ctx.labels
        t = time_fn(lambda: _fwd(impl.fn, h, w, lab), ctx.device, target_s=target_s, min_reps=min_reps,
                    max_reps=max_reps)
        row.update(fwd_ms=t["median_ms"], fwd_ms_range=[t["min_ms"], t["max_ms"]], reps=t["reps"])
        row["fwd_peak_mem_mib"] = peak_extra_mib(lambda: _fwd(impl.fn, h, w, lab), ctx.device)
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        row["status"] = "oom"
    finally:
        free_memory(ctx.device)
    return row


def case_row(case: C.Case, impl_name: str, softcap, notes) -> dict:
    """The descriptive fields of a result row (schema in benchmarks/README.md)."""
    return {"impl": impl_name, "family": case.family, "tokens": case.tokens, "rows": case.rows,
            "seq": case.seq, "hidden": case.hidden, "vocab": case.vocab, "softcap": softcap,
            "dtype": case.dtype, "loss": case.loss, "notes": list(notes)}


def run_impl(impl_name: str, ctx: CaseContext, *, catch_errors: bool = True, **kw) -> dict:
    """One result row for ``impl_name`` at ``ctx``'s case (skips become ``skipped:<reason>``).

    With ``catch_errors`` (the runner: one failing peer must not end a whole GPU call) any other
    exception becomes status ``error:<type>: <message>`` and its traceback goes to stderr."""
    try:
        impl = C.build_impl(impl_name, ctx.case, ctx.device, ref_logps=ctx.ref_logps)
    except C.Unavailable as exc:
        row = case_row(ctx.case, impl_name, ctx.case.softcap, [])
        row.update(status=f"skipped:{exc}", fwd_ms=None, fwd_bwd_ms=None, peak_mem_mib=None)
        return row
    row = case_row(ctx.case, impl_name, impl.softcap, impl.notes)
    try:
        row.update(measure(impl, ctx, **kw))
    except Exception as exc:  # noqa: BLE001
        if not catch_errors:
            raise
        traceback.print_exc()
        msg = " ".join(str(exc).split())[:300]
        row.update(status=f"error:{type(exc).__name__}: {msg}", fwd_ms=None, fwd_bwd_ms=None,
                   peak_mem_mib=None)
        free_memory(ctx.device)
    return row


def matmul_tflops(device, n: Optional[int] = None, dtype=torch.bfloat16) -> dict:
    """Measured dense matmul rate (random ``n x n`` operands): the ceiling for the 6NHV floor."""
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 512
    g = torch.Generator(device=device).manual_seed(1234)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: torch.matmul(a, b, out=out), device, warmup=3, target_s=1.0,
                min_reps=10, max_reps=100)
    a = b = out = None  # free the operands before the caller's next allocation
    free_memory(device)
    return {"tflops": 2.0 * n ** 3 / (t["median_ms"] * 1e-3) / 1e12, "n": n,
            "dtype": str(dtype).replace("torch.", ""), "median_ms": t["median_ms"]}


# --------------------------------------------------------------------------------------------
# Provenance


def git_commit(explicit: Optional[str] = None) -> str:
    """``explicit``, else ``$SIMPO_COMMIT`` (the device machine's copy has no .git), else
    ``git rev-parse`` (``-dirty`` when tracked files differ from it)."""
    explicit = explicit or os.environ.get("SIMPO_COMMIT")
    if explicit:
        return explicit
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             timeout=10, cwd=root)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=10, cwd=root).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"
