"""How many top-level RCCs a case with few error images should get: the study behind MIN_MEAN_RCC_SIZE.

    python bench/small_case_study.py CASE [CASE ...] [--sizes 20,30,40,50,60,80] [--draws 5]

CASE: case studies whose cluster step has run with metadata scenarios (the demos, bench/digit_case.py).
From each, random subsets of its error images (`--draws` per size, seeded) stand for cases with that many
errors: every layer is clustered again from the subset of its distances.npy, as the step does, with the
top level's k bounded by max_rccs (20) and, for each candidate bound m, by n // m (at least 2; m = 2 is
the bound before MIN_MEAN_RCC_SIZE, the original's n/2); the layer is chosen as the step chooses it.
Printed per size and bound, the mean over cases and draws: the top-level RCCs, their median size, the
share of error images left in an RCC of one image, purity and coverage over every RCC and over the 10
largest; then per case below 60 errors, and the worst coverage of any case and draw.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clustering as C  # noqa: E402

BOUNDS = (2, 3, 4, 5, 6, 8, 10)   # k <= n // m; 2: before MIN_MEAN_RCC_SIZE


def load(case: Path) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    analysis = case / "T" / "ClusterAnalysis"
    layers = list(pd.read_csv(analysis / "summary.csv")["layer"])
    labels = pd.read_csv(analysis / layers[0] / "rcc_labels.csv")
    return {layer: np.load(analysis / layer / "distances.npy") for layer in layers}, labels


class TopLevel:
    """One layer's tree and curves for one subset: the top level at any bound from them (as cluster_layer)."""

    def __init__(self, layer: str, distances: np.ndarray):
        self.layer, self.distances, n = layer, distances, len(distances)
        self.tree = C.ward_tree(distances)
        self.wicd = C.wicd_curve(self.tree, distances)
        self.widest = range(2, max(2, min(C.MAX_RCCS, n // 2)) + 1)   # every bound's k lies in it
        self.silhouette = C.silhouette_curve(self.tree, distances, self.widest)

    def at(self, bound: int) -> C.LayerClustering:
        n = len(self.distances)
        ks = range(2, max(2, min(C.MAX_RCCS, n // bound)) + 1)
        k = min(C.top_k(ks, self.silhouette, self.wicd), n)
        labels = C.labels_at(self.tree, n, k)
        return C.LayerClustering(layer=self.layer, k=k, labels=labels, sub_labels=labels, wicd=float(self.wicd[k]),
                                 silhouette=float(self.silhouette[k]), ks=ks, wicd_curve=self.wicd,
                                 silhouette_curve=self.silhouette)


def measure(levels: list[TopLevel], scenarios: np.ndarray, explained: np.ndarray, bound: int) -> dict:
    results = [level.at(bound) for level in levels]
    chosen = C.select_layer(results, "wicd", last_layer=results[-1].layer,
                            alignments=C.output_alignments(results, explained))
    quality = C.readable_quality(chosen.labels, scenarios)
    sizes = np.bincount(chosen.labels)
    alone = float((sizes[chosen.labels] == 1).mean())   # share of the error images in an RCC of one
    return {"k": chosen.k, "median_size": quality["median_size"], "singletons": alone,
            **{key: quality[key] for key in ("purity", "coverage", "purity_10", "coverage_10")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", type=Path)
    parser.add_argument("--sizes", default="40,60,80,120,160")
    parser.add_argument("--draws", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for case in args.cases:
        distances, labels = load(case)
        explained_all, scenarios_all = pd.factorize(labels["predicted"])[0], labels["scenario"].to_numpy()
        for size in [int(s) for s in args.sizes.split(",")] + [len(labels)]:
            if size > len(labels):
                continue
            for draw in range(args.draws if size < len(labels) else 1):
                rng = np.random.default_rng([draw, size])
                subset = np.sort(rng.choice(len(labels), size, replace=False))
                levels = [TopLevel(layer, d[np.ix_(subset, subset)]) for layer, d in distances.items()]
                if draw == 0:   # the default bound here is the product's top level
                    product = C.cluster_layer(levels[0].layer, levels[0].distances)
                    assert np.array_equal(product.labels, levels[0].at(C.MIN_MEAN_RCC_SIZE).labels)
                for bound in BOUNDS:
                    rows.append({"case": case.name, "size": size if size < len(labels) else "all", "draw": draw,
                                 "bound": f"n/{bound}" + (" (default)" if bound == C.MIN_MEAN_RCC_SIZE else ""),
                                 **measure(levels, scenarios_all[subset], explained_all[subset], bound)})
        print(f"{case.name}: done", file=sys.stderr)
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 250)
    order = {name: i for i, name in enumerate(table["bound"].unique())}
    summary = (table.groupby(["size", "bound"], sort=False)
               [["k", "median_size", "singletons", "purity", "coverage", "purity_10", "coverage_10"]].mean()
               .reset_index())
    summary["order"] = summary["bound"].map(order)
    print(summary.sort_values(["size", "order"], key=lambda c: c if c.name != "size" else c.astype(str).str.zfill(5))
          .drop(columns="order").round(3).to_string(index=False))
    small = table[table["size"].map(lambda size: size != "all" and size < 60)
                  & table["bound"].str.startswith(("n/2", f"n/{C.MIN_MEAN_RCC_SIZE} "))]
    print("\nper case, below 60 errors, before and with the default bound:\n"
          + small.groupby(["case", "bound"])[["k", "singletons", "purity", "coverage", "coverage_10"]].mean()
          .round(3).to_string())
    worst = table.groupby(["size", "bound"], sort=False)["coverage"].min().rename("worst coverage")
    print("\nworst coverage of any case and draw:\n" + worst.unstack().round(2).to_string())


if __name__ == "__main__":
    main()
