"""Rule presets: each an ordered list of (layer types, rule) pairs, the first pair whose types
match a module giving its rule. Changing a preset's rule for a layer type, or giving a new layer
type a rule, is one line here (layer type groups: layertypes.py).

A ``Composite`` is a preset made concrete for one explainer: the rules built with its epsilon, the
user's ``module_rules`` in front, and the rules of functional operations (ops.py) alongside.
"""
from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from . import ops
from .layertypes import (ACTIVATIONS, AVERAGING, BATCHNORMS, CONVOLUTIONS, LINEAR, MAX_POOLS,
                         OTHER_NORMS, ROUTING)
from .rules import (AffineCall, AffineRule, Epsilon, Gradient, OpRule, Pass, Proportional, Rule,
                    ZPlus, ZPlusNoBias)

Preset = Sequence[tuple[tuple[type, ...] | type, type[Rule]]]

# every preset ends with these: the choices zennit makes too, so that results compare with zennit
COMMON: Preset = [
    (BATCHNORMS, Pass),      # only a BatchNorm that could not be merged into the layer before it
    (ACTIVATIONS, Pass),
    (OTHER_NORMS, Pass),
    (AVERAGING, Proportional),
    (MAX_POOLS, Gradient),   # winner-takes-all; overlapping windows add
    (ROUTING, Gradient),     # identity, flatten, padding, dropout (eval), shuffles
]

PRESETS: dict[str, Preset] = {
    "hudd": [(LINEAR, ZPlusNoBias), (CONVOLUTIONS, Epsilon), *COMMON],
    "epsilon": [(LINEAR, Epsilon), (CONVOLUTIONS, Epsilon), *COMMON],
    "epsilon-plus": [(LINEAR, Epsilon), (CONVOLUTIONS, ZPlus), *COMMON],
}

RULE_PRESETS: dict[str, str] = {
    "hudd": "original HUDD rules: z+ (alpha1-beta0, bias ignored) on Linear, epsilon (1e-6, "
            "pre-activation z) on convolutions, winner-takes-all max pooling",
    "epsilon": "LRP-epsilon (1e-6) on every convolution and linear layer",
    "epsilon-plus": "LRP-epsilon on linear layers, LRP-z+ on convolutions (zennit EpsilonPlus)",
}
PRESET_NAMES: tuple[str, ...] = tuple(RULE_PRESETS)

# the rules that settings may name: for conv/linear layers, and for custom module types
AFFINE_RULES: dict[str, type[AffineRule]] = {r.name: r for r in (Epsilon, ZPlus, ZPlusNoBias)}
MODULE_RULES: dict[str, type[OpRule]] = {r.name: r for r in (Pass, Gradient, Proportional)}


def custom_preset(conv: str, linear: str) -> Preset:
    """The preset of ``rules={"conv": conv, "linear": linear}``."""
    return [(LINEAR, AFFINE_RULES[linear]), (CONVOLUTIONS, AFFINE_RULES[conv]), *COMMON]


def resolve_preset(rules) -> tuple[str, Preset]:
    """(preset name or 'custom', preset) of the ``rules`` argument, checked."""
    if isinstance(rules, str):
        if rules not in PRESETS:
            raise ValueError(f"LRP: unknown rule preset '{rules}'; choose one of "
                             f"{sorted(PRESETS)}")
        return rules, PRESETS[rules]
    if isinstance(rules, dict) and set(rules) == {"conv", "linear"} and all(
            v in AFFINE_RULES for v in rules.values()):
        return "custom", custom_preset(rules["conv"], rules["linear"])
    raise ValueError("LRP: rules must be a preset name or {'conv': rule, 'linear': rule} with "
                     f"rules from {tuple(AFFINE_RULES)}")


def check_module_rules(module_rules: dict) -> None:
    for typ, rule in module_rules.items():
        if rule not in MODULE_RULES:
            raise ValueError(f"LRP: module_rules[{typ}] must be one of {sorted(MODULE_RULES)}")


class Composite:
    """The rule of every module and operation for one explainer."""

    def __init__(self, preset: Preset, epsilon: float, module_rules: dict | None = None):
        self.epsilon = epsilon
        self._built: dict[type, Rule] = {}
        # the user's rules for custom types come first; functional conv/linear calls follow the
        # preset alone (a user rule for nn.Linear leaves F.linear with the preset's rule)
        self.user = [(typ, self._rule(MODULE_RULES[r])) for typ, r in (module_rules or {}).items()]
        self.preset = [(types, self._rule(cls)) for types, cls in preset]

    def _rule(self, cls: type[Rule]) -> Rule:
        """One instance per rule class, shared by every layer that has it."""
        if cls not in self._built:
            self._built[cls] = cls(self.epsilon)
        return self._built[cls]

    def for_module(self, module: nn.Module) -> Rule | None:
        """The module's rule, None if it has none."""
        for types, rule in self.user + self.preset:
            if isinstance(module, types):
                return rule
        return None

    def for_layer_type(self, typ: type[nn.Module]) -> Rule | None:
        for types, rule in self.preset:
            if issubclass(typ, types):
                return rule
        return None

    def for_function(self, fn: Callable) -> OpRule:
        if fn in ops.AFFINE_FUNCTIONS:  # explained like its module type, with the preset's rule
            typ, layout = ops.AFFINE_FUNCTIONS[fn]
            return AffineCall(layout, self.for_layer_type(typ))
        return self._rule(ops.function_rule(fn))

    def for_method(self, name: str) -> OpRule:
        return self._rule(ops.method_rule(name))

    def affine_rule_names(self) -> dict[str, str]:
        """{'conv': rule name, 'linear': rule name}: the explainer's ``rules`` attribute."""
        return {"conv": self.for_layer_type(nn.Conv2d).name,
                "linear": self.for_layer_type(nn.Linear).name}
