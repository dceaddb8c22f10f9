"""The compile gate (``benchmarks/compile_gate.py``): every Triton kernel at every configuration its
launcher can choose compiles for sm_90 without spills, within shared memory, with wgmma, without
ordered atomics or GPU-scope fences in loops, with a CTA barrier between the loads and the stores of
the in-place 16-bit gradient row kernel, with the Triton CI installs and with triton 3.6 (the
GPU image's); the committed JSON under ``benchmarks/results/compile/`` is what the code compiles to;
and the gate fails on deliberately bad configurations.

The gate runs in subprocesses: the test session interprets the kernels (``TRITON_INTERPRET=1``),
and interpreted kernels cannot be compiled. Triton 3.6 is installed once with
``pip install --target`` into a cache directory (``SIMPO_TRITON36_DIR``, default
``~/.cache/simpo-kernels/triton-3.6.0-py<version>``) and put first on ``PYTHONPATH``; it needs no
GPU and no CUDA toolkit (ptxas and cuobjdump ship in the wheel).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results" / "compile"
GPU_IMAGE_TRITON = "3.6.0"
# fwd, bwd, given-logits bwd, bf16 fwd/bwd at odd token counts, then the row kernels: one record
# per distinct JIT specialisation of their ROW_LAYOUTS and, for row statistics, of given logits
# (the rest are listed under `covers`: float32 given logits compile as the float32 `pairs` chunk)
N_VARIANTS = 16 + 144 + 3 + 4 + 36 + 30 + 32
# How long a gate subprocess may run. The gate prints one line per compiled variant: on a 2-core
# machine shared with other test runs (load 3-6) one full gate took 535 s wall (274 s CPU), this
# whole file (both gates at once) 666 s, and no variant more than 9 s. A gate silent for STALL_S
# is therefore hung, not slow (a 100x margin, which load does not eat: the limit is on silence,
# not on the total); LIMIT_S only bounds a gate that keeps printing without end (25x the whole
# gate). Either way its process group is killed and the tests that need it fail with the
# command, the limit and the tail of its output.
STALL_S = 900
LIMIT_S = 4 * 3600


def triton36_dir() -> Path:
    """A directory holding triton 3.6.0, installed on first use."""
    default = Path.home() / ".cache" / "simpo-kernels" / f"triton-{GPU_IMAGE_TRITON}-py{sys.version_info[0]}{sys.version_info[1]}"
    d = Path(os.environ.get("SIMPO_TRITON36_DIR", default))
    if not (d / "triton" / "__init__.py").exists():
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError:  # no writable home: a per-user directory under the temp dir
            d = Path(tempfile.gettempdir()) / f"simpo-kernels-{os.getuid()}" / default.name
            d.mkdir(parents=True, exist_ok=True)
    if not (d / "triton" / "__init__.py").exists():
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                               "--target", str(d), f"triton=={GPU_IMAGE_TRITON}"], capture_output=True, text=True)
        if proc.returncode:
            pytest.fail(f"could not install triton {GPU_IMAGE_TRITON} into {d} (set SIMPO_TRITON36_DIR to a "
                        f"directory that holds it):\n{proc.stderr[-2000:]}")
    return d


def gate_env(extra_path: Path | None = None, interpret: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when unset; 1 is its default
    paths = ([str(extra_path)] if extra_path else []) + [str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


@dataclass
class Run:
    """What a finished (or killed) subprocess left: ``failure`` says why there is no result."""

    rc: int | None
    records: list[dict]
    err: str
    failure: str | None = None


@dataclass
class Child:
    """A subprocess in its own process group (so that a timeout can kill it and every compiler it
    started), whose stdout and stderr are read as they come: no pipe fills up while another child
    is waited for, and each line it prints shows it is alive."""

    cmd: list[str]
    env: dict[str, str]
    proc: subprocess.Popen = field(init=False)
    out: list[str] = field(default_factory=list, init=False)
    err: list[str] = field(default_factory=list, init=False)
    last_output: float = field(default_factory=time.monotonic, init=False)

    def __post_init__(self):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.readers = [threading.Thread(target=self._read, args=(stream, sink), daemon=True)
                        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.readers:
            t.start()

    def _read(self, stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)
            self.last_output = time.monotonic()

    def kill(self) -> None:
        """SIGKILL the whole process group (the child and anything it started), then reap it."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def wait(self, stall_s: float = STALL_S, limit_s: float = LIMIT_S) -> tuple[int | None, str]:
        """Wait for the child; kill its process group once it has printed nothing for ``stall_s``
        or run for ``limit_s``. Returns (exit status, why it was killed or None)."""
        why = None
        try:
            while why is None:
                try:
                    self.proc.wait(timeout=1)
                    break
                except subprocess.TimeoutExpired:
                    now = time.monotonic()
                    if now - self.last_output > stall_s:
                        why = f"printed nothing for {stall_s:g} s (limit STALL_S)"
                    elif now - self.started > limit_s:
                        why = f"still running after {limit_s:g} s (limit LIMIT_S)"
        finally:
            if self.proc.poll() is None:  # timed out, or the wait itself was interrupted
                self.kill()
        for t in self.readers:
            t.join(timeout=60)
        return self.proc.returncode, why

    def failure(self, why: str) -> str:
        tail = "".join(self.err)[-3000:] or "".join(self.out)[-3000:]
        return (f"`{' '.join(self.cmd)}` {why}: killed its process group (pid {self.proc.pid}); "
                f"last output:\n{tail}")


def gate(args: list[str], extra_path: Path | None = None) -> Child:
    return Child([sys.executable, "-m", "benchmarks.compile_gate", "--json", *args], gate_env(extra_path))


def finish(child: Child, **limits: float) -> Run:
    """The gate's exit status, its JSON records and its stderr; a run that timed out or printed
    no JSON is a Run with ``failure`` set (:func:`completed` turns it into the test's failure)."""
    rc, why = child.wait(**limits)
    out, err = "".join(child.out), "".join(child.err)
    if why is not None:
        return Run(rc, [], err, child.failure(why))
    try:
        records = json.loads(out) if out.strip() else []
    except json.JSONDecodeError:
        return Run(rc, [], err, f"compile gate printed no JSON (exit {rc}):\n{err[-4000:]}")
    return Run(rc, records, err)


def completed(run: Run) -> tuple[int, list[dict], str]:
    """``(exit status, records, stderr)`` of a gate run; a run without a result fails the test
    that needs it (a failure with the reason, not an error in a fixture's setup)."""
    if run.failure is not None:
        pytest.fail(run.failure, pytrace=False)
    return run.rc, run.records, run.err


@pytest.fixture(scope="session")
def gate_runs() -> dict[str, Run]:
    """The full gate with CI's Triton and with triton 3.6, run at the same time (one per core)."""
    children = {"ci": gate([])}
    try:
        children["3.6"] = gate([], triton36_dir())
        return {name: finish(c) for name, c in children.items()}
    finally:  # an error or an interrupt here must not leave a gate running
        for c in children.values():
            if c.proc.poll() is None:
                c.kill()


@pytest.mark.parametrize("which", ["ci", "3.6"])
def test_every_kernel_config_passes_the_gate(gate_runs, which):
    rc, records, err = completed(gate_runs[which])
    assert len(records) == N_VARIANTS, err[-3000:]
    if which == "3.6":
        assert {r["triton"] for r in records} == {GPU_IMAGE_TRITON}
    bad = [f"{r['kernel']} {r['variant']}: {'; '.join(r['violations'])}" for r in records if r["violations"]]
    assert not bad, "compile gate violations:\n" + "\n".join(bad)
    assert rc == 0, err[-3000:]


@pytest.mark.parametrize("which", ["ci", "3.6"])
def test_gate_covers_every_launcher_choice(gate_runs, which):
    """Each flag the kernels' heuristics derive takes both values, and each dtype is compiled."""
    records = completed(gate_runs[which])[1]
    for kernel, flags in {"_lse_forward_kernel": ("HAS_BIAS", "HAS_SOFTCAP"),
                          "_logprob_backward_kernel": ("HAS_BIAS", "HAS_SOFTCAP", "COMPUTE_DH", "COMPUTE_DW",
                                                       "COMPUTE_DB", "FILTER")}.items():
        recs = [r for r in records if r["kernel"] == kernel]
        for flag in flags:
            assert {r["constexprs"][flag] for r in recs} == {True, False}, (kernel, flag)
        assert {r["constexprs"]["INPUT_PRECISION"] for r in recs} == {None, "tf32", "ieee"}
        assert {r["variant"].split(".")[0] for r in recs} == {"bf16", "fp16", "fp32-tf32", "fp32-ieee"}
    # relaxed reductions, not ordered atomics, in every backward that accumulates
    for r in records:
        if r["kernel"] == "_logprob_backward_kernel":
            assert r["sass"]["REDG"] > 0 and r["sass"]["ATOMG"] == 0 and r["sass"]["CCTL"] == 0, r["variant"]
    # The row kernels: every flag both ways, every layout and dtype compiled or covered by an
    # identical specialisation, and the 16-bit gradient in place behind a barrier in its loop.
    from benchmarks.compile_gate import LOGITS_LAYOUT, ROW_LAYOUTS

    for kernel, flags in {"_row_stats_kernel": ("HAS_BIAS", "HAS_SOFTCAP"),
                          "_logprob_grad_kernel": ("HAS_BIAS", "HAS_SOFTCAP", "IN_PLACE")}.items():
        recs = [r for r in records if r["kernel"] == kernel]
        for flag in flags:
            assert {r["constexprs"][flag] for r in recs} == {True, False}, (kernel, flag)
        names = {r["variant"] for r in recs} | {c for r in recs for c in r["covers"]}
        # row statistics also run on given logits (simpo_loss_from_logits)
        extra = {LOGITS_LAYOUT} if kernel == "_row_stats_kernel" else set()
        assert {n.split(".")[-1] for n in names} == set(ROW_LAYOUTS) | extra, kernel
        assert {n.split(".")[0] for n in names} == {"bf16", "fp16", "fp32-ieee"}, kernel
        assert all(r["ptx_ordered_atomics"] == 0 and r["sass"]["ATOMG"] == 0 for r in recs), kernel
    for r in records:
        if r["kernel"] == "_logprob_grad_kernel":
            in_place = r["variant"].split(".")[0] in ("bf16", "fp16")
            assert r["constexprs"]["IN_PLACE"] == in_place, r["variant"]
            if in_place:
                assert r["cta_barriers"]["in_loops"] >= 1 and r["cta_barriers"]["unfenced_stores"] == 0, r


@pytest.mark.parametrize("which", ["ci", "3.6"])
def test_committed_json_is_what_the_code_compiles_to(gate_runs, which):
    """The JSON under benchmarks/results/compile/ is current: a kernel or config change must come
    with its regenerated JSON (``python -m benchmarks.compile_gate --out benchmarks/results/compile``
    under each Triton), so review sees the compiled effect as a diff."""
    from benchmarks.compile_gate import facts

    records = completed(gate_runs[which])[1]
    version = records[0]["triton"]
    d = COMMITTED / f"triton-{version}"
    if not d.is_dir():
        assert which == "ci" and version != GPU_IMAGE_TRITON, f"{d} is missing"
        print(f"\nNOTE: no committed compile JSON for triton {version} (CI resolved a new release); "
              f"the gate's rules above still ran. Add it with: python -m benchmarks.compile_gate --out {COMMITTED}")
        return
    stale = []
    for r in records:
        path = d / f"{r['kernel']}.json"
        committed = json.loads(path.read_text())["variants"].get(r["variant"]) if path.exists() else None
        fresh = json.loads(json.dumps(facts(r)))
        if committed != fresh:
            keys = sorted(set(fresh) | set(committed or {}))
            diff = {k: (committed or {}).get(k, "<missing>") for k in keys if (committed or {}).get(k) != fresh.get(k)}
            stale.append(f"{r['kernel']} {r['variant']}: committed {diff} vs fresh { {k: fresh.get(k) for k in diff} }")
    assert not stale, (f"{len(stale)} stale records in {d}; regenerate with "
                       f"python -m benchmarks.compile_gate --out {COMMITTED}\n" + "\n".join(stale[:10]))


BAD_CONFIGS = [
    # a 64x256 backward tile with 3 stages needs 248 KB of shared memory: it would fail at launch
    (["--only", "_logprob_backward_kernel", "--variant", "bf16.bias-none.softcap.dh+dw.exact",
      "--set", "bwd_block_v=256"], "shared memory"),
    # a 128x256 forward tile runs out of registers
    (["--only", "_lse_forward_kernel", "--variant", "bf16.bias-none.softcap", "--set", "block_v=256"], "spills"),
    # the split heuristic told that 2 programs fit per SM when 1 does
    (["--only", "_lse_forward_kernel", "--variant", "bf16.bias-none.nocap", "--set", "ctas_per_sm=2"],
     "programs fit per SM"),
]


@pytest.mark.parametrize("args,expected", BAD_CONFIGS, ids=["bwd-shared", "fwd-spills", "fwd-occupancy"])
def test_gate_fails_a_bad_config(args, expected):
    rc, records, err = completed(finish(gate(args)))
    assert rc == 1, err[-3000:]
    assert len(records) == 1 and any(expected in v for v in records[0]["violations"]), records


@pytest.fixture(scope="module")
def selftest_run() -> Run:
    return finish(gate(["--only", "none", "--selftest"]))


def test_gate_catches_an_ordered_atomic_in_a_loop(selftest_run):
    """The self-test probe (a default acq_rel ``tl.atomic_add`` in a loop) fails on both counts."""
    rc, records, err = completed(selftest_run)
    assert rc == 0 and records == [], err[-3000:]  # caught: the gate reports it and stays green
    assert "acq_rel/acquire/release atomics in the PTX" in err and "GPU-scope MEMBAR inside loops" in err, err


def test_gate_catches_an_in_place_gradient_without_its_barrier(selftest_run):
    """The bf16 gradient written over its float32 logits, compiled with ``IN_PLACE=False`` (no
    ``tl.debug_barrier``): the stores are not ordered after the other warps' loads, and the gate says so."""
    rc, records, err = completed(selftest_run)
    assert rc == 0 and records == [], err[-3000:]
    line = next((ln for ln in err.splitlines() if "without its barrier" in ln), "")
    assert "global stores not ordered after the step's loads by a CTA barrier" in line, err
    assert "(0 BAR.SYNC in loops)" in line, line


def test_unfenced_store_detection():
    """Walking back from each global store through its loop (and around it), a CTA barrier must
    come before any global load."""
    from benchmarks.compile_gate import unfenced_stores

    fenced = """
        /*0100*/              @!P3 LDG.E.128 R12, desc[UR24][R28.64] ;
        /*0110*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0120*/                   FMUL R4, R12, R13 ;
        /*0130*/              @!P3 STG.E.128 desc[UR24][R4.64], R16 ;
        /*0140*/               @P0 BRA 0x100 ;
        /*0150*/                   EXIT ;
"""
    assert unfenced_stores(fenced) == 0
    assert unfenced_stores(fenced.replace("BAR.SYNC.DEFER_BLOCKING 0x0", "NOP")) == 1
    # a barrier before the loads does not order this step's loads before its stores
    early = """
        /*0100*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0110*/              @!P3 LDG.E.128 R12, desc[UR24][R28.64] ;
        /*0120*/              @!P3 STG.E.U16 desc[UR24][R4.64], R16 ;
        /*0130*/              @!P3 STG.E.U16 desc[UR24][R4.64+0x200], R17 ;
        /*0140*/               @P0 BRA 0x100 ;
"""
    assert unfenced_stores(early) == 2
    # a load after the stores (the next step's, pipelined) must meet the barrier going around the loop
    wrapped = """
        /*0100*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0110*/              @!P3 STG.E.128 desc[UR24][R4.64], R16 ;
        /*0120*/              @!P3 LDG.E.128 R12, desc[UR24][R28.64] ;
        /*0130*/               @P0 BRA 0x100 ;
"""
    assert unfenced_stores(wrapped) == 0


def test_loop_detection_on_both_listing_styles():
    from benchmarks.compile_gate import loop_ranges

    cuobjdump = """
        /*00e0*/                   LEA R8, P0, R11, R4, 0x2 ;
        /*0160*/                   MEMBAR.ALL.GPU ;
        /*01c0*/               @P0 BRA 0xe0 ;
        /*01d0*/                   EXIT ;
        /*01e0*/                   BRA 0x1e0;
"""
    assert loop_ranges(cuobjdump) == [(0xE0, 0x1C0), (0x1E0, 0x1E0)]
    nvdisasm = """
.L_x_3:
        /*0100*/                   LDG.E R9, desc[UR4][R8.64] ;
        /*0180*/               @P1 BRA `(.L_x_4) ;
        /*01c0*/               @P0 BRA `(.L_x_3) ;
.L_x_4:
        /*01d0*/                   EXIT ;
"""
    assert loop_ranges(nvdisasm) == [(0x100, 0x1C0)]


def test_occupancy_model():
    from benchmarks.compile_gate import occupancy

    assert occupancy(254, 98304, 8) == 1       # the bf16 forward: registers allow one program
    assert occupancy(128, 98304, 8) == 2       # 64k registers / (128 x 256) = 2; shared allows 2
    assert occupancy(128, 139264, 8) == 1      # shared memory allows one
    assert occupancy(32, 0, 4) == 16           # 2048 threads / 128


def test_triton36_interpreter_runs_or_refuses_clearly():
    """Under triton 3.6's interpreter with numpy >= 2.4, a loop to a run-time bound raises inside
    the interpreter (``int()`` of a 1-element array). The backend must then refuse with the fix
    named, never crash deep in a kernel; with an older numpy it must compute the right loss."""
    import numpy

    code = """
import torch
from simpo_kernels import simpo_loss
g = torch.Generator().manual_seed(0)
h = torch.randn(4, 9, 24, generator=g); w = torch.randn(50, 24, generator=g)
lab = torch.randint(0, 50, (4, 9), generator=g); lab[:, :3] = -100
try:
    out = simpo_loss(h, w, lab, backend="triton")
    ref = simpo_loss(h.double(), w.double(), lab, backend="eager")
    print("RESULT", abs(float(out.loss) - float(ref.loss)) / abs(float(ref.loss)))
except RuntimeError as e:
    print("REFUSED", e)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=gate_env(triton36_dir(), interpret=True),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    if numpy.lib.NumpyVersion(numpy.__version__) >= "2.4.0":
        assert last.startswith("REFUSED") and "numpy<2.4" in last and "3.6.0" in last, last
    else:
        assert last.startswith("RESULT") and float(last.split()[1]) < 1e-5, last


def _live_processes_in_group(pgid: int) -> list[int]:
    """Pids of the processes of group ``pgid`` that are still running (zombies left unreaped by a
    container's init do not count: they hold nothing)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # not a process, or gone meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc")
@pytest.mark.parametrize("script,limits,why", [
    # a hung gate: silent
    ("echo compiling >&2; sleep 300 & sleep 300", {"stall_s": 1}, "printed nothing for 1 s (limit STALL_S)"),
    # a gate that never ends but keeps printing
    ("sleep 300 & while true; do echo compiling >&2; sleep 0.2; done", {"limit_s": 3},
     "still running after 3 s (limit LIMIT_S)"),
], ids=["stalled", "endless"])
def test_a_gate_past_its_limit_is_killed_with_its_children_and_fails_with_a_message(script, limits, why):
    """The fixture's wait (here on a shell and the sleep it started, with tiny limits): the whole
    process group is killed, and the run becomes a test failure naming the command, the limit and
    the tail of the output, not a TimeoutExpired at fixture setup with the children left running."""
    child = Child(["bash", "-c", script], gate_env())
    run = finish(child, **limits)
    deadline = time.monotonic() + 60  # SIGKILL is delivered at once; allow a loaded machine
    while _live_processes_in_group(child.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _live_processes_in_group(child.proc.pid) == []
    assert run.failure.startswith(f"`bash -c {script}` {why}: killed its process group "
                                  f"(pid {child.proc.pid}); last output:\ncompiling\n"), run.failure
    with pytest.raises(pytest.fail.Exception) as info:
        completed(run)
    assert str(info.value) == run.failure
