"""The spaces the cluster step can cluster error images in (setting `features`), behind one interface.

- `heatmaps`: HUDD's LRP relevance of each layer (the heatmap step's files). The default: the method.
- `activations`: the same layers' activations (each module's output for the image; Layer0: the input).
- `backbone`: black-box features of the images alone, as SAFE (Attaoui et al.) does: the input of the
  last linear layer of a network the user gives (setting `backbone`: a torchvision architecture name,
  a built-in one or path/to/file.py:Class; `backbone_weights`: its state_dict file), on the images
  resized to 224 x 224 with ImageNet normalisation. One layer, `Backbone`. No weights are downloaded.
- `pixels`: the model's input (the images as the model sees them); one layer, `Pixels`. The yardstick
  of `--compare`: a feature space that does not beat it has not earned its cost.

A space gives, for a layer, one row per error image (in the heatmap step's index order; any trailing
shape) and, for the assignment step, the rows of any image set batch by batch, so improvement images
are compared with the error images in the same space.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

import heatmapModule
from Helper import (IMAGENET_MEAN, IMAGENET_STD, HuddError, ImageSet, RunContext, Settings, build_architecture,
                    file_digest, first_line_of, make_loader, stop_on_unreadable)
from lrp import LRPExplainer

Batches = Iterator[tuple[np.ndarray, np.ndarray]]   # (positions in the image set, rows of those images)


class FeatureSpace:
    """One way of describing an image as a vector. A subclass says which layers it offers and
    computes the rows of a batch; `error_rows` gathers them for the error images."""

    name = ""

    def layers(self, ctx: RunContext) -> list[str]:
        return list(heatmapModule.read_layers(ctx.paths)["layer"])

    def layer_before_output(self, ctx: RunContext) -> str | None:
        """The layer the choice of layer passes over (clustering.select_layer): the last one, which by
        default (lrp.default_layers leaves the output layer out) lies right before the output; None where
        the user named the layers (`layers`), since theirs need not end there."""
        return None if ctx.settings.layers else self.layers(ctx)[-1]

    def inputs(self, ctx: RunContext) -> dict:
        """What decides the rows, besides the heatmap step's outputs (for the cluster step's fingerprint)."""
        return {"features": self.name}

    def settings(self, ctx: RunContext) -> Settings:
        """How images are read for this space: as the model reads them."""
        return ctx.settings

    def batch_rows(self, ctx: RunContext, layer: str, inputs: torch.Tensor, channels: torch.Tensor) -> np.ndarray:
        """The rows of a batch of images read with `settings`; `channels`: what LRP explains for each."""
        raise NotImplementedError

    def image_rows(self, ctx: RunContext, layer: str, image_set: ImageSet, channels: torch.Tensor) -> Batches:
        """(positions, rows) of every image of a set (a torchrun rank's shard is a subset of its own,
        starting at a multiple of the batch size: the one-process run's batches), batch by batch."""
        loader = make_loader(image_set, self.settings(ctx), ctx.settings.batch_size, ctx.settings.workers)
        for inputs, _labels, positions, failures in loader:
            stop_on_unreadable(image_set, failures)
            yield positions.numpy(), self.batch_rows(ctx, layer, inputs.to(ctx.device), channels[positions])

    def error_rows(self, ctx: RunContext, layer: str) -> np.ndarray:
        """(error images, ...) in the heatmap index order (kept for the run: several steps ask)."""
        return ctx.memo(f"{self.name} rows of {layer}", lambda: self._gather(ctx, layer))

    def read_ahead(self, ctx: RunContext) -> None:
        """Every layer's error rows now (kept, as error_rows keeps them), before the cluster step starts its
        threads. Their forward passes read the images with DataLoader workers, forked processes; forked while
        a thread of the step imports (it imports matplotlib ahead, and matplotlib imports PIL's plugins), a
        worker inherits a module lock that nothing will release, and PIL's own lazy plugin import in it then
        waits forever (2 hangs in 14 torchrun runs of a resnet18 case with `features` activations)."""
        for layer in self.layers(ctx):
            self.error_rows(ctx, layer)

    def _gather(self, ctx: RunContext, layer: str) -> np.ndarray:
        index = heatmapModule.read_index(ctx.paths)
        errors = error_image_set(ctx, index)
        channels = ctx.task.explained_channels(index, ctx.classes)
        return np.concatenate([rows for _positions, rows in self.image_rows(ctx, layer, errors, channels)])


def error_image_set(ctx: RunContext, index) -> ImageSet:
    return ImageSet(name="error images", root=ctx.paths.set_dir("test"),
                    paths=[ctx.paths.root / p for p in index["image"]], labels=[0] * len(index), classes=ctx.classes)


class HeatmapSpace(FeatureSpace):
    """LRP relevance at a layer's output, as the heatmap step computes it (its files for the errors)."""

    name = "heatmaps"

    def error_rows(self, ctx: RunContext, layer: str) -> np.ndarray:
        return heatmapModule.open_layer(ctx.paths, layer)

    def read_ahead(self, ctx: RunContext) -> None:
        """Nothing: the rows are the heatmap step's files, opened as each layer is clustered."""

    def batch_rows(self, ctx, layer, inputs, channels) -> np.ndarray:
        explainer, module, output_shape = ctx.memo(f"explainer of {layer}", lambda: self._explainer(ctx, layer, inputs))
        target = ctx.task.lrp_target(channels, output_shape, ctx.device)
        return explainer(inputs, target=target, input_relevance=module == "input")[module].float().cpu().numpy()

    @staticmethod
    def _explainer(ctx: RunContext, layer: str, example: torch.Tensor):
        """Relevance of that layer only: the backward pass stops there."""
        module = heatmapModule.module_of(ctx.paths, layer)
        explainer = LRPExplainer(ctx.model(), rules=ctx.settings.rules, layers=None if module == "input" else [module])
        return explainer, module, ctx.task.output_shape(ctx.model(), example)


class ActivationSpace(FeatureSpace):
    """The outputs of the heatmap step's layers; Layer0 is the input itself."""

    name = "activations"

    def batch_rows(self, ctx, layer, inputs, channels) -> np.ndarray:
        return self._outputs(ctx, inputs, [layer])[layer]

    def error_rows(self, ctx: RunContext, layer: str) -> np.ndarray:
        """Every layer's activations come from one pass over the error images (kept for the run)."""
        return ctx.memo("activations of the error images", lambda: self._every_layer(ctx))[layer]

    def _every_layer(self, ctx: RunContext) -> dict[str, np.ndarray]:
        index = heatmapModule.read_index(ctx.paths)
        errors = error_image_set(ctx, index)
        layers, blocks = self.layers(ctx), {}
        for inputs, _labels, _positions, failures in make_loader(errors, ctx.settings, ctx.settings.batch_size,
                                                                 ctx.settings.workers):
            stop_on_unreadable(errors, failures)
            for layer, block in self._outputs(ctx, inputs.to(ctx.device), layers).items():
                blocks.setdefault(layer, []).append(block)
        return {layer: np.concatenate(parts) for layer, parts in blocks.items()}

    @staticmethod
    def _outputs(ctx: RunContext, inputs: torch.Tensor, layers: list[str]) -> dict[str, np.ndarray]:
        """The named layers' outputs for a batch, from one forward pass (Layer0: the input)."""
        modules = dict(ctx.model().named_modules())
        module_of = ctx.memo("module of each layer", lambda: dict(heatmapModule.read_layers(ctx.paths)[["layer", "module"]]
                                                                   .itertuples(index=False)))  # read once, not per batch
        paths = {layer: module_of[layer] for layer in layers}
        found: dict[str, np.ndarray] = {}
        hooks = [modules[path].register_forward_hook(
            lambda _m, _args, output, name=layer: found.__setitem__(name, output.detach().float().cpu().numpy()))
            for layer, path in paths.items() if path != "input"]
        try:
            with torch.no_grad():
                ctx.model()(inputs)
        finally:
            for hook in hooks:
                hook.remove()
        found.update({layer: inputs.detach().float().cpu().numpy() for layer, path in paths.items() if path == "input"})
        return found


class PixelSpace(FeatureSpace):
    """The images as the model sees them (resized and normalised)."""

    name = "pixels"
    LAYER = "Pixels"

    def layers(self, ctx: RunContext) -> list[str]:
        return [self.LAYER]

    def batch_rows(self, ctx, layer, inputs, channels) -> np.ndarray:
        return inputs.detach().float().cpu().numpy()


class BackboneSpace(FeatureSpace):
    """The input of the last linear layer of a user-given network, on 224 x 224 images with ImageNet
    normalisation (how torchvision's classifiers are trained)."""

    name = "backbone"
    LAYER = "Backbone"

    def layers(self, ctx: RunContext) -> list[str]:
        return [self.LAYER]

    def inputs(self, ctx: RunContext) -> dict:
        return {"features": self.name, "backbone": ctx.settings.backbone,
                "weights": file_digest(backbone_weights_path(ctx))}

    def settings(self, ctx: RunContext) -> Settings:
        channels = ctx.settings.channels
        return replace(ctx.settings, input_size=[224, 224], resize="resize", mean=list(IMAGENET_MEAN)[:channels],
                       std=list(IMAGENET_STD)[:channels])

    def batch_rows(self, ctx, layer, inputs, channels) -> np.ndarray:
        network = ctx.memo("backbone network", lambda: load_backbone(ctx).to(ctx.device))
        last = [m for m in network.modules() if isinstance(m, nn.Linear)][-1]
        return input_of(network, last, inputs)


def input_of(network: nn.Module, module: nn.Module, inputs: torch.Tensor) -> np.ndarray:
    """What `module` receives when `network` runs on a batch."""
    found = []
    hook = module.register_forward_hook(lambda _m, args, _output: found.append(args[0]))
    try:
        with torch.no_grad():
            network(inputs)
    finally:
        hook.remove()
    return found[-1].detach().float().cpu().numpy()


def backbone_weights_path(ctx: RunContext) -> Path:
    s = ctx.settings
    if not s.backbone or not s.backbone_weights:
        raise HuddError("features 'backbone' needs the settings backbone (an architecture, e.g. resnet18) and "
                        "backbone_weights (its state_dict file) in hudd.json; no weights are ever downloaded")
    path = Path(s.backbone_weights)
    path = path if path.is_absolute() else ctx.paths.root / path
    if not path.is_file():
        raise HuddError(f"{path}: backbone_weights file not found; give a state_dict saved with torch.save")
    return path


def load_backbone(ctx: RunContext) -> nn.Module:
    """The backbone network with the user's weights; its number of outputs is read from the weights."""
    path = backbone_weights_path(ctx)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise HuddError(f"{path}: cannot be read as a state_dict ({type(exc).__name__}); save the backbone's "
                        "state_dict() with torch.save") from None
    matrices = [v for v in state.values() if isinstance(v, torch.Tensor) and v.ndim == 2]
    if not matrices:
        raise HuddError(f"{path}: holds no linear layer; the backbone's features are the input of its last one")
    network = build_architecture(ctx.settings.backbone, int(matrices[-1].shape[0]), ctx.settings.channels)
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise HuddError(f"{path}: does not fit backbone {ctx.settings.backbone!r} ({first_line_of(exc)})") from None
    return network.eval()


SPACES = {space.name: space for space in (HeatmapSpace, ActivationSpace, BackboneSpace, PixelSpace)}


def make_space(name: str) -> FeatureSpace:
    return SPACES[name]()
