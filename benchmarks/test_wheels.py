"""The wheel set carried to the GPU machine: fetched from PyPI (network needed), then checked the
way the GPU machine will use it, offline (``--no-index --no-deps``).

Two sets are fetched with ``benchmarks/campaign/fetch-wheels``: the GPU's (CPython 3.12) and one
for the running interpreter, whose modules are imported here from the install target.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from benchmarks.campaign import wheels as W

LOCAL = "%d.%d" % sys.version_info[:2]
#: One wheel per distribution, whatever the versions PyPI serves today.
EXPECTED = {"liger-kernel", "cut-cross-entropy", "datasets", "deepspeed", "trl", "pydantic",
            "pydantic-core", "annotated-types", "typing-inspection", "hjson", "dill",
            "multiprocess"}


def _fetch(dest: Path, python_version: str) -> Path:
    proc = subprocess.run(["bash", str(W.FETCH_SCRIPT), "--dest", str(dest),
                           "--python-version", python_version],
                          env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"fetch-wheels --python-version {python_version} failed:\n" \
        f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return dest


@pytest.fixture(scope="module")
def wheel_sets(tmp_path_factory):
    """``{"3.12": dir, LOCAL: dir}``, fetched concurrently (each is mostly waiting on PyPI)."""
    base = tmp_path_factory.mktemp("wheels")
    versions = dict.fromkeys([W.GPU_PYTHON, LOCAL])
    with ThreadPoolExecutor(len(versions)) as ex:
        futs = {v: ex.submit(_fetch, base / f"cp{v.replace('.', '')}", v) for v in versions}
        return {v: f.result() for v, f in futs.items()}


def _dists(wheel_dir: Path) -> set:
    return {W.parse_wheel_filename(p.name)[0] for p in W.wheels_in(wheel_dir)}


def test_fetch_gives_expected_set(wheel_sets):
    for v, d in wheel_sets.items():
        assert _dists(d) == EXPECTED, v
        assert len(W.wheels_in(d)) == len(EXPECTED), v


def test_gpu_set_requirements_met_by_image(wheel_sets):
    assert W.requirement_problems(wheel_sets[W.GPU_PYTHON], W.GPU_PYTHON) == []


def test_gpu_set_installs_offline_for_312(wheel_sets, tmp_path):
    target = tmp_path / "site"
    W.install_offline(wheel_sets[W.GPU_PYTHON], target, python_version=W.GPU_PYTHON)
    assert W.missing_top_level(target) == []
    # The compiled wheel is the cp312 build, not the running interpreter's.
    assert list((target / "pydantic_core").glob("_pydantic_core.cpython-312-x86_64-linux-gnu*.so"))


def test_local_set_imports_from_target(wheel_sets, tmp_path):
    target = tmp_path / "site"
    W.install_offline(wheel_sets[LOCAL], target)
    assert W.missing_top_level(target) == []
    assert W.import_problems(target) == []


# -- the checks can fail ---------------------------------------------------------------------------

def _fake_wheel(d: Path, name: str, version: str, requires=(), requires_python=None,
                tag="py3-none-any") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Dist: {r}" for r in requires]
    if requires_python:
        meta.append(f"Requires-Python: {requires_python}")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", "\n".join(meta))
    return path


def test_requirement_problems_catch_missing_carried_dep(wheel_sets, tmp_path):
    d = tmp_path / "set"
    d.mkdir()
    for p in W.wheels_in(wheel_sets[W.GPU_PYTHON]):
        if W.parse_wheel_filename(p.name)[0] != "pydantic-core":
            shutil.copy(p, d)
    problems = W.requirement_problems(d, W.GPU_PYTHON)
    assert len(problems) == 1 and problems[0].startswith("pydantic requires pydantic-core"), \
        problems


def test_requirement_problems_catch_planted_faults(tmp_path):
    d = tmp_path / "set"
    _fake_wheel(d, "alpha", "1.0", requires=[
        "no-such-dist-xyz>=1",                       # neither carried nor in the image
        "transformers>=99",                          # the image's known 5.17.0 fails it
        "beta<2",                                    # the carried beta 2.0 fails it
        "gamma-absent; python_version < '3.12'",     # marker false for 3.12: ignored
        "delta-absent; extra == 'dev'",              # extras are not installed: ignored
        "torch>=2.4",                                # image 2.11.0: met
        "pyarrow>=1",                                # in the image, version unknown: met
    ])
    _fake_wheel(d, "beta", "2.0", requires_python=">=3.13")
    _fake_wheel(d, "beta", "1.5")                    # duplicate distribution
    _fake_wheel(d, "eps", "1.0", tag="cp311-cp311-manylinux_2_17_x86_64")
    problems, unverified = W.check_requirements(d, W.GPU_PYTHON)
    text = "\n".join(problems)
    for needle in ("no-such-dist-xyz", "transformers>=99", "beta<2", "duplicate distribution beta",
                   "Requires-Python >=3.13", "eps-1.0-cp311"):
        assert needle in text, (needle, problems)
    assert "gamma" not in text and "delta" not in text and "torch" not in text
    assert len(problems) == 6, problems
    assert unverified == ["alpha requires pyarrow>=1 (image version unknown)"]
    # Markers are evaluated for the version asked: for 3.11 the gamma requirement counts.
    assert "gamma-absent" in "\n".join(W.requirement_problems(d, "3.11"))


def test_install_offline_reports_pip_error(tmp_path):
    d = tmp_path / "set"
    d.mkdir()
    (d / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(W.WheelInstallError, match="pip install exited"):
        W.install_offline(d, tmp_path / "site")


def test_import_problems_catch_foreign_and_missing(tmp_path):
    target = tmp_path / "site"
    (target / "here_mod").mkdir(parents=True)
    (target / "here_mod" / "__init__.py").write_text("")
    problems = W.import_problems(target, ["here_mod", "json", "no_such_module_xyz"])
    assert len(problems) == 2, problems
    assert problems[0].startswith("json: imported from ")
    assert problems[1].startswith("no_such_module_xyz: import failed: ModuleNotFoundError")


def test_fetch_wheels_rejects_bad_arguments():
    for args in (["--bogus"], ["--python-version", "312"], ["--dest"]):
        proc = subprocess.run(["bash", str(W.FETCH_SCRIPT), *args], capture_output=True,
                              text=True)
        assert proc.returncode == 2, (args, proc.stderr)


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


def test_fetch_wheels_default_dest_and_failures(tmp_path):
    """Without --dest: <repo>/.whl, kept out of git once; old wheels go, other files stay; a pip
    failure stops the script."""
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
    env = {**os.environ, "PYTHON": str(stub), "STUB_LOG": str(tmp_path / "log")}
    for _ in range(2):
        proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (repo / ".whl").iterdir()) == [
        "keep.txt", "stub_d-1.0-py3-none-any.whl", "stub_w-1.0-py3-none-any.whl"]
    assert (repo / ".git" / "info" / "exclude").read_text().splitlines().count("/.whl/") == 1
    calls = (tmp_path / "log").read_text().splitlines()
    assert len(calls) == 4 and "--python-version 3.12 --implementation cp" in calls[0]
    assert "pip wheel" in calls[1] and "deepspeed" in calls[1]
    proc = subprocess.run(["bash", str(script), "--python-version", "3.11"],
                          env={**env, "STUB_FAIL": "1"}, capture_output=True, text=True)
    assert proc.returncode != 0 and "stub pip failed" in proc.stdout + proc.stderr
