"""Step 3: root-cause clusters (RCCs) of the error images, at two levels, laid out for people.

Per layer of the feature space (features.py; HUDD's heatmaps by default) the rows are normalised
(optionally projected on their principal components), their distances clustered with Ward (or HDBSCAN)
into a readable top level of at most `max_rccs` RCCs, each holding finer sub-clusters (the same tree
cut finer); then one layer is chosen (the algorithms are in clustering.py). Writes under
`CASE/T/ClusterAnalysis/`:
- `<Layer>/rcc_labels.csv`: image, expected, predicted, rcc (top level), sub_rcc (and scenario, where
  metadata.csv has it);
- `<Layer>/rcc_stats.csv` (per top-level RCC) and `sub_rcc_stats.csv` (per sub-cluster): size, icd
  (mean distance between members), majority scenario, purity;
- `<Layer>/RCC01/`, ...: each RCC's images (hard links, else copies), named `<expected class>__<file>`;
- `<Layer>/k_choice.csv` (WICD and silhouette per k), `knee.png` (their plot: the selected layer's, every
  layer's with the `knee_plots` setting), `distances.npy`, `projection.npz` (with PCA), `characterisation.xlsx`;
- `<Layer>/rcc_descriptors.csv` and `<Layer>/descriptor_characterisation.xlsx` (selected layer): per
  top-level RCC, the image and relevance descriptors (descriptors.py) that set it apart, ranked, with
  plain-words sentences; and `relevance_descriptors.csv`: where each error image's input relevance lies;
- `<Layer>HMDistance.xlsx` (the distance matrix for people: the selected layer's by default, every layer's
  or none with the `distance_xlsx` setting, up to XLSX_MAX_IMAGES images), `summary.csv`/`summary.xlsx`
  (per layer);
- `compare.csv` (`python HUDD.py -o CASE --compare`: every candidate combination, one table);
and publishes the selected layer's RCCs under `CASE/T/<Layer>/RCCxx/` (what an engineer inspects,
HUDD step 2), each image with `<file>_heatmap.png` beside it, each sub-cluster in a folder inside.

This module owns those files: the other steps and the report read them through the readers below.
The layers the step finishes are recorded (`.progress.json`) under the clustering's own inputs: a rerun
after an interruption resumes at the first unfinished layer, and one that changes only what is written
(`distance_xlsx`, `knee_plots`) restores every layer and writes the outputs again.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

import descriptors
import heatmapModule
import testModule
from clustering import (EXACT_LIMIT, LayerClustering, Projection, cluster_layer, cluster_two_stage, fit_projection,
                        five_point_gradient, k_range, output_alignments, pairwise_distances, project_rows, purity_coverage,
                        readable_quality, select_layer)
from features import BackboneSpace, FeatureSpace, PixelSpace, make_space
import xlsxMatrix
from Helper import (ARRAY_HEADER_LOCK, CasePaths, HuddError, RunContext, Step, atomic_path, copy_to_new,
                    fingerprint, fitting_name, path_below_set, read_csv, read_metadata, write_csv)

log = logging.getLogger("hudd")

# Above this many images a distance matrix is not exported to XLSX: 4 million cells (40 MB, seconds to
# write) is already past what anyone reads cell by cell, and distances.npy holds the matrix anyway.
XLSX_MAX_IMAGES = 2000
# A layer's distance matrix up to this size is written on a thread while the next layer's is computed
# (5,000 images: 200 MB); a larger one first, so that no two are in memory at once.
HANDOFF_BYTES = 256 * 2 ** 20
# The workbook's significant digits: the heatmaps are float32 (7-8 significant digits; fewer in float16),
# so past 9 a distance's digits carry no information, and 9 instead of 17 formats and deflates in 0.6 of
# the time into 0.6 of the bytes. distances.npy holds every bit.
DISTANCE_XLSX_DIGITS = 9
# The settings that decide the clusters (besides the feature space's own inputs).
CLUSTER_SETTINGS = ("cluster_space", "normalisation", "k_criterion", "layer_criterion", "max_rccs", "clusterer",
                    "min_cluster_size", "reduction", "pca_components", "ordinary_scenario")
OUTPUT_SETTINGS = ("distance_xlsx", "knee_plots")  # what is written, not how the layers are clustered

# --------------------------------------------------------------------------------------------
# The files, and their one reader
# --------------------------------------------------------------------------------------------

ANALYSIS = "ClusterAnalysis"


def analysis_dir(paths: CasePaths) -> Path:
    """T/ClusterAnalysis/: every layer's clustering, and the summary across layers."""
    return paths.t_dir / ANALYSIS


SUMMARY_FILE = "summary.csv"
QUALITY_MEASURES = ("purity", "coverage", "purity_10", "coverage_10")   # summary.csv's, where metadata exists
COMPARE_FILE = "compare.csv"
LABELS_FILE = "rcc_labels.csv"
STATS_FILE = "rcc_stats.csv"
SUB_STATS_FILE = "sub_rcc_stats.csv"
DISTANCES_FILE = "distances.npy"
SAMPLE_FILE = "sample.npy"
PROJECTION_FILE = "projection.npz"
PROGRESS_FILE = ".progress.json"
KNEE_PLOT = "knee.png"
K_CHOICE_FILE = "k_choice.csv"
CHARACTERISATION_FILE = "characterisation.xlsx"
OVERLAY_SUFFIX = "_heatmap.png"
NOISE = "noise"                   # the top-level group of the images HDBSCAN leaves unclustered
RELEVANCE_FILE = "relevance_descriptors.csv"
RCC_DESCRIPTORS_FILE = "rcc_descriptors.csv"
DESCRIPTOR_WORKBOOK = "descriptor_characterisation.xlsx"
# What the step writes into the selected layer's folder while publish_selected_layer runs on a thread.
LATE_FILES = (KNEE_PLOT, RCC_DESCRIPTORS_FILE, DESCRIPTOR_WORKBOOK)


def layer_dir(paths: CasePaths, layer: str) -> Path:
    return analysis_dir(paths) / layer


def published_dir(paths: CasePaths, layer: str) -> Path:
    """T/<Layer>/: the selected layer's RCC folders, as the seed README promises (T/LayerX/)."""
    return paths.t_dir / layer


def require_current(ctx: RunContext, purpose: str) -> None:
    """Stops with what to do where there are no clusters of the current errors to `purpose`: none on
    disk, or files the manifest no longer vouches for (the last run stopped at or before this step, e.g.
    with no error image, or was killed in it)."""
    if not has_run(ctx.paths):
        raise HuddError(f"{ctx.paths.root}: has no clustering results to {purpose}; run the pipeline with the "
                        "original model first (python HUDD.py -o CASE -m OriginalModel.pth)")
    if STEP.recorded_fingerprint(ctx) is None:
        raise HuddError(f"{ctx.paths.root}: the clustering results on disk are an earlier run's (the last run "
                        "stopped before the cluster step finished, e.g. with no error-inducing test image); run the "
                        f"pipeline again before you {purpose}")


def has_run(paths: CasePaths) -> bool:
    return (analysis_dir(paths) / SUMMARY_FILE).is_file()


def read_summary(paths: CasePaths) -> pd.DataFrame:
    """Per layer: k, wicd, silhouette, selected (and purity, coverage, rccs where scenarios exist)."""
    if not has_run(paths):
        raise HuddError(f"{analysis_dir(paths) / SUMMARY_FILE}: not found; run the cluster step first "
                        "(--steps clusters)")
    table = read_csv(analysis_dir(paths) / SUMMARY_FILE)
    table["selected"] = table["selected"].astype(str).eq("True")  # skipped layers leave the cell empty
    return table


def selected_layer(paths: CasePaths) -> str:
    table = read_summary(paths)
    return str(table.loc[table["selected"], "layer"].iloc[0])


def read_labels(paths: CasePaths, layer: str) -> pd.DataFrame:
    """image, expected, predicted, rcc (top level), sub_rcc, mean_distance_in_sub_rcc (, scenario) of every
    error image, in heatmap row order (clusterings before mean_distance_in_sub_rcc lack it)."""
    return read_csv(layer_dir(paths, layer) / LABELS_FILE, keep_default_na=False)


DISTANCE_XLSX_SUFFIX = "HMDistance.xlsx"


def distance_xlsx_file(paths: CasePaths, layer: str) -> Path:
    return analysis_dir(paths) / f"{layer}{DISTANCE_XLSX_SUFFIX}"


def read_rcc_stats(paths: CasePaths, layer: str) -> pd.DataFrame:
    """Per top-level RCC: rcc, size, sub_rccs, icd (, majority_scenario, purity)."""
    return read_csv(layer_dir(paths, layer) / STATS_FILE)


def read_sub_rcc_stats(paths: CasePaths, layer: str) -> pd.DataFrame:
    """Per sub-cluster: sub_rcc, rcc, size, icd (, majority_scenario, purity)."""
    return read_csv(layer_dir(paths, layer) / SUB_STATS_FILE)


def read_projection(paths: CasePaths, layer: str) -> Projection | None:
    """The principal components the layer's rows were projected on (None without `reduction` pca)."""
    path = layer_dir(paths, layer) / PROJECTION_FILE
    if not path.is_file():
        return None
    with ARRAY_HEADER_LOCK, np.load(path) as saved:
        return Projection(str(saved["normalisation"]), saved["mean"], saved["components"])


def characterisation_file(paths: CasePaths, layer: str) -> Path:
    return layer_dir(paths, layer) / CHARACTERISATION_FILE


def read_characterising_parameters(paths: CasePaths, layer: str) -> pd.DataFrame | None:
    """Per RCC, the parameters whose variance inside it is below half their overall variance; None
    where the test set has no metadata."""
    path = characterisation_file(paths, layer)
    if not path.is_file():
        return None
    table = pd.read_excel(path, sheet_name="Parameters", dtype={"rcc": str, "parameter": str})
    return table.astype({"variance_reduction_%": float})  # a sheet without rows (no numeric metadata) reads as text


def read_rcc_descriptors(paths: CasePaths, layer: str) -> pd.DataFrame | None:
    """Per RCC and descriptor: reference group, Cliff's delta, medians, percentile, rank and sentence
    (descriptors.rank_descriptors); None where the cluster step has not written it."""
    path = layer_dir(paths, layer) / RCC_DESCRIPTORS_FILE
    return read_csv(path, keep_default_na=False, na_values=[""]).fillna({"sentence": ""}) if path.is_file() else None


def read_relevance_descriptors(paths: CasePaths) -> pd.DataFrame:
    """Where each error image's positive input relevance lies (descriptors.RELEVANCE_DESCRIPTORS),
    indexed by image, in heatmap row order."""
    return read_csv(analysis_dir(paths) / RELEVANCE_FILE).set_index("image")


def knee_plot(paths: CasePaths, layer: str) -> Path:
    return layer_dir(paths, layer) / KNEE_PLOT


def rcc_folder(paths: CasePaths, layer: str, rcc: str, sub_rcc: str | None = None) -> Path:
    """A published top-level RCC's folder, or the folder of one of its sub-clusters (inside it)."""
    folder = published_dir(paths, layer) / rcc
    return folder / sub_rcc if sub_rcc else folder


def member_copy(paths: CasePaths, layer: str, rcc: str, image: str, expected: str, sub_rcc: str | None = None) -> Path:
    """The copy of an error image in its published RCC folder (or in its sub-cluster's)."""
    return rcc_folder(paths, layer, rcc, sub_rcc) / _copy_name(image, expected)


def overlay_file(paths: CasePaths, layer: str, rcc: str, image: str, expected: str, sub_rcc: str | None = None) -> Path:
    return rcc_folder(paths, layer, rcc, sub_rcc) / _overlay_name(_copy_name(image, expected))


def _overlay_name(copy_name: str) -> str:
    """The overlay's file name beside an image's copy: `<stem>_heatmap.png`."""
    return os.path.splitext(copy_name)[0] + OVERLAY_SUFFIX


def _copy_name(image: str, expected: str) -> str:
    """`<expected class>__<file name>`, so files of different class folders cannot collide; an image in
    folders below its set (a keypoint set's `subject1/0001.png`) keeps them in its name,
    `<expected>__subject1__0001.png`, so that two files of one name in different folders cannot either."""
    below = path_below_set(image)
    if len(below) == 2 and below[0] == expected:   # a class folder's image: its folder is `expected`
        below = below[1:]
    # short enough for its overlay's name too (the stem + OVERLAY_SUFFIX)
    return fitting_name(f"{expected}__{'__'.join(below)}", room=len(OVERLAY_SUFFIX))


# --------------------------------------------------------------------------------------------
# One layer
# --------------------------------------------------------------------------------------------

def error_metadata(ctx: RunContext, index: pd.DataFrame) -> pd.DataFrame | None:
    """The test set's metadata.csv rows of the error images, in index order; None where the test set
    has no metadata.csv or some error image has no row."""
    metadata = read_metadata(ctx.paths.set_dir("test"), ctx.paths.root)
    if metadata is None:
        return None
    rows = metadata.reindex(index["image"])
    return None if rows.isna().all(axis=1).any() else rows


@dataclass
class ErrorDescriptors:
    """What the characterisation compares: the error images' image and relevance descriptors (rows in
    heatmap order) and the correct test images' image descriptors."""

    images: pd.DataFrame
    relevance: pd.DataFrame
    correct: pd.DataFrame


def describe_errors(ctx: RunContext, index: pd.DataFrame) -> ErrorDescriptors:
    """The test step's descriptors of the error images and of the correct test images, and the
    relevance descriptors of the error images from their input-layer heatmaps."""
    table = testModule.read_descriptors(ctx.paths)
    results = testModule.read_results(ctx.paths, "test")
    correct = table.reindex(results.loc[results["result"] == "Correct", "image"])
    masks, valid = testModule.read_object_masks(ctx.paths, list(index["image"]))
    pixels = heatmapModule.open_layer(ctx.paths, heatmapModule.INPUT_LAYER)
    if pixels.shape[-2:] != masks.shape[1:]:
        log.info("object masks are %s but the input relevance is %s: relevance outside the object not measured",
                 masks.shape[1:], pixels.shape[-2:])
        masks = None
    relevance = pd.concat([descriptors.relevance_descriptors(
        np.asarray(pixels[start:start + 256]), None if masks is None else masks[start:start + 256],
        valid[start:start + 256]) for start in range(0, len(index), 256)], ignore_index=True)
    return ErrorDescriptors(images=table.reindex(index["image"]), relevance=relevance, correct=correct)


def write_descriptor_characterisation(rccs: np.ndarray, described: ErrorDescriptors, folder: Path) -> None:
    """rcc_descriptors.csv (the exchange file) and descriptor_characterisation.xlsx (for people): per
    RCC (`rccs`: each error image's top-level RCC, in heatmap row order), its descriptors ranked by
    how much they set it apart, with sentences for the first. HDBSCAN's noise group is no RCC: not
    characterised (its images are among the other error images the relevance is compared with)."""
    table = descriptors.characterise_rccs(rccs, described.images, described.correct, described.relevance,
                                          unclustered=NOISE)
    write_csv(table, folder / RCC_DESCRIPTORS_FILE)
    sizes = pd.Series(rccs)[lambda names: names != NOISE].value_counts()
    per_rcc = pd.DataFrame({"rcc": sorted(sizes.index)})
    per_rcc["size"] = per_rcc["rcc"].map(sizes)
    for rank in (1, 2, 3):
        chosen = table[table["rank"] == rank].set_index("rcc")
        per_rcc[f"descriptor {rank}"] = per_rcc["rcc"].map(chosen["descriptor"])
        per_rcc[f"delta {rank}"] = per_rcc["rcc"].map(chosen["delta"])
        per_rcc[f"sentence {rank}"] = per_rcc["rcc"].map(chosen["sentence"]).fillna("")
    deltas = table.pivot(index="rcc", columns="descriptor", values="delta")
    with atomic_path(folder / DESCRIPTOR_WORKBOOK) as temporary:
        with pd.ExcelWriter(temporary, engine="openpyxl") as book:
            per_rcc.to_excel(book, sheet_name="RCCs", index=False)
            deltas[table["descriptor"].unique()].to_excel(book, sheet_name="Effect sizes")


def describe_and_write_relevance(ctx: RunContext, index: pd.DataFrame) -> ErrorDescriptors:
    """describe_errors, and relevance_descriptors.csv from it (whichever layer is chosen)."""
    described = describe_errors(ctx, index)
    write_csv(pd.concat([index[["image"]], described.relevance], axis=1), analysis_dir(ctx.paths) / RELEVANCE_FILE)
    return described


def characterise_selected_layer(ctx: RunContext, described: ErrorDescriptors, chosen: LayerClustering) -> None:
    """The descriptor characterisation of the selected layer's top-level RCCs (of that layer only: the
    workbook alone takes about a second per layer)."""
    for name in (RCC_DESCRIPTORS_FILE, DESCRIPTOR_WORKBOOK):
        for old in analysis_dir(ctx.paths).glob(f"*/{name}"):
            old.unlink()
    top, _sub = level_names(chosen.labels, chosen.sub_labels)
    write_descriptor_characterisation(top, described, layer_dir(ctx.paths, chosen.layer))


def explained_outputs(ctx: RunContext, index: pd.DataFrame) -> np.ndarray:
    """Per error image (heatmap row), the output its relevance explains, as a group number: the
    predicted class (or the expected one, `explain`), the worst keypoint."""
    return pd.factorize(index[ctx.task.explained_column()])[0]


def scenarios_of(metadata: pd.DataFrame | None) -> np.ndarray | None:
    if metadata is None or "scenario" not in metadata.columns or metadata["scenario"].isna().any():
        return None
    return metadata["scenario"].astype(str).to_numpy()


def finite_rows(heatmaps: np.ndarray) -> str:
    """Why a layer's heatmaps are unusable ("" when every value is finite)."""
    flat = heatmaps.reshape(len(heatmaps), -1)
    for start in range(0, len(flat), 256):
        if not np.isfinite(flat[start:start + 256]).all():
            bad = start + int(np.flatnonzero(~np.isfinite(flat[start:start + 256]).all(axis=1))[0])
            return f"heatmap row {bad} holds NaN or inf"
    return ""


def clustering_options(ctx: RunContext) -> dict:
    s = ctx.settings
    return {"space": s.cluster_space, "k_criterion": s.k_criterion, "max_rccs": s.max_rccs, "clusterer": s.clusterer,
            "min_cluster_size": s.min_cluster_size}


def distance_device(ctx: RunContext):
    """The GPU for the distance blocks when the run has one (float64 there too); None: numpy on the CPU."""
    return ctx.device if ctx.device.type == "cuda" else None


def measured_rows(ctx: RunContext, rows: np.ndarray) -> tuple[np.ndarray, str, Projection | None]:
    """(rows to measure, normalisation for the distances, projection): the rows themselves with the
    case's normalisation, or (`reduction` pca) their principal components, already normalised."""
    s = ctx.settings
    projection = fit_projection(rows, s.normalisation, s.pca_components, ctx.seed) if s.reduction == "pca" else None
    return (project_rows(rows, projection), "none", projection) if projection else (rows, s.normalisation, None)


def cluster_rows(ctx: RunContext, layer: str, rows: np.ndarray):
    """(clustering, distances, sample, projection) of one layer's rows: normalised (and projected on
    their principal components with `reduction` pca), exact up to EXACT_LIMIT images, else in two
    stages (the distances then cover a seeded random sample, whose rows `sample` lists); the distance
    blocks on the run's GPU when it has one."""
    n, device, options = len(rows), distance_device(ctx), clustering_options(ctx)
    space_rows, normalisation, projection = measured_rows(ctx, rows)
    if n > EXACT_LIMIT:
        log.info("%s: %d error images, more than %d: clustering a random sample exactly and the rest by "
                 "nearest sampled row", layer, n, EXACT_LIMIT)
        result, sample, distances = cluster_two_stage(layer, space_rows, normalisation, EXACT_LIMIT, ctx.seed,
                                                      device=device, **options)
        return result, distances, sample, projection
    distances = pairwise_distances(space_rows, normalisation, device=device)
    if n < 2:
        one = np.zeros(1, dtype=np.int64)
        return LayerClustering(layer, 1, one, one, 0.0, 0.0, range(1, 2), np.zeros(2), np.zeros(2)), \
            distances, None, projection
    return cluster_layer(layer, distances, **options), distances, None, projection


def cluster_one_layer(ctx: RunContext, space: FeatureSpace, layer: str, index: pd.DataFrame, metadata):
    """(outcome, its files): the clustering of one layer and a call that writes its files (distances.npy,
    labels, statistics: write_layer_outputs), left to the step's `files` thread; (reason, None) where
    the layer is skipped."""
    rows = space.error_rows(ctx, layer)
    problem = finite_rows(rows)
    if problem:
        log.warning("%s skipped: %s (the LRP rules divide by small activations; try another rules preset)",
                    layer, problem)
        return f"{layer}: {problem}", None
    result, distances, sample, projection = cluster_rows(ctx, layer, rows)
    return result, functools.partial(write_layer_outputs, layer_dir(ctx.paths, layer), result, distances=distances,
                                     sample=sample, projection=projection, index=index, metadata=metadata,
                                     ordinary=ctx.settings.ordinary_scenario)


def write_layer_outputs(folder: Path, result: LayerClustering, distances: np.ndarray, sample: np.ndarray | None,
                        projection: Projection | None, index: pd.DataFrame, metadata, ordinary: str) -> None:
    """Everything one clustered layer writes but its RCC folders: sample.npy and projection.npz where
    there are, distances.npy, then write_layer_files."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (folder / SAMPLE_FILE, folder / PROJECTION_FILE):
        stale.unlink(missing_ok=True)
    if sample is not None:
        save_npy(sample, folder / SAMPLE_FILE)
    if projection is not None:
        save_projection(projection, folder / PROJECTION_FILE)
    save_npy(distances, folder / DISTANCES_FILE)
    write_layer_files(result, distances, index, metadata, folder, sample, ordinary=ordinary)


def save_projection(projection: Projection, path: Path) -> None:
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as stream:
            np.savez(stream, normalisation=projection.normalisation, mean=projection.mean,
                     components=projection.components)


def save_npy(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as stream:
            np.save(stream, array)


def export_distances(ctx: RunContext, index: pd.DataFrame, clustered: list[str], chosen: str,
                     writer: xlsxMatrix.WriterProcess | None) -> None:
    """`<Layer>HMDistance.xlsx` for the layers the `distance_xlsx` setting names (the selected one by
    default; "all" clustered layers; "none"), from each layer's distances.npy, named by image, written
    by `writer`'s child process; none above XLSX_MAX_IMAGES. Other layers' exports are removed, so no
    stale matrix is left beside the new clustering."""
    wanted = {"selected": [chosen], "all": clustered, "none": []}[ctx.settings.distance_xlsx]
    for path in analysis_dir(ctx.paths).glob(f"*{DISTANCE_XLSX_SUFFIX}"):
        if path.name[:-len(DISTANCE_XLSX_SUFFIX)] not in wanted:
            path.unlink()
    jobs = []
    for layer in wanted:
        folder, path = layer_dir(ctx.paths, layer), distance_xlsx_file(ctx.paths, layer)
        sampled = folder / SAMPLE_FILE  # a two-stage clustering's distances cover its sample only
        with ARRAY_HEADER_LOCK:
            names = list((index.iloc[np.load(sampled)] if sampled.is_file() else index)["image"])
        if len(names) > XLSX_MAX_IMAGES:
            log.info("%s not written: %d images is more than %d, past what anyone reads in a spreadsheet; "
                     "%s/%s holds the matrix", path.name, len(names), XLSX_MAX_IMAGES, layer, DISTANCES_FILE)
            path.unlink(missing_ok=True)
        else:
            jobs.append((path, folder / DISTANCES_FILE, names))
    if jobs:
        write_workbooks(writer, jobs)


def write_workbooks(writer: xlsxMatrix.WriterProcess, jobs: list[tuple[Path, Path, list[str]]]) -> None:
    """Each (workbook, distances.npy, image names) through the writer's child process, atomically."""
    with contextlib.ExitStack() as files:
        temporaries = [files.enter_context(atomic_path(path)) for path, _, _ in jobs]
        try:
            writer.write([(temporary, matrix, names, "distances")
                          for temporary, (_, matrix, names) in zip(temporaries, jobs)], DISTANCE_XLSX_DIGITS)
        except RuntimeError as error:
            raise HuddError(f"{jobs[0][0].parent}: the distance workbook could not be written ({error}); "
                            f"set distance_xlsx: none to go without it") from None


class LayerProgress:
    """`ClusterAnalysis/.progress.json`: the layers clustered and written (k, WICD, silhouette, or why
    the layer was skipped), under the clustering's fingerprint (ClusterStep.clustering_fingerprint), so
    that a rerun with the same clustering inputs restores them: an interrupted run resumes at the first
    unfinished layer, and a change of `distance_xlsx` or `knee_plots` only rewrites the outputs."""

    def __init__(self, folder: Path, step_print: str, resume: bool):
        self.path, self.step_print = folder / PROGRESS_FILE, step_print
        saved = json.loads(self.path.read_text()) if resume and self.path.is_file() else {}
        self.layers: dict[str, dict] = saved.get("layers", {}) if saved.get("fingerprint") == step_print else {}

    def restore(self, paths: CasePaths, layer: str) -> LayerClustering | str | None:
        """A finished layer's outcome as cluster_one_layer returned it; None when it must be computed."""
        entry = self.layers.get(layer)
        if entry is None or "skipped" in entry:
            return None if entry is None else entry["skipped"]
        if not all((layer_dir(paths, layer) / name).is_file()
                   for name in (LABELS_FILE, STATS_FILE, SUB_STATS_FILE, DISTANCES_FILE, K_CHOICE_FILE)):
            return None
        table = read_labels(paths, layer)
        if not all((layer_dir(paths, layer) / rcc).is_dir() for rcc in table["rcc"].unique()):
            return None  # a person deleted RCC folders (they may): written again
        top = np.array([-1 if name == NOISE else int(name[3:]) - 1 for name in table["rcc"]])  # RCC01 -> 0
        sub = pd.factorize(table["sub_rcc"])[0]  # RCC01.2 -> a number of its own, inside its RCC
        ks, wicd_curve, silhouette_curve = read_k_choice(layer_dir(paths, layer) / K_CHOICE_FILE)
        return LayerClustering(layer, entry["k"], top, sub, entry["wicd"], entry["silhouette"], ks, wicd_curve,
                               silhouette_curve)

    def save(self, outcome: LayerClustering | str) -> None:
        if isinstance(outcome, LayerClustering):
            self.layers[outcome.layer] = {"k": outcome.k, "wicd": outcome.wicd, "silhouette": outcome.silhouette}
        else:
            self.layers[outcome.split(":")[0]] = {"skipped": outcome}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as temporary:
            temporary.write_text(json.dumps({"fingerprint": self.step_print, "layers": self.layers}))


def level_names(labels: np.ndarray, sub_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Names of both levels, largest first: RCC01 is the largest RCC (NOISE: HDBSCAN's unclustered
    images) and, inside each, RCC01.1 its largest sub-cluster; ties go to the earlier first member."""
    top = np.empty(len(labels), dtype=object)
    top[labels < 0] = NOISE
    for number, label in enumerate(_by_size(labels[labels >= 0]), start=1):
        top[labels == label] = f"RCC{number:02d}"
    sub = np.empty(len(labels), dtype=object)
    for name in dict.fromkeys(top):
        members = np.flatnonzero(top == name)
        for number, label in enumerate(_by_size(sub_labels[members]), start=1):
            sub[members[sub_labels[members] == label]] = f"{name}.{number}"
    return top, sub


def _by_size(labels: np.ndarray) -> list:
    """The distinct labels, largest group first, ties by first appearance."""
    values, first, counts = np.unique(labels, return_index=True, return_counts=True)
    return [values[i] for i in np.lexsort((first, -counts))]


def write_layer_files(result: LayerClustering, distances, index, metadata, folder: Path,
                      measured: np.ndarray | None = None, ordinary: str = "none") -> None:
    """labels.csv, the statistics of both levels, k_choice.csv, the characterisation where scenarios
    are known; the RCC folders come after (finish_layer), the k plots at the step's end (plot_layers)."""
    scenarios = scenarios_of(metadata)
    top, sub = level_names(result.labels, result.sub_labels)
    sub_sums = sums_within_groups(sub, distances, measured)  # each sub-cluster's block taken once, for both uses
    labels = pd.DataFrame({"image": index["image"], "expected": index["expected"],
                           "predicted": index["predicted"], "rcc": top, "sub_rcc": sub,
                           "mean_distance_in_sub_rcc": mean_distance_in_group(sub, sub_sums, measured)})
    if scenarios is not None:
        labels["scenario"] = scenarios
    write_csv(labels, folder / LABELS_FILE)
    stats = rcc_statistics(top, distances, scenarios, measured).rename(columns={"name": "rcc"})
    stats.insert(2, "sub_rccs", stats["rcc"].map(labels.groupby("rcc")["sub_rcc"].nunique()).to_numpy())
    write_csv(stats, folder / STATS_FILE)
    sub_stats = rcc_statistics(sub, distances, scenarios, measured, sub_sums).rename(columns={"name": "sub_rcc"})
    sub_stats.insert(1, "rcc", [name.rsplit(".", 1)[0] for name in sub_stats["sub_rcc"]])
    write_csv(sub_stats, folder / SUB_STATS_FILE)
    write_k_choice(result, folder / K_CHOICE_FILE)
    (folder / KNEE_PLOT).unlink(missing_ok=True)  # a plot of an earlier clustering
    if scenarios is not None:
        write_characterisation(labels, metadata, folder / CHARACTERISATION_FILE, ordinary)


def rcc_statistics(names: np.ndarray, distances: np.ndarray, scenarios, measured: np.ndarray | None = None,
                   sums: np.ndarray | None = None) -> pd.DataFrame:
    """Per group (named in `names`, RCC02 before RCC10): size, ICD (mean distance between members;
    over the sampled members in a two-stage clustering) and, where scenarios are known, majority
    scenario and purity. `sums`: sums_within_groups of these groups, where the caller has them."""
    sums = sums_within_groups(names, distances, measured) if sums is None else sums
    members_of = pd.Series(names).groupby(names).indices
    measured_of = members_of if measured is None else pd.Series(names[measured]).groupby(names[measured]).indices
    rows = []
    for name in sorted(members_of, key=_name_order):
        row = {"name": name, "size": len(members_of[name]), "icd": mean_inner_distance(sums, measured_of.get(name))}
        if scenarios is not None:
            row.update(zip(("majority_scenario", "purity"), majority(scenarios[members_of[name]])))
        rows.append(row)
    return pd.DataFrame(rows)


def sums_within_groups(names: np.ndarray, distances: np.ndarray, measured: np.ndarray | None = None) -> np.ndarray:
    """Per row of `distances` (the images `measured`, or every image), the sum of its distances to the
    other measured members of its group: what both the mean distance in a group (per image) and the
    ICD (per group) are made of. Group by group, never the whole matrix reordered (a two-stage sample's
    matrix is gigabytes)."""
    groups = names if measured is None else names[measured]
    sums = np.zeros(len(groups))
    for at in pd.Series(groups).groupby(groups).indices.values():
        block = distances[np.ix_(at, at)]
        sums[at] = block.sum(axis=1) - np.diagonal(block)
    return sums


def mean_distance_in_group(names: np.ndarray, sums: np.ndarray, measured: np.ndarray | None = None) -> np.ndarray:
    """Per image, its mean distance to the other members of its group (from sums_within_groups): the
    smallest are the group's most typical members, which the report shows first. 0 for a member alone;
    inf for an image a two-stage clustering did not measure (`measured`: the images the sums are of)."""
    result = np.full(len(names), np.inf)
    rows = np.arange(len(names)) if measured is None else np.asarray(measured)
    groups = pd.Series(names[rows])
    others = groups.map(groups.value_counts()).to_numpy() - 1
    result[rows] = sums / np.maximum(others, 1)
    return result


def mean_inner_distance(sums: np.ndarray, members: np.ndarray | None) -> float:
    """The mean distance over the pairs of members (`sums`: sums_within_groups; each pair counted from
    both ends); 0 for fewer than two."""
    m = 0 if members is None else len(members)
    if m < 2:
        return 0.0
    return float(sums[members].sum() / (m * (m - 1)))


def _name_order(name: str) -> tuple:
    """RCC02 before RCC10, RCC01.2 before RCC01.10, the noise group last."""
    if name.startswith(NOISE):
        return (1, [int(p) for p in name.split(".")[1:]])
    return (0, [int(p) for p in name[3:].split(".")])


def majority(scenarios: np.ndarray) -> tuple[str, float]:
    """The most common scenario (ties: the first in alphabetical order) and its share."""
    values, counts = np.unique(scenarios, return_counts=True)
    return values[np.argmax(counts)], counts.max() / counts.sum()


def copy_rcc_images(case_root: Path, labels: pd.DataFrame, folder: Path) -> None:
    """One folder per RCC holding its images: hard links where the file system allows (each opens as
    the image itself, on any OS, and costs no disk: a person may delete them freely), else copies."""
    for old in [*folder.glob("RCC*"), folder / NOISE]:
        if old.is_dir():
            shutil.rmtree(old)
    for rcc in labels["rcc"].unique():
        (folder / rcc).mkdir()
    for image, expected, rcc in zip(labels["image"], labels["expected"], labels["rcc"]):  # strings: 8,000 links a second
        link_or_copy(os.path.join(case_root, image), os.path.join(folder, rcc, _copy_name(image, expected)))


def write_k_choice(result: LayerClustering, path: Path) -> None:
    """The curves the top level's k was chosen on: per k, WICD and silhouette (empty where not
    computed), and whether k was in the top level's range."""
    ks = np.arange(len(result.wicd_curve))
    write_csv(pd.DataFrame({"k": ks, "wicd": result.wicd_curve, "silhouette": result.silhouette_curve,
                            "top_level_range": np.isin(ks, list(result.ks))}), path)


def read_k_choice(path: Path) -> tuple[range, np.ndarray, np.ndarray]:
    """(the top level's range of k, WICD curve, silhouette curve) as write_k_choice wrote them."""
    table = read_csv(path)
    top = table.loc[table["top_level_range"], "k"]
    ks = range(int(top.min()), int(top.max()) + 1) if len(top) else range(0)
    return ks, table["wicd"].to_numpy(float), table["silhouette"].to_numpy(float)


def plot_k_choice(result: LayerClustering, path: Path) -> None:
    """WICD, its gradient and the silhouette over k; the top level's range shaded, its k in red, the
    sub-clusters' k dashed grey (nothing where the layer had a single choice of k)."""
    if len(result.ks) < 2:
        return
    from matplotlib.figure import Figure  # not pyplot: no global figure state, nothing to close
    # WICD over the original's sweep of k; the silhouette where it was computed (the top level's range)
    ks = np.array(list(k_range(len(result.wicd_curve) - 1))) if len(result.wicd_curve) > 4 else np.array(list(result.ks))
    silhouette_ks = ks[np.isfinite(result.silhouette_curve[ks])]
    figure = Figure(figsize=(7, 6))
    top, bottom = figure.subplots(2, 1, sharex=True)
    top.plot(ks, result.wicd_curve[ks], color="tab:blue")
    top.set_ylabel("WICD")
    top.set_title(f"{result.layer}: {result.k} root-cause clusters, {result.k_sub} sub-clusters")
    bottom.plot(ks, five_point_gradient(result.wicd_curve[ks]), color="tab:blue", label="WICD gradient")
    bottom.set_ylabel("gradient of WICD")
    twin = bottom.twinx()
    twin.plot(silhouette_ks, result.silhouette_curve[silhouette_ks], color="tab:orange", label="silhouette")
    twin.set_ylabel("silhouette", color="tab:orange")
    for axis in (top, bottom):
        axis.axvspan(min(result.ks), max(result.ks), color="tab:green", alpha=0.08)
        axis.axvline(result.k, color="tab:red", linestyle="--")
        axis.axvline(result.k_sub, color="grey", linestyle=":")
    bottom.set_xlabel("k (shaded: the top level's range)")
    figure.subplots_adjust(left=0.12, right=0.88, top=0.94, bottom=0.09, hspace=0.08)  # tight_layout's, fixed: half the time
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=90)


def plot_layers(ctx: RunContext, results: list[LayerClustering], chosen: LayerClustering) -> None:
    """The k plot of the selected layer (`knee_plots` selected) or of every clustered layer (all); no
    other layer keeps one (every layer's curves are in its k_choice.csv)."""
    plotted = results if ctx.settings.knee_plots == "all" else [chosen]
    for old in analysis_dir(ctx.paths).glob(f"*/{KNEE_PLOT}"):
        if old.parent.name not in {result.layer for result in plotted}:
            old.unlink()
    for result in plotted:
        plot_k_choice(result, knee_plot(ctx.paths, result.layer))


def write_characterisation(labels: pd.DataFrame, metadata: pd.DataFrame, path: Path, ordinary: str = "none") -> None:
    """The original's RQ1 analysis (reference §10.1): per top-level RCC, its purity and majority
    scenario, and the numeric parameters whose variance inside the RCC is below half their variance
    over all error images (a parameter only where most of the RCC's members have a value for it)."""
    params = metadata.set_axis(labels["image"].to_numpy()).select_dtypes("number")
    overall = params.var()
    params = params.loc[:, overall > 0]
    overall = overall[overall > 0]
    per_rcc, reduced = [], []
    for rcc, group in labels.groupby("rcc"):
        scenario, purity = majority(group["scenario"].to_numpy())
        per_rcc.append({"rcc": rcc, "size": len(group), "majority_scenario": scenario, "purity": purity})
        if len(group) >= 2:
            reduced += reduced_parameters(rcc, params.loc[group["image"].to_numpy()], overall)
    codes = np.where(labels["rcc"] == NOISE, -1, pd.Categorical(labels["rcc"]).codes)
    quality = purity_coverage(codes, labels["scenario"].to_numpy(), ordinary=ordinary)  # as summary.csv counts it
    summary = pd.DataFrame([{"rccs_with_2+": quality["rccs"], "purity": quality["purity"],
                             "coverage": quality["coverage"]}])
    with atomic_path(path) as temporary:
        with pd.ExcelWriter(temporary, engine="openpyxl") as book:
            summary.to_excel(book, sheet_name="Summary", index=False)
            pd.DataFrame(per_rcc).to_excel(book, sheet_name="RCCs", index=False)
            pd.DataFrame(reduced, columns=["rcc", "parameter", "variance_reduction_%", "mean", "min", "max", "median",
                                           "std", "members_with_value"]).to_excel(book, sheet_name="Parameters",
                                                                                   index=False)


def reduced_parameters(rcc: str, values: pd.DataFrame, overall: pd.Series) -> list[dict]:
    """The parameters of one RCC's members whose variance is below half the overall variance, among
    those that most of its members (more than half, at least two) have a value for: a parameter that
    two rotated images of 58 carry says nothing about the other 56."""
    rows = []
    present = values.notna().sum()
    for name, ratio in zip(values.columns, values.var().to_numpy() / overall.to_numpy()):
        if present[name] * 2 > len(values) and present[name] >= 2 and ratio < 0.5:
            column = values[name]
            rows.append({"rcc": rcc, "parameter": name, "variance_reduction_%": 100 * (1 - ratio),
                         "mean": column.mean(), "min": column.min(), "max": column.max(),
                         "median": column.median(), "std": column.std(), "members_with_value": int(present[name])})
    return rows


def layer_row(result: LayerClustering, scenarios, ordinary: str, alignment: float) -> dict:
    """One layer's line of summary.csv: both levels' sizes, the criteria, and what a reader sees."""
    row = {"layer": result.layer, "k": result.k, "sub_k": result.k_sub, "wicd": result.wicd,
           "silhouette": result.silhouette, "output_alignment": alignment}
    row.update(readable_quality(result.labels, scenarios, ordinary=ordinary))
    return row


def write_summary(results, skipped, chosen, scenarios, alignments: dict[str, float], analysis: Path,
                  ordinary: str = "none") -> None:
    rows = [{**layer_row(r, scenarios, ordinary, alignments[r.layer]), "selected": r.layer == chosen.layer}
            for r in results]
    rows += [{"layer": reason.split(":")[0], "skipped": reason.split(": ", 1)[1]} for reason in skipped]
    table = pd.DataFrame(rows)
    write_csv(table, analysis / SUMMARY_FILE)
    with atomic_path(analysis / "summary.xlsx") as temporary:
        table.to_excel(temporary, index=False, sheet_name="layers")


# --------------------------------------------------------------------------------------------
# The selected layer, published with heatmap overlays
# --------------------------------------------------------------------------------------------

def publish_selected_layer(ctx: RunContext, layer: str) -> None:
    """The selected layer's RCC folders under T/<Layer>/, each image with its heatmap overlay (drawn by
    the heatmap step), and inside each RCC a folder per sub-cluster, beside the layer's tables; all links
    to the same files (link_or_copy: no second copy on disk where the file system allows). Linked
    from the case's images and the layer's labels, not from the layer's own RCC folders, so that it runs
    while those are linked. The files the step writes into the layer's folder meanwhile (LATE_FILES)
    are left to publish_late_files."""
    for old in [*ctx.paths.t_dir.glob("Layer*"), ctx.paths.t_dir / PixelSpace.LAYER, ctx.paths.t_dir / BackboneSpace.LAYER]:
        if old.is_dir():
            shutil.rmtree(old)
    published_dir(ctx.paths, layer).mkdir(parents=True)
    unpublished = {DISTANCES_FILE, SAMPLE_FILE, PROJECTION_FILE, *LATE_FILES}
    for entry in os.scandir(layer_dir(ctx.paths, layer)):
        if entry.is_file() and entry.name not in unpublished and not entry.name.startswith("."):
            link_or_copy(entry.path, published_dir(ctx.paths, layer) / entry.name)
    labels = read_labels(ctx.paths, layer)
    for rcc, sub_rcc in labels[["rcc", "sub_rcc"]].drop_duplicates().itertuples(index=False):
        rcc_folder(ctx.paths, layer, rcc, sub_rcc).mkdir(parents=True, exist_ok=True)
    published, overlays = str(published_dir(ctx.paths, layer)), str(heatmapModule.overlay_dir(ctx.paths))
    case_root = str(ctx.paths.root)
    columns = (labels[name] for name in ("image", "expected", "rcc", "sub_rcc"))
    for row, (image, expected, rcc, sub_rcc) in enumerate(zip(*columns)):  # labels rows are heatmap rows
        # strings, not Path: four links per error image (the RCC's folder took 0.8 s at 1,000 with Path)
        copy, top = _copy_name(image, expected), os.path.join(published, rcc)
        overlay = _overlay_name(copy)
        link_or_copy(os.path.join(case_root, image), os.path.join(top, copy))
        link_or_copy(os.path.join(overlays, heatmapModule.overlay_name(row)), os.path.join(top, overlay))
        for name in (copy, overlay):
            link_or_copy(os.path.join(top, name), os.path.join(top, sub_rcc, name))


def publish_late_files(ctx: RunContext, layer: str) -> None:
    """The selected layer's LATE_FILES, written while its folders were published, linked in beside them."""
    for name in LATE_FILES:
        if (layer_dir(ctx.paths, layer) / name).is_file():
            link_or_copy(layer_dir(ctx.paths, layer) / name, published_dir(ctx.paths, layer) / name)


def link_or_copy(source: Path | str, target: Path | str) -> None:
    """A hard link of `source` at `target`; where the file system refuses one (`source` on another file
    system, as a DataSets folder linked in from a data disk; some network shares) a symbolic link to its
    real path, which costs no disk either (a copy of every error image per layer would cost gigabytes on a
    real case); a copy only where neither is possible (FAT drives, Windows without the privilege). The
    signature of shutil.copytree's copy_function.

    An existing `target` is an error (FileExistsError), never written (copy_to_new)."""
    try:
        os.link(source, target)
        return
    except FileExistsError:
        raise
    except OSError:
        pass
    try:
        os.symlink(os.path.realpath(source), target)
    except OSError:   # an existing target included: copy_to_new refuses it too
        copy_to_new(source, target)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------

def cluster_every_layer(ctx: RunContext, index: pd.DataFrame, metadata, progress: LayerProgress,
                        files: ThreadPoolExecutor
                        ) -> tuple[list[LayerClustering], list[str], str | None, list[Future], list[Future]]:
    """(clusterings, reasons of the skipped layers, the layer before the output, and the `files` thread's
    pending jobs: the layers' files, the layers' folders) of every layer of the feature space; a layer
    an interrupted run finished is restored, not clustered again. Each layer's files, then its RCC
    folders, are written on the `files` thread while the next layer's distances run (numpy's writes and
    the links are system calls, free of the GIL; the tables' pandas work is not, yet side by side the
    step was faster so: bench/README); the layer is saved as finished after both. A distance matrix
    past HANDOFF_BYTES is written before the next one is computed: two of them in memory at once would
    double the step's peak."""
    space = make_space(ctx.settings.features)
    results, skipped, layers, written, linked = [], [], space.layers(ctx), [], []
    for layer in tqdm(layers, desc="clustering layers", unit="layer", leave=False, disable=None):
        outcome = progress.restore(ctx.paths, layer)
        if outcome is None:
            outcome, write = cluster_one_layer(ctx, space, layer, index, metadata)
            files_job = files.submit(write) if write is not None else None
            written += [files_job] if files_job else []
            linked.append(files.submit(finish_layer, ctx.paths, outcome, files_job, progress))
            if files_job and write.keywords["distances"].nbytes > HANDOFF_BYTES:
                files_job.result()
        (results if isinstance(outcome, LayerClustering) else skipped).append(outcome)
    if not results:
        raise HuddError(f"{heatmapModule.heatmaps_dir(ctx.paths)}: no layer could be clustered "
                        f"({'; '.join(skipped)})")
    return results, skipped, space.layer_before_output(ctx), written, linked


def finish_layer(paths: CasePaths, outcome: LayerClustering | str, files_job: Future | None,
                 progress: LayerProgress) -> None:
    """A clustered layer's RCC folders (from the labels.csv that `files_job` wrote), then the layer saved
    as finished: a resumed run trusts its files and folders, so a failure of either leaves it
    unfinished (files_job.result() raises the files' error)."""
    if files_job is not None:
        files_job.result()
    if isinstance(outcome, LayerClustering):
        copy_rcc_images(paths.root, read_labels(paths, outcome.layer), layer_dir(paths, outcome.layer))
    progress.save(outcome)


def distance_writer(ctx: RunContext, errors: int) -> contextlib.AbstractContextManager:
    """The distance workbooks' writer process, started with the step; none with distance_xlsx none or
    more than XLSX_MAX_IMAGES error images (no workbook is written then)."""
    wanted = ctx.settings.distance_xlsx != "none" and errors <= XLSX_MAX_IMAGES
    return xlsxMatrix.WriterProcess() if wanted else contextlib.nullcontext()


def _import_ahead() -> None:
    """What the step's end imports (a second together), imported on a thread while the distances run."""
    import matplotlib.figure  # noqa: F401  (the k plot's)
    import matplotlib.backends.backend_agg  # noqa: F401
    import openpyxl  # noqa: F401  (the workbooks')
    import pandas.io.excel._openpyxl  # noqa: F401


class ClusterStep(Step):
    name, title = "clusters", "cluster step"
    # 2: two levels of RCCs, feature spaces; 3: the descriptor characterisation; 4: never the layer before
    # the output; 5: a few top-level groups only above a silhouette of 0.5; 6: nor a layer whose RCCs are
    # the explained output again (output_alignment); 7: at most one top-level RCC per 3 error images
    version = 7

    def inputs(self, ctx: RunContext) -> dict:
        s = ctx.settings
        return {"heatmaps": heatmapModule.STEP.recorded_fingerprint(ctx),
                "descriptors": testModule.STEP.recorded_fingerprint(ctx), **make_space(s.features).inputs(ctx),
                **{key: getattr(s, key) for key in CLUSTER_SETTINGS + OUTPUT_SETTINGS}}

    def outputs(self, ctx: RunContext) -> list[Path]:
        return [analysis_dir(ctx.paths) / SUMMARY_FILE, published_dir(ctx.paths, selected_layer(ctx.paths))]

    def compute(self, ctx: RunContext) -> None:
        index = heatmapModule.read_index(ctx.paths)
        metadata = error_metadata(ctx, index)
        progress = LayerProgress(analysis_dir(ctx.paths), self.clustering_fingerprint(ctx), resume=not ctx.force)
        # Beside the algorithm, on three threads. `files` imports ahead, writes each layer's files and links
        # its RCC folders (in layer order); at the end `publisher` publishes the selected layer; `side` describes
        # the error images (whichever layer is chosen), then hands the distance workbook to its writer
        # process (a second of formatting at 1,000 images, started now) and waits for it. Meanwhile this
        # thread writes the summary, the characterisation and the k plot, once every layer's files are
        # written (they go into the layers' folders). The writer is entered first so that it ends last.
        if ctx.settings.k_criterion == "knee":
            import kneed  # noqa: F401  (it imports matplotlib.pyplot: here, never beside the thread importing ahead)
        make_space(ctx.settings.features).read_ahead(ctx)   # its forward passes fork workers: before any thread
        with distance_writer(ctx, len(index)) as writer, ThreadPoolExecutor(1) as files, \
                ThreadPoolExecutor(1) as side, ThreadPoolExecutor(1) as publisher:
            imported = files.submit(_import_ahead)  # hidden behind the distances' matrix products
            described = side.submit(describe_and_write_relevance, ctx, index)
            results, skipped, before_output, written, linked = cluster_every_layer(ctx, index, metadata, progress,
                                                                                   files)
            # The import finished before this thread imports any of it: two threads importing openpyxl
            # together can meet a partly initialised module (ImportError, seen in CI). The last layer's
            # folders are linked meanwhile.
            for job in [imported, *written]:
                job.result()
            alignments = output_alignments(results, explained_outputs(ctx, index))
            chosen = select_layer(results, ctx.settings.layer_criterion, last_layer=before_output,
                                  alignments=alignments)
            published = publisher.submit(publish_selected_layer, ctx, chosen.layer)  # beside the last links
            exported = side.submit(export_distances, ctx, index, [r.layer for r in results], chosen.layer, writer)
            write_summary(results, skipped, chosen, scenarios_of(metadata), alignments, analysis_dir(ctx.paths),
                          ctx.settings.ordinary_scenario)
            characterise_selected_layer(ctx, described.result(), chosen)
            plot_layers(ctx, results, chosen)
            for job in [*linked, published]:
                job.result()  # a thread's error, raised here
            publish_late_files(ctx, chosen.layer)
            exported.result()

    def clustering_fingerprint(self, ctx: RunContext) -> str:
        """The fingerprint of what decides the clustering itself: the step's inputs but the settings
        that only choose what is written (a change of those restores every layer, LayerProgress)."""
        inputs = {k: v for k, v in self.inputs(ctx).items() if k not in OUTPUT_SETTINGS}
        return fingerprint({"step": self.name, "version": self.version, **inputs})

    def summary(self, ctx: RunContext) -> dict:
        table = read_summary(ctx.paths)
        chosen = table[table["selected"]].iloc[0]
        summary = {"layer": chosen["layer"], "k": int(chosen["k"]), "sub_k": int(chosen["sub_k"]),
                   "noise": int(chosen["noise"]), "median_size": float(chosen["median_size"]),
                   "folder": published_dir(ctx.paths, chosen["layer"]), "table": table,
                   "features": ctx.settings.features}
        stats = read_rcc_stats(ctx.paths, chosen["layer"])
        singles = single_image_rccs(stats)
        groups = stats.loc[~stats["rcc"].isin(singles) & (stats["rcc"] != NOISE), "size"]
        summary["single_images"] = len(singles)
        summary["group_median_size"] = float(groups.median()) if len(groups) else 0.0
        for key in QUALITY_MEASURES:
            if key in table.columns:
                summary[key] = float(chosen[key])
        return summary


def single_image_rccs(stats: pd.DataFrame) -> list[str]:
    """The top-level RCCs of one image (rcc_stats.csv's rows), when there are two or more: a small or weakly
    structured case cut at its bound leaves images that resemble no other error closely enough to share an
    RCC (a resnet18 case of 59 errors: 11 of its 19 RCCs). The summary counts them apart and the report
    gathers them on one line; one such RCC is shown as any other."""
    singles = sorted(stats.loc[(stats["size"] == 1) & (stats["rcc"] != NOISE), "rcc"])
    return singles if len(singles) >= 2 else []


STEP = ClusterStep()


# --------------------------------------------------------------------------------------------
# --compare: the candidate combinations on a case that has run, side by side
# --------------------------------------------------------------------------------------------

def candidates(ctx: RunContext) -> list[dict]:
    """Feature spaces x reduction x clusterer; the case's own combination first. The backbone space
    only where the case names one."""
    spaces = ["heatmaps", "activations"] + (["backbone"] if ctx.settings.backbone and ctx.settings.backbone_weights else [])
    own = {key: getattr(ctx.settings, key) for key in ("features", "reduction", "clusterer")}
    grid = [{"features": f, "reduction": r, "clusterer": c} for f in spaces for r in ("none", "pca")
            for c in ("ward", "hdbscan")]
    return [own] + [g for g in grid if g != own]


def compare(ctx: RunContext) -> pd.DataFrame:
    """One line per candidate combination (its layer chosen by layer_criterion, as the step would):
    top-level RCCs, median size, noise, purity and coverage overall and of the 10 and 20 largest, and
    Ward on the raw pixels at the same k for comparison. Written to T/ClusterAnalysis/compare.csv."""
    from dataclasses import replace
    index = heatmapModule.read_index(ctx.paths)
    if len(index) < 2:
        raise HuddError(f"{ctx.paths.root}: --compare needs at least 2 error images to cluster, the case has "
                        f"{len(index)}; its single RCC is in T/ClusterAnalysis")
    scenarios, explained = scenarios_of(error_metadata(ctx, index)), explained_outputs(ctx, index)
    rows, measured = [], {}
    pixels = pixel_tree(ctx) if scenarios is not None else None   # one Ward tree; each candidate cuts it
    for candidate in tqdm(candidates(ctx), desc="comparing", unit="combination", leave=False, disable=None):
        variant = replace(ctx, settings=replace(ctx.settings, **candidate))
        key = (candidate["features"], candidate["reduction"])   # the clusterers share their distances
        space = make_space(candidate["features"])
        if key not in measured:
            measured[key] = layer_distances(variant, space)
        clustered = [cluster_layer(layer, d, **clustering_options(variant)) for layer, d in measured[key]]
        chosen = select_layer(clustered, ctx.settings.layer_criterion, last_layer=space.layer_before_output(variant),
                              alignments=output_alignments(clustered, explained))
        quality = readable_quality(chosen.labels, scenarios, ordinary=ctx.settings.ordinary_scenario)
        rows.append({**candidate, "layer": chosen.layer, **quality,
                     "pixels_purity": pixel_purity(pixels, chosen.k, scenarios, ctx.settings.ordinary_scenario)})
    table = pd.DataFrame(rows)
    table.insert(0, "default", [True] + [False] * (len(table) - 1))
    write_csv(table, analysis_dir(ctx.paths) / COMPARE_FILE)
    return table


def layer_distances(ctx: RunContext, space: FeatureSpace) -> list[tuple[str, np.ndarray]]:
    """(layer, distance matrix) of every usable layer of a space, as the step measures them
    (normalised, projected with `reduction` pca); exact, so for cases up to EXACT_LIMIT errors."""
    s, found = ctx.settings, []
    for layer in space.layers(ctx):
        rows = space.error_rows(ctx, layer)
        if len(rows) < 2 or finite_rows(rows):
            continue
        space_rows, normalisation, _ = measured_rows(ctx, rows)
        found.append((layer, pairwise_distances(space_rows, normalisation)))
    return found


def pixel_tree(ctx: RunContext) -> np.ndarray:
    """Ward's tree of the error images' raw pixels (as the model sees them, unnormalised)."""
    from clustering import ward_tree
    return ward_tree(pairwise_distances(PixelSpace().error_rows(ctx, PixelSpace.LAYER), "none"))


def pixel_purity(tree: np.ndarray | None, k: int, scenarios, ordinary: str) -> float:
    """Purity of Ward on the raw pixels (`pixel_tree`) cut at `k` RCCs."""
    if tree is None or scenarios is None or k < 2:
        return float("nan")
    from clustering import labels_at
    return purity_coverage(labels_at(tree, len(tree) + 1, k), scenarios, ordinary=ordinary)["purity"]
