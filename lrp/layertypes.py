"""Groups of torch layer types by the way LRP treats them.

The presets (presets.py) give each group a rule; the graph phases use the groups to find the layers
that BatchNorm merges into, the default layers and the tensors that are known to be >= 0. A new
layer type is added to its group here, once.
"""
from __future__ import annotations

from torch import nn

CONVOLUTIONS = (nn.modules.conv._ConvNd,)  # Conv1d/2d/3d and ConvTranspose1d/2d/3d
LINEAR = (nn.Linear,)
AFFINE = CONVOLUTIONS + LINEAR
MAX_POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
AVG_POOLS = (nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd)
POOLS = MAX_POOLS + AVG_POOLS
DEFAULT_LAYERS = AFFINE + POOLS  # the layers whose relevance HUDD reports by default

BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)
# normalisations that cannot be merged into a layer before them
OTHER_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
               nn.LocalResponseNorm, nn.CrossMapLRN2d)
ACTIVATIONS = (
    nn.ELU, nn.Hardshrink, nn.Hardsigmoid, nn.Hardtanh, nn.Hardswish, nn.LeakyReLU, nn.LogSigmoid,
    nn.PReLU, nn.ReLU, nn.ReLU6, nn.RReLU, nn.SELU, nn.CELU, nn.GELU, nn.Sigmoid, nn.SiLU, nn.Mish,
    nn.Softplus, nn.Softshrink, nn.Softsign, nn.Tanh, nn.Tanhshrink, nn.Threshold, nn.Softmax,
    nn.LogSoftmax, nn.Softmax2d, nn.Softmin,
)
DROPOUTS = (nn.modules.dropout._DropoutNd,)
# layers that only move, copy or select values: relevance follows their ordinary gradient
ROUTING = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd, nn.PixelShuffle,
    nn.PixelUnshuffle, nn.ChannelShuffle,
) + DROPOUTS
# linear maps without bias that average their inputs
AVERAGING = AVG_POOLS + (nn.Upsample,)

# the model output is "seen through" these to find the layer that produced it (merged BatchNorm,
# identity, dropout in eval mode)
SEE_THROUGH = BATCHNORMS + (nn.Identity,) + DROPOUTS

# a final normalisation of the class scores: relevance starts at its input, the logits (the seed of a
# probability or a log-probability would scale each heatmap by p/z or log(p)/z, flipping its sign
# wherever that factor is negative: every heatmap of a log_softmax model, as PyTorch's MNIST example is)
FINAL_SOFTMAX = (nn.Softmax, nn.LogSoftmax)

# outputs that are >= 0 whatever the input (lets z+ skip its negative-input half)
NONNEG_OUTPUT = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softmax, nn.Softmax2d,
                 nn.Softplus, nn.Softmin)
# outputs that are >= 0 when the input is
NONNEG_PRESERVING = POOLS + (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle,
    nn.ChannelShuffle, nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd,
) + DROPOUTS
