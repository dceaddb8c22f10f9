"""Shared test setup.

Without CUDA, the Triton kernels run in the Triton interpreter. ``TRITON_INTERPRET`` is read when
the ``@triton.jit`` decorators run, i.e. when ``simpo_kernels.kernels`` is first imported, so it
is set here, before any test module imports the package.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
