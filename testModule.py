"""Step 1: run the model over the training, test and improvement sets.

Writes `trainResult.csv`, `testResult.csv` and `improveResult.csv` in the case directory, one row per
image: `image` (path relative to the case directory), `result` (Correct/Wrong), `expected` and
`predicted` class, then one `score_<class>` column per class holding the model's raw output (logit).
An unlabelled improvement set has no `result`/`expected` columns. Where a set has a `metadata.csv`
with a `scenario` column, accuracy per scenario goes to `scenarioAccuracy.csv`.

For the test set it also describes every image as the model sees it (descriptors.py): brightness,
contrast, colour, sharpness, noise, edges and the estimated object region, in `testDescriptors.csv`
(image, then one column per descriptor), and the object masks in `testObjects.npz`. The cluster step
reads them to say what is unusual about each root-cause cluster.

Keypoint models (`"task": "keypoints"`): each output map is decoded into (x, y) (keypoints.py) and the
rows hold `image`, `result` (Wrong when the mean error over the visible keypoints exceeds
`error_threshold`), `mean_error`, `worst_keypoint`, `worst_component`, one Error/OK column per face
component, `error_<kp>` per keypoint (empty where the keypoint is missing) and `pred_<kp>_x/_y`
(tasks.KeypointTask.result_frame).

This module owns those files: the other steps read them through `read_results`, `error_index`,
`read_scenario_accuracy`, `read_descriptors` and `read_object_masks`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import descriptors
import distributed
from Helper import (ARRAY_HEADER_LOCK, SET_FOLDERS, CasePaths, HuddError, ImageSet, RunContext, Settings, Step,
                    atomic_path, image_set_digest, make_loader, metadata_digest, read_csv, read_metadata, resolve_input_size,
                    write_csv)

log = logging.getLogger("hudd")

RESULT_FILES = {"train": "trainResult.csv", "test": "testResult.csv", "improve": "improveResult.csv"}
SCENARIO_FILE = "scenarioAccuracy.csv"
DESCRIPTOR_FILE = "testDescriptors.csv"
OBJECT_FILE = "testObjects.npz"


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
    return read_csv(path, keep_default_na=False)


def error_index(ctx: RunContext) -> pd.DataFrame:
    """The error-inducing test images (Wrong in testResult.csv) in the file's order: image, expected,
    predicted (keypoints: the worst keypoint's component, the worst keypoint)."""
    return ctx.task.error_index(read_results(ctx.paths, "test"))


def read_scenario_accuracy(paths: CasePaths) -> pd.DataFrame | None:
    """set, scenario, images, correct, accuracy; None where no set has scenarios."""
    path = paths.root / SCENARIO_FILE
    return read_csv(path) if path.is_file() else None


def read_descriptors(paths: CasePaths) -> pd.DataFrame:
    """The image descriptors of every test image (descriptors.IMAGE_DESCRIPTORS and the informative
    ones), indexed by image path relative to the case."""
    path = paths.root / DESCRIPTOR_FILE
    if not path.is_file():
        raise HuddError(f"{path}: not found; run the test step first (python HUDD.py -o CASE --steps test)")
    return read_csv(path).set_index("image")


def read_object_masks(paths: CasePaths, images: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The estimated object masks (images, height, width) of the given test images, as the model
    sees them, and whether each could be estimated."""
    path = paths.root / OBJECT_FILE
    if not path.is_file():
        raise HuddError(f"{path}: not found; run the test step first (python HUDD.py -o CASE --steps test)")
    with ARRAY_HEADER_LOCK, np.load(path) as stored:  # each member's header is parsed as it is read
        rows = pd.Index(stored["images"]).get_indexer(images)
        if (rows < 0).any():
            raise HuddError(f"{path}: has no mask for {images[int(np.flatnonzero(rows < 0)[0])]}; rerun the test step")
        height, width = (int(v) for v in stored["shape"])
        masks = np.unpackbits(stored["masks"][rows], axis=1, count=height * width).astype(bool)
        return masks.reshape(len(rows), height, width), stored["valid"][rows]


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


def predict_set(model: torch.nn.Module, image_set: ImageSet, ctx: RunContext,
                on_batch: Callable[[torch.Tensor, np.ndarray], None] | None = None) -> SetPredictions:
    """Batched inference over a set. An unreadable image stops the run, naming the file, unless
    the user asked to skip such images (then it is left out of the results, with a warning).
    `on_batch(inputs, indices)` sees every batch of model inputs (the image descriptors use it)."""
    return checked(image_set, predict_rows(model, image_set, ctx, 0, len(image_set), on_batch))


def predict_rows(model: torch.nn.Module, image_set: ImageSet, ctx: RunContext, start: int, stop: int,
                 on_batch: Callable[[torch.Tensor, np.ndarray], None] | None = None) -> SetPredictions:
    """predict_set's inference over images start..stop of the set (a torchrun rank's shard; batches as in
    one process when start is a multiple of the batch size); nothing logged, no check of the whole set."""
    part = image_set.subset(range(start, stop))
    loader = make_loader(part, ctx.settings, ctx.settings.batch_size, ctx.settings.workers)
    indices, rows, failures = [np.empty(0, dtype=np.int64)], [], []
    with torch.no_grad():
        for inputs, _labels, batch_indices, batch_failures in tqdm(
                loader, desc=f"testing {image_set.name}", unit="batch", leave=False, disable=distributed.progress_off()):
            if batch_failures and not ctx.skip_bad_images:
                index, error = batch_failures[0]
                raise HuddError(f"{part.paths[index]}: cannot read image ({error}); replace or remove the "
                                "file, or pass --skip-bad-images to leave unreadable images out")
            failures += [(start + index, error) for index, error in batch_failures]
            if len(batch_indices):
                rows.append(ctx.task.output_rows(model(inputs.to(ctx.device))))
                indices.append(start + batch_indices.numpy())
                if on_batch is not None:
                    on_batch(inputs, start + batch_indices.numpy())
    logits = np.concatenate(rows) if rows else np.empty((0, 0), dtype=np.float32)
    return SetPredictions(np.concatenate(indices), logits, failures)


def checked(image_set: ImageSet, predictions: SetPredictions) -> SetPredictions:
    """The whole set's predictions, its skipped images logged; an error when none could be read."""
    for index, error in predictions.failures:
        log.warning("skipped unreadable image %s (%s)", image_set.paths[index], error)
    if not len(predictions.indices):
        raise HuddError(f"{image_set.root}: none of its images could be read")
    return predictions


def predict_shards(model: torch.nn.Module, image_set: ImageSet, ctx: RunContext, set_key: str, stamp: str,
                   describe: ImageDescriber | None = None) -> SetPredictions | None:
    """predict_set split over the ranks of a torchrun job (contiguous shards of whole batches): rank 0
    gets the whole set's predictions merged in image order (and `describe` every rank's descriptors),
    the other ranks None."""
    def shard(start: int, stop: int) -> dict[str, np.ndarray]:
        own = ImageDescriber(ctx.settings) if describe is not None and distributed.active() else describe
        p = predict_rows(model, image_set, ctx, start, stop, own)
        arrays = {"indices": p.indices, "logits": p.logits, "errors": np.array([e for _, e in p.failures], dtype=str),
                  "failed": np.array([i for i, _ in p.failures], dtype=np.int64)}
        return {**arrays, **own.arrays()} if own is not None and own is not describe else arrays

    shards = distributed.gather_shards(ctx.paths.scratch / "test", set_key, len(image_set), ctx.settings.batch_size,
                                       stamp, shard)
    if shards is None:
        return None
    if describe is not None and distributed.active():
        for saved in shards:
            describe.add(saved)
    filled = [s for s in shards if len(s["indices"])]
    merged = SetPredictions(
        np.concatenate([s["indices"] for s in shards]),
        np.concatenate([s["logits"] for s in filled]) if filled else np.empty((0, 0), dtype=np.float32),
        [(int(i), str(e)) for s in shards for i, e in zip(s["failed"], s["errors"])])
    return checked(image_set, merged)


def leave_out_unreadable(ctx: RunContext) -> None:
    """--skip-bad-images: the images the test step could not read (it wrote no row for them) are left out
    of the sets every later step of the run sees, so the unsafe set and retraining go on without them.
    Run after the test step ran or was reused (TestStep.after), when its rows match the listing but for those."""
    if not ctx.skip_bad_images:
        return
    for set_key, image_set in list(ctx.sets().items()):
        written = set(read_results(ctx.paths, set_key)["image"])
        rows = [i for i, path in enumerate(image_set.paths) if ctx.paths.relative(path) in written]
        if len(rows) < len(image_set):
            log.warning("%s: %d unreadable image(s) left out of the later steps (--skip-bad-images)",
                        image_set.root, len(image_set) - len(rows))
            ctx.keep_only(set_key, rows)


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


class ImageDescriber:
    """Collects the descriptors and object masks of a set's images from the batches of model inputs
    (un-normalised back to [0, 1]), then writes them in the order of the set's result rows."""

    def __init__(self, settings: Settings):
        self.mean = np.asarray(settings.mean, dtype=np.float64)[None, :, None, None]
        self.std = np.asarray(settings.std, dtype=np.float64)[None, :, None, None]
        self.tables, self.masks, self.valid = [], [], []
        self.shape = (0, 0)

    def __call__(self, inputs: torch.Tensor, _positions: np.ndarray) -> None:
        """predict_rows' on_batch: the batches come in the set's order, so their positions are not kept."""
        pixels = np.clip(inputs.detach().cpu().numpy() * self.std + self.mean, 0.0, 1.0).transpose(0, 2, 3, 1)
        masks, valid = descriptors.object_masks(pixels)
        self.tables.append(descriptors.image_descriptors(pixels, (masks, valid)))
        self.masks.append(np.packbits(masks.reshape(len(masks), -1), axis=1))
        self.valid.append(valid)
        self.shape = masks.shape[1:]

    def arrays(self) -> dict[str, np.ndarray]:
        """What this describer collected as plain arrays (a torchrun rank's shard file; no pickle): each
        descriptor column with its own dtype, so that rank 0's merged table writes as one process's."""
        table = pd.concat(self.tables, ignore_index=True) if self.tables else pd.DataFrame()
        columns = {f"describe_column{i}": table[name].to_numpy() for i, name in enumerate(table.columns)}
        return {"describe_names": np.array(list(table.columns), dtype=str), **columns,
                "describe_masks": np.concatenate(self.masks) if self.masks else np.empty((0, 0), dtype=np.uint8),
                "describe_valid": np.concatenate(self.valid) if self.valid else np.empty(0, dtype=bool),
                "describe_shape": np.asarray(self.shape)}

    def add(self, saved: dict[str, np.ndarray]) -> None:
        """Another describer's arrays (a rank's shard, in rank order)."""
        if not len(saved["describe_valid"]):
            return
        names = [str(name) for name in saved["describe_names"]]
        self.tables.append(pd.DataFrame({name: saved[f"describe_column{i}"] for i, name in enumerate(names)}))
        self.masks.append(saved["describe_masks"])
        self.valid.append(saved["describe_valid"])
        self.shape = tuple(int(v) for v in saved["describe_shape"])

    def write(self, paths: CasePaths, frame: pd.DataFrame) -> None:
        """`frame`: the set's result rows, whose images are the readable ones, in collection order."""
        table = pd.concat(self.tables, ignore_index=True)
        table.insert(0, "image", frame["image"].to_numpy())
        write_csv(table, paths.root / DESCRIPTOR_FILE)
        with atomic_path(paths.root / OBJECT_FILE) as temporary:
            with open(temporary, "wb") as stream:
                np.savez_compressed(stream, images=frame["image"].to_numpy(dtype=str), masks=np.concatenate(self.masks),
                                    valid=np.concatenate(self.valid), shape=np.asarray(self.shape))


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------

class TestStep(Step):
    name, title = "test", "test step"
    version = 3     # 2: the test images' descriptors and object masks; 3: their hue shares on the object
    every_rank = True

    def after(self, ctx: RunContext) -> None:
        leave_out_unreadable(ctx)

    def inputs(self, ctx: RunContext) -> dict:
        return {**ctx.model_fingerprint_part(),
                "sets": {k: image_set_digest(s, ctx.paths.root) for k, s in ctx.sets().items()},
                # the scenarios of every later figure (accuracy per scenario, purity, coverage) come from these
                "metadata": {k: metadata_digest(s.root) for k, s in ctx.sets().items()},
                "skip_bad_images": ctx.skip_bad_images, "error_threshold": ctx.settings.error_threshold}

    def outputs(self, ctx: RunContext) -> list[Path]:
        files = [result_path(ctx.paths, k) for k in ctx.sets()]
        files += [ctx.paths.root / DESCRIPTOR_FILE, ctx.paths.root / OBJECT_FILE]
        scenario_path = ctx.paths.root / SCENARIO_FILE
        return files + ([scenario_path] if scenario_path.is_file() else [])

    def compute(self, ctx: RunContext) -> None:
        """Under torchrun every rank predicts its shard of each set; rank 0 merges and writes."""
        model, stamp = ctx.model(), self.fingerprint(ctx)
        scenario_tables = []
        for set_key, image_set in ctx.sets().items():
            problem = ctx.task.check_images(image_set, resolve_input_size(ctx.settings))
            if problem:
                raise HuddError(problem)
            describe = ImageDescriber(ctx.settings) if set_key == "test" else None
            predictions = predict_shards(model, image_set, ctx, set_key, stamp, describe)
            if predictions is None:  # not rank 0
                continue
            frame = result_frame(image_set, predictions, ctx)
            write_csv(frame, result_path(ctx.paths, set_key))
            if describe is not None:
                describe.write(ctx.paths, frame)
            scenario_tables.append(scenario_accuracy(set_key, image_set, frame, ctx))
        if not distributed.is_main():
            return
        for set_key in ctx.sets():
            distributed.clear_shards(ctx.paths.scratch / "test", set_key)
        scenarios = pd.concat(scenario_tables, ignore_index=True)
        scenario_path = ctx.paths.root / SCENARIO_FILE
        if len(scenarios):
            write_csv(scenarios, scenario_path)
        elif scenario_path.exists():
            scenario_path.unlink()  # stale: the sets no longer carry scenarios

    def summary(self, ctx: RunContext) -> dict:
        """Accuracy per set (and per scenario) read back from the step's own files; for class folders
        named by numbers, also the accuracy the model's outputs would have in numeric order."""
        classification = ctx.task.name == "classification"
        summary = {"sets": {}, "scenarios": read_scenario_accuracy(ctx.paths),
                   "chance": 100.0 / len(ctx.classes) if classification else None,
                   "classes": list(ctx.classes),
                   "numeric_order": numeric_order(ctx.classes) if classification else None}
        for set_key in ctx.sets():
            frame = read_results(ctx.paths, set_key)
            entry = {"images": len(frame), "file": result_path(ctx.paths, set_key)}
            if "result" in frame.columns:
                entry["wrong"] = int(frame["result"].eq("Wrong").sum())
                entry["accuracy"] = 100.0 * (1 - entry["wrong"] / len(frame))
                scores = ctx.task.rows_of_results(frame, ctx.classes) if classification else None
                if summary["numeric_order"]:
                    entry["numeric_order_accuracy"] = accuracy_in_order(scores, frame["expected"],
                                                                        summary["numeric_order"])
                if classification and "best_order" not in summary:   # the first labelled set: training, else test
                    order = best_order(scores, frame["expected"], ctx.classes)
                    summary["best_order"] = {"set": SET_FOLDERS[set_key], "order": order,
                                             "accuracy": accuracy_in_order(scores, frame["expected"], order)}
            summary["sets"][SET_FOLDERS[set_key]] = entry
        return summary


def best_order(scores: np.ndarray, expected: pd.Series, classes: list[str]) -> list[str]:
    """The names for the model's outputs, in output order, under which it gets the most of a set's images
    right (a one-to-one matching of outputs to classes, scipy's linear_sum_assignment on the counts of
    each output's argmax per expected class). Where a model's outputs are in another order than the class
    folders' (a label list of the user's own), its accuracy read in this order shows it."""
    from scipy.optimize import linear_sum_assignment
    index = {name: i for i, name in enumerate(classes)}
    counts = np.zeros((len(classes), len(classes)))
    np.add.at(counts, (scores.argmax(axis=1), expected.astype(str).map(index).to_numpy(dtype=np.int64)), 1)
    outputs, names = linear_sum_assignment(counts, maximize=True)
    order = list(classes)
    for output, name in zip(outputs, names):
        order[output] = classes[name]
    return order


def numeric_order(classes: list[str]) -> list[str] | None:
    """The classes in numeric order where every name is a whole number and that order is not theirs
    ("0".."10": ImageFolder, and HUDD, order folders by name, 0, 1, 10, 2, ...; a model trained on the
    numbers as labels has its outputs in numeric order), else None."""
    if not all(name.strip().isdecimal() for name in classes):
        return None
    ordered = sorted(classes, key=lambda name: (int(name), name))
    return ordered if ordered != list(classes) else None


def accuracy_in_order(scores: np.ndarray, expected: pd.Series, order: list[str]) -> float:
    """The accuracy (%) of a set's output rows (`scores`, one column per class) were output i the class
    order[i]; `expected`: each row's class name."""
    predicted = np.asarray(order, dtype=object)[scores.argmax(axis=1)]
    return 100.0 * float(np.mean(predicted == expected.astype(str).to_numpy(dtype=object)))


STEP = TestStep()
