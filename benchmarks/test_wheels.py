"""The wheels carried to the GPU machine: fetched from PyPI (network needed) with
``benchmarks/campaign/fetch-wheels``, then checked the way the GPU machine uses them, offline.

The default set (liger-kernel, cut-cross-entropy) is pure Python, so the cp312 set also installs
for the running interpreter, whose imports are checked here.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks.campaign import wheels as W

DEFAULT = {"liger-kernel", "cut-cross-entropy"}


def _fetch(dest: Path, *args: str) -> Path:
    proc = subprocess.run(["bash", str(W.FETCH_SCRIPT), "--dest", str(dest), *args],
                          env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"fetch-wheels {args} failed:\n{proc.stdout}\n{proc.stderr}"
    return dest


@pytest.fixture(scope="module")
def gpu_set(tmp_path_factory) -> Path:
    return _fetch(tmp_path_factory.mktemp("whl"))


def test_default_set_is_the_two_peers(gpu_set):
    assert set(W.carried(gpu_set)) == DEFAULT
    assert all(p.name.endswith("-py3-none-any.whl") for p in gpu_set.glob("*.whl"))
    assert W.modules_for(gpu_set) == W.MODULES


def test_default_set_requirements_met_by_image(gpu_set):
    assert W.check_requirements(gpu_set, "3.12") == ([], [])


def test_default_set_installs_offline_for_312(gpu_set, tmp_path):
    assert W.install_offline(gpu_set, tmp_path, "3.12") == []
    assert {"liger_kernel", "cut_cross_entropy"} <= {p.name for p in tmp_path.iterdir()}


def test_default_set_imports_from_target_locally(gpu_set, capsys):
    """The CLI installs the set for this Python into a fresh folder and imports it from there."""
    rc, out = W.main(["--dir", str(gpu_set), "--python-version", W.LOCAL_PYTHON]), \
        capsys.readouterr().out
    assert rc == 0 and out.endswith("wheels: ok\n"), out
    assert "imports from the target: " + ", ".join(W.MODULES) in out, out


def test_trainer_adds_the_trainer_set(tmp_path):
    d = _fetch(tmp_path / "whl", "--trainer")
    assert set(W.carried(d)) == DEFAULT | set(W.TRAINER_DISTS)
    assert W.check_requirements(d, "3.12")[0] == []
    assert W.install_offline(d, tmp_path / "site", "3.12") == []
    assert set(W.modules_for(d)) == set(W.MODULES) | {
        "datasets", "deepspeed", "trl", "pydantic", "pydantic_core", "annotated_types",
        "typing_inspection", "hjson", "dill", "multiprocess"}


# -- the checks can fail ---------------------------------------------------------------------------

def _fake_wheel(d: Path, name: str, version: str, requires=(), tag="py3-none-any") -> Path:
    """A wheel that pip installs (for a matching ``tag``), with these ``Requires-Dist``."""
    d.mkdir(parents=True, exist_ok=True)
    path, info = d / f"{name}-{version}-{tag}.whl", f"{name}-{version}.dist-info"
    meta = [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}"]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{info}/METADATA",
                    "\n".join(meta + [f"Requires-Dist: {r}" for r in requires]) + "\n")
        zf.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tag}\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def test_requirement_check_reports_planted_faults(tmp_path, capsys):
    _fake_wheel(tmp_path, "alpha", "1.0", requires=[
        "no-such-dist-xyz>=1",                    # neither carried nor in the image
        "transformers>=99",                       # the image's 5.17.0 fails it
        "beta<2",                                 # the carried beta 2.0 fails it
        "gamma-absent; python_version < '3.12'",  # marker false for 3.12: ignored
        "delta-absent; extra == 'dev'",           # extras are not installed: ignored
        "torch>=2.4",                             # the image's 2.11.0: met
        "pyarrow>=1",                             # in the image, version not recorded
    ])
    _fake_wheel(tmp_path, "beta", "2.0")
    problems, unverified = W.check_requirements(tmp_path, "3.12")
    assert problems == [
        "alpha requires no-such-dist-xyz>=1: neither carried nor in the GPU image",
        "alpha requires transformers>=99, but the GPU image has transformers 5.17.0",
        "alpha requires beta<2, but the set carries beta 2.0"]
    assert unverified == ["alpha: pyarrow>=1"]
    assert "gamma-absent" in "\n".join(W.check_requirements(tmp_path, "3.11")[0])
    assert W.main(["--dir", str(tmp_path), "--python-version", "3.12"]) == 1
    assert capsys.readouterr().out.endswith("wheels: 3 problem(s)\n")
    assert W.check_requirements(tmp_path / "empty")[0] == [f"no wheels in {tmp_path / 'empty'}"]


def test_install_offline_reports_pip_errors(tmp_path):
    _fake_wheel(tmp_path / "cp311", "eps", "1.0", tag="cp311-cp311-manylinux_2_17_x86_64")
    problems = W.install_offline(tmp_path / "cp311", tmp_path / "site", "3.12")
    assert len(problems) == 1 and "pip install exited 1" in problems[0], problems
    assert "not a supported wheel" in problems[0], problems
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    problems = W.install_offline(tmp_path / "bad", tmp_path / "site")
    assert len(problems) == 1 and problems[0].startswith("pip install exited"), problems


def test_import_problems_catch_foreign_and_missing(tmp_path):
    (tmp_path / "here_mod").mkdir()
    (tmp_path / "here_mod" / "__init__.py").write_text("")
    assert W.import_problems(tmp_path, ["here_mod", "json", "no_such_module_xyz"]) == [
        f"json: imported from {__import__('json').__file__}, not from {tmp_path.resolve()}",
        "no_such_module_xyz: import failed: ModuleNotFoundError: "
        "No module named 'no_such_module_xyz'"]


def test_fetch_wheels_rejects_bad_arguments():
    for args in (["--bogus"], ["--python-version", "312"], ["--dest"], ["--trainer=1"]):
        proc = subprocess.run(["bash", str(W.FETCH_SCRIPT), *args], capture_output=True,
                              text=True)
        assert proc.returncode == 2, (args, proc.stderr)
        assert args[0] != "--bogus" or "fetch-wheels [--dest DIR] [--python-version X.Y] " \
            "[--trainer]" in proc.stderr, proc.stderr


_STUB_PYTHON = """#!/usr/bin/env bash
# Stands in for python3 in fetch-wheels: logs its arguments, makes one empty wheel per call.
echo "$*" >> "$STUB_LOG"
[ -n "${STUB_FAIL:-}" ] && { echo "ERROR: stub pip failed" >&2; exit 1; }
prev=""
for a in "$@"; do
  if [ "$prev" = "-d" ] || [ "$prev" = "-w" ]; then : > "$a/stub_${prev#-}-1.0-py3-none-any.whl"; fi
  prev="$a"
done
"""


def test_fetch_wheels_default_dest_trainer_list_and_failures(tmp_path):
    """Without --dest: <repo>/.whl, kept out of git once; old wheels go, other files stay. The
    default fetch asks pip for the two peers only; --trainer adds the trainer set and builds
    deepspeed. A pip failure stops the script."""
    repo = tmp_path / "repo"
    script = repo / "benchmarks" / "campaign" / "fetch-wheels"
    script.parent.mkdir(parents=True)
    shutil.copy(W.FETCH_SCRIPT, script)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    stub = tmp_path / "python"
    stub.write_text(_STUB_PYTHON)
    stub.chmod(0o755)
    (repo / ".whl").mkdir()
    (repo / ".whl" / "old-0.1-py3-none-any.whl").write_text("")
    (repo / ".whl" / "keep.txt").write_text("")
    log = tmp_path / "log"
    env = {**os.environ, "PYTHON": str(stub), "STUB_LOG": str(log)}

    def run(*args, **extra_env):
        return subprocess.run(["bash", str(script), *args], env={**env, **extra_env},
                              capture_output=True, text=True)

    for _ in range(2):
        assert run().returncode == 0
    assert sorted(p.name for p in (repo / ".whl").iterdir()) == [
        "keep.txt", "stub_d-1.0-py3-none-any.whl"]
    assert (repo / ".git" / "info" / "exclude").read_text().splitlines().count("/.whl/") == 1
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and calls[0] == calls[1]
    assert "--python-version 3.12 --implementation cp" in calls[0]
    assert calls[0].endswith(" -d " + str(repo / ".whl") + " liger-kernel cut-cross-entropy")
    log.unlink()
    assert run("--trainer").returncode == 0
    download, build = log.read_text().splitlines()
    trainer_downloads = set(W.TRAINER_DISTS) - {"deepspeed"}  # built, below
    assert set(download.split(" -d ", 1)[1].split()[1:]) == DEFAULT | trainer_downloads
    assert build.startswith("-m pip wheel") and build.endswith(" deepspeed")
    proc = run("--python-version", "3.11", STUB_FAIL="1")
    assert proc.returncode != 0 and "stub pip failed" in proc.stdout + proc.stderr
