"""The torch backend never holds more than one chunk of logits (forward and backward)."""

from __future__ import annotations

import torch

from simpo_kernels import simpo_loss, simpo_loss_from_logits
from simpo_kernels.chunked import CHUNK_BUDGET_BYTES, default_chunk_size

from .profiling import largest_allocation


def _batch(rows, T, H, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, T, H, generator=g).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_(True)
    labels = torch.randint(0, V, (rows, T), generator=g)
    labels[:, :3] = -100
    return hidden, weight, labels


def test_torch_backend_largest_allocation_is_one_chunk():
    rows, T, H, V, chunk = 8, 512, 16, 2000, 256
    hidden, weight, labels = _batch(rows, T, H, V)
    full_logits = rows * T * V * 4  # 32.8 MB of float32 logits

    def step():
        simpo_loss(hidden, weight, labels, backend="torch", softcap=30.0, chunk_size=chunk).loss.backward()

    torch_peak = largest_allocation(step)
    eager_peak = largest_allocation(
        lambda: simpo_loss(hidden, weight, labels, backend="eager", softcap=30.0).loss.backward())
    chunk_bytes = chunk * V * 4
    print(f"largest allocation: torch {torch_peak} B, one chunk {chunk_bytes} B, "
          f"eager {eager_peak} B, full logits {full_logits} B")
    assert eager_peak >= full_logits  # the measurement can see an N x V tensor
    assert torch_peak <= chunk_bytes  # nothing bigger than one float32 chunk of logits
    assert torch_peak * 16 <= full_logits


def test_default_chunk_stays_within_budget_at_large_vocab():
    rows, T, H, V = 2, 2048, 16, 65536  # full float32 logits would be 1 GiB
    hidden, weight, labels = _batch(rows, T, H, V, seed=1)
    chunk = default_chunk_size(V, H, torch.float32)
    peak = largest_allocation(
        lambda: simpo_loss(hidden, weight, labels, backend="torch").loss.backward())
    print(f"default chunk {chunk} tokens; largest allocation {peak} B; budget {CHUNK_BUDGET_BYTES} B")
    assert peak <= chunk * V * 4 <= CHUNK_BUDGET_BYTES
    assert peak * 8 <= rows * T * V * 4


def test_from_logits_backward_makes_no_float32_copy():
    rows, T, V = 8, 256, 4000
    logits = torch.randn(rows, T, V, dtype=torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, V, (rows, T))
    peak = largest_allocation(
        lambda: simpo_loss_from_logits(logits, labels, backend="torch", chunk_size=64).loss.backward())
    # the gradient itself (bf16, N x V) is the only full-size tensor; no float32 N x V copy
    assert peak <= rows * T * V * 2
    assert logits.grad.dtype == torch.bfloat16


# -- schedules: the largest allocation stays within each schedule's stated scratch ---------------

def _schedule_peak(backend, schedule, rows, T, H, V, budget, softcap=30.0, seed=3):
    hidden, weight, labels = _batch(rows, T, H, V, seed=seed)
    hidden.grad = weight.grad = None

    def step():
        simpo_loss(hidden, weight, labels, backend=backend, schedule=schedule, softcap=softcap,
                   memory_budget=budget).loss.backward()

    return largest_allocation(step)


def test_pairs_schedule_holds_one_chunk_of_pairs():
    """pairs: one chunk of whole pairs' float32 logits (the budget), the float32 [V, H] dW
    accumulator and the [N, H] stored dH; nothing of the full logits' size."""
    rows, T, H, V = 8, 512, 16, 2000
    targets_per_pair = 2 * (T - 3)  # prompts of 3 positions
    budget = int(1.3 * targets_per_pair * V * 4)  # one pair per chunk (8.1 MB), not two
    full_logits = rows * T * V * 4
    peak = _schedule_peak("torch", "pairs", rows, T, H, V, budget)
    stated = max(budget, V * H * 4, rows * T * H * 4)
    print(f"pairs: largest allocation {peak} B, budget {budget} B, full logits {full_logits} B")
    assert peak <= stated
    assert peak * 3 <= full_logits


def test_vocab_schedule_holds_one_vocabulary_chunk():
    """vocab: one [n_targets, chunk] float32 logits buffer (the budget) and the [n, H] float32 dH;
    dW is written chunk by chunk into the [V, H] gradient itself (no float32 accumulator)."""
    rows, T, H, V = 8, 512, 16, 2000
    budget = 2 * 2**20
    peak = _schedule_peak("torch", "vocab", rows, T, H, V, budget)
    full_logits = rows * T * V * 4
    print(f"vocab: largest allocation {peak} B, budget {budget} B, full logits {full_logits} B")
    assert peak <= budget
    assert peak * 8 <= full_logits


def test_triton_row_kernel_schedules_hold_their_chunks():
    """The same bounds with the Triton row kernels (interpreter): they allocate only [3, n] outputs
    and write dz over the logits."""
    rows, T, H, V = 4, 40, 8, 600
    full_logits = rows * T * V * 4
    pair_budget = int(1.3 * 2 * (T - 3) * V * 4)
    assert _schedule_peak("triton", "pairs", rows, T, H, V, pair_budget) <= max(pair_budget, V * H * 4)
    vocab_budget = full_logits // 8
    assert _schedule_peak("triton", "vocab", rows, T, H, V, vocab_budget) <= vocab_budget
