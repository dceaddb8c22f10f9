"""CI runs README's test command, then the lane on the GPU image's versions (``.ci/image-lane``), and
``pyproject.toml``'s floors are versions one of the two lanes installs: a user on an older stack
gets an answer from pip, not a crash. (The lane itself runs in CI; here only what ties the three
files together is checked, in milliseconds.)"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from tests.multiproc import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
README_COMMAND = "python3 -m pytest tests benchmarks --benchmark-disable -q -n 2 --dist loadfile"


def _commands(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _lane_pins() -> dict[str, str]:
    """``name==version`` pins of the lane's install commands."""
    text = (ROOT / ".ci" / "image-lane").read_text()
    return dict(re.findall(r"\b([a-z][a-z0-9-]*)==([0-9][0-9.]*)", text))


def _floors() -> dict[str, Version]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for group in project["optional-dependencies"].values() for r in group]
    floors = {}
    for req in map(Requirement, reqs):
        for spec in req.specifier:
            if spec.operator == ">=":
                floors[req.name] = min(floors.get(req.name, Version(spec.version)), Version(spec.version))
    return floors


def test_ci_runs_readmes_command_then_the_image_lane():
    commands = _commands(ROOT / ".ci" / "run")
    assert README_COMMAND in commands and commands[-1] == ".ci/image-lane", commands
    assert commands.index(README_COMMAND) == len(commands) - 2  # README's first, unchanged
    readme = (ROOT / "README.md").read_text()
    assert README_COMMAND.replace("python3", "python") in readme and "\n.ci/image-lane\n" in readme
    subprocess.run(["bash", "-n", str(ROOT / ".ci" / "image-lane")], check=True)  # it parses


def test_the_image_lane_pins_the_gpu_images_versions_and_a_cpu_torch():
    pins = _lane_pins()
    assert pins == {"torch": "2.13.0", "triton": "3.6.0", "transformers": "5.17.0", "accelerate": "1.15.0"}
    text = (ROOT / ".ci" / "image-lane").read_text()
    assert "'numpy<2.4'" in text  # triton 3.6's interpreter runs the kernels only below numpy 2.4
    # torch is installed alone, before anything that asks for it (or pip pulls the CUDA build)
    installs = [c for c in _commands(ROOT / ".ci" / "image-lane") if "pip install" in c]
    assert installs[0].endswith("pip install -q torch==2.13.0"), installs


def test_floors_are_the_versions_the_lanes_test():
    """The lowest of the two lanes: the image lane's pins (triton, transformers, accelerate) and the
    torch both install. A floor below them promises a version nobody tests."""
    floors, pins = _floors(), _lane_pins()
    for name in ("torch", "triton", "transformers", "accelerate"):
        assert floors[name] == Version(pins[name]), (name, floors.get(name), pins[name])
    assert {"datasets", "deepspeed", "numpy"} <= set(floors)  # unpinned in the lanes: what they install


def test_deepspeed_builds_its_cpu_op_in_a_directory_of_this_session():
    """A stale lock in the machine's shared torch-extensions cache hung every ZeRO-3 test of stop
    37's CI: this session, its xdist workers and every rank they spawn build into a directory made
    by ``tests/conftest.py`` for this session only."""
    ours = os.environ["TORCH_EXTENSIONS_DIR"]
    assert ours == os.environ["SIMPO_TEST_TORCH_EXTENSIONS_DIR"]
    assert Path(ours).is_dir()
    assert Path(ours).name.startswith("simpo-test-torch-extensions-")
    assert Path(ours).parent == Path(tempfile.gettempdir())
    assert subprocess_env()["TORCH_EXTENSIONS_DIR"] == ours
