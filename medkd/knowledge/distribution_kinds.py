"""Route kinds that compare softmax distributions other than per pixel: channel-wise distillation (``channel``) and
DIST (``dist``), registered like the kinds of :mod:`medkd.knowledge.route_kinds` (:mod:`medkd.knowledge` imports
this module, so that routes can name them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from medkd.errors import ConfigError
from medkd.knowledge.losses import ChannelWiseDistillationLoss, DISTLoss, channel_adapter, resize_to
from medkd.knowledge.route import LayerDefaults, Route, RouteKind, StepOutputs, number, register_kind
from medkd.knowledge.route_kinds import LayerPairsKind

__all__ = ["CHANNEL_SIGNALS", "ChannelKind", "DistKind"]

CHANNEL_SIGNALS = ("predictions", "features")


class ChannelKind(LayerPairsKind):
    """Channel-wise distillation (Shu et al., ICCV 2021; :class:`medkd.knowledge.losses.ChannelWiseDistillationLoss`):
    each channel's map, a softmax over the spatial positions at temperature ``τ``, and
    ``τ² · KL(source ‖ target)`` summed over the positions, averaged over the channels and the batch. 2D or 3D.

    - ``signal: "predictions"`` (default): the segmentation logits, one channel per class; no adapter, reads no
      feature maps.
    - ``signal: "features"``: the paired layers' maps, the target's through a 1x1 convolution adapter when the
      channel counts differ (one per pair, trained with the target) and resized to the source's size, as
      :class:`medkd.knowledge.route_kinds.FeatureKind` does; ``layers`` as in :class:`LayerPairsKind` (default the
      bottleneck; ``"last_decoder"`` the decoder layer just before the output), the term the mean over the pairs.

    Options: ``signal``, ``temperature`` (default 4), ``layers`` (features only). A predictions route takes
    ``kd_weight`` (``peer_prediction_weight`` between students), a features route ``hint_weight``
    (``peer_feature_weight``).
    """

    name = "channel"
    options = {"signal": "predictions", "temperature": 4.0, "layers": None}

    @classmethod
    def validate(cls, route: str, options: dict[str, Any]) -> dict[str, Any]:
        if options["signal"] not in CHANNEL_SIGNALS:
            raise ConfigError(f"route {route} has signal {options['signal']!r}; use one of {list(CHANNEL_SIGNALS)}.")
        options["temperature"] = number(options["temperature"], f"the temperature of route {route}", positive=True)
        if options["signal"] == "predictions" and options["layers"] is not None:
            raise ConfigError(f"route {route} reads no layers with signal 'predictions'; remove 'layers'.")
        return super().validate(route, options)

    @classmethod
    def role(cls, options: Mapping[str, Any]) -> str:
        return "prediction" if options.get("signal", "predictions") == "predictions" else "feature"

    def __init__(self, route: Route) -> None:
        super().__init__(route)
        self.loss = ChannelWiseDistillationLoss(route.temperature)
        self.adapters = nn.ModuleList()

    @property
    def on_predictions(self) -> bool:
        """Whether the route compares the logits (``signal: "predictions"``) rather than feature maps."""
        return self.route.options["signal"] == "predictions"

    def layers(self, defaults: LayerDefaults) -> dict[str, list[str]]:
        if self.on_predictions:
            self.pairs = []
            return {}
        return super().layers(defaults)

    @property
    def built(self) -> bool:
        return self.pairs is not None and len(self.adapters) == len(self.pairs)

    def build(self, features: Mapping[str, Mapping[str, torch.Tensor]], spatial_dims: int) -> None:
        source, target = features[self.route.source], features[self.route.target]
        self.adapters = nn.ModuleList(
            channel_adapter(target[dst].shape[1], source[src].shape[1], spatial_dims) for src, dst in self.pairs
        )

    def pair_loss(self, index: int, target: torch.Tensor, source: torch.Tensor, outputs: StepOutputs) -> torch.Tensor:
        return self.loss(resize_to(self.adapters[index](target), source.shape[2:]), source)

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        if not self.on_predictions:
            return super().forward(outputs)
        target, source = outputs.logits[self.route.target], outputs.logits[self.route.source]
        if target.ndim < 3:
            raise ConfigError(
                f"route {self.route.name} distils each class's map over the positions, which needs segmentation "
                "logits (B, C, *spatial); for a classifier use signal 'features' or another kind."
            )
        return self.loss(target, source)


class DistKind(RouteKind):
    """DIST (Huang et al., NeurIPS 2022; :class:`medkd.knowledge.losses.DISTLoss`): the target's class probabilities
    at temperature ``τ`` correlate with the source's across the classes of each sample (inter-class, weight ``β``)
    and across the samples for each class (intra-class, ``γ``); for segmentation every pixel is a sample. The term
    is ``τ² (β · inter + γ · intra)``, each part ``1 − Pearson`` averaged. Classification or segmentation logits.

    Options: ``temperature`` (default 1), ``beta`` (1), ``gamma`` (1): the authors' defaults. A route takes
    ``kd_weight`` (``peer_prediction_weight`` between students); the bundle's ``temperature`` does not apply.
    """

    name = "dist"
    options = {"temperature": 1.0, "beta": 1.0, "gamma": 1.0}

    @classmethod
    def validate(cls, route: str, options: dict[str, Any]) -> dict[str, Any]:
        options["temperature"] = number(options["temperature"], f"the temperature of route {route}", positive=True)
        for key in ("beta", "gamma"):
            options[key] = number(options[key], f"the {key} of route {route}")
        return options

    @classmethod
    def role(cls, options: Mapping[str, Any]) -> str:
        return "prediction"

    def __init__(self, route: Route) -> None:
        super().__init__(route)
        self.loss = DISTLoss(route.temperature, route.options["beta"], route.options["gamma"])

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        return self.loss(outputs.logits[self.route.target], outputs.logits[self.route.source])


register_kind("channel", ChannelKind)
register_kind("dist", DistKind)
