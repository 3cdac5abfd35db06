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
``RULE_PRESETS``: preset name -> one-line description; ``PRESET_NAMES``: the preset names (for
    settings validation); ``DEFAULT_EPSILON``: 1e-6.

Targets (the seed)
------------------
The backward pass starts from ``seed = one_hot(target) * output`` (the raw output value, no
softmax; it may be negative). Where the model ends in a softmax or log-softmax (``nn.Softmax``,
``nn.LogSoftmax``, ``F.softmax``, ``F.log_softmax`` or the tensor methods), ``output`` is that call's
input, the logits: a probability or log-probability seed would scale each heatmap by p/z or log(p)/z
and flip its sign wherever that is negative (traced mode; the fallback mode seeds the model output). ``target`` is ``None`` (the predicted class: argmax over dim 1 of a
``(batch, classes)`` output), an ``int``, a 1-D integer tensor of per-sample class indices (for an
N-d output such as keypoint heatmaps, an index selects that channel at every position), or a float
tensor of the output's shape used as a mask (``seed = mask * output``, for regression models).

Rule presets
------------
Each preset is an ordered list of (layer types, rule) pairs in ``lrp/presets.py``; the rules are
small classes in ``lrp/rules.py`` (``Epsilon``, ``ZPlus``, ``ZPlusNoBias``, ``Pass``,
``Proportional``, ``Gradient``, ``Sum``, ...).

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
overlapping windows ADDING (autograd's max-pool backward), and so are ``amax``/``max`` reductions
(global max pooling written as ``x.amax((2, 3))``); average pooling (also adaptive, and ``mean``/``sum``
reductions) distributes relevance in proportion to the inputs (epsilon rule on the pooling op, zennit's
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
* ``F.dropout(x, p)`` with ``training`` hard-coded True -> identity (eval semantics); torchvision's
  ``stochastic_depth`` -> identity; ``F.layer_norm``, ``F.group_norm`` & co. -> pass-through, as
  their modules;
* torchvision's ``SqueezeExcitation`` (MobileNetV3, EfficientNet, RegNetY: the input times a gate
  computed from it) -> pass-through to the gated signal, none to the gate (the usual treatment of
  multiplicative gates, Arras et al. 2017), by default wherever the model holds one;
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
A rule says which forward values its backward needs and which relevance it sends back; one
``torch.autograd.Function`` runs any rule, so autograd calls the rule instead of an operation's
ordinary backward. Every conv/linear layer of the private copy is replaced by a module whose
backward receives the relevance at the layer output and returns the relevance at its input
directly (``R_in = x * W^T (R_out / stabilise(z))`` for epsilon; z+ needs one extra forward with the
clamped weights), so autograd never runs the layer's ordinary backward, and the copy's parameters
have ``requires_grad`` off (no weight gradients). Activations get an identity backward. The
relevance at a layer's output is the gradient arriving at that output tensor: the traced graph
returns the captured outputs, and ONE ``torch.autograd.grad`` call lists them and the input (no
hooks). Measured on 2 CPU cores (bench/bench_lrp.py), all-layer relevance costs about 1.0-1.1x a
plain gradient-to-input pass for ``epsilon``, 1.1x for ``hudd`` and 1.4-1.5x for ``epsilon-plus``
(z+ needs one extra forward per convolution: 1.5x is its arithmetic limit), about half of zennit's
time.

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

The package
-----------
``rules.py`` the rules, one class each, and the autograd Function that runs them;
``presets.py`` the presets as (layer types, rule) lists, and the Composite that gives every module
and operation of one explainer its rule; ``layertypes.py`` the groups of torch layer types;
``ops.py`` functional operations and Tensor methods with their rules; ``affine.py`` conv/linear
operations, weights and the BatchNorm merge; ``graph.py`` the torch.fx trace and its rewrite
phases; ``fallback.py`` the mode for untraceable models; ``model.py`` the private copy;
``targets.py`` the seed; ``explainer.py`` the public entry points.
"""
from __future__ import annotations

from .explainer import LRPExplainer, default_layers, relevance
from .presets import PRESET_NAMES, RULE_PRESETS
from .rules import DEFAULT_EPSILON, NoRuleError

__all__ = [
    "DEFAULT_EPSILON",
    "PRESET_NAMES",
    "RULE_PRESETS",
    "LRPExplainer",
    "default_layers",
    "relevance",
]
