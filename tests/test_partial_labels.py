"""HUDD's promise for an unlabelled improvement set: only the unsafe set needs labels. The assignment
step lists it in T/UnsafeSet/to_label.csv; the engineer fills it in as DataSets/ImprovementLabels.csv;
retraining then trains on exactly those labels, and asks, by a list, for any it lacks."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import Helper
import retrainModule
from helpers import CLASSES, SETTINGS, assert_clean_error, build_case, context, hudd
from test_keypoint_pipeline import build_keypoint_case

pytestmark = pytest.mark.xdist_group("test_partial_labels")  # its module-scoped fixture is built once (conftest.py)

RUN = ("--runs", "2")


def true_class(image: str) -> str:
    """The class an unlabelled test image was drawn for: its file name starts with the class index."""
    return CLASSES[int(Path(image).name.split("_")[0])]


@pytest.fixture(scope="module")
def unlabelled_case(tmp_path_factory) -> Path:
    """A case whose improvement images lie loose in ImprovementSet/, run up to the unsafe set."""
    case = build_case(tmp_path_factory.mktemp("partial") / "case", improvement="unlabelled", per_class=8,
                      settings={**SETTINGS, "epochs": 2, "learning_rate": 0.05})
    result = hudd("-o", str(case))
    assert result.returncode == 0, result.stderr
    assert "to_label.csv" in result.stdout and "ImprovementLabels.csv" in result.stdout
    return case


def fill(table: pd.DataFrame) -> pd.DataFrame:
    return table.assign(label=[true_class(image) for image in table["image"]])


def test_the_unsafe_set_is_listed_for_labelling(unlabelled_case):
    to_label = pd.read_csv(unlabelled_case / "T" / "UnsafeSet" / "to_label.csv", keep_default_na=False)
    assignments = pd.read_csv(unlabelled_case / "T" / "UnsafeSet" / "assignments.csv")
    assert list(to_label.columns) == ["image", "rcc", "label"]
    assert list(to_label["image"]) == list(assignments["image"]) and list(to_label["rcc"]) == list(assignments["rcc"])
    assert (to_label["label"] == "").all()
    assert all((unlabelled_case / image).is_file() for image in to_label["image"])
    report = (unlabelled_case / "T" / "report.html").read_text()
    assert "href='UnsafeSet/to_label.csv'" in report and "DataSets/ImprovementLabels.csv" in report


def test_retraining_asks_for_the_missing_labels_then_trains_on_the_given_ones(unlabelled_case):
    case, labels_file = unlabelled_case, unlabelled_case / "DataSets" / "ImprovementLabels.csv"
    unsafe = pd.read_csv(case / "T" / "UnsafeSet" / "to_label.csv")
    missing_list = case / "T" / "Retrain" / "HUDD_to_label.csv"

    # No labels yet: one clear line, the list to fill, no model written.
    assert_clean_error(hudd("-o", str(case), "-mode", "HUDD", *RUN), f"{len(unsafe)} of them have no label",
                       "HUDD_to_label.csv", "ImprovementLabels.csv")
    assert sorted(pd.read_csv(missing_list)["image"]) == sorted(unsafe["image"])
    assert sorted(p.name for p in (case / "DNNModels").iterdir()) == ["OriginalModel.pth"]
    # BL2 stops alike, with its own list (random images, drawn without labels).
    assert_clean_error(hudd("-o", str(case), "-mode", "BL2", *RUN), "have no label", "BL2_to_label.csv")
    bl2_list = case / "T" / "Retrain" / "BL2_to_label.csv"
    bl2_images = set(pd.read_csv(bl2_list)["image"])

    # Half of them labelled (the rest left empty, as a half-filled to_label.csv is): the list holds the rest.
    half = len(unsafe) // 2
    partly = fill(unsafe)
    partly.loc[half:, "label"] = ""
    partly.to_csv(labels_file, index=False)
    assert_clean_error(hudd("-o", str(case), "-mode", "HUDD", *RUN), f"{len(unsafe) - half} of them have no label",
                       "add the filled rows")
    assert sorted(pd.read_csv(missing_list)["image"]) == sorted(unsafe["image"].iloc[half:])

    # All labelled: HUDD retrains with exactly the unsafe set, and BL1 (which needs every label) is refused.
    fill(unsafe).to_csv(labels_file, index=False)
    result = hudd("-o", str(case), "-mode", "HUDD", *RUN)
    assert result.returncode == 0, result.stderr
    assert not missing_list.exists()
    # BL2's list, left by its stopped run, now asks only for what is still unlabelled (none: removed).
    still_missing = bl2_images - set(unsafe["image"])
    assert set(pd.read_csv(bl2_list)["image"]) == still_missing if still_missing else not bl2_list.exists()
    runs = pd.read_csv(case / "T" / "Retrain" / "HUDD_runs.csv")
    assert (runs["labelled"] == len(unsafe)).all() and (runs["labels_needed"] == len(unsafe)).all()
    results = pd.read_csv(case / "improveResult.csv").set_index("image").loc[unsafe["image"]]
    misclassified = sum(p != true_class(i) for i, p in zip(results.index, results["predicted"]))
    assert (runs["labelled_misclassified"] == misclassified).all()
    refused = hudd("-o", str(case), "-mode", "BL1", *RUN)
    assert_clean_error(refused, "BL1", "every improvement image labelled", f"{len(unsafe)} of 24")
    # ... and says only that: no warning about a pool drawn from the few labelled images first
    assert misclassified < len(unsafe) and "to draw from" not in refused.stderr + refused.stdout, refused.stderr

    # The file saved again by a spreadsheet (';', CRLF, a byte-order mark) with a row for an image that no
    # run trains on: the labels HUDD trains on are the same, so nothing retrains.
    others = [p.relative_to(case).as_posix() for p in sorted((case / "DataSets" / "ImprovementSet").glob("*.png"))
              if p.relative_to(case).as_posix() not in set(unsafe["image"])]
    resaved = fill(pd.concat([unsafe, pd.DataFrame({"image": others[:1], "rcc": [""]})]))
    labels_file.write_bytes(b"\xef\xbb\xbf" + resaved.to_csv(index=False, sep=";", lineterminator="\r\n").encode())
    same = hudd("-o", str(case), "-mode", "HUDD", *RUN)
    assert same.returncode == 0 and "retraining HUDD: inputs unchanged" in same.stdout, same.stderr
    fill(unsafe).to_csv(labels_file, index=False)

    # What training reads is the file's labels, and a changed label retrains (and reassigns nothing).
    ctx = context(case)
    unsafe_inputs = retrainModule.unsafe_inputs(ctx)
    data = retrainModule.training_data(ctx)
    chosen = np.flatnonzero(unsafe_inputs.assigned >= 0)
    images = [ctx.paths.relative(p) for p in ctx.sets()["improve"].paths]
    assert [ctx.classes[int(data.improve.labels[i])] for i in chosen] == [true_class(images[i]) for i in chosen]
    assert sorted(np.flatnonzero(unsafe_inputs.labelled)) == sorted(chosen)
    changed = fill(unsafe)
    changed.loc[0, "label"] = next(c for c in CLASSES if c != changed.loc[0, "label"])
    changed.to_csv(labels_file, index=False)
    rerun = hudd("-o", str(case), "-mode", "HUDD", *RUN)
    assert rerun.returncode == 0, rerun.stderr
    assert "assignment step: inputs unchanged" in rerun.stdout
    assert "retraining HUDD: inputs unchanged" not in rerun.stdout


def test_every_mode_s_missing_labels_are_asked_for_at_once_before_any_mode_retrains(unlabelled_case, tmp_path):
    """-mode HUDD BL2 BL3 with only HUDD's unsafe set labelled: the run stops before the first model with
    BL2's and BL3's lists (one round of labelling, not one per mode after the modes before it trained);
    their filled rows, added together (an image both lists hold, added twice, is one label), retrain all
    three. BL1 without every label is refused before HUDD trains too."""
    case = tmp_path / "case"
    # without what an earlier test retrained: HUDD has a model to train here
    shutil.copytree(unlabelled_case, case, ignore=shutil.ignore_patterns("Retrain", "HUDD_*.pth", "BL*.pth"))
    labels_file, retrain = case / "DataSets" / "ImprovementLabels.csv", case / "T" / "Retrain"
    unsafe = fill(pd.read_csv(case / "T" / "UnsafeSet" / "to_label.csv"))
    unsafe.to_csv(labels_file, index=False)
    models = sorted(p.name for p in (case / "DNNModels").iterdir())

    assert_clean_error(hudd("-o", str(case), "-mode", "HUDD", "BL1", *RUN), "BL1", "every improvement image labelled")
    stopped = hudd("-o", str(case), "-mode", "HUDD", "BL2", "BL3", *RUN)
    assert_clean_error(stopped, "BL2 and BL3 train on improvement images without a label", "T/Retrain/BL2_to_label.csv",
                       "T/Retrain/BL3_to_label.csv", "add the filled rows to DataSets/ImprovementLabels.csv",
                       "nothing was retrained", "-mode HUDD runs now")
    assert sorted(p.name for p in (case / "DNNModels").iterdir()) == models
    assert not (retrain / "HUDD_runs.csv").exists()
    # Each list: the images the mode's runs draw (label-free, so computed here as the step draws them) that
    # have no label yet; the counts in the message are theirs.
    ctx = context(case)
    unsafe_inputs = retrainModule.unsafe_inputs(ctx)
    images = np.array([ctx.paths.relative(p) for p in ctx.sets()["improve"].paths])
    lists = {}
    for mode in ("BL2", "BL3"):
        drawn = np.unique(np.concatenate([retrainModule.run_selection(ctx, mode, run, unsafe_inputs).chosen
                                          for run in (1, 2)]))
        expected = sorted(set(images[drawn]) - set(unsafe["image"]))
        lists[mode] = pd.read_csv(retrain / f"{mode}_to_label.csv")
        assert sorted(lists[mode]["image"]) == expected and expected
        assert f"{mode}: {len(expected)} of {len(drawn)}" in stopped.stderr

    # Both lists filled and added, and a line of HUDD's repeated as it was: one label each.
    pd.concat([unsafe, fill(lists["BL2"]), fill(lists["BL3"]), unsafe.iloc[:1]]).to_csv(labels_file, index=False)
    result = hudd("-o", str(case), "-mode", "HUDD", "BL2", "BL3", *RUN)
    assert result.returncode == 0, result.stderr
    for mode in ("HUDD", "BL2", "BL3"):
        assert len(pd.read_csv(retrain / f"{mode}_runs.csv")) == 2
        assert not (retrain / f"{mode}_to_label.csv").exists()


@pytest.mark.parametrize("edit, fragments", [
    (lambda t: t.assign(label=t["label"].where(t.index != 0, "lorry")), ("'lorry'", "not a class", "class_a")),
    (lambda t: t.assign(image=t["image"].where(t.index != 0, "DataSets/ImprovementSet/nobody.png")),
     ("nobody.png", "not an image of", "relative to the case")),
    (lambda t: pd.concat([t, t.iloc[:1].assign(label=next(c for c in CLASSES if c != t["label"].iloc[0]))]),
     ("more than one line with different labels", "keep one line per image")),
    (lambda t: t.drop(columns="label"), ("no column 'label'", "to_label.csv")),
])
def test_a_wrong_label_file_is_one_clear_error(unlabelled_case, tmp_path, edit, fragments):
    case = tmp_path / "case"
    shutil.copytree(unlabelled_case, case)
    labels_file = case / "DataSets" / "ImprovementLabels.csv"
    edit(fill(pd.read_csv(case / "T" / "UnsafeSet" / "to_label.csv"))).to_csv(labels_file, index=False)
    before = labels_file.read_bytes()
    assert_clean_error(hudd("-o", str(case), "-mode", "HUDD", *RUN), str(labels_file), *fragments)
    assert labels_file.read_bytes() == before


def test_labels_saved_as_a_workbook_are_named_with_what_to_do(unlabelled_case, tmp_path):
    """A spreadsheet's "Save As" offers its own format first. Saved as ImprovementLabels.xlsx, the labels
    read as none ("have no label ... save it as DataSets/ImprovementLabels.csv"); a workbook renamed .csv
    read as "not UTF-8 text". Each now names the file and says to save it as CSV."""
    case = tmp_path / "case"
    shutil.copytree(unlabelled_case, case)
    (case / "DataSets" / "ImprovementLabels.csv").unlink(missing_ok=True)   # an earlier test may have left one
    models = sorted(p.name for p in (case / "DNNModels").iterdir())
    workbook = case / "DataSets" / "ImprovementLabels.xlsx"
    fill(pd.read_csv(case / "T" / "UnsafeSet" / "to_label.csv")).to_excel(workbook, index=False)
    assert_clean_error(hudd("-o", str(case), "-mode", "HUDD", *RUN), str(workbook), "from ImprovementLabels.csv",
                       "save them as CSV (UTF-8) under that name")
    renamed = workbook.rename(case / "DataSets" / "ImprovementLabels.csv")
    assert_clean_error(hudd("-o", str(case), "-mode", "HUDD", *RUN), str(renamed), "is a spreadsheet workbook",
                       "save it as CSV (UTF-8) under this name")
    assert sorted(p.name for p in (case / "DNNModels").iterdir()) == models   # no model retrained


def test_keypoints_labelled_for_the_unsafe_set_only_retrain_as_if_all_were_labelled(tmp_path):
    """Twin cases with the same images: one with every improvement image labelled, one with labels for
    its unsafe set alone. The unsafe set is chosen without labels, so both retrain the same model. (Ten
    images: both sets list them in the same order, face 0 to face 9, so the runs draw the same bags.)"""
    settings = ("--runs", "1")
    full = build_keypoint_case(tmp_path / "full", images=10)
    part = build_keypoint_case(tmp_path / "part", images=10, unlabelled_improvement=True)
    for case in (full, part):
        # half the usual budget: an unsafe set of fewer than the ten images, so that some stay unlabelled
        (case / "hudd.json").write_text((case / "hudd.json").read_text().replace(
            '"batch_size": 4', '"batch_size": 4, "epochs": 2, "budget_factor": 0.5'))
    assert hudd("-o", str(part)).returncode == 0
    to_label = pd.read_csv(part / "T" / "UnsafeSet" / "to_label.csv")
    truth = pd.read_csv(full / "DataSets" / "ImprovementSet" / "labels.csv")
    truth["image"] = "DataSets/ImprovementSet/" + truth["image"]
    assert [c for c in to_label.columns if c not in ("image", "rcc")] == list(truth.columns[1:])
    labelled = to_label[["image", "rcc"]].merge(truth, on="image")
    labelled.to_csv(part / "DataSets" / "ImprovementLabels.csv", index=False)
    results = {}
    for name, case in (("full", full), ("part", part)):
        outcome = hudd("-o", str(case), "-mode", "HUDD", *settings)
        assert outcome.returncode == 0, outcome.stderr
        results[name] = pd.read_csv(case / "T" / "Retrain" / "HUDD_runs.csv")
    assert list(pd.read_csv(full / "T" / "UnsafeSet" / "assignments.csv")["image"]) == list(to_label["image"])
    columns = ["accuracy", "improved", "worsened", "labelled", "bag", "labelled_misclassified", "mean_error"]
    pd.testing.assert_frame_equal(results["full"][columns], results["part"][columns])
    assert results["part"]["labels_needed"].iloc[0] == len(to_label) < 10


def test_partial_keypoint_rows_are_refused_and_empty_rows_label_nothing(tmp_path):
    case = build_keypoint_case(tmp_path / "case", images=4, unlabelled_improvement=True)
    task = Helper.task_class("keypoints")()
    improve = task.list_set(case / "DataSets" / "ImprovementSet", "ImprovementSet", [f"kp{k}" for k in range(4)])
    columns = task.label_columns(improve.classes)
    table = pd.DataFrame({"image": [f"DataSets/ImprovementSet/face {i}.png" for i in range(2)]})
    for number, column in enumerate(columns):
        table[column] = [float(number), np.nan]
    label_file = tmp_path / "labels.csv"
    table.to_csv(label_file, index=False)
    labelled_set, labelled = Helper.with_partial_labels(improve, label_file, task, case)
    assert labelled.tolist() == [True, False, False, False]
    np.testing.assert_array_equal(labelled_set.targets[0].ravel(), np.arange(len(columns), dtype=float))
    assert np.isnan(labelled_set.targets[1:]).all()
    table.loc[1, columns[0]] = 3.0
    table.to_csv(label_file, index=False)
    with pytest.raises(Helper.HuddError, match="face 1.png.*empty or non-numeric"):
        Helper.with_partial_labels(improve, label_file, task, case)


def spreadsheet_variants(table: pd.DataFrame, set_folder: str) -> dict[str, bytes]:
    """The same labels as people's tools save them."""
    plain = table.to_csv(index=False)
    renamed = table.rename(columns={"image": " Image ", "label": "LABEL "})
    relative_to_set = table.assign(image=[i.removeprefix(set_folder + "/") for i in table["image"]])
    return {
        "semicolons, CRLF, BOM": b"\xef\xbb\xbf" + table.to_csv(index=False, sep=";", lineterminator="\r\n").encode(),
        "tabs": table.to_csv(index=False, sep="\t").encode(),
        "UTF-16 (Excel's Unicode text)": table.to_csv(index=False, sep="\t").encode("utf-16"),
        "headers in other case, with spaces": renamed.to_csv(index=False).encode(),
        "empty rows at the end": (plain + ",,\n\n,,\n").encode(),
        "backslashes": table.assign(image=table["image"].str.replace("/", "\\")).to_csv(index=False).encode(),
        "./ prefix": table.assign(image="./" + table["image"]).to_csv(index=False).encode(),
        "relative to the set folder": relative_to_set.to_csv(index=False).encode(),
    }


def test_label_files_saved_by_spreadsheets_give_the_same_labels(unlabelled_case, tmp_path):
    ctx = context(unlabelled_case)
    improve = ctx.sets()["improve"]
    table = fill(pd.read_csv(unlabelled_case / "T" / "UnsafeSet" / "to_label.csv"))   # image, rcc, label
    reference = tmp_path / "plain.csv"
    table.to_csv(reference, index=False)
    expected, expected_mask = Helper.with_partial_labels(improve, reference, ctx.task, unlabelled_case)
    assert expected_mask.sum() == len(table)
    for name, content in spreadsheet_variants(table, "DataSets/ImprovementSet").items():
        variant = tmp_path / "variant.csv"
        variant.write_bytes(content)
        labelled_set, mask = Helper.with_partial_labels(improve, variant, ctx.task, unlabelled_case)
        assert labelled_set.labels == expected.labels and (mask == expected_mask).all(), name


def test_a_label_for_an_image_left_out_as_unreadable_is_passed_over(unlabelled_case, tmp_path, caplog):
    ctx = context(unlabelled_case)
    improve = ctx.sets()["improve"]
    table = fill(pd.read_csv(unlabelled_case / "T" / "UnsafeSet" / "to_label.csv"))
    label_file = tmp_path / "labels.csv"
    table.to_csv(label_file, index=False)
    unreadable = table["image"].iloc[0]
    keep = [i for i, p in enumerate(improve.paths) if ctx.paths.relative(p) != unreadable]
    labelled_set, mask = Helper.with_partial_labels(improve.subset(keep), label_file, ctx.task, unlabelled_case,
                                                    left_out=[unreadable])
    assert mask.sum() == len(table) - 1 and len(labelled_set) == len(improve) - 1
    assert "left out as unreadable" in caplog.text and unreadable in caplog.text
    with pytest.raises(Helper.HuddError, match="not an image of"):   # without --skip-bad-images it is an error
        Helper.with_partial_labels(improve.subset(keep), label_file, ctx.task, unlabelled_case)


def test_keypoint_labels_outside_the_image_are_refused(tmp_path):
    case = build_keypoint_case(tmp_path / "case", images=4, unlabelled_improvement=True)
    columns = Helper.task_class("keypoints")().label_columns([f"kp{k}" for k in range(5)])
    table = pd.DataFrame({"image": ["DataSets/ImprovementSet/face 0.png", "DataSets/ImprovementSet/face 1.png"],
                          **{column: [5.0, 6.0] for column in columns}})
    labels_file = case / "DataSets" / "ImprovementLabels.csv"
    table.to_csv(labels_file, index=False)
    assert retrainModule.improvement_for_training(context(case))[1].sum() == 2   # inside: read
    table.loc[1, "kp4_y"] = 40.0   # the images are 32x32
    table.to_csv(labels_file, index=False)
    with pytest.raises(Helper.HuddError) as refused:
        retrainModule.improvement_for_training(context(case))
    assert str(labels_file) in str(refused.value)
    assert "keypoint kp4 of 'face 1.png' is at (6, 40), outside the 32x32 image" in str(refused.value)
    # scaled to 0..1 (as some data sets give landmarks): inside the image, every one in its top-left pixel
    scaled = table.assign(**{column: [5.0 / 32, 6.0 / 32] for column in columns})
    scaled.loc[0, ["kp0_x", "kp0_y"]] = 0.0   # a missing keypoint (0, 0) stays what it is
    scaled.to_csv(labels_file, index=False)
    with pytest.raises(Helper.HuddError, match=r"ImprovementLabels.csv: every keypoint lies within 0..1 \(e.g. 0.15625, "
                                               r"0.15625\).*multiply x by the image width and y by its height"):
        retrainModule.improvement_for_training(context(case))
