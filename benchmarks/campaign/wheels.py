"""Offline check of the wheel set carried to the GPU machine (``.whl/``, filled by ``fetch-wheels``).

The GPU image has no network: whatever the campaign needs beyond the image must arrive as wheels
and install with ``pip install --no-index --no-deps --target /tmp/site``. ``--no-deps`` means pip
checks nothing, so this module does the checking pip would have done, here, before the lease:

- :func:`requirement_problems`: every ``Requires-Dist`` of every wheel (markers evaluated for the
  target Python on linux x86-64, no extras) is met by another wheel in the set or by the image
  (:data:`IMAGE_PACKAGES`, and by its version where that is known); no distribution appears twice;
  every wheel's tags and ``Requires-Python`` fit the target interpreter;
- :func:`install_offline`: the set installs with ``--no-index --no-deps``, for another Python
  version too (``--python-version``, so the cp312 set is checked from CI's 3.11);
- :func:`import_problems`: each module imports, and from the target folder, not from site-packages.

    python -m benchmarks.campaign.wheels [--dir .whl] [--python-version 3.12] [--fetch]

On the GPU machine itself (Python 3.12) the same command also imports every module from the
installed set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from email.parser import HeaderParser
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from packaging import tags
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

REPO_ROOT = Path(__file__).resolve().parents[2]
FETCH_SCRIPT = Path(__file__).resolve().with_name("fetch-wheels")
GPU_PYTHON = "3.12"
GPU_PYTHON_FULL = "3.12.3"
#: ``fetch-wheels`` asks pip for these platforms; a binary wheel in the set must carry one.
PLATFORMS = tuple(f"manylinux_2_{g}_x86_64" for g in range(28, 4, -1)) + (
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64")
PIP_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

# Snapshot of the GPU image ('cuda', /opt/torch/.venv, Python 3.12.3), from the device notes
# (/work/.library/device/KINDS.md): the package list "as last read on a machine running it on
# 2026-11-17", with the versions of that file's "pip list, as a session saw it" row (2026-11).
# None: installed, version not recorded (a requirement on it is taken as met; see
# :func:`check_requirements`'s ``unverified``).
_IMAGE_VERSIONS = {
    "accelerate": "1.15.0", "botorch": "0.18.1", "cupy-cuda13x": "14.2.0", "gpytorch": "1.15.2",
    "huggingface-hub": "1.33.0", "jax": "0.11.2", "jax-cuda13-pjrt": "0.11.2",
    "jax-cuda13-plugin": "0.11.2", "jaxlib": "0.11.2", "jaxtyping": "0.3.11", "numpy": "2.5.2",
    "numpyro": "0.21.0", "onnx": "1.23.1", "onnx-ir": "1.0.0", "onnxruntime": "1.30.0",
    "onnxscript": "0.7.2", "pytorch-lightning": "2.6.6", "safetensors": "0.8.0",
    "sentence-transformers": "6.0.1", "sentencepiece": "0.2.2", "tiktoken": "0.14.0",
    "tokenizers": "0.23.2", "torch": "2.11.0", "torch-geometric": "2.8.0.post1",
    "torchaudio": "2.11.0", "torchdiffeq": "0.2.5", "torchmetrics": "1.9.0",
    "torchvision": "0.26.0", "transformers": "5.17.0", "triton": "3.6.0",
}
_IMAGE_NAMES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp
""".split()
#: normalised name -> version string, or None where the snapshot has no version.
IMAGE_PACKAGES: Dict[str, Optional[str]] = {
    canonicalize_name(n): _IMAGE_VERSIONS.get(canonicalize_name(n)) for n in _IMAGE_NAMES}

#: What the campaign imports from the carried set (and the set's own compiled or small deps).
MODULES = ("liger_kernel", "liger_kernel.chunked_loss", "cut_cross_entropy", "datasets",
           "deepspeed", "trl", "pydantic", "pydantic_core", "annotated_types",
           "typing_inspection", "hjson", "dill", "multiprocess")
#: Top-level packages the set must put in the install target.
TOP_LEVEL = tuple(dict.fromkeys(m.split(".")[0] for m in MODULES))


class WheelInstallError(RuntimeError):
    """``pip install`` of the set failed; the message carries pip's stderr."""


def _full_version(python_version: str) -> str:
    if python_version == GPU_PYTHON:
        return GPU_PYTHON_FULL
    if python_version == "%d.%d" % sys.version_info[:2]:
        return "%d.%d.%d" % sys.version_info[:3]
    return python_version + ".0"


def marker_environment(python_version: str = GPU_PYTHON) -> Dict[str, str]:
    """PEP 508 marker values for CPython ``python_version`` on linux x86-64, no extras."""
    full = _full_version(python_version)
    return {
        "python_version": python_version, "python_full_version": full,
        "implementation_name": "cpython", "implementation_version": full,
        "platform_python_implementation": "CPython", "os_name": "posix",
        "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
        "platform_release": "", "platform_version": "", "extra": "",
    }


def target_tags(python_version: str = GPU_PYTHON) -> frozenset:
    """The wheel tags CPython ``python_version`` on manylinux x86-64 accepts."""
    major, minor = (int(p) for p in python_version.split("."))
    interp = f"cp{major}{minor}"
    return frozenset(tags.cpython_tags((major, minor), abis=[interp, "abi3", "none"],
                                       platforms=PLATFORMS)) | frozenset(
        tags.compatible_tags((major, minor), interp, PLATFORMS))


def wheel_metadata(path: Path):
    """The parsed ``*.dist-info/METADATA`` of a wheel (an ``email.message.Message``)."""
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist()
                 if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        if len(names) != 1:
            raise ValueError(f"{path.name}: expected one .dist-info/METADATA, found {len(names)}")
        return HeaderParser().parsestr(zf.read(names[0]).decode("utf-8"))


def wheels_in(wheel_dir) -> List[Path]:
    return sorted(Path(wheel_dir).glob("*.whl"))


def check_requirements(wheel_dir, python_version: str = GPU_PYTHON,
                       image: Optional[Mapping[str, Optional[str]]] = None
                       ) -> Tuple[List[str], List[str]]:
    """``(problems, unverified)`` for the wheel set in ``wheel_dir``, for the GPU image.

    ``problems``: unreadable wheels, duplicate distributions, wheels whose tags or
    ``Requires-Python`` do not fit the target, and requirements met by neither another wheel nor
    the image (or that the image's known version fails). ``unverified``: requirements with a
    version specifier on an image package whose version the snapshot does not record.
    ``image`` (normalised name -> version or None) replaces :data:`IMAGE_PACKAGES`, e.g. with
    :func:`installed_packages` on the GPU machine itself.
    """
    image = IMAGE_PACKAGES if image is None else image
    problems: List[str] = []
    unverified: List[str] = []
    env = marker_environment(python_version)
    accepted = target_tags(python_version)
    full = Version(env["python_full_version"])
    carried: Dict[str, List[Tuple[Version, str]]] = {}
    parsed = []
    for whl in wheels_in(wheel_dir):
        try:
            name, version, _build, wtags = parse_wheel_filename(whl.name)
            meta = wheel_metadata(whl)
        except Exception as e:  # noqa: BLE001 - any unreadable wheel is a problem to report
            problems.append(f"{whl.name}: unreadable wheel ({e})")
            continue
        carried.setdefault(name, []).append((version, whl.name))
        parsed.append((whl.name, name, version, wtags, meta))
        if not wtags & accepted:
            problems.append(f"{whl.name}: tags do not fit CPython {python_version} on "
                            "manylinux x86-64")
        rp = meta.get("Requires-Python")
        if rp and not SpecifierSet(rp).contains(full, prereleases=True):
            problems.append(f"{whl.name}: Requires-Python {rp} excludes {full}")
    if not parsed and not problems:
        problems.append(f"no wheels in {wheel_dir}")
    for name, found in sorted(carried.items()):
        if len(found) > 1:
            problems.append(f"duplicate distribution {name}: "
                            + ", ".join(fname for _v, fname in found))
    for fname, name, _version, _wtags, meta in parsed:
        for line in meta.get_all("Requires-Dist") or []:
            try:
                req = Requirement(line)
            except InvalidRequirement as e:
                problems.append(f"{fname}: unparsable requirement {line!r} ({e})")
                continue
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            dep = canonicalize_name(req.name)
            if dep == name:
                continue
            if dep in carried:
                for v, other in carried[dep]:
                    if not req.specifier.contains(v, prereleases=True):
                        problems.append(f"{name} requires {req}, but the set carries {other}")
                continue
            if dep not in image:
                problems.append(f"{name} requires {req}: neither carried nor in the GPU image")
                continue
            have = image[dep]
            try:
                have_v = None if have is None else Version(have)
            except InvalidVersion:
                have_v = None
            if have_v is None:
                if req.specifier:
                    unverified.append(f"{name} requires {req} (image version unknown)")
            elif not req.specifier.contains(have_v, prereleases=True):
                problems.append(f"{name} requires {req}, but the GPU image has {dep} {have}")
    return problems, unverified


def requirement_problems(wheel_dir, python_version: str = GPU_PYTHON,
                         image: Optional[Mapping[str, Optional[str]]] = None) -> List[str]:
    """What :func:`check_requirements` calls problems (an empty list: the set is consistent)."""
    return check_requirements(wheel_dir, python_version, image)[0]


def installed_packages() -> Dict[str, Optional[str]]:
    """The running interpreter's distributions (normalised name -> version): on the GPU machine,
    the image as it really is, to check the set against instead of :data:`IMAGE_PACKAGES`."""
    from importlib import metadata

    out: Dict[str, Optional[str]] = {}
    for d in metadata.distributions():
        name = d.metadata["Name"]
        if name:
            out.setdefault(canonicalize_name(name), d.version)
    return out


def install_offline(wheel_dir, target, python_version: Optional[str] = None) -> List[Path]:
    """``pip install --no-index --no-deps --no-compile --target target`` every wheel in
    ``wheel_dir``, as the GPU command does; for ``python_version`` (``"X.Y"``) other than the
    running interpreter's, with pip's cross-install flags. Returns the wheels installed; raises
    :class:`WheelInstallError` with pip's output on failure."""
    whls = wheels_in(wheel_dir)
    if not whls:
        raise WheelInstallError(f"no wheels in {wheel_dir}")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
           "--no-index", "--no-deps", "--no-compile", "--target", str(target)]
    if python_version and python_version != "%d.%d" % sys.version_info[:2]:
        cmd += ["--python-version", python_version, "--implementation", "cp",
                "--only-binary=:all:"]
        for plat in PIP_PLATFORMS:
            cmd += ["--platform", plat]
    cmd += [str(w) for w in whls]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise WheelInstallError(
            f"pip install exited {proc.returncode}:\n{proc.stderr.strip() or proc.stdout.strip()}")
    return whls


_IMPORT_PROBE = r"""
import importlib, json, sys
out, mods = sys.argv[1], sys.argv[2:]
res = []
for m in mods:
    try:
        mod = importlib.import_module(m)
        res.append({"module": m, "file": getattr(mod, "__file__", None)})
    except BaseException as e:
        res.append({"module": m, "error": "%s: %s" % (type(e).__name__, e)})
    with open(out, "w") as f:
        json.dump(res, f)
"""


def import_problems(target, modules: Sequence[str] = MODULES, timeout_s: float = 600.0
                    ) -> List[str]:
    """Import each module in a fresh interpreter with ``PYTHONPATH=target`` first; report each
    that fails, or whose ``__file__`` lies outside ``target`` (it came from elsewhere)."""
    target = Path(target).resolve()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(target)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONWARNINGS", "ignore")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "imports.json"
        # cwd outside the checkout, so nothing imports from the current folder.
        proc = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, str(out), *modules],
                              cwd=tmp, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
        res = json.loads(out.read_text()) if out.exists() else []
    problems = []
    for r in res:
        if "error" in r:
            problems.append(f"{r['module']}: import failed: {r['error']}")
        elif not r["file"]:
            problems.append(f"{r['module']}: imported, but has no __file__ (not from {target})")
        elif not Path(r["file"]).resolve().is_relative_to(target):
            problems.append(f"{r['module']}: imported from {r['file']}, not from {target}")
    if len(res) < len(modules):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        problems.append(f"import probe exited {proc.returncode} after "
                        f"{len(res)}/{len(modules)} modules: " + " | ".join(tail))
    return problems


def missing_top_level(target, names: Iterable[str] = TOP_LEVEL) -> List[str]:
    """The top-level packages or modules that are not in ``target``."""
    t = Path(target)
    return [n for n in names if not (t / n).is_dir() and not (t / f"{n}.py").exists()]


def fetch(dest, python_version: str = GPU_PYTHON) -> None:
    """Run ``fetch-wheels --dest dest --python-version python_version`` with this interpreter."""
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(["bash", str(FETCH_SCRIPT), "--dest", str(dest),
                    "--python-version", python_version], check=True, env=env)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.campaign.wheels",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=str(REPO_ROOT / ".whl"), help="wheel folder (default .whl)")
    ap.add_argument("--python-version", default=GPU_PYTHON,
                    help=f"target interpreter X.Y (default {GPU_PYTHON}, the GPU image's)")
    ap.add_argument("--fetch", action="store_true", help="run fetch-wheels into --dir first")
    ap.add_argument("--installed", action="store_true",
                    help="check requirements against this interpreter's packages instead of the "
                    "image snapshot (on the GPU machine: against the image as it is)")
    args = ap.parse_args(argv)
    wdir = Path(args.dir)
    if args.fetch:
        fetch(wdir, args.python_version)
    whls = wheels_in(wdir)
    print(f"{len(whls)} wheels in {wdir} for CPython {args.python_version}")
    problems, unverified = check_requirements(
        wdir, args.python_version, installed_packages() if args.installed else None)
    if unverified:
        reqs = sorted({u.split(" requires ", 1)[1].replace(" (image version unknown)", "")
                       for u in unverified})
        print("  unverified, the image's version not recorded: " + "; ".join(reqs))
    local = args.python_version == "%d.%d" % sys.version_info[:2]
    if whls:
        with tempfile.TemporaryDirectory(prefix="wheels-target-") as target:
            try:
                install_offline(wdir, target, args.python_version)
                print("  install --no-index --no-deps: ok")
                problems += [f"not installed: {n}" for n in missing_top_level(target)]
                if local:
                    problems += import_problems(target)
                    print(f"  imports of {len(MODULES)} modules from the target: checked")
            except WheelInstallError as e:
                problems.append(str(e))
    if not local:
        print(f"  imports: not checked (this is Python {sys.version_info[0]}."
              f"{sys.version_info[1]}; run this on a {args.python_version} interpreter)")
    for p in problems:
        print(f"  PROBLEM: {p}")
    print("wheels: " + (f"{len(problems)} problem(s)" if problems else "ok"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
