"""The layer choice's bound on output alignment, by evidence: the study behind MAX_OUTPUT_ALIGNMENT.

    python bench/layer_choice_study.py CASE [CASE ...]

CASE: case studies whose cluster step has run with metadata scenarios (the demos). Each layer is
clustered again from its distances.npy as the step does; then, for several bounds, the layer the step
would choose (smallest WICD, never the input layer nor the last one) and its purity / coverage of the
10 largest RCCs. Last, each layer's output alignment (adjusted mutual information of its RCCs with
the explained output, rcc_labels.csv's `predicted`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clustering as C  # noqa: E402

BOUNDS = (None, 0.5, 0.55, 0.6, 0.65, 0.7)


def layers_of(case: Path) -> tuple[list[C.LayerClustering], pd.DataFrame]:
    analysis = case / "T" / "ClusterAnalysis"
    layers = list(pd.read_csv(analysis / "summary.csv")["layer"])
    labels = pd.read_csv(analysis / layers[0] / "rcc_labels.csv")
    return [C.cluster_layer(layer, np.load(analysis / layer / "distances.npy")) for layer in layers], labels


def choice(results: list[C.LayerClustering], labels: pd.DataFrame, bound: float | None) -> dict:
    explained = pd.factorize(labels["predicted"])[0]
    original = C.MAX_OUTPUT_ALIGNMENT
    C.MAX_OUTPUT_ALIGNMENT = bound if bound is not None else 1.0
    try:
        chosen = C.select_layer(results, "wicd", last_layer=results[-1].layer,
                                alignments=C.output_alignments(results, explained))
    finally:
        C.MAX_OUTPUT_ALIGNMENT = original
    quality = C.readable_quality(chosen.labels, labels["scenario"].to_numpy())
    return {"layer": chosen.layer, "purity": quality["purity"], "coverage_10": quality["coverage_10"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", type=Path)
    cases = {case.name: layers_of(case) for case in parser.parse_args().cases}
    rows = []
    for bound in BOUNDS:
        picks = {name: choice(results, labels, bound) for name, (results, labels) in cases.items()}
        rows.append({"bound": "none" if bound is None else bound,
                     **{name: f"{p['layer']} {p['purity']:.3f}/{p['coverage_10']:.2f}" for name, p in picks.items()},
                     "mean purity": np.mean([p["purity"] for p in picks.values()]),
                     "mean coverage_10": np.mean([p["coverage_10"] for p in picks.values()])})
    pd.set_option("display.width", 250)
    print(pd.DataFrame(rows).round(3).to_string(index=False))
    print("\noutput alignment per layer:")
    for name, (results, labels) in cases.items():
        explained = pd.factorize(labels["predicted"])[0]
        print(f"  {name}: " + " ".join(f"{r.layer}={C.output_alignment(r.labels, explained):.2f}" for r in results))


if __name__ == "__main__":
    main()
