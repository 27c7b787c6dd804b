"""Route kinds: the forms knowledge takes along a route, one class each, registered by name in
:data:`medkd.knowledge.route.ROUTE_KINDS` when this module is imported (:mod:`medkd.knowledge` imports it).

A kind is an ``nn.Module`` made for one :class:`medkd.knowledge.route.Route`. It says which options it accepts (besides
``weight``, which every route has), which layers it reads from which network, how it builds its adapters from one
probe forward, and computes the route's unweighted loss term from :class:`StepOutputs`. Its parameters (adapters)
are trained with the route's target student. A new kind is one subclass of :class:`RouteKind` plus one
:func:`register_kind` line; bundle JSON can also name a kind by its dotted class path, as ``_target_`` names a class
(``{"source": "teacher", "target": "sp", "kind": "mypackage.LogitMSE"}``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medkd.errors import ConfigError
from medkd.knowledge.features import DEPTHS, match_depths
from medkd.knowledge.losses import (
    AffinityDistillationLoss,
    FeatureDistillationLoss,
    PredictionDistillationLoss,
    RegionFeatureLoss,
    RegionPredictionLoss,
    class_pixel_weights,
    inverse_frequency,
    label_indices,
)
from medkd.knowledge.route import LayerDefaults, Route, RouteKind, StepOutputs, integer, number, register_kind

__all__ = [
    "LayerPairsKind",
    "PredictionKind",
    "FeatureKind",
    "AttentionKind",
    "AffinityKind",
    "RegionKind",
]

FEATURE_MODES = ("mse", "attention")


def labels_of(outputs: StepOutputs, logits: torch.Tensor, route: str, key: str) -> torch.Tensor:
    """The batch's class indices ``(B, 1, *spatial)`` (:func:`medkd.knowledge.losses.label_indices`), once per step, or
    a
    :class:`ConfigError` naming the option ``key`` of ``route`` that needs them when the step has no labels."""
    if outputs.targets is None:
        raise ConfigError(f"route {route}: {key} needs the batch labels, but the step gave none.")
    return outputs.shared(("labels", logits.shape[1]), lambda: label_indices(outputs.targets, logits))


def _class_weights(value: object, route: str) -> str | list[float] | None:
    """A prediction route's ``class_weights``: ``None``, ``"inverse_frequency"`` or a list of numbers ``>= 0``."""
    if value is None or value == "inverse_frequency":
        return value
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0:
        weights = [number(v, f"each of the class_weights of route {route}") for v in value]
        if any(weights):
            return weights
    raise ConfigError(
        f'the class_weights of route {route} must be "inverse_frequency" or a list of numbers >= 0, one per '
        f"class, not all zero; got {value!r}."
    )


class PredictionKind(RouteKind):
    """Prediction distillation: ``τ² · KL(σ(z_src/τ) ‖ σ(z_dst/τ))`` (Hinton et al.), the source detached.

    Options: ``temperature`` ``τ`` (default 4); ``class_weights`` (default none), to keep the pixel-wise KL of
    small structures from being drowned by the background: a list ``[c_0, ..., c_{C-1}]`` or
    ``"inverse_frequency"`` (``c_k = 1 / n_k``, ``n_k`` the pixels of class ``k`` in the batch's labels). The term
    is then the weighted mean ``τ² · Σ_x w(x) KL_x / Σ_x w(x)`` with ``w(x) = c_{y(x)}``, ``y(x)`` the label of
    pixel ``x`` (:func:`medkd.knowledge.losses.class_pixel_weights`; labels outside the classes weigh 0): with inverse
    frequencies, the mean over the classes present of each class's mean KL.

    Routes at one temperature share each network's log-softmax (one per network and temperature per step)."""

    name = "prediction"
    options = {"temperature": 4.0, "class_weights": None}

    @classmethod
    def validate(cls, route: str, options: dict[str, Any]) -> dict[str, Any]:
        options["temperature"] = number(options["temperature"], f"the temperature of route {route}", positive=True)
        options["class_weights"] = _class_weights(options["class_weights"], route)
        return options

    @classmethod
    def role(cls, options: Mapping[str, Any]) -> str:
        return "prediction"

    def __init__(self, route: Route) -> None:
        super().__init__(route)
        self.loss = PredictionDistillationLoss(route.temperature)

    def pixel_weights(self, outputs: StepOutputs, logits: torch.Tensor) -> torch.Tensor | None:
        """``w(x)`` of the class docstring, ``(B, 1, *spatial)``, normalised to mean 1; ``None`` without
        ``class_weights``."""
        given = self.route.options["class_weights"]
        if given is None:
            return None
        labels = labels_of(outputs, logits, self.route.name, "class_weights")
        if given == "inverse_frequency":
            num_classes = logits.shape[1]
            weights = outputs.shared(("inverse_frequency", num_classes), lambda: inverse_frequency(labels, num_classes))
        elif len(given) != logits.shape[1]:
            raise ConfigError(
                f"route {self.route.name} has class_weights for {len(given)} classes, but the networks predict "
                f"{logits.shape[1]}; give one weight per class."
            )
        else:
            weights = torch.tensor(given)
        return class_pixel_weights(labels, weights)

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        loss, tau = self.loss, self.loss.temperature

        def log_p(network: str) -> torch.Tensor:
            return outputs.shared(("log_probs", network, tau), lambda: loss.log_probs(outputs.logits[network]))

        source, target = self.route.source, self.route.target
        weights = self.pixel_weights(outputs, outputs.logits[target])
        if weights is not None:
            return loss.from_log_probs(log_p(target), log_p(source), mask=weights)
        p_src = outputs.shared(("probs", source, tau), lambda: log_p(source).detach().exp())
        return loss.from_log_probs(log_p(target), log_p(source), p_src=p_src)  # the source is detached in the loss


def _layer_pairs(value: object, route: str) -> str | list[list[str]] | None:
    """A route's ``layers``: ``None``, a name of :data:`medkd.knowledge.features.DEPTHS` or ``[[source, target],
    ...]``."""
    if value is None or (isinstance(value, str) and value in DEPTHS):
        return value
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
    ok = ok and all(isinstance(p, Sequence) and len(p) == 2 and all(isinstance(n, str) for n in p) for p in value)
    if not ok:
        raise ConfigError(
            f"the layers of route {route} must be [[source_layer, target_layer], ...] module names or one of "
            f"{list(DEPTHS)} (layers at several depths, found by a probe forward), got {value!r}."
        )
    return [list(p) for p in value]


class LayerPairsKind(RouteKind):
    """Base of the kinds that compare feature maps of pairs of layers, one of the source's with one of the
    target's: the term is the mean over the pairs of :meth:`pair_loss`.

    Option ``layers``: ``[[source_layer, target_layer], ...]`` module names; ``"multi"`` (encoder, bottleneck and
    decoder layers at the resolutions both networks have), ``"encoder"`` (encoder and bottleneck), ``"decoder"``
    or ``"last_decoder"`` (the finest decoder layer both have, just before the output head), found by
    :func:`medkd.knowledge.features.feature_depths` and paired by :func:`medkd.knowledge.features.match_depths`;
    default (``None``): each network's ``feature_layers``, or its default layer (the bottleneck), paired in order.
    """

    options = {"layers": None}

    @classmethod
    def validate(cls, route: str, options: dict[str, Any]) -> dict[str, Any]:
        options["layers"] = _layer_pairs(options["layers"], route)
        return options

    def __init__(self, route: Route) -> None:
        super().__init__(route)
        self.pairs: list[tuple[str, str]] | None = None

    def layers(self, defaults: LayerDefaults) -> dict[str, list[str]]:
        r = self.route
        if isinstance(r.layers, str):
            self.pairs = match_depths(defaults.depths(r.source), defaults.depths(r.target), r.layers)
            if not self.pairs:
                shown = {n: [(d.role, d.size) for d in defaults.depths(n)] for n in (r.source, r.target)}
                raise ConfigError(
                    f"{r.kind_name} route {r.name} has layers {r.layers!r}, but {r.source} and {r.target} have no "
                    f"such depths at one resolution ({shown}); name the layer pairs instead."
                )
        elif r.layers is not None:
            self.pairs = [(src, dst) for src, dst in r.layers]
        else:
            src, dst = defaults(r.source), defaults(r.target)
            missing = [n for n, layers in ((r.source, src), (r.target, dst)) if not layers]
            if missing:
                raise ConfigError(
                    f"{r.kind_name} route {r.name} needs layers: give 'layers' or feature_layers for {missing}."
                )
            if len(src) != len(dst):
                raise ConfigError(
                    f"{r.kind_name} route {r.name} pairs layers in order, but {r.source} has {len(src)} and "
                    f"{r.target} has {len(dst)}; give the pairs in the route's 'layers'."
                )
            self.pairs = list(zip(src, dst, strict=True))
        return {r.source: [src for src, _ in self.pairs], r.target: [dst for _, dst in self.pairs]}

    def pair_loss(self, index: int, target: torch.Tensor, source: torch.Tensor, outputs: StepOutputs) -> torch.Tensor:
        """The loss of pair ``index``: the target's map ``(B, C_dst, *spatial_dst)`` against the source's
        ``(B, C_src, *spatial_src)`` (detach it)."""
        raise NotImplementedError

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        source, target = outputs.features[self.route.source], outputs.features[self.route.target]
        terms = [self.pair_loss(i, target[dst], source[src], outputs) for i, (src, dst) in enumerate(self.pairs)]
        return sum(terms) / len(terms)


class FeatureKind(LayerPairsKind):
    """Feature distillation (FitNets hint): MSE of per-sample standardised feature maps, the target's map through a
    1x1 convolution adapter (when channels differ, one per layer pair) and resized to the source's; the term is the
    mean over the layer pairs. ``mode: "attention"`` is the :class:`AttentionKind` loss under this kind's name (one
    implementation: :meth:`medkd.knowledge.losses.FeatureDistillationLoss.attention`).

    Options: ``layers`` (see :class:`LayerPairsKind`: module name pairs, ``"multi"``, ``"encoder"``,
    ``"decoder"``, default the bottleneck); ``mode`` ``"mse"`` or ``"attention"``.
    """

    name = "feature"
    options = {"layers": None, "mode": "mse"}

    @classmethod
    def validate(cls, route: str, options: dict[str, Any]) -> dict[str, Any]:
        if "mode" in options and options["mode"] not in FEATURE_MODES:
            raise ConfigError(f"route {route} has mode {options['mode']!r}; use one of {FEATURE_MODES}.")
        return super().validate(route, options)

    @property
    def mode(self) -> str:
        """The feature loss, ``"mse"`` or ``"attention"``."""
        return self.route.mode

    def __init__(self, route: Route) -> None:
        super().__init__(route)
        self.losses = nn.ModuleList()

    @property
    def built(self) -> bool:
        return self.pairs is not None and len(self.losses) == len(self.pairs)

    def build(self, features: Mapping[str, Mapping[str, torch.Tensor]], spatial_dims: int) -> None:
        source, target = features[self.route.source], features[self.route.target]
        self.losses = nn.ModuleList(
            FeatureDistillationLoss(target[dst].shape[1], source[src].shape[1], spatial_dims, mode=self.mode)
            for src, dst in self.pairs
        )

    def pair_loss(self, index: int, target: torch.Tensor, source: torch.Tensor, outputs: StepOutputs) -> torch.Tensor:
        return self.losses[index](target, source)


class AttentionKind(LayerPairsKind):
    """Attention transfer (Zagoruyko & Komodakis): MSE of the spatial attention maps (channel-mean of squares,
    L2-normalised per sample) of the paired layers, the target's resized to the source's; no adapter
    (:meth:`medkd.knowledge.losses.FeatureDistillationLoss.attention`, which ``feature`` routes with ``mode:
    "attention"`` run too). Options: ``layers``, as for :class:`FeatureKind`."""

    name = "attention"
    options = {"layers": None}

    def pair_loss(self, index: int, target: torch.Tensor, source: torch.Tensor, outputs: StepOutputs) -> torch.Tensor:
        return FeatureDistillationLoss.attention(target, source)


MAX_AFFINITY_NODES = 4096  # positions of a pooled map in AffinityKind: at most 4096² affinities per sample


class AffinityKind(LayerPairsKind):
    """Pairwise affinity distillation for segmentation (:class:`medkd.knowledge.losses.AffinityDistillationLoss`): each
    paired feature map is average-pooled to a grid of ``grid`` positions per axis, and the target learns the
    source's cosine similarities between every two positions (MSE). Structure, not values: no adapter, any channel
    counts, 2D or 3D; memory bounded by ``grid ** spatial_dims`` positions (at most 4096).

    Options: ``layers`` (see :class:`LayerPairsKind`; default the bottleneck), ``grid`` (default 8).
    """

    name = "affinity"
    options = {"layers": None, "grid": 8}

    @classmethod
    def validate(cls, route: str, options: dict[str, Any]) -> dict[str, Any]:
        options["grid"] = integer(options["grid"], f"the grid of route {route}", minimum=1)
        return super().validate(route, options)

    def __init__(self, route: Route) -> None:
        super().__init__(route)
        self.loss = AffinityDistillationLoss(route.options["grid"])

    def pair_loss(self, index: int, target: torch.Tensor, source: torch.Tensor, outputs: StepOutputs) -> torch.Tensor:
        grid, dims = self.route.options["grid"], target.ndim - 2
        if grid**dims > MAX_AFFINITY_NODES:
            raise ConfigError(
                f"route {self.route.name} has grid {grid}: {grid**dims} positions in {dims}D, whose affinities "
                f"would not fit in memory; use a grid of at most {math.floor(MAX_AFFINITY_NODES ** (1 / dims) + 1e-9)}."
            )
        return self.loss(target, source)


REGION_SIGNALS = ("predictions", "features")
REGION_SOURCES = ("source", "labels")


class RegionKind(LayerPairsKind):
    """Class-region distillation for segmentation: statistics of each class region, weighted by the source's soft
    prediction (``regions: "source"``, its softmax at temperature 1, detached) or by the labels (``"labels"``).

    - ``signal: "predictions"`` (default): the mean predicted distribution of each region,
      ``τ² · KL(P_k^src ‖ P_k^dst)`` averaged over the regions present
      (:class:`medkd.knowledge.losses.RegionPredictionLoss`);
      reads no feature maps.
    - ``signal: "features"``: the mean feature vector of each region (class prototypes) of the paired layers, MSE
      between the networks' cosine-similarity matrices of the prototypes
      (:class:`medkd.knowledge.losses.RegionFeatureLoss`);
      no adapter; ``layers`` as in :class:`LayerPairsKind`, the term the mean over the pairs.

    Options: ``signal``, ``regions``, ``temperature`` (default 1, predictions only), ``layers`` (features only).
    """

    name = "region"
    options = {"signal": "predictions", "regions": "source", "temperature": 1.0, "layers": None}

    @classmethod
    def validate(cls, route: str, options: dict[str, Any]) -> dict[str, Any]:
        for key, accepted in (("signal", REGION_SIGNALS), ("regions", REGION_SOURCES)):
            if options[key] not in accepted:
                raise ConfigError(f"route {route} has {key} {options[key]!r}; use one of {list(accepted)}.")
        options["temperature"] = number(options["temperature"], f"the temperature of route {route}", positive=True)
        if options["signal"] == "predictions" and options["layers"] is not None:
            raise ConfigError(f"route {route} reads no layers with signal 'predictions'; remove 'layers'.")
        return super().validate(route, options)

    def __init__(self, route: Route) -> None:
        super().__init__(route)
        if route.options["signal"] == "predictions":
            self.loss: nn.Module = RegionPredictionLoss(route.temperature)
        else:
            self.loss = RegionFeatureLoss()

    def layers(self, defaults: LayerDefaults) -> dict[str, list[str]]:
        if self.route.options["signal"] == "predictions":
            self.pairs = []
            return {}
        return super().layers(defaults)

    def regions(self, outputs: StepOutputs) -> torch.Tensor:
        """The region weights ``(B, K, *spatial)`` of this step (detached), shared by the routes that ask."""
        source = self.route.source
        logits = outputs.logits[source]
        if logits.ndim < 3:
            raise ConfigError(f"route {self.route.name} distils class regions, which needs segmentation logits.")
        if self.route.options["regions"] == "source":
            return outputs.shared(("regions", source), lambda: torch.softmax(logits.detach().float(), dim=1))
        labels = labels_of(outputs, logits, self.route.name, "regions 'labels'")
        return outputs.shared(("regions", "labels", logits.shape[1]), lambda: label_one_hot(labels, logits.shape[1]))

    def pair_loss(self, index: int, target: torch.Tensor, source: torch.Tensor, outputs: StepOutputs) -> torch.Tensor:
        return self.loss(target, source, self.regions(outputs))

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        if self.route.options["signal"] == "features":
            return super().forward(outputs)
        r = self.route
        return self.loss(outputs.logits[r.target], outputs.logits[r.source], self.regions(outputs))


def label_one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot ``(B, num_classes, *spatial)`` float of class indices ``(B, 1, *spatial)``; ``-1`` gives zeros."""
    one_hot = torch.zeros((labels.shape[0], num_classes + 1, *labels.shape[2:]), device=labels.device)
    return one_hot.scatter_(1, labels.masked_fill(labels < 0, num_classes), 1.0)[:, :num_classes]


register_kind("prediction", PredictionKind)
register_kind("feature", FeatureKind)
register_kind("attention", AttentionKind)
register_kind("affinity", AffinityKind)
register_kind("region", RegionKind)
