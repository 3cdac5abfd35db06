"""Step 1: run the model over the training, test and improvement sets.

Writes `trainResult.csv`, `testResult.csv` and `improveResult.csv` in the case directory, one row per
image: `image` (path relative to the case directory), `result` (Correct/Wrong), `expected` and
`predicted` class, then one `score_<class>` column per class holding the model's raw output (logit).
An unlabelled improvement set has no `result`/`expected` columns. Where a set has a `metadata.csv`
with a `scenario` column, accuracy per scenario goes to `scenarioAccuracy.csv`.

Keypoint models (`"task": "keypoints"`): each output map is decoded into (x, y) (keypoints.py) and the
rows hold `image`, `result` (Wrong when the mean error over the visible keypoints exceeds
`error_threshold`), `mean_error`, `worst_keypoint`, `worst_component`, one Error/OK column per face
component, `error_<kp>` per keypoint (empty where the keypoint is missing) and `pred_<kp>_x/_y`
(tasks.KeypointTask.result_frame).

This module owns those files: the other steps read them through `read_results`, `error_index` and
`read_scenario_accuracy`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from Helper import (SET_FOLDERS, CasePaths, HuddError, ImageSet, RunContext, Step, image_set_digest, make_loader,
                    read_metadata, resolve_input_size, write_csv)

log = logging.getLogger("hudd")

RESULT_FILES = {"train": "trainResult.csv", "test": "testResult.csv", "improve": "improveResult.csv"}
SCENARIO_FILE = "scenarioAccuracy.csv"


# --------------------------------------------------------------------------------------------
# The files, and their one reader
# --------------------------------------------------------------------------------------------

def result_path(paths: CasePaths, set_key: str) -> Path:
    return paths.root / RESULT_FILES[set_key]


def read_results(paths: CasePaths, set_key: str) -> pd.DataFrame:
    """A set's result rows as the test step wrote them (empty cells read as "")."""
    path = result_path(paths, set_key)
    if not path.is_file():
        raise HuddError(f"{path}: not found; run the test step first (python HUDD.py -o CASE --steps test)")
    return pd.read_csv(path, keep_default_na=False)


def error_index(ctx: RunContext) -> pd.DataFrame:
    """The error-inducing test images (Wrong in testResult.csv) in the file's order: image, expected,
    predicted (keypoints: the worst keypoint's component, the worst keypoint)."""
    return ctx.task.error_index(read_results(ctx.paths, "test"))


def read_scenario_accuracy(paths: CasePaths) -> pd.DataFrame | None:
    """set, scenario, images, correct, accuracy; None where no set has scenarios."""
    path = paths.root / SCENARIO_FILE
    return pd.read_csv(path) if path.is_file() else None


def original_test_accuracy(paths: CasePaths) -> float:
    """The run model's test accuracy (%), from testResult.csv."""
    return 100.0 * float(read_results(paths, "test")["result"].eq("Correct").mean())


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------

@dataclass
class SetPredictions:
    """The model's outputs for the readable images of one set."""

    indices: np.ndarray       # positions in ImageSet.paths of the images that were read
    logits: np.ndarray        # (len(indices), output row width): logits or decoded keypoints, float32
    failures: list[tuple[int, str]]


def predict_set(model: torch.nn.Module, image_set: ImageSet, ctx: RunContext) -> SetPredictions:
    """Batched inference over a set. An unreadable image stops the run, naming the file, unless
    the user asked to skip such images (then it is left out of the results, with a warning)."""
    loader = make_loader(image_set, ctx.settings, ctx.settings.batch_size, ctx.settings.workers)
    indices, rows, failures = [], [], []
    with torch.no_grad():
        for inputs, _labels, batch_indices, batch_failures in tqdm(
                loader, desc=f"testing {image_set.name}", unit="batch", leave=False, disable=None):
            if batch_failures and not ctx.skip_bad_images:
                index, error = batch_failures[0]
                raise HuddError(f"{image_set.paths[index]}: cannot read image ({error}); replace or remove the "
                                "file, or pass --skip-bad-images to leave unreadable images out")
            failures += batch_failures
            if len(batch_indices):
                rows.append(ctx.task.output_rows(model(inputs.to(ctx.device))))
                indices.append(batch_indices.numpy())
    for index, error in failures:
        log.warning("skipped unreadable image %s (%s)", image_set.paths[index], error)
    if not indices:
        raise HuddError(f"{image_set.root}: none of its images could be read")
    return SetPredictions(np.concatenate(indices), np.concatenate(rows), failures)


def result_frame(image_set: ImageSet, predictions: SetPredictions, ctx: RunContext) -> pd.DataFrame:
    """The result rows of a set's readable images (tasks.py decides the columns)."""
    images = [ctx.paths.relative(image_set.paths[i]) for i in predictions.indices]
    labels = np.asarray(image_set.labels)[predictions.indices] if image_set.labelled else None
    targets = None if image_set.targets is None else image_set.targets[predictions.indices]
    return ctx.task.result_frame(images, predictions.logits, labels, targets, ctx.classes)


def set_results(ctx: RunContext, set_key: str, model: torch.nn.Module | None = None) -> pd.DataFrame:
    """The rows the test step writes for one set ("train", "test" or "improve"), computed by the
    test step's own inference with `model` (default: the run's model) and nothing written."""
    image_set = ctx.sets()[set_key]
    model = ctx.model() if model is None else model
    return result_frame(image_set, predict_set(model, image_set, ctx), ctx)


def scenario_accuracy(set_key: str, image_set: ImageSet, frame: pd.DataFrame, ctx: RunContext) -> pd.DataFrame:
    """Accuracy per `scenario` of the set's metadata.csv (empty frame where there is none)."""
    metadata = read_metadata(image_set.root, ctx.paths.root)
    if metadata is None or "scenario" not in metadata.columns or "result" not in frame.columns:
        return pd.DataFrame()
    scenarios = metadata["scenario"].reindex(frame["image"])
    if scenarios.isna().any():
        missing = frame["image"].iloc[int(np.flatnonzero(scenarios.isna().to_numpy())[0])]
        raise HuddError(f"metadata.csv of {image_set.root}: has no scenario for image {missing!r}; "
                        "add one row per image")
    correct = frame["result"].eq("Correct").to_numpy()
    table = (pd.DataFrame({"scenario": scenarios.to_numpy(), "correct": correct})
             .groupby("scenario", sort=True)["correct"].agg(images="size", correct="sum").reset_index())
    table["accuracy"] = 100.0 * table["correct"] / table["images"]
    table.insert(0, "set", SET_FOLDERS[set_key])
    return table


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------

class TestStep(Step):
    name, title = "test", "test step"

    def inputs(self, ctx: RunContext) -> dict:
        return {**ctx.model_fingerprint_part(),
                "sets": {k: image_set_digest(s, ctx.paths.root) for k, s in ctx.sets().items()},
                "skip_bad_images": ctx.skip_bad_images, "error_threshold": ctx.settings.error_threshold}

    def outputs(self, ctx: RunContext) -> list[Path]:
        files = [result_path(ctx.paths, k) for k in ctx.sets()]
        scenario_path = ctx.paths.root / SCENARIO_FILE
        return files + ([scenario_path] if scenario_path.is_file() else [])

    def compute(self, ctx: RunContext) -> None:
        model = ctx.model()
        scenario_tables = []
        for set_key, image_set in ctx.sets().items():
            problem = ctx.task.check_images(image_set, resolve_input_size(ctx.settings))
            if problem:
                raise HuddError(problem)
            frame = result_frame(image_set, predict_set(model, image_set, ctx), ctx)
            write_csv(frame, result_path(ctx.paths, set_key))
            scenario_tables.append(scenario_accuracy(set_key, image_set, frame, ctx))
        scenarios = pd.concat(scenario_tables, ignore_index=True)
        scenario_path = ctx.paths.root / SCENARIO_FILE
        if len(scenarios):
            write_csv(scenarios, scenario_path)
        elif scenario_path.exists():
            scenario_path.unlink()  # stale: the sets no longer carry scenarios

    def summary(self, ctx: RunContext) -> dict:
        """Accuracy per set (and per scenario) read back from the step's own files."""
        summary = {"sets": {}, "scenarios": read_scenario_accuracy(ctx.paths)}
        for set_key in ctx.sets():
            frame = read_results(ctx.paths, set_key)
            entry = {"images": len(frame), "file": result_path(ctx.paths, set_key)}
            if "result" in frame.columns:
                entry["wrong"] = int(frame["result"].eq("Wrong").sum())
                entry["accuracy"] = 100.0 * (1 - entry["wrong"] / len(frame))
            summary["sets"][SET_FOLDERS[set_key]] = entry
        return summary


STEP = TestStep()
