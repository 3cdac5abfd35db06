"""Step 2: LRP relevance heatmaps of the error-inducing test images, for every selected layer.

For the images that `testResult.csv` marks Wrong, writes under `CASE/T/Heatmaps/`:
- `<Layer>.npy`: float32 array (images, *layer shape) of relevance at that layer's output; `Layer0` is
  the relevance at the input (pixels), `Layer1`... the selected layers in execution order;
- `index.csv`: the rows' images (path relative to CASE), expected and predicted class;
- `layers.csv`: layer name, module path, shape.
Batches go straight to disk, so memory does not grow with the number of images, and an interrupted
run resumes where it stopped. The LRP engine itself is the `lrp` package; `relevance` is re-exported here.
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

from Helper import (CasePaths, HuddError, ImageSet, PipelineStop, RunContext, Step, atomic_path, make_loader,
                    stop_on_unreadable, write_csv)
from lrp import RULE_PRESETS, LRPExplainer, default_layers, relevance  # noqa: F401  (public API)
from testModule import error_index

log = logging.getLogger("hudd")

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


# --------------------------------------------------------------------------------------------
# The files, and their one reader
# --------------------------------------------------------------------------------------------

FOLDER = "Heatmaps"
INDEX_FILE = "index.csv"
LAYERS_FILE = "layers.csv"
PROGRESS_FILE = ".progress.json"


def heatmaps_dir(paths: CasePaths) -> Path:
    return paths.t_dir / FOLDER


def layer_file(paths: CasePaths, layer: str) -> Path:
    return heatmaps_dir(paths) / f"{layer}.npy"


def read_index(paths: CasePaths) -> pd.DataFrame:
    """The heatmap rows' images: image, expected, predicted (row i of every <Layer>.npy)."""
    return pd.read_csv(_existing(paths, INDEX_FILE), keep_default_na=False)


def read_layers(paths: CasePaths) -> pd.DataFrame:
    """layer, module, shape of every layer with heatmaps, Layer0 (the input) first."""
    return pd.read_csv(_existing(paths, LAYERS_FILE))


def open_layer(paths: CasePaths, layer: str) -> np.ndarray:
    """A layer's heatmaps, memory-mapped: (error images, *layer shape) float32."""
    return np.load(layer_file(paths, layer), mmap_mode="r")


def module_of(paths: CasePaths, layer: str) -> str:
    """The module path whose output relevance a layer holds ("input" for Layer0)."""
    return str(read_layers(paths).set_index("layer").loc[layer, "module"])


def _existing(paths: CasePaths, name: str) -> Path:
    path = heatmaps_dir(paths) / name
    if not path.is_file():
        raise HuddError(f"{heatmaps_dir(paths)}: no heatmaps yet; run the heatmap step first (--steps heatmaps)")
    return path


# --------------------------------------------------------------------------------------------
# Computing relevance
# --------------------------------------------------------------------------------------------

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


class Progress:
    """`T/Heatmaps/.progress.json`: how many rows of an unfinished run are safely on disk."""

    def __init__(self, folder: Path, step_print: str):
        self.path = folder / PROGRESS_FILE
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


class LayerWriters:
    """One NpyRowWriter per layer, opened on the first batch (when the layers' shapes are known)."""

    def __init__(self, folder: Path, rows: int, start_row: int):
        self.folder, self.rows, self.start_row = folder, rows, start_row
        self.writers: dict[str, NpyRowWriter] = {}

    def open(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.writers = {name: NpyRowWriter(self.folder / f"{name}.npy", self.rows, shape, self.start_row)
                        for name, shape in shapes.items()}

    def write(self, blocks: dict[str, np.ndarray]) -> None:
        for name, block in blocks.items():
            self.writers[name].write(block)
        for writer in self.writers.values():
            writer.flush()

    def finish(self) -> None:
        for writer in self.writers.values():
            writer.finish()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: writer.row_shape for name, writer in self.writers.items()}


class ErrorExplainer:
    """The LRP explainer of the error images, set up on the first batch: the layers, their shapes and
    the output shape a keypoint target mask needs."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.layers: list[tuple[str, str]] = []

    def setup(self, example: torch.Tensor, channels: torch.Tensor) -> dict[str, tuple[int, ...]]:
        ctx, model = self.ctx, self.ctx.model()
        self.layers = selected_layers(model, ctx, example)
        self.explainer = LRPExplainer(model, rules=ctx.settings.rules, layers=[p for _n, p in self.layers[1:]])
        self.output_shape = ctx.task.output_shape(model, example)
        probe = self(example, channels)
        return {name: tuple(block.shape[1:]) for name, block in probe.items()}

    def __call__(self, inputs: torch.Tensor, channels: torch.Tensor) -> dict[str, np.ndarray]:
        target = self.ctx.task.lrp_target(channels, self.output_shape, self.ctx.device)
        relevance = self.explainer(inputs, target=target)
        return {name: relevance[path].float().cpu().numpy() for name, path in self.layers}


def compute_heatmaps(ctx: RunContext, index: pd.DataFrame, folder: Path, step_print: str) -> dict:
    """Streams relevance to the per-layer files; resumes an interrupted run with the same inputs.
    Returns each layer's module path and row shape."""
    channels = ctx.task.explained_channels(index, ctx.classes)
    image_set = ImageSet(name="error images", root=ctx.paths.set_dir("test"),
                         paths=[ctx.paths.root / p for p in index["image"]], labels=[0] * len(index),
                         classes=ctx.classes)
    progress = Progress(folder, step_print)
    start_row = 0 if ctx.force else progress.rows_done()
    if start_row == 0:  # a fresh run: drop files of an earlier layer selection
        for old in folder.glob("*.npy"):
            old.unlink()
    writers, explain = LayerWriters(folder, len(index), start_row), ErrorExplainer(ctx)
    loader = make_loader(image_set, ctx.settings, ctx.settings.batch_size, ctx.settings.workers)
    try:
        for inputs, _labels, rows, failures in tqdm(loader, desc="heatmaps", unit="batch", leave=False, disable=None):
            stop_on_unreadable(image_set, failures)
            inputs = inputs.to(ctx.device)
            if not writers.writers:
                writers.open(explain.setup(inputs[:1], channels[rows[:1]]))
            keep = rows >= start_row
            if keep.any():  # rows below start_row are on disk from an interrupted run
                writers.write(explain(inputs[keep.to(inputs.device)], channels[rows[keep]]))
                progress.save(int(rows[-1]) + 1)
        writers.finish()
    finally:
        writers.close()
    progress.clear()
    return {name: (path, writers.shapes()[name]) for name, path in explain.layers}


class HeatmapStep(Step):
    name, title = "heatmaps", "heatmap step"

    def inputs(self, ctx: RunContext) -> dict:
        index = error_index(ctx)
        if index.empty:
            raise PipelineStop("no error-inducing test images: the model gets every test image right, so there is "
                               "nothing to explain; the pipeline stops after the test step")
        s = ctx.settings
        return {**ctx.model_fingerprint_part(), "errors": hashlib.sha256(index.to_csv(index=False).encode()).hexdigest(),
                "rules": s.rules, "layers": s.layers, "explain": s.explain}

    def outputs(self, ctx: RunContext) -> list[Path]:
        layers = read_layers(ctx.paths)
        return ([layer_file(ctx.paths, name) for name in layers["layer"]]
                + [heatmaps_dir(ctx.paths) / INDEX_FILE, heatmaps_dir(ctx.paths) / LAYERS_FILE])

    def compute(self, ctx: RunContext) -> None:
        index = error_index(ctx)
        folder = heatmaps_dir(ctx.paths)
        folder.mkdir(parents=True, exist_ok=True)
        layers = compute_heatmaps(ctx, index, folder, self.fingerprint(ctx))
        write_csv(pd.DataFrame([(name, path, "x".join(map(str, shape))) for name, (path, shape) in layers.items()],
                               columns=["layer", "module", "shape"]), folder / LAYERS_FILE)
        write_csv(index, folder / INDEX_FILE)

    def summary(self, ctx: RunContext) -> dict:
        layers = read_layers(ctx.paths)
        size = sum(layer_file(ctx.paths, name).stat().st_size for name in layers["layer"])
        return {"images": len(read_index(ctx.paths)), "layers": len(layers), "folder": heatmaps_dir(ctx.paths),
                "megabytes": size / 1e6}


STEP = HeatmapStep()
