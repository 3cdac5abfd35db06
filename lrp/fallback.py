"""The fallback mode, for models that torch.fx cannot trace (data-dependent control flow).

The private copy's modules are replaced by their rules' stand-ins, and a ``TorchFunctionMode``
applies the rules to functional operations at run time (residual additions, functional
activations). What the traced mode reads from the graph comes from one probe forward pass on the
first batch instead: how often each module is called, which BatchNorm consumes which layer's
output, the default layers. Unknown functional operations use their ordinary gradient, and
in-place operations whose result is not re-assigned are not supported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import ops
from .affine import can_merge, merge_batchnorm
from .layertypes import AFFINE, BATCHNORMS, DEFAULT_LAYERS, SEE_THROUGH
from .model import check_called_once, no_rule_error, set_submodule
from .presets import Composite
from .rules import Gradient, OpRule


@dataclass
class ProbeResult:
    calls: dict  # path -> number of calls
    default_paths: list
    merges: list  # (conv/linear path, bn path)


def _record_calls(net: nn.Module, x: torch.Tensor) -> tuple[list, Any]:
    """(path, module, id of its input, id of its output) of every module call, and the output."""
    records: list[tuple[str, nn.Module, int, int]] = []
    keep: list = []  # the tensors stay alive so that their ids stay unique

    def hook(path):
        def fn(module, inputs, output):
            inp = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            keep.extend([inp, output])
            records.append((path, module, id(inp) if inp is not None else -1,
                            id(output) if isinstance(output, torch.Tensor) else -2))
        return fn

    handles = []
    try:
        for path, m in net.named_modules():
            if path:
                handles.append(m.register_forward_hook(hook(path)))
        with torch.no_grad():
            out = net(x)
    finally:
        for h in handles:
            h.remove()
    return records, out


def probe(net: nn.Module, x: torch.Tensor, whole: tuple = ()) -> ProbeResult:
    """Calls, default layers and BatchNorm merges seen in one forward pass; a module of a `whole` type
    (one with a module rule) counts as a leaf, and the calls inside it are not seen."""
    records, out = _record_calls(net, x)
    containers = [p for p, m in net.named_modules() if p and isinstance(m, whole)]
    records = [r for r in records if not any(r[0].startswith(c + ".") for c in containers)]
    calls: dict[str, int] = {}
    for path, *_ in records:
        calls[path] = calls.get(path, 0) + 1
    leaves = {p for p, m, *_ in records if not list(m.children()) or isinstance(m, whole)}
    producer = {}  # output id -> (leaf path, module, input id) of the first leaf that made it
    for path, m, iid, oid in records:
        if path in leaves:
            producer.setdefault(oid, (path, m, iid))
    merges = []
    for path, m, iid, oid in records:
        if path in leaves and isinstance(m, BATCHNORMS) and iid in producer:
            src_path, src, _ = producer[iid]
            if calls[src_path] == 1 and calls[path] == 1 and can_merge(src, m):
                merges.append((src_path, path))
    # the module producing the model output, seen through BatchNorm/identity/dropout
    final = None
    oid = id(out) if isinstance(out, torch.Tensor) else -3
    while oid in producer:
        final, m, iid = producer[oid]
        if not isinstance(m, SEE_THROUGH):
            break
        oid = iid
    seen, paths = set(), []
    for path, m, *_ in records:
        if path in leaves and path not in seen and isinstance(m, DEFAULT_LAYERS):
            seen.add(path)
            if path != final:
                paths.append(path)
    return ProbeResult(calls, paths, merges)


def infer_example_input(model: nn.Module) -> torch.Tensor:
    """A zero input for a probe pass: the first layer's input channels/features and
    ``model.input_size``."""
    first = next((m for m in model.modules() if isinstance(m, AFFINE)), None)
    param = next(model.parameters(), None)
    dev = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if isinstance(first, nn.Linear):
        return torch.zeros(1, first.in_features, device=dev, dtype=dtype)
    size = getattr(model, "input_size", None)
    if first is None or size is None:
        raise ValueError("LRP: cannot infer an input shape for this model; pass example_input")
    n = len(first.kernel_size)
    size = (size,) * n if isinstance(size, int) else tuple(size)[-n:]
    return torch.zeros(1, first.in_channels, *size, device=dev, dtype=dtype)


def mode_rules(composite: Composite) -> dict[Any, tuple[OpRule, Callable]]:
    """{function or Tensor method object: (rule, out-of-place function)} for the functional
    operations whose rule is not the ordinary gradient."""
    table = {}
    for fn in list(ops.FUNCTION_RULES) + list(ops.AFFINE_FUNCTIONS):
        rule = composite.for_function(fn)
        if not isinstance(rule, Gradient):
            table[fn] = (rule, ops.out_of_place_function(fn))
    for method, name in ops.mode_methods().items():
        table[method] = (composite.for_method(name), ops.method_function(name))
    return table


class FallbackMode(TorchFunctionMode):
    """Applies the rules to functional operations at run time."""

    def __init__(self, rules: dict[Any, tuple[OpRule, Callable]]):
        super().__init__()
        self.rules = rules

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.is_grad_enabled():
            try:
                entry = self.rules.get(func)
            except TypeError:  # an unhashable callable
                entry = None
            if entry is not None:
                rule, fn = entry
                return rule.apply(fn, ops.function_name(func), tuple(args), kwargs)
        return func(*args, **kwargs)


class Fallback:
    """Runs an untraceable model's private copy; prepared by ``prepare`` on the first batch.
    ``layers``: the requested layer paths, None for the default ones (known after ``prepare``)."""

    def __init__(self, net: nn.Module, composite: Composite, layers: list[str] | None):
        self.net, self.composite, self.layers = net, composite, layers
        # a container with a user rule is explained as one module, like a leaf
        self.user_types = tuple(typ for typ, _ in composite.user)
        self.rules = mode_rules(composite)
        self._store: dict[str, Any] = {}

    def prepare(self, x: torch.Tensor) -> None:
        result = probe(self.net, x[:1], self.user_types)
        if self.layers is None:
            self.layers = list(result.default_paths)
        for p in self.layers:
            check_called_once(p, result.calls.get(p, 0))
        self._replace_modules(result.merges)
        for p in self.layers:
            self.net.get_submodule(p).register_forward_hook(self._store_hook(p))

    def _replace_modules(self, merges: list[tuple[str, str]]) -> None:
        """Each leaf (or module with a user rule) replaced by its rule's stand-in; a BatchNorm
        merged into its layer by an identity."""
        net = self.net
        merged = {src: merge_batchnorm(net.get_submodule(src), net.get_submodule(bn))
                  for src, bn in merges}
        merged_bns = {bn for _, bn in merges}
        handled: list[str] = []
        for path, m in list(net.named_modules()):
            if not path or any(path.startswith(r + ".") for r in handled):
                continue
            if list(m.children()) and not isinstance(m, self.user_types):
                continue
            handled.append(path)
            rule = self.composite.for_module(m)
            if path in merged_bns:
                set_submodule(net, path, nn.Identity())
            elif rule is None:
                if type(m).__module__.startswith("torch."):
                    raise no_rule_error(path, m)
                # a custom leaf: its functional operations get rules through the function mode
            else:
                stand_in = rule.stand_in(m, path, merged.get(path), False)
                if stand_in is not None:
                    set_submodule(net, path, stand_in)

    def _store_hook(self, path: str):
        def fn(module, inputs, output):
            self._store[path] = output
        return fn

    def __call__(self, x: torch.Tensor) -> tuple[Any, list]:
        """(model output, [output of each layer])."""
        self._store = {}
        with FallbackMode(self.rules):
            out = self.net(x)
        caps = [self._store.get(p) for p in self.layers]
        self._store = {}
        return out, caps
