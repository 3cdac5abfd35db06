"""Tests of the LRP engine (the lrp package).

Independent oracles: conservation (a property of the epsilon rule on bias-free ReLU nets), zennit
(an independent LRP implementation, compared at EVERY layer), and a plain layer-by-layer
re-computation of the hudd formulas written with unfold/fold and explicit loops in this file.

The zennit comparisons run in float64: in float32 the epsilon and sum rules amplify summation-order
noise where |z| is small (zennit's own float32 result is ~3e-3 of max|R| off its float64 result on
resnet18), so float32 is only smoke-tested to 1e-2 of each layer's max |R|. BatchNorm layers of
the zennit test models get eps=0, because zennit's merged BatchNorm is not an exact identity (it
keeps eps, scaling by (1+eps)^-1/2 per BN, see test_zennit_merged_batchnorm_keeps_eps).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lrp  # noqa: E402
from architectures import AlexNet256, DemoNet  # noqa: E402
from zennit_oracle import assert_close, seed_of, zennit_composite, zennit_relevance  # noqa: E402

PRESETS = ["hudd", "epsilon", "epsilon-plus"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is fastest and robust to other load on the machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# helpers and small models
# ------------------------------------------------------------------------------------------------
def randomise_bn(model: nn.Module, eps: float | None = 0.0) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.6 - 0.3)
            if eps is not None:
                m.eps = eps
    return model


class BiasFreeNet(nn.Module):
    """Bias-free ReLU net: conv, overlapping max pool, conv, max pool, linear, linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU(),
            nn.MaxPool2d(3, stride=2),  # overlapping windows
            nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Linear(8 * 3 * 3, 12, bias=False), nn.ReLU(),
                                        nn.Linear(12, 5, bias=False))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class BiasFreeResidual(nn.Module):
    """Bias-free net with a functional residual addition and a functional relu."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 4, bias=False)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = self.conv2(F.relu(self.conv1(x)))
        x = F.relu(x + y)
        return self.fc(torch.flatten(self.pool(x), 1))


class SmallAlex(nn.Module):
    """AlexNet-style: conv-relu-maxpool-conv-relu-maxpool-flatten-linear-relu-linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
        )
        self.classifier = nn.Sequential(nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 6))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class SmallVGG(nn.Module):
    """VGG-style with BatchNorm, an adaptive average pool and dropout."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(  # in-place ReLUs, as torchvision's VGG
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((3, 3))
        self.classifier = nn.Sequential(nn.Linear(16 * 9, 20), nn.ReLU(), nn.Dropout(0.5),
                                        nn.Linear(20, 7))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def resnet18(num_classes=10):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return randomise_bn(torchvision.models.resnet18(num_classes=num_classes)).eval()


def module_state(model: nn.Module):
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": {k: (list(m._forward_hooks), list(m._forward_pre_hooks), list(m._backward_hooks),
                      list(getattr(m, "_backward_pre_hooks", {})))
                  for k, m in model.named_modules()},
        "grads": {k: p.grad is None for k, p in model.named_parameters()},
    }


def assert_same_state(before, model):
    after = module_state(model)
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    assert before["grads"] == after["grads"]
    for k, v in before["params"].items():
        assert torch.equal(v, after["params"][k]), f"parameter/buffer {k} changed"


# ------------------------------------------------------------------------------------------------
# conservation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["epsilon", "epsilon-plus"])
@pytest.mark.parametrize("net_cls, shape", [(BiasFreeNet, (3, 15, 15)),
                                            (BiasFreeResidual, (3, 8, 8))])
def test_conservation_bias_free(net_cls, shape, preset):
    """Bias-free ReLU nets: every layer's relevance (and the input's) sums to the explained output
    value, per sample (float64; the stabiliser leaks ~eps/|z|, far below the tolerance)."""
    torch.manual_seed(0)
    model = net_cls().double().eval()
    x = torch.randn(3, *shape, dtype=torch.float64)
    out = model(x)
    target = torch.tensor([0, 2, 3])
    explained = out.detach()[torch.arange(3), target]
    rel = lrp.relevance(model, x, target=target, rules=preset)
    sums = {name: r.reshape(len(r), -1).sum(1) for name, r in rel.items()}
    # every layer of a sequential net is a cut of the graph; in the residual net conv1/conv2 sit
    # on a branch (their relevance is the branch's share, conserved along the branch)
    cut = [k for k in rel if net_cls is BiasFreeNet or k in ("stem", "pool", "input")]
    assert len(cut) >= 3 and "input" in cut
    for name in cut:
        assert torch.allclose(sums[name], explained, rtol=1e-4, atol=0), (name, sums[name],
                                                                          explained)
    if net_cls is BiasFreeResidual:
        assert torch.allclose(sums["conv1"], sums["conv2"], rtol=1e-4, atol=0)
        assert not torch.allclose(sums["conv2"], explained, rtol=1e-2)  # a share, not the whole


def test_conservation_through_shufflenet_channel_split_shuffle_and_two_branch_input():
    """torchvision's ShuffleNet V2 splits channels (chunk), concatenates, shuffles them (view, transpose,
    view) and feeds one input to two branches. With BatchNorm's folded shifts and the classifier's bias
    at zero, LRP-epsilon keeps the whole relevance through every stage and to the input: the losses
    seen with its real shifts are theirs, as LRP-epsilon gives biases their share."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None   # settled statistics: a cumulative average over one batch
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 64, 64))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):   # folded bias beta - mean * gamma / sqrt(var + eps) = 0
                module.bias.copy_(module.running_mean * module.weight / torch.sqrt(module.running_var + module.eps))
        model.fc.bias.zero_()
    model = model.double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    explained = model(x).detach().max(1).values
    stages = ["stage2", "stage3.0", "stage4.0", "stage4", "conv5"]
    rel = lrp.relevance(model, x, rules="epsilon", layers=stages)
    for name in [*stages, "input"]:
        sums = rel[name].reshape(2, -1).sum(1)
        assert torch.allclose(sums, explained, rtol=1e-4, atol=0), (name, sums, explained)


# ------------------------------------------------------------------------------------------------
# against zennit
# ------------------------------------------------------------------------------------------------
def assert_matches_zennit(model, x, preset, canonizer, layers, tolerance, label):
    """Our relevance and zennit's at every given layer and the input, compared element-wise;
    returns our result so a caller can check more."""
    ours = lrp.relevance(model, x, rules=preset, layers=layers)
    ref = zennit_relevance(model, x, zennit_composite(preset, canonizer), layers, model(x).argmax(1))
    for name in ref:
        assert_close(ours[name], ref[name], tolerance, f"{label}/{preset}/{name}")
    return ours, ref


def _vgg():
    torch.manual_seed(0)
    return randomise_bn(SmallVGG()).eval()


@pytest.mark.parametrize("preset", ["epsilon", "epsilon-plus", "hudd"])
@pytest.mark.parametrize("arch", ["vgg", "resnet18"])
def test_matches_zennit_every_layer(arch, preset):
    pytest.importorskip("zennit")
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer
    if arch == "vgg":
        model, canon, shape, extra = _vgg(), SequentialMergeBatchNorm(), (3, 24, 24), []
    else:
        model, canon, shape, extra = (resnet18(), ResNetCanonizer(), (3, 64, 64),
                                      ["layer1.0", "layer2.0.downsample", "layer3", "layer2.0.bn1"])
    model = model.double()
    torch.manual_seed(1)
    x = torch.randn(2, *shape, dtype=torch.float64)
    layers = [p for _, p in lrp.default_layers(model)] + extra
    ours, ref = assert_matches_zennit(model, x, preset, canon, layers, 1e-4, arch)
    assert set(ours) == set(ref) == set(layers) | {"input"}


class ConvZoo(nn.Module):
    """Grouped conv with reflect padding on signed input, 'same' padding with an even kernel and
    dilation, a transposed conv followed by BatchNorm, a conv on signed input, average pooling."""

    def __init__(self):
        super().__init__()
        self.g = nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect")
        self.same = nn.Conv2d(6, 6, 4, padding="same", dilation=2, bias=False)
        self.up = nn.ConvTranspose2d(6, 5, 3, stride=2, padding=1, output_padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.signed = nn.Conv2d(5, 4, 3, stride=2)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        x = F.relu(self.g(x))
        x = F.relu(self.same(x))
        x = self.bn(self.up(x))  # no activation: the next conv sees signed input
        x = F.relu(self.signed(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(2, 5, 5, padding=2), nn.BatchNorm1d(5), nn.ReLU(),
                                      nn.MaxPool1d(3, 2), nn.Conv1d(5, 4, 3), nn.ReLU(),
                                      nn.AdaptiveAvgPool1d(4))
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


@pytest.mark.parametrize("preset", ["epsilon", "epsilon-plus", "hudd"])
@pytest.mark.parametrize("net_cls, shape", [(ConvZoo, (4, 7, 7)), (Conv1dNet, (2, 21))])
def test_matches_zennit_conv_variants(net_cls, shape, preset):
    """Conv variants (groups, padding modes, 'same', dilation, transposed + BN merge, 1-d) and
    z+ on signed inputs (split and stacked halves) agree with zennit at every layer."""
    pytest.importorskip("zennit")
    from zennit.canonizers import SequentialMergeBatchNorm
    torch.manual_seed(12)
    model = randomise_bn(net_cls()).double().eval()
    x = torch.randn(2, *shape, dtype=torch.float64)
    layers = [p for _, p in lrp.default_layers(model)]
    assert_matches_zennit(model, x, preset, SequentialMergeBatchNorm(), layers, 1e-4, net_cls.__name__)


@pytest.mark.parametrize("preset", ["epsilon", "epsilon-plus"])
def test_matches_zennit_float32(preset):
    """float32 smoke test: same as zennit to 1e-2 of each layer's max |R|. In float32 both
    implementations deviate from the float64 result (zennit by up to ~3e-3 of max|R| on this net,
    ours by ~9e-4: the epsilon/sum rules amplify summation-order noise where |z| is small), so the
    strict 1e-4 comparison is done in float64 (test_matches_zennit_every_layer)."""
    pytest.importorskip("zennit")
    from zennit.torchvision import ResNetCanonizer
    model = resnet18()
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32, 32)
    layers = [p for _, p in lrp.default_layers(model)]
    assert_matches_zennit(model, x, preset, ResNetCanonizer(), layers, 1e-2, "float32")


def test_zennit_merged_batchnorm_keeps_eps():
    """Deliberate difference: our BatchNorm merge is exact (the canonised forward reproduces the
    model's output, so the seed is the model's real logit); zennit's merged BN keeps eps and scales
    each BN output by (1+eps)^-1/2 (zennit 0.5.1: SequentialMergeBatchNorm sets running_var=1)."""
    pytest.importorskip("zennit")
    from zennit.torchvision import ResNetCanonizer
    model = randomise_bn(resnet18(), eps=1e-5).double()  # BatchNorm2d default eps
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    out = model(x).detach()
    last = "fc"
    ours = lrp.relevance(model, x, rules="epsilon", layers=[last])
    t = out.argmax(1)
    assert_close(ours[last], seed_of(out, t), 1e-12, "our seed is the model output")
    zen = zennit_relevance(model, x, zennit_composite("epsilon", ResNetCanonizer()), [last], t)
    zseed = zen[last][0, t[0]]
    assert abs(zseed - out[0, t[0]]) > 1e-7 * abs(out[0, t[0]])  # zennit is off


class ResidualFunctional(nn.Module):
    """Residual written inline with `+`: zennit would need a canoniser; we handle it."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        x = torch.relu(self.conv0(x))
        x = F.relu(self.conv2(F.relu(self.conv1(x))) + x)
        return self.fc(x.flatten(1))


class ResidualExplicitSum(ResidualFunctional):
    """The same net in zennit's canonical form (stack + zennit.layer.Sum, relu modules)."""

    def __init__(self):
        super().__init__()
        from zennit.layer import Sum
        self.sum = Sum()
        self.relu0, self.relu1, self.relu2 = nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x):
        x = self.relu0(self.conv0(x))
        y = self.conv2(self.relu1(self.conv1(x)))
        x = self.relu2(self.sum(torch.stack([y, x], dim=-1)))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("preset", ["epsilon", "epsilon-plus"])
def test_functional_residual_matches_zennit_canonical_form(preset):
    """Deliberate difference: `a + b` of two input-dependent tensors gets the proportional sum rule
    (zennit applies the plain gradient to functional additions; it matches only on its canonical
    form with a Sum module)."""
    pytest.importorskip("zennit")
    from zennit.canonizers import SequentialMergeBatchNorm
    torch.manual_seed(3)
    ours_model = ResidualFunctional().double().eval()
    ref_model = ResidualExplicitSum().double().eval()
    ref_model.load_state_dict(ours_model.state_dict(), strict=False)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    layers = ["conv0", "conv1", "conv2"]
    ours = lrp.relevance(ours_model, x, rules=preset, layers=layers)
    ref = zennit_relevance(ref_model, x, zennit_composite(preset, SequentialMergeBatchNorm()),
                           layers, ref_model(x).argmax(1))
    for name in ref:
        assert_close(ours[name], ref[name], 1e-8, name)
    # and zennit on the functional form (plain gradient at the add) differs
    plain = zennit_relevance(ours_model, x, zennit_composite(preset, SequentialMergeBatchNorm()),
                             layers, ref_model(x).argmax(1))
    assert not torch.allclose(plain["conv0"], ref["conv0"], rtol=1e-3, atol=1e-6)


class ScaledNet(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        h = h * self.scale
        return self.fc(F.relu(self.conv2(h)).flatten(1))


def test_arithmetic_with_constant_passes_relevance():
    """Deliberate difference: `h * c` (c constant) passes relevance unchanged (zennit: the gradient,
    which scales it by c). A net computing conv2(h * 0.5) gives the same relevance at conv1 as the
    net computing conv2'(h) with conv2' = conv2 with halved weights."""
    torch.manual_seed(4)
    a = ScaledNet(0.5).double().eval()
    b = ScaledNet(1.0).double().eval()
    b.load_state_dict(a.state_dict())
    b.conv2.weight.data *= 0.5
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert torch.allclose(a(x), b(x))
    ra = lrp.relevance(a, x, rules="epsilon", layers=["conv1"])
    rb = lrp.relevance(b, x, rules="epsilon", layers=["conv1"])
    assert_close(ra["conv1"], rb["conv1"], 1e-10, "conv1")
    assert_close(ra["input"], rb["input"], 1e-10, "input")


def test_stabiliser_is_sign_aware_and_zero_is_positive():
    """eps is added with the sign of z, and z == 0 counts as positive (zennit's convention). The
    sigmoid (pass-through) gives the zero pre-activation a non-zero relevance, so its sign shows."""
    lin1 = nn.Linear(2, 2, bias=False).double()
    lin2 = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        lin1.weight.copy_(torch.tensor([[1.0, -1.0], [2.0, -2.0000001]], dtype=torch.float64))
        lin2.weight.copy_(torch.tensor([[1.0, 1.0]]))
    model = nn.Sequential(lin1, nn.Sigmoid(), lin2).eval()
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    z1 = lin1(x)
    assert z1[0, 0] == 0 and -2e-7 < z1[0, 1] < 0
    h = torch.sigmoid(z1)
    out = lin2(h)
    r_h = h * lin2.weight * (out / (out + 1e-6))          # epsilon at the output layer
    den = z1 + 1e-6 * torch.tensor([[1.0, -1.0]], dtype=torch.float64)  # +eps at 0, -eps below
    r_x = x * ((r_h / den) @ lin1.weight)
    rel = lrp.relevance(model, x, target=0, rules="epsilon", layers=["0", "2"])
    assert_close(rel["2"], out.detach(), 1e-12, "seed")
    assert_close(rel["0"], r_h.detach(), 1e-12, "pass-through of the sigmoid")
    assert_close(rel["input"], r_x.detach(), 1e-9, "input")


# ------------------------------------------------------------------------------------------------
# hudd against a plain re-computation of its formulas
# ------------------------------------------------------------------------------------------------
EPS = 1e-6


def _stab(z):
    return z + EPS * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def _conv_forward_unfold(x, conv):
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    cols = F.unfold(x, k, padding=p, stride=s)  # (B, C*k*k, L)
    w = conv.weight.reshape(conv.out_channels, -1)
    z = torch.einsum("ok,bkl->bol", w, cols) + conv.bias.reshape(1, -1, 1)
    hout = (x.shape[2] + 2 * p[0] - k[0]) // s[0] + 1
    wout = (x.shape[3] + 2 * p[1] - k[1]) // s[1] + 1
    return z.reshape(x.shape[0], conv.out_channels, hout, wout)


def _conv_epsilon_unfold(x, conv, r_out):
    """z-rule with the PRE-activation z: R_in = x * (W^T (R / stab(z))), via unfold/fold."""
    z = _conv_forward_unfold(x, conv)
    s = (r_out / _stab(z)).reshape(x.shape[0], conv.out_channels, -1)
    w = conv.weight.reshape(conv.out_channels, -1)
    c_cols = torch.einsum("ok,bol->bkl", w, s)
    c = F.fold(c_cols, x.shape[2:], conv.kernel_size, padding=conv.padding, stride=conv.stride)
    return x * c


def _maxpool_wta_loops(x, k, s, r_out):
    """Winner-takes-all with explicit loops; overlapping windows add."""
    r_in = torch.zeros_like(x)
    b_, c_, ho, wo = r_out.shape
    for b in range(b_):
        for c in range(c_):
            for i in range(ho):
                for j in range(wo):
                    win = x[b, c, i * s:i * s + k, j * s:j * s + k]
                    flat = int(torch.argmax(win))
                    r_in[b, c, i * s + flat // k, j * s + flat % k] += r_out[b, c, i, j]
    return r_in


def _linear_zplus_nobias(x, lin, r_out):
    """z+ (alpha1-beta0) with the bias ignored; x >= 0 here (post-ReLU)."""
    assert (x >= 0).all()
    wp = lin.weight.clamp(min=0)
    z = x @ wp.T
    return x * ((r_out / _stab(z)) @ wp)


def test_hudd_matches_plain_formulas():
    torch.manual_seed(5)
    model = SmallAlex().double().eval()
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    f, c = model.features, model.classifier
    # forward, keeping every layer input
    z1 = _conv_forward_unfold(x, f[0]); a1 = z1.clamp(min=0)
    p1 = F.max_pool2d(a1, 3, 2)
    z2 = _conv_forward_unfold(p1, f[3]); a2 = z2.clamp(min=0)
    p2 = F.max_pool2d(a2, 3, 2)
    h0 = p2.reshape(2, -1)
    z3 = h0 @ c[0].weight.T + c[0].bias; a3 = z3.clamp(min=0)
    logits = a3 @ c[2].weight.T + c[2].bias
    assert torch.allclose(logits, model(x))
    # seed: one-hot(argmax) * raw logit
    r_out = seed_of(logits, logits.argmax(1))
    r_a3 = _linear_zplus_nobias(a3, c[2], r_out)          # = relevance at classifier.0 output
    r_h0 = _linear_zplus_nobias(h0, c[0], r_a3)           # = relevance at features.5 output
    r_p2 = r_h0.reshape(p2.shape)
    r_a2 = _maxpool_wta_loops(a2, 3, 2, r_p2)             # = relevance at features.3 output
    r_p1 = _conv_epsilon_unfold(p1, f[3], r_a2)           # = relevance at features.2 output
    r_a1 = _maxpool_wta_loops(a1, 3, 2, r_p1)             # = relevance at features.0 output
    r_x = _conv_epsilon_unfold(x, f[0], r_a1)
    expected = {"features.0": r_a1, "features.2": r_p1, "features.3": r_a2, "features.5": r_p2,
                "classifier.0": r_a3, "input": r_x}
    ours = lrp.relevance(model, x, rules="hudd")
    assert set(ours) == set(expected)
    for name, ref in expected.items():
        assert_close(ours[name], ref, 1e-8, name)
    # the hudd rules are not the epsilon rules (z+ on the linear layers makes a difference)
    eps = lrp.relevance(model, x, rules="epsilon")
    assert not torch.allclose(eps["features.5"], ours["features.5"], rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# targets and layer selection
# ------------------------------------------------------------------------------------------------
def test_targets_give_expected_seeds():
    torch.manual_seed(6)
    model = DemoNet(num_classes=8).eval()
    x = torch.randn(3, 3, 32, 32)
    out = model(x).detach()
    last = "classifier.3"  # the output layer: its relevance is the seed
    cases = {
        "none": (None, out.argmax(1)),
        "int": (5, torch.full((3,), 5)),
        "tensor": (torch.tensor([1, 7, 0]), torch.tensor([1, 7, 0])),
    }
    inputs = {}
    for name, (target, idx) in cases.items():
        rel = lrp.relevance(model, x, target=target, rules="epsilon", layers=[last])
        expected = torch.zeros_like(out)
        expected[torch.arange(3), idx] = out[torch.arange(3), idx]
        assert_close(rel[last], expected, 1e-6, name)
        inputs[name] = rel["input"]
    assert not torch.allclose(inputs["int"], inputs["tensor"])
    mask = torch.rand_like(out)
    rel = lrp.relevance(model, x, target=mask, rules="epsilon", layers=[last])
    assert_close(rel[last], mask * out, 1e-6, "mask")
    with pytest.raises(ValueError):
        lrp.relevance(model, x, target=8)
    with pytest.raises(ValueError):
        lrp.relevance(model, x, target=torch.tensor([0, 1]))


class _EndsIn(nn.Module):
    """DemoNet's logits followed by a final softmax or log-softmax written as a module, a function or a method."""

    def __init__(self, inner: nn.Module, how: str):
        super().__init__()
        self.inner, self.how = inner, how
        self.final = nn.Softmax(dim=1) if how == "Softmax" else nn.LogSoftmax(dim=1) if how == "LogSoftmax" else None

    def forward(self, x):
        logits = self.inner(x)
        if self.final is not None:
            return self.final(logits)
        return F.log_softmax(logits, dim=1) if self.how == "F.log_softmax" else logits.softmax(1)


@pytest.mark.parametrize("how", ["Softmax", "LogSoftmax", "F.log_softmax", "method softmax"])
def test_a_final_softmax_is_seen_through_to_the_logits(how):
    """The seed is the logit, not the probability or log-probability (which would scale each heatmap by
    p/z or log(p)/z: a log-softmax model's heatmaps all came out sign-flipped); the default layers are
    those of the logits model."""
    torch.manual_seed(7)
    logits_model = DemoNet(num_classes=6).eval()
    x = torch.randn(4, 3, 32, 32)
    wrapped = _EndsIn(logits_model, how).eval()
    plain = lrp.relevance(logits_model, x)
    layers = lrp.default_layers(wrapped, example_input=x)
    assert [path for _, path in layers] == ["inner." + path for _, path in lrp.default_layers(logits_model, example_input=x)]
    ended = lrp.relevance(wrapped, x)
    assert_close(ended["input"], plain["input"], 1e-6, how)
    for _, path in layers:
        assert_close(ended[path], plain[path[len("inner."):]], 1e-6, path)


def test_resnet_block_layer():
    model = resnet18()
    x = torch.randn(2, 3, 32, 32)
    shapes = {}
    h = model.layer1[0].register_forward_hook(lambda m, i, o: shapes.__setitem__("b", o.shape))
    model(x)
    h.remove()
    rel = lrp.relevance(model, x, rules="epsilon-plus", layers=["layer1.0"])
    assert list(rel) == ["layer1.0", "input"]
    assert rel["layer1.0"].shape == shapes["b"]
    assert rel["input"].shape == x.shape
    assert torch.isfinite(rel["layer1.0"]).all() and rel["layer1.0"].abs().sum() > 0
    # relevance at the block output is the relevance that the next block receives at its input
    both = lrp.relevance(model, x, rules="epsilon-plus", layers=["layer1.0", "layer1.1.conv1"])
    assert_close(both["layer1.0"], rel["layer1.0"], 1e-5, "layer1.0")


def test_bad_layer_names():
    model = DemoNet().eval()
    with pytest.raises(ValueError, match="no module named"):
        lrp.LRPExplainer(model, layers=["features.99"])
    model = resnet18()
    with pytest.raises(ValueError, match="called 2 times"):
        lrp.LRPExplainer(model, layers=["layer1.0.relu"])  # a shared ReLU: ambiguous


def test_default_layers_demonet_and_alexnet():
    expected_demo = ["features.0", "features.2", "features.3", "features.5", "features.6",
                     "features.8", "classifier.1"]
    got = lrp.default_layers(DemoNet())
    assert got == [(f"Layer{i + 1}", p) for i, p in enumerate(expected_demo)]
    with torch.device("meta"):
        alex = AlexNet256(num_classes=10)
    expected_alex = ["features.0", "features.2", "features.3", "features.5", "features.6",
                     "features.8", "features.10", "features.12", "classifier.1", "classifier.4"]
    assert lrp.default_layers(alex) == [(f"Layer{i + 1}", p) for i, p in enumerate(expected_alex)]
    # the explainer selects the same layers, in the same order
    model = DemoNet().eval()
    rel = lrp.relevance(model, torch.randn(1, 3, 32, 32))
    assert list(rel) == expected_demo + ["input"]


def test_default_layers_execution_order_not_registration_order():
    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)        # registered first, runs last
            self.pool = nn.AdaptiveMaxPool2d(2)
            self.conv = nn.Conv2d(3, 2, 3)   # registered last, runs first

        def forward(self, x):
            return self.fc(self.pool(self.conv(x)).flatten(1))

    assert lrp.default_layers(Reordered()) == [("Layer1", "conv"), ("Layer2", "pool")]


class InplaceNotAssigned(nn.Module):
    """Relies on in-place mutation without re-assigning the result."""

    def __init__(self, assign: bool):
        super().__init__()
        self.assign = assign
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        h = self.conv(x)
        if self.assign:
            h = self.relu(h)
            g = self.conv2(h).relu()
        else:
            self.relu(h)
            g = self.conv2(h)
            g.relu_()
        return self.fc(g.flatten(1))


def test_inplace_operations_keep_their_meaning():
    torch.manual_seed(13)
    a, b = InplaceNotAssigned(False).eval(), InplaceNotAssigned(True).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(a(x.clone()), b(x.clone()))
    ra, rb = lrp.relevance(a, x, rules="epsilon"), lrp.relevance(b, x, rules="epsilon")
    assert list(ra) == list(rb) == ["conv", "conv2", "input"]
    for k in ra:
        assert torch.allclose(ra[k], rb[k], rtol=1e-5, atol=1e-8), k
    assert a.relu.inplace is True


# ------------------------------------------------------------------------------------------------
# the user's model is left alone
# ------------------------------------------------------------------------------------------------
def test_model_untouched_after_call_and_after_error():
    torch.manual_seed(7)
    model = randomise_bn(SmallVGG(), eps=None)
    model.train()
    model.features[0].weight.requires_grad_(False)
    calls = []
    model.features[4].register_forward_hook(lambda m, i, o: calls.append(1))
    before = module_state(model)
    x = torch.randn(2, 3, 24, 24)
    rel = lrp.relevance(model, x, rules="epsilon-plus")
    assert_same_state(before, model)
    assert model.training and model.features[1].training
    assert model.features[2].inplace is True
    # results are those of eval mode (dropout off, BN running statistics)
    ref_model = copy.deepcopy(model).eval()
    ref = lrp.relevance(ref_model, x, rules="epsilon-plus")
    for k in ref:
        assert torch.allclose(rel[k], ref[k], rtol=1e-5, atol=1e-7), k
    # an input of the wrong shape fails in the middle of the forward pass
    with pytest.raises(RuntimeError):
        lrp.relevance(model, torch.randn(2, 5, 24, 24), rules="hudd")
    assert_same_state(before, model)
    # every hook dict of a model without user hooks stays empty
    plain = DemoNet()
    with pytest.raises(RuntimeError):
        lrp.relevance(plain, torch.randn(1, 3, 20, 20))
    lrp.relevance(plain, torch.randn(1, 3, 32, 32))
    for m in plain.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert torch.is_grad_enabled()


def test_works_under_no_grad_and_leaves_input_alone():
    model = DemoNet().eval()
    x = torch.randn(2, 3, 32, 32)
    ref = lrp.relevance(model, x)
    with torch.no_grad():
        rel = lrp.relevance(model, x)
        assert not torch.is_grad_enabled()
    for k in ref:
        assert torch.equal(ref[k], rel[k])
        assert not rel[k].requires_grad
    assert not x.requires_grad and x.grad is None


# ------------------------------------------------------------------------------------------------
# batching and reuse
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
def test_batch_equals_stacked_single_images(preset):
    torch.manual_seed(8)
    model = _vgg()
    x = torch.randn(4, 3, 24, 24)
    explainer = lrp.LRPExplainer(model, rules=preset)
    batch = explainer(x)
    singles = [explainer(x[i:i + 1]) for i in range(4)]
    for k in batch:
        stacked = torch.cat([s[k] for s in singles])
        assert_close(batch[k], stacked, 1e-4, k)


def test_explainer_reuse_equals_relevance():
    torch.manual_seed(9)
    model = DemoNet().eval()
    ex = lrp.LRPExplainer(model, rules="hudd")
    for _ in range(2):
        x = torch.randn(3, 3, 32, 32)
        a, b = ex(x, target=2), lrp.relevance(model, x, target=2)
        assert list(a) == list(b)
        for k in a:
            assert torch.equal(a[k], b[k])


def test_weights_get_no_gradients_and_no_ordinary_conv_backward():
    """One modified backward: the conv/linear layers' ordinary backward never runs."""
    model = DemoNet().eval()
    ex = lrp.LRPExplainer(model, rules="epsilon")
    x = torch.randn(2, 3, 32, 32)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ex(x)
    names = [e.key for e in prof.key_averages()]
    assert not any("ConvolutionBackward" in n or "AddmmBackward" in n for n in names), names
    assert sum(e.count for e in prof.key_averages() if e.key == "aten::convolution_backward") == 3
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# fallback (untraceable models) and unsupported layers
# ------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


class TraceableNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.block = Block()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 5)

    def body(self, x):
        return self.block(self.relu(self.bn(self.stem(x))))

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.body(x)), 1))


class UntraceableNet(TraceableNet):
    def forward(self, x):
        x = self.body(x)
        if x.sum() > -1e30:  # data-dependent control flow: torch.fx cannot trace this
            x = self.pool(x)
        return self.fc(torch.flatten(x, 1))


@pytest.mark.parametrize("preset", PRESETS)
def test_fallback_mode_matches_traced(preset):
    torch.manual_seed(10)
    traced_model = randomise_bn(TraceableNet(), eps=None).eval()
    fallback_model = UntraceableNet().eval()
    fallback_model.load_state_dict(traced_model.state_dict())
    x = torch.randn(3, 3, 8, 8)
    a = lrp.LRPExplainer(traced_model, rules=preset)
    with pytest.warns(RuntimeWarning, match="falling back"):
        b = lrp.LRPExplainer(fallback_model, rules=preset)
    assert a.mode == "fx" and b.mode == "hooks"
    ra, rb = a(x), b(x)
    assert list(ra) == list(rb)
    assert list(ra)[:3] == ["stem", "block.conv1", "block.conv2"]
    for k in ra:
        assert_close(rb[k], ra[k], 1e-5, k)
    assert lrp.default_layers(fallback_model, example_input=x) == lrp.default_layers(traced_model)
    rb2 = b(x)  # prepared once, reused
    for k in rb:
        assert torch.equal(rb[k], rb2[k])


def test_unsupported_layers_raise_clear_errors():
    class WithBilinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.mix = nn.Bilinear(4, 4, 2)

        def forward(self, x):
            h = self.fc(x)
            return self.mix(h, h)

    with pytest.raises(ValueError, match="'mix'.*Bilinear"):
        lrp.LRPExplainer(WithBilinear())

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.fc = nn.Linear(3 * 4 * 4, 2)

        def forward(self, x):
            x = x * torch.sigmoid(self.conv(x))  # product of two input-dependent tensors
            return self.fc(x.flatten(1))

    with pytest.raises(lrp.NoRuleError, match="mul") as raised:   # a ValueError, told apart by its type
        lrp.relevance(Gated(), torch.randn(1, 3, 4, 4))
    # the message advises a caller of the engine; its reason alone is what a command line shows
    assert "module_rules" in str(raised.value) and "module_rules" not in raised.value.reason
    assert str(raised.value).startswith(raised.value.reason)


def test_module_rules_for_custom_types():
    class Swish(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.act = Swish()
            self.fc = nn.Linear(4 * 2 * 2, 3)

        def forward(self, x):
            return self.fc(self.act(self.conv(x)).flatten(1))

    torch.manual_seed(11)
    net = Net().double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError):
        lrp.relevance(net, x)
    rel = lrp.LRPExplainer(net, rules="epsilon", module_rules={Swish: "pass"})(x)
    # pass-through: the relevance at the activation's input equals the one at its output
    h = net.act(net.conv(x))
    s = seed_of(net.fc(h.flatten(1)), net(x).argmax(1))
    z = net.fc(h.flatten(1))
    expected = h * ((s / _stab(z)) @ net.fc.weight).reshape(h.shape)
    assert_close(rel["conv"], expected, 1e-10, "conv")


def test_torchvision_loaded_after_the_engine_still_gives_stochastic_depth_its_rule():
    """The engine does not import torchvision (seconds of torch._dynamo); a model built from it later, whose
    StochasticDepth module calls the fx-wrapped stochastic_depth, is explained as the same model without
    it. In a fresh process: the rule, once added, stays for the rest of this one."""
    code = """
import sys
sys.path.insert(0, {repo!r})
import torch, lrp
assert "torchvision" not in sys.modules
from torchvision.ops import StochasticDepth
from torch import nn
torch.manual_seed(0)
body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3)).double().eval()
with_depth = nn.Sequential(body[0], body[1], StochasticDepth(0.5, "row"), body[2], body[3]).double().eval()
x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
plain, deep = (lrp.LRPExplainer(net, rules="epsilon")(x)["input"] for net in (body, with_depth))
print("largest difference", float((plain - deep).abs().max()))
""".format(repo=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-800:]
    assert float(result.stdout.split()[-1]) < 1e-12


def test_torchvision_gating_and_stochastic_depth_get_their_rules_by_default():
    """Squeeze-and-excitation (MobileNetV3, EfficientNet) passes its relevance to the gated signal, as
    module_rules {SqueezeExcitation: "pass"} would; stochastic depth and a functional layer norm in eval
    mode are the identity and pass-through: the same relevance as the network without them."""
    from torchvision.ops import SqueezeExcitation, stochastic_depth

    class Net(nn.Module):
        def __init__(self, extras: bool):
            super().__init__()
            self.conv, self.extras = nn.Conv2d(3, 4, 3), extras
            self.se = SqueezeExcitation(4, 2)
            self.fc = nn.Linear(4 * 2 * 2, 3)

        def forward(self, x):
            h = self.se(torch.relu(self.conv(x)))
            if self.extras:
                h = stochastic_depth(h, 0.5, "row", self.training)
                h = nn.functional.layer_norm(h, h.shape[1:])
            return self.fc(h.flatten(1))

    torch.manual_seed(12)
    net = Net(extras=False).double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    default = lrp.LRPExplainer(net, rules="epsilon")(x)
    # pass-through: the relevance at the block's input equals the one at its output
    h = net.se(torch.relu(net.conv(x)))
    z = net.fc(h.flatten(1))
    expected = h * ((seed_of(z, z.argmax(1)) / _stab(z)) @ net.fc.weight).reshape(h.shape)
    assert_close(default["conv"], expected, 1e-10, "conv")
    explicit = lrp.LRPExplainer(net, rules="epsilon", module_rules={SqueezeExcitation: "pass"})(x)
    assert_close(default["input"], explicit["input"], 1e-12, "input")
    with_extras = Net(extras=True).double().eval()
    with_extras.load_state_dict(net.state_dict())
    rel = lrp.LRPExplainer(with_extras, rules="epsilon")(x)
    assert set(rel) >= {"conv", "input"}   # explained, no "no relevance rule" error


class GatedNet(nn.Module):
    """A conv, a squeeze-and-excitation block (a pool and two convs inside), a linear head; with
    `untraceable`, data-dependent control flow that torch.fx cannot trace."""

    def __init__(self, untraceable: bool = False):
        from torchvision.ops import SqueezeExcitation
        super().__init__()
        self.untraceable = untraceable
        self.conv, self.se, self.fc = nn.Conv2d(3, 4, 3), SqueezeExcitation(4, 2), nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        if not self.untraceable or h.sum() > -1e30:
            h = self.se(h)
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("untraceable", [False, True])
def test_default_layers_leave_out_the_layers_inside_a_squeeze_and_excitation_block(untraceable):
    """MobileNetV3 and EfficientNet: the pool and convs inside a gating block see no relevance of their
    own (the block passes it whole to the gated signal); listing them failed every explanation of the
    default layers ("module 'features.1.block.1.avgpool' is not called")."""
    torch.manual_seed(13)
    traced, net = GatedNet().double().eval(), GatedNet(untraceable).double().eval()
    net.load_state_dict(traced.state_dict())
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert lrp.default_layers(net, example_input=x) == [("Layer1", "conv")]   # the block is no conv or pool
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # the fallback mode's warning
        rel = lrp.relevance(net, x, rules="epsilon", layers=["conv", "se"])
    expected = lrp.LRPExplainer(traced, rules="epsilon", layers=["conv", "se"])(x)
    assert set(rel) == {"conv", "se", "input"}
    for key in rel:
        assert_close(rel[key], expected[key], 1e-10, key)


GLOBAL_POOLS = {"sum": lambda h: h.sum((2, 3)), "mean": lambda h: h.mean((2, 3)), "amax": lambda h: h.amax((2, 3)),
                "torch.amax": lambda h: torch.amax(h, dim=(2, 3)), "max": lambda h: h.flatten(2).max(dim=2).values,
                "pool": lambda h: F.adaptive_max_pool2d(h, 1).flatten(1)}


class PooledNet(nn.Module):
    """A convolution, a global pooling over the positions written as GLOBAL_POOLS[how], a linear layer."""

    def __init__(self, how):
        super().__init__()
        self.how, self.conv, self.fc = how, nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(GLOBAL_POOLS[self.how](torch.relu(self.conv(x))))


def pooled_pair(how: str, like: str, seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    ours, theirs = PooledNet(how).double().eval(), PooledNet(like).double().eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def test_a_sum_over_the_positions_distributes_relevance_as_the_mean_does():
    """Global sum pooling (x.sum((2, 3))) crashed the backward pass (in-place product on the sum's broadcast
    gradient). Summing, then a linear layer, is averaging, then the layer with weights times the positions:
    the same outputs, the same contributions, so the same relevance."""
    summed, averaged = pooled_pair("sum", "mean", seed=15)
    with torch.no_grad():
        averaged.fc.weight.mul_(36)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(summed(x), averaged(x))
    ours, expected = lrp.relevance(summed, x, rules="epsilon"), lrp.relevance(averaged, x, rules="epsilon")
    for key in ("conv", "input"):   # up to the stabiliser (1e-6), added to a sum 36 times a mean
        assert_close(ours[key], expected[key], 1e-4, key)


@pytest.mark.parametrize("how", ["amax", "max", "torch.amax"])
def test_a_max_over_the_positions_is_winner_takes_all_as_max_pooling(how):
    ours, pooled = pooled_pair(how, "pool", seed=16)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    got, expected = lrp.relevance(ours, x, rules="epsilon"), lrp.relevance(pooled, x, rules="epsilon")
    for key in ("conv", "input"):
        assert_close(got[key], expected[key], 1e-12, key)


def test_a_layer_inside_a_gating_block_is_refused_by_name():
    with pytest.raises(ValueError, match=r"'se\.fc1' lies inside 'se' \(SqueezeExcitation\)"):
        lrp.LRPExplainer(GatedNet().eval(), layers=["conv", "se.fc1"])


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "efficientnet_b0"])
def test_torchvision_gated_architectures_explain_their_default_layers(arch):
    import torchvision
    torch.manual_seed(14)
    model = torchvision.models.get_model(arch, weights=None, num_classes=3).eval()
    layers = [p for _, p in lrp.default_layers(model)]
    assert layers and not any(".avgpool" in p and ".block." in p for p in layers)
    rel = lrp.relevance(model, torch.randn(2, 3, 32, 32), layers=layers)
    assert set(rel) == {*layers, "input"} and all(torch.isfinite(r).all() for r in rel.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    """Same relevance on CUDA as on CPU (float64: no TF32 convolutions), results on the GPU."""
    model = _vgg().double()
    x = torch.randn(3, 3, 24, 24, dtype=torch.float64)
    for preset in PRESETS:
        cpu = lrp.relevance(model, x, rules=preset)
        explainer = lrp.LRPExplainer(model.cuda(), rules=preset)
        model.cpu()
        gpu = explainer(x.cuda())
        for k in cpu:
            assert gpu[k].device.type == "cuda"
            assert_close(gpu[k].cpu(), cpu[k], 1e-6, k)
    # a CPU-prepared explainer follows its inputs to the GPU
    ex = lrp.LRPExplainer(model, rules="epsilon")
    gpu = ex(x.cuda())
    assert all(v.device.type == "cuda" for v in gpu.values())


def test_input_relevance_can_be_left_out_and_the_layer_is_unchanged():
    """The assignment step asks for one layer only: the backward stops there, the values are equal."""
    from architectures import DemoNet
    torch.manual_seed(0)
    model = DemoNet(num_classes=4).eval()
    x = torch.randn(3, 3, 32, 32)
    explainer = lrp.LRPExplainer(model, rules="hudd", layers=["features.5"])
    full = explainer(x)
    short = explainer(x, input_relevance=False)
    assert set(short) == {"features.5"}
    torch.testing.assert_close(short["features.5"], full["features.5"], rtol=0, atol=0)
