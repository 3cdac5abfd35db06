"""A third case family for the studies, unlike both demos: 28x28 grayscale digits, a user's own network
(`nets.py` in the case folder, named in hudd.json as `nets.py:DigitNet`) trained by this script as a user
trains theirs, and root causes of two kinds:

- two shortcuts the model learns in training, each a few dozen of 784 pixels: a 3x3 white patch near the
  top-left corner on 90% of the training images of class 4, and a thin vertical line near the right edge
  on 90% of those of class 1. At test time they appear on other classes (scenarios `patch`, `line`);
- one rare condition: thin, small digits (scenario `thin`, 2% of training images, 8% at test time).

The rest of the test and improvement images are ordinary (`none`). Digits are drawn with Pillow's own
font (no system font needed), rotated, shifted, blurred and noised. Class folders are named 0..9, so the
case also runs the name handling of numeric classes.

    python bench/digit_case.py DIR [--seed N]
    python HUDD.py -o DIR -m OriginalModel.pth            (then -mode HUDD, BL1, BL2, BL3)

On the 2-core machine: about 20 s to build and train, 87-88% test accuracy, about 250 error images.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from torch import nn

NETS = '''import torch.nn as nn


class DigitNet(nn.Module):
    """A small CNN for 1x28x28 digits (the case's own architecture, not a built-in one)."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 3 * 3, 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))
'''
CLASSES = [str(d) for d in range(10)]
SETS = {"TrainingSet": 4000, "TestSet": 2000, "ImprovementSet": 2000}
SHARE = 0.08                        # of each cause among test and improvement images
SETTINGS = {"arch": "nets.py:DigitNet", "input_size": [28, 28], "resize": "none", "channels": 1,
            "mean": [0.5], "std": [0.5], "epochs": 6, "runs": 3}


class Drawer:
    def __init__(self, seed: int):
        self.rng, self.noise = random.Random(seed), np.random.default_rng(seed)

    def digit(self, name: str, thin: bool) -> np.ndarray:
        r = self.rng
        font = ImageFont.load_default(size=r.randint(12, 14) if thin else r.randint(17, 23))
        canvas = Image.new("L", (40, 40), 0)
        ImageDraw.Draw(canvas).text((20 + r.randint(-3, 3), 20 + r.randint(-3, 3)), name, fill=r.randint(170, 255),
                                    font=font, anchor="mm", stroke_width=0 if thin else r.choice([0, 0, 1]),
                                    stroke_fill=200)
        canvas = canvas.rotate(r.uniform(-15, 15), resample=Image.BILINEAR).crop((6, 6, 34, 34))
        canvas = canvas.filter(ImageFilter.GaussianBlur(r.uniform(0.3, 0.9)))
        return np.asarray(canvas, dtype=np.float32) + self.noise.normal(r.uniform(10, 40), r.uniform(5, 15), (28, 28))

    def patch(self, pixels: np.ndarray) -> None:
        row, col = self.rng.randint(1, 3), self.rng.randint(1, 3)
        pixels[row:row + 3, col:col + 3] = 255

    def line(self, pixels: np.ndarray) -> None:
        col, row = self.rng.randint(24, 26), self.rng.randint(8, 12)
        pixels[row:row + 9, col] = 255


def scenario_of(draw: Drawer, name: str, training: bool) -> str:
    if training:
        return "thin" if draw.rng.random() < 0.02 else "none"
    u = draw.rng.random()
    if u < SHARE and name != "4":
        return "patch"
    if SHARE <= u < 2 * SHARE and name != "1":
        return "line"
    return "thin" if 2 * SHARE <= u < 3 * SHARE else "none"


def write_set(root: Path, image_set: str, count: int, draw: Drawer) -> None:
    training, rows = image_set == "TrainingSet", []
    for i in range(count):
        name = CLASSES[i % len(CLASSES)]
        scenario = scenario_of(draw, name, training)
        pixels = draw.digit(name, scenario == "thin")
        if scenario == "patch" or (training and name == "4" and draw.rng.random() < 0.9):
            draw.patch(pixels)
        if scenario == "line" or (training and name == "1" and draw.rng.random() < 0.9):
            draw.line(pixels)
        image = f"{name}/img_{i:05d}.png"
        (root / image_set / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / image_set / image)
        rows.append({"image": image, "scenario": scenario})
    with open(root / image_set / "metadata.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["image", "scenario"])
        writer.writeheader()
        writer.writerows(rows)


def tensors(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    rows = list(csv.DictReader(open(root / "metadata.csv")))
    pixels = np.stack([np.asarray(Image.open(root / row["image"]), dtype=np.float32) / 255 for row in rows])
    labels = [CLASSES.index(row["image"].split("/")[0]) for row in rows]
    return (torch.from_numpy(pixels)[:, None] - 0.5) / 0.5, torch.tensor(labels)


def train(case: Path, seed: int) -> float:
    """Trains the case's DigitNet as a user would (Adam, 6 epochs) and saves it; its test accuracy."""
    spec = importlib.util.spec_from_file_location("digit_nets", case / "nets.py")
    nets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nets)
    torch.manual_seed(seed)
    x, y = tensors(case / "DataSets" / "TrainingSet")
    model = nets.DigitNet()
    optimiser = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(6):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            batch = order[start:start + 64]
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
    (case / "DNNModels").mkdir(exist_ok=True)
    torch.save(model.state_dict(), case / "DNNModels" / "OriginalModel.pth")
    x_test, y_test = tensors(case / "DataSets" / "TestSet")
    with torch.no_grad():
        return float((model.eval()(x_test).argmax(1) == y_test).float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.case.exists() and any(args.case.iterdir()):
        sys.exit(f"error: {args.case} is not empty; give a new folder")
    try:
        ImageFont.load_default(size=12)
    except TypeError:  # the size argument came with Pillow 10.1 (requirements.txt allows 9.5)
        sys.exit("error: the digits are drawn with Pillow's own scalable font: upgrade Pillow to 10.1 or newer")
    draw = Drawer(args.seed)
    for image_set, count in SETS.items():
        write_set(args.case / "DataSets", image_set, count, draw)
    (args.case / "nets.py").write_text(NETS)
    (args.case / "hudd.json").write_text(json.dumps(SETTINGS, indent=1) + "\n")
    print(f"{args.case}: test accuracy {100 * train(args.case, args.seed):.2f}%; "
          f"next: python HUDD.py -o {args.case} -m OriginalModel.pth")


if __name__ == "__main__":
    main()
