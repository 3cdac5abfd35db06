"""Step 2: LRP relevance heatmaps of the error-inducing test images, for every selected layer.

For the images that `testResult.csv` marks Wrong, writes under `CASE/T/Heatmaps/`:
- `<Layer>.npy`: array (images, *layer shape) of relevance at that layer's output, float32 (setting
  `heatmap_dtype`: float16, or bfloat16 stored as its 16 bits, '<u2', since .npy has no bfloat16); `Layer0`
  is the relevance at the input (pixels), `Layer1`... the selected layers in execution order;
- `index.csv`: the rows' images (path relative to CASE), expected and predicted class;
- `layers.csv`: layer name, module path, shape;
- `overlays/<row>.png`: per error image (index.csv's row), the image and beside it its input relevance in
  colour over the image in grey: the pictures an engineer looks at in the RCC folders and the report,
  drawn here, where the rows are, so that ranks share the work and reclustering never redraws them.
Batches go straight to disk, so memory does not grow with the number of images, and an interrupted
run resumes where it stopped. Under torchrun each rank explains a contiguous shard of whole batches and
writes its rows in place into the shared files; rank 0 renames them once every row is there. The LRP
engine itself is the `lrp` package; `relevance` is re-exported here.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

import distributed
from Helper import (ARRAY_HEADER_LOCK, CasePaths, HuddError, ImageDataset, ImageSet, PipelineStop, RunContext,
                    Step, atomic_path, crop_steps, image_in_mode, make_loader, read_csv, stop_on_unreadable, write_csv)
from lrp import RULE_PRESETS, LRPExplainer, NoRuleError, default_layers, relevance  # noqa: F401  (public API)
from testModule import error_index

log = logging.getLogger("hudd")

INPUT_LAYER = "Layer0"
OVERLAYS = "overlays"
OVERLAY_TILE = 96          # pixels per overlay half (image | image with relevance)
OVERLAY_BYTES = 32 * 1024  # an overlay's PNG on disk, rounded up (27 KB measured with ResNet-18 on the signs)
BWR_LEVELS = 256           # the diverging map's table, as matplotlib's colormap object samples it


# How each heatmap_dtype is stored: .npy has no bfloat16, so its 16 bits are stored as '<u2'.
STORAGE = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}
FLOAT16_MAX = float(np.finfo(np.float16).max)


def to_storage(block: np.ndarray, dtype: str, layer: str) -> np.ndarray:
    """float32 relevance in the stored dtype (rounded to nearest, ties to even)."""
    if dtype == "float32":
        return np.ascontiguousarray(block, dtype="<f4")
    if dtype == "float16":
        peak = float(np.abs(block).max()) if block.size else 0.0
        if peak > FLOAT16_MAX:
            raise HuddError(f"{layer}: relevance up to {peak:.3g} does not fit heatmap_dtype float16 (at most "
                            f"{FLOAT16_MAX:.0f}); set \"heatmap_dtype\" to bfloat16 or float32 in hudd.json")
        return block.astype("<f2")
    return torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).to(torch.bfloat16).view(
        torch.int16).numpy().view("<u2")


def widen_bfloat16(bits: np.ndarray) -> np.ndarray:
    """Stored bfloat16 bit patterns -> float32 (exact: bfloat16 is float32's upper half)."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


class Bfloat16Rows:
    """A memory-mapped bfloat16 heatmap file read as float32, a slice of rows at a time: what open_layer
    returns for such a file (len, shape, [rows], reshape and np.asarray work as on an array)."""

    dtype = np.dtype(np.float32)

    def __init__(self, bits: np.ndarray):
        self.bits, self.shape, self.ndim = bits, bits.shape, bits.ndim

    def __len__(self) -> int:
        return len(self.bits)

    def __getitem__(self, key) -> np.ndarray:
        return widen_bfloat16(self.bits[key])

    def reshape(self, *shape) -> "Bfloat16Rows":
        return Bfloat16Rows(self.bits.reshape(*shape))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        values = widen_bfloat16(self.bits)
        return values if dtype is None else values.astype(dtype)


class NpyRowWriter:
    """Writes the rows of a `.npy` file whose final shape is known in place, at their offsets, without
    keeping the array in memory; the ranks of a torchrun job write their rows into the same file. The file
    is made at its full size under a temporary name; rank 0 renames it (publish_heatmaps) once every row
    is there."""

    def __init__(self, final: Path, rows: int, row_shape: tuple[int, ...], descr: str = "<f4"):
        self.partial = partial_file(final)
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, {"descr": descr, "fortran_order": False,
                                                      "shape": (rows, *row_shape)})
        self.data_offset = len(header.getvalue())
        self.row_bytes = int(np.prod(row_shape)) * np.dtype(descr).itemsize
        with open(self.partial, "ab"):
            pass  # created if missing, never truncated: other ranks may be writing their rows into it
        self.stream = open(self.partial, "r+b")
        self.stream.write(header.getvalue())  # every rank writes the same bytes
        if os.fstat(self.stream.fileno()).st_size < self.data_offset + rows * self.row_bytes:
            self.stream.truncate(self.data_offset + rows * self.row_bytes)

    def write(self, block: np.ndarray, first_row: int) -> None:
        self.stream.seek(self.data_offset + first_row * self.row_bytes)
        self.stream.write(block.tobytes())

    def flush(self) -> None:
        self.stream.flush()
        os.fsync(self.stream.fileno())

    def close(self) -> None:
        if not self.stream.closed:
            self.stream.close()


def partial_file(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


# --------------------------------------------------------------------------------------------
# The files, and their one reader
# --------------------------------------------------------------------------------------------

FOLDER = "Heatmaps"
INDEX_FILE = "index.csv"
LAYERS_FILE = "layers.csv"
PROGRESS_FILE = ".progress-{rank}.json"


def heatmaps_dir(paths: CasePaths) -> Path:
    return paths.t_dir / FOLDER


def layer_file(paths: CasePaths, layer: str) -> Path:
    return heatmaps_dir(paths) / f"{layer}.npy"


def read_index(paths: CasePaths) -> pd.DataFrame:
    """The heatmap rows' images: image, expected, predicted (row i of every <Layer>.npy)."""
    return read_csv(_existing(paths, INDEX_FILE), keep_default_na=False)


def read_layers(paths: CasePaths) -> pd.DataFrame:
    """layer, module, shape of every layer with heatmaps, Layer0 (the input) first."""
    return read_csv(_existing(paths, LAYERS_FILE))


def open_layer(paths: CasePaths, layer: str) -> np.ndarray:
    """A layer's heatmaps, memory-mapped: (error images, *layer shape), float32 or float16 as stored; a
    bfloat16 file reads as float32 (Bfloat16Rows)."""
    with ARRAY_HEADER_LOCK:
        array = np.load(layer_file(paths, layer), mmap_mode="r")
    return Bfloat16Rows(array) if array.dtype == np.uint16 else array


def overlay_dir(paths: CasePaths) -> Path:
    return heatmaps_dir(paths) / OVERLAYS


def overlay_of(paths: CasePaths, row: int) -> Path:
    """The overlay of the error image in index.csv's row `row`."""
    return overlay_dir(paths) / overlay_name(row)


def overlay_name(row: int) -> str:
    return f"{row}.png"


@functools.lru_cache(maxsize=1)
def _bwr_table() -> np.ndarray:
    from matplotlib import colormaps
    return colormaps["bwr"].resampled(BWR_LEVELS)(np.arange(BWR_LEVELS))[:, :3]


def relevance_colours(relevance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) relevance -> RGB colours of a diverging map (matplotlib's "bwr": red positive, blue
    negative, white zero, scaled by the largest magnitude) and an opacity growing with the magnitude.
    One table lookup: a colormap call per image costs more than the rest of the tile."""
    scale = float(np.abs(relevance).max()) or 1.0
    scaled = relevance / scale
    level = np.clip(((scaled + 1) / 2 * BWR_LEVELS).astype(np.int64), 0, BWR_LEVELS - 1)
    return _bwr_table()[level], np.clip(np.abs(scaled) * 1.5, 0, 1)


def overlay_size(height: int, width: int, tile: int = OVERLAY_TILE) -> tuple[int, int]:
    """(width, height) of each half of an overlay: the model input's aspect, its longer side `tile`."""
    scale = tile / max(height, width)
    return max(1, round(width * scale)), max(1, round(height * scale))


def overlay_tile(image_path: Path, relevance: np.ndarray, view: Callable | None = None,
                 tile: int = OVERLAY_TILE) -> Image.Image:
    """The part of the image the model saw (`view`: overlay_view, the crop its transform takes; None where
    it sees the whole image) and, beside it, that part in grey with its pixel relevance (summed over
    channels) overlaid; each half of the model input's aspect."""
    heat = relevance.sum(axis=0) if relevance.ndim == 3 else relevance
    size = overlay_size(*heat.shape, tile=tile)
    with Image.open(image_path) as source:
        seen = image_in_mode(source, "RGB")
    if view is not None:
        seen = view(seen)
    picture = seen.resize(size, Image.BILINEAR)
    rgb, alpha = relevance_colours(heat.astype(np.float64))
    colour = Image.fromarray((rgb * 255).astype(np.uint8)).resize(size, Image.NEAREST)
    opacity = Image.fromarray((alpha * 255).astype(np.uint8)).resize(size, Image.NEAREST)
    grey = picture.convert("L").convert("RGB")
    blended = Image.composite(colour, grey, opacity)
    tile_image = Image.new("RGB", (2 * size[0] + 2, size[1]), "white")
    tile_image.paste(picture, (0, 0))
    tile_image.paste(blended, (size[0] + 2, 0))
    return tile_image


def overlay_view(settings) -> Callable | None:
    """The crop the model's transform takes of each image (PIL image -> PIL image, Helper.crop_steps); None
    where the model sees the whole image. Resizing to the input size is left to the overlay's own, which
    keeps the detail of a large image."""
    from torchvision import transforms
    steps = crop_steps(settings)
    return transforms.Compose(steps) if steps else None


def write_overlays(paths: CasePaths, images: list[Path], pixel_relevance: np.ndarray, first_row: int,
                   view: Callable | None = None) -> None:
    """The overlays of rows first_row.. (their images and input relevance; `view`: overlay_view). Written
    in place, not through atomic_path (a rename costs as much as the file): an interrupted run redraws the
    batches its progress file does not hold. PNG level 1: a third of the default's time, 13% larger."""
    for offset, (image, relevance) in enumerate(zip(images, pixel_relevance)):
        overlay_tile(image, np.asarray(relevance), view).save(overlay_of(paths, first_row + offset), format="PNG",
                                                              compress_level=1)


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
    """`T/Heatmaps/.progress-<rank>.json`: the rows of an unfinished run that are safely on disk, as
    (start, stop) ranges of whole batches, one file per rank. A rerun with the same inputs, with any
    number of ranks, skips every batch that one of them holds."""

    def __init__(self, folder: Path, step_print: str):
        self.folder, self.step_print = folder, step_print
        self.path = folder / PROGRESS_FILE.format(rank=distributed.rank())
        self.ranges = self._read(self.path)

    def _read(self, path: Path) -> list[list[int]]:
        if not path.is_file():
            return []
        saved = json.loads(path.read_text())
        return saved["ranges"] if saved.get("fingerprint") == self.step_print else []

    def done(self) -> list[list[int]]:
        """Every rank's ranges."""
        return [r for path in sorted(self.folder.glob(PROGRESS_FILE.format(rank="*"))) for r in self._read(path)]

    def rows_done(self) -> int:
        """How many rows are on disk."""
        return sum(stop - start for start, stop in self.done())

    def pending(self, start: int, stop: int, batch_size: int) -> list[list[int]]:
        """The batches of rows start..stop (whole batches of the single-process run) not yet on disk."""
        done = self.done()
        return [list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size)
                if not any(first <= b < last for first, last in done)]

    def save(self, start: int, stop: int) -> None:
        if self.ranges and self.ranges[-1][1] == start:
            self.ranges[-1][1] = stop
        else:
            self.ranges.append([start, stop])
        with atomic_path(self.path) as temporary:
            temporary.write_text(json.dumps({"fingerprint": self.step_print, "ranges": self.ranges}))

    def start_fresh(self) -> None:
        """Drops an earlier run's files (another layer selection, dtype or model), progress included."""
        for old in [*self.folder.glob("*.npy"), *self.folder.glob(".*.partial")]:
            old.unlink()
        shutil.rmtree(self.folder / OVERLAYS, ignore_errors=True)
        self.clear()

    def clear(self) -> None:
        for path in self.folder.glob(PROGRESS_FILE.format(rank="*")):
            path.unlink()


def check_disk_space(folder: Path, rows: int, shapes: dict[str, tuple[int, ...]], dtype: str) -> None:
    """Stops before writing when the heatmaps of the `rows` still to compute (and their overlays) do not fit
    on the case's disk: a run that fills it fails hours in, and leaves the disk full."""
    row_bytes = sum(int(np.prod(shape)) for shape in shapes.values()) * np.dtype(STORAGE[dtype]).itemsize
    needed, free = rows * (row_bytes + OVERLAY_BYTES), shutil.disk_usage(folder).free
    if needed > free:
        raise HuddError(f"{folder}: the heatmaps of {rows:,} error images x {len(shapes)} layers need "
                        f"{_size(needed)} and the disk has {_size(free)} free; free some space, keep fewer "
                        "layers (the `layers` setting) or store them as `heatmap_dtype` float16 (half the size)")


def _size(count: int) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 1e9 else f"{count / 1e6:.0f} MB"


class LayerWriters:
    """One NpyRowWriter per layer, in the stored dtype."""

    def __init__(self, folder: Path, rows: int, shapes: dict[str, tuple[int, ...]], dtype: str):
        self.dtype = dtype
        self.writers = {name: NpyRowWriter(folder / f"{name}.npy", rows, shape, STORAGE[dtype])
                        for name, shape in shapes.items()}

    def write(self, blocks: dict[str, np.ndarray], first_row: int) -> None:
        for name, block in blocks.items():
            self.writers[name].write(to_storage(block, self.dtype, name), first_row)
        for writer in self.writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


class ErrorExplainer:
    """The LRP explainer of the error images, set up on the first error image: the layers, their shapes
    and the output shape a keypoint target mask needs."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.layers: list[tuple[str, str]] = []

    def setup(self, example: torch.Tensor, channels: torch.Tensor) -> dict[str, tuple[int, ...]]:
        ctx, model = self.ctx, self.ctx.model()
        self.layers = selected_layers(model, ctx, example)
        self.output_shape = ctx.task.output_shape(model, example)
        try:  # the engine names an operation it has no rule for when it meets it: here, on one image
            self.explainer = LRPExplainer(model, rules=ctx.settings.rules, layers=[p for _n, p in self.layers[1:]])
            probe = self(example, channels)
        except NoRuleError as error:
            raise HuddError(f"architecture {ctx.settings.arch!r} cannot be explained: {error.reason}. HUDD's LRP covers "
                            "convolutional networks (ResNet, VGG, DenseNet, MobileNet, EfficientNet, ConvNeXt, ...), "
                            "not attention or recurrent layers") from error
        return {name: tuple(block.shape[1:]) for name, block in probe.items()}

    def __call__(self, inputs: torch.Tensor, channels: torch.Tensor) -> dict[str, np.ndarray]:
        target = self.ctx.task.lrp_target(channels, self.output_shape, self.ctx.device)
        relevance = self.explainer(inputs, target=target)
        return {name: relevance[path].float().cpu().numpy() for name, path in self.layers}


def compute_heatmaps(ctx: RunContext, index: pd.DataFrame, folder: Path, step_print: str) -> dict:
    """Streams relevance to the per-layer files: this rank's shard, skipping the batches an interrupted
    run with the same inputs left on disk. Returns each layer's module path and row shape."""
    channels = ctx.task.explained_channels(index, ctx.classes)
    image_set = ImageSet(name="error images", root=ctx.paths.set_dir("test"),
                         paths=[ctx.paths.root / p for p in index["image"]], labels=[0] * len(index),
                         classes=ctx.classes)
    progress = Progress(folder, step_print)
    explain = ErrorExplainer(ctx)
    first, _label, _row, error = ImageDataset(image_set, ctx.settings)[0]
    stop_on_unreadable(image_set, [(0, error)] if error else [])
    shapes = explain.setup(first[None].to(ctx.device), channels[:1])  # the layers and their shapes
    check_disk_space(folder, len(index) - progress.rows_done(), shapes, ctx.settings.heatmap_dtype)
    start, stop = distributed.batch_shard(len(index), ctx.settings.batch_size)
    pending = progress.pending(start, stop, ctx.settings.batch_size)
    writers = LayerWriters(folder, len(index), shapes, ctx.settings.heatmap_dtype)
    loader = make_loader(image_set, ctx.settings, ctx.settings.batch_size, ctx.settings.workers, batches=pending)
    view = overlay_view(ctx.settings)
    try:
        for inputs, _labels, rows, failures in tqdm(loader, desc="heatmaps", unit="batch", leave=False,
                                                    disable=distributed.progress_off()):
            stop_on_unreadable(image_set, failures)
            blocks = explain(inputs.to(ctx.device), channels[rows])
            writers.write(blocks, int(rows[0]))
            write_overlays(ctx.paths, [image_set.paths[int(r)] for r in rows], blocks[INPUT_LAYER], int(rows[0]), view)
            progress.save(int(rows[0]), int(rows[-1]) + 1)
    finally:
        writers.close()
    return {name: (path, shapes[name]) for name, path in explain.layers}


def publish_heatmaps(folder: Path, layers: dict, index: pd.DataFrame, progress: Progress) -> None:
    """Rank 0, once every rank is done: the files under their real names, then layers.csv and index.csv."""
    if progress.rows_done() != len(index):
        raise RuntimeError(f"{folder}: {progress.rows_done()} of {len(index)} heatmap rows written")
    for name in layers:
        os.replace(partial_file(folder / f"{name}.npy"), folder / f"{name}.npy")
    write_csv(pd.DataFrame([(name, path, "x".join(map(str, shape))) for name, (path, shape) in layers.items()],
                           columns=["layer", "module", "shape"]), folder / LAYERS_FILE)
    write_csv(index, folder / INDEX_FILE)
    progress.clear()


class HeatmapStep(Step):
    name, title = "heatmaps", "heatmap step"
    every_rank = True
    version = 3     # 2: the overlays drawn here; 3: of the part of the image the model sees, at its aspect

    def inputs(self, ctx: RunContext) -> dict:
        index = error_index(ctx)
        if index.empty:
            raise PipelineStop("no error-inducing test images: the model gets every test image right, so there is "
                               "nothing to explain; the pipeline stops after the test step")
        s = ctx.settings
        return {**ctx.model_fingerprint_part(), "errors": hashlib.sha256(index.to_csv(index=False).encode()).hexdigest(),
                "rules": s.rules, "layers": s.layers, "explain": s.explain, "heatmap_dtype": s.heatmap_dtype}

    def outputs(self, ctx: RunContext) -> list[Path]:
        layers = read_layers(ctx.paths)
        return ([layer_file(ctx.paths, name) for name in layers["layer"]]
                + [heatmaps_dir(ctx.paths) / INDEX_FILE, heatmaps_dir(ctx.paths) / LAYERS_FILE, overlay_dir(ctx.paths)])

    def compute(self, ctx: RunContext) -> None:
        """Every rank explains its shard (compute_heatmaps); rank 0 then publishes the files."""
        index, folder, step_print = error_index(ctx), heatmaps_dir(ctx.paths), self.fingerprint(ctx)
        progress = Progress(folder, step_print)

        def prepare() -> None:  # rank 0, before any rank opens a file: resume, or start from nothing
            folder.mkdir(parents=True, exist_ok=True)
            if ctx.force or not progress.rows_done():
                progress.start_fresh()
            overlay_dir(ctx.paths).mkdir(exist_ok=True)

        distributed.on_main(prepare)
        layers = distributed.together(lambda: compute_heatmaps(ctx, index, folder, step_print))
        if distributed.is_main():
            publish_heatmaps(folder, layers, index, progress)

    def summary(self, ctx: RunContext) -> dict:
        layers = read_layers(ctx.paths)
        size = sum(layer_file(ctx.paths, name).stat().st_size for name in layers["layer"])
        return {"images": len(read_index(ctx.paths)), "layers": len(layers), "folder": heatmaps_dir(ctx.paths),
                "megabytes": size / 1e6}


STEP = HeatmapStep()
