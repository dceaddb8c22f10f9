"""Launch configuration of the Triton backend, and a launch as data.

:class:`KernelConfig` holds the tile shapes, warps, pipeline stages and raster groups; the GPU
defaults are chosen from what the compiled sm_90 code shows (``benchmarks/compile_gate.py`` and
its JSON under ``benchmarks/results/compile/``), not yet from a GPU timing. :class:`Launch` is one
kernel launch (kernel, grid, arguments, options): the launchers build it and run it, and the
compile gate builds the same object from ``meta`` tensors at the target shape and compiles it for
sm_90, so the gate checks exactly the code that runs.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from ..tuned import table_path, tuned_options


def interpreting() -> bool:
    """True when kernels run in the Triton CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _loop_bound_probe(out_ptr, n):
    count = 0
    for _ in range(0, n):
        count += 1
    tl.store(out_ptr, count)


class InterpreterUnavailable(RuntimeError):
    """The Triton interpreter cannot run the kernels here (:func:`interpreter_problem` says why,
    and the message names the fix). A limit of the environment, not a failure of the kernels: its
    own type, so that callers (the test suite skips on it) can tell the two apart."""


@torch.compiler.disable  # a probe launch: never traced (dynamo would skip the cache and re-run it)
def interpreter_problem() -> Optional[str]:
    """Why the Triton interpreter cannot run our kernels here, or None when it can (cached)."""
    return _interpreter_problem()


@functools.lru_cache(maxsize=None)
def _interpreter_problem() -> Optional[str]:
    """The probe behind :func:`interpreter_problem`.

    The kernels loop up to run-time bounds (``range(0, H, BLOCK_H)``). The interpreter of triton
    3.6 and earlier turns such a bound into a Python int with ``int()`` of a 1-element numpy array,
    which numpy 2.4 no longer allows (later Triton squeezes the array first). The loop bound cannot
    be made a compile-time constant without recompiling the GPU kernels per shape, so this
    combination is detected once, with a one-program probe, and refused with the fix named.
    """
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_bound_probe[(1,)](out, 3)
    except Exception as exc:  # the interpreter wraps the numpy TypeError in its own error type
        import numpy

        return (f"the Triton {triton.__version__} interpreter cannot run loops with run-time bounds under "
                f"numpy {numpy.__version__} ({exc}); install numpy<2.4 or a newer triton, or use "
                f"backend='torch'")
    if int(out[0]) != 3:
        return f"the Triton {triton.__version__} interpreter ran a 3-step probe loop {int(out[0])} times"
    return None


@dataclass(frozen=True)
class KernelConfig:
    """Block shapes and launch options of the fused kernels.

    block_n/block_v/block_h: token, vocabulary and hidden tile of the forward
    (``_lse_forward_kernel``); bwd_*: the same for the backward (``_logprob_backward_kernel``),
    which keeps the logit, tanh and dz tiles live and so takes smaller tiles.
    v_splits: vocabulary splits of the forward; 0 chooses them so that one raster group of
    ``group_n`` token blocks times the splits fills the resident programs (SMs x ``ctas_per_sm``).
    group_n / bwd_group_n: token blocks per raster group. Programs of one group run together and
    share their hidden rows and weight tiles through L2; without groups the programs in flight
    cover every token block, i.e. all of ``hidden`` (59 MB at the Gemma-2-9B shape, more than the
    H100's 50 MB L2), re-read from HBM for every vocabulary tile. 16 blocks: a forward group's
    hidden rows are 15 MB, a backward group's hidden and float32 dH rows 22 MB, which leaves L2
    room for the weight and dW tiles streaming past; larger backward groups would stream W and
    the dW accumulator fewer times, but their working set no longer fits beside them.
    ctas_per_sm: programs of the forward resident per SM, as the compiled kernel's registers and
    shared memory allow (the compile gate checks this number against the sm_90 code).
    logits_block_v / logits_num_warps: the row kernels (given logits, and the ``pairs``/``vocab``
    schedules' chunks).
    atomic_sem: the backward's float32 atomic adds, ``"relaxed"`` (plain ``REDG``) or ``"acq_rel"``
    (Triton's default: a GPU-scope fence and an L1 invalidation around each add), kept selectable
    so that the GPU campaign can measure that cost; nothing needs the ordering.
    """

    block_n: int = 128
    block_v: int = 128
    block_h: int = 64
    num_warps: int = 8
    num_stages: int = 3
    v_splits: int = 0
    group_n: int = 16
    ctas_per_sm: int = 1
    bwd_block_n: int = 64
    bwd_block_v: int = 128
    bwd_block_h: int = 64
    bwd_num_warps: int = 8
    bwd_num_stages: int = 3
    bwd_group_n: int = 16
    logits_block_v: int = 4096
    logits_num_warps: int = 8
    atomic_sem: str = "relaxed"


#: TF32 (``allow_tf32`` on): wgmma on float32 operands, which take twice the shared memory per
#: stage: half the hidden slice, two stages.
GPU_FP32_TF32 = replace(KernelConfig(), block_h=32, bwd_block_h=32, num_stages=2, bwd_num_stages=2)
#: IEEE float32 (``allow_tf32`` off) has no tensor-core path: ``tl.dot`` compiles to FFMA, and the
#: 16-bit tiles spill. Small tiles that compile without spills (two forward programs per SM): a
#: correct configuration for tests and references, not a fast one; train in bf16.
GPU_FP32_IEEE = replace(KernelConfig(), block_n=64, block_v=64, block_h=32, num_warps=4, num_stages=2,
                        ctas_per_sm=2, bwd_block_n=32, bwd_block_v=32, bwd_block_h=16, bwd_num_warps=4,
                        bwd_num_stages=2)

#: Small tiles for the interpreter: numpy work per program is cheap, programs are not, but tiles
#: must stay below the test shapes so that partial tiles are exercised.
INTERPRETER_CONFIG = KernelConfig(block_n=16, block_v=32, block_h=16, num_warps=4, num_stages=1, v_splits=3,
                                  group_n=2, bwd_block_n=16, bwd_block_v=32, bwd_block_h=16,
                                  bwd_num_warps=4, bwd_num_stages=1, bwd_group_n=2,
                                  logits_block_v=64, logits_num_warps=4)

ATOMIC_SEMANTICS = ("relaxed", "acq_rel")
_OPTION_NAMES = frozenset(KernelConfig.__dataclass_fields__)
_POW2_FIELDS = ("block_n", "block_v", "block_h", "bwd_block_n", "bwd_block_v", "bwd_block_h", "logits_block_v")
_POSITIVE_FIELDS = ("num_warps", "num_stages", "group_n", "ctas_per_sm", "bwd_num_warps", "bwd_num_stages",
                    "bwd_group_n", "logits_num_warps")


def gpu_config(dtype: torch.dtype, allow_tf32: bool) -> KernelConfig:
    """The CUDA defaults for an input dtype (``allow_tf32``: ``torch.backends.cuda.matmul.allow_tf32``)."""
    if dtype == torch.float32:
        return GPU_FP32_TF32 if allow_tf32 else GPU_FP32_IEEE
    return KernelConfig()


def make_config(device: torch.device, dtype: torch.dtype, options: dict, *, schedule: Optional[str] = None,
                shape: Optional[tuple[int, int, int]] = None) -> KernelConfig:
    """The launch configuration: the defaults for the device and dtype, then the measured table's
    entry for ``schedule`` at ``shape = (tokens, hidden, vocab)`` when both are given and a table
    for this GPU is committed (:mod:`simpo_kernels.tuned`), then any ``KernelConfig`` field in
    ``options`` (the caller's word is last)."""
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise TypeError(f"unknown triton backend option(s) {sorted(unknown)}; known: {sorted(_OPTION_NAMES)}")
    if interpreting() or device.type != "cuda":
        cfg = INTERPRETER_CONFIG
    else:
        cfg = gpu_config(dtype, torch.backends.cuda.matmul.allow_tf32)
    if schedule is not None and shape is not None:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        tuned = tuned_options(name, schedule, str(dtype).replace("torch.", ""), *shape)
        if tuned:
            try:
                bad = set(tuned) - _OPTION_NAMES
                if bad:
                    raise ValueError(f"unknown KernelConfig fields {sorted(bad)}")
                cfg = _checked(replace(cfg, **tuned))
            except ValueError as exc:
                raise ValueError(f"{table_path(name)}: entry for {schedule!r}: {exc}") from None
    return _checked(replace(cfg, **options))


def _checked(cfg: KernelConfig) -> KernelConfig:
    """``cfg`` if every field is in range, else ValueError naming the field."""
    for name in _POW2_FIELDS:
        b = getattr(cfg, name)
        if not isinstance(b, int) or isinstance(b, bool) or b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b!r}")
    for name in _POSITIVE_FIELDS:
        b = getattr(cfg, name)
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise ValueError(f"{name} must be a positive int, got {b!r}")
    if cfg.atomic_sem not in ATOMIC_SEMANTICS:
        raise ValueError(f"atomic_sem must be one of {ATOMIC_SEMANTICS}, got {cfg.atomic_sem!r}")
    if not isinstance(cfg.v_splits, int) or isinstance(cfg.v_splits, bool) or cfg.v_splits < 0:
        raise ValueError(f"v_splits must be an int >= 0 (0: automatic), got {cfg.v_splits!r}")
    return cfg


def input_precision(dtype: torch.dtype, allow_tf32: Optional[bool] = None) -> Optional[str]:
    """``tl.dot`` precision: float32 follows ``allow_tf32`` (as ``F.linear`` does); 16-bit: None."""
    if dtype == torch.float32:
        tf32 = torch.backends.cuda.matmul.allow_tf32 if allow_tf32 is None else allow_tf32
        return "tf32" if tf32 else "ieee"
    return None


def resident_programs(device: torch.device, ctas_per_sm: int) -> int:
    """How many programs run at once: SMs x programs per SM (4 SMs stand in for a CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * ctas_per_sm
    return 4 * ctas_per_sm


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel[grid](**args, **options)``.

    ``args`` holds every argument by name (tensors, scalars, None for absent optional pointers,
    constexpr values); the kernels' ``triton.heuristics`` derive their flags from it.
    """

    kernel: Any
    grid: tuple[int, ...]
    args: dict[str, Any]
    options: dict[str, int] = field(default_factory=dict)

    def run(self) -> None:
        self.kernel[self.grid](**self.args, **self.options)
