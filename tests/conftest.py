"""Shared fixtures: tiny case studies built on the fly (tests/helpers.py builds them)."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import SETTINGS, build_case, hudd


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
