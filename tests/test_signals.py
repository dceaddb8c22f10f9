"""What a scheduler or a person sends to ``simpo-train``, and a disk that fills up during a save.

SIGTERM (preemption) and a first SIGINT (Ctrl-C) during training end the current optimizer step,
write a checkpoint the usual atomic way, print one line and exit 143 / 130, without the final
model or results; the rerun resumes bitwise as if uninterrupted. A repeated SIGTERM while that
checkpoint is written is ignored, a second SIGINT stops at once; a signal before training stops at
once. Every process agrees on the step. A save that finds no room (full disk, file size limit)
is one line naming the cause and the path; its partial checkpoint is removed, earlier ones stay.

Everything runs in real processes with real signals (``tests/crash_worker.py`` pauses a run at a
known step so that the test's ``os.kill`` lands inside the next one, or has the process signal
itself during a save, or limits its file size); the error classification is also checked in
process.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")

from simpo import run_dir  # noqa: E402
from simpo.run_dir import LOCK_NAME, checkpoint_problems  # noqa: E402
from tests.multiproc import ROOT, free_port, subprocess_env  # noqa: E402
from tests.test_run_dir import WORKER, _checkpoints, _cli, _run, _state, _train_args  # noqa: E402

STEPS = 8
FINAL_OUTPUTS = ("model.safetensors", "train_results.json", "all_results.json", "trainer_state.json")


def _start(cmd) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _paused_pid(proc: subprocess.Popen, pause_file, timeout: float = 180) -> int:
    """Wait until the worker paused (wrote its pid into ``pause_file``); return that pid."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(pause_file):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before it paused:\n{out[-2000:]}{err[-3000:]}")
        assert time.monotonic() < deadline, "the run did not pause in time"
        time.sleep(0.02)
    with open(pause_file) as f:
        return int(f.read())


def _signal_paused(cmd, pause_file, signum, timeout: float = 240):
    """Run ``cmd`` (a crash_worker run with ``--pause_file``), send ``signum`` to the paused
    process, let it go on; returns (returncode, stdout, stderr)."""
    proc = _start(cmd)
    try:
        os.kill(_paused_pid(proc, pause_file), signum)
        os.remove(pause_file)  # the signal is delivered before the worker sees the file gone
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def _stop_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("simpo-train: ")]


def _losses(out) -> list[float]:
    return [h["loss"] for h in _state(out)["log_history"] if "loss" in h]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def _assert_stopped_without_final_outputs(out):
    """A stopped run leaves no final model or results (as if it had finished), and no lock."""
    assert [n for n in FINAL_OUTPUTS if os.path.exists(os.path.join(out, n))] == []
    assert not os.path.exists(os.path.join(out, LOCK_NAME))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the same run, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "out"
    proc = _run(_cli(out, STEPS))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out


# ----------------------------------------------------------------------------- SIGTERM

def test_sigterm_checkpoints_the_step_and_the_rerun_resumes_bitwise(tmp_path, uninterrupted):
    """SIGTERM during step 4 (real ``os.kill``): step 4 ends, checkpoint-4 is written, and a second
    SIGTERM while it is written (after the optimizer state) is ignored; one line, exit 143, no
    final outputs, the lock released. The rerun resumes from checkpoint-4 and ends with the same
    weights and per-step losses, bit for bit, as the uninterrupted run."""
    out, pause = tmp_path / "out", tmp_path / "pause"
    rc, stdout, stderr = _signal_paused(
        [sys.executable, WORKER, "--pause_at_step", "3", "--pause_file", str(pause),
         "--signal_stage", "optimizer", "--signal_step", "4", "--signal", "SIGTERM",
         "--", *_train_args(out, STEPS)], pause, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, stdout[-2000:] + stderr[-3000:]
    assert _stop_lines(stderr) == [f"simpo-train: stopped by SIGTERM after step 4: checkpoint saved "
                                   f"to {out}/checkpoint-4; rerun the same command to resume"]
    assert "Traceback" not in stderr
    assert "WARNING simpo.trainer: SIGTERM received: stopping at the end of the current optimizer " \
           "step, with a checkpoint\n" in stderr
    assert "crash_worker: SIGTERM after optimizer of step 4" in stdout
    assert "WARNING simpo.trainer: SIGTERM received again: ignored, the stop (and its checkpoint) " \
           "is under way" in stderr
    assert _checkpoints(out) == [2, 4]
    assert checkpoint_problems(str(out / "checkpoint-4")) == []
    assert _state(out / "checkpoint-4")["global_step"] == 4
    assert not os.path.exists(out / run_dir.STAGING_DIR_NAME)
    _assert_stopped_without_final_outputs(out)

    proc = _run(_cli(out, STEPS))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"resuming from {out}/checkpoint-4 (step 4)" in proc.stdout + proc.stderr
    assert _losses(out) == _losses(uninterrupted) and len(_losses(out)) == STEPS
    import torch

    mine, reference = _weights(out), _weights(uninterrupted)
    assert mine.keys() == reference.keys()
    assert all(torch.equal(mine[k], reference[k]) for k in mine)


def test_two_ranks_stop_at_the_same_step(tmp_path):
    """Under torchrun with 2 processes, SIGTERM reaches rank 0 only (during step 4): rank 1 learns
    it at the end of step 4 (all-reduce), both write checkpoint-4 together and exit 143."""
    out, pause = tmp_path / "out", tmp_path / "pause"
    # torchrun SIGTERMs the other workers as soon as it sees one end: look every 3 s, so that on a
    # busy machine rank 1 (done, about to print its line) is not cut by that instead
    rc, stdout, stderr = _signal_paused(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(free_port()), "--monitor-interval", "3", WORKER, "--pause_at_step", "3",
         "--pause_file", str(pause), "--",
         *_train_args(out, STEPS)], pause, signal.SIGTERM, timeout=300)
    assert rc != 0
    line = (f"simpo-train: stopped by SIGTERM after step 4: checkpoint saved to {out}/checkpoint-4; "
            f"rerun the same command to resume")
    assert _stop_lines(stderr).count(line) == 2, stdout[-2000:] + stderr[-4000:]  # one per rank
    assert "exitcode  : 143" in stderr  # torchrun's account of its workers
    assert _checkpoints(out) == [2, 4]
    with open(out / "checkpoint-4" / run_dir.COMPLETION_RECORD_NAME) as f:
        record = json.load(f)
    assert record["world_size"] == 2 and {"rng_state_0.pth", "rng_state_1.pth"} <= set(record["files"])
    assert checkpoint_problems(str(out / "checkpoint-4")) == []
    _assert_stopped_without_final_outputs(out)


def test_stop_callback_and_agreement_in_process():
    """StopOnSignal's decisions, one process: nothing before a signal; after it, the step ends
    with a save and a log and training stops; the messages of each kind of stop."""
    from transformers import TrainerControl, TrainerState

    from simpo.config import RunStopped
    from simpo.trainer import StopOnSignal, StopRequest, agree_on_signal

    class Args:
        world_size, device, output_dir = 1, "cpu", "/o"

    stop = StopRequest(last_checkpoint="/o/checkpoint-2")
    with pytest.raises(RunStopped, match="^stopped by SIGINT before training started; nothing was "
                                         "trained$") as info:
        stop.handle(signal.SIGINT)
    assert info.value.exit_code == 130 and not info.value.agreed
    callback, state, control = StopOnSignal(stop), TrainerState(), TrainerControl()
    state.global_step = 2
    callback.on_train_begin(Args, state, control)
    state.global_step = 3
    callback.on_step_end(Args, state, control)
    assert not (control.should_save or control.should_training_stop)
    stop.handle(signal.SIGTERM)
    stop.handle(signal.SIGTERM)  # ignored
    assert agree_on_signal(stop.signum, Args) == signal.SIGTERM
    state.global_step = 4
    callback.on_step_end(Args, state, control)
    assert control.should_save and control.should_log and control.should_training_stop
    callback.on_save(Args, state, control)
    with pytest.raises(RunStopped, match="^stopped at once by SIGINT at step 4: no "
                                         "checkpoint was written for the steps after checkpoint-4; "
                                         "rerun the same command to resume from /o/checkpoint-4$"):
        stop.handle(signal.SIGINT)
    callback.on_train_end(Args, state, control)
    with pytest.raises(RunStopped, match="^stopped by SIGTERM after step 4: checkpoint saved to "
                                         "/o/checkpoint-4; rerun") as info:
        stop.raise_if_stopped()
    assert info.value.exit_code == 143 and info.value.agreed

    # a signal during a scheduled save (after that step's check): that checkpoint serves, no more steps
    stop = StopRequest()
    callback, control = StopOnSignal(stop), TrainerControl()
    callback.on_train_begin(Args, state, control)
    callback.on_step_end(Args, state, control)
    stop.handle(signal.SIGTERM)
    callback.on_save(Args, state, control)
    assert control.should_training_stop and stop.last_checkpoint == "/o/checkpoint-4"


def test_a_stop_dropped_in_a_weakref_callback_is_raised_again_before_training():
    """Seen under load: SIGINT while the run loads landed in a weakref callback (a
    WeakKeyDictionary cleanup during garbage collection), where Python drops exceptions
    ("Exception ignored in ..."): the run went on and trained. The stop is raised again before
    training starts."""
    import weakref

    from simpo.config import RunStopped
    from simpo.trainer import StopRequest

    stop = StopRequest()
    stop.raise_if_dropped()  # nothing happened: nothing to raise

    class Key:
        pass

    key = Key()
    keep = weakref.ref(key, lambda _: stop.handle(signal.SIGINT))  # the handler, in a callback
    del key  # the callback runs; its RunStopped is dropped by the interpreter, not raised here
    assert keep() is None
    with pytest.raises(RunStopped, match="^stopped by SIGINT before training started; nothing "
                                         "was trained$") as info:
        stop.raise_if_dropped()
    assert info.value.exit_code == 130


def test_a_dropped_stop_is_not_reported_with_a_traceback(monkeypatch):
    """The interpreter reports an exception it drops (sys.unraisablehook: "Exception ignored in
    ... Traceback" on stderr); a dropped stop is raised again before training, so while the run's
    handlers are in place its report is left out, and only its report: anything else dropped,
    or a stop dropped once training started, still reaches the hook that was there before."""
    import weakref

    from simpo.config import RunStopped
    from simpo.train import _signals_to
    from simpo.trainer import StopRequest

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(u.exc_value))

    class Key:
        pass

    def drop(callback) -> None:
        key = Key()
        keep = weakref.ref(key, lambda _: callback())
        del key
        assert keep() is None

    def fail():
        raise ValueError("not a stop")

    stop = StopRequest()
    before = signal.getsignal(signal.SIGINT)
    with _signals_to(stop):
        assert signal.getsignal(signal.SIGINT) == stop.handle
        drop(lambda: stop.handle(signal.SIGINT))
        assert reported == []
        drop(fail)
        assert [type(e) for e in reported] == [ValueError]
        stop.phase = "training"  # a second Ctrl-C stops at once; dropped there, it is reported
        stop.signum = signal.SIGINT
        drop(lambda: stop.handle(signal.SIGINT))
        assert [type(e) for e in reported] == [ValueError, RunStopped]
    assert signal.getsignal(signal.SIGINT) == before
    with pytest.raises(RunStopped, match="^stopped by SIGINT before training started"):
        stop.phase = "starting"
        stop.raise_if_dropped()
    drop(fail)  # the hook that was there before is back
    assert [type(e) for e in reported] == [ValueError, RunStopped, ValueError]


def test_forked_helpers_leave_the_stop_to_the_training_process():
    """DataLoader workers and datasets.map's pool are forked and inherit the handler (and Ctrl-C
    reaches them too): there it does nothing, no stop and no traceback per worker."""
    from simpo.trainer import StopRequest

    stop = StopRequest()
    pid = os.fork()
    if pid == 0:  # the forked helper
        try:
            stop.handle(signal.SIGINT)
            stop.handle(signal.SIGTERM)
            os._exit(0 if stop.signum == 0 else 3)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with pytest.raises(BaseException, match="before training started"):
        stop.handle(signal.SIGINT)  # the training process itself


def _agree_worker(rank: int, init: str, signums: list, results) -> None:
    import torch.distributed as dist

    from simpo.trainer import agree_on_signal

    class Args:
        world_size, device = 2, "cpu"

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        results[rank] = [agree_on_signal(s, Args) for s in signums[rank]]
    finally:
        dist.destroy_process_group()


def test_agree_on_signal_two_processes(tmp_path):
    """The agreement itself, over gloo: a signal seen by either process (or different ones by each)
    gives every process the same answer; none gives 0."""
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    signums = [[0, signal.SIGTERM, 0, signal.SIGINT], [0, 0, signal.SIGINT, signal.SIGTERM]]
    mp.spawn(_agree_worker, args=(f"file://{tmp_path}/store", signums, results), nprocs=2)
    expected = [0, signal.SIGTERM, signal.SIGINT, signal.SIGTERM]
    assert results[0] == results[1] == expected


# ----------------------------------------------------------------------------- SIGINT

def test_sigint_stops_cleanly_then_a_second_one_stops_at_once(tmp_path):
    """Ctrl-C (a real SIGINT) during step 3: the same clean stop as SIGTERM (checkpoint-3, one line,
    exit 130). The rerun resumes from it; Ctrl-C during step 5, then again while checkpoint-5 is
    written: stopped at once, one line saying what was not saved, exit 130, the lock released,
    no checkpoint-5; the next run resumes from checkpoint-4."""
    out, pause = tmp_path / "out", tmp_path / "pause"
    rc, stdout, stderr = _signal_paused(
        [sys.executable, WORKER, "--pause_at_step", "2", "--pause_file", str(pause), "--",
         *_train_args(out, STEPS)], pause, signal.SIGINT)
    assert rc == 128 + signal.SIGINT, stdout[-2000:] + stderr[-3000:]
    assert _stop_lines(stderr) == [f"simpo-train: stopped by SIGINT after step 3: checkpoint saved "
                                   f"to {out}/checkpoint-3; rerun the same command to resume"]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "SIGINT received: stopping at the end of the current optimizer step, with a checkpoint " \
           "(press Ctrl-C again to stop at once, without it)" in stderr
    assert _checkpoints(out) == [2, 3] and checkpoint_problems(str(out / "checkpoint-3")) == []
    _assert_stopped_without_final_outputs(out)

    rc, stdout, stderr = _signal_paused(
        [sys.executable, WORKER, "--pause_at_step", "4", "--pause_file", str(pause),
         "--signal_stage", "optimizer", "--signal_step", "5", "--signal", "SIGINT",
         "--", *_train_args(out, STEPS)], pause, signal.SIGINT)
    assert rc == 128 + signal.SIGINT, stdout[-2000:] + stderr[-3000:]
    assert f"resuming from {out}/checkpoint-3 (step 3)" in stdout
    assert _stop_lines(stderr) == [
        f"simpo-train: stopped at once by a second SIGINT at step 5: no checkpoint was written for "
        f"the steps after checkpoint-4; rerun the same command to resume from {out}/checkpoint-4"]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert _checkpoints(out) == [2, 3, 4]  # checkpoint-5 was cut: it never got its name
    assert run_dir.last_complete_checkpoint(str(out)) == str(out / "checkpoint-4")
    _assert_stopped_without_final_outputs(out)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_before_training_stops_at_once(tmp_path, signum):
    """A signal while the run loads (it holds the lock, training has not started): one line, exit
    128 + signal, the lock released."""
    out, gate = tmp_path / "out", tmp_path / "never"
    proc = _start([sys.executable, WORKER, "--wait_for", str(gate), "--", *_train_args(out, STEPS)])
    try:
        deadline = time.monotonic() + 180
        while True:  # the run holds the lock and waits before training
            assert proc.poll() is None and time.monotonic() < deadline
            try:
                with open(out / LOCK_NAME) as f:
                    if json.load(f).get("pid") == proc.pid:
                        break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, stdout[-2000:] + stderr[-3000:]
    assert _stop_lines(stderr) == [f"simpo-train: stopped by {name} before training started; "
                                   f"nothing was trained"]
    assert "Traceback" not in stderr
    assert not os.path.exists(out / LOCK_NAME) and _checkpoints(out) == []


# ----------------------------------------------------------------------------- no room for a save

_WRITERS = r"""
import json, resource, signal, sys, torch
from safetensors.torch import save_file
from simpo.run_dir import no_room_errno
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (50000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
d, big = sys.argv[1], {"w": torch.zeros(100000)}
writers = {"torch.save": lambda: torch.save(big, d + "/a.pt"),
           "safetensors": lambda: save_file(big, d + "/b.safetensors"),
           "json": lambda: json.dump(list(range(100000)), open(d + "/c.json", "w"))}
for name, write in writers.items():
    try:
        write()
        print(name, "no error")
    except Exception as exc:
        print(name, type(exc).__name__, no_room_errno(exc, d))
"""


def test_each_writer_out_of_room_is_recognised(tmp_path):
    """What each checkpoint writer raises when a write fails (here: past the file size limit), and
    that each is recognised: torch.save's RuntimeError has lost the errno, safetensors keeps it
    in its text, json's OSError carries it. Other failures are not taken for a full disk."""
    from simpo.run_dir import no_room_errno

    proc = subprocess.run([sys.executable, "-c", _WRITERS, str(tmp_path)], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:3] == [f"torch.save RuntimeError {errno.EFBIG}",
                                           f"safetensors SafetensorError {errno.EFBIG}",
                                           f"json OSError {errno.EFBIG}"]
    quiet = str(tmp_path / "quiet")
    os.mkdir(quiet)
    assert no_room_errno(OSError(errno.ENOSPC, "No space left on device"), quiet) == errno.ENOSPC
    assert no_room_errno(RuntimeError("I/O error: Disk quota exceeded (os error 122)"), quiet) \
        == errno.EDQUOT
    assert no_room_errno(RuntimeError("unexpected pos 704 vs 598"), quiet) is None  # room left
    assert no_room_errno(OSError(errno.EACCES, "Permission denied"), quiet) is None


def _assert_failed_save(rc, stdout, stderr, out, cause):
    """The save of checkpoint-4 failed for want of room: one line, its staging directory gone,
    checkpoint-2 intact (and what a rerun resumes from), no final outputs, the lock released."""
    assert rc == 1, stdout[-2000:] + stderr[-3000:]
    lines = _stop_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr and "unexpected pos" not in stderr, stderr[-3000:]
    assert lines[0].startswith(f"simpo-train: error: cannot save checkpoint-4 in {out}: {cause} "
                               f"(writing {out}/{run_dir.STAGING_DIR_NAME}/checkpoint-4/")
    assert lines[0].endswith(". The partial checkpoint was removed and checkpoint-2 is intact: "
                             + ("raise the file size limit (ulimit -f)" if cause == "File too large"
                                else "free some space")
                             + ", then rerun the same command to resume from it")
    assert _checkpoints(out) == [2] and checkpoint_problems(str(out / "checkpoint-2")) == []
    assert not os.path.exists(out / run_dir.STAGING_DIR_NAME)
    assert run_dir.last_complete_checkpoint(str(out)) == str(out / "checkpoint-2")
    _assert_stopped_without_final_outputs(out)
    return lines[0]


def test_file_size_limit_during_a_save(tmp_path):
    """From the save of checkpoint-4 on, files may not exceed 300 kB (RLIMIT_FSIZE): the weights
    (241 kB) fit, torch.save's optimizer.pt (497 kB) fails with "unexpected pos"; the run says
    File too large, names the file and the limit."""
    out = tmp_path / "out"
    proc = _run([sys.executable, WORKER, "--fsize_limit_at_step", "4", "--fsize_limit", "300000",
                 "--", *_train_args(out, STEPS)])
    line = _assert_failed_save(proc.returncode, proc.stdout, proc.stderr, out, "File too large")
    assert "checkpoint-4/optimizer.pt); this process may write files of at most 293.0 KiB " \
           f"(ulimit -f), the largest file of checkpoint-2 has " in line


def _in_small_tmpfs(tmp_path, size: str, steps: int):
    """``simpo-train`` into an output_dir that is a tmpfs of ``size``, mounted in a private mount
    namespace (``unshare``; no root needed where user namespaces are allowed, skipped with the
    reason elsewhere). Returns (the process, a copy of what the run left, the output_dir)."""
    unshare = shutil.which("unshare")
    out, copy = tmp_path / "out", tmp_path / "copy"
    out.mkdir()
    copy.mkdir()
    probe = subprocess.run([unshare, "-rm", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs {out}"],
                           capture_output=True, text=True) if unshare else None
    if probe is None or probe.returncode != 0:
        reason = "no unshare" if probe is None else probe.stderr.strip()
        print(f"skipped: cannot mount a small tmpfs here ({reason})")
        pytest.skip(f"cannot mount a small tmpfs here ({reason})")
    # the tmpfs lives only as long as the namespace: copy what the run left before leaving it
    script = (f"mount -t tmpfs -o size={size} tmpfs {out} && cd {ROOT} && "
              f"{sys.executable} -m simpo.train {' '.join(_train_args(out, steps))}; rc=$?; "
              f"cp -a {out}/. {copy}/; exit $rc")
    proc = subprocess.run([unshare, "-rm", "sh", "-c", script], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=240)
    return proc, copy, out


def test_disk_full_during_a_save(tmp_path):
    """A real full disk (ENOSPC): output_dir is a 1.2 MB tmpfs; checkpoint-2 (~0.8 MB) fits,
    checkpoint-4 does not (torch.save's optimizer.pt fails with "unexpected pos")."""
    proc, copy, out = _in_small_tmpfs(tmp_path, "1200k", STEPS)
    line = _assert_failed_save(proc.returncode, proc.stdout,
                               proc.stderr.replace(str(out), str(copy)), copy,
                               "No space left on device")
    assert "; a checkpoint needs about " in line and " (the size of checkpoint-2), " in line
    assert " are free there." in line


def test_disk_full_writing_the_final_model(tmp_path):
    """A 1 MB tmpfs: checkpoint-2, the last step's, fits; the final model (safetensors) does not:
    one line, the checkpoint intact (a rerun writes the final model from it), the lock released."""
    proc, copy, out = _in_small_tmpfs(tmp_path, "1000k", 2)
    stderr = proc.stderr.replace(str(out), str(copy))
    assert proc.returncode == 1, proc.stdout[-2000:] + stderr[-3000:]
    lines = _stop_lines(stderr)
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"simpo-train: error: cannot write the final model in {copy}: No "
                               f"space left on device (writing {copy}/model.safetensors; ")
    assert lines[0].endswith(" are free there). The checkpoints are intact: make room, then rerun "
                             "the same command to write it")
    assert "Traceback" not in stderr
    assert _checkpoints(copy) == [2] and checkpoint_problems(str(copy / "checkpoint-2")) == []
    assert not os.path.exists(copy / LOCK_NAME)
