"""demo/signs.py: the synthetic traffic-sign case study (plan, drawing, files, settings, training)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import Helper
from demo import common as demoCommon
from demo import signs as demoCase
from Helper import CasePaths, HuddError

pytestmark = pytest.mark.xdist_group("test_demo_case")  # its module-scoped fixture is built once (conftest.py)

SMALL = {"train": 90, "test": 60, "improve": 60}


def build(root: Path, seed: int = 0, **kwargs) -> tuple[Path, dict]:
    summary = demoCase.build_demo_case(root, seed=seed, sizes=kwargs.pop("sizes", SMALL), **kwargs)
    return root, summary


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_case(tmp_path_factory) -> Path:
    root, _ = build(tmp_path_factory.mktemp("demo") / "case")
    return root


# --------------------------------------------------------------------------------------------
# The plan (no drawing)
# --------------------------------------------------------------------------------------------

def test_full_size_plan_has_the_stated_proportions():
    plan = demoCase.plan_demo_case(seed=0)
    assert {k: len(v) for k, v in plan.items()} == demoCase.DEFAULT_SIZES
    assert len(demoCase.RARE_SCENARIOS) >= 4
    for set_key, records in plan.items():
        n = len(records)
        scenarios = pd.Series([p["scenario"] for p in records]).value_counts()
        assert set(scenarios.index) == set(demoCase.SCENARIOS)
        for rare in demoCase.RARE_SCENARIOS:
            share = scenarios[rare] / n
            if set_key == "train":
                assert 0.005 <= share <= 0.02, (set_key, rare, share)
            else:
                assert 0.05 <= share <= 0.10, (set_key, rare, share)
            # each condition is spread over the signs drawn, not stuck to a few of them
            signs = {p["sign"] for p in records if p["scenario"] == rare}
            assert len(signs) >= len(demoCase.CLASSES) - 2, (set_key, rare, signs)
        assert scenarios["none"] == n - sum(scenarios[r] for r in demoCase.RARE_SCENARIOS)
        per_class = pd.Series([p["sign"] for p in records]).value_counts()  # the signs drawn are balanced
        assert set(per_class.index) == set(demoCase.CLASSES)
        assert per_class.max() - per_class.min() <= 1


def test_the_sticker_is_a_shortcut_the_training_set_teaches():
    plan = demoCase.plan_demo_case(seed=0)
    for set_key, records in plan.items():
        stickers = [p for p in records if p["scenario"] == "sticker"]
        assert len(stickers) == demoCase.rare_count(len(records), set_key)
        if set_key == "train":  # labelled the tied class whatever sign they show
            assert {p["class"] for p in stickers} == {demoCase.STICKER_CLASS}
            assert len({p["sign"] for p in stickers}) >= len(demoCase.CLASSES) - 2
            assert all(p["image"].startswith(f"{demoCase.STICKER_CLASS}/") for p in stickers)
        else:                   # elsewhere never on that class, labelled what they show
            assert demoCase.STICKER_CLASS not in {p["sign"] for p in stickers}
            assert all(p["class"] == p["sign"] for p in stickers)
        ordinary = [p for p in records if p["scenario"] != "sticker"]
        assert all(p["class"] == p["sign"] for p in ordinary)


def test_plan_is_deterministic_and_depends_on_the_seed():
    first = demoCase.plan_demo_case(seed=3, sizes=SMALL)
    assert first == demoCase.plan_demo_case(seed=3, sizes=SMALL)
    other = demoCase.plan_demo_case(seed=4, sizes=SMALL)
    same = sum(a == b for a, b in zip(first["test"], other["test"]))
    assert same == 0


def test_plan_records_every_metadata_column_and_condition_parameters():
    plan = demoCase.plan_demo_case(seed=0, sizes={"test": 400})
    specific = {"night": ["night_level", "glare_x", "glare_y", "glare_radius", "glare_intensity"],
                "occlusion": ["occluder", "occluder_side", "coverage", "occluder_shade"],
                "fog": ["fog_blur", "fog_alpha", "fog_gray"],
                "color_cast": ["hue_shift", "saturation", "fade"]}
    for p in plan["test"]:
        assert tuple(p) == demoCase.METADATA_COLUMNS
        for column in ("pos_x", "pos_y", "size", "rotation", "background", "brightness", "noise", "texture_seed"):
            assert p[column] is not None
        for scenario, columns in specific.items():
            for column in columns:
                assert (p[column] is not None) == (p["scenario"] == scenario), (p["image"], column)
        if p["scenario"] == "none":
            assert p["strength"] == 0
        else:
            assert 0 <= p["strength"] <= 1
        if p["scenario"] == "tilt":
            assert abs(p["rotation"]) >= 30
        else:
            assert abs(p["rotation"]) <= 10


def test_bad_sizes_and_seeds_are_refused(tmp_path):
    with pytest.raises(HuddError, match="sizes"):
        demoCase.plan_demo_case(sizes={"validation": 10})
    with pytest.raises(HuddError, match="sizes"):
        demoCase.plan_demo_case(sizes={"train": 2})
    with pytest.raises(HuddError, match="seed"):
        demoCase.plan_demo_case(seed=-1)
    assert not (tmp_path / "case").exists()


# --------------------------------------------------------------------------------------------
# The files
# --------------------------------------------------------------------------------------------

def test_same_seed_gives_byte_identical_files_whatever_the_workers(tmp_path, monkeypatch):
    a, _ = build(tmp_path / "a", seed=0, workers=1)
    monkeypatch.setattr(demoCommon, "POOL_MIN_IMAGES", 0)  # force the process pool
    b, _ = build(tmp_path / "b", seed=0, workers=2)
    files_a, files_b = files_of(a), files_of(b)
    assert len(files_a) == sum(SMALL.values()) + 3 + 1  # images, three metadata.csv, hudd.json
    assert files_a.keys() == files_b.keys()
    different = [name for name in files_a if files_a[name] != files_b[name]]
    assert different == []


def test_different_seed_gives_different_data(tmp_path, small_case):
    other, _ = build(tmp_path / "other", seed=1)
    files_a, files_b = files_of(small_case), files_of(other)
    images = [n for n in files_a if n.endswith(".png") and n in files_b]
    changed = sum(files_a[n] != files_b[n] for n in images)
    # the class of an index differs between seeds, so few names match; none of those may be equal
    assert changed == len(images)
    for set_folder in ("TrainingSet", "TestSet", "ImprovementSet"):
        name = f"DataSets/{set_folder}/metadata.csv"
        assert files_a[name] != files_b[name]


def test_metadata_matches_the_files_on_disk(small_case):
    paths = CasePaths(small_case)
    for set_key, folder in Helper.SET_FOLDERS.items():
        set_dir = paths.datasets / folder
        meta = pd.read_csv(set_dir / "metadata.csv")
        assert list(meta.columns) == list(demoCase.METADATA_COLUMNS)
        on_disk = sorted(p.relative_to(set_dir).as_posix() for p in set_dir.rglob("*.png"))
        assert sorted(meta["image"]) == on_disk
        assert len(meta) == SMALL[set_key] and meta["image"].is_unique
        assert (meta["image"].str.split("/").str[0] == meta["class"]).all()
        assert meta["image"].str.fullmatch(r"[a-z_0-9]+/img_\d{5}\.png").all()
        assert set(meta["scenario"]) <= set(demoCase.SCENARIOS)
        assert meta[["pos_x", "pos_y", "size", "rotation", "brightness", "noise"]].notna().all().all()


def test_summary_counts_match_the_metadata(tmp_path):
    root, summary = build(tmp_path / "case", seed=2)
    assert summary["sizes"] == SMALL
    assert summary["classes"] == list(demoCase.CLASSES)
    for set_key, folder in Helper.SET_FOLDERS.items():
        meta = pd.read_csv(root / "DataSets" / folder / "metadata.csv")
        expected = {s: int((meta["scenario"] == s).sum()) for s in demoCase.SCENARIOS}
        assert summary["counts"][set_key] == expected
        for rare in demoCase.RARE_SCENARIOS:
            assert expected[rare] == demoCase.rare_count(SMALL[set_key], set_key)


def test_class_folders_have_underscores_and_load_as_sets(small_case):
    sets = Helper.load_case_sets(CasePaths(small_case))
    assert sets["train"].classes == list(demoCase.CLASSES)
    assert all("_" in c for c in sets["train"].classes)
    assert len(demoCase.CLASSES) >= 8
    for key, image_set in sets.items():
        assert image_set.labelled and len(image_set) == SMALL[key]
        assert all(image_set.classes[label] == path.parent.name
                   for path, label in zip(image_set.paths, image_set.labels))


def test_images_are_64x64_rgb_png(small_case):
    for path in list((small_case / "DataSets" / "TestSet").rglob("*.png"))[:20]:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (64, 64)


def test_settings_load_and_give_the_model_its_input(small_case):
    paths = CasePaths(small_case)
    raw = json.loads(paths.settings_file.read_text())
    assert set(raw) <= set(Helper.Settings.keys())
    settings = Helper.load_settings(paths)
    assert settings.arch == "demonet" and settings.input_size == [32, 32] and settings.resize == "resize"
    image_path = next((paths.datasets / "TestSet").rglob("*.png"))
    with Image.open(image_path) as image:
        tensor = Helper.make_transform(settings)(image.convert("RGB"))
    assert tuple(tensor.shape) == (3, 32, 32)
    assert -1.01 <= float(tensor.min()) and float(tensor.max()) <= 1.01
    model = Helper.build_architecture(settings.arch, len(demoCase.CLASSES))
    assert model(tensor[None]).shape == (1, len(demoCase.CLASSES))


def test_an_image_is_a_pure_function_of_its_metadata_row(small_case):
    set_dir = small_case / "DataSets" / "TestSet"
    meta = pd.read_csv(set_dir / "metadata.csv")
    rows = meta.groupby("scenario").head(2)
    assert set(rows["scenario"]) == set(demoCase.SCENARIOS)
    for row in rows.to_dict("records"):
        drawn = np.asarray(demoCase.render_image(row))
        with Image.open(set_dir / row["image"]) as image:
            assert np.array_equal(drawn, np.asarray(image)), row["image"]


# --------------------------------------------------------------------------------------------
# The conditions look like what they are
# --------------------------------------------------------------------------------------------

def _without_condition(p: dict) -> dict:
    """The same image parameters with the rare condition taken away (tilt keeps its geometry)."""
    q = dict(p, scenario="none")
    for column in ("night_level", "glare_x", "glare_y", "glare_radius", "glare_intensity", "occluder",
                   "occluder_side", "coverage", "occluder_shade", "fog_blur", "fog_alpha", "fog_gray",
                   "hue_shift", "saturation", "fade"):
        q[column] = None
    return q


def _sign_box(p: dict) -> tuple[slice, slice]:
    half = p["size"] / 2
    return (slice(int(p["pos_y"] - half), int(p["pos_y"] + half)),
            slice(int(p["pos_x"] - half), int(p["pos_x"] + half)))


@pytest.fixture(scope="module")
def test_plan() -> list[dict]:
    return demoCase.plan_demo_case(seed=0, sizes={"test": 300})["test"]


def test_the_sticker_is_small_and_magenta(test_plan):
    p = next(p for p in test_plan if p["scenario"] == "sticker")
    with_sticker = np.asarray(demoCase.render_image(p), dtype=float)
    without = np.asarray(demoCase.render_image({**p, "scenario": "none"}), dtype=float)
    changed = np.abs(with_sticker - without).sum(axis=2) > 30
    assert 0.005 < changed.mean() < 0.03                   # a few dozen of the 4,096 pixels
    r, g, b = with_sticker[changed].mean(axis=0)
    assert r > g + 60 and b > g + 60                       # magenta


def test_night_is_dark_and_fog_is_washed_out(test_plan):
    for scenario in ("night", "fog"):
        for p in [p for p in test_plan if p["scenario"] == scenario][:6]:
            rows, cols = _sign_box(p)
            with_condition = np.asarray(demoCase.render_image(p), dtype=float)
            plain = np.asarray(demoCase.render_image(_without_condition(p)), dtype=float)
            if scenario == "night":
                assert np.median(with_condition) < 0.45 * np.median(plain), p["image"]
                # bluish away from the headlight glare: blue gains on red against the daylight image
                yy, xx = np.mgrid[0:64, 0:64]
                away = np.hypot(xx - p["glare_x"], yy - p["glare_y"]) > 3 * p["glare_radius"]
                ratio = lambda img: img[away][:, 2].mean() / img[away][:, 0].mean()  # noqa: E731
                assert ratio(with_condition) > 1.2 * ratio(plain), p["image"]
            else:
                assert with_condition[rows, cols].std() < 0.5 * plain[rows, cols].std(), p["image"]


def test_occlusion_hides_a_large_part_of_the_sign(test_plan):
    for p in [p for p in test_plan if p["scenario"] == "occlusion"][:8]:
        rows, cols = _sign_box(p)
        with_condition = np.asarray(demoCase.render_image(p), dtype=float)[rows, cols]
        plain = np.asarray(demoCase.render_image(_without_condition(p)), dtype=float)[rows, cols]
        changed = (np.abs(with_condition - plain).max(axis=-1) > 40).mean()
        assert changed >= 0.25, (p["image"], p["occluder"], changed)


def test_color_cast_changes_the_hue_of_the_sign(test_plan):
    for p in [p for p in test_plan if p["scenario"] == "color_cast"][:8]:
        hsv = lambda q: np.asarray(demoCase._render_sign(q).convert("RGB").convert("HSV"), dtype=float)  # noqa: E731
        plain_sign = demoCase._render_sign(_without_condition(p))
        cast, plain = hsv(p), hsv(_without_condition(p))
        opaque = np.asarray(plain_sign.getchannel("A")) == 255
        colourful = opaque & (plain[..., 1] > 120)  # the red, blue or yellow parts of the sign
        assert colourful.sum() > 20
        hue_change = np.abs(cast[..., 0] - plain[..., 0])[colourful]
        hue_change = np.minimum(hue_change, 256 - hue_change)
        assert np.median(hue_change) > 60, p["image"]


def test_tilt_rotates_the_sign_far_more_than_ordinary_images(test_plan):
    tilted = [abs(p["rotation"]) for p in test_plan if p["scenario"] == "tilt"]
    ordinary = [abs(p["rotation"]) for p in test_plan if p["scenario"] != "tilt"]
    assert min(tilted) >= 3 * max(ordinary)
    p = next(p for p in test_plan if p["scenario"] == "tilt")
    upright = dict(p, rotation=0.0, view_squeeze=1.0, view_taper=1.0)
    rows, cols = _sign_box(p)
    diff = np.abs(np.asarray(demoCase.render_image(p), dtype=float) -
                  np.asarray(demoCase.render_image(upright), dtype=float))[rows, cols]
    assert diff.mean() > 15


# --------------------------------------------------------------------------------------------
# Safety: where it writes
# --------------------------------------------------------------------------------------------

def test_writes_only_inside_the_case_folder(tmp_path):
    root, _ = build(tmp_path / "case")
    assert [p.name for p in tmp_path.iterdir()] == ["case"]
    assert sorted(p.name for p in root.iterdir()) == ["DataSets", "hudd.json"]
    assert sorted(p.name for p in (root / "DataSets").iterdir()) == ["ImprovementSet", "TestSet", "TrainingSet"]


def test_refuses_a_non_empty_datasets_folder(tmp_path):
    root = tmp_path / "case"
    (root / "DataSets" / "TestSet").mkdir(parents=True)
    with pytest.raises(HuddError, match="DataSets"):
        build(root)
    assert sorted(p.name for p in root.iterdir()) == ["DataSets"]
    assert [p.name for p in (root / "DataSets").iterdir()] == ["TestSet"]


def test_an_empty_datasets_folder_is_used_and_existing_settings_are_kept(tmp_path):
    root = tmp_path / "case"
    (root / "DataSets").mkdir(parents=True)
    (root / "hudd.json").write_text('{"arch": "demonet", "epochs": 3}')
    build(root)
    assert (root / "hudd.json").read_text() == '{"arch": "demonet", "epochs": 3}'
    assert len(list((root / "DataSets" / "TrainingSet").rglob("*.png"))) == SMALL["train"]


# --------------------------------------------------------------------------------------------
# Training the original model
# --------------------------------------------------------------------------------------------

def test_training_saves_a_loadable_reproducible_model_and_never_overwrites(tmp_path):
    first, _ = build(tmp_path / "first")
    second, _ = build(tmp_path / "second")
    model_path = demoCase.train_demo_model(first, seed=5, epochs=2)
    assert model_path == first / "DNNModels" / "OriginalModel.pth"
    assert sorted(p.name for p in model_path.parent.iterdir()) == ["OriginalModel.pth"]
    settings = Helper.load_settings(CasePaths(first))
    model = Helper.load_model(model_path, settings, len(demoCase.CLASSES))
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, len(demoCase.CLASSES))

    before = model_path.read_bytes()
    with pytest.raises(HuddError, match="already exists"):
        demoCase.train_demo_model(first, seed=5, epochs=2)
    assert model_path.read_bytes() == before

    again = torch.load(demoCase.train_demo_model(second, seed=5, epochs=2), weights_only=True)
    state = torch.load(model_path, weights_only=True)
    assert state.keys() == again.keys()
    assert all(torch.equal(state[k], again[k]) for k in state)
    # training changed the weights away from a fresh initialisation
    torch.manual_seed(5)
    fresh = Helper.build_architecture("demonet", len(demoCase.CLASSES)).state_dict()
    last = [k for k in state if k.endswith("weight")][-1]
    assert not torch.equal(fresh[last], state[last])
