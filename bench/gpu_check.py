"""The CUDA paths on a GPU machine, in under 5 minutes (a script, not a test): prints its figures.

    python bench/gpu_check.py [--root DIR]

1. builds the demo case study in DIR/demo on the GPU (data, original model) and runs the test and heatmap
   steps there, timing the heatmap step (error images per second on CUDA);
2. pairwise distances of 5,000 and 20,000 heatmaps of 2,048 dimensions: float64 on CUDA against numpy on
   the CPU, times and the largest difference;
3. retraining on the demo with DistributedDataParallel: torchrun, one rank per GPU, one HUDD run of
   3 epochs, against the same run in one process on the first GPU (test accuracies side by side);
4. the test suite's CUDA tests (distances and nearest rows on CUDA, LRP on CUDA against the CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def timed_run(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        print(result.stdout[-3000:], result.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(command)}")
    return time.perf_counter() - start


def demo_heatmaps(case: Path) -> None:
    import torch
    import demo
    import Helper
    start = time.perf_counter()
    demo.prepare("signs", case, seed=0, device=torch.device("cuda"))
    print(f"demo built and its model trained on {torch.cuda.get_device_name(0)}: {time.perf_counter() - start:.0f} s")
    timed_run([sys.executable, "HUDD.py", "-o", str(case), "--steps", "test", "--device", "cuda"])
    seconds = timed_run([sys.executable, "HUDD.py", "-o", str(case), "--steps", "heatmaps", "--device", "cuda",
                         "--force"])
    import heatmapModule
    errors = len(heatmapModule.read_index(Helper.CasePaths(case)))
    print(f"heatmap step on CUDA (whole command, start-up included): {errors} error images in {seconds:.1f} s")


def distances_on_cuda() -> None:
    import torch
    import bench_cluster
    import clustering as C
    for n in (5000, 20000):
        x = bench_cluster.heatmaps(n, 2048)
        C.pairwise_distances(x[:100], "l2", device="cuda")  # CUDA start-up out of the timing
        torch.cuda.synchronize()
        start = time.perf_counter()
        gpu = C.pairwise_distances(x, "l2", device="cuda")
        gpu_s = time.perf_counter() - start
        start = time.perf_counter()
        cpu = C.pairwise_distances(x, "l2")
        cpu_s = time.perf_counter() - start
        print(f"distances {n} x 2048, float64: CUDA {gpu_s:.1f} s (host matrix included), numpy CPU {cpu_s:.1f} s, "
              f"CPU/CUDA {cpu_s / gpu_s:.1f}x, largest difference {np.abs(gpu - cpu).max():.1e}")
        del gpu, cpu


def ddp_retraining(case: Path) -> None:
    import torch
    gpus = torch.cuda.device_count()
    (case / "hudd.json").write_text(json.dumps({**json.loads((case / "hudd.json").read_text()), "epochs": 3}))
    timed_run([sys.executable, "HUDD.py", "-o", str(case), "--steps", "clusters,assign", "--device", "cuda"])
    alone = timed_run([sys.executable, "HUDD.py", "-o", str(case), "-mode", "HUDD", "--device", "cuda", "--force",
                       "--steps", "retrain"])
    single = (case / "T" / "Retrain" / "HUDD_runs.csv").read_text()
    ddp = timed_run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
                     "HUDD.py", "-o", str(case), "-mode", "HUDD", "--force", "--steps", "retrain"])
    print(f"retraining HUDD, 3 epochs on the demo: one process on cuda:0 {alone:.0f} s; torchrun DDP on {gpus} "
          f"GPU(s) {ddp:.0f} s (whole commands)")
    print("  one process:", single.splitlines()[1])
    print("  DDP:        ", (case / "T" / "Retrain" / "HUDD_runs.csv").read_text().splitlines()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/hudd_gpu_check")
    args = parser.parse_args()
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script checks the GPU paths")
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    case = Path(args.root) / "demo"
    demo_heatmaps(case)
    distances_on_cuda()
    ddp_retraining(case)
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_cluster_algorithms.py", "tests/test_lrp.py",
                            "-k", "device or cuda"], cwd=REPO, capture_output=True, text=True)
    print("CUDA tests:", tests.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
