"""assignModule: the ClosestU greedy against a literal reference, distances, the step's files."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist

import assignModule
import clusterModule
import heatmapModule
import testModule
from helpers import context, run_step, run_steps


def reference_closest_u(distances: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """The original's loop (reference §8.1), written plainly: for each rank, repeatedly take the
    image nearest to its rank-r closest RCC; assign it if it is free and that RCC has room."""
    images, rccs = distances.shape
    ranked = np.argsort(distances, axis=1, kind="stable")
    assigned = [-1] * images
    counts = [0] * rccs
    total = int(sum(quota))
    for r in range(rccs):
        pool = {i: distances[i, ranked[i, r]] for i in range(images)}
        while pool and sum(counts) < total:
            image = min(pool, key=lambda i: (pool[i], i))
            del pool[image]
            rcc = ranked[image, r]
            if assigned[image] == -1 and counts[rcc] < quota[rcc]:
                assigned[image] = rcc
                counts[rcc] += 1
    return np.array(assigned)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_matches_the_literal_reference(seed):
    rng = np.random.default_rng(seed)
    images, rccs = rng.integers(5, 60), rng.integers(1, 7)
    distances = rng.gamma(2.0, 1.0, size=(images, rccs))
    quota = rng.integers(0, 8, size=rccs)
    assigned, rank = assignModule.closest_u(distances, quota)
    np.testing.assert_array_equal(assigned, reference_closest_u(distances, quota))
    ranked = np.argsort(distances, axis=1, kind="stable")
    for i in np.flatnonzero(assigned >= 0):
        assert ranked[i, rank[i]] == assigned[i]
    assert (np.bincount(assigned[assigned >= 0], minlength=rccs) <= quota).all()
    assert (assigned >= 0).sum() == min(images, quota.sum())


def test_quotas_are_the_cluster_size_times_the_factor_rounded_up():
    np.testing.assert_array_equal(assignModule.quotas([2, 3, 7], factor=2.0), [4, 6, 14])
    np.testing.assert_array_equal(assignModule.quotas([2, 3, 7], factor=0.3), [1, 1, 3])


def test_nearest_member_distances_against_cdist():
    rng = np.random.default_rng(0)
    members = rng.normal(size=(12, 20))
    member_rcc = rng.permutation(np.repeat([0, 1, 2], 4))
    queries = rng.normal(size=(9, 20))
    ours = assignModule.nearest_member_distances(queries, members, member_rcc, 3)
    full = cdist(queries, members)
    expected = np.stack([full[:, member_rcc == c].min(axis=1) for c in range(3)], axis=1)
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-10)


def test_the_step_writes_the_unsafe_set(make_case):
    case = make_case(per_class=8)
    ctx = context(case, assign_pick="closest")   # the original's ClosestU (the contrast pick: test_unsafe_set.py)
    run_steps(ctx, testModule.STEP, heatmapModule.STEP, clusterModule.STEP)
    summary = run_step(assignModule.STEP, ctx)
    folder = case / "T" / "UnsafeSet"
    table = pd.read_csv(folder / "assignments.csv")
    assert table["image"].is_unique and len(table) == summary["images"] > 0
    clusters = assignModule.selected_clusters(ctx)
    layer, labels, eligible = clusters.layer, clusters.labels, clusters.eligible
    module = heatmapModule.module_of(ctx.paths, layer)
    level = clusters.column   # the RCC level the images are assigned to (the sub-clusters by default)
    sizes = labels[level].value_counts()
    for rcc, group in table.groupby("rcc"):  # the unsafe set's quota is the labelling budget's
        assert rcc in eligible and len(group) <= assignModule.quotas([sizes[rcc]], ctx.settings.budget_factor)[0]
        assert len(list((folder / rcc).iterdir())) == len(group)
    # One distance recomputed from scratch: the engine on that image, the member heatmaps on disk.
    row = table.iloc[0]
    from PIL import Image
    import Helper
    image = Helper.make_transform(ctx.settings)(Image.open(case / row.image).convert("RGB"))[None]
    predicted = pd.read_csv(case / "improveResult.csv").set_index("image").loc[row.image, "predicted"]
    relevance = heatmapModule.relevance(ctx.model(), image, target=ctx.classes.index(predicted),
                                        layers=[module])[module].numpy().reshape(1, -1)
    members = np.load(case / "T" / "Heatmaps" / f"{layer}.npy")[labels.index[labels[level] == row.rcc]]
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    expected = cdist(unit(relevance.astype(np.float64)), unit(members.reshape(len(members), -1).astype(np.float64)))
    assert row.distance == pytest.approx(expected.min(), rel=1e-5)


def test_rerun_skips_and_force_gives_the_same_unsafe_set(make_case):
    case = make_case(per_class=6)
    ctx = context(case)
    run_steps(ctx, testModule.STEP, heatmapModule.STEP, clusterModule.STEP, assignModule.STEP)
    first = (case / "T" / "UnsafeSet" / "assignments.csv").read_bytes()
    mtime = (case / "T" / "UnsafeSet" / "assignments.csv").stat().st_mtime_ns
    run_step(assignModule.STEP, context(case))
    assert (case / "T" / "UnsafeSet" / "assignments.csv").stat().st_mtime_ns == mtime
    forced = context(case)
    forced.force = True
    run_step(assignModule.STEP, forced)
    assert (case / "T" / "UnsafeSet" / "assignments.csv").read_bytes() == first
