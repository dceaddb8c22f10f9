"""Largest single tensor allocation of a CPU computation, measured with torch.profiler."""

from __future__ import annotations

from typing import Callable

from torch.profiler import ProfilerActivity, profile


def largest_cpu_allocation(fn: Callable[[], object]) -> int:
    """Bytes of the largest single tensor allocation made while ``fn()`` runs on CPU.

    Reads the profiler's memory timeline (every tensor creation with its size); where that private
    API is unavailable, falls back to the largest per-operator self allocation, which is the same
    number for ops that allocate one output.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    try:
        timeline = prof._memory_profile().timeline
        return max(size for _, action, _, size in timeline if "CREATE" in str(action))
    except Exception:  # pragma: no cover - depends on the torch version
        return max(e.self_cpu_memory_usage for e in prof.events())
