"""What a model's task decides, in one object per task: classification and keypoint regression.

Each step asks the run's task (`RunContext.task`) instead of branching on the task's name:
- how a set's labels are read (class folders, or `labels.csv` of keypoints);
- what the model's output must look like, and the rows one image's output gives (logits, or decoded
  keypoints x0, y0, x1, ...);
- the result table of a set, which image is Wrong, and the error images' `expected`/`predicted`;
- what LRP explains (the seed's target);
- retraining's loss, optimiser and "correct", and the test measures of a model.

The keypoint primitives themselves (decoding, errors, components, target maps) are `keypoints.py`.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

import keypoints
from Helper import (KEYPOINT_LABELS, MORE_OUTPUTS_HINT, HuddError, ImageSet, class_folders, list_image_set,
                    list_keypoint_set)

WRONG, CORRECT = "Wrong", "Correct"


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
        """Accuracy per class (keypoints: per face component)."""
        if self.component_ok is not None:
            table = pd.DataFrame({"class": self.component_ok.columns, "images": len(self.component_ok),
                                  "correct": self.component_ok.sum().to_numpy()})
        else:
            table = (pd.DataFrame({"class": self.expected.to_numpy(), "correct": self.correct.to_numpy()})
                     .groupby("class", sort=True)["correct"].agg(images="size", correct="sum").reset_index())
        table["accuracy"] = 100.0 * table["correct"] / table["images"]
        return table


class ClassificationTask:
    """argmax of the logits against the class folder; explained: the predicted (or true) class."""

    name = "classification"
    unsafe_pick = "contrast"  # assign_pick auto: ahead of ClosestU and of BL1 on the traffic-sign demo (docs/method.md)
    explain_choices = ("predicted", "expected")
    label_layout = "one sub-folder per class"
    labelling_hint = "put them in one folder per class"

    @property
    def explained_words(self) -> tuple[str, str]:
        """(what each heatmap explains, the caption of an error image) in the report's words."""
        explained = "the expected (true) class" if self.explain == "expected" else "the predicted class"
        return explained, "expected → predicted class"

    def __init__(self, explain: str = "predicted", error_threshold: float = 0.0, output_order: list[str] | None = None):
        self.explain = explain
        self.output_order = output_order  # the `classes` setting: the class folders in the model's output order

    def list_set(self, set_root, name: str, known: list[str] | None = None) -> ImageSet:
        """A set's images and labels; `known`: the training set's classes. The training set's folders are
        the classes, in sorted order (torchvision's ImageFolder: "10" before "2") or in `output_order`."""
        if known is None and self.output_order is not None and Path(set_root).is_dir():
            def same_form(names):  # as list_image_set compares them (macOS writes names decomposed)
                return {unicodedata.normalize("NFC", n) for n in names}
            folders = [p.name for p in class_folders(Path(set_root))]
            if folders and not same_form(folders) <= same_form(self.output_order):
                # the setting may name more classes than the folders hold (a model of 1,000 ImageNet classes
                # looked at on a few of them): its outputs; a folder it does not name has no output
                unnamed = sorted(same_form(folders) - same_form(self.output_order))
                raise HuddError(f"{set_root}: its class folder(s) {', '.join(map(repr, unnamed))} are not in the "
                                f"setting classes ({', '.join(self.output_order[:12])}"
                                f"{', ...' if len(self.output_order) > 12 else ''}); the setting lists the model's "
                                "outputs in order, a name for each, and every class folder must be one of them")
            known = self.output_order
        return list_image_set(set_root, classes=known, name=name)

    # ---- labels given in a file for part of an unlabelled set (Helper.with_partial_labels)
    def label_columns(self, classes: list[str]) -> list[str]:
        return ["label"]

    def parse_labels(self, table: pd.DataFrame, classes: list[str], where) -> tuple[np.ndarray, None]:
        """Per row its class index (NaN where the label is empty); a name that is no class is an error."""
        index = {unicodedata.normalize("NFC", c): i for i, c in enumerate(classes)}
        labels = np.full(len(table), np.nan)
        for row, name in enumerate(table["label"]):
            if isinstance(name, str) and name.strip():
                key = unicodedata.normalize("NFC", name.strip())
                if key not in index:
                    raise HuddError(f"{where}: the label {name!r} of {table['image'].iloc[row]!r} is not a class of the "
                                    f"training set ({', '.join(classes)}); write one of those names")
                labels[row] = index[key]
        return labels, None

    def rows_of_results(self, results: pd.DataFrame, classes: list[str]) -> np.ndarray:
        """The model's output rows as a result table holds them (the logits)."""
        return results[[f"score_{c}" for c in classes]].to_numpy(dtype=np.float64)

    def check_images(self, image_set: ImageSet, input_size: list[int]) -> str:
        """Why the set's images do not suit the model ("" when they do)."""
        return ""

    def check_targets(self, image_set: ImageSet, input_size: list[int], where) -> str:
        """Why the set's label targets (from `where`) cannot be right ("" when they can)."""
        return ""

    # ---- the model's output
    def check_output(self, output: torch.Tensor, num_classes: int) -> str:
        """Why the output does not fit the task ("" when it does)."""
        if output.ndim == 2 and output.shape[1] == 1 and num_classes == 2:
            return ("the model gives one output (a binary model with a sigmoid) for the training set's 2 classes; "
                    "HUDD explains one output per class, as a softmax model gives: a model with a single logit z "
                    "becomes one by returning torch.cat([-z / 2, z / 2], 1) from a class of yours (--arch)")
        if output.ndim != 2 or output.shape[1] != num_classes:
            more = output.ndim == 2 and output.shape[1] > num_classes
            return (f"the model's output has shape {tuple(output.shape[1:])} but the training set has {num_classes} "
                    "classes; check the model or the class folders of DataSets/TrainingSet"
                    + (MORE_OUTPUTS_HINT if more else ""))
        return ""

    def output_rows(self, outputs: torch.Tensor) -> np.ndarray:
        return outputs.float().cpu().numpy()

    # ---- results of a set
    def result_frame(self, images: list[str], rows: np.ndarray, labels: np.ndarray | None, targets,
                     classes: list[str]) -> pd.DataFrame:
        """image, result, expected, predicted, score_<class>... (no result/expected when unlabelled)."""
        predicted = rows.argmax(axis=1)
        frame = pd.DataFrame({"image": images})
        if labels is not None:
            frame["result"] = np.where(predicted == labels, CORRECT, WRONG)
            frame["expected"] = [classes[c] for c in labels]
        frame["predicted"] = [classes[c] for c in predicted]
        return pd.concat([frame, pd.DataFrame(rows, columns=[f"score_{c}" for c in classes])], axis=1)

    def error_index(self, results: pd.DataFrame) -> pd.DataFrame:
        """The Wrong rows as image, expected, predicted."""
        wrong = results[results["result"] == WRONG]
        return wrong[["image", "expected", "predicted"]].reset_index(drop=True)

    # ---- what LRP explains
    def explained_column(self) -> str:
        """The column of the error index naming the output each error image's relevance explains."""
        return "expected" if self.explain == "expected" else "predicted"

    def explained_channels(self, index: pd.DataFrame, classes: list[str]) -> torch.Tensor:
        return torch.tensor([classes.index(c) for c in index[self.explained_column()]], dtype=torch.long)

    def label_free_channels(self, results: pd.DataFrame, classes: list[str]) -> torch.Tensor:
        """Images explained without their labels (the improvement images, the contrast's test images)
        are explained through their predicted class."""
        return torch.tensor([classes.index(c) for c in results["predicted"]], dtype=torch.long)

    def uncertainty(self, model: nn.Module, inputs: torch.Tensor) -> np.ndarray:
        """(N, 1): 1 - the margin of the model's own softmax output (top-1 minus top-2 probability)."""
        return (1.0 - softmax_margin(model(inputs))).cpu().numpy()[:, None]

    def uncertainty_of_results(self, results: pd.DataFrame, classes: list[str]) -> np.ndarray | None:
        """`uncertainty` from a set's result rows (their score_ columns: the model's logits, no label),
        without running the model again."""
        logits = results[[f"score_{c}" for c in classes]].to_numpy(dtype=np.float32)
        return (1.0 - softmax_margin(torch.from_numpy(logits))).numpy()[:, None]

    def output_shape(self, model: nn.Module, example: torch.Tensor):
        return None  # class targets need no mask

    def lrp_target(self, channels: torch.Tensor, output_shape, device: torch.device):
        return channels.to(device)

    # ---- retraining and measuring
    def truth(self, labels: list[int], targets) -> torch.Tensor:
        return torch.as_tensor(labels, dtype=torch.long)

    def loss(self, outputs: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the logits; of a log-softmax model's log-probabilities it is the same (their
        softmax is the probabilities). A model ending in softmax gives probabilities: their negative
        log-likelihood, since cross-entropy would take a softmax of them again and barely train."""
        if probability_rows(outputs):
            return nn.functional.nll_loss(outputs.clamp_min(1e-12).log(), truth)
        return nn.functional.cross_entropy(outputs, truth)

    def count_correct(self, outputs: torch.Tensor, truth: torch.Tensor) -> int:
        return int((outputs.argmax(1) == truth).sum())

    def optimiser(self, model: nn.Module, settings) -> torch.optim.Optimizer:
        """The original's SGD (reference §9.1)."""
        return torch.optim.SGD(model.parameters(), lr=settings.learning_rate, momentum=settings.momentum,
                               weight_decay=settings.weight_decay)

    def measures(self, rows: np.ndarray, labels: list[int], targets, images: list[str],
                 classes: list[str]) -> TestMeasures:
        predicted = rows.argmax(axis=1)
        expected = np.asarray(labels)
        names = np.asarray(classes, dtype=object)
        return TestMeasures(correct=pd.Series(predicted == expected, index=images),
                            predicted=pd.Series(names[predicted], index=images),
                            expected=pd.Series(names[expected], index=images))


def probability_rows(outputs: torch.Tensor) -> bool:
    """Whether a class model's outputs are already probabilities (every row >= 0 and summing to 1: a
    model that ends in softmax), not logits or log-probabilities."""
    rows = outputs.detach().float()
    return rows.dim() == 2 and rows.shape[1] > 1 and bool((rows >= 0).all()) and \
        bool(torch.allclose(rows.sum(dim=1), torch.ones(len(rows), device=rows.device), atol=1e-4))


def softmax_margin(logits: torch.Tensor) -> torch.Tensor:
    """Per row: top-1 minus top-2 softmax probability (1 with a single class); outputs that are already
    probabilities (probability_rows) are taken as they are."""
    probabilities = logits.float() if probability_rows(logits) else torch.softmax(logits.float(), dim=1)
    if probabilities.shape[1] < 2:
        return torch.ones(len(probabilities), device=probabilities.device)
    top = probabilities.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


SHIFT = 2   # pixels: keypoint uncertainty from the disagreement of shifted copies (KeypointTask.uncertainty)


class KeypointTask(ClassificationTask):
    """One output map per keypoint; an image is Wrong above a mean keypoint error (keypoints.py)."""

    name = "keypoints"
    unsafe_pick = "closest"   # assign_pick auto: the contrast was not ahead on the keypoint demo (docs/method.md)
    explain_choices = ("predicted", "worst", "all")
    label_layout = "a labels.csv with the keypoints"
    labelling_hint = "add a labels.csv with their keypoints"

    @property
    def explained_words(self) -> tuple[str, str]:
        explained = "every keypoint's output map" if self.explain == "all" else "the worst keypoint's output map"
        return explained, "the worst keypoint's face component → the worst keypoint"

    def __init__(self, explain: str = "worst", error_threshold: float = 4.0):
        self.explain = explain
        self.threshold = error_threshold

    def list_set(self, set_root, name: str, known: list[str] | None = None) -> ImageSet:
        return list_keypoint_set(set_root, name=name, keypoints=known)

    def label_columns(self, classes: list[str]) -> list[str]:
        """As labels.csv: an x and a y column per keypoint."""
        return [f"{name}_{axis}" for name in classes for axis in ("x", "y")]

    def parse_labels(self, table: pd.DataFrame, classes: list[str], where) -> tuple[None, np.ndarray]:
        """(images, keypoints, 2) pixel coordinates, NaN in the rows left empty; a row filled in part, or
        a value that is not a number, is an error (a missing keypoint is 0 or -1, as in labels.csv)."""
        columns = self.label_columns(classes)
        # a decimal comma, as a spreadsheet writes where ';' separates the columns
        values = (table[columns].apply(lambda column: pd.to_numeric(column.str.strip().str.replace(",", "."),
                                                                    errors="coerce"))
                  .to_numpy(dtype=np.float64))
        given = table[columns].notna().to_numpy()
        bad = np.flatnonzero((given & np.isnan(values)).any(axis=1) | (given.any(axis=1) & ~given.all(axis=1)))
        if len(bad):
            raise HuddError(f"{where}: the row of {table['image'].iloc[bad[0]]!r} has an empty or non-numeric "
                            "coordinate; give every keypoint (0 or -1 for a missing one) or leave the whole row empty")
        return None, values.reshape(len(table), len(classes), 2)

    def rows_of_results(self, results: pd.DataFrame, classes: list[str]) -> np.ndarray:
        """The decoded keypoints x0, y0, x1, ... as a result table holds them."""
        return results[[f"pred_{n}_{axis}" for n in classes for axis in ("x", "y")]].to_numpy(dtype=np.float64)

    def check_images(self, image_set: ImageSet, input_size: list[int]) -> str:
        """Keypoint labels are pixels of the stored image and the maps are at the model's input size,
        so the two must agree (checked on the set's first image)."""
        from PIL import Image
        height, width = input_size
        with Image.open(image_set.paths[0]) as image:
            if image.size != (width, height):
                return (f"{image_set.paths[0]}: is {image.size[0]}x{image.size[1]} pixels but the keypoint model takes "
                        f"{width}x{height}; keypoint images must have the model's input size")
        return self.check_targets(image_set, input_size, image_set.root / KEYPOINT_LABELS)

    def check_targets(self, image_set: ImageSet, input_size: list[int], where) -> str:
        """A keypoint label is a pixel of the image (0 or -1: missing): one outside it is a mistake of units
        or columns (ones of a larger original image, or x and y of the wrong keypoint, often are), which
        training would learn silently; so are coordinates scaled to 0..1, inside the image but every one in
        its top-left pixel. NaN (no label) passes."""
        if image_set.targets is None:
            return ""
        height, width = input_size
        x, y = image_set.targets[..., 0], image_set.targets[..., 1]
        given = np.isfinite(x) & np.isfinite(y) & ~(((x == 0) & (y == 0)) | ((x == -1) & (y == -1)))
        if max(height, width) > 2 and given.any() and (np.abs(image_set.targets[given]) <= 1).all():
            return (f"{where}: every keypoint lies within 0..1 (e.g. {x[given][0]:g}, {y[given][0]:g}): coordinates "
                    f"scaled to the image size; labels are pixel coordinates of the stored image (here up to "
                    f"{width}x{height}): multiply x by the image width and y by its height")
        outside = (x < -1) | (x > width) | (y < -1) | (y > height)
        if not outside.any():
            return ""
        row, point = np.argwhere(outside)[0]
        image = Path(image_set.paths[row]).relative_to(image_set.root).as_posix()
        at = f"({x[row, point]:g}, {y[row, point]:g})"
        return (f"{where}: keypoint {image_set.classes[point]} of {image!r} is at {at}, "
                f"outside the {width}x{height} image ({int(outside.any(axis=1).sum())} image(s) have such a keypoint); "
                "labels are pixel coordinates of the stored image, 0 or -1 for a missing keypoint")

    def check_output(self, output: torch.Tensor, num_classes: int) -> str:
        if output.ndim == 2 and output.shape[1] == 2 * num_classes:
            return (f"the model's output has shape {tuple(output.shape[1:])}, an x and a y per keypoint: HUDD's "
                    f"keypoint task takes models that give one map per keypoint ({num_classes} in labels.csv of the "
                    "training set), as KPNet; a head regressing the coordinates themselves is not supported yet")
        if output.ndim != 4 or output.shape[1] != num_classes:
            return (f"the model's output has shape {tuple(output.shape[1:])} but a keypoint model must give one map "
                    f"per keypoint ({num_classes} in labels.csv of the training set)")
        return ""

    def output_rows(self, outputs: torch.Tensor) -> np.ndarray:
        return keypoints.decode(outputs).reshape(len(outputs), -1).cpu().numpy()

    def result_frame(self, images, rows, labels, targets, classes) -> pd.DataFrame:
        """image, result, mean_error, worst_keypoint, worst_component, one Error/OK column per component,
        error_<kp> and pred_<kp>_x/_y (only the predictions when unlabelled)."""
        predicted = rows.reshape(len(rows), len(classes), 2)
        frame = pd.DataFrame({"image": images})
        if targets is not None:
            errors = keypoints.keypoint_errors(predicted, targets)
            worst = keypoints.worst_keypoints(errors)
            frame["result"] = np.where(keypoints.is_wrong(errors, self.threshold), WRONG, CORRECT)
            frame["mean_error"] = keypoints.mean_errors(errors)
            frame["worst_keypoint"] = [classes[k] if k >= 0 else "" for k in worst]
            frame["worst_component"] = keypoints.component_of(worst, len(classes))
            for component, flagged in keypoints.component_flags(errors, self.threshold).items():
                frame[component] = np.where(flagged, "Error", "OK")
            frame = pd.concat([frame, pd.DataFrame(errors, columns=[f"error_{n}" for n in classes])], axis=1)
        coords = pd.DataFrame(predicted.reshape(len(predicted), -1),
                              columns=[f"pred_{n}_{axis}" for n in classes for axis in ("x", "y")])
        return pd.concat([frame, coords], axis=1)

    def error_index(self, results: pd.DataFrame) -> pd.DataFrame:
        """`expected` is the worst keypoint's face component and `predicted` the worst keypoint."""
        renamed = results.rename(columns={"worst_component": "expected", "worst_keypoint": "predicted"})
        return super().error_index(renamed)

    def label_free_channels(self, results: pd.DataFrame, classes: list[str]) -> torch.Tensor:
        """The keypoint the model is least sure of (`uncertain_keypoint`, label-free: the worst keypoint
        would need the labels); -1 (every map) without it or with `"explain": "all"`."""
        if "uncertain_keypoint" not in results.columns or self.explain == "all":
            return torch.full((len(results),), -1, dtype=torch.long)
        return torch.tensor([classes.index(k) if isinstance(k, str) else -1 for k in results["uncertain_keypoint"]],
                            dtype=torch.long)

    def uncertainty_of_results(self, results: pd.DataFrame, classes: list[str]) -> None:
        """None: the shift proxy needs the model's outputs on shifted images, not in the result rows."""
        return None

    def uncertainty(self, model: nn.Module, inputs: torch.Tensor) -> np.ndarray:
        """(N, keypoints): how far each keypoint's prediction moves when the image is shifted by SHIFT
        pixels (right, left, down, up; edges replicated), the shift taken back: the mean distance in
        pixels. A label-free proxy of the model's own uncertainty; a flip would need the left/right
        pairing of the keypoints, which a case does not declare, and the keypoint networks have no dropout."""
        base = keypoints.decode(model(inputs))
        moved, height, width = [], *inputs.shape[2:]
        padded = nn.functional.pad(inputs, (SHIFT, SHIFT, SHIFT, SHIFT), mode="replicate")
        for dx, dy in ((SHIFT, 0), (-SHIFT, 0), (0, SHIFT), (0, -SHIFT)):
            shifted = padded[:, :, SHIFT - dy:SHIFT - dy + height, SHIFT - dx:SHIFT - dx + width]
            back = keypoints.decode(model(shifted)) - torch.tensor([dx, dy], device=inputs.device, dtype=base.dtype)
            moved.append((back - base).norm(dim=2))
        return torch.stack(moved).mean(dim=0).cpu().numpy()

    def output_shape(self, model: nn.Module, example: torch.Tensor):
        """The output shape a keypoint mask needs (one forward of one image)."""
        with torch.no_grad():
            return tuple(model(example[:1]).shape[1:])

    def lrp_target(self, channels: torch.Tensor, output_shape, device: torch.device):
        """A mask over the output maps: the explained keypoint's map, or every map (channel -1, or
        `"explain": "all"`)."""
        channels = channels.to(device)
        mask = torch.zeros((len(channels), *output_shape), device=device)
        every_map = channels < 0 if self.explain != "all" else torch.ones_like(channels, dtype=torch.bool)
        mask[every_map] = 1.0
        one = torch.nonzero(~every_map).flatten()
        mask[one, channels[one]] = 1.0
        return mask

    def truth(self, labels, targets) -> torch.Tensor:
        return torch.as_tensor(targets, dtype=torch.float32)

    def loss(self, outputs: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """MSE against Gaussian target maps (sigma 5, x10; reference §9.4)."""
        return nn.functional.mse_loss(outputs, keypoints.target_maps(truth, *outputs.shape[2:]).to(outputs.device))

    def count_correct(self, outputs: torch.Tensor, truth: torch.Tensor) -> int:
        errors = keypoints.keypoint_errors(keypoints.decode(outputs).cpu().numpy(), truth.cpu().numpy())
        return int((~keypoints.is_wrong(errors, self.threshold)).sum())

    def optimiser(self, model: nn.Module, settings) -> torch.optim.Optimizer:
        """RMSprop with conv1-conv4 frozen where the model can freeze them (reference §9.4)."""
        if hasattr(model, "freeze_early"):
            model.freeze_early()
        return torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate)

    def measures(self, rows, labels, targets, images, classes) -> TestMeasures:
        errors = keypoints.keypoint_errors(rows.reshape(len(rows), -1, 2), targets)
        flags = keypoints.component_flags(errors, self.threshold)
        worst = keypoints.component_of(keypoints.worst_keypoints(errors), errors.shape[1])
        return TestMeasures(correct=pd.Series(~keypoints.is_wrong(errors, self.threshold), index=images),
                            predicted=pd.Series(worst, index=images), expected=pd.Series("", index=images),
                            mean_error=pd.Series(keypoints.mean_errors(errors), index=images),
                            component_ok=pd.DataFrame({c: ~f for c, f in flags.items()}, index=images))


TASKS = {task.name: task for task in (ClassificationTask, KeypointTask)}
