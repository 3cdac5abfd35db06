"""Functional operations and Tensor methods: the rule each one gets, its out-of-place form, and
which ones give or keep non-negative values.

The rule of a function is looked up in ``FUNCTION_RULES`` (an unknown function gets ``NoRule``: an
error if it is called on input-dependent tensors); ``F.linear`` and ``F.conv*d`` are explained like
their module type (``AFFINE_FUNCTIONS``), with the preset's rule for that type. A new function is
added to its group's list here, once.
"""
from __future__ import annotations

import operator
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .rules import (Difference, Gradient, Identity, MatMul, NoRule, OpRule, Pass, Product,
                    Proportional, ReversedDifference, Sum)


def _fns(*names: str, mod: Any = F) -> list:
    """The functions of ``mod`` with these names (those this torch version has)."""
    return [getattr(mod, n) for n in names if hasattr(mod, n)]


# ------------------------------------------------------------------------------------------------
# functions (fx call_function targets; the functions a TorchFunctionMode receives)
# ------------------------------------------------------------------------------------------------
# in-place activation -> its out-of-place form (rules keep tensors that in-place ops would
# overwrite)
_INPLACE_ACTIVATIONS: dict[Callable, Callable] = {
    **{getattr(F, n + "_"): getattr(F, n)
       for n in ("relu", "leaky_relu", "elu", "hardtanh", "threshold", "rrelu", "celu", "selu")
       if hasattr(F, n + "_")},
    **{getattr(torch, n + "_"): getattr(torch, n)
       for n in ("relu", "sigmoid", "tanh", "clamp", "clamp_min", "neg")
       if hasattr(torch, n + "_")},
}
OUT_OF_PLACE_FUNCTIONS: dict[Callable, Callable] = {
    **_INPLACE_ACTIVATIONS, operator.iadd: operator.add, operator.isub: operator.sub,
    operator.imul: operator.mul, operator.itruediv: operator.truediv,
}

_PASS = _fns("relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish",
             "hardswish", "hardsigmoid", "hardtanh", "softplus", "softsign", "tanh", "sigmoid",
             "logsigmoid", "softmax", "log_softmax", "softmin", "threshold", "rrelu",
             "tanhshrink", "softshrink", "hardshrink",
             # functional normalisations, as their (unmerged) modules: pass-through
             "layer_norm", "group_norm", "instance_norm", "local_response_norm") + _fns(
    "relu", "sigmoid", "tanh", "softmax", "log_softmax", "clamp", "clip", "clamp_min", "neg",
    mod=torch) + [operator.neg] + list(_INPLACE_ACTIVATIONS)
_IDENTITY = _fns("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                 "feature_alpha_dropout") + _fns("dropout", "alpha_dropout", "feature_dropout",
                                                 mod=torch)
_PROPORTIONAL = _fns("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
                     "adaptive_avg_pool2d", "adaptive_avg_pool3d", "interpolate", "upsample",
                     "upsample_nearest", "upsample_bilinear") + _fns(
    "mean", "sum", "avg_pool1d", "adaptive_avg_pool1d", mod=torch)
_GRADIENT = _fns("max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices",
                 "max_pool2d_with_indices", "max_pool3d_with_indices", "adaptive_max_pool1d",
                 "adaptive_max_pool2d", "adaptive_max_pool3d", "pad", "pixel_shuffle",
                 "pixel_unshuffle", "channel_shuffle") + _fns(
    "flatten", "reshape", "cat", "concat", "concatenate", "stack", "squeeze", "unsqueeze",
    "transpose", "permute", "split", "chunk", "narrow", "movedim", "swapaxes", "swapdims", "t",
    "unbind", "clone", "roll", "flip", "max_pool1d", "max_pool2d", "max_pool3d", "unflatten",
    "hstack", "vstack", "amax", "max", mod=torch) + [operator.getitem, getattr, operator.pos]  # max, amax: as max pooling
_ARITHMETIC: dict[Callable, type[OpRule]] = {
    operator.add: Sum, operator.iadd: Sum, torch.add: Sum,
    operator.sub: Difference, operator.isub: Difference, torch.sub: Difference,
    torch.subtract: Difference,
    operator.mul: Product, operator.imul: Product, operator.truediv: Product,
    operator.itruediv: Product, torch.mul: Product, torch.multiply: Product, torch.div: Product,
    torch.divide: Product, torch.true_divide: Product,
    operator.matmul: MatMul, torch.matmul: MatMul, torch.mm: MatMul, torch.bmm: MatMul,
}

FUNCTION_RULES: dict[Callable, type[OpRule]] = {
    **{f: Pass for f in _PASS}, **{f: Identity for f in _IDENTITY},
    **{f: Proportional for f in _PROPORTIONAL}, **{f: Gradient for f in _GRADIENT}, **_ARITHMETIC,
}

# functional conv/linear -> (the module type whose rule explains it, its argument layout for
# affine.bind_call)
AFFINE_FUNCTIONS: dict[Callable, tuple[type[nn.Module], str]] = {
    F.linear: (nn.Linear, "linear"), F.conv1d: (nn.Conv1d, "conv"),
    F.conv2d: (nn.Conv2d, "conv"), F.conv3d: (nn.Conv3d, "conv"),
    F.conv_transpose1d: (nn.ConvTranspose1d, "convT"),
    F.conv_transpose2d: (nn.ConvTranspose2d, "convT"),
    F.conv_transpose3d: (nn.ConvTranspose3d, "convT"),
}

NONNEG_FUNCTIONS = set(_fns("relu", "relu6", "sigmoid", "hardsigmoid", "softmax", "softplus",
                            "softmin") + _fns("relu", "sigmoid", "softmax", mod=torch)
                       ) | {F.relu_, torch.relu_}
# routing/averaging functions that keep a >= 0 input >= 0 (some only for some arguments: see
# graph.mark_nonnegative); getattr is routing but its result is no tensor
NONNEG_PRESERVING_FUNCTIONS = (set(_GRADIENT) | set(_PROPORTIONAL) | set(_IDENTITY)) - {getattr}


def add_torchvision_functions() -> None:
    """torchvision's stochastic depth (EfficientNet, ConvNeXt, ...: dropout of a whole residual branch)
    into the identity group, once torchvision is loaded; LRPExplainer calls it before it reads any rule.
    Not imported here: its import pulls in torch._dynamo, seconds that a command stopping at its first
    check need not wait, nor a model without torchvision; a model that calls it was built from
    torchvision, which is loaded by then."""
    tv_ops = sys.modules.get("torchvision.ops")
    stochastic_depth = getattr(tv_ops, "stochastic_depth", None)
    if stochastic_depth is not None and stochastic_depth not in FUNCTION_RULES:
        FUNCTION_RULES[stochastic_depth] = Identity
        NONNEG_PRESERVING_FUNCTIONS.add(stochastic_depth)


def function_rule(fn: Callable) -> type[OpRule]:
    return FUNCTION_RULES.get(fn, NoRule)


def out_of_place_function(fn: Callable) -> Callable:
    return OUT_OF_PLACE_FUNCTIONS.get(fn, fn)


def is_inplace_function(fn: Callable) -> bool:
    return fn in OUT_OF_PLACE_FUNCTIONS


def function_name(fn: Any) -> str:
    return getattr(fn, "__name__", str(fn))


# ------------------------------------------------------------------------------------------------
# Tensor methods (fx call_method targets, by name)
# ------------------------------------------------------------------------------------------------
_GRADIENT_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "t",
    "squeeze", "unsqueeze", "contiguous", "size", "dim", "numel", "chunk", "split", "unbind",
    "narrow", "expand", "expand_as", "repeat", "clone", "to", "float", "double", "half", "bfloat16",
    "type", "type_as", "cpu", "cuda", "movedim", "flip", "roll", "__getitem__", "detach",
    "amax", "max",  # global max pooling written as a reduction: winner-takes-all, as max pooling
}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_",
                 "clamp_min", "clamp_min_", "clip", "clip_", "softmax", "log_softmax", "neg",
                 "neg_", "__neg__"}
_PROPORTIONAL_METHODS = {"mean", "sum"}
_ARITHMETIC_METHODS: dict[str, type[OpRule]] = {
    "add": Sum, "add_": Sum, "__add__": Sum, "__radd__": Sum, "__iadd__": Sum,
    "sub": Difference, "sub_": Difference, "__sub__": Difference, "__isub__": Difference,
    "__rsub__": ReversedDifference,
    "mul": Product, "mul_": Product, "__mul__": Product, "__rmul__": Product, "__imul__": Product,
    "div": Product, "div_": Product, "__truediv__": Product, "__itruediv__": Product,
    "__rtruediv__": Product,
    "matmul": MatMul, "__matmul__": MatMul, "__rmatmul__": MatMul, "mm": MatMul, "bmm": MatMul,
}
METHOD_RULES: dict[str, type[OpRule]] = {
    **{m: Gradient for m in _GRADIENT_METHODS}, **{m: Pass for m in _PASS_METHODS},
    **{m: Proportional for m in _PROPORTIONAL_METHODS}, **_ARITHMETIC_METHODS,
}
NONNEG_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "softmax"}


def method_rule(name: str) -> type[OpRule]:
    return METHOD_RULES.get(name, NoRule)


def is_inplace_method(name: str) -> bool:
    return (name.endswith("_") and not name.endswith("__")) or (
        name.startswith("__i") and name.endswith("__"))


def method_function(name: str) -> Callable:
    """The out-of-place Tensor method for a method name as a function (``relu_`` ->
    ``Tensor.relu``); a name that Tensor does not have is looked up on the object."""
    if not hasattr(torch.Tensor, name):
        return lambda self_, *a, **k: getattr(self_, name)(*a, **k)
    if name.startswith("__i") and name.endswith("__"):
        name = "__" + name[3:]
    elif name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    return getattr(torch.Tensor, name)


def mode_methods() -> dict[Callable, str]:
    """The Tensor method objects that a TorchFunctionMode receives, with their names: those with
    a rule other than the gradient (the gradient needs nothing at run time)."""
    return {getattr(torch.Tensor, name): name for name, rule in METHOD_RULES.items()
            if rule is not Gradient and hasattr(torch.Tensor, name)}
