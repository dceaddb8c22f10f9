"""Largest single tensor allocation of a computation, measured with torch.profiler."""

from __future__ import annotations

from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def largest_allocation(fn: Callable[[], object]) -> int:
    """Bytes of the largest per-operator allocation made while ``fn()`` runs (CPU, or CUDA too).

    Each operator's self memory is what it allocated (net of what it freed inside itself), so for
    an op that creates one output tensor it is that tensor's size. Stacks are not recorded: under
    the Triton interpreter they would cost gigabytes.
    """
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    return max(max(e.self_cpu_memory_usage, getattr(e, "self_device_memory_usage", 0))
               for e in prof.events())
