"""No ``N x V`` tensor is ever allocated by the Triton backend (forward + backward), on CPU.

``torch.profiler(profile_memory=True)`` records every allocation made through torch's allocator;
the largest single one must be far below ``N * V * 4`` bytes. Shapes make ``N * V`` large next to
``N * H`` and ``V * H`` so that an ``N x V`` buffer (or a float32 copy of the logits) could not
hide among legitimate allocations. The interpreter tiles are numpy arrays of block size by
construction (``BLOCK_N x BLOCK_V`` at most); torch-side buffers are what this test can see.
Large blocks keep the interpreter fast here; correctness at small blocks is tested elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from tests.profiling import largest_allocation
from tests.triton_helpers import DEVICE

kernels = pytest.importorskip("simpo_kernels.kernels")

N, H, V = 1024, 16, 512  # N*V*4 = 2 MiB; N*H*4 = 64 KiB; V*H*4 = 32 KiB
BIG_BLOCKS = dict(block_n=64, block_v=128, block_h=16, bwd_block_n=64, bwd_block_v=128, bwd_block_h=16,
                  logits_block_v=512)


def test_fused_path_never_allocates_n_by_v():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(DEVICE).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / 4).to(DEVICE).requires_grad_()
    bias = torch.randn(V, generator=g).to(DEVICE).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    targets[:100] = -100

    def run():
        logps, _ = kernels.token_logprobs(hidden, weight, bias, targets, softcap=30.0, ignore_index=-100,
                                          **BIG_BLOCKS)
        (logps * torch.linspace(-1, 1, N, device=DEVICE)).sum().backward()

    largest = largest_allocation(run)
    print(f"fused: largest allocation {largest} B vs N*V*4 = {N * V * 4} B")
    assert hidden.grad is not None and weight.grad is not None and bias.grad is not None
    assert 0 < largest <= N * V * 4 // 16, (largest, N * V * 4)


def test_logits_path_makes_no_float32_copy():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(N, V, generator=g) * 3).to(DEVICE, torch.float16).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)

    def run():
        logps, _ = kernels.token_logprobs_from_logits(logits, targets, ignore_index=-100, **BIG_BLOCKS)
        logps.sum().backward()

    largest = largest_allocation(run)
    print(f"logits fp16: largest allocation {largest} B; the fp16 gradient itself is {N * V * 2} B")
    assert logits.grad.dtype == torch.float16
    assert largest <= N * V * 2, (largest, N * V * 2)  # the gradient, nothing in float32
