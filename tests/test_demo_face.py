"""demo/faces.py: the synthetic facial keypoint case study (plan, geometry, drawing, files, training)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from architectures import KPNetSmall
from demo import common
from demo import faces as demoFace
from Helper import CasePaths, HuddError

pytestmark = pytest.mark.xdist_group("test_demo_face")  # its module-scoped fixture is built once (conftest.py)

TINY = {"train": 40, "test": 20, "improve": 20}


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("face") / "case"
    demoFace.build_face_case(root, seed=0, sizes=TINY)
    return root


def ordinary_params(**changes) -> dict:
    """An ordinary face's parameters (the first `none` test image of seed 0), with some changed."""
    plan = demoFace.plan_face_case(seed=0, sizes={"train": 1, "test": 40, "improve": 1})
    p = next(p for p in plan["test"] if p["scenario"] == "none")
    return {**p, **changes}


# --------------------------------------------------------------------------------------------
# The plan (no drawing)
# --------------------------------------------------------------------------------------------

def test_full_size_plan_has_the_stated_proportions():
    plan = demoFace.plan_face_case(seed=0)
    assert {k: len(v) for k, v in plan.items()} == demoFace.DEFAULT_SIZES
    assert set(demoFace.RARE_SCENARIOS) == {"turned_head", "sunglasses", "hand_occlusion", "dark"}
    for set_key, records in plan.items():
        scenarios = pd.Series([p["scenario"] for p in records]).value_counts()
        for rare in demoFace.RARE_SCENARIOS:
            share = scenarios[rare] / len(records)
            assert share == pytest.approx(demoFace.RARE_SHARE[set_key], abs=0.001), (set_key, rare)
        assert scenarios["none"] == len(records) - sum(scenarios[r] for r in demoFace.RARE_SCENARIOS)


def test_plan_records_the_parameters_of_each_condition():
    plan = demoFace.plan_face_case(seed=1, sizes={"test": 200})
    specific = {"sunglasses": ["glasses_opacity", "glasses_tone", "glasses_size", "glasses_drop", "glasses_spread",
                               "glasses_glint"],
                "hand_occlusion": ["hand_x", "hand_y", "hand_size", "hand_angle", "hand_tone"],
                "dark": ["dark_level"]}
    for p in plan["test"]:
        assert tuple(p) == demoFace.METADATA_COLUMNS
        for scenario, columns in specific.items():
            assert all((p[c] is not None) == (p["scenario"] == scenario) for c in columns), (p["scenario"], scenario)
        assert (abs(p["yaw"]) >= 38) == (p["scenario"] == "turned_head")


def test_plan_is_deterministic_and_depends_on_the_seed():
    assert demoFace.plan_face_case(seed=3, sizes=TINY) == demoFace.plan_face_case(seed=3, sizes=TINY)
    other = demoFace.plan_face_case(seed=4, sizes=TINY)
    assert other["test"] != demoFace.plan_face_case(seed=3, sizes=TINY)["test"]


@pytest.mark.parametrize("bad", [{"train": 0}, {"valid": 10}, {"test": 2.5}])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(HuddError):
        demoFace.plan_face_case(seed=0, sizes=bad)


# --------------------------------------------------------------------------------------------
# Geometry: the keypoints match the drawing
# --------------------------------------------------------------------------------------------

def test_keypoints_are_27_points_inside_the_image_for_every_condition():
    plan = demoFace.plan_face_case(seed=2, sizes={"train": 200, "test": 200, "improve": 200})
    for records in plan.values():
        for p in records:
            points = demoFace.face_keypoints(p)
            assert points.shape == (27, 2)
            assert (points >= 1).all() and (points <= demoFace.IMAGE_SIZE - 2).all(), p["image"]


def test_keypoint_layout_follows_the_fld_order():
    k = demoFace.face_keypoints(ordinary_params(rotation=0.0, yaw=0.0))
    x, y = k[:, 0], k[:, 1]
    assert x[0] < x[1] < x[2] < x[3]                    # brows, left to right
    assert y[4] < y[5] < y[7]                           # ridge top, middle, nose tip
    assert x[6] < x[7] < x[8]                           # nostrils either side of the tip
    assert x[9] < x[12] and x[16] > x[19]               # outer corners are outermost
    assert x[9:16].max() < x[16:23].min()               # left eye left of the right eye
    assert y[1] < y[10] and y[2] < y[17]                # brows above the eyes
    assert y[24] < y[23] < y[26] and x[23] < x[24] < x[25]   # mouth corners, top, bottom
    assert y[7] < y[24]                                 # mouth below the nose


def test_pupil_keypoints_lie_on_dark_pixels():
    for changes in ({}, {"rotation": 9.0}, {"yaw": 10.0, "gaze_x": 1.0}):
        p = ordinary_params(blur=0.0, noise=0.0, side_light=0.0, **changes)
        pixels = np.asarray(demoFace.render_face(p), dtype=float)
        points = demoFace.face_keypoints(p)
        skin = float(p["skin_tone"]) * float(p["brightness"])
        for pupil in (15, 22):
            x, y = np.round(points[pupil]).astype(int)
            assert pixels[y, x] < 0.6 * skin, (changes, pupil, pixels[y, x], skin)
        # just under the top of the upper lip is lip, darker than skin
        assert pixels[int(round(points[24, 1])) + 1, int(round(points[24, 0]))] < skin


def test_keypoints_follow_rotation_exactly():
    p = ordinary_params(rotation=0.0)
    turned = ordinary_params(rotation=10.0)
    cx, cy = float(p["center_x"]), float(p["center_y"])
    theta = np.radians(10.0)
    dx, dy = demoFace.face_keypoints(p)[:, 0] - cx, demoFace.face_keypoints(p)[:, 1] - cy
    expected = np.stack([cx + dx * np.cos(theta) + dy * np.sin(theta),
                         cy - dx * np.sin(theta) + dy * np.cos(theta)], axis=1)
    np.testing.assert_allclose(demoFace.face_keypoints(turned), expected, atol=1e-9)


def test_eye_keypoints_move_with_a_turned_head():
    straight = ordinary_params(yaw=0.0, rotation=0.0)
    turned = ordinary_params(yaw=45.0, rotation=0.0)
    a, b = demoFace.face_keypoints(straight), demoFace.face_keypoints(turned)
    half_width = float(straight["face_half_width"])
    # Both eyes and the nose tip move right, the far (right) eye is foreshortened.
    assert (b[9:23, 0] - a[9:23, 0]).min() > 0.1 * half_width
    assert b[7, 0] - a[7, 0] > 0.5 * half_width
    width = lambda k, eye: k[eye + 0, 0] - k[eye + 3, 0]  # noqa: E731  outer minus inner corner
    assert abs(width(b, 16)) < 0.6 * abs(width(a, 16))
    np.testing.assert_allclose(a[9:23, 1], b[9:23, 1], atol=1e-9)   # a turn does not move them vertically
    # The drawing moves with them: the turned face's pupil is still dark.
    p = {**turned, "blur": 0.0, "noise": 0.0, "side_light": 0.0}
    pixels = np.asarray(demoFace.render_face(p), dtype=float)
    x, y = np.round(b[15]).astype(int)
    assert pixels[y, x] < 0.6 * float(p["skin_tone"]) * float(p["brightness"])


def test_sunglasses_cover_the_eyes_and_keep_their_labels():
    plain = ordinary_params(blur=0.0, noise=0.0, side_light=0.0)
    glasses = {**plain, "scenario": "sunglasses", "glasses_opacity": 1.0, "glasses_tone": 20.0,
               "glasses_size": 1.6, "glasses_drop": 0.0, "glasses_spread": 1.0, "glasses_glint": 0.5}
    np.testing.assert_array_equal(demoFace.face_keypoints(plain), demoFace.face_keypoints(glasses))
    pixels = np.asarray(demoFace.render_face(glasses), dtype=float)
    for corner in (12, 19):   # inner corners: white of the eye without glasses, dark lens with them
        x, y = np.round(demoFace.face_keypoints(glasses)[corner]).astype(int)
        assert pixels[y, x] < 45


# --------------------------------------------------------------------------------------------
# The written case study
# --------------------------------------------------------------------------------------------

def test_layout_labels_and_metadata(tiny_case):
    paths = CasePaths(tiny_case)
    for key, folder in (("train", "TrainingSet"), ("test", "TestSet"), ("improve", "ImprovementSet")):
        set_dir = paths.datasets / folder
        images = sorted(p.name for p in set_dir.glob("*.png"))
        assert images == [f"img_{i:05d}.png" for i in range(TINY[key])]
        assert not [p for p in set_dir.iterdir() if p.is_dir()]
        labels = pd.read_csv(set_dir / "labels.csv")
        assert list(labels.columns) == ["image"] + [f"kp{k}_{a}" for k in range(27) for a in ("x", "y")]
        assert list(labels["image"]) == images
        coords = labels.iloc[:, 1:].to_numpy(float)
        assert ((coords >= 0) & (coords <= 63)).all()
        metadata = pd.read_csv(set_dir / "metadata.csv")
        assert tuple(metadata.columns) == demoFace.METADATA_COLUMNS
        assert list(metadata["image"]) == images
        assert set(metadata["scenario"]) <= set(demoFace.SCENARIOS)
        expected = demoFace.rare_count(TINY[key], key)
        for rare in demoFace.RARE_SCENARIOS:
            assert (metadata["scenario"] == rare).sum() == expected
        with Image.open(set_dir / images[0]) as image:
            assert (image.mode, image.size) == ("L", (64, 64))
        # an image is a pure function of its metadata row
        row = metadata.iloc[0].to_dict()
        with Image.open(set_dir / row["image"]) as image:
            np.testing.assert_array_equal(np.asarray(image), np.asarray(demoFace.render_face(row)))
    settings = json.loads(paths.settings_file.read_text())
    assert settings["task"] == "keypoints" and settings["arch"] == "kpnet-small"
    assert settings["input_size"] == [64, 64] and settings["channels"] == 1
    assert settings["error_threshold"] == demoFace.ERROR_THRESHOLD


def test_same_seed_gives_identical_files_and_another_seed_different_ones(tiny_case, tmp_path):
    again = tmp_path / "again"
    demoFace.build_face_case(again, seed=0, sizes=TINY, workers=2)
    assert files_of(again) == files_of(tiny_case)
    other = tmp_path / "other"
    demoFace.build_face_case(other, seed=1, sizes=TINY)
    first, second = files_of(tiny_case), files_of(other)
    assert first.keys() == second.keys()
    images = [name for name in first if name.endswith(".png")]
    assert sum(first[n] == second[n] for n in images) == 0


def test_refuses_a_non_empty_datasets_folder_and_keeps_hudd_json(tmp_path):
    root = tmp_path / "case"
    (root / "DataSets").mkdir(parents=True)
    (root / "DataSets" / "something.txt").write_text("keep me")
    with pytest.raises(HuddError, match="not empty"):
        demoFace.build_face_case(root, seed=0, sizes=TINY)
    assert [p.name for p in (root / "DataSets").iterdir()] == ["something.txt"]

    # An empty DataSets folder is fine, and an existing hudd.json is left as it is.
    empty = tmp_path / "empty"
    (empty / "DataSets").mkdir(parents=True)
    (empty / "hudd.json").write_text('{"arch": "mine"}')
    summary = demoFace.build_face_case(empty, seed=0, sizes={"train": 3, "test": 2, "improve": 2})
    assert json.loads((empty / "hudd.json").read_text()) == {"arch": "mine"}
    assert summary["sizes"] == {"train": 3, "test": 2, "improve": 2}
    assert not list(empty.glob(".DataSets.partial-*"))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def test_training_smoke_saves_a_loadable_model_and_never_overwrites(tiny_case, tmp_path):
    import shutil
    case = tmp_path / "trained"
    shutil.copytree(tiny_case, case)
    threads = torch.get_num_threads()
    path = demoFace.train_face_model(case, seed=0, epochs=1)
    assert torch.get_num_threads() == threads
    assert path == case / "DNNModels" / "OriginalModel.pth"
    model = KPNetSmall(num_classes=27, in_channels=1)
    model.load_state_dict(torch.load(path, map_location="cpu"))
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 27, 64, 64)
    saved = path.read_bytes()
    with pytest.raises(HuddError, match="already exists"):
        demoFace.train_face_model(case, seed=0, epochs=1)
    assert path.read_bytes() == saved
    quality = common.measure_quality(demoFace.FACES, CasePaths(case), "cpu")
    assert sum(quality.images.values()) == TINY["test"]
    assert set(quality.accuracy) <= set(demoFace.SCENARIOS)
    assert all(0 <= a <= 100 for a in quality.accuracy.values())
