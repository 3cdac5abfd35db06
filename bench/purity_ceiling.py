"""How pure can RCCs of these features be? A supervised ceiling beside the cluster step's purity.

    python bench/purity_ceiling.py CASE [CASE ...] [--neighbours 5] [--folds 5]

CASE: case studies that ran the test, heatmap and cluster steps, whose test set has a metadata.csv
with a scenario per image (the demos, bench/digit_case.py). For every layer the cluster step clustered:

- ceiling: a SUPERVISED k-nearest-neighbour classifier (k = --neighbours) told the scenario of each
  error image from its heatmap, normalised as the cluster step normalises it, in stratified
  --folds-fold cross-validation (seed 0). It reads the scenarios the clustering never sees, and it
  judges by the same distances as the clustering, so no label-free grouping of the same rows can be
  expected to agree with the scenarios much more often: where even it confuses two causes, their
  images lie among each other. svm: the same with an RBF support-vector machine (C 10), which learns
  a curved boundary between the scenarios from their labels: the most these rows tell, as far as
  this study looked;
- purity: the cluster step's purity of that layer's top-level RCCs (design.md's measure: the mean over
  RCCs of 2+ images of their majority scenario's share), and weighted purity, the share of the error
  images in an RCC of 2+ that carry its majority scenario: the same agreement the classifier's
  accuracy counts, per image.

Scenarios with fewer than --folds error images (often the ordinary one: a few errors without a rare
condition) cannot be stratified and are left out of all three figures; the count is printed. The
selected layer is marked. Where purity stays far below the ceiling, the clustering or the layer choice
loses what the features hold; where it is near, only other features can raise it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import SVC

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import Helper  # noqa: E402
import clusterModule  # noqa: E402
import clustering  # noqa: E402
import heatmapModule  # noqa: E402


def error_scenarios(paths: Helper.CasePaths, images: np.ndarray) -> np.ndarray:
    """The scenario of every error image (`images`: the heatmaps' row order, T/Heatmaps/index.csv)."""
    meta = Helper.read_metadata(paths.set_dir("test"), paths.root)
    if meta is None or "scenario" not in meta.columns:
        raise SystemExit(f"{paths.set_dir('test')}: no metadata.csv with a scenario column; this study needs one")
    return meta["scenario"].reindex(images).fillna("").astype(str).to_numpy()


def supervised_accuracy(classifier, rows: np.ndarray, scenarios: np.ndarray, folds: int) -> float:
    """Cross-validated accuracy of `classifier` (a scikit-learn estimator) telling the scenario."""
    split = StratifiedKFold(folds, shuffle=True, random_state=0)
    right = sum(int((classifier.fit(rows[train], scenarios[train]).predict(rows[test]) == scenarios[test]).sum())
                for train, test in split.split(rows, scenarios))
    return right / len(scenarios)


def weighted_purity(rccs: np.ndarray, scenarios: np.ndarray) -> float:
    """Share of the images in an RCC of 2+ (among those given) that carry its majority scenario."""
    table = pd.crosstab(rccs, scenarios)
    table = table[table.sum(axis=1) >= 2]
    return float(table.max(axis=1).sum() / table.to_numpy().sum())


def layer_figures(paths: Helper.CasePaths, settings, images: np.ndarray, scenarios: np.ndarray, kept: np.ndarray,
                  args) -> pd.DataFrame:
    summary = clusterModule.read_summary(paths)
    rows = []
    for _, layer in summary.iterrows():
        heatmaps = heatmapModule.open_layer(paths, layer["layer"])
        features = clustering.normalise_rows(clustering.flat_rows(heatmaps), settings.normalisation)[kept]
        labels = clusterModule.read_labels(paths, layer["layer"])
        rcc_of = labels.set_index("image")["rcc"].reindex(images[kept]).to_numpy()
        rows.append({"case": paths.root.name, "layer": layer["layer"],
                     "ceiling": supervised_accuracy(KNeighborsClassifier(args.neighbours), features,
                                                    scenarios[kept], args.folds),
                     "svm": supervised_accuracy(SVC(C=10.0), features, scenarios[kept], args.folds),
                     "purity": layer["purity"], "weighted_purity": weighted_purity(rcc_of, scenarios[kept]),
                     "selected": bool(layer["selected"])})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", type=Path)
    parser.add_argument("--neighbours", type=int, default=5)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    tables = []
    for case in args.cases:
        paths = Helper.CasePaths(case)
        settings = Helper.load_settings(paths)
        images = heatmapModule.read_index(paths)["image"].to_numpy()
        scenarios = error_scenarios(paths, images)
        counts = pd.Series(scenarios).value_counts()
        kept = np.isin(scenarios, counts[counts >= args.folds].index)
        print(f"{case.name}: {len(scenarios)} error images; left out (scenarios of fewer than {args.folds}): "
              f"{int((~kept).sum())} {counts[counts < args.folds].to_dict()}")
        tables.append(layer_figures(paths, settings, images, scenarios, kept, args))
    table = pd.concat(tables)
    pd.set_option("display.width", 200)
    print(table.round(3).to_string(index=False))
    chosen = table[table["selected"]].set_index("case")
    best = table.groupby("case", sort=False)[["ceiling", "svm"]].max()
    print("\nper case: the selected layer's purity, weighted purity and ceilings, and the best layer's ceilings")
    print(pd.DataFrame({"layer": chosen["layer"], "purity": chosen["purity"],
                        "weighted_purity": chosen["weighted_purity"], "ceiling": chosen["ceiling"],
                        "svm": chosen["svm"], "best ceiling": best["ceiling"], "best svm": best["svm"]}
                       ).round(3).to_string())


if __name__ == "__main__":
    main()
