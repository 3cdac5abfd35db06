"""The heatmap step: files read back, rows match index.csv, reruns skip, changes recompute, resume."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import Helper
import heatmapModule
import testModule
from architectures import DemoNet
from helpers import build_case, context, hudd, run_step


def run_both(case, **overrides):
    ctx = context(case, **overrides)
    run_step(testModule.STEP, ctx)
    return ctx, run_step(heatmapModule.STEP, ctx)


def test_heatmap_files_read_back_and_match_the_engine(make_case):
    case = make_case(per_class=4)
    ctx, summary = run_both(case)
    folder = case / "T" / "Heatmaps"
    results = pd.read_csv(case / "testResult.csv")
    wrong = results[results["result"] == "Wrong"].reset_index(drop=True)
    index = pd.read_csv(folder / "index.csv")
    assert len(wrong) > 2
    pd.testing.assert_frame_equal(index, wrong[["image", "expected", "predicted"]])
    layers = pd.read_csv(folder / "layers.csv")
    assert layers["layer"].iloc[0] == "Layer0" and layers["module"].iloc[0] == "input"
    assert list(layers["layer"]) == [f"Layer{k}" for k in range(len(layers))]
    assert summary["images"] == len(wrong) and summary["layers"] == len(layers)

    # The engine on the same images, one at a time, outside the step's batching and files.
    model = ctx.model()
    transform = Helper.make_transform(ctx.settings)
    from PIL import Image
    inputs = torch.stack([transform(Image.open(case / p).convert("RGB")) for p in index["image"]])
    targets = torch.tensor([ctx.classes.index(c) for c in index["predicted"]])
    for row in layers.itertuples():
        stored = np.load(folder / f"{row.layer}.npy")
        assert stored.dtype == np.float32
        assert stored.shape == (len(index), *map(int, row.shape.split("x")))
        for i in (0, len(index) - 1):
            direct = heatmapModule.relevance(model, inputs[i:i + 1], target=int(targets[i]), rules="hudd",
                                             layers=[m for m in layers["module"][1:]])
            np.testing.assert_allclose(stored[i], direct[row.module][0].numpy(), rtol=1e-4, atol=1e-6)
    # One overlay per row: on the left the image itself, resized to the tile.
    assert sorted(p.name for p in (folder / "overlays").iterdir()) == sorted(f"{i}.png" for i in range(len(index)))
    tile = heatmapModule.OVERLAY_TILE
    for i in (0, len(index) - 1):
        overlay = Image.open(folder / "overlays" / f"{i}.png")
        assert overlay.size == (2 * tile + 2, tile)
        picture = Image.open(case / index["image"][i]).convert("RGB").resize((tile, tile), Image.BILINEAR)
        assert np.array_equal(np.asarray(overlay)[:, :tile], np.asarray(picture))


@pytest.mark.parametrize("resize", ["center-crop", "resize-crop"])
def test_a_cropping_models_overlays_show_the_crop_it_saw(make_case, resize):
    """With the center-crop setting (or resize-crop: the shorter side to 8/7 of the input, 37 pixels, then
    the centre) the relevance covers the image's centre: the overlay shows that centre, not the whole image
    squeezed under relevance of another place."""
    from PIL import Image
    from torchvision.transforms import CenterCrop, Resize
    case = make_case(per_class=4)
    rng = np.random.default_rng(5)
    for path in (case / "DataSets" / "TestSet").rglob("*.png"):   # larger than the 32 x 32 input
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    run_both(case, resize=resize)
    index = pd.read_csv(case / "T" / "Heatmaps" / "index.csv")
    tile = heatmapModule.OVERLAY_TILE
    for i in (0, len(index) - 1):
        overlay = np.asarray(Image.open(case / "T" / "Heatmaps" / "overlays" / f"{i}.png"))
        image = Image.open(case / index["image"][i]).convert("RGB")
        seen = CenterCrop((32, 32))(image if resize == "center-crop" else Resize(37)(image))
        assert np.array_equal(overlay[:, :tile], np.asarray(seen.resize((tile, tile), Image.BILINEAR)))


def test_an_overlay_keeps_the_model_inputs_aspect_and_puts_relevance_where_it_is():
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    image[:, 32:] = 255                                    # the right half white
    relevance = np.zeros((3, 24, 32))
    relevance[:, 6, 24] = 1.0                               # one relevant pixel, in the right half, a quarter down
    from PIL import Image
    import tempfile, os
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "wide.png")
        Image.fromarray(image).save(path)
        overlay = np.asarray(heatmapModule.overlay_tile(path, relevance, tile=96))
    assert heatmapModule.overlay_size(24, 32, tile=96) == (96, 72)
    assert overlay.shape == (72, 2 * 96 + 2, 3)
    assert (overlay[:, :40] == 0).all() and (overlay[:, 56:96] == 255).all()     # the picture, whole, not squeezed
    blended = overlay[:, 98:].astype(int)
    changed = np.argwhere(np.abs(blended - blended[0, 0]).sum(axis=2) > 0)  # grey everywhere but the relevant pixel
    coloured = changed[(blended[changed[:, 0], changed[:, 1]].std(axis=1) > 10)]
    assert len(coloured) and (coloured[:, 0] // 3 == 6).all() and (coloured[:, 1] // 3 == 24).all()


def test_heatmaps_that_do_not_fit_on_the_disk_stop_the_step_before_writing(make_case, monkeypatch):
    import collections
    import shutil
    case = make_case(per_class=4)
    ctx = context(case)
    run_step(testModule.STEP, ctx)
    errors = len(testModule.error_index(ctx))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: collections.namedtuple("usage", "total used free")(
        *real(path)[:2], 1000))                              # 1 kB free
    with pytest.raises(Helper.HuddError, match=rf"the heatmaps of {errors:,} error images x \d+ layers need "
                                               r"\d+ MB and the disk has 0 MB free; .* `heatmap_dtype` float16"):
        run_step(heatmapModule.STEP, context(case))
    assert not list((case / "T" / "Heatmaps").glob("*.npy")) and not list((case / "T" / "Heatmaps").glob(".*.partial"))
    monkeypatch.setattr(shutil, "disk_usage", real)
    run_step(heatmapModule.STEP, context(case))              # with the space there, the step runs
    assert (case / "T" / "Heatmaps" / "Layer0.npy").is_file()


def test_rerun_skips_and_a_changed_model_recomputes(make_case):
    case = make_case(per_class=3)
    run_both(case)
    folder = case / "T" / "Heatmaps"
    first = np.load(folder / "Layer1.npy")
    ctx = context(case)
    assert ctx.manifest.is_current(heatmapModule.STEP.name, heatmapModule.STEP.fingerprint(ctx))
    torch.manual_seed(123)
    torch.save(DemoNet(num_classes=3).state_dict(), case / "DNNModels" / "OriginalModel.pth")
    ctx = context(case)
    run_step(testModule.STEP, ctx)
    index = testModule.error_index(ctx)
    assert not ctx.manifest.is_current(heatmapModule.STEP.name, heatmapModule.STEP.fingerprint(ctx))
    run_step(heatmapModule.STEP, ctx)
    second = np.load(folder / "Layer1.npy")
    assert second.shape[0] == len(index)
    assert first.shape != second.shape or not np.allclose(first, second)


def test_an_interrupted_run_resumes_and_matches_a_clean_run(make_case, monkeypatch):
    case = make_case(per_class=4, settings=None)
    clean_ctx, _ = run_both(case, batch_size=2)
    clean = {p.name: np.load(p) for p in (case / "T" / "Heatmaps").glob("*.npy")}
    clean_overlays = {p.name: p.read_bytes() for p in (case / "T" / "Heatmaps" / "overlays").iterdir()}
    import shutil
    shutil.rmtree(case / "T")
    (case / "hudd_manifest.json").unlink()

    calls = {"n": 0}
    original_call = heatmapModule.LRPExplainer.__call__

    def failing_call(self, inputs, target=None):
        calls["n"] += 1
        if calls["n"] == 4:  # the probe, then two batches, then "power cut"
            raise KeyboardInterrupt
        return original_call(self, inputs, target=target)

    monkeypatch.setattr(heatmapModule.LRPExplainer, "__call__", failing_call)
    ctx = context(case, batch_size=2)
    run_step(testModule.STEP, ctx)
    with pytest.raises(KeyboardInterrupt):
        run_step(heatmapModule.STEP, ctx)
    folder = case / "T" / "Heatmaps"
    assert not list(folder.glob("*.npy"))  # no half file under a real name
    progress = heatmapModule.Progress(folder, heatmapModule.STEP.fingerprint(ctx))
    assert progress.rows_done() == 4

    seen_rows = []
    def counting_call(self, inputs, target=None):
        seen_rows.append(len(inputs))
        return original_call(self, inputs, target=target)
    monkeypatch.setattr(heatmapModule.LRPExplainer, "__call__", counting_call)
    run_step(heatmapModule.STEP, context(case, batch_size=2))
    errors = len(pd.read_csv(folder / "index.csv"))
    assert sum(seen_rows) == 1 + errors - 4  # the probe image plus only the rows not yet on disk
    for name, array in clean.items():
        np.testing.assert_array_equal(np.load(folder / name), array)
    assert {p.name: p.read_bytes() for p in (folder / "overlays").iterdir()} == clean_overlays
    assert not list(folder.glob(".progress*"))


def test_no_error_images_stops_cleanly(tmp_path):
    case = build_case(tmp_path / "case", per_class=2)
    # A model that always says the test image's own class: a constant-logit net can't, so relabel
    # the test set to what the model predicts.
    ctx = context(case)
    run_step(testModule.STEP, ctx)
    results = pd.read_csv(case / "testResult.csv")
    for row in results.itertuples():
        source = case / row.image
        target = case / "DataSets" / "TestSet" / row.predicted / source.name
        target.parent.mkdir(exist_ok=True)
        if source != target:
            source.rename(target)
    result = hudd("-o", str(case))
    assert result.returncode == 0, result.stderr
    assert "no error-inducing test images" in result.stdout
    assert not (case / "T" / "Heatmaps").exists()


def bfloat16_rounded(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 -> float32 by hand: round the upper 16 bits to nearest, ties to even."""
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    upper = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return (upper.astype(np.uint32) << 16).view(np.float32)


def test_half_precision_heatmaps_hold_the_rounded_relevance_in_half_the_bytes(make_case):
    case = make_case(per_class=4)
    ctx, _ = run_both(case)
    folder = case / "T" / "Heatmaps"
    full = {p.stem: np.load(p) for p in folder.glob("*.npy")}
    full_bytes = sum(p.stat().st_size for p in folder.glob("*.npy"))
    for dtype in ("float16", "bfloat16"):
        ctx = context(case, heatmap_dtype=dtype)
        assert not ctx.manifest.is_current(heatmapModule.STEP.name, heatmapModule.STEP.fingerprint(ctx))
        run_step(heatmapModule.STEP, ctx)
        assert sum(p.stat().st_size for p in folder.glob("*.npy")) < 0.51 * full_bytes
        for name, values in full.items():
            stored = np.load(folder / f"{name}.npy")
            read = heatmapModule.open_layer(ctx.paths, name)
            if dtype == "float16":
                assert stored.dtype == np.float16
                np.testing.assert_array_equal(stored, values.astype(np.float16))
            else:
                assert stored.dtype == np.uint16 and read.dtype == np.float32 and read.shape == values.shape
                np.testing.assert_array_equal(np.asarray(read), bfloat16_rounded(values))
                np.testing.assert_array_equal(read[1:3], bfloat16_rounded(values[1:3]))
                assert read.reshape(len(read), -1)[0].shape == (values[0].size,)


def test_float16_refuses_relevance_beyond_its_range():
    with pytest.raises(Helper.HuddError, match="bfloat16"):
        heatmapModule.to_storage(np.array([[1.0, -7e4]], dtype=np.float32), "float16", "Layer3")
    assert heatmapModule.to_storage(np.array([[1.0, -7e4]], dtype=np.float32), "bfloat16", "Layer3").dtype == np.uint16
