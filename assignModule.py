"""Step 4: assign the improvement images to the root-cause clusters; the unsafe set.

For every improvement image (labels are not needed), the relevance at the selected layer only, its
nearest-member distance to each RCC of two or more images, then the original's "ClosestU" greedy
assignment with per-RCC quotas (reference §8.1): images are taken by ascending distance to their
closest RCC, then to their second closest, and so on, each image at most once and each RCC up to
its quota of ceil(`budget_factor` x its size). The unsafe set is what an engineer labels, and what
HUDD's retraining trains on (the original built a 2x set here and retrained with a 1x one).

Writes `T/UnsafeSet/<RCC>/` (copies of the images), `T/UnsafeSet/assignments.csv` (image, rcc,
distance, rank; rank 0 = its closest RCC) and `T/UnsafeSet/rcc_distances.csv` (every improvement
image's distance to every eligible RCC).
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import clusterModule
import distributed
import testModule
from clustering import CHUNK_BYTES, normalise_rows
from features import make_space
from Helper import CasePaths, HuddError, PipelineStop, RunContext, Step, image_set_digest, write_csv

log = logging.getLogger("hudd")


def quotas(sizes: np.ndarray, factor: float) -> np.ndarray:
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


# --------------------------------------------------------------------------------------------
# The files, and their one reader
# --------------------------------------------------------------------------------------------

FOLDER = "UnsafeSet"
ASSIGNMENTS_FILE = "assignments.csv"
DISTANCES_FILE = "rcc_distances.csv"


def unsafe_dir(paths: CasePaths) -> Path:
    return paths.t_dir / FOLDER


def unsafe_copy(paths: CasePaths, rcc: str, image: str) -> Path:
    """The copy of an assigned improvement image in its RCC's folder: `<its folder>__<file>`."""
    source = Path(image)
    return unsafe_dir(paths) / rcc / f"{source.parent.name}__{source.name}"


def read_assignments(paths: CasePaths) -> pd.DataFrame | None:
    """image, rcc, distance, rank of every improvement image in the unsafe set; None before the step ran."""
    path = unsafe_dir(paths) / ASSIGNMENTS_FILE
    return pd.read_csv(path) if path.is_file() else None


def read_rcc_distances(paths: CasePaths) -> pd.DataFrame:
    """image, then one column per eligible RCC: every improvement image's nearest-member distance."""
    path = unsafe_dir(paths) / DISTANCES_FILE
    if not path.is_file():
        raise HuddError(f"{path}: not found; run the assignment step first (--steps assign)")
    return pd.read_csv(path)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------

@dataclass
class SelectedClusters:
    """The selected layer's RCCs of two or more images: what improvement images are assigned to, at
    the level of `assign_level` (the sub-clusters, or the top-level RCCs)."""

    layer: str
    labels: pd.DataFrame     # every error image's RCCs (clusterModule.read_labels)
    column: str              # "sub_rcc" or "rcc": the level assigned to
    eligible: list[str]      # its groups of two or more images, sorted; never the noise group

    @property
    def member_rows(self) -> np.ndarray:
        return np.flatnonzero(self.labels[self.column].isin(self.eligible).to_numpy())

    @property
    def sizes(self) -> np.ndarray:
        return self.labels[self.column].value_counts().reindex(self.eligible).to_numpy()

    @property
    def member_errors(self) -> pd.DataFrame:
        """image, rcc (the assigned level's group) of the error images in eligible groups."""
        members = self.labels.iloc[self.member_rows]
        return pd.DataFrame({"image": members["image"].to_numpy(), "rcc": members[self.column].to_numpy()})

    @property
    def member_rcc(self) -> np.ndarray:
        """Per member row, the index of its group in `eligible`."""
        return np.array([self.eligible.index(r) for r in self.labels[self.column].iloc[self.member_rows]])


def selected_clusters(ctx: RunContext) -> SelectedClusters:
    layer = clusterModule.selected_layer(ctx.paths)
    labels = clusterModule.read_labels(ctx.paths, layer)
    column = "sub_rcc" if ctx.settings.assign_level == "sub" else "rcc"
    sizes = labels[column].value_counts()
    eligible = sorted(r for r in sizes.index[sizes >= 2] if not r.startswith(clusterModule.NOISE))
    return SelectedClusters(layer, labels, column, eligible)


def clustering_space(ctx: RunContext, layer: str):
    """Rows of the feature space -> the space the cluster step measured distances in: normalised, or
    projected on the layer's principal components."""
    projection = clusterModule.read_projection(ctx.paths, layer)
    if projection is not None:
        return projection
    return lambda block: normalise_rows(np.asarray(block, dtype=np.float64).reshape(len(block), -1),
                                        ctx.settings.normalisation)


def improvement_distances(ctx: RunContext, clusters: SelectedClusters, stamp: str) -> np.ndarray | None:
    """Nearest-member distance of every improvement image to every eligible RCC, batch by batch, in the
    cluster step's feature space (heatmaps: the relevance at the selected layer only, explaining the
    predicted class; no labels needed) and distance space. Under torchrun each rank computes a
    contiguous shard of whole batches; rank 0 gets the whole table (the other ranks None)."""
    space, to_space = make_space(ctx.settings.features), clustering_space(ctx, clusters.layer)
    members = to_space(np.asarray(space.error_rows(ctx, clusters.layer)[clusters.member_rows]))
    improve, channels = ctx.sets()["improve"], improvement_channels(ctx)

    def shard(start: int, stop: int) -> dict[str, np.ndarray]:
        distances = np.empty((stop - start, len(clusters.eligible)))
        batches = space.image_rows(ctx, clusters.layer, improve, channels, start, stop)
        for positions, block in tqdm(batches, desc="assigning improvement images", unit="batch", leave=False,
                                     disable=distributed.progress_off()):
            distances[positions - start] = nearest_member_distances(to_space(block), members, clusters.member_rcc,
                                                                    len(clusters.eligible))
        return {"distances": distances}

    shards = distributed.gather_shards(ctx.paths.scratch / "assign", "distances", len(improve),
                                       ctx.settings.batch_size, stamp, shard)
    return None if shards is None else np.concatenate([s["distances"] for s in shards])


def improvement_channels(ctx: RunContext) -> torch.Tensor:
    """Per improvement image, the output channel explained, as for the error images (tasks.py)."""
    improve = ctx.sets()["improve"]
    results = testModule.read_results(ctx.paths, "improve").set_index("image")
    rows = results.loc[[ctx.paths.relative(p) for p in improve.paths]]
    return ctx.task.improvement_channels(rows, ctx.classes)


class AssignStep(Step):
    name, title = "assign", "assignment step"
    every_rank = True

    def inputs(self, ctx: RunContext) -> dict:
        s = ctx.settings
        return {**ctx.model_fingerprint_part(), "clusters": clusterModule.STEP.recorded_fingerprint(ctx),
                "rules": s.rules, "budget_factor": s.budget_factor, "level": s.assign_level,
                "improve": image_set_digest(ctx.sets()["improve"], ctx.paths.root)}

    def outputs(self, ctx: RunContext) -> list[Path]:
        return [unsafe_dir(ctx.paths) / ASSIGNMENTS_FILE, unsafe_dir(ctx.paths) / DISTANCES_FILE]

    def compute(self, ctx: RunContext) -> None:
        clusters = selected_clusters(ctx)
        if not clusters.eligible:
            raise PipelineStop(f"no RCC of {clusters.layer} has two or more images, so no improvement image can "
                               "be assigned")
        distances = improvement_distances(ctx, clusters, self.fingerprint(ctx))
        if distances is None:  # not rank 0
            return
        assigned, rank = closest_u(distances, quotas(clusters.sizes, ctx.settings.budget_factor))
        images = [ctx.paths.relative(p) for p in ctx.sets()["improve"].paths]
        write_outputs(ctx, images, clusters.eligible, distances, assigned, rank)
        distributed.clear_shards(ctx.paths.scratch / "assign", "distances")

    def summary(self, ctx: RunContext) -> dict:
        table = read_assignments(ctx.paths)
        return {"images": len(table), "rccs": table["rcc"].nunique(), "folder": unsafe_dir(ctx.paths)}


def write_outputs(ctx: RunContext, images: list[str], eligible: list[str], distances: np.ndarray,
                  assigned: np.ndarray, rank: np.ndarray) -> None:
    chosen = np.flatnonzero(assigned >= 0)
    table = pd.DataFrame({"image": np.asarray(images, dtype=object)[chosen],
                          "rcc": [eligible[c] for c in assigned[chosen]],
                          "distance": distances[chosen, assigned[chosen]], "rank": rank[chosen]})
    table = table.sort_values(["rcc", "distance"], kind="stable").reset_index(drop=True)
    folder = unsafe_dir(ctx.paths)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for row in table.itertuples():
        target = unsafe_copy(ctx.paths, row.rcc, row.image)
        target.parent.mkdir(exist_ok=True)
        shutil.copy2(ctx.paths.root / row.image, target)
    write_csv(table, folder / ASSIGNMENTS_FILE)
    distance_table = pd.DataFrame(distances, columns=eligible)
    distance_table.insert(0, "image", images)
    write_csv(distance_table, folder / DISTANCES_FILE)


STEP = AssignStep()
