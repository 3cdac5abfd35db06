"""The keypoint task through the pipeline: labels.csv sets, the test step's errors (checked against an
independent decoding), heatmaps seeded from the worst keypoint, clusters, assignment, the report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import Helper
import lrp
from architectures import KPNetSmall
from helpers import assert_clean_error, hand_decode, hudd

pytestmark = pytest.mark.xdist_group("test_keypoint_pipeline")  # its module-scoped fixture is built once (conftest.py)

KEYPOINTS = 5
SIZE = 32
SETTINGS = {"task": "keypoints", "arch": "kpnet-small", "input_size": [SIZE, SIZE], "resize": "none", "channels": 1,
            "mean": [0.0], "std": [1.0], "error_threshold": 6.0, "workers": 0, "batch_size": 4}


def build_keypoint_case(root: Path, images: int = 10, seed: int = 0, unlabelled_improvement: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    for folder in ("TrainingSet", "TestSet", "ImprovementSet"):
        set_dir = root / "DataSets" / folder
        set_dir.mkdir(parents=True)
        rows = []
        for i in range(images):
            name = f"face {i}.png"           # a space in the name, as users' files have
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(set_dir / name)
            points = rng.uniform(2, SIZE - 2, size=(KEYPOINTS, 2))
            if i == 1:
                points[2] = 0.0                 # a missing keypoint
            rows.append([name, *points.ravel()])
        columns = ["image"] + [f"kp{k}_{a}" for k in range(KEYPOINTS) for a in ("x", "y")]
        if not (unlabelled_improvement and folder == "ImprovementSet"):
            pd.DataFrame(rows, columns=columns).to_csv(set_dir / "labels.csv", index=False)
    torch.manual_seed(seed)
    (root / "DNNModels").mkdir()
    torch.save(KPNetSmall(num_classes=KEYPOINTS).state_dict(), root / "DNNModels" / "OriginalModel.pth")
    (root / "hudd.json").write_text(json.dumps(SETTINGS))
    return root


def independent_predictions(case: Path, image: str) -> np.ndarray:
    model = KPNetSmall(num_classes=KEYPOINTS).eval()
    model.load_state_dict(torch.load(case / "DNNModels" / "OriginalModel.pth", weights_only=True))
    pixels = np.asarray(Image.open(case / image), dtype=np.float32) / 255
    with torch.no_grad():
        maps = model(torch.from_numpy(pixels)[None, None]).numpy()[0]
    return np.array([hand_decode(m) for m in maps])


@pytest.fixture(scope="module")
def keypoint_case(tmp_path_factory):
    case = build_keypoint_case(tmp_path_factory.mktemp("kp") / "case")
    result = hudd("-o", str(case))
    return case, result


def test_the_pipeline_runs_on_a_keypoint_model(keypoint_case):
    case, result = keypoint_case
    assert result.returncode == 0, result.stderr
    assert "root-cause clusters" in result.stdout and "unsafe set" in result.stdout
    assert (case / "T" / "report.html").is_file()


def test_errors_match_an_independent_decoding(keypoint_case):
    case, _ = keypoint_case
    frame = pd.read_csv(case / "testResult.csv", keep_default_na=False)
    labels = pd.read_csv(case / "DataSets" / "TestSet" / "labels.csv")
    for row, truth_row in zip(frame.itertuples(), labels.itertuples(index=False)):
        predicted = independent_predictions(case, row.image)
        truth = np.array(truth_row[1:], dtype=float).reshape(KEYPOINTS, 2)
        shown = (truth > 1e-5).all(axis=1)
        errors = np.linalg.norm(predicted - truth, axis=1)
        assert row.mean_error == pytest.approx(errors[shown].mean(), rel=1e-4)
        assert row.result == ("Wrong" if errors[shown].mean() > SETTINGS["error_threshold"] else "Correct")
        assert row.worst_keypoint == f"kp{int(np.argmax(np.where(shown, errors, -1)))}"
        assert row.worst_component == "all"
    missing = frame.iloc[1]
    assert missing["error_kp2"] == ""      # the missing keypoint has no error


def test_heatmaps_explain_the_worst_keypoint_map(keypoint_case):
    case, _ = keypoint_case
    index = pd.read_csv(case / "T" / "Heatmaps" / "index.csv")
    first = index.iloc[0]
    model = KPNetSmall(num_classes=KEYPOINTS).eval()
    model.load_state_dict(torch.load(case / "DNNModels" / "OriginalModel.pth", weights_only=True))
    pixels = torch.from_numpy(np.asarray(Image.open(case / first.image), dtype=np.float32) / 255)[None, None]
    mask = torch.zeros((1, KEYPOINTS, SIZE, SIZE))
    mask[0, int(first.predicted[2:])] = 1
    expected = lrp.relevance(model, pixels, target=mask)["input"][0].numpy()
    stored = np.load(case / "T" / "Heatmaps" / "Layer0.npy")[0]
    np.testing.assert_allclose(stored, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())  # float32, batch of 4 vs 1
    layers = pd.read_csv(case / "T" / "Heatmaps" / "layers.csv")
    assert "convT1" in set(layers["module"])


def test_unlabelled_improvement_images_are_assigned_over_all_maps(tmp_path):
    case = build_keypoint_case(tmp_path / "case", unlabelled_improvement=True)
    result = hudd("-o", str(case))
    assert result.returncode == 0, result.stderr
    assert "unsafe set" in result.stdout
    assert "result" not in pd.read_csv(case / "improveResult.csv").columns


def test_keypoint_sets_refuse_bad_labels(tmp_path):
    case = build_keypoint_case(tmp_path / "case", images=3)
    labels = case / "DataSets" / "TestSet" / "labels.csv"
    table = pd.read_csv(labels)
    table.loc[0, "kp1_y"] = np.nan
    table.to_csv(labels, index=False)
    assert_clean_error(hudd("-o", str(case)), "labels.csv", "face 0.png", "0 or -1")
    table.loc[0, "kp1_y"] = 3.0
    table.loc[0, "image"] = "nobody.png"
    table.to_csv(labels, index=False)
    assert_clean_error(hudd("-o", str(case)), "nobody.png", "not in")
    table.loc[0, "image"] = "face 0.png"
    table.loc[2, "kp3_x"] = 500.0   # a pixel of a larger original image
    table.to_csv(labels, index=False)
    assert_clean_error(hudd("-o", str(case)), "labels.csv", "keypoint kp3 of 'face 2.png' is at (500,",
                       "outside the 32x32 image")
    table.loc[2, "kp3_x"] = 3.0
    small = Image.new("L", (16, 16))
    table.to_csv(labels, index=False)
    small.save(case / "DataSets" / "TestSet" / "face 0.png")
    assert_clean_error(hudd("-o", str(case)), "face 0.png", "16x16", "32x32")


def test_a_keypoint_labels_file_listing_an_image_twice_is_refused_and_unlisted_images_are_named(tmp_path, caplog):
    case = build_keypoint_case(tmp_path / "case", images=4)
    folder = case / "DataSets" / "TestSet"
    table = pd.read_csv(folder / "labels.csv")
    pd.concat([table, table.iloc[[2]]]).to_csv(folder / "labels.csv", index=False)
    with pytest.raises(Helper.HuddError, match="labels.csv: image 'face 2.png' has more than one line; keep one line per image"):
        Helper.list_keypoint_set(folder)
    table.iloc[1:].to_csv(folder / "labels.csv", index=False)   # face 0.png no longer listed
    with caplog.at_level("WARNING", logger="hudd"):
        image_set = Helper.list_keypoint_set(folder)
    assert len(image_set) == 3
    assert "1 image(s) under" in caplog.text and "are not in it and are left out (e.g. face 0.png)" in caplog.text


def test_keypoint_set_listing_reads_targets(tmp_path):
    case = build_keypoint_case(tmp_path / "case", images=4)
    image_set = Helper.list_keypoint_set(case / "DataSets" / "TestSet")
    table = pd.read_csv(case / "DataSets" / "TestSet" / "labels.csv")
    assert image_set.classes == [f"kp{k}" for k in range(KEYPOINTS)]
    np.testing.assert_array_equal(image_set.targets.reshape(4, -1), table.iloc[:, 1:].to_numpy())
    # saved from a spreadsheet where the comma is the decimal mark: ';', 12,5, a byte-order mark
    european = table.to_csv(sep=";", index=False, decimal=",")
    assert "," in european   # the coordinates have decimals
    (case / "DataSets" / "TestSet" / "labels.csv").write_bytes(european.encode("utf-8-sig"))
    np.testing.assert_array_equal(Helper.list_keypoint_set(case / "DataSets" / "TestSet").targets, image_set.targets)


def test_keypoint_retraining_and_rq_through_the_command_line(tmp_path):
    case = build_keypoint_case(tmp_path / "case", images=12)
    settings = {**SETTINGS, "epochs": 1, "learning_rate": 1e-3}
    (case / "hudd.json").write_text(json.dumps(settings))
    result = hudd("-o", str(case), "-mode", "BL2", "--runs", "1")
    assert result.returncode == 0, result.stderr
    runs = pd.read_csv(case / "T" / "Retrain" / "BL2_runs.csv")
    saved = case / runs["model"].iloc[0]
    # accuracy = share of test images whose mean error is within the threshold, recomputed by hand
    model = KPNetSmall(num_classes=KEYPOINTS).eval()
    model.load_state_dict(torch.load(saved, weights_only=True))
    labels = pd.read_csv(case / "DataSets" / "TestSet" / "labels.csv")
    means = []
    for row in labels.itertuples(index=False):
        pixels = np.asarray(Image.open(case / "DataSets" / "TestSet" / row[0]), dtype=np.float32) / 255
        with torch.no_grad():
            maps = model(torch.from_numpy(pixels)[None, None]).numpy()[0]
        predicted = np.array([hand_decode(m) for m in maps])
        truth = np.array(row[1:], dtype=float).reshape(KEYPOINTS, 2)
        shown = (truth > 1e-5).all(axis=1)
        means.append(np.linalg.norm(predicted - truth, axis=1)[shown].mean())
    means = np.array(means)
    assert runs["accuracy"].iloc[0] == pytest.approx(100 * (means <= SETTINGS["error_threshold"]).mean())
    assert runs["mean_error"].iloc[0] == pytest.approx(means.mean(), rel=1e-3)
    # the original's retraining: conv1-conv4 frozen, the rest trained
    original = torch.load(case / "DNNModels" / "OriginalModel.pth", weights_only=True)
    retrained = torch.load(saved, weights_only=True)
    for name in original:
        frozen = name.split(".")[0] in ("conv1", "conv2", "conv3", "conv4")
        assert torch.equal(original[name], retrained[name]) == frozen, name
    rq = hudd("-o", str(case), "-m", saved.name, "-rq", "True")
    assert rq.returncode == 0, rq.stderr
    summary = pd.read_csv(case / "RQ1" / saved.stem / "summary.csv").iloc[0]
    assert summary["accuracy"] == pytest.approx(runs["accuracy"].iloc[0])
    assert summary["mean_error"] == pytest.approx(means.mean(), rel=1e-3)
