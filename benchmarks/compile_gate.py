"""Compile gate: every Triton kernel of the project, at every configuration its launcher can
choose, compiled for the H100 (sm_90) on a machine without a GPU, and read off the machine code.

The launchers in ``simpo_kernels.kernels`` build a :class:`~simpo_kernels.kernels.launch.Launch`
(kernel, grid, arguments, options) and run it; here the same launchers build it from ``meta``
tensors at the Gemma-2-9B head shape (N=8192, H=3584, V=256000), the arguments are specialised
as the JIT would specialise them (pointers 16-byte aligned, ints divisible by 16 marked so, an
int equal to 1 a constant, None a constant), and ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`` builds the cubin. ``cuobjdump`` and ``nvdisasm``, shipped in
the triton wheel, give the registers, shared memory, local memory (spills) and the SASS, in which
the gate counts the tensor-core instructions (``HGMMA``: wgmma; ``HMMA``: the older mma), the
global reductions and atomics (``REDG``, ``ATOMG``), fences (``MEMBAR``) and local loads and stores
(``LDL``/``STL``), and finds loops (backward branches) to tell which of those sit inside one.

The row kernels of the ``pairs`` and ``vocab`` schedules (``_row_stats_kernel``,
``_logprob_grad_kernel``) are compiled at the chunk layouts those schedules launch
(:data:`ROW_LAYOUTS`: a chunk of pairs over the whole vocabulary, vocabulary chunks, vocabularies
and chunks not divisible by 16), once per distinct JIT specialisation; each record lists the other
launcher choices that compile to the same specialisation (``covers``), the int arguments and which
arguments the JIT marks divisible by 16, the widths of its global loads and stores, and its CTA
barriers (``BAR.SYNC``).

Rules (a violation fails the gate):
  * no spills: no local memory, no ``LDL``/``STL``;
  * shared memory within the 227 KB a block may have on sm_90;
  * the matrix kernels use wgmma (``HGMMA``) for bf16, fp16 and tf32 operands;
  * no ``acq_rel``/``acquire``/``release`` atomics in the PTX and no GPU- or system-scope
    ``MEMBAR`` inside a loop (the CTA-scope fence that wgmma needs is allowed: see ``SASS_OPS``);
  * the forward's programs per SM, from registers and shared memory, equal the
    ``KernelConfig.ctas_per_sm`` its split heuristic assumes;
  * ``_logprob_grad_kernel`` writing a 16-bit ``dz`` over its float32 logits is compiled with
    ``IN_PLACE`` and every global store in it is ordered after the loop step's global loads by a CTA
    barrier (walking back from each ``STG`` through the loop body, a ``BAR.SYNC`` comes before any
    ``LDG``): the barrier that makes the in-place overwrite safe across warps.

Usage::

    python -m benchmarks.compile_gate --out benchmarks/results/compile   # every config, JSON per kernel
    python -m benchmarks.compile_gate --only _lse_forward_kernel --dtype bf16 --set block_v=256
    python -m benchmarks.compile_gate --only _logprob_grad_kernel --variant bf16.bias-none.softcap.pairs
    python -m benchmarks.compile_gate --only none --selftest   # the bad probes must be caught

It must run without ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled); the test suite
runs it in a subprocess, once with the Triton that CI installs and once with triton 3.6 (the GPU
image's). Exit status 1 when any rule is violated.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional
from unittest import mock

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from simpo_kernels.kernels import row_kernels, logprob_backward, lse_forward
from simpo_kernels.kernels.launch import KernelConfig, Launch, gpu_config, input_precision, interpreting

from .cases import FAMILIES
from .cost_model import DEFAULT_SMS as H100_SMS

TARGET = GPUTarget("cuda", 90, 32)
#: The Gemma-2-9B head, one device step of the official recipe (2 pairs x 2048 tokens).
SHAPE = dict(N=8192, H=FAMILIES["gemma2-9b"].hidden, V=FAMILIES["gemma2-9b"].vocab)
#: Token count and target rows of the ``odd_tokens`` variants (a prompt-heavy batch).
ODD_TOKENS = dict(N=8189, M=4093)
#: sm_90 limits: dynamic shared memory per block (opt-in), shared memory and registers per SM.
MAX_SHARED_PER_BLOCK = 227 * 1024
MAX_SHARED_PER_SM = 228 * 1024
REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
#: Shared memory the runtime reserves per block on sm_80+ (CUDA occupancy calculator).
RESERVED_SHARED_PER_BLOCK = 1024

DTYPES = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False),
          "fp32-tf32": (torch.float32, True), "fp32-ieee": (torch.float32, False)}
TORCH_TO_TRITON = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                   torch.int64: "i64", torch.int32: "i32"}
#: SASS opcodes counted, by regex. ``MEMBAR.GPU``: a fence of GPU or system scope (what an acq_rel
#: atomic costs). A CTA-scope ``MEMBAR.ALL.CTA`` + ``FENCE.VIEW.ASYNC.S`` pair is the compiled
#: ``fence.proxy.async.shared::cta`` that wgmma needs after registers are stored to shared memory
#: as its operand (dz in the backward): required, and counted under ``MEMBAR`` only.
SASS_OPS = {op: rf"\b{op}\b" for op in ("HGMMA", "HMMA", "FFMA", "REDG", "ATOMG", "MEMBAR", "CCTL", "LDL", "STL")}
SASS_OPS["MEMBAR.GPU"] = r"\bMEMBAR\.[\w.]*\b(?:GPU|SYS)\b"
MATMUL_KERNELS = ("_lse_forward_kernel", "_logprob_backward_kernel")
ROW_KERNELS = ("_row_stats_kernel", "_logprob_grad_kernel")
#: A CTA-wide barrier that waits (``bar.sync``/``bar.red``; ``tl.debug_barrier`` compiles to
#: ``BAR.SYNC.DEFER_BLOCKING 0x0``). ``BAR.ARV`` (arrive without waiting) is not one.
CTA_BARRIER = r"\bBAR\.(?:SYNC|RED)\b"
#: Global loads and stores by width: ``LDG.E.128`` (16 B vectors), ``LDG.E.64``, ``LDG.E`` (4 B),
#: ``LDG.E.U16`` (2 B), ...
GLOBAL_ACCESS = r"\b(?:LDG|STG)\.E(?:\.(?:128|64|U16|S16|U8|S8))?\b"
#: The row kernels' chunks of float32 logits ``z [n, Vc]`` (from a cuBLAS matmul: contiguous, so
#: ``stride_z = Vc``; a 16-bit dz has ``stride_dz = 2 Vc``), ``v0`` the chunk's first vocabulary id.
#: The JIT specialises each int on divisibility by 16 (0 counts as divisible: ``v0 = 0`` and
#: ``v0 = 3 x 32768`` compile alike) and each pointer on 16-byte alignment, so these layouts are
#: what it compiles: ``pairs``, ``vocab`` and ``vocab-last`` at the Gemma-2-9B vocabulary mark every
#: int divisible (``_row_stats_kernel``'s outputs, rows of a ``[3, n]`` tensor, are 16-byte aligned
#: for n = 2048 and not for n = 4093: two binaries); ``odd-vocab`` (V odd) marks no int but ``v0``;
#: ``vocab-8`` (V = 8 mod 16) marks a 16-bit dz's row stride ``2 V`` but not ``Vc``; ``narrow`` (the
#: ``vocab`` schedule with chunks under 128 columns: ``memory_budget`` below n x 512 B) marks none.
ROW_LAYOUTS = {
    # a chunk of whole pairs (2048 target rows) over the whole vocabulary
    "pairs": dict(n=2048, V=SHAPE["V"], Vc=SHAPE["V"], v0=0),
    # 32768-column vocabulary chunks of the 4093 target rows of the odd-token batch, and the last one
    "vocab": dict(n=ODD_TOKENS["M"], V=SHAPE["V"], Vc=32768, v0=3 * 32768),
    "vocab-last": dict(n=ODD_TOKENS["M"], V=SHAPE["V"], Vc=SHAPE["V"] - 7 * 32768, v0=7 * 32768),
    # pairs over a vocabulary not divisible by 16 (GPT-2's 50257) and one that is 8 mod 16 (OLMo's 50280)
    "odd-vocab": dict(n=2048, V=50257, Vc=50257, v0=0),
    "vocab-8": dict(n=2048, V=50280, Vc=50280, v0=0),
    # the vocab schedule with a 100-column chunk (vocab_chunk() rounds to 128 only above 128)
    "narrow": dict(n=ODD_TOKENS["M"], V=SHAPE["V"], Vc=100, v0=7 * 100),
}
#: ``_row_stats_kernel`` on given logits (``simpo_loss_from_logits``): the ``[N, V]`` logits of the
#: input dtype at :data:`SHAPE`, no bias, no softcap.
LOGITS_LAYOUT = "logits"
#: Layouts compiled for every dtype; the rest (rarer) for bf16 only, as ``odd_tokens`` is.
ROW_LAYOUTS_ALL_DTYPES = ("pairs", "vocab", "vocab-last", "odd-vocab")


@dataclass(frozen=True)
class Variant:
    """One configuration a launcher can choose."""

    kernel: str
    dtype: str                 # a key of DTYPES
    bias: str = "none"         # none | trainable | frozen (a bias without gradient)
    softcap: bool = False
    grads: str = "dh+dw"       # dh+dw | dh (frozen weight) | dw (frozen hidden); backward only
    grad_filter: bool = False  # backward only
    odd_tokens: bool = False   # token and target-row counts not divisible by 16 (see ODD_TOKENS)
    layout: str = ""           # row kernels: a key of ROW_LAYOUTS

    @property
    def name(self) -> str:
        parts = [self.dtype, f"bias-{self.bias}", "softcap" if self.softcap else "nocap"]
        if self.kernel == "_logprob_backward_kernel":
            parts += [self.grads, "filter" if self.grad_filter else "exact"]
        if self.odd_tokens:
            parts.append("odd-tokens")
        if self.layout:
            parts.append(self.layout)
        return ".".join(parts)


def variants(dtypes: Optional[list[str]] = None) -> Iterator[Variant]:
    """Every configuration of every kernel (the forward has no gradient flags; the given-logits
    kernels have no bias, softcap or tf32 choice)."""
    dts = dtypes or list(DTYPES)
    for dt, bias, cap in itertools.product(dts, ("none", "trainable"), (False, True)):
        yield Variant("_lse_forward_kernel", dt, bias, cap)
    for dt, bias, cap, grads, filt in itertools.product(dts, ("none", "trainable", "frozen"), (False, True),
                                                        ("dh+dw", "dh", "dw"), (False, True)):
        yield Variant("_logprob_backward_kernel", dt, bias, cap, grads, filt)
    for dt in dts:
        if dt != "fp32-tf32":
            # given logits: their forward is the row-statistics kernel on the logits themselves
            yield Variant("_row_stats_kernel", dt, layout=LOGITS_LAYOUT)
            yield Variant("_logits_backward_kernel", dt)
    # The JIT specialises ints divisible by 16; real token and target-row counts mostly are not.
    if "bf16" in dts:
        for bias, cap in itertools.product(("none", "trainable"), (False, True)):
            yield Variant("_lse_forward_kernel", "bf16", bias, cap, odd_tokens=True)
        for bias, cap, grads, filt in itertools.product(("none", "trainable", "frozen"), (False, True),
                                                        ("dh+dw", "dh", "dw"), (False, True)):
            yield Variant("_logprob_backward_kernel", "bf16", bias, cap, grads, filt, odd_tokens=True)
    # The row kernels: dtype is the input's (bias and 16-bit dz); z is float32 whatever it is. Every
    # layout is listed; run() compiles each distinct specialisation once (see ``covers``).
    for kern in ROW_KERNELS:
        for dt, bias, cap, layout in itertools.product(dts, ("none", "present"), (False, True), ROW_LAYOUTS):
            if dt != "fp32-tf32" and (layout in ROW_LAYOUTS_ALL_DTYPES or dt == "bf16"):
                yield Variant(kern, dt, bias, cap, layout=layout)


def build_launch(v: Variant, cfg: Optional[KernelConfig] = None) -> Launch:
    """The launch the project's launcher builds for ``v`` at :data:`SHAPE`, from meta tensors."""
    dtype, tf32 = DTYPES[v.dtype]
    cfg = cfg or gpu_config(dtype, tf32)
    if v.kernel in ROW_KERNELS:
        return build_row_launch(v, cfg)
    N, H, V = SHAPE["N"], SHAPE["H"], SHAPE["V"]
    M = N  # backward rows: every position has a target
    if v.odd_tokens:
        N, M = ODD_TOKENS["N"], ODD_TOKENS["M"]
    meta = dict(device="meta")
    hidden = torch.empty((N, H), dtype=dtype, **meta)
    weight = torch.empty((V, H), dtype=dtype, **meta)
    bias = None if v.bias == "none" else torch.empty((V,), dtype=dtype, **meta)
    targets = torch.empty((N,), dtype=torch.int64, **meta)
    softcap = 30.0 if v.softcap else None
    prec = input_precision(dtype, tf32)
    if v.kernel == "_lse_forward_kernel":
        return lse_forward.plan_lse_forward(hidden, weight, bias, targets, softcap, cfg, input_precision=prec,
                                            resident=H100_SMS * cfg.ctas_per_sm)[0]
    if v.kernel == "_logprob_backward_kernel":
        f32 = torch.empty((N,), dtype=torch.float32, **meta)
        rows = torch.empty((M,), dtype=torch.int64, **meta)
        return logprob_backward.plan_logprob_backward(
            hidden, weight, bias, rows, targets, f32, f32, softcap, cfg,
            need_dh="dh" in v.grads, need_dw="dw" in v.grads, need_db=v.bias == "trainable",
            filter_eps=2.0 ** -9 if v.grad_filter else None, input_precision=prec)[0]
    logits = torch.empty((N, V), dtype=dtype, **meta)
    f32 = torch.empty((N,), dtype=torch.float32, **meta)
    return row_kernels.plan_logits_backward(logits, targets, f32, f32, cfg)[0]


def build_row_launch(v: Variant, cfg: KernelConfig) -> Launch:
    """The row kernel launch a ``pairs``/``vocab`` chunk makes at ``ROW_LAYOUTS[v.layout]``.

    ``_logprob_grad_kernel``'s launch is the one ``row_kernels.logprob_grad`` builds (captured from
    its call to ``plan_logprob_grad``, not run): ``dz`` is the view of ``z`` that the library forms
    (``z`` itself for float32, ``z.view(dtype)[:, :Vc]`` for 16-bit), so the gate compiles the
    in-place aliasing the schedules really launch.
    """
    dtype = DTYPES[v.dtype][0]
    if v.layout == LOGITS_LAYOUT:  # simpo_loss_from_logits: [N, V] logits of the input dtype
        logits = torch.empty((SHAPE["N"], SHAPE["V"]), dtype=dtype, device="meta")
        targets = torch.empty((SHAPE["N"],), dtype=torch.int64, device="meta")
        return row_kernels.plan_row_stats(logits, None, targets, 0, None, cfg)[0]
    lay = ROW_LAYOUTS[v.layout]
    n, Vc, v0 = lay["n"], lay["Vc"], lay["v0"]
    meta = dict(device="meta")
    z = torch.empty((n, Vc), dtype=torch.float32, **meta)
    bias = None if v.bias == "none" else torch.empty((lay["V"],), dtype=dtype, **meta)
    targets = torch.empty((n,), dtype=torch.int64, **meta)
    softcap = 30.0 if v.softcap else None
    if v.kernel == "_row_stats_kernel":
        return row_kernels.plan_row_stats(z, bias, targets, v0, softcap, cfg)[0]
    f32 = torch.empty((n,), dtype=torch.float32, **meta)
    planned: list[Launch] = []
    plan = row_kernels.plan_logprob_grad

    def capture(*args, **kwargs):
        planned.append(plan(*args, **kwargs))
        return types.SimpleNamespace(run=lambda: None)

    with mock.patch.object(row_kernels, "plan_logprob_grad", capture):
        row_kernels.logprob_grad(z, bias, targets, f32, f32, v0, softcap, dtype, cfg)
    (launch,) = planned
    return launch


def specialise(launch: Launch) -> tuple[Any, dict[str, Any]]:
    """``(JITFunction, every argument by name)`` with the ``triton.heuristics`` flags applied."""
    args = dict(launch.args)
    kernel = launch.kernel
    while not isinstance(kernel, triton.runtime.JITFunction):  # heuristics wrappers, outermost first
        for name, rule in getattr(kernel, "values", {}).items():
            args[name] = rule(args)
        kernel = kernel.fn
    return kernel, args


def constexpr_args(launch: Launch) -> dict[str, Any]:
    """The launch's compile-time arguments (tile shapes, flags), by name."""
    kernel, args = specialise(launch)
    return {name: args[name] for name, p in zip(kernel.arg_names, kernel.params) if p.is_constexpr}


def specialisation(launch: Launch) -> tuple[Any, dict[str, str], dict[str, Any], dict[tuple, list]]:
    """``(JITFunction, signature, constexprs, attrs)``: the launch's arguments specialised as the JIT
    specialises them (pointers and ints divisible by 16 marked so, an int equal to 1 and None
    constants)."""
    kernel, args = specialise(launch)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = args[name]
        if kernel.params[i].is_constexpr or value is None:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TORCH_TO_TRITON[value.dtype]
            # The CUDA caching allocator aligns allocations to 512 bytes and a meta tensor's
            # data_ptr() is its storage offset in bytes, so this is the JIT's own test on the real
            # pointer (a row of a [3, n] float32 output is 16-byte aligned only when 4 divides n).
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:  # the JIT turns an int equal to 1 into a constant
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: cannot specialise {type(value).__name__}")
    return kernel, signature, constexprs, attrs


def ast_source(launch: Launch) -> ASTSource:
    """Specialise the launch's arguments as the JIT does and wrap the kernel for ``triton.compile``."""
    kernel, signature, constexprs, attrs = specialisation(launch)
    return ASTSource(kernel, signature, constexprs, attrs)


def specialisation_key(launch: Launch) -> str:
    """Equal for two launches exactly when the JIT compiles them to the same binary."""
    kernel, signature, constexprs, attrs = specialisation(launch)
    return json.dumps([kernel.__name__, signature, sorted((k, repr(c)) for k, c in constexprs.items()),
                       sorted((list(k), a) for k, a in attrs.items()), sorted(launch.options.items())])


def int_arguments(launch: Launch) -> tuple[dict[str, int], list[str]]:
    """The launch's run-time int arguments, and the arguments (ints and pointers) the JIT marks
    divisible by 16."""
    kernel, signature, _, attrs = specialisation(launch)
    _, args = specialise(launch)
    ints = {name: args[name] for name, ty in signature.items() if ty in ("i32", "i64")}
    marked = sorted(kernel.arg_names[k[0]] for k in attrs)
    return ints, marked


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def loop_ranges(sass: str) -> list[tuple[int, int]]:
    """``[(start, end)]`` address ranges of loops: a branch back to an address at or before it closes
    a loop. Branch targets are absolute (``BRA 0xe0``, as cuobjdump prints them) or labels
    (``BRA `(.L_x_3)``, as nvdisasm prints them)."""
    labels: dict[str, int] = {}
    branches: list[tuple[int, str]] = []
    pending: list[str] = []
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        for lab in pending:
            labels[lab] = addr
        pending = []
        b = re.search(r"\bBRA\b[^;`0]*(?:`\((\.L_x_\d+)\)|(0x[0-9a-f]+))", m.group(2))
        if b:
            branches.append((addr, b.group(1) or b.group(2)))
    ranges = []
    for addr, target in branches:
        start = int(target, 16) if target.startswith("0x") else labels.get(target)
        if start is not None and start <= addr:
            ranges.append((start, addr))
    return ranges


def _instructions(sass: str) -> list[tuple[int, str]]:
    out = []
    for line in sass.splitlines():
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def unfenced_stores(sass: str) -> int:
    """Global stores (``STG``) not ordered after the global loads before them by a CTA barrier.

    A store in a loop is fenced when, walking back from it through the loop body (and around, from
    the loop's start to its end: the loads of the previous step), a ``BAR.SYNC`` comes before any
    ``LDG``; a store outside every loop, when walking back a barrier comes before any load. This is
    what writing a 16-bit dz over float32 logits that other warps of the program still read needs
    (``tl.debug_barrier`` in ``_logprob_grad_kernel``); bias loads count as loads too (conservative).
    """
    instrs = _instructions(sass)
    loops = [(s, e) for s, e in loop_ranges(sass) if s < e]

    def kind(ins: str) -> str:
        if re.search(CTA_BARRIER, ins):
            return "bar"
        if re.search(r"\bLDG\b", ins):
            return "load"
        return "store" if re.search(r"\bSTG\b", ins) else ""

    bad = 0
    for pos, (addr, ins) in enumerate(instrs):
        if kind(ins) != "store":
            continue
        loop = min((lp for lp in loops if lp[0] <= addr <= lp[1]), key=lambda lp: lp[1] - lp[0], default=None)
        if loop is None:
            behind = [k for _, i in reversed(instrs[:pos]) if (k := kind(i))]
        else:  # back to the loop's start, then from its end back to this store
            body = [(a, kind(i)) for a, i in instrs if loop[0] <= a <= loop[1]]
            at = [a for a, _ in body].index(addr)
            behind = [k for _, k in reversed(body[:at]) if k] + [k for _, k in reversed(body[at + 1:]) if k]
        first = next((k for k in behind if k in ("bar", "load")), None)
        if first == "load":
            bad += 1
    return bad


def occupancy(regs: int, shared: int, num_warps: int) -> int:
    """Programs per SM on sm_90 from registers (allocated per warp in units of 256), shared memory
    and threads."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * num_warps)
    by_shared = MAX_SHARED_PER_SM // (shared + RESERVED_SHARED_PER_BLOCK) if shared else 32
    by_threads = MAX_THREADS_PER_SM // (32 * num_warps)
    return max(0, min(by_regs, by_shared, by_threads, 32))


def inspect(launch: Launch, v: Variant, cfg: Optional[KernelConfig] = None) -> dict[str, Any]:
    """Compile one launch for sm_90 and return its record (facts and rule violations)."""
    if interpreting():
        raise RuntimeError("compile_gate: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    t0 = time.time()
    kernel = triton.compile(ast_source(launch), target=TARGET, options=dict(launch.options))
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res))
    instrs = _instructions(sass)
    loops = loop_ranges(sass)
    counts = {op: sum(1 for _, ins in instrs if re.search(rx, ins)) for op, rx in SASS_OPS.items()}
    in_loop = {op: sum(1 for a, ins in instrs if re.search(SASS_OPS[op], ins) and any(s <= a <= e for s, e in loops))
               for op in ("MEMBAR", "MEMBAR.GPU", "REDG", "ATOMG", "HGMMA")}
    ordered_atomics = len(re.findall(r"\b(?:atom|red)\.[\w.]*\b(?:acq_rel|acquire|release)\b", ptx))
    regs = int(usage.get("REG", 0))
    shared = int(kernel.metadata.shared)
    num_warps = launch.options.get("num_warps", 4)
    record = dict(
        kernel=v.kernel, variant=v.name, triton=triton.__version__,
        options=dict(launch.options),
        constexprs=constexpr_args(launch),
        registers=regs, shared_bytes=shared, local_bytes=int(usage.get("LOCAL", 0)),
        stack_bytes=int(usage.get("STACK", 0)), ctas_per_sm=occupancy(regs, shared, num_warps),
        sass=counts, sass_in_loops=in_loop, loops=len(loops), ptx_ordered_atomics=ordered_atomics,
        compile_s=round(time.time() - t0, 2),
    )
    if v.kernel in ROW_KERNELS:
        ints, marked = int_arguments(launch)
        loads_stores: dict[str, int] = {}
        for _, ins in instrs:
            for op in re.findall(GLOBAL_ACCESS, ins):
                loads_stores[op] = loads_stores.get(op, 0) + 1
        bars = [a for a, ins in instrs if re.search(CTA_BARRIER, ins)]
        record.update(
            int_args=ints, divisible_by_16=marked, covers=[], global_access=dict(sorted(loads_stores.items())),
            cta_barriers=dict(total=len(bars), in_loops=sum(1 for a in bars if any(s <= a <= e for s, e in loops)),
                              unfenced_stores=unfenced_stores(sass)))
    record["violations"] = violations(record, v, cfg)
    return record


def violations(r: dict[str, Any], v: Variant, cfg: Optional[KernelConfig]) -> list[str]:
    """The rules of the gate, as messages; empty when the record passes."""
    out = []
    if r["local_bytes"] or r["sass"]["LDL"] or r["sass"]["STL"]:
        out.append(f"spills: {r['local_bytes']} B local memory, {r['sass']['LDL']} LDL, {r['sass']['STL']} STL")
    if r["shared_bytes"] > MAX_SHARED_PER_BLOCK:
        out.append(f"shared memory {r['shared_bytes']} B > {MAX_SHARED_PER_BLOCK} B (227 KB): fails at launch")
    if v.kernel in MATMUL_KERNELS and v.dtype != "fp32-ieee" and not r["sass"]["HGMMA"]:
        out.append(f"no wgmma (HGMMA) in a {v.dtype} matmul kernel (HMMA {r['sass']['HMMA']}, FFMA {r['sass']['FFMA']})")
    if r["ptx_ordered_atomics"]:
        out.append(f"{r['ptx_ordered_atomics']} acq_rel/acquire/release atomics in the PTX (use sem='relaxed')")
    if r["sass_in_loops"]["MEMBAR.GPU"]:
        out.append(f"{r['sass_in_loops']['MEMBAR.GPU']} GPU-scope MEMBAR inside loops")
    if v.kernel == "_logprob_grad_kernel" and v.dtype in ("bf16", "fp16"):
        # logprob_grad writes a 16-bit dz over the float32 logits it reads (see the kernel).
        if not r["constexprs"].get("IN_PLACE"):
            out.append("a 16-bit dz written over the float32 logits is not launched with IN_PLACE=True")
        bars = r["cta_barriers"]
        if not bars["in_loops"] or bars["unfenced_stores"]:
            out.append(f"in-place dz: {bars['unfenced_stores']} global stores not ordered after the step's loads by "
                       f"a CTA barrier ({bars['in_loops']} BAR.SYNC in loops): warps would overwrite logits "
                       f"other warps have not read yet")
    if v.kernel == "_lse_forward_kernel":
        assumed = (cfg or gpu_config(*DTYPES[v.dtype])).ctas_per_sm
        if r["ctas_per_sm"] != assumed:
            out.append(f"{r['ctas_per_sm']} programs fit per SM but KernelConfig.ctas_per_sm assumes {assumed}: "
                       f"the split heuristic sizes the grid for the wrong occupancy")
    return out


def run(only: Optional[str] = None, dtypes: Optional[list[str]] = None,
        overrides: Optional[dict[str, int]] = None, variant: Optional[str] = None,
        log=sys.stderr) -> list[dict[str, Any]]:
    """Compile every variant (of kernel ``only``, of ``dtypes``, named ``variant``) with ``overrides``
    on the GPU defaults."""
    records = []
    compiled: dict[str, dict[str, Any]] = {}  # row kernels: specialisation -> its record
    for v in variants(dtypes=dtypes):
        if (only and v.kernel != only) or (variant and v.name != variant):
            continue
        cfg = replace(gpu_config(*DTYPES[v.dtype]), **(overrides or {}))
        launch = build_launch(v, cfg)
        if v.kernel in ROW_KERNELS:
            key = specialisation_key(launch)
            if key in compiled:  # the JIT would reuse that binary: record the choice, compile nothing
                compiled[key]["covers"].append(v.name)
                continue
        r = inspect(launch, v, cfg)
        if v.kernel in ROW_KERNELS:
            compiled[key] = r
        records.append(r)
        flag = "FAIL " + "; ".join(r["violations"]) if r["violations"] else "ok"
        extra = ""
        if "cta_barriers" in r:
            bars = r["cta_barriers"]
            extra = f" BAR.SYNC {bars['in_loops']} in loops, unfenced STG {bars['unfenced_stores']}"
        print(f"{v.kernel} {v.name}: regs {r['registers']} shared {r['shared_bytes']} "
              f"HGMMA {r['sass']['HGMMA']} REDG {r['sass']['REDG']} ATOMG {r['sass']['ATOMG']} "
              f"MEMBAR.GPU {r['sass']['MEMBAR.GPU']}{extra} ({r['compile_s']} s) {flag}", file=log, flush=True)
    return records


@triton.jit
def _acq_rel_probe(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """A deliberately bad kernel for the gate's self-test: a default (acq_rel) atomic in a loop."""
    offs = tl.arange(0, BLOCK)
    for i in range(0, n):
        tl.atomic_add(out_ptr + offs, tl.load(x_ptr + i * BLOCK + offs))


def selftest_record() -> dict[str, Any]:
    """The gate's record for :func:`_acq_rel_probe`; its violations must name the atomic and the fence."""
    x = torch.empty((4096,), dtype=torch.float32, device="meta")
    probe = Launch(_acq_rel_probe, (1,), dict(x_ptr=x, out_ptr=x, n=33, BLOCK=128), dict(num_warps=4))
    return inspect(probe, Variant("_acq_rel_probe", "fp32-ieee"))


def barrier_selftest_record() -> dict[str, Any]:
    """The gate's record for the bf16 in-place gradient launch compiled with ``IN_PLACE=False``
    (no ``tl.debug_barrier``): its violations must name the unfenced stores."""
    v = Variant("_logprob_grad_kernel", "bf16", "none", True, layout="pairs")
    cfg = gpu_config(*DTYPES[v.dtype])
    launch = build_launch(v, cfg)
    return inspect(replace(launch, args=dict(launch.args, IN_PLACE=False)), v, cfg)


#: The fields a reviewer diffs (the compile time is left out: it is not a property of the code).
FACTS = ("options", "constexprs", "registers", "shared_bytes", "local_bytes", "stack_bytes", "ctas_per_sm",
         "sass", "sass_in_loops", "loops", "ptx_ordered_atomics", "violations")
#: Facts only the row kernels' records have.
ROW_FACTS = ("int_args", "divisible_by_16", "covers", "global_access", "cta_barriers")


def facts(r: dict[str, Any]) -> dict[str, Any]:
    """The part of a record that is committed (and compared by the test suite)."""
    return {k: r[k] for k in FACTS + ROW_FACTS if k in r}


def write(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """One JSON per kernel under ``out/triton-<version>/``: ``{variant: facts}``, sorted, indented."""
    by_kernel: dict[str, dict[str, Any]] = {}
    for r in records:
        by_kernel.setdefault(r["kernel"], {})[r["variant"]] = facts(r)
    paths = []
    d = out / f"triton-{triton.__version__}"
    d.mkdir(parents=True, exist_ok=True)
    for kern, recs in by_kernel.items():
        p = d / f"{kern}.json"
        p.write_text(json.dumps(dict(kernel=kern, triton=triton.__version__, target="cuda sm_90", shape=SHAPE,
                                     variants=recs), indent=1, sort_keys=True) + "\n")
        paths.append(p)
    return paths


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write JSON per kernel under OUT/triton-<version>/")
    ap.add_argument("--only", help="one kernel, e.g. _lse_forward_kernel")
    ap.add_argument("--dtype", action="append", choices=list(DTYPES), help="only these dtypes (repeatable)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=INT",
                    help="override a KernelConfig field for every variant (repeatable)")
    ap.add_argument("--variant", help="one configuration by name, e.g. bf16.bias-none.softcap.dh+dw.exact")
    ap.add_argument("--json", action="store_true", help="print all records as one JSON list on stdout")
    ap.add_argument("--selftest", action="store_true",
                    help="also compile two bad probes, which must be caught: an acq_rel atomic in a loop, and "
                         "the in-place bf16 gradient without its barrier (IN_PLACE=False)")
    a = ap.parse_args(argv)
    overrides = {}
    for item in a.set:
        key, _, val = item.partition("=")
        if key not in KernelConfig.__dataclass_fields__ or not val.lstrip("-").isdigit():
            ap.error(f"--set {item!r}: expected FIELD=INT with FIELD one of {sorted(asdict(KernelConfig()))}")
        overrides[key] = int(val)
    records = run(a.only, a.dtype, overrides, a.variant)
    if a.selftest:
        probe = selftest_record()
        print(f"self-test probe (acq_rel atomic in a loop): {'; '.join(probe['violations']) or 'NOT CAUGHT'}",
              file=sys.stderr)
        if not probe["violations"]:
            records.append(dict(probe, violations=["the gate did not catch its own bad probe"]))
        probe = barrier_selftest_record()
        caught = [m for m in probe["violations"] if "CTA barrier" in m]
        print(f"self-test probe (bf16 dz written in place without its barrier): {'; '.join(caught) or 'NOT CAUGHT'}",
              file=sys.stderr)
        if not caught:
            records.append(dict(probe, violations=["the gate did not catch the in-place gradient without its barrier"]))
    if a.out:
        for p in write(records, a.out):
            print(f"wrote {p}", file=sys.stderr)
    if a.json:
        json.dump(records, sys.stdout)
    bad = [r for r in records if r["violations"]]
    print(f"compile gate (triton {triton.__version__}, sm_90): {len(records)} compiled, {len(bad)} violate the rules",
          file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
