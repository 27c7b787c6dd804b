"""Knowledge routes: who teaches whom, in which form, and the named presets built from them.

A route is ``{source, target, kind, weight, temperature, layers}``: ``source`` teaches ``target`` (each ``"teacher"``
or a student name) through its predictions (``kind="prediction"``, temperature-scaled KL) or its feature maps
(``kind="feature"``, hint loss with an adapter). Any graph of routes over one teacher and N students is allowed;
the presets (student alone, KD, FitNets, DML, KD+DML, diversified) are named graphs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from medkd.errors import ConfigError
from medkd.losses import FeatureDistillationLoss, PredictionDistillationLoss

__all__ = ["TEACHER", "PRESETS", "Route", "KnowledgeRoutes", "preset_routes", "parse_routes"]

TEACHER = "teacher"
KINDS = ("prediction", "feature")
PRESETS = ("student", "kd", "fitnets", "dml", "kd_dml", "diversified")
# the options that mean something for each kind; any other is an error, not silently ignored
KIND_OPTIONS = {"prediction": ("weight", "temperature"), "feature": ("weight", "layers", "mode")}
FEATURE_MODES = ("mse", "attention")


def _number(value: object, what: str, positive: bool = False) -> float:
    """``value`` as a float, or a :class:`ConfigError` naming ``what`` when it is not a finite number ``>= 0``
    (``> 0`` when ``positive``)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ConfigError(f"{what} must be a finite number {bound}, got {value!r}.")
    return float(value)


@dataclass
class Route:
    """One flow of knowledge from ``source`` to ``target``.

    Args:
        source: ``"teacher"`` or a student name; its signal is detached.
        target: a student name; the term is added to this student's loss.
        kind: ``"prediction"`` or ``"feature"``.
        weight: multiplier of the term in the target's loss.
        temperature: softmax temperature of a prediction route.
        layers: for a feature route, ``[[source_layer, target_layer], ...]`` module names; ``None`` pairs the
            networks' ``feature_layers`` in order.
        mode: feature loss, ``"mse"`` (normalised hint) or ``"attention"`` (attention transfer).
    """

    source: str
    target: str
    kind: str
    weight: float = 1.0
    temperature: float = 4.0
    layers: list[list[str]] | None = None
    mode: str = "mse"
    _pairs: list[tuple[str, str]] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"route {self.source} -> {self.target} has kind {self.kind!r}; use one of {KINDS}.")
        self.weight = _number(self.weight, f"the weight of route {self.name}")
        self.temperature = _number(self.temperature, f"the temperature of route {self.name}", positive=True)
        if self.mode not in FEATURE_MODES:
            raise ConfigError(f"route {self.name} has mode {self.mode!r}; use one of {FEATURE_MODES}.")

    @property
    def name(self) -> str:
        """Key of this route's term in the engine output, e.g. ``"sp/prediction_from_teacher"``."""
        return f"{self.target}/{self.kind}_from_{self.source}"

    def to_dict(self) -> dict:
        """JSON-serialisable form (the same keys accepted by :func:`parse_routes`)."""
        d = asdict(self)
        d.pop("_pairs")
        return d


def parse_routes(routes: Sequence[Route | Mapping] | str, students: Sequence[str]) -> list[Route]:
    """Routes from a preset name, or from a list of :class:`Route` or dicts (as written in bundle JSON)."""
    if isinstance(routes, str):
        return preset_routes(routes, students)
    parsed = []
    for i, r in enumerate(routes):
        if isinstance(r, Route):
            parsed.append(r)
            continue
        if not {"source", "target", "kind"} <= set(r):
            raise ConfigError(f"route {i} {dict(r)} is malformed: it needs 'source', 'target' and 'kind'.")
        options = KIND_OPTIONS.get(r["kind"], ())
        unknown = sorted(set(r) - {"source", "target", "kind", *options})
        if unknown and r["kind"] in KIND_OPTIONS:
            raise ConfigError(
                f"route {i} {dict(r)}: {unknown} do(es) nothing on a {r['kind']} route, which accepts "
                f"{list(options)}; remove it or fix the spelling."
            )
        parsed.append(Route(**r))
    return parsed


def preset_routes(
    preset: str,
    students: Sequence[str] = ("sp", "sf"),
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    delta: float = 1.0,
    temperature: float = 4.0,
) -> list[Route]:
    """The routes of a named method (see METHOD.md).

    Args:
        preset: one of ``student`` (supervised only), ``kd`` (teacher predictions to every student), ``fitnets``
            (teacher features to every student), ``dml`` (students exchange predictions, no teacher), ``kd_dml``,
            ``diversified`` (teacher predictions to the first student, teacher features to the second, students
            exchange predictions and features).
        students: student names; ``diversified`` needs exactly two (prediction student first).
        alpha: weight of teacher → student prediction terms.
        beta: weight of teacher → student feature terms.
        gamma: weight of peer prediction terms.
        delta: weight of peer feature terms.
        temperature: softmax temperature of every prediction term.
    """
    students = list(students)
    meaning = {"alpha": "teacher prediction", "beta": "teacher feature", "gamma": "peer prediction",
               "delta": "peer feature"}  # fmt: skip
    for key, value in zip(meaning, (alpha, beta, gamma, delta), strict=True):
        _number(value, f"{key} (the weight of {meaning[key]} terms)")
    _number(temperature, "temperature", positive=True)
    pred = dict(kind="prediction", temperature=temperature)
    peers = [(a, b) for a in students for b in students if a != b]
    if preset == "student":
        return []
    if preset == "kd":
        return [Route(TEACHER, s, weight=alpha, **pred) for s in students]
    if preset == "fitnets":
        return [Route(TEACHER, s, "feature", weight=beta) for s in students]
    if preset == "dml":
        return [Route(a, b, weight=gamma, **pred) for a, b in peers]
    if preset == "kd_dml":
        return preset_routes("kd", students, alpha=alpha, temperature=temperature) + preset_routes(
            "dml", students, gamma=gamma, temperature=temperature
        )
    if preset == "diversified":
        if len(students) != 2:
            raise ConfigError(f"the diversified preset needs exactly two students, got {students}.")
        sp, sf = students
        return [
            Route(TEACHER, sp, weight=alpha, **pred),
            Route(TEACHER, sf, "feature", weight=beta),
            Route(sf, sp, weight=gamma, **pred),
            Route(sp, sf, weight=gamma, **pred),
            Route(sf, sp, "feature", weight=delta),
            Route(sp, sf, "feature", weight=delta),
        ]
    raise ConfigError(f"unknown routes preset {preset!r}; choose one of {', '.join(PRESETS)}.")


class KnowledgeRoutes(nn.Module):
    """The loss terms of a route graph, with the adapters of its feature routes.

    Args:
        routes: the routes (see :class:`Route`).
        students: student names; ``"teacher"`` is implied.
        feature_layers: module names per network, paired in order by feature routes without explicit ``layers``.

    Feature routes need channel counts to build their adapters: call :meth:`build` once with one forward's
    feature maps before training (the engine does this). Adapter parameters belong to the route's target
    student: :meth:`parameters_of` gives them for that student's optimizer.
    """

    def __init__(
        self, routes: Sequence[Route], students: Sequence[str], feature_layers: Mapping[str, Sequence[str]]
    ) -> None:
        super().__init__()
        self.routes = list(routes)
        self.students = list(students)
        names = {TEACHER, *self.students}
        for r in self.routes:
            for role, end in (("source", r.source), ("target", r.target)):
                if end not in names:
                    raise ConfigError(
                        f"route {r.to_dict()} has unknown {role} {end!r}; known networks: {sorted(names)}."
                    )
            if r.target == TEACHER:
                raise ConfigError(
                    f"route {r.to_dict()} targets the teacher, which is frozen; targets must be students."
                )
            if r.source == r.target:
                raise ConfigError(f"route {r.to_dict()} goes from a network to itself.")
            if r.kind not in KINDS:
                raise ConfigError(f"route {r.to_dict()} has kind {r.kind!r}; use one of {KINDS}.")
            if r.kind == "feature":
                r._pairs = self._layer_pairs(r, feature_layers)
        self.prediction_losses = nn.ModuleDict(
            {self._key(r): PredictionDistillationLoss(r.temperature) for r in self.routes if r.kind == "prediction"}
        )
        self.feature_losses = nn.ModuleDict()

    @staticmethod
    def _key(route: Route) -> str:
        return route.name.replace(".", "_")  # ModuleDict keys may not hold dots

    @staticmethod
    def _layer_pairs(route: Route, feature_layers: Mapping[str, Sequence[str]]) -> list[tuple[str, str]]:
        if route.layers is not None:
            return [(src, dst) for src, dst in route.layers]
        missing = [n for n in (route.source, route.target) if not feature_layers.get(n)]
        if missing:
            raise ConfigError(
                f"feature route {route.name} needs layers: give 'layers' or feature_layers for {missing}."
            )
        src, dst = feature_layers[route.source], feature_layers[route.target]
        if len(src) != len(dst):
            raise ConfigError(
                f"feature route {route.name} pairs layers in order, but {route.source} has {len(src)} and "
                f"{route.target} has {len(dst)}; give the pairs in the route's 'layers'."
            )
        return list(zip(src, dst, strict=True))

    @property
    def needs_teacher(self) -> bool:
        """Whether any route takes knowledge from the teacher."""
        return any(r.source == TEACHER for r in self.routes)

    def layers_of(self, network: str) -> list[str]:
        """Module names whose feature maps the routes read from ``network``."""
        layers = []
        for r in self.routes:
            for src, dst in r._pairs:
                layers += [src] if r.source == network else []
                layers += [dst] if r.target == network else []
        return list(dict.fromkeys(layers))

    @property
    def built(self) -> bool:
        """Whether every feature route has its losses (and adapters)."""
        return all(self._key(r) in self.feature_losses for r in self.routes if r.kind == "feature")

    def build(self, features: Mapping[str, Mapping[str, torch.Tensor]], spatial_dims: int) -> None:
        """Create the feature losses from one forward's feature maps ``features[network][layer]``."""
        for r in self.routes:
            if r.kind != "feature" or self._key(r) in self.feature_losses:
                continue
            self.feature_losses[self._key(r)] = nn.ModuleList(
                FeatureDistillationLoss(
                    features[r.target][dst].shape[1], features[r.source][src].shape[1], spatial_dims, mode=r.mode
                )
                for src, dst in r._pairs
            )

    def parameters_of(self, student: str) -> list[nn.Parameter]:
        """Adapter parameters trained with ``student`` (targets of feature routes)."""
        return [p for r in self.routes if r.kind == "feature" and r.target == student
                for p in self.feature_losses[self._key(r)].parameters()]  # fmt: skip

    def forward(
        self, logits: Mapping[str, torch.Tensor], features: Mapping[str, Mapping[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Unweighted loss of every route, keyed by :attr:`Route.name`."""
        terms = {}
        # one log-softmax (and one softmax of the detached source) per network and temperature, shared by routes
        log_probs: dict[tuple[str, float], torch.Tensor] = {}
        probs: dict[tuple[str, float], torch.Tensor] = {}

        def log_p(network: str, loss: PredictionDistillationLoss) -> torch.Tensor:
            if (network, loss.temperature) not in log_probs:
                log_probs[network, loss.temperature] = loss.log_probs(logits[network])
            return log_probs[network, loss.temperature]

        def p(network: str, loss: PredictionDistillationLoss) -> torch.Tensor:
            if (network, loss.temperature) not in probs:
                probs[network, loss.temperature] = log_p(network, loss).detach().exp()
            return probs[network, loss.temperature]

        for r in self.routes:
            key = self._key(r)
            if r.kind == "prediction":
                loss = self.prediction_losses[key]
                dst, src = log_p(r.target, loss), log_p(r.source, loss)  # the source is detached in the loss
                terms[r.name] = loss.from_log_probs(dst, src, p_src=p(r.source, loss))
            else:
                losses = self.feature_losses[key]
                terms[r.name] = sum(
                    loss(features[r.target][dst], features[r.source][src])
                    for loss, (src, dst) in zip(losses, r._pairs, strict=True)
                )
        return terms
