"""The ``triton`` backend: fused Triton kernels for per-token log-probabilities.

Named ``kernels`` (not ``triton``) so that it never shadows the ``triton`` package. Files, one per
pass: :mod:`.lse_forward` (forward from hidden states), :mod:`.logprob_backward` (its backward),
:mod:`.row_kernels` (both passes from given logits), :mod:`.function` (autograd glue),
:mod:`.launch` (tile shapes per dtype and the launch record the compile gate compiles). Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (which must
be set before this package is imported).
"""

from .function import BACKEND, check_dtype, token_logprobs, token_logprobs_from_logits
from .launch import InterpreterUnavailable, KernelConfig, interpreter_problem, make_config

__all__ = ["BACKEND", "InterpreterUnavailable", "KernelConfig", "check_dtype", "interpreter_problem", "make_config",
           "token_logprobs", "token_logprobs_from_logits"]
