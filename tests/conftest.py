"""Shared test setup.

Without CUDA, the Triton kernels run in the Triton interpreter. ``TRITON_INTERPRET`` is read when
the ``@triton.jit`` decorators run, i.e. when ``simpo_kernels.kernels`` is first imported, so it
is set here, before any test module imports the package.

Where the interpreter cannot run the kernels (triton <= 3.6 under numpy >= 2.4), a test that meets
the library's refusal is reported as skipped with its reason, not failed: the hook
``pytest_runtest_makereport`` of ``tests/triton_helpers.py`` (``benchmarks/conftest.py`` imports it
too).

DeepSpeed on CPU builds its shared-memory op just in time into ``TORCH_EXTENSIONS_DIR``
(``~/.cache/torch_extensions`` by default), and torch guards every load of it with a ``lock`` file
that a process killed while holding it leaves behind: from then on every ZeRO-3 run on the machine
waits for that file forever (stop 37's CI: all 9 ZeRO-3 tests hung to their 400 s timeout behind a
lock an interrupted run had left in the machine's cache). So each test session builds into its own
directory, made here once and inherited by pytest-xdist's workers and every spawned rank (about
25 s of compiling per session, once).
"""

import atexit
import os
import shutil
import tempfile

import torch

if "SIMPO_TEST_TORCH_EXTENSIONS_DIR" not in os.environ:
    _extensions = tempfile.mkdtemp(prefix="simpo-test-torch-extensions-")
    atexit.register(shutil.rmtree, _extensions, True)
    os.environ["SIMPO_TEST_TORCH_EXTENSIONS_DIR"] = _extensions
os.environ["TORCH_EXTENSIONS_DIR"] = os.environ["SIMPO_TEST_TORCH_EXTENSIONS_DIR"]

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.triton_helpers import pytest_runtest_makereport  # noqa: E402,F401
