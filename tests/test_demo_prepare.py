"""demo.prepare / demo/common.py: a demo's original model is checked against what the demo claims;
an under-trained one is trained on up to a cap, then refused with one clear line; nothing broken is
saved or analysed."""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import pytest
import torch

import demo
from demo import common
from demo.common import Quality, QualityBar
from demo.faces import FACES
from demo.signs import SIGNS
from Helper import CasePaths, HuddError

pytestmark = pytest.mark.xdist_group("test_demo_prepare")  # its module-scoped fixture is built once (conftest.py)

SMALL = {"train": 90, "test": 60, "improve": 60}
BAR = QualityBar(ordinary=95.0, gap=20.0)
# One epoch, then up to two more one at a time: a tiny model that cannot reach the bar.
QUICK = dataclasses.replace(SIGNS, recipe=dataclasses.replace(SIGNS.recipe, epochs=1, more_epochs=1,
                                                              max_more_epochs=2))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepare") / "case"
    common.build_case(SIGNS, root, 0, SMALL, 1)
    return root


@pytest.fixture()
def case(built, tmp_path) -> Path:
    copy = tmp_path / "case"
    shutil.copytree(built, copy)
    return copy


def scripted(monkeypatch, *accuracies: dict[str, float]) -> list:
    """Makes measure_quality return these figures in turn; returns the list of calls."""
    calls = []

    def fake(demo_case, paths, device, model=None):
        calls.append(model)
        return Quality(demo_case.quality, accuracies[min(len(calls), len(accuracies)) - 1], {})
    monkeypatch.setattr(common, "measure_quality", fake)
    return calls


GOOD = {"none": 99.0, "night": 40.0, "fog": 60.0}
POOR = {"none": 60.0, "night": 20.0, "fog": 30.0}


def test_quality_verdicts():
    assert Quality(BAR, GOOD, {}).passes
    poor = Quality(BAR, POOR, {})
    assert poor.under_trained and not poor.passes
    close = Quality(BAR, {"none": 99.0, "night": 40.0, "fog": 80.0}, {})
    assert not close.under_trained and close.too_close() == ["fog"] and not close.passes
    assert Quality(BAR, {"none": 95.0, "fog": 75.0}, {}).passes     # the bar and the gap are inclusive


def test_an_untrained_model_is_trained_on_up_to_the_cap_then_refused(case, caplog):
    with caplog.at_level(logging.WARNING, logger="hudd"), pytest.raises(HuddError) as refused:
        common.prepare_case(QUICK, case, 0, "cpu", threads=1)
    message = str(refused.value)
    assert "\n" not in message and str(case) in message
    assert "ordinary test images right, below the 95% it needs" in message
    assert "trained 1+2 epochs" in message and "nothing was saved" in message and "--seed" in message
    assert "none " in message and "night " in message                    # the figures, per scenario
    assert len([r for r in caplog.records if "training on" in r.getMessage()]) == 2
    assert not (case / "DNNModels" / "OriginalModel.pth").exists()


def test_training_on_stops_as_soon_as_the_bar_is_met_and_saves(case, monkeypatch):
    calls = scripted(monkeypatch, POOR, GOOD)
    common.prepare_case(QUICK, case, 0, "cpu", threads=1)
    model_path = case / "DNNModels" / "OriginalModel.pth"
    assert len(calls) == 2 and all(model is not None for model in calls)   # after 1 epoch, after 1 more
    saved = model_path.read_bytes()
    # A rerun checks the saved model (no model passed: the case's own file) and trains nothing.
    common.prepare_case(QUICK, case, 0, "cpu", threads=1)
    assert len(calls) == 3 and calls[-1] is None and model_path.read_bytes() == saved


def test_rare_conditions_too_close_to_ordinary_images_are_refused_without_training_on(case, monkeypatch):
    calls = scripted(monkeypatch, {"none": 99.0, "night": 40.0, "fog": 85.0})
    gap = QUICK.quality.gap
    with pytest.raises(HuddError, match=rf"fog not {gap:g} points below the ordinary images.*trained 1 epochs"):
        common.prepare_case(QUICK, case, 0, "cpu", threads=1)
    assert len(calls) == 1 and not (case / "DNNModels" / "OriginalModel.pth").exists()


def test_an_existing_broken_model_is_refused_and_kept(case):
    """A model left from before (here: untrained weights) is judged by the real test-step inference."""
    torch.manual_seed(0)
    model_path = case / "DNNModels" / "OriginalModel.pth"
    common.save_model(SIGNS.recipe.new_model(), model_path)
    before = model_path.read_bytes()
    with pytest.raises(HuddError, match=rf"not the model the demo claims.*remove {model_path}"):
        common.prepare_case(SIGNS, case, 0, "cpu")
    assert model_path.read_bytes() == before


def test_the_quality_figures_come_from_the_test_step(case):
    common.train_original_model(QUICK, case, 0, "cpu", 1, 1)
    quality = common.measure_quality(SIGNS, CasePaths(case), "cpu")
    assert sum(quality.images.values()) == SMALL["test"]
    assert list(quality.accuracy)[0] == "none" and set(quality.accuracy) <= set(SIGNS.scenarios)
    assert all(0.0 <= value <= 100.0 for value in quality.accuracy.values())


def test_prepare_picks_the_demo_of_each_kind(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(common, "prepare_case", lambda demo_case, case, seed, device: seen.append(demo_case))
    demo.prepare("signs", tmp_path, 0, "cpu")
    demo.prepare("fld", tmp_path, 0, "cpu")
    assert seen == [SIGNS, FACES]
    assert demo.KINDS == {"signs": "HUDD_demo", "fld": "HUDD_demo_fld"}
    with pytest.raises(HuddError, match="unknown"):
        demo.prepare("cars", tmp_path, 0, "cpu")
