"""Shared test setup.

Without CUDA, the Triton kernels run in the Triton interpreter. ``TRITON_INTERPRET`` is read when
the ``@triton.jit`` decorators run, i.e. when ``simpo_kernels.kernels`` is first imported, so it
is set here, before any test module imports the package.

Where the interpreter cannot run the kernels (triton <= 3.6 under numpy >= 2.4), a test that meets
the library's refusal is reported as skipped with its reason, not failed: the hook
``pytest_runtest_makereport`` of ``tests/triton_helpers.py`` (``benchmarks/conftest.py`` imports it
too).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.triton_helpers import pytest_runtest_makereport  # noqa: E402,F401
