"""Shared fixtures: tiny case studies built on the fly (tests/helpers.py builds them)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import SETTINGS, build_case, hudd

# pytest.ini runs the tests on one worker process per CPU core (pytest-xdist, `-n auto --dist loadgroup`):
# most of the suite's time is single-threaded (the command line's runs, tiny tensors). Each worker, and
# the processes its tests start, get their share of the cores: torch's threads spinning for cores that
# the other worker holds cost more than they give on tensors this small.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

# Tests that share a module- or session-scoped fixture run on one worker, so that it is built once: a
# module's by `pytestmark = pytest.mark.xdist_group(...)` in the module, a session fixture's here.
SESSION_FIXTURES = ("retrained_case",)


def pytest_collection_modifyitems(items):
    for item in items:
        shared = [name for name in SESSION_FIXTURES if name in item.fixturenames]
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))


@pytest.fixture
def case(tmp_path: Path) -> Path:
    return build_case(tmp_path / "case")


@pytest.fixture
def make_case(tmp_path: Path):
    def make(name: str = "case", **kwargs) -> Path:
        return build_case(tmp_path / name, **kwargs)
    return make


@pytest.fixture(scope="session")
def retrained_case(tmp_path_factory):
    """A tiny case run through the whole pipeline with each retraining mode (2 runs, 2 epochs) by the
    real command line; returns the case and each mode's CompletedProcess."""
    case = build_case(tmp_path_factory.mktemp("retrain") / "case", per_class=8,
                      settings={**SETTINGS, "epochs": 2, "learning_rate": 0.05})
    return case, {mode: hudd("-o", str(case), "-mode", mode, "--runs", "2", timeout=600) for mode in ("HUDD", "BL1", "BL2")}
