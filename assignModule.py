"""Step 4: assign the improvement images to the root-cause clusters; the unsafe set.

For every improvement image (labels are not needed), the relevance at the selected layer only, its
nearest-member distance to each RCC of two or more images, then the original's "ClosestU" greedy
assignment with per-RCC quotas (reference §8.1): images are taken by ascending distance to their
closest RCC, then to their second closest, and so on, each image at most once and each RCC up to
its quota of ceil(2 x its size). Writes `T/UnsafeSet/<RCC>/` (copies of the images) and
`T/UnsafeSet/assignments.csv` (image, rcc, distance, rank; rank 0 = its closest RCC).
"""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from Helper import HuddError, RunContext, fingerprint, image_set_digest, make_loader, stop_on_unreadable, write_csv
from clusterModule import CHUNK_BYTES, normalise_rows
from lrp import LRPExplainer

log = logging.getLogger("hudd")

STEP = "assign"
STEP_VERSION = 1
QUOTA_FACTOR = 2.0   # the original's assignment quota: ceil(2 x RCC size)


def quotas(sizes: np.ndarray, factor: float = QUOTA_FACTOR) -> np.ndarray:
    """ceil(factor x size); the 1e-9 keeps float error from rounding up (0.3 x 10 = 3.0000000000000004)."""
    return np.ceil(factor * np.asarray(sizes, dtype=float) - 1e-9).astype(np.int64)


def closest_u(distances: np.ndarray, quota: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ClosestU greedy assignment, one vectorised pass per rank.

    distances: (images, rccs) nearest-member distances; quota: per RCC. Returns per image the RCC
    index (-1: not assigned) and the rank of that RCC among the image's closest ones. Within one
    rank every image proposes one RCC, so each RCC simply keeps its nearest proposers up to its
    remaining quota: the same result as the original's image-by-image loop (ties by image order)."""
    images, rccs = distances.shape
    ranked = np.argsort(distances, axis=1, kind="stable")
    assigned = np.full(images, -1, dtype=np.int64)
    rank = np.full(images, -1, dtype=np.int64)
    remaining = np.asarray(quota, dtype=np.int64).copy()
    for r in range(rccs):
        if not remaining.any():
            break
        free = np.flatnonzero(assigned < 0)
        proposal = ranked[free, r]
        distance = distances[free, proposal]
        order = np.lexsort((free, distance, proposal))       # by RCC, then distance, then image
        free, proposal = free[order], proposal[order]
        place = np.arange(len(proposal)) - np.searchsorted(proposal, proposal, side="left")
        take = place < remaining[proposal]
        assigned[free[take]] = proposal[take]
        rank[free[take]] = r
        remaining -= np.bincount(proposal[take], minlength=rccs)
    return assigned, rank


def nearest_member_distances(queries: np.ndarray, members: np.ndarray, member_rcc: np.ndarray,
                             rccs: int) -> np.ndarray:
    """(queries, rccs): for each query, the distance to the nearest member of each RCC (float64)."""
    q = queries.reshape(len(queries), -1).astype(np.float64)
    m = members.reshape(len(members), -1).astype(np.float64)
    m_squared = np.einsum("ij,ij->i", m, m)
    order = np.argsort(member_rcc, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(member_rcc[order]) != 0])
    result = np.empty((len(q), rccs))
    step = max(1, CHUNK_BYTES // (8 * max(len(m), 1)))
    for start in range(0, len(q), step):
        block = q[start:start + step]
        squared = (np.einsum("ij,ij->i", block, block)[:, None] + m_squared[None, :] - 2.0 * block @ m.T)
        nearest = np.minimum.reduceat(np.maximum(squared, 0.0)[:, order], starts, axis=1)
        result[start:start + len(block)] = np.sqrt(nearest)
    return result


def selected_clusters(ctx: RunContext):
    """The selected layer, its module path, and its RCCs of two or more images."""
    analysis = ctx.paths.t_dir / "ClusterAnalysis"
    summary_path = analysis / "summary.csv"
    if not summary_path.is_file():
        raise HuddError(f"{summary_path}: not found; run the cluster step first (--steps clusters,assign)")
    summary = pd.read_csv(summary_path)
    layer = summary.loc[summary["selected"] == True, "layer"].iloc[0]  # noqa: E712
    layers = pd.read_csv(ctx.paths.t_dir / "Heatmaps" / "layers.csv").set_index("layer")
    labels = pd.read_csv(analysis / layer / "labels.csv")
    sizes = labels["rcc"].value_counts()
    eligible = sorted(sizes.index[sizes >= 2])
    return layer, layers.loc[layer, "module"], labels, eligible


def improvement_distances(ctx: RunContext, module: str, members: np.ndarray, member_rcc: np.ndarray,
                          rccs: int) -> tuple[np.ndarray, pd.DataFrame]:
    """Nearest-member distance of every improvement image to every RCC, batch by batch: relevance
    at the selected layer only (explaining the predicted class; no labels needed), normalised as
    the cluster step normalised the members."""
    from heatmapModule import lrp_target, output_shape_for_targets
    improve = ctx.sets()["improve"]
    targets = improvement_targets(ctx)
    explainer = LRPExplainer(ctx.model(), rules=ctx.settings.rules,
                             layers=None if module == "input" else [module])
    loader = make_loader(improve, ctx.settings, ctx.settings.batch_size, ctx.settings.workers)
    distances = np.empty((len(improve), rccs))
    output_shape = ()  # learnt from the first batch
    for inputs, _labels, rows, failures in tqdm(loader, desc="assigning improvement images", unit="batch",
                                                leave=False, disable=None):
        stop_on_unreadable(improve, failures)
        if output_shape == ():
            output_shape = output_shape_for_targets(ctx.model(), inputs, ctx)
        relevance = explainer(inputs.to(ctx.device), target=lrp_target(targets[rows], ctx, output_shape),
                              input_relevance=module == "input")[module].float().cpu().numpy()
        queries = normalise_rows(relevance.reshape(len(relevance), -1).astype(np.float64), ctx.settings.normalisation)
        distances[rows.numpy()] = nearest_member_distances(queries, members, member_rcc, rccs)
    images = pd.DataFrame({"image": [ctx.paths.relative(p) for p in improve.paths]})
    return distances, images


def improvement_targets(ctx: RunContext) -> torch.Tensor:
    """Per improvement image, the output channel explained, as for the error images: the predicted
    class; for keypoint models the worst keypoint, which needs labels (an unlabelled keypoint set is
    explained over all its maps: channel -1 with `"explain": "all"` semantics)."""
    improve = ctx.sets()["improve"]
    results = pd.read_csv(ctx.paths.result_csv("improve"), keep_default_na=False).set_index("image")
    rows = results.loc[[ctx.paths.relative(p) for p in improve.paths]]
    if ctx.settings.task == "keypoints":
        if "worst_keypoint" not in rows.columns or ctx.settings.explain == "all":
            return torch.full((len(rows),), -1, dtype=torch.long)
        return torch.tensor([ctx.classes.index(k) if k else -1 for k in rows["worst_keypoint"]], dtype=torch.long)
    return torch.tensor([ctx.classes.index(c) for c in rows["predicted"]], dtype=torch.long)


def step_fingerprint(ctx: RunContext) -> str:
    cluster_entry = ctx.manifest.entries.get("clusters", {})
    return fingerprint({"step": STEP, "version": STEP_VERSION, **ctx.model_fingerprint_part(),
                        "clusters": cluster_entry.get("fingerprint"), "rules": ctx.settings.rules,
                        "improve": image_set_digest(ctx.sets()["improve"], ctx.paths.root)})


def run(ctx: RunContext) -> dict:
    step_print = step_fingerprint(ctx)
    folder = ctx.paths.t_dir / "UnsafeSet"
    manifest = ctx.manifest
    if not ctx.force and manifest.is_current(STEP, step_print):
        log.info("assignment step: inputs unchanged, reusing %s", ctx.paths.relative(folder))
        return summarise(ctx)
    layer, module, labels, eligible = selected_clusters(ctx)
    if not eligible:
        return {"stop": f"no RCC of {layer} has two or more images, so no improvement image can be assigned"}
    heatmaps = np.load(ctx.paths.t_dir / "Heatmaps" / f"{layer}.npy", mmap_mode="r")
    member_rows = np.flatnonzero(labels["rcc"].isin(eligible).to_numpy())
    members = normalise_rows(np.asarray(heatmaps[member_rows], dtype=np.float64).reshape(len(member_rows), -1),
                             ctx.settings.normalisation)
    member_rcc = np.array([eligible.index(r) for r in labels["rcc"].iloc[member_rows]])
    distances, images = improvement_distances(ctx, module, members, member_rcc, len(eligible))
    quota = quotas(np.bincount(member_rcc, minlength=len(eligible)))
    assigned, rank = closest_u(distances, quota)
    write_outputs(ctx, folder, images, eligible, distances, assigned, rank)
    manifest.record(STEP, step_print, [ctx.paths.relative(folder / "assignments.csv")])
    return summarise(ctx)


def write_outputs(ctx, folder, images, eligible, distances, assigned, rank) -> None:
    chosen = np.flatnonzero(assigned >= 0)
    table = pd.DataFrame({"image": images["image"].to_numpy()[chosen],
                          "rcc": [eligible[c] for c in assigned[chosen]],
                          "distance": distances[chosen, assigned[chosen]], "rank": rank[chosen]})
    table = table.sort_values(["rcc", "distance"], kind="stable").reset_index(drop=True)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for row in table.itertuples():
        source = ctx.paths.root / row.image
        target = folder / row.rcc / f"{source.parent.name}__{source.name}"
        target.parent.mkdir(exist_ok=True)
        shutil.copy2(source, target)
    write_csv(table, folder / "assignments.csv")
    distance_table = pd.DataFrame(distances, columns=eligible)
    distance_table.insert(0, "image", images["image"])
    write_csv(distance_table, folder / "rcc_distances.csv")


def summarise(ctx: RunContext) -> dict:
    folder = ctx.paths.t_dir / "UnsafeSet"
    table = pd.read_csv(folder / "assignments.csv")
    return {"images": len(table), "rccs": table["rcc"].nunique(), "folder": folder}
