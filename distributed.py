"""One HUDD run as several processes ("ranks") started by torchrun, on one machine or several.

    torchrun --nproc-per-node N HUDD.py -o CASE ...            # one machine, N ranks
    torchrun --nnodes M --node-rank I --rdzv-endpoint HOST:PORT --nproc-per-node N HUDD.py -o CASE ...

torchrun gives every rank RANK, WORLD_SIZE and LOCAL_RANK. What runs where (docs/scaling.md):
- the test, heatmap and assignment steps split their images into contiguous shards of whole batches
  (`batch_shard`), so every batch is the one a single process would run and the merged files are
  byte-identical to a single-process run; rank 0 merges (`gather_shards`) and writes the step's files;
- retraining is DistributedDataParallel over slices of each global batch (`local_slice`), with the loss
  scaled so that the averaged gradient is the global batch's, and dropout masks drawn for the global
  batch (`BatchDropout`), so an epoch on N ranks is the single-process epoch;
- clustering, the report and the summary run on rank 0 while the others wait.
Every collective step goes through `together`: each rank's outcome is gathered, so an error on one rank
stops every rank with the same message (printed once, by rank 0), and a rank that dies makes the others
stop with a clear line instead of hanging. Without torchrun every function here is the one-process case.
"""
from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from Helper import HuddError, PipelineStop, QuietExit, atomic_path, first_line_of, pick_device

log = logging.getLogger("hudd")

# Ranks wait at barriers while rank 0 clusters, which can take hours at 10^5 error images; a rank that
# dies is noticed at once anyway (its connections close, and torchrun stops the job).
WAIT_LIMIT = datetime.timedelta(hours=48)
_control = None   # the gloo group for barriers and small objects (NCCL is for the DDP gradients only)


def launched() -> bool:
    """Started by torchrun (or any launcher that sets WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def progress_off() -> bool | None:
    """tqdm's `disable`: progress bars on rank 0 only (None: tqdm's own choice, on where it is a terminal)."""
    return None if is_main() else True


def describe() -> str:
    """"rank 1 of 2" under torchrun, "" for one process (for messages)."""
    return f"rank {rank()} of {world()}" if world() > 1 else ""


def device_for(name: str) -> torch.device:
    """--device under torchrun: `auto` and `cuda` mean this rank's own GPU, cuda:LOCAL_RANK."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if launched() and name in ("auto", "cuda") and torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise HuddError(f"torchrun started local rank {local} but this machine has {torch.cuda.device_count()} "
                            "GPU(s); start at most one rank per GPU (--nproc-per-node)")
        return torch.device("cuda", local)
    return pick_device(name)


def start(device: torch.device) -> None:
    """Joins the torchrun job: gloo on CPU, NCCL on CUDA (plus a gloo group for waiting and messages)."""
    global _control
    if not launched() or active():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=WAIT_LIMIT, device_id=device)
        _control = dist.new_group(backend="gloo", timeout=WAIT_LIMIT)
    else:
        dist.init_process_group("gloo", timeout=WAIT_LIMIT)
        _control = None
    signal.signal(signal.SIGTERM, _stopped_by_signal)
    if not is_main():   # rank 0 tells the story, and says once what every rank meets alike
        hudd_log = logging.getLogger("hudd")
        hudd_log.setLevel(logging.WARNING)
        hudd_log.addFilter(lambda record: not getattr(record, "same_on_every_rank", False))


def _stopped_by_signal(number, _frame) -> None:
    raise HuddError(f"{describe()}: stopped by signal {number} (torchrun stops every rank when one fails); the work "
                    "finished so far is on disk, and running the same command again resumes from it")


def finish(status: int = 0) -> None:
    """Leaves the torchrun job and ends this rank's process with `status`; returns at once in one process.
    After a clean run (status 0) the ranks meet at a last barrier (those other than 0 wait there for rank
    0's report and summary) and the group is destroyed; after a failure they leave at once (the others may
    be gone, and tearing down could wait on them).

    The process ends by os._exit, after flushing its output, not by returning to the interpreter: torch
    keeps the gloo group alive past destroy_process_group (torch._dynamo, which torchvision's ops import,
    holds references to it), and its worker threads drop the last collectives' tensors on their own
    time. When that falls in the interpreter's shutdown, taking the GIL there kills the rank with SIGABRT
    ("terminate called without an active exception"): about 1 torchrun job in 60 under load failed so,
    after writing everything. os._exit leaves those threads no shutdown to meet."""
    if not active():
        return
    if status == 0:
        try:
            barrier()
            dist.destroy_process_group()
        except HuddError:
            pass  # a rank left early: torchrun's own exit status says how the job ended
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def barrier() -> None:
    _collective(lambda: dist.barrier(group=_control))


def broadcast(value: Any) -> Any:
    """Rank 0's value, on every rank."""
    if not active():
        return value
    box = [value]
    _collective(lambda: dist.broadcast_object_list(box, src=0, group=_control))
    return box[0]


def all_gather(value: Any) -> list[Any]:
    """Every rank's value, in rank order, on every rank."""
    if not active():
        return [value]
    values = [None] * world()
    _collective(lambda: dist.all_gather_object(values, value, group=_control))
    return values


def _collective(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except RuntimeError as exc:  # gloo: a peer's connection closed or timed out
        raise HuddError(f"{describe()}: lost contact with another rank of this torchrun job ({first_line_of(exc)}); "
                        "it was killed or crashed. The work finished so far is on disk: run the same command again "
                        "to resume") from None


def on_main(work: Callable[[], Any]) -> Any:
    """`work` on rank 0 while the other ranks wait (together's failure handling); its result on rank 0,
    None elsewhere."""
    return together(lambda: work() if is_main() else None)


def together(work: Callable[[], Any]) -> Any:
    """Runs `work` on every rank and waits for all. When a rank fails, every rank stops the same way:
    rank 0 raises the failing rank's error (naming the rank), the other ranks stop quietly with the same
    exit status; a PipelineStop stops every rank with its note."""
    if not active():
        return work()
    try:
        result, outcome = work(), ("ok", "")
    except PipelineStop as exc:
        result, outcome = None, ("stop", str(exc))
    except HuddError as exc:
        result, outcome = None, ("error", str(exc))
    except KeyboardInterrupt:
        result, outcome = None, ("interrupted", "")
    except Exception as exc:  # a bug of ours: reported by rank 0 as an internal error
        log.exception("%s failed", describe())
        result, outcome = None, ("internal", f"{type(exc).__name__}: {exc}")
    outcomes = all_gather(outcome)
    failed = [(r, kind, text) for r, (kind, text) in enumerate(outcomes) if kind != "ok"]
    if not failed:
        return result
    r, kind, text = failed[0]
    if kind == "stop":
        raise PipelineStop(text)
    if not is_main():
        raise QuietExit({"error": 2, "interrupted": 130}.get(kind, 1))
    if kind == "interrupted":
        raise KeyboardInterrupt
    where = f"[rank {r} of {world()}] " if r != 0 else ""
    raise HuddError(where + text) if kind == "error" else RuntimeError(where + text)


# --------------------------------------------------------------------------------------------
# Shards of the image steps
# --------------------------------------------------------------------------------------------

def batch_shard(rows: int, batch_size: int) -> tuple[int, int]:
    """This rank's contiguous rows: whole batches of the single-process run (the last one may be short),
    as evenly as whole batches allow."""
    batches = -(-rows // batch_size)
    first, last = batches * rank() // world(), batches * (rank() + 1) // world()
    return min(rows, first * batch_size), min(rows, last * batch_size)


def gather_shards(folder, key: str, rows: int, batch_size: int, stamp: str,
                  compute: Callable[[int, int], dict[str, np.ndarray]], everyone: bool = False
                  ) -> list[dict[str, np.ndarray]] | None:
    """Each rank computes its shard of `rows` (compute(start, stop) -> named arrays) and writes it to
    `folder/<key>.rank<r>of<w>.npz`; rank 0 gets every rank's arrays in rank order (the others get
    None; with `everyone`, every rank gets them, and rank 0 clears the files only after a later
    collective). A shard already on disk with the same `stamp` (the step's fingerprint) and rows is
    reused, so a rerun after a failure resumes. Plain arrays, no pickle. One process: [compute(0, rows)]."""
    if not active():
        return [compute(0, rows)]
    start, stop = batch_shard(rows, batch_size)

    def shard() -> None:
        path = _shard_file(folder, key, rank())
        if path.is_file():
            with np.load(path, allow_pickle=False) as saved:
                if (str(saved["_stamp"]), int(saved["_start"]), int(saved["_stop"])) == (stamp, start, stop):
                    return
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            np.savez(temporary, _stamp=np.array(stamp), _start=start, _stop=stop, **compute(start, stop))

    together(shard)
    if not is_main() and not everyone:
        return None
    shards = []
    for r in range(world()):
        with np.load(_shard_file(folder, key, r), allow_pickle=False) as saved:
            shards.append({name: saved[name] for name in saved.files if not name.startswith("_")})
    return shards


def _shard_file(folder, key: str, number: int):
    return folder / f"{key}.rank{number}of{world()}.npz"


def clear_shards(folder, key: str) -> None:
    """Rank 0, once the step's files are written: its shards, and the scratch folders left empty."""
    for path in folder.glob(f"{key}.rank*.npz"):
        path.unlink()
    for empty in (folder, folder.parent):
        if empty.is_dir() and not any(empty.iterdir()):
            empty.rmdir()


# --------------------------------------------------------------------------------------------
# DistributedDataParallel retraining
# --------------------------------------------------------------------------------------------

def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """The model wrapped for DDP under torchrun (gradients averaged over the ranks); itself otherwise."""
    if not active():
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def local_slice(size: int) -> slice:
    """This rank's contiguous part of a global batch of `size` samples (may be empty)."""
    return slice(size * rank() // world(), size * (rank() + 1) // world())


def sum_over_ranks(*numbers: float) -> list[float]:
    if not active():
        return list(numbers)
    return [sum(values) for values in zip(*all_gather(numbers))]


class BatchDropout(nn.Module):
    """Dropout whose mask is drawn for the whole global batch from a generator seeded per batch, then
    sliced to this rank's samples: the same mask for every sample whether the batch runs in one process
    or is split over ranks (torch's Dropout draws per process, so ranks would drop different units).
    `set_batch` is called before each forward."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.batch: tuple[int, slice, torch.Generator] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.batch is None:
            return x
        size, part, generator = self.batch
        keep = torch.rand((size, *x.shape[1:]), generator=generator)[part] >= self.p
        return x * keep.to(x.device, x.dtype) / (1 - self.p)


def batch_dropout(model: nn.Module) -> list[BatchDropout]:
    """Replaces the model's nn.Dropout modules by BatchDropout (same p; no parameters, so the state_dict
    is unchanged); returns them for `set_batch`. Functional dropout inside forward() is not reached."""
    return _replace_modules(model, lambda child: type(child) is nn.Dropout, lambda child: BatchDropout(child.p))


def _replace_modules(model: nn.Module, wanted: Callable[[nn.Module], bool],
                     make: Callable[[nn.Module], nn.Module]) -> list[nn.Module]:
    """Replaces every submodule `wanted` picks by `make(it)`, in place; returns the new modules in order."""
    replaced = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if wanted(child):
                replaced.append(make(child))
                setattr(parent, name, replaced[-1])
    return replaced


def set_batch(dropouts: list[BatchDropout], size: int, part: slice, seed: int,
              norms: list["BatchNormOverRanks"] = (), counted: bool = True) -> None:
    """The global batch's size, this rank's slice of it and its mask seed, for every BatchDropout (one
    generator, drawn in forward order, as in one process); for every BatchNormOverRanks, whether this
    rank's samples count (False for the stand-in sample of a rank the batch left none)."""
    generator = torch.Generator().manual_seed(seed)
    for module in dropouts:
        module.batch = (size, part, generator)
    for norm in norms:
        norm.counted = counted


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over the ranks; its gradient is the sum of the ranks' gradients (every rank's
    loss depends on every rank's share)."""

    @staticmethod
    def forward(_ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(_ctx, gradient: torch.Tensor) -> torch.Tensor:
        total = gradient.clone()
        dist.all_reduce(total)
        return total


class BatchNormOverRanks(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are the global batch's, summed over the ranks, as one process
    computes them over the whole batch: each rank's own half would normalise with other statistics and
    keep other running ones (nn.SyncBatchNorm does this on GPUs only). The sums go through an all-reduce
    with a gradient (`_SumOverRanks`), so each rank's gradients carry the other ranks' share, which DDP's
    average completes. Same parameters and buffers as the BatchNorm it replaces (`norms_over_ranks`): the state_dict is
    unchanged; outside training it is that BatchNorm."""

    counted = True

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of 2 or more dimensions (got {x.dim()}D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not active():
            return super().forward(x)
        summed = _SumOverRanks.apply
        dims, shape, weight = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2), float(self.counted)
        count = torch.tensor([x.numel() // x.shape[1] * weight], dtype=torch.float64, device=x.device)  # NCCL: a GPU's
        dist.all_reduce(count)
        n = count.item()
        mean = summed(x.sum(dims) * weight) / n
        centred = x - mean.view(shape)
        variance = summed((centred * centred).sum(dims) * weight) / n   # two passes, as stable as one process's
        y = centred * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                self.running_var.mul_(1 - factor).add_(variance * (n / max(n - 1, 1)), alpha=factor)  # unbiased
        return y


def norms_over_ranks(model: nn.Module) -> list[BatchNormOverRanks]:
    """Under torchrun with 2+ ranks, replaces the model's BatchNorm layers by BatchNormOverRanks (same
    settings, parameters and buffers); returns them for `set_batch`. None in one process, where BatchNorm
    already sees the whole batch."""
    if not active() or world() < 2:
        return []

    def over_ranks(child: nn.modules.batchnorm._BatchNorm) -> BatchNormOverRanks:
        norm = BatchNormOverRanks(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
        norm.load_state_dict(child.state_dict())
        held = [*child.parameters(recurse=False), *child.buffers(recurse=False)]   # none: affine and stats off
        return norm.to(held[0].device if held else "cpu").train(child.training)

    return _replace_modules(model, lambda child: isinstance(child, nn.modules.batchnorm._BatchNorm)
                            and not isinstance(child, BatchNormOverRanks), over_ranks)
