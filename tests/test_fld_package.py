"""fldPackage: the original FLD .npy package is unpickled only with --trust-pickle, then imported once."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch
from PIL import Image

import fldPackage
from architectures import KPNetSmall
from helpers import assert_clean_error, hudd


def write_package(case, images: int = 6, size: int = 32, keypoints: int = 27, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder = case / "IEEPackage"
    folder.mkdir(parents=True)
    packages = {}
    for key, name in fldPackage.PACKAGE_FILES.items():
        label = rng.uniform(2, size - 2, size=(images, keypoints, 2))
        label[0, 5] = -1.0                                   # a missing keypoint, as the original marks it
        package = {"data": rng.integers(0, 256, (images, size, size), dtype=np.uint8), "label": label,
                   "config": [{"head_pose": [0.1 * i, -0.2, 0.3], "lamp": {"power": float(i)}, "name": "x"}
                              for i in range(images)]}
        np.save(folder / name, package, allow_pickle=True)
        packages[key] = package
    (case / "DNNModels").mkdir()
    torch.manual_seed(0)
    torch.save(KPNetSmall(num_classes=keypoints).state_dict(), case / "DNNModels" / "OriginalModel.pth")
    (case / "hudd.json").write_text(json.dumps({**fldPackage.FLD_SETTINGS, "arch": "kpnet-small",
                                                "input_size": [size, size], "workers": 0, "batch_size": 4}))
    return packages


def test_the_package_is_not_unpickled_without_trust(tmp_path):
    case = tmp_path / "case"
    write_package(case)
    assert_clean_error(hudd("-o", str(case), "--steps", "test"), "ieetrain.npy", "--trust-pickle")
    assert not (case / "DataSets").exists()


def test_with_trust_it_is_imported_once_into_the_safe_layout(tmp_path):
    case = tmp_path / "case"
    packages = write_package(case)
    result = hudd("-o", str(case), "--steps", "test", "--trust-pickle")
    assert result.returncode == 0, result.stderr
    test_set = case / "DataSets" / "TestSet"
    labels = pd.read_csv(test_set / "labels.csv")
    np.testing.assert_allclose(labels.iloc[:, 1:].to_numpy(), packages["test"]["label"].reshape(6, -1))
    np.testing.assert_array_equal(np.asarray(Image.open(test_set / "3.png")), packages["test"]["data"][3])
    metadata = pd.read_csv(test_set / "metadata.csv")
    assert list(metadata.columns) == ["image", "head_pose_0", "head_pose_1", "head_pose_2", "lamp.power"]
    assert metadata["lamp.power"].tolist() == [0, 1, 2, 3, 4, 5]
    results = pd.read_csv(case / "testResult.csv", keep_default_na=False)
    assert len(results) == 6 and results.loc[0, "error_kp5"] == ""     # -1 marks a missing keypoint
    # a later run reads DataSets/ and never unpickles again, even without the flag
    assert hudd("-o", str(case), "--steps", "test").returncode == 0


def test_a_package_that_is_not_a_keypoint_dict_is_named(tmp_path):
    case = tmp_path / "case"
    write_package(case)
    np.save(case / "IEEPackage" / "ieetest.npy", {"images": np.zeros((2, 4, 4))}, allow_pickle=True)
    assert_clean_error(hudd("-o", str(case), "--trust-pickle"), "ieetest.npy", "'data'", "'label'")
    assert not (case / "DataSets").exists()


def test_numbers_are_flattened_from_nested_configs():
    flat = fldPackage.flatten_numbers({"a": 1, "b": [2, 3], "c": {"d": 4.5, "e": "text"}, "f": True})
    assert flat == {"a": 1.0, "b_0": 2.0, "b_1": 3.0, "c.d": 4.5}
