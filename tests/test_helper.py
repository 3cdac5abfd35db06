"""Helper.py: layouts, names, settings, model loading, atomic writes, the manifest."""
from __future__ import annotations

import collections
import errno
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import Helper
from Helper import CasePaths, HuddError
from helpers import CLASSES, save_model, write_image

import numpy as np


@pytest.mark.parametrize("layout", ["plain", "doubled", "unlabelled"])
def test_every_improvement_layout_is_listed(make_case, layout):
    case = make_case(improvement=layout, per_class=2)
    sets = Helper.load_case_sets(CasePaths(case))
    improve = sets["improve"]
    assert len(improve) == 2 * len(CLASSES)
    expected_root = case / "DataSets" / "ImprovementSet"
    if layout == "doubled":
        expected_root = expected_root / "ImprovementSet"
    assert improve.root == expected_root
    assert improve.labelled == (layout != "unlabelled")
    if layout != "unlabelled":
        # labels come from the folder names, indexed in the training set's class list
        assert [sets["train"].classes[label] for label in improve.labels] == [p.parent.name for p in improve.paths]


def test_names_with_underscores_dots_and_spaces(case):
    sets = Helper.load_case_sets(CasePaths(case))
    train = sets["train"]
    assert train.classes == sorted(CLASSES)
    on_disk = sorted((case / "DataSets" / "TrainingSet").rglob("*.png"))
    assert sorted(train.paths) == on_disk
    assert all(" " in p.name and "_" in p.name and p.name.count(".") == 2 for p in train.paths)


def test_a_class_folder_with_the_set_name_is_not_taken_for_the_doubled_layout(tmp_path):
    # ImprovementSet/ImprovementSet beside another class folder is a class that shares the set's name
    rng = np.random.default_rng(0)
    root = tmp_path / "DataSets" / "ImprovementSet"
    write_image(root / "ImprovementSet" / "a.png", rng)
    write_image(root / "other" / "b.png", rng)
    set_dir = CasePaths(tmp_path).set_dir("improve")
    assert set_dir == root
    assert Helper.list_image_set(set_dir).classes == ["ImprovementSet", "other"]


def test_images_beside_class_folders_are_refused_not_dropped(tmp_path):
    rng = np.random.default_rng(0)
    write_image(tmp_path / "Set" / "cat" / "a.png", rng)
    write_image(tmp_path / "Set" / "loose.png", rng)
    with pytest.raises(HuddError, match="class folders and 1 image.*loose.png.*move them into their class folders"):
        Helper.list_image_set(tmp_path / "Set")


def test_tiff_and_webp_images_are_read_and_other_files_are_named_not_dropped_silently(tmp_path, caplog):
    from PIL import Image
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for name in ("a.tif", "b.TIFF", "c.webp", "d.pgm"):
        (tmp_path / "Set" / "cat").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels if name != "d.pgm" else pixels[..., 0]).save(tmp_path / "Set" / "cat" / name)
    Image.fromarray(pixels).save(tmp_path / "Set" / "cat" / "e.gif")
    (tmp_path / "Set" / "cat" / "notes.txt").write_text("a companion file")
    with caplog.at_level("WARNING", logger="hudd"):
        listed = Helper.list_image_set(tmp_path / "Set")
    assert [p.name for p in listed.paths] == ["a.tif", "b.TIFF", "c.webp", "d.pgm"]
    for path in listed.paths:   # each read as the model's input is
        assert Image.open(path).convert("RGB").size == (8, 8)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "1 file(s) left out" in warned[0] and "e.gif" in warned[0]   # not notes.txt


def test_sixteen_bit_images_are_read_scaled_to_8_bits_not_clipped_and_float_images_are_named(tmp_path, caplog):
    """PIL's own conversion clips a 16-bit image at 255 (nearly every pixel white): read scaled instead,
    with one warning for the set; a floating-point image has no one reading and is refused by name."""
    from PIL import Image
    values = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)   # 0 .. 65535 in steps of 257
    (tmp_path / "Set" / "cat").mkdir(parents=True)
    Image.fromarray(values).save(tmp_path / "Set" / "cat" / "a.png")
    Image.fromarray(values.astype(np.float32) / 65535).save(tmp_path / "Set" / "cat" / "b.tif")
    with Image.open(tmp_path / "Set" / "cat" / "a.png") as image:
        assert image.mode.startswith("I") and np.asarray(image.convert("L")).mean() > 250  # the clipping
    listed = Helper.list_image_set(tmp_path / "Set")
    with caplog.at_level("WARNING", logger="hudd"):
        Helper.note_sixteen_bit([listed, listed])
    warned = caplog.records[0].getMessage() if len(caplog.records) == 1 else ""
    assert "a.png" in warned and "16-bit" in warned and "values 0..65535" in warned
    for channels in (1, 3):
        settings = Helper.Settings(arch="demonet", input_size=[16, 16], channels=channels, mean=[0.0] * channels,
                                   std=[1.0] * channels)
        dataset = Helper.ImageDataset(listed, settings)
        tensor, _label, _index, error = dataset[0]
        assert error == ""
        expected = np.round(values / 257.0) / 255.0   # an independent reading: value / 257, then ToTensor's / 255
        for channel in tensor.numpy():
            np.testing.assert_allclose(channel, expected, atol=1e-6)
        assert "floating-point image" in dataset[1][3]


def test_a_class_folder_named_in_another_unicode_form_is_the_same_class(tmp_path):
    import unicodedata
    rng = np.random.default_rng(0)
    composed, decomposed = unicodedata.normalize("NFC", "Über"), unicodedata.normalize("NFD", "Über")
    write_image(tmp_path / "Train" / composed / "a.png", rng)
    write_image(tmp_path / "Train" / "zebra" / "b.png", rng)
    write_image(tmp_path / "Test" / decomposed / "c.png", rng)   # as macOS writes the name
    train = Helper.list_image_set(tmp_path / "Train")
    test = Helper.list_image_set(tmp_path / "Test", classes=train.classes)
    assert test.labels == [train.classes.index(composed)]


def test_test_set_class_unknown_to_training_is_refused(case):
    write_image(case / "DataSets" / "TestSet" / "zebra crossing" / "x.png", np.random.default_rng(0))
    with pytest.raises(HuddError, match="zebra crossing.*not classes of the training set"):
        Helper.load_case_sets(CasePaths(case))


def test_empty_set_is_refused(case):
    for image in (case / "DataSets" / "TestSet").rglob("*.png"):
        image.unlink()
    with pytest.raises(HuddError, match="TestSet: no images found"):
        Helper.load_case_sets(CasePaths(case))


def test_settings_precedence_defaults_json_command_line(case):
    paths = CasePaths(case)
    (case / "hudd.json").write_text(json.dumps({"arch": "demonet", "epochs": 3, "batch_size": 16}))
    settings = Helper.load_settings(paths, {"batch_size": 8, "arch": None})
    assert settings.arch == "demonet"          # from hudd.json
    assert settings.epochs == 3                # from hudd.json
    assert settings.batch_size == 8            # command line wins
    assert settings.mean == list(Helper.IMAGENET_MEAN)  # the original's default
    assert Helper.resolve_input_size(settings) == [32, 32]  # DemoNet's own input size


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_hudd_json_saved_by_a_windows_editor_is_read(case, encoding):
    """Notepad saves UTF-8 with a byte-order mark, or UTF-16 as "Unicode": json refused the first as
    "Unexpected UTF-8 BOM" and the second stopped with an internal UnicodeDecodeError."""
    (case / "hudd.json").write_bytes(json.dumps({"arch": "demonet", "epochs": 3}).encode(encoding))
    assert Helper.load_settings(CasePaths(case)).epochs == 3
    (case / "hudd.json").write_bytes(b"\x93arch\x94")   # Windows-1252 quotes: neither
    with pytest.raises(HuddError, match="hudd.json: is not UTF-8 or UTF-16 text"):
        Helper.load_settings(CasePaths(case))


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"archh": "demonet"}), "unknown setting.*archh"),
    (json.dumps({"resize": "stretch"}), "resize='stretch'"),
    (json.dumps({"mean": [0.5]}), "mean=\\[0.5\\].*list of 3 number"),
    (json.dumps({"mean": 0.5}), "mean=0.5.*list of 3 number"),
    (json.dumps({"mean": None}), "mean=None.*list of 3 number"),
    (json.dumps({"std": ["a", "b", "c"]}), "std=.*list of 3 number"),
    (json.dumps({"std": [0.2, 0.0, 0.2]}), "std=.*positive"),
    # an mmcv config's normalisation, for pixels 0..255: told the values for HUDD's [0, 1] pixels
    (json.dumps({"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}),
     r"mean=\[123.675, 116.28, 103.53\].*0-255 pixel scale.*mean \[0.485, 0.456, 0.406\] and std \[0.229, 0.224, 0.225\]"),
    (json.dumps({"channels": 1}), "mean=.*list of 1 number"),        # greyscale needs its own normalisation
    (json.dumps({"channels": True}), "channels=True"),
    (json.dumps({"input_size": "64"}), "input_size='64'.*whole number"),
    (json.dumps({"input_size": 64.5}), "input_size=64.5.*whole number"),
    (json.dumps({"input_size": True}), "input_size=True.*whole number"),
    (json.dumps({"arch": 5}), "arch=5.*architecture name"),
    (json.dumps({"arch": None}), "arch=None.*architecture name"),
    (json.dumps({"max_rccs": 2.5}), "max_rccs=2.5.*whole number"),
    (json.dumps({"rules": "hud"}), "rules='hud'.*'hudd'"),             # checked when read, not after the test step
    (json.dumps({"k_criterion": "elbow"}), "k_criterion='elbow'.*'silhouette'"),
    (json.dumps({"explain": "worst"}), "explain='worst'.*classification"),  # a keypoint value for a classifier
    (json.dumps({"layers": "features.0"}), "layers='features.0'.*list of module paths"),
])
def test_bad_settings_name_the_value(case, content, message):
    (case / "hudd.json").write_text(content)
    with pytest.raises(HuddError, match=message):
        Helper.load_settings(CasePaths(case))


def test_atomic_path_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(RuntimeError):
        with Helper.atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with Helper.atomic_path(target) as temporary:
        temporary.write_text("whole")
    assert target.read_text() == "whole" and len(list(tmp_path.iterdir())) == 1


def _settings(case: Path, **overrides) -> Helper.Settings:
    return Helper.load_settings(CasePaths(case), overrides)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_state_dict_variants_load(case, tmp_path):
    reference = save_model(tmp_path / "ref.pth", seed=3)
    state = reference.state_dict()
    variants = {
        "plain.pth": state,
        "dataparallel.pth": {f"module.{k}": v for k, v in state.items()},
        "checkpoint.pth": {"epoch": 4, "state_dict": state},
        "compiled.pth": torch.compile(reference).state_dict(),          # keys under _orig_mod.
        "lightning.pth": {"epoch": 9, "state_dict": {f"model.{k}": v for k, v in state.items()}},
        "ddp_of_compiled.pth": {f"module._orig_mod.{k}": v for k, v in state.items()},
        # pytorch-cifar's checkpoint: the state_dict under a name of its own, beside an optimizer's state
        "net.pth": {"net": state, "acc": 91.5, "epoch": 7,
                    "optimizer": torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9).state_dict()},
    }
    for name, content in variants.items():
        torch.save(content, tmp_path / name)
        loaded = Helper.load_model(tmp_path / name, _settings(case), len(CLASSES))
        assert _same_weights(loaded, reference), name
        assert not loaded.training
    torch.save({"net": state, "ema": state, "epoch": 7}, tmp_path / "two.pth")
    with pytest.raises(HuddError, match=r"two.pth: holds several state_dicts \(net, ema\); save the one to analyse "
                                        r"alone, e.g. torch.save\(checkpoint\['net'\], path\)"):
        Helper.load_model(tmp_path / "two.pth", _settings(case), len(CLASSES))
    with_loss = {"state_dict": {**{f"model.{k}": v for k, v in state.items()}, "loss.weight": torch.ones(3)}}
    torch.save(with_loss, tmp_path / "with_loss.pth")   # not one wrapper: named as not fitting, not guessed at
    with pytest.raises(HuddError, match=r"with_loss.pth: does not fit architecture 'demonet' \(missing features.0.weight"):
        Helper.load_model(tmp_path / "with_loss.pth", _settings(case), len(CLASSES))


def test_a_file_that_is_no_model_file_is_named_as_such(case, tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a model")
    with pytest.raises(HuddError, match="notes.pth: is not a PyTorch model file"):
        Helper.load_model(text, _settings(case), len(CLASSES))


def test_a_torchscript_archive_is_named_as_such(case, tmp_path):
    model = save_model(tmp_path / "ref.pth", seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # torch 2.14 deprecates TorchScript; users still have files
        torch.jit.save(torch.jit.trace(model, torch.zeros(1, 3, 32, 32)), tmp_path / "scripted.pt")
    with pytest.raises(HuddError, match=r"scripted.pt: is a TorchScript archive \(torch.jit.save\); HUDD needs the "
                                        r"weights and the architecture: save model.state_dict\(\)"):
        Helper.load_model(tmp_path / "scripted.pt", _settings(case), len(CLASSES))


def test_a_torch_export_archive_gives_its_weights_with_the_trust_flag(case, tmp_path):
    """torch.export.save's .pt2 holds a graph of operators and the weights by module name: the weights go into
    --arch's architecture; reading the archive can unpickle (torch.export.load falls back to it), hence the flag."""
    reference = save_model(tmp_path / "ref.pth", seed=6).eval()
    torch.export.save(torch.export.export(reference, (torch.zeros(1, 3, 32, 32),)), tmp_path / "exported.pt2")
    with pytest.raises(HuddError, match=r"exported.pt2: is a torch.export archive \(torch.export.save\), and reading "
                                        r"it can unpickle code from the file. If you trust it, pass --trust-pickle"):
        Helper.load_model(tmp_path / "exported.pt2", _settings(case), len(CLASSES))
    loaded = Helper.load_model(tmp_path / "exported.pt2", _settings(case), len(CLASSES), trust_pickle=True)
    assert type(loaded) is type(reference) and list(loaded.state_dict()) == list(reference.state_dict())
    assert _same_weights(loaded, reference)


def test_safetensors_weights_load_and_a_truncated_file_is_named(case, tmp_path):
    """Hugging Face's and timm's weight format: a JSON header and raw tensors, read without unpickling."""
    from safetensors.torch import save_file
    reference = save_model(tmp_path / "ref.pth", seed=7)
    save_file(reference.state_dict(), tmp_path / "model.safetensors")
    loaded = Helper.load_model(tmp_path / "model.safetensors", _settings(case), len(CLASSES))
    assert list(loaded.state_dict()) == list(reference.state_dict()) and _same_weights(loaded, reference)
    whole = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(HuddError, match=r"cut.safetensors: cannot be read as a .safetensors file \(.+\); is it complete\?"):
        Helper.load_model(tmp_path / "cut.safetensors", _settings(case), len(CLASSES))


def test_pickled_model_needs_the_trust_flag(case, tmp_path):
    reference = save_model(tmp_path / "ref.pth", seed=4)
    torch.save(reference, tmp_path / "whole.pth")
    with pytest.raises(HuddError, match="pickled model.*--trust-pickle"):
        Helper.load_model(tmp_path / "whole.pth", _settings(case), len(CLASSES))
    loaded = Helper.load_model(tmp_path / "whole.pth", _settings(case), len(CLASSES), trust_pickle=True)
    assert _same_weights(loaded, reference)


def test_a_checkpoint_with_python_objects_beside_its_weights_is_read_with_the_trust_flag(case, tmp_path):
    """A training script's checkpoint often keeps its settings beside the weights (argparse.Namespace,
    Lightning's hyper-parameters): torch's safe loader refuses it. It was called "a whole pickled model", and
    with --trust-pickle refused as "a dict, not a torch model"; its state_dict is now taken as any other."""
    import argparse
    reference = save_model(tmp_path / "ref.pth", seed=8)
    checkpoint = {"epoch": 3, "hyper_parameters": argparse.Namespace(lr=0.1),
                  "state_dict": {f"model.{key}": value for key, value in reference.state_dict().items()}}
    torch.save(checkpoint, tmp_path / "last.ckpt")
    with pytest.raises(HuddError, match=r"last.ckpt: holds pickled Python objects \(argparse.Namespace\): a whole "
                                        r"pickled model, or a checkpoint with objects beside its weights. Unpickling "
                                        r"runs code from the file: if you trust it, pass --trust-pickle"):
        Helper.load_model(tmp_path / "last.ckpt", _settings(case), len(CLASSES))
    loaded = Helper.load_model(tmp_path / "last.ckpt", _settings(case), len(CLASSES), trust_pickle=True)
    assert list(loaded.state_dict()) == list(reference.state_dict()) and _same_weights(loaded, reference)


def test_a_pickle_whose_classes_are_not_importable_is_one_clear_line(case, tmp_path, monkeypatch):
    (tmp_path / "training_settings.py").write_text("class Settings:\n    lr = 0.1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import training_settings
    reference = save_model(tmp_path / "ref.pth", seed=9)
    torch.save({"state_dict": reference.state_dict(), "settings": training_settings.Settings()}, tmp_path / "run.pth")
    monkeypatch.delitem(sys.modules, "training_settings")
    (tmp_path / "training_settings.py").unlink()   # the file goes to a machine without the training code
    with pytest.raises(HuddError, match=r"run.pth: cannot be unpickled here \(ModuleNotFoundError: No module named "
                                        r"'training_settings'\): it needs the code it was saved with"):
        Helper.load_model(tmp_path / "run.pth", _settings(case), len(CLASSES), trust_pickle=True)


def test_user_architecture_from_a_file(case, tmp_path):
    code = tmp_path / "my nets.py"
    code.write_text(
        "import torch\nfrom torch import nn\n"
        "class Tiny(nn.Module):\n"
        "    def __init__(self, num_classes=2):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                                  nn.Linear(4, num_classes))\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n")
    spec = f"{code}:Tiny"
    model = Helper.build_architecture(spec, len(CLASSES))
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    loaded = Helper.load_model(tmp_path / "tiny.pth", _settings(case, arch=spec), len(CLASSES))
    assert _same_weights(loaded, model)
    with pytest.raises(HuddError, match="has no class 'Nope'"):
        Helper.build_architecture(f"{code}:Nope", 3)


def test_torchvision_architecture_by_name(case, tmp_path):
    model = Helper.build_architecture("resnet18", len(CLASSES))
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    loaded = Helper.load_model(tmp_path / "r18.pth", _settings(case, arch="resnet18"), len(CLASSES))
    assert _same_weights(loaded, model)
    with pytest.raises(HuddError, match="architecture 'resnet19' is unknown"):
        Helper.build_architecture("resnet19", 3)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_a_torchvision_model_adapted_to_grayscale_loads_with_channels_1(case, tmp_path, arch):
    """A user's ResNet whose first convolution takes one channel (model.conv1 = nn.Conv2d(1, 64, ...)), as
    grayscale images need: with channels 1 HUDD builds the architecture alike, and it runs on one channel."""
    import torchvision
    torch.manual_seed(3)
    saved = torchvision.models.get_model(arch, weights=None, num_classes=len(CLASSES))
    path, first = next((p, m) for p, m in saved.named_modules() if isinstance(m, nn.Conv2d))
    owner, _, name = path.rpartition(".")
    setattr(saved.get_submodule(owner) if owner else saved, name,
            nn.Conv2d(1, first.out_channels, first.kernel_size, first.stride, first.padding, bias=first.bias is not None))
    torch.save(saved.eval().state_dict(), tmp_path / "grey.pth")
    settings = _settings(case, arch=arch, channels=1, mean=[0.5], std=[0.25], input_size=64)
    loaded = Helper.load_model(tmp_path / "grey.pth", settings, len(CLASSES))
    assert _same_weights(loaded, saved)
    with torch.no_grad():
        torch.testing.assert_close(loaded(torch.ones(2, 1, 64, 64)), saved(torch.ones(2, 1, 64, 64)))


def test_googlenet_builds_without_torchvisions_initialisation_warning():
    """Every step loads the model: torchvision's FutureWarning on GoogLeNet's default initialisation (the
    weights loaded next are the user's) would print at each one."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = Helper.build_architecture("googlenet", len(CLASSES))
    assert model.fc.out_features == len(CLASSES) and model.aux1 is not None   # as torchvision builds it


@pytest.mark.parametrize("heads", [True, False])
def test_a_googlenet_saved_with_or_without_its_auxiliary_heads_loads(case, tmp_path, heads):
    import torchvision
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        saved = torchvision.models.googlenet(weights=None, num_classes=len(CLASSES), aux_logits=heads,
                                             init_weights=False).eval()
    torch.save({"model": saved.state_dict()}, tmp_path / "googlenet.pth")
    loaded = Helper.load_model(tmp_path / "googlenet.pth", _settings(case, arch="googlenet", input_size=64),
                               len(CLASSES))
    assert _same_weights(loaded, saved) and (loaded.aux1 is not None) == heads


def test_architecture_mismatch_names_the_first_keys(case, tmp_path):
    torch.save(Helper.build_architecture("resnet18", len(CLASSES)).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(HuddError, match=r"does not fit architecture 'demonet' \(missing features.0.weight"):
        Helper.load_model(tmp_path / "r18.pth", _settings(case), len(CLASSES))


def test_output_size_mismatch_is_named(case, tmp_path):
    save_model(tmp_path / "five.pth", num_classes=5)
    with pytest.raises(HuddError, match="has 5 outputs but the training set has 3 classes.*name every output in "
                                        "order in the setting classes"):
        Helper.load_model(tmp_path / "five.pth", _settings(case), len(CLASSES))


def test_resize_crop_takes_the_centre_after_resizing_the_shorter_side(case):
    """torchvision's ImageNet evaluation (Resize(256), CenterCrop(224)), the preprocessing of most models
    trained on photographs; resize_to gives another first size, and must not be below the input size."""
    from PIL import Image
    from torchvision import transforms
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    settings = _settings(case, resize="resize-crop", input_size=224, arch="resnet18")
    expected = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                   transforms.Normalize(settings.mean, settings.std)])(image)
    assert torch.equal(Helper.make_transform(settings)(image), expected)
    assert Helper.resize_shorter_side(_settings(case, resize="resize-crop", input_size=224, resize_to=288)) == 288
    with pytest.raises(HuddError, match=r"setting resize_to=100 .*at least the input size \(224\)"):
        _settings(case, resize="resize-crop", input_size=224, resize_to=100)


def test_device_choice():
    assert Helper.pick_device("cpu") == torch.device("cpu")
    assert Helper.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(HuddError, match="CUDA is not available"):
            Helper.pick_device("cuda")
    else:
        with pytest.raises(HuddError, match=rf"--device cuda:99: this machine has {torch.cuda.device_count()} CUDA"):
            Helper.pick_device("cuda:99")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an MPS device")
def test_a_device_type_this_machine_lacks_is_one_line_not_an_internal_error():
    with pytest.raises(HuddError, match=r"--device mps: not usable on this machine \(.*\); use --device cpu"):
        Helper.pick_device("mps")


def test_seed_makes_python_numpy_torch_repeat():
    import random
    Helper.seed_everything(7)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    Helper.seed_everything(7)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_manifest_needs_matching_fingerprint_and_existing_outputs(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    manifest = Helper.Manifest(tmp_path / "m.json")
    manifest.record("test", "abc", ["a.csv"])
    reread = Helper.Manifest(tmp_path / "m.json")
    assert reread.is_current("test", "abc")
    assert not reread.is_current("test", "abd")
    os.remove(tmp_path / "a.csv")
    assert not reread.is_current("test", "abc")


def _saved_linear_net(folder: Path, forward: str) -> str:
    """A user's nets.py in `folder` whose Net is one linear layer on 3x32x32 inputs and whose forward body
    is `forward`, its untrained weights saved as net.pth; returns its arch."""
    (folder / "nets.py").write_text(
        "import torch\nfrom torch import nn\n\nclass Net(nn.Module):\n"
        "    def __init__(self, num_classes):\n        super().__init__()\n"
        "        self.fc = nn.Linear(3 * 32 * 32, num_classes)\n\n"
        f"    def forward(self, x):\n        {forward}\n")
    arch = f"{folder / 'nets.py'}:Net"
    torch.save(Helper.build_architecture(arch, len(CLASSES)).state_dict(), folder / "net.pth")
    return arch


@pytest.mark.parametrize("returned, kind, taken", [("self.fc(h), h", "tuple", "model(x)[0]"),
                                                  ('{"scores": self.fc(h), "h": h}', "dict", "model(x)['scores']")])
def test_a_model_returning_more_than_its_outputs_in_eval_mode_is_one_clear_line(case, tmp_path, returned, kind, taken):
    """(logits, features) or {"scores": ...}: LRP explains one output tensor; this was an internal error. The
    wrapper's example takes the first output as that kind of output is taken."""
    arch = _saved_linear_net(tmp_path, f"h = x.flatten(1)\n        return {returned}")
    with pytest.raises(HuddError, match=rf"net.pth: the model \(.*:Net\) returns a {kind} in eval mode; HUDD explains "
                                        rf"one output tensor: .+ \(e.g. {re.escape(taken)}\)$"):
        Helper.load_model(tmp_path / "net.pth", _settings(case, arch=arch), len(CLASSES))


@pytest.mark.parametrize("flattened", ["torch.flatten(h)", "h.view(-1)"])
def test_a_model_that_flattens_the_batch_away_is_told_how_to_keep_it(case, tmp_path, flattened):
    """torch.flatten(x) without start_dim works on one image and gives (classes,): it was "the model's output
    has shape () but the training set has 3 classes"; a batch then fails or mixes images."""
    arch = _saved_linear_net(tmp_path, f"h = x\n        return self.fc({flattened})")
    with pytest.raises(HuddError, match=r"net.pth: the model's output for one 3x32x32 image has shape \(3,\), and a "
                                        r"batch of 2 images does not give 2 rows.*keep it with torch.flatten\(x, 1\)"):
        Helper.load_model(tmp_path / "net.pth", _settings(case, arch=arch), len(CLASSES))


def test_a_binary_model_with_one_logit_is_told_how_to_give_two():
    task = Helper.make_task(Helper.Settings())
    problem = task.check_output(torch.zeros(4, 1), 2)
    assert "one output (a binary model with a sigmoid)" in problem and "torch.cat([-z / 2, z / 2], 1)" in problem
    z = torch.tensor([[-1.5], [0.3]])        # the suggested pair: softmax gives sigmoid(z) to the second class
    torch.testing.assert_close(torch.softmax(torch.cat([-z / 2, z / 2], 1), 1)[:, 1], torch.sigmoid(z[:, 0]))
    assert task.check_output(torch.zeros(4, 2), 2) == ""
    assert "has shape (1,) but the training set has 3 classes" in task.check_output(torch.zeros(4, 1), 3)
    assert "setting classes" not in task.check_output(torch.zeros(4, 1), 3)
    assert "name every output in order in the setting classes" in task.check_output(torch.zeros(4, 1000), 3)


def test_a_keypoint_model_regressing_coordinates_is_told_what_the_task_takes():
    task = Helper.make_task(Helper.Settings(task="keypoints"))
    assert "an x and a y per keypoint" in task.check_output(torch.zeros(4, 10), 5)
    assert "not supported yet" in task.check_output(torch.zeros(4, 10), 5)
    assert "must give one map per keypoint (5 in" in task.check_output(torch.zeros(4, 7), 5)
    assert task.check_output(torch.zeros(4, 5, 16, 16), 5) == ""


def test_loaders_read_in_process_where_shared_memory_cannot_hold_their_batches(case, monkeypatch, caplog):
    """A Docker container's /dev/shm is 64 MB by default: loader processes handing 128-image batches
    over in it fail to allocate, and the step hangs. Where it is too small, the loader reads in this
    process, and says why once; where it is large enough, the workers asked for are kept."""
    settings = Helper.Settings(arch="demonet", input_size=[224, 224])
    image_set = Helper.list_image_set(case / "DataSets" / "TestSet")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(Helper, "_SHARED_MEMORY_WARNED", [])
    monkeypatch.setattr(Helper.os.path, "isdir", lambda path: True)
    monkeypatch.setattr(Helper.shutil, "disk_usage", lambda path: usage(64 * 2 ** 20, 0, 64 * 2 ** 20))
    with caplog.at_level("WARNING", logger="hudd"):
        assert Helper.make_loader(image_set, settings, 128, 2).num_workers == 0
        assert Helper.make_loader(image_set, settings, 128, 2).num_workers == 0
    needed = 2 * 2 * 2 * 128 * 3 * 224 * 224 * 4 / 2 ** 20   # 2 workers, 2 batches ahead each, a margin of 2: 588 MB
    assert caplog.text.count(f"has 64 MB free, less than the {needed:.0f} MB that 2 loader processes need for "
                             "batches of 128 images") == 1 and "--shm-size" in caplog.text
    assert Helper.make_loader(image_set, settings, 4, 2).num_workers == 2   # 4 images: 18 MB, it fits
    monkeypatch.setattr(Helper.shutil, "disk_usage", lambda path: usage(2 ** 34, 0, 2 ** 34))
    assert Helper.make_loader(image_set, settings, 128, 2).num_workers == 2


@pytest.mark.parametrize("name, init, message", [
    ("Block", "def __init__(self, width)", r"Block\(\) failed \(.*'width'\); its constructor must take num_classes or "
                                          "no argument"),
    ("Wide", "def __init__(self, num_classes, width)", r"Wide\(num_classes=3\) failed \(.*'width'\)"),
    # the user's own code failing was an 'internal error ... please report it': one line names it, and a
    # constructor downloading pretrained weights (no network here) is told what to do
    ("Downloads", "def __init__(self, num_classes=3):\n        raise urllib.error.URLError('Name or service not known')",
     r"Downloads\(num_classes=3\) failed \(URLError: .*Name or service.*\); it downloads pretrained weights.*build "
     "it untrained"),
    ("Broken", "def __init__(self):\n        raise RuntimeError('a size the author forgot')",
     r"Broken\(\) failed \(RuntimeError: a size the author forgot\)$"),
])
def test_a_user_class_hudd_cannot_build_is_one_line_naming_it(tmp_path, name, init, message):
    header, _, body = init.partition(":\n")
    (tmp_path / "nets.py").write_text(f"import urllib.error\nfrom torch import nn\n\nclass {name}(nn.Module):\n"
                                      f"    {header.rstrip(':')}:\n        super().__init__()\n{body}\n")
    with pytest.raises(HuddError, match=message):
        Helper.build_architecture(f"{tmp_path / 'nets.py'}:{name}", 3)


def test_a_class_in_a_package_imports_its_siblings_and_is_known_by_the_whole_package(tmp_path):
    """A model file of the user's own package, `from .layers import Block` (this was an internal error:
    a relative import with no known parent package); an edit of the sibling counts as a new architecture."""
    package = tmp_path / "mynet"
    (package / "parts").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "parts" / "__init__.py").write_text("")
    (package / "parts" / "layers.py").write_text("from torch import nn\n\nclass Block(nn.Sequential):\n"
                                                 "    def __init__(self, width):\n"
                                                 "        super().__init__(nn.Linear(4, width), nn.ReLU())\n")
    (package / "model.py").write_text("from torch import nn\nfrom .parts.layers import Block\n\n"
                                      "class Net(nn.Sequential):\n"
                                      "    def __init__(self, num_classes=3):\n"
                                      "        super().__init__(Block(8), nn.Linear(8, num_classes))\n")
    arch = f"{package / 'model.py'}:Net"
    model = Helper.build_architecture(arch, 5)
    assert type(model[0]).__name__ == "Block" and model[1].out_features == 5
    identity = Helper.arch_identity(arch)
    (package / "parts" / "layers.py").write_text((package / "parts" / "layers.py").read_text() + "# edited\n")
    assert Helper.arch_identity(arch) != identity
    clash = shutil.copytree(package, tmp_path / "other" / "Helper")   # named as a module HUDD has imported
    with pytest.raises(HuddError, match="its package 'Helper' has the name of a module already imported.*rename"):
        Helper.build_architecture(f"{clash / 'model.py'}:Net", 5)


def test_an_error_in_the_users_class_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "nets.py").write_text("import torch\nraise RuntimeError('this machine has no CUDA')\n")
    with pytest.raises(HuddError, match=r"nets.py: could not be imported \(arch .*nets.py:Net\): RuntimeError: "
                                        "this machine has no CUDA"):
        Helper.build_architecture(f"{tmp_path / 'nets.py'}:Net", 3)


def test_a_class_file_in_hudd_json_is_found_from_the_case_and_known_by_its_content(case, monkeypatch, tmp_path):
    (case / "nets.py").write_text("from torch import nn\n\nclass Net(nn.Linear):\n"
                                  "    def __init__(self, num_classes=3):\n        super().__init__(4, num_classes)\n")
    (case / "hudd.json").write_text(json.dumps({"arch": "nets.py:Net"}))
    monkeypatch.chdir(tmp_path)   # not the case folder: the path is the case's
    settings = Helper.load_settings(CasePaths(case))
    assert settings.arch == f"{case / 'nets.py'}:Net"
    assert isinstance(Helper.build_architecture(settings.arch, 3), nn.Linear)
    monkeypatch.chdir(case.parent)   # the same file spelled otherwise is the same architecture
    identity = Helper.arch_identity(settings.arch)
    assert Helper.arch_identity(f"{case.name}/nets.py:Net") == identity
    (case / "nets.py").write_text((case / "nets.py").read_text() + "# edited\n")
    assert Helper.arch_identity(settings.arch) != identity   # an edited class recomputes the steps


@pytest.mark.parametrize("code, strerror, fragment", [
    (errno.EROFS, "Read-only file system", "a link to the read-only data (ln -s /path/to/DataSets CASE/DataSets)"),
    (errno.EACCES, "Permission denied", "give it those permissions"),
    (errno.ENOSPC, "No space left on device", "the disk is full: free some space"),
])
def test_a_file_operation_the_machine_refuses_is_one_error_line(capsys, code, strerror, fragment):
    """A read-only case folder (a data set mounted read-only) was an 'internal error ... please report it'
    at the lock file; the machine's refusals are one line with what to do, exit status 2."""
    def body():
        raise OSError(code, strerror, "/data/case/.hudd.lock")
    assert Helper.run_guarded(body, debug=False) == 2
    line = capsys.readouterr().err
    assert line.startswith(f"error: /data/case/.hudd.lock: {strerror}; ") and fragment in line
    assert line.count("\n") == 1 and "internal error" not in line
    with pytest.raises(OSError):                        # --debug: the exception itself, with its trace
        Helper.run_guarded(body, debug=True)


def test_other_os_errors_stay_internal_errors(capsys):
    def body():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "T/Heatmaps/.Layer0.npy.partial")
    assert Helper.run_guarded(body, debug=False) == 1
    assert capsys.readouterr().err.startswith("internal error: FileNotFoundError")


def test_an_exception_is_quoted_by_its_type_and_first_line():
    """The one-line errors quote the user's or a library's exception so; an empty message (a bare
    `raise RuntimeError()` in a forward) raised IndexError in the line that quoted it."""
    assert Helper.first_line_of(ValueError("bad size\nthe rest of the trace")) == "ValueError: bad size"
    assert Helper.first_line_of(RuntimeError()) == "RuntimeError"
