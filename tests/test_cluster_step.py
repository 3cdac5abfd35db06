"""The cluster step: files read back, RCC folders, the selected layer, characterisation, edge cases."""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_mutual_info_score

import assignModule
import clusterModule
import heatmapModule
import reportModule
import testModule
from Helper import NAME_BYTES, HuddError, fitting_name
from features import make_space
from helpers import context, hudd, run_step
from test_keypoint_pipeline import build_keypoint_case


def run_steps(case, **overrides):
    ctx = context(case, **overrides)
    run_step(testModule.STEP, ctx)
    run_step(heatmapModule.STEP, ctx)
    return ctx, run_step(clusterModule.STEP, ctx)


def add_scenarios(case: Path) -> None:
    test_dir = case / "DataSets" / "TestSet"
    images = sorted(Path(os.path.relpath(p, test_dir)).as_posix() for p in test_dir.rglob("*.png"))
    pd.DataFrame({"image": images,
                  "scenario": ["fog" if i % 2 else "night" for i in range(len(images))],
                  "brightness": [float(i % 2) + 0.01 * i for i in range(len(images))],
                  "angle": [float(i * 7 % 13) for i in range(len(images))]}).to_csv(test_dir / "metadata.csv",
                                                                                     index=False)


def test_outputs_read_back(make_case):
    case = make_case(per_class=8)
    add_scenarios(case)
    ctx, summary = run_steps(case)
    analysis = case / "T" / "ClusterAnalysis"
    index = pd.read_csv(case / "T" / "Heatmaps" / "index.csv")
    table = pd.read_csv(analysis / "summary.csv")
    layers = pd.read_csv(case / "T" / "Heatmaps" / "layers.csv")
    assert list(table["layer"]) == list(layers["layer"])
    assert table["selected"].sum() == 1 and summary["layer"] != "Layer0"
    for layer in layers["layer"]:
        folder = analysis / layer
        labels = pd.read_csv(folder / "rcc_labels.csv")
        assert list(labels["image"]) == list(index["image"])
        distances = np.load(folder / "distances.npy")
        assert distances.shape == (len(index), len(index))
        stats = pd.read_csv(folder / "rcc_stats.csv")
        assert stats["size"].sum() == len(index)
        for rcc in stats.itertuples():
            members = labels.index[labels["rcc"] == rcc.rcc].to_numpy()
            assert len(list((folder / rcc.rcc).iterdir())) == rcc.size
            pairs = distances[np.ix_(members, members)][np.triu_indices(len(members), 1)]
            assert rcc.icd == pytest.approx(pairs.mean() if len(pairs) else 0.0)
        row = table[table["layer"] == layer].iloc[0]
        # the layer's RCCs against the class its relevance explains (predicted): what the choice passes over
        assert row["output_alignment"] == pytest.approx(adjusted_mutual_info_score(labels["predicted"], labels["rcc"]))
        assert row["k"] == len(stats)
        curves = pd.read_csv(folder / "k_choice.csv").set_index("k")
        assert curves.loc[row["k"], "top_level_range"]
        assert curves.loc[row["k"], "silhouette"] == pytest.approx(row["silhouette"])
        assert curves.loc[row["k"], "wicd"] == pytest.approx(row["wicd"])
        # The k plot by default only for the selected layer (every layer's curves are in k_choice.csv).
        assert (folder / "knee.png").exists() == (layer == summary["layer"])
        exported = analysis / f"{layer}HMDistance.xlsx"
        assert exported.exists() == (layer == summary["layer"])  # by default only the selected layer's
        if exported.exists():
            sheet = pd.read_excel(exported, index_col=0)
            assert list(sheet.index) == list(sheet.columns) == list(index["image"])
            # each distance to the workbook's significant digits (distances.npy holds every bit)
            rounded = [[float(format(v, f".{clusterModule.DISTANCE_XLSX_DIGITS}g")) for v in row] for row in distances]
            np.testing.assert_array_equal(sheet.to_numpy(), rounded)
    assert (analysis / summary["layer"] / "knee.png").read_bytes()[:4] == b"\x89PNG"
    # The selected layer's RCCs are published under T/<layer>/, images included.
    published = case / "T" / summary["layer"]
    assert sorted(p.name for p in published.glob("RCC*")) == sorted(
        pd.read_csv(analysis / summary["layer"] / "rcc_stats.csv")["rcc"])
    # every file of the layer's folder but the matrices, those written while it was published included
    # (the k plot, the descriptor characterisation): the same bytes, and no temporary left
    files = {p.name for p in (analysis / summary["layer"]).iterdir() if p.is_file()} - {"distances.npy"}
    assert {"knee.png", "descriptor_characterisation.xlsx", "rcc_descriptors.csv"} <= files
    assert {p.name for p in published.iterdir() if p.is_file()} == files
    for name in files:
        assert (published / name).read_bytes() == (analysis / summary["layer"] / name).read_bytes()
    copied = next(p for p in published.glob("RCC*/*.png") if not p.name.endswith("_heatmap.png"))
    expected_class, file_name = copied.name.split("__")
    assert copied.read_bytes() == (case / "DataSets" / "TestSet" / expected_class / file_name).read_bytes()
    # each error image and its overlay in its RCC and in its sub-cluster inside it, and nothing else
    labels = pd.read_csv(analysis / summary["layer"] / "rcc_labels.csv")
    wanted = set()
    for member in labels.itertuples():
        copy = f"{member.expected}__{Path(member.image).name}"
        overlay = f"{member.expected}__{Path(member.image).stem}_heatmap.png"
        wanted |= {f"{member.rcc}/{name}" for name in (copy, overlay)}
        wanted |= {f"{member.rcc}/{member.sub_rcc}/{name}" for name in (copy, overlay)}
        assert (published / member.rcc / copy).read_bytes() == (case / member.image).read_bytes()
    assert {str(p.relative_to(published)) for p in published.glob("RCC*/**/*") if p.is_file()} == wanted


def test_characterisation_matches_the_labels(make_case):
    case = make_case(per_class=8)
    add_scenarios(case)
    ctx, summary = run_steps(case)
    folder = case / "T" / "ClusterAnalysis" / summary["layer"]
    labels = pd.read_csv(folder / "rcc_labels.csv")
    book = pd.read_excel(folder / "characterisation.xlsx", sheet_name=None)
    rccs = book["RCCs"].set_index("rcc")
    for rcc, group in labels.groupby("rcc"):
        assert rccs.loc[rcc, "size"] == len(group)
        assert rccs.loc[rcc, "purity"] == pytest.approx(group["scenario"].value_counts().iloc[0] / len(group))
    quality = clusterModule.purity_coverage(pd.Categorical(labels["rcc"]).codes, labels["scenario"].to_numpy())
    assert book["Summary"]["purity"].iloc[0] == pytest.approx(quality["purity"])
    assert summary["purity"] == pytest.approx(quality["purity"])
    metadata = pd.read_csv(case / "DataSets" / "TestSet" / "metadata.csv")
    metadata["image"] = "DataSets/TestSet/" + metadata["image"]
    values = metadata.set_index("image").loc[labels["image"]]
    for row in book["Parameters"].itertuples():
        members = labels.loc[labels["rcc"] == row.rcc, "image"]
        ratio = values.loc[members, row.parameter].var() / values[row.parameter].var()
        assert ratio < 0.5 and row._3 == pytest.approx(100 * (1 - ratio))


def test_rerun_skips_and_a_changed_option_recomputes(make_case):
    case = make_case(per_class=6)
    run_steps(case)
    ctx = context(case)
    summary_file = case / "T" / "ClusterAnalysis" / "summary.csv"
    before = summary_file.stat().st_mtime_ns
    run_step(clusterModule.STEP, ctx)
    assert summary_file.stat().st_mtime_ns == before
    run_step(clusterModule.STEP, context(case, k_criterion="knee"))
    assert summary_file.stat().st_mtime_ns != before


@pytest.mark.parametrize("errors", [1, 2, 3])
def test_one_to_three_error_images(make_case, errors):
    case = make_case(per_class=6)
    ctx = context(case)
    run_step(testModule.STEP, ctx)
    results = pd.read_csv(case / "testResult.csv")
    wrong = results.index[results["result"] == "Wrong"]
    results.loc[wrong[errors:], "result"] = "Correct"  # keep only the first few errors
    results.to_csv(case / "testResult.csv", index=False)
    run_step(heatmapModule.STEP, ctx)
    summary = run_step(clusterModule.STEP, ctx)
    labels = pd.read_csv(case / "T" / "ClusterAnalysis" / summary["layer"] / "rcc_labels.csv")
    assert len(labels) == errors
    assert summary["k"] == min(errors, 2)
    page = reportModule.write_report(ctx)  # no link to a k plot that a single choice of k never drew
    for source in re.findall(r'src="([^"]+)"', page.read_text(encoding="utf-8")):
        assert (page.parent / source).is_file(), source
    if errors == 1:
        with pytest.raises(HuddError, match="--compare needs at least 2 error images"):
            clusterModule.compare(ctx)
    else:
        assert len(clusterModule.compare(ctx))


def test_identical_heatmaps_and_a_nan_layer(make_case):
    case = make_case(per_class=6)
    ctx = context(case)
    run_step(testModule.STEP, ctx)
    run_step(heatmapModule.STEP, ctx)
    folder = case / "T" / "Heatmaps"
    same = np.load(folder / "Layer2.npy")
    np.save(folder / "Layer2.npy", np.repeat(same[:1], len(same), axis=0))
    broken = np.load(folder / "Layer3.npy")
    broken[1].flat[0] = np.nan
    np.save(folder / "Layer3.npy", broken)
    run_step(clusterModule.STEP, ctx)
    table = pd.read_csv(case / "T" / "ClusterAnalysis" / "summary.csv").set_index("layer")
    assert "NaN" in table.loc["Layer3", "skipped"] and table.loc["Layer3", "selected"] is not True
    assert table.loc["Layer2", "wicd"] == 0.0
    assert not np.load(case / "T" / "ClusterAnalysis" / "Layer2" / "distances.npy").any()


def test_the_step_takes_the_two_stage_path_beyond_the_limit(make_case, monkeypatch):
    case = make_case(per_class=8)
    ctx = context(case)
    run_step(testModule.STEP, ctx)
    run_step(heatmapModule.STEP, ctx)
    errors = len(pd.read_csv(case / "T" / "Heatmaps" / "index.csv"))
    monkeypatch.setattr(clusterModule, "EXACT_LIMIT", errors - 3)
    summary = run_step(clusterModule.STEP, ctx)
    folder = case / "T" / "ClusterAnalysis" / summary["layer"]
    assert len(pd.read_csv(folder / "rcc_labels.csv")) == errors
    assert len(np.load(folder / "sample.npy")) == errors - 3
    assert np.load(folder / "distances.npy").shape == (errors - 3, errors - 3)
    assert pd.read_csv(folder / "rcc_stats.csv")["size"].sum() == errors


def test_majority_scenario_ties_are_broken_the_same_way_in_every_table():
    assert clusterModule.majority(np.array(["tilt", "occlusion"])) == ("occlusion", 0.5)
    assert clusterModule.majority(np.array(["fog", "night", "night"])) == ("night", pytest.approx(2 / 3))
    stats = clusterModule.rcc_statistics(np.array(["RCC01", "RCC01"]), np.zeros((2, 2)), np.array(["tilt", "occlusion"]))
    assert stats.loc[0, "majority_scenario"] == "occlusion"


@pytest.mark.parametrize("choice", ["all", "none"])
def test_the_distance_export_setting(make_case, choice):
    case = make_case(per_class=4)
    ctx, summary = run_steps(case, distance_xlsx=choice)
    layers = pd.read_csv(case / "T" / "Heatmaps" / "layers.csv")["layer"]
    exported = sorted(p.name for p in (case / "T" / "ClusterAnalysis").glob("*HMDistance.xlsx"))
    assert exported == (sorted(f"{layer}HMDistance.xlsx" for layer in layers) if choice == "all" else [])
    # Back to the default: the other layers' exports are removed with the rerun.
    run_step(clusterModule.STEP, context(case))
    exported = [p.name for p in (case / "T" / "ClusterAnalysis").glob("*HMDistance.xlsx")]
    assert exported == [f"{summary['layer']}HMDistance.xlsx"]


def test_the_characterisation_counts_coverage_as_the_summary_does(make_case):
    case = make_case(per_class=8)
    add_scenarios(case)
    run_steps(case, ordinary_scenario="night")  # night names the ordinary images: no root cause to cover
    analysis = case / "T" / "ClusterAnalysis"
    table = pd.read_csv(analysis / "summary.csv").set_index("layer")
    for layer in table.index:
        sheet = pd.read_excel(analysis / layer / "characterisation.xlsx", sheet_name="Summary")
        np.testing.assert_equal(sheet.loc[0, "coverage"], table.loc[layer, "coverage"])
        assert sheet.loc[0, "purity"] == pytest.approx(table.loc[layer, "purity"], rel=1e-12)  # summed in another order


def test_the_characterisation_leaves_the_ordinary_scenario_out_of_coverage(tmp_path):
    # fog (5 errors) is nowhere the majority, night everywhere: with night ordinary, nothing is covered.
    scenarios = ["night"] * 5 + ["fog"] * 3 + ["night"] * 3 + ["fog"] * 2
    labels = pd.DataFrame({"image": [f"i{k}.png" for k in range(13)], "rcc": ["RCC01"] * 8 + ["RCC02"] * 5,
                           "scenario": scenarios})
    metadata = pd.DataFrame({"scenario": scenarios, "angle": np.arange(13.0)})
    clusterModule.write_characterisation(labels, metadata, tmp_path / "c.xlsx", ordinary="night")
    assert pd.read_excel(tmp_path / "c.xlsx", sheet_name="Summary").loc[0, "coverage"] == 0.0
    clusterModule.write_characterisation(labels, metadata, tmp_path / "c.xlsx")
    assert pd.read_excel(tmp_path / "c.xlsx", sheet_name="Summary").loc[0, "coverage"] == 0.5


def test_the_layer_before_the_output_is_passed_over_only_among_the_default_layers(make_case):
    case = make_case(per_class=4)
    ctx, _ = run_steps(case)
    space = make_space("heatmaps")
    assert space.layer_before_output(ctx) == space.layers(ctx)[-1]
    named = replace(ctx, settings=replace(ctx.settings, layers=list(pd.read_csv(
        case / "T" / "Heatmaps" / "layers.csv")["module"][1:])))   # the same layers, named by the user
    assert space.layer_before_output(named) is None


def test_every_layers_k_plot_on_request_and_none_left_from_it_after(make_case):
    case = make_case(per_class=6)   # 12 errors: k from 2..4 (a layer with one choice of k gets no plot)
    ctx, _ = run_steps(case, knee_plots="all")
    analysis = case / "T" / "ClusterAnalysis"
    layers = pd.read_csv(case / "T" / "Heatmaps" / "layers.csv")["layer"]
    assert all((analysis / layer / "knee.png").read_bytes()[:4] == b"\x89PNG" for layer in layers)
    run_step(clusterModule.STEP, context(case))
    chosen = clusterModule.selected_layer(ctx.paths)
    assert [layer for layer in layers if (analysis / layer / "knee.png").exists()] == [chosen]


def test_no_distance_export_above_the_limit(make_case, monkeypatch, caplog):
    case = make_case(per_class=4)
    monkeypatch.setattr(clusterModule, "XLSX_MAX_IMAGES", 3)
    with caplog.at_level("INFO", logger="hudd"):
        ctx, summary = run_steps(case, distance_xlsx="all")
    assert not list((case / "T" / "ClusterAnalysis").glob("*HMDistance.xlsx"))
    assert f"{summary['layer']}HMDistance.xlsx not written" in caplog.text and "distances.npy" in caplog.text


def test_an_interrupted_step_keeps_its_finished_layers(make_case, monkeypatch):
    case = make_case(per_class=6)
    ctx, _ = run_steps(case)
    analysis = case / "T" / "ClusterAnalysis"
    clean = {p.relative_to(analysis): p.read_bytes() for p in analysis.rglob("*.csv")}
    clean_distances = {p.parent.name: np.load(p) for p in analysis.glob("*/distances.npy")}
    shutil.rmtree(case / "T" / "ClusterAnalysis")
    ctx.manifest.forget(clusterModule.STEP.name)

    original = clusterModule.cluster_one_layer
    clustered = []

    def killed_at_the_third_layer(ctx, space, layer, *rest):
        if len(clustered) == 2:
            raise KeyboardInterrupt
        clustered.append(layer)
        return original(ctx, space, layer, *rest)

    monkeypatch.setattr(clusterModule, "cluster_one_layer", killed_at_the_third_layer)
    with pytest.raises(KeyboardInterrupt):
        run_step(clusterModule.STEP, context(case))
    assert clustered == ["Layer0", "Layer1"] and not (analysis / "summary.csv").exists()
    kept = (analysis / "Layer1" / "distances.npy").stat().st_mtime_ns

    resumed = []
    monkeypatch.setattr(clusterModule, "cluster_one_layer",
                        lambda ctx, space, layer, *rest: resumed.append(layer) or original(ctx, space, layer, *rest))
    run_step(clusterModule.STEP, context(case))
    layers = list(pd.read_csv(case / "T" / "Heatmaps" / "layers.csv")["layer"])
    assert resumed == layers[2:]  # the finished layers are not clustered again
    assert (analysis / "Layer1" / "distances.npy").stat().st_mtime_ns == kept
    assert (analysis / ".progress.json").is_file()  # kept: what decides the clustering has not changed
    assert {p.relative_to(analysis): p.read_bytes() for p in analysis.rglob("*.csv")} == clean
    for layer, distances in clean_distances.items():
        np.testing.assert_array_equal(np.load(analysis / layer / "distances.npy"), distances)
    assert (analysis / clusterModule.selected_layer(ctx.paths) / "knee.png").is_file()


def test_a_large_distance_matrix_is_written_before_the_next_layer_is_clustered(make_case, monkeypatch):
    """Past HANDOFF_BYTES a layer's files are written before the next layer's distances are computed
    (no two large matrices in memory at once); below it they are written beside it. The files are the same."""
    case = make_case(per_class=4)
    ctx, _ = run_steps(case)
    analysis = case / "T" / "ClusterAnalysis"
    beside = {p.relative_to(analysis): p.read_bytes() for p in analysis.rglob("*.csv")}
    layers = list(pd.read_csv(case / "T" / "Heatmaps" / "layers.csv")["layer"])
    original, previous_written = clusterModule.cluster_one_layer, []

    def noting(ctx, space, layer, *rest):
        before = layers[layers.index(layer) - 1] if layer != layers[0] else None
        previous_written.append(before is None or (analysis / before / "rcc_labels.csv").is_file())
        return original(ctx, space, layer, *rest)

    monkeypatch.setattr(clusterModule, "cluster_one_layer", noting)
    monkeypatch.setattr(clusterModule, "HANDOFF_BYTES", 0)
    shutil.rmtree(analysis)
    clusterModule.STEP.compute(replace(context(case), force=True))
    assert len(previous_written) == len(layers) and all(previous_written)
    assert {p.relative_to(analysis): p.read_bytes() for p in analysis.rglob("*.csv")} == beside


def test_a_step_killed_while_it_is_recomputed_is_not_reused_afterwards(make_case, monkeypatch):
    case = make_case(per_class=4)
    ctx, _ = run_steps(case)
    assert ctx.manifest.is_current(clusterModule.STEP.name, clusterModule.STEP.fingerprint(ctx))

    def killed(*_args):
        raise KeyboardInterrupt  # what matters of a SIGKILL: nothing after this point runs

    monkeypatch.setattr(clusterModule, "cluster_one_layer", killed)
    forced = context(case)
    forced.force = True
    with pytest.raises(KeyboardInterrupt):
        run_step(clusterModule.STEP, forced)
    again = context(case)  # a new run reads the manifest from disk
    assert not again.manifest.is_current(clusterModule.STEP.name, clusterModule.STEP.fingerprint(again))


def test_a_failed_distance_workbook_is_one_clear_error_and_no_partial_file(make_case, monkeypatch):
    case = make_case(per_class=4)
    ctx, _ = run_steps(case, distance_xlsx="none")

    def failing(self, jobs, digits):
        raise RuntimeError("OSError: [Errno 28] No space left on device")

    monkeypatch.setattr(clusterModule.xlsxMatrix.WriterProcess, "write", failing)
    with pytest.raises(clusterModule.HuddError, match="No space left on device.*distance_xlsx: none"):
        clusterModule.STEP.compute(context(case, distance_xlsx="all"))
    assert not [p.name for p in (case / "T" / "ClusterAnalysis").glob("*.xlsx*") if "HMDistance" in p.name]


def test_a_change_of_what_is_written_restores_every_layer_and_force_clusters_again(make_case, monkeypatch):
    case = make_case(per_class=6)   # 12 errors: a k plot per layer (none where a layer has one choice of k)
    ctx, summary = run_steps(case)
    analysis = case / "T" / "ClusterAnalysis"
    layers = list(pd.read_csv(case / "T" / "Heatmaps" / "layers.csv")["layer"])
    shutil.rmtree(analysis / layers[1] / "RCC01")  # a person may delete RCC folders: that layer is clustered again
    labels = {layer: (analysis / layer / "rcc_labels.csv").read_bytes() for layer in layers}
    original = clusterModule.cluster_one_layer
    clustered = []
    monkeypatch.setattr(clusterModule, "cluster_one_layer",
                        lambda ctx, space, layer, *rest: clustered.append(layer) or original(ctx, space, layer, *rest))
    run_step(clusterModule.STEP, context(case, distance_xlsx="all", knee_plots="all"))
    assert clustered == [layers[1]]
    exported = sorted(p.name for p in analysis.glob("*HMDistance.xlsx"))
    assert exported == sorted(f"{layer}HMDistance.xlsx" for layer in layers)
    assert all((analysis / layer / "knee.png").is_file() and (analysis / layer / "RCC01").is_dir() for layer in layers)
    assert {layer: (analysis / layer / "rcc_labels.csv").read_bytes() for layer in layers} == labels
    forced = context(case, distance_xlsx="all", knee_plots="all")
    forced.force = True
    run_step(clusterModule.STEP, forced)
    assert clustered == [layers[1]] + layers


def test_no_workbook_is_written_while_a_thread_imports_ahead(make_case, monkeypatch):
    """Two threads importing openpyxl together can meet a partly initialised module (an ImportError
    seen in CI): the layers' characterisation workbooks wait for the thread that imports ahead."""
    case = make_case(per_class=4)
    add_scenarios(case)
    run_steps(case)
    imported, written = threading.Event(), []
    import_ahead, write_characterisation = clusterModule._import_ahead, clusterModule.write_characterisation

    def slow_import():
        time.sleep(0.5)  # longer than the first layer's clustering here
        import_ahead()
        imported.set()

    def noting_write(*args, **kwargs):
        written.append(imported.is_set())
        return write_characterisation(*args, **kwargs)

    monkeypatch.setattr(clusterModule, "_import_ahead", slow_import)
    monkeypatch.setattr(clusterModule, "write_characterisation", noting_write)
    clusterModule.STEP.compute(replace(context(case), force=True))
    assert written and all(written)


@pytest.mark.parametrize("refused", ["hard", "hard and symbolic"])
def test_images_on_another_file_system_are_linked_symbolically_else_copied(make_case, monkeypatch, refused):
    """Where hard links are refused (the images on another file system: EXDEV), the RCC folders hold
    symbolic links to the images' real paths, not a copy per layer; copies only where both are refused."""
    case = make_case(per_class=4)
    ctx, _ = run_steps(case)

    def no_link(*_args, **_kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(clusterModule.os, "link", no_link)
    if refused == "hard and symbolic":
        monkeypatch.setattr(clusterModule.os, "symlink", no_link)
    clusterModule.STEP.compute(replace(context(case), force=True))
    layer = clusterModule.selected_layer(ctx.paths)
    labels = pd.read_csv(case / "T" / "ClusterAnalysis" / layer / "rcc_labels.csv")
    for member in labels.itertuples():
        name = f"{member.expected}__{Path(member.image).name}"
        for copy in (case / "T" / "ClusterAnalysis" / layer / member.rcc / name, case / "T" / layer / member.rcc / name,
                     case / "T" / layer / member.rcc / member.sub_rcc / name):
            assert copy.is_symlink() == (refused == "hard")
            if copy.is_symlink():
                assert os.readlink(copy) == os.path.realpath(case / member.image)
            assert copy.read_bytes() == (case / member.image).read_bytes()


@pytest.mark.parametrize("refused", ["nothing", "hard", "hard and symbolic"])
def test_a_link_onto_an_existing_file_is_refused_and_never_writes_into_it(tmp_path, monkeypatch, refused):
    """A name taken twice must stop, not copy: a copy onto a hard link writes into the file it links,
    the user's image (two keypoint images of one name in different folders did that)."""
    original, other = tmp_path / "original.png", tmp_path / "other.png"
    original.write_bytes(b"the user's image")
    other.write_bytes(b"another image")
    target = tmp_path / "copy.png"
    clusterModule.link_or_copy(original, target)   # the first member: a hard link to the user's file

    def no_link(*_args, **_kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    if refused != "nothing":
        monkeypatch.setattr(clusterModule.os, "link", no_link)
    if refused == "hard and symbolic":
        monkeypatch.setattr(clusterModule.os, "symlink", no_link)
    with pytest.raises(FileExistsError):
        clusterModule.link_or_copy(other, target)
    assert original.read_bytes() == b"the user's image" and target.read_bytes() == b"the user's image"


def test_a_keypoint_set_with_one_file_name_in_several_folders_keeps_every_image_and_never_writes_one(tmp_path):
    """Face data is often kept per subject (subject0/left/0001.png, subject1/left/0001.png). The RCC and
    unsafe-set folders name each copy by its folders below the set: before, the second image of a name
    was copied onto the first one's hard link, which overwrote the user's image, then the step failed."""
    case = build_keypoint_case(tmp_path / "case", images=8)
    for set_name in ("TestSet", "ImprovementSet"):
        folder = case / "DataSets" / set_name
        table = pd.read_csv(folder / "labels.csv")
        moved = [f"subject{i % 2}/left/{i // 2:04d}.png" for i in range(len(table))]
        for old, new in zip(table["image"], moved):
            (folder / new).parent.mkdir(parents=True, exist_ok=True)
            (folder / old).rename(folder / new)
        table.assign(image=moved).to_csv(folder / "labels.csv", index=False)
    images = sorted((case / "DataSets").rglob("*.png"))
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in images}
    result = hudd("-o", str(case))
    assert result.returncode == 0, result.stderr
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in images} == before   # no image written
    layer = clusterModule.selected_layer(clusterModule.CasePaths(case))
    labels = pd.read_csv(case / "T" / "ClusterAnalysis" / layer / "rcc_labels.csv")
    assert labels["image"].str.contains("/subject1/left/").any()
    for member in labels.itertuples():   # each member its own copy, of its own bytes, in both folders
        name = f"{member.expected}__{member.image.split('/', 2)[2].replace('/', '__')}"
        for copy in (case / "T" / "ClusterAnalysis" / layer / member.rcc / name, case / "T" / layer / member.rcc / name,
                     case / "T" / layer / member.rcc / member.sub_rcc / name):
            assert copy.read_bytes() == (case / member.image).read_bytes()
    assigned = pd.read_csv(case / "T" / "UnsafeSet" / "assignments.csv")
    for row in assigned.itertuples():
        copy = case / "T" / "UnsafeSet" / row.rcc / row.image.split("/", 2)[2].replace("/", "__")
        assert copy.read_bytes() == (case / row.image).read_bytes()
    assert len(list((case / "T" / "UnsafeSet").rglob("*.png"))) == len(assigned)


def test_names_past_what_a_file_system_takes_are_cut_with_a_hash_of_the_whole():
    assert fitting_name("class_a__img 1.png") == "class_a__img 1.png"
    long_one, other = "a" * 300 + "1.png", "a" * 300 + "2.png"
    for room in (0, 12):
        cut = fitting_name(long_one, room)
        assert len(cut.encode()) == NAME_BYTES - room and cut.endswith(".png") and cut.startswith("a" * 200)
        assert fitting_name(other, room) != cut
    accents = fitting_name("é" * 200 + ".png")   # two bytes a character: cut at a character, never inside one
    assert len(accents.encode()) <= NAME_BYTES and accents.encode().decode() == accents and accents.endswith(".png")
    unsafe = assignModule.unsafe_copy(clusterModule.CasePaths(Path("/case")), "RCC01",
                                      "DataSets/ImprovementSet/class_a/" + "x" * 246 + ".png")
    assert len(unsafe.name.encode()) == NAME_BYTES and unsafe.name.startswith("class_a__xxx")


def test_an_image_whose_copy_name_would_be_too_long_gets_a_shortened_copy_and_overlay(make_case):
    """A 250-byte file name in a class folder: `<class>__<file>` and its overlay's name pass 255 bytes,
    which stopped the step with an OS error. Both are cut, with a hash of the whole name kept in them."""
    case = make_case(per_class=4)
    folder = case / "DataSets" / "TestSet" / "class_a"
    for image in sorted(folder.glob("*.png")):   # 250 bytes, the longest a file system takes being 255
        stem = image.stem.replace(" ", "_") + "_"
        image.rename(folder / (stem + "x" * (250 - len(stem.encode()) - 4) + ".png"))
    ctx, _ = run_steps(case)
    layer = clusterModule.selected_layer(ctx.paths)
    labels = pd.read_csv(case / "T" / "ClusterAnalysis" / layer / "rcc_labels.csv")
    assert labels["image"].str.len().max() > 250
    for member in labels.itertuples():
        copy = clusterModule.member_copy(ctx.paths, layer, member.rcc, member.image, member.expected, member.sub_rcc)
        assert copy.read_bytes() == (case / member.image).read_bytes() and len(copy.name.encode()) <= 255
        assert clusterModule.overlay_file(ctx.paths, layer, member.rcc, member.image, member.expected).is_file()


def test_every_array_load_of_the_threaded_step_parses_its_header_under_the_lock(make_case, monkeypatch):
    """numpy parses .npy headers with ast.literal_eval, which CPython 3.11 cannot run on two threads at
    once (a SystemError seen in this test file): the step's loads, on any of its threads, hold
    Helper.ARRAY_HEADER_LOCK while they parse."""
    import Helper
    case = make_case(per_class=4)
    add_scenarios(case)
    run_steps(case)
    load, held = np.load, []

    def noting_load(*args, **kwargs):
        held.append((threading.current_thread().name, Helper.ARRAY_HEADER_LOCK.locked()))
        return load(*args, **kwargs)

    monkeypatch.setattr(np, "load", noting_load)
    clusterModule.STEP.compute(replace(context(case), force=True))
    assert len({name for name, _ in held}) >= 2   # loads on more than one thread
    assert held and all(locked for _, locked in held), held
