"""What the one call runs, in which order, and how long each step is predicted to take.

:func:`settings` holds the shapes, impls and timings of every step group (the GPU's, or the dry
run's tiny ones); the ``predict_*`` functions give each step's wall time before it starts, from the
cost model (``benchmarks/cost_model.py``, H100 times x :data:`SAFETY`) plus the fixed costs in
``fixed_costs.json`` (compilation, first calls, model builds, the pytest run, the machine's start).
Those start as guesses; every step row records what it measured of them (``check_s``: the first
call, compilation included; ``wall_s``), and ``python -m benchmarks.campaign --calibrate
campaign.json`` writes the measured ones back into ``fixed_costs.json`` so the next plan uses them.

``python -m benchmarks.campaign --plan`` prints the GPU plan: every step, its predicted seconds, the
call's total and the device time it spends (machine start included), which must stay within
:data:`DEVICE_BUDGET_S`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .. import cases as C
from .. import cost_model as CM

FIXED_COSTS = Path(__file__).resolve().with_name("fixed_costs.json")
#: The order of the step groups: most decisive first, so a call cut anywhere keeps the most.
GROUPS = ("env", "exact", "head", "memory", "train", "sweep")
#: Device time a session has in all (machine start, every call, idle time); the plan keeps 2
#: minutes of it for a short second call or a give-back.
DEVICE_BUDGET_S = 13 * 60.0
SECOND_CALL_S = 180.0
#: The cost model assumes every GEMM at the one best cuBLAS rate: step predictions use x SAFETY.
SAFETY = 1.5
#: float64 matmul rate assumed for the reference (H100 DGEMM on tensor cores).
FP64_TFLOPS = 50.0
#: Bandwidth of the error comparisons against the float64 reference (dW and dH, chunked).
COMPARE_GBPS = 5.0
#: eager holds about this many bytes per logit in forward+backward, by softcap (NOTES.md).
EAGER_BYTES_PER_LOGIT = {True: 30, False: 22}

#: (name, backend, schedule, extra simpo_loss keywords) of the exactness step.
EXACT_IMPLS = (
    ("eager", "eager", "auto", {}),
    ("torch-tokens", "torch", "tokens", {}),
    ("torch-pairs", "torch", "pairs", {}),
    ("torch-vocab", "torch", "vocab", {}),
    ("triton", "triton", "auto", {}),
    ("triton-pairs", "triton", "pairs", {}),
    ("triton-vocab", "triton", "vocab", {}),
    ("triton-fused", "triton", "fused", {}),
    ("triton-fused-filter", "triton", "fused", {"grad_filter": True}),
)
#: the cost model's impl for each name used in the plan
MODEL_IMPL = {"eager": "eager", "torch-tokens": "torch", "torch-pairs": "triton-pairs",
              "torch-vocab": "triton-vocab", "triton-fused-filter": "triton-fused",
              "pairs": "triton-pairs", "vocab": "triton-vocab", "fused": "triton-fused"}
#: impls that apply no softcap (their rows are checked against a no-softcap reference)
NO_SOFTCAP_IMPLS = ("liger", "torch-lce")
HEAD_IMPLS = ("triton", "triton-pairs", "triton-vocab", "triton-fused", "eager", "liger", "cce", "cce-nofilter",
              "torch-lce")
#: At N=32768 and 65536 the question is memory: our schedules and the peers' exact paths (eager
#: cannot fit its full logits there: skipped by prediction, stated in its row).
MEMORY_IMPLS = ("triton-pairs", "triton-vocab", "triton-fused", "cce-nofilter", "liger", "torch-lce", "eager")
#: DPO (precomputed reference) at the 9B head: ours as ``auto`` picks it, the official logits path,
#: and the per-token peers with a DPO head (CCE exact; PyTorch's, no softcap). Each schedule and
#: CCE's filtered default are measured on SimPO already: the cost model says every paired loss
#: costs the same, and these rows are there to check it, so they stay few.
DPO_IMPLS = ("triton", "eager", "cce-nofilter", "torch-lce")
#: The reference precompute pass (``sequence_logps``, forward only) beside the DPO rows, on the
#: same inputs: ours, the full-logits way (``model(...).logits``, what TRL's precompute does), CCE's
#: forward summed per row.
PRECOMPUTE_IMPLS = ("triton", "eager", "cce")

#: Per schedule: candidate groups; each group is tuned on ``metric`` given the winners before it.
SWEEP = {
    "fused": (
        ("fwd_ms", [{"block_v": 64}, {"block_n": 64}, {"num_stages": 4}, {"group_n": 8}, {"group_n": 32}]),
        ("fwd_bwd_ms", [{"bwd_block_v": 64}, {"bwd_block_n": 128, "bwd_block_v": 64}, {"bwd_num_stages": 2},
                        {"bwd_group_n": 8}, {"bwd_group_n": 32}, {"atomic_sem": "acq_rel"}]),
    ),
    "pairs": (("fwd_bwd_ms", [{"logits_block_v": 2048, "logits_num_warps": 4}, {"logits_block_v": 2048},
                             {"logits_num_warps": 4}, {"logits_num_warps": 16}, {"logits_block_v": 8192},
                             {"logits_block_v": 8192, "logits_num_warps": 16}]),),
}
SWEEP["vocab"] = SWEEP["pairs"]
DRY_SWEEP = {
    "fused": (("fwd_ms", [{"block_v": 64}]), ("fwd_bwd_ms", [{"bwd_block_n": 32}])),
    "pairs": (("fwd_bwd_ms", [{"logits_block_v": 128}]),),
}


@dataclass(frozen=True)
class Settings:
    """Every step group's shapes, impls and timings (:func:`settings`)."""

    dry_run: bool
    dtype: torch.dtype
    gemms: tuple                      # (name, M, N, K, out dtype: "same" | "float32")
    exact_cases: tuple                # (family, tokens): small first, then the target head
    head_cases: tuple                 # (family, tokens) with the impls of each
    dpo_cases: tuple                  # (family, tokens) of -dpo families: DPO rows, then precompute rows
    memory_cases: tuple
    timing: dict                      # benchmarks.measure.time_fn repetitions
    memory_timing: dict
    train: dict                       # the Gemma-2-2B-shaped step
    sweep_case: tuple
    sweep: dict
    pytest_timeout_s: float
    head_impls: tuple = HEAD_IMPLS
    dpo_impls: tuple = DPO_IMPLS
    precompute_impls: tuple = PRECOMPUTE_IMPLS
    memory_impls: tuple = MEMORY_IMPLS
    exact_impls: tuple = field(default=tuple(n for n, *_ in EXACT_IMPLS))


def settings(dry_run: bool) -> Settings:
    if dry_run:  # the same code on CPU at tiny shapes; the Triton kernels interpreted (float32)
        return Settings(
            dry_run=True, dtype=torch.float32,
            gemms=(("square", 256, 256, 256, "same"), ("logits", 64, 300, 40, "same"),
                   ("logits-f32out", 64, 300, 40, "float32")),
            exact_cases=(("cpu-interp-tiny", 32), ("cpu-interp", 64)),
            head_cases=(("cpu-small-full", 256), ("cpu-small-uf", 256), ("cpu-interp-tiny", 32)),
            dpo_cases=(("cpu-small-dpo", 256), ("cpu-interp-tiny-dpo", 32)),
            memory_cases=(("cpu-small", 256),),
            timing={"target_s": 0.0, "min_reps": 1, "max_reps": 1},
            memory_timing={"target_s": 0.0, "min_reps": 1, "max_reps": 1},
            train={"tiny": True, "dtype": torch.float32, "vocab": 256, "pairs": 1, "seq": 16, "steps": 1,
                   "paths": ("eager", "triton")},
            sweep_case=("cpu-interp", 64), sweep=DRY_SWEEP, pytest_timeout_s=300.0)
    fam = C.FAMILIES["gemma2-9b"]
    N, H, V = 8192, fam.hidden, fam.vocab
    return Settings(
        dry_run=False, dtype=torch.bfloat16,
        gemms=(("square", 8192, 8192, 8192, "same"), ("logits", N, V, H, "same"),
               ("logits-f32out", N, V, H, "float32"), ("dH", N, H, V, "same"), ("dW", V, H, N, "same")),
        exact_cases=(("cpu-small", 256), ("gemma2-9b", N)),
        head_cases=(("gemma2-9b-full", N), ("gemma2-9b-uf", N)),
        dpo_cases=(("gemma2-9b-uf-dpo", N),),
        memory_cases=(("gemma2-9b", 32768), ("gemma2-9b", 65536)),
        timing={"target_s": 0.3, "min_reps": 3, "max_reps": 20},
        memory_timing={"target_s": 0.0, "min_reps": 1, "max_reps": 1},
        train={"tiny": False, "dtype": torch.bfloat16, "vocab": None, "pairs": 2, "seq": 2048, "steps": 3,
               "paths": ("eager", "triton")},
        sweep_case=("gemma2-9b", N), sweep=SWEEP, pytest_timeout_s=240.0)


def case_of(family: str, tokens: int) -> C.Case:
    return C.make_case(C.FAMILIES[family], tokens)


@functools.lru_cache(maxsize=None)
def target_frac(case: C.Case, seed: int = 0) -> float:
    """The fraction of ``case``'s positions that are targets (its labels, made once on the CPU)."""
    return CM.target_fraction(C.make_labels(case, seed), C.IGNORE_INDEX)


def impls_at(family: str, impls) -> list[str]:
    """``impls`` that ``family`` is meant for (a CPU family lists its own), in order."""
    fam = C.FAMILIES[family]
    return [i for i in impls if i in fam.impls]


# --------------------------------------------------------------------------------------- fixed costs


def load_fixed(path: Path = FIXED_COSTS) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def calibrate(result: dict, path: Path = FIXED_COSTS) -> dict[str, Any]:
    """Replace the fixed costs in ``path`` by those a GPU run measured (``result``: its
    ``campaign.json``); what it did not measure keeps its value. Returns the new table."""
    if result.get("dry_run"):
        raise ValueError("a dry run measures CPU times: it never calibrates the GPU plan")
    fixed = load_fixed(path)
    measured: list[str] = []
    seen: set[str] = set()
    for r in result.get("steps", []):
        if r.get("status") != "ok":
            continue
        kind, impl = r.get("kind"), r.get("impl")
        if kind in ("exact", "case") and impl and r.get("check_s") is not None:
            key = "first_call_s" if impl not in seen else "new_shape_s"
            if impl not in seen or r.get("new_shape"):
                fixed[key][impl] = round(r["check_s"], 2)
                measured.append(f"{key}.{impl}")
            seen.add(impl)
        elif kind == "precompute" and impl and r.get("check_s") is not None and f"precompute-{impl}" not in seen:
            fixed["first_call_s"][f"precompute-{impl}"] = round(r["check_s"], 2)
            measured.append(f"first_call_s.precompute-{impl}")
            seen.add(f"precompute-{impl}")
        elif kind == "pytest":
            fixed["pytest_cuda_s"] = round(r["wall_s"], 1)
            measured.append("pytest_cuda_s")
        elif kind == "train-build":
            fixed["train_build_s"] = round(r["wall_s"], 1)
            measured.append("train_build_s")
        elif kind == "train" and r.get("warmup_ms") is not None:
            backend = r["path"].split("-")[0]
            fixed["train_first_step_s"][backend] = round(r["warmup_ms"] / 1e3, 1)
            measured.append(f"train_first_step_s.{backend}")
        elif kind == "reference" and r.get("fixed_s") is not None:
            fixed["reference_fixed_s"] = round(r["fixed_s"], 1)
            measured.append("reference_fixed_s")
    if result.get("startup_s") is not None:
        fixed["startup_s"] = round(result["startup_s"], 1)
        measured.append("startup_s")
    env = result.get("env") or {}
    fixed["source"] = (f"measured on {env.get('device')} ({result.get('date')}, commit {env.get('commit')}): "
                       + ", ".join(measured) + "; the rest are guesses")
    fixed["device"] = env.get("device")
    Path(path).write_text(json.dumps(fixed, indent=1) + "\n")
    return fixed


# --------------------------------------------------------------------------------------- predictions


def gemm_seconds(m: int, n: int, k: int, tflops: float = 700.0) -> float:
    """A GEMM step: set-up, 2 warm-ups and 5 to 50 repetitions (0.3 s worth)."""
    t = 2.0 * m * n * k / (tflops * 1e12)
    return 1.0 + (2 + min(50, max(5, 0.3 / t))) * t


def reference_seconds(case: C.Case, target_frac: float, fixed: dict) -> float:
    """The float64 reference on the GPU: ~8 N H V float64 FLOPs on the target rows, plus set-up (a
    case with a reference, DPO, makes its reference values from the first 2 N H V of them, the sums
    pass the reference then reuses)."""
    return fixed["reference_fixed_s"] + 8.0 * target_frac * case.tokens * case.hidden * case.vocab / (
        FP64_TFLOPS * 1e12)


def predicted_ms(case: C.Case, target_frac: float, name: str, rate: Optional[float] = None,
                 kernel_options: Optional[dict] = None, precompute: bool = False) -> Optional[float]:
    """The cost model's fwd+bwd milliseconds of impl or schedule ``name`` at ``case``, at the case's
    loss (``precompute``: the precompute pass's forward milliseconds); None if it has no model."""
    impl = MODEL_IMPL.get(name, C.cost_backend(name))
    if impl not in CM.BACKENDS:
        return None
    try:
        kernel_config = None
        if kernel_options and impl == "triton-fused":
            from dataclasses import replace

            from simpo_kernels.kernels.launch import KernelConfig

            known = {k: v for k, v in kernel_options.items() if hasattr(KernelConfig(), k)}
            kernel_config = replace(KernelConfig(), **known)
        row = {"impl": impl, "family": case.family, "tokens": case.tokens, "rows": case.rows, "seq": case.seq,
               "hidden": case.hidden, "vocab": case.vocab, "softcap": case.softcap, "dtype": case.dtype,
               "loss": "precompute" if precompute else case.loss}
        pred = CM.prediction_fields(row, target_frac, matmul_tflops=rate, kernel_config=kernel_config)
        return pred["pred_fwd_ms" if precompute else "pred_fwd_bwd_ms"]
    except Exception:  # noqa: BLE001 - a prediction never costs a measurement
        return None


def shape_key(case: C.Case) -> tuple:
    return (case.hidden, case.vocab, case.softcap, case.dtype, case.seq)


def first_call_seconds(impl: str, case: C.Case, seen: set, fixed: dict) -> tuple[float, bool]:
    """(the seconds of ``impl``'s first call at ``case`` beyond its compute, whether it is a new
    shape for it) given the ``(impl, shape)`` pairs ``seen`` before in this process."""
    if impl not in seen:
        return fixed["first_call_s"].get(impl, 10.0), True
    if (impl, shape_key(case)) not in seen:
        return fixed["new_shape_s"].get(impl, fixed["later_call_s"]), True
    return fixed["later_call_s"], False


def mark_seen(seen: set, impl: str, case: C.Case) -> None:
    seen.update((impl, (impl, shape_key(case))))


def _reps(ms: float, timing: dict) -> int:
    return int(min(timing["max_reps"], max(timing["min_reps"], timing["target_s"] * 1e3 / max(ms, 1e-3))))


def calls_seconds(case: C.Case, pred_ms: Optional[float], timing: Optional[dict]) -> float:
    """The check's call and its comparisons with the reference, then (``timing``; None: check
    only) a warm-up, repetitions and a memory call each for forward and forward+backward, at
    ``pred_ms`` (the cost model's fwd+bwd) x :data:`SAFETY`; forward alone is ~1/3 of it."""
    ms = (pred_ms or 0.0) * SAFETY
    calls = 1 + ((3 + _reps(ms, timing)) * 1.35 if timing else 0)
    compare = (case.vocab * case.hidden + case.tokens * case.hidden) * 4 / (COMPARE_GBPS * 1e9)
    return calls * ms / 1e3 + compare


def impl_seconds(case: C.Case, impl: str, target_frac: float, rate: Optional[float], seen: set, fixed: dict,
                 timing: Optional[dict]) -> float:
    """One impl's step: its first call's fixed cost (compilation), :func:`calls_seconds`, and for a
    peer without softcap at a softcap case its own reference the first time."""
    over, _ = first_call_seconds(impl, case, seen, fixed)
    extra_ref = 0.0
    if impl in NO_SOFTCAP_IMPLS and case.softcap is not None and ("nocap-ref", case.id) not in seen:
        extra_ref = reference_seconds(case, target_frac, fixed)
    return over + calls_seconds(case, predicted_ms(case, target_frac, impl, rate), timing) + extra_ref


def precompute_seconds(case: C.Case, impl: str, target_frac: float, rate: Optional[float], seen: set, fixed: dict,
                       timing: Optional[dict]) -> float:
    """One precompute row: its first call's fixed cost (``first_call_s["precompute-<impl>"]``), the
    check's call, then (``timing``) a warm-up, the repetitions and a memory call, each a forward at
    the cost model's ms x :data:`SAFETY` (the comparison is of ``[2B]`` sums: nothing)."""
    key = f"precompute-{impl}"
    over = fixed["first_call_s"].get(key, 5.0) if key not in seen else fixed["later_call_s"]
    ms = (predicted_ms(case, target_frac, impl, rate, precompute=True) or 0.0) * SAFETY
    calls = 1 + ((3 + _reps(ms, timing)) * 1.35 if timing else 0)
    return over + calls * ms / 1e3


def predicted_oom(impl: str, case: C.Case, free_bytes: Optional[float]) -> Optional[str]:
    """A skip reason where ``impl`` cannot fit ``free_bytes`` (eager's full logits; None: run it)."""
    if impl != "eager" or free_bytes is None:
        return None
    need = float(case.tokens) * case.vocab * EAGER_BYTES_PER_LOGIT[case.softcap is not None]
    return f"predicted OOM ({need / 1e9:.0f} GB > {free_bytes / 1e9:.0f} GB free)" if need > free_bytes else None


def train_step_seconds(cfg, pairs: int, seq: int, tflops: float = 450.0) -> float:
    """One training step of the Gemma-2-2B-shaped model (a prediction): the decoder's matmuls at
    ``8 * body * tokens`` (forward, the forward recomputed by gradient checkpointing, backward),
    the head's ``6 V H tokens``, eager attention ``16 L rows T^2 heads head_dim``, AdamW's 7
    accesses of 2-byte params, grads and moments at 2 TB/s."""
    H, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    body = L * (H * (q + 2 * kv) + q * H + 3 * H * I)
    tokens = 2 * pairs * seq
    attn = 16 * L * 2 * pairs * seq ** 2 * cfg.num_attention_heads * cfg.head_dim
    flops = 8 * body * tokens + 6 * V * H * tokens + attn
    return flops / (tflops * 1e12) + (body + V * H) * 2 * 7 / 2.0e12 + 0.05


def train_path_seconds(path: str, cfg, s: dict, fixed: dict) -> float:
    backend = path.split("-")[0]
    return fixed["train_first_step_s"].get(backend, 40.0) + s["steps"] * train_step_seconds(cfg, s["pairs"], s["seq"])


def sweep_config_seconds(case: C.Case, target_frac: float, schedule: str, options: dict, rate, fixed: dict,
                         timing: dict) -> float:
    return fixed["sweep_compile_s"].get(schedule, 5.0) + calls_seconds(
        case, predicted_ms(case, target_frac, schedule, rate, options), timing)


# --------------------------------------------------------------------------------------- the plan


def predict_plan(s: Optional[Settings] = None, fixed: Optional[dict] = None, rate: Optional[float] = None,
                 memory_bytes: float = 80e9) -> list[tuple[str, str, float]]:
    """``[(group, step, predicted seconds), ...]`` of the GPU call in run order (``rate``: the bf16
    matmul rate; None: the H100 default; ``memory_bytes``: eager is skipped above it)."""
    s = s or settings(False)
    fixed = fixed or load_fixed()
    steps: list[tuple[str, str, float]] = [("env", "environment, nvidia-smi", 2.0), ("env", "copy 2 GiB", 2.0)]
    steps += [("env", f"gemm {name} {m}x{n}x{k}", gemm_seconds(m, n, k)) for name, m, n, k, _ in s.gemms]
    seen: set = set()

    def case_steps(group: str, cases, impls, timing, precompute=()) -> None:
        for family, tokens in cases:
            case = case_of(family, tokens)
            frac = target_frac(case)
            steps.append((group, f"{case.id} inputs + float64 reference", 1.0 + reference_seconds(case, frac, fixed)))
            for impl in impls_at(family, impls):
                if predicted_oom(impl, case, memory_bytes):
                    continue
                steps.append((group, f"{case.id} {impl}", impl_seconds(case, impl, frac, rate, seen, fixed, timing)))
                mark_seen(seen, impl, case)
                if impl in NO_SOFTCAP_IMPLS:
                    seen.add(("nocap-ref", case.id))
            for impl in impls_at(family, precompute):
                steps.append((group, f"{case.id} precompute {impl}",
                              precompute_seconds(case, impl, frac, rate, seen, fixed, timing)))
                seen.add(f"precompute-{impl}")

    for family, tokens in s.exact_cases:  # the exactness step checks every EXACT_IMPLS name
        case = case_of(family, tokens)
        frac = target_frac(case)
        steps.append(("exact", f"{case.id} inputs + float64 reference", 1.0 + reference_seconds(case, frac, fixed)))
        for name in s.exact_impls:
            steps.append(("exact", f"{case.id} {name} check", impl_seconds(case, name, frac, rate, seen, fixed, None)))
            mark_seen(seen, name, case)
    # pytest runs beside the checks: only what outlasts them counts
    exact_s = sum(p for g, _, p in steps if g == "exact")
    steps.append(("exact", "pytest tests/test_triton_cuda.py (beside the checks)",
                  max(0.0, fixed["pytest_cuda_s"] - exact_s)))
    case_steps("head", s.head_cases, s.head_impls, s.timing)
    case_steps("head", s.dpo_cases, s.dpo_impls, s.timing, s.precompute_impls)
    case_steps("memory", s.memory_cases, s.memory_impls, s.memory_timing)
    from .. import e2e as E

    cfg = E.gemma2_2b_config(False)
    for path in s.train["paths"]:
        steps.append(("train", f"build {path}", fixed["train_build_s"]))
        steps.append(("train", f"step {path}", train_path_seconds(path, cfg, s.train, fixed)))
    case = case_of(*s.sweep_case)
    frac = target_frac(case)
    steps.append(("sweep", f"{case.id} inputs + float64 reference", 1.0 + reference_seconds(case, frac, fixed)))
    for schedule, groups in s.sweep.items():
        for options in [{}] + [c for _, cands in groups for c in cands]:
            steps.append(("sweep", f"{schedule} {options or 'defaults'}",
                          sweep_config_seconds(case, frac, schedule, options, rate, fixed, s.timing)))
    return steps


def device_seconds(call_s: float, fixed: Optional[dict] = None) -> float:
    """Device time of one call of ``call_s`` seconds: the machine's start, the call, the idle
    wait before the machine goes back (or a give-back)."""
    fixed = fixed or load_fixed()
    return fixed["machine_start_s"] + call_s + fixed["idle_release_s"]


def plan_summary(limit_s: float, margin_s: float, fixed: Optional[dict] = None) -> dict[str, Any]:
    """Per group the GPU plan's predicted seconds, what the call spends and the device time."""
    fixed = fixed or load_fixed()
    steps = predict_plan(fixed=fixed)
    groups = {g: round(sum(p for grp, _, p in steps if grp == g), 1) for g in GROUPS}
    before_sweep = sum(v for g, v in groups.items() if g != "sweep")
    call_s = min(limit_s, fixed["startup_s"] + sum(groups.values()))
    return {"fixed_costs": fixed["source"], "safety": SAFETY, "steps": {g: sum(1 for s in steps if s[0] == g)
                                                                          for g in GROUPS},
            "predicted_s": groups, "startup_s": fixed["startup_s"], "before_sweep_s": round(before_sweep, 1),
            "usable_s": limit_s - margin_s - fixed["startup_s"], "call_s": round(call_s, 1),
            "device_s": round(device_seconds(call_s, fixed), 1), "machine_start_s": fixed["machine_start_s"],
            "idle_release_s": fixed["idle_release_s"], "limit_s": limit_s, "margin_s": margin_s}


def plan_text(limit_s: float, margin_s: float) -> str:
    """The GPU plan as text: per group its predicted seconds, what fits the call, the device time."""
    p = plan_summary(limit_s, margin_s)
    lines = [f"GPU plan (predictions, not measurements; fixed costs: {p['fixed_costs']})", "",
             "| group | steps | predicted s | cumulative s |", "|---|---|---|---|"]
    cum = 0.0
    for g in GROUPS:
        cum += p["predicted_s"][g]
        lines.append(f"| {g} | {p['steps'][g]} | {p['predicted_s'][g]:.0f} | {cum:.0f} |")
    lines += ["",
              f"startup (wheels, imports) {p['startup_s']:.0f} s; groups env..train {p['before_sweep_s']:.0f} s "
              f"of {p['usable_s']:.0f} s usable (limit {limit_s:.0f} s, margin {margin_s:.0f} s); the sweep fills "
              f"what is left ({p['predicted_s']['sweep']:.0f} s in full).",
              f"predicted device time: start {p['machine_start_s']:.0f} s + call {p['call_s']:.0f} s + idle "
              f"{p['idle_release_s']:.0f} s = {p['device_s']:.0f} s ({p['device_s'] / 60:.1f} min) of the "
              f"{DEVICE_BUDGET_S / 60:.0f} min the plan allows; an optional second call of at most "
              f"{SECOND_CALL_S:.0f} s fits only if the first ends early."]
    return "\n".join(lines)
