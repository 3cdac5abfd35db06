"""Which clustering makes root causes an engineer can read: the study behind the cluster step's defaults.

    python bench/rcc_study.py CASE [CASE ...]      # cases that ran the test and heatmap steps

For every case, every feature space (heatmaps, activations; Ward on the raw pixels as the yardstick),
reduction (none, PCA), clusterer (Ward, HDBSCAN), top-level criterion and budget (max_rccs) and layer
criterion, it clusters every layer as the cluster step does, picks the layer as the step would, and
measures what a reader sees (clustering.readable_quality): top-level RCCs, their median size, noise,
purity and coverage over all RCCs and over the 10 largest. It prints the mean over the cases of every
combination, the best first, then the per-case figures of the chosen defaults. With --best-layer it
also shows the layer that the scenarios say is best (not selectable without labels: the headroom).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import Helper  # noqa: E402
import clusterModule  # noqa: E402
import heatmapModule  # noqa: E402
from clustering import cluster_layer, labels_at, pairwise_distances, readable_quality, select_layer, ward_tree  # noqa: E402
from features import PixelSpace, make_space  # noqa: E402

GRID = {"features": ("heatmaps", "activations"), "reduction": ("none", "pca"), "clusterer": ("ward", "hdbscan"),
        "k_criterion": ("silhouette", "knee", "max"), "max_rccs": (10, 15, 20), "layer_criterion": ("wicd", "silhouette")}
MEASURES = ["rccs", "median_size", "noise", "purity", "coverage", "purity_10", "coverage_10", "pixels_purity"]


def context(case: Path) -> Helper.RunContext:
    paths = Helper.CasePaths(case)
    return Helper.RunContext(paths=paths, settings=Helper.load_settings(paths),
                             model_path=paths.models / "OriginalModel.pth", device=torch.device("cpu"))


def study_case(case: Path, best_layer: bool) -> list[dict]:
    ctx = context(case)
    index = heatmapModule.read_index(ctx.paths)
    scenarios = clusterModule.scenarios_of(clusterModule.error_metadata(ctx, index))
    pixel_tree = ward_tree(pairwise_distances(PixelSpace().error_rows(ctx, PixelSpace.LAYER), "none"))
    rows = []
    for features, reduction in itertools.product(GRID["features"], GRID["reduction"]):
        variant = replace(ctx, settings=replace(ctx.settings, features=features, reduction=reduction))
        started = time.perf_counter()
        measured = clusterModule.layer_distances(variant, make_space(features))
        last_layer = make_space(features).layers(variant)[-1]
        seconds = time.perf_counter() - started
        for clusterer, k_criterion, max_rccs in itertools.product(GRID["clusterer"], GRID["k_criterion"],
                                                                  GRID["max_rccs"]):
            results = [cluster_layer(layer, d, k_criterion=k_criterion, max_rccs=max_rccs, clusterer=clusterer)
                       for layer, d in measured]
            criteria = list(GRID["layer_criterion"]) + (["best"] if best_layer else [])
            for layer_criterion in criteria:
                chosen = (max(results, key=lambda r: readable_quality(r.labels, scenarios)["purity"])
                          if layer_criterion == "best" else select_layer(results, layer_criterion, last_layer=last_layer))
                quality = readable_quality(chosen.labels, scenarios)
                pixels = labels_at(pixel_tree, len(index), chosen.k) if chosen.k >= 2 else np.zeros(len(index), int)
                rows.append({"case": case.name, "features": features, "reduction": reduction, "clusterer": clusterer,
                             "k_criterion": k_criterion, "max_rccs": max_rccs, "layer_criterion": layer_criterion,
                             "layer": chosen.layer, **quality,
                             "pixels_purity": readable_quality(pixels, scenarios)["purity"],
                             "distance_seconds": seconds})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cases", nargs="+", type=Path)
    parser.add_argument("--best-layer", action="store_true", help="also the layer the scenarios say is best")
    parser.add_argument("--csv", type=Path, help="write every row to this file")
    args = parser.parse_args(argv)
    rows = []
    for case in args.cases:
        rows += study_case(case, args.best_layer)
        print(f"{case}: done", flush=True)
    table = pd.DataFrame(rows)
    if args.csv:
        table.to_csv(args.csv, index=False)
    keys = ["features", "reduction", "clusterer", "k_criterion", "max_rccs", "layer_criterion"]
    mean = table.groupby(keys)[MEASURES].mean()
    worst = table.groupby(keys)[["purity", "coverage_10"]].min().add_prefix("worst_")
    summary = mean.join(worst).sort_values(["coverage_10", "purity"], ascending=False)
    pd.set_option("display.width", 250, "display.max_rows", 400)
    print(summary.round(3).head(40).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
