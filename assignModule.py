"""Step 4: assign the improvement images to the root-cause clusters; the unsafe set.

For every improvement image (labels are not needed, and none is read), the relevance at the selected
layer only, its distance to each RCC of two or more images (`assign_distance`: nearest member, the
original's; mean of the k nearest; medoid), the model's own uncertainty (1 - softmax margin; keypoints:
disagreement under small shifts), then the original's "ClosestU" greedy assignment with per-RCC quotas
(reference §8.1): images are taken by ascending distance to their closest RCC, then to their second
closest, and so on, each image at most once and each RCC up to its quota (`assign_quota`: ceil(
`budget_factor` x its size), or the same total split evenly). Two label-free refinements: an image
beyond `assign_radius` x an RCC's reach cannot join it, and with `assign_uncertainty` an image the model
is sure of looks farther. `assign_pick` contrast chooses differently, with the same budget (the quotas'
sum): the improvement images whose relevance lies nearest the test errors relative to the test images
the model gets right (mean distance to the 5 nearest of each), over the whole set, each joining its
closest RCC. The unsafe set is what an engineer labels, and what HUDD's retraining trains on (the
original built a 2x set here and retrained with a 1x one).

Writes `T/UnsafeSet/<RCC>/` (copies of the images), `T/UnsafeSet/assignments.csv` (image, rcc,
distance, rank; rank 0 = its closest RCC), `T/UnsafeSet/rcc_distances.csv` (every improvement image's
distance to every eligible RCC), `T/UnsafeSet/uncertainty.csv` (every improvement image's uncertainty)
and with `assign_pick` contrast `T/UnsafeSet/contrast.csv` (every improvement image's contrast).
Where the improvement set has no labels, also `T/UnsafeSet/to_label.csv`: the unsafe set's images with
empty label columns, which the engineer fills and saves as `DataSets/ImprovementLabels.csv` to retrain.
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
from clustering import CHUNK_BYTES, flat_rows, normalise_rows, times_transposed
from features import make_space
from Helper import (CasePaths, HuddError, PipelineStop, RunContext, Step, copy_to_new, fitting_name, image_set_digest,
                    make_loader, path_below_set, read_csv, stop_on_unreadable, write_csv, write_label_template)
from tasks import WRONG

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
        take = (place < remaining[proposal]) & np.isfinite(distance[order])  # inf: beyond an RCC's radius
        assigned[free[take]] = proposal[take]
        rank[free[take]] = r
        remaining -= np.bincount(proposal[take], minlength=rccs)
    return assigned, rank


def nearest_member_distances(queries: np.ndarray, members: np.ndarray, member_rcc: np.ndarray,
                             rccs: int) -> np.ndarray:
    """(queries, rccs): for each query, the distance to the nearest member of each RCC (float64)."""
    return member_distances(queries, members, member_rcc, rccs, "nearest")


def squared_distances(block: np.ndarray, members: np.ndarray) -> np.ndarray:
    """(block, members) squared Euclidean distances in float64 by the matrix-product formula."""
    q, m = block.reshape(len(block), -1).astype(np.float64), members.reshape(len(members), -1).astype(np.float64)
    squared = (np.einsum("ij,ij->i", q, q)[:, None] + np.einsum("ij,ij->i", m, m)[None, :]
               - 2.0 * times_transposed(q, m))
    return np.maximum(squared, 0.0)


def member_distances(queries: np.ndarray, members: np.ndarray, member_rcc: np.ndarray, rccs: int,
                     how: str = "nearest", k: int = 3) -> np.ndarray:
    """(queries, rccs) distance of each query to each RCC (setting `assign_distance`): to its nearest
    member ("nearest", the original's), the mean distance to its `k` nearest members ("knn"), or the
    distance to its medoid ("medoid": the member with the smallest summed distance to the others)."""
    if how == "medoid":
        medoids = rcc_medoids(members, member_rcc, rccs)
        members, member_rcc = members[medoids], np.arange(rccs)
    result = np.empty((len(queries), rccs))
    step = max(1, CHUNK_BYTES // (8 * max(len(members), 1)))
    groups = [np.flatnonzero(member_rcc == r) for r in range(rccs)]
    for start in range(0, len(queries), step):
        distance = np.sqrt(squared_distances(queries[start:start + step], members))
        for r, group in enumerate(groups):
            part = distance[:, group]
            if how == "knn" and len(group) > k:
                part = np.partition(part, k - 1, axis=1)[:, :k]
            result[start:start + len(part), r] = part.mean(axis=1) if how == "knn" else part.min(axis=1)
    return result


def rcc_medoids(members: np.ndarray, member_rcc: np.ndarray, rccs: int) -> np.ndarray:
    """Per RCC, the row of its medoid in `members`."""
    medoids = np.empty(rccs, dtype=np.int64)
    for r in range(rccs):
        group = np.flatnonzero(member_rcc == r)
        medoids[r] = group[np.argmin(np.sqrt(squared_distances(members[group], members[group])).sum(axis=1))]
    return medoids


def rcc_reach(members: np.ndarray, member_rcc: np.ndarray, rccs: int, how: str = "nearest", k: int = 3
              ) -> np.ndarray:
    """Per RCC, the largest distance of one of its own members to it, the member left out (for
    "medoid": to the medoid, as the original's centroid mode): the RCC's reach, which setting
    `assign_radius` scales into the distance beyond which an image joins no RCC."""
    reach = np.zeros(rccs)
    medoids = rcc_medoids(members, member_rcc, rccs) if how == "medoid" else None
    for r in range(rccs):
        group = np.flatnonzero(member_rcc == r)
        distance = np.sqrt(squared_distances(members[group], members[group]))
        if how == "medoid":
            reach[r] = distance[:, list(group).index(medoids[r])].max()
            continue
        np.fill_diagonal(distance, np.inf)
        ranked = np.sort(distance, axis=1)[:, :min(k, len(group) - 1) if how == "knn" else 1]
        reach[r] = ranked.mean(axis=1).max()
    return reach


def equal_quotas(sizes: np.ndarray, factor: float) -> np.ndarray:
    """The same total as `quotas`, split evenly over the RCCs (the first ones take the remainder)."""
    total, count = int(quotas(sizes, factor).sum()), len(sizes)
    return total // count + (np.arange(count) < total % count).astype(np.int64)


def choose(distances: np.ndarray, quota: np.ndarray, uncertainty: np.ndarray | None = None, weight: float = 0.0,
           reach: np.ndarray | None = None, radius: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The unsafe set from label-free inputs only: ClosestU over the distances, where an image beyond
    `radius` x an RCC's reach cannot join it, and with `weight` > 0 an image the model is sure of
    looks farther: its distance x (1 + weight x its certainty percentile, 0 = the least certain)."""
    effective = np.array(distances, dtype=np.float64)
    if weight > 0 and uncertainty is not None:
        certainty = np.argsort(np.argsort(-np.asarray(uncertainty), kind="stable"), kind="stable")
        effective = effective * (1.0 + weight * certainty / max(len(certainty) - 1, 1))[:, None]
    if radius > 0 and reach is not None:
        effective[effective > radius * np.asarray(reach)[None, :]] = np.inf
    return closest_u(effective, quota)


CONTRAST_K = 5   # neighbours averaged on each side; the study found the choice flat from 1 to 20 (docs/method.md)


def sides_of(errors: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The contrast's references stacked once (the test errors' rows, then the right test images'), and
    per reference its side: 0 an error, 1 an image the model gets right."""
    return np.concatenate([errors, right]), np.repeat([0, 1], [len(errors), len(right)])


def contrast(rows: np.ndarray, references: np.ndarray, side: np.ndarray) -> np.ndarray:
    """Per row: how much nearer it lies to the test errors than to the test images the model gets right
    (mean distance to the CONTRAST_K nearest of each side, `member_distances` "knn" with the two sides as
    its groups; error over right; lower: more like an error). An image at distance 0 from the images the
    model gets right is one the model handles: infinite."""
    to_errors, to_right = member_distances(rows, references, side, 2, "knn", CONTRAST_K).T
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(to_right > 0, to_errors / to_right, np.inf)


def pick_of(ctx: RunContext) -> str:
    """`assign_pick`, with auto resolved by the task (tasks.py): the contrast for classification, where
    the study found it ahead; closest for keypoint models, where it was not (docs/method.md)."""
    return ctx.task.unsafe_pick if ctx.settings.assign_pick == "auto" else ctx.settings.assign_pick


def contrast_choice(distances: np.ndarray, contrast_of: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """`assign_pick` contrast: the `budget` improvement images of lowest contrast, over the whole set (no
    per-RCC quota), each joining its closest RCC (rank 0). Ties by image order."""
    chosen = np.argsort(contrast_of, kind="stable")[:budget]
    assigned = np.full(len(contrast_of), -1, dtype=np.int64)
    rank = np.full(len(contrast_of), -1, dtype=np.int64)
    assigned[chosen] = np.argmin(distances[chosen], axis=1)
    rank[chosen] = 0
    return assigned, rank


# --------------------------------------------------------------------------------------------
# The files, and their one reader
# --------------------------------------------------------------------------------------------

FOLDER = "UnsafeSet"
ASSIGNMENTS_FILE = "assignments.csv"
DISTANCES_FILE = "rcc_distances.csv"
UNCERTAINTY_FILE = "uncertainty.csv"
CONTRAST_FILE = "contrast.csv"   # assign_pick contrast: every improvement image's contrast
TO_LABEL_FILE = "to_label.csv"   # an unlabelled improvement set: the unsafe set's images, label columns empty
ASSIGN_SETTINGS = ("assign_pick", "assign_distance", "assign_k", "assign_radius", "assign_uncertainty", "assign_quota")


def unsafe_dir(paths: CasePaths) -> Path:
    return paths.t_dir / FOLDER


def to_label_path(paths: CasePaths) -> Path:
    return unsafe_dir(paths) / TO_LABEL_FILE


def unsafe_copy(paths: CasePaths, rcc: str, image: str) -> Path:
    """The copy of an assigned improvement image in its RCC's folder: `<its folder>__<file>`, every folder
    below the set kept (`subject1__left__0001.png`), so that two files of one name cannot collide; an
    image directly in an unlabelled set keeps the set's name as its folder (`ImprovementSet__<file>`)."""
    below = path_below_set(image)
    name = "__".join(below if len(below) > 1 else [Path(image).parent.name, *below])
    return unsafe_dir(paths) / rcc / fitting_name(name)


def read_assignments(paths: CasePaths) -> pd.DataFrame | None:
    """image, rcc, distance, rank of every improvement image in the unsafe set; None before the step ran."""
    path = unsafe_dir(paths) / ASSIGNMENTS_FILE
    return read_csv(path) if path.is_file() else None


def read_uncertainty(paths: CasePaths) -> pd.DataFrame:
    """image, uncertainty (1 - softmax margin; keypoints: shift disagreement) of every improvement image."""
    path = unsafe_dir(paths) / UNCERTAINTY_FILE
    if not path.is_file():
        raise HuddError(f"{path}: not found; run the assignment step again (--steps assign --force)")
    return read_csv(path)


def read_rcc_distances(paths: CasePaths) -> pd.DataFrame:
    """image, then one column per eligible RCC: every improvement image's nearest-member distance."""
    path = unsafe_dir(paths) / DISTANCES_FILE
    if not path.is_file():
        raise HuddError(f"{path}: not found; run the assignment step first (--steps assign)")
    return read_csv(path)


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
    return lambda block: normalise_rows(flat_rows(block), ctx.settings.normalisation)


def error_rows(ctx: RunContext, layer: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """(every test error's row at `layer` in the cluster step's distance space, the feature space's own
    row shape). Read once per step: the RCC members are some of these rows and the contrast uses them
    all, and the activations and backbone spaces compute them with a forward pass."""
    raw = np.asarray(make_space(ctx.settings.features).error_rows(ctx, layer))
    return clustering_space(ctx, layer)(raw), raw.shape[1:]


def improvement_rows(ctx: RunContext, clusters: SelectedClusters, channels: torch.Tensor, images=None):
    """(positions, rows) of the improvement images (`images`: a torchrun rank's shard of them; default all)
    in the cluster step's feature space (heatmaps: the relevance at the selected layer only, explaining
    `channels`, one per image) and distance space, batch by batch."""
    space, to_space = make_space(ctx.settings.features), clustering_space(ctx, clusters.layer)
    images = ctx.sets()["improve"] if images is None else images
    batches = space.image_rows(ctx, clusters.layer, images, channels)
    for positions, block in tqdm(batches, desc="assigning improvement images", unit="batch", leave=False,
                                 disable=distributed.progress_off()):
        yield positions, to_space(block)


def improvement_distances(ctx: RunContext, clusters: SelectedClusters, members: np.ndarray,
                          sides: tuple[np.ndarray, np.ndarray] | None, results: pd.DataFrame, stamp: str
                          ) -> tuple[np.ndarray, np.ndarray | None, pd.DataFrame] | None:
    """Distance (setting `assign_distance`) of every improvement image to every eligible RCC (`members`:
    their error images' rows), its contrast where `sides` are given (contrast_sides; else None), and its
    uncertainty (uncertainty_table, from `results`, the improvement images' test-step rows); no labels
    needed. Under torchrun each rank computes a contiguous shard of whole batches; rank 0 gets the whole
    tables (the other ranks None)."""
    s, improve, member_rcc, rccs = ctx.settings, ctx.sets()["improve"], clusters.member_rcc, len(clusters.eligible)
    how = s.assign_distance
    if how == "medoid":  # the medoids once, not per batch: the distance to an RCC's medoid is to its one member
        medoids = rcc_medoids(members, member_rcc, rccs)
        members, member_rcc, how = members[medoids], np.arange(rccs), "nearest"

    def shard(start: int, stop: int) -> dict[str, np.ndarray]:
        distances, contrast_of = np.empty((stop - start, rccs)), np.empty(stop - start)
        uncertainty, uncertain_keypoint = np.empty(0), np.empty(0, dtype=str)
        if start < stop:
            # The shard's own images from its first one (a multiple of the batch size): the one-process run's
            # batches; for keypoints their uncertainty is a forward pass of its own, not repeated by every rank.
            results_of, images = results.iloc[start:stop], improve.subset(np.arange(start, stop))
            table = uncertainty_table(ctx, results_of, images)
            uncertainty = table["uncertainty"].to_numpy()
            if "uncertain_keypoint" in table:   # keypoint models only
                uncertain_keypoint = table["uncertain_keypoint"].to_numpy(dtype=str)
            for positions, rows in improvement_rows(ctx, clusters, label_free_channels(ctx, results_of, table), images):
                distances[positions] = member_distances(rows, members, member_rcc, rccs, how, s.assign_k)
                if sides is not None:
                    contrast_of[positions] = contrast(rows, *sides)
        return {"distances": distances, "uncertainty": uncertainty, "uncertain_keypoint": uncertain_keypoint,
                **({"contrast": contrast_of} if sides is not None else {})}

    shards = distributed.gather_shards(ctx.paths.scratch / "assign", "distances", len(improve),
                                       ctx.settings.batch_size, stamp, shard)
    if shards is None:
        return None
    # A rank left no image adds nothing, not even its arrays' dtype: its empty float64 uncertainty would turn
    # the others' float32 into float64, and uncertainty.csv's digits with it.
    filled = [s for s in shards if len(s["distances"])] or shards[:1]
    whole = {key: np.concatenate([s[key] for s in filled]) for key in shards[0]}
    uncertainty = pd.DataFrame({"image": results.index, "uncertainty": whole["uncertainty"]})
    if len(whole["uncertain_keypoint"]):
        uncertainty["uncertain_keypoint"] = whole["uncertain_keypoint"]
    return whole["distances"], whole.get("contrast"), uncertainty


def contrast_sides(ctx: RunContext, clusters: SelectedClusters, errors: np.ndarray, row_shape: tuple[int, ...],
                   stamp: str = "") -> tuple[np.ndarray, np.ndarray] | None:
    """The two sides of the contrast (`sides_of`), in the cluster step's distance space: every test error
    (`errors`, as error_rows gives them with the feature space's `row_shape`) and every test image the
    model gets right, explained as an improvement image is (the label-free rule: its predicted class, or
    the keypoint the model is least sure of). The test set's labels are HUDD's input already; no
    improvement label is read. None where no test image is right. Under torchrun each rank explains a
    shard of the right images and every rank reads them all (`stamp`: the step's fingerprint, for
    resuming)."""
    space, to_space = make_space(ctx.settings.features), clustering_space(ctx, clusters.layer)
    test = ctx.sets()["test"]
    results = testModule.read_results(ctx.paths, "test").set_index("image")
    right = results[results["result"] != WRONG]
    if right.empty:
        log.warning("%s: the model gets no test image right, so the contrast has no second side: the unsafe set "
                    "is chosen as assign_pick closest chooses it", testModule.result_path(ctx.paths, "test"))
        return None
    position = {ctx.paths.relative(p): i for i, p in enumerate(test.paths)}
    right_set = test.subset(np.array([position[image] for image in right.index]))

    def shard(start: int, stop: int) -> dict[str, np.ndarray]:   # the feature space's rows, as computed
        # The shard's own images from its first one (a multiple of the batch size): the one-process run's
        # batches; for keypoints their uncertainty is a forward pass of its own, not repeated by every rank.
        if start == stop:
            return {"rows": np.empty((0, *row_shape))}
        results_of, images = right.iloc[start:stop], right_set.subset(np.arange(start, stop))
        channels = label_free_channels(ctx, results_of, uncertainty_table(ctx, results_of, images))
        blocks = space.image_rows(ctx, clusters.layer, images, channels)
        return {"rows": np.concatenate([block for _positions, block in blocks])}

    shards = distributed.gather_shards(ctx.paths.scratch / "assign", "contrast_sides", len(right_set),
                                       ctx.settings.batch_size, stamp, shard, everyone=True)
    return sides_of(errors, np.concatenate([to_space(s["rows"]) for s in shards]))


def improvement_results(ctx: RunContext) -> pd.DataFrame:
    """improveResult.csv in the improvement set's order (the test step's rows: label-free columns are
    read from it, never `expected` or `result`)."""
    images = [ctx.paths.relative(p) for p in ctx.sets()["improve"].paths]
    results = testModule.read_results(ctx.paths, "improve").set_index("image")
    missing = [image for image in images if image not in results.index]
    if missing:
        raise HuddError(f"{testModule.result_path(ctx.paths, 'improve')}: no row for {len(missing)} improvement "
                        f"image(s), e.g. {missing[0]}; run the test step again (--steps test assign)")
    return results.reindex(images)


def label_free_channels(ctx: RunContext, results: pd.DataFrame, uncertainty: pd.DataFrame) -> torch.Tensor:
    """Per image of `results` (the improvement images; the contrast's right test images are explained the
    same way), the output channel explained, from label-free columns only (tasks.py): the predicted
    class, or the keypoint the model is least sure of."""
    label_free = uncertainty.set_index("image").reindex(results.index)
    if "predicted" in results.columns and ctx.task.name == "classification":
        label_free["predicted"] = results["predicted"]
    return ctx.task.label_free_channels(label_free, ctx.classes)


def uncertainty_table(ctx: RunContext, results: pd.DataFrame, image_set=None) -> pd.DataFrame:
    """image, uncertainty (higher: the original model is less sure) of every image of `image_set` (default:
    the improvement set; `results`: its test-step rows), from the model's own outputs (tasks.py: 1 -
    softmax margin, from the test step's logits in `results`; keypoints: disagreement under small shifts,
    a forward pass of its own), and for keypoints the keypoint it is least sure of. No label is read."""
    per_output = ctx.task.uncertainty_of_results(results, ctx.classes)
    if per_output is None:
        per_output = model_uncertainty(ctx, image_set)
    table = pd.DataFrame({"image": results.index, "uncertainty": per_output.mean(axis=1)})
    if per_output.shape[1] > 1:
        table["uncertain_keypoint"] = [ctx.classes[k] for k in per_output.argmax(axis=1)]
    return table


def model_uncertainty(ctx: RunContext, image_set=None) -> np.ndarray:
    """(images, outputs): the task's uncertainty of every image of `image_set` (default: the improvement
    set), from the model."""
    improve, model = image_set if image_set is not None else ctx.sets()["improve"], ctx.model()
    parts, positions = [], []
    loader = make_loader(improve, ctx.settings, ctx.settings.batch_size, ctx.settings.workers)
    with torch.no_grad():
        for inputs, _labels, rows, failures in loader:
            stop_on_unreadable(improve, failures)
            parts.append(ctx.task.uncertainty(model, inputs.to(ctx.device)))
            positions.append(rows.numpy())
    per_output = np.empty((len(improve), parts[0].shape[1]))
    per_output[np.concatenate(positions)] = np.concatenate(parts)
    return per_output


def rcc_quotas(settings, sizes: np.ndarray) -> np.ndarray:
    """Per RCC labelling quota (setting `assign_quota`): ceil(budget_factor x size), or the same total
    split evenly."""
    return (equal_quotas if settings.assign_quota == "equal" else quotas)(sizes, settings.budget_factor)


def unsafe_choice(ctx: RunContext, clusters: SelectedClusters, members: np.ndarray, distances: np.ndarray,
                  uncertainty: pd.DataFrame, contrast_of: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The unsafe set under the case's settings: (per image its RCC index or -1, its rank); by the contrast
    where there is one (`improvement_distances`), else the ClosestU greedy. The budget is the RCC quotas'
    sum either way."""
    s, count = ctx.settings, len(clusters.eligible)
    if contrast_of is not None:
        return contrast_choice(distances, contrast_of, int(rcc_quotas(s, clusters.sizes).sum()))
    reach = rcc_reach(members, clusters.member_rcc, count, s.assign_distance, s.assign_k) if s.assign_radius else None
    return choose(distances, rcc_quotas(s, clusters.sizes), uncertainty["uncertainty"].to_numpy(),
                  s.assign_uncertainty, reach, s.assign_radius)


class AssignStep(Step):
    name, title = "assign", "assignment step"
    every_rank = True

    def inputs(self, ctx: RunContext) -> dict:
        s = ctx.settings
        return {**ctx.model_fingerprint_part(), "clusters": clusterModule.STEP.recorded_fingerprint(ctx),
                "rules": s.rules, "budget_factor": s.budget_factor, "level": s.assign_level,
                **{k: getattr(s, k) for k in ASSIGN_SETTINGS},
                "improve": image_set_digest(ctx.sets()["improve"], ctx.paths.root)}

    def outputs(self, ctx: RunContext) -> list[Path]:
        return [unsafe_dir(ctx.paths) / name for name in (ASSIGNMENTS_FILE, DISTANCES_FILE, UNCERTAINTY_FILE)]

    def compute(self, ctx: RunContext) -> None:
        clusters = selected_clusters(ctx)
        if not clusters.eligible:
            raise PipelineStop(f"no RCC of {clusters.layer} has two or more images, so no improvement image can "
                               "be assigned: there is no unsafe set, and so nothing to retrain with")
        stamp, (errors, row_shape) = self.fingerprint(ctx), error_rows(ctx, clusters.layer)
        members = errors[clusters.member_rows]
        # Every rank's shard needs both sides whole: the right test images' relevance is computed in shards too.
        sides = contrast_sides(ctx, clusters, errors, row_shape, stamp) if pick_of(ctx) == "contrast" else None
        del errors  # the sides hold their own copy
        measured = improvement_distances(ctx, clusters, members, sides, improvement_results(ctx), stamp)
        if measured is None:  # not rank 0
            return
        distances, contrast_of, uncertainty = measured
        assigned, rank = unsafe_choice(ctx, clusters, members, distances, uncertainty, contrast_of)
        images = [ctx.paths.relative(p) for p in ctx.sets()["improve"].paths]
        write_outputs(ctx, images, clusters.eligible, distances, assigned, rank)
        write_csv(uncertainty, unsafe_dir(ctx.paths) / UNCERTAINTY_FILE)
        if contrast_of is not None:
            write_csv(pd.DataFrame({"image": images, "contrast": contrast_of}), unsafe_dir(ctx.paths) / CONTRAST_FILE)
        for key in ("distances", "contrast_sides"):   # every rank has read the sides: the distances were gathered after
            distributed.clear_shards(ctx.paths.scratch / "assign", key)

    def summary(self, ctx: RunContext) -> dict:
        table = read_assignments(ctx.paths)
        to_label = to_label_path(ctx.paths)
        groups = table["rcc"].astype(str)   # sub-clusters (RCC01.2) or top-level RCCs, as assign_level says
        return {"images": len(table), "rccs": groups.str.split(".").str[0].nunique(), "groups": groups.nunique(),
                "folder": unsafe_dir(ctx.paths),
                "to_label": to_label if to_label.is_file() and not ctx.sets()["improve"].labelled else None}


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
        copy_to_new(ctx.paths.root / row.image, target)   # unsafe_copy's names are unique: never an overwrite
    write_csv(table, folder / ASSIGNMENTS_FILE)
    if not ctx.sets()["improve"].labelled:  # the only images an engineer must label before retraining
        write_label_template(to_label_path(ctx.paths), list(table["image"]), list(table["rcc"]), ctx.task, ctx.classes)
    distance_table = pd.DataFrame(distances, columns=eligible)
    distance_table.insert(0, "image", images)
    write_csv(distance_table, folder / DISTANCES_FILE)


STEP = AssignStep()
