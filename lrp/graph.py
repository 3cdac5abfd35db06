"""The traced mode: the private copy traced with torch.fx and rewritten in named phases.

``prepare`` runs them in order:

1. ``inplace_to_ssa``: later users of an in-place operation's input read the operation's result,
   so the operations can run out-of-place (rules keep tensors that in-place ops would overwrite);
2. ``merge_batchnorms``: a BatchNorm whose input is a conv/linear layer's output (its only user)
   is merged into that layer and leaves the graph;
3. ``mark_nonnegative``: which tensors are known to be >= 0 (z+ then skips its negative half);
4. ``attach_rules``: every module and functional call is replaced by a stand-in applying its rule
   (calls with the ordinary gradient as their rule stay as they are);
5. ``return_captures``: the graph returns (the explained output: the model output, or the logits
   before a final softmax or log-softmax; the requested layers' outputs), whose gradients are their
   relevance.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import ops
from .affine import can_merge, merge_batchnorm
from .layertypes import BATCHNORMS, DEFAULT_LAYERS, FINAL_SOFTMAX, NONNEG_OUTPUT, NONNEG_PRESERVING, SEE_THROUGH
from .model import check_called_once, no_rule_error, set_submodule
from .presets import Composite
from .rules import Gradient, Proportional


class Tracer(fx.Tracer):
    """fx tracer recording the output node of every module call (leaves and containers)."""

    def __init__(self, extra_leaves: tuple = ()):
        super().__init__()
        self.extra_leaves = extra_leaves
        self.module_nodes: dict[str, list[fx.Node | None]] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.extra_leaves and isinstance(m, self.extra_leaves):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        path = self.path_of_module(m)
        # a container returning a tuple/dict is recorded as None: not capturable
        self.module_nodes.setdefault(path, []).append(out.node if isinstance(out, fx.Proxy)
                                                      else None)
        return out


def trace(net: nn.Module, extra_leaves: tuple = ()) -> tuple[fx.GraphModule, dict]:
    """(graph module, {module path: output node of each of its calls})."""
    tracer = Tracer(extra_leaves)
    graph = tracer.trace(net)
    return fx.GraphModule(tracer.root, graph), tracer.module_nodes


def output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


_SOFTMAX_FUNCTIONS = (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax)


def _is_final_softmax(gm: fx.GraphModule, node: fx.Node) -> bool:
    return ((node.op == "call_module" and isinstance(gm.get_submodule(node.target), FINAL_SOFTMAX))
            or (node.op == "call_function" and node.target in _SOFTMAX_FUNCTIONS)
            or (node.op == "call_method" and node.target in ("softmax", "log_softmax")))


def explained_node(gm: fx.GraphModule) -> fx.Node | None:
    """The node whose value the backward pass starts from: the model output, or where the model ends
    in a softmax or log-softmax (module, function or method), that call's input, the logits. None
    where the model returns no single tensor node."""
    out_arg = output_node(gm.graph).args[0]
    node = out_arg if isinstance(out_arg, fx.Node) else None
    while node is not None and _is_final_softmax(gm, node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def default_layer_paths(gm: fx.GraphModule, module_nodes: dict) -> list[str]:
    """Default layer paths in execution order from a traced (not yet rewritten) graph; the layer
    whose output is the explained output (explained_node, seen through BatchNorm/identity/dropout)
    is left out."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    final = explained_node(gm)
    while final is not None and final.op == "call_module" and isinstance(
            gm.get_submodule(final.target), SEE_THROUGH):
        src = final.args[0] if final.args else None
        final = src if isinstance(src, fx.Node) else None
    firsts = []
    for path, nodes in module_nodes.items():
        leaf = [n for n in nodes if n is not None and n.op == "call_module" and n.target == path]
        if not leaf or not isinstance(gm.get_submodule(path), DEFAULT_LAYERS):
            continue
        if final is not None and final in leaf:
            continue
        firsts.append((order[leaf[0]], path))
    return [p for _, p in sorted(firsts)]


def captured_nodes(paths: list[str], module_nodes: dict) -> list[fx.Node]:
    """The output node of each requested layer, checked: called once, returns one tensor."""
    for p in paths:
        check_called_once(p, len(module_nodes.get(p, [])))
        if module_nodes[p][0] is None:
            raise ValueError(f"LRP: module '{p}' does not return a single tensor")
    return [module_nodes[p][0] for p in paths]


# ------------------------------------------------------------------------------------------------
# the phases
# ------------------------------------------------------------------------------------------------
def _is_inplace(node: fx.Node, inplace_modules: set[str]) -> bool:
    if node.op == "call_method":
        return ops.is_inplace_method(node.target)
    if node.op == "call_function":
        return ops.is_inplace_function(node.target) or bool(node.kwargs.get("inplace"))
    return node.op == "call_module" and node.target in inplace_modules


def inplace_to_ssa(graph: fx.Graph, inplace_modules: set[str]) -> None:
    """Phase 1: users after an in-place operation read its result instead of its mutated input."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if _is_inplace(node, inplace_modules) and node.args and isinstance(node.args[0], fx.Node):
            src = node.args[0]
            for user in list(src.users):
                if user is not node and order[user] > order[node]:
                    user.replace_input_with(src, node)


def merge_batchnorms(gm: fx.GraphModule, module_nodes: dict
                     ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """Phase 2: ({layer path: merged (weight, bias)}, {removed BN node: layer node}). Only where
    the graph shows that the BN consumes the layer's output and both are called once."""
    calls = {p: len(v) for p, v in module_nodes.items()}
    merged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    remap: dict[fx.Node, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not node.args:
            continue
        bn, src = gm.get_submodule(node.target), node.args[0]
        if not isinstance(bn, BATCHNORMS) or not isinstance(src, fx.Node) or \
                src.op != "call_module" or len(src.users) != 1:
            continue
        layer = gm.get_submodule(src.target)
        if calls.get(src.target) != 1 or calls.get(node.target) != 1 or \
                src.target in merged or not can_merge(layer, bn):
            continue
        merged[src.target] = merge_batchnorm(layer, bn)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        remap[node] = src
    return merged, remap


def _first_inputs(node: fx.Node) -> list:
    a = node.args[0] if node.args else None
    return list(a) if isinstance(a, (list, tuple)) else [a]


def _all_nonneg(items, nonneg: dict) -> bool:
    return bool(items) and all(isinstance(i, fx.Node) and nonneg.get(i, False) for i in items)


def _arg(node: fx.Node, name: str, position: int, default):
    return node.kwargs.get(name, node.args[position] if len(node.args) > position else default)


def _function_nonneg(node: fx.Node, nonneg: dict) -> bool:
    t = node.target
    if t in ops.NONNEG_FUNCTIONS:
        return True
    if t in ops.NONNEG_PRESERVING_FUNCTIONS:
        val = _all_nonneg(_first_inputs(node), nonneg)
        if t is F.pad:  # constant padding with a negative value
            value = _arg(node, "value", 3, 0)
            val = val and (value is None or (isinstance(value, (int, float)) and value >= 0))
        if t in (F.interpolate, getattr(F, "upsample", None)):  # bicubic can overshoot below 0
            val = val and _arg(node, "mode", 3, "nearest") != "bicubic"
        return val
    if t in (operator.add, torch.add) and "alpha" not in node.kwargs:
        return _all_nonneg(node.args[:2], nonneg)
    return False


def _method_nonneg(node: fx.Node, nonneg: dict) -> bool:
    if node.target in ops.NONNEG_METHODS:
        return True
    if ops.method_rule(node.target) in (Gradient, Proportional):
        return _all_nonneg(_first_inputs(node), nonneg)
    if node.target == "add" and "alpha" not in node.kwargs:
        return _all_nonneg(node.args[:2], nonneg)
    return False


def _module_nonneg(node: fx.Node, module: nn.Module, nonneg: dict) -> bool:
    if isinstance(module, NONNEG_OUTPUT):
        return True
    if isinstance(module, NONNEG_PRESERVING):  # bicubic can overshoot below 0
        return _all_nonneg(_first_inputs(node), nonneg) and getattr(module, "mode", "") != "bicubic"
    return False


def mark_nonnegative(gm: fx.GraphModule) -> dict[fx.Node, bool]:
    """Phase 3: for every node, whether its value is known to be >= 0."""
    nonneg: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            nonneg[node] = _module_nonneg(node, gm.get_submodule(node.target), nonneg)
        elif node.op == "call_function":
            nonneg[node] = _function_nonneg(node, nonneg)
        elif node.op == "call_method":
            nonneg[node] = _method_nonneg(node, nonneg)
        else:
            nonneg[node] = False
    return nonneg


def _attach_module_rules(gm: fx.GraphModule, composite: Composite, merged: dict,
                         nonneg: dict) -> None:
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    for path, nodes in calls.items():
        module = gm.get_submodule(path)
        rule = composite.for_module(module)
        if rule is None:
            raise no_rule_error(path, module)
        inputs_nonneg = all(_all_nonneg(_first_inputs(n), nonneg) for n in nodes)
        stand_in = rule.stand_in(module, path, merged.get(path), inputs_nonneg)
        if stand_in is not None:
            set_submodule(gm, path, stand_in)


def _attach_call_rules(gm: fx.GraphModule, composite: Composite) -> None:
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function":
            rule = composite.for_function(node.target)
            fn, name = ops.out_of_place_function(node.target), ops.function_name(node.target)
        elif node.op == "call_method":
            rule = composite.for_method(node.target)
            fn, name = ops.method_function(node.target), "Tensor." + node.target
        else:
            continue
        stand_in = rule.stand_in(fn, name)
        if stand_in is not None:
            sub = f"_lrp_op{count}"
            count += 1
            gm.add_submodule(sub, stand_in)
            node.op, node.target = "call_module", sub


def attach_rules(gm: fx.GraphModule, composite: Composite, merged: dict, nonneg: dict) -> None:
    """Phase 4: modules replaced by their rule's stand-in (conv/linear layers with their merged
    weights, told whether every input is >= 0); functional calls become calls of a stand-in."""
    _attach_module_rules(gm, composite, merged, nonneg)
    _attach_call_rules(gm, composite)


def return_captures(graph: fx.Graph, capture: list[fx.Node], explained: fx.Node | None) -> None:
    """Phase 5: the graph returns (the explained output, captured layer outputs)."""
    out = output_node(graph)
    out.args = ((explained if explained is not None else out.args[0], tuple(capture)),)


def prepare(gm: fx.GraphModule, module_nodes: dict, paths: list[str], composite: Composite,
            inplace_modules: set[str]) -> fx.GraphModule:
    """Rewrite the traced private copy for LRP; calling the result returns (output, [output of
    each layer in ``paths``])."""
    capture = captured_nodes(paths, module_nodes)
    inplace_to_ssa(gm.graph, inplace_modules)
    explained = explained_node(gm)  # after inplace_to_ssa: the node later users read
    merged, remap = merge_batchnorms(gm, module_nodes)
    capture = [remap.get(n, n) for n in capture]
    explained = remap.get(explained, explained)
    nonneg = mark_nonnegative(gm)
    attach_rules(gm, composite, merged, nonneg)
    return_captures(gm.graph, capture, explained)
    gm.graph.lint()
    gm.recompile()
    return gm
