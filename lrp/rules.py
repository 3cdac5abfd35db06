"""The LRP rules, one small class each.

A rule says which forward values its backward needs (``forward``) and which relevance it sends back
to its inputs (``backward``); one autograd Function (``_RuleFunction``) runs any rule, so autograd
calls the rule's backward instead of the operation's ordinary one. A rule instance holds only its
epsilon and is shared by every layer it is given to; what belongs to one layer (its weights) is the
``state`` argument.

Layer rules (conv/linear, ``AffineRule``): ``Epsilon``, ``ZPlus``, ``ZPlusNoBias``.
Operation rules (``OpRule``: functions, Tensor methods and modules other than conv/linear):
``Pass``, ``Proportional``, ``Gradient``, ``Identity``, ``NoRule``, the arithmetic ones (``Sum``,
``Difference``, ``ReversedDifference``, ``Product``, ``MatMul``) and ``AffineCall`` (a functional
conv/linear explained with its layer's rule).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from .affine import AffineLayer, AffineWeights, bind_call, spec_of_call

DEFAULT_EPSILON = 1e-6  # zennit's default epsilon (Epsilon rule) and stabiliser (z+, Norm)

_EPS_CACHE: dict[tuple, torch.Tensor] = {}


def stabilise(z: torch.Tensor, eps: float) -> torch.Tensor:
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


def ratio(rel: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    """rel / stabilise(z), computed with one temporary."""
    den = stabilise(z, eps)
    if rel.shape != den.shape or rel.dtype != den.dtype:
        return rel / den
    return torch.div(rel, den, out=den)


def traced(a: Any) -> bool:
    """True for a tensor that depends on the input (the private copy's parameters are frozen)."""
    return isinstance(a, torch.Tensor) and a.requires_grad


def any_traced(args: Iterable, kwargs: dict | None = None) -> bool:
    def walk(v):
        if isinstance(v, (list, tuple)):
            return any(walk(e) for e in v)
        if isinstance(v, dict):
            return any(walk(e) for e in v.values())
        return traced(v)
    return walk(list(args)) or walk(dict(kwargs or {}))


def no_inplace(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Drop in-place flags of an activation call (a positional ``True`` is its ``inplace``): an
    in-place result would overwrite a tensor that a rule keeps for its backward."""
    args = tuple(False if a is True else a for a in args)
    if kwargs.get("inplace"):
        kwargs = dict(kwargs, inplace=False)
    return args, kwargs


class _RuleFunction(torch.autograd.Function):
    """Runs ``rule``: the output and saved values from ``rule.forward(ctx, state, *inputs)``, the
    relevance at each input from ``rule.backward(ctx, rel)``."""

    @staticmethod
    def forward(ctx, rule, state, *inputs):
        ctx.rule = rule
        return rule.forward(ctx, state, *inputs)

    @staticmethod
    def backward(ctx, rel):
        return (None, None) + ctx.rule.backward(ctx, rel)


class Rule:
    """A relevance rule. ``name`` is how settings spell it; ``stand_in`` gives the module that
    replaces a layer or call with this rule attached (None: keep it as it is)."""
    name = ""

    def __init__(self, epsilon: float = DEFAULT_EPSILON):
        self.eps = float(epsilon)

    def forward(self, ctx, state, *inputs) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, ctx, rel: torch.Tensor) -> tuple:
        raise NotImplementedError

    def stand_in(self, target: Any, name: str, weights=None, nonneg: bool = False
                 ) -> nn.Module | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(epsilon={self.eps})"


# ------------------------------------------------------------------------------------------------
# conv/linear layers
# ------------------------------------------------------------------------------------------------
class AffineRule(Rule):
    """Rule of a conv/linear layer; ``state`` is its AffineWeights. The backward maps the relevance
    at the output to the input directly, so the layer's ordinary backward never runs."""

    def derive(self, weight: torch.Tensor, bias: torch.Tensor | None) -> dict:
        """Weights the rule needs besides the layer's own, made once per layer."""
        return {}

    def run(self, x: torch.Tensor, layer: AffineWeights) -> torch.Tensor:
        return _RuleFunction.apply(self, layer, x)

    def stand_in(self, target, name, weights=None, nonneg=False):
        w, b = weights if weights is not None else (target.weight, target.bias)
        return AffineLayer(target, w, b, self, nonneg)


class Epsilon(AffineRule):
    """LRP-epsilon: R_in = x * W^T (R / stabilise(z)), z the layer's output (bias included)."""
    name = "epsilon"

    def forward(self, ctx, layer, x):
        z = layer.spec.forward(x, layer.weight, layer.bias)
        ctx.layer = layer
        ctx.save_for_backward(x, z)
        return z

    def backward(self, ctx, rel):
        x, z = ctx.saved_tensors
        layer = ctx.layer
        return (layer.spec.input_grad(ratio(rel, z, self.eps), x, layer.weight).mul_(x),)


class ZPlus(AffineRule):
    """LRP-z+ (alpha1-beta0) in the general form that also handles negative inputs:
    R_in = x+ * W+^T S + x- * W-^T S,  S = R / stabilise(W+ x+ + W- x- + b+).

    One extra forward with the clamped weights; when the input is >= 0 (known from the graph, or
    seen in this batch) only the positive half is computed. Signed inputs run both halves as one
    operation over the stacked input [x+, x-] (weights [W+, W-]), or as two for grouped layers.
    """
    name = "zplus"
    keep_bias = True  # zennit's z+ keeps the positive part of the bias

    def derive(self, weight, bias):
        bp = bias.clamp(min=0) if bias is not None and self.keep_bias else None
        return {"wp": weight.clamp(min=0), "bp": bp}

    def forward(self, ctx, layer, x):
        z = layer.spec.forward(x, layer.weight, layer.bias)
        ctx.layer = layer
        if layer.nonneg or not bool((x < 0).any()):
            ctx.zp = layer.spec.forward(x, layer.derived["wp"], layer.derived["bp"])
            ctx.save_for_backward(x)
            ctx.halves = "positive"
        elif layer.spec.groups == 1:
            self._forward_stacked(ctx, layer, x)
        else:
            xp, xn = x.clamp(min=0), x.clamp(max=0)
            zp = layer.spec.forward(xp, layer.derived["wp"], layer.derived["bp"])
            zp += layer.spec.forward(xn, self._negative_weights(layer), None)
            ctx.zp, ctx.xp, ctx.xn = zp, xp, xn
            ctx.halves = "split"
        return z

    def backward(self, ctx, rel):
        layer, spec = ctx.layer, ctx.layer.spec
        s = ratio(rel, ctx.zp, self.eps)
        ctx.zp = None
        if ctx.halves == "positive":
            (x,) = ctx.saved_tensors
            return (spec.input_grad(s, x, layer.derived["wp"]).mul_(x),)
        if ctx.halves == "stacked":
            xs, ctx.xs = ctx.xs, None
            r = spec.input_grad(s, xs, self._stacked_weights(layer)).mul_(xs)
            half = xs.shape[spec.channel_dim] // 2
            return (r.narrow(spec.channel_dim, 0, half) + r.narrow(spec.channel_dim, half, half),)
        xp, xn = ctx.xp, ctx.xn
        ctx.xp = ctx.xn = None
        r = spec.input_grad(s, xp, layer.derived["wp"]).mul_(xp)
        r += spec.input_grad(s, xn, self._negative_weights(layer)).mul_(xn)
        return (r,)

    def _forward_stacked(self, ctx, layer, x):
        spec = layer.spec
        d, c = spec.channel_dim, x.shape[spec.channel_dim]
        shape = list(x.shape)
        shape[d] = 2 * c
        xs = x.new_empty(shape)  # [x+, x-] along the channels, written in place
        torch.clamp(x, min=0, out=xs.narrow(d, 0, c))
        torch.clamp(x, max=0, out=xs.narrow(d, c, c))
        ctx.zp = spec.forward(xs, self._stacked_weights(layer), layer.derived["bp"])
        ctx.xs = xs
        ctx.halves = "stacked"

    @staticmethod
    def _negative_weights(layer: AffineWeights) -> torch.Tensor:
        """min(W, 0), made on first use: only layers with signed inputs need it."""
        return layer.cache("wn", lambda: layer.weight.clamp(max=0))

    @staticmethod
    def _stacked_weights(layer: AffineWeights) -> torch.Tensor:
        """[W+, W-] over the stacked input [x+, x-]; W- alone is then no longer kept."""
        def make():
            wn = layer.cached.pop("wn", None)
            if wn is None:
                wn = layer.weight.clamp(max=0)
            return torch.cat([layer.derived["wp"], wn], dim=layer.spec.weight_in_dim)
        return layer.cache("wpn", make)


class ZPlusNoBias(ZPlus):
    """LRP-z+ with the bias ignored (the original HUDD's rule on linear layers)."""
    name = "zplus-nobias"
    keep_bias = False


# ------------------------------------------------------------------------------------------------
# operations
# ------------------------------------------------------------------------------------------------
class OpRule(Rule):
    """Rule of an operation: a function, a Tensor method or a module other than conv/linear.
    ``apply`` runs the call with the rule attached to its backward where a tensor in the call
    depends on the input, and the plain call elsewhere."""

    def apply(self, fn: Callable, name: str, args: tuple, kwargs: dict):
        if torch.is_grad_enabled() and any_traced(args, kwargs):
            return self.traced(fn, name, args, kwargs)
        return self.untraced(fn, args, kwargs)

    def untraced(self, fn, args, kwargs):
        return fn(*args, **kwargs)

    def traced(self, fn, name, args, kwargs):
        raise NotImplementedError

    def stand_in(self, target, name, weights=None, nonneg=False):
        return RuledOp(self, target, name)


class RuledOp(nn.Module):
    """Stands in for a functional call (fx node) or a module, applying its rule."""

    def __init__(self, rule: OpRule, target: Callable, name: str):
        super().__init__()
        self.rule, self.op_name = rule, name
        if isinstance(target, nn.Module):
            self.fn, self.module = None, target  # registered so that .to(device) moves its buffers
        else:
            self.fn, self.module = target, None

    def forward(self, *args, **kwargs):
        fn = self.module if self.module is not None else self.fn
        return self.rule.apply(fn, self.op_name, args, kwargs)

    def extra_repr(self) -> str:
        return f"rule={self.rule.name}, op={self.op_name}"


class Gradient(OpRule):
    """The ordinary gradient: routing (flatten, indexing, padding, cat, ...) and winner-takes-all
    max pooling (overlapping windows add). Nothing to attach: the call stays as it is."""
    name = "gradient"

    def traced(self, fn, name, args, kwargs):
        return fn(*args, **kwargs)

    def stand_in(self, target, name, weights=None, nonneg=False):
        return None


class Identity(OpRule):
    """The call is skipped: its result is its first argument (dropout with ``training`` hard-coded
    True gets eval semantics)."""
    name = "identity"

    def untraced(self, fn, args, kwargs):
        return args[0] if args else kwargs["input"]

    def traced(self, fn, name, args, kwargs):
        return self.untraced(fn, args, kwargs)


class NoRuleError(ValueError):
    """A module or operation the engine has no relevance rule for (gating, attention, recurrence, ...):
    callers tell it from other errors by type, not by message. `reason` is what has no rule; the message
    adds `advice` for a caller of this library (module_rules), which a command-line user cannot follow."""

    def __init__(self, reason: str, advice: str = ""):
        super().__init__(f"{reason}; {advice}" if advice else reason)
        self.reason = reason


class NoRule(OpRule):
    """An operation without a rule: fine on constants, an error on input-dependent tensors."""
    name = "none"

    def traced(self, fn, name, args, kwargs):
        raise NoRuleError(f"LRP: no relevance rule for operation '{name}' on input-dependent "
                         "tensors")


class _Unary(OpRule):
    """An operation of one input-dependent tensor, its first argument; ``state`` is the call of
    the operation on a tensor."""

    def traced(self, fn, name, args, kwargs):
        x, rest = args[0], args[1:]
        if not traced(x) or any_traced(rest, kwargs):
            raise NoRuleError(f"LRP: no relevance rule for '{name}' with input-dependent "
                             "arguments other than its first")
        return self.run(x, lambda t: fn(t, *rest, **kwargs))

    def run(self, x: torch.Tensor, call: Callable) -> torch.Tensor:
        return _RuleFunction.apply(self, call, x)


class Pass(_Unary):
    """Relevance passes through unchanged: element-wise activations, normalisations that are not
    merged, arithmetic with a constant (summed over broadcast dimensions)."""
    name = "pass"

    def untraced(self, fn, args, kwargs):
        return super().untraced(fn, *no_inplace(args, kwargs))

    def traced(self, fn, name, args, kwargs):
        return super().traced(fn, name, *no_inplace(args, kwargs))

    def forward(self, ctx, call, x):
        ctx.shape = x.shape
        y = call(x)
        return y.clone() if y is x else y

    def backward(self, ctx, rel):
        return (rel.sum_to_size(ctx.shape) if rel.shape != ctx.shape else rel,)


class Proportional(_Unary):
    """A linear operation without bias (average pooling, mean, upsampling, a product with a
    constant matrix): the epsilon rule on the operation, relevance distributed in proportion to
    each input's contribution (zennit's Norm)."""
    name = "proportional"

    def forward(self, ctx, call, x):
        z = call(x)
        ctx.call = call
        ctx.save_for_backward(x, z)
        return z

    def backward(self, ctx, rel):
        x, z = ctx.saved_tensors
        s = ratio(rel, z, self.eps)
        with torch.enable_grad():  # the contributions are the op's gradient times the input
            xd = x.detach().requires_grad_(True)
            (c,) = torch.autograd.grad(ctx.call(xd), xd, s)
        return (c * x,)  # not in place: a sum's gradient is one value broadcast over the input (a stride-0 view)


class Binary(OpRule):
    """Arithmetic of two operands. With a constant operand, ``constant_rule`` applies to the
    other (pass-through: ``x * 0.5``, ``(x - mean) / std``); two input-dependent operands have no
    rule unless a subclass gives one."""
    constant_rule: type[_Unary] = Pass

    def __init__(self, epsilon: float = DEFAULT_EPSILON):
        super().__init__(epsilon)
        self.with_constant = self.constant_rule(epsilon)

    def traced(self, fn, name, args, kwargs):
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        kw = {k: v for k, v in kwargs.items() if k != "other"}
        if traced(a) and traced(b):
            return self.both_traced(a, b, kw, name)
        if traced(a):
            return self.with_constant.run(a, lambda t: fn(t, b, **kw))
        return self.with_constant.run(b, lambda t: fn(a, t, **kw))

    def both_traced(self, a, b, kw: dict, name: str):
        raise NoRuleError(
            f"LRP: no relevance rule for '{name}' of two input-dependent tensors (a product "
            "such as gating or attention)", "give the enclosing module a rule with module_rules")


class Product(Binary):
    """``a * b``, ``a / b``: pass-through with a constant, no rule for two input-dependent
    operands."""
    name = "product"


class MatMul(Binary):
    """``a @ W`` with a constant matrix: a linear map, the epsilon rule without bias."""
    name = "matmul"
    constant_rule = Proportional


class Sum(Binary):
    """``a + alpha * b``: two input-dependent operands (a residual) share the relevance in
    proportion to their contributions, R_a = c_a * a * R / stabilise(z) (zennit's Sum module with
    its Norm rule); with a constant operand, pass-through."""
    name = "sum"

    def coefficients(self, alpha) -> tuple:
        """(c_a, c_b) of z = c_a * a + c_b * b."""
        return 1, alpha

    def both_traced(self, a, b, kw, name):
        alpha = kw.pop("alpha", 1)
        if kw:
            raise ValueError(f"LRP: unsupported arguments {sorted(kw)} of '{name}'")
        return _RuleFunction.apply(self, self.coefficients(alpha), a, b)

    def forward(self, ctx, coefficients, a, b):
        ca, cb = coefficients
        z = a * ca if ca != 1 else a
        z = z + b * cb if cb != 1 else z + b
        ctx.coefficients = coefficients
        ctx.save_for_backward(a, b, z)
        return z

    def backward(self, ctx, rel):
        a, b, z = ctx.saved_tensors
        s = ratio(rel, z, self.eps)
        out = []
        for t, c in zip((a, b), ctx.coefficients):
            r = t * s
            if c != 1:
                r = r * c
            out.append(r.sum_to_size(t.shape) if r.shape != t.shape else r)
        return tuple(out)


class Difference(Sum):
    """``a - alpha * b``."""
    name = "difference"

    def coefficients(self, alpha):
        return 1, -alpha


class ReversedDifference(Sum):
    """``b - alpha * a`` (``Tensor.__rsub__``)."""
    name = "reversed-difference"

    def coefficients(self, alpha):
        return -alpha, 1


class AffineCall(OpRule):
    """``F.linear`` / ``F.conv*d`` / ``F.conv_transpose*d`` called as a function: explained like
    the module of that type, with the layer rule given (``kind``: 'linear', 'conv', 'convT')."""
    name = "affine-call"

    def __init__(self, kind: str, layer_rule: AffineRule):
        super().__init__(layer_rule.eps)
        self.kind, self.layer_rule = kind, layer_rule

    def traced(self, fn, name, args, kwargs):
        bound = bind_call(self.kind, args, kwargs)
        w, b = bound["weight"], bound.get("bias")
        if traced(w) or traced(b):
            raise NoRuleError(f"LRP: no relevance rule for {getattr(fn, '__name__', fn)} with "
                             "input-dependent weights")
        if not traced(bound["input"]):
            return fn(*args, **kwargs)
        x, spec = spec_of_call(self.kind, bound)
        return self.layer_rule.run(x, AffineWeights(spec, w, b, self.layer_rule))
