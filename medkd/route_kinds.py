"""Route kinds: the forms knowledge takes along a route, one class each, found by name in a registry.

A kind is an ``nn.Module`` made for one :class:`medkd.routes.Route`. It says which options it accepts (besides
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
from medkd.losses import FeatureDistillationLoss, PredictionDistillationLoss

if TYPE_CHECKING:
    from medkd.routes import Route

__all__ = [
    "ROUTE_KINDS",
    "RouteKind",
    "StepOutputs",
    "PredictionKind",
    "FeatureKind",
    "AttentionKind",
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
                f"{['weight', *cls.options]}; remove them or fix the spelling."
            )
        return cls.validate(route, {**cls.options, **given})

    @classmethod
    def validate(cls, route: str, options: dict[str, Any]) -> dict[str, Any]:
        """Check (and normalise) the values of the options; raise :class:`ConfigError` naming the bad one."""
        return options

    def layers(self, defaults: Callable[[str], list[str] | None]) -> dict[str, list[str]]:
        """The layers this route reads, by network name (none by default). Called once, before :meth:`build`;
        ``defaults(network)`` gives the network's ``feature_layers`` or default layer (``None`` when unknown)."""
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
            raise ConfigError(f"route kind {name!r} must be a subclass of medkd.routes.RouteKind, got {cls!r}.")
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
    accepted = f"use one of {sorted(ROUTE_KINDS)} or the dotted path of a medkd.routes.RouteKind subclass"
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


class PredictionKind(RouteKind):
    """Prediction distillation: ``τ² · KL(σ(z_src/τ) ‖ σ(z_dst/τ))`` (Hinton et al.), the source detached.

    Routes at one temperature share each network's log-softmax (one per network and temperature per step)."""

    name = "prediction"
    options = {"temperature": 4.0}

    @classmethod
    def validate(cls, route: str, options: dict[str, Any]) -> dict[str, Any]:
        options["temperature"] = number(options["temperature"], f"the temperature of route {route}", positive=True)
        return options

    def __init__(self, route: Route) -> None:
        super().__init__(route)
        self.loss = PredictionDistillationLoss(route.temperature)

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        loss, tau = self.loss, self.loss.temperature

        def log_p(network: str) -> torch.Tensor:
            return outputs.shared(("log_probs", network, tau), lambda: loss.log_probs(outputs.logits[network]))

        source, target = self.route.source, self.route.target
        p_src = outputs.shared(("probs", source, tau), lambda: log_p(source).detach().exp())
        return loss.from_log_probs(log_p(target), log_p(source), p_src=p_src)  # the source is detached in the loss


class FeatureKind(RouteKind):
    """Feature distillation (FitNets hint): MSE of per-sample standardised feature maps, the target's map through a
    1x1 convolution adapter (when channels differ) and resized to the source's; ``mode: "attention"`` is the
    :class:`AttentionKind` loss under this kind's name.

    Options: ``layers`` pairs module names ``[[source_layer, target_layer], ...]`` (default: each network's
    ``feature_layers``, or its default layer, paired in order); ``mode`` ``"mse"`` or ``"attention"``.
    """

    name = "feature"
    options = {"layers": None, "mode": "mse"}

    @classmethod
    def validate(cls, route: str, options: dict[str, Any]) -> dict[str, Any]:
        if "mode" in options and options["mode"] not in FEATURE_MODES:
            raise ConfigError(f"route {route} has mode {options['mode']!r}; use one of {FEATURE_MODES}.")
        layers = options["layers"]
        if layers is not None:
            ok = isinstance(layers, Sequence) and not isinstance(layers, str) and len(layers) > 0
            ok = ok and all(
                isinstance(p, Sequence) and len(p) == 2 and all(isinstance(n, str) for n in p) for p in layers
            )
            if not ok:
                raise ConfigError(
                    f"the layers of route {route} must be [[source_layer, target_layer], ...] module names, "
                    f"got {layers!r}."
                )
            options["layers"] = [list(p) for p in layers]
        return options

    @property
    def mode(self) -> str:
        """The feature loss, ``"mse"`` or ``"attention"``."""
        return self.route.mode

    def __init__(self, route: Route) -> None:
        super().__init__(route)
        self.pairs: list[tuple[str, str]] | None = None
        self.losses = nn.ModuleList()

    def layers(self, defaults: Callable[[str], list[str] | None]) -> dict[str, list[str]]:
        r = self.route
        if r.layers is not None:
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

    @property
    def built(self) -> bool:
        return self.pairs is not None and len(self.losses) == len(self.pairs)

    def build(self, features: Mapping[str, Mapping[str, torch.Tensor]], spatial_dims: int) -> None:
        source, target = features[self.route.source], features[self.route.target]
        self.losses = nn.ModuleList(
            FeatureDistillationLoss(target[dst].shape[1], source[src].shape[1], spatial_dims, mode=self.mode)
            for src, dst in self.pairs
        )

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        source, target = outputs.features[self.route.source], outputs.features[self.route.target]
        return sum(loss(target[dst], source[src]) for loss, (src, dst) in zip(self.losses, self.pairs, strict=True))


class AttentionKind(FeatureKind):
    """Attention transfer (Zagoruyko & Komodakis): MSE of the spatial attention maps (channel-mean of squares,
    L2-normalised per sample) of the paired layers, the target's resized to the source's; no adapter.
    Options: ``layers``, as for :class:`FeatureKind`."""

    name = "attention"
    options = {"layers": None}

    @property
    def mode(self) -> str:
        return "attention"


register_kind("prediction", PredictionKind)
register_kind("feature", FeatureKind)
register_kind("attention", AttentionKind)
