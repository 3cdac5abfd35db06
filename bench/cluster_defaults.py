"""Chooses the clustering defaults by evidence: on the demo case study, for several seeds, every
combination of LRP rules preset x clustering space x k criterion x layer criterion x per-heatmap
normalisation, the RCC purity, coverage, number of RCCs and selected layer (design.md's measures).

    python bench/cluster_defaults.py [--seeds 0 1 2] [--work /tmp/hudd_cluster_study]

Builds (or reuses) one demo case per seed under --work, then prints a markdown table of the means
over seeds, best first (coverage, then purity), and writes it with the per-seed rows as CSV there.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import Helper  # noqa: E402
import clusterModule as C  # noqa: E402
import demo  # noqa: E402
import heatmapModule  # noqa: E402
import testModule  # noqa: E402
from lrp import LRPExplainer, default_layers  # noqa: E402

PRESETS = ("hudd", "epsilon", "epsilon-plus")


def demo_context(case: Path, seed: int) -> Helper.RunContext:
    demo.prepare("signs", case, seed, "cpu")   # builds, trains and checks what is missing
    paths = Helper.CasePaths(case)
    return Helper.RunContext(paths=paths, settings=Helper.load_settings(paths), device=torch.device("cpu"),
                             model_path=case / "DNNModels" / "OriginalModel.pth", seed=seed)


def error_heatmaps(ctx: Helper.RunContext, index: pd.DataFrame, rules: str) -> dict[str, np.ndarray]:
    """Relevance of the error images at every default layer (the heatmap step's, held in memory)."""
    transform = Helper.make_transform(ctx.settings)
    from PIL import Image
    inputs = torch.stack([transform(Image.open(ctx.paths.root / p).convert("RGB")) for p in index["image"]])
    targets = torch.tensor([ctx.classes.index(c) for c in index["predicted"]])
    model = ctx.model()
    layers = [("Layer0", "input")] + default_layers(model, example_input=inputs[:1])
    explainer = LRPExplainer(model, rules=rules, layers=[p for _n, p in layers[1:]])
    chunks = [explainer(inputs[i:i + 128], target=targets[i:i + 128]) for i in range(0, len(inputs), 128)]
    return {name: torch.cat([c[path] for c in chunks]).numpy() for name, path in layers}


def study_seed(ctx: Helper.RunContext, seed: int) -> list[dict]:
    testModule.run(ctx)
    index = heatmapModule.error_images(ctx)
    scenarios = C.error_scenarios(ctx, index)
    rows = []
    for rules in PRESETS:
        heatmaps = error_heatmaps(ctx, index, rules)
        for normalisation, space in itertools.product(C.NORMALISATIONS[:2], C.SPACES):
            per_k = {crit: [] for crit in C.K_CRITERIA}
            for layer, values in heatmaps.items():
                distances = C.pairwise_distances(values, normalisation)
                for crit in C.K_CRITERIA:
                    per_k[crit].append(C.cluster_layer(layer, distances, space, crit))
            for k_crit, layer_crit in itertools.product(C.K_CRITERIA, C.LAYER_CRITERIA):
                chosen = C.select_layer(per_k[k_crit], layer_crit)
                quality = C.purity_coverage(chosen.labels, scenarios)
                rows.append({"seed": seed, "rules": rules, "space": space, "k": k_crit, "layer_by": layer_crit,
                             "normalisation": normalisation, "layer": chosen.layer, "errors": len(index),
                             **quality})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=Path("/tmp/hudd_cluster_study"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    rows = []
    for seed in args.seeds:
        rows += study_seed(demo_context(args.work / f"seed{seed}", seed), seed)
    per_seed = pd.DataFrame(rows)
    keys = ["rules", "space", "k", "layer_by", "normalisation"]
    table = (per_seed.groupby(keys)
             .agg(purity=("purity", "mean"), coverage=("coverage", "mean"), rccs=("rccs", "mean"),
                  min_purity=("purity", "min"), layers=("layer", lambda s: " ".join(s)))
             .reset_index().sort_values(["coverage", "purity"], ascending=False))
    args.work.mkdir(parents=True, exist_ok=True)
    per_seed.to_csv(args.work / "cluster_study_per_seed.csv", index=False)
    table.to_csv(args.work / "cluster_study.csv", index=False)
    print(f"errors per seed: {per_seed.groupby('seed')['errors'].first().to_dict()}; "
          f"{time.perf_counter() - started:.0f} s")
    print(markdown(table))


def markdown(table: pd.DataFrame) -> str:
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


if __name__ == "__main__":
    main()
