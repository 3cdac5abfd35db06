"""Scaling benchmark (a script, not a test): prints figures measured side by side in one run.

    python bench/bench_scale.py [--root DIR] [--quick] [--parts heatmaps,clusters,assign,float32,dtype]
    python bench/bench_scale.py --storage          # heatmap bytes per image per layer, built-in architectures

1. heatmaps: the heatmap step's throughput on a synthetic case (random images, AlexNet128, random weights,
   so most test images are errors) with 1 rank and with 2 ranks under torchrun, each rank one thread;
2. clusters: clustering time and peak memory of one layer of 2,048 dimensions at 5k, 10k and 20k error
   images (exact) and 50k (two stages: exact on 20k, the rest by nearest sampled heatmap), each size in
   its own process so the peak is its own;
3. assign: the assignment step's throughput (improvement images per second), 1 and 2 ranks;
4. float32: the error of float32 distance blocks (with the near-duplicate recomputation) against float64,
   the reason the GPU path stays in float64;
5. dtype: heatmap_dtype float16 and bfloat16 against float32 on a real case's heatmaps (--case, e.g. the
   demo): agreement of every layer's RCC labels and the selected layer, and the file size.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def run(command: list[str], threads: int = 1, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return subprocess.run(command, capture_output=True, text=True, check=True, env=env, cwd=REPO, **kwargs)


def torchrun(ranks: int, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                str(Path(__file__).resolve()), *args])


# --------------------------------------------------------------------------------------------
# A synthetic case and the steps timed inside a torchrun job
# --------------------------------------------------------------------------------------------

def build_case(root: Path, images: int, arch: str = "alexnet128", size: int = 128) -> Path:
    """Random images in 10 class folders per set, a random AlexNet128 (most test images are errors)."""
    import torch
    from PIL import Image
    from architectures import BUILTIN_ARCHITECTURES
    if (root / "hudd.json").is_file():
        return root
    rng = np.random.default_rng(0)
    for folder, count in (("TrainingSet", 40), ("TestSet", images), ("ImprovementSet", images)):
        for i in range(count):
            path = root / "DataSets" / folder / f"class{i % 10}" / f"img{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    torch.manual_seed(0)
    (root / "DNNModels").mkdir(parents=True, exist_ok=True)
    torch.save(BUILTIN_ARCHITECTURES[arch](num_classes=10).state_dict(), root / "DNNModels" / "OriginalModel.pth")
    (root / "hudd.json").write_text(json.dumps({"arch": arch, "batch_size": 32, "workers": 0}))
    return root


def timed_step(case: str, step: str) -> None:
    """Under torchrun: the step's compute on every rank, timed between barriers; rank 0 prints JSON."""
    import torch
    import distributed
    import HUDD
    import Helper
    torch.set_num_threads(1)
    distributed.start(torch.device("cpu"))
    paths = Helper.CasePaths(Path(case))
    ctx = Helper.RunContext(paths=paths, settings=Helper.load_settings(paths), device=torch.device("cpu"),
                            model_path=paths.models / "OriginalModel.pth", force=True)
    chosen = {s.name: s for s in HUDD.analysis_steps()}[step]
    ctx.model(), ctx.sets()
    distributed.barrier()
    start = time.perf_counter()
    distributed.together(lambda: chosen.compute(ctx))
    seconds = time.perf_counter() - start
    if distributed.is_main():
        images = len(ctx.sets()["improve"]) if step == "assign" else len(
            __import__("heatmapModule").read_index(paths))
        print(json.dumps({"seconds": seconds, "images": images, "ranks": distributed.world()}))
    distributed.finish()


def steps_side_by_side(root: Path, images: int, step: str, repeats: int) -> None:
    case = build_case(root / f"alexnet128_{images}", images)
    needed = {"heatmaps": "test", "assign": "test,heatmaps,clusters"}[step]
    run([sys.executable, "HUDD.py", "-o", str(case), "--steps", needed], threads=2)
    figures = {1: [], 2: []}
    for _ in range(repeats):  # alternating, so that load from other jobs hits both alike
        for ranks in (1, 2):
            out = torchrun(ranks, "--timed-step", step, str(case)).stdout.strip().splitlines()[-1]
            figures[ranks].append(json.loads(out))
    rates = {r: [f["images"] / f["seconds"] for f in runs] for r, runs in figures.items()}
    what = "error images" if step == "heatmaps" else "improvement images"
    shards = shard_sizes(figures[1][0]["images"], 32)
    print(f"{step} step, {figures[1][0]['images']} {what}, AlexNet128, 1 thread per rank: "
          f"1 rank {', '.join(f'{v:.1f}' for v in rates[1])} images/s; "
          f"2 ranks {', '.join(f'{v:.1f}' for v in rates[2])} images/s; "
          f"2 ranks / 1 rank {', '.join(f'{b / a:.2f}x' for a, b in zip(rates[1], rates[2]))} "
          f"(shards of whole batches of 32: {' and '.join(map(str, shards))} images, so at most "
          f"{sum(shards) / max(shards):.2f}x)")


def shard_sizes(rows: int, batch_size: int, ranks: int = 2) -> list[int]:
    """The images each rank explains (distributed.batch_shard's split: whole batches)."""
    batches = -(-rows // batch_size)
    edges = [min(rows, batches * r // ranks * batch_size) for r in range(ranks + 1)]
    return [b - a for a, b in zip(edges, edges[1:])]


# --------------------------------------------------------------------------------------------
# Clustering at scale
# --------------------------------------------------------------------------------------------

def cluster_size(n: int, dims: int, limit: int) -> dict:
    """One layer as the cluster step clusters it, in this (child) process."""
    import bench_cluster
    import clustering as C
    x = bench_cluster.heatmaps(n, dims)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before, start = usage.ru_utime + usage.ru_stime, time.perf_counter()
    if n > limit:
        result, _sample, _d = C.cluster_two_stage("bench", x, "l2", limit)
    else:
        result = C.cluster_layer("bench", C.pairwise_distances(x, "l2"))
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"n": n, "dims": dims, "k": result.k, "k_sub": result.k_sub, "seconds": seconds, "two_stage": n > limit,
            "cpu_s": usage.ru_utime + usage.ru_stime - cpu_before,
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def clusters_at_scale(sizes: list[int], dims: int = 2048, limit: int = 20000) -> None:
    for n in sizes:
        code = (f"import sys, json; sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'bench')!r}); "
                f"import bench_scale as b; print(json.dumps(b.cluster_size({n}, {dims}, {limit})))")
        r = json.loads(run([sys.executable, "-c", code], threads=2).stdout.strip().splitlines()[-1])
        how = f"two stages, exact on {limit}" if r["two_stage"] else "exact"
        print(f"clustering one layer, {r['n']} x {r['dims']} ({how}): {r['seconds']:.1f} s ({r['cpu_s']:.0f} CPU s), k {r['k']} "
              f"(sub-clusters {r['k_sub']}), "
              f"peak memory {r['peak_gib']:.2f} GiB")


def float32_error(n: int = 2000, dims: int = 2048) -> None:
    """float32 distance blocks (torch, the device path's code with float32 rows) against float64."""
    import torch
    import bench_cluster
    import clustering as C
    x = bench_cluster.heatmaps(n, dims)
    exact = C.pairwise_distances(x, "l2")
    rows = torch.as_tensor(C.normalise_rows(x.reshape(n, -1).astype(np.float64), "l2"), dtype=torch.float32)
    squared = (rows * rows).sum(dim=1)
    block = squared[:, None] + squared[None, :] - 2.0 * rows @ rows.T
    suspect = torch.nonzero(block <= 1e-5 * (squared[:, None] + squared[None, :]))
    a, b = suspect.T
    block[a, b] = ((rows[a] - rows[b]) ** 2).sum(dim=1)
    approx = block.clamp_min(0).sqrt().double().numpy()
    approx = np.triu(approx, 1) + np.triu(approx, 1).T
    error = np.abs(approx - exact)
    same = C.cluster_layer("a", exact), C.cluster_layer("b", approx)
    gpu64 = C.pairwise_distances(x, "l2", device="cpu")
    print(f"float32 distance blocks, {n} x {dims}, l2-normalised: largest error {error.max():.1e} (median "
          f"{np.median(error[np.triu_indices(n, 1)]):.1e}; distances around {np.median(exact):.2f}); "
          f"k {same[0].k} vs {same[1].k}, labels identical: {np.array_equal(same[0].labels, same[1].labels)} "
          f"(sub-clusters: {np.array_equal(same[0].sub_labels, same[1].sub_labels)}); "
          f"the float64 device path (torch on the CPU): largest error {np.abs(gpu64 - exact).max():.1e}")


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labellings (1: the same partition)."""
    from scipy.special import comb
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    pairs = comb(table, 2).sum()
    rows, columns, total = comb(table.sum(1), 2).sum(), comb(table.sum(0), 2).sum(), comb(len(a), 2)
    expected = rows * columns / total
    return float((pairs - expected) / ((rows + columns) / 2 - expected))


def dtype_effect(case: Path) -> None:
    """Every layer's clustering from float32 heatmaps and from the same relevance stored as float16 and
    bfloat16 (heatmapModule.to_storage, exactly what the step writes), with the case's settings."""
    import Helper
    import clustering as C
    import heatmapModule
    paths = Helper.CasePaths(case)
    s = Helper.load_settings(paths)
    results = {dtype: [] for dtype in ("float32", "float16", "bfloat16")}
    for layer in heatmapModule.read_layers(paths)["layer"]:
        values = np.asarray(heatmapModule.open_layer(paths, layer), dtype=np.float32)
        for dtype in results:
            stored = heatmapModule.to_storage(values, dtype, layer)
            rows = heatmapModule.widen_bfloat16(stored) if dtype == "bfloat16" else stored
            results[dtype].append(C.cluster_layer(layer, C.pairwise_distances(rows, s.normalisation),
                                                  s.cluster_space, s.k_criterion, s.max_rccs, s.clusterer,
                                                  s.min_cluster_size))
    chosen = {dtype: C.select_layer(r, s.layer_criterion).layer for dtype, r in results.items()}
    for dtype in ("float16", "bfloat16"):
        cells = [f"{a.layer} k {a.k}/{b.k} ARI {adjusted_rand(a.labels, b.labels):.3f}"
                 for a, b in zip(results["float32"], results[dtype])]
        print(f"{dtype} vs float32 heatmaps of {case.name} ({len(results[dtype][0].labels)} error images): "
              f"{'; '.join(cells)}; selected layer {chosen[dtype]} (float32: {chosen['float32']}); "
              "files half the size")


def storage_table() -> None:
    """Bytes per image per layer (float32) of the built-in architectures, at their input sizes."""
    import torch
    from architectures import BUILTIN_ARCHITECTURES
    from lrp import default_layers, relevance
    for name, arch in BUILTIN_ARCHITECTURES.items():
        channels = 1 if name.startswith("kpnet") else 3
        model = arch(num_classes=27 if channels == 1 else 10, in_channels=channels).eval()
        example = torch.zeros(1, channels, arch.input_size, arch.input_size)
        layers = [("Layer0", "input")] + default_layers(model, example_input=example)
        shapes = relevance(model, example, target=0, layers=[p for _, p in layers[1:]]) if channels == 3 else \
            relevance(model, example, target=torch.ones_like(model(example)), layers=[p for _, p in layers[1:]])
        sizes = [(alias, int(np.prod(shapes[path].shape[1:])) * 4) for alias, path in layers]
        total = sum(b for _, b in sizes)
        print(f"{name} ({arch.input_size}x{arch.input_size}): {total / 1e6:.2f} MB per image in all "
              f"(float32; half with float16/bfloat16): " + ", ".join(f"{a} {b / 1e3:.0f} kB" for a, b in sizes))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/hudd_bench_scale", help="where the synthetic cases are built")
    parser.add_argument("--parts", default="heatmaps,clusters,assign,float32")
    parser.add_argument("--case", type=Path, help="a case with heatmaps (the dtype part), e.g. the demo")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check it runs")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", help="clustering sizes, e.g. 50000 (default 5000,10000,20000,50000)")
    parser.add_argument("--storage", action="store_true")
    parser.add_argument("--timed-step", nargs=2, metavar=("STEP", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.timed_step:
        return timed_step(args.timed_step[1], args.timed_step[0])
    if args.storage:
        return storage_table()
    parts, root = args.parts.split(","), Path(args.root)
    if "heatmaps" in parts:
        # 768 test images: about 690 errors, 22 batches of 32, 11 per rank (384 gave 11 batches, 5 and 6)
        steps_side_by_side(root, 64 if args.quick else 768, "heatmaps", args.repeats)
    if "clusters" in parts:
        sizes = [500, 1000, 2000, 5000] if args.quick else [5000, 10000, 20000, 50000]
        clusters_at_scale([int(n) for n in args.sizes.split(",")] if args.sizes else sizes,
                          limit=2000 if args.quick else 20000)
    if "assign" in parts:
        steps_side_by_side(root, 64 if args.quick else 384, "assign", args.repeats)
    if "float32" in parts:
        float32_error(500 if args.quick else 2000)
    if "dtype" in parts:
        dtype_effect(args.case)


if __name__ == "__main__":
    main()
