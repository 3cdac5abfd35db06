"""What the two demo case studies (demoCase.py: traffic signs, demoFace.py: faces) share: the seed
check, the number of drawing processes, and drawing a set's images in chunks, in parallel when large."""
from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable

import numpy as np

from Helper import SET_FOLDERS, CasePaths, HuddError, staged_datasets, write_settings_if_absent

log = logging.getLogger("hudd")

POOL_MIN_IMAGES = 300     # smaller builds are drawn in this process (a pool costs more than it saves)
CHUNK = 100               # images per drawing job


def check_seed(seed: int, what: str = "demo") -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise HuddError(f"{what} seed {seed!r} must be a whole number >= 0")
    return int(seed)


def build_case(paths: CasePaths, plan: dict[str, list[dict[str, Any]]], prepare_set: Callable,
               draw_chunk: Callable, workers: int, settings: dict[str, Any], what: str) -> dict[str, Any]:
    """Writes a planned demo case study: prepare_set(set_dir, records) makes each set's folders and
    tables, draw_chunk draws the images; all into a staging folder that becomes DataSets/ when
    complete, then hudd.json (unless the user has one). Returns the images per set and scenario."""
    started = time.perf_counter()
    with staged_datasets(paths) as staging:
        jobs = []
        for set_key, records in plan.items():
            set_dir = staging / SET_FOLDERS[set_key]
            prepare_set(set_dir, records)
            jobs += chunk_jobs(str(set_dir), records)
        draw_all(jobs, draw_chunk, workers)
    write_settings_if_absent(paths, settings)
    seconds = time.perf_counter() - started
    total = sum(len(records) for records in plan.values())
    log.info("%s: %d images drawn in %.1f s into %s", what, total, seconds, paths.datasets)
    counts = {key: dict(Counter(p["scenario"] for p in records)) for key, records in plan.items()}
    return {"sizes": {k: len(v) for k, v in plan.items()}, "counts": counts, "seconds": round(seconds, 1)}


def refuse_filled_datasets(paths: CasePaths, what: str) -> None:
    """A demo is built only into a new or empty DataSets folder: never over a user's images."""
    if paths.datasets.exists() and (not paths.datasets.is_dir() or any(paths.datasets.iterdir())):
        raise HuddError(f"{paths.datasets}: already exists and is not empty; the {what} is built only into a new or "
                        "empty folder (choose another folder or remove this one)")


def default_workers() -> int:
    """The CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def chunk_jobs(set_dir: str, records: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    return [(set_dir, records[i:i + CHUNK]) for i in range(0, len(records), CHUNK)]


def draw_all(jobs: list, draw_chunk: Callable, workers: int) -> None:
    """Runs draw_chunk(job) for every job: here for small builds or one worker, else in a process
    pool (fork where available, so the drawing module is not imported again per process)."""
    total = sum(len(records) for _set_dir, records in jobs)
    if workers == 1 or total < POOL_MIN_IMAGES:
        for job in jobs:
            draw_chunk(job)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for _ in pool.map(draw_chunk, jobs):
            pass
