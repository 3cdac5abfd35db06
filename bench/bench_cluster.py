"""Clustering benchmark (a script, not a test): prints times, ratios and peak memory.

    python bench/bench_cluster.py            # full sizes (several minutes on 2 cores)
    python bench/bench_cluster.py --quick    # small sizes, to check it runs
    python bench/bench_cluster.py --only-step --sizes 1000 --repeats 5   # part 4 alone, at 1,000
    python bench/bench_cluster.py --sizes 1000 --against /tmp/base       # part 4, this code against another checkout

0. the tiled float64 product of the distances against one threaded torch product, side by side;
1. pairwise distances of 2,000 heatmaps of 50,000 dimensions: ours (float64 matrix products, in
   chunks) vs scipy's pdist, in the same run, with the largest difference between them;
2. full clustering of one layer as the step does it (distances, Ward, WICD for every k, silhouette for
   the top level's k = 2..20, the sub-clusters of the top level; the original's knee timed beside) for 5,000 and 10,000 heatmaps: time per part and peak memory (each
   size in its own process);
3. the two-stage path for 30,000 heatmaps (exact on a 20,000 sample, the rest by nearest member);
4. the whole cluster step with its outputs (rcc_labels, RCC folders, k plots, distances.npy, the XLSX
   export, the selected layer's folders with the heatmap step's overlays linked in) against the algorithm alone on the same heatmaps, for 1,000
   and 5,000 error images of a synthetic case with DemoNet's eight layer shapes (built once under
   --cases, default /tmp/hudd_bench_cluster).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import clustering as C  # noqa: E402


def heatmaps(n: int, dims: int, groups: int = 12, seed: int = 0) -> np.ndarray:
    """Sparse-ish, clustered non-negative 'relevance' vectors, float32 like the heatmap files."""
    rng = np.random.default_rng(seed)
    centres = rng.gamma(0.3, 1.0, size=(groups, dims)).astype(np.float32)
    members = rng.integers(0, groups, size=n)
    noise = rng.normal(0.0, 0.3, size=(n, dims)).astype(np.float32)
    return np.abs(centres[members] + noise)


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def distances_vs_pdist(n: int, dims: int) -> None:
    from scipy.spatial.distance import pdist, squareform
    x = heatmaps(n, dims)
    ours, ours_s = timed(C.pairwise_distances, x)
    theirs, theirs_s = timed(lambda: squareform(pdist(x.astype(np.float64))))
    print(f"distances {n} x {dims}: ours {ours_s:.1f} s, scipy pdist {theirs_s:.1f} s, "
          f"pdist/ours {theirs_s / ours_s:.1f}x, max |difference| {np.abs(ours - theirs).max():.2e}")


def tiles_vs_threaded_product(repeats: int = 5) -> None:
    """times_transposed (fixed tiles, one thread each: the same bits at any thread count) against one
    product on torch's threads, on the shapes of a distance block, side by side (medians)."""
    import torch
    for n, dims in ((1000, 16384), (2000, 2048), (5000, 512)):
        x = heatmaps(n, dims).astype(np.float64)
        tiled, threaded = [], []
        for _ in range(repeats):
            tiled.append(timed(C.times_transposed, x, x)[1])
            threaded.append(timed(lambda: (torch.from_numpy(x) @ torch.from_numpy(x).T).numpy())[1])
        print(f"product {n} x {dims} times its transpose, {torch.get_num_threads()} threads: tiles "
              f"{np.median(tiled):.3f} s, one threaded product {np.median(threaded):.3f} s, "
              f"{np.median(tiled) / np.median(threaded):.2f}x")


def one_layer(n: int, dims: int) -> dict:
    """The parts of cluster_layer as the step runs them (the silhouette over the top level's range of
    k); the knee (only with k_criterion knee) timed beside, not in the total. Runs in a child process
    so its peak memory is its own."""
    x = heatmaps(n, dims)
    parts = {}
    distances, parts["distances"] = timed(C.pairwise_distances, x)
    tree, parts["ward"] = timed(C.ward_tree, distances)
    wicd, parts["wicd_all_k"] = timed(C.wicd_curve, tree, distances)
    ks = range(2, C.MAX_RCCS + 1)
    silhouette, parts["silhouette_top_k"] = timed(C.silhouette_curve, tree, distances, ks)
    top = C.labels_at(tree, n, C.top_k(ks, silhouette, wicd))
    _sub, parts["sub_levels"] = timed(C.sub_levels, distances, distances, top)
    parts["total"] = sum(parts.values())
    k_knee, knee_seconds = timed(C.knee_k, C.k_range(n), wicd)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    return {"n": n, "dims": dims, "k_knee": k_knee, "knee": knee_seconds, "k_silhouette": C.silhouette_k(ks, silhouette),
            "peak_gib": peak, **parts}


def two_stage(n: int, dims: int, limit: int) -> dict:
    x = heatmaps(n, dims)
    (result, sample, _d), seconds = timed(C.cluster_two_stage, "bench", x, limit=limit)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return {"n": n, "dims": dims, "sample": len(sample), "k": result.k, "seconds": seconds, "peak_gib": peak}


def build_step_case(root: Path, n: int, seed: int = 0) -> Path:
    """A case with n error images (random 32x32 PNGs) and clustered heatmaps of DemoNet's layer shapes,
    written as the heatmap step writes them; no model is needed by the cluster step."""
    import torch
    from PIL import Image
    from architectures import DemoNet
    from lrp import default_layers, relevance
    import Helper
    import heatmapModule
    if (root / "T" / "Heatmaps" / "index.csv").is_file() and (root / "testDescriptors.csv").is_file() \
            and (root / "T" / "Heatmaps" / "overlays" / f"{n - 1}.png").is_file():
        return root
    rng = np.random.default_rng(seed)
    classes = [f"class{c}" for c in range(9)]
    rows = []
    for i in range(n):
        image = f"DataSets/TestSet/{classes[i % 9]}/img{i:06d}.png"
        (root / image).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / image)
        rows.append((image, classes[i % 9], classes[(i + 1) % 9]))
    net, example = DemoNet(num_classes=9).eval(), torch.zeros(1, 3, 32, 32)
    layers = [("Layer0", "input")] + default_layers(net, example_input=example)
    shapes = {p: tuple(r.shape[1:]) for p, r in relevance(net, example, target=0, layers=[p for _, p in layers[1:]]).items()}
    folder = root / "T" / "Heatmaps"
    folder.mkdir(parents=True, exist_ok=True)
    for number, (name, path) in enumerate(layers):
        np.save(folder / f"{name}.npy", heatmaps(n, int(np.prod(shapes[path])), seed=seed + number).reshape(n, *shapes[path]))
    pd.DataFrame([(name, path, "x".join(map(str, shapes[path]))) for name, path in layers],
                 columns=["layer", "module", "shape"]).to_csv(folder / "layers.csv", index=False)
    pd.DataFrame(rows, columns=["image", "expected", "predicted"]).to_csv(folder / "index.csv", index=False)
    describe_images(root, rows, rng)
    (folder / "overlays").mkdir(exist_ok=True)  # as the heatmap step draws them
    heatmapModule.write_overlays(Helper.CasePaths(root), [root / image for image, _e, _p in rows],
                                 np.load(folder / "Layer0.npy", mmap_mode="r"), 0)
    return root


def describe_images(root: Path, errors: list[tuple], rng: np.random.Generator) -> None:
    """testResult.csv (the errors and as many correct images), testDescriptors.csv and testObjects.npz,
    as the test step writes them: the cluster step compares the errors' descriptors with the correct."""
    import torch
    from PIL import Image
    import Helper
    import testModule
    correct = []
    for i in range(len(errors)):
        image = f"DataSets/TestSet/class{i % 9}/ok{i:06d}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / image)
        correct.append((image, f"class{i % 9}", f"class{i % 9}"))
    results = pd.DataFrame([(i, "Wrong", e, p) for i, e, p in errors] + [(i, "Correct", e, p) for i, e, p in correct],
                           columns=["image", "result", "expected", "predicted"])
    results.to_csv(root / testModule.RESULT_FILES["test"], index=False)
    images = list(results["image"])
    describer = testModule.ImageDescriber(Helper.Settings(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0]))
    for start in range(0, len(images), 256):
        batch = np.stack([np.asarray(Image.open(root / image), dtype=np.float32) / 255.0
                          for image in images[start:start + 256]]).transpose(0, 3, 1, 2)
        describer(torch.from_numpy(batch), np.arange(start, start + len(batch)))
    describer.write(Helper.CasePaths(root), pd.DataFrame({"image": images}))


def whole_step(case: str, repeats: int = 1) -> dict:
    """The algorithm alone (distances and clustering of every layer, as the step calls them), then the
    whole step with its outputs as a first run, on the same heatmaps in the same process; `repeats`
    times, alternating, each side's fastest kept (this machine's noise is larger than the difference)."""
    import torch
    import Helper
    import clusterModule
    import heatmapModule
    paths = Helper.CasePaths(Path(case))
    settings = Helper.Settings(arch="demonet", input_size=[32, 32])
    layers = list(heatmapModule.read_layers(paths)["layer"])
    ctx = Helper.RunContext(paths=paths, settings=settings, model_path=paths.models / "none.pth",
                            device=torch.device("cpu"), force=True)
    names = ("cluster_rows", "save_npy", "write_layer_files", "describe_and_write_relevance", "plot_k_choice",
             "characterise_selected_layer", "publish_selected_layer")  # the last three after the layer choice
    originals = {name: getattr(clusterModule, name) for name in names}
    # `within`: each step against its own algorithm (cluster_rows, the same calls), timed in the same
    # seconds: less moved by the machine's drift between the two sides than fastest against fastest
    algorithm, step, within, fastest_parts = [], [], [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        for layer in layers:
            distances = C.pairwise_distances(heatmapModule.open_layer(paths, layer), settings.normalisation)
            C.cluster_layer(layer, distances, **clusterModule.clustering_options(ctx))
        algorithm.append(time.perf_counter() - start)
        parts = {name: 0.0 for name in names}
        for name in names:  # where the step's time goes, outside the algorithm
            setattr(clusterModule, name, _timing(originals[name], parts, name))
        for previous in [paths.t_dir / "ClusterAnalysis", *paths.t_dir.glob("Layer*")]:  # timed as a first run
            shutil.rmtree(previous, ignore_errors=True)
        start = time.perf_counter()
        clusterModule.STEP.compute(ctx)
        step.append(time.perf_counter() - start)
        within.append(step[-1] / parts["cluster_rows"])
        fastest_parts = parts if step[-1] == min(step) else fastest_parts
    return {"n": len(heatmapModule.read_index(paths)), "layers": len(layers), "algorithm": min(algorithm),
            "step": min(step), "parts": fastest_parts, "repeats": repeats, "step_all": step, "algorithm_all": algorithm,
            "within": within}


def _timing(function, totals: dict, name: str):
    def timed_call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start
    return timed_call


def xlsx_writers(n: int) -> None:
    """The distance matrix of n images written by openpyxl cell by cell (as pandas' to_excel did) and by
    the streaming writer, side by side."""
    import pandas as pd
    import clusterModule
    import xlsxMatrix
    distances = C.pairwise_distances(heatmaps(n, 256), "l2")
    names = [f"DataSets/TestSet/class{i % 9}/img{i:06d}.png" for i in range(n)]
    start = time.perf_counter()
    pd.DataFrame(distances, index=names, columns=names).to_excel("/tmp/hudd_bench_openpyxl.xlsx", sheet_name="d")
    slow = time.perf_counter() - start
    streamed = {}
    for digits in (17, clusterModule.DISTANCE_XLSX_DIGITS):  # every bit, and what the step writes
        start = time.perf_counter()
        xlsxMatrix.write_matrix(Path("/tmp/hudd_bench_stream.xlsx"), distances, names, names, "d", digits=digits)
        streamed[digits] = time.perf_counter() - start
    print(f"distance XLSX of {n} images ({n * n:,} cells): openpyxl {slow:.1f} s ({slow / n / n * 1e6:.1f} us a cell), "
          + ", ".join(f"streamed with {digits} digits {fast:.2f} s ({fast / n / n * 1e6:.2f} us a cell, "
                      f"{slow / fast:.0f}x faster)" for digits, fast in streamed.items()))


def in_child(kind: str, repo: Path = REPO, **kwargs) -> dict:
    """bench_cluster.<kind>(**kwargs) in a fresh process, with the code of checkout `repo`."""
    code = (f"import sys, json; sys.path.insert(0, {str(repo)!r}); sys.path.insert(0, {str(repo / 'bench')!r}); "
            f"import bench_cluster as b; print(json.dumps(b.{kind}(**{kwargs!r})))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only-step", action="store_true", help="only part 4, the whole step")
    parser.add_argument("--cases", default="/tmp/hudd_bench_cluster", help="where part 4 builds its cases")
    parser.add_argument("--sizes", default="1000,5000", help="part 4's numbers of error images (before --quick)")
    parser.add_argument("--repeats", type=int, default=3, help="part 4's alternating runs up to 1,000 images")
    parser.add_argument("--against", type=Path, help="another checkout (e.g. `git worktree add /tmp/base HEAD~1`): "
                        "part 4 at the first size only, this code and that one in alternating processes")
    parser.add_argument("--rounds", type=int, default=6, help="with --against: processes per version")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    if args.against:
        case = build_step_case(Path(args.cases) / f"errors{int(args.sizes.split(',')[0]) // scale}",
                               int(args.sizes.split(",")[0]) // scale)
        return side_by_side({"this checkout": REPO, str(args.against): args.against.resolve()}, case, args.rounds,
                            args.repeats)
    if not args.only_step:
        algorithm_parts(scale)
    xlsx_writers(1000 // scale)
    for n in (int(size) // scale for size in args.sizes.split(",")):
        case = build_step_case(Path(args.cases) / f"errors{n}", n)
        r = in_child("whole_step", case=str(case), repeats=args.repeats if n <= 1000 else 1)
        print(f"whole cluster step, {r['n']} error images x {r['layers']} layers, fastest of {r['repeats']}: "
              f"step {r['step']:.1f} s, algorithm alone {r['algorithm']:.1f} s, step/algorithm "
              f"{r['step'] / r['algorithm']:.2f}x; median to median {np.median(r['step_all']):.1f} s against "
              f"{np.median(r['algorithm_all']):.1f} s, {np.median(r['step_all']) / np.median(r['algorithm_all']):.2f}x "
              "(each run: step " + ", ".join(f"{t:.1f}" for t in r["step_all"])
              + " s; algorithm " + ", ".join(f"{t:.1f}" for t in r["algorithm_all"]) + " s); each step against the "
              f"algorithm inside it: median {np.median(r['within']):.2f}x (" + ", ".join(f"{x:.2f}" for x in r["within"])
              + "x); in the fastest step: "
              + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in r["parts"].items()))


def side_by_side(repos: dict[str, Path], case: Path, rounds: int, repeats: int) -> None:
    """whole_step of each checkout in turn, `rounds` processes of `repeats` runs each, the order
    alternating (the machine's drift falls on both alike); per checkout the medians of all its runs."""
    runs = {name: {"step_all": [], "algorithm_all": [], "within": []} for name in repos}
    for round_ in range(rounds):
        for name in (list(repos) if round_ % 2 == 0 else list(repos)[::-1]):
            r = in_child("whole_step", repo=repos[name], case=str(case), repeats=repeats)
            for key, values in runs[name].items():
                values += r[key]
    for name, r in runs.items():
        step, algorithm = np.median(r["step_all"]), np.median(r["algorithm_all"])
        print(f"{name}: {len(r['step_all'])} runs; step median {step:.2f} s, algorithm alone median {algorithm:.2f} s, "
              f"median to median {step / algorithm:.2f}x; each step against the algorithm inside it, median "
              f"{np.median(r['within']):.2f}x")


def algorithm_parts(scale: int) -> None:
    tiles_vs_threaded_product()
    distances_vs_pdist(2000 // scale, 50000 // scale)
    for n in (5000 // scale, 10000 // scale):
        r = in_child("one_layer", n=n, dims=2048)
        print(f"one layer, n={r['n']} dims={r['dims']}: total {r['total']:.1f} s (distances {r['distances']:.1f}, "
              f"Ward {r['ward']:.1f}, WICD every k {r['wicd_all_k']:.2f}, silhouette k 2..{C.MAX_RCCS} "
              f"{r['silhouette_top_k']:.2f}, sub-clusters of the top level {r['sub_levels']:.2f}; besides: the "
              f"knee over 2..500 {r['knee']:.2f}); k knee {r['k_knee']}, "
              f"k silhouette {r['k_silhouette']}; peak memory {r['peak_gib']:.2f} GiB")
    r = in_child("two_stage", n=30000 // scale, dims=512, limit=20000 // scale)
    print(f"two-stage, n={r['n']} dims={r['dims']} (exact on {r['sample']}): {r['seconds']:.1f} s, k {r['k']}, "
          f"peak memory {r['peak_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
