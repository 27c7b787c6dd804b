"""Knowledge routes: who teaches whom, in which form, and the named presets built from them.

A route is ``{source, target, kind, weight, warmup_epochs, temperature, layers, mode}``: ``source`` teaches ``target``
(each ``"teacher"`` or a student name) in the form its ``kind`` names: ``"prediction"`` (temperature-scaled KL),
``"feature"`` (hint loss with an adapter), ``"attention"`` (attention transfer), ``"affinity"`` (pairwise
affinities of positions), ``"region"`` (class-region statistics), ``"channel"`` (channel-wise distillation) or
``"dist"`` (DIST), each a class of :mod:`medkd.knowledge.route_kinds` or :mod:`medkd.knowledge.distribution_kinds`
found by name in a registry (:func:`register_kind`), or a class of one's own named by its dotted path. :class:`Route`,
:class:`RouteKind`, :class:`StepOutputs` and the registry live in :mod:`medkd.knowledge.route`; this module hands them
on, so that a kind of one's own imports everything from here. Any graph of
routes over one teacher and N students is allowed; the presets (student alone, KD, FitNets, DML, KD+DML,
diversified, CWD, DIST, diversified with CWD) are named graphs. :class:`KnowledgeRoutes` runs a graph: it chooses
the layers, hooks the networks, builds the adapters from one probe forward and computes each student's weighted
total.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medkd.bundles import TEACHER
from medkd.errors import ConfigError
from medkd.knowledge.features import FeatureExtractor
from medkd.knowledge.route import (
    ROUTE_KINDS,
    LayerDefaults,
    Route,
    RouteKind,
    StepOutputs,
    integer,
    number,
    register_kind,
    resolve_kind,
)
from medkd.runtime.distributed import unwrap

__all__ = [
    "WEIGHTS",
    "weight_key",
    "TEMPERATURE_KINDS",
    "PRESETS",
    "PAPER_PRESETS",
    "ROUTE_KINDS",
    "Route",
    "RouteKind",
    "StepOutputs",
    "KnowledgeRoutes",
    "register_kind",
    "preset_routes",
    "parse_routes",
]

logger = logging.getLogger("medkd.knowledge.routes")

PAPER_PRESETS = ("student", "kd", "fitnets", "dml", "kd_dml", "diversified")  # the paper's methods, compared by default
PRESETS = (*PAPER_PRESETS, "cwd", "dist", "diversified_cwd")
TEMPERATURE_KINDS = ("prediction", "channel")  # the KL kinds the bundle's (or a preset's) temperature applies to


WEIGHTS = {
    "kd_weight": "teacher → student prediction terms",
    "hint_weight": "teacher → student feature terms",
    "peer_prediction_weight": "student ↔ student prediction terms",
    "peer_feature_weight": "student ↔ student feature terms",
}  # the named loss weights (α, β, γ, δ of the paper), by the routes they weight


def weight_key(source: str, kind: str | type[RouteKind], options: Mapping[str, Any] | None = None) -> str:
    """The named weight (:data:`WEIGHTS`) of a route from ``source`` of ``kind`` with ``options``: ``kd_weight`` or
    ``hint_weight`` from the teacher, ``peer_prediction_weight`` or ``peer_feature_weight`` from a student, as the
    kind's :meth:`RouteKind.role` says: prediction-like (``prediction``, ``dist``, ``channel`` on predictions), or
    any other (features, attention, affinity, region, a kind of one's own by default)."""
    prediction = resolve_kind(kind, f"a route from {source}")[1].role(options or {}) == "prediction"
    if source == TEACHER:
        return "kd_weight" if prediction else "hint_weight"
    return "peer_prediction_weight" if prediction else "peer_feature_weight"


def _named_weights(weights: Mapping[str, Any] | None) -> dict[str, float]:
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(WEIGHTS))
    if unknown:
        raise ConfigError(f"unknown route weight(s) {unknown}; the named weights are {list(WEIGHTS)}.")
    return {key: number(weights.get(key, 1.0), f"{key} (the weight of {WEIGHTS[key]})") for key in WEIGHTS}


def parse_routes(
    routes: str | Mapping[str, Any] | Sequence[Route | Mapping],
    students: Sequence[str],
    weights: Mapping[str, float] | None = None,
    temperature: float | None = None,
    warmup_epochs: int | None = None,
    hint_layers: str | None = None,
) -> list[Route]:
    """Routes from a preset name, a ``{"preset": name, "weights": {...}, "temperature": t, "warmup_epochs": n,
    "hint_layers": "multi"}`` dict, or a list of :class:`Route` or dicts (as written in bundle JSON).

    The named ``weights`` (:data:`WEIGHTS`, each 1 unless given) weight every route that does not set its own
    ``weight``, by its role (:func:`weight_key`), ``temperature`` applies to every prediction and channel route
    (:data:`TEMPERATURE_KINDS`), ``warmup_epochs`` to every route and ``hint_layers`` (``"multi"``, ``"encoder"``,
    ``"decoder"``, ``"last_decoder"``; ``None``: the bottleneck) to every feature route that does not set its own:
    so a bundle's ``kd_weight``, ``temperature``, ``warmup_epochs`` or ``hint_layers`` still means something when
    its routes are listed. A preset dict's own values take precedence over the arguments.
    """
    named = _named_weights(weights)
    if isinstance(routes, Mapping):
        unknown = sorted(set(routes) - {"preset", "weights", "temperature", "warmup_epochs", "hint_layers"})
        if "preset" not in routes or unknown:
            raise ConfigError(
                f"routes {dict(routes)} must be a preset name, a list of routes, or a dict with 'preset' and "
                "optionally 'weights', 'temperature', 'warmup_epochs' and 'hint_layers'"
                + (f" (unknown keys: {unknown})." if unknown else ".")
            )
        named.update(routes.get("weights") or {})
        return parse_routes(
            routes["preset"],
            students,
            named,
            routes.get("temperature", temperature),
            routes.get("warmup_epochs", warmup_epochs),
            routes.get("hint_layers", hint_layers),
        )
    if isinstance(routes, str):
        given = {"temperature": temperature, "warmup_epochs": warmup_epochs, "hint_layers": hint_layers}
        return preset_routes(routes, students, **named, **{k: v for k, v in given.items() if v is not None})
    parsed = []
    for route in routes:
        if isinstance(route, Mapping) and {"source", "kind"} <= set(route):
            kind, cls = resolve_kind(route["kind"], f"route {route['source']} -> {route.get('target')}")
            key = weight_key(route["source"], cls, route)
            if "weight" not in route and named[key] == 0:
                logger.warning(
                    "the route %s → %s (%s) has no weight of its own and takes %s, which is 0: it does nothing. "
                    'Give it one ("weight": 0.5) or set --%s.',
                    route["source"], route.get("target"), route["kind"], key, key,
                )  # fmt: skip
            route = {"weight": named[key], **route}
            if kind in TEMPERATURE_KINDS and temperature is not None:
                route.setdefault("temperature", temperature)
            if warmup_epochs is not None:
                route.setdefault("warmup_epochs", warmup_epochs)
            if kind == "feature" and hint_layers is not None:
                route.setdefault("layers", hint_layers)
        parsed.append(route if isinstance(route, Route) else Route.from_dict(route))
    return parsed


def preset_routes(
    preset: str,
    students: Sequence[str] = ("sp", "sf"),
    kd_weight: float = 1.0,
    hint_weight: float = 1.0,
    peer_prediction_weight: float = 1.0,
    peer_feature_weight: float = 1.0,
    temperature: float = 4.0,
    warmup_epochs: int = 0,
    hint_layers: str | None = None,
) -> list[Route]:
    """The routes of a named method (those of the paper, and its baselines).

    Args:
        preset: one of ``student`` (supervised only), ``kd`` (teacher predictions to every student), ``fitnets``
            (teacher features to every student), ``dml`` (students exchange predictions, no teacher), ``kd_dml``,
            ``diversified`` (teacher predictions to the first student, teacher features to the second, students
            exchange predictions and features); ``cwd`` (teacher to every student, channel-wise on the predictions),
            ``dist`` (teacher to every student, DIST), ``diversified_cwd`` (teacher to the first student
            channel-wise on the predictions, teacher to the second channel-wise on the feature maps of the decoder
            layer just before the output, students exchange predictions).
        students: student names; ``diversified`` and ``diversified_cwd`` need exactly two (prediction student first).
        kd_weight: weight of teacher → student prediction terms (α).
        hint_weight: weight of teacher → student feature terms (β).
        peer_prediction_weight: weight of peer prediction terms (γ).
        peer_feature_weight: weight of peer feature terms (δ).
        temperature: softmax temperature of every prediction and channel term (DIST keeps its own, 1).
        warmup_epochs: epochs over which every route's weight ramps up from 0 (:meth:`Route.weight_at`; 0: off).
        hint_layers: the layers of every feature route: ``None`` the bottleneck (or the networks' ``feature_layers``),
            ``"multi"``, ``"encoder"``, ``"decoder"`` or ``"last_decoder"`` (:attr:`Route.layers`); and of
            ``diversified_cwd``'s channel route on features (``None``: ``"last_decoder"``).
    """
    students = list(students)
    w = _named_weights(
        dict(kd_weight=kd_weight, hint_weight=hint_weight, peer_prediction_weight=peer_prediction_weight,
             peer_feature_weight=peer_feature_weight)
    )  # fmt: skip
    number(temperature, "temperature", positive=True)
    warmup_epochs = integer(warmup_epochs, "warmup_epochs")
    pred = dict(kind="prediction", temperature=temperature, warmup_epochs=warmup_epochs)
    feat = dict(kind="feature", warmup_epochs=warmup_epochs, layers=hint_layers)
    peers = [(a, b) for a in students for b in students if a != b]
    if preset == "student":
        return []
    if preset == "kd":
        return [Route(TEACHER, s, weight=w["kd_weight"], **pred) for s in students]
    if preset == "fitnets":
        return [Route(TEACHER, s, weight=w["hint_weight"], **feat) for s in students]
    if preset == "dml":
        return [Route(a, b, weight=w["peer_prediction_weight"], **pred) for a, b in peers]
    if preset == "kd_dml":
        return preset_routes("kd", students, **w, temperature=temperature, warmup_epochs=warmup_epochs) + (
            preset_routes("dml", students, **w, temperature=temperature, warmup_epochs=warmup_epochs)
        )  # no feature routes: hint_layers does not apply
    if preset in ("diversified", "diversified_cwd") and len(students) != 2:
        raise ConfigError(f"the {preset} preset needs exactly two students, got {students}.")
    if preset == "diversified":
        sp, sf = students
        return [
            Route(TEACHER, sp, weight=w["kd_weight"], **pred),
            Route(TEACHER, sf, weight=w["hint_weight"], **feat),
            Route(sf, sp, weight=w["peer_prediction_weight"], **pred),
            Route(sp, sf, weight=w["peer_prediction_weight"], **pred),
            Route(sf, sp, weight=w["peer_feature_weight"], **feat),
            Route(sp, sf, weight=w["peer_feature_weight"], **feat),
        ]
    return _distribution_presets(preset, students, w, temperature, warmup_epochs, hint_layers)


def _distribution_presets(
    preset: str,
    students: list[str],
    w: Mapping[str, float],
    temperature: float,
    warmup_epochs: int,
    hint_layers: str | None,
) -> list[Route]:
    """The presets of the ``channel`` and ``dist`` kinds (:func:`preset_routes`, whose arguments these are)."""
    channel = dict(kind="channel", temperature=temperature, warmup_epochs=warmup_epochs)
    if preset == "cwd":
        return [Route(TEACHER, s, weight=w["kd_weight"], **channel) for s in students]
    if preset == "dist":
        return [Route(TEACHER, s, kind="dist", weight=w["kd_weight"], warmup_epochs=warmup_epochs) for s in students]
    if preset == "diversified_cwd":
        sp, sf = students
        pred = dict(kind="prediction", temperature=temperature, warmup_epochs=warmup_epochs)
        features = dict(layers=hint_layers or "last_decoder", options={"signal": "features"})
        return [
            Route(TEACHER, sp, weight=w["kd_weight"], **channel),
            Route(TEACHER, sf, weight=w["hint_weight"], **channel, **features),
            Route(sf, sp, weight=w["peer_prediction_weight"], **pred),
            Route(sp, sf, weight=w["peer_prediction_weight"], **pred),
        ]
    raise ConfigError(f"unknown routes preset {preset!r}; choose one of {', '.join(PRESETS)}.")


class KnowledgeRoutes(nn.Module):
    """A route graph at work: the layers it reads, the adapters it trains, each route's term and each student's total.

    Args:
        routes: a preset name, or routes or route dicts (see :class:`Route` and :func:`parse_routes`).
        students: student names; ``"teacher"`` is implied.
        feature_layers: module names per network, paired in order by routes that read features without explicit
            ``layers``; a network not listed uses :func:`medkd.knowledge.features.default_feature_layer` (given its
            network to
            :meth:`setup`).

    Each route is run by an instance of its kind (``self.kinds[key]``, a :class:`RouteKind`). Before training,
    :meth:`setup` chooses the layers, hooks the networks and sizes the adapters from one probe forward. Adapter
    parameters belong to the route's target student: :meth:`parameters_of` gives them for that student's optimizer.
    Each step, :meth:`pop_features` gives a network's hooked feature maps after its forward, and :meth:`losses`
    every term and each student's weighted total.
    """

    def __init__(
        self,
        routes: str | Sequence[Route | Mapping],
        students: Sequence[str],
        feature_layers: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__()
        self.students = list(students)
        self.routes = parse_routes(routes, self.students)
        self.feature_layers = {name: list(layers) for name, layers in (feature_layers or {}).items()}
        names = {TEACHER, *self.students}
        seen: set[str] = set()
        for r in self.routes:
            for role, end in (("source", r.source), ("target", r.target)):
                if end not in names:
                    raise ConfigError(
                        f"route {r.to_dict()} has unknown {role} {end!r}; known networks: {sorted(names)}."
                    )
            if r.target == TEACHER:
                raise ConfigError(
                    f"route {r.to_dict()} targets the teacher; targets must be students (a frozen teacher is not "
                    "trained, an online one learns from the labels only)."
                )
            if r.source == r.target:
                raise ConfigError(f"route {r.to_dict()} goes from a network to itself.")
            if r.name in seen:
                raise ConfigError(f"two routes have the term name {r.name}; merge them or give one another kind.")
            seen.add(r.name)
        self.kinds = nn.ModuleDict({self._key(r): r.kind_class(r) for r in self.routes})
        self.extractors: dict[str, FeatureExtractor] = {}
        self._layers: dict[str, list[str]] | None = None
        self._register_load_state_dict_pre_hook(_read_feature_losses_of_before_route_kinds)

    @staticmethod
    def _key(route: Route) -> str:
        return route.name.replace(".", "_")  # ModuleDict keys may not hold dots

    def kind_of(self, route: Route) -> RouteKind:
        """The :class:`RouteKind` instance that runs ``route``."""
        return self.kinds[self._key(route)]

    @property
    def needs_teacher(self) -> bool:
        """Whether any route takes knowledge from the teacher."""
        return any(r.source == TEACHER for r in self.routes)

    def resolve_layers(
        self,
        networks: Mapping[str, nn.Module | None] | None = None,
        example_inputs: Callable[[], torch.Tensor] | None = None,
    ) -> dict[str, list[str]]:
        """Ask every route which layers it reads; a network without ``feature_layers`` gets its default layer
        (when ``networks`` has it), and routes with ``layers: "multi"`` (or ``"encoder"``, ``"decoder"``) get
        depths found by a probe forward on ``example_inputs()`` (:class:`~medkd.knowledge.route.LayerDefaults`).
        Returns the layers by network name."""
        defaults = LayerDefaults(self.feature_layers, networks, example_inputs)
        layers: dict[str, list[str]] = {}
        for r in self.routes:
            for network, names in self.kind_of(r).layers(defaults).items():
                layers.setdefault(network, []).extend(names)
        self._layers = {network: list(dict.fromkeys(names)) for network, names in layers.items() if names}
        return self._layers

    def layers_of(self, network: str) -> list[str]:
        """Module names whose feature maps the routes read from ``network``."""
        if self._layers is None:
            self.resolve_layers()
        return list(self._layers.get(network, []))

    @property
    def built(self) -> bool:
        """Whether every route has its adapters."""
        return all(kind.built for kind in self.kinds.values())

    def build(self, features: Mapping[str, Mapping[str, torch.Tensor]], spatial_dims: int) -> None:
        """Make the adapters of the routes not yet built from one forward's maps ``features[network][layer]``."""
        for kind in self.kinds.values():
            if not kind.built:
                kind.build(features, spatial_dims)

    def setup(
        self,
        networks: Mapping[str, nn.Module],
        example_inputs: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    ) -> None:
        """Prepare the routes to run on ``networks`` (by name, the teacher among them when a route reads it): choose
        the layers, hook a :class:`~medkd.knowledge.features.FeatureExtractor` on each network read, and, when a route
        still
        needs its adapters, run every hooked network once (eval mode, no grad, first sample only) on
        ``example_inputs`` (a batch of inputs, or a function giving one, called only when needed and at most once;
        routes with ``layers: "multi"`` probe their networks on it too) to build them."""
        fetched: list[torch.Tensor] = []

        def inputs() -> torch.Tensor:
            if example_inputs is None:
                raise ValueError("routes with adapters need example inputs to size them; pass example_inputs to setup.")
            if not fetched:
                fetched.append(example_inputs() if callable(example_inputs) else example_inputs)
            return fetched[0]

        layers = self.resolve_layers(networks, inputs if example_inputs is not None else None)
        absent = sorted(set(layers) - {name for name, net in networks.items() if net is not None})
        if absent:
            raise ConfigError(f"routes read feature maps of {absent}, but no such network was given.")
        for extractor in self.extractors.values():
            extractor.remove()
        self.extractors = {name: FeatureExtractor(networks[name], names, name) for name, names in layers.items()}
        if self.built:
            return
        probe = inputs()
        features = {}
        with torch.no_grad():
            for name, extractor in self.extractors.items():
                network = unwrap(networks[name])  # no DDP collectives for a local probe
                was_training = network.training
                network.eval()
                network(probe[:1])
                network.train(was_training)
                features[name] = extractor.pop()
        self.build(features, spatial_dims=probe.ndim - 2)
        self.to(probe.device)

    def parameters_of(self, student: str) -> list[nn.Parameter]:
        """Parameters (adapters) trained with ``student``: those of the routes that target it."""
        return [p for r in self.routes if r.target == student for p in self.kind_of(r).parameters()]

    def pop_features(self, network: str) -> dict[str, torch.Tensor]:
        """The feature maps the routes read from ``network``, hooked during its last forward (``{}`` when none)."""
        extractor = self.extractors.get(network)
        return extractor.pop() if extractor is not None else {}

    def forward(
        self,
        logits: Mapping[str, torch.Tensor],
        features: Mapping[str, Mapping[str, torch.Tensor]],
        targets: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Unweighted loss of every route weighted other than 0 (:attr:`active`), keyed by :attr:`Route.name`."""
        outputs = StepOutputs(logits, features, targets)
        return {r.name: self.kind_of(r)(outputs) for r in self.active}

    @property
    def active(self) -> list[Route]:
        """The routes whose term is computed: those with a weight other than 0. A route weighted 0 (e.g. the peer
        feature routes under ``peer_feature_weight`` 0) would add nothing to its student's loss or gradient, so it
        is neither computed nor logged; it keeps its hooks and adapters, so checkpoints do not depend on the
        weights."""
        return [r for r in self.routes if r.weight != 0]

    def losses(
        self,
        logits: Mapping[str, torch.Tensor],
        features: Mapping[str, Mapping[str, torch.Tensor]],
        supervised: Mapping[str, torch.Tensor],
        targets: torch.Tensor | None = None,
        epoch: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every term of one step: ``"<student>/sup"`` (the ``supervised`` loss of each student), each active
        route's unweighted term (:meth:`forward`) and ``"<student>/total"``, the supervised loss plus the terms of the
        routes that target the student, each weighted by its weight in ``epoch`` (:meth:`Route.weight_at`: warm-up;
        ``None``, the full weights)."""
        route_terms = self(logits, features, targets)
        totals = {s: supervised[s] for s in self.students}
        for route in self.active:
            totals[route.target] = totals[route.target] + route.weight_at(epoch) * route_terms[route.name]
        return {
            **{f"{s}/sup": supervised[s] for s in self.students},
            **route_terms,
            **{f"{s}/total": total for s, total in totals.items()},
        }

    def sync_gradients(self) -> None:
        """Average the adapters' gradients across processes (the students are DDP-wrapped; the adapters are not)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        for p in self.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world


def _read_feature_losses_of_before_route_kinds(state_dict: dict, prefix: str, *args: Any) -> None:
    """Load a ``KnowledgeRoutes`` state saved before route kinds (``feature_losses.<route>.<i>.…``, e.g. in a resume
    checkpoint) as ``kinds.<route>.losses.<i>.…``."""
    old = prefix + "feature_losses."
    for key in [k for k in state_dict if k.startswith(old)]:
        route, _, rest = key[len(old) :].partition(".")
        state_dict[f"{prefix}kinds.{route}.losses.{rest}"] = state_dict.pop(key)
