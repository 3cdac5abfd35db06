"""testModule: result CSVs against an independent computation, scenarios, the manifest."""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import Helper
import testModule
from architectures import DemoNet
from helpers import IMAGE_NAME, SETTINGS, context, run_step, write_image


def independent_logits(case: Path, relative_paths: list[str], classes: int, size: int | None = None) -> np.ndarray:
    """The model's outputs computed without Helper's data pipeline: PIL (+ its bilinear resize,
    which torchvision's Resize uses on PIL images), numpy normalisation, a fresh DemoNet."""
    model = DemoNet(num_classes=classes).eval()
    model.load_state_dict(torch.load(case / "DNNModels" / "OriginalModel.pth", weights_only=True))
    mean = np.array(SETTINGS["mean"], dtype=np.float32)
    std = np.array(SETTINGS["std"], dtype=np.float32)
    batch = []
    for rel in relative_paths:
        image = Image.open(case / rel).convert("RGB")
        if size is not None:
            image = image.resize((size, size), Image.BILINEAR)
        pixels = (np.asarray(image, dtype=np.float32) / 255.0 - mean) / std
        batch.append(pixels.transpose(2, 0, 1))
    with torch.no_grad():
        return model(torch.from_numpy(np.stack(batch))).numpy()


@pytest.mark.parametrize("image_size", [32, 40])
def test_result_csvs_match_an_independent_computation(make_case, image_size):
    case = make_case(per_class=3)
    if image_size != 32:  # larger images: the resize to the model's input size is part of the check
        rng = np.random.default_rng(1)
        for image in (case / "DataSets").rglob("*.png"):
            write_image(image, rng, size=image_size)
    ctx = context(case)
    run_step(testModule.STEP, ctx)
    classes = ctx.classes
    for set_key, file_name in testModule.RESULT_FILES.items():
        frame = pd.read_csv(case / file_name)
        on_disk = sorted(Path(os.path.relpath(p, case)).as_posix() for p in (case / "DataSets").rglob("*.png")
                         if Helper.SET_FOLDERS[set_key] in p.parts)
        assert sorted(frame["image"]) == on_disk
        logits = independent_logits(case, list(frame["image"]), len(classes),
                                    size=32 if image_size != 32 else None)
        scores = frame[[f"score_{c}" for c in classes]].to_numpy()
        np.testing.assert_allclose(scores, logits, rtol=1e-5, atol=1e-5)
        expected = [Path(p).parent.name for p in frame["image"]]
        predicted = [classes[i] for i in logits.argmax(axis=1)]
        assert list(frame["expected"]) == expected
        assert list(frame["predicted"]) == predicted
        assert list(frame["result"]) == ["Correct" if e == p else "Wrong" for e, p in zip(expected, predicted)]


def test_unlabelled_improvement_set_has_no_result_column(make_case):
    case = make_case(improvement="unlabelled", per_class=2)
    run_step(testModule.STEP, context(case))
    frame = pd.read_csv(case / "improveResult.csv")
    assert "result" not in frame.columns and "expected" not in frame.columns
    assert len(frame) == 6 and frame["predicted"].notna().all()


def test_scenario_accuracy_from_metadata(make_case):
    case = make_case(per_class=4)
    test_dir = case / "DataSets" / "TestSet"
    images = sorted(Path(os.path.relpath(p, test_dir)).as_posix() for p in test_dir.rglob("*.png"))
    scenarios = ["night" if i % 3 == 0 else "none" for i in range(len(images))]
    pd.DataFrame({"image": images, "scenario": scenarios}).to_csv(test_dir / "metadata.csv", index=False)
    ctx = context(case)
    summary = run_step(testModule.STEP, ctx)
    results = pd.read_csv(case / "testResult.csv")
    correct = dict(zip(results["image"], results["result"] == "Correct"))
    table = pd.read_csv(case / testModule.SCENARIO_FILE)
    assert set(table["set"]) == {"TestSet"}
    for scenario in ("night", "none"):
        members = [f"DataSets/TestSet/{img}" for img, s in zip(images, scenarios) if s == scenario]
        row = table[table["scenario"] == scenario].iloc[0]
        assert row["images"] == len(members)
        assert row["accuracy"] == pytest.approx(100.0 * np.mean([correct[m] for m in members]))
    assert summary["scenarios"] is not None


def test_metadata_saved_from_a_spreadsheet_reads_as_the_plain_csv(make_case):
    """Excel's "CSV UTF-8" writes a byte-order mark; where the comma is the decimal mark it separates with
    ';' and writes 12,5; "Unicode text" is UTF-16 with tabs. Each reads as the plain CSV, numbers as
    numbers, and a scenario or image name that looks like a number stays text."""
    case = make_case(per_class=2)
    test_dir = case / "DataSets" / "TestSet"
    images = sorted(Path(os.path.relpath(p, test_dir)).as_posix() for p in test_dir.rglob("*.png"))
    plain = pd.DataFrame({"image": images, "scenario": ["1,5" if i % 2 else "none" for i in range(len(images))],
                          "angle": [12.5 * i - 20 for i in range(len(images))],
                          "count": list(range(len(images)))})
    plain.to_csv(test_dir / "metadata.csv", index=False)
    expected = Helper.read_metadata(test_dir, case)
    assert expected["angle"].dtype == float and expected.loc[f"DataSets/TestSet/{images[3]}", "scenario"] == "1,5"
    european = "\r\n".join([" image;scenario;angle;count"] + [
        f"{image};{scenario};{str(angle).replace('.', ',')};{count}" for image, scenario, angle, count
        in plain.itertuples(index=False)]) + "\r\n"
    unicode_text = plain.to_csv(sep="\t", index=False)
    for raw in (european.encode("utf-8-sig"), unicode_text.encode("utf-16")):
        (test_dir / "metadata.csv").write_bytes(raw)
        pd.testing.assert_frame_equal(Helper.read_metadata(test_dir, case), expected)
    (test_dir / "metadata.csv").write_bytes(european.encode("utf-8-sig"))
    run_step(testModule.STEP, context(case))   # the scenarios reach the accuracy table
    table = pd.read_csv(case / testModule.SCENARIO_FILE)
    assert set(table["scenario"].astype(str)) == {"1,5", "none"}


def test_metadata_missing_an_image_is_named(make_case):
    case = make_case(per_class=2)
    pd.DataFrame({"image": ["class_a/nothing.png"], "scenario": ["none"]}).to_csv(
        case / "DataSets" / "TestSet" / "metadata.csv", index=False)
    with pytest.raises(Helper.HuddError, match="has no scenario for image [\"']DataSets/TestSet/"):  # repr's quotes
        run_step(testModule.STEP, context(case))


@pytest.mark.parametrize("images, message", [
    (["class_a/x.png", "class_a/x.png"], "image 'class_a/x.png' has more than one line"),
    (["class_a/x.png", None], "line 3 has no image path"),
])
def test_a_metadata_file_without_one_line_per_image_is_named(make_case, images, message):
    case = make_case(per_class=2)
    metadata = case / "DataSets" / "TestSet" / "metadata.csv"
    pd.DataFrame({"image": images, "scenario": ["none", "fog"]}).to_csv(metadata, index=False)
    with pytest.raises(Helper.HuddError, match=re.escape(f"{metadata}: {message}")):
        run_step(testModule.STEP, context(case))


def test_an_edited_metadata_file_recomputes_the_test_step(make_case):
    case = make_case(per_class=2)
    test_dir = case / "DataSets" / "TestSet"
    images = sorted(p.relative_to(test_dir).as_posix() for p in test_dir.rglob("*.png"))
    pd.DataFrame({"image": images, "scenario": ["none"] * len(images)}).to_csv(test_dir / "metadata.csv", index=False)
    assert run_step(testModule.STEP, context(case))["skipped"] is False
    assert run_step(testModule.STEP, context(case))["skipped"] is True
    pd.DataFrame({"image": images, "scenario": ["fog"] * len(images)}).to_csv(test_dir / "metadata.csv", index=False)
    assert run_step(testModule.STEP, context(case))["skipped"] is False


def test_rerun_skips_and_changed_inputs_recompute(make_case):
    case = make_case(per_class=2)
    assert run_step(testModule.STEP, context(case))["skipped"] is False
    assert run_step(testModule.STEP, context(case))["skipped"] is True

    # Touching the model without changing its bytes keeps the results (content fingerprint).
    model_file = case / "DNNModels" / "OriginalModel.pth"
    os.utime(model_file, (time.time() + 5, time.time() + 5))
    assert run_step(testModule.STEP, context(case))["skipped"] is True

    # New weights: recomputed, and the scores change.
    before = pd.read_csv(case / "testResult.csv")
    torch.manual_seed(99)
    torch.save(DemoNet(num_classes=3).state_dict(), model_file)
    assert run_step(testModule.STEP, context(case))["skipped"] is False
    after = pd.read_csv(case / "testResult.csv")
    assert not np.allclose(before.filter(like="score_").to_numpy(), after.filter(like="score_").to_numpy())

    # A changed option (normalisation) recomputes; so does a new image.
    settings = dict(SETTINGS, mean=[0.4, 0.4, 0.4])
    (case / "hudd.json").write_text(json.dumps(settings))
    assert run_step(testModule.STEP, context(case))["skipped"] is False
    assert run_step(testModule.STEP, context(case))["skipped"] is True
    write_image(case / "DataSets" / "TestSet" / "class_a" / "new.png", np.random.default_rng(5))
    assert run_step(testModule.STEP, context(case))["skipped"] is False
    assert len(pd.read_csv(case / "testResult.csv")) == 7

    # A deleted output recomputes; --force recomputes.
    (case / "trainResult.csv").unlink()
    assert run_step(testModule.STEP, context(case))["skipped"] is False
    forced = context(case)
    forced.force = True
    assert run_step(testModule.STEP, forced)["skipped"] is False


def test_a_file_name_that_is_not_utf8_is_named_and_stops_the_run(make_case):
    """Linux keeps a name's bytes as they are: a Latin-1 "café" from an older system is no UTF-8 text, and
    the first table written with it failed as an internal UnicodeEncodeError."""
    case = make_case(per_class=2)
    folder = os.fsencode(case / "DataSets" / "TestSet" / "class_a")
    os.rename(os.path.join(folder, os.fsencode(IMAGE_NAME.format(c=0, i=0))), os.path.join(folder, b"caf\xe9 1.png"))
    with pytest.raises(Helper.HuddError, match=r"TestSet: the name 'class_a/caf\\xe9 1.png' is not UTF-8 text .* "
                                               "rename it, e.g. with convmv -f latin1 -t utf8"):
        run_step(testModule.STEP, context(case))
    assert not (case / "testResult.csv").exists()


def test_unreadable_image_stops_or_is_skipped(make_case):
    case = make_case(per_class=2)
    bad = case / "DataSets" / "TestSet" / "class.b" / "broken file.png"
    good_bytes = (case / "DataSets" / "TestSet" / "class.b" / IMAGE_NAME.format(c=1, i=0)).read_bytes()
    bad.write_bytes(good_bytes[: len(good_bytes) // 3])  # truncated PNG
    with pytest.raises(Helper.HuddError, match="broken file.png: cannot read image"):
        run_step(testModule.STEP, context(case))
    assert not (case / "testResult.csv").exists()
    ctx = context(case)
    ctx.skip_bad_images = True
    run_step(testModule.STEP, ctx)
    frame = pd.read_csv(case / "testResult.csv")
    assert len(frame) == 6 and not frame["image"].str.contains("broken").any()
