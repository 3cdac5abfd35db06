"""HUDD.py through the real command line: layouts, option parsing, every bad-input case."""
from __future__ import annotations

import argparse
import html
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import HUDD
from architectures import DemoNet
from helpers import IMAGE_NAME, REPO, SETTINGS, assert_clean_error, hudd, run_python, save_model


def model_outputs(model: torch.nn.Module, case: Path, images) -> torch.Tensor:
    """The model's own outputs for the case's images (paths relative to it), normalised as SETTINGS says."""
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(case / image), dtype=np.float32) / 255).permute(2, 0, 1)
                          for image in images])
    with torch.no_grad():
        return model((pixels - 0.5) / 0.25)


def import_nets(case: Path):
    """The case's nets.py as a module, imported as a user's training script would, then forgotten."""
    sys.path.insert(0, str(case))
    try:
        import nets
        return nets
    finally:
        sys.path.pop(0)
        sys.modules.pop("nets", None)


def test_original_package_layout_runs(make_case):
    case = make_case(improvement="doubled", per_class=2)
    result = hudd("-o", str(case), "-m", "OriginalModel.pth")
    assert result.returncode == 0, result.stderr
    assert "TestSet" in result.stdout and "accuracy" in result.stdout
    improve = pd.read_csv(case / "improveResult.csv")
    assert improve["image"].str.startswith("DataSets/ImprovementSet/ImprovementSet/").all()
    assert len(improve) == 6
    train = pd.read_csv(case / "trainResult.csv")   # the model is untrained: the note follows its accuracy
    accuracy, chance = 100.0 * train["result"].eq("Correct").mean(), 100.0 / train["expected"].nunique()
    assert ("TrainingSet accuracy" in result.stdout) == (accuracy <= chance + 0.1 * (100 - chance))
    rerun = hudd("-o", str(case) + "/", "-m", str(case / "DNNModels" / "OriginalModel.pth"))  # trailing slash, path
    assert rerun.returncode == 0 and "inputs unchanged" in rerun.stdout


def test_class_folders_named_by_numbers_stay_names_through_every_step(make_case):
    """Digit classes ("1", "02", "10", as MNIST-like cases name them) are names, not numbers: a CSV read
    back must not turn "02" into 2, or the steps after the test step no longer find the class. The test
    set's metadata has a scenario and no numeric parameter, so the RCC cards have none to show."""
    case = make_case(per_class=4, settings={**SETTINGS, "epochs": 1})
    names = {"class_a": "1", "class.b": "02", "class c": "10"}
    for image_set in ("TrainingSet", "TestSet", "ImprovementSet"):
        for old, new in names.items():
            (case / "DataSets" / image_set / old).rename(case / "DataSets" / image_set / new)
    test_images = sorted(p.relative_to(case / "DataSets" / "TestSet").as_posix()
                         for p in (case / "DataSets" / "TestSet").rglob("*.png"))
    pd.DataFrame({"image": test_images, "scenario": ["none", "fog"] * (len(test_images) // 2)}).to_csv(
        case / "DataSets" / "TestSet" / "metadata.csv", index=False)
    result = hudd("-o", str(case), "-mode", "HUDD", "--runs", "1")
    assert result.returncode == 0, result.stderr
    written = pd.read_csv(case / "testResult.csv", dtype=str)
    wrong = written[written["result"] == "Wrong"]
    assert set(written["expected"]) == set(names.values()) and len(wrong)
    selected = pd.read_csv(case / "T" / "ClusterAnalysis" / "summary.csv").query("selected")["layer"].iloc[0]
    labels = pd.read_csv(case / "T" / "ClusterAnalysis" / selected / "rcc_labels.csv", dtype=str)
    assert sorted(labels["image"]) == sorted(wrong["image"])
    assert (labels.set_index("image")["expected"] == wrong.set_index("image")["expected"]).all()
    assert (case / "T" / "report.html").is_file() and list((case / "DNNModels").glob("HUDD_1_*.pth"))
    # the summary counts the unsafe set's sub-clusters and the top-level RCCs they lie in, as the files do
    groups = pd.read_csv(case / "T" / "UnsafeSet" / "assignments.csv", dtype=str)["rcc"]
    line = next(line for line in result.stdout.splitlines() if "unsafe set:" in line)
    tops = groups.str.split(".").str[0].nunique()
    def plural(n, noun):
        return f"{n} {noun}" + ("" if n == 1 else "s")
    subs = f"{plural(groups.nunique(), 'sub-cluster')} of " if groups.nunique() != tops else ""
    assert f"{plural(len(groups), 'improvement image')} assigned to {subs}{plural(tops, 'RCC')}" in line


def test_the_classes_setting_gives_the_models_output_order(make_case):
    """Without it, output i is the i-th class folder in sorted order ("10" before "2", as torchvision's
    ImageFolder); with it, output i is classes[i]. Checked against the model's own argmax."""
    case = make_case(per_class=3)
    for image_set in ("TrainingSet", "TestSet", "ImprovementSet"):
        for old, new in {"class_a": "1", "class.b": "2", "class c": "10"}.items():
            (case / "DataSets" / image_set / old).rename(case / "DataSets" / image_set / new)
    model = DemoNet(num_classes=3).eval()
    model.load_state_dict(torch.load(case / "DNNModels" / "OriginalModel.pth"))
    for order in (["1", "10", "2"], ["1", "2", "10"]):
        settings = {**SETTINGS, "classes": order} if order != sorted(order) else SETTINGS
        (case / "hudd.json").write_text(json.dumps(settings))
        result = hudd("-o", str(case), "--steps", "test")
        assert result.returncode == 0, result.stderr
        written = pd.read_csv(case / "testResult.csv", dtype=str)
        assert list(written["predicted"]) == [order[i] for i in model_outputs(model, case, written["image"]).argmax(1)]
        assert list(written["expected"]) == [Path(image).parent.name for image in written["image"]]
    (case / "hudd.json").write_text(json.dumps({**SETTINGS, "classes": ["1", "2", "3"]}))
    assert_clean_error(hudd("-o", str(case), "--steps", "test"), "TrainingSet", "class folder(s) '10' are not in the "
                       "setting classes (1, 2, 3)", "every class folder must be one of them")
    (case / "hudd.json").write_text(json.dumps({**SETTINGS, "classes": ["1", "1", "2"]}))
    assert_clean_error(hudd("-o", str(case), "--steps", "test"), "setting classes=", "in the order of its outputs")


def test_the_classes_setting_may_name_outputs_no_folder_holds(make_case):
    """A model of more classes than the case's folders (a 1,000-class ImageNet model looked at on a few of
    them): `classes` names every output, and the folders are some of them. The test step scores every
    output, and an image predicted as a class without a folder is wrong."""
    case = make_case(per_class=3)
    images = sorted(p.relative_to(case).as_posix() for p in (case / "DataSets" / "TestSet").rglob("*.png"))
    torch.manual_seed(2)
    model = DemoNet(num_classes=4).eval()
    logits = model_outputs(model, case, images)
    with torch.no_grad():   # about half of the images predicted as the folderless class "other"
        model.classifier[-1].bias[1] += (logits[:, [0, 2, 3]].max(1).values - logits[:, 1]).median()
    torch.save(model.state_dict(), case / "DNNModels" / "Four.pth")
    order = ["class_a", "other", "class.b", "class c"]
    (case / "hudd.json").write_text(json.dumps({**SETTINGS, "classes": order}))
    result = hudd("-o", str(case), "-m", "Four.pth", "--steps", "test")
    assert result.returncode == 0, result.stderr
    written = pd.read_csv(case / "testResult.csv", dtype=str).set_index("image").loc[images]
    assert [c for c in written.columns if c.startswith("score_")] == [f"score_{c}" for c in order]
    predicted = [order[i] for i in model_outputs(model, case, images).argmax(1)]
    assert list(written["predicted"]) == predicted and "other" in predicted and set(predicted) != {"other"}
    assert (written["result"] == np.where(written["predicted"] == written["expected"], "Correct", "Wrong")).all()


@pytest.mark.parametrize("text, value", [("True", True), ("yes", True), ("1", True), ("False", False),
                                         ("no", False), ("0", False), ("OFF", False)])
def test_yes_no_options_parse(text, value):
    args = HUDD.build_parser().parse_args(["-o", "x", "-rq", text, "--force", text])
    assert args.rq is value and args.force is value


def test_flags_alone_mean_yes_and_numbers_are_numbers():
    args = HUDD.build_parser().parse_args(["-o", "x", "--force", "--batch-size", "16", "--workers", "0"])
    assert args.force is True and args.debug is False
    assert args.batch_size == 16 and args.workers == 0
    with pytest.raises(argparse.ArgumentTypeError, match="not a yes/no value"):
        HUDD.parse_bool("maybe")


@pytest.mark.parametrize("sizes, shown", [
    ([9, 20, 14, 15], "4 RCCs (median 14.5 images)"), ([1, 3, 2], "3 RCCs (median 2 images)"),
    ([1, 1], "2 RCCs, each a single image"),
    ([10, 7, 7, 6, 6, 5, 4, 3] + [1] * 11, "19 RCCs: 8 of 2+ images (median 6) and 11 single images")])
def test_the_summary_gives_the_median_rcc_size_as_it_is_and_single_images_apart(capsys, sizes, shown):
    """An even number of RCCs whose middle two sizes differ has a median of half an image: it was rounded.
    Two or more RCCs of one image (a resnet18 case of 59 errors: 11 of 19) are counted apart: "median 1
    image" said nothing of the 8 groups a reader opens."""
    from types import SimpleNamespace
    ctx = SimpleNamespace(paths=SimpleNamespace(root=Path("case")), model_path=Path("OriginalModel.pth"))
    import clusterModule
    stats = pd.DataFrame({"rcc": [f"RCC{i + 1:02d}" for i in range(len(sizes))], "size": sizes})
    singles = clusterModule.single_image_rccs(stats)   # as the cluster step's summary counts them
    groups = stats.loc[~stats["rcc"].isin(singles), "size"]
    clusters = {"k": len(sizes), "noise": 0, "median_size": float(np.median(sizes)), "sub_k": len(sizes),
                "layer": "Layer6", "features": "heatmaps", "folder": "case/T/Layer6",
                "single_images": len(singles), "group_median_size": float(groups.median()) if len(groups) else 0.0}
    HUDD.print_summary(ctx, {"clusters": clusters}, 1.0)
    assert shown in capsys.readouterr().out


def test_bad_option_values_exit_2():
    for bad in (["--batch-size", "many"], ["-rq", "perhaps"], ["--steps", "dream"], ["-mode", "HUD"],
                ["--seed", "-1"]):
        result = hudd("-o", "x", *bad)
        assert result.returncode == 2 and "Traceback" not in result.stderr, bad


def test_help_bad_options_and_a_missing_case_answer_before_torch_loads():
    """`--help`, a mistyped option and a case folder that does not exist are answered before HUDD.py
    imports torch (seconds on a small machine); the modes its parser accepts are Helper's."""
    import Helper
    assert HUDD.MODES == Helper.RETRAIN_MODES
    probe = ("import runpy, sys; sys.argv = ['HUDD.py', *sys.argv[1:]]\n"
             "try:\n    runpy.run_path({!r}, run_name='__main__')\n"
             "finally:\n    print('torch loaded:', 'torch' in sys.modules, file=sys.stderr)").format(str(REPO / "HUDD.py"))
    for args, status, said in ((["--help"], 0, "--retrainMode"), (["-o", "x", "-mode", "HUD"], 2, "unknown mode(s) HUD"),
                               ([], 2, "give a case study with -o CASE, or --demo"),
                               (["-o", "no such case"], 2, "error: no such case: case-study directory not found")):
        result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == status and said in result.stdout + result.stderr, result.stderr
        assert "torch loaded: False" in result.stderr


def test_missing_case_directory(tmp_path):
    assert_clean_error(hudd("-o", str(tmp_path / "nowhere")), str(tmp_path / "nowhere"), "not found")


def test_missing_datasets(make_case):
    case = make_case(per_class=1)
    shutil.rmtree(case / "DataSets")
    result = hudd("-o", str(case))
    assert_clean_error(result, "DataSets", "not found")
    assert "move them" not in result.stderr


def test_sets_beside_a_missing_datasets_folder_are_pointed_at(make_case):
    case = make_case(per_class=1)
    for name in ("TrainingSet", "TestSet"):
        shutil.move(case / "DataSets" / name, case / name)
    shutil.rmtree(case / "DataSets")
    assert_clean_error(hudd("-o", str(case)), "DataSets folder not found",
                       f"(TrainingSet, TestSet lie in {case} itself: move them into DataSets/)")


def test_sets_named_as_other_projects_name_them_are_pointed_at(make_case):
    case = make_case(per_class=1)
    for name, other in (("TrainingSet", "train"), ("TestSet", "test"), ("ImprovementSet", "val")):
        (case / "DataSets" / name).rename(case / "DataSets" / other)
    assert_clean_error(hudd("-o", str(case)), "TrainingSet: image set folder not found",
                       "(DataSets holds test, train, val: HUDD reads TrainingSet, TestSet, ImprovementSet; rename them)")


def test_missing_model_lists_the_available_ones(make_case):
    case = make_case(per_class=1)
    assert_clean_error(hudd("-o", str(case), "-m", "Other.pth"), "Other.pth", "OriginalModel.pth")


def test_a_missing_model_given_as_a_path_is_named_as_given(make_case):
    """-m CASE/DNNModels/Other.pth, relative to the working folder, was named
    CASE/DNNModels/CASE/DNNModels/Other.pth: joined to DNNModels, a file nobody asked for."""
    case = make_case(per_class=1)
    given = Path(case.name) / "DNNModels" / "Other.pth"
    result = hudd("-o", case.name, "-m", str(given), cwd=case.parent)
    assert_clean_error(result, f"error: {given}: model file not found", "OriginalModel.pth")
    assert str(Path(case.name) / "DNNModels" / given) not in result.stderr


def test_empty_set(make_case):
    case = make_case(per_class=1)
    for image in (case / "DataSets" / "ImprovementSet").rglob("*.png"):
        image.unlink()
    assert_clean_error(hudd("-o", str(case)), "ImprovementSet", "no images found")


def test_images_in_a_folder_inside_a_class_folder_are_refused_not_left_out(make_case):
    case = make_case(per_class=2)
    inner = case / "DataSets" / "TestSet" / "class.b" / "more"
    inner.mkdir()
    name = IMAGE_NAME.format(c=1, i=0)
    (inner.parent / name).rename(inner / name)
    (case / "DataSets" / "TestSet" / "class_a" / ".cache").mkdir()   # hidden folders stay ignored
    assert_clean_error(hudd("-o", str(case)), str(inner), "inside class folder class.b", "move them up")
    assert not (case / "testResult.csv").exists()


def test_truncated_image_stops_naming_it_then_can_be_skipped(make_case):
    case = make_case(per_class=2)
    image = sorted((case / "DataSets" / "TrainingSet" / "class_a").glob("*.png"))[0]
    image.write_bytes(image.read_bytes()[:100])
    assert_clean_error(hudd("-o", str(case)), image.name, "cannot read image", "--skip-bad-images")
    skipped = hudd("-o", str(case), "--skip-bad-images")
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped unreadable image" in skipped.stdout
    assert len(pd.read_csv(case / "trainResult.csv")) == 5


def test_skipped_images_are_left_out_of_every_later_step_through_retraining(make_case):
    case = make_case(per_class=4, settings={**SETTINGS, "epochs": 1})
    bad = {key: sorted((case / "DataSets" / folder).rglob("*.png"))[0]
           for key, folder in (("train", "TrainingSet"), ("improve", "ImprovementSet"))}
    for image in bad.values():
        image.write_bytes(image.read_bytes()[:100])
    first = hudd("-o", str(case), "--skip-bad-images", "-mode", "HUDD", "--runs", "1")
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("left out of the later steps") == 2
    improve = [p.relative_to(case).as_posix() for p in sorted((case / "DataSets" / "ImprovementSet").rglob("*.png"))]
    readable = [p for p in improve if p != bad["improve"].relative_to(case).as_posix()]
    assert list(pd.read_csv(case / "improveResult.csv")["image"]) == readable
    assert list(pd.read_csv(case / "T" / "UnsafeSet" / "rcc_distances.csv")["image"]) == readable
    unsafe_set = set(pd.read_csv(case / "T" / "UnsafeSet" / "assignments.csv")["image"])
    assert bad["improve"].relative_to(case).as_posix() not in unsafe_set
    assert pd.read_csv(case / "T" / "Retrain" / "HUDD_runs.csv")["labelled"].iloc[0] > 0
    report = (case / "T" / "report.html").read_text()   # the report says what it does not count
    note = report[report.index("<p id=left-out>"):].split("</p>")[0]
    assert all(f"<code>{html.escape(image.relative_to(case).as_posix())}</code>" in note for image in bad.values())
    assert "TrainingSet 1:" in note and "ImprovementSet 1:" in note
    again = hudd("-o", str(case), "--skip-bad-images", "-mode", "HUDD", "--runs", "1")   # reused, left out again
    assert again.returncode == 0 and "retraining HUDD: inputs unchanged" in again.stdout, again.stderr
    assert_clean_error(hudd("-o", str(case)), "cannot read image", "--skip-bad-images")


@pytest.mark.parametrize("given, modes", [(["-mode", "HUDD", "-mode", "bl1,BL2"], ["HUDD", "BL1", "BL2"]),
                                           (["-mode", "BL3", "hudd", "BL3"], ["BL3", "HUDD"]), ([], []),
                                           (["--demo"], ["HUDD", "BL1", "BL2", "BL3"])])
def test_the_modes_of_every_mode_option_are_retrained_once_each(given, modes):
    args = HUDD.build_parser().parse_args(["-o", "x", *given] if "--demo" not in given else given)
    assert HUDD.modes_to_retrain(args) == modes


def test_several_modes_retrain_in_one_run_once_each(make_case):
    """-mode BL2 hudd,BL2: one command compares HUDD with a baseline (the mode was one per run; lower case was refused)."""
    case = make_case(per_class=4, settings={**SETTINGS, "epochs": 1})
    result = hudd("-o", str(case), "-mode", "BL2", "hudd,BL2", "--runs", "1")
    assert result.returncode == 0, result.stderr
    table = result.stdout[result.stdout.index("mode   test accuracy"):].splitlines()
    assert [row.split()[0] for row in table[1:3]] == ["HUDD", "BL2"]   # the comparison's own order, HUDD first
    assert len(list((case / "DNNModels").glob("HUDD_1_*.pth"))) == 1 and len(list((case / "DNNModels").glob("BL2_1_*.pth"))) == 1
    assert len(pd.read_csv(case / "T" / "Retrain" / "BL2_runs.csv")) == 1   # BL2 named twice, run once


def test_output_size_mismatch(make_case):
    case = make_case(per_class=1)
    save_model(case / "DNNModels" / "Wide.pth", num_classes=7)
    assert_clean_error(hudd("-o", str(case), "-m", "Wide.pth"), "7 outputs", "3 classes")


def test_architecture_that_cannot_take_the_state_dict(make_case):
    case = make_case(per_class=1)
    assert_clean_error(hudd("-o", str(case), "--arch", "alexnet128"), "does not fit architecture 'alexnet128'",
                       "shape of features.0.weight")


def test_pickled_model_needs_trust(make_case):
    case = make_case(per_class=1)
    torch.manual_seed(0)
    model = save_model(case / "DNNModels" / "sd.pth")
    torch.save(model, case / "DNNModels" / "whole.pth")
    assert_clean_error(hudd("-o", str(case), "-m", "whole.pth"), "whole.pth", "--trust-pickle")
    trusted = hudd("-o", str(case), "-m", "whole.pth", "--trust-pickle", "yes")
    assert trusted.returncode == 0, trusted.stderr


def test_bad_settings_file(make_case):
    case = make_case(per_class=1)
    (case / "hudd.json").write_text('{"epochs": 0}')
    assert_clean_error(hudd("-o", str(case)), "epochs=0", "positive whole number")


def test_an_image_of_another_size_without_resizing_is_named(make_case):
    case = make_case(per_class=2)
    (case / "hudd.json").write_text(json.dumps({**SETTINGS, "resize": "none"}))
    image = sorted((case / "DataSets" / "TestSet").rglob("*.png"))[1]
    Image.open(image).resize((24, 24)).save(image)
    assert_clean_error(hudd("-o", str(case)), image.name, "24x24 differs from the other images' 32x32",
                       "use resize 'resize'")


def test_an_architecture_lrp_cannot_explain_is_one_clear_error(make_case):
    case = make_case(per_class=2)
    (case / "nets.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Gated(nn.Module):\n"
        "    def __init__(self, num_classes=3):\n        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, 4, 3, padding=1)\n        self.fc = nn.Linear(4, num_classes)\n\n"
        "    def forward(self, x):\n        h = self.conv(x)\n        h = h * torch.sigmoid(h)  # a gate: no LRP rule\n"
        "        return self.fc(h.mean((2, 3)))\n")
    torch.save(import_nets(case).Gated().state_dict(), case / "DNNModels" / "OriginalModel.pth")
    result = hudd("-o", str(case), "--arch", f"{case / 'nets.py'}:Gated")
    assert_clean_error(result, "architecture", "cannot be explained", "'mul' of two input-dependent tensors")
    assert "module_rules" not in result.stderr   # the engine's advice to a caller of its API, not to a user


MNIST_STYLE_NETS = """import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1)
        self.dropout = nn.Dropout(0.25)
        self.fc = nn.Linear(4 * 15 * 15, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = self.fc(torch.flatten(self.dropout(x), 1))
        return F.log_softmax(x, dim=1)


class Ten(Net):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4 * 15 * 15, 10)


class Counted(Net):
    def __init__(self, n_classes=10):
        super().__init__()
        self.fc = nn.Linear(4 * 15 * 15, n_classes)
"""


def test_a_user_class_whose_outputs_are_fixed_in_the_class_runs_as_written(make_case):
    """PyTorch's MNIST example writes `Net()`: no num_classes, ten outputs fixed in the class. HUDD builds
    such a class without arguments (this was an error asking for a num_classes parameter) and checks
    its outputs against the classes instead."""
    case = make_case(per_class=3)
    (case / "nets.py").write_text(MNIST_STYLE_NETS)
    nets = import_nets(case)
    torch.manual_seed(0)
    model = nets.Net().eval()
    torch.save(model.state_dict(), case / "DNNModels" / "OriginalModel.pth")
    torch.save(nets.Ten().state_dict(), case / "DNNModels" / "Ten.pth")
    torch.save(nets.Counted(n_classes=3).state_dict(), case / "DNNModels" / "Counted.pth")
    (case / "hudd.json").write_text(json.dumps({**SETTINGS, "arch": "nets.py:Net"}))
    result = hudd("-o", str(case), "--steps", "test,heatmaps")
    assert result.returncode == 0, result.stderr
    written = pd.read_csv(case / "testResult.csv", dtype=str)
    outputs = model_outputs(model, case, written["image"]).argmax(1)
    assert list(written["predicted"]) == [sorted(["class_a", "class.b", "class c"])[i] for i in outputs]
    assert "heatmaps:" in result.stdout and list((case / "T" / "Heatmaps").iterdir())
    (case / "hudd.json").write_text(json.dumps({**SETTINGS, "arch": "nets.py:Ten"}))
    assert_clean_error(hudd("-o", str(case), "-m", "Ten.pth", "--steps", "test"), "Ten.pth", "10", "3 classes")
    # its count under another name: the file fits the classes, the class's default (10) does not
    (case / "hudd.json").write_text(json.dumps({**SETTINGS, "arch": "nets.py:Counted"}))
    assert_clean_error(hudd("-o", str(case), "-m", "Counted.pth", "--steps", "test"), "Counted.pth: has 3 outputs, "
                       "one per class, but", "nets.py:Counted builds 10", "give it a num_classes parameter")


def test_report_and_compare_together_are_refused(make_case):
    case = make_case(per_class=1)
    assert_clean_error(hudd("-o", str(case), "--compare", "--report"), "--report and --compare", "one of them")


def test_rq_needs_the_pipeline_to_have_run(make_case):
    case = make_case(per_class=1)
    assert_clean_error(hudd("-o", str(case), "-rq", "True"), "no clustering results", "OriginalModel.pth")
    assert_clean_error(hudd("--demo", str(case), "-rq", "True"), "-rq True needs -o CASE")
    assert hudd("-o", str(case), "-rq", "False").returncode == 0


def test_retraining_needs_a_mode_and_labels_for_the_improvement_images_it_trains_on(make_case):
    case = make_case(per_class=2)
    assert_clean_error(hudd("-o", str(case), "--steps", "retrain"), "--steps retrain needs -mode")
    unlabelled = make_case("unlabelled", improvement="unlabelled", per_class=4)
    assert_clean_error(hudd("-o", str(unlabelled), "-mode", "HUDD"), "have no label", "DataSets/ImprovementLabels.csv")
    assert sorted(p.name for p in (unlabelled / "DNNModels").iterdir()) == ["OriginalModel.pth"]


def test_rq2_names_a_missing_model(make_case):
    case = make_case(per_class=1)
    result = run_python(REPO / "RQ2.py", "-o", str(case), "-m", "Nope.pth")
    assert_clean_error(result, "Nope.pth", "not found", "OriginalModel.pth")


def test_debug_shows_the_traceback(tmp_path):
    result = hudd("-o", str(tmp_path / "nowhere"), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_clustering_without_heatmaps_says_what_to_run(make_case):
    case = make_case(per_class=1)
    assert hudd("-o", str(case), "--steps", "test").returncode == 0
    assert_clean_error(hudd("-o", str(case), "--steps", "clusters"), "run the heatmap step first")


def test_demo_takes_a_kind_and_a_folder():
    assert HUDD.demo_kind_and_folder([]) == ("signs", Path("HUDD_demo"))
    assert HUDD.demo_kind_and_folder(["here"]) == ("signs", Path("here"))
    assert HUDD.demo_kind_and_folder(["fld"]) == ("fld", Path("HUDD_demo_fld"))
    assert HUDD.demo_kind_and_folder(["fld", "x/y"]) == ("fld", Path("x/y"))
    with pytest.raises(HUDD.HuddError, match="at most a kind"):
        HUDD.demo_kind_and_folder(["a", "b"])
    assert HUDD.build_parser().parse_args(["--demo"]).demo == []


def numbered_class_case(root: Path, classes: int = 11) -> Path:
    """Class folders 0..classes-1 of plain-coloured images (a little noise), and a DemoNet trained on them
    with the folder numbers as labels, as a user's own training loop labels them: its output i is class i."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, size=(classes, 3))
    images, labels = [], []
    for set_name, per_class in (("TrainingSet", 6), ("TestSet", 3), ("ImprovementSet", 2)):
        for number in range(classes):
            for i in range(per_class):
                pixels = np.clip(colours[number] + rng.normal(0, 8, size=(32, 32, 3)), 0, 255).astype(np.uint8)
                (root / "DataSets" / set_name / str(number)).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(root / "DataSets" / set_name / str(number) / f"{i}.png")
                if set_name == "TrainingSet":
                    images.append((pixels / 255.0 - 0.5) / 0.25)
                    labels.append(number)
    torch.manual_seed(0)
    model = DemoNet(num_classes=classes)
    inputs = torch.tensor(np.stack(images).transpose(0, 3, 1, 2), dtype=torch.float32)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), torch.tensor(labels)).backward()
        optimiser.step()
    (root / "DNNModels").mkdir()
    torch.save(model.eval().state_dict(), root / "DNNModels" / "OriginalModel.pth")
    (root / "hudd.json").write_text(json.dumps(SETTINGS))
    return root


def test_numbered_class_folders_read_in_the_wrong_order_get_a_note_with_the_accuracy_in_numeric_order(tmp_path):
    """Folders 0..10 sort as 0, 1, 10, 2, ...: a model whose output i is class i is then read as
    mislabelling most of its images. The summary says so with both accuracies; the `classes` setting it
    names in numeric order makes the accuracy the model's own, and the note goes."""
    case = numbered_class_case(tmp_path / "case")
    result = hudd("-o", str(case), "--steps", "test")
    assert result.returncode == 0, result.stderr
    train = pd.read_csv(case / "trainResult.csv")
    names = sorted(str(n) for n in range(11))
    scores = train[[f"score_{name}" for name in names]].to_numpy()
    numeric = 100 * np.mean(scores.argmax(axis=1) == train["expected"].astype(int).to_numpy())  # output i: class i
    named = 100 * np.mean(train["result"] == "Correct")
    assert numeric > named + 10
    assert ("note: the class folders are numbers, which HUDD takes in name order as torchvision's ImageFolder does "
            f"(0, 1, 10, 2, ..., 9); read in numeric order (0, 1, 2, 3, ..., 10) the model's outputs give TrainingSet "
            f"accuracy {numeric:.2f}% against {named:.2f}%. If the model was trained with the numbers as labels, set "
            f'in hudd.json "classes": ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"]') in result.stdout
    assert "near chance" not in result.stdout   # its advice (input_size, mean, std) is not what is wrong
    (case / "hudd.json").write_text(json.dumps({**SETTINGS, "classes": [str(n) for n in range(11)]}))
    again = hudd("-o", str(case), "--steps", "test")
    assert again.returncode == 0, again.stderr
    assert "class folders are numbers" not in again.stdout
    assert 100 * np.mean(pd.read_csv(case / "trainResult.csv")["result"] == "Correct") == pytest.approx(numeric)


def test_a_model_whose_outputs_are_in_another_class_order_gets_a_note_with_that_order(tmp_path):
    """A model trained with a label list of its own (output 0 is "dog", 1 "cat", ...): read in the folders'
    sorted order it mislabels nearly every image, and the near-chance note's settings are not what is
    wrong. The summary names the order that fits its outputs, checked here against the model's own
    outputs; with that order as the setting classes, the accuracy is the model's own and the note goes."""
    case = numbered_class_case(tmp_path / "case", classes=4)
    trained_order = ["dog", "cat", "bird", "ant"]            # output i was trained as folder i
    for image_set in ("TrainingSet", "TestSet", "ImprovementSet"):
        for number, name in enumerate(trained_order):
            (case / "DataSets" / image_set / str(number)).rename(case / "DataSets" / image_set / name)
    result = hudd("-o", str(case), "--steps", "test")
    assert result.returncode == 0, result.stderr
    train = pd.read_csv(case / "trainResult.csv")
    scores = train[[f"score_{name}" for name in sorted(trained_order)]].to_numpy()
    own = 100 * np.mean(np.asarray(trained_order)[scores.argmax(axis=1)] == train["expected"].to_numpy())
    read = 100 * np.mean(train["result"] == "Correct")
    assert own > read + 20
    assert (f"note: the model's outputs fit another class order far better: read with output i as the i-th of dog, "
            f"cat, bird, ant (4 of 4 classes moved), they give TrainingSet accuracy {own:.2f}% against {read:.2f}%"
            ) in result.stdout
    assert 'set in hudd.json "classes": ["dog", "cat", "bird", "ant"]' in result.stdout
    assert "near chance" not in result.stdout
    (case / "hudd.json").write_text(json.dumps({**SETTINGS, "classes": trained_order}))
    again = hudd("-o", str(case), "--steps", "test")
    assert again.returncode == 0, again.stderr
    assert "another class order" not in again.stdout
    assert 100 * np.mean(pd.read_csv(case / "trainResult.csv")["result"] == "Correct") == pytest.approx(own)


def test_the_class_order_note_needs_a_working_model_in_that_order():
    """A weak model fits some order of its outputs better by chance: no note unless that order makes it a
    working model (half-way from chance to 100%) and 20 points better."""
    test = {"classes": ["a", "b", "c", "d"], "chance": 25.0, "sets": {"TrainingSet": {"accuracy": 10.0}},
            "best_order": {"set": "TrainingSet", "order": ["b", "a", "c", "d"], "accuracy": 55.0}}
    assert HUDD.best_order_note(test) == ""                            # 55% < 62.5%: not a working model
    test["best_order"]["accuracy"] = 70.0
    assert "2 of 4 classes moved" in HUDD.best_order_note(test)
    test["sets"]["TrainingSet"]["accuracy"] = 55.0                     # only 15 points better
    assert HUDD.best_order_note(test) == ""
    test["best_order"]["order"] = test["classes"]
    test["sets"]["TrainingSet"]["accuracy"] = 10.0
    assert HUDD.best_order_note(test) == ""                            # its own order already


def test_a_model_near_chance_on_its_training_images_gets_a_note_naming_the_settings_to_check():
    sets = {"TrainingSet": {"images": 90, "accuracy": 12.0}, "TestSet": {"images": 30, "accuracy": 60.0}}
    note = HUDD.near_chance_note(sets, chance=100 / 9)
    assert "TrainingSet accuracy 12.00% is near chance (11.11% for 9 classes)" in note
    assert "input_size, mean, std and resize" in note and "BatchNorm" in note
    assert HUDD.near_chance_note({**sets, "TrainingSet": {"images": 90, "accuracy": 21.0}}, chance=100 / 9) == ""
    assert HUDD.near_chance_note({"TestSet": {"images": 30, "accuracy": 52.0}}, chance=50.0).startswith("  note: TestSet")
    assert HUDD.near_chance_note({"TrainingSet": {"images": 9, "accuracy": 0.0}}, chance=None) == ""   # keypoints
    assert HUDD.near_chance_note({"TrainingSet": {"images": 9}}, chance=50.0) == ""                      # unlabelled


PROBE = """import os, sys, torch
print(os.getcwd(), sys.argv, torch.get_num_threads(), os.environ.get("PROBE"), __name__)
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


def test_the_tests_command_server_runs_a_script_as_a_fresh_interpreter_does(case, tmp_path):
    """tests/command_server.py, which starts the suite's command-line runs: each run's folder,
    arguments, environment, torch threads (from OMP_NUM_THREADS, else the default), output and exit
    status are those of `python SCRIPT ...`; and HUDD's own answers, its files and errors, are the same."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    for env in ({"OMP_NUM_THREADS": "1", "PROBE": "a b"}, {"OMP_NUM_THREADS": None}, {"OMP_NUM_THREADS": "2"}):
        forked, fresh = (run_python(probe, "3", "x y", cwd=tmp_path, env=env, fresh=fresh) for fresh in (False, True))
        assert (forked.returncode, forked.stdout, forked.stderr) == (3, fresh.stdout, fresh.stderr), env
        assert fresh.returncode == 3
    for args in (["-o", str(case), "-m", "Nope.pth"], ["-o", str(case), "--steps", "test,heatmaps", "--device", "tpu"]):
        forked, fresh = (run_python(REPO / "HUDD.py", *args, fresh=fresh) for fresh in (False, True))
        assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
        assert forked.returncode == 2 and forked.stderr.startswith("error:")
    copy = tmp_path / "copy"
    shutil.copytree(case, copy)
    for folder, fresh in ((case, False), (copy, True)):
        assert run_python(REPO / "HUDD.py", "-o", str(folder), "--steps", "test", fresh=fresh).returncode == 0
    assert (case / "testResult.csv").read_bytes() == (copy / "testResult.csv").read_bytes()


def test_a_run_past_its_timeout_is_killed_with_what_it_started_as_subprocess_would_raise(tmp_path):
    """The command server kills a run (and the process it started) at its timeout, raises what
    subprocess.run raises, and starts the next run as before."""
    script = tmp_path / "slow.py"
    script.write_text("import subprocess, sys, time\n"
                      "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                      "print(child.pid, flush=True)\ntime.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired) as stopped:
        run_python(script, timeout=3)
    started = int(stopped.value.output.split()[0])
    for _ in range(50):   # killed with its run: gone (or a zombie of its group, reaped by init) within moments
        if not Path(f"/proc/{started}").exists() or "State:\tZ" in Path(f"/proc/{started}/status").read_text():
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {started}, started by the killed run, still runs")
    script.write_text("print('next run')")
    after = run_python(script)
    assert (after.returncode, after.stdout) == (0, "next run\n")
