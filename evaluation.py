"""Measuring a (retrained) model on the test set against the original model's results.

Shared by the retraining step, `-rq True` (RQ1 raw results) and `RQ2.py`: test accuracy overall, per
class and per scenario, the test images improved (Wrong -> Correct) and worsened (Correct -> Wrong)
against the original model's `testResult.csv`, and the error images of each RCC that are now right.
For keypoint models "correct" means a mean keypoint error within `error_threshold`, "per class" is per
face component (share of images whose component has no keypoint above the threshold), and the mean
keypoint error is measured too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from Helper import HuddError, ImageSet, RunContext, make_loader, read_metadata


@dataclass
class TestMeasures:
    """One model's results on the test set; `correct` is indexed by image path relative to the case."""

    correct: pd.Series          # bool per test image
    predicted: pd.Series        # predicted class name per test image (keypoints: worst component)
    expected: pd.Series         # true class name per test image (keypoints: unused, "")
    mean_error: pd.Series | None = None       # keypoints: mean error over the visible keypoints, px
    component_ok: pd.DataFrame | None = None  # keypoints: per image and component, no keypoint above the threshold

    @property
    def accuracy(self) -> float:
        return 100.0 * float(self.correct.mean())

    def per_class(self) -> pd.DataFrame:
        if self.component_ok is not None:
            table = pd.DataFrame({"class": self.component_ok.columns, "images": len(self.component_ok),
                                  "correct": self.component_ok.sum().to_numpy()})
            table["accuracy"] = 100.0 * table["correct"] / table["images"]
            return table
        table = (pd.DataFrame({"class": self.expected.to_numpy(), "correct": self.correct.to_numpy()})
                 .groupby("class", sort=True)["correct"].agg(images="size", correct="sum").reset_index())
        table["accuracy"] = 100.0 * table["correct"] / table["images"]
        return table


def predict(model: nn.Module, image_set: ImageSet, ctx: RunContext, decode, desc: str = "") -> np.ndarray:
    """decode(outputs) of every image of the set, in set order; an unreadable image stops."""
    model.eval()
    loader = make_loader(image_set, ctx.settings, ctx.settings.batch_size, ctx.settings.workers)
    rows_out = []
    with torch.no_grad():
        for inputs, _labels, rows, failures in tqdm(loader, desc=desc or f"testing {image_set.name}", unit="batch",
                                                    leave=False, disable=None):
            if failures:
                raise HuddError(f"{image_set.paths[failures[0][0]]}: cannot read image ({failures[0][1]}); "
                                "replace or remove the file")
            rows_out.append((rows.numpy(), decode(model(inputs.to(ctx.device))).cpu().numpy()))
    result = np.empty((len(image_set), *rows_out[0][1].shape[1:]), dtype=rows_out[0][1].dtype)
    for rows, values in rows_out:
        result[rows] = values
    return result


def predict_classes(model: nn.Module, image_set: ImageSet, ctx: RunContext, desc: str = "") -> np.ndarray:
    """Predicted class index of every image of the set, in set order."""
    return predict(model, image_set, ctx, lambda outputs: outputs.argmax(1), desc)


def predict_keypoints(model: nn.Module, image_set: ImageSet, ctx: RunContext, desc: str = "") -> np.ndarray:
    """(images, keypoints, 2) decoded predictions, in set order."""
    import keypoints
    return predict(model, image_set, ctx, keypoints.decode, desc).astype(np.float64)


def measure_keypoints(model: nn.Module, ctx: RunContext, desc: str = "") -> TestMeasures:
    import keypoints
    test = ctx.sets()["test"]
    errors = keypoints.keypoint_errors(predict_keypoints(model, test, ctx, desc), test.targets)
    threshold = ctx.settings.error_threshold
    images = [ctx.paths.relative(p) for p in test.paths]
    flags = keypoints.component_flags(errors, threshold)
    return TestMeasures(correct=pd.Series(~keypoints.is_wrong(errors, threshold), index=images),
                        predicted=pd.Series(keypoints.component_of(keypoints.worst_keypoints(errors), errors.shape[1]),
                                            index=images),
                        expected=pd.Series("", index=images),
                        mean_error=pd.Series(keypoints.mean_errors(errors), index=images),
                        component_ok=pd.DataFrame({c: ~f for c, f in flags.items()}, index=images))


def measure_on_test(model: nn.Module, ctx: RunContext, desc: str = "") -> TestMeasures:
    if ctx.settings.task == "keypoints":
        return measure_keypoints(model, ctx, desc)
    test = ctx.sets()["test"]
    predicted = predict_classes(model, test, ctx, desc)
    expected = np.asarray(test.labels)
    images = [ctx.paths.relative(p) for p in test.paths]
    classes = np.asarray(ctx.classes, dtype=object)
    return TestMeasures(correct=pd.Series(predicted == expected, index=images),
                        predicted=pd.Series(classes[predicted], index=images),
                        expected=pd.Series(classes[expected], index=images))


def original_correct(ctx: RunContext, images: pd.Index) -> pd.Series:
    """Whether the ORIGINAL model got each test image right, from CASE/testResult.csv."""
    path = ctx.paths.result_csv("test")
    if not path.is_file():
        raise HuddError(f"{path}: not found; run the pipeline with the original model first "
                        "(python HUDD.py -o CASE -m OriginalModel.pth)")
    original = pd.read_csv(path).set_index("image")
    missing = images.difference(original.index)
    if len(missing):
        raise HuddError(f"{path}: has no row for test image {missing[0]!r}; rerun the pipeline with the original "
                        "model so that it covers the current test set")
    return original.loc[images, "result"].eq("Correct")


def improved_worsened(measures: TestMeasures, ctx: RunContext) -> tuple[int, int]:
    """(test images the original got wrong and this model gets right, the reverse)."""
    before = original_correct(ctx, measures.correct.index).to_numpy()
    now = measures.correct.to_numpy()
    return int((now & ~before).sum()), int((~now & before).sum())


def fixed_per_rcc(measures: TestMeasures, rcc_labels: pd.DataFrame) -> pd.Series:
    """Per RCC, how many of its error images the model now classifies correctly."""
    now = measures.correct.reindex(rcc_labels["image"]).fillna(False).to_numpy()
    return pd.Series(now, index=rcc_labels["rcc"].to_numpy()).groupby(level=0, sort=True).sum().astype(int)


def per_scenario(measures: TestMeasures, ctx: RunContext) -> pd.Series:
    """Test accuracy (%) per `scenario` of the test set's metadata.csv; empty where there is none."""
    metadata = read_metadata(ctx.sets()["test"].root, ctx.paths.root)
    if metadata is None or "scenario" not in metadata.columns:
        return pd.Series(dtype=float)
    scenarios = metadata["scenario"].reindex(measures.correct.index).to_numpy()
    return measures.correct.groupby(scenarios, sort=True).mean().mul(100.0)
