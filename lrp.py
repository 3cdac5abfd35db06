"""Layer-wise relevance propagation (LRP) engine of HUDD.

Relevance of every selected layer comes from ONE batched forward pass and ONE modified backward pass
over the model's real graph (skip connections and BatchNorm included), on CPU or CUDA.

Public API
----------
``relevance(model, inputs, target=None, rules="hudd", layers=None) -> dict[str, Tensor]``
    Convenience wrapper: prepares an :class:`LRPExplainer` and explains one batch. Returns
    ``{module path: relevance at that module's OUTPUT, ..., "input": relevance at the input}``,
    each tensor detached, batch dimension first, on the device of ``inputs``.
``LRPExplainer(model, rules="hudd", layers=None, *, epsilon=1e-6, module_rules=None)``
    Prepares the model ONCE (a private, canonised copy) and then explains many batches cheaply:
    ``explainer(inputs, target=None) -> dict``. Use it to heatmap thousands of images.
``default_layers(model, example_input=None) -> list[tuple[str, str]]``
    ``(alias, module path)`` for every Conv/ConvTranspose (1d/2d/3d), Linear and pooling (max, avg,
    adaptive) module in execution order, aliased ``Layer1``, ``Layer2``, ...; the last layer whose
    output IS the model output is left out (its relevance is just the seed). The input relevance is
    not in this list: it is always returned under the key ``"input"``.
``RULE_PRESETS``: preset name -> one-line description.

Targets (the seed)
------------------
The backward pass starts from ``seed = one_hot(target) * output`` (the raw output value, no
softmax; it may be negative). ``target`` is ``None`` (the predicted class: argmax over dim 1 of a
``(batch, classes)`` output), an ``int``, a 1-D integer tensor of per-sample class indices (for an
N-d output such as keypoint heatmaps, an index selects that channel at every position), or a float
tensor of the output's shape used as a mask (``seed = mask * output``, for regression models).

Rule presets
------------
``hudd``
    The original tool's rules (hudd-reference.md section 6.4) without its accidents: LRP-z+
    (alpha1-beta0) on Linear layers with the bias ignored; the z-rule on convolutions, as the
    epsilon rule with a tiny sign-aware stabiliser (1e-6), computed from the PRE-activation output
    z of the convolution (bias included). The original stored each conv output after its in-place
    ReLU had overwritten it, so its conv rule divided by the POST-ReLU output by accident; this
    engine deliberately does not reproduce that, nor its non-sign-aware 1e-9 stabiliser, nor the
    overwriting of relevance at overlapping max-pool windows. Max pooling is winner-takes-all.
``epsilon``
    LRP-epsilon (epsilon=1e-6) on every convolution and linear layer.
``epsilon-plus``
    LRP-epsilon on linear layers, LRP-z+ on convolutions, as zennit's ``EpsilonPlus`` composite.

Common to every preset, and zennit's choices, so that results are comparable with zennit:
stabilisers are zennit's defaults (epsilon 1e-6 added with the sign of the denominator, 0 counted
as positive; 1e-6 for z+); z+ is the general alpha1-beta0 form that also handles negative inputs
(``z = W+ x+ + W- x- (+ b+)``), so the first layer's normalised, signed pixels are treated as in
zennit; BatchNorm is merged into the preceding conv/linear layer; a residual addition ``a + b``
splits relevance in proportion to each operand's contribution (``R_a = a * R / (a + b)``,
stabilised), like zennit's ``Sum`` module with its ``Norm`` rule; element-wise activations (ReLU,
...), dropout and identity pass relevance through unchanged; max pooling is winner-takes-all with
overlapping windows ADDING (autograd's max-pool backward); average pooling (also adaptive)
distributes relevance in proportion to the inputs (epsilon rule on the pooling op, zennit's
``Norm``); flatten, view, reshape, cat, indexing and padding route relevance by their ordinary
gradient.

Deliberate differences from zennit (each covered by tests/test_lrp.py)
----------------------------------------------------------------------
zennit hooks modules only, so for operations written as functions it uses the plain gradient. This
engine traces the model with torch.fx and applies the rules to functions too:

* ``a + b`` / ``torch.add`` / ``a - b`` of two input-dependent tensors (a residual written inline,
  e.g. torchvision's ``out += identity``) -> proportional split (zennit needs a canoniser);
* ``F.relu`` & co. -> pass-through; ``F.avg_pool2d``, ``x.mean(...)``, ``F.interpolate`` ->
  proportional (epsilon on the op); ``F.linear`` / ``F.conv*d`` -> the preset's linear/conv rule;
* arithmetic of an input-dependent tensor with a constant (``x * 0.5``, ``(x - mean) / std``
  inside the model) -> pass-through (zennit: the gradient, which rescales relevance);
* ``F.dropout(x, p)`` with ``training`` hard-coded True -> identity (eval semantics);
* normalisation layers that cannot be merged (BatchNorm not preceded by a conv/linear layer,
  LayerNorm, GroupNorm, InstanceNorm, LocalResponseNorm) -> pass-through (zennit: ``Pass`` for
  BatchNorm, the gradient for the others);
* BatchNorm is merged only where the graph shows that it consumes that conv/linear layer's output
  (zennit's SequentialMergeBatchNorm goes by module registration order), and the merge is exact:
  zennit's merged BatchNorm keeps its eps, so its canonised model is off by (1+eps)^-1/2 per BN.

Operations with no rule raise a ``ValueError`` naming the module or operation: a product of two
input-dependent tensors (gating, attention), recurrent layers, ``nn.Bilinear``, embeddings, ...
Custom types can be given a rule: ``module_rules={MyModule: "pass" | "gradient" | "proportional"}``.

How it computes, and why it is cheap
------------------------------------
Every conv/linear layer of the private copy is replaced by a module whose output comes from a custom
``torch.autograd.Function``: its backward receives the relevance at the layer output and returns
the relevance at its input directly (``R_in = x * W^T (R_out / stabilise(z))`` for epsilon; z+
needs one extra forward with the clamped weights), so autograd never runs the layer's ordinary
backward, and the copy's parameters have ``requires_grad`` off (no weight gradients). Activations
get an identity backward. The relevance at a layer's output is the gradient arriving at that output
tensor: the traced graph returns the captured outputs, and ONE ``torch.autograd.grad`` call lists
them and the input (no hooks). Measured on 2 CPU cores (bench/bench_lrp.py), all-layer relevance
costs about 1.0-1.1x a plain gradient-to-input pass for ``epsilon``, 1.1x for ``hudd`` and 1.4-1.5x
for ``epsilon-plus`` (z+ needs one extra forward per convolution: 1.5x is its arithmetic limit),
about half of zennit's time.

Models that torch.fx cannot trace (data-dependent control flow) fall back to module replacement on
the private copy plus a ``TorchFunctionMode`` that applies the rules to residual additions and
functional activations at run time (a warning says so). In that mode, BatchNorm merging and the
default layers are decided by one probe forward pass on the first batch, unknown functional
operations use their ordinary gradient, and in-place operations whose result is not re-assigned
are not supported (the traced mode handles them).

The user's model is never modified: preparation deep-copies it (without its hooks), puts the copy
in eval mode (dropout off, BatchNorm running statistics) and freezes the copy's parameters; the
model's own parameters, ``requires_grad`` flags, ``training`` flags, in-place flags and hooks are
never touched, even when an exception interrupts a call. An explainer is a snapshot: build a new
one after changing the model's weights. It holds one copy of the weights (two for z+ layers). A
module called several times in one forward pass (a shared ReLU) cannot be a requested layer: its
output relevance would be ambiguous.
"""
from __future__ import annotations

import copy
import operator
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "DEFAULT_EPSILON",
    "RULE_PRESETS",
    "LRPExplainer",
    "default_layers",
    "relevance",
]

DEFAULT_EPSILON = 1e-6  # zennit's default epsilon (Epsilon rule) and stabiliser (z+, Norm)

RULE_PRESETS: dict[str, str] = {
    "hudd": "original HUDD rules: z+ (alpha1-beta0, bias ignored) on Linear, epsilon (1e-6, "
            "pre-activation z) on convolutions, winner-takes-all max pooling",
    "epsilon": "LRP-epsilon (1e-6) on every convolution and linear layer",
    "epsilon-plus": "LRP-epsilon on linear layers, LRP-z+ on convolutions (zennit EpsilonPlus)",
}

# per preset: rule of convolutions / of linear layers
_PRESET_RULES: dict[str, dict[str, str]] = {
    "hudd": {"conv": "epsilon", "linear": "zplus-nobias"},
    "epsilon": {"conv": "epsilon", "linear": "epsilon"},
    "epsilon-plus": {"conv": "zplus", "linear": "epsilon"},
}
_AFFINE_RULES = ("epsilon", "zplus", "zplus-nobias")

# ------------------------------------------------------------------------------------------------
# module classification
# ------------------------------------------------------------------------------------------------
_CONV_TYPES = (nn.modules.conv._ConvNd,)  # Conv1d/2d/3d and ConvTranspose1d/2d/3d
_LINEAR_TYPES = (nn.Linear,)
_MAXPOOL_TYPES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
_AVGPOOL_TYPES = (nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd)
_POOL_TYPES = _MAXPOOL_TYPES + _AVGPOOL_TYPES
_DEFAULT_LAYER_TYPES = _CONV_TYPES + _LINEAR_TYPES + _POOL_TYPES
_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)
_NORM_TYPES = _BN_TYPES + (
    nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm,
    nn.CrossMapLRN2d,
)
_ACTIVATION_TYPES = (
    nn.ELU, nn.Hardshrink, nn.Hardsigmoid, nn.Hardtanh, nn.Hardswish, nn.LeakyReLU, nn.LogSigmoid,
    nn.PReLU, nn.ReLU, nn.ReLU6, nn.RReLU, nn.SELU, nn.CELU, nn.GELU, nn.Sigmoid, nn.SiLU, nn.Mish,
    nn.Softplus, nn.Softshrink, nn.Softsign, nn.Tanh, nn.Tanhshrink, nn.Threshold, nn.Softmax,
    nn.LogSoftmax, nn.Softmax2d, nn.Softmin,
)
_GRADIENT_TYPES = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd,
    nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
) + _MAXPOOL_TYPES
_PROPORTIONAL_TYPES = _AVGPOOL_TYPES + (nn.Upsample,)
# outputs that are >= 0 whatever the input (lets z+ skip its negative-input half)
_NONNEG_ACTIVATION_TYPES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softmax, nn.Softmax2d,
                            nn.Softplus, nn.Softmin)
_NONNEG_PRESERVING_TYPES = _POOL_TYPES + (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd, nn.Upsample,
    nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
)
_MODULE_RULE_NAMES = {"pass": "pass", "gradient": "grad", "proportional": "prop"}


def _module_kind(module: nn.Module, module_rules: dict) -> str | None:
    """'affine', 'bn', 'pass', 'prop', 'grad' or None (no rule)."""
    for typ, rule in module_rules.items():
        if isinstance(module, typ):
            return _MODULE_RULE_NAMES[rule]
    if isinstance(module, _CONV_TYPES + _LINEAR_TYPES):
        return "affine"
    if isinstance(module, _BN_TYPES):
        return "bn"
    if isinstance(module, _ACTIVATION_TYPES + _NORM_TYPES):
        return "pass"
    if isinstance(module, _PROPORTIONAL_TYPES):
        return "prop"
    if isinstance(module, _GRADIENT_TYPES):
        return "grad"
    return None


def _no_rule_error(path: str, module: nn.Module) -> ValueError:
    return ValueError(
        f"LRP: no relevance rule for module '{path}' ({type(module).__name__}); supported are "
        "convolutions, linear, pooling, BatchNorm (merged), activations, dropout and shape layers; "
        "give the type a rule with module_rules={Type: 'pass'|'gradient'|'proportional'}")


# ------------------------------------------------------------------------------------------------
# functional operations (fx call_function / call_method targets, TorchFunctionMode funcs)
# ------------------------------------------------------------------------------------------------
def _fns(*names: str, mod: Any = F) -> list:
    return [getattr(mod, n) for n in names if hasattr(mod, n)]


_PASS_FUNCS = _fns("relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish",
                   "hardswish", "hardsigmoid", "hardtanh", "softplus", "softsign", "tanh",
                   "sigmoid", "logsigmoid", "softmax", "log_softmax", "softmin", "threshold",
                   "rrelu", "tanhshrink", "softshrink", "hardshrink") + _fns(
    "relu", "sigmoid", "tanh", "softmax", "log_softmax", "clamp", "clip", "clamp_min", "neg",
    mod=torch) + [operator.neg]
_INPLACE_FUNCS = {  # in-place functional variant -> out-of-place one
    getattr(F, n + "_"): getattr(F, n)
    for n in ("relu", "leaky_relu", "elu", "hardtanh", "threshold", "rrelu", "celu", "selu")
    if hasattr(F, n + "_")}
_INPLACE_FUNCS.update({getattr(torch, n + "_"): getattr(torch, n)
                       for n in ("relu", "sigmoid", "tanh", "clamp", "clamp_min", "neg")
                       if hasattr(torch, n + "_")})
_IDENTITY_FUNCS = _fns("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                       "feature_alpha_dropout") + _fns("dropout", "alpha_dropout",
                                                       "feature_dropout", mod=torch)
_PROP_FUNCS = _fns("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
                   "adaptive_avg_pool2d", "adaptive_avg_pool3d", "interpolate", "upsample",
                   "upsample_nearest", "upsample_bilinear") + _fns(
    "mean", "sum", "avg_pool1d", "adaptive_avg_pool1d", mod=torch)
_GRAD_FUNCS = _fns("max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices",
                   "max_pool2d_with_indices", "max_pool3d_with_indices", "adaptive_max_pool1d",
                   "adaptive_max_pool2d", "adaptive_max_pool3d", "pad", "pixel_shuffle",
                   "pixel_unshuffle", "channel_shuffle") + _fns(
    "flatten", "reshape", "cat", "concat", "concatenate", "stack", "squeeze", "unsqueeze",
    "transpose", "permute", "split", "chunk", "narrow", "movedim", "swapaxes", "swapdims", "t",
    "unbind", "clone", "roll", "flip", "max_pool1d", "max_pool2d", "max_pool3d", "unflatten",
    "hstack", "vstack", mod=torch) + [operator.getitem, getattr, operator.pos]
_ARITH_FUNCS = {
    operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.isub: "sub",
    operator.mul: "mul", operator.imul: "mul", operator.truediv: "div", operator.itruediv: "div",
    operator.matmul: "matmul", torch.add: "add", torch.sub: "sub", torch.subtract: "sub",
    torch.mul: "mul", torch.multiply: "mul", torch.div: "div", torch.divide: "div",
    torch.true_divide: "div", torch.matmul: "matmul", torch.mm: "matmul", torch.bmm: "matmul",
}
_AFFINE_FUNCS = {F.linear: "linear", F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv",
                 F.conv_transpose1d: "convT", F.conv_transpose2d: "convT",
                 F.conv_transpose3d: "convT"}
_NONNEG_FUNCS = set(_fns("relu", "relu6", "sigmoid", "hardsigmoid", "softmax", "softplus",
                         "softmin") + _fns("relu", "sigmoid", "softmax", mod=torch))

_FUNC_KINDS: dict[Any, str] = {}
for _f in _PASS_FUNCS:
    _FUNC_KINDS[_f] = "pass"
for _f in _INPLACE_FUNCS:
    _FUNC_KINDS[_f] = "pass"
for _f in _IDENTITY_FUNCS:
    _FUNC_KINDS[_f] = "identity"
for _f in _PROP_FUNCS:
    _FUNC_KINDS[_f] = "prop"
for _f in _GRAD_FUNCS:
    _FUNC_KINDS[_f] = "grad"
for _f, _k in _ARITH_FUNCS.items():
    _FUNC_KINDS[_f] = _k
for _f in _AFFINE_FUNCS:
    _FUNC_KINDS[_f] = "affine"

_GRAD_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "t",
    "squeeze", "unsqueeze", "contiguous", "size", "dim", "numel", "chunk", "split", "unbind",
    "narrow", "expand", "expand_as", "repeat", "clone", "to", "float", "double", "half", "bfloat16",
    "type", "type_as", "cpu", "cuda", "movedim", "flip", "roll", "__getitem__", "detach", "dim",
}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_",
                 "clamp_min", "clamp_min_", "clip", "clip_", "softmax", "log_softmax", "neg",
                 "neg_", "__neg__"}
_PROP_METHODS = {"mean", "sum"}
_ARITH_METHODS = {
    "add": "add", "add_": "add", "__add__": "add", "__radd__": "add", "__iadd__": "add",
    "sub": "sub", "sub_": "sub", "__sub__": "sub", "__isub__": "sub", "__rsub__": "rsub",
    "mul": "mul", "mul_": "mul", "__mul__": "mul", "__rmul__": "mul", "__imul__": "mul",
    "div": "div", "div_": "div", "__truediv__": "div", "__itruediv__": "div",
    "__rtruediv__": "div", "matmul": "matmul", "__matmul__": "matmul", "__rmatmul__": "rmatmul",
    "mm": "matmul", "bmm": "matmul",
}
_NONNEG_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "softmax"}


def _method_kind(name: str) -> str:
    if name in _GRAD_METHODS:
        return "grad"
    if name in _PASS_METHODS:
        return "pass"
    if name in _PROP_METHODS:
        return "prop"
    if name in _ARITH_METHODS:
        return _ARITH_METHODS[name]
    return "guard"


def _out_of_place_method(name: str) -> Callable:
    """The out-of-place Tensor method for a method name (``relu_`` -> ``Tensor.relu``)."""
    if name.startswith("__i") and name.endswith("__"):
        name = "__" + name[3:]
    elif name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    return getattr(torch.Tensor, name)


def _is_inplace_method(name: str) -> bool:
    return (name.endswith("_") and not name.endswith("__")) or (
        name.startswith("__i") and name.endswith("__"))


# the same tables keyed by the function objects a TorchFunctionMode receives
_MODE_KINDS: dict[Any, tuple[str, Callable]] = {}
for _f, _k in _FUNC_KINDS.items():
    _MODE_KINDS[_f] = (_k, _INPLACE_FUNCS.get(_f, _f))
for _name in _PASS_METHODS | _PROP_METHODS | set(_ARITH_METHODS):
    if hasattr(torch.Tensor, _name):
        _MODE_KINDS[getattr(torch.Tensor, _name)] = (_method_kind(_name),
                                                      _out_of_place_method(_name))


# ------------------------------------------------------------------------------------------------
# the rules as autograd Functions
# ------------------------------------------------------------------------------------------------
_EPS_CACHE: dict[tuple, torch.Tensor] = {}


def _stabilise(z: torch.Tensor, eps: float) -> torch.Tensor:
    """zennit's stabiliser as a new tensor: z + eps * sign(z), with sign(0) = +1.

    Two element-wise passes: copysign(eps, z) + z (the same rounding as z +/- eps; torch.where
    with scalars is ~5x slower on CPU). Only -0.0 gets -eps instead of +eps, which cannot change
    any relevance: z = -0.0 needs every term x_i * w_ij (every operand, for a sum or a pool) to be
    a signed zero, and then every R_in = x_i * w_ij * R / stabilise(z) is zero whatever the sign.
    """
    key = (eps, z.dtype, z.device)
    e = _EPS_CACHE.get(key)
    if e is None:
        e = _EPS_CACHE[key] = torch.tensor(eps, dtype=z.dtype, device=z.device)
    return torch.copysign(e, z).add_(z)


def _ratio(rel: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    """rel / stabilise(z), computed with one temporary."""
    den = _stabilise(z, eps)
    if rel.shape != den.shape or rel.dtype != den.dtype:
        return rel / den
    return torch.div(rel, den, out=den)


@dataclass
class _Spec:
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


class _AffineParams:
    """Weights of one conv/linear layer for its rule, with the z+ weights derived once."""

    def __init__(self, spec: _Spec, weight: torch.Tensor, bias: torch.Tensor | None, rule: str,
                 eps: float, nonneg: bool = False):
        self.spec, self.rule, self.eps, self.nonneg = spec, rule, eps, nonneg
        self.weight, self.bias = weight, bias
        self._wn = self._wpn = None  # made on first use: only layers with signed inputs need them
        self.wp = self.bp = None
        if rule in ("zplus", "zplus-nobias"):
            self.wp = weight.clamp(min=0)
            # zennit's z+ keeps the positive part of the bias; the hudd preset ignores the bias
            if bias is not None and rule == "zplus":
                self.bp = bias.clamp(min=0)

    @property
    def wn(self) -> torch.Tensor:
        """min(W, 0)."""
        if self._wn is None or self._wn.device != self.weight.device:
            self._wn = self.weight.clamp(max=0)
        return self._wn

    @property
    def wpn(self) -> torch.Tensor | None:
        """[W+, W-] over the stacked input [x+, x-] (one op for both halves); None if grouped."""
        if self.spec.groups != 1:
            return None
        if self._wpn is None or self._wpn.device != self.weight.device:
            self._wpn = torch.cat([self.wp, self.wn], dim=self.spec.weight_in_dim)
            self._wn = None
        return self._wpn


class _AffineRule(torch.autograd.Function):
    """Conv/linear layer whose backward maps output relevance to input relevance directly:
    epsilon: R_in = x * W^T (R / stab(z));  z+: R_in = x+ * W+^T S + x- * W-^T S,
    S = R / stab(W+ x+ + W- x- + b+). The layer's ordinary backward never runs."""

    @staticmethod
    def forward(ctx, x, p: _AffineParams):
        spec = p.spec
        z = spec.forward(x, p.weight, p.bias)
        ctx.p = p
        if p.rule == "epsilon":
            ctx.save_for_backward(x, z)
            ctx.mode = "eps"
            return z
        if p.nonneg or not bool((x < 0).any()):  # only the positive half contributes
            ctx.zp = spec.forward(x, p.wp, p.bp)
            ctx.save_for_backward(x)
            ctx.mode = "pos"
        elif spec.groups == 1:
            d, c = spec.channel_dim, x.shape[spec.channel_dim]
            shape = list(x.shape)
            shape[d] = 2 * c
            xs = x.new_empty(shape)  # [x+, x-] along the channels, written in place
            torch.clamp(x, min=0, out=xs.narrow(d, 0, c))
            torch.clamp(x, max=0, out=xs.narrow(d, c, c))
            ctx.zp = spec.forward(xs, p.wpn, p.bp)
            ctx.xs = xs
            ctx.mode = "stacked"
        else:
            xp, xn = x.clamp(min=0), x.clamp(max=0)
            zp = spec.forward(xp, p.wp, p.bp)
            zp += spec.forward(xn, p.wn, None)
            ctx.zp, ctx.xp, ctx.xn = zp, xp, xn
            ctx.mode = "split"
        return z

    @staticmethod
    def backward(ctx, rel):
        p, spec, mode = ctx.p, ctx.p.spec, ctx.mode
        if mode == "eps":
            x, z = ctx.saved_tensors
            s = _ratio(rel, z, p.eps)
            return spec.input_grad(s, x, p.weight).mul_(x), None
        s = _ratio(rel, ctx.zp, p.eps)
        ctx.zp = None
        if mode == "pos":
            (x,) = ctx.saved_tensors
            return spec.input_grad(s, x, p.wp).mul_(x), None
        if mode == "stacked":
            xs = ctx.xs
            ctx.xs = None
            r = spec.input_grad(s, xs, p.wpn).mul_(xs)
            half = xs.shape[spec.channel_dim] // 2
            return r.narrow(spec.channel_dim, 0, half) + r.narrow(spec.channel_dim, half, half), \
                None
        xp, xn = ctx.xp, ctx.xn
        ctx.xp = ctx.xn = None
        r = spec.input_grad(s, xp, p.wp).mul_(xp)
        r += spec.input_grad(s, xn, p.wn).mul_(xn)
        return r, None


class _PassRule(torch.autograd.Function):
    """Element-wise op with identity backward: relevance passes through unchanged."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.shape = x.shape
        y = fn(x)
        return y.clone() if y is x else y

    @staticmethod
    def backward(ctx, rel):
        if rel.shape != ctx.shape:
            rel = rel.sum_to_size(ctx.shape)
        return rel, None


class _PropRule(torch.autograd.Function):
    """Linear op without bias (average pooling, mean, upsampling, ...): epsilon rule on the op,
    i.e. relevance distributed in proportion to each input's contribution (zennit's Norm)."""

    @staticmethod
    def forward(ctx, x, fn, eps):
        z = fn(x)
        ctx.fn, ctx.eps = fn, eps
        ctx.save_for_backward(x, z)
        return z

    @staticmethod
    def backward(ctx, rel):
        x, z = ctx.saved_tensors
        s = _ratio(rel, z, ctx.eps)
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            (c,) = torch.autograd.grad(ctx.fn(xd), xd, s)
        return c.mul_(x), None, None


class _SumRule(torch.autograd.Function):
    """z = c_a * a + c_b * b of two input-dependent tensors: R_a = c_a * a * R / stabilise(z)."""

    @staticmethod
    def forward(ctx, a, b, ca, cb, eps):
        z = a * ca if ca != 1 else a
        z = z + b * cb if cb != 1 else z + b
        ctx.coef, ctx.eps = (ca, cb), eps
        ctx.save_for_backward(a, b, z)
        return z

    @staticmethod
    def backward(ctx, rel):
        a, b, z = ctx.saved_tensors
        s = _ratio(rel, z, ctx.eps)
        out = []
        for t, c, need in zip((a, b), ctx.coef, ctx.needs_input_grad[:2]):
            if not need:
                out.append(None)
                continue
            r = t * s
            if c != 1:
                r = r * c
            out.append(r.sum_to_size(t.shape) if r.shape != t.shape else r)
        return out[0], out[1], None, None, None


# ------------------------------------------------------------------------------------------------
# applying a rule to one call
# ------------------------------------------------------------------------------------------------
def _traced(a: Any) -> bool:
    """True for a tensor that depends on the input (the private copy's parameters are frozen)."""
    return isinstance(a, torch.Tensor) and a.requires_grad


def _any_traced(args: Iterable, kwargs: dict | None = None) -> bool:
    def walk(v):
        if isinstance(v, (list, tuple)):
            return any(walk(e) for e in v)
        if isinstance(v, dict):
            return any(walk(e) for e in v.values())
        return _traced(v)
    return walk(list(args)) or walk(dict(kwargs or {}))


def _no_inplace(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Drop in-place flags of an activation call (a positional ``True`` is its ``inplace``)."""
    args = tuple(False if a is True else a for a in args)
    if kwargs.get("inplace"):
        kwargs = dict(kwargs, inplace=False)
    return args, kwargs


def _conv_padding(padding, kernel, dilation, ndim):
    """(explicit symmetric padding, F.pad argument or None) for int/tuple/'same'/'valid' padding."""
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


def _tup(v, n):
    return (v,) * n if isinstance(v, int) else tuple(v)


def _functional_affine(which: str, fn, args, kwargs, rules: dict, eps: float):
    """F.linear / F.conv*d / F.conv_transpose*d called as functions."""
    names = {"linear": ("input", "weight", "bias"),
             "conv": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
             "convT": ("input", "weight", "bias", "stride", "padding", "output_padding", "groups",
                       "dilation")}[which]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    x, w, b = bound["input"], bound["weight"], bound.get("bias")
    if _traced(w) or _traced(b):
        raise ValueError(f"LRP: no relevance rule for {getattr(fn, '__name__', fn)} with "
                         "input-dependent weights")
    if not _traced(x):
        return fn(*args, **kwargs)
    if which == "linear":
        spec = _Spec("linear")
        rule = rules["linear"]
    else:
        n = w.dim() - 2
        dil = _tup(bound.get("dilation", 1), n)
        pad, pre = (_conv_padding(bound.get("padding", 0), w.shape[2:], dil, n) if which == "conv"
                    else (_tup(bound.get("padding", 0), n), None))
        if pre is not None:
            x = F.pad(x, pre)
        spec = _Spec("conv", _tup(bound.get("stride", 1), n), pad, dil, which == "convT",
                     _tup(bound.get("output_padding", 0), n), int(bound.get("groups", 1)))
        rule = rules["conv"]
    return _AffineRule.apply(x, _AffineParams(spec, w, b, rule, eps))


def _apply_op_rule(kind: str, fn: Callable, name: str, args: tuple, kwargs: dict,
                   rules: dict, eps: float):
    """Run ``fn(*args, **kwargs)`` with the LRP rule of ``kind`` attached to its backward."""
    if not torch.is_grad_enabled() or not _any_traced(args, kwargs):
        if kind == "pass":
            args, kwargs = _no_inplace(args, kwargs)
        if kind == "identity":
            return args[0] if args else kwargs["input"]
        return fn(*args, **kwargs)
    if kind == "grad":
        return fn(*args, **kwargs)
    if kind == "affine":
        return _functional_affine(_AFFINE_FUNCS[fn], fn, args, kwargs, rules, eps)
    if kind == "identity":
        return args[0] if args else kwargs["input"]
    if kind in ("pass", "prop"):
        args, kwargs = _no_inplace(args, kwargs) if kind == "pass" else (args, kwargs)
        x, rest = args[0], args[1:]
        if not _traced(x) or _any_traced(rest, kwargs):
            raise ValueError(f"LRP: no relevance rule for '{name}' with input-dependent "
                             "arguments other than its first")
        call = (lambda t: fn(t, *rest, **kwargs))
        if kind == "pass":
            return _PassRule.apply(x, call)
        return _PropRule.apply(x, call, eps)
    if kind in ("add", "sub", "rsub", "mul", "div", "matmul", "rmatmul"):
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        kw = {k: v for k, v in kwargs.items() if k != "other"}
        ta, tb = _traced(a), _traced(b)
        if ta and tb:
            if kind in ("add", "sub", "rsub"):
                alpha = kw.pop("alpha", 1)
                if kw:
                    raise ValueError(f"LRP: unsupported arguments {sorted(kw)} of '{name}'")
                ca, cb = {"add": (1, alpha), "sub": (1, -alpha), "rsub": (-alpha, 1)}[kind]
                return _SumRule.apply(a, b, ca, cb, eps)
            raise ValueError(
                f"LRP: no relevance rule for '{name}' of two input-dependent tensors (a product "
                "such as gating or attention); give the enclosing module a rule with module_rules")
        if kind in ("matmul", "rmatmul"):  # linear map by a constant: epsilon rule without bias
            if ta:
                return _PropRule.apply(a, lambda t: fn(t, b, **kw), eps)
            return _PropRule.apply(b, lambda t: fn(a, t, **kw), eps)
        # arithmetic with a constant: pass-through (e.g. x * 0.5, (x - mean) / std)
        if ta:
            return _PassRule.apply(a, lambda t: fn(t, b, **kw))
        return _PassRule.apply(b, lambda t: fn(a, t, **kw))
    # "guard": an operation without a rule
    raise ValueError(f"LRP: no relevance rule for operation '{name}' on input-dependent tensors")


class _OpRule(nn.Module):
    """Stands in for a functional call (fx node) or a pass/prop module, applying its rule."""

    def __init__(self, kind: str, fn: Callable, name: str, rules: dict, eps: float,
                 module: nn.Module | None = None):
        super().__init__()
        self.kind, self.op_name, self.rules, self.eps = kind, name, rules, eps
        self.fn = None if module is not None else fn
        self.module = module  # registered so that .to(device) moves its buffers

    def forward(self, *args, **kwargs):
        fn = self.module if self.module is not None else self.fn
        return _apply_op_rule(self.kind, fn, self.op_name, args, kwargs, self.rules, self.eps)


class _AffineLayer(nn.Module):
    """A conv/linear layer of the private copy (BatchNorm already merged) with its LRP rule."""

    def __init__(self, module: nn.Module, weight, bias, rule: str, eps: float, nonneg: bool):
        super().__init__()
        if isinstance(module, nn.Linear):
            self.spec, self.pre_pad, self.pad_mode = _Spec("linear"), None, "constant"
        else:
            n = len(module.kernel_size)
            transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
            pad, pre = _conv_padding(module.padding, module.kernel_size, module.dilation, n)
            mode = "constant"
            if module.padding_mode != "zeros":
                pre, pad, mode = list(module._reversed_padding_repeated_twice), (0,) * n, \
                    module.padding_mode
            self.spec = _Spec("conv", tuple(module.stride), pad, tuple(module.dilation), transposed,
                              tuple(module.output_padding) if transposed else (0,) * n,
                              module.groups)
            self.pre_pad, self.pad_mode = pre, mode
        self.rule = rule
        # derived weights are prepared here, once, and follow the module in .to(device)
        # the weights belong to the private copy: no clone needed
        self.params = _AffineParams(self.spec, weight.detach(),
                                    None if bias is None else bias.detach(), rule, eps, nonneg)

    def _apply(self, fn, *args, **kwargs):
        p = self.params
        for k in ("weight", "bias", "wp", "bp"):
            v = getattr(p, k)
            if v is not None:
                setattr(p, k, fn(v))
        p._wn = p._wpn = None
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x):
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad, mode=self.pad_mode)
        return _AffineRule.apply(x, self.params)

    def extra_repr(self) -> str:
        return f"rule={self.rule}, spec={self.spec}"


def _merge_bn(module: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(module(x))`` as one conv/linear layer (BN in eval mode)."""
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
        g = module.groups
        shape = w.shape
        w = (w.reshape(g, shape[0] // g, shape[1], *shape[2:])
             * scale.reshape(g, 1, shape[1], *([1] * (w.dim() - 2)))).reshape(shape)
    else:
        w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    return w, b * scale + shift


def _can_merge(module: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(module, _CONV_TYPES + _LINEAR_TYPES) or not isinstance(bn, _BN_TYPES):
        return False
    if bn.running_mean is None or bn.running_var is None:
        return False  # no running statistics: BN uses batch statistics even in eval mode
    out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    return out == bn.num_features


# ------------------------------------------------------------------------------------------------
# the private copy
# ------------------------------------------------------------------------------------------------
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _private_copy(model: nn.Module) -> tuple[nn.Module, set[str]]:
    """Deep copy without the model's hooks (and without copying them), in eval mode, frozen, its
    in-place activations made out-of-place; also the paths of the modules that were in-place."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for attr in _HOOK_DICTS:
            d = m.__dict__.get(attr)
            if isinstance(d, dict):
                memo[id(d)] = type(d)()
    try:
        net = copy.deepcopy(model, memo)
    except Exception as err:  # noqa: BLE001
        raise RuntimeError(f"LRP: cannot make a private copy of the model: {err}") from err
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
        p.grad = None
    inplace = set()
    for path, m in net.named_modules():  # in-place ops would overwrite tensors the rules keep
        if getattr(m, "inplace", False) is True:
            m.inplace = False
            inplace.add(path)
    return net, inplace


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


class _Tracer(fx.Tracer):
    """fx tracer recording the output node of every module call (leaves and containers)."""

    def __init__(self, extra_leaves: tuple = ()):
        super().__init__()
        self.extra_leaves = extra_leaves
        self.module_nodes: dict[str, list[fx.Node]] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.extra_leaves and isinstance(m, self.extra_leaves):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        path = self.path_of_module(m)
        if isinstance(out, fx.Proxy):
            self.module_nodes.setdefault(path, []).append(out.node)
        else:  # a container returning a tuple/dict: not capturable
            self.module_nodes.setdefault(path, []).append(None)
        return out


def _trace(net: nn.Module, extra_leaves: tuple = ()):
    tracer = _Tracer(extra_leaves)
    graph = tracer.trace(net)
    return fx.GraphModule(tracer.root, graph), tracer.module_nodes


def _output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def _graph_default_layers(gm: fx.GraphModule, module_nodes: dict) -> list[str]:
    """Default layer paths in execution order from a traced (not yet canonised) graph."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out_arg = _output_node(gm.graph).args[0]
    # the node whose value is returned, seen through BatchNorm/identity/dropout (merged away or
    # identity in eval mode)
    final = out_arg if isinstance(out_arg, fx.Node) else None
    see_through = _BN_TYPES + (nn.Identity, nn.modules.dropout._DropoutNd)
    while final is not None and final.op == "call_module" and isinstance(
            gm.get_submodule(final.target), see_through):
        src = final.args[0] if final.args else None
        final = src if isinstance(src, fx.Node) else None
    firsts = []
    for path, nodes in module_nodes.items():
        leaf = [n for n in nodes if n is not None and n.op == "call_module" and n.target == path]
        if not leaf:
            continue
        if not isinstance(gm.get_submodule(path), _DEFAULT_LAYER_TYPES):
            continue
        if final is not None and final in leaf:
            continue
        firsts.append((order[leaf[0]], path))
    return [p for _, p in sorted(firsts)]


def _infer_example_input(model: nn.Module) -> torch.Tensor:
    first = next((m for m in model.modules() if isinstance(m, _CONV_TYPES + _LINEAR_TYPES)), None)
    param = next(model.parameters(), None)
    dev = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if isinstance(first, nn.Linear):
        return torch.zeros(1, first.in_features, device=dev, dtype=dtype)
    size = getattr(model, "input_size", None)
    if first is None or size is None:
        raise ValueError("LRP: cannot infer an input shape for this model; pass example_input")
    n = len(first.kernel_size)
    size = _tup(size, n) if isinstance(size, int) else tuple(size)[-n:]
    return torch.zeros(1, first.in_channels, *size, device=dev, dtype=dtype)


def default_layers(model: nn.Module, example_input: torch.Tensor | None = None
                   ) -> list[tuple[str, str]]:
    """``(alias, module path)`` of every Conv/ConvTranspose, Linear and pooling module in execution
    order, aliased ``Layer1``, ``Layer2``, ...; the last layer whose output is the model output is
    excluded (its relevance is the seed). Relevance at the input is not listed: :func:`relevance`
    always returns it under the key ``"input"``.

    The order comes from a torch.fx trace (no input needed); if the model cannot be traced, from a
    forward pass with hooks on a private copy, on ``example_input`` or on a zero input inferred from
    the model (``model.input_size`` and the first layer's input channels). The model is not changed.
    """
    try:
        gm, module_nodes = _trace(model)
        paths = _graph_default_layers(gm, module_nodes)
    except Exception:  # noqa: BLE001 - any tracing failure: fall back to a probe pass
        net, _ = _private_copy(model)
        x = example_input if example_input is not None else _infer_example_input(net)
        paths = _probe(net, x[:1]).default_paths
    return [(f"Layer{i + 1}", p) for i, p in enumerate(paths)]


# ------------------------------------------------------------------------------------------------
# fallback: probe forward with hooks (models that torch.fx cannot trace)
# ------------------------------------------------------------------------------------------------
@dataclass
class _ProbeResult:
    calls: dict  # path -> number of calls
    default_paths: list
    merges: list  # (conv/linear path, bn path)


def _probe(net: nn.Module, x: torch.Tensor) -> _ProbeResult:
    records: list[tuple[str, nn.Module, int, int]] = []
    keep: list = []
    handles = []

    def hook(path):
        def fn(module, inputs, output):
            inp = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            keep.extend([inp, output])
            records.append((path, module, id(inp) if inp is not None else -1,
                            id(output) if isinstance(output, torch.Tensor) else -2))
        return fn

    try:
        for path, m in net.named_modules():
            if path:
                handles.append(m.register_forward_hook(hook(path)))
        with torch.no_grad():
            out = net(x)
    finally:
        for h in handles:
            h.remove()
    calls: dict[str, int] = {}
    for path, *_ in records:
        calls[path] = calls.get(path, 0) + 1
    leaves = {p for p, m, *_ in records if not list(m.children())}
    producer = {}
    for path, m, iid, oid in records:
        if path in leaves:
            producer.setdefault(oid, (path, m, iid))
    merges = []
    for path, m, iid, oid in records:
        if path in leaves and isinstance(m, _BN_TYPES) and iid in producer:
            src_path, src, _ = producer[iid]
            if calls[src_path] == 1 and calls[path] == 1 and _can_merge(src, m):
                merges.append((src_path, path))
    # the module producing the model output, seen through BatchNorm/identity/dropout
    final = None
    oid = id(out) if isinstance(out, torch.Tensor) else -3
    while oid in producer:
        final, m, iid = producer[oid]
        if not isinstance(m, _BN_TYPES + (nn.Identity, nn.modules.dropout._DropoutNd)):
            break
        oid = iid
    seen, paths = set(), []
    for path, m, *_ in records:
        if path in leaves and path not in seen and isinstance(m, _DEFAULT_LAYER_TYPES):
            seen.add(path)
            if path != final:
                paths.append(path)
    return _ProbeResult(calls, paths, merges)


class _FallbackMode(TorchFunctionMode):
    """Applies the rules to functional operations at run time (fallback mode only)."""

    def __init__(self, rules: dict, eps: float):
        super().__init__()
        self.rules, self.eps = rules, eps

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.is_grad_enabled():
            try:
                entry = _MODE_KINDS.get(func)
            except TypeError:
                entry = None
            if entry is not None and entry[0] != "grad":
                kind, fn = entry
                return _apply_op_rule(kind, fn, getattr(func, "__name__", str(func)), tuple(args),
                                      kwargs, self.rules, self.eps)
        return func(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# the explainer
# ------------------------------------------------------------------------------------------------
def _resolve_rules(rules) -> tuple[str, dict[str, str]]:
    if isinstance(rules, str):
        if rules not in _PRESET_RULES:
            raise ValueError(f"LRP: unknown rule preset '{rules}'; choose one of "
                             f"{sorted(_PRESET_RULES)}")
        return rules, dict(_PRESET_RULES[rules])
    if isinstance(rules, dict) and set(rules) == {"conv", "linear"} and all(
            v in _AFFINE_RULES for v in rules.values()):
        return "custom", dict(rules)
    raise ValueError("LRP: rules must be a preset name or {'conv': rule, 'linear': rule} with "
                     f"rules from {_AFFINE_RULES}")


def _make_seed(out: torch.Tensor, target) -> torch.Tensor:
    """``one_hot(target) * output`` (or ``mask * output``), detached."""
    y = out.detach()
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        if target.shape != y.shape:
            raise ValueError(f"LRP: a float target is a mask and must have the output's shape "
                             f"{tuple(y.shape)}, got {tuple(target.shape)}")
        return target.to(device=y.device, dtype=y.dtype) * y
    if y.dim() < 2:
        raise ValueError("LRP: class targets need an output of shape (batch, classes, ...); "
                         "pass a float mask of the output's shape instead")
    batch, classes = y.shape[0], y.shape[1]
    if target is None:
        if y.dim() != 2:
            raise ValueError("LRP: target=None (predicted class) needs a (batch, classes) output; "
                             "pass a class/channel index or a float mask")
        idx = y.argmax(dim=1)
    elif isinstance(target, bool) or not isinstance(target, (int, torch.Tensor, list, tuple)):
        raise ValueError("LRP: target must be None, an int, an index tensor or a float mask")
    elif isinstance(target, int):
        if not 0 <= target < classes:
            raise ValueError(f"LRP: target class {target} out of range [0, {classes})")
        idx = torch.full((batch,), target, dtype=torch.long, device=y.device)
    else:
        idx = torch.as_tensor(target, device=y.device)
        if idx.is_floating_point() or idx.dtype == torch.bool:
            raise ValueError("LRP: target must be None, an int, an index tensor or a float mask")
        idx = idx.long().reshape(-1)
        if idx.numel() == 1:
            idx = idx.expand(batch)
        if idx.numel() != batch:
            raise ValueError(f"LRP: target has {idx.numel()} entries for a batch of {batch}")
        if bool(((idx < 0) | (idx >= classes)).any()):
            raise ValueError(f"LRP: target class index out of range [0, {classes})")
    index = idx.reshape(batch, 1, *([1] * (y.dim() - 2))).expand(batch, 1, *y.shape[2:])
    return torch.zeros_like(y).scatter_(1, index, y.gather(1, index))


class LRPExplainer:
    """Prepared LRP explainer: ``LRPExplainer(model, rules)(inputs, target) -> dict``.

    Preparation (once): a private deep copy of ``model`` (eval mode, frozen parameters, no hooks) is
    traced with torch.fx; BatchNorm is merged into the preceding conv/linear layer, residual
    additions and functional activations get explicit rules, and each conv/linear layer is replaced
    by a module applying its LRP rule in a custom autograd backward. Each call then runs one forward
    and one backward pass for the whole batch and all layers.

    Parameters
    ----------
    model: the network (not modified).
    rules: ``"hudd"``, ``"epsilon"``, ``"epsilon-plus"`` (see :data:`RULE_PRESETS`) or
        ``{"conv": r, "linear": r}`` with ``r`` in ``"epsilon"``, ``"zplus"``, ``"zplus-nobias"``.
    layers: module paths whose OUTPUT relevance is returned (any module, containers included, e.g.
        ``"layer1.0"``); ``None`` = :func:`default_layers`. The input relevance is always returned
        under ``"input"``.
    epsilon: the epsilon / stabiliser of every rule (zennit's default 1e-6).
    module_rules: ``{module type: "pass" | "gradient" | "proportional"}`` for custom layer types.
    """

    def __init__(self, model: nn.Module, rules: str | dict = "hudd",
                 layers: Sequence[str] | None = None, *, epsilon: float = DEFAULT_EPSILON,
                 module_rules: dict | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError("LRP: model must be a torch.nn.Module")
        self.preset, self.rules = _resolve_rules(rules)
        self.epsilon = float(epsilon)
        self.module_rules = dict(module_rules or {})
        for typ, rule in self.module_rules.items():
            if rule not in _MODULE_RULE_NAMES:
                raise ValueError(f"LRP: module_rules[{typ}] must be one of "
                                 f"{sorted(_MODULE_RULE_NAMES)}")
        self._requested = None if layers is None else [str(p) for p in layers]
        if self._requested is not None:
            for p in self._requested:
                if p == "input":
                    raise ValueError("LRP: 'input' is always returned; do not list it in layers")
                try:
                    model.get_submodule(p)
                except AttributeError:
                    raise ValueError(f"LRP: the model has no module named '{p}'") from None
        self._net, self._inplace_modules = _private_copy(model)
        self._device = None
        self._ready = False
        try:
            gm, module_nodes = _trace(self._net, tuple(self.module_rules))
        except Exception as err:  # noqa: BLE001 - fx cannot trace it: module-replacement fallback
            self.mode = "hooks"
            self._trace_error = f"{type(err).__name__}: {err}"
            warnings.warn(f"LRP: torch.fx cannot trace {type(model).__name__} "
                          f"({self._trace_error.splitlines()[0][:200]}); falling back to module "
                          "replacement (see the lrp module documentation)", RuntimeWarning,
                          stacklevel=2)
            self.layers = list(self._requested) if self._requested is not None else None
        else:
            self.mode = "fx"
            self._prepare_fx(gm, module_nodes)
            self._net = None  # the graph module holds what it needs; frees replaced layers
            self._ready = True

    # -------------------------------------------------------------- fx preparation
    def _prepare_fx(self, gm: fx.GraphModule, module_nodes: dict) -> None:
        graph = gm.graph
        paths = self._requested if self._requested is not None else _graph_default_layers(
            gm, module_nodes)
        self.layers = list(paths)
        capture: list[fx.Node] = []
        for p in paths:
            nodes = module_nodes.get(p, [])
            if not nodes:
                raise ValueError(f"LRP: module '{p}' is not called in the model's forward pass")
            if len(nodes) > 1:
                raise ValueError(f"LRP: module '{p}' is called {len(nodes)} times in one forward "
                                 "pass, so the relevance at its output is ambiguous")
            if nodes[0] is None:
                raise ValueError(f"LRP: module '{p}' does not return a single tensor")
            capture.append(nodes[0])

        order = {n: i for i, n in enumerate(graph.nodes)}
        calls = {p: len(v) for p, v in module_nodes.items()}

        # 1. in-place operations -> SSA (later users read the op's result), out-of-place rules
        for node in list(graph.nodes):
            inplace = False
            if node.op == "call_method":
                inplace = _is_inplace_method(node.target)
            elif node.op == "call_function":
                inplace = node.target in _INPLACE_FUNCS or bool(node.kwargs.get("inplace")) or \
                    node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv)
            elif node.op == "call_module":
                inplace = node.target in self._inplace_modules
            if inplace and node.args and isinstance(node.args[0], fx.Node):
                src = node.args[0]
                for user in list(src.users):
                    if user is not node and order[user] > order[node]:
                        user.replace_input_with(src, node)

        # 2. BatchNorm merged into the conv/linear layer whose output it consumes
        merged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        remap: dict[fx.Node, fx.Node] = {}
        for node in list(graph.nodes):
            if node.op != "call_module" or not node.args:
                continue
            bn = gm.get_submodule(node.target)
            src = node.args[0]
            if not isinstance(bn, _BN_TYPES) or not isinstance(src, fx.Node) or \
                    src.op != "call_module" or len(src.users) != 1:
                continue
            lin = gm.get_submodule(src.target)
            if calls.get(src.target) != 1 or calls.get(node.target) != 1 or \
                    src.target in merged or not _can_merge(lin, bn):
                continue
            merged[src.target] = _merge_bn(lin, bn)
            node.replace_all_uses_with(src)
            graph.erase_node(node)
            remap[node] = src
        capture = [remap.get(n, n) for n in capture]

        # 3. which tensors are known to be >= 0 (z+ then skips its negative-input half)
        nonneg: dict[fx.Node, bool] = {}

        def first_nodes(n: fx.Node) -> list:
            a = n.args[0] if n.args else None
            if isinstance(a, (list, tuple)):
                return list(a)
            return [a]

        def all_nonneg(items) -> bool:
            return bool(items) and all(isinstance(i, fx.Node) and nonneg.get(i, False)
                                       for i in items)

        for node in graph.nodes:
            val = False
            if node.op == "call_module":
                m = gm.get_submodule(node.target)
                if isinstance(m, _NONNEG_ACTIVATION_TYPES):
                    val = True
                elif isinstance(m, _NONNEG_PRESERVING_TYPES):  # bicubic can overshoot below 0
                    val = all_nonneg(first_nodes(node)) and getattr(m, "mode", "") != "bicubic"
            elif node.op == "call_function":
                t = node.target
                if t in _NONNEG_FUNCS or t in (F.relu_, torch.relu_):
                    val = True
                elif _FUNC_KINDS.get(t) in ("grad", "prop", "identity") and t is not getattr:
                    val = all_nonneg(first_nodes(node))
                    if t is F.pad:  # constant padding with a negative value
                        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0)
                        val = val and (value is None or (isinstance(value, (int, float))
                                                         and value >= 0))
                    if t in (F.interpolate, getattr(F, "upsample", None)):
                        mode = node.kwargs.get("mode", node.args[3] if len(node.args) > 3
                                               else "nearest")
                        val = val and mode != "bicubic"
                elif t in (operator.add, torch.add) and "alpha" not in node.kwargs:
                    val = all_nonneg(node.args[:2])
            elif node.op == "call_method":
                if node.target in _NONNEG_METHODS:
                    val = True
                elif _method_kind(node.target) in ("grad", "prop"):
                    val = all_nonneg(first_nodes(node))
                elif node.target == "add" and "alpha" not in node.kwargs:
                    val = all_nonneg(node.args[:2])
            nonneg[node] = val

        # 4. rules: replace modules and functional calls
        rules, eps = self.rules, self.epsilon
        done: set[str] = set()
        count = 0
        for node in list(graph.nodes):
            if node.op == "call_module":
                path = node.target
                if path in done:
                    continue
                done.add(path)
                m = gm.get_submodule(path)
                kind = _module_kind(m, self.module_rules)
                if kind is None:
                    raise _no_rule_error(path, m)
                if kind == "affine":
                    w, b = merged.get(path, (m.weight, m.bias))
                    rule = rules["linear"] if isinstance(m, nn.Linear) else rules["conv"]
                    users = [n for n in graph.nodes if n.op == "call_module" and n.target == path]
                    nn_ = all(all_nonneg(first_nodes(n)) for n in users)
                    _set_submodule(gm, path, _AffineLayer(m, w, b, rule, eps, nn_))
                elif kind in ("pass", "prop", "bn"):
                    _set_submodule(gm, path, _OpRule("pass" if kind == "bn" else kind, m, path,
                                                     rules, eps, module=m))
            elif node.op in ("call_function", "call_method"):
                if node.op == "call_function":
                    kind = _FUNC_KINDS.get(node.target, "guard")
                    fn = _INPLACE_FUNCS.get(node.target, node.target)
                    if node.target in (operator.iadd, operator.isub, operator.imul,
                                       operator.itruediv):
                        fn = {operator.iadd: operator.add, operator.isub: operator.sub,
                              operator.imul: operator.mul, operator.itruediv: operator.truediv
                              }[node.target]
                    name = getattr(node.target, "__name__", str(node.target))
                else:
                    kind = _method_kind(node.target)
                    fn = (_out_of_place_method(node.target) if hasattr(torch.Tensor, node.target)
                          else None)
                    name = "Tensor." + node.target
                    if fn is None:
                        fn = (lambda meth: (lambda self_, *a, **k: getattr(self_, meth)(*a, **k))
                              )(node.target)
                if kind == "grad":
                    continue
                sub = f"_lrp_op{count}"
                count += 1
                gm.add_submodule(sub, _OpRule(kind, fn, name, rules, eps))
                node.op, node.target = "call_module", sub

        # 5. the graph returns (output, captured layer outputs)
        out_node = _output_node(graph)
        out_node.args = ((out_node.args[0], tuple(capture)),)
        graph.lint()
        gm.recompile()
        self._gm = gm

    # -------------------------------------------------------------- fallback preparation
    def _prepare_hooks(self, x: torch.Tensor) -> None:
        net = self._net
        probe = _probe(net, x[:1])
        if self.layers is None:
            self.layers = list(probe.default_paths)
        for p in self.layers:
            n = probe.calls.get(p, 0)
            if n == 0:
                raise ValueError(f"LRP: module '{p}' is not called in the model's forward pass")
            if n > 1:
                raise ValueError(f"LRP: module '{p}' is called {n} times in one forward pass, so "
                                 "the relevance at its output is ambiguous")
        merged = {}
        identity_bns = set()
        for src, bn in probe.merges:
            merged[src] = _merge_bn(net.get_submodule(src), net.get_submodule(bn))
            identity_bns.add(bn)
        rules, eps = self.rules, self.epsilon
        replaced: list[str] = []
        for path, m in list(net.named_modules()):
            if not path or any(path.startswith(r + ".") for r in replaced):
                continue
            kind = _module_kind(m, self.module_rules)
            if list(m.children()) and not any(isinstance(m, t) for t in self.module_rules):
                continue
            replaced.append(path)
            if path in identity_bns:
                _set_submodule(net, path, nn.Identity())
            elif kind is None:
                if type(m).__module__.startswith("torch."):
                    raise _no_rule_error(path, m)
                # a custom leaf: its functional operations get rules via the function mode
            elif kind == "affine":
                w, b = merged.get(path, (m.weight, m.bias))
                rule = rules["linear"] if isinstance(m, nn.Linear) else rules["conv"]
                _set_submodule(net, path, _AffineLayer(m, w, b, rule, eps, False))
            elif kind in ("pass", "prop", "bn"):
                _set_submodule(net, path, _OpRule("pass" if kind == "bn" else kind, m, path,
                                                  rules, eps, module=m))
        self._store: dict[str, Any] = {}
        for p in self.layers:
            net.get_submodule(p).register_forward_hook(self._make_store_hook(p))

    def _make_store_hook(self, path: str):
        def fn(module, inputs, output):
            self._store[path] = output
        return fn

    # -------------------------------------------------------------- running
    def _forward(self, x: torch.Tensor):
        if self.mode == "fx":
            out, caps = self._gm(x)
            return out, list(caps)
        self._store = {}
        with _FallbackMode(self.rules, self.epsilon):
            out = self._net(x)
        caps = [self._store.get(p) for p in self.layers]
        self._store = {}
        return out, caps

    def _module(self) -> nn.Module:
        return self._gm if self.mode == "fx" else self._net

    def __call__(self, inputs: torch.Tensor, target=None, input_relevance: bool = True
                 ) -> dict[str, torch.Tensor]:
        """Relevance of every selected layer's output and of the input for one batch.

        Returns ``{layer path: tensor, ..., "input": tensor}``; each tensor has the shape of that
        layer's output (batch first), is detached and lives on the device of ``inputs``. With
        ``input_relevance=False`` the backward pass stops at the deepest point it needs for the
        selected layers (autograd runs only the part of the graph above them) and ``"input"`` is
        left out: the assignment step needs one layer's relevance only.
        """
        if not isinstance(inputs, torch.Tensor):
            raise TypeError("LRP: inputs must be a tensor (batch first)")
        if not inputs.is_floating_point():
            raise TypeError(f"LRP: inputs must be floating point, got {inputs.dtype}")
        if self._device != inputs.device:
            self._module().to(inputs.device)
            self._device = inputs.device
        x = inputs.detach()
        if x.is_inference():
            x = x.clone()
        x = x.requires_grad_(True)
        with torch.enable_grad():
            if not self._ready:
                self._prepare_hooks(x.detach())
                self._ready = True
            out, caps = self._forward(x)
            if not isinstance(out, torch.Tensor):
                raise ValueError("LRP: the model must return a single tensor, got "
                                 f"{type(out).__name__}")
            for p, c in zip(self.layers, caps):
                if not isinstance(c, torch.Tensor):
                    raise ValueError(f"LRP: module '{p}' does not return a single tensor")
            seed = _make_seed(out, target)
            wrt: list[torch.Tensor] = [x] if input_relevance or not caps else []
            index: dict[int, int] = {id(x): 0} if wrt else {}
            for c in caps:
                if c.requires_grad and id(c) not in index:
                    index[id(c)] = len(wrt)
                    wrt.append(c)
            grads = torch.autograd.grad(out, wrt, grad_outputs=seed, allow_unused=True)
        result: dict[str, torch.Tensor] = OrderedDict()
        for p, c in zip(self.layers, caps):
            g = grads[index[id(c)]] if id(c) in index else None
            result[p] = g.detach() if g is not None else torch.zeros_like(c).detach()
        if id(x) in index:
            g = grads[index[id(x)]]
            result["input"] = g.detach() if g is not None else torch.zeros_like(inputs)
        return result

    @property
    def aliases(self) -> list[tuple[str, str]]:
        """``(alias, path)`` for the selected layers (``Layer1``, ... in order). In the fallback
        mode the default layers are known only after the first call."""
        return [(f"Layer{i + 1}", p) for i, p in enumerate(self.layers or [])]


def relevance(model: nn.Module, inputs: torch.Tensor, target=None, rules: str | dict = "hudd",
              layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """LRP relevance of ``inputs`` (batch first) at the output of every selected layer and at the
    input, from one batched forward and one modified backward pass.

    ``target``: ``None`` (predicted class), an ``int``, a 1-D tensor of per-sample class indices, or
    a float mask of the output's shape (``seed = mask * output``). ``rules``: ``"hudd"``
    (default), ``"epsilon"`` or ``"epsilon-plus"``. ``layers``: module paths (``None`` =
    :func:`default_layers`).
    Returns ``{module path: relevance at its output, "input": relevance at the input}``.

    This prepares the model on every call; to explain many batches, build one
    :class:`LRPExplainer` and call it per batch.
    """
    return LRPExplainer(model, rules=rules, layers=layers)(inputs, target=target)
