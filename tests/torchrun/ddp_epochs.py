"""Run by tests/test_distributed.py, under torchrun or as one process: fine-tunes the tiny case's model
for `epochs` epochs on its training set plus a bag of improvement images, and (rank 0) saves the weights
and the per-epoch history.

    [torchrun --nproc-per-node 2] ddp_epochs.py CASE OUT.pt EPOCHS [batchnorm]

With `batchnorm`, the model gets a BatchNorm2d before each of its three ReLUs (as ResNets and most
torchvision models have; the third without parameters or running statistics), whose statistics must be
the global batch's.
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
ctx = context(case, epochs=epochs, learning_rate=0.05, batch_size=4)
if sys.argv[4:] == ["batchnorm"]:
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
bag = np.array([0, 3, 3, 7, 11])  # 12 training images + 5: the last sample joins the last batch of 4 (5, split 2 + 3)
model, _epoch, history = retrainModule.fine_tune(ctx, data, bag, seed=7, desc="test")
if distributed.is_main():
    torch.save({"state": model.state_dict(), "history": history}, out)
distributed.finish()
