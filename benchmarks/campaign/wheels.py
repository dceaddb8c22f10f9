"""Offline check of the wheels carried to the GPU machine (``.whl/``, filled by ``fetch-wheels``).

The GPU image cannot reach PyPI, so the wheels install with ``pip install --no-index --no-deps
--target``, which checks no requirement. This module does that checking here, before the lease:

- :func:`check_requirements`: each wheel's ``Requires-Dist`` (no extras; markers for CPython on
  linux x86-64) is met by another wheel in the folder or by the image (:data:`IMAGE`);
- :func:`install_offline`: the folder installs that way, also for 3.12 from CI's 3.11;
- :func:`import_problems`: each module imports, from the install target (needs that Python).

    python -m benchmarks.campaign.wheels [--dir .whl] [--python-version 3.12] [--fetch]
        [--installed]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import zipfile
from email.parser import HeaderParser
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion

FETCH_SCRIPT = Path(__file__).resolve().with_name("fetch-wheels")
GPU_PYTHON = "3.12"
LOCAL_PYTHON = "%d.%d" % sys.version_info[:2]

#: What the carried wheels need from the GPU image ('cuda', /opt/torch/.venv, Python 3.12.3).
#: Source: the device notes' image package list (/work/.library/device/KINDS.md, read 2026-11-17),
#: versions from its "pip list, as a session saw it" row; None: present, version not recorded.
IMAGE = {"torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0", "accelerate": "1.15.0",
         "numpy": "2.5.2", "huggingface-hub": "1.33.0", **dict.fromkeys((
             "einops", "filelock", "fsspec", "jinja2", "msgpack", "ninja", "packaging", "pandas",
             "psutil", "py-cpuinfo", "pyarrow", "pyyaml", "tqdm", "typing-extensions", "xxhash"))}

#: What the campaign imports from the default set (liger-kernel, cut-cross-entropy).
MODULES = ("liger_kernel", "liger_kernel.chunked_loss", "cut_cross_entropy")
#: What ``fetch-wheels --trainer`` adds; each provides the module named like it (``_`` for ``-``).
TRAINER_DISTS = ("datasets", "deepspeed", "trl", "pydantic", "pydantic-core", "annotated-types",
                 "typing-inspection", "hjson", "dill", "multiprocess")


def carried(wheel_dir) -> dict:
    """The wheels in ``wheel_dir``: normalised distribution name -> (version, path)."""
    return {parse_wheel_filename(p.name)[0]: (parse_wheel_filename(p.name)[1], p)
            for p in sorted(Path(wheel_dir).glob("*.whl"))}


def modules_for(wheel_dir) -> tuple:
    """:data:`MODULES`, plus the modules of the trainer wheels in ``wheel_dir``."""
    have = carried(wheel_dir)
    return MODULES + tuple(d.replace("-", "_") for d in TRAINER_DISTS if d in have)


def requires_dist(path: Path) -> list:
    """The ``Requires-Dist`` lines of a wheel's ``*.dist-info/METADATA``."""
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist()
                    if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        return HeaderParser().parsestr(zf.read(meta).decode()).get_all("Requires-Dist", [])


def marker_environment(python_version: str = GPU_PYTHON) -> dict:
    """PEP 508 marker values for CPython ``python_version`` on linux x86-64, no extras."""
    full = {GPU_PYTHON: "3.12.3", LOCAL_PYTHON: platform.python_version()}.get(
        python_version, python_version + ".0")
    return dict(default_environment(), python_version=python_version, python_full_version=full,
                implementation_name="cpython", implementation_version=full,
                platform_python_implementation="CPython", os_name="posix", sys_platform="linux",
                platform_system="Linux", platform_machine="x86_64", extra="")


def check_requirements(wheel_dir, python_version: str = GPU_PYTHON, image=None):
    """``(problems, unverified)`` for ``python_version``. problems: requirements met by neither
    another wheel in ``wheel_dir`` nor ``image`` (default :data:`IMAGE`, name -> version or None),
    or that their version fails; unverified: specifiers on image packages of unknown version."""
    image = IMAGE if image is None else image
    env = marker_environment(python_version)
    wheels = carried(wheel_dir)
    problems, unverified = ([] if wheels else [f"no wheels in {wheel_dir}"]), []
    for name, (_version, path) in wheels.items():
        for req in map(Requirement, requires_dist(path)):
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            dep = canonicalize_name(req.name)
            if dep in wheels:
                have, where = str(wheels[dep][0]), "the set carries"
            elif dep in image:
                have, where = image[dep], "the GPU image has"
            else:
                problems.append(f"{name} requires {req}: neither carried nor in the GPU image")
                continue
            try:  # None: the image's version is not recorded (or is no PEP 440 version)
                met = None if have is None else req.specifier.contains(have, prereleases=True)
            except InvalidVersion:
                met = None
            if met is None and req.specifier:
                unverified.append(f"{name}: {req}")
            elif met is False:
                problems.append(f"{name} requires {req}, but {where} {dep} {have}")
    return problems, unverified


def install_offline(wheel_dir, target, python_version: str = LOCAL_PYTHON) -> list:
    """``pip install --no-index --no-deps --no-compile --target target`` the wheels in
    ``wheel_dir`` (with pip's cross-install flags for another ``python_version``); returns the
    problems: none, or pip's failure with its output."""
    paths = [str(p) for _version, p in carried(wheel_dir).values()]
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
           "--no-index", "--no-deps", "--no-compile", "--target", str(target)]
    if python_version != LOCAL_PYTHON:
        cmd += ["--python-version", python_version, "--implementation", "cp",
                "--only-binary=:all:", "--platform=manylinux_2_28_x86_64",
                "--platform=manylinux_2_17_x86_64", "--platform=manylinux2014_x86_64"]
    proc = subprocess.run(cmd + paths, capture_output=True, text=True)
    return [f"pip install exited {proc.returncode}:\n{(proc.stderr or proc.stdout).strip()}"
            ] if proc.returncode else []


_PROBE = r"""
import importlib, json, sys
res = {}
for m in sys.argv[1:]:
    try:
        res[m] = {"file": getattr(importlib.import_module(m), "__file__", None)}
    except BaseException as e:
        res[m] = {"error": "%s: %s" % (type(e).__name__, e)}
print("\n" + json.dumps(res))
"""


def import_problems(target, modules=MODULES) -> list:
    """Import each module in a fresh interpreter with ``target`` first on ``PYTHONPATH``; report
    each that fails or whose ``__file__`` is not under ``target``."""
    target = Path(target).resolve()
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join(
        filter(None, [str(target), os.environ.get("PYTHONPATH")])))
    # -P: the current folder (the checkout) is not put on sys.path.
    proc = subprocess.run([sys.executable, "-P", "-c", _PROBE, *modules], env=env,
                          capture_output=True, text=True, timeout=600)
    try:
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return [f"import probe exited {proc.returncode}: {tail}"]
    problems = []
    for m, r in res.items():
        if "error" in r:
            problems.append(f"{m}: import failed: {r['error']}")
        elif not (r["file"] and Path(r["file"]).resolve().is_relative_to(target)):
            problems.append(f"{m}: imported from {r['file']}, not from {target}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.campaign.wheels",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=str(FETCH_SCRIPT.parents[2] / ".whl"),
                    help="wheel folder (default: the checkout's .whl)")
    ap.add_argument("--python-version", default=GPU_PYTHON,
                    help=f"target interpreter X.Y (default {GPU_PYTHON}, the GPU image's)")
    ap.add_argument("--fetch", action="store_true", help="run fetch-wheels into --dir first")
    ap.add_argument("--installed", action="store_true", help="check requirements against this "
                    "interpreter's packages, not IMAGE (on the GPU machine: the image as it is)")
    args = ap.parse_args(argv)
    wdir, pyver = Path(args.dir), args.python_version
    if args.fetch:
        subprocess.run(["bash", str(FETCH_SCRIPT), "--dest", str(wdir), "--python-version", pyver],
                       check=True, env=dict(os.environ, PYTHON=sys.executable))
    print(f"{len(carried(wdir))} wheels in {wdir} for CPython {pyver}")
    installed = args.installed and {canonicalize_name(d.metadata["Name"]): d.version
                                    for d in metadata.distributions() if d.metadata["Name"]}
    problems, unverified = check_requirements(wdir, pyver, installed or None)
    if carried(wdir):
        with tempfile.TemporaryDirectory(prefix="wheels-target-") as target:
            install = install_offline(wdir, target, pyver)
            problems += install
            if pyver == LOCAL_PYTHON and not install:
                problems += import_problems(target, modules_for(wdir))
        print(f"  offline install for {pyver}: checked; imports from the target: " + (
            ", ".join(modules_for(wdir)) if pyver == LOCAL_PYTHON else f"need Python {pyver}"))
    if unverified:
        print("  unverified (the image's version not recorded): " + "; ".join(unverified))
    print("".join(f"  PROBLEM: {p}\n" for p in problems)
          + "wheels: " + (f"{len(problems)} problem(s)" if problems else "ok"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
