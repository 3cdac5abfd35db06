"""Step 1: run the model over the training, test and improvement sets.

Writes `trainResult.csv`, `testResult.csv` and `improveResult.csv` in the case directory, one row per
image: `image` (path relative to the case directory), `result` (Correct/Wrong), `expected` and
`predicted` class, then one `score_<class>` column per class holding the model's raw output (logit).
An unlabelled improvement set has no `result`/`expected` columns. Where a set has a `metadata.csv`
with a `scenario` column, accuracy per scenario goes to `scenarioAccuracy.csv`.

Keypoint models (`"task": "keypoints"`): each output map is decoded into (x, y) (keypoints.py) and the
rows hold `image`, `result` (Wrong when the mean error over the visible keypoints exceeds
`error_threshold`), `mean_error`, `worst_keypoint`, `worst_component`, one Error/OK column per face
component, `error_<kp>` per keypoint (empty where the keypoint is missing) and `pred_<kp>_x/_y`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import keypoints
from Helper import (RESULT_FILES, SET_FOLDERS, HuddError, ImageSet, RunContext, fingerprint, image_set_digest,
                    make_loader, read_metadata, resolve_input_size, write_csv)

log = logging.getLogger("hudd")

STEP = "test"
STEP_VERSION = 1
SCENARIO_FILE = "scenarioAccuracy.csv"


@dataclass
class SetPredictions:
    """The model's outputs for the readable images of one set."""

    indices: np.ndarray       # positions in ImageSet.paths of the images that were read
    logits: np.ndarray        # (len(indices), num_classes), float32
    failures: list[tuple[int, str]]


def predict_set(model: torch.nn.Module, image_set: ImageSet, ctx: RunContext) -> SetPredictions:
    """Batched inference over a set. An unreadable image stops the run, naming the file, unless
    the user asked to skip such images (then it is left out of the results, with a warning)."""
    loader = make_loader(image_set, ctx.settings, ctx.settings.batch_size, ctx.settings.workers)
    indices, logits, failures = [], [], []
    with torch.no_grad():
        for inputs, _labels, batch_indices, batch_failures in tqdm(
                loader, desc=f"testing {image_set.name}", unit="batch", leave=False, disable=None):
            if batch_failures and not ctx.skip_bad_images:
                index, error = batch_failures[0]
                raise HuddError(f"{image_set.paths[index]}: cannot read image ({error}); replace or remove the "
                                "file, or pass --skip-bad-images to leave unreadable images out")
            failures += batch_failures
            if len(batch_indices):
                logits.append(output_rows(model(inputs.to(ctx.device)), ctx))
                indices.append(batch_indices.numpy())
    for index, error in failures:
        log.warning("skipped unreadable image %s (%s)", image_set.paths[index], error)
    if not indices:
        raise HuddError(f"{image_set.root}: none of its images could be read")
    return SetPredictions(np.concatenate(indices), np.concatenate(logits), failures)


def output_rows(outputs: torch.Tensor, ctx: RunContext) -> np.ndarray:
    """A batch's outputs as rows: logits, or for keypoint models the decoded x0, y0, x1, y1..."""
    if ctx.settings.task == "keypoints":
        return keypoints.decode(outputs).reshape(len(outputs), -1).cpu().numpy()
    return outputs.float().cpu().numpy()


def keypoint_frame(image_set: ImageSet, predictions: SetPredictions, ctx: RunContext) -> pd.DataFrame:
    names = ctx.classes
    predicted = predictions.logits.reshape(len(predictions.indices), len(names), 2)
    frame = pd.DataFrame({"image": [ctx.paths.relative(image_set.paths[i]) for i in predictions.indices]})
    if image_set.targets is not None:
        errors = keypoints.keypoint_errors(predicted, image_set.targets[predictions.indices])
        worst = keypoints.worst_keypoints(errors)
        frame["result"] = np.where(keypoints.is_wrong(errors, ctx.settings.error_threshold), "Wrong", "Correct")
        frame["mean_error"] = keypoints.mean_errors(errors)
        frame["worst_keypoint"] = [names[k] if k >= 0 else "" for k in worst]
        frame["worst_component"] = keypoints.component_of(worst, len(names))
        for component, flagged in keypoints.component_flags(errors, ctx.settings.error_threshold).items():
            frame[component] = np.where(flagged, "Error", "OK")
        frame = pd.concat([frame, pd.DataFrame(errors, columns=[f"error_{n}" for n in names])], axis=1)
    coords = pd.DataFrame(predicted.reshape(len(predicted), -1),
                          columns=[f"pred_{n}_{axis}" for n in names for axis in ("x", "y")])
    return pd.concat([frame, coords], axis=1)


def check_keypoint_image_size(image_set: ImageSet, ctx: RunContext) -> None:
    """Keypoint labels are pixels of the stored image and the model's maps are at its input size, so
    the two must agree (checked on the set's first image)."""
    from PIL import Image
    height, width = resolve_input_size(ctx.settings)
    with Image.open(image_set.paths[0]) as image:
        if image.size != (width, height):
            raise HuddError(f"{image_set.paths[0]}: is {image.size[0]}x{image.size[1]} pixels but the keypoint model "
                            f"takes {width}x{height}; keypoint images must have the model's input size")


def result_frame(image_set: ImageSet, predictions: SetPredictions, ctx: RunContext) -> pd.DataFrame:
    if ctx.settings.task == "keypoints":
        return keypoint_frame(image_set, predictions, ctx)
    classes = ctx.classes
    predicted = predictions.logits.argmax(axis=1)
    frame = pd.DataFrame({"image": [ctx.paths.relative(image_set.paths[i]) for i in predictions.indices]})
    if image_set.labelled:
        expected = np.asarray(image_set.labels)[predictions.indices]
        frame["result"] = np.where(predicted == expected, "Correct", "Wrong")
        frame["expected"] = [classes[c] for c in expected]
    frame["predicted"] = [classes[c] for c in predicted]
    scores = pd.DataFrame(predictions.logits, columns=[f"score_{c}" for c in classes])
    return pd.concat([frame, scores], axis=1)


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


def step_fingerprint(ctx: RunContext) -> str:
    sets = ctx.sets()
    return fingerprint({"step": STEP, "version": STEP_VERSION, **ctx.model_fingerprint_part(),
                        "sets": {k: image_set_digest(s, ctx.paths.root) for k, s in sets.items()},
                        "skip_bad_images": ctx.skip_bad_images, "error_threshold": ctx.settings.error_threshold})


def run(ctx: RunContext) -> dict:
    """Runs (or, when its inputs are unchanged, reuses) the test step; returns its summary."""
    step_print = step_fingerprint(ctx)
    manifest = ctx.manifest
    outputs = [RESULT_FILES[k] for k in ctx.sets()]
    if not ctx.force and manifest.is_current(STEP, step_print):
        log.info("test step: inputs unchanged, reusing %s", ", ".join(outputs))
        return summarise(ctx, skipped=True)
    model = ctx.model()
    scenario_tables = []
    for set_key, image_set in ctx.sets().items():
        if ctx.settings.task == "keypoints":
            check_keypoint_image_size(image_set, ctx)
        predictions = predict_set(model, image_set, ctx)
        frame = result_frame(image_set, predictions, ctx)
        write_csv(frame, ctx.paths.result_csv(set_key))
        scenario_tables.append(scenario_accuracy(set_key, image_set, frame, ctx))
    scenarios = pd.concat(scenario_tables, ignore_index=True)
    scenario_path = ctx.paths.root / SCENARIO_FILE
    if len(scenarios):
        write_csv(scenarios, scenario_path)
        outputs.append(SCENARIO_FILE)
    elif scenario_path.exists():
        scenario_path.unlink()  # stale: the sets no longer carry scenarios
    manifest.record(STEP, step_print, outputs)
    return summarise(ctx, skipped=False)


def summarise(ctx: RunContext, skipped: bool) -> dict:
    """Accuracy per set (and per scenario) read back from the step's own files."""
    summary = {"skipped": skipped, "sets": {}, "scenarios": None}
    for set_key in ctx.sets():
        frame = pd.read_csv(ctx.paths.result_csv(set_key))
        entry = {"images": len(frame), "file": ctx.paths.result_csv(set_key)}
        if "result" in frame.columns:
            entry["wrong"] = int(frame["result"].eq("Wrong").sum())
            entry["accuracy"] = 100.0 * (1 - entry["wrong"] / len(frame))
        summary["sets"][SET_FOLDERS[set_key]] = entry
    scenario_path = ctx.paths.root / SCENARIO_FILE
    if scenario_path.is_file():
        summary["scenarios"] = pd.read_csv(scenario_path)
    return summary
