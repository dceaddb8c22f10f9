"""Benchmark case definitions, shared by the pytest suites and the runner.

A *family* is an lm_head shape (hidden size, vocabulary, softcap, dtype) and a list of token
counts; a *case* is one family at one token count, laid out as ``2B`` rows of ``T`` tokens.
An *implementation* (``impl``) turns ``(hidden [2B,T,H], weight [V,H], labels [2B,T])`` into the
SimPO loss and the per-row length-normalised log-probabilities (chosen rows first), so every impl
can be checked against the same reference before it is timed.

Implementations:
    eager, torch, triton   ``simpo_kernels.simpo_loss(backend=...)`` (``triton``: ``schedule="auto"``)
    triton-pairs, triton-vocab, triton-fused
                           ``simpo_loss(backend="triton", schedule="pairs" | "vocab" | "fused")``
    liger                  Liger-Kernel ``LigerFusedLinearSimPOLoss`` (no softcap support: the row
                           runs without softcap and is marked ``softcap_unsupported``)
    cce                    Apple Cut Cross-Entropy ``linear_cross_entropy(..., reduction="none")``
                           per-token losses + a SimPO head written here; its default gradient
                           filtering (``filter_eps="high"``)
    cce-nofilter           the same with gradient filtering off (``filter_eps=None``)
    torch-lce              PyTorch's own ``F.linear_cross_entropy`` (torch >= 2.13, chunked:
                           ``options=LinearCrossEntropyOptions()``) per-token losses + the same
                           SimPO head; no softcap support (marked ``softcap_unsupported`` like Liger)

Losses (``Family.loss``): every family measures SimPO (``simpo_loss``) except the ``-dpo`` ones,
which measure DPO (``preference_loss(loss="dpo", beta=DPO_BETA)``, the official Gemma-2 DPO beta)
with a precomputed reference: ``ref_chosen_logps`` / ``ref_rejected_logps`` are fixed ``[B]``
tensors made once per case (:func:`benchmarks.measure.make_ref_logps`: the float64 per-row sums of the inputs
themselves, each moved by ``N(0, 1) / beta``, so ``beta * d`` is O(1) and the loss is neither
saturated nor trivially ``log 2``). The peers that give per-token losses (``cce``, ``cce-nofilter``,
``torch-lce``) get a DPO head written here (:func:`dpo_loss` on the per-row sums); Liger's DPO takes
a reference model's hidden states and weight (an in-step reference), never precomputed log-probs,
so it is not run at the ``-dpo`` families.

The reference precompute pass (``sequence_logps``: per-row sums and counts of target log-probs,
no gradient) is its own kind of impl (:func:`build_precompute`): ``eager``, ``torch``, ``triton``
(the library's backends) and ``cce`` (its forward: per-token losses, summed per row).

``IMPLS`` are the impls the runner and the pytest suites time by default, each modelled by
``benchmarks/cost_model.py`` under its own name; ``VARIANT_IMPLS`` are variants of a peer, run on
request (``--impls``) and by the campaign's ``bench`` call, and predicted with their base's model
(:func:`cost_backend`). ``ALL_IMPLS`` is both.

Input layouts (``Family.layout``): ``random`` (a random prompt prefix of 1/8 to 1/2 of each row,
every third row padded), ``ultrafeedback`` (the ``-uf`` families: a realistic preference batch,
about 40% of the positions are targets) and ``full`` (the ``-full`` families: every position a
target, the densest batch): :func:`make_labels`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

# The official Gemma-2-9B SimPO recipe (DESIGN section 2); every case uses it.
BETA = 10.0
GAMMA_BETA_RATIO = 0.5
IGNORE_INDEX = -100

#: ``triton-<schedule>`` impls: the triton backend with that schedule pinned.
TRITON_SCHEDULE_IMPLS = {"triton-pairs": "pairs", "triton-vocab": "vocab", "triton-fused": "fused"}
IMPLS = ("eager", "torch", "triton", *TRITON_SCHEDULE_IMPLS, "liger", "cce")
#: Peer variants -> the impl whose cost model predicts them (CCE's model assumes no filtered tiles
#: by default, which is what ``filter_eps=None`` guarantees).
#: PyTorch's chunked ``F.linear_cross_entropy`` forms its gradients in the forward over token
#: chunks, without softcap, as Liger's model assumes.
VARIANT_IMPLS = {"cce-nofilter": "cce", "torch-lce": "liger"}
ALL_IMPLS = (*IMPLS, *VARIANT_IMPLS)
LAYOUTS = ("random", "ultrafeedback", "full")
#: The losses the families measure (``Family.loss``) and the DPO beta: the official Gemma-2-9B DPO
#: recipe's 0.01 (gemma-2-9b-it-DPO; SimPO keeps its own recipe, :data:`BETA`).
BENCH_LOSSES = ("simpo", "dpo")
DPO_BETA = 0.01
#: impls that can run a DPO head on a precomputed reference (Liger's DPO cannot: see above)
DPO_IMPLS = ("eager", "torch", "triton", *TRITON_SCHEDULE_IMPLS, "cce", "cce-nofilter", "torch-lce")
#: sequence_logps (the reference precompute pass): the library's backends and CCE's forward
PRECOMPUTE_IMPLS = ("eager", "torch", "triton", "cce")


def cost_backend(impl: str) -> str:
    """The ``benchmarks.cost_model`` backend that predicts ``impl``."""
    return VARIANT_IMPLS.get(impl, impl)


@dataclass(frozen=True)
class Family:
    name: str
    hidden: int
    vocab: int
    softcap: Optional[float]
    dtype: str
    tokens: tuple
    row_len: int  # tokens per row; a case with fewer than 2 full rows uses 2 rows of N/2
    cpu: bool = False  # a small shape meant for CPU smoke runs
    impls: tuple = ALL_IMPLS  # which impls the family is meant for
    layout: str = "random"  # how labels are laid out (LAYOUTS; make_labels)
    loss: str = "simpo"  # the loss measured (BENCH_LOSSES); "dpo": with a precomputed reference

    def __post_init__(self):
        if self.loss not in BENCH_LOSSES:
            raise ValueError(f"{self.name}: unknown loss {self.loss!r}; expected one of {BENCH_LOSSES}")
        if self.loss == "dpo" and "liger" in self.impls:
            raise ValueError(f"{self.name}: Liger's DPO takes no precomputed reference log-probs")


#: GPU families: the real lm_head shapes (DESIGN section 2), rows of 2048 tokens
#: (N=2048 is 2 rows of 1024: SimPO needs an even row count).
GPU_TOKENS = (2048, 4096, 8192, 16384, 32768)
FAMILIES = {
    # 65536 tokens (32 rows of 2048) at the target shape only: the campaign's bench call measures it.
    "gemma2-9b": Family("gemma2-9b", 3584, 256000, 30.0, "bfloat16", (*GPU_TOKENS, 65536), 2048),
    # The target shape on a realistic batch: UltraFeedback-like lengths, ~40% of positions targets.
    "gemma2-9b-uf": Family("gemma2-9b-uf", 3584, 256000, 30.0, "bfloat16", GPU_TOKENS, 2048,
                           layout="ultrafeedback"),
    # The target shape with every position a target (no prompt, no padding): the most work per token.
    "gemma2-9b-full": Family("gemma2-9b-full", 3584, 256000, 30.0, "bfloat16", GPU_TOKENS, 2048, layout="full"),
    # DPO (beta 0.01, precomputed reference) on the same realistic batch: the family of the
    # campaign's DPO rows and of its reference precompute rows (sequence_logps).
    "gemma2-9b-uf-dpo": Family("gemma2-9b-uf-dpo", 3584, 256000, 30.0, "bfloat16", GPU_TOKENS, 2048,
                               layout="ultrafeedback", impls=DPO_IMPLS, loss="dpo"),
    "gemma2-2b": Family("gemma2-2b", 2304, 256000, 30.0, "bfloat16", GPU_TOKENS, 2048),
    "llama3-8b": Family("llama3-8b", 4096, 128256, None, "bfloat16", GPU_TOKENS, 2048),
    # CPU smoke shapes (CI): small enough that the float64 reference is instant. V and H are not
    # multiples of any block size on purpose.
    "cpu-small": Family("cpu-small", 64, 1000, 30.0, "bfloat16", (256,), 64, cpu=True,
                        impls=("eager", "torch", "liger", "cce", "cce-nofilter", "torch-lce")),
    "cpu-small-nocap": Family("cpu-small-nocap", 64, 1000, None, "bfloat16", (256,), 64, cpu=True,
                              impls=("eager", "torch", "liger", "cce", "cce-nofilter")),
    "cpu-small-uf": Family("cpu-small-uf", 64, 1000, 30.0, "bfloat16", (256,), 64, cpu=True,
                           impls=("eager", "torch", "liger", "cce", "cce-nofilter", "torch-lce"),
                           layout="ultrafeedback"),
    "cpu-small-full": Family("cpu-small-full", 64, 1000, 30.0, "bfloat16", (256,), 64, cpu=True,
                             impls=("eager", "torch", "liger", "cce", "cce-nofilter", "torch-lce"),
                             layout="full"),
    "cpu-small-dpo": Family("cpu-small-dpo", 64, 1000, 30.0, "bfloat16", (256,), 64, cpu=True,
                            impls=("eager", "torch", "cce", "cce-nofilter", "torch-lce"), layout="ultrafeedback",
                            loss="dpo"),
    # The Triton interpreter does no bf16 arithmetic (DESIGN section 5) and is slow: a minuscule
    # float32 shape, run only with TRITON_INTERPRET=1.
    "cpu-interp": Family("cpu-interp", 40, 300, 30.0, "float32", (64,), 16, cpu=True,
                         impls=("eager", "triton", *TRITON_SCHEDULE_IMPLS)),
    # Smaller still (about 4x faster under the interpreter): the campaign's dry run, which must
    # take every triton schedule through check and timing within a minute on two cores.
    "cpu-interp-tiny": Family("cpu-interp-tiny", 16, 130, 30.0, "float32", (32,), 8, cpu=True,
                              impls=("eager", "triton", *TRITON_SCHEDULE_IMPLS)),
    "cpu-interp-tiny-dpo": Family("cpu-interp-tiny-dpo", 16, 130, 30.0, "float32", (32,), 8, cpu=True,
                                  impls=("eager", "triton", *TRITON_SCHEDULE_IMPLS), loss="dpo"),
}
GPU_FAMILIES = ("gemma2-9b", "gemma2-2b", "llama3-8b")
CPU_FAMILIES = ("cpu-small", "cpu-small-nocap", "cpu-interp", "cpu-small-dpo", "cpu-interp-tiny-dpo")


@dataclass(frozen=True)
class Case:
    family: str
    hidden: int
    vocab: int
    softcap: Optional[float]
    dtype: str
    tokens: int
    rows: int
    seq: int
    layout: str = "random"
    loss: str = "simpo"

    @property
    def needs_reference(self) -> bool:
        """Whether the loss takes precomputed reference log-probs (``benchmarks.measure.make_ref_logps``)."""
        return self.loss == "dpo"

    @property
    def beta(self) -> float:
        return DPO_BETA if self.loss == "dpo" else BETA

    @property
    def id(self) -> str:
        return f"{self.family}-N{self.tokens}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def flops_fwd(self) -> float:
        """2NHV: the logits matmul."""
        return 2.0 * self.tokens * self.hidden * self.vocab

    def flops_fwd_bwd(self) -> float:
        """6NHV: logits, dH and dW matmuls (DESIGN section 2: the floor)."""
        return 6.0 * self.tokens * self.hidden * self.vocab


def make_case(family: Family, tokens: int) -> Case:
    rows = tokens // family.row_len
    if rows < 2:
        rows = 2
    if rows % 2 or tokens % rows:
        raise ValueError(f"{family.name}: {tokens} tokens do not split into an even number of rows")
    return Case(family.name, family.hidden, family.vocab, family.softcap, family.dtype, tokens,
                rows, tokens // rows, family.layout, family.loss)


def cases_for(families, tokens=None) -> list[Case]:
    """Cases of the named families; ``tokens`` (iterable of ints) filters the token counts."""
    out = []
    for name in families:
        fam = FAMILIES[name]
        # the token filter applies to GPU families; CPU smoke families keep their own sizes
        for n in fam.tokens if tokens is None or fam.cpu else [t for t in tokens if t in fam.tokens]:
            out.append(make_case(fam, n))
    return out


def default_families(device: torch.device) -> tuple:
    return GPU_FAMILIES if device.type == "cuda" else CPU_FAMILIES


# --------------------------------------------------------------------------------------------
# Inputs


def make_inputs(case: Case, device, seed: int = 0):
    """Random ``hidden [2B,T,H]``, ``weight [V,H]`` and ``labels [2B,T]`` (never zeros).

    Logits ``h . w`` have a standard deviation of about 5, so the Gemma-2 softcap of 30 bends the
    tails. The labels follow the case's layout (:func:`make_labels`).
    """
    device = torch.device(device)
    R, T, H, V = case.rows, case.seq, case.hidden, case.vocab
    dt = case.torch_dtype
    gd = torch.Generator(device=device).manual_seed(seed)  # draw the big tensors where they live
    hidden = torch.randn(R, T, H, generator=gd, device=device).to(dt)
    weight = torch.randn(V, H, generator=gd, device=device).mul_(5.0 / H ** 0.5).to(dt)
    return hidden, weight, make_labels(case, seed).to(device)


def make_labels(case: Case, seed: int = 0) -> torch.Tensor:
    """The ``[2B, T]`` labels of ``case`` (on the CPU; cheap, so a plan can know its target fraction
    before any input exists), by ``case.layout``:

    ``random``: each row masks a random prompt prefix (1/8 to 1/2 of the row) with -100; every
    third row also has trailing padding, so lengths differ between chosen and rejected rows
    (about 2/3 of the positions are targets).

    ``ultrafeedback``: a padded batch of UltraFeedback-like preference pairs: chosen row ``i`` and
    rejected row ``B+i`` share one prompt of 50-54% of the row (masked); their responses take
    40% of the row on average, one longer and one shorter by up to 6% of the row (which one at
    random), then right padding (masked, 0-16% of the row). 40% of the positions are targets
    (to the rounding of ``0.4 T``), as in a batch padded to its longest pair.

    ``full``: every position is a target (all but the first of each row after the shift).
    """
    R, T, V = case.rows, case.seq, case.vocab
    g = torch.Generator().manual_seed(seed + 1)
    if case.layout == "full":
        return torch.randint(0, V, (R, T), generator=g)
    if case.layout == "ultrafeedback":
        def u() -> float:
            return float(torch.rand((), generator=g))

        labels = torch.full((R, T), IGNORE_INDEX, dtype=torch.long)
        B, base = R // 2, max(2, round(0.40 * T))
        for i in range(B):
            p = max(1, int(T * (0.50 + 0.04 * u())))
            d = int(T * 0.06 * u())
            lengths = (base + d, base - d) if u() < 0.5 else (base - d, base + d)
            for r, n in zip((i, B + i), lengths):
                n = max(2, min(T - p, n))
                labels[r, p:p + n] = torch.randint(0, V, (n,), generator=g)
        return labels
    if case.layout != "random":
        raise ValueError(f"unknown layout {case.layout!r}; expected one of {LAYOUTS}")
    labels = torch.randint(0, V, (R, T), generator=g)
    for r in range(R):
        p = int(torch.randint(T // 8, T // 2 + 1, (1,), generator=g))
        labels[r, :p] = IGNORE_INDEX
        if r % 3 == 2:
            pad = int(torch.randint(1, max(2, T // 8), (1,), generator=g))
            labels[r, T - pad:] = IGNORE_INDEX
    return labels


# --------------------------------------------------------------------------------------------
# Implementations. Each factory returns ``fn(hidden, weight, labels) -> (loss, logps [2B])``.


@dataclass
class Impl:
    name: str
    fn: Callable
    softcap: Optional[float]  # the softcap this impl actually applies in this case
    notes: list = field(default_factory=list)


class Unavailable(Exception):
    """The impl cannot run here (missing package, no CUDA, ...): the case is skipped with this reason."""


def triton_unavailable(device) -> Optional[str]:
    """Why the triton backend cannot run on ``device`` (None: it can)."""
    device = torch.device(device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton backend needs CUDA (or TRITON_INTERPRET=1 on CPU)"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        kernels = importlib.import_module("simpo_kernels.kernels")
    except ImportError as exc:
        return f"simpo_kernels.kernels not importable: {exc}"
    # triton <= 3.6 under numpy >= 2.4: the library refuses the interpreter, and says why
    if device.type != "cuda" and (problem := kernels.interpreter_problem()):
        return f"the Triton interpreter cannot run here: {problem}"
    return None


RefLogps = Optional[tuple]  # (ref_chosen_logps [B], ref_rejected_logps [B]) on the inputs' device


def _refs(case: Case, ref_logps: RefLogps) -> RefLogps:
    """The case's reference values: required where its loss takes them, refused elsewhere."""
    if case.needs_reference and ref_logps is None:
        raise ValueError(f"{case.id}: loss {case.loss!r} needs ref_logps (benchmarks.measure.make_ref_logps)")
    if not case.needs_reference and ref_logps is not None:
        raise ValueError(f"{case.id}: loss {case.loss!r} takes no reference log-probs")
    return ref_logps


def dpo_loss(sums: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float = DPO_BETA) -> torch.Tensor:
    """DPO (sigmoid, Rafailov et al. 2023) from per-row SUMS of target log-probs ``[2B]`` (chosen
    rows first) and the reference's sums ``[B]`` each: ``mean_i -logsigmoid(beta * ((s_c - r_c) -
    (s_r - r_r)))``. Written here from the formula for the peers' heads and the float64 reference."""
    B = sums.shape[0] // 2
    d = (sums[:B] - ref_chosen.to(sums.dtype)) - (sums[B:] - ref_rejected.to(sums.dtype))
    return -F.logsigmoid(beta * d).mean()


def _check_triton_here(case: Case, device) -> None:
    """:class:`Unavailable` where the triton backend cannot run ``case`` (no CUDA and not a CPU smoke
    shape for the interpreter, or the interpreter refused)."""
    if device.type != "cuda" and not FAMILIES[case.family].cpu:
        raise Unavailable("triton interpreter only at CPU smoke shapes")
    reason = triton_unavailable(device)
    if reason:
        raise Unavailable(reason)


def simpo_kernels_impl(backend: str, case: Case, device, schedule: str = "auto", name: Optional[str] = None,
                       ref_logps: RefLogps = None, **options) -> Impl:
    """``simpo_loss(backend=..., schedule=..., **options)`` at ``case`` (a ``-dpo`` case:
    ``preference_loss(loss="dpo", beta=DPO_BETA, ref_chosen_logps=..., ref_rejected_logps=...)``,
    whose log-probs are per-row sums, with its official ``logit_metrics``); :class:`Unavailable`
    where the triton backend cannot run (no CUDA and no interpreter, or the interpreter refused)."""
    from simpo_kernels import simpo_loss

    if backend == "triton":
        _check_triton_here(case, device)
    refs = _refs(case, ref_logps)

    if case.loss == "simpo":
        def fn(hidden, weight, labels):
            out = simpo_loss(hidden, weight, labels, beta=BETA, gamma_beta_ratio=GAMMA_BETA_RATIO,
                             softcap=case.softcap, ignore_index=IGNORE_INDEX, backend=backend, schedule=schedule,
                             **options)
            return out.loss, torch.cat([out.chosen_logps, out.rejected_logps])
    else:
        from simpo_kernels import preference_loss

        def fn(hidden, weight, labels):
            out = preference_loss(hidden, weight, labels, loss=case.loss, ref_chosen_logps=refs[0],
                                  ref_rejected_logps=refs[1], beta=case.beta, softcap=case.softcap,
                                  ignore_index=IGNORE_INDEX, backend=backend, schedule=schedule, **options)
            return out.loss, torch.cat([out.chosen_logps, out.rejected_logps])

    return Impl(name or backend, fn, case.softcap)


def _pair_head(case: Case, refs: RefLogps):
    """The peers' head on per-row sums and counts of target log-probs (``[2B]`` each): SimPO on the
    means, or DPO (:func:`dpo_loss`) on the sums. Returns ``fn(sums, counts) -> (loss, logps)``."""
    B = case.rows // 2

    def simpo(sums, counts):
        logps = sums / counts
        u = BETA * (logps[:B] - logps[B:] - GAMMA_BETA_RATIO)
        return -F.logsigmoid(u).mean(), logps

    def dpo(sums, counts):
        return dpo_loss(sums, refs[0], refs[1], case.beta), sums

    return dpo if case.loss == "dpo" else simpo


def _liger_impl(case: Case, device) -> Impl:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss
    except ImportError as exc:
        raise Unavailable(f"liger-kernel not installed ({exc})") from None
    # Liger's margin is ``beta * (a_c - a_r) - gamma`` with gamma in absolute units, the official
    # ``beta * (a_c - a_r - gamma_beta_ratio)`` needs gamma = beta * gamma_beta_ratio. Its module
    # adds an NLL term by default (compute_nll_loss=True): off, for pure SimPO. It chunks over
    # pairs (chunk_size=1 pair) and torch.compiles the per-chunk function by default; on CPU
    # compiling takes ~20 s per shape on 2 cores, so there it runs uncompiled.
    compiled = device.type == "cuda"
    loss_mod = LigerFusedLinearSimPOLoss(
        ignore_index=IGNORE_INDEX, beta=BETA, gamma=BETA * GAMMA_BETA_RATIO, label_smoothing=0.0,
        compute_nll_loss=False, compiled=compiled)
    notes = [] if compiled else ["uncompiled"]
    if case.softcap is not None:
        notes.insert(0, "softcap_unsupported")

    def fn(hidden, weight, labels):
        # Liger expects pre-shifted inputs: position t predicts labels[t+1].
        loss, aux = loss_mod(weight, hidden[:, :-1], labels[:, 1:])
        return loss, torch.cat([aux[0], aux[1]])

    return Impl("liger", fn, None, notes)


def _cce_nll(case: Case, device, name: str = "cce"):
    """CCE's per-token losses ``[2B, T-1]`` (``shift=True``: entry t is ``-log p(labels[t+1] | h_t)``,
    0 where ignored) as ``fn(hidden, weight, labels)``, and the notes of the path it takes."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as exc:
        raise Unavailable(f"cut-cross-entropy not installed ({exc})") from None
    # CCE's own kernels are Triton for CUDA; on CPU its torch.compile fallback exercises the same
    # wiring (shift, ignore_index, per-token losses, the SimPO head) but is not the CCE kernel.
    # ``cce`` keeps its default gradient filtering (backward tiles whose |softmax - onehot| is all
    # below filter_eps="high", 2^-12 for bf16, are skipped); ``cce-nofilter`` turns it off
    # (filter_eps=None: every tile forms its gradients). The torch_compile fallback has no filter.
    impl = "cce" if device.type == "cuda" else "torch_compile"
    notes = [] if impl == "cce" else ["torch_compile_fallback"]
    kwargs = {} if impl != "cce" else {"filter_eps": None} if name == "cce-nofilter" else {"filter_eps": "high"}

    def nll(hidden, weight, labels):
        return linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE_INDEX, softcap=case.softcap,
                                    reduction="none", shift=True, impl=impl, **kwargs)

    return nll, notes


def _row_sums(nll: torch.Tensor, labels: torch.Tensor):
    """Per-row sums of target log-probs and counts from per-token losses ``[2B, T-1]``."""
    mask = (labels[:, 1:] != IGNORE_INDEX).to(nll.dtype)
    return -(nll * mask).sum(-1), mask.sum(-1)


def _cce_impl(case: Case, device, name: str = "cce", ref_logps: RefLogps = None) -> Impl:
    nll, notes = _cce_nll(case, device, name)
    head = _pair_head(case, _refs(case, ref_logps))

    def fn(hidden, weight, labels):
        return head(*_row_sums(nll(hidden, weight, labels), labels))

    return Impl(name, fn, case.softcap, notes)


def _torch_lce_impl(case: Case, device, ref_logps: RefLogps = None) -> Impl:
    lce = getattr(F, "linear_cross_entropy", None)
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if lce is None or options is None:
        raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy (torch >= 2.13)")
    notes = ["softcap_unsupported"] if case.softcap is not None else []
    head = _pair_head(case, _refs(case, ref_logps))

    def fn(hidden, weight, labels):
        # the shift by hand: position t predicts labels[t+1]; 0 loss where ignored
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        target = labels[:, 1:].reshape(-1)
        nll = lce(h, weight, target, reduction="none", ignore_index=IGNORE_INDEX, options=options())
        nll = nll.float().view(labels.shape[0], -1)  # bf16 per-token losses: sum them in float32
        return head(*_row_sums(nll, labels))

    return Impl("torch-lce", fn, None, notes)


def build_impl(name: str, case: Case, device, ref_logps: RefLogps = None) -> Impl:
    """The impl ``name`` for ``case`` on ``device``; raises :class:`Unavailable` with a reason.
    ``ref_logps``: the precomputed reference values of a ``-dpo`` case (required there)."""
    fam = FAMILIES[case.family]
    if name not in fam.impls:
        raise Unavailable(f"{name} not run at {case.family}")
    if name in ("eager", "torch", "triton"):
        return simpo_kernels_impl(name, case, device, ref_logps=ref_logps)
    if name in TRITON_SCHEDULE_IMPLS:
        return simpo_kernels_impl("triton", case, device, TRITON_SCHEDULE_IMPLS[name], name, ref_logps=ref_logps)
    if name == "liger":
        _refs(case, ref_logps)
        return _liger_impl(case, device)
    if name in ("cce", "cce-nofilter"):
        return _cce_impl(case, device, name, ref_logps)
    if name == "torch-lce":
        return _torch_lce_impl(case, device, ref_logps)
    raise ValueError(f"unknown impl {name!r}; expected one of {ALL_IMPLS}")


def build_precompute(name: str, case: Case, device) -> Impl:
    """The reference precompute pass ``name`` (:data:`PRECOMPUTE_IMPLS`) at ``case``:
    ``fn(hidden, weight, labels) -> (sums [2B], counts [2B])``, per-row sums of target log-probs
    (float32 for 16-bit inputs) and their token counts, called without gradient.

    ``eager`` / ``torch`` / ``triton``: ``simpo_kernels.sequence_logps(backend=...)``; ``cce``: CCE's
    forward (per-token losses, its default path) summed per row. :class:`Unavailable` with a reason
    where it cannot run here."""
    if name not in PRECOMPUTE_IMPLS:
        raise ValueError(f"unknown precompute impl {name!r}; expected one of {PRECOMPUTE_IMPLS}")
    if name == "cce":
        nll, notes = _cce_nll(case, device, "cce")

        def cce_fn(hidden, weight, labels):
            sums, counts = _row_sums(nll(hidden, weight, labels).float(), labels)
            return sums, counts.long()

        return Impl("cce", cce_fn, case.softcap, notes)
    if name == "triton":
        _check_triton_here(case, device)
    from simpo_kernels import sequence_logps

    def fn(hidden, weight, labels):
        return sequence_logps(hidden, weight, labels, softcap=case.softcap, ignore_index=IGNORE_INDEX,
                              backend=name)

    return Impl(name, fn, case.softcap)
