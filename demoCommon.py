"""What the two demo case studies (demoCase.py: traffic signs, demoFace.py: faces) share: the seed
check, the number of drawing processes, and drawing a set's images in chunks, in parallel when large."""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable

import numpy as np

from Helper import HuddError

POOL_MIN_IMAGES = 300     # smaller builds are drawn in this process (a pool costs more than it saves)
CHUNK = 100               # images per drawing job


def check_seed(seed: int, what: str = "demo") -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise HuddError(f"{what} seed {seed!r} must be a whole number >= 0")
    return int(seed)


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
