"""Step 3: root-cause clusters (RCCs) of the error images' heatmaps, laid out for people.

Per layer (the algorithms are in clustering.py): distances between heatmaps, Ward clustering, k chosen
automatically; then one layer chosen. Writes under `CASE/T/ClusterAnalysis/`:
- `<Layer>/rcc_labels.csv`: image, expected, predicted, rcc (and scenario, where metadata.csv has it);
- `<Layer>/rcc_stats.csv`: rcc, size, icd (mean distance between members), majority scenario, purity;
- `<Layer>/RCC01/`, ...: copies of each RCC's images, named `<expected class>__<file>`;
- `<Layer>/knee.png`, `<Layer>/distances.npy`, `<Layer>/characterisation.xlsx` (where metadata exists);
- `<Layer>HMDistance.xlsx` (the distance matrix for people) and `summary.csv`/`summary.xlsx` (per layer:
  k, WICD, silhouette, purity, coverage, selected);
and publishes the selected layer's RCC folders under `CASE/T/<Layer>/` (what an engineer inspects, HUDD
step 2), each image with `<file>_heatmap.png` beside it: the image and its pixel relevance overlaid.

This module owns those files: the other steps and the report read them through the readers below.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

import heatmapModule
from clustering import (EXACT_LIMIT, LayerClustering, cluster_layer, cluster_two_stage, five_point_gradient,
                        pairwise_distances, purity_coverage, select_layer)
from Helper import CasePaths, HuddError, RunContext, Step, atomic_path, read_metadata, write_csv

log = logging.getLogger("hudd")

EXCEL_MAX_IMAGES = 16383          # Excel's 16,384 columns, one taken by the row names
OVERLAY_TILE = 96                 # pixels per overlay half (image | image with relevance)

# --------------------------------------------------------------------------------------------
# The files, and their one reader
# --------------------------------------------------------------------------------------------

ANALYSIS = "ClusterAnalysis"


def analysis_dir(paths: CasePaths) -> Path:
    """T/ClusterAnalysis/: every layer's clustering, and the summary across layers."""
    return paths.t_dir / ANALYSIS


SUMMARY_FILE = "summary.csv"
LABELS_FILE = "rcc_labels.csv"
STATS_FILE = "rcc_stats.csv"
DISTANCES_FILE = "distances.npy"
SAMPLE_FILE = "sample.npy"
KNEE_PLOT = "knee.png"
CHARACTERISATION_FILE = "characterisation.xlsx"
OVERLAY_SUFFIX = "_heatmap.png"


def layer_dir(paths: CasePaths, layer: str) -> Path:
    return analysis_dir(paths) / layer


def published_dir(paths: CasePaths, layer: str) -> Path:
    """T/<Layer>/: the selected layer's RCC folders, as the seed README promises (T/LayerX/)."""
    return paths.t_dir / layer


def has_run(paths: CasePaths) -> bool:
    return (analysis_dir(paths) / SUMMARY_FILE).is_file()


def read_summary(paths: CasePaths) -> pd.DataFrame:
    """Per layer: k, wicd, silhouette, selected (and purity, coverage, rccs where scenarios exist)."""
    if not has_run(paths):
        raise HuddError(f"{analysis_dir(paths) / SUMMARY_FILE}: not found; run the cluster step first "
                        "(--steps clusters)")
    table = pd.read_csv(analysis_dir(paths) / SUMMARY_FILE)
    table["selected"] = table["selected"].astype(str).eq("True")  # skipped layers leave the cell empty
    return table


def selected_layer(paths: CasePaths) -> str:
    table = read_summary(paths)
    return str(table.loc[table["selected"], "layer"].iloc[0])


def read_labels(paths: CasePaths, layer: str) -> pd.DataFrame:
    """image, expected, predicted, rcc (, scenario) of every error image, in heatmap row order."""
    return pd.read_csv(layer_dir(paths, layer) / LABELS_FILE, keep_default_na=False)


def read_rcc_stats(paths: CasePaths, layer: str) -> pd.DataFrame:
    return pd.read_csv(layer_dir(paths, layer) / STATS_FILE)


def characterisation_file(paths: CasePaths, layer: str) -> Path:
    return layer_dir(paths, layer) / CHARACTERISATION_FILE


def read_characterising_parameters(paths: CasePaths, layer: str) -> pd.DataFrame | None:
    """Per RCC, the parameters whose variance inside it is below half their overall variance; None
    where the test set has no metadata."""
    path = characterisation_file(paths, layer)
    return pd.read_excel(path, sheet_name="Parameters") if path.is_file() else None


def knee_plot(paths: CasePaths, layer: str) -> Path:
    return layer_dir(paths, layer) / KNEE_PLOT


def member_copy(paths: CasePaths, layer: str, rcc: str, image: str, expected: str) -> Path:
    """The copy of an error image in its published RCC folder."""
    return published_dir(paths, layer) / rcc / _copy_name(image, expected)


def overlay_file(paths: CasePaths, layer: str, rcc: str, image: str, expected: str) -> Path:
    copy = member_copy(paths, layer, rcc, image, expected)
    return copy.with_name(copy.stem + OVERLAY_SUFFIX)


def _copy_name(image: str, expected: str) -> str:
    """`<expected class>__<file name>`, so files of different class folders cannot collide."""
    return f"{expected}__{Path(image).name}"


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


def cluster_heatmaps(ctx: RunContext, layer: str, heatmaps: np.ndarray):
    """(clustering, distances, sample): exact up to EXACT_LIMIT images, else in two stages (the
    distances then cover a seeded random sample, whose rows `sample` lists)."""
    s, n = ctx.settings, len(heatmaps)
    if n > EXACT_LIMIT:
        log.info("%s: %d error images, more than %d: clustering a random sample exactly and the rest by "
                 "nearest sampled heatmap", layer, n, EXACT_LIMIT)
        result, sample, distances = cluster_two_stage(layer, heatmaps, s.normalisation, s.cluster_space,
                                                      s.k_criterion, EXACT_LIMIT, ctx.seed)
        return result, distances, sample
    distances = pairwise_distances(heatmaps, s.normalisation)
    if n < 2:
        return LayerClustering(layer, 1, np.zeros(1, dtype=np.int64), 0.0, 0.0, range(1, 2), np.zeros(2),
                               np.zeros(2)), distances, None
    return cluster_layer(layer, distances, s.cluster_space, s.k_criterion), distances, None


def cluster_one_layer(ctx: RunContext, layer: str, index: pd.DataFrame, metadata):
    """Distances, clustering and the files of one layer; a reason string where it is skipped."""
    heatmaps = heatmapModule.open_layer(ctx.paths, layer)
    problem = finite_rows(heatmaps)
    if problem:
        log.warning("%s skipped: %s (the LRP rules divide by small activations; try another rules preset)",
                    layer, problem)
        return f"{layer}: {problem}"
    folder = layer_dir(ctx.paths, layer)
    folder.mkdir(parents=True, exist_ok=True)
    result, distances, sample = cluster_heatmaps(ctx, layer, heatmaps)
    if sample is not None:
        save_npy(sample, folder / SAMPLE_FILE)
    save_npy(distances, folder / DISTANCES_FILE)
    write_distance_xlsx(distances, index if sample is None else index.iloc[sample],
                        analysis_dir(ctx.paths) / f"{layer}HMDistance.xlsx")
    write_layer_files(result, distances, index, metadata, folder, ctx.paths.root, sample)
    return result


def save_npy(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as stream:
            np.save(stream, array)


def write_distance_xlsx(distances: np.ndarray, index: pd.DataFrame, path: Path) -> None:
    """The distance matrix for people, named by image; only where Excel can hold it."""
    if len(distances) > EXCEL_MAX_IMAGES:
        log.info("%s not written: %d images exceed Excel's %d columns; distances.npy holds the matrix",
                 path.name, len(distances), EXCEL_MAX_IMAGES)
        if path.exists():
            path.unlink()
        return
    names = list(index["image"])
    with atomic_path(path) as temporary:
        pd.DataFrame(distances, index=names, columns=names).to_excel(temporary, sheet_name="distances")


def rcc_name(label: int) -> str:
    return f"RCC{label + 1:02d}"


def write_layer_files(result: LayerClustering, distances, index, metadata, folder: Path, case_root: Path,
                      measured: np.ndarray | None = None) -> None:
    scenarios = scenarios_of(metadata)
    labels = pd.DataFrame({"image": index["image"], "expected": index["expected"],
                           "predicted": index["predicted"], "rcc": [rcc_name(l) for l in result.labels]})
    if scenarios is not None:
        labels["scenario"] = scenarios
    write_csv(labels, folder / LABELS_FILE)
    write_csv(rcc_statistics(result.labels, distances, scenarios, measured), folder / STATS_FILE)
    copy_rcc_images(case_root, labels, folder)
    if len(result.ks) > 1:
        plot_k_choice(result, folder / KNEE_PLOT)
    if scenarios is not None:
        write_characterisation(labels, metadata, folder / CHARACTERISATION_FILE)


def rcc_statistics(labels: np.ndarray, distances: np.ndarray, scenarios, measured: np.ndarray | None = None
                   ) -> pd.DataFrame:
    """Size, ICD (mean distance between members; over the sampled members in a two-stage
    clustering) and, where scenarios are known, majority scenario and purity of every RCC."""
    measured_labels = labels if measured is None else labels[measured]
    rows = []
    for label in np.unique(labels):
        members = np.flatnonzero(measured_labels == label)
        inner = distances[np.ix_(members, members)][np.triu_indices(len(members), 1)]
        row = {"rcc": rcc_name(label), "size": int((labels == label).sum()),
               "icd": float(inner.mean()) if len(inner) else 0.0}
        if scenarios is not None:
            row.update(zip(("majority_scenario", "purity"), majority(scenarios[labels == label])))
        rows.append(row)
    return pd.DataFrame(rows)


def majority(scenarios: np.ndarray) -> tuple[str, float]:
    """The most common scenario (ties: the first in alphabetical order) and its share."""
    values, counts = np.unique(scenarios, return_counts=True)
    return values[np.argmax(counts)], counts.max() / counts.sum()


def copy_rcc_images(case_root: Path, labels: pd.DataFrame, folder: Path) -> None:
    """One folder per RCC holding copies of its images (copies, so they open on any OS)."""
    for old in folder.glob("RCC*"):
        shutil.rmtree(old)
    for row in labels.itertuples():
        target = folder / row.rcc / _copy_name(row.image, row.expected)
        target.parent.mkdir(exist_ok=True)
        shutil.copy2(case_root / row.image, target)


def plot_k_choice(result: LayerClustering, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = np.array(list(result.ks))
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(ks, result.wicd_curve[ks], color="tab:blue")
    top.set_ylabel("WICD")
    top.set_title(f"{result.layer}: number of root-cause clusters, k = {result.k}")
    bottom.plot(ks, five_point_gradient(result.wicd_curve[ks]), color="tab:blue", label="WICD gradient")
    bottom.set_ylabel("gradient of WICD")
    twin = bottom.twinx()
    twin.plot(ks, result.silhouette_curve[ks], color="tab:orange", label="silhouette")
    twin.set_ylabel("silhouette", color="tab:orange")
    for axis in (top, bottom):
        axis.axvline(result.k, color="tab:red", linestyle="--")
    bottom.set_xlabel("k")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=90)
    plt.close(figure)


def write_characterisation(labels: pd.DataFrame, metadata: pd.DataFrame, path: Path) -> None:
    """The original's RQ1 analysis (reference §10.1): per RCC, its purity and majority scenario, and
    the numeric parameters whose variance inside the RCC is below half their variance over all
    error images."""
    params = metadata.set_axis(labels["image"].to_numpy()).select_dtypes("number")
    params = params.loc[:, params.var() > 0]
    per_rcc, reduced = [], []
    for rcc, group in labels.groupby("rcc"):
        scenario, purity = majority(group["scenario"].to_numpy())
        per_rcc.append({"rcc": rcc, "size": len(group), "majority_scenario": scenario, "purity": purity})
        if len(group) >= 2:
            reduced += reduced_parameters(rcc, params.loc[group["image"].to_numpy()], params.var())
    quality = purity_coverage(pd.Categorical(labels["rcc"]).codes, labels["scenario"].to_numpy())
    summary = pd.DataFrame([{"rccs_with_2+": quality["rccs"], "purity": quality["purity"],
                             "coverage": quality["coverage"]}])
    with atomic_path(path) as temporary:
        with pd.ExcelWriter(temporary, engine="openpyxl") as book:
            summary.to_excel(book, sheet_name="Summary", index=False)
            pd.DataFrame(per_rcc).to_excel(book, sheet_name="RCCs", index=False)
            pd.DataFrame(reduced, columns=["rcc", "parameter", "variance_reduction_%", "mean", "min", "max",
                                           "median", "std"]).to_excel(book, sheet_name="Parameters", index=False)


def reduced_parameters(rcc: str, values: pd.DataFrame, overall: pd.Series) -> list[dict]:
    """The parameters of one RCC's members whose variance is below half the overall variance."""
    rows = []
    for name, ratio in zip(values.columns, values.var().to_numpy() / overall.to_numpy()):
        if ratio < 0.5:
            column = values[name]
            rows.append({"rcc": rcc, "parameter": name, "variance_reduction_%": 100 * (1 - ratio),
                         "mean": column.mean(), "min": column.min(), "max": column.max(),
                         "median": column.median(), "std": column.std()})
    return rows


def write_summary(results, skipped, chosen, scenarios, analysis: Path) -> None:
    rows = []
    for r in results:
        row = {"layer": r.layer, "k": r.k, "wicd": r.wicd, "silhouette": r.silhouette,
               "selected": r.layer == chosen.layer}
        if scenarios is not None:
            row.update(purity_coverage(r.labels, scenarios))
        rows.append(row)
    for reason in skipped:
        rows.append({"layer": reason.split(":")[0], "skipped": reason.split(": ", 1)[1]})
    table = pd.DataFrame(rows)
    write_csv(table, analysis / SUMMARY_FILE)
    with atomic_path(analysis / "summary.xlsx") as temporary:
        table.to_excel(temporary, index=False, sheet_name="layers")


# --------------------------------------------------------------------------------------------
# The selected layer, published with heatmap overlays
# --------------------------------------------------------------------------------------------

def relevance_colours(relevance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) relevance -> RGB colours of a diverging map (red positive, blue negative, white zero,
    scaled by the largest magnitude) and an opacity growing with the magnitude."""
    from matplotlib import colormaps
    scale = float(np.abs(relevance).max()) or 1.0
    scaled = relevance / scale
    rgb = colormaps["bwr"]((scaled + 1) / 2)[..., :3]
    return rgb, np.clip(np.abs(scaled) * 1.5, 0, 1)


def overlay_tile(image_path: Path, relevance: np.ndarray, tile: int = OVERLAY_TILE) -> Image.Image:
    """The image and, beside it, the image in grey with its pixel relevance (summed over channels)
    overlaid."""
    heat = relevance.sum(axis=0) if relevance.ndim == 3 else relevance
    with Image.open(image_path) as source:
        picture = source.convert("RGB").resize((tile, tile), Image.BILINEAR)
    rgb, alpha = relevance_colours(heat.astype(np.float64))
    colour = Image.fromarray((rgb * 255).astype(np.uint8)).resize((tile, tile), Image.NEAREST)
    opacity = Image.fromarray((alpha * 255).astype(np.uint8)).resize((tile, tile), Image.NEAREST)
    grey = picture.convert("L").convert("RGB")
    blended = Image.composite(colour, grey, opacity)
    tile_image = Image.new("RGB", (2 * tile + 2, tile), "white")
    tile_image.paste(picture, (0, 0))
    tile_image.paste(blended, (tile + 2, 0))
    return tile_image


def publish_selected_layer(ctx: RunContext, layer: str) -> None:
    """The selected layer's RCC folders under T/<Layer>/, each image with its heatmap overlay."""
    for old in ctx.paths.t_dir.glob("Layer*"):
        if old.is_dir():
            shutil.rmtree(old)
    shutil.copytree(layer_dir(ctx.paths, layer), published_dir(ctx.paths, layer),
                    ignore=shutil.ignore_patterns(DISTANCES_FILE, SAMPLE_FILE))
    pixels = heatmapModule.open_layer(ctx.paths, heatmapModule.INPUT_LAYER)
    labels = read_labels(ctx.paths, layer)
    for row, item in enumerate(labels.itertuples()):  # labels rows are heatmap rows
        with atomic_path(overlay_file(ctx.paths, layer, item.rcc, item.image, item.expected)) as temporary:
            overlay_tile(ctx.paths.root / item.image, np.asarray(pixels[row])).save(temporary, format="PNG")


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------

class ClusterStep(Step):
    name, title = "clusters", "cluster step"

    def inputs(self, ctx: RunContext) -> dict:
        s = ctx.settings
        return {"heatmaps": heatmapModule.STEP.recorded_fingerprint(ctx), "space": s.cluster_space,
                "normalisation": s.normalisation, "k": s.k_criterion, "layer": s.layer_criterion}

    def outputs(self, ctx: RunContext) -> list[Path]:
        return [analysis_dir(ctx.paths) / SUMMARY_FILE, published_dir(ctx.paths, selected_layer(ctx.paths))]

    def compute(self, ctx: RunContext) -> None:
        index = heatmapModule.read_index(ctx.paths)
        layers = heatmapModule.read_layers(ctx.paths)
        metadata = error_metadata(ctx, index)
        results, skipped = [], []
        for layer in tqdm(list(layers["layer"]), desc="clustering layers", unit="layer", leave=False, disable=None):
            outcome = cluster_one_layer(ctx, layer, index, metadata)
            (results if isinstance(outcome, LayerClustering) else skipped).append(outcome)
        if not results:
            raise HuddError(f"{heatmapModule.heatmaps_dir(ctx.paths)}: no layer could be clustered "
                            f"({'; '.join(skipped)})")
        chosen = select_layer(results, ctx.settings.layer_criterion)
        write_summary(results, skipped, chosen, scenarios_of(metadata), analysis_dir(ctx.paths))
        publish_selected_layer(ctx, chosen.layer)

    def summary(self, ctx: RunContext) -> dict:
        table = read_summary(ctx.paths)
        chosen = table[table["selected"]].iloc[0]
        sizes = read_rcc_stats(ctx.paths, chosen["layer"])["size"]
        summary = {"layer": chosen["layer"], "k": int(chosen["k"]), "multi": int((sizes >= 2).sum()),
                   "folder": published_dir(ctx.paths, chosen["layer"]), "table": table}
        if "purity" in table.columns:
            summary.update(purity=float(chosen["purity"]), coverage=float(chosen["coverage"]))
        return summary


STEP = ClusterStep()
