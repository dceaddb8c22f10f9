"""Shared pieces of the Triton-backend tests (interpreter on CPU, real kernels on CUDA).

Every comparison goes through :func:`check`, which asserts a relative-norm error against the
independent float64 reference (:mod:`tests.reference`) and, when ``SIMPO_ERRLOG`` names a file,
appends the measured error to it as a JSON line (used to report the measured errors per case).
"""

from __future__ import annotations

import json
import math
import os
import sys
from contextlib import contextmanager
from typing import Optional

import pytest
import torch

from tests.reference import reference_simpo, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_CPU = DEVICE == "cpu"

#: Relative-norm tolerances vs the float64 reference (interpreter or GPU), by input dtype.
#: Float32 runs every matmul in float32 (IEEE): ~1e-7 measured, 1e-5 asserted. Float16 inputs are
#: exact in float32 products, so the forward stays float32-accurate; the backward contracts dz
#: after a cast to float16 (tensor-core operands) and returns float16 grads: ~3e-4 measured.
TOL = {
    torch.float32: {"fwd": 1e-5, "grad": 1e-5},
    torch.float16: {"fwd": 1e-5, "grad": 2e-3},
    torch.bfloat16: {"fwd": 1e-3, "grad": 1e-2},  # CUDA only: the interpreter cannot do bf16 math
}

FORWARD_KEYS = ("loss", "losses", "chosen_logps", "rejected_logps", "chosen_rewards",
                "rejected_rewards", "chosen_logits_mean", "rejected_logits_mean")


def check(case: str, name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert got is not None, f"{case}: {name} missing"
    assert torch.isfinite(got).all(), f"{case}: {name} has non-finite entries (unwritten output?)"
    err = rel_err(got, ref)
    path = os.environ.get("SIMPO_ERRLOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"case": case, "name": name, "err": err, "tol": tol}) + "\n")
    assert err <= tol, f"{case}: {name} relative error {err:.3e} > {tol:.1e}"


def make_batch(B: int, T: int, H: int, V: int, dtype: torch.dtype, *, prefix: int = 0, bias: bool = False,
               scale: float = 1.0, seed: int = 0, ignore_index: int = -100):
    """Random ``[2B, T, H]`` hidden, ``[V, H]`` weight, optional ``[V]`` bias, ``[2B, T]`` labels.

    Logits have standard deviation ~``scale``. Each row gets a masked prompt of ``prefix``
    positions (capped so that every row keeps at least one target) plus a random extra mask.
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (scale / math.sqrt(H))
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    for r in range(2 * B):
        p = min(prefix + r % 2, T - 1)  # vary prompt lengths across rows
        labels[r, :p] = ignore_index
    extra = torch.rand(2 * B, T, generator=g) < 0.2
    extra[:, -1] = False  # keep the last label so every row has a target
    labels[extra] = ignore_index
    to = dict(device=DEVICE, dtype=dtype)
    return (hidden.to(**to), weight.to(**to), None if b is None else b.to(**to), labels.to(DEVICE))


def reference_with_grads(hidden, weight, bias, labels, *, softcap, options):
    """Float64 reference outputs and grads of its loss w.r.t. (hidden, weight, bias)."""
    leaves = [t.detach().double().cpu().requires_grad_() if t is not None else None
              for t in (hidden, weight, bias)]
    ref = reference_simpo(leaves[0], leaves[1], labels.cpu(), bias=leaves[2], softcap=softcap, **options)
    ref["loss"].backward()
    return ref, [None if t is None else t.grad for t in leaves]


@contextmanager
def poison_uninitialized():
    """Make ``torch.empty``/``empty_like`` return NaN-filled memory, so unwritten outputs fail."""
    old = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old, warn_only=old_warn)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill


requires_cuda = pytest.mark.skipif(
    ON_CPU, reason="needs a CUDA GPU: bf16 cannot be checked in the Triton interpreter "
                   "(a bf16 tl.dot multiplies raw bit patterns there, triton issue 11584)")


# Where the Triton interpreter cannot run the kernels (triton <= 3.6 under numpy >= 2.4), the library
# refuses (simpo_kernels.kernels.launch: interpreter_problem, InterpreterUnavailable). Tests that
# need the interpreter then skip with the library's reason instead of failing: the hook below,
# imported by tests/conftest.py and benchmarks/conftest.py (one source of truth: the library's
# probe). A test that runs the interpreter in a subprocess asks interpreter_problem() itself.


def interpreter_refusal(exc: Optional[BaseException]) -> Optional[BaseException]:
    """The library's refusal of the Triton interpreter behind ``exc``: ``exc`` itself, or one it
    was raised from or while handling (e.g. ``pytest.raises(..., match=...)``'s AssertionError when
    the refusal came instead of the expected error), or None."""
    launch = sys.modules.get("simpo_kernels.kernels.launch")
    if exc is None or launch is None:  # not imported: the kernels never ran, nothing refused them
        return None
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, launch.InterpreterUnavailable):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that failed on the library's refusal of the Triton interpreter is reported as
    skipped, with the refusal (which names the versions and the fix) as the reason: this
    environment cannot run it; the code under test did not fail."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed or call.excinfo is None:
        return
    refusal = interpreter_refusal(call.excinfo.value)
    if refusal is not None:
        path, line = item.reportinfo()[:2]
        report.outcome = "skipped"
        report.longrepr = (os.fspath(path), (line or 0) + 1, f"Skipped: needs the Triton interpreter: {refusal}")
