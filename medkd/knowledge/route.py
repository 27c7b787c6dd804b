"""A route and the registry of its kinds: :class:`Route` (who teaches whom, in which form), :class:`RouteKind` (the
base of every form, with what it reads: :class:`StepOutputs`, :class:`LayerDefaults`) and :data:`ROUTE_KINDS`, the
registry that :func:`register_kind` fills and :func:`resolve_kind` reads.

The built-in kinds (:mod:`medkd.knowledge.route_kinds`, :mod:`medkd.knowledge.distribution_kinds`) import this module
and register themselves; :mod:`medkd.knowledge` imports them, so that they are registered whatever module of the
package is imported first. :mod:`medkd.knowledge.routes` hands these names on to users' code.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from medkd.errors import ConfigError
from medkd.knowledge.features import Depth, default_feature_layer, feature_depths
from medkd.runtime.distributed import unwrap

__all__ = [
    "ROUTE_KINDS",
    "Route",
    "RouteKind",
    "StepOutputs",
    "LayerDefaults",
    "register_kind",
    "resolve_kind",
    "number",
    "integer",
]

ROUTE_KINDS: dict[str, type[RouteKind]] = {}
_OPTION_FIELDS = ("temperature", "layers", "mode")  # kind options with a field of their own in Route


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


@dataclass
class Route:
    """One flow of knowledge from ``source`` to ``target``.

    Args:
        source: ``"teacher"`` or a student name; its signal is detached.
        target: a student name; the term is added to this student's loss.
        kind: a registered kind (``"prediction"``, ``"feature"``, ``"attention"``, see :data:`ROUTE_KINDS`), the
            dotted path of a :class:`RouteKind` subclass, or the class.
        weight: multiplier of the term in the target's loss.
        warmup_epochs: the weight ramps linearly from 0 over the first ``warmup_epochs`` epochs
            (:meth:`weight_at`); 0 (the default) is off.
        temperature: softmax temperature of a prediction or channel route (default 4) or a region or dist route
            (default 1).
        layers: for a route that reads feature maps (feature, attention, affinity, region, channel), ``[[source_layer,
            target_layer], ...]`` module names, or ``"multi"``, ``"encoder"``, ``"decoder"``, ``"last_decoder"``
            (layers at several depths, :func:`medkd.knowledge.features.feature_depths`); ``None`` pairs the networks'
            ``feature_layers`` (or default layers) in order.
        mode: feature loss, ``"mse"`` (normalised hint, the default) or ``"attention"`` (attention transfer).
        options: options of a kind of one's own, beside those above.

    An option the kind does not accept is a :class:`ConfigError`; those it accepts and are not given take the
    kind's defaults (``None`` for the others).
    """

    source: str
    target: str
    kind: str | type[RouteKind]
    weight: float = 1.0
    warmup_epochs: int = 0
    temperature: float | None = None
    layers: str | list[list[str]] | None = None
    mode: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    kind_name: str = field(init=False, repr=False, compare=False)
    kind_class: type[RouteKind] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.kind_name, self.kind_class = resolve_kind(self.kind, f"route {self.source} -> {self.target}")
        self.weight = number(self.weight, f"the weight of route {self.name}")
        self.warmup_epochs = integer(self.warmup_epochs, f"the warmup_epochs of route {self.name}")
        given = {k: getattr(self, k) for k in _OPTION_FIELDS if getattr(self, k) is not None}
        values = self.kind_class.check_options(self.name, self.kind_name, {**given, **self.options})
        for key in _OPTION_FIELDS:
            setattr(self, key, values.pop(key, None))
        self.options = values

    @property
    def name(self) -> str:
        """Key of this route's term in the engine output, ``"<target>/<kind>_from_<source>"``, e.g.
        ``"sp/prediction_from_teacher"``."""
        return f"{self.target}/{self.kind_name}_from_{self.source}"

    def weight_at(self, epoch: int | None) -> float:
        """The weight in epoch ``epoch`` (1 for the first, as ``engine.state.epoch`` counts):
        ``weight · min(1, (epoch - 1) / warmup_epochs)``, so 0 in the first epoch and ``weight`` from epoch
        ``warmup_epochs + 1`` on; ``weight`` without warm-up or when ``epoch`` is ``None``."""
        if not self.warmup_epochs or epoch is None:
            return self.weight
        return self.weight * min(1.0, max(epoch - 1, 0) / self.warmup_epochs)

    def to_dict(self) -> dict:
        """JSON-serialisable form (the keys accepted by :func:`parse_routes`; options left at ``None`` and a
        ``warmup_epochs`` of 0 omitted)."""
        kind = self.kind if isinstance(self.kind, str) else f"{self.kind.__module__}.{self.kind.__qualname__}"
        d = {"source": self.source, "target": self.target, "kind": kind, "weight": self.weight}
        if self.warmup_epochs:
            d["warmup_epochs"] = self.warmup_epochs
        d.update({k: getattr(self, k) for k in _OPTION_FIELDS if getattr(self, k) is not None})
        return {**d, **{k: v for k, v in self.options.items() if v is not None}}

    @classmethod
    def from_dict(cls, route: Mapping[str, Any]) -> Route:
        """A route from its dict form (as written in bundle JSON): the keys of :class:`Route`, plus the options of a
        kind of one's own."""
        if not isinstance(route, Mapping) or not {"source", "target", "kind"} <= set(route):
            raise ConfigError(f"route {route!r} is malformed: it needs 'source', 'target' and 'kind'.")
        named = ("source", "target", "kind", "weight", "warmup_epochs", *_OPTION_FIELDS)
        options = {k: v for k, v in route.items() if k not in named}
        return cls(**{k: v for k, v in route.items() if k in named}, options=options)
