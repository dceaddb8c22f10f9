"""Benchmarks for simpo-kernels: pytest-benchmark suites, a one-call GPU runner, a report renderer.

    python -m pytest benchmarks --benchmark-disable -q   # CI smoke on CPU (checks only)
    python -m benchmarks --out DIR                       # the runner (see benchmarks/README.md)

Case definitions live in :mod:`benchmarks.cases`; implementations, correctness checks, timing and
memory measurement in :mod:`benchmarks.measure`; plots and tables in :mod:`benchmarks.report`;
the end-to-end training step in :mod:`benchmarks.e2e`.
"""
