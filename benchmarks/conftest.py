"""pytest configuration for the benchmark suites.

    python -m pytest benchmarks --benchmark-disable -q        # CI: checks + one call per case
    python -m pytest benchmarks -k fwd_bwd --bench-families gemma2-9b --bench-tokens 8192

On CPU the suites run the CPU smoke families; on CUDA the GPU families (override with
``--bench-families``). Each (case, impl) is checked against the reference before it is timed.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import cases as C
from benchmarks import measure as M
# a test that meets the library's refusal of the Triton interpreter (triton <= 3.6 under
# numpy >= 2.4) is skipped with its reason, as under tests/
from tests.triton_helpers import pytest_runtest_makereport  # noqa: F401


def pytest_addoption(parser):
    g = parser.getgroup("simpo-bench")
    g.addoption("--bench-device", default=None, help="cuda or cpu (default: cuda if available)")
    g.addoption("--bench-families", default=None, help="comma list of case families")
    g.addoption("--bench-tokens", default=None, help="comma list of token counts (GPU families)")
    g.addoption("--bench-impls", default=",".join(C.IMPLS), help="comma list of impls (the precompute "
                                                                 "suite runs benchmarks.cases.PRECOMPUTE_IMPLS)")


def _device(config) -> torch.device:
    d = config.getoption("--bench-device")
    return torch.device(d or ("cuda" if torch.cuda.is_available() else "cpu"))


def pytest_generate_tests(metafunc):
    precompute = {"precompute_case", "precompute_impl"} <= set(metafunc.fixturenames)
    if not ({"case", "impl"} <= set(metafunc.fixturenames) or precompute):
        return
    cfg = metafunc.config
    device = _device(cfg)
    fams = cfg.getoption("--bench-families")
    fams = fams.split(",") if fams else list(C.default_families(device))
    toks = cfg.getoption("--bench-tokens")
    toks = [int(t) for t in toks.split(",")] if toks else None
    impls = cfg.getoption("--bench-impls").split(",")
    params = []
    for case in C.cases_for(fams, toks):
        fam = C.FAMILIES[case.family]
        if precompute:  # the precompute pass at the DPO families (the loss that needs it)
            if fam.loss == "dpo":
                params += [pytest.param(case, i, id=f"{case.id}-{i}") for i in C.PRECOMPUTE_IMPLS if i in fam.impls]
            continue
        for impl in impls:
            if impl in fam.impls:
                params.append(pytest.param(case, impl, id=f"{case.id}-{impl}"))
    metafunc.parametrize("precompute_case,precompute_impl" if precompute else "case,impl", params)


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> torch.device:
    return _device(pytestconfig)


class _Pool:
    """One live :class:`CaseContext` at a time (GPU inputs are large), plus the check results."""

    def __init__(self, device):
        self.device, self.ctx, self.checks = device, None, {}

    def get(self, case):
        if self.ctx is None or self.ctx.case != case:
            if self.ctx is not None:
                self.ctx.close()
            self.ctx = M.CaseContext(case, self.device)
        return self.ctx

    def close(self):
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None


@pytest.fixture(scope="session")
def case_pool(bench_device):
    pool = _Pool(bench_device)
    yield pool
    pool.close()
