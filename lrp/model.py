"""The private copy of the user's model that an explainer rewrites (the user's model is never
modified, not even its flags or hooks), and the checks of its modules that both modes share."""
from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .rules import NoRuleError

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def private_copy(model: nn.Module) -> tuple[nn.Module, set[str]]:
    """Deep copy without the model's hooks (and without copying them), in eval mode, frozen, its
    in-place activations made out-of-place; also the paths of the modules that were in-place."""
    memo: dict[int, Any] = {}
    for m in model.modules():  # the copy gets empty hook dicts of the same types
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


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def no_rule_error(path: str, module: nn.Module) -> NoRuleError:
    return NoRuleError(
        f"LRP: no relevance rule for module '{path}' ({type(module).__name__}); supported are "
        "convolutions, linear, pooling, BatchNorm (merged), activations, dropout and shape layers",
        "give the type a rule with module_rules={Type: 'pass'|'gradient'|'proportional'}")


def check_called_once(path: str, calls: int) -> None:
    """A requested layer must be called once: the relevance at its output is then one tensor."""
    if calls == 0:
        raise ValueError(f"LRP: module '{path}' is not called in the model's forward pass")
    if calls > 1:
        raise ValueError(f"LRP: module '{path}' is called {calls} times in one forward pass, so "
                         "the relevance at its output is ambiguous")
