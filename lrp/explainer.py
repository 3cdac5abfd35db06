"""The public entry points: ``LRPExplainer`` (prepare once, explain many batches), ``relevance``
(one batch) and ``default_layers``."""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from . import graph, ops
from .fallback import Fallback, infer_example_input, probe
from .model import private_copy
from .presets import Composite, check_module_rules, resolve_preset
from .rules import DEFAULT_EPSILON
from .targets import make_seed


def default_layers(model: nn.Module, example_input: torch.Tensor | None = None,
                   module_rules: dict | None = None) -> list[tuple[str, str]]:
    """``(alias, module path)`` of every Conv/ConvTranspose, Linear and pooling module in execution
    order, aliased ``Layer1``, ``Layer2``, ...; the last layer whose output is the model output is
    excluded (its relevance is the seed). Relevance at the input is not listed: :func:`relevance`
    always returns it under the key ``"input"``. A module with a module rule (``module_rules``, and
    torchvision's squeeze-and-excitation blocks by default) is explained as one module: no layer
    inside it is listed, since none of them sees relevance of its own.

    The order comes from a torch.fx trace (no input needed); if the model cannot be traced, from a
    forward pass with hooks on a private copy, on ``example_input`` or on a zero input inferred from
    the model (``model.input_size`` and the first layer's input channels). The model is not changed.
    """
    whole = tuple(all_module_rules(model, module_rules))
    try:
        gm, module_nodes = graph.trace(model, whole)
        paths = graph.default_layer_paths(gm, module_nodes)
    except Exception:  # noqa: BLE001 - any tracing failure: fall back to a probe pass
        net, _ = private_copy(model)
        x = example_input if example_input is not None else infer_example_input(net)
        paths = probe(net, x[:1], whole).default_paths
    return [(f"Layer{i + 1}", p) for i, p in enumerate(paths)]


def _check_layers(model: nn.Module, layers: Sequence[str] | None, whole: tuple = ()) -> list[str] | None:
    """The requested paths, each a module of the model and none inside a module of a `whole` type
    (a module rule explains it as one module: the layers inside it see no relevance of their own)."""
    if layers is None:
        return None
    paths = [str(p) for p in layers]
    for p in paths:
        if p == "input":
            raise ValueError("LRP: 'input' is always returned; do not list it in layers")
        try:
            model.get_submodule(p)
        except AttributeError:
            raise ValueError(f"LRP: the model has no module named '{p}'") from None
        parts = p.split(".")
        for outer in (".".join(parts[:i]) for i in range(1, len(parts))):
            if isinstance(model.get_submodule(outer), whole):
                raise ValueError(f"LRP: module '{p}' lies inside '{outer}' ({type(model.get_submodule(outer)).__name__}), "
                                 "which a module rule explains as one module; choose that module or a layer outside it")
    return paths


def gating_module_rules(model: nn.Module) -> dict:
    """Default rules for the gating blocks of torchvision's models: a squeeze-and-excitation block
    (MobileNetV3, EfficientNet, RegNet) multiplies its input by a gate computed from it, a product of two
    input-dependent tensors. Its relevance passes to the gated signal whole and none to the gate
    ("pass": out = gate * x, element-wise), the usual LRP treatment of multiplicative gates (Arras et
    al., 2017). Only types the model holds are listed; the user's module_rules override them."""
    try:
        from torchvision.ops import SqueezeExcitation
    except ImportError:  # torchvision is optional for the engine
        return {}
    return {SqueezeExcitation: "pass"} if any(isinstance(m, SqueezeExcitation) for m in model.modules()) else {}


def all_module_rules(model: nn.Module, module_rules: dict | None) -> dict:
    """The module rules an explanation of `model` applies: the gating blocks' defaults, the user's over them."""
    return {**gating_module_rules(model), **(module_rules or {})}


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
        ops.add_torchvision_functions()   # the model is built: torchvision is loaded if it uses it
        self.preset, preset = resolve_preset(rules)
        self.epsilon = float(epsilon)
        self.module_rules = all_module_rules(model, module_rules)
        check_module_rules(self.module_rules)
        self._composite = Composite(preset, self.epsilon, self.module_rules)
        self.rules = self._composite.affine_rule_names()
        requested = _check_layers(model, layers, tuple(self.module_rules))
        net, inplace_modules = private_copy(model)
        self._device = None
        self._gm = self._fallback = None
        try:
            gm, module_nodes = graph.trace(net, tuple(self.module_rules))
        except Exception as err:  # noqa: BLE001 - fx cannot trace it: module-replacement fallback
            self.mode = "hooks"
            self._trace_error = f"{type(err).__name__}: {err}"
            warnings.warn(f"LRP: torch.fx cannot trace {type(model).__name__} "
                          f"({self._trace_error.splitlines()[0][:200]}); falling back to module "
                          "replacement (see the lrp module documentation)", RuntimeWarning,
                          stacklevel=2)
            self._fallback = Fallback(net, self._composite, requested)
            self.layers = requested
            self._ready = False
        else:
            self.mode = "fx"
            self.layers = requested if requested is not None else graph.default_layer_paths(
                gm, module_nodes)
            # the graph module holds what it needs: the replaced layers of `net` are freed
            self._gm = graph.prepare(gm, module_nodes, self.layers, self._composite,
                                     inplace_modules)
            self._ready = True

    def _module(self) -> nn.Module:
        return self._gm if self.mode == "fx" else self._fallback.net

    def _forward(self, x: torch.Tensor) -> tuple:
        """(model output, [output of each selected layer]) with the rules attached."""
        if not self._ready:
            self._fallback.prepare(x.detach())
            self.layers = self._fallback.layers
            self._ready = True
        if self.mode == "fx":
            out, caps = self._gm(x)
            caps = list(caps)
        else:
            out, caps = self._fallback(x)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"LRP: the model must return a single tensor, got {type(out).__name__}")
        for p, c in zip(self.layers, caps):
            if not isinstance(c, torch.Tensor):
                raise ValueError(f"LRP: module '{p}' does not return a single tensor")
        return out, caps

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
            out, caps = self._forward(x)
            # ONE backward for every layer: the relevance at a layer's output is the gradient
            # arriving there; a tensor listed twice (two layers, one output) is asked for once
            wrt: list[torch.Tensor] = [x] if input_relevance or not caps else []
            index: dict[int, int] = {id(x): 0} if wrt else {}
            for c in caps:
                if c.requires_grad and id(c) not in index:
                    index[id(c)] = len(wrt)
                    wrt.append(c)
            grads = torch.autograd.grad(out, wrt, grad_outputs=make_seed(out, target),
                                        allow_unused=True)
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
