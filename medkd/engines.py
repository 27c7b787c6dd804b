"""``DistillationTrainer``: one frozen teacher and N students trained together along knowledge routes."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer, Trainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn, default_prepare_batch
from monai.transforms import Decollated
from monai.utils.enums import CommonKeys as Keys
from torch import nn
from torch.optim import Optimizer

from medkd.checkpoints import load_network_weights
from medkd.errors import ConfigError, UserErrorsFirst
from medkd.features import FeatureExtractor, default_feature_layer, unwrap
from medkd.routes import TEACHER, KnowledgeRoutes, Route, parse_routes
from medkd.teacher_cache import TeacherCache

__all__ = ["DistillationTrainer", "TeacherTrainer", "LOSSES", "iteration_losses"]

LOSSES = "losses"  # engine output key of the per-term losses
logger = logging.getLogger(__name__)


def iteration_losses(output: Mapping | Sequence[Mapping]) -> Mapping[str, float | torch.Tensor]:
    """Every loss term of a :class:`DistillationTrainer` iteration, from ``engine.state.output`` decollated (a list
    of per-sample dicts, each holding the terms as floats) or not (one dict of detached 0-d tensors)."""
    return (output if isinstance(output, Mapping) else output[0])[LOSSES]


def _plain(x: Any) -> Any:
    """A ``MetaTensor``'s data as a plain tensor (a view, no copy); anything else unchanged.

    MONAI's ``MetaTensor.__torch_function__`` runs Python metadata bookkeeping on every op of every network and loss
    (see ``docs/benchmarks.md``), and the training step needs none of the metadata: ``engine.state.output`` keeps
    the batch as given and the teacher cache reads the sample ids from the raw batch.
    """
    return x.as_tensor() if isinstance(x, MetaTensor) else x


class TeacherTrainer(UserErrorsFirst, SupervisedTrainer):
    """MONAI's ``SupervisedTrainer`` for the teacher stage, with its network moved to the trainer's device.

    Every medkd engine puts the networks it runs on its own ``device`` (MONAI's engines leave that to the caller),
    so a bundle never has to; arguments are those of ``SupervisedTrainer``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: Optimizer,
        loss_function: Callable,
        **kwargs: Any,
    ) -> None:
        super().__init__(device, max_epochs, train_data_loader, network.to(device), optimizer, loss_function, **kwargs)


class DistillationTrainer(UserErrorsFirst, Trainer):
    """Train students with a frozen teacher and with each other, along knowledge routes (see ``medkd.routes``).

    One iteration runs the teacher forward once (no grad), every student forward, the supervised loss of each
    student plus the weighted terms of the routes that target it, one backward, and every student's optimizer.
    Peer signals are detached, so each student is updated only by its own loss. It fires MONAI's
    ``IterationEvents`` like ``SupervisedTrainer`` and returns in ``engine.state.output``:
    ``image``, ``label``, ``pred`` (logits per network name), ``loss`` (sum of the students' totals) and
    ``losses`` (every term, detached: ``"<student>/sup"``, ``"<student>/<kind>_from_<source>"`` unweighted, and
    ``"<student>/total"`` weighted). As in ``SupervisedTrainer``, ``decollate=True`` (the default) turns that dict
    into a list of per-sample dicts with ``loss`` and ``losses`` replicated as floats, so MONAI handlers configured
    the usual way (``from_engine(["loss"], first=True)``, ``--tracking mlflow``) read it unchanged;
    :func:`iteration_losses` reads the terms from either form.

    Args:
        device: device to run on.
        max_epochs: epochs to train.
        train_data_loader: data loader (or iterable) of training batches.
        students: student networks by name, e.g. ``{"sp": unet_small, "sf": unet_small2}``.
        optimizers: one optimizer per student, same names. Feature-route adapters are added to the target
            student's optimizer as an extra parameter group.
        loss_function: supervised loss ``(logits, label) -> loss`` (e.g. ``DiceCELoss``, ``CrossEntropyLoss``).
        teacher: the teacher network; frozen (eval mode, no gradients). Needed when a route starts at it, ignored
            (not loaded, not run) otherwise.
        teacher_checkpoint: optional path of the teacher's weights, loaded before training.
        routes: a preset name (``"diversified"``, ``"kd"``, ...), or a list of routes or route dicts.
        feature_layers: module names per network for feature routes; networks not listed use
            :func:`medkd.features.default_feature_layer`.
        example_batch: a batch to size the adapters with; ``None`` takes the first batch of the data loader.
        teacher_cache: optional :class:`medkd.teacher_cache.TeacherCache`, to reuse teacher outputs across epochs
            when the teacher's inputs are deterministic (samples named by ``meta["filename_or_obj"]``). Its first
            hit is checked against a recomputed teacher forward (``verify=True``, the default).
        nan_policy: ``"raise"`` stops on a non-finite loss naming the iteration and term, ``"skip"`` skips that
            step with a warning, ``"ignore"`` does not check (no host sync).
        amp: autocast the forward passes; ``amp_kwargs={"dtype": torch.bfloat16}`` for bf16. A gradient scaler is
            used for float16 on CUDA only.
        Other arguments are those of ``monai.engines.SupervisedTrainer``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        students: Mapping[str, nn.Module],
        optimizers: Mapping[str, Optimizer],
        loss_function: Callable,
        teacher: nn.Module | None = None,
        teacher_checkpoint: str | None = None,
        routes: str | Sequence[Route | Mapping] = "diversified",
        feature_layers: Mapping[str, Sequence[str]] | None = None,
        example_batch: Any = None,
        teacher_cache: TeacherCache | None = None,
        nan_policy: str = "raise",
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        iteration_update: Callable | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = True,
        optim_set_to_none: bool = True,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=train_handlers,
            amp=amp,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=decollate,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )
        if set(students) != set(optimizers):
            raise ValueError(
                f"students {sorted(students)} and optimizers {sorted(optimizers)} must have the same names."
            )
        if TEACHER in students:
            raise ConfigError(f"'{TEACHER}' is reserved for the teacher; rename that student.")
        if nan_policy not in ("raise", "skip", "ignore"):
            raise ConfigError(f"nan_policy must be 'raise', 'skip' or 'ignore', got {nan_policy!r}.")
        self.students = {name: net.to(self.state.device) for name, net in students.items()}
        self.optimizers = dict(optimizers)
        self.loss_function = loss_function
        self.nan_policy = nan_policy
        self.optim_set_to_none = optim_set_to_none
        self.teacher_cache = teacher_cache
        parsed = parse_routes(routes, list(self.students))
        self.routes = KnowledgeRoutes(
            parsed, list(self.students), self._feature_layers(parsed, feature_layers, teacher)
        )
        if self.routes.needs_teacher and teacher is None:
            raise ValueError("a route takes knowledge from the teacher, but no teacher network was given.")
        # a teacher no route reads from (student alone, DML) is neither loaded nor run
        self.teacher = self._freeze(teacher, teacher_checkpoint) if self.routes.needs_teacher else None
        self.networks: dict[str, nn.Module] = {TEACHER: self.teacher} if self.teacher is not None else {}
        self.networks.update(self.students)
        self.extractors = {
            name: FeatureExtractor(net, self.routes.layers_of(name), name)
            for name, net in self.networks.items()
            if self.routes.layers_of(name)
        }
        self.routes.to(self.state.device)
        if not self.routes.built:
            self._build_adapters(example_batch if example_batch is not None else next(iter(train_data_loader)))

    def _feature_layers(
        self, routes: list[Route], feature_layers: Mapping[str, Sequence[str]] | None, teacher: nn.Module | None
    ) -> dict[str, list[str]]:
        layers = {k: list(v) for k, v in (feature_layers or {}).items()}
        networks = {TEACHER: teacher, **self.students}
        for route in routes:
            if route.kind != "feature" or route.layers is not None:
                continue
            for name in (route.source, route.target):
                if name not in layers and networks.get(name) is not None:
                    layers[name] = [default_feature_layer(networks[name])]
        return layers

    def _freeze(self, teacher: nn.Module, checkpoint: str | None) -> nn.Module:
        if checkpoint:
            load_network_weights(teacher, checkpoint, map_location=self.state.device, role=TEACHER)
        teacher.to(self.state.device).eval()
        teacher.requires_grad_(False)
        return teacher

    def _register_decollate(self) -> None:
        """Decollate batch and output after each iteration like MONAI's ``Workflow``, keeping the per-term losses
        whole (as floats) in every item: ``decollate_batch`` would iterate a dict holding only scalars by its keys."""
        transform = Decollated(keys=None, detach=True)

        @self.on(IterationEvents.MODEL_COMPLETED)
        def _decollate_data(engine: DistillationTrainer) -> None:
            if isinstance(engine.state.batch, (list, dict)):
                engine.state.batch = transform(engine.state.batch)
            output = engine.state.output
            if isinstance(output, dict):
                terms = {name: float(value) for name, value in output.pop(LOSSES, {}).items()}
                engine.state.output = [{**item, LOSSES: dict(terms)} for item in transform(output)]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.state.device).type, **self.amp_kwargs)

    def _build_adapters(self, batchdata: Any) -> None:
        """Size the feature-route adapters from one forward pass and give each to its student's optimizer."""
        inputs = _plain(self.prepare_batch(batchdata, self.state.device, self.non_blocking, **self.to_kwargs)[0])
        features = {}
        with torch.no_grad():
            for name, extractor in self.extractors.items():
                network = unwrap(self.networks[name])  # no DDP collectives for a local probe
                was_training = network.training
                network.eval()
                network(inputs[:1])
                network.train(was_training)
                features[name] = extractor.pop()
        self.routes.build(features, spatial_dims=inputs.ndim - 2)
        self.routes.to(self.state.device)
        for name, optimizer in self.optimizers.items():
            params = self.routes.parameters_of(name)
            if params:
                optimizer.add_param_group({"params": params})

    def _sync_adapter_grads(self) -> None:
        """Average adapter gradients across processes (students are DDP-wrapped; the adapters are not)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        for p in self.routes.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world

    def run(self) -> None:  # type: ignore[override]
        """Train; the float16 gradient scaler is only created for CUDA."""
        use_scaler = (
            self.amp
            and torch.device(self.state.device).type == "cuda"
            and self.amp_kwargs.get("dtype", torch.float16) == torch.float16
        )
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        super(Trainer, self).run()

    def _teacher_outputs(self, inputs: torch.Tensor, batchdata: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cache = self.teacher_cache
        cached = cache.get(batchdata, self.state.device) if cache is not None else None
        if cached is not None and cached[0].shape[0] != inputs.shape[0]:
            cached = None  # sample ids that do not match the batch (e.g. metadata not collated per sample)
        if cached is not None and not cache.needs_verification:
            return cached
        with torch.no_grad():
            logits = self.teacher(inputs)
        features = self.extractors[TEACHER].pop() if TEACHER in self.extractors else {}
        if cached is not None:  # first hit: the cached outputs must equal the recomputed ones
            cache.verify(cached, (logits, features), batchdata)
        elif cache is not None:
            cache.put(batchdata, logits, features)
        return logits, features

    def _losses(
        self, logits: dict[str, torch.Tensor], features: dict[str, dict[str, torch.Tensor]], targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        terms = {f"{s}/sup": self.loss_function(logits[s], targets).mean() for s in self.students}
        route_terms = self.routes(logits, features)
        totals = {s: terms[f"{s}/sup"] for s in self.students}
        for route in self.routes.routes:
            totals[route.target] = totals[route.target] + route.weight * route_terms[route.name]
        terms.update(route_terms)
        terms.update({f"{s}/total": t for s, t in totals.items()})
        return terms

    def _check_finite(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> bool:
        if self.nan_policy == "ignore" or bool(torch.isfinite(loss)):
            return True
        bad = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items() if not bool(torch.isfinite(v)))
        where = f"epoch {self.state.epoch}, iteration {self.state.iteration}"
        if self.nan_policy == "raise":
            raise FloatingPointError(
                f"non-finite loss at {where}: {bad}. Lower the learning rate or that term's weight, check the input "
                "intensities, or set nan_policy='skip' to skip such steps."
            )
        warnings.warn(f"skipping the step at {where}: non-finite loss {bad}.", stacklevel=2)
        return False

    def _iteration(self, engine: DistillationTrainer, batchdata: Any) -> dict:
        """One distillation step; see the class docstring for the output."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}  # as given, metadata included
        inputs, targets = _plain(inputs), _plain(targets)  # the networks and losses run on plain tensors
        for name, student in engine.students.items():
            student.train()
            engine.optimizers[name].zero_grad(set_to_none=engine.optim_set_to_none)

        with engine._autocast():
            logits, features = {}, {}
            if engine.teacher is not None:
                logits[TEACHER], features[TEACHER] = engine._teacher_outputs(inputs, batchdata)
            for name, student in engine.students.items():
                logits[name] = student(inputs)
                if name in engine.extractors:
                    features[name] = engine.extractors[name].pop()
            engine.state.output[Keys.PRED] = logits
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            terms = engine._losses(logits, features, targets)
            loss = sum(terms[f"{s}/total"] for s in engine.students)
            engine.state.output[Keys.LOSS] = loss.detach()
            engine.state.output[LOSSES] = {k: v.detach() for k, v in terms.items()}
            engine.fire_event(IterationEvents.LOSS_COMPLETED)

        if engine._check_finite(loss, terms):
            if engine.scaler is not None:
                engine.scaler.scale(loss).backward()
                engine._sync_adapter_grads()
                engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
                for optimizer in engine.optimizers.values():
                    engine.scaler.step(optimizer)
                engine.scaler.update()
            else:
                loss.backward()
                engine._sync_adapter_grads()
                engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
                for optimizer in engine.optimizers.values():
                    optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
