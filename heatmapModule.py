"""Step 2: LRP relevance heatmaps of the error-inducing test images, for every selected layer.

For the images that `testResult.csv` marks Wrong, writes under `CASE/T/Heatmaps/`:
- `<Layer>.npy`: float32 array (images, *layer shape) of relevance at that layer's output; `Layer0` is
  the relevance at the input (pixels), `Layer1`... the selected layers in execution order;
- `index.csv`: the rows' images (path relative to CASE), expected and predicted class;
- `layers.csv`: layer name, module path, shape.
Batches go straight to disk, so memory does not grow with the number of images, and an interrupted
run resumes where it stopped. The LRP engine itself is `lrp.py`; `relevance` is re-exported here.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from Helper import (HuddError, ImageSet, RunContext, atomic_path, fingerprint, make_loader, stop_on_unreadable,
                    write_csv)
from lrp import RULE_PRESETS, LRPExplainer, default_layers, relevance  # noqa: F401  (public API)

log = logging.getLogger("hudd")

STEP = "heatmaps"
STEP_VERSION = 1
INPUT_LAYER = "Layer0"


class NpyRowWriter:
    """Appends rows to a float32 `.npy` file whose final shape is known, without keeping it in
    memory. Written under a temporary name; `finish()` renames it once every row is there."""

    def __init__(self, final: Path, rows: int, row_shape: tuple[int, ...], start_row: int = 0):
        self.final = final
        self.partial = final.with_name(f".{final.name}.partial")
        self.rows = rows
        self.row_shape = row_shape
        self.row_bytes = int(np.prod(row_shape)) * 4
        if start_row == 0 or not self.partial.exists():
            start_row = 0
            with open(self.partial, "wb") as stream:
                np.lib.format.write_array_header_2_0(
                    stream, {"descr": "<f4", "fortran_order": False, "shape": (rows, *row_shape)})
                self.data_offset = stream.tell()
        else:
            with open(self.partial, "rb") as stream:
                np.lib.format.read_magic(stream)
                np.lib.format.read_array_header_2_0(stream)
                self.data_offset = stream.tell()
        self.stream = open(self.partial, "r+b")
        self.stream.seek(self.data_offset + start_row * self.row_bytes)
        self.stream.truncate()
        self.written = start_row

    def write(self, block: np.ndarray) -> None:
        self.stream.write(np.ascontiguousarray(block, dtype="<f4").tobytes())
        self.written += len(block)

    def flush(self) -> None:
        self.stream.flush()
        os.fsync(self.stream.fileno())

    def finish(self) -> None:
        self.stream.close()
        if self.written != self.rows:
            raise RuntimeError(f"{self.final}: wrote {self.written} rows of {self.rows}")
        os.replace(self.partial, self.final)

    def close(self) -> None:
        if not self.stream.closed:
            self.stream.close()


def error_images(ctx: RunContext) -> pd.DataFrame:
    """The Wrong rows of testResult.csv: image, expected, predicted (in the file's order). For keypoint
    models `expected` is the worst keypoint's face component and `predicted` the worst keypoint."""
    results_path = ctx.paths.result_csv("test")
    if not results_path.is_file():
        raise HuddError(f"{results_path}: not found; run the test step first (--steps test,heatmaps)")
    results = pd.read_csv(results_path, keep_default_na=False)
    wrong = results[results["result"] == "Wrong"]
    if ctx.settings.task == "keypoints":
        wrong = wrong.rename(columns={"worst_component": "expected", "worst_keypoint": "predicted"})
    return wrong[["image", "expected", "predicted"]].reset_index(drop=True)


def explained_classes(index: pd.DataFrame, ctx: RunContext) -> torch.Tensor:
    """Per image, the output channel whose relevance is explained: the predicted or expected class,
    or for keypoint models the worst keypoint (the `predicted` column of the index)."""
    column = "expected" if ctx.settings.explain == "expected" else "predicted"
    return torch.tensor([ctx.classes.index(c) for c in index[column]], dtype=torch.long)


def output_shape_for_targets(model: torch.nn.Module, example: torch.Tensor, ctx: RunContext):
    """The output shape a keypoint mask needs (one forward of one image); None for classifiers,
    whose targets are class indices."""
    if ctx.settings.task != "keypoints":
        return None
    with torch.no_grad():
        return tuple(model(example[:1].to(ctx.device)).shape[1:])


def lrp_target(channels: torch.Tensor, ctx: RunContext, output_shape: tuple[int, ...] | None = None):
    """What LRPExplainer takes as `target`: class indices, or for keypoint models a mask over the
    output maps (the explained keypoint's map, or every map with `"explain": "all"`)."""
    if ctx.settings.task != "keypoints":
        return channels.to(ctx.device)
    channels = channels.to(ctx.device)
    mask = torch.zeros((len(channels), *output_shape), device=ctx.device)
    every_map = channels < 0 if ctx.settings.explain != "all" else torch.ones_like(channels, dtype=torch.bool)
    mask[every_map] = 1.0     # -1: no worst keypoint known (unlabelled image): every map
    one = torch.nonzero(~every_map).flatten()
    mask[one, channels[one]] = 1.0
    return mask


def selected_layers(model: torch.nn.Module, ctx: RunContext, example: torch.Tensor) -> list[tuple[str, str]]:
    """(layer name, module path): Layer0 for the input, then the configured or default layers."""
    if ctx.settings.layers:
        modules = dict(model.named_modules())
        unknown = [p for p in ctx.settings.layers if p not in modules]
        if unknown:
            raise HuddError(f"setting layers: {', '.join(unknown)} not found in the model; module paths are e.g. "
                            f"{', '.join(list(modules)[1:6])}")
        order = [path for _alias, path in default_layers(model, example_input=example)]
        chosen = sorted(ctx.settings.layers, key=lambda p: order.index(p) if p in order else len(order))
        layers = [(f"Layer{k}", path) for k, path in enumerate(chosen, start=1)]
    else:
        layers = default_layers(model, example_input=example)
    return [(INPUT_LAYER, "input")] + layers


def step_fingerprint(ctx: RunContext, index: pd.DataFrame) -> str:
    images = hashlib.sha256(index.to_csv(index=False).encode()).hexdigest()
    s = ctx.settings
    return fingerprint({"step": STEP, "version": STEP_VERSION, **ctx.model_fingerprint_part(),
                        "errors": images, "rules": s.rules, "layers": s.layers, "explain": s.explain})


class Progress:
    """`T/Heatmaps/.progress.json`: how many rows of an unfinished run are safely on disk."""

    def __init__(self, folder: Path, step_print: str):
        self.path = folder / ".progress.json"
        self.step_print = step_print

    def rows_done(self) -> int:
        if not self.path.is_file():
            return 0
        saved = json.loads(self.path.read_text())
        return saved["rows"] if saved.get("fingerprint") == self.step_print else 0

    def save(self, rows: int) -> None:
        with atomic_path(self.path) as temporary:
            temporary.write_text(json.dumps({"fingerprint": self.step_print, "rows": rows}))

    def clear(self) -> None:
        if self.path.exists():
            self.path.unlink()


def run(ctx: RunContext) -> dict:
    index = error_images(ctx)
    folder = ctx.paths.t_dir / "Heatmaps"
    if index.empty:
        return {"stop": "no error-inducing test images: the model gets every test image right, so there is "
                        "nothing to explain; the pipeline stops after the test step"}
    step_print = step_fingerprint(ctx, index)
    manifest = ctx.manifest
    if not ctx.force and manifest.is_current(STEP, step_print):
        log.info("heatmap step: inputs unchanged, reusing %s", ctx.paths.relative(folder))
        return summarise(ctx)
    folder.mkdir(parents=True, exist_ok=True)
    layers = compute_heatmaps(ctx, index, folder, step_print)
    outputs = [ctx.paths.relative(folder / f"{name}.npy") for name, _path, _shape in layers]
    outputs += [ctx.paths.relative(folder / n) for n in ("index.csv", "layers.csv")]
    manifest.record(STEP, step_print, outputs)
    return summarise(ctx)


def compute_heatmaps(ctx: RunContext, index: pd.DataFrame, folder: Path, step_print: str) -> list:
    """Streams relevance to the per-layer files; resumes an interrupted run with the same inputs."""
    model = ctx.model()
    targets = explained_classes(index, ctx)
    image_set = ImageSet(name="error images", root=ctx.paths.set_dir("test"),
                         paths=[ctx.paths.root / p for p in index["image"]], labels=[0] * len(index),
                         classes=ctx.classes)
    loader = make_loader(image_set, ctx.settings, ctx.settings.batch_size, ctx.settings.workers)
    progress = Progress(folder, step_print)
    start_row = 0 if ctx.force else progress.rows_done()
    if start_row == 0:  # a fresh run: drop files of an earlier layer selection
        for old in folder.glob("*.npy"):
            old.unlink()
    writers: dict[str, NpyRowWriter] = {}
    layers: list[tuple[str, str]] = []
    try:
        for inputs, _labels, rows, failures in tqdm(loader, desc="heatmaps", unit="batch", leave=False, disable=None):
            stop_on_unreadable(image_set, failures)
            if not layers:  # first batch: choose the layers, learn their shapes from one image
                layers = selected_layers(model, ctx, inputs[:1].to(ctx.device))
                explainer = LRPExplainer(model, rules=ctx.settings.rules, layers=[p for _n, p in layers[1:]])
                output_shape = output_shape_for_targets(model, inputs, ctx)
                probe = explainer(inputs[:1].to(ctx.device), target=lrp_target(targets[rows[:1]], ctx, output_shape))
                writers = {name: NpyRowWriter(folder / f"{name}.npy", len(index), tuple(probe[path].shape[1:]),
                                              start_row) for name, path in layers}
            keep = rows >= start_row
            if not keep.any():
                continue  # already on disk from an interrupted run
            batch_relevance = explainer(inputs[keep].to(ctx.device),
                                        target=lrp_target(targets[rows[keep]], ctx, output_shape))
            for name, path in layers:
                writers[name].write(batch_relevance[path].float().cpu().numpy())
            for writer in writers.values():
                writer.flush()
            progress.save(int(rows[-1]) + 1)
        for writer in writers.values():
            writer.finish()
    finally:
        for writer in writers.values():
            writer.close()
    layer_rows = [(name, path, writers[name].row_shape) for name, path in layers]
    write_csv(pd.DataFrame([(n, p, "x".join(map(str, s))) for n, p, s in layer_rows],
                           columns=["layer", "module", "shape"]), folder / "layers.csv")
    write_csv(index, folder / "index.csv")
    progress.clear()
    return layer_rows


def summarise(ctx: RunContext) -> dict:
    folder = ctx.paths.t_dir / "Heatmaps"
    layers = pd.read_csv(folder / "layers.csv")
    images = len(pd.read_csv(folder / "index.csv"))
    size = sum((folder / f"{name}.npy").stat().st_size for name in layers["layer"])
    return {"images": images, "layers": len(layers), "folder": folder, "megabytes": size / 1e6}
