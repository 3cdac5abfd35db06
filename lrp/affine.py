"""Convolution and linear layers as the affine rules see them: the operation and its transpose
(AffineSpec), the weights of one layer with those its rule derives (AffineWeights), the module that
stands in for a layer of the private copy (AffineLayer), and BatchNorm merged into a layer.

Nothing here knows a particular rule: a layer's rule object (rules.py) is called through
``rule.run(x, weights)`` and asked once for the weights it derives (``rule.derive``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layertypes import AFFINE, BATCHNORMS


@dataclass
class AffineSpec:
    """How to run one conv/linear operation and the transpose of its linear part."""
    kind: str  # "linear" or "conv"
    stride: tuple = ()
    padding: tuple = ()
    dilation: tuple = ()
    transposed: bool = False
    output_padding: tuple = ()
    groups: int = 1

    def forward(self, x, w, b):
        if self.kind == "linear":
            return F.linear(x, w, b)
        return torch.convolution(x, w, b, self.stride, self.padding, self.dilation,
                                 self.transposed, self.output_padding, self.groups)

    def input_grad(self, g, x, w):
        """W^T g: the gradient of the op wrt its input for output gradient g (weights untouched)."""
        if self.kind == "linear":
            return g.matmul(w)
        return torch.ops.aten.convolution_backward(
            g, x, w, None, list(self.stride), list(self.padding), list(self.dilation),
            self.transposed, list(self.output_padding), self.groups, [True, False, False])[0]

    @property
    def channel_dim(self) -> int:
        """Dimension of the input's features/channels."""
        return -1 if self.kind == "linear" else 1

    @property
    def weight_in_dim(self) -> int:
        """Dimension of the weight that runs over the input's features/channels."""
        return 0 if self.transposed else 1


def _tup(v, n):
    return (v,) * n if isinstance(v, int) else tuple(v)


def conv_padding(padding, kernel, dilation, ndim):
    """(explicit symmetric padding, F.pad argument or None) for int/tuple/'same'/'valid' padding:
    torch.convolution takes symmetric padding only, so an uneven 'same' is padded beforehand."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * ndim, None
        left, right = [], []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            left.append(total // 2)
            right.append(total - total // 2)
        if left == right:
            return tuple(left), None
        pad = []
        for lo, hi in zip(reversed(left), reversed(right)):
            pad += [lo, hi]
        return (0,) * ndim, pad
    if isinstance(padding, int):
        return (padding,) * ndim, None
    return tuple(padding), None


def spec_of_module(module: nn.Module) -> tuple[AffineSpec, list | None, str]:
    """(spec, padding applied beforehand or None, its F.pad mode) of a conv/linear module."""
    if isinstance(module, nn.Linear):
        return AffineSpec("linear"), None, "constant"
    n = len(module.kernel_size)
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    pad, pre = conv_padding(module.padding, module.kernel_size, module.dilation, n)
    mode = "constant"
    if module.padding_mode != "zeros":  # reflect/replicate/circular: padded beforehand
        pre, pad, mode = list(module._reversed_padding_repeated_twice), (0,) * n, \
            module.padding_mode
    spec = AffineSpec("conv", tuple(module.stride), pad, tuple(module.dilation), transposed,
                      tuple(module.output_padding) if transposed else (0,) * n, module.groups)
    return spec, pre, mode


_CALL_ARGUMENTS = {  # positional parameters of F.linear / F.conv*d / F.conv_transpose*d
    "linear": ("input", "weight", "bias"),
    "conv": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "convT": ("input", "weight", "bias", "stride", "padding", "output_padding", "groups",
              "dilation"),
}


def bind_call(kind: str, args: tuple, kwargs: dict) -> dict:
    """The arguments of a functional call of ``kind`` ('linear', 'conv', 'convT') by name."""
    bound = dict(zip(_CALL_ARGUMENTS[kind], args))
    bound.update(kwargs)
    return bound


def spec_of_call(kind: str, bound: dict) -> tuple[torch.Tensor, AffineSpec]:
    """(input, spec) of a functional call with its arguments bound by name; an uneven 'same'
    padding is applied to the returned input."""
    x, w = bound["input"], bound["weight"]
    if kind == "linear":
        return x, AffineSpec("linear")
    n = w.dim() - 2
    dil = _tup(bound.get("dilation", 1), n)
    pad, pre = (conv_padding(bound.get("padding", 0), w.shape[2:], dil, n) if kind == "conv"
                else (_tup(bound.get("padding", 0), n), None))
    if pre is not None:
        x = F.pad(x, pre)
    return x, AffineSpec("conv", _tup(bound.get("stride", 1), n), pad, dil, kind == "convT",
                         _tup(bound.get("output_padding", 0), n), int(bound.get("groups", 1)))


class AffineWeights:
    """The operation and weights of one conv/linear layer, plus what its rule derives from them.

    ``derived`` (e.g. the clamped weights of z+) is made once, at preparation, and follows the
    layer to another device; ``cached`` holds what the rule makes on first use only (weights that
    only layers with signed inputs need) and is dropped on a device move.
    """

    def __init__(self, spec: AffineSpec, weight: torch.Tensor, bias: torch.Tensor | None, rule,
                 nonneg: bool = False):
        self.spec, self.rule, self.nonneg = spec, rule, nonneg
        self.weight, self.bias = weight, bias
        self.derived: dict[str, torch.Tensor | None] = rule.derive(weight, bias)
        self.cached: dict[str, torch.Tensor] = {}

    def cache(self, key: str, make) -> torch.Tensor:
        """``cached[key]``, made by ``make()`` on first use."""
        t = self.cached.get(key)
        if t is None:
            t = self.cached[key] = make()
        return t

    def move(self, fn) -> None:
        """Apply a module's tensor function (``.to(device)``, ``.double()``) to every weight."""
        self.weight = fn(self.weight)
        if self.bias is not None:
            self.bias = fn(self.bias)
        self.derived = {k: None if v is None else fn(v) for k, v in self.derived.items()}
        self.cached = {}


class AffineLayer(nn.Module):
    """A conv/linear layer of the private copy (BatchNorm already merged) with its LRP rule."""

    def __init__(self, module: nn.Module, weight, bias, rule, nonneg: bool):
        super().__init__()
        self.spec, self.pre_pad, self.pad_mode = spec_of_module(module)
        self.rule = rule
        # the weights belong to the private copy: no clone needed
        self.weights = AffineWeights(self.spec, weight.detach(),
                                     None if bias is None else bias.detach(), rule, nonneg)

    def _apply(self, fn, *args, **kwargs):
        self.weights.move(fn)  # plain attributes: nn.Module would not move them
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x):
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad, mode=self.pad_mode)
        return self.rule.run(x, self.weights)

    def extra_repr(self) -> str:
        return f"rule={self.rule.name}, spec={self.spec}"


def can_merge(module: nn.Module, bn: nn.Module) -> bool:
    """Whether ``bn(module(x))`` is one conv/linear layer (BN in eval mode, channels matching)."""
    if not isinstance(module, AFFINE) or not isinstance(bn, BATCHNORMS):
        return False
    if bn.running_mean is None or bn.running_var is None:
        return False  # no running statistics: BN uses batch statistics even in eval mode
    out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    return out == bn.num_features


def merge_batchnorm(module: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(module(x))`` as one conv/linear layer (BN in eval mode), exact:
    the BN's eps stays inside the scale."""
    w = module.weight.detach()
    b = module.bias.detach() if module.bias is not None else torch.zeros(
        bn.num_features, dtype=w.dtype, device=w.device)
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach()
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach()
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        g = module.groups  # weight (in, out/groups, ...): scale the output channels of each group
        shape = w.shape
        w = (w.reshape(g, shape[0] // g, shape[1], *shape[2:])
             * scale.reshape(g, 1, shape[1], *([1] * (w.dim() - 2)))).reshape(shape)
    else:
        w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    return w, b * scale + shift
