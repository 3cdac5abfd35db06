"""Step 1: run the model over the training, test and improvement sets.

Writes `trainResult.csv`, `testResult.csv` and `improveResult.csv` in the case directory, one row per
image: `image` (path relative to the case directory), `result` (Correct/Wrong), `expected` and
`predicted` class, then one `score_<class>` column per class holding the model's raw output (logit).
An unlabelled improvement set has no `result`/`expected` columns. Where a set has a `metadata.csv`
with a `scenario` column, accuracy per scenario goes to `scenarioAccuracy.csv`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from Helper import (RESULT_FILES, SET_FOLDERS, HuddError, ImageSet, RunContext, fingerprint, image_set_digest,
                    make_loader, read_metadata, write_csv)

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
                logits.append(model(inputs.to(ctx.device)).float().cpu().numpy())
                indices.append(batch_indices.numpy())
    for index, error in failures:
        log.warning("skipped unreadable image %s (%s)", image_set.paths[index], error)
    if not indices:
        raise HuddError(f"{image_set.root}: none of its images could be read")
    return SetPredictions(np.concatenate(indices), np.concatenate(logits), failures)


def result_frame(image_set: ImageSet, predictions: SetPredictions, ctx: RunContext) -> pd.DataFrame:
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
                        "skip_bad_images": ctx.skip_bad_images})


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
