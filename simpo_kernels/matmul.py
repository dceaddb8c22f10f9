"""The lm_head matmuls of the torch-driven paths, with float32 products from 16-bit operands.

The ``torch`` backend and the ``pairs`` / ``vocab`` schedules all multiply a chunk of hidden rows
(or of logit gradients) by the lm_head weight and need the product in float32 (float64 for
float64 inputs) without a float32 copy of the ``[V, H]`` weight. On CUDA, cuBLAS does that
directly: ``torch.mm(a, b, out_dtype=torch.float32)`` takes bf16/fp16 operands, accumulates in
float32 and returns float32 (DESIGN section 8), and ``torch.addmm(acc, a, b, out_dtype=float32,
out=acc)`` accumulates into a float32 buffer in place. Elsewhere (CPU), or where a torch build
lacks those overloads, 16-bit operands are upcast: the weight once per pass, which is fine for the
small models the CPU paths serve.
"""

from __future__ import annotations

from typing import Optional

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)

_PROBES: dict = {}  # (name, device type, dtype) -> whether the overload works there


def _probe(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``mm`` (float32 output) or in-place ``addmm`` (float32 accumulator) of ``dtype``
    operands works on ``device`` and gives the right numbers (checked once per process)."""
    key = (name, device.type, dtype)
    if key not in _PROBES:
        ok = False
        if device.type == "cuda":  # cuBLAS only (DESIGN section 8)
            try:
                a = torch.ones(16, 16, dtype=dtype, device=device)
                if name == "mm":
                    ok = bool((torch.mm(a, a, out_dtype=torch.float32) == 16).all())
                else:
                    acc = torch.ones(16, 16, dtype=torch.float32, device=device)
                    torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
                    ok = acc.dtype == torch.float32 and bool((acc == 17).all())
            except (TypeError, RuntimeError, NotImplementedError):
                ok = False
        _PROBES[key] = ok
    return _PROBES[key]


class LinearHead:
    """The lm_head operands of one pass, arranged so that every product is in ``cdtype``.

    ``fast``: 16-bit operands with float32-output cuBLAS matmuls. Otherwise the weight (and each
    chunk) is used in the compute dtype: unchanged for float32/float64 inputs, an upcast copy for
    16-bit ones. Never a view that is written to.

    Args:
        weight: ``[V, H]`` lm_head weight. bias: ``[V]`` or None.
        cdtype: the compute dtype, float32 (float64 for float64 inputs).
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], cdtype: torch.dtype):
        self.cdtype, self.in_dtype = cdtype, weight.dtype
        self.fast = weight.dtype in HALF_DTYPES and _probe("mm", weight.device, weight.dtype)
        self.fast_acc = self.fast and _probe("addmm", weight.device, weight.dtype)
        self.w = weight if self.fast else weight.to(cdtype)
        self.b = None if bias is None else bias.to(cdtype)

    @property
    def grad_dtype(self) -> torch.dtype:
        """The dtype logit gradients are written in before they meet the weight: the input dtype
        on the fast path (tensor-core operands), the compute dtype otherwise."""
        return self.in_dtype if self.fast else self.cdtype

    def operand(self, x: torch.Tensor) -> torch.Tensor:
        """A chunk (hidden rows or dz) as a matmul operand (no copy when it already is one)."""
        return x.to(self.in_dtype) if self.fast else x.to(self.cdtype)

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a @ b`` of two operands, in the compute dtype."""
        if self.fast:
            return torch.mm(a, b, out_dtype=torch.float32)
        return a @ b

    def addmm_(self, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """``acc += a @ b`` (``acc`` in the compute dtype, a buffer of the caller's own), in place:
        no temporary of ``acc``'s size where cuBLAS can accumulate into it."""
        if self.fast_acc:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        elif self.fast:
            acc += torch.mm(a, b, out_dtype=torch.float32)
        else:
            acc.addmm_(a, b)

    def raw_logits(self, h: torch.Tensor, v0: int = 0, v1: Optional[int] = None) -> torch.Tensor:
        """``h @ W[v0:v1].T`` in the compute dtype, without bias or softcap (a fresh tensor)."""
        return self.mm(self.operand(h), self.w[v0:v1].t())

    def logits(self, h: torch.Tensor, softcap: Optional[float]):
        """Capped logits of a chunk of hidden rows (a fresh tensor) and ``tanh(z/s)`` (None
        without softcap)."""
        z = self.raw_logits(h)
        if self.b is not None:
            z += self.b
        if softcap is None:
            return z, None
        t = z.div_(softcap).tanh_()  # in place on the fresh buffer: z now holds tanh(z / s)
        return t * softcap, t
