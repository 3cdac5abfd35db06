"""torchrun: two ranks with gloo on the CPU write the files of one process, the DDP epoch is the
single-process epoch, a killed rank fails the job and the rerun completes; one run per case at a time."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import REPO, SETTINGS, assert_clean_error, build_case, hudd

pytestmark = pytest.mark.xdist_group("test_distributed")  # its module-scoped fixture is built once (conftest.py)

def torchrun(script: Path, *args: str, ranks: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    # torchrun leaves a torchelastic_* folder in the temporary directory of every job: in one of ours
    with tempfile.TemporaryDirectory(prefix="hudd_torchrun_") as temporary:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               str(ranks), str(script), *args], capture_output=True, text=True, cwd=REPO,
                              timeout=timeout, env={**os.environ, "TMPDIR": temporary})


def case_files(case: Path) -> dict[str, bytes]:
    """Every file a run wrote, as bytes; but the manifest (it holds times), workbooks openpyxl wrote
    (they hold times: compared sheet by sheet as tables; the streamed distance XLSX as bytes) and the
    report (it names the case's folder)."""
    files = {}
    for path in sorted(p for p in case.rglob("*") if p.is_file()):
        name = path.relative_to(case).as_posix()
        if name in ("hudd_manifest.json", ".hudd.lock"):
            continue
        if name.endswith(".xlsx") and not name.endswith("HMDistance.xlsx"):  # openpyxl's: every sheet as a table
            files[name] = "".join(f"{sheet}\n{table.to_csv()}" for sheet, table in
                                  pd.read_excel(path, sheet_name=None).items()).encode()
        elif name == "T/report.html":
            files[name] = path.read_bytes().replace(str(case).encode(), b"CASE")
        else:
            files[name] = path.read_bytes()
    return files


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The tiny case (batches of 2, so each rank has two batches of heatmaps) and a one-process run of it
    with two threads (against torchrun's one per rank; set, as the test workers run with fewer)."""
    root = tmp_path_factory.mktemp("single")
    case = build_case(root / "case", settings={**SETTINGS, "batch_size": 2})
    first_class = sorted(p for p in (case / "DataSets" / "TestSet").iterdir() if p.is_dir())[0]
    (first_class / "scan.heic").write_bytes(b"not read")   # a file left out, with a warning
    pristine = root / "pristine"
    shutil.copytree(case, pristine)
    result = hudd("-o", str(case), env={"OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr
    return case, pristine


def test_two_ranks_write_the_bytes_of_one_process(single_run, tmp_path):
    case, pristine = single_run
    two = tmp_path / "case"
    shutil.copytree(pristine, two)
    result = torchrun(REPO / "HUDD.py", "-o", str(two))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("HUDD on") == 1  # the summary, from rank 0 only
    assert result.stdout.count("1 file(s) left out") == 1, result.stdout   # what every rank meets: said once
    ours, theirs = case_files(two), case_files(case.parent / "case")
    assert sorted(ours) == sorted(theirs)
    assert [name for name in ours if ours[name] != theirs[name]] == []
    assert not (two / ".hudd-shards").exists()


def test_a_rank_left_no_images_by_large_batches_still_writes_the_bytes_of_one_process(tmp_path):
    """Every set fits in one batch (the default batch of 128 on a case of a hundred test images does that), so
    one rank has no image to run, explain or assign in every sharded step, and no right test image for the
    contrast: its empty shard must pass through as nothing (a reshape of it failed under torchrun)."""
    one, two = build_case(tmp_path / "one" / "case", settings={**SETTINGS, "batch_size": 64}), tmp_path / "two" / "case"
    shutil.copytree(one, two)   # the same folder name: the report shows it
    alone = hudd("-o", str(one), env={"OMP_NUM_THREADS": "2"})
    assert alone.returncode == 0, alone.stderr
    test_results = pd.read_csv(one / "testResult.csv")
    assert len(test_results) <= 64 and (test_results["result"] == "Correct").any()
    result = torchrun(REPO / "HUDD.py", "-o", str(two))
    assert result.returncode == 0, result.stderr
    assert np.isfinite(pd.read_csv(one / "T" / "UnsafeSet" / "contrast.csv")["contrast"]).all()   # the contrast ran
    ours, theirs = case_files(two), case_files(one)
    assert sorted(ours) == sorted(theirs)
    assert [name for name in ours if ours[name] != theirs[name]] == []


@pytest.mark.parametrize("pick", ["contrast", "closest"])
def test_a_keypoint_unsafe_set_under_two_ranks_writes_the_bytes_of_one_one_thread_process(tmp_path, pick):
    """On a keypoint model each rank explains its shard of the improvement images (and, for the contrast
    pick, of the right test images) through the keypoint the model is least sure of, that uncertainty
    being a forward pass of its own over the shard; rank 0 gathers it for ClosestU's weights. Against a
    one-thread process: oneDNN's 1x1 and transposed convolutions of the keypoint network sum in an order
    that depends on the thread count (docs/scaling.md)."""
    from test_keypoint_pipeline import SETTINGS as KEYPOINT_SETTINGS, build_keypoint_case
    one, two = build_keypoint_case(tmp_path / "one" / "case", images=12), tmp_path / "two" / "case"
    (one / "hudd.json").write_text(json.dumps({**KEYPOINT_SETTINGS, "batch_size": 2, "error_threshold": 10.0,
                                                  "assign_pick": pick}))
    shutil.copytree(one, two)   # the same folder name: the report shows it
    alone = hudd("-o", str(one), env={"OMP_NUM_THREADS": "1"})
    assert alone.returncode == 0, alone.stderr
    result = torchrun(REPO / "HUDD.py", "-o", str(two))
    assert result.returncode == 0, result.stderr
    if pick == "contrast":
        right = (pd.read_csv(one / "testResult.csv")["result"] == "Correct").sum()
        assert right >= 3   # more than one batch of 2 right test images: both ranks explain some
        contrast = pd.read_csv(one / "T" / "UnsafeSet" / "contrast.csv")["contrast"]
        assert len(contrast) == 12 and np.isfinite(contrast).all()   # the contrast ran
    uncertainty = pd.read_csv(one / "T" / "UnsafeSet" / "uncertainty.csv")
    assert len(uncertainty) == 12 and uncertainty["uncertain_keypoint"].notna().all()   # 6 batches, 3 per rank
    ours, theirs = case_files(two), case_files(one)
    assert sorted(ours) == sorted(theirs)
    assert [name for name in ours if ours[name] != theirs[name]] == []


@pytest.mark.parametrize("norm", ["", "batchnorm"])
def test_the_ddp_epochs_equal_the_single_process_epochs(single_run, tmp_path, norm):
    """Also with BatchNorm layers, whose statistics each rank would otherwise take over its half of a batch."""
    assert_ddp_epochs_equal_one_process(single_run[0], tmp_path, norm, ranks=2, batch_size=4)


def test_a_rank_left_no_sample_by_the_last_batch_trains_as_one_process(single_run, tmp_path):
    """17 samples in batches of 5 over 3 ranks: the last batch's 2 samples go to ranks 1 and 2, and rank 0
    runs a stand-in sample that weighs nothing, so that it still takes part in DDP's gradient average,
    BatchNorm's all-reduced statistics and the optimiser step; with BatchNorm and dropout, as one process."""
    assert_ddp_epochs_equal_one_process(single_run[0], tmp_path, "batchnorm", ranks=3, batch_size=5)


def assert_ddp_epochs_equal_one_process(case: Path, tmp_path: Path, norm: str, ranks: int, batch_size: int):
    script = REPO / "tests" / "torchrun" / "ddp_epochs.py"
    epochs_and_batches = ["3", norm, str(batch_size)]
    alone = subprocess.run([sys.executable, str(script), str(case), str(tmp_path / "one.pt"), *epochs_and_batches],
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr
    result = torchrun(script, str(case), str(tmp_path / "two.pt"), *epochs_and_batches, ranks=ranks)
    assert result.returncode == 0, result.stderr
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    original = torch.load(case / "DNNModels" / "OriginalModel.pth")
    assert pd.DataFrame(one["history"]).equals(pd.DataFrame(two["history"]))  # the same samples, counted alike
    assert sorted(one["state"]) == sorted(two["state"])
    norms = [key for key in one["state"] if key not in original]
    assert len(norms) == (10 if norm else 0)   # weight, bias, running mean and variance, batches tracked
    for key, weights in one["state"].items():
        if key.endswith("num_batches_tracked"):
            assert two["state"][key] == weights == 3 * 4   # 17 samples: 3 batches of 4 then 5, or 3 of 5 then 2; 3 epochs
            continue
        moved = (weights - original[key]).abs().max().item() if key in original else 1.0
        before_a_norm = norm and key in ("features.0.bias", "features.3.bias", "features.6.bias")
        if not before_a_norm:   # a BatchNorm takes out the mean those biases add
            assert moved > 1e-3  # the epochs changed the weights...
        # ...alike, up to float sums: 2.5e-7 after one epoch either way; with BatchNorm's divisions they grow
        # to 5e-6 by the third (left per rank, its statistics made other training accuracies in the second)
        tolerance = {"rtol": 1e-4, "atol": 2e-5} if norm else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(two["state"][key], weights, **tolerance)


def test_a_retraining_mode_under_torchrun_writes_its_run_once_from_rank_0(single_run, tmp_path):
    case, _ = single_run
    two = tmp_path / "case"
    shutil.copytree(case, two)   # the analysis steps done: only the retraining runs
    result = torchrun(REPO / "HUDD.py", "-o", str(two), "-mode", "BL2", "--runs", "1")
    assert result.returncode == 0, result.stderr
    runs = pd.read_csv(two / "T" / "Retrain" / "BL2_runs.csv")
    models = sorted(p.name for p in (two / "DNNModels").glob("BL2_*.pth"))
    assert len(runs) == 1 and models == [Path(runs["model"].iloc[0]).name]   # one model, saved once
    assert result.stdout.count("retraining at one budget") == 1


def test_a_killed_rank_fails_the_job_and_the_rerun_completes(single_run, tmp_path):
    case, pristine = single_run
    two = tmp_path / "case"
    shutil.copytree(pristine, two)
    killed = torchrun(REPO / "tests" / "torchrun" / "killed_rank.py", "-o", str(two))
    assert killed.returncode != 0
    assert "local_rank: 1" in killed.stderr and "SIGKILL" in killed.stderr  # torchrun's report names the dead rank
    ours = [line for line in killed.stderr.splitlines() if line.startswith("error: rank 0 of 2")]
    assert len(ours) == 1 and "run the same command again" in ours[0], killed.stderr
    heatmaps = two / "T" / "Heatmaps"
    assert (heatmaps / ".progress-1.json").is_file() and not list(heatmaps.glob("*.npy"))
    rerun = torchrun(REPO / "HUDD.py", "-o", str(two))
    assert rerun.returncode == 0, rerun.stderr
    assert case_files(two) == case_files(case)


def hold_lock(case: Path) -> subprocess.Popen:
    """Another run holding the case's lock (then sleeping), as a running HUDD.py would."""
    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); import Helper; "
            f"lock = Helper.CaseLock(Helper.CasePaths(__import__('pathlib').Path({str(case)!r}))); "
            "lock.acquire(Helper.run_description()); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize("status", [0, 2])
def test_a_rank_ends_in_finish_with_its_status_and_its_output_flushed_never_in_the_interpreter_s_shutdown(status):
    """Under load 1 job in about 60 had a rank aborted (SIGABRT) in the interpreter's shutdown, after it had
    written everything: a gloo thread let go of the last collective's tensors there. finish ends the
    process before that shutdown."""
    result = torchrun(REPO / "tests" / "torchrun" / "leave.py", str(status), timeout=120)
    for rank in (0, 1):
        assert f"[rank {rank}: left]" in result.stdout
    assert "finish returned" not in result.stdout and "shut down" not in result.stdout, result.stdout
    if status == 0:
        assert result.returncode == 0, result.stderr
    else:   # torchrun's own status is 1 and names each rank's
        assert result.returncode != 0 and result.stderr.count(f"exitcode  : {status} ") == 2, result.stderr


def test_with_debug_a_rank_s_trace_is_printed_and_it_still_ends_in_finish(tmp_path):
    """--debug re-raises with the trace; under torchrun the exception left main and the rank ended in the
    interpreter's shutdown, where gloo's threads can abort it (above). Now main prints the trace and
    leaves through finish: the trace starts in main, not at the module's top level."""
    case = tmp_path / "case"
    case.mkdir()
    result = torchrun(REPO / "HUDD.py", "-o", str(case), "--debug", timeout=120)
    assert result.returncode != 0
    trace = result.stderr[result.stderr.index("Traceback (most recent call last):"):]
    first_frame = trace.splitlines()[1]
    assert "HUDD.py" in first_frame and first_frame.endswith("in main"), trace
    assert "model file not found" in trace and "exitcode  : 1 " in result.stderr, result.stderr


def test_a_second_run_is_refused_and_a_killed_run_blocks_nothing(case):
    holder = hold_lock(case)
    try:
        refused = hudd("-o", str(case), "--steps", "test")
        assert_clean_error(refused, str(case), "another HUDD run", f"pid {holder.pid}")
        assert not (case / "testResult.csv").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    after = hudd("-o", str(case), "--steps", "test")
    assert after.returncode == 0, after.stderr


def test_a_killed_run_whose_children_live_on_a_moment_blocks_nothing(case):
    """A killed run's forked children (DataLoader workers) outlive it by up to 5 s: the lock must end with the
    run itself. With flock it lived on in them, and the next run was refused in the dead run's name."""
    code = (f"import os, sys, time; sys.path.insert(0, {str(REPO)!r}); import Helper; "
            f"lock = Helper.CaseLock(Helper.CasePaths(__import__('pathlib').Path({str(case)!r}))); "
            "lock.acquire(Helper.run_description()); child = os.fork(); "
            "time.sleep(600) if child == 0 else (print(child, flush=True), time.sleep(600))")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        assert_clean_error(hudd("-o", str(case), "--steps", "test"), "another HUDD run", f"pid {holder.pid}")
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        after = hudd("-o", str(case), "--steps", "test")   # the child still sleeps
        assert after.returncode == 0, after.stderr
    finally:
        os.kill(child, signal.SIGKILL)
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait()


def test_two_runs_started_together_never_crash_and_leave_whole_outputs(case):
    """The issue's crash ("FileNotFoundError ... .partial"). Whether the two runs overlap depends on how
    fast each starts (on a busy machine the first may end before the second takes the lock): overlapping,
    one is refused with one clear line; either way neither fails otherwise and the outputs are whole. The
    refusal itself is tested deterministically above, against a process that holds the lock."""
    runs = [subprocess.Popen([sys.executable, str(REPO / "HUDD.py"), "-o", str(case), "--steps", "test,heatmaps"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [subprocess.CompletedProcess(r.args, r.wait(timeout=300), *r.communicate()) for r in runs]
    assert sorted(r.returncode for r in results) in ([0, 0], [0, 2]), [r.stderr for r in results]
    for refused in (r for r in results if r.returncode):
        assert_clean_error(refused, "another HUDD run")
    assert len(np.load(case / "T" / "Heatmaps" / "Layer0.npy")) == len(pd.read_csv(case / "T" / "Heatmaps" / "index.csv"))


def test_a_lost_peer_with_an_empty_message_still_gives_one_line(monkeypatch):
    """gloo's errors are quoted by their first line; one without any text must not raise IndexError."""
    import distributed
    from Helper import HuddError
    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)

    def lost():
        raise RuntimeError()
    with pytest.raises(HuddError, match=r"^rank 1 of 2: lost contact with another rank of this torchrun job "
                                        r"\(RuntimeError\); it was killed or crashed"):
        distributed._collective(lost)
