"""Shared pieces of the Triton-backend tests (interpreter on CPU, real kernels on CUDA).

Every comparison goes through :func:`check`, which asserts a relative-norm error against the
independent float64 reference (:mod:`tests.reference`) and, when ``SIMPO_ERRLOG`` names a file,
appends the measured error to it as a JSON line (used to report the measured errors per case).
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager

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
