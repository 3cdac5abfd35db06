"""What every HUDD step shares: case-study paths, case settings, image sets, model loading,
device and seed, the run manifest and atomic file writes.

A step module imports from here and from nothing later in the pipeline.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import hashlib
import io
import importlib.util
import inspect
import json
import logging
import os
import pickle
import random
import shutil
import sys
import threading
import unicodedata
import urllib.error
import zipfile
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from lrp import RULE_PRESETS

log = logging.getLogger("hudd")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")  # ImageFolder's
COMPANION_EXTENSIONS = (".csv", ".json", ".txt", ".md", ".xml", ".yaml", ".yml", ".npy", ".npz")  # not images: no note
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class HuddError(Exception):
    """A problem with the user's input or data. The command line prints it as one line and
    exits with status 2; the message names the path or value and says what to do."""


class QuietExit(Exception):
    """Ends a command with `status` and prints nothing, because another process has said why (under
    torchrun, rank 0 prints the job's one error line and the other ranks stop with this)."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


# --------------------------------------------------------------------------------------------
# Case-study paths
# --------------------------------------------------------------------------------------------

SET_FOLDERS = {"train": "TrainingSet", "test": "TestSet", "improve": "ImprovementSet"}
IMPROVEMENT_LABELS = "ImprovementLabels.csv"


def _under_root(name: str) -> property:
    return property(lambda self: self.root / name, doc=f"CASE/{name}")


@dataclass(frozen=True)
class CasePaths:
    """Where a case study's inputs live, and the folder T/ that holds what the steps derive from the
    test set's errors (design.md, 'The case-study directory'). Each step names its own outputs."""

    root: Path
    datasets = _under_root("DataSets")
    models = _under_root("DNNModels")
    settings_file = _under_root("hudd.json")
    manifest = _under_root("hudd_manifest.json")
    lock_file = _under_root(".hudd.lock")
    scratch = _under_root(".hudd-shards")    # the ranks' partial results under torchrun, until rank 0 merges them
    t_dir = _under_root("T")
    # labels of some improvement images (the unsafe set), for an improvement set without labels; the user
    # writes it (from T/UnsafeSet/to_label.csv), the tool only reads it
    improvement_labels = property(lambda self: self.datasets / IMPROVEMENT_LABELS,
                                  doc="CASE/DataSets/ImprovementLabels.csv")

    def set_dir(self, set_key: str) -> Path:
        """The folder that holds a set's class folders (or its images, when unlabelled).

        The original tool's packages put improvement images under a doubled folder,
        `ImprovementSet/ImprovementSet/<class>/`; both that and the plain layout are accepted."""
        top = self.datasets / SET_FOLDERS[set_key]
        doubled = top / SET_FOLDERS[set_key]
        if doubled.is_dir() and not _has_images(top) and class_folders(top) == [doubled]:
            return doubled
        return top

    def relative(self, path: Path) -> str:
        """A path as written into result files: relative to the case directory, '/'-separated."""
        return Path(os.path.relpath(path, self.root)).as_posix()


def path_below_set(image: str) -> list[str]:
    """The parts of a case-relative image path below its set folder: `DataSets/<Set>/` (and the doubled
    `ImprovementSet/ImprovementSet/` layout's second folder) taken off; a class image gives [class, file],
    a keypoint image [file] or [its folders..., file]."""
    parts = image.split("/")
    if len(parts) < 3 or parts[0] != "DataSets":
        return parts[-1:]
    below = parts[2:]
    return below[1:] if len(below) > 1 and below[0] == parts[1] else below


NAME_BYTES = 255   # the longest file name most file systems take (ext4, NTFS, APFS), in bytes


def fitting_name(name: str, room: int = 0) -> str:
    """`name` as a file name that leaves `room` bytes of NAME_BYTES for a suffix: unchanged where it fits;
    else its stem cut (at a character) and a hash of the whole name added before the extension, so that
    two long names that differ only at their end stay two names."""
    limit = NAME_BYTES - room
    if len(name.encode()) <= limit:
        return name
    stem, extension = os.path.splitext(name)
    tag = "~" + hashlib.sha256(name.encode()).hexdigest()[:12]
    keep = limit - len(tag.encode()) - len(extension.encode())
    return stem.encode()[:keep].decode(errors="ignore") + tag + extension


def class_folders(folder: Path) -> list[Path]:
    """A set folder's sub-folders, sorted; hidden ones (.ipynb_checkpoints and the like) are no class."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _refuse_nested_images(class_folder: Path) -> None:
    """Images are read directly inside each class folder: ones in folders below it would be left out
    silently (torchvision's ImageFolder reads them), so they stop the run instead."""
    for inner in class_folders(class_folder):
        nested = next((p for p in inner.rglob("*") if _is_image(p)), None)
        if nested is not None:
            raise HuddError(f"{inner}: images in a folder inside class folder {class_folder.name} (e.g. {nested.name}); "
                            f"HUDD reads the images directly in each class folder: move them up into {class_folder}")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _has_images(folder: Path) -> bool:
    return any(_is_image(p) for p in folder.iterdir())


# --------------------------------------------------------------------------------------------
# Image sets
# --------------------------------------------------------------------------------------------

UNLABELLED = -1


@dataclass
class ImageSet:
    """The images of one set, in a stable order (class, then file name).

    `labels[i]` indexes `classes`; it is UNLABELLED (-1) for images of an unlabelled set (images
    lying directly in the set folder, without class folders)."""

    name: str
    root: Path
    paths: list[Path]
    labels: list[int]
    classes: list[str]
    targets: np.ndarray | None = None   # keypoint sets: (images, keypoints, 2) pixel (x, y); None when unlabelled

    @property
    def labelled(self) -> bool:
        return bool(self.paths) and self.labels[0] != UNLABELLED

    def subset(self, rows) -> ImageSet:
        """The images at `rows` (positions in this set), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        return replace(self, paths=[self.paths[i] for i in rows], labels=[self.labels[i] for i in rows],
                       targets=None if self.targets is None else self.targets[rows])

    def __len__(self) -> int:
        return len(self.paths)


def list_image_set(set_root: Path, classes: list[str] | None = None, name: str = "") -> ImageSet:
    """Lists a set folder: one folder per class (names may hold spaces, dots, underscores), or
    images directly in the folder for an unlabelled set. With `classes` given (the training set's),
    the set's class folders must be among them; its labels index that list."""
    name = name or set_root.name
    if not set_root.is_dir():
        raise HuddError(f"{set_root}: image set folder not found; create it with one sub-folder per class"
                        + _other_set_folders(set_root))
    class_dirs = class_folders(set_root)
    if class_dirs:
        loose = sorted(p for p in set_root.iterdir() if _is_image(p))
        if loose:  # they would be left out silently: a set is either labelled by folders or not at all
            raise HuddError(f"{set_root}: holds class folders and {len(loose)} image(s) outside them (e.g. "
                            f"{loose[0].name}); move them into their class folders, or, for an unlabelled set, "
                            "take every image out of the folders")
        folder_classes = [d.name for d in class_dirs]
        classes = folder_classes if classes is None else classes
        # names compared in one Unicode form: macOS writes "ü" decomposed (NFD), other systems composed
        index = {unicodedata.normalize("NFC", c): i for i, c in enumerate(classes)}
        unknown = [c for c in folder_classes if unicodedata.normalize("NFC", c) not in index]
        if unknown:
            raise HuddError(
                f"{set_root}: class folder(s) {', '.join(repr(c) for c in unknown)} are not classes of the "
                f"training set ({', '.join(classes)}); rename or remove them")
        paths, labels, unread = [], [], []
        for folder in class_dirs:
            _refuse_nested_images(folder)
            images, left_out = _images_and_unread(folder)
            paths += images
            labels += [index[unicodedata.normalize("NFC", folder.name)]] * len(images)
            unread += left_out
    else:
        paths, unread = _images_and_unread(set_root)
        labels = [UNLABELLED] * len(paths)
        classes = list(classes or [])
    _note_unread_files(set_root, unread)
    _refuse_names_not_utf8(set_root, paths)
    if not paths:
        raise HuddError(
            f"{set_root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files in its class folders)")
    return ImageSet(name=name, root=set_root, paths=paths, labels=labels, classes=classes)


def _other_set_folders(set_root: Path) -> str:
    """The folders that lie where a set was looked for (train/, test/, val/ as many projects name them),
    for the message that the set is missing; "" where there are none."""
    parent = set_root.parent
    others = sorted(p.name for p in parent.iterdir() if p.is_dir() and p.name not in SET_FOLDERS.values()
                    and not p.name.startswith(".")) if parent.is_dir() else []
    if not others:
        return ""
    return (f" ({parent.name} holds {', '.join(others[:6])}{', ...' if len(others) > 6 else ''}: HUDD reads "
            f"{', '.join(SET_FOLDERS.values())}; rename them)")


def _refuse_names_not_utf8(set_root: Path, paths: list[Path]) -> None:
    """Image paths go into UTF-8 tables. A file or folder name that is not UTF-8 text (bytes of another
    encoding, such as Latin-1 from an older system, which Linux keeps as they are) stops the run with its
    name, instead of an encoding error at the first table. One encoding of every path (sets hold 10^5
    images); where it fails, the error's position names the path."""
    joined = "\n".join(map(str, paths))
    try:
        joined.encode("utf-8")
    except UnicodeEncodeError as error:
        relative = paths[joined.count("\n", 0, error.start)].relative_to(set_root)
        shown = os.fsencode(relative).decode("utf-8", "backslashreplace")
        raise HuddError(f"{set_root}: the name '{shown}' is not UTF-8 text (bytes of another encoding, such as "
                        f"Latin-1); rename it, e.g. with convmv -f latin1 -t utf8 -r --notest {set_root}") from None


def _images_and_unread(folder: Path) -> tuple[list[Path], list[Path]]:
    """(the images, the other files but hidden ones and text companions) directly in `folder`, sorted;
    one listing for both."""
    images, unread = [], []
    for path in sorted(folder.iterdir()):
        if _is_image(path):
            images.append(path)
        elif path.is_file() and not path.name.startswith(".") and path.suffix.lower() not in COMPANION_EXTENSIONS:
            unread.append(path)
    return images, unread


# `extra` of a warning that every rank of a torchrun job meets alike (listing the case's sets and labels):
# the ranks but rank 0 leave it out (distributed.init_process_group), so that it is printed once.
SAME_ON_EVERY_RANK = {"same_on_every_rank": True}


def _note_unread_files(set_root: Path, unread: list[Path]) -> None:
    """A warning naming the files the set leaves out for their extension (a .gif, a .heic): left out
    silently, a class could lose its images without a word."""
    if unread:
        log.warning("%s: %d file(s) left out, of a kind HUDD does not read as an image (e.g. %s); images are %s",
                    set_root, len(unread), unread[0].relative_to(set_root), ", ".join(IMAGE_EXTENSIONS),
                    extra=SAME_ON_EVERY_RANK)


KEYPOINT_LABELS = "labels.csv"


def list_keypoint_set(set_root: Path, name: str = "", keypoints: list[str] | None = None) -> ImageSet:
    """A keypoint set: images anywhere under the set folder and, when labelled, `labels.csv` with
    `image` (path relative to the set folder) then `<kp>_x, <kp>_y` per keypoint (0 or -1: missing).
    Without labels.csv the set is unlabelled (allowed for the improvement set only)."""
    name = name or set_root.name
    if not set_root.is_dir():
        raise HuddError(f"{set_root}: image set folder not found" + _other_set_folders(set_root))
    label_file = set_root / KEYPOINT_LABELS
    if not label_file.is_file():
        images = sorted(p for p in set_root.rglob("*") if _is_image(p))
        if not images:
            raise HuddError(f"{set_root}: no images found")
        _refuse_names_not_utf8(set_root, images)
        return ImageSet(name=name, root=set_root, paths=images, labels=[UNLABELLED] * len(images),
                        classes=list(keypoints or []))
    table = read_spreadsheet_csv(label_file, numbers_but=NAME_COLUMNS, dtype=dict.fromkeys(NAME_COLUMNS, str))
    columns = list(table.columns)
    if not columns or columns[0] != "image" or len(columns) < 3 or len(columns) % 2 == 0:
        raise HuddError(f"{label_file}: needs an 'image' column, then an x and a y column per keypoint "
                        "(kp0_x, kp0_y, kp1_x, ...)")
    names = [c[:-2] if c.endswith("_x") else c for c in columns[1::2]]
    if keypoints is not None and names != keypoints:
        raise HuddError(f"{label_file}: its keypoints ({', '.join(names[:4])}...) differ from the training set's "
                        f"({', '.join(keypoints[:4])}...); use the same columns in every labels.csv")
    refuse_repeated_images(table["image"], label_file)
    paths = [set_root / p for p in table["image"]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise HuddError(f"{label_file}: lists {missing[0].relative_to(set_root)}, which is not in {set_root}; "
                        "fix the file or add the image")
    listed = {os.path.normpath(p) for p in paths}
    unlisted = sorted(p for p in set_root.rglob("*") if _is_image(p) and os.path.normpath(p) not in listed)
    if unlisted:  # left out of the set: said, as a class folder's stray files are
        log.warning("%s: %d image(s) under %s are not in it and are left out (e.g. %s)", label_file, len(unlisted),
                    set_root, unlisted[0].relative_to(set_root).as_posix(), extra=SAME_ON_EVERY_RANK)
    targets = table[columns[1:]].to_numpy(dtype=np.float64)
    if not np.isfinite(targets).all():
        row = int(np.flatnonzero(~np.isfinite(targets).all(axis=1))[0])
        raise HuddError(f"{label_file}: row for {table['image'].iloc[row]!r} has an empty or non-numeric "
                        "coordinate; mark a missing keypoint with 0 or -1")
    return ImageSet(name=name, root=set_root, paths=paths, labels=[0] * len(paths), classes=names,
                    targets=targets.reshape(len(paths), len(names), 2))


def load_case_sets(paths: CasePaths, task=None, set_keys=("train", "test", "improve")) -> dict[str, ImageSet]:
    """The case's image sets, listed as the task reads labels (tasks.py; default: classification);
    classes are the training set's class folders (keypoint tasks: its keypoint names)."""
    task = task or task_class("classification")()
    if not paths.datasets.is_dir():
        beside = [name for name in SET_FOLDERS.values() if (paths.root / name).is_dir()]
        raise HuddError(f"{paths.datasets}: DataSets folder not found; put TrainingSet, TestSet and "
                        "ImprovementSet folders there" + (f" ({', '.join(beside)} lie in {paths.root} itself: move "
                                                           "them into DataSets/)" if beside else ""))
    train = task.list_set(paths.set_dir("train"), SET_FOLDERS["train"])
    if not train.labelled:
        raise HuddError(f"{train.root}: the training set needs {task.label_layout}")
    sets = {"train": train}
    for key in set_keys:
        if key != "train":
            sets[key] = task.list_set(paths.set_dir(key), SET_FOLDERS[key], train.classes)
    if not sets.get("test", train).labelled:
        raise HuddError(f"{sets['test'].root}: the test set needs {task.label_layout} (labels are needed to find "
                        "the error-inducing images)")
    return sets


# --------------------------------------------------------------------------------------------
# Labels for part of an unlabelled improvement set (HUDD's promise: label the unsafe set only)
# --------------------------------------------------------------------------------------------

def write_label_template(path: Path, images: list[str], rccs: list[str], task, classes: list[str]) -> None:
    """A to_label.csv: the images (relative to the case), their RCC and the task's label columns left
    empty, for an engineer to fill and save as DataSets/ImprovementLabels.csv."""
    table = pd.DataFrame({"image": images, "rcc": rccs})
    for column in task.label_columns(classes):
        table[column] = ""
    write_csv(table, path)


def with_partial_labels(image_set: ImageSet, label_file: Path, task, case_root: Path,
                        left_out: list[str] = ()) -> tuple[ImageSet, np.ndarray]:
    """An unlabelled set with the labels `label_file` gives some of its images: `image` (relative to
    the case, as in to_label.csv; also taken: relative to the set folder, absolute, backslashes), then the
    task's label columns (other columns are ignored; a row whose label columns are all empty labels
    nothing). Rows of `left_out` images (unreadable, --skip-bad-images) are passed over with a warning.
    Returns the set, labels UNLABELLED (keypoints: NaN) where there is none, and the mask of its
    labelled images."""
    table = _read_label_table(label_file, task.label_columns(image_set.classes))
    position = {Path(os.path.relpath(p, case_root)).as_posix(): i for i, p in enumerate(image_set.paths)}
    known = set(position) | set(left_out)
    keys = [_listed_image(text, known, image_set.root, case_root) for text in table["image"]]
    skipped = [k in left_out for k in keys]
    if any(skipped):
        log.warning("%s: %d labelled image(s) left out as unreadable (--skip-bad-images), e.g. %s", label_file,
                    sum(skipped), table["image"][skipped.index(True)], extra=SAME_ON_EVERY_RANK)
    unknown = [text for text, key in zip(table["image"], keys) if key is None]
    if unknown:
        raise HuddError(f"{label_file}: lists {unknown[0]!r}, which is not an image of {image_set.root} (give paths "
                        "relative to the case folder, as T/UnsafeSet/to_label.csv does)")
    used = ~np.asarray(skipped, dtype=bool)
    table = table[used].reset_index(drop=True)
    rows = np.array([position[key] for key, use in zip(keys, used) if use], dtype=np.int64)
    labels, targets = task.parse_labels(table, image_set.classes, label_file)
    given = ~np.asarray(pd.isna(labels) if targets is None else np.isnan(targets).all(axis=(1, 2)))
    full_labels = np.full(len(image_set), UNLABELLED, dtype=np.int64)
    full_targets = None if targets is None else np.full((len(image_set), *targets.shape[1:]), np.nan)
    if targets is None:
        full_labels[rows[given]] = np.asarray(labels)[given].astype(np.int64)
    else:
        full_labels[rows[given]] = 0
        full_targets[rows[given]] = targets[given]
    labelled = full_labels != UNLABELLED
    return replace(image_set, labels=full_labels.tolist(), targets=full_targets), labelled


def _listed_image(text: str, known: set[str], set_root: Path, case_root: Path) -> str | None:
    """The case-relative path, among `known`, of an image path as a person may write it; None if none."""
    written = Path(text.strip().replace("\\", "/"))
    candidates = [written] if written.is_absolute() else [case_root / written, set_root / written]
    keys = [Path(os.path.relpath(c, case_root)).as_posix() for c in candidates]
    return next((k for k in keys if k in known), None)


def read_saved_text(path: Path) -> str:
    """A text file as a person's editor or spreadsheet saved it: UTF-8 with or without a byte-order mark,
    or UTF-16 (Windows' "Unicode"); anything else (a workbook renamed .csv) is one error line."""
    raw = path.read_bytes()
    if raw[:4] == b"PK\x03\x04":   # a zip archive: a spreadsheet's own format (.xlsx, .ods) under a text name
        raise HuddError(f"{path}: is a spreadsheet workbook (.xlsx or .ods content), not text; in the spreadsheet, "
                        f"save it as CSV (UTF-8) under this name")
    try:
        return raw.decode("utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig")
    except UnicodeDecodeError:
        raise HuddError(f"{path}: is not UTF-8 or UTF-16 text; save it as UTF-8") from None


def read_spreadsheet_csv(path: Path, numbers_but: tuple | None = None, **options) -> pd.DataFrame:
    """A CSV file a person may have saved from a spreadsheet: UTF-8 (with or without a byte-order mark)
    or UTF-16 text, ',' ';' or tab as the separator (whichever the header line holds most of). With ';'
    and `numbers_but` given, numbers may have a decimal comma (Excel's CSV where the comma is the decimal
    mark): a text column whose every value reads so, but those named in `numbers_but`, becomes numbers.
    Column names come stripped of spaces. pandas' `options` apply; anything unreadable is one error line."""
    text = read_saved_text(path)
    header = text.lstrip().splitlines()[0] if text.strip() else ""
    separator = max((",", ";", "\t"), key=header.count)
    try:
        table = pd.read_csv(io.StringIO(text), sep=separator, **options)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise HuddError(f"{path}: not a readable CSV file ({error}); save it as CSV with a header line") from None
    table.columns = [str(c).strip() for c in table.columns]
    if separator == ";" and numbers_but is not None:
        texts = [c for c in table.columns if pd.api.types.is_string_dtype(table[c]) or table[c].dtype == object]
        for column in [c for c in texts if c not in numbers_but]:
            values = table[column].dropna().astype(str).str.strip()
            if len(values) and values.str.fullmatch(r"[-+]?\d+,\d+|[-+]?\d+").all() and values.str.contains(",").any():
                table[column] = pd.to_numeric(table[column].str.strip().str.replace(",", ".", regex=False))
    return table


def _read_label_table(label_file: Path, label_columns: list[str]) -> pd.DataFrame:
    """The label file's image and label columns, values as text. Spreadsheet habits are taken as they
    come: a UTF-8 byte-order mark or UTF-16 text, ';' or tab as the separator (read from the header),
    'Image'/'Label' in any case and with spaces, and empty rows. Anything else is one error line."""
    table = read_spreadsheet_csv(label_file, dtype=str, keep_default_na=False, na_values=[""])
    fixed = {"image": "image", "label": "label"}
    table.columns = [fixed.get(c.lower(), c) for c in table.columns]
    missing = [c for c in ("image", *label_columns) if c not in table.columns]
    if missing:
        raise HuddError(f"{label_file}: has no column {', '.join(repr(c) for c in missing[:4])} (its header reads "
                        f"{', '.join(map(repr, table.columns[:6]))}); it needs 'image' and {', '.join(label_columns[:4])}"
                        f"{' ...' if len(label_columns) > 4 else ''}, as T/UnsafeSet/to_label.csv has")
    table = table[["image", *label_columns]].dropna(how="all").reset_index(drop=True)  # spreadsheets' empty rows
    no_image = np.flatnonzero(table["image"].isna().to_numpy())
    if len(no_image):
        given = table.iloc[no_image[0]].dropna()
        raise HuddError(f"{label_file}: a row with {given.index[0]} {given.iloc[0]!r} has no image path; fill it in "
                        "or delete the row")
    table["image"] = table["image"].str.strip()
    # The same image with the same labels twice is one label: the modes' lists of images to label can
    # share images, and their filled rows are all added to this file. Different labels are refused.
    table = table.drop_duplicates().reset_index(drop=True)
    refuse_repeated_images(table["image"], label_file, "with different labels")
    return table


def refuse_repeated_images(images: pd.Series, path: Path, how: str = "") -> None:
    """One line per image in a table the user wrote (labels, metadata): a second line for an image is
    refused by name, never left to decide silently which of the two counts."""
    repeated = images[images.duplicated()]
    if len(repeated):
        lines = f"more than one line {how}" if how else "more than one line"
        raise HuddError(f"{path}: image {repeated.iloc[0]!r} has {lines}; keep one line per image")


def metadata_file(set_root: Path) -> Path | None:
    """The `metadata.csv` read_metadata reads for a set (in its folder or the one above), or None."""
    return next((folder / "metadata.csv" for folder in (set_root, set_root.parent)
                 if (folder / "metadata.csv").is_file()), None)


def metadata_digest(set_root: Path) -> str | None:
    """Fingerprint of a set's metadata.csv (its bytes: the file is small), None without one."""
    path = metadata_file(set_root)
    return None if path is None else hashlib.sha256(path.read_bytes()).hexdigest()


def read_metadata(set_root: Path, case_root: Path) -> pd.DataFrame | None:
    """The optional `metadata.csv` of a set (column `image`: paths relative to the folder holding the
    file, which is the set folder or, for the doubled improvement layout, the one above it), indexed
    by image path relative to the case directory, as in the result files; None where there is none."""
    meta_path = metadata_file(set_root)
    if meta_path is None:
        return None
    meta = read_spreadsheet_csv(meta_path, numbers_but=NAME_COLUMNS, dtype=dict.fromkeys(NAME_COLUMNS, str))
    if "image" not in meta.columns:
        raise HuddError(f"{meta_path}: needs an 'image' column with paths relative to {meta_path.parent}")
    empty = np.flatnonzero(meta["image"].isna().to_numpy())
    if len(empty):
        raise HuddError(f"{meta_path}: line {empty[0] + 2} has no image path; fill it in or delete the line")
    refuse_repeated_images(meta["image"], meta_path)
    meta["image"] = [Path(os.path.relpath(meta_path.parent / str(p), case_root)).as_posix() for p in meta["image"]]
    return meta.set_index("image")


# --------------------------------------------------------------------------------------------
# Settings: defaults < hudd.json < command line
# --------------------------------------------------------------------------------------------

@dataclass
class Settings:
    """Case settings. Defaults are the original tool's (reference §5, §9.1): ImageNet normalisation,
    SGD fine-tuning for 10 epochs with batch 128, a 4 px keypoint error threshold."""

    task: str = "classification"          # "classification" (regression arrives with keypoints)
    arch: str = "alexnet256"              # built-in name, torchvision model name or file.py:Class
    input_size: list[int] | None = None   # [height, width]; None = the architecture's own, else 224
    resize: str = "resize"                # "resize" to input_size, "center-crop" (original GD/OC/OD), "resize-crop", "none"
    resize_to: int | None = None          # resize-crop: the shorter side first (None: 8/7 of the input, 256 for 224)
    channels: int = 3                     # 3 = RGB, 1 = grayscale
    classes: list[str] | None = None      # class folder names in the model's output order; None = sorted (ImageFolder's)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    error_threshold: float = 4.0          # regression: an image is wrong above this error
    epochs: int = 10
    batch_size: int = 128
    workers: int = 2
    rules: str = "hudd"                   # LRP rule preset of the heatmap step
    layers: list[str] | None = None       # module paths to explain; None = every conv, linear and pooling layer
    explain: str = "predicted"            # class whose relevance is explained: "predicted" (original) or "expected"
    heatmap_dtype: str = "float32"        # how heatmap files store relevance: float32, float16 or bfloat16 (half the disk)
    # Clustering; defaults chosen by RCC purity/coverage on the demos (docs/method.md, "Root-cause clusters").
    features: str = "heatmaps"            # what is clustered: "heatmaps" (HUDD), "activations", "backbone", "pixels"
    backbone: str | None = None           # features "backbone": its architecture (torchvision name, built-in, file.py:Class)
    backbone_weights: str | None = None   # ... and its state_dict file (relative to the case folder)
    normalisation: str = "l2"             # per-row scaling before distances: "l2", "max" or "none" (original)
    reduction: str = "none"               # "pca": project the normalised rows on their principal components
    pca_components: int = 50
    cluster_space: str = "direct"         # Ward on the distances ("direct") or on the original's "profiles"
    clusterer: str = "ward"               # "ward", or "hdbscan" (its unclustered images form a "noise" group)
    min_cluster_size: int = 5             # hdbscan's smallest cluster
    max_rccs: int = 20                    # the top level holds at most this many RCCs (and n/3 at most)
    k_criterion: str = "silhouette"       # top level: best "silhouette" where the data shows structure, else max_rccs; "knee" (original); "max"
    layer_criterion: str = "wicd"         # layer: smallest "wicd" (original) or best "silhouette", at the top level
    ordinary_scenario: str = "none"       # the metadata scenario of ordinary images (no root cause to cover)
    distance_xlsx: str = "selected"       # <Layer>HMDistance.xlsx for the "selected" layer, "all" layers or "none"
    knee_plots: str = "selected"          # <Layer>/knee.png for the "selected" layer or "all" layers (k_choice.csv: every layer)
    # Retraining (the original's optimiser, reference §9.1); epochs and batch_size above apply too.
    learning_rate: float = 1e-3           # SGD
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "constant"         # per epoch: "constant" (the original's), or a "cosine" decay (steadier, lower gains)
    epoch_choice: str = "last"            # epoch kept: "last", best "validation" (10% of TrainingSet) or "training" accuracy (original)
    budget_factor: float = 1.0            # labelled improvement images per RCC = ceil(factor x RCC size), equal for every mode
    hudd_bag: str = "uniform"             # HUDD's training samples: its images repeated "uniform"ly (as the baselines'), or "balanced" over the RCCs (original)
    assign_level: str = "sub"             # improvement images are assigned to the "sub"-clusters or the "top"-level RCCs
    # The unsafe set, label-free (docs/method.md, "The unsafe set": the study behind the defaults).
    assign_pick: str = "auto"             # lowest "contrast" over the whole set, "closest" per RCC up to its quota (original), or "auto" by task
    assign_distance: str = "nearest"      # image-to-RCC distance: "nearest" member (original), "knn" mean of assign_k nearest, "medoid"
    assign_k: int = 3
    assign_radius: float = 0.0            # > 0: an image farther than radius x the RCC's reach joins no RCC (0: off)
    assign_uncertainty: float = 4.0       # an image the model is sure of looks up to (1 + this) times farther (0: off, the original)
    assign_quota: str = "proportional"    # per-RCC quotas "proportional" to its size, or "equal" (same total)
    runs: int = 1                         # retraining runs per mode (seeded)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def fingerprint_part(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_settings(paths: CasePaths, overrides: dict[str, Any] | None = None) -> Settings:
    """Settings from the defaults, then `CASE/hudd.json`, then the command line (non-None values)."""
    values: dict[str, Any] = {}
    if paths.settings_file.is_file():
        try:   # Windows editors save a byte-order mark, or UTF-16 ("Unicode")
            values = json.loads(read_saved_text(paths.settings_file))
        except json.JSONDecodeError as exc:
            raise HuddError(f"{paths.settings_file}: not valid JSON ({exc}); fix the file or remove it")
        if not isinstance(values, dict):
            raise HuddError(f"{paths.settings_file}: must hold a JSON object of settings")
        unknown = sorted(set(values) - set(Settings.keys()))
        if unknown:
            raise HuddError(f"{paths.settings_file}: unknown setting(s) {', '.join(unknown)}; "
                            f"known ones are {', '.join(Settings.keys())}")
    if _is_class_spec(values.get("arch")):  # a file named in hudd.json is relative to the case, as the file is
        file_name, class_name = values["arch"].rsplit(":", 1)
        if not Path(file_name).is_absolute():
            values["arch"] = f"{paths.root / file_name}:{class_name}"
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    settings = Settings(**values)
    _validate_settings(settings, paths.settings_file)
    return settings


# Every enumerated setting and what its values mean; checked once, when the settings are read, so a
# typo in hudd.json never reaches a step. (`explain` depends on the task: tasks.py lists its values.)
RETRAIN_MODES = ("HUDD", "BL1", "BL2", "BL3")   # -mode: HUDD's unsafe set and the three baselines

SETTING_CHOICES: dict[str, dict[str, str]] = {
    "task": {"classification": "class folders", "keypoints": "regression of keypoint maps"},
    "resize": {"resize": "to input_size", "center-crop": "the original's GD/OC/OD preprocessing",
               "resize-crop": "the shorter side to resize_to, then the centre input_size (torchvision's ImageNet "
                              "evaluation: 256, then 224)", "none": ""},
    "rules": {name: "" for name in RULE_PRESETS},
    "features": {"heatmaps": "HUDD's LRP relevance", "activations": "the same layers' activations",
                 "backbone": "a network you give, black-box", "pixels": "the model's input"},
    "reduction": {"none": "", "pca": "principal components"},
    "clusterer": {"ward": "", "hdbscan": "scikit-learn's, with a noise group"},
    "cluster_space": {"direct": "Ward on the heatmap distances", "profiles": "the original's distance profiles"},
    "normalisation": {"l2": "", "max": "", "none": "the original's"},
    "k_criterion": {"silhouette": "best silhouette, max_rccs without structure", "knee": "the original's WICD knee",
                    "max": "always max_rccs"},
    "layer_criterion": {"wicd": "the original's", "silhouette": ""},
    "assign_level": {"sub": "the sub-clusters", "top": "the top-level RCCs"},
    "assign_pick": {"auto": "contrast for classification, closest for keypoint models (the study in docs/method.md)",
                    "closest": "the images closest to each RCC, up to its quota (the original's ClosestU)",
                    "contrast": "the images nearest the test errors relative to the test images the model gets right"},
    "distance_xlsx": {"selected": "the selected layer's distance matrix", "all": "every layer's", "none": ""},
    "knee_plots": {"selected": "the selected layer's k plot", "all": "every layer's"},
    "heatmap_dtype": {"float32": "", "float16": "half the disk; values beyond +-65504 are refused",
                      "bfloat16": "half the disk, float32's range, 8 bits of precision"},
    "assign_distance": {"nearest": "nearest member (the original's)", "knn": "mean of the assign_k nearest members",
                        "medoid": "the RCC's medoid"},
    "assign_quota": {"proportional": "ceil(budget_factor x RCC size)", "equal": "the same total, split evenly"},
    "lr_schedule": {"constant": "the original's",
                    "cosine": "learning_rate x (1 + cos(pi x (epoch - 1) / epochs)) / 2: steadier last epochs"},
    "epoch_choice": {"last": "", "validation": "best on 10% of the training set", "training": "the original's"},
    "hudd_bag": {"uniform": "each labelled image repeated alike, as the baselines'",
                 "balanced": "every RCC filled to the largest quota (the original's)"},
}
POSITIVE_NUMBERS = ("learning_rate", "budget_factor")
NON_NEGATIVE_NUMBERS = ("momentum", "weight_decay", "assign_radius", "assign_uncertainty")
POSITIVE_WHOLE_NUMBERS = ("epochs", "batch_size", "runs", "pca_components", "max_rccs", "min_cluster_size", "assign_k")


def _choice_list(choices) -> str:
    return ", ".join(f"'{value}'" + (f" ({meaning})" if meaning else "") for value, meaning in choices.items())


def _validate_settings(s: Settings, source: Path) -> None:
    def bad(key: str, why: str) -> HuddError:
        return HuddError(f"setting {key}={getattr(s, key)!r} (from {source} or the command line): {why}")

    for key, choices in SETTING_CHOICES.items():
        if getattr(s, key) not in choices:
            raise bad(key, f"use one of {_choice_list(choices)}")
    explain_choices = task_class(s.task).explain_choices
    if s.explain not in explain_choices:
        raise bad("explain", f"for {s.task} models use one of {', '.join(repr(c) for c in explain_choices)}")
    if not isinstance(s.arch, str) or not s.arch.strip():
        raise bad("arch", "use an architecture name (e.g. resnet18) or path/to/file.py:ClassName")
    if s.classes is not None and (s.task != "classification" or not isinstance(s.classes, list) or len(s.classes) < 2
                                  or not all(isinstance(c, str) and c for c in s.classes)
                                  or len(set(s.classes)) < len(s.classes)):
        raise bad("classes", "for a classification model, list its class folder names in the order of its "
                             "outputs, each once (e.g. [\"0\", \"1\", ..., \"10\"]); without it, the sorted folder names")
    if not _whole(s.channels) or s.channels not in (1, 3):
        raise bad("channels", "use 3 (RGB) or 1 (grayscale)")
    for key in ("mean", "std"):
        values = getattr(s, key)
        if not (isinstance(values, list) and len(values) == s.channels and all(_number(v) for v in values)):
            raise bad(key, f"give a list of {s.channels} number(s), one per input channel, the normalisation the "
                           "model was trained with (both mean and std)")
    if any(v <= 0 for v in s.std):
        raise bad("std", "every value must be positive")
    if any(v > 1 for v in s.mean):   # mmcv-style configs give them for pixels 0..255: here every input would be < 0
        scaled = (lambda values: "[" + ", ".join(f"{v / 255:.4g}" for v in values) + "]")
        raise bad("mean", f"a mean above 1 is on the 0-255 pixel scale (as mmcv configs give it), but HUDD scales "
                          f"pixels to [0, 1] before normalising: give mean and std divided by 255, here mean "
                          f"{scaled(s.mean)} and std {scaled(s.std)}")
    if s.input_size is not None:
        if _whole(s.input_size):
            s.input_size = [s.input_size, s.input_size]
        if not (isinstance(s.input_size, list) and len(s.input_size) == 2
                and all(_whole(v) and v >= 1 for v in s.input_size)):
            raise bad("input_size", "use one whole number of pixels or [height, width]")
    if s.resize_to is not None and (not _whole(s.resize_to) or s.resize_to < max(resolve_input_size(s))):
        raise bad("resize_to", f"must be a whole number of pixels, at least the input size ({max(resolve_input_size(s))}), "
                               "or null (8/7 of it)")
    if s.features == "backbone" and not (isinstance(s.backbone, str) and isinstance(s.backbone_weights, str)):
        raise bad("features", "'backbone' needs the settings backbone (an architecture) and backbone_weights (its "
                              "state_dict file); no weights are ever downloaded")
    if s.max_rccs is not None and (not _whole(s.max_rccs) or s.max_rccs < 2):
        raise bad("max_rccs", "must be a whole number of at least 2")
    if s.layers is not None and (not isinstance(s.layers, list) or not all(isinstance(p, str) for p in s.layers)):
        raise bad("layers", "use a list of module paths, e.g. [\"features.0\", \"classifier.1\"]")
    _validate_numbers(s, bad)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_numbers(s: Settings, bad) -> None:
    for key in POSITIVE_NUMBERS:
        if not _number(getattr(s, key)) or not getattr(s, key) > 0:
            raise bad(key, "must be a positive number")
    for key in NON_NEGATIVE_NUMBERS:
        if not _number(getattr(s, key)) or not getattr(s, key) >= 0:
            raise bad(key, "must be a number of at least 0")
    if not _number(s.error_threshold) or not s.error_threshold > 0:
        raise bad("error_threshold", "must be a positive number (pixels for keypoints)")
    for key in POSITIVE_WHOLE_NUMBERS:
        if not _whole(getattr(s, key)) or getattr(s, key) < 1:
            raise bad(key, "must be a positive whole number")
    if not _whole(s.workers) or s.workers < 0:
        raise bad("workers", "must be 0 or a positive whole number")


def task_class(name: str):
    """The task object class of a task name (tasks.py imports this module, hence the late import)."""
    import tasks
    return tasks.TASKS[name]


def make_task(settings: Settings):
    """The run's task object (tasks.py): what the task decides, asked by every step."""
    order = {"output_order": settings.classes} if settings.classes is not None else {}  # classification only
    return task_class(settings.task)(explain=settings.explain, error_threshold=settings.error_threshold, **order)


def resolve_input_size(settings: Settings) -> list[int]:
    """[height, width] the model takes: the setting, else the built-in architecture's, else 224."""
    if settings.input_size:
        return list(settings.input_size)
    from architectures import BUILTIN_ARCHITECTURES
    arch = BUILTIN_ARCHITECTURES.get(settings.arch.lower())
    size = getattr(arch, "input_size", 224)
    return [size, size]


def resize_shorter_side(settings: Settings) -> int:
    """resize-crop's first size, the shorter side's: the setting, else 8/7 of the input (224 -> 256)."""
    return settings.resize_to or round(max(resolve_input_size(settings)) * 8 / 7)


def crop_steps(settings: Settings) -> list:
    """The transforms that take the part of each image the model sees: center-crop's centre, resize-crop's
    resize then centre; none where it sees the whole image (resized to the input, or already of its size).
    The overlays show that part (heatmapModule.overlay_view)."""
    from torchvision import transforms
    size = tuple(resolve_input_size(settings))
    if settings.resize == "center-crop":
        return [transforms.CenterCrop(size)]  # pads an image smaller than the crop
    if settings.resize == "resize-crop":
        return [transforms.Resize(resize_shorter_side(settings)), transforms.CenterCrop(size)]
    return []


def make_transform(settings: Settings):
    """PIL image -> normalised float tensor, as the model was trained with."""
    from torchvision import transforms
    resize = [transforms.Resize(tuple(resolve_input_size(settings)))] if settings.resize == "resize" else []
    return transforms.Compose([*resize, *crop_steps(settings), transforms.ToTensor(),
                               transforms.Normalize(settings.mean, settings.std)])


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # "I": 32-bit integers, 16-bit data in older Pillow


def image_in_mode(image: Image.Image, mode: str) -> Image.Image:
    """`image` converted to `mode` ("RGB" or "L"). A 16-bit greyscale image is scaled to 8 bits first
    (value / 257: 65535 becomes 255); PIL's own conversion clips it at 255, which turns nearly every
    pixel white. A floating-point image, or an integer one past 16 bits, has no one reading: refused."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"its pixels span {values.min()}..{values.max()}, past 16 bits; save the set as "
                             "8- or 16-bit images, read the way the model was trained")
        image = Image.fromarray(np.round(values / 257.0).astype(np.uint8))
    elif image.mode == "F":
        raise ValueError("it is a floating-point image, which has no one 8-bit reading; save the set as 8- or "
                         "16-bit images, read the way the model was trained")
    return image.convert(mode)


def sixteen_bit_range(image_set: ImageSet) -> tuple[int, int] | None:
    """The value range of the set's first image where it is 16-bit (image_in_mode reads it scaled to
    8 bits); None otherwise."""
    if not image_set.paths:
        return None
    with Image.open(image_set.paths[0]) as image:
        if image.mode not in SIXTEEN_BIT_MODES:
            return None
        values = np.asarray(image)
        return int(values.min()), int(values.max())


def note_sixteen_bit(sets: list[ImageSet]) -> None:
    """One warning naming the sets of 16-bit images: read scaled to 8 bits (image_in_mode), which is
    right only if the model was trained on them read the same way. The first image's values are named:
    12-bit data (up to 4095) in 16-bit files comes out dark scaled so."""
    sixteen = [(image_set, values) for image_set in sets if (values := sixteen_bit_range(image_set)) is not None]
    if sixteen:
        (first_set, (low, high)) = sixteen[0]
        log.warning("16-bit images in %s (e.g. %s, values %d..%d of 0..65535): read scaled to 8 bits (value / 257); "
                    "if the model was trained on them read another way, convert the sets to 8-bit images that way "
                    "first", ", ".join(image_set.root.name for image_set, _ in sixteen), first_set.paths[0], low, high)


class ImageDataset(torch.utils.data.Dataset):
    """Images of one ImageSet as (tensor, label, index, error). A file that cannot be read yields
    error text instead of raising inside a worker process, so the caller can name the file."""

    def __init__(self, image_set: ImageSet, settings: Settings):
        self.image_set = image_set
        self.transform = make_transform(settings)
        self.mode = "RGB" if settings.channels == 3 else "L"

    def __len__(self) -> int:
        return len(self.image_set)

    def __getitem__(self, index: int):
        path = self.image_set.paths[index]
        try:
            with Image.open(path) as image:
                tensor = self.transform(image_in_mode(image, self.mode))
            return tensor, self.image_set.labels[index], index, ""
        except Exception as exc:  # any decoding problem is reported with the file's name
            return None, self.image_set.labels[index], index, f"{type(exc).__name__}: {exc}"


def collate_images(batch):
    """Stacks the readable images; returns (inputs, labels, indices, [(index, error), ...])."""
    good = [item for item in batch if not item[3]]
    failed = [(item[2], item[3]) for item in batch if item[3]]
    if good and any(item[0].shape != good[0][0].shape for item in good):  # only with resize "none"
        shape = collections.Counter(item[0].shape for item in good).most_common(1)[0][0]
        failed += [(item[2], f"its size {item[0].shape[-2]}x{item[0].shape[-1]} differs from the other images' "
                             f"{shape[-2]}x{shape[-1]}; with setting resize 'none' every image must have the model's "
                             "input size: use resize 'resize'") for item in good if item[0].shape != shape]
        good = [item for item in good if item[0].shape == shape]
    if good:
        inputs = torch.stack([item[0] for item in good])
    else:
        inputs = torch.empty(0)
    labels = torch.tensor([item[1] for item in good], dtype=torch.long)
    indices = torch.tensor([item[2] for item in good], dtype=torch.long)
    return inputs, labels, indices, failed


def stop_on_unreadable(image_set: ImageSet, failures: list[tuple[int, str]]) -> None:
    """Raises, naming the first file a loader batch could not read (collate_images lists them)."""
    if failures:
        index, error = failures[0]
        raise HuddError(f"{image_set.paths[index]}: cannot read image ({error}); replace or remove the file")


SHARED_MEMORY = "/dev/shm"
_SHARED_MEMORY_WARNED = []


def loader_workers(workers: int, batch_size: int, settings: Settings) -> int:
    """`workers`, or 0 where SHARED_MEMORY cannot hold their batches. Loader processes hand each batch
    over in shared memory, two batches ahead each; where it is too small (a Docker container's default
    is 64 MB, and 128 RGB images of 224 x 224 take 77 MB) one fails to allocate ("No space left on
    device") and the step hangs. The images are then read in this process, with one warning saying why."""
    if workers <= 0 or not os.path.isdir(SHARED_MEMORY):
        return workers
    height, width = resolve_input_size(settings)
    needed = 2 * workers * 2 * batch_size * settings.channels * height * width * 4   # float32, a margin of 2
    free = shutil.disk_usage(SHARED_MEMORY).free
    if free >= needed:
        return workers
    if not _SHARED_MEMORY_WARNED:
        _SHARED_MEMORY_WARNED.append(True)
        log.warning("%s has %.0f MB free, less than the %.0f MB that %d loader processes need for batches of %d "
                    "images: the images are read in this process instead (slower). In a Docker container, give "
                    "it more (docker run --shm-size=2g), or lower batch_size", SHARED_MEMORY, free / 2 ** 20,
                    needed / 2 ** 20, workers, batch_size)
    return 0


def make_loader(image_set: ImageSet, settings: Settings, batch_size: int, workers: int,
                shuffle: bool = False, seed: int = 0, batches: list[list[int]] | None = None
                ) -> torch.utils.data.DataLoader:
    """Batches of the set in order (or shuffled); `batches`: exactly these lists of positions instead
    (a rank's shard, or the batches a resumed run still lacks)."""
    generator = torch.Generator().manual_seed(seed)
    largest = max(map(len, batches), default=0) if batches is not None else batch_size
    workers = loader_workers(workers, largest, settings)
    if batches is not None:
        return torch.utils.data.DataLoader(ImageDataset(image_set, settings), batch_sampler=batches,
                                           num_workers=workers, collate_fn=collate_images)
    return torch.utils.data.DataLoader(
        ImageDataset(image_set, settings), batch_size=batch_size, shuffle=shuffle,
        num_workers=workers, collate_fn=collate_images, generator=generator,
        persistent_workers=False)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

AUXILIARY_HEADS = ("aux1.", "aux2.", "AuxLogits.")  # torchvision's GoogLeNet and Inception v3 train with these


def build_architecture(arch: str, num_classes: int, channels: int = 3, auxiliary: bool = True) -> nn.Module:
    """An untrained network: a built-in architecture, a torchvision model name, or the user's own
    class as `path/to/file.py:ClassName` (called with num_classes=...)."""
    from architectures import BUILTIN_ARCHITECTURES
    if arch.lower() in BUILTIN_ARCHITECTURES:
        return BUILTIN_ARCHITECTURES[arch.lower()](num_classes=num_classes, in_channels=channels)
    if _is_class_spec(arch):
        return _build_user_class(arch, _user_class(arch), num_classes)
    import torchvision
    if arch in torchvision.models.list_models():
        options = {}
        if arch in ("googlenet", "inception_v3"):
            # the weights loaded next are the user's: none of the default initialisation (slow, and warned about)
            options = {"init_weights": False, **({} if auxiliary else {"aux_logits": False})}
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **options)
        return model if channels == 3 else _with_input_channels(model, channels)
    raise HuddError(
        f"architecture {arch!r} is unknown: use one of {', '.join(BUILTIN_ARCHITECTURES)}, a torchvision "
        "model name (e.g. resnet18), or your own class as path/to/file.py:ClassName")


def first_line_of(error: BaseException) -> str:
    """`Type: first line of its message` (`Type` alone for an empty message), for one error line that
    quotes an exception of the user's code or of a library."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _build_user_class(arch: str, user_class: type, num_classes: int) -> nn.Module:
    """The user's class, called with num_classes where its constructor takes it, else with no argument:
    many user networks fix their outputs in the class (PyTorch's MNIST example: `Net()`); the output
    size is checked against the classes after loading (check_output_size)."""
    try:
        parameters = inspect.signature(user_class).parameters.values()
    except (TypeError, ValueError):   # no signature to read (a class built in C): call it as documented
        parameters = [inspect.Parameter("num_classes", inspect.Parameter.KEYWORD_ONLY)]
    takes_count = any(p.name == "num_classes" or p.kind is p.VAR_KEYWORD for p in parameters)
    call = f"{user_class.__name__}(num_classes={num_classes})" if takes_count else f"{user_class.__name__}()"
    try:
        return user_class(num_classes=num_classes) if takes_count else user_class()
    except TypeError as error:  # its constructor cannot be called as HUDD calls it
        raise HuddError(f"{arch}: {call} failed ({error}); its constructor must take num_classes or no argument, "
                        "every other argument with a default") from error
    except Exception as error:  # the user's own code failed: one line naming it, not an internal error
        download = isinstance(error, (urllib.error.URLError, ConnectionError))
        raise HuddError(f"{arch}: {call} failed ({first_line_of(error)})"
                        + ("; it downloads pretrained weights (weights=..., pretrained=True), which HUDD does not "
                           "need: it loads the model file's weights into the network, so build it untrained"
                           if download else "")) from error


def _with_input_channels(model: nn.Module, channels: int) -> nn.Module:
    """A torchvision model (built for RGB) taking `channels` input channels: its first convolution rebuilt
    alike but for the channels, as users adapt one to grayscale images (model.conv1 = nn.Conv2d(1, 64, ...))."""
    path, first = next(((p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d)), ("", None))
    if first is None:
        return model
    rebuilt = nn.Conv2d(channels, first.out_channels, first.kernel_size, first.stride, first.padding, first.dilation,
                        first.groups, first.bias is not None, first.padding_mode)
    owner, _, name = path.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, name, rebuilt)
    return model


def _is_class_spec(arch: Any) -> bool:
    """`path/to/file.py:ClassName`, the user's own architecture class."""
    return isinstance(arch, str) and ":" in arch and arch.rsplit(":", 1)[0].endswith(".py")


def arch_identity(arch: str) -> str:
    """The architecture as fingerprints see it: a built-in or torchvision name as it is; the user's class
    by its name and its file's content, so an edited file counts and a path spelled otherwise does not."""
    if not _is_class_spec(arch):
        return arch
    file_name, class_name = arch.rsplit(":", 1)
    path = Path(file_name)
    if not path.is_file():
        return f"{class_name}@missing"
    root, parts = _package_of(path.resolve())
    # a file inside a package may import its siblings: every .py file of the package counts
    files = sorted(root.joinpath(parts[0]).rglob("*.py")) if len(parts) > 1 else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return f"{class_name}@{digest.hexdigest()}"


def _package_of(file_path: Path) -> tuple[Path, list[str]]:
    """(the folder to import from, the module's dotted name as parts) of a Python file: inside a package
    (folders holding __init__.py) the package's top folder's parent and e.g. ["mynet", "model"]; else its
    own folder and [stem]."""
    root, parts = file_path.parent, [file_path.stem]
    while (root / "__init__.py").is_file():
        parts.insert(0, root.name)
        root = root.parent
    return root, parts


def _import_user_file(file_path: Path, spec: str):
    """The user's architecture file as a module. A file inside a package is imported as the package's
    module, so that its relative imports (`from .layers import Block`) work; any other file by its path,
    under a name of its own, with its folder importable for its siblings. An error of the file's own code
    is one line naming it."""
    root, parts = _package_of(file_path)
    loaded = sys.modules.get(parts[0]) if len(parts) > 1 else None
    if loaded is not None and Path(getattr(loaded, "__file__", None) or "/").resolve().parent != root / parts[0]:
        raise HuddError(f"{file_path}: its package {parts[0]!r} has the name of a module already imported "
                        f"({getattr(loaded, '__file__', None) or 'built in'}); rename the package folder")
    sys.path.insert(0, str(root))
    try:
        if len(parts) > 1:
            return importlib.import_module(".".join(parts))
        module_spec = importlib.util.spec_from_file_location(f"hudd_user_{file_path.stem}", file_path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module
    except Exception as error:  # the user's code, not ours
        raise HuddError(f"{file_path}: could not be imported (arch {spec}): {first_line_of(error)}") from error
    finally:
        sys.path.pop(0)


def _user_class(spec: str) -> type:
    file_name, class_name = spec.rsplit(":", 1)
    file_path = Path(file_name)
    if not file_path.is_file():
        raise HuddError(f"{file_path}: architecture file not found (from arch {spec}; a path in hudd.json is "
                        "relative to the case folder, one given with --arch to the current folder)")
    module = _import_user_file(file_path.resolve(), spec)
    if not hasattr(module, class_name):
        raise HuddError(f"{file_path}: has no class {class_name!r} (from arch {spec})")
    return getattr(module, class_name)


def load_model(model_path: Path, settings: Settings, num_classes: int, trust_pickle: bool = False) -> nn.Module:
    """Loads a state_dict into the configured architecture, or, only with trust_pickle, a whole
    pickled model. The model is returned on the CPU in eval mode, its output size checked."""
    if not model_path.is_file():
        raise HuddError(f"{model_path}: model file not found; put it in the case's DNNModels folder")
    kind = _torch_file_kind(model_path)
    if kind == "export":
        loaded = _exported_weights(model_path, trust_pickle)
    elif kind == "safetensors":
        loaded = _safetensors_weights(model_path)
    else:
        try:
            loaded = torch.load(model_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            loaded = _load_pickled(model_path, trust_pickle)
        except Exception as exc:
            raise HuddError(f"{model_path}: cannot be read as a PyTorch model file ({first_line_of(exc)}); is it a .pth "
                            "saved with torch.save?")
    if isinstance(loaded, nn.Module):
        model = loaded
    else:
        state = _state_dict_of(loaded, model_path)
        # a GoogLeNet or Inception v3 saved without its auxiliary heads (aux_logits=False) is built without them
        auxiliary = any(f".{head}" in f".{key}" for key in state for head in AUXILIARY_HEADS)
        model = build_architecture(settings.arch, num_classes, settings.channels, auxiliary)
        _load_state_dict(model, state, model_path, settings.arch, num_classes)
    model.eval()
    check_output_size(model, settings, num_classes, model_path)
    return model


def _torch_file_kind(model_path: Path) -> str:
    """torch.save writes a zip archive (or, before PyTorch 1.6, a pickle stream): anything else is
    not a model file, whatever unpickling would say about it. Returns "export" for torch.export's archive
    (torch.export.save, a .pt2: a graph and its weights), "safetensors" for that format's weights (Hugging
    Face's and timm's), else "torch.save"."""
    with open(model_path, "rb") as stream:
        head = stream.read(9)
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < model_path.stat().st_size:
        return "safetensors"   # an 8-byte header length, then the header's JSON
    if head[:1] == b"\x80":   # a pickle stream
        return "torch.save"
    if not zipfile.is_zipfile(model_path):
        raise HuddError(f"{model_path}: is not a PyTorch model file (torch.save writes a zip archive); "
                        "pass the .pth file saved with torch.save(model.state_dict(), path)")
    with zipfile.ZipFile(model_path) as archive:
        names = archive.namelist()
    if any(name.endswith("/constants.pkl") for name in names):  # compiled code: LRP needs the layers themselves
        raise HuddError(f"{model_path}: is a TorchScript archive (torch.jit.save); HUDD needs the weights and "
                        "the architecture: save model.state_dict() with torch.save and pass --arch")
    return "export" if any(name.endswith("data/weights/model_weights_config.json") for name in names) else "torch.save"


def _safetensors_weights(model_path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file's tensors by name: raw weights and a JSON header, nothing to unpickle."""
    from safetensors.torch import load_file
    try:
        return load_file(str(model_path), device="cpu")
    except Exception as exc:
        raise HuddError(f"{model_path}: cannot be read as a .safetensors file ({first_line_of(exc)}); is it complete?")


def _exported_weights(model_path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a torch.export archive, by their module names, for the architecture
    of --arch: its graph holds operators, not the layers LRP's rules need. torch.export.load may unpickle
    what the archive holds (it falls back to an unrestricted torch.load), hence the trust flag."""
    if not trust_pickle:
        raise HuddError(f"{model_path}: is a torch.export archive (torch.export.save), and reading it can unpickle code "
                        "from the file. If you trust it, pass --trust-pickle and HUDD takes its weights into the "
                        "architecture of --arch; or save model.state_dict() with torch.save")
    try:
        program = torch.export.load(model_path)
    except Exception as exc:
        raise HuddError(f"{model_path}: is a torch.export archive that torch {torch.__version__} cannot read "
                        f"({first_line_of(exc)}); save model.state_dict() with torch.save and pass --arch")
    return {name: tensor.detach() for name, tensor in program.state_dict.items()}


def _load_pickled(model_path: Path, trust_pickle: bool) -> Any:
    """What torch's safe loader refused: a whole pickled model, or a checkpoint with Python objects beside
    its weights (a training script's argparse.Namespace, Lightning's hyper-parameters). Unpickled only with
    trust_pickle; the caller takes a model as it is and a checkpoint's state_dict as any other."""
    if not trust_pickle:
        raise HuddError(f"{model_path}: holds pickled Python objects{_pickled_classes(model_path)}: a whole pickled model, "
                        "or a checkpoint with objects beside its weights. Unpickling runs code from the file: if you "
                        "trust it, pass --trust-pickle; better, save model.state_dict() and pass --arch")
    try:
        return torch.load(model_path, map_location="cpu", weights_only=False)
    except Exception as exc:  # the classes it names are not importable here
        raise HuddError(f"{model_path}: cannot be unpickled here ({first_line_of(exc)}): it needs the code it was "
                        "saved with; make that code importable, or save model.state_dict() alone and pass --arch")


def _pickled_classes(model_path: Path) -> str:
    """' (argparse.Namespace, ...)': the classes a pickle names, read without unpickling (torch 2.5+)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(model_path)
    except Exception:  # an older torch, or a pickle it cannot list
        return ""
    return f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else ""


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _state_dict_of(loaded: Any, model_path: Path) -> dict[str, torch.Tensor]:
    """The state_dict in a loaded file: a plain one, or one inside a training checkpoint, under a usual
    name or as the checkpoint's only dict of tensors (pytorch-cifar saves {"net": ..., "acc": ..., "epoch": ...};
    an optimizer's state is no dict of tensors)."""
    if isinstance(loaded, dict) and not _is_tensor_dict(loaded):
        known = next((loaded[key] for key in ("state_dict", "model_state_dict", "model") if isinstance(loaded.get(key), dict)),
                     None)
        inside = [key for key, value in loaded.items() if _is_tensor_dict(value)]
        if known is not None:
            loaded = known
        elif len(inside) == 1:
            loaded = loaded[inside[0]]
        elif inside:
            raise HuddError(f"{model_path}: holds several state_dicts ({', '.join(map(str, inside))}); save the one to "
                            f"analyse alone, e.g. torch.save(checkpoint[{inside[0]!r}], path)")
    if not _is_tensor_dict(loaded):
        raise HuddError(f"{model_path}: is not a state_dict (a dict of tensors); save model.state_dict()")
    return loaded


def _without_wrapper_names(state: dict, expected: set) -> dict:
    """A state_dict saved through a wrapper holds every key under the wrapper's name for the model:
    nn.DataParallel's `module.`, torch.compile's `_orig_mod.`, a Lightning module's `model.` (or the
    user's own). Such common first names are peeled off while that makes the keys the architecture's;
    otherwise the state_dict is returned as it is (and reported as not fitting)."""
    peeled = state
    while peeled and set(peeled) != expected and all("." in k for k in peeled) \
            and len({k.split(".", 1)[0] for k in peeled}) == 1:
        peeled = {k.split(".", 1)[1]: v for k, v in peeled.items()}
    return peeled if set(peeled) == expected else state


# a model of more outputs than class folders (1,000 ImageNet classes, a few of them looked at) is read so
MORE_OUTPUTS_HINT = "; for a model of more classes than the folders hold, name every output in order in the setting classes"


def _load_state_dict(model: nn.Module, state: dict, model_path: Path, arch: str, num_classes: int) -> None:
    expected = model.state_dict()
    state = _without_wrapper_names(state, set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if not (missing or unexpected or wrong_shape):
        model.load_state_dict(state)
        return
    last_weight = [k for k in expected if k.endswith("weight")][-1]
    if not missing and not unexpected and wrong_shape in ([last_weight], [last_weight, last_weight[:-6] + "bias"]):
        if state[last_weight].shape[0] == num_classes:   # the file fits the classes: the class's default does not
            raise HuddError(
                f"{model_path}: has {num_classes} outputs, one per class, but {arch} builds "
                f"{expected[last_weight].shape[0]}: its outputs are not set by a num_classes parameter, so its own "
                f"default was used; give it a num_classes parameter that sets them, or make that default {num_classes}")
        raise HuddError(
            f"{model_path}: the model has {state[last_weight].shape[0]} outputs but the training set has "
            f"{num_classes} classes; check the model file or the class folders of DataSets/TrainingSet"
            + (MORE_OUTPUTS_HINT if state[last_weight].shape[0] > num_classes else ""))
    parts = []
    if missing:
        parts.append("missing " + ", ".join(missing[:3]))
    if unexpected:
        parts.append("unexpected " + ", ".join(unexpected[:3]))
    if wrong_shape:
        k = wrong_shape[0]
        parts.append(f"shape of {k} is {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in the "
                     "architecture")
    raise HuddError(f"{model_path}: does not fit architecture {arch!r} ({'; '.join(parts)}); pass the right "
                    "--arch or set \"arch\" in hudd.json")


def _first_output(output: Any) -> str:
    """How a wrapper's forward takes a model's first output: model(x)["logits"] for a dict (Hugging Face's
    output objects are dicts too), else model(x)[0]."""
    return f"model(x)[{next(iter(output))!r}]" if isinstance(output, dict) and output else "model(x)[0]"


def check_output_size(model: nn.Module, settings: Settings, num_classes: int, model_path: Path) -> None:
    """The model takes the configured input, a batch of two images as one, and gives what its task needs
    (tasks.py). One forward pass of two images; one more, of one image, only where that fails or loses
    the batch (_refuse_lost_batch)."""
    output = _probe(model, settings, model_path, images=2)
    if isinstance(output, HuddError) or (isinstance(output, torch.Tensor) and (output.ndim == 0 or output.shape[0] != 2)):
        _refuse_lost_batch(model, settings, model_path)
    if not isinstance(output, torch.Tensor):  # (logits, features), {"logits": ...}: LRP explains one output tensor
        raise HuddError(f"{model_path}: the model ({settings.arch}) returns a {type(output).__name__} in eval mode; "
                        "HUDD explains one output tensor: make its forward return the outputs alone in eval mode, "
                        f"or give --arch a class of yours whose forward returns them (e.g. {_first_output(output)})")
    problem = make_task(settings).check_output(output, num_classes)
    if problem:
        raise HuddError(f"{model_path}: {problem}")


def _refuse_lost_batch(model: nn.Module, settings: Settings, model_path: Path) -> None:
    """Raises for a model whose batch of two failed or lost its batch: its failure on one image (a wrong
    input size), or, where one image works, a forward that flattens the batch away (torch.flatten(x))."""
    single = _probe(model, settings, model_path, images=1)
    if isinstance(single, HuddError):
        raise single
    height, width = resolve_input_size(settings)
    shape = tuple(single.shape) if isinstance(single, torch.Tensor) else type(single).__name__
    raise HuddError(f"{model_path}: the model's output for one {settings.channels}x{height}x{width} image has shape "
                    f"{shape}, and a batch of 2 images does not give 2 rows: its forward flattens the batch away "
                    "(torch.flatten(x) or x.view(-1, ...)); keep it with torch.flatten(x, 1) or x.view(x.size(0), -1)")


def _probe(model: nn.Module, settings: Settings, model_path: Path, images: int):
    """The model's output for `images` blank inputs of the configured size, or the HuddError (returned,
    not raised) that names its failure."""
    height, width = resolve_input_size(settings)
    try:
        with torch.no_grad():
            return model(torch.zeros(images, settings.channels, height, width))
    except Exception as exc:
        return HuddError(f"{model_path}: the model fails on a {settings.channels}x{height}x{width} input "
                         f"({first_line_of(exc)}); set input_size/channels in hudd.json to what the model takes")


# --------------------------------------------------------------------------------------------
# Device, seed, logging
# --------------------------------------------------------------------------------------------

def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HuddError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HuddError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise HuddError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        try:  # mps, xpu, ...: their own availability checks differ; a tensor on the device tells
            torch.empty(1, device=device)
        except Exception as error:  # noqa: BLE001 - whatever the backend raises
            # torch's first sentence (the rest lists backends); the error's type where it has no message
            why = (str(error).splitlines() or [type(error).__name__])[0].split(". ")[0][:120]
            raise HuddError(f"--device {name}: not usable on this machine ({why}); use --device cpu") from None
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def run_guarded(body: Callable[[], int], debug: bool) -> int:
    """A command's exit status: body()'s; 2 with one `error:` line for bad input (HuddError) and for a file
    operation the machine refuses (a read-only folder, permissions, a full disk); 130 when interrupted; 1
    with an `internal error:` line for a bug of ours. --debug re-raises with the trace."""
    try:
        return body()
    except QuietExit as exc:
        return exc.status
    except HuddError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished steps are kept and a rerun resumes", file=sys.stderr)
        return 130
    except OSError as exc:
        advice = ENVIRONMENT_ERRORS.get(exc.errno)
        if advice is None or debug:   # not the machine's doing: a bug of ours, as below
            return _internal_error(exc, debug)
        print(f"error: {exc.filename or ''}: {exc.strerror}; {advice}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug of ours, not the user's input: say so, keep the trace for --debug
        return _internal_error(exc, debug)


# What to do where the machine refuses a file operation: not a bug of HUDD's, so one line, not a report.
_NOT_PERMITTED = ("HUDD reads DataSets/ and DNNModels/ and writes into the case folder (T/, the result CSVs, "
                  "retrained models): give it those permissions")
ENVIRONMENT_ERRORS = {
    errno.EROFS: "HUDD writes into the case folder (T/, the result CSVs, retrained models): run it on a writable "
                 "copy, or on a case folder of your own whose DataSets is a link to the read-only data "
                 "(ln -s /path/to/DataSets CASE/DataSets)",
    errno.EACCES: _NOT_PERMITTED,
    errno.EPERM: _NOT_PERMITTED,
    errno.ENOSPC: "the disk is full: free some space (or keep fewer heatmap layers, setting layers); finished "
                  "steps are kept and a rerun resumes",
    errno.EDQUOT: "the disk quota is used up: free some space; finished steps are kept and a rerun resumes",
}


def _internal_error(exc: Exception, debug: bool) -> int:
    """The `internal error:` line of a bug of ours, exit status 1; with --debug the exception itself."""
    if debug:
        raise exc
    print(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback, and "
          "please report it)", file=sys.stderr)
    return 1


def setup_logging(debug: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s", stream=sys.stdout)


# --------------------------------------------------------------------------------------------
# Atomic writes and the run manifest
# --------------------------------------------------------------------------------------------

# numpy reads a .npy header (and each .npz member's) with ast.literal_eval, and CPython 3.11's AST
# constructor is not safe on two threads at once ("SystemError: AST constructor recursion depth
# mismatch", seen when the cluster step's main thread opened a layer while another thread read the object
# masks): the loads that threads may run together hold this lock while they parse.
ARRAY_HEADER_LOCK = threading.Lock()


def copy_to_new(source: Path | str, target: Path | str) -> None:
    """A copy of `source` (contents and times) at `target`, which must not exist (FileExistsError): a copy
    onto an existing name could write into a file it hard-links, a user's image in DataSets."""
    with open(source, "rb") as original, open(target, "xb") as copy:   # "x": never an existing file
        shutil.copyfileobj(original, copy)
    shutil.copystat(source, target)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yields a temporary path beside `final`; renames it to `final` only if the block succeeds,
    so an interrupted run never leaves a half-written file under the real name."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(f".{final.name}.partial-{os.getpid()}{final.suffix}")
    try:
        yield temporary
        os.replace(temporary, final)
    finally:
        if temporary.exists():
            temporary.unlink()


class CaseLock:
    """One run per case study at a time: an exclusive lock on `CASE/.hudd.lock`, held for the whole run
    (under torchrun by rank 0, for every rank of the job). The file says who holds it. The operating
    system drops the lock when the holding process ends, however it ends, so a killed run never blocks
    the next one; the file left behind is just unlocked. A POSIX record lock (lockf), not flock: flock's
    lock belongs to the open file, which forked children share (DataLoader workers, which outlive a killed
    run by up to 5 s), and the next run was refused in the name of a run that no longer existed."""

    def __init__(self, paths: CasePaths):
        self.paths = paths
        self.stream = None

    def acquire(self, holder: str) -> None:
        try:
            import fcntl
        except ImportError:  # no fcntl (Windows): runs are not guarded
            return
        stream = open(self.paths.lock_file, "a+")
        try:
            fcntl.lockf(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            stream.seek(0)
            running = stream.read().strip() or "details not written yet"
            stream.close()
            raise HuddError(f"{self.paths.root}: another HUDD run is working on this case study ({running}); wait "
                            "for it to finish or stop it, then run again") from None
        stream.seek(0)
        stream.truncate()
        stream.write(holder)
        stream.flush()
        self.stream = stream

    def release(self) -> None:
        if self.stream is not None:
            self.stream.truncate(0)
            self.stream.close()  # closing the file drops the lock
            self.stream = None


def run_description() -> str:
    """Who holds a case's lock: pid, host, start time and command line (and the torchrun job)."""
    import socket
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    ranks = f", torchrun job {job} of {os.environ.get('WORLD_SIZE')} ranks" if job else ""
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()}{ranks}, started {started}: {' '.join(sys.argv)}"


@contextlib.contextmanager
def staged_datasets(paths: CasePaths) -> Iterator[Path]:
    """A staging folder that becomes CASE/DataSets when the block completes (replacing an empty
    DataSets folder), so a failed or interrupted build never leaves a half DataSets behind."""
    paths.root.mkdir(parents=True, exist_ok=True)
    staging = paths.root / f".DataSets.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        yield staging
        if paths.datasets.exists():
            paths.datasets.rmdir()  # callers refuse a non-empty one before building
        os.replace(staging, paths.datasets)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def write_settings_if_absent(paths: CasePaths, settings: dict[str, Any]) -> None:
    """A generated case's hudd.json; a user's own file is left as it is."""
    if paths.settings_file.exists():
        log.info("%s exists; left as it is", paths.settings_file)
        return
    with atomic_path(paths.settings_file) as temporary:
        temporary.write_text(json.dumps(settings, indent=2) + "\n")


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as temporary:
        frame.to_csv(temporary, index=False)


# The columns of HUDD's tables that hold names: image paths, classes, keypoints, scenarios, RCCs. Read as
# text, so that a class folder named "1" or "01" stays that name instead of becoming a number that no
# longer matches the folder names (the classes).
NAME_COLUMNS = ("image", "expected", "predicted", "label", "class", "scenario", "majority_scenario", "worst_keypoint",
                "worst_component", "uncertain_keypoint", "rcc", "sub_rcc")


def read_csv(path: Path, **options) -> pd.DataFrame:
    """A CSV table, its NAME_COLUMNS as text (pandas' other options as given)."""
    return pd.read_csv(path, dtype=dict.fromkeys(NAME_COLUMNS, str), **options)


def file_digest(path: Path) -> str:
    """sha256 of a file's contents (the model file: touching it without changing it keeps caches)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def image_set_digest(image_set: ImageSet, case_root: Path) -> str:
    """Fingerprint of an image list: each image's relative path, label, size and modification time
    (hashing every image's bytes would cost as much as reading the set)."""
    digest = hashlib.sha256()
    for path, label in zip(image_set.paths, image_set.labels):
        stat = path.stat()
        digest.update(f"{os.path.relpath(path, case_root)}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    digest.update("|".join(image_set.classes).encode())
    if image_set.targets is not None:  # keypoint labels live in labels.csv, not in folder names
        digest.update(np.ascontiguousarray(image_set.targets).tobytes())
    return digest.hexdigest()


def fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class Manifest:
    """`CASE/hudd_manifest.json`: for each step, the fingerprint of its inputs and its outputs.
    A step is skipped only when its fingerprint matches and all its outputs still exist."""

    def __init__(self, path: Path):
        self.path = path
        self.reload()

    def reload(self) -> None:
        """Reads the file again (under torchrun, after rank 0 has recorded a step)."""
        self.entries: dict[str, Any] = {}
        if self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                log.warning("%s is unreadable; every step will be recomputed", self.path)

    def is_current(self, step: str, step_fingerprint: str) -> bool:
        entry = self.entries.get(step)
        return bool(entry) and entry["fingerprint"] == step_fingerprint and all(
            (self.path.parent / output).exists() for output in entry["outputs"])

    def record(self, step: str, step_fingerprint: str, outputs: list[str], basis: dict | None = None) -> None:
        self.entries[step] = {"fingerprint": step_fingerprint, "outputs": outputs,
                              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              **({"basis": basis} if basis else {})}
        with atomic_path(self.path) as temporary:
            temporary.write_text(json.dumps(self.entries, indent=2))

    def forget(self, *steps: str) -> None:
        if [self.entries.pop(step) for step in steps if step in self.entries]:
            with atomic_path(self.path) as temporary:
                temporary.write_text(json.dumps(self.entries, indent=2))


# --------------------------------------------------------------------------------------------
# What one pipeline run shares between steps
# --------------------------------------------------------------------------------------------

@dataclass
class RunContext:
    """The case, settings and options of one `HUDD.py` run; loads the image sets and the model once."""

    paths: CasePaths
    settings: Settings
    model_path: Path
    device: torch.device
    seed: int = 0
    force: bool = False
    trust_pickle: bool = False
    skip_bad_images: bool = False
    _sets: dict[str, ImageSet] | None = None
    _model: nn.Module | None = None
    _model_digest: str | None = None
    _manifest: Manifest | None = None
    _task: Any = None
    _memo: dict[str, Any] = field(default_factory=dict)
    left_out: dict[str, list[str]] = field(default_factory=dict)   # per set: images --skip-bad-images left out

    @property
    def manifest(self) -> Manifest:
        """The run's one manifest: read once, written through by every step's record()."""
        if self._manifest is None:
            self._manifest = Manifest(self.paths.manifest)
        return self._manifest

    @property
    def task(self):
        """What the model's task decides (tasks.py): classification or keypoints."""
        if self._task is None:
            self._task = make_task(self.settings)
        return self._task

    def sets(self) -> dict[str, ImageSet]:
        if self._sets is None:
            self._sets = load_case_sets(self.paths, self.task)
            note_sixteen_bit(list(self._sets.values()))
        return self._sets

    def keep_only(self, set_key: str, rows: list[int]) -> None:
        """From now on in this run, the set holds only the images at `rows` (--skip-bad-images: the later
        steps see the images the test step could read); `left_out` names the others."""
        image_set = self.sets()[set_key]
        kept = set(rows)
        self.left_out[set_key] = [self.paths.relative(p) for i, p in enumerate(image_set.paths) if i not in kept]
        self._sets[set_key] = image_set.subset(rows)

    @property
    def classes(self) -> list[str]:
        return self.sets()["train"].classes

    def model(self) -> nn.Module:
        if self._model is None:
            model = load_model(self.model_path, self.settings, len(self.classes), self.trust_pickle)
            self._model = model.to(self.device)
        return self._model

    def memo(self, key: str, make: Callable[[], Any]) -> Any:
        """A value computed once per run and shared by the steps (e.g. decoded training images)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def model_digest(self) -> str:
        if self._model_digest is None:
            if not self.model_path.is_file():
                raise HuddError(f"{self.model_path}: model file not found; put it in the case's DNNModels folder")
            self._model_digest = file_digest(self.model_path)
        return self._model_digest

    def model_fingerprint_part(self) -> dict[str, Any]:
        """What decides the model's outputs: its file's content and how inputs are prepared."""
        s = self.settings
        return {"model": self.model_digest(), "arch": arch_identity(s.arch), "task": s.task,
                "input_size": resolve_input_size(s),
                "resize": s.resize, "channels": s.channels, "mean": s.mean, "std": s.std,
                **({"resize_to": resize_shorter_side(s)} if s.resize == "resize-crop" else {})}


# --------------------------------------------------------------------------------------------
# The step contract
# --------------------------------------------------------------------------------------------

class PipelineStop(Exception):
    """Raised by a step when the later steps have nothing to work on (e.g. no error image); the
    message says why, and the run ends cleanly after that step."""


class Step:
    """One pipeline step: what decides its outputs (`inputs`), the files that show it is done
    (`outputs`), the computation that writes them (`compute`), and a summary read back from them.
    HUDD.run_step applies the protocol: skip when the fingerprint of the inputs is recorded and the
    outputs exist, else compute and record. A step never writes another step's files."""

    name = ""       # key in the manifest
    title = ""      # how the log names it
    version = 1     # bump when the step's results change for the same inputs
    every_rank = False  # under torchrun: compute() runs on every rank (it splits the work), else on rank 0 only

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        raise NotImplementedError

    def outputs(self, ctx: RunContext) -> list[Path]:
        raise NotImplementedError

    def compute(self, ctx: RunContext) -> None:
        raise NotImplementedError

    def summary(self, ctx: RunContext) -> dict[str, Any]:
        raise NotImplementedError

    def after(self, ctx: RunContext) -> None:
        """What the rest of the run needs from this step once it is done or reused (default: nothing)."""

    def basis(self, ctx: RunContext) -> dict[str, Any]:
        """What of the earlier steps' results this step's outputs rest on, recorded beside its fingerprint
        so that a reader can tell, without the run's options, whether they are still current ({}: none)."""
        return {}

    def fingerprint(self, ctx: RunContext) -> str:
        return fingerprint({"step": self.name, "version": self.version, **self.inputs(ctx)})

    def recorded_fingerprint(self, ctx: RunContext) -> str | None:
        """The fingerprint this step last recorded (later steps include it in their inputs)."""
        return ctx.manifest.entries.get(self.name, {}).get("fingerprint")
