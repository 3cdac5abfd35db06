"""Importing the original FLD case study's package: CASE/IEEPackage/iee{train,test,improve}.npy.

Each file is `np.save` of a Python dict (reference §4): `data` N x H x W uint8 grey images, `label`
N x K x 2 keypoints (x, y) in pixels (0 or -1: missing) and optionally `config`, one dict of simulator
parameters per image. Reading such a file unpickles it, which can run code, so it is done only with
`--trust-pickle`. The import runs once, when the case has no DataSets folder yet, and writes the safe,
generic layout every later run reads: DataSets/<Set>/<n>.png, labels.csv (image, kp0_x, kp0_y, ...)
and, where there is a config, metadata.csv (every numeric parameter; vectors split into _0, _1, ...).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from Helper import KEYPOINT_LABELS, SET_FOLDERS, CasePaths, HuddError, staged_datasets, write_settings_if_absent

log = logging.getLogger("hudd")

PACKAGE_FOLDER = "IEEPackage"
PACKAGE_FILES = {"train": "ieetrain.npy", "test": "ieetest.npy", "improve": "ieeimprove.npy"}
# The original FLD settings (reference §4-§5): KPNet on 128 x 128 grey pixels / 255, 4 px threshold.
FLD_SETTINGS = {"task": "keypoints", "arch": "kpnet", "input_size": [128, 128], "resize": "none", "channels": 1,
                "mean": [0.0], "std": [1.0], "error_threshold": 4.0}


def has_package(case: Path) -> bool:
    return (case / PACKAGE_FOLDER / PACKAGE_FILES["train"]).is_file()


def import_package(case: Path, trust_pickle: bool) -> bool:
    """Writes DataSets/ from the package when DataSets/ is missing; True when it did."""
    paths = CasePaths(case)
    if paths.datasets.exists() or not has_package(case):
        return False
    files = {key: case / PACKAGE_FOLDER / name for key, name in PACKAGE_FILES.items()}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise HuddError(f"{missing[0]}: not found; the FLD package needs {', '.join(PACKAGE_FILES.values())}")
    if not trust_pickle:
        raise HuddError(f"{files['train']}: is a pickled numpy file, and unpickling runs code from the file. If you "
                        "trust it, pass --trust-pickle to import the package once into DataSets/ (PNG images and "
                        "labels.csv, which later runs read without unpickling)")
    with staged_datasets(paths) as staging:
        for key, path in files.items():
            write_set(load_package_file(path), staging / SET_FOLDERS[key])
    write_settings_if_absent(paths, FLD_SETTINGS)
    log.info("imported the FLD package %s into %s", case / PACKAGE_FOLDER, paths.datasets)
    return True


def load_package_file(path: Path) -> dict:
    try:
        loaded = np.load(path, allow_pickle=True)
        package = loaded.item() if isinstance(loaded, np.ndarray) and loaded.dtype == object else loaded
    except Exception as exc:
        raise HuddError(f"{path}: cannot be read as a numpy dict ({type(exc).__name__}: {exc})")
    if not isinstance(package, dict) or "data" not in package or "label" not in package:
        raise HuddError(f"{path}: must hold a dict with 'data' (N x H x W images) and 'label' (N x K x 2 keypoints)")
    data, label = np.asarray(package["data"]), np.asarray(package["label"], dtype=np.float64)
    if data.ndim != 3 or label.ndim != 3 or label.shape[2] != 2 or len(data) != len(label):
        raise HuddError(f"{path}: 'data' must be N x H x W and 'label' N x K x 2 with the same N "
                        f"(got {data.shape} and {label.shape})")
    return {"data": data, "label": label, "config": package.get("config")}


def write_set(package: dict, folder: Path) -> None:
    folder.mkdir(parents=True)
    data, label = package["data"], package["label"]
    names = [f"{n}.png" for n in range(len(data))]
    for name, pixels in zip(names, data):
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L").save(folder / name)
    columns = [f"kp{k}_{axis}" for k in range(label.shape[1]) for axis in ("x", "y")]
    table = pd.DataFrame(label.reshape(len(label), -1), columns=columns)
    table.insert(0, "image", names)
    table.to_csv(folder / KEYPOINT_LABELS, index=False)
    if package["config"] is not None:
        metadata = pd.DataFrame([flatten_numbers(c) for c in package["config"]])
        metadata.insert(0, "image", names)
        metadata.to_csv(folder / "metadata.csv", index=False)


def flatten_numbers(config: dict, prefix: str = "") -> dict[str, float]:
    """The numeric parameters of one simulator config; nested dicts joined with '.', vectors split."""
    flat = {}
    for key, value in (config or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_numbers(value, f"{name}."))
        elif isinstance(value, (list, tuple, np.ndarray)) and np.asarray(value).dtype.kind in "iuf":
            flat.update({f"{name}_{i}": float(v) for i, v in enumerate(np.ravel(value))})
        elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat
