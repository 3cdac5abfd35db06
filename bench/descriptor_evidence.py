"""Evidence for the descriptor characterisation: on the traffic-sign demo, is the descriptor that
names each rare condition the one that sets its root-cause clusters apart? (A script, not a test.)

    python bench/descriptor_evidence.py [--seeds 0 1 2] [--work /tmp/hudd_descriptor_study] [--force]
                                        [--without DESCRIPTOR ...]

For each seed, builds (or reuses) the demo case under --work (signs_s<seed>), runs the test,
heatmap and cluster steps through the step protocol (reusing what is current), then for each rare
condition takes the RCCs of 2+ images whose majority scenario it is ("the RCCs it dominates") and
counts, weighted by RCC size, those whose first, or first or second, ranked descriptor family is
the expected one:

    night: brightness; fog: contrast or sharpness; color_cast: hue or saturation; tilt: orientation
    (edge_obliqueness, or object_tilt, the object outline's); occlusion: edge density or relevance
    location; sticker: relevance location (its centre or grid cells)

A condition passes a seed when the expected family is first or second for at least half of its
RCCs' images. Also printed: the top descriptors of each condition's error images taken as one group
(what an ideal RCC would show), and how well the estimated object region matches the drawn sign
(IoU with the sign's disc from metadata.csv). The metadata is read here only to score: the
characterisation never sees it. `--force` recomputes the test and cluster steps (the descriptors)
even where their inputs are unchanged; `--without` ranks again with some descriptors left out (an
ablation, from the descriptors on disk).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import Helper  # noqa: E402
import clusterModule  # noqa: E402
import demo  # noqa: E402
import descriptors  # noqa: E402
import heatmapModule  # noqa: E402
import testModule  # noqa: E402
from HUDD import run_step  # noqa: E402

LOCATION = ["relevance_x", "relevance_y", *(f"relevance_{c}" for c in descriptors.GRID)]
EXPECTED = {
    "night": ("brightness", ["brightness"]),
    "fog": ("contrast or sharpness", ["contrast", "sharpness"]),
    "color_cast": ("hue or saturation", ["saturation", *(f"hue_{h}" for h in descriptors.HUES)]),
    "tilt": ("orientation: edges or object outline", ["edge_obliqueness", "object_tilt"]),
    "occlusion": ("edge density or relevance location", ["edge_density", *LOCATION]),
    "sticker": ("relevance location", LOCATION),
}


def analysed_case(case: Path, seed: int, force: bool) -> Helper.RunContext:
    """The demo case of `seed`, built and its test, heatmap and cluster steps current (with `force`,
    the test and cluster steps recomputed)."""
    demo.prepare("signs", case, seed, "cpu")
    paths = Helper.CasePaths(case)
    ctx = Helper.RunContext(paths=paths, settings=Helper.load_settings(paths), device=torch.device("cpu"),
                            model_path=case / "DNNModels" / "OriginalModel.pth", seed=seed)
    for step in (testModule.STEP, heatmapModule.STEP, clusterModule.STEP):
        ctx.force = force and step is not heatmapModule.STEP
        run_step(step, ctx)
    ctx.force = False
    return ctx


def ranking(ctx: Helper.RunContext, layer: str, without: list[str]) -> pd.DataFrame:
    """The selected layer's characterisation as the cluster step wrote it, or ranked again without
    some descriptors."""
    if not without:
        return clusterModule.read_rcc_descriptors(ctx.paths, layer)
    index = heatmapModule.read_index(ctx.paths)
    described = clusterModule.describe_errors(ctx, index)
    keep = [c for c in described.images.columns if c not in without]
    rccs = clusterModule.read_labels(ctx.paths, layer)["rcc"].to_numpy()
    return descriptors.characterise_rccs(rccs, described.images[keep], described.correct[keep],
                                         described.relevance.drop(columns=[c for c in without
                                                                           if c in described.relevance]),
                                         unclustered=clusterModule.NOISE)


def condition_scores(table: pd.DataFrame, stats: pd.DataFrame) -> dict[str, dict]:
    """Per condition: its RCCs of 2+ images, their images, and the size-weighted shares whose
    expected family is ranked first / first or second."""
    scores = {}
    for condition, (_words, expected) in EXPECTED.items():
        mine = stats[(stats["majority_scenario"] == condition) & (stats["size"] >= 2)
                     & (stats["rcc"] != clusterModule.NOISE)]
        first = second = 0
        ranks = []
        for rcc, size in zip(mine["rcc"], mine["size"]):
            ranked = table[table["rcc"] == rcc].sort_values("rank")
            top = list(ranked["descriptor"].head(2))
            first += size * (top[:1] and top[0] in expected)
            second += size * any(d in expected for d in top)
            ranks.append((int(size), int(ranked.loc[ranked["descriptor"].isin(expected), "rank"].min())))
        images = int(mine["size"].sum())
        scores[condition] = {"rccs": len(mine), "images": images, "ranks": ranks,
                             "first": first / images if images else np.nan,
                             "top2": second / images if images else np.nan}
    return scores


def pooled_top(ctx: Helper.RunContext, scenarios: pd.Series) -> pd.DataFrame:
    """The characterisation of each condition's error images as one group (an ideal RCC)."""
    paths = ctx.paths
    index = heatmapModule.read_index(paths)
    described = clusterModule.describe_errors(ctx, index)
    groups = scenarios.reindex(index["image"]).to_numpy()
    return descriptors.characterise_rccs(groups, described.images, described.correct, described.relevance)


def object_iou(ctx: Helper.RunContext, metadata: pd.DataFrame) -> pd.Series:
    """Median IoU per scenario of the estimated object masks with the drawn sign's disc."""
    results = testModule.read_results(ctx.paths, "test")
    masks, valid = testModule.read_object_masks(ctx.paths, list(results["image"]))
    meta = metadata.reindex(results["image"])
    height, width = masks.shape[1:]
    with Image.open(ctx.sets()["test"].paths[0]) as first:     # the demo's images are all one size
        sx, sy = width / first.size[0], height / first.size[1]
    rows, cols = np.mgrid[0:height, 0:width] + 0.5
    ious = []
    for mask, ok, (x, y, size) in zip(masks, valid, meta[["pos_x", "pos_y", "size"]].to_numpy(float)):
        disc = ((cols - x * sx) / sx) ** 2 + ((rows - y * sy) / sy) ** 2 <= (0.47 * size) ** 2
        ious.append((mask & disc).sum() / max((mask | disc).sum(), 1) if ok else np.nan)
    return pd.Series(ious, index=meta.index).groupby(meta["scenario"].to_numpy()).median()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=Path("/tmp/hudd_descriptor_study"))
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--without", nargs="*", default=[])
    args = parser.parse_args()
    Helper.setup_logging(False)
    per_seed, pooled, ious = {}, {}, {}
    for seed in args.seeds:
        ctx = analysed_case(args.work / f"signs_s{seed}", seed, args.force)
        layer = clusterModule.selected_layer(ctx.paths)
        table = ranking(ctx, layer, args.without)
        stats = clusterModule.read_rcc_stats(ctx.paths, layer)
        per_seed[seed] = condition_scores(table, stats)
        metadata = Helper.read_metadata(ctx.paths.set_dir("test"), ctx.paths.root)
        pooled[seed] = pooled_top(ctx, metadata["scenario"])
        ious[seed] = object_iou(ctx, metadata)
        print(f"seed {seed}: {layer}, {len(stats)} RCCs", flush=True)
    print_tables(per_seed, pooled, ious)


def print_tables(per_seed: dict, pooled: dict, ious: dict) -> None:
    seeds = list(per_seed)
    print("\n| condition | expected | " + " | ".join(f"seed {s}: RCCs (images), first / first or second"
                                                     for s in seeds) + " |")
    print("|---|---|" + "---|" * len(seeds))
    for condition, (words, _expected) in EXPECTED.items():
        cells = []
        for s in seeds:
            c = per_seed[s][condition]
            mark = "" if c["top2"] >= 0.5 else " ✗"
            cells.append(f"{c['rccs']} ({c['images']}): {c['first']:.0%} / {c['top2']:.0%}{mark}")
        print(f"| {condition} | {words} | " + " | ".join(cells) + " |")
    print("\nThe expected family's rank in each RCC the condition dominates: rank (RCC size), largest RCC first")
    print("\n| condition | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|" + "---|" * len(seeds))
    for condition in EXPECTED:
        cells = [", ".join(f"{rank} ({size})" for size, rank in sorted(per_seed[s][condition]["ranks"], reverse=True))
                 or "none" for s in seeds]
        print(f"| {condition} | " + " | ".join(cells) + " |")
    passed = {s: sum(per_seed[s][c]["top2"] >= 0.5 for c in EXPECTED) for s in seeds}
    print("\nconditions passing (expected family first or second for half of their RCCs' images): "
          + ", ".join(f"seed {s}: {n} of {len(EXPECTED)}" for s, n in passed.items()))
    print("\nEach condition's error images as one group (an ideal RCC): its first three descriptors, Cliff's delta")
    print("\n| condition | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|" + "---|" * len(seeds))
    for condition in EXPECTED:
        cells = []
        for s in seeds:
            top = pooled[s][pooled[s]["rcc"] == condition].sort_values("rank").head(3)
            cells.append(", ".join(f"{r.descriptor} {r.delta:+.2f}" for r in top.itertuples()))
        print(f"| {condition} | " + " | ".join(cells) + " |")
    print("\nEstimated object region vs the drawn sign (median IoU per scenario):")
    print(pd.DataFrame(ious).round(2).to_string())


if __name__ == "__main__":
    main()
