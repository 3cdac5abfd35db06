"""The clustering algorithms of the cluster step (clusterModule.py), on arrays only: no files.

Pairwise Euclidean distances between heatmaps (float64 matrix products, in chunks), Ward hierarchical
clustering, the number of clusters and the layer chosen automatically, and the measures of root-cause
clusters where scenarios are known. The merge tree is walked once to get the weighted intra-cluster
distance (WICD) for every k and the silhouette over a range of k, so a sweep of k costs about as much
as one clustering.
"""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform

K_LIMIT = 500                      # the original's cap on the number of clusters
CHUNK_BYTES = 256 * 2 ** 20        # float64 working block of the distance computation


# --------------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------------

PRODUCT_TILE = 384   # rows and columns of one tile of times_transposed: fixed, so its bits are too


def times_transposed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b.T in float64, with the same bits whatever the number of threads: a torchrun rank runs one
    thread, a process several, and their outputs must be the same bytes. BLAS libraries split a product
    over their threads in ways that change the order of its sums (numpy's OpenBLAS at 1 and 2 threads; MKL
    too on an AMD EPYC, even in its strict mode, which holds on Intel CPUs only), and on a digit case of
    239 errors that changed the RCCs of six layers. So the product is cut into tiles of a fixed size, each
    computed by torch on one thread, the tiles spread over torch's threads. On 2 cores it takes 0.9-1.25x
    the time of one threaded product (bench/README)."""
    import torch  # late: the module's other users need no torch

    def tensor(x):  # float64, C order, writable (torch refuses read-only memory maps)
        return torch.from_numpy(np.require(x, dtype=np.float64, requirements=["C", "W"]))
    left, right = tensor(a), tensor(b)
    tiles = [(i, j) for i in range(0, len(a), PRODUCT_TILE) for j in range(0, len(b), PRODUCT_TILE)]
    if not tiles or not _openmp_threads():  # no rows on one side; or a tile's worker cannot be held to one thread
        return (left @ right.T).numpy()
    out = torch.empty((len(a), len(b)), dtype=torch.float64)

    def one_tile(corner: tuple[int, int]) -> None:
        rows, columns = slice(corner[0], corner[0] + PRODUCT_TILE), slice(corner[1], corner[1] + PRODUCT_TILE)
        torch.mm(left[rows], right[columns].T, out=out[rows, columns])
    if torch.get_num_threads() == 1:  # this thread is already held to one
        for corner in tiles:
            one_tile(corner)
    else:
        with ThreadPoolExecutor(min(torch.get_num_threads(), len(tiles)), initializer=torch.set_num_threads,
                                initargs=(1,)) as pool:
            list(pool.map(one_tile, tiles))
    return out.numpy()


@lru_cache(maxsize=1)
def _openmp_threads() -> bool:
    """Whether torch's threads are OpenMP's (as in the Linux and Windows builds): each thread then has its own
    count, which torch.set_num_threads(1) sets for the calling thread alone. Elsewhere the count is the whole
    process's, and times_transposed's bits may depend on it."""
    import torch
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def flat_rows(block) -> np.ndarray:
    """One float64 row per image of `block` (images x any shape); also for no image at all, where
    reshape(0, -1) cannot infer the row length (a torchrun rank left no image of a set)."""
    block = np.asarray(block, dtype=np.float64)
    return block.reshape(len(block), int(np.prod(block.shape[1:])))


def normalise_rows(block: np.ndarray, how: str) -> np.ndarray:
    """Per-heatmap scaling: 'l2' to unit length, 'max' to unit largest magnitude; zero rows stay zero."""
    if how == "none":
        return block
    scale = np.linalg.norm(block, axis=1) if how == "l2" else np.abs(block).max(axis=1)
    scale[scale == 0] = 1.0
    return block / scale[:, None]


def _rows(heatmaps: np.ndarray, start: int, stop: int, how: str) -> np.ndarray:
    return normalise_rows(flat_rows(heatmaps[start:stop]), how)


def pairwise_distances(heatmaps: np.ndarray, normalisation: str = "none",
                       chunk_bytes: int = CHUNK_BYTES, device=None) -> np.ndarray:
    """(n, n) float64 Euclidean distances between the rows of `heatmaps` (any trailing shape; a
    memory-mapped .npy works and is read block by block). Each pair is computed once and mirrored,
    so the matrix is exactly symmetric with a zero diagonal.

    |a-b|^2 = |a|^2 + |b|^2 - 2 a.b in float64; pairs where that difference cancels badly (near
    duplicates) are recomputed directly, so identical heatmaps are at distance exactly 0. With a torch
    `device` (a GPU) the blocks are computed there, in float64, the same way (device_distances)."""
    if device is not None:
        return device_distances(heatmaps, normalisation, torch_device(device), max(chunk_bytes, DEVICE_CHUNK_BYTES))
    n = len(heatmaps)
    dims = int(np.prod(heatmaps.shape[1:]))
    step = max(1, min(n, chunk_bytes // (8 * max(dims, 1))))
    starts = list(range(0, n, step))
    if len(starts) == 1:  # one block: the rows read once, and the block is the matrix (no second n x n array)
        rows = _rows(heatmaps, 0, n, normalisation)
        squared = np.einsum("ij,ij->i", rows, rows)
        return _distance_block(rows, rows, squared, squared, diagonal=True)
    squared = np.concatenate([np.einsum("ij,ij->i", b, b) for b in
                              (_rows(heatmaps, s, min(s + step, n), normalisation) for s in starts)])
    distances = np.empty((n, n))
    for i in starts:
        rows_i = _rows(heatmaps, i, min(i + step, n), normalisation)
        for j in starts:
            if j < i:
                continue
            rows_j = rows_i if j == i else _rows(heatmaps, j, min(j + step, n), normalisation)
            block = _distance_block(rows_i, rows_j, squared[i:i + len(rows_i)], squared[j:j + len(rows_j)],
                                    diagonal=j == i)
            distances[i:i + len(rows_i), j:j + len(rows_j)] = block
            distances[j:j + len(rows_j), i:i + len(rows_i)] = block.T
    return distances


def _distance_block(rows_i, rows_j, sq_i, sq_j, diagonal: bool) -> np.ndarray:
    """Distances between two blocks of rows, computed in place in the product's array (each pass over
    an n x n float64 array costs as much as a tenth of the product); a diagonal block (rows_i is
    rows_j) keeps its upper triangle, mirrored, and a zero diagonal."""
    block = times_transposed(rows_i, rows_j)
    block *= -2.0
    block += sq_i[:, None]
    block += sq_j[None, :]
    _repair_cancellation(block, rows_i, rows_j, sq_i, sq_j, upper_only=diagonal)
    np.maximum(block, 0.0, out=block)
    np.sqrt(block, out=block)
    if diagonal:  # BLAS need not sum (a, b) and (b, a) alike: keep one triangle, mirror it
        _mirror_upper(block)
    return block


def _mirror_upper(square: np.ndarray, tile: int = 512) -> None:
    """The strict upper triangle copied onto the lower one, tile by tile (cache-friendly), diagonal 0."""
    for start in range(0, len(square), tile):
        stop = min(start + tile, len(square))
        square[stop:, start:stop] = square[start:stop, stop:].T
        corner = square[start:stop, start:stop]
        corner[...] = np.triu(corner, 1) + np.triu(corner, 1).T


def _repair_cancellation(block, rows_i, rows_j, sq_i, sq_j, relative: float = 1e-8, chunk: int = 1024,
                         upper_only: bool = False) -> None:
    """Where |a-b|^2 is tiny next to |a|^2 + |b|^2, the product formula has lost its digits:
    compute those squared distances directly (row chunks: no n x n temporary). `upper_only` (a diagonal
    block, whose diagonal is zeroed and lower triangle mirrored afterwards): the strict upper triangle
    only; the diagonal itself is always suspect, and recomputing its n pairs cost a fifth of the step."""
    for first in range(0, len(block), chunk):
        rows = slice(first, first + chunk)
        suspect = np.argwhere(block[rows] <= relative * (sq_i[rows, None] + sq_j[None, :]))
        suspect[:, 0] += first
        if upper_only:
            suspect = suspect[suspect[:, 0] < suspect[:, 1]]
        for start in range(0, len(suspect), 4096):
            pairs = suspect[start:start + 4096]
            diff = rows_i[pairs[:, 0]] - rows_j[pairs[:, 1]]
            block[pairs[:, 0], pairs[:, 1]] = np.einsum("ij,ij->i", diff, diff)


@dataclass
class Projection:
    """Rows normalised, then projected on their principal components (the `reduction` "pca"); the
    assignment step projects improvement images with the same fit."""

    normalisation: str
    mean: np.ndarray          # (dims,)
    components: np.ndarray    # (components, dims), orthonormal rows

    def __call__(self, block: np.ndarray) -> np.ndarray:
        if not len(block):
            return np.empty((0, len(self.components)))
        return times_transposed(normalise_rows(flat_rows(block), self.normalisation) - self.mean, self.components)


def fit_projection(rows: np.ndarray, normalisation: str, components: int, seed: int = 0,
                   sample: int = 5000) -> Projection:
    """PCA of the normalised rows (a seeded sample of at most `sample` of them for large sets), by
    the SVD of the centred rows (scikit-learn's PCA does the same)."""
    n = len(rows)
    chosen = np.sort(np.random.default_rng(seed).choice(n, size=min(n, sample), replace=False))
    flat = normalise_rows(flat_rows(rows[chosen]), normalisation)
    mean = flat.mean(axis=0)
    # Its bits depend on the thread count (numpy's LAPACK, and torch's under MKL's strict mode too): one thread
    # would make them steady, at 1.4x the time on 2 cores and far more on many; docs/scaling.md says so.
    _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
    return Projection(normalisation, mean, vt[:max(1, min(components, len(vt)))])


def project_rows(rows: np.ndarray, projection: Projection, chunk: int = 1024) -> np.ndarray:
    """Every row projected, block by block (rows may be memory-mapped)."""
    return np.concatenate([projection(rows[start:start + chunk]) for start in range(0, len(rows), chunk)])
# --------------------------------------------------------------------------------------------
# The same distances on a torch device (a GPU)
# --------------------------------------------------------------------------------------------

DEVICE_CHUNK_BYTES = 2 ** 30      # float64 working block on the device


def torch_device(device):
    import torch
    return torch.device(device)


def _device_step(heatmaps, chunk_bytes: int) -> int:
    """Rows per block such that a block of rows and a block of pair values each fit chunk_bytes."""
    dims = int(np.prod(heatmaps.shape[1:]))
    return max(1, min(chunk_bytes // (8 * max(dims, 1)), int(np.sqrt(chunk_bytes / 8))))


def _device_rows(heatmaps, start: int, stop: int, how: str, device):
    """Rows start..stop as float64 on the device, normalised as normalise_rows does."""
    import torch
    block = torch.as_tensor(np.asarray(heatmaps[start:stop]).reshape(stop - start, -1)).to(device, torch.float64)
    if how != "none":
        scale = block.norm(dim=1) if how == "l2" else block.abs().amax(dim=1)
        block /= torch.where(scale == 0, torch.ones_like(scale), scale)[:, None]
    return block


def device_distances(heatmaps: np.ndarray, normalisation: str, device, chunk_bytes: int = DEVICE_CHUNK_BYTES
                     ) -> np.ndarray:
    """pairwise_distances with the blocks computed on a torch device in float64: the product formula, the
    direct recomputation of near duplicates, one triangle mirrored; each block is copied to the (n, n)
    host matrix that Ward needs. Float32 is not an option: its rounding error (about 1e-7 of |a|^2) moves
    the distances of ordinary pairs, not only of near duplicates (bench/bench_scale.py measures it)."""
    import torch
    n = len(heatmaps)
    step = max(1, min(n, _device_step(heatmaps, chunk_bytes)))
    starts = list(range(0, n, step))
    squared = torch.cat([(b * b).sum(dim=1) for b in
                         (_device_rows(heatmaps, s, min(s + step, n), normalisation, device) for s in starts)])
    distances = np.zeros((n, n))
    for i in starts:
        rows_i = _device_rows(heatmaps, i, min(i + step, n), normalisation, device)
        sq_i = squared[i:i + len(rows_i)]
        for j in (j for j in starts if j >= i):
            rows_j = rows_i if j == i else _device_rows(heatmaps, j, min(j + step, n), normalisation, device)
            sq_j = squared[j:j + len(rows_j)]
            block = (rows_i @ rows_j.T).mul_(-2.0).add_(sq_i[:, None]).add_(sq_j[None, :])  # in place: one block
            suspect = torch.nonzero(block <= 1e-8 * (sq_i[:, None] + sq_j[None, :]))
            if j == i:  # its diagonal is zeroed and its lower triangle mirrored below
                suspect = suspect[suspect[:, 0] < suspect[:, 1]]
            for first in range(0, len(suspect), 4096):  # cancelled digits: those pairs computed directly
                a, b = suspect[first:first + 4096].T
                block[a, b] = ((rows_i[a] - rows_j[b]) ** 2).sum(dim=1)
            block = block.clamp_min_(0.0).sqrt_()
            if j == i:
                block = torch.triu(block, 1)
                block = block + block.T
            host = block.cpu().numpy()
            distances[i:i + len(rows_i), j:j + len(rows_j)] = host
            distances[j:j + len(rows_j), i:i + len(rows_i)] = host.T
    return distances


def device_nearest_rows(queries, references, normalisation: str, device, chunk_bytes: int = DEVICE_CHUNK_BYTES
                        ) -> np.ndarray:
    """nearest_rows on a torch device in float64, references in chunks when they do not fit one block
    (ties go to the first reference, as argmin's). References that fit one block are sent once."""
    import torch
    step = _device_step(references, chunk_bytes)
    nearest = np.empty(len(queries), dtype=np.int64)

    def reference_block(first: int):
        refs = _device_rows(references, first, min(first + step, len(references)), normalisation, device)
        return refs, (refs * refs).sum(dim=1)

    resident = reference_block(0) if len(references) <= step else None  # with its squared norms, once
    for start in range(0, len(queries), step):
        block = _device_rows(queries, start, min(start + step, len(queries)), normalisation, device)
        best = torch.full((len(block),), float("inf"), dtype=torch.float64, device=device)
        where = torch.zeros(len(block), dtype=torch.int64, device=device)
        for first in range(0, len(references), step):
            refs, squared = resident or reference_block(first)
            score = squared[None, :] - 2.0 * block @ refs.T  # |q|^2 does not change the argmin
            value, index = score.min(dim=1)
            better = value < best
            best, where = torch.where(better, value, best), torch.where(better, index + first, where)
        nearest[start:start + len(block)] = where.cpu().numpy()
    return nearest


def distance_profiles(distances: np.ndarray) -> np.ndarray:
    """The original's clustering space: each row of D divided by its largest entry, then Euclidean
    distances between those rows ("distance profiles"; reference §7.3)."""
    peak = distances.max(axis=1)
    peak[peak == 0] = 1.0
    return pairwise_distances(distances / peak[:, None])


# --------------------------------------------------------------------------------------------
# The merge tree and what it gives for every k
# --------------------------------------------------------------------------------------------

def ward_tree(distances: np.ndarray) -> np.ndarray:
    """Ward linkage of a Euclidean distance matrix (scipy's (n-1) x 4 merge list)."""
    return linkage(squareform(distances, checks=False), method="ward")


def labels_at(tree: np.ndarray, n: int, k: int) -> np.ndarray:
    """Cluster labels 0..k-1 after the first n-k merges (the k-cluster cut of the tree), numbered
    in order of each cluster's first member, so labels are stable for a given tree."""
    roots = _roots_at(tree, n, n - k)
    _, first, inverse = np.unique(roots, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse]


def _roots_at(tree: np.ndarray, n: int, merges: int) -> np.ndarray:
    """The tree node each image belongs to after `merges` merges (pointer jumping: log-depth passes)."""
    parent = np.arange(2 * n - 1)
    steps = np.arange(merges)
    parent[tree[:merges, 0].astype(np.int64)] = n + steps
    parent[tree[:merges, 1].astype(np.int64)] = n + steps
    while True:
        jumped = parent[parent]
        if np.array_equal(jumped, parent):
            return parent[:n]
        parent = jumped


def k_range(n: int) -> range:
    """Candidate numbers of clusters: 2 .. min(500, n/2), as the original (at least k=2)."""
    return range(2, max(2, min(K_LIMIT, n // 2)) + 1)


def wicd_curve(tree: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """WICD(k) for every k = 1..n (index k; index 0 unused) in one pass over the merge tree.

    WICD(k) = [sum over clusters C with |C|>1 of ICD(C) |C| / n] / k, where ICD(C) is the mean
    distance over C's member pairs and k counts every cluster, singletons included (reference §7.3).
    Each merge adds the distances between the two merged clusters, so the pass costs O(n^2) overall."""
    n = len(distances)
    members: dict[int, np.ndarray] = {i: np.array([i]) for i in range(n)}
    pair_sum = np.zeros(2 * n - 1)
    weighted = 0.0  # sum over non-singleton clusters of ICD(C) * |C|
    curve = np.full(n + 1, np.nan)
    curve[n] = 0.0

    def contribution(node: int, size: int) -> float:
        return 0.0 if size < 2 else pair_sum[node] / (size * (size - 1) / 2) * size

    for step, (a, b, _height, _size) in enumerate(tree):
        a, b = int(a), int(b)
        left, right = members.pop(a), members.pop(b)
        node = n + step
        pair_sum[node] = pair_sum[a] + pair_sum[b] + distances[np.ix_(left, right)].sum()
        weighted += contribution(node, len(left) + len(right)) - contribution(a, len(left)) - contribution(b, len(right))
        members[node] = np.concatenate([left, right])
        k = n - step - 1
        curve[k] = weighted / n / k
    return curve


def silhouette_curve(tree: np.ndarray, distances: np.ndarray, ks: range) -> np.ndarray:
    """Mean silhouette for every k in `ks` (index k), updated merge by merge.

    Starting from the largest k, a merge only changes the merged clusters' columns of the per-image
    mean distance to each cluster, so each k costs O(n) plus O(k) for the few images whose nearest
    other cluster was one of the two merged ones, instead of O(n^2)."""
    n = len(distances)
    curve = np.full(n + 1, np.nan)
    k_max = max(ks)
    own = labels_at(tree, n, k_max)
    members = np.zeros((k_max, n))   # cluster by image: distances times its transpose
    members[own, np.arange(n)] = 1.0
    sums = times_transposed(distances, members)   # (n, k_max) distance sums: one product, not an n x n column gather (2x)
    sizes = np.bincount(own, minlength=k_max).astype(float)
    rows = np.arange(n)
    mean_to = sums / sizes
    mean_to[rows, own] = np.inf                                           # b excludes one's own cluster
    nearest = mean_to.argmin(axis=1)
    column_of = {int(root): int(label) for root, label in zip(_roots_at(tree, n, n - k_max), own)}
    for k in range(k_max, min(ks) - 1, -1):
        curve[k] = _mean_silhouette(sums[rows, own], sizes[own], mean_to[rows, nearest])
        if k == min(ks):
            break
        step = n - k
        keep, gone = column_of.pop(int(tree[step, 0])), column_of.pop(int(tree[step, 1]))
        column_of[n + step] = keep
        sums[:, keep] += sums[:, gone]
        sizes[keep] += sizes[gone]
        own[own == gone] = keep
        merged = mean_to[:, keep] = sums[:, keep] / sizes[keep]
        mean_to[own == keep, keep] = np.inf
        mean_to[:, gone] = np.inf
        stale = (nearest == keep) | (nearest == gone) | (own == keep)
        nearest[stale] = mean_to[stale].argmin(axis=1)
        closer = ~stale & (merged < mean_to[rows, nearest])
        nearest[closer] = keep
    return curve


def _mean_silhouette(own_sums: np.ndarray, own_sizes: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of (b - a) / max(a, b), a = mean distance to the rest of one's cluster;
    0 for images alone in their cluster (as sklearn)."""
    alone = own_sizes < 2
    a = own_sums / np.maximum(own_sizes - 1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (b - a) / np.maximum(a, b)
    s[alone] = 0.0
    return float(np.nan_to_num(s, nan=0.0).mean())


# --------------------------------------------------------------------------------------------
# Choosing k
# --------------------------------------------------------------------------------------------

def five_point_gradient(values: np.ndarray) -> np.ndarray:
    """The original's 4th-order finite-difference gradient of the WICD curve: central 5-point
    differences inside, first differences at the two ends of each side, all divided by 4."""
    y = np.asarray(values, dtype=float)
    g = np.empty_like(y)
    if len(y) < 5:
        return np.gradient(y) / 4 if len(y) > 1 else np.zeros_like(y)
    g[2:-2] = (y[:-4] - 8 * y[1:-3] + 8 * y[3:-1] - y[4:]) / 12
    g[:2] = y[1:3] - y[0:2]
    g[-2:] = y[-2:] - y[-3:-1]
    return g / 4


def knee_k(ks: range, wicd: np.ndarray) -> int:
    """The original's choice: the knee of the gradient of WICD(k) (kneed, concave, increasing), i.e.
    the elbow where adding clusters stops paying. Where kneed finds none, the point of the WICD
    curve farthest from the chord between its ends."""
    ks_array = np.array(list(ks))
    if len(ks_array) < 3:
        return int(ks_array[0])
    gradient = five_point_gradient(wicd[ks_array])
    from kneed import KneeLocator
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")  # kneed warns on flat curves; the fallback below handles them
        knee = KneeLocator(ks_array, gradient, curve="concave", direction="increasing").knee
    if knee is not None:
        return int(knee)
    return int(ks_array[_farthest_from_chord(ks_array, wicd[ks_array])])


def _farthest_from_chord(x: np.ndarray, y: np.ndarray) -> int:
    span_x, span_y = x[-1] - x[0], y[-1] - y[0]
    if span_y == 0:
        return 0
    xn, yn = (x - x[0]) / span_x, (y - y[0]) / span_y
    return int(np.argmax(np.abs(yn - xn)))


def silhouette_k(ks: range, silhouette: np.ndarray) -> int:
    """The k with the highest mean silhouette (the smallest such k on ties)."""
    ks_array = np.array(list(ks))
    return int(ks_array[np.nanargmax(silhouette[ks_array])])


# --------------------------------------------------------------------------------------------
# Two levels of root causes for one layer
# --------------------------------------------------------------------------------------------

MAX_RCCS = 20                      # the default readable top level: a reader takes in about 20 cards
# Top-level RCCs hold this many error images on average at least: on cases of 20-50 errors, k up to n/2
# left a fifth of them in RCCs of one image and missed more causes (bench/small_case_study.py).
MIN_MEAN_RCC_SIZE = 3
WEAK_STRUCTURE = 0.5   # mean silhouette at or below which a structure is weak or absent (Kaufman and Rousseeuw)


def top_range(n: int, max_rccs: int) -> range:
    """The top level's candidate k for n error images: 2 .. max_rccs, and n / MIN_MEAN_RCC_SIZE at most."""
    return range(2, max(2, min(max_rccs, K_LIMIT, n // MIN_MEAN_RCC_SIZE)) + 1)


def top_k(ks: range, silhouette: np.ndarray, wicd: np.ndarray, criterion: str = "silhouette") -> int:
    """The number of top-level RCCs among `ks` (top_range: 2..max_rccs, n/3 at most).

    "silhouette": the best mean silhouette where it shows a reasonable structure (above 0.5; Kaufman
    and Rousseeuw call 0.26-0.50 weak, "could be artificial"); elsewhere the largest k, since finer
    groups are then purer and the reader's budget is the only limit. The largest k cuts the same tree
    finer, so a weakly separated few groups (a minority split off: silhouette 0.3 on a demo layer)
    stay apart in it, inside their own RCCs. It never drifts past max_rccs, and collapses to a few
    groups only where the data really has a few.
    "knee": the original's knee of the WICD gradient within the range; "max": always the largest k."""
    if criterion == "max" or len(ks) == 1:
        return max(ks)
    if criterion == "knee":
        return knee_k(ks, wicd)
    best = silhouette_k(ks, silhouette)
    return best if silhouette[best] > WEAK_STRUCTURE else max(ks)


@dataclass
class LayerClustering:
    """One layer's root-cause clusters at two levels: a readable top level and, nested inside it,
    the finer sub-clusters of the same tree (one more cut of it)."""

    layer: str
    k: int                      # top-level RCCs (HDBSCAN's noise group not counted)
    labels: np.ndarray          # top level: 0..k-1 per image; -1: HDBSCAN noise
    sub_labels: np.ndarray      # 0..k_sub-1 per image; every sub-cluster lies inside one top-level RCC
    wicd: float                 # at the top level, on the distances (the original's layer criterion)
    silhouette: float           # at the top level, on the distances
    ks: range                   # the k that the top level chose from
    wicd_curve: np.ndarray      # of the clustered space, index k
    silhouette_curve: np.ndarray

    @property
    def k_sub(self) -> int:
        return int(self.sub_labels.max()) + 1 if len(self.sub_labels) else 0


def cluster_layer(layer: str, distances: np.ndarray, space: str = "direct", k_criterion: str = "silhouette",
                  max_rccs: int = MAX_RCCS, clusterer: str = "ward", min_cluster_size: int = 5) -> LayerClustering:
    """Ward clustering of one layer's distances (or, with clusterer "hdbscan", HDBSCAN's clusters at
    the top level), top level chosen by `k_criterion` within top_range, sub-clusters by the best
    silhouette among the strictly finer cuts."""
    n = len(distances)
    if n < 2:
        raise ValueError("at least two heatmaps are needed to cluster")
    clustered = distances if space == "direct" else distance_profiles(distances)
    tree = ward_tree(clustered)
    curve = wicd_curve(tree, clustered)
    direct_wicd = curve if space == "direct" else wicd_curve(tree, distances)
    ks = top_range(n, max_rccs)
    # The silhouette only where the top level chooses (at 10,000 images, 2..500 took 6 s of 20).
    silhouettes = silhouette_curve(tree, distances, ks) if n > 2 else np.zeros(n + 1)
    if clusterer == "hdbscan":
        labels = _renumber(hdbscan_labels(distances, min_cluster_size))
        k = int(labels.max()) + 1
    else:
        k = min(top_k(ks, silhouettes, curve, k_criterion), n)
        labels = labels_at(tree, n, k)
    sub_labels = sub_levels(clustered, distances, labels)
    if clusterer == "hdbscan":  # the criteria of HDBSCAN's own partition (noise left out)
        wicd, silhouette = partition_criteria(distances, labels)
    else:
        wicd, silhouette = float(direct_wicd[k]), float(silhouettes[k])
    return LayerClustering(layer=layer, k=k, labels=labels, sub_labels=sub_labels, wicd=wicd, silhouette=silhouette,
                           ks=ks, wicd_curve=curve, silhouette_curve=silhouettes)


def partition_criteria(distances: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(WICD, mean silhouette) of one partition, its -1 (noise) images left out; (inf, -1) where it
    has no cluster, so that the layer is never preferred."""
    kept = np.flatnonzero(labels >= 0)
    groups = np.unique(labels[kept])
    if len(groups) < 1:
        return float("inf"), -1.0
    d, own = distances[np.ix_(kept, kept)], labels[kept]
    weighted = sum(d[np.ix_(own == g, own == g)].sum() / max((own == g).sum() - 1, 1) for g in groups)
    wicd = weighted / len(kept) / len(groups)   # sum of ICD x size over n, over k (as wicd_curve)
    if len(groups) < 2:
        return float(wicd), 0.0
    sums = np.stack([d[:, own == g].sum(axis=1) for g in groups], axis=1)
    sizes = np.array([(own == g).sum() for g in groups], dtype=float)
    index = np.searchsorted(groups, own)
    mean_to = sums / sizes
    mean_to[np.arange(len(own)), index] = np.inf
    return float(wicd), _mean_silhouette(sums[np.arange(len(own)), index], sizes[index], mean_to.min(axis=1))


def hdbscan_labels(distances: np.ndarray, min_cluster_size: int) -> np.ndarray:
    """scikit-learn's HDBSCAN on the distances: a cluster per dense region, -1 for noise."""
    from sklearn.cluster import HDBSCAN
    size = max(2, min(min_cluster_size, len(distances)))
    return HDBSCAN(min_cluster_size=size, metric="precomputed", copy=True).fit_predict(distances)


def sub_levels(clustered: np.ndarray, distances: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each top-level group (noise included) cut into its own sub-clusters: Ward on its members (the
    same tree as the whole's, restricted to them), cut at the best silhouette among 2..size/2 within
    the group. A global cut would keep the sub-clusters of a tight group together whenever other
    groups lie far away. Numbered 0.. in order of first member."""
    sub = np.empty(len(labels), dtype=np.int64)
    for group in dict.fromkeys(labels.tolist()):
        members = np.flatnonzero(labels == group)
        sub[members] = 1_000_000 * (group + 1) + _cut_group(clustered[np.ix_(members, members)],
                                                             distances[np.ix_(members, members)])
    return _renumber(sub)


def _cut_group(clustered: np.ndarray, distances: np.ndarray) -> np.ndarray:
    n = len(distances)
    ks = k_range(n)
    if n < 4 or len(ks) < 2:
        return np.zeros(n, dtype=np.int64)
    tree = ward_tree(clustered)
    return labels_at(tree, n, silhouette_k(ks, silhouette_curve(tree, distances, ks)))


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Clusters numbered 0.. in order of their first member; negative labels (noise) become -1."""
    result = np.full(len(labels), -1, dtype=np.int64)
    seen: dict[int, int] = {}
    for i, label in enumerate(labels.tolist()):
        if label >= 0:
            result[i] = seen.setdefault(label, len(seen))
    return result


EXACT_LIMIT = 20000   # beyond this many error images a layer is clustered in two stages


def nearest_rows(queries: np.ndarray, references: np.ndarray, normalisation: str = "none",
                 chunk_bytes: int = CHUNK_BYTES, device=None) -> np.ndarray:
    """For each query row, the index of its nearest reference row (Euclidean), block by block (on a
    torch `device` when given: device_nearest_rows)."""
    if device is not None:
        return device_nearest_rows(queries, references, normalisation, torch_device(device),
                                   max(chunk_bytes, DEVICE_CHUNK_BYTES))
    dims = int(np.prod(references.shape[1:]))
    refs = _rows(references, 0, len(references), normalisation)
    ref_squared = np.einsum("ij,ij->i", refs, refs)
    step = max(1, chunk_bytes // (8 * max(dims, len(references), 1)))
    nearest = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), step):
        block = _rows(queries, start, min(start + step, len(queries)), normalisation)
        # |q|^2 is the same for every reference of a row, so it does not change the argmin
        nearest[start:start + len(block)] = (ref_squared[None, :] - 2.0 * times_transposed(block, refs)).argmin(axis=1)
    return nearest


def cluster_two_stage(layer: str, heatmaps: np.ndarray, normalisation: str = "none", limit: int = EXACT_LIMIT,
                      seed: int = 0, device=None, **options) -> tuple[LayerClustering, np.ndarray, np.ndarray]:
    """For more error images than `limit`: cluster a seeded random sample of `limit` heatmaps exactly
    (cluster_layer with `options`), then give every other heatmap the RCCs (both levels) of its
    nearest sampled heatmap (the nearest-member rule the assignment step uses). Returns the
    clustering (labels for all images; WICD and silhouette of the sample), the sample's indices and
    the sample's distance matrix. `device`: a torch device for the distance blocks (None: numpy)."""
    n = len(heatmaps)
    sample = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
    sampled = np.asarray(heatmaps[sample])
    distances = pairwise_distances(sampled, normalisation, device=device)
    result = cluster_layer(layer, distances, **options)
    rest = np.setdiff1d(np.arange(n), sample)
    nearest = nearest_rows(_Subset(heatmaps, rest), sampled, normalisation, device=device)
    for level in ("labels", "sub_labels"):
        labels = np.empty(n, dtype=np.int64)
        labels[sample] = getattr(result, level)
        labels[rest] = getattr(result, level)[nearest]
        setattr(result, level, labels)
    return result, sample, distances


class _Subset:
    """Rows `index` of an array (e.g. a memory-mapped .npy), read a slice at a time."""

    def __init__(self, array: np.ndarray, index: np.ndarray):
        self.array, self.index, self.shape = array, index, (len(index), *array.shape[1:])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return np.asarray(self.array[self.index[rows]])


MAX_OUTPUT_ALIGNMENT = 0.6   # adjusted mutual information with the explained output above which a layer is passed over


def output_alignment(labels: np.ndarray, explained: np.ndarray) -> float:
    """How much of a layer's top-level clustering is the explained output again (the predicted class,
    the worst keypoint): their adjusted mutual information, 0 for independent groupings, 1 for the
    same partition."""
    return adjusted_mutual_information(explained, labels)


def output_alignments(results: list[LayerClustering], explained: np.ndarray) -> dict[str, float]:
    """Each layer's output_alignment, by layer name (computed once: the choice and summary.csv use it)."""
    return {r.layer: output_alignment(r.labels, explained) for r in results}


def adjusted_mutual_information(first: np.ndarray, second: np.ndarray) -> float:
    """The adjusted mutual information of two groupings of the same items (Vinh, Epps and Bailey,
    2010), normalised by the mean of their entropies, as scikit-learn's adjusted_mutual_info_score
    (the tests' oracle; importing scikit-learn's metrics takes a second, a quarter of a small cluster
    step)."""
    first_groups, first_index = np.unique(np.asarray(first), return_inverse=True)
    second_groups, second_index = np.unique(np.asarray(second), return_inverse=True)
    table = np.bincount(first_index * len(second_groups) + second_index,
                        minlength=len(first_groups) * len(second_groups)).reshape(len(first_groups), -1).astype(float)
    n, rows, columns = table.sum(), table.sum(axis=1), table.sum(axis=0)
    if len(rows) == len(columns) in (1, n):
        return 1.0   # one group each, or every item alone in both: the same partition
    filled = table > 0
    mutual = float((table[filled] / n * np.log(n * table[filled] / np.outer(rows, columns)[filled])).sum())
    entropies = [float(-(c / n * np.log(c / n)).sum()) for c in (rows, columns)]
    expected = _expected_mutual_information(rows, columns, n)
    denominator = np.mean(entropies) - expected
    denominator = min(denominator, -np.finfo(float).eps) if denominator < 0 else max(denominator, np.finfo(float).eps)
    return (mutual - expected) / denominator


def _expected_mutual_information(rows: np.ndarray, columns: np.ndarray, n: float) -> float:
    """The mutual information of two groupings with these group sizes, expected under random
    assignment (the hypergeometric model), summed over every possible cell count."""
    from scipy.special import gammaln
    total = 0.0
    for a in rows:
        for b in columns:
            counts = np.arange(max(1.0, a + b - n), min(a, b) + 1)
            log_probability = (gammaln(a + 1) + gammaln(b + 1) + gammaln(n - a + 1) + gammaln(n - b + 1)
                               - gammaln(n + 1) - gammaln(counts + 1) - gammaln(a - counts + 1)
                               - gammaln(b - counts + 1) - gammaln(n - a - b + counts + 1))
            total += float((counts / n * np.log(n * counts / (a * b)) * np.exp(log_probability)).sum())
    return total


def select_layer(results: list[LayerClustering], criterion: str = "wicd", last_layer: str | None = None,
                 alignments: dict[str, float] | None = None) -> LayerClustering:
    """The original's choice: the smallest WICD (raw distances; never the input layer). The
    alternative compares layers on a common, scale-free footing: the highest silhouette.

    Nor the layer before the output (`last_layer`, where another is left): one linear map from the
    logits, its relevance groups by the predicted class, not by the cause, in compact groups whose
    small WICD wins the comparison. It was the least pure layer on every demo case, and on a held-out
    case the criterion picked it and missed a cause (docs/method.md). The same holds, less strongly,
    for the layers just before it: where each layer's `alignments` are given (output_alignments), a
    layer whose RCCs share more than MAX_OUTPUT_ALIGNMENT of their information with the explained
    output is passed over too, where another is left."""
    inner = [r for r in results if r.layer != "Layer0"] or results
    candidates = [r for r in inner if r.layer != last_layer] or inner
    if alignments is not None:
        candidates = [r for r in candidates if alignments[r.layer] <= MAX_OUTPUT_ALIGNMENT] or candidates
    if criterion == "wicd":
        return min(candidates, key=lambda r: r.wicd)
    return max(candidates, key=lambda r: r.silhouette)


# --------------------------------------------------------------------------------------------
# Root-cause quality where scenarios are known
# --------------------------------------------------------------------------------------------

def purity_coverage(labels: np.ndarray, scenarios: np.ndarray, min_scenario_errors: int = 5,
                    ordinary: str = "none") -> dict:
    """design.md's measures: purity of an RCC = share of its most common scenario, averaged over
    RCCs with at least two members; coverage = share of the root causes (the scenarios with at least
    5 error images, but the `ordinary` one, which names images without a rare condition) that are the
    most common scenario of at least one RCC. Noise (label -1) is no RCC."""
    purities, majorities = [], set()
    for rcc in np.unique(labels[labels >= 0]):
        values, counts = np.unique(scenarios[labels == rcc], return_counts=True)
        if counts.sum() >= 2:
            purities.append(counts.max() / counts.sum())
            majorities.add(values[np.argmax(counts)])
    values, counts = np.unique(scenarios, return_counts=True)
    causes = set(values[counts >= min_scenario_errors]) - {ordinary}
    return {"purity": float(np.mean(purities)) if purities else float("nan"),
            "coverage": len(causes & majorities) / len(causes) if causes else float("nan"),
            "rccs": int(len(purities))}


def readable_quality(labels: np.ndarray, scenarios: np.ndarray | None, tops=(10, 20), ordinary: str = "none") -> dict:
    """What a reader who opens the largest RCCs first sees: the number of top-level RCCs, their median
    size, the noise group's size and, where scenarios are known, purity and coverage over every RCC
    and over the `tops` largest (ties: the lower label)."""
    clustered = labels[labels >= 0]
    ids, sizes = np.unique(clustered, return_counts=True)
    result = {"rccs": int(len(ids)), "median_size": float(np.median(sizes)) if len(sizes) else 0.0,
              "noise": int((labels < 0).sum())}
    if scenarios is None:
        return result
    result.update({k: v for k, v in purity_coverage(labels, scenarios, ordinary=ordinary).items() if k != "rccs"})
    largest = ids[np.argsort(-sizes, kind="stable")]
    for top in tops:
        kept = np.where(np.isin(labels, largest[:top]), labels, -1)
        part = purity_coverage(kept, scenarios, ordinary=ordinary)
        result[f"purity_{top}"], result[f"coverage_{top}"] = part["purity"], part["coverage"]
    return result
