"""Route kinds: the forms knowledge takes along a route, one class each, found by name in a registry.

A kind is an ``nn.Module`` made for one :class:`medkd.knowledge.routes.Route`. It says which options it accepts (besides
``weight``, which every route has), which layers it reads from which network, how it builds its adapters from one
probe forward, and computes the route's unweighted loss term from :class:`StepOutputs`. Its parameters (adapters)
are trained with the route's target student. A new kind is one subclass of :class:`RouteKind` plus one
:func:`register_kind` line; bundle JSON can also name a kind by its dotted class path, as ``_target_`` names a class
(``{"source": "teacher", "target": "sp", "kind": "mypackage.LogitMSE"}``).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from medkd.errors import ConfigError
from medkd.knowledge.features import DEPTHS, Depth, default_feature_layer, feature_depths, match_depths
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
from medkd.training.distributed import unwrap

if TYPE_CHECKING:
    from medkd.knowledge.routes import Route

__all__ = [
    "ROUTE_KINDS",
    "RouteKind",
    "StepOutputs",
    "LayerDefaults",
    "LayerPairsKind",
    "PredictionKind",
    "FeatureKind",
    "AttentionKind",
    "AffinityKind",
    "RegionKind",
    "register_kind",
    "resolve_kind",
]

ROUTE_KINDS: dict[str, type[RouteKind]] = {}
FEATURE_MODES = ("mse", "attention")


def number(value: object, what: str, positive: bool = False) -> float:
    """``value`` as a float, or a :class:`ConfigError` naming ``what`` when it is not a finite number ``>= 0``
    (``> 0`` when ``positive``)."""
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ConfigError(f"{what} must be a finite number {bound}, got {value!r}.")
    return float(value)


def integer(value: object, what: str, minimum: int = 0) -> int:
    """``value`` as an int, or a :class:`ConfigError` naming ``what`` when it is not a whole number ``>= minimum``
    (``5`` or ``5.0``; not ``True``)."""
    whole = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not whole or value != int(value) or value < minimum:
        raise ConfigError(f"{what} must be a whole number >= {minimum}, got {value!r}.")
    return int(value)


def labels_of(outputs: StepOutputs, logits: torch.Tensor, route: str, key: str) -> torch.Tensor:
    """The batch's class indices ``(B, 1, *spatial)`` (:func:`medkd.knowledge.losses.label_indices`), once per step, or
    a
    :class:`ConfigError` naming the option ``key`` of ``route`` that needs them when the step has no labels."""
    if outputs.targets is None:
        raise ConfigError(f"route {route}: {key} needs the batch labels, but the step gave none.")
    return outputs.shared(("labels", logits.shape[1]), lambda: label_indices(outputs.targets, logits))


class StepOutputs:
    """What the networks produced in one step, read by every route: ``logits[network]``, the feature maps the routes
    asked for ``features[network][layer]``, the ``targets`` (labels) of the batch, and :meth:`shared` values that
    several routes need (one log-softmax per network and temperature), computed once per step."""

    def __init__(
        self,
        logits: Mapping[str, torch.Tensor],
        features: Mapping[str, Mapping[str, torch.Tensor]],
        targets: torch.Tensor | None = None,
    ) -> None:
        self.logits = logits
        self.features = features
        self.targets = targets
        self._shared: dict[Any, Any] = {}

    def shared(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()``, computed once per step for ``key`` and then reused by every route asking for it."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]


class LayerDefaults:
    """What :meth:`RouteKind.layers` may ask about a network, by name: ``defaults(network)``, its default layers
    (its ``feature_layers``, else :func:`medkd.knowledge.features.default_feature_layer`), and
    ``defaults.depths(network)``,
    its layers at several depths (:func:`medkd.knowledge.features.feature_depths`, from one probe forward, made once).

    Args:
        feature_layers: module names per network, as given to :class:`medkd.knowledge.routes.KnowledgeRoutes`.
        networks: the networks by name (``None`` or missing: defaults unknown, ``defaults(network)`` is ``None``).
        example_inputs: a function giving a batch of inputs for the probe (called at most once), or ``None``.
    """

    def __init__(
        self,
        feature_layers: Mapping[str, Sequence[str]],
        networks: Mapping[str, nn.Module | None] | None = None,
        example_inputs: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        self.feature_layers = feature_layers
        self.networks = dict(networks or {})
        self._example_inputs = example_inputs
        self._inputs: torch.Tensor | None = None
        self._depths: dict[str, list[Depth]] = {}

    def inputs(self) -> torch.Tensor | None:
        """The example inputs (fetched once), or ``None`` when none were given."""
        if self._inputs is None and self._example_inputs is not None:
            self._inputs = self._example_inputs()
        return self._inputs

    def __call__(self, network: str) -> list[str] | None:
        if self.feature_layers.get(network):
            return list(self.feature_layers[network])
        net = self.networks.get(network)
        if net is None:
            return None
        try:
            return [default_feature_layer(net)]
        except ConfigError:
            if self._example_inputs is None:
                raise
            return [default_feature_layer(net, self.inputs())]  # probed: an architecture without known names

    def depths(self, network: str) -> list[Depth]:
        """The layers of ``network`` at several depths; a :class:`ConfigError` when the network or the example
        inputs are missing."""
        if network not in self._depths:
            net = self.networks.get(network)
            if net is None or self._example_inputs is None:
                raise ConfigError(
                    f"finding the depths of network {network!r} needs the network and example inputs (a probe "
                    "forward); give them to KnowledgeRoutes.setup, or name the layers."
                )
            self._depths[network] = feature_depths(unwrap(net), self.inputs())
        return self._depths[network]


class RouteKind(nn.Module):
    """One route's form of knowledge. Subclass it, set :attr:`name` and :attr:`options`, override :meth:`forward`
    and, when the kind reads feature maps, :meth:`layers` and :meth:`build`.

    Args:
        route: the route, with its options already checked and completed by :meth:`check_options`.
    """

    name: ClassVar[str] = ""  # in the route's term name, "<target>/<name>_from_<source>"
    options: ClassVar[Mapping[str, Any]] = {}  # the options it accepts besides "weight", with their defaults

    def __init__(self, route: Route) -> None:
        super().__init__()
        self.route = route

    @classmethod
    def check_options(cls, route: str, kind: str, given: Mapping[str, Any]) -> dict[str, Any]:
        """The options of ``route`` (its term name) of kind ``kind``: ``given`` completed with the defaults, each
        checked by :meth:`validate`; an option this kind does not accept is a :class:`ConfigError` naming the
        accepted ones."""
        unknown = sorted(set(given) - set(cls.options))
        if unknown:
            raise ConfigError(
                f"route {route}: unknown keys {unknown} do(es) nothing on a {kind} route, which accepts "
                f"{['weight', 'warmup_epochs', *cls.options]}; remove them or fix the spelling."
            )
        return cls.validate(route, {**cls.options, **given})

    @classmethod
    def validate(cls, route: str, options: dict[str, Any]) -> dict[str, Any]:
        """Check (and normalise) the values of the options; raise :class:`ConfigError` naming the bad one."""
        return options

    @classmethod
    def role(cls, options: Mapping[str, Any]) -> str:
        """``"prediction"`` when a route of this kind with ``options`` (as given) compares the networks' predictions,
        ``"feature"`` otherwise (the default): it says which named weight the route takes when it has no weight of
        its own (:func:`medkd.knowledge.routes.weight_key`)."""
        return "feature"

    def layers(self, defaults: LayerDefaults) -> dict[str, list[str]]:
        """The layers this route reads, by network name (none by default). Called once, before :meth:`build`;
        ``defaults(network)`` gives the network's ``feature_layers`` or default layer (``None`` when unknown),
        ``defaults.depths(network)`` its layers at several depths (:class:`LayerDefaults`)."""
        return {}

    @property
    def built(self) -> bool:
        """Whether :meth:`build` has made what the kind needs (nothing by default)."""
        return True

    def build(self, features: Mapping[str, Mapping[str, torch.Tensor]], spatial_dims: int) -> None:
        """Make the adapters from one probe forward's feature maps ``features[network][layer]``."""

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        """The route's unweighted loss term. The source's signal must not send gradients back (detach it)."""
        raise NotImplementedError


def register_kind(name: str, kind: type[RouteKind] | None = None) -> Any:
    """Add a route kind to the registry, so that routes can say ``"kind": name``: ``register_kind("affinity",
    AffinityKind)``, or ``@register_kind("affinity")`` above the class. Registering the same class again does
    nothing; another class under a taken name is an error."""

    def add(cls: type[RouteKind]) -> type[RouteKind]:
        if not (isinstance(cls, type) and issubclass(cls, RouteKind)):
            raise ConfigError(
                f"route kind {name!r} must be a subclass of medkd.knowledge.routes.RouteKind, got {cls!r}."
            )
        if not name.isidentifier():
            raise ConfigError(f"route kind name {name!r} must be an identifier (it is part of the term names).")
        if ROUTE_KINDS.get(name, cls) is not cls:
            raise ConfigError(f"route kind {name!r} is already {ROUTE_KINDS[name]!r}; register {cls!r} by another name")
        ROUTE_KINDS[name] = cls
        return cls

    return add if kind is None else add(kind)


def resolve_kind(kind: str | type[RouteKind], route: str = "route") -> tuple[str, type[RouteKind]]:
    """``(name, class)`` of a route's ``kind``: a registered name, the dotted path of a :class:`RouteKind` subclass
    (``"mypackage.LogitMSE"``) or the class itself; the name is the registered one, else the class's ``name``."""
    if isinstance(kind, str) and kind in ROUTE_KINDS:
        return kind, ROUTE_KINDS[kind]
    accepted = f"use one of {sorted(ROUTE_KINDS)} or the dotted path of a medkd.knowledge.routes.RouteKind subclass"
    cls: Any = kind
    if isinstance(kind, str) and "." in kind:
        module, _, attr = kind.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"{route} has kind {kind!r}, which cannot be imported ({e}); {accepted}.") from e
    if not (isinstance(cls, type) and issubclass(cls, RouteKind)):
        raise ConfigError(f"{route} has kind {kind!r}; {accepted}.")
    if "name" not in vars(cls) or not str(cls.name).isidentifier():
        raise ConfigError(
            f"{route} has kind {cls.__module__}.{cls.__qualname__}, which sets no `name` of its own; give the class "
            "a name = '...' (an identifier: it names the route's loss term)."
        )
    return cls.name, cls


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
