"""Cost model of the SimPO lm_head loss: FLOPs, HBM bytes, atomic bytes and predicted time per pass.

    python -m benchmarks.cost_model --family gemma2-9b --tokens 8192 --target-frac 0.5 [--summary]
        [--logit-metrics exact|targets|none] [--memory-budget BYTES]
    python -m benchmarks.cost_model --logit-metrics-table --schedules-table [--out FILE.md]
    python -m benchmarks.cost_model --family gemma2-9b --tokens 8192 --target-frac 0.4 --losses-table
    python -m benchmarks.cost_model --loss dpo [--reference in-step] [--precompute]

For every implementation the benchmarks time (``eager``; ``torch``, its ``tokens`` schedule;
``triton``, i.e. ``schedule="auto"``, and each triton schedule pinned: ``triton-pairs``,
``triton-vocab``, ``triton-fused``; the peers ``liger`` and ``cce``) and for the ideal ``floor``,
at a shape (``N`` tokens, hidden ``H``, vocabulary ``V``, input dtype bytes ``b``, softcap on/off)
and a target fraction ``f`` (the share of the ``N`` positions whose shifted label is not ``-100``;
``M = round(f * N)`` target rows), this module counts, per pass:

* ``flops``: matmul FLOPs only (``2 * rows * H * V`` per logits, dH or dW product). Elementwise
  work (exp, tanh, casts) is counted as the bytes it moves, never as FLOPs: in the unfused
  backends it is memory-bound, in the fused kernels it is a few operations per logit against
  ``2H`` matmul FLOPs per logit.
* ``hbm_bytes``: bytes read from and written to HBM.
* ``atomic_bytes``: bytes accumulated through atomics or lock-protected read-modify-writes.

Passes: ``fwd`` is the forward without gradient, as the benchmarks time it (``no_grad``);
``bwd`` is everything ``fwd_bwd`` adds to it (the backward, plus any work a grad-mode forward
does beyond the no-grad one: Liger and the ``pairs`` schedule form their gradients inside the
forward, CCE adds a logit average); ``fwd_bwd`` is their sum.

Target compaction (every path of this library but ``eager``, ``simpo_kernels/api.py``
``_compacted``): only the ``M`` target rows get log-probabilities and gradients; their hidden rows
are gathered (``index_select``, ``2*M*H*b`` bytes) and dH is scattered back to ``[N, H]``. The other
``N - M`` rows matter only to the ``logits/*`` metrics, by ``logit_metrics``: ``"exact"`` (the
default) computes their logit sums, one read of W plus a GEMV without a softcap, a forward-only
pass of the schedule over their logits (``2*(N-M)*H*V`` FLOPs) with one; ``"targets"`` and
``"none"`` cost nothing extra (:func:`_metric_rows`). ``eager``, ``liger``, ``cce`` and ``floor``
ignore ``logit_metrics`` (``floor`` stays the dense ``6NHV`` of DESIGN section 2; the
schedule table divides by ``6MHV`` instead). The ``pairs`` and ``vocab`` chunks follow
``memory_budget`` (default :data:`DEFAULT_MEMORY_BUDGET`) through the library's own chunking
functions, imported at call time.

Time (assumptions, all of them):

* A pass is a sequence of *phases* (one kernel, or a run of kernels of one kind) that run one
  after another; a phase takes ``max(flops / matmul rate, hbm_bytes / hbm_bw + atomic_bytes /
  atomic_bw)``: compute and memory overlap inside a kernel, but not across kernel launches, and
  atomics share the memory system with ordinary traffic, so their terms add. A pass's time is the
  sum over its phases (for a fused single-kernel pass this is the plain ``max`` rule).
* Every matmul runs at the one dense rate (default 798 TFLOP/s, the H100's measured cuBLAS bf16
  rate). Triton tiles and small-M GEMMs run slower than cuBLAS's best in reality: the model is
  optimistic there, and says so.
* Atomic payload is charged at ``atomic_bw`` (default: the HBM bandwidth). The adds are executed
  in L2, but the accumulators (``dW`` is ``V * H * 4`` bytes, 3.7 GB at Gemma-2-9B) are far larger
  than L2; one byte of payload per byte of HBM bandwidth is a middle estimate between L2-resident
  reductions (faster) and a line fetch plus write-back per add (slower). It is the least certain
  number here and the first to calibrate on a GPU (``--atomic-tbps``).
* cuBLAS GEMMs read each operand from HBM once and write the output once (L2 tile
  rasterisation); the tiny per-token vectors (lse, targets, grad, partial maxima: ``O(N)`` or
  ``O(splits * N)`` bytes) are ignored everywhere.
* Tiled Triton kernels (ours and CCE's) are rastered in groups of token blocks that run together:
  the weight is read from HBM once per group (its tiles are shared through L2 by the group's
  token blocks), and a program's second read of its own weight tile (backward) hits L2. An operand
  that programs re-read tile after tile (each token block's hidden rows, once per vocabulary tile)
  is read once if its in-flight footprint fits in L2, otherwise on every re-read (a cyclic sweep
  larger than the cache evicts each line before its reuse).
* Elementwise PyTorch kernels are unfused: each reads its inputs and writes its output once
  (reductions such as ``log_softmax`` read their input twice: max/sum, then the write pass).

Losses (``loss=``, a name in ``simpo_kernels.LOSSES``, read at call time): every paired loss of
the family (SimPO, DPO, R-DPO, CPO, ORPO, RRHF, SLiC) reaches the lm_head only through per-sequence
sums or means of target log-probabilities, optional reference sums (``[B]`` tensors) and an optional
chosen-row NLL, which is the same per-row sums again: the per-token gradient is still one scalar per
sequence (``dL/ds`` of its row, plus the NLL weight over the chosen token count, known from the
labels before any logit). So at equal ``logit_metrics`` every loss has SimPO's matmul FLOPs, HBM and
atomic bytes, per backend and schedule, and the ``pairs`` schedule still forms its gradients in the
forward; the heads themselves are ``O(B)`` and not counted. What differs per loss is only its
official ``logit_metrics`` (``"targets"`` for DPO and R-DPO, as TRL's DPOTrainer: no metric-only
rows; ``"exact"`` for the others), the default of :func:`predict` (``logit_metrics=None``).
A reference (DPO, R-DPO) comes either ``precomputed`` (the default: per-row sums read from the data
set, ``O(B)`` bytes, nothing else) or ``in-step`` (a frozen reference model run in every step, no
gradient): only its head is modelled, the reference model's own forward of the body is not (it is
the policy's body forward again, outside this module's scope). The reference's head is the
precompute pass below, added to the step's forward: ``+2MHV`` FLOPs (``2NHV`` with every position
a target).

The reference precompute pass (:func:`predict_precompute`; ``sequence_logps``): per-row sums of
target log-probabilities without gradient, once over the data set: a forward over the ``M`` target
rows only (no metric-only rows), ``2MHV`` FLOPs (``2NHV`` with every position a target), no
backward; ``triton`` runs the fused log-sum-exp kernel (no logits in memory at all), ``torch`` token
chunks, ``eager`` the ``[M, V]`` logits.

The per-backend counts, and where they come from in the code, are in the ``_eager``, ``_torch``,
``_pairs``, ``_vocab``, ``_fused``, ``_liger``, ``_cce`` and ``_floor`` docstrings (``triton`` is
the one of ``_pairs``/``_vocab``/``_fused`` that :func:`auto_schedule` picks). These are
predictions, not measurements: ``python -m benchmarks`` prints them beside the measured times.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from dataclasses import KW_ONLY, dataclass, fields, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Optional, Sequence

#: ``triton`` is what ``simpo_loss(backend="triton")`` runs (``schedule="auto"``, resolved as the
#: library does: :func:`auto_schedule`); ``triton-<schedule>`` pins a schedule; ``torch`` is the
#: torch backend's ``tokens`` schedule.
BACKENDS = ("eager", "torch", "triton", "triton-pairs", "triton-vocab", "triton-fused", "liger", "cce", "floor")
#: The triton backend's schedules (``simpo_kernels.schedules.SCHEDULES["triton"]``) and their model names.
TRITON_SCHEDULES = {"pairs": "triton-pairs", "vocab": "triton-vocab", "fused": "triton-fused"}
#: Every modelled schedule -> its backend name here (``tokens``: the torch backend).
SCHEDULE_BACKENDS = {**TRITON_SCHEDULES, "tokens": "torch"}
PASSES = ("fwd", "bwd", "fwd_bwd")
LOGIT_METRICS = ("exact", "targets", "none")
#: ``simpo_loss``'s default (and SimPO's official definition); other losses: :func:`loss_profile`.
DEFAULT_LOGIT_METRICS = "exact"
#: Where a loss's reference log-probs come from: read from the data set (``precomputed``), or a
#: frozen reference model run in every step (``in-step``; its head modelled, its body not).
REFERENCES = ("precomputed", "in-step")
#: Backends with a precompute pass (``sequence_logps(backend=...)``, which has no schedule option;
#: ``cce``: its forward summed per row; ``floor``: ``2NHV``, reading H and W once). Liger has none
#: (no per-token output).
PRECOMPUTE_BACKENDS = ("eager", "torch", "triton", "cce", "floor")

#: Bytes of float32 logits a ``pairs``/``vocab`` chunk may take (``simpo_loss(memory_budget=)``).
#: The library's default is a quarter of the free CUDA memory at call time (at least 256 MiB): on an
#: 80 GB H100 holding only a benchmark's inputs that is ~19 GiB, in a training step beside the
#: model's weights, optimizer state and activations far less. 8 GiB stands for the latter; at the
#: Gemma-2-9B shape it still holds every target row's logits up to N=16384 at half targets
#: (4096 x 256000 x 4 B = 4.2 GB per 8192 tokens), so costs there barely depend on it.
DEFAULT_MEMORY_BUDGET = 8 * 2**30

#: H100 SXM defaults: the measured cuBLAS bf16 rate (8192^3), HBM3 bandwidth, L2 size, SM count.
DEFAULT_MATMUL_TFLOPS = 798.0
DEFAULT_HBM_TBPS = 3.0
DEFAULT_L2_BYTES = 50 * 2**20
DEFAULT_SMS = 132

#: Default target fraction for the CLI: half the positions carry a label. (The benchmarks'
#: random labels mask 1/8..1/2 of every row as prompt plus some padding: about 0.67; the runner
#: uses the fraction of the case it measures.)
DEFAULT_TARGET_FRAC = 0.5

#: Cut Cross-Entropy's backward tiles skipped by gradient filtering (fraction of tiles). 0 by
#: default: on the benchmarks' random inputs (logit std 5, softcap 30, V=256000) about 0.2% of the
#: softmax entries exceed its bf16 threshold 2^-12, so a 128x128 tile holds ~30 of them and
#: virtually none is skipped. On a trained model's peaked distributions most tiles are skipped (CCE's own
#: autotuning cost model assumes 80%): pass ``cce_filtered_frac`` for that regime.
DEFAULT_CCE_FILTERED_FRAC = 0.0

# Cut Cross-Entropy launch shapes: its non-autotuned defaults (cut_cross_entropy/tl_autotune.py,
# forward BLOCK_B=256, BLOCK_V=128; backward BLOCK_B=128, BLOCK_V=128) and its raster group of 8
# token blocks (GROUP_B in both kernels).
CCE_FWD_BLOCK_B = 256
CCE_BWD_BLOCK_B = 128
CCE_BLOCK_V = 128
CCE_GROUP_B = 8

FLOAT32_BYTES = 4
MIB_BYTES = 2 ** 20
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


# --------------------------------------------------------------------------------------------
# Inputs


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Shape:
    """One lm_head loss problem.

    Attributes:
        tokens: ``N``, positions in the batch (``2B`` rows of ``T``).
        hidden: ``H``. vocab: ``V``.
        dtype_bytes: bytes per element of hidden states and weight (2: bf16/fp16, 4: fp32).
        softcap: whether a final-logit softcap is applied (Liger ignores it: it has none).
        target_frac: share of the ``N`` positions with a target, in ``[0, 1]``.
        row_len: tokens per sequence (rows are ``max(2, N // row_len)``, as in
            :func:`benchmarks.cases.make_case`); only Liger's chunking (one pair per chunk) uses it.
    """

    tokens: int
    hidden: int
    vocab: int
    dtype_bytes: int = 2
    softcap: bool = True
    target_frac: float = DEFAULT_TARGET_FRAC
    row_len: int = 2048

    def __post_init__(self):
        _positive_int("tokens", self.tokens)
        _positive_int("hidden", self.hidden)
        _positive_int("vocab", self.vocab)
        _positive_int("row_len", self.row_len)
        if self.dtype_bytes not in (2, 4):
            raise ValueError(f"dtype_bytes must be 2 (bf16/fp16) or 4 (fp32), got {self.dtype_bytes!r}")
        if not isinstance(self.softcap, bool):
            raise ValueError(f"softcap must be a bool (whether a softcap is applied), got {self.softcap!r}")
        object.__setattr__(self, "target_frac", _fraction("target_frac", self.target_frac))

    @property
    def target_rows(self) -> int:
        """``M``: positions with a target (they alone carry gradient)."""
        return int(round(self.target_frac * self.tokens))


@dataclass(frozen=True)
class Hardware:
    """Rates and sizes of the machine the prediction is for (defaults: one H100 SXM).

    Attributes:
        matmul_tflops: dense matmul rate, TFLOP/s (every GEMM and tl.dot runs at it).
        hbm_tbps: HBM bandwidth, TB/s (1e12 bytes per second).
        atomic_tbps: throughput of atomic payload, TB/s; None: the HBM bandwidth.
        l2_bytes: L2 capacity available to re-read operands, bytes.
        sms: streaming multiprocessors (programs resident at once = sms x ctas_per_sm).
    """

    matmul_tflops: float = DEFAULT_MATMUL_TFLOPS
    hbm_tbps: float = DEFAULT_HBM_TBPS
    atomic_tbps: Optional[float] = None
    l2_bytes: float = DEFAULT_L2_BYTES
    sms: int = DEFAULT_SMS

    def __post_init__(self):
        _positive_number("matmul_tflops", self.matmul_tflops)
        _positive_number("hbm_tbps", self.hbm_tbps)
        if self.atomic_tbps is not None:
            _positive_number("atomic_tbps", self.atomic_tbps)
        if isinstance(self.l2_bytes, bool) or not isinstance(self.l2_bytes, (int, float)) or self.l2_bytes < 0:
            raise ValueError(f"l2_bytes must be a number >= 0, got {self.l2_bytes!r}")
        _positive_int("sms", self.sms)

    @property
    def atomic_bytes_per_s(self) -> float:
        return (self.hbm_tbps if self.atomic_tbps is None else self.atomic_tbps) * 1e12


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Phase:
    """Kernels of one kind that run back to back, ``count`` times (e.g. once per chunk).

    ``flops``, ``hbm_bytes`` and ``atomic_bytes`` are per occurrence.
    """

    name: str
    flops: float = 0.0
    hbm_bytes: float = 0.0
    _: KW_ONLY  # atomic bytes and count only by name: positionally they are easily swapped
    atomic_bytes: float = 0.0
    count: int = 1

    def ms(self, hw: Hardware) -> float:
        """``count * max(flops / rate, hbm / bw + atomic / atomic_bw)`` in milliseconds."""
        compute_s = self.flops / (hw.matmul_tflops * 1e12)
        memory_s = self.hbm_bytes / (hw.hbm_tbps * 1e12) + self.atomic_bytes / hw.atomic_bytes_per_s
        return self.count * max(compute_s, memory_s) * 1e3


@dataclass(frozen=True)
class PassCost:
    """One pass: its phases and their totals (FLOPs, bytes) and predicted milliseconds."""

    phases: tuple
    hw: Hardware

    @property
    def flops(self) -> float:
        return sum(p.flops * p.count for p in self.phases)

    @property
    def hbm_bytes(self) -> float:
        return sum(p.hbm_bytes * p.count for p in self.phases)

    @property
    def atomic_bytes(self) -> float:
        return sum(p.atomic_bytes * p.count for p in self.phases)

    @property
    def ms(self) -> float:
        return sum(p.ms(self.hw) for p in self.phases)


@dataclass(frozen=True)
class BackendCost:
    """Prediction for one backend at one shape: ``fwd``, ``bwd`` and ``fwd_bwd`` passes."""

    backend: str
    shape: Shape
    fwd: PassCost
    bwd: PassCost
    notes: tuple = ()
    #: Peak scratch the path allocates beyond its inputs, the gathered target rows and the returned
    #: gradients (input dtype), in bytes, and what it is; None where not modelled (eager, peers).
    scratch_bytes: Optional[float] = None
    scratch: str = ""
    #: the loss (every paired loss costs the same at equal ``logit_metrics``) and, for losses with a
    #: reference, where it comes from (:data:`REFERENCES`; None: the loss takes none)
    loss: str = "simpo"
    reference: Optional[str] = None
    logit_metrics: Optional[str] = None

    @property
    def fwd_bwd(self) -> PassCost:
        return PassCost(self.fwd.phases + self.bwd.phases, self.fwd.hw)

    def pass_cost(self, name: str) -> PassCost:
        if name not in PASSES:
            raise ValueError(f"unknown pass {name!r}; expected one of {PASSES}")
        return getattr(self, name)


# --------------------------------------------------------------------------------------------
# Shared pieces


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def reread_bytes(once_bytes: float, reads: float, footprint_bytes: float, l2_bytes: float) -> float:
    """HBM bytes of an operand of ``once_bytes`` that programs read ``reads`` times in all.

    The first read comes from HBM. The later reads hit L2 when the in-flight ``footprint_bytes``
    fits in ``l2_bytes``, and all miss when it does not: the programs sweep the operand in the same
    order on every pass, and a cyclic sweep larger than an LRU-like cache evicts each line before
    its next use (the reason for the raster groups).
    """
    if reads <= 1:
        return once_bytes * reads
    return once_bytes * (1.0 if footprint_bytes <= l2_bytes else reads)


def _chunk_phases(rows: int, chunk: int, make) -> list:
    """Phases for ``rows`` processed in chunks of ``chunk`` rows: ``make(c, count)`` -> phases."""
    full, rest = divmod(rows, chunk)
    out = []
    if full:
        out += make(chunk, full)
    if rest:
        out += make(rest, 1)
    return out


def _elementwise(name: str, nbytes: float, count: int = 1) -> list:
    return [Phase(name, hbm_bytes=nbytes, count=count)] if nbytes > 0 else []


# --------------------------------------------------------------------------------------------
# Backends


def _eager(s: Shape, hw: Hardware) -> BackendCost:
    """``simpo_kernels/eager.py``: ``F.linear`` in the input dtype, then everything on ``[N, V]``.

    All ``N`` positions (the logit sums for the ``logits/*`` metrics need every position). With
    ``b`` the input bytes, ``f = 4`` the float32 compute dtype, ``NV`` = elements of the logits:

    forward: GEMM (reads H and W, writes ``b*NV``); ``.to(float32)`` (``(b+f)*NV``, 0 for fp32
    inputs); softcap ``z/s``, ``tanh``, ``*s`` (three out-of-place passes, ``3 * 2f*NV``);
    ``log_softmax`` (reads twice, writes once: ``3f*NV``); ``z.sum(-1)`` for the metrics (``f*NV``).
    Gather and the ``[2B, T]`` objective are ``O(N)``.
    backward: ``gather`` backward fills a zero ``[N, V]`` float32 (``f*NV``); ``log_softmax``
    backward (sums grad, then reads grad and output, writes: ``4f*NV``); softcap backward ``*s``
    (``2f``), ``tanh`` (grad and saved output in, one out: ``3f``), ``/s`` (``2f``); cast back to
    the input dtype (``(f+b)*NV``); the dH and dW GEMMs each read the ``[N, V]`` gradient.
    """
    N, H, V, b, f = s.tokens, s.hidden, s.vocab, s.dtype_bytes, FLOAT32_BYTES
    NV = N * V
    upcast = 0 if b == f else (b + f) * NV
    fwd_elem = upcast + (3 * 2 * f * NV if s.softcap else 0) + 3 * f * NV + f * NV
    fwd = [Phase("logits GEMM", 2.0 * N * H * V, N * H * b + V * H * b + NV * b)]
    fwd += _elementwise("upcast, softcap, log_softmax, logit sums [N,V]", fwd_elem)
    bwd_elem = f * NV + 4 * f * NV + ((2 + 3 + 2) * f * NV if s.softcap else 0) + upcast
    bwd = _elementwise("gather/log_softmax/softcap backward, cast [N,V]", bwd_elem)
    bwd += [Phase("dH GEMM", 2.0 * N * H * V, NV * b + V * H * b + N * H * b),
            Phase("dW GEMM", 2.0 * N * H * V, NV * b + N * H * b + V * H * b)]
    return BackendCost("eager", s, PassCost(tuple(fwd), hw), PassCost(tuple(bwd), hw),
                       ("full [N,V] logits: float32 passes dominate the bytes; no target skipping",))


# --------------------------------------------------------------------------------------------
# What the compacted paths share: target rows, metric-only rows, the library's own chunking


def _logit_metrics(value: Any) -> str:
    if not isinstance(value, str) or value not in LOGIT_METRICS:
        raise ValueError(f"logit_metrics must be one of {LOGIT_METRICS}, got {value!r}")
    return value


def _memory_budget(value: Any) -> int:
    """``memory_budget`` in bytes; None: :data:`DEFAULT_MEMORY_BUDGET`."""
    return DEFAULT_MEMORY_BUDGET if value is None else _positive_int("memory_budget", value)


def _schedules():
    """``simpo_kernels.schedules`` with its ``common`` and ``pairs`` modules, imported at call time:
    the model follows the library's chunking rules rather than copying them."""
    try:
        from simpo_kernels import schedules
        from simpo_kernels.schedules import common, pairs
    except ImportError as exc:
        raise ValueError(f"simpo_kernels.schedules is not importable ({exc})") from exc
    return schedules, common, pairs


def target_layout(s: Shape) -> SimpleNamespace:
    """A stand-in for ``simpo_kernels.schedules.TargetLayout`` at ``s``: ``max(2, N // row_len)``
    rows (rounded down to even: chosen rows, then rejected, as :func:`benchmarks.cases.make_case`
    lays them out) with the ``M`` targets spread evenly (the first ``M mod rows`` rows get one
    more). Only what the chunking rules read is filled: ``rows``, ``T``, ``counts``,
    ``num_targets``."""
    rows = max(2, s.tokens // s.row_len)
    rows -= rows % 2
    base, extra = divmod(s.target_rows, rows)
    counts = [base + (1 if r < extra else 0) for r in range(rows)]
    return SimpleNamespace(rows=rows, T=s.tokens // rows, counts=counts, num_targets=s.target_rows)


def pair_chunk_rows(s: Shape, memory_budget: Optional[int] = None) -> list:
    """Target rows of each ``pairs`` chunk: ``simpo_kernels.schedules.pairs.pair_chunks`` (whole
    pairs, as many as fit ``memory_budget`` bytes of float32 logits, at least one) on
    :func:`target_layout`."""
    budget = _memory_budget(memory_budget)
    _, _, pairs = _schedules()
    lay = target_layout(s)
    B = lay.rows // 2
    return [sum(lay.counts[p0:p1]) + sum(lay.counts[B + p0:B + p1])
            for p0, p1 in pairs.pair_chunks(lay, budget, s.vocab * FLOAT32_BYTES)]


def vocab_chunk_columns(rows: int, vocab: int, memory_budget: Optional[int] = None) -> int:
    """Vocabulary columns per chunk of ``rows`` float32 logit rows under ``memory_budget``
    (``simpo_kernels.schedules.common.vocab_chunk``)."""
    _, common, _ = _schedules()
    return int(common.vocab_chunk(rows, vocab, _memory_budget(memory_budget)))


def auto_schedule(s: Shape, memory_budget: Optional[int] = None) -> str:
    """The schedule ``simpo_loss(backend="triton", schedule="auto")`` runs at ``s``: the first of
    ``simpo_kernels.schedules.DEFAULT_ORDER`` (pairs, vocab, fused) whose smallest chunk ``fits``
    ``memory_budget``. On a device with a committed ``simpo_kernels/tuned/<gpu>.json`` the library
    uses that table's measured ``schedule_order`` instead; the model does not know the device and
    ignores it."""
    budget = _memory_budget(memory_budget)
    schedules, _, _ = _schedules()
    lay = target_layout(s)
    for name in schedules.DEFAULT_ORDER:
        if schedules.fits(name, lay, s.vocab, budget):
            return name
    return "fused"


def _sized_phases(sizes: Sequence[int], make) -> list:
    """Phases for chunks of the given sizes, in order: each run of equal sizes is one
    ``make(size, count)``; empty chunks cost nothing."""
    out = []
    for size, run in itertools.groupby(sizes):
        n = sum(1 for _ in run)
        if size:
            out += make(size, n)
    return out


def _vocab_sizes(vocab: int, cols: int) -> list:
    full, rest = divmod(vocab, cols)
    return [cols] * full + ([rest] if rest else [])


def _gather_rows(s: Shape, rows: int, what: str) -> list:
    """``hidden.index_select(0, idx)``: ``rows`` hidden rows read and written once."""
    return _elementwise(f"gather {what} hidden rows (index_select)", 2 * rows * s.hidden * s.dtype_bytes)


def _scatter_dh(s: Shape) -> list:
    """Backward of the target-row gather (autograd's ``index_select`` backward): a zero ``[N, H]``
    dH in the input dtype, then ``index_add_`` of the ``M`` rows (reads them, read-modify-writes
    their destinations)."""
    N, M, H, b = s.tokens, s.target_rows, s.hidden, s.dtype_bytes
    return _elementwise("dH scatter to [N, H] (index_select backward)", N * H * b + 3 * M * H * b)


def _metric_rows(s: Shape, logit_metrics: str, forward) -> list:
    """Logit sums of the ``O = N - M`` metric-only rows (prompt, padding, each row's last position:
    ``simpo_kernels.schedules.common.other_logit_sums``), with ``logit_metrics="exact"`` only;
    ``"targets"`` and ``"none"`` cost nothing (the target rows' sums come with their statistics).

    Both cases gather the rows first (``2*O*H*b``). Without a softcap the sum of a row's logits is
    ``h . sum_v W_v``: ``W.sum(0)`` in float32 (one read of W, ``V*H*b``), the rows upcast to float32
    (``(b+4)*O*H``, 16-bit inputs) and a GEMV (``2*O*H`` FLOPs). With a softcap every logit is
    needed: ``forward(O)``, the schedule's own no-grad forward over those rows (``2*O*H*V`` FLOPs).
    """
    O = s.tokens - s.target_rows
    if logit_metrics != "exact" or O == 0:
        return []
    H, V, b, f = s.hidden, s.vocab, s.dtype_bytes, FLOAT32_BYTES
    out = _gather_rows(s, O, "metric-only")
    if s.softcap:
        return out + forward(O)
    return out + [Phase("metric rows: W.sum(0) in float32", hbm_bytes=V * H * b + H * f),
                  *_elementwise("metric rows: upcast to float32", 0 if b == f else (b + f) * O * H),
                  Phase("metric rows: GEMV h . sum_v W_v", 2.0 * O * H, O * H * f + H * f)]


def _vocab_forward(s: Shape, rows: int, memory_budget: int, what: str) -> list:
    """``chunked_forward_stats`` over ``rows`` rows (``schedules/common.py``): per vocabulary chunk
    of ``c = vocab_chunk(rows, V, budget)`` columns, cuBLAS ``z = h W[chunk]^T`` (``2*rows*H*c``
    FLOPs; reads the chunk of W and the rows, writes ``4*rows*c``), then the ``row_stats`` kernel
    (reads z once). The online merge (logaddexp, sums) is ``O(rows)``."""
    H, V, b, f = s.hidden, s.vocab, s.dtype_bytes, FLOAT32_BYTES

    def make(c, n):
        return [Phase(f"{what}: logits GEMM [rows, chunk] (cuBLAS, float32 out)", 2.0 * rows * H * c,
                      c * H * b + rows * H * b + rows * c * f, count=n),
                Phase(f"{what}: row_stats kernel", hbm_bytes=rows * c * f, count=n)]

    return _sized_phases(_vocab_sizes(V, vocab_chunk_columns(rows, V, memory_budget)), make)


def torch_chunk_size(s: Shape) -> int:
    """The chunked backend's default tokens per chunk (``simpo_kernels.chunked.default_chunk_size``,
    asked at call time so that a change of its budget is followed)."""
    import torch

    from simpo_kernels import chunked

    dtype = torch.bfloat16 if s.dtype_bytes == 2 else torch.float32
    return int(chunked.default_chunk_size(s.vocab, s.hidden, dtype))


def _tokens_forward(s: Shape, rows: int, C: int, what: str) -> list:
    """``ChunkedLinearLogprob.forward`` over ``rows`` rows in chunks of ``C``: per chunk of ``c``,
    the logits GEMM (reads all of W, writes ``4cV``); softcap ``div_``, ``tanh_`` in place and ``t * s``
    out of place (``2*8 + 8 = 24`` bytes per logit); ``torch.logsumexp`` (amax read, ``z - max`` out of
    place, ``exp_`` in place, sum read: 24); ``z.sum(-1)`` (4)."""
    H, V, b, f = s.hidden, s.vocab, s.dtype_bytes, FLOAT32_BYTES
    W = V * H * b
    elem = ((24 if s.softcap else 0) + 24 + 4)

    def make(c, n):
        return [Phase(f"{what}: chunk logits GEMM", 2.0 * c * H * V, W + c * H * b + c * V * f, count=n),
                *_elementwise(f"{what}: chunk softcap, logsumexp, sums", elem * c * V, n)]

    return _chunk_phases(rows, C, make)


def _torch(s: Shape, hw: Hardware, chunk_size: Optional[int] = None,
           logit_metrics: str = DEFAULT_LOGIT_METRICS) -> BackendCost:
    """``simpo_kernels/chunked.py`` on CUDA, the ``tokens`` schedule: the ``M`` target rows
    (gathered by ``api._compacted``) in chunks of ``C`` tokens (``default_chunk_size``: a 256 MiB
    working set, ~104 tokens at V=256000), float32 chunk logits from ``torch.mm(...,
    out_dtype=float32)`` on the 16-bit weight (``simpo_kernels/matmul.py``; no float32 copy of W).
    Every chunk's GEMM reads all of W (``V*H*b``) from HBM: W does not fit in L2.

    forward: metric-only rows (``logit_metrics``, :func:`_metric_rows`; with a softcap the same
    chunked forward over them); gather the target rows (``2*M*H*b``); the chunked forward over them
    (:func:`_tokens_forward`: 52 bytes per logit with softcap, 28 without).
    backward (``M`` rows): zero ``dH [M, H]`` (input dtype, ``M*H*b``) and a float32 ``dW`` (``4VH``);
    per chunk: the logits GEMM again (recompute) with softcap (24); ``dz`` = ``sub_``, ``exp_``,
    ``mul_`` in place (24); softcap derivative ``t*t``, ``neg_``, ``add_``, ``dz *=`` (8+8+8+12);
    ``dz.to(b)`` (``4+b``; none for float32); dH GEMM (reads dz and W, writes ``4cH``) and its copy
    into ``dH`` rows (``(4+b)cH``); dW ``torch.addmm(acc, dz^T, h, out_dtype=float32, out=acc)`` in
    place (reads and writes the float32 ``[V, H]`` accumulator: ``8VH`` per chunk, the dominant
    cost at V=256000); finally ``dW.to(b)`` (``(4+b)VH``) and the dH scatter to ``[N, H]``.
    """
    N, M, H, V, b, f = s.tokens, s.target_rows, s.hidden, s.vocab, s.dtype_bytes, FLOAT32_BYTES
    C = torch_chunk_size(s) if chunk_size is None else _positive_int("chunk_size", chunk_size)
    W = V * H * b
    cap = s.softcap
    cast = 0 if b == f else f + b

    def bwd_chunk(c, n):
        elem = ((24 if cap else 0) + 24 + (36 if cap else 0) + cast) * c * V
        return [Phase("recompute logits GEMM", 2.0 * c * H * V, W + c * H * b + c * V * f, count=n),
                *_elementwise("chunk softcap, dz, softcap grad, cast", elem, n),
                Phase("dH GEMM", 2.0 * c * H * V, c * V * b + W + c * H * f, count=n),
                *_elementwise("dH rows into dH (copy, input dtype)", (f + b) * c * H, n),
                Phase("dW addmm into float32 [V, H] (in place)", 2.0 * c * H * V,
                      c * V * b + c * H * b + 2 * f * V * H, count=n)]

    fwd = _metric_rows(s, logit_metrics, lambda O: _tokens_forward(s, O, C, "metric rows"))
    fwd += _gather_rows(s, M, "target") + _tokens_forward(s, M, C, "targets")
    bwd = _elementwise("zero dH [M, H], float32 dW", M * H * b + f * V * H)
    bwd += _chunk_phases(M, C, bwd_chunk)
    bwd += _elementwise("dW to input dtype", 0 if b == f else (f + b) * V * H) + _scatter_dh(s)
    notes = (f"schedule 'tokens', chunk {C} tokens: W read from HBM {_cdiv(M, C) if M else 0}x forward "
             f"(+{_cdiv(N - M, C) if logit_metrics == 'exact' and cap and N > M else 0}x metric rows), "
             f"{2 * _cdiv(M, C) if M else 0}x backward",)
    scratch = min(C, max(M, 1)) * V * (2 * f + b) + f * V * H
    return BackendCost("torch", s, PassCost(tuple(fwd), hw), PassCost(tuple(bwd), hw), notes,
                       scratch, f"one chunk's logits working set [{C}, V] (2 float32 + 1 input-dtype buffers) "
                                f"+ float32 [V, H] dW accumulator")


def _pairs(s: Shape, hw: Hardware, memory_budget: Optional[int] = None,
           logit_metrics: str = DEFAULT_LOGIT_METRICS) -> BackendCost:
    """``simpo_kernels/schedules/pairs.py`` with the Triton row kernels (``TritonRows``): chunks of
    whole pairs (:func:`pair_chunk_rows`: as many pairs' target rows as fit ``memory_budget`` bytes
    of float32 logits), every gradient formed in the (grad-mode) forward, logits never recomputed.

    forward (no grad; metric-only rows first: :func:`_metric_rows` with :func:`_vocab_forward`, the
    schedule's ``forward_sums``), per chunk of ``c`` target rows: ``index_select`` of its hidden
    rows (``2cHb``); cuBLAS ``z = H_c W^T`` (``2cHV`` FLOPs; reads W and the rows, writes ``4cV``);
    ``row_stats`` kernel (reads z once). The SimPO head of the chunk's pairs is ``O(c)``.
    backward (everything a grad-mode call adds): zero ``dH [N, H]`` (input dtype) and a float32
    ``dW [V, H]``; per chunk: ``logprob_grad`` kernel reads z and writes ``dz`` in the input dtype
    over it (``(4+b)cV``); ``dH = dz W`` (cuBLAS, reads dz and W, writes ``4cH``), cast to the input
    dtype and ``index_copy_`` into dH (``(4+b)cH + 2bcH``); ``dW += dz^T H_c`` (cuBLAS addmm into the
    float32 accumulator: ``8VH`` per chunk); then ``dW`` to the input dtype (``(4+b)VH``). The
    autograd backward only scales the stored gradients in place by the upstream scalar (``mul_``:
    ``2NHb + 2VHb``). ``6MHV`` FLOPs (``2MHV`` forward), no atomics, no recompute.
    """
    N, M, H, V, b, f = s.tokens, s.target_rows, s.hidden, s.vocab, s.dtype_bytes, FLOAT32_BYTES
    budget = _memory_budget(memory_budget)
    W = V * H * b
    sizes = pair_chunk_rows(s, budget) if M else []

    def fwd_chunk(c, n):
        return [Phase("gather chunk hidden rows (index_select)", hbm_bytes=2 * c * H * b, count=n),
                Phase("logits GEMM (cuBLAS, float32 out)", 2.0 * c * H * V, W + c * H * b + c * V * f, count=n),
                Phase("row_stats kernel", hbm_bytes=c * V * f, count=n)]

    def bwd_chunk(c, n):
        return [Phase("logprob_grad kernel (dz over z, input dtype)", hbm_bytes=c * V * (f + b), count=n),
                Phase("dH GEMM (cuBLAS, float32 out)", 2.0 * c * H * V, c * V * b + W + c * H * f, count=n),
                Phase("dH rows to input dtype, index_copy_", hbm_bytes=(f + b) * c * H + 2 * b * c * H, count=n),
                Phase("dW addmm into float32 [V, H]", 2.0 * c * H * V, c * V * b + c * H * b + 2 * f * V * H,
                      count=n)]

    fwd = _metric_rows(s, logit_metrics, lambda O: _vocab_forward(s, O, budget, "metric rows"))
    fwd += _sized_phases(sizes, fwd_chunk)
    bwd = _elementwise("zero dH [N, H], float32 dW [V, H]", N * H * b + f * V * H)
    bwd += _sized_phases(sizes, bwd_chunk)
    bwd += _elementwise("dW to input dtype", 0 if b == f else (f + b) * V * H)
    bwd += _elementwise("backward: scale stored dH, dW by the upstream grad (mul_)", 2 * N * H * b + 2 * V * H * b)
    largest = max(sizes, default=0)
    notes = (f"schedule 'pairs': {len(sizes)} chunk(s) of <= {largest} target rows under a "
             f"{budget / 2**30:g} GiB budget; W read {len(sizes)}x forward, {2 * len(sizes)}x for dH/dW",)
    scratch = max(largest * V * f + f * V * H, _metric_scratch(s, logit_metrics, budget))
    return BackendCost("triton-pairs", s, PassCost(tuple(fwd), hw), PassCost(tuple(bwd), hw), notes, scratch,
                       "largest chunk's float32 logits (dz written over them) + float32 [V, H] dW "
                       "accumulator; dH, dW held from forward to backward")


def _metric_scratch(s: Shape, logit_metrics: str, budget: int) -> float:
    """Float32 logits of the metric-only rows' vocabulary-chunked forward (exact + softcap)."""
    O = s.tokens - s.target_rows
    if logit_metrics != "exact" or not s.softcap or O == 0:
        return 0.0
    return O * vocab_chunk_columns(O, s.vocab, budget) * FLOAT32_BYTES


def _vocab(s: Shape, hw: Hardware, memory_budget: Optional[int] = None,
           logit_metrics: str = DEFAULT_LOGIT_METRICS) -> BackendCost:
    """``simpo_kernels/schedules/vocab.py`` with the Triton row kernels: the ``M`` target rows
    (gathered), the vocabulary in chunks of ``c = vocab_chunk(M, V, budget)`` columns.

    forward: metric-only rows (:func:`_metric_rows`, with :func:`_vocab_forward` over them); gather
    the target rows (``2MHb``); :func:`_vocab_forward` over them (``2MHV`` FLOPs).
    backward: zero a float32 ``dH [M, H]`` (``4MH``); per chunk: recompute ``z`` (cuBLAS, ``2MHc``
    FLOPs, writes ``4Mc``); ``logprob_grad`` writes dz over it in the input dtype (``(4+b)Mc``);
    ``dW[chunk] = dz^T H`` straight into the input-dtype ``dW`` (``torch.mm(..., out=)``: written once,
    ``bcH``; no float32 ``[V, H]`` accumulator, no atomics); ``dH += dz W[chunk]`` (cuBLAS addmm into
    the float32 ``[M, H]`` accumulator: ``8MH`` per chunk); then dH to the input dtype and the dH
    scatter to ``[N, H]``. ``8MHV`` FLOPs (the recompute is ``2MHV``).
    """
    M, H, V, b, f = s.target_rows, s.hidden, s.vocab, s.dtype_bytes, FLOAT32_BYTES
    budget = _memory_budget(memory_budget)
    cols = vocab_chunk_columns(M, V, budget) if M else V
    sizes = _vocab_sizes(V, cols) if M else []

    def bwd_chunk(c, n):
        return [Phase("recompute logits GEMM [M, chunk]", 2.0 * M * H * c, c * H * b + M * H * b + M * c * f, count=n),
                Phase("logprob_grad kernel (dz over z, input dtype)", hbm_bytes=M * c * (f + b), count=n),
                Phase("dW[chunk] = dz^T H (written once, input dtype)", 2.0 * M * H * c,
                      M * c * b + M * H * b + c * H * b, count=n),
                Phase("dH += dz W[chunk] (float32 addmm)", 2.0 * M * H * c, M * c * b + c * H * b + 2 * f * M * H,
                      count=n)]

    fwd = _metric_rows(s, logit_metrics, lambda O: _vocab_forward(s, O, budget, "metric rows"))
    if M:
        fwd += _gather_rows(s, M, "target") + _vocab_forward(s, M, budget, "targets")
    bwd = _elementwise("zero float32 dH [M, H]", f * M * H)
    bwd += _sized_phases(sizes, bwd_chunk)
    bwd += _elementwise("dH to input dtype", 0 if b == f else (f + b) * M * H) + _scatter_dh(s)
    notes = (f"schedule 'vocab': {len(sizes)} vocabulary chunk(s) of {cols} columns under a "
             f"{budget / 2**30:g} GiB budget; dW written once, no atomics",)
    scratch = max(M * cols * f + f * M * H, _metric_scratch(s, logit_metrics, budget))
    return BackendCost("triton-vocab", s, PassCost(tuple(fwd), hw), PassCost(tuple(bwd), hw), notes, scratch,
                       "float32 logits [M, chunk] (dz written over them) + float32 [M, H] dH accumulator")


def default_kernel_config():
    """``KernelConfig()`` of the triton backend, constructed now (its defaults are being tuned)."""
    try:
        from simpo_kernels.kernels import KernelConfig
    except ImportError as exc:
        raise ValueError(f"triton backend: simpo_kernels.kernels.KernelConfig is not importable ({exc}); "
                         f"pass kernel_config=") from exc
    return KernelConfig()


def _group_blocks(token_blocks: int, group_n: Optional[int], resident: int) -> int:
    """Token blocks whose programs run together: a raster group, or (no groups, token block
    fastest over the whole grid) as many as the resident programs hold."""
    if group_n:
        return max(1, min(group_n, token_blocks))
    return max(1, min(token_blocks, resident))


def _fused_forward(s: Shape, hw: Hardware, cfg, rows: int, what: str) -> tuple:
    """One ``lse_forward`` launch over ``rows`` rows: ``(phases, W reads, group)``."""
    H, V, b = s.hidden, s.vocab, s.dtype_bytes
    if not rows:
        return [], 0, 0
    bn, bv = cfg.block_n, cfg.block_v
    resident = hw.sms * getattr(cfg, "ctas_per_sm", 1)
    blocks = _cdiv(rows, bn)
    group = _group_blocks(blocks, getattr(cfg, "group_n", None), resident)
    w_reads = _cdiv(blocks, group)
    h_bytes = reread_bytes(rows * H * b, _cdiv(V, bv), group * bn * H * b, hw.l2_bytes)
    return [Phase(f"{what}: lse_forward kernel", 2.0 * rows * H * V, w_reads * V * H * b + h_bytes)], w_reads, group


def _fused(s: Shape, hw: Hardware, kernel_config=None, logit_metrics: str = DEFAULT_LOGIT_METRICS) -> BackendCost:
    """``simpo_kernels/kernels`` (schedule ``fused``): ``lse_forward`` and ``logprob_backward`` on
    the ``M`` gathered target rows, block sizes from ``KernelConfig`` (defaults read at call time,
    or ``kernel_config``).

    forward: metric-only rows (:func:`_metric_rows`; with a softcap a second ``lse_forward`` launch
    over them); gather the target rows (``2MHb``); one kernel, ``2MHV`` FLOPs; W read once per
    raster group of ``group_n`` token blocks (``ceil(M/block_n / group_n)`` times); each token block
    re-reads its hidden rows for each of the ``ceil(V/block_v)`` vocabulary tiles, from L2 while a
    group's rows (``group_n*block_n*H*b``) fit. Nothing of size ``M x V`` is written.
    backward: zero float32 ``dH [M, H]`` and ``dW [V, H]``; the kernel recomputes each logit tile and
    contracts ``dz`` twice: ``6MHV`` FLOPs; W read once per group of ``bwd_group_n`` token blocks;
    per vocabulary tile the hidden rows are read and their float32 dH rows reduced into, from L2
    while the group's rows and dH rows fit, else from HBM (``b + 2*4`` bytes per element: read h,
    fetch and write back dH); float32 atomic adds of ``[bwd_block_n, H]`` into dH and
    ``[bwd_block_v, H]`` into dW per tile: ``M*H*V*(1/bwd_block_v + 1/bwd_block_n)*4`` payload bytes;
    the dW accumulator lines leave L2 between groups, so each group fetches and writes back ``dW``
    (``8VH`` bytes per group), dH rows once; then both cast to the input dtype and dH scattered to
    ``[N, H]``. Exact gradients (``grad_filter=False``, the default); ``v_splits`` partials are
    ``O(S*M)``.
    """
    cfg = default_kernel_config() if kernel_config is None else kernel_config
    M, H, V, b, f = s.target_rows, s.hidden, s.vocab, s.dtype_bytes, FLOAT32_BYTES
    bwd_bn, bwd_bv = cfg.bwd_block_n, cfg.bwd_block_v
    resident = hw.sms * getattr(cfg, "ctas_per_sm", 1)
    W = V * H * b

    fwd = _metric_rows(s, logit_metrics, lambda O: _fused_forward(s, hw, cfg, O, "metric rows")[0])
    main, w_reads, group = _fused_forward(s, hw, cfg, M, "targets")
    fwd += (_gather_rows(s, M, "target") + main) if M else []
    bwd = _elementwise("zero float32 dH [M, H], dW [V, H]", M * H * f + V * H * f)
    notes = [f"schedule 'fused': fwd W read {w_reads}x (groups of {group} x {cfg.block_n}-token blocks)"]
    if M:
        bblocks = _cdiv(M, bwd_bn)
        bgroup = _group_blocks(bblocks, getattr(cfg, "bwd_group_n", None), resident)
        groups = _cdiv(bblocks, bgroup)
        # Per vocabulary tile a program reads its hidden rows (twice; the second read hits L2) and
        # reduces into their float32 dH rows (a line fetch and a write-back when not resident).
        h_sub = reread_bytes(M * H * (b + 2 * f), _cdiv(V, bwd_bv), bgroup * bwd_bn * H * (b + f), hw.l2_bytes)
        acc_round_trips = groups * 2 * V * H * f + 2 * M * H * f
        atomics = M * H * V * (1.0 / bwd_bv + 1.0 / bwd_bn) * f
        bwd.append(Phase("logprob_backward kernel", 6.0 * M * H * V,
                         groups * W + h_sub + acc_round_trips, atomic_bytes=atomics))
        notes.append(f"bwd: W read {groups}x, dW accumulator round trips {groups}x; tiles {bwd_bn}x{bwd_bv}")
    bwd += _elementwise("dH, dW to input dtype", 0 if b == f else (f + b) * (M * H + V * H)) + _scatter_dh(s)
    return BackendCost("triton-fused", s, PassCost(tuple(fwd), hw), PassCost(tuple(bwd), hw), tuple(notes),
                       f * (M * H + V * H), "float32 dH [M, H] and dW [V, H] accumulators (atomics); no logits")


def liger_chunk_tokens(s: Shape) -> int:
    """Tokens per Liger chunk: one pair (a chosen and a rejected row) per chunk, its default."""
    rows = max(2, s.tokens // s.row_len)
    return 2 * max(1, s.tokens // rows)


def _liger(s: Shape, hw: Hardware) -> BackendCost:
    """Liger-Kernel ``LigerFusedLinearSimPOLoss`` (``chunked_loss/fused_linear_preference.py``).

    Chunks of one pair (``2T`` tokens, all positions: no target skipping). No softcap: it runs
    without one whatever the shape says. Per chunk of ``c`` tokens:
    forward: GEMM ``c x V`` in the input dtype (logits written, ``b*cV``); ``log_softmax(logits
    .float())`` materialised in float32 (reads twice, writes ``4cV``); the logit sum for its
    metrics (reads ``b*cV``); the gather is ``O(c)``.
    gradient (``torch.func.grad_and_value`` inside its grad-mode forward, so no recompute; the
    autograd backward only returns the saved gradients): softmax backward reads the float32
    log-softmax and writes a ``b``-byte dlogits (gather, log_softmax backward and the cast fused by
    ``torch.compile``); dH GEMM (reads W); dW GEMM writes a ``[V, H]`` chunk gradient in the weight
    dtype, then ``grad_weight.add_`` (``3*b*VH``); once: zero ``grad_weight``, concatenate dH.
    Modelled as DESIGN section 6 describes it; if inductor folds the gather into the reduction and
    never writes the float32 log-softmax, the forward moves ``8cV`` bytes less.
    """
    N, H, V, b, f = s.tokens, s.hidden, s.vocab, s.dtype_bytes, FLOAT32_BYTES
    C = liger_chunk_tokens(s)
    W = V * H * b

    def fwd_chunk(c, n):
        return [Phase("chunk logits GEMM", 2.0 * c * H * V, W + c * H * b + c * V * b, count=n),
                Phase("float32 log_softmax, logit sum", hbm_bytes=(2 * b + f + b) * c * V, count=n)]

    def bwd_chunk(c, n):
        return [Phase("softmax backward to dlogits", hbm_bytes=(f + b) * c * V, count=n),
                Phase("dH GEMM", 2.0 * c * H * V, c * V * b + W + c * H * b, count=n),
                Phase("dW GEMM + grad_weight.add_", 2.0 * c * H * V, c * V * b + c * H * b + W + 3 * W, count=n)]

    fwd = _chunk_phases(N, C, fwd_chunk)
    bwd = _elementwise("zero grad_weight, cat dH", W + 2 * N * H * b) + _chunk_phases(N, C, bwd_chunk)
    notes = [f"chunk {C} tokens (one pair); gradients formed in the forward, no recompute"]
    if s.softcap:
        notes.append("runs WITHOUT the softcap (unsupported)")
    return BackendCost("liger", s, PassCost(tuple(fwd), hw), PassCost(tuple(bwd), hw), tuple(notes))


def _cce(s: Shape, hw: Hardware, filtered_frac: float = DEFAULT_CCE_FILTERED_FRAC) -> BackendCost:
    """Apple Cut Cross-Entropy ``linear_cross_entropy(..., shift=True, reduction="none")``
    (``cut_cross_entropy/cce_lse_forward.py``, ``cce_backward.py``), learned from its source.

    Only the ``M`` target rows are computed (its ``valids``), forward and backward.
    forward: one kernel, ``2MHV`` FLOPs, ``256x128`` tiles in raster groups of 8 token blocks (W
    read once per group); each tile's logsumexp is merged into ``lse`` under a spin lock
    (``M*ceil(V/128)*8`` lock-protected bytes); then an indexed dot reads the ``M`` hidden rows and
    the ``M`` target rows of W. A grad-mode forward also atomically adds a per-vocabulary logit
    average (``ceil(M/256)*V*4`` bytes, charged to ``bwd``).
    backward: zero dE (``N*H*b``) and dC (``V*H*b``, input dtype); ``128x128`` tiles, groups of 8;
    every tile recomputes its logits (``2MHV``); a tile whose ``|softmax - onehot|`` is all below
    ``filter_eps`` (``2^-12`` for bf16) returns early, the others (``1 - filtered_frac``) form dE
    and dC (``4MHV``) and add them with a lock-protected load-add-store in the input dtype (no
    float atomics): ``(1-filtered_frac)*M*H*V*(1/128 + 1/128)*2b`` bytes through the locks, dC's
    lines fetched and written back once per group. Lock contention is not modelled.
    """
    N, M, H, V, b, f = s.tokens, s.target_rows, s.hidden, s.vocab, s.dtype_bytes, FLOAT32_BYTES
    phi = _fraction("cce_filtered_frac", filtered_frac)
    kept = 1.0 - phi
    W = V * H * b
    fwd, bwd = [], []
    if M:
        fblocks = _cdiv(M, CCE_FWD_BLOCK_B)
        fgroup = min(CCE_GROUP_B, fblocks)
        h_fwd = reread_bytes(M * H * b, _cdiv(V, CCE_BLOCK_V), fgroup * CCE_FWD_BLOCK_B * H * b, hw.l2_bytes)
        fwd = [Phase("lse forward kernel", 2.0 * M * H * V, _cdiv(fblocks, fgroup) * W + h_fwd,
                     atomic_bytes=M * _cdiv(V, CCE_BLOCK_V) * 2 * f),
               Phase("indexed dot (target logits)", hbm_bytes=2 * M * H * b)]
    bwd += _elementwise("zero dE, dC", N * H * b + W)
    if M:
        bblocks = _cdiv(M, CCE_BWD_BLOCK_B)
        bgroup = min(CCE_GROUP_B, bblocks)
        groups = _cdiv(bblocks, bgroup)
        h_bwd = reread_bytes(M * H * b, (1 + kept) * _cdiv(V, CCE_BLOCK_V),
                             bgroup * CCE_BWD_BLOCK_B * H * 2 * b, hw.l2_bytes)
        hbm = groups * W + h_bwd + kept * groups * 2 * W + 2 * M * H * b
        locked = kept * M * H * V * (1.0 / CCE_BLOCK_V + 1.0 / CCE_BWD_BLOCK_B) * 2 * b
        logit_avg = fblocks * V * f
        bwd.append(Phase("backward kernel", 2.0 * M * H * V + kept * 4.0 * M * H * V, hbm,
                         atomic_bytes=locked + logit_avg))
    notes = (f"filtered tiles {phi:.0%} (cce_filtered_frac); lock-protected bf16 read-add-write, no float atomics",)
    return BackendCost("cce", s, PassCost(tuple(fwd), hw), PassCost(tuple(bwd), hw), notes)


def _floor(s: Shape, hw: Hardware) -> BackendCost:
    """The ideal: ``2NHV`` FLOPs forward and ``4NHV`` backward (``6NHV`` in all), with the fewest
    bytes: read H and W in the forward, write dH and dW in the backward (``(N+V)*H*b`` each),
    one phase per pass, no atomics (DESIGN section 2; ``benchmarks/NOTES.md``)."""
    N, H, V, b = s.tokens, s.hidden, s.vocab, s.dtype_bytes
    io = (N + V) * H * b
    return BackendCost("floor", s, PassCost((Phase("6NHV floor: logits", 2.0 * N * H * V, io),), hw),
                       PassCost((Phase("6NHV floor: dH, dW", 4.0 * N * H * V, io),), hw),
                       ("2NHV + 4NHV FLOPs; reads H, W once, writes dH, dW once",))


# --------------------------------------------------------------------------------------------
# Public entry points


def loss_profile(loss: str) -> SimpleNamespace:
    """What the model needs of ``loss`` (a name in ``simpo_kernels.LOSSES``, read at call time):
    ``name``, ``needs_reference``, ``logit_metrics`` (its official definition, the default of
    :func:`predict`) and ``nll_weight`` (its default chosen-NLL weight; the term costs nothing
    extra: it is the chosen rows' sums again). ValueError for an unknown loss."""
    from simpo_kernels import LOSSES

    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {tuple(LOSSES)}")
    cls = LOSSES[loss]
    return SimpleNamespace(name=loss, needs_reference=cls.needs_reference, logit_metrics=cls.official_logit_metrics,
                           nll_weight=float(cls().nll_weight))


def loss_names() -> tuple:
    """``tuple(simpo_kernels.LOSSES)``, imported at call time."""
    from simpo_kernels import LOSSES

    return tuple(LOSSES)


def _reference(profile: SimpleNamespace, reference: Optional[str]) -> Optional[str]:
    if reference is not None and reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    if not profile.needs_reference:
        if reference == "in-step":
            raise ValueError(f"loss {profile.name!r} takes no reference model (reference='in-step')")
        return None
    return reference or "precomputed"


def predict(
    backend: str, shape: Shape, hw: Optional[Hardware] = None, *, kernel_config=None,
    torch_chunk: Optional[int] = None, cce_filtered_frac: float = DEFAULT_CCE_FILTERED_FRAC,
    logit_metrics: Optional[str] = None, memory_budget: Optional[int] = None, loss: str = "simpo",
    reference: Optional[str] = None,
) -> BackendCost:
    """Predicted cost of ``backend`` (one of :data:`BACKENDS`) at ``shape`` on ``hw``.

    Args:
        kernel_config: a ``simpo_kernels.kernels.KernelConfig`` for the ``fused`` schedule
            (default: its defaults, constructed at call time).
        torch_chunk: tokens per chunk for ``torch`` (default: the backend's own default).
        cce_filtered_frac: share of CCE's backward tiles skipped by gradient filtering, in [0, 1].
        logit_metrics: ``"exact"``, ``"targets"`` or ``"none"``: what the ``N - M`` metric-only rows
            cost (our compacted paths only); None (default): ``loss``'s official definition
            (``"exact"`` for SimPO, as ``simpo_loss``; ``"targets"`` for DPO, R-DPO).
        memory_budget: ``simpo_loss(memory_budget=)`` in bytes, for the ``pairs``/``vocab`` chunks
            and the ``auto`` choice (default :data:`DEFAULT_MEMORY_BUDGET`).
        loss: a name in ``simpo_kernels.LOSSES`` (default ``"simpo"``). Every paired loss costs what
            SimPO costs at the same ``logit_metrics`` (module docstring).
        reference: for a loss with a reference: ``"precomputed"`` (default; nothing extra) or
            ``"in-step"`` (the frozen reference's head, :func:`predict_precompute`'s forward, added
            to the forward). ValueError for a loss without one.

    Raises:
        ValueError: unknown backend or loss, or an argument out of range (naming it).
    """
    if not isinstance(shape, Shape):
        raise ValueError(f"shape must be a cost_model.Shape, got {type(shape).__name__}")
    profile = loss_profile(loss)
    ref = _reference(profile, reference)
    mode = _logit_metrics(profile.logit_metrics if logit_metrics is None else logit_metrics)
    cost = _predict_simpo(backend, shape, hw, kernel_config=kernel_config, torch_chunk=torch_chunk,
                          cce_filtered_frac=cce_filtered_frac, logit_metrics=mode, memory_budget=memory_budget)
    cost = replace(cost, loss=profile.name, reference=ref, logit_metrics=mode)
    if ref != "in-step":
        return cost
    if backend not in _PRECOMPUTE_OF:
        raise ValueError(f"{backend} has no precompute pass for an in-step reference; expected one of "
                         f"{tuple(_PRECOMPUTE_OF)}")
    head = predict_precompute(_PRECOMPUTE_OF[backend], shape, hw, kernel_config=kernel_config, torch_chunk=torch_chunk,
                              memory_budget=memory_budget)
    phases = tuple(replace(p, name=f"in-step reference: {p.name}") for p in head.fwd.phases)
    note = (f"in-step frozen reference: its head's no-grad forward added to every step "
            f"(+{head.fwd.flops / 1e12:.1f} TFLOP); the reference model's body is not modelled",)
    return replace(cost, fwd=PassCost(phases + cost.fwd.phases, cost.fwd.hw), notes=note + cost.notes)


def _predict_simpo(backend: str, shape: Shape, hw: Optional[Hardware], *, kernel_config, torch_chunk,
                   cce_filtered_frac: float, logit_metrics: str, memory_budget: Optional[int]) -> BackendCost:
    """The lm_head cost of ``backend`` at ``logit_metrics`` (the same for every paired loss)."""
    hw = Hardware() if hw is None else hw
    _fraction("cce_filtered_frac", cce_filtered_frac)
    mode = logit_metrics
    budget = _memory_budget(memory_budget)
    if backend == "eager":
        return _eager(shape, hw)
    if backend == "torch":
        return _torch(shape, hw, torch_chunk, mode)
    if backend == "triton":
        sched = auto_schedule(shape, budget)
        cost = predict(TRITON_SCHEDULES[sched], shape, hw, kernel_config=kernel_config, logit_metrics=mode,
                       memory_budget=budget)
        note = f"schedule='auto' -> {sched!r} (first of pairs, vocab, fused that fits the memory budget)"
        return replace(cost, backend="triton", notes=(note,) + cost.notes)
    if backend == "triton-pairs":
        return _pairs(shape, hw, budget, mode)
    if backend == "triton-vocab":
        return _vocab(shape, hw, budget, mode)
    if backend == "triton-fused":
        return _fused(shape, hw, kernel_config, mode)
    if backend == "liger":
        return _liger(shape, hw)
    if backend == "cce":
        return _cce(shape, hw, cce_filtered_frac)
    if backend == "floor":
        return _floor(shape, hw)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def predict_precompute(backend: str, shape: Shape, hw: Optional[Hardware] = None, *, kernel_config=None,
                       torch_chunk: Optional[int] = None, memory_budget: Optional[int] = None) -> BackendCost:
    """The reference precompute pass (:data:`PRECOMPUTE_BACKENDS`): per-row sums of target
    log-probabilities, no gradient, once per batch of the data set. ``simpo_kernels.sequence_logps``
    (``api.py``) gathers the ``M`` target rows and runs, without any metric-only row:

    * ``triton``: the fused ``lse_forward`` kernel (:func:`_fused_forward`, as the ``fused``
      schedule's forward; ``sequence_logps`` takes no schedule): ``2MHV`` FLOPs, no logits in memory;
    * ``torch``: the token-chunk forward (:func:`_tokens_forward`), one chunk's logits at a time;
    * ``eager``: ``eager.token_logprobs`` on the gathered rows: the ``[M, V]`` logits (input dtype,
      then float32) and the eager forward's passes over them (:func:`_eager` at ``M`` tokens);
    * ``cce`` (the peer): its forward kernel (:func:`_cce`'s ``fwd``) over the ``M`` targets;
    * ``floor``: ``2NHV`` with H and W read once.

    ``bwd`` is empty. ``scratch_bytes``: the working memory beyond the inputs and the gathered rows."""
    if backend not in PRECOMPUTE_BACKENDS:
        raise ValueError(f"unknown precompute backend {backend!r}; expected one of {PRECOMPUTE_BACKENDS}")
    s, hw = shape, (Hardware() if hw is None else hw)
    N, M, H, V, b, f = s.tokens, s.target_rows, s.hidden, s.vocab, s.dtype_bytes, FLOAT32_BYTES
    if backend == "floor":
        fwd = PassCost((Phase("2NHV floor: logits", 2.0 * N * H * V, (N + V) * H * b),), hw)
        return BackendCost("floor", s, fwd, PassCost((), hw), ("2NHV FLOPs; reads H, W once",), 0.0, "none",
                           loss="precompute")
    gather = _gather_rows(s, M, "target") if M else []
    if backend == "triton":
        cfg = default_kernel_config() if kernel_config is None else kernel_config
        main, w_reads, group = _fused_forward(s, hw, cfg, M, "targets")
        phases = gather + main
        scratch, what = 0.0, "no logits: O(M) log-sum-exp statistics"
        note = f"fused lse_forward over the M target rows: W read {w_reads}x (groups of {group} token blocks)"
    elif backend == "torch":
        C = torch_chunk_size(s) if torch_chunk is None else _positive_int("chunk_size", torch_chunk)
        phases = gather + _tokens_forward(s, M, C, "targets")
        scratch, what = min(C, max(M, 1)) * V * (2 * f + b), f"one chunk's logits working set [{C}, V]"
        note = f"token chunks of {C}: W read from HBM {_cdiv(M, C) if M else 0}x"
    elif backend == "eager":
        phases = gather + (list(_eager(replace(s, tokens=M), hw).fwd.phases) if M else [])
        scratch, what = (b + 2 * f) * M * V, "the [M, V] target-row logits: input dtype, float32 copy, log-softmax"
        note = "eager.token_logprobs on the gathered target rows ([M, V] logits)"
    else:  # cce
        phases = list(_cce(s, hw).fwd.phases)
        scratch, what = 0.0, "no logits: O(M) log-sum-exp statistics"
        note = "CCE's lse forward kernel and indexed dot over the M targets"
    fwd = PassCost(tuple(phases), hw)
    notes = (f"forward only, no gradient, no metric-only rows: {fwd.flops / 1e12:.1f} TFLOP; {note}",)
    return BackendCost(backend, s, fwd, PassCost((), hw), notes, scratch, what, loss="precompute")


#: The precompute pass an in-step frozen reference runs (``sequence_logps`` has no schedule option).
_PRECOMPUTE_OF = {"eager": "eager", "torch": "torch", "triton": "triton", "triton-pairs": "triton",
                  "triton-vocab": "triton", "triton-fused": "triton", "cce": "cce", "floor": "floor"}


def predict_all(shape: Shape, hw: Optional[Hardware] = None, backends: Iterable[str] = BACKENDS,
                **kw) -> dict:
    """``{backend: BackendCost}`` for ``backends`` (default: all, floor included)."""
    return {name: predict(name, shape, hw, **kw) for name in backends}


def predict_losses(shape: Shape, hw: Optional[Hardware] = None, backend: str = "triton", **kw) -> dict:
    """``{label: BackendCost}``: ``backend`` at ``shape`` for every loss of ``simpo_kernels.LOSSES``
    (its official ``logit_metrics``, reference precomputed), then for each loss with a reference the
    in-step alternative (``"<loss>, in-step reference"``), then the precompute pass
    (``"precompute"``). ``kw``: :func:`predict` options."""
    out = {}
    names = loss_names()
    for loss in names:
        out[loss] = predict(backend, shape, hw, loss=loss, **kw)
    for loss in names:
        if loss_profile(loss).needs_reference:
            out[f"{loss}, in-step reference"] = predict(backend, shape, hw, loss=loss, reference="in-step", **kw)
    pre = {k: v for k, v in kw.items() if k in ("kernel_config", "torch_chunk", "memory_budget")}
    out["precompute"] = predict_precompute(_PRECOMPUTE_OF.get(backend, backend), shape, hw, **pre)
    return out


def shape_for_family(family: str, tokens: int, target_frac: float = DEFAULT_TARGET_FRAC) -> Shape:
    """A :class:`Shape` from a ``benchmarks.cases`` family (H, V, softcap, dtype, row length)."""
    from . import cases as C

    if family not in C.FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {tuple(C.FAMILIES)}")
    fam = C.FAMILIES[family]
    return Shape(tokens=tokens, hidden=fam.hidden, vocab=fam.vocab, dtype_bytes=DTYPE_BYTES[fam.dtype],
                 softcap=fam.softcap is not None, target_frac=target_frac, row_len=fam.row_len)


def target_fraction(labels, ignore_index: int = -100) -> float:
    """Share of the ``2B*T`` positions of ``labels [2B, T]`` that have a target after the shift
    (position ``t`` predicts ``labels[t+1]``; the last position of a row never does)."""
    rows, T = labels.shape
    return float((labels[:, 1:] != ignore_index).sum()) / float(rows * T)


def prediction_fields(row: dict, target_frac: float, matmul_tflops: Optional[float] = None,
                      hbm_tbps: Optional[float] = None, kernel_config=None) -> dict:
    """Prediction for a benchmark result row (``impl``, ``tokens``, ``seq``, ``hidden``, ``vocab``,
    ``softcap`` as applied, ``dtype``): ``{target_frac, pred_fwd_ms, pred_fwd_bwd_ms,
    pred_matmul_tflops, pred_hbm_tbps}``. ``matmul_tflops`` is the rate measured in the same call
    where there is one (default: :data:`DEFAULT_MATMUL_TFLOPS`); ``kernel_config`` as in
    :func:`predict`. ``row["loss"]`` (default ``"simpo"``): the loss measured, at its official
    ``logit_metrics`` with a precomputed reference, as the benchmarks call it (``simpo_loss``:
    ``"exact"``; ``preference_loss(loss="dpo")``: ``"targets"``); ``"precompute"``: the precompute
    pass (:func:`predict_precompute`; ``pred_fwd_bwd_ms`` None). The default memory budget (a
    quarter of free memory) is modelled as :data:`DEFAULT_MEMORY_BUDGET`."""
    hw = Hardware(matmul_tflops=matmul_tflops or DEFAULT_MATMUL_TFLOPS, hbm_tbps=hbm_tbps or DEFAULT_HBM_TBPS)
    shape = Shape(tokens=row["tokens"], hidden=row["hidden"], vocab=row["vocab"],
                  dtype_bytes=DTYPE_BYTES[row["dtype"]], softcap=row.get("softcap") is not None,
                  target_frac=min(1.0, max(0.0, target_frac)), row_len=row.get("seq") or 2048)
    loss = row.get("loss") or "simpo"
    if loss == "precompute":
        cost = predict_precompute(row["impl"], shape, hw, kernel_config=kernel_config)
        return {"target_frac": round(shape.target_frac, 4), "pred_fwd_ms": cost.fwd.ms, "pred_fwd_bwd_ms": None,
                "pred_fwd_tflop": cost.fwd.flops / 1e12, "pred_scratch_mib": cost.scratch_bytes / MIB_BYTES,
                "pred_matmul_tflops": hw.matmul_tflops, "pred_hbm_tbps": hw.hbm_tbps}
    cost = predict(row["impl"], shape, hw, kernel_config=kernel_config, loss=loss)
    return {"target_frac": round(shape.target_frac, 4), "pred_fwd_ms": cost.fwd.ms,
            "pred_fwd_bwd_ms": cost.fwd_bwd.ms, "pred_matmul_tflops": hw.matmul_tflops,
            "pred_hbm_tbps": hw.hbm_tbps}


def target_floor_flops(shape: Shape) -> float:
    """``6MHV``: logits, dH and dW of the target rows only, the floor once targets are compacted
    (without any metric-only row)."""
    return 6.0 * shape.target_rows * shape.hidden * shape.vocab


def logit_metrics_extra(backend: str, shape: Shape, hw: Optional[Hardware] = None,
                        logit_metrics: str = "exact", **kw) -> dict:
    """What ``logit_metrics`` adds over ``"none"`` to ``backend``'s forward+backward at ``shape``:
    ``{flops, hbm_bytes, ms}`` (differences of two predictions; the metric rows are phases of
    their own, so the time difference is exactly theirs)."""
    with_ = predict(backend, shape, hw, logit_metrics=logit_metrics, **kw).fwd_bwd
    without = predict(backend, shape, hw, logit_metrics="none", **kw).fwd_bwd
    return {"flops": with_.flops - without.flops, "hbm_bytes": with_.hbm_bytes - without.hbm_bytes,
            "ms": with_.ms - without.ms, "base_ms": without.ms}


# --------------------------------------------------------------------------------------------
# Tables and CLI


def _g(x: float, spec: str) -> str:
    return format(x, spec)


def table_long(costs: dict, passes: Sequence[str] = PASSES) -> str:
    """Markdown: one row per (backend, pass): TFLOP, HBM GB, atomic GB, ms, ratio to the floor."""
    floor = costs.get("floor")
    lines = ["| backend | pass | TFLOP | HBM GB | atomic GB | pred ms | x floor |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, cost in costs.items():
        for p in passes:
            pc = cost.pass_cost(p)
            ratio = pc.ms / floor.pass_cost(p).ms if floor is not None and floor.pass_cost(p).ms else float("nan")
            lines.append(f"| {name} | {p} | {_g(pc.flops / 1e12, '.1f')} | {_g(pc.hbm_bytes / 1e9, '.1f')} | "
                         f"{_g(pc.atomic_bytes / 1e9, '.1f')} | {_g(pc.ms, '.1f')} | {_g(ratio, '.2f')} |")
    return "\n".join(lines)


def table_summary(costs: dict) -> str:
    """Markdown: one row per backend: ms per pass, fwd+bwd TFLOP / GB / atomic GB, x floor."""
    floor = costs.get("floor")
    lines = ["| backend | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd TFLOP | HBM GB | atomic GB | x 6NHV floor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, cost in costs.items():
        t = cost.fwd_bwd
        ratio = t.ms / floor.fwd_bwd.ms if floor is not None else float("nan")
        lines.append(f"| {name} | {cost.fwd.ms:.1f} | {cost.bwd.ms:.1f} | {t.ms:.1f} | {t.flops / 1e12:.1f} | "
                     f"{t.hbm_bytes / 1e9:.1f} | {t.atomic_bytes / 1e9:.1f} | {ratio:.2f} |")
    return "\n".join(lines)


def _rates(hw: Hardware) -> str:
    return (f"{hw.matmul_tflops:g} TFLOP/s, {hw.hbm_tbps:g} TB/s HBM, atomics "
            f"{hw.atomic_bytes_per_s / 1e12:g} TB/s")


def _shape_text(s: Shape) -> str:
    dtype = {2: "16-bit", 4: "float32"}[s.dtype_bytes]
    return f"N={s.tokens}, H={s.hidden}, V={s.vocab}, {dtype}"


def _tflop(x: float) -> str:
    return "0" if x == 0 else f"{x / 1e12:.1f}" if x >= 1e11 else f"{x / 1e12:.1e}"


def logit_metrics_table(shape: Shape, hw: Optional[Hardware] = None, *,
                        schedules: Sequence[str] = tuple(SCHEDULE_BACKENDS), **kw) -> str:
    """Markdown: the extra forward+backward cost of each ``logit_metrics`` mode over ``"none"``, with
    the softcap on and off (``shape.softcap`` is replaced), per schedule where it differs."""
    hw = Hardware() if hw is None else hw
    M, O = shape.target_rows, shape.tokens - shape.target_rows
    lines = [f"Extra cost of `logit_metrics` at {_shape_text(shape)}, target fraction {shape.target_frac:g} "
             f"(M={M} target rows, N-M={O} metric-only rows), forward+backward, predicted at {_rates(hw)} "
             f"(`benchmarks/cost_model.py`; a model, not a measurement):", "",
             "| softcap | logit_metrics | schedule | extra TFLOP | extra HBM GB | extra ms | + vs `none` | what |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for cap in (True, False):
        s = replace(shape, softcap=cap)
        cap_text = "30" if cap else "none"
        for mode in LOGIT_METRICS:
            if mode != "exact":
                names, what = ["all"], ("target rows' own logit sums (already computed)" if mode == "targets"
                                        else "nothing (metrics are None)")
            elif cap:
                names, what = list(schedules), "forward-only pass over the metric rows' logits (the schedule's own)"
            else:
                names, what = ["all"], "gather rows, W.sum(0) (one read of W), GEMV"
            for name in names:
                backend = SCHEDULE_BACKENDS[schedules[0] if name == "all" else name]
                e = logit_metrics_extra(backend, s, hw, mode, **kw)
                pct = 100.0 * e["ms"] / e["base_ms"] if e["base_ms"] else 0.0
                lines.append(f"| {cap_text} | {mode} | {name} | {_tflop(e['flops'])} | {e['hbm_bytes'] / 1e9:.2f} | "
                             f"{e['ms']:.2f} | {pct:.0f}% | {what} |")
    lines += ["", "`+ vs none`: the extra time over the schedule's own forward+backward with "
                  "`logit_metrics=\"none\"`. `targets` and `none` cost nothing: the target rows' logit sums come "
                  "with their statistics. Without a softcap every schedule takes the same closed form "
                  "(`sum_v z_v = h . sum_v W_v`); `eager` always materialises every position's logits and "
                  "pays nothing extra for any mode."]
    return "\n".join(lines)


def schedules_table(shape: Shape, fracs: Sequence[float] = (0.5, 0.4), hw: Optional[Hardware] = None, *,
                    schedules: Sequence[str] = tuple(SCHEDULE_BACKENDS), logit_metrics: str = DEFAULT_LOGIT_METRICS,
                    memory_budget: Optional[int] = None, **kw) -> str:
    """Markdown: per schedule and target fraction, forward+backward FLOPs as a multiple of ``6MHV``,
    peak scratch, predicted fwd / bwd / fwd+bwd ms (and fwd+bwd with ``logit_metrics="targets"``)."""
    hw = Hardware() if hw is None else hw
    budget = _memory_budget(memory_budget)
    lines = [f"Schedules at {_shape_text(shape)}, softcap {'30' if shape.softcap else 'none'}, "
             f"`logit_metrics=\"{logit_metrics}\"`, memory budget {budget / 2**30:g} GiB, predicted at "
             f"{_rates(hw)} (`benchmarks/cost_model.py`; a model, not a measurement):", "",
             "| schedule | backend | f | M | fwd+bwd TFLOP | x 6MHV | scratch GB | fwd ms | bwd ms | fwd+bwd ms "
             "| fwd+bwd ms, `targets` |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    what = {}
    for frac in fracs:
        s = replace(shape, target_frac=frac)
        floor = target_floor_flops(s)
        for name in schedules:
            backend = SCHEDULE_BACKENDS[name]
            c = predict(backend, s, hw, logit_metrics=logit_metrics, memory_budget=budget, **kw)
            t = predict(backend, s, hw, logit_metrics="targets", memory_budget=budget, **kw).fwd_bwd
            what[name] = c.scratch
            api = f"`{backend.split('-')[0]}`" + (f", `schedule=\"{name}\"`" if name != "tokens" else "")
            lines.append(f"| {name} | {api} | {frac:g} | {s.target_rows} | {c.fwd_bwd.flops / 1e12:.1f} | "
                         f"{c.fwd_bwd.flops / floor:.2f} | {c.scratch_bytes / 1e9:.2f} | {c.fwd.ms:.1f} | "
                         f"{c.bwd.ms:.1f} | {c.fwd_bwd.ms:.1f} | {t.ms:.1f} |")
        lines.append(f"| 6MHV floor | - | {frac:g} | {s.target_rows} | {floor / 1e12:.1f} | 1.00 | - | "
                     f"{floor / 3 / (hw.matmul_tflops * 1e9):.1f} | {floor * 2 / 3 / (hw.matmul_tflops * 1e9):.1f} | "
                     f"{floor / (hw.matmul_tflops * 1e9):.1f} | {floor / (hw.matmul_tflops * 1e9):.1f} |")
    auto = auto_schedule(replace(shape, target_frac=fracs[0]), budget)
    lines += ["", "Scratch (peak bytes beyond the inputs, the gathered target rows and the returned "
                  "input-dtype gradients; with `exact` + softcap the metric rows' forward chunk is "
                  "transient, before the main pass, and counts only if larger):"]
    lines += [f"- {name}: {text}" for name, text in what.items()]
    lines += ["- `bwd` is everything a grad-mode call adds to the no-grad forward: for `pairs` that is "
              "mostly work done inside the forward (it forms dH and dW there; its backward only scales them).",
              "- FLOPs count matmuls only; `x 6MHV` > 1 comes from the recompute (`vocab`, `fused`, "
              "`tokens`: 8MHV) and, with `exact` + softcap, the metric rows' forward (2(N-M)HV).",
              f"- `simpo_loss(backend=\"triton\")` (schedule `auto`) picks `{auto}` here."]
    return "\n".join(lines)


def schedules_markdown(hw: Optional[Hardware] = None, *, family: str = "gemma2-9b", tokens: int = 8192,
                       metrics_frac: float = 0.4, fracs: Sequence[float] = (0.5, 0.4), **kw) -> str:
    """Both tables at a family's shape (default: the Gemma-2-9B head, N=8192) as one markdown
    document: ``benchmarks/results/schedules_predicted.md``, and what ``--logit-metrics-table
    --schedules-table`` prints. ``kw``: :func:`predict` options (``memory_budget``, ...)."""
    base = shape_for_family(family, tokens, metrics_frac)
    cmd = (f"python -m benchmarks.cost_model --family {family} --tokens {tokens} --logit-metrics-table "
           f"--schedules-table --out benchmarks/results/schedules_predicted.md")
    return "\n".join([
        f"# Predicted cost of the schedules and of `logit_metrics` ({family})", "",
        f"Predictions of `benchmarks/cost_model.py`, not measurements. Regenerate with `{cmd}`.", "",
        "## `logit_metrics`", "", logit_metrics_table(base, hw, **kw), "",
        "## Schedules", "", schedules_table(replace(base, softcap=True), fracs, hw, **kw), ""])


def losses_table(shape: Shape, hw: Optional[Hardware] = None, *, backends: Sequence[str] = ("triton", "eager"),
                 **kw) -> str:
    """Markdown: the predicted cost of every loss of ``simpo_kernels.LOSSES`` per backend at
    ``shape`` (:func:`predict_losses`): each loss at its official ``logit_metrics`` with a
    precomputed reference, the in-step reference alternative of the losses that take one, and the
    reference precompute pass (forward only); with the fwd+bwd at ``logit_metrics="exact"`` beside,
    where every loss costs the same. ``kw``: :func:`predict` options."""
    hw = Hardware() if hw is None else hw
    floor = predict("floor", shape, hw).fwd_bwd
    lines = [f"Predicted cost per loss at {_shape_text(shape)}, softcap {'30' if shape.softcap else 'none'}, target "
             f"fraction {shape.target_frac:g} (M={shape.target_rows}), at {_rates(hw)} "
             f"(`benchmarks/cost_model.py`; predictions, not measurements):", "",
             "| backend | loss | reference | NLL term (default weight) | logit_metrics | fwd ms | fwd+bwd ms "
             "| fwd+bwd TFLOP | HBM GB | x 6NHV floor | fwd+bwd ms at `exact` |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for backend in backends:
        costs = predict_losses(shape, hw, backend, **kw)
        for label, c in costs.items():
            if label == "precompute":
                t = c.fwd
                lines.append(f"| {backend} | reference precompute (`sequence_logps`, once per batch of the data set) "
                             f"| - | - | none | {t.ms:.1f} | - (no backward) | {t.flops / 1e12:.1f} | "
                             f"{t.hbm_bytes / 1e9:.1f} | {t.ms / floor.ms:.2f} | - |")
                continue
            loss = label.split(",")[0]
            prof = loss_profile(loss)
            exact = predict(backend, shape, hw, loss=loss, reference=c.reference, logit_metrics="exact", **kw)
            nll = f"yes ({prof.nll_weight:g})" if prof.nll_weight > 0 else "no (0)"
            t = c.fwd_bwd
            lines.append(f"| {backend} | {loss} | {c.reference or 'none'} | {nll} | {c.logit_metrics} | "
                         f"{c.fwd.ms:.1f} | {t.ms:.1f} | {t.flops / 1e12:.1f} | {t.hbm_bytes / 1e9:.1f} | "
                         f"{t.ms / floor.ms:.2f} | {exact.fwd_bwd.ms:.1f} |")
    pre = predict_precompute(_PRECOMPUTE_OF.get(backends[0], backends[0]), shape, hw,
                             **{k: v for k, v in kw.items() if k in ("kernel_config", "torch_chunk", "memory_budget")})
    lines += ["", "- Every paired loss reaches the head only through per-sequence sums (or means), the reference's "
                  "`[B]` sums and the chosen-row NLL (the same sums): at equal `logit_metrics` each costs exactly "
                  "SimPO's FLOPs and bytes (last column). The differences are the official `logit_metrics` "
                  "(`targets` for DPO and R-DPO: no metric-only rows) and, for an in-step reference, its head's "
                  "forward in every step.",
              f"- In-step reference: the frozen reference model's head (`sequence_logps`, no gradient) adds "
              f"2MHV = {2.0 * shape.target_rows * shape.hidden * shape.vocab / 1e12:.1f} TFLOP per step "
              f"(2NHV = {2.0 * shape.tokens * shape.hidden * shape.vocab / 1e12:.1f} TFLOP with every position a "
              f"target); the reference model's body forward (not modelled) comes on top.",
              f"- Precompute pass ({backends[0]}): forward only, 2MHV FLOPs, scratch "
              f"{(pre.scratch_bytes or 0) / 2**20:.0f} MiB ({pre.scratch}); `eager` holds the `[M, V]` "
              f"logits of the target rows.",
              "- `x 6NHV floor`: against the dense 6NHV at the same rate (the precompute row against it too: "
              "its own floor is 2MHV)."]
    return "\n".join(lines)


def losses_markdown(hw: Optional[Hardware] = None, *, family: str = "gemma2-9b", tokens: int = 8192,
                    target_frac: float = 0.4, **kw) -> str:
    """:func:`losses_table` at a family's shape (default: the Gemma-2-9B head, N=8192, the
    UltraFeedback-like 40% targets) as a markdown document: ``benchmarks/results/losses_predicted.md``,
    and what ``--losses-table`` prints. ``kw``: :func:`losses_table` options."""
    cmd = (f"python -m benchmarks.cost_model --family {family} --tokens {tokens} --target-frac {target_frac:g} "
           f"--losses-table --out benchmarks/results/losses_predicted.md")
    shape = shape_for_family(family, tokens, target_frac)
    return "\n".join([f"# Predicted cost of each preference loss ({family})", "",
                      f"Predictions of `benchmarks/cost_model.py`, not measurements. Regenerate with `{cmd}`.", "",
                      losses_table(shape, hw, **kw), ""])


def _parse_kernel_config(text: Optional[str]):
    if not text:
        return None
    cfg = default_kernel_config()
    known = {f.name for f in fields(cfg)}
    updates = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise ValueError(f"--kernel-config: expected NAME=INT with NAME in {sorted(known)}, got {item!r}")
        updates[key] = int(value)
    return replace(cfg, **updates)


def main(argv: Optional[Sequence[str]] = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cost_model",
                                 description="Predicted FLOPs, bytes and time per pass of every SimPO "
                                             "lm_head loss implementation (a model, not a measurement).")
    ap.add_argument("--family", default="gemma2-9b", help="shape family from benchmarks/cases.py")
    ap.add_argument("--tokens", type=int, default=8192, help="N, tokens in the batch")
    ap.add_argument("--target-frac", type=float, default=None,
                    help=f"share of positions with a label (default {DEFAULT_TARGET_FRAC}; the tables: "
                         f"0.4 for --logit-metrics-table, 0.5 and 0.4 for --schedules-table)")
    ap.add_argument("--hidden", type=int, default=None, help="override H")
    ap.add_argument("--vocab", type=int, default=None, help="override V")
    ap.add_argument("--dtype-bytes", type=int, default=None, help="override input bytes (2 or 4)")
    cap = ap.add_mutually_exclusive_group()
    cap.add_argument("--softcap", dest="softcap", action="store_true", default=None)
    cap.add_argument("--no-softcap", dest="softcap", action="store_false")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma list of %s" % ",".join(BACKENDS))
    ap.add_argument("--logit-metrics", default=None, choices=LOGIT_METRICS,
                    help="logit_metrics=: what the metric-only rows cost (default: the loss's official "
                         f"definition, {DEFAULT_LOGIT_METRICS!r} for simpo)")
    ap.add_argument("--loss", default="simpo", help="a name in simpo_kernels.LOSSES (default %(default)s): every "
                                                   "paired loss costs SimPO's at equal logit_metrics")
    ap.add_argument("--reference", default=None, choices=REFERENCES,
                    help="for a loss with a reference: precomputed (default) or in-step (a frozen reference "
                         "model's head in every step)")
    ap.add_argument("--precompute", action="store_true",
                    help="the reference precompute pass (sequence_logps: forward only) per backend instead")
    ap.add_argument("--losses-table", action="store_true",
                    help="every loss's predicted cost (triton and eager, or --backends), the in-step "
                         "reference and the precompute pass")
    ap.add_argument("--memory-budget", type=int, default=DEFAULT_MEMORY_BUDGET, metavar="BYTES",
                    help="simpo_loss(memory_budget=) for the pairs/vocab chunks and the auto schedule "
                         "(default %(default)s = 8 GiB)")
    ap.add_argument("--matmul-tflops", type=float, default=DEFAULT_MATMUL_TFLOPS)
    ap.add_argument("--hbm-tbps", type=float, default=DEFAULT_HBM_TBPS)
    ap.add_argument("--atomic-tbps", type=float, default=None, help="atomic payload rate (default: HBM)")
    ap.add_argument("--l2-mib", type=float, default=DEFAULT_L2_BYTES / 2**20)
    ap.add_argument("--sms", type=int, default=DEFAULT_SMS)
    ap.add_argument("--cce-filtered-frac", type=float, default=DEFAULT_CCE_FILTERED_FRAC,
                    help="share of CCE backward tiles skipped by filtering (default %(default)s)")
    ap.add_argument("--torch-chunk", type=int, default=None, help="torch backend tokens per chunk")
    ap.add_argument("--kernel-config", default=None,
                    help="triton KernelConfig overrides, e.g. bwd_block_n=128,bwd_group_n=16")
    ap.add_argument("--summary", action="store_true", help="one row per backend (the README table)")
    ap.add_argument("--logit-metrics-table", action="store_true",
                    help="the extra cost of each logit_metrics mode, softcap on and off, per schedule")
    ap.add_argument("--schedules-table", action="store_true",
                    help="FLOPs, scratch and predicted ms per schedule (softcap on)")
    ap.add_argument("--out", default=None, metavar="FILE.md", help="also write the printed text to FILE.md")
    args = ap.parse_args(argv)

    try:
        hw = Hardware(matmul_tflops=args.matmul_tflops, hbm_tbps=args.hbm_tbps, atomic_tbps=args.atomic_tbps,
                      l2_bytes=args.l2_mib * 2**20, sms=args.sms)
        cfg = _parse_kernel_config(args.kernel_config)
        budget = _memory_budget(args.memory_budget)
        over = {k: v for k, v in (("hidden", args.hidden), ("vocab", args.vocab),
                                  ("dtype_bytes", args.dtype_bytes), ("softcap", args.softcap)) if v is not None}
        plain = not over and args.target_frac is None and args.logit_metrics in (None, DEFAULT_LOGIT_METRICS)
        lm = DEFAULT_LOGIT_METRICS if args.logit_metrics is None else args.logit_metrics
        if args.losses_table:
            frac = 0.4 if args.target_frac is None else args.target_frac
            backends = [b for b in args.backends.split(",") if b] if args.backends != ",".join(BACKENDS) \
                else ["triton", "eager"]
            kw = dict(backends=backends, kernel_config=cfg, torch_chunk=args.torch_chunk, memory_budget=budget)
            if over:
                text = losses_table(replace(shape_for_family(args.family, args.tokens, frac), **over), hw, **kw) + "\n"
            else:
                text = losses_markdown(hw, family=args.family, tokens=args.tokens, target_frac=frac, **kw)
        elif args.logit_metrics_table and args.schedules_table and plain:
            text = schedules_markdown(hw, family=args.family, tokens=args.tokens, kernel_config=cfg,
                                      torch_chunk=args.torch_chunk, memory_budget=budget)
        elif args.logit_metrics_table or args.schedules_table:
            kw = dict(kernel_config=cfg, torch_chunk=args.torch_chunk, memory_budget=budget)
            parts = []
            if args.logit_metrics_table:
                frac = 0.4 if args.target_frac is None else args.target_frac
                base = replace(shape_for_family(args.family, args.tokens, frac), **over)
                parts.append(logit_metrics_table(base, hw, **kw))
            if args.schedules_table:
                fracs = (0.5, 0.4) if args.target_frac is None else (args.target_frac,)
                base = replace(shape_for_family(args.family, args.tokens, fracs[0]), **over)
                if args.softcap is None:
                    base = replace(base, softcap=True)
                parts.append(schedules_table(base, fracs, hw, logit_metrics=lm, **kw))
            text = "\n\n".join(parts) + "\n"
        else:
            frac = DEFAULT_TARGET_FRAC if args.target_frac is None else args.target_frac
            shape = replace(shape_for_family(args.family, args.tokens, frac), **over)
            backends = [b for b in args.backends.split(",") if b]
            default = args.backends == ",".join(BACKENDS)
            if args.precompute:
                backends = list(PRECOMPUTE_BACKENDS) if default else backends
                costs = {b: predict_precompute(b, shape, hw, kernel_config=cfg, torch_chunk=args.torch_chunk,
                                               memory_budget=budget) for b in backends}
            else:
                if default and args.reference == "in-step":  # Liger has no head pass to run a reference with
                    backends = [b for b in backends if b in _PRECOMPUTE_OF]
                costs = predict_all(shape, hw, backends, kernel_config=cfg, torch_chunk=args.torch_chunk,
                                    cce_filtered_frac=args.cce_filtered_frac, logit_metrics=args.logit_metrics,
                                    memory_budget=budget, loss=args.loss, reference=args.reference)
            if "floor" not in costs:
                costs["floor"] = (predict_precompute("floor", shape, hw) if args.precompute
                                  else predict("floor", shape, hw))
            text = _report(args, shape, hw, costs, budget)
    except ValueError as exc:
        ap.error(str(exc))

    sys.stdout.write(text)
    if args.out:
        Path(args.out).write_text(text)
    return text


def _report(args, shape: Shape, hw: Hardware, costs: dict, budget: int) -> str:
    dtype = {2: "16-bit", 4: "float32"}[shape.dtype_bytes]
    some = next(iter(costs.values()))
    what = ("the reference precompute pass (sequence_logps: forward only, logit_metrics 'none')" if args.precompute
            else f"loss {some.loss!r}" + (f", reference {some.reference}" if some.reference else "")
            + f"; logit_metrics {some.logit_metrics!r}")
    head = (f"Cost model (predictions, not measurements): {args.family} N={shape.tokens} H={shape.hidden} "
            f"V={shape.vocab} {dtype}, softcap {'on' if shape.softcap else 'off'}, target fraction "
            f"{shape.target_frac:g} (M={shape.target_rows} rows with a target); {what}, "
            f"memory budget {budget / 2**30:g} GiB.\n"
            f"Rates: matmul {hw.matmul_tflops:g} TFLOP/s, HBM {hw.hbm_tbps:g} TB/s, atomics "
            f"{hw.atomic_bytes_per_s / 1e12:g} TB/s, L2 {hw.l2_bytes / 2**20:g} MiB, {hw.sms} SMs; "
            f"CCE filtered tiles {args.cce_filtered_frac:g}.")
    body = table_summary(costs) if args.summary else table_long(costs)
    notes = "\n".join(f"- {name}: {'; '.join(c.notes)}" for name, c in costs.items() if c.notes)
    return f"{head}\n\n{body}\n\n{notes}\n"


if __name__ == "__main__":
    main()
