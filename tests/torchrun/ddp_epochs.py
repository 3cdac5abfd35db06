"""Run by tests/test_distributed.py, under torchrun or as one process: fine-tunes the tiny case's model
for `epochs` epochs on its training set plus a bag of improvement images, and (rank 0) saves the weights
and the per-epoch history.

    [torchrun --nproc-per-node N] ddp_epochs.py CASE OUT.pt EPOCHS [batchnorm] [BATCH_SIZE]

With `batchnorm`, the model gets a BatchNorm2d before each of its three ReLUs (as ResNets and most
torchvision models have; the third without parameters or running statistics), whose statistics must be
the global batch's. BATCH_SIZE (default 4) is the global batch.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # as HUDD.py sets it
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import context  # noqa: E402  (puts the repository on the path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import distributed  # noqa: E402
import retrainModule  # noqa: E402

case, out, epochs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
norm, batch_size = sys.argv[4] if len(sys.argv) > 4 else "", int(sys.argv[5]) if len(sys.argv) > 5 else 4
ctx = context(case, epochs=epochs, learning_rate=0.05, batch_size=batch_size)
if norm == "batchnorm":
    model = ctx.model()
    for position, channels in ((1, 16), (4, 32)):   # DemoNet's features: conv, ReLU, pool, conv, ReLU, ...
        norm = torch.nn.BatchNorm2d(channels)
        with torch.no_grad():   # not the identity: the statistics and the affine part both matter
            norm.weight.copy_(torch.linspace(0.5, 1.5, channels))
            norm.bias.copy_(torch.linspace(-0.2, 0.2, channels))
        model.features[position] = torch.nn.Sequential(norm, torch.nn.ReLU())
    # and one with neither parameters nor running statistics (always the batch's own)
    model.features[7] = torch.nn.Sequential(torch.nn.BatchNorm2d(64, affine=False, track_running_stats=False),
                                            torch.nn.ReLU())
distributed.start(ctx.device)
data = retrainModule.training_data(ctx)
# 12 training images + 5: in batches of 4 the last sample joins the last batch (5, split 2 + 3 over 2 ranks);
# in batches of 5 the last batch holds 2, and of 3 ranks the first gets none (a stand-in that weighs nothing)
bag = np.array([0, 3, 3, 7, 11])
model, _epoch, history = retrainModule.fine_tune(ctx, data, bag, seed=7, desc="test")
if distributed.is_main():
    torch.save({"state": model.state_dict(), "history": history}, out)
distributed.finish()
