"""Shared fixtures: tiny case studies built on the fly (32x32 images, a random DemoNet)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from architectures import DemoNet  # noqa: E402

# Names the original tool broke on: underscores, dots and spaces in classes and files.
CLASSES = ["class_a", "class.b", "class c"]
SETTINGS = {"arch": "demonet", "input_size": [32, 32], "workers": 0, "batch_size": 4,
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def write_image(path: Path, rng: np.random.Generator, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_set(folder: Path, rng: np.random.Generator, per_class: int, labelled: bool = True,
              size: int = 32) -> list[Path]:
    written = []
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            file_name = f"img_{c}.{i} v2.png"
            path = folder / name / file_name if labelled else folder / f"{c}_{file_name}"
            write_image(path, rng, size)
            written.append(path)
    return written


def save_model(path: Path, seed: int = 0, num_classes: int = len(CLASSES)) -> DemoNet:
    torch.manual_seed(seed)
    model = DemoNet(num_classes=num_classes).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def build_case(root: Path, improvement: str = "plain", per_class: int = 4, settings: dict | None = None,
               seed: int = 0) -> Path:
    """A case study under `root`. improvement: "plain" (ImprovementSet/<class>/), "doubled"
    (ImprovementSet/ImprovementSet/<class>/, as the original's packages) or "unlabelled"."""
    rng = np.random.default_rng(seed)
    data = root / "DataSets"
    write_set(data / "TrainingSet", rng, per_class)
    write_set(data / "TestSet", rng, per_class)
    improve = data / "ImprovementSet"
    if improvement == "doubled":
        improve = improve / "ImprovementSet"
    write_set(improve, rng, per_class, labelled=improvement != "unlabelled")
    save_model(root / "DNNModels" / "OriginalModel.pth", seed)
    (root / "hudd.json").write_text(json.dumps(SETTINGS if settings is None else settings))
    return root


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
    import subprocess
    case = build_case(tmp_path_factory.mktemp("retrain") / "case", per_class=8,
                      settings={**SETTINGS, "epochs": 2, "learning_rate": 0.05})
    results = {mode: subprocess.run([sys.executable, str(REPO / "HUDD.py"), "-o", str(case), "-mode", mode,
                                     "--runs", "2"], capture_output=True, text=True, timeout=600)
               for mode in ("HUDD", "BL1", "BL2")}
    return case, results
