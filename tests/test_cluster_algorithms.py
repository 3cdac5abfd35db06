"""clusterModule's algorithms against plain, independent computations."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster
from scipy.spatial.distance import cdist

import clustering as C


def blobs(seed=0, per=25, dims=12, centres=(0, 6, 12)):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(c, 1.0, size=(per, dims)) for c in centres])


def brute_wicd(distances, labels):
    n, k, total = len(labels), labels.max() + 1, 0.0
    for c in range(k):
        members = np.flatnonzero(labels == c)
        if len(members) > 1:
            inner = distances[np.ix_(members, members)][np.triu_indices(len(members), 1)]
            total += inner.mean() * len(members) / n
    return total / k


def brute_silhouette(distances, labels):
    scores = []
    for i in range(len(labels)):
        same = labels == labels[i]
        if same.sum() < 2:
            scores.append(0.0)
            continue
        a = distances[i, same].sum() / (same.sum() - 1)
        b = min(distances[i, labels == c].mean() for c in set(labels.tolist()) - {labels[i]})
        scores.append((b - a) / max(a, b))
    return float(np.mean(scores))


@pytest.mark.parametrize("normalisation", ["none", "l2", "max"])
def test_distances_match_scipy_in_chunks(normalisation):
    x = blobs(dims=40).reshape(75, 5, 8).astype(np.float32)  # the trailing shape is flattened
    flat = x.reshape(75, -1).astype(np.float64)
    if normalisation == "l2":
        flat = flat / np.sqrt((flat ** 2).sum(axis=1, keepdims=True))
    elif normalisation == "max":
        flat = flat / np.abs(flat).max(axis=1, keepdims=True)
    in_chunks = C.pairwise_distances(x, normalisation, chunk_bytes=8 * 40 * 7)  # 7 rows a block
    np.testing.assert_allclose(in_chunks, cdist(flat, flat), rtol=1e-12, atol=1e-12)
    assert np.array_equal(in_chunks, in_chunks.T) and not in_chunks.diagonal().any()
    x[3] = x[10] = x[2]  # identical heatmaps in one block and in two: exactly 0 apart, both ways
    in_chunks = C.pairwise_distances(x, normalisation, chunk_bytes=8 * 40 * 7)
    assert not in_chunks[np.ix_([2, 3, 10], [2, 3, 10])].any()


def test_near_duplicates_are_exact():
    rng = np.random.default_rng(1)
    base = rng.normal(1000.0, 1.0, size=(1, 5000))
    x = np.concatenate([base, base, base + 1e-6, rng.normal(1000.0, 1.0, size=(2, 5000))])
    d = C.pairwise_distances(x)
    assert d[0, 1] == d[1, 0] == 0.0
    assert d[0, 2] == d[2, 0] == pytest.approx(np.sqrt(5000) * 1e-6, rel=1e-6)


def test_labels_match_fcluster_partitions():
    x = blobs()
    d = C.pairwise_distances(x)
    tree = C.ward_tree(d)
    for k in (2, 3, 7, 30):
        ours = C.labels_at(tree, len(x), k)
        theirs = fcluster(tree, k, "maxclust")
        assert len(set(ours.tolist())) == k
        assert len(set(zip(ours.tolist(), theirs.tolist()))) == k  # the same partition
        assert ours[0] == 0  # numbered by first member


def test_wicd_and_silhouette_for_every_k_match_brute_force():
    x = blobs(seed=2, per=12)
    d = C.pairwise_distances(x)
    tree = C.ward_tree(d)
    n = len(x)
    ks = C.k_range(n)
    assert list(ks) == list(range(2, n // 2 + 1))
    wicd = C.wicd_curve(tree, d)
    silhouette = C.silhouette_curve(tree, d, ks)
    for k in ks:
        labels = C.labels_at(tree, n, k)
        assert wicd[k] == pytest.approx(brute_wicd(d, labels), rel=1e-10, abs=1e-12)
        assert silhouette[k] == pytest.approx(brute_silhouette(d, labels), rel=1e-10, abs=1e-12)


def test_k_choice_on_three_blobs():
    d = C.pairwise_distances(blobs(seed=3))
    three = C.cluster_layer("Layer3", d, k_criterion="silhouette")
    assert three.k == 3
    assert sorted(np.bincount(three.labels)) == [25, 25, 25]
    knee = C.cluster_layer("Layer3", d, k_criterion="knee")
    assert 2 <= knee.k <= 6  # the elbow of WICD sits near the true 3


def test_profiles_space_clusters_the_same_blobs():
    d = C.pairwise_distances(blobs(seed=4))
    result = C.cluster_layer("Layer2", d, space="profiles", k_criterion="silhouette")
    assert result.k == 3 and sorted(np.bincount(result.labels)) == [25, 25, 25]


def test_gradient_matches_the_five_point_formula():
    y = np.array([10.0, 7.0, 5.0, 4.0, 3.5, 3.2, 3.0])
    g = C.five_point_gradient(y)
    assert g[3] == pytest.approx((y[1] - 8 * y[2] + 8 * y[4] - y[5]) / 12 / 4)
    assert g[0] == pytest.approx((y[1] - y[0]) / 4)
    assert g[-1] == pytest.approx((y[-1] - y[-2]) / 4)


def test_knee_falls_back_when_kneed_finds_none():
    ks = range(2, 12)
    flat = np.zeros(20)
    flat[2:12] = 1.0  # a flat curve has no knee; the fallback still returns a k in range
    assert C.knee_k(ks, flat) in ks


def test_layer_selection_never_takes_the_input_layer():
    make = lambda name, wicd, sil: C.LayerClustering(name, 2, np.zeros(4, int), np.zeros(4, int), wicd, sil,
                                                     range(2, 3), np.zeros(5), np.zeros(5))
    layers = [make("Layer0", 0.1, 0.9), make("Layer1", 5.0, 0.2), make("Layer2", 3.0, 0.1)]
    assert C.select_layer(layers, "wicd").layer == "Layer2"
    assert C.select_layer(layers, "silhouette").layer == "Layer1"


def test_layer_selection_leaves_out_the_layer_before_the_output_while_another_is_left():
    make = lambda name, wicd, sil: C.LayerClustering(name, 2, np.zeros(4, int), np.zeros(4, int), wicd, sil,
                                                     range(2, 3), np.zeros(5), np.zeros(5))
    layers = [make("Layer0", 0.1, 0.9), make("Layer1", 5.0, 0.2), make("Layer2", 3.0, 0.1), make("Layer3", 1.0, 0.6)]
    assert C.select_layer(layers, "wicd").layer == "Layer3"                       # without the name: the original
    assert C.select_layer(layers, "wicd", last_layer="Layer3").layer == "Layer2"
    assert C.select_layer(layers, "silhouette", last_layer="Layer3").layer == "Layer1"
    assert C.select_layer(layers[:1] + layers[3:], "wicd", last_layer="Layer3").layer == "Layer3"  # the only one
    assert C.select_layer(layers[:1], "wicd", last_layer="Layer3").layer == "Layer0"


def test_adjusted_mutual_information_against_scikit_learn():
    from sklearn.metrics import adjusted_mutual_info_score
    rng = np.random.default_rng(0)
    for trial in range(60):
        n, groups = int(rng.integers(2, 300)), rng.integers(1, 25, size=2)
        first, second = rng.integers(0, groups[0], n), rng.integers(0, groups[1], n)
        if trial % 3 == 0:   # related groupings, not only independent ones
            second = (first + rng.integers(0, 2, n)) % groups[1]
        assert C.adjusted_mutual_information(first, second) == pytest.approx(adjusted_mutual_info_score(first, second),
                                                                             abs=1e-9)
    for first, second in [([0, 0, 0], [1, 1, 1]), ([0, 1], [1, 0]), (["x", "y", "y"], [3, 3, 1]), ([0, 0, 1], [0, 1, 2])]:
        assert C.adjusted_mutual_information(np.array(first), np.array(second)) == pytest.approx(
            adjusted_mutual_info_score(first, second), abs=1e-9)


def test_layer_selection_passes_over_a_layer_whose_rccs_repeat_the_explained_output():
    explained = np.repeat([0, 1, 2, 3], 6)                     # e.g. the predicted class of 24 error images
    scattered = np.tile([0, 1, 2, 3, 4, 5], 4)                  # RCCs across the classes
    make = lambda name, labels, wicd: C.LayerClustering(name, 4, labels, labels, wicd, 0.1, range(2, 5),
                                                        np.zeros(6), np.zeros(6))
    layers = [make("Layer0", scattered, 0.1), make("Layer1", scattered, 0.5), make("Layer2", explained, 0.2)]
    assert C.output_alignment(explained, explained) == pytest.approx(1.0)
    assert C.output_alignment(scattered, explained) < 0.1
    assert C.select_layer(layers, "wicd").layer == "Layer2"                       # without the outputs: the original
    assert C.select_layer(layers, "wicd", alignments=C.output_alignments(layers, explained)).layer == "Layer1"
    assert C.select_layer(layers[:1] + layers[2:], "wicd",
                          alignments=C.output_alignments(layers, explained)).layer == "Layer2"  # the only one


def test_purity_and_coverage():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 3])
    scenarios = np.array(["fog", "fog", "fog", "night", "night", "night", "night", "tilt", "tilt", "fog"])
    result = C.purity_coverage(labels, scenarios, min_scenario_errors=2)
    assert result["purity"] == pytest.approx((0.75 + 1.0 + 1.0) / 3)  # singleton RCC 3 not averaged
    assert result["coverage"] == 1.0 and result["rccs"] == 3
    merged = C.purity_coverage(np.zeros(10, int), scenarios, min_scenario_errors=2)
    assert merged["coverage"] == pytest.approx(1 / 3)


def test_two_stage_path_for_many_heatmaps():
    x = blobs(seed=5, per=40).astype(np.float32)              # 120 heatmaps, three blobs
    result, sample, distances = C.cluster_two_stage("Layer1", x, k_criterion="silhouette", limit=30, seed=0)
    assert len(sample) == 30 and len(np.unique(sample)) == 30 and distances.shape == (30, 30)
    assert result.k == 3 and len(result.labels) == 120
    truth = np.repeat([0, 1, 2], 40)
    assert len(set(zip(result.labels.tolist(), truth.tolist()))) == 3   # the same partition as the blobs
    # every unsampled heatmap carries the RCC of its nearest sampled heatmap
    rest = np.setdiff1d(np.arange(120), sample)
    nearest = sample[cdist(x[rest], x[sample]).argmin(axis=1)]
    assert np.array_equal(result.labels[rest], result.labels[nearest])


# --------------------------------------------------------------------------------------------
# Two levels of root causes
# --------------------------------------------------------------------------------------------

def nested_blobs(seed=0):
    """Four well-separated groups, each made of three tight blobs: a top level of 4, finer 12."""
    rng = np.random.default_rng(seed)
    centres = [np.r_[g * 60.0, b * 10.0, np.zeros(6)] for g in range(4) for b in range(3)]
    return np.concatenate([rng.normal(c, 0.7, size=(15, 8)) for c in centres])


def test_every_sub_cluster_lies_inside_one_top_level_rcc():
    result = C.cluster_layer("Layer1", C.pairwise_distances(nested_blobs()), k_criterion="silhouette", max_rccs=20)
    assert result.k == 4 and sorted(np.bincount(result.labels)) == [45] * 4
    assert result.k_sub >= result.k
    for sub in np.unique(result.sub_labels):
        assert len(set(result.labels[result.sub_labels == sub].tolist())) == 1
    truth = np.repeat(np.arange(12), 15)   # the finer cut finds the 12 blobs
    assert result.k_sub == 12 and len(set(zip(result.sub_labels.tolist(), truth.tolist()))) == 12


@pytest.mark.parametrize("k", [2, 5, 9])
def test_the_top_level_finds_planted_structure(k):
    rng = np.random.default_rng(k)
    x = np.concatenate([rng.normal(rng.uniform(-50, 50, size=10), 1.0, size=(20, 10)) for _ in range(k)])
    result = C.cluster_layer("L", C.pairwise_distances(x), max_rccs=20)
    assert result.k == k
    assert len(set(zip(result.labels.tolist(), np.repeat(np.arange(k), 20).tolist()))) == k


def test_on_structureless_data_the_top_level_neither_drifts_nor_collapses():
    x = np.random.default_rng(3).normal(size=(400, 30))     # no clusters at all
    result = C.cluster_layer("L", C.pairwise_distances(x), max_rccs=20)
    assert result.silhouette <= C.WEAK_STRUCTURE
    assert result.k == 20                                    # the readable budget: not n/2, not 2-3
    assert C.cluster_layer("L", C.pairwise_distances(x), max_rccs=12).k == 12
    assert C.cluster_layer("L", C.pairwise_distances(x), k_criterion="max", max_rccs=7).k == 7


def test_no_rows_stay_no_rows_in_the_distance_space():
    """A torchrun rank left no image of a set hands on an empty block: it must come out as (0, dims)."""
    rows = np.random.default_rng(0).normal(size=(12, 4, 5))
    assert C.flat_rows(np.empty((0, 4, 5), dtype=np.float32)).shape == (0, 20)
    assert np.array_equal(C.flat_rows(rows), rows.reshape(12, 20))
    projection = C.fit_projection(rows, "l2", components=3)
    assert projection(rows[:0]).shape == (0, 3) and projection(rows).shape == (12, 3)


def test_a_case_with_few_errors_gets_at_most_one_top_level_rcc_per_three_images():
    """Structureless data takes the largest k: up to n/2 it left a fifth of the errors in RCCs of one
    image on cases of 20-50 errors (bench/small_case_study.py)."""
    rng = np.random.default_rng(4)
    for n, k in ((45, 15), (31, 10), (60, 20), (400, 20)):
        result = C.cluster_layer("L", C.pairwise_distances(rng.normal(size=(n, 30))), max_rccs=20)
        assert result.silhouette <= C.WEAK_STRUCTURE and result.k == k == max(result.ks)
        assert np.bincount(result.labels).mean() >= 3
    assert [list(C.top_range(n, 20)) for n in (2, 3, 8, 9, 12)] == [[2], [2], [2], [2, 3], [2, 3, 4]]
    assert max(C.top_range(10_000, 1000)) == C.K_LIMIT


def test_a_weakly_separated_minority_does_not_collapse_the_top_level_and_keeps_its_own_rccs():
    rng = np.random.default_rng(5)   # 360 structureless images and 40 a little apart: silhouette 0.34 at k = 2
    x = np.concatenate([rng.normal(size=(360, 30)), rng.normal(size=(40, 30)) + 3 / np.sqrt(30) * 3])
    result = C.cluster_layer("L", C.pairwise_distances(x, "none"), max_rccs=20)
    assert 0.25 < result.silhouette_curve[2] < C.WEAK_STRUCTURE and np.nanargmax(result.silhouette_curve) == 2
    assert result.k == 20
    minority = np.arange(400) >= 360
    for label in np.unique(result.labels[minority]):   # the finer cut of the same tree keeps the group apart
        assert minority[result.labels == label].mean() >= 0.9


def test_hdbscan_reports_its_noise_as_its_own_group():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(0, 0.5, (30, 5)), rng.normal(20, 0.5, (30, 5)), rng.uniform(-60, 80, (8, 5))])
    result = C.cluster_layer("L", C.pairwise_distances(x), clusterer="hdbscan", min_cluster_size=5)
    assert result.k == 2 and set(result.labels[:60].tolist()) == {0, 1}
    noise = result.labels == -1
    assert 1 <= noise.sum() <= 8 and noise[60:].sum() == noise.sum()   # only the scattered points
    for sub in np.unique(result.sub_labels):                            # noise's sub-clusters stay in noise
        assert len(set(result.labels[result.sub_labels == sub].tolist())) == 1
    quality = C.readable_quality(result.labels, np.array(["a"] * 30 + ["b"] * 30 + ["c"] * 8))
    assert quality["noise"] == noise.sum() and quality["rccs"] == 2 and quality["purity"] == 1.0


def test_readable_quality_of_the_largest_rccs():
    labels = np.array([0] * 5 + [1] * 4 + [2] * 3 + [3] * 2 + [-1])
    scenarios = np.array(["fog"] * 4 + ["night"] + ["night"] * 4 + ["tilt"] * 2 + ["none"] + ["tilt", "tilt"] + ["fog"])
    quality = C.readable_quality(labels, scenarios, tops=(1, 2))
    assert quality["rccs"] == 4 and quality["median_size"] == 3.5 and quality["noise"] == 1
    assert quality["purity"] == pytest.approx((0.8 + 1.0 + 2 / 3 + 1.0) / 4)
    assert quality["coverage"] == 1.0      # the causes are fog and night (5 errors each); tilt has 4, "none" is none
    assert quality["purity_1"] == pytest.approx(0.8) and quality["coverage_1"] == pytest.approx(1 / 2)
    assert quality["purity_2"] == pytest.approx(0.9) and quality["coverage_2"] == pytest.approx(1.0)
    assert C.readable_quality(labels, None) == {"rccs": 4, "median_size": 3.5, "noise": 1}
def device_cases():
    import torch
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", device_cases())
@pytest.mark.parametrize("normalisation", ["none", "l2", "max"])
def test_distances_on_a_torch_device_match_the_numpy_path(device, normalisation):
    """The GPU path's code, run here on torch's CPU device (and on CUDA where there is one)."""
    x = blobs(seed=6, dims=40).reshape(75, 5, 8).astype(np.float32)
    x[3] = x[2]                                    # identical heatmaps: exactly 0 apart
    x[5] = 0.0                                     # a zero heatmap stays zero under any normalisation
    expected = C.pairwise_distances(x, normalisation)
    on_device = C.pairwise_distances(x, normalisation, device=device)
    in_blocks = C.device_distances(x, normalisation, C.torch_device(device), chunk_bytes=8 * 40 * 7)
    for d in (on_device, in_blocks):
        np.testing.assert_allclose(d, expected, rtol=1e-12, atol=1e-12)
        assert np.array_equal(d, d.T) and not d.diagonal().any() and d[2, 3] == 0.0


@pytest.mark.parametrize("device", device_cases())
def test_near_duplicates_are_exact_on_a_device(device):
    rng = np.random.default_rng(1)
    base = rng.normal(1000.0, 1.0, size=(1, 5000))
    x = np.concatenate([base, base, base + 1e-6, rng.normal(1000.0, 1.0, size=(2, 5000))])
    d = C.pairwise_distances(x, device=device)
    assert d[0, 1] == d[1, 0] == 0.0
    assert d[0, 2] == d[2, 0] == pytest.approx(np.sqrt(5000) * 1e-6, rel=1e-6)


@pytest.mark.parametrize("device", device_cases())
def test_nearest_rows_on_a_device(device):
    x = blobs(seed=7, per=40).astype(np.float32)
    queries, references = x[::2], x[1::2]
    expected = cdist(queries.astype(np.float64), references.astype(np.float64)).argmin(axis=1)
    assert np.array_equal(C.nearest_rows(queries, references, device=device), expected)
    in_chunks = C.device_nearest_rows(queries, references, "none", C.torch_device(device), chunk_bytes=8 * 12 * 7)
    assert np.array_equal(in_chunks, expected)


CLUSTERING_BYTES = """
import hashlib
import sys
import numpy as np
import clustering as C
rng = np.random.default_rng(0)
rows = np.abs(np.concatenate([rng.normal(c, 1.0, (80 - c // 2, 3136)) for c in range(3)])).astype(np.float32)
distances = C.pairwise_distances(rows, "l2")   # 239 x 3136: numpy's BLAS gave other last bits at 1 and 2 threads
curve = C.silhouette_curve(C.ward_tree(distances), distances, range(2, 21))
nearest = C.nearest_rows(rows[::7], rows[1::5], "l2")
sys.stdout.write(hashlib.sha256(distances.tobytes() + curve[2:21].tobytes() + nearest.tobytes()).hexdigest())
"""


@pytest.mark.parametrize("rows, columns", [(0, 3), (3, 0), (1, 1), (384, 385), (769, 20)])
def test_the_tiled_product_is_the_product(rows, columns):
    """times_transposed cuts a @ b.T into one-thread tiles of 384: every tile edge, and no rows at all, give
    numpy's product (float64; the order of the sums may differ in the last bits)."""
    rng = np.random.default_rng(rows + columns)
    a, b = rng.normal(size=(rows, 50)).astype(np.float32), rng.normal(size=(columns, 50))
    ours = C.times_transposed(a, b)
    assert ours.shape == (rows, columns) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, a.astype(np.float64) @ b.T, rtol=1e-12, atol=1e-12)


def test_distances_and_silhouettes_have_the_same_bits_at_any_thread_count():
    """A torchrun rank runs one thread, a process two or more: the cluster step's outputs must not
    change with it (docs/scaling.md). Two processes, 1 and 2 threads, as HUDD.py sets MKL up."""
    import os
    import subprocess
    import sys
    from helpers import REPO
    curves = []
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "MKL_CBWR": "AUTO,STRICT", "PYTHONPATH": str(REPO)}
        result = subprocess.run([sys.executable, "-c", CLUSTERING_BYTES], capture_output=True, text=True, env=env,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        curves.append(result.stdout)
    assert curves[0] == curves[1]
