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
from torch import nn

from Helper import HuddError, RunContext, read_metadata


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


def test_outputs(model: nn.Module, ctx: RunContext) -> np.ndarray:
    """The model's output rows for every test image, in set order: the test step's own inference
    (testModule.predict_set: logits, or decoded keypoints x0, y0, x1, ...)."""
    from testModule import predict_set
    test = ctx.sets()["test"]
    model.eval()
    predictions = predict_set(model, test, ctx)
    if predictions.failures:  # left out under --skip-bad-images; a measure needs every test image
        index, error = predictions.failures[0]
        raise HuddError(f"{test.paths[index]}: cannot read image ({error}); measuring a model needs every test image")
    outputs = np.empty_like(predictions.logits)
    outputs[predictions.indices] = predictions.logits
    return outputs


def measures_from_outputs(outputs: np.ndarray, ctx: RunContext) -> TestMeasures:
    """TestMeasures from output rows in test-set order (see test_outputs)."""
    import keypoints
    test = ctx.sets()["test"]
    images = [ctx.paths.relative(p) for p in test.paths]
    if ctx.settings.task == "keypoints":
        errors = keypoints.keypoint_errors(outputs.reshape(len(outputs), -1, 2), test.targets)
        threshold = ctx.settings.error_threshold
        flags = keypoints.component_flags(errors, threshold)
        worst = keypoints.component_of(keypoints.worst_keypoints(errors), errors.shape[1])
        return TestMeasures(correct=pd.Series(~keypoints.is_wrong(errors, threshold), index=images),
                            predicted=pd.Series(worst, index=images), expected=pd.Series("", index=images),
                            mean_error=pd.Series(keypoints.mean_errors(errors), index=images),
                            component_ok=pd.DataFrame({c: ~f for c, f in flags.items()}, index=images))
    predicted = outputs.argmax(axis=1)
    expected = np.asarray(test.labels)
    classes = np.asarray(ctx.classes, dtype=object)
    return TestMeasures(correct=pd.Series(predicted == expected, index=images),
                        predicted=pd.Series(classes[predicted], index=images),
                        expected=pd.Series(classes[expected], index=images))


def measure_on_test(model: nn.Module, ctx: RunContext) -> TestMeasures:
    return measures_from_outputs(test_outputs(model, ctx), ctx)


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


def original_per_scenario(ctx: RunContext) -> pd.Series:
    """The original model's test accuracy (%) per scenario, as the test step wrote it
    (scenarioAccuracy.csv); empty where the test set has no scenarios."""
    path = ctx.paths.root / "scenarioAccuracy.csv"
    if not path.is_file():
        return pd.Series(dtype=float)
    table = pd.read_csv(path)
    return table[table["set"] == "TestSet"].set_index("scenario")["accuracy"]
