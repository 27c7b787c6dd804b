"""``DistillationTrainer``: one teacher (frozen or online) and N students trained together along knowledge routes."""

from __future__ import annotations

import logging
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

from medkd.bundles import TEACHER
from medkd.errors import ConfigError
from medkd.knowledge.routes import KnowledgeRoutes, Route
from medkd.knowledge.teacher import check_teacher_mode
from medkd.knowledge.teacher_cache import TeacherCache
from medkd.runtime.distributed import unwrap
from medkd.training.mixing import BatchMixer, MixedBatch
from medkd.training.nonfinite import NonFiniteLoss
from medkd.training.teachers import Teacher, make_teacher
from medkd.training.workflow import MedkdWorkflow

__all__ = ["DistillationTrainer", "TeacherTrainer", "LOSSES", "iteration_losses", "student_optimizers"]

LOSSES = "losses"  # engine output key of the per-term losses
logger = logging.getLogger(__name__)


def student_optimizers(
    students: Mapping[str, nn.Module], make: Callable[[Iterable[nn.Parameter]], Optimizer]
) -> dict[str, Optimizer]:
    """One optimizer per student from one definition: ``make(parameters)``, e.g. a bundle's
    ``{"_target_": "torch.optim.Adam", "lr": ..., "_mode_": "callable"}``."""
    return {name: make(student.parameters()) for name, student in students.items()}


def iteration_losses(output: Mapping | Sequence[Mapping]) -> Mapping[str, float | torch.Tensor]:
    """Every loss term of a :class:`DistillationTrainer` iteration, from ``engine.state.output`` decollated (a list
    of per-sample dicts, each holding the terms as floats) or not (one dict of detached 0-d tensors)."""
    return (output if isinstance(output, Mapping) else output[0])[LOSSES]


def _check_names(students: Mapping[str, nn.Module], optimizers: Mapping[str, Optimizer]) -> None:
    """One optimizer per student, by the same names, none of them the teacher's."""
    if set(students) != set(optimizers):
        raise ValueError(f"students {sorted(students)} and optimizers {sorted(optimizers)} must have the same names.")
    if TEACHER in students:
        raise ConfigError(f"'{TEACHER}' is reserved for the teacher; rename that student.")


def _checked_mixing(mixing: BatchMixer | None, teacher: Teacher | None) -> BatchMixer | None:
    """``mixing``, unless the teacher reuses cached outputs, which no mixed batch can."""
    if mixing is not None and getattr(teacher, "cache", None) is not None:
        raise ConfigError(
            "mix cannot use a teacher cache: the teacher must see each step's mixed images, which no earlier "
            "epoch saw. Leave out the teacher_cache, or set --mix null."
        )
    return mixing


def _plain(x: Any) -> Any:
    """A ``MetaTensor``'s data as a plain tensor (a view, no copy); anything else unchanged.

    MONAI's ``MetaTensor.__torch_function__`` runs Python metadata bookkeeping on every op of every network and loss
    (see ``docs/benchmarks.md``), and the training step needs none of the metadata: ``engine.state.output`` keeps
    the batch as given and the teacher cache reads the sample ids from the raw batch.
    """
    return x.as_tensor() if isinstance(x, MetaTensor) else x


class TeacherTrainer(MedkdWorkflow, SupervisedTrainer):
    """MONAI's ``SupervisedTrainer`` for the teacher stage, with its network moved to the trainer's device.

    Every medkd engine (:class:`medkd.training.workflow.MedkdWorkflow`) puts the networks it runs on its own
    ``device`` (MONAI's engines leave that to the caller), so a bundle never has to, converts it to the channels-last
    layout with ``channels_last`` (:mod:`medkd.runtime.layout`) and compiles it in place with ``compile``
    (:mod:`medkd.training.compiling`); the other arguments are those of ``SupervisedTrainer``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: Optimizer,
        loss_function: Callable,
        compile: bool = False,
        compile_kwargs: dict | None = None,
        channels_last: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(device, max_epochs, train_data_loader, network, optimizer, loss_function, **kwargs)
        self._setup_networks([self.network], channels_last, compile, compile_kwargs)

    def checkpoint_objects(self) -> dict[str, Any]:
        """What a resume checkpoint must hold besides the engine state (see
        :meth:`DistillationTrainer.checkpoint_objects`): ``network`` (unwrapped from DDP), ``optimizer`` and, while
        one is in use, ``scaler``."""
        objects = {"network": unwrap(self.network), "optimizer": self.optimizer}
        if getattr(self, "scaler", None) is not None:
            objects["scaler"] = self.scaler
        return objects


class DistillationTrainer(MedkdWorkflow, Trainer):
    """Train students with a teacher and with each other, along knowledge routes (see ``medkd.knowledge.routes``).

    One iteration (:meth:`_iteration`) runs the teacher once (frozen: no grad, see
    :class:`medkd.training.teachers.FrozenTeacher`; online: trained, see
    :class:`medkd.training.teachers.OnlineTeacher`), every student forward, the supervised loss of each student plus
    the weighted terms of the routes that target it (:meth:`medkd.knowledge.routes.KnowledgeRoutes.losses`), an
    online teacher's supervised loss, one backward, and the optimizer of every network trained
    (:attr:`trained_optimizers`). Sources are detached, so each network is updated only by its own loss. It fires
    MONAI's ``IterationEvents`` like ``SupervisedTrainer`` and returns in ``engine.state.output``: ``image``,
    ``label``, ``pred`` (logits per network name), ``loss`` (sum of the trained networks' totals) and ``losses``
    (every term, detached: ``"<student>/sup"``, ``"<student>/<kind>_from_<source>"`` unweighted,
    ``"<student>/total"`` weighted, and ``"teacher/sup"`` and ``"teacher/total"`` for an online teacher). As in
    ``SupervisedTrainer``, ``decollate=True`` (the default) turns that dict into a list of per-sample dicts with
    ``loss`` and ``losses`` replicated as floats, so MONAI handlers configured the usual way
    (``from_engine(["loss"], first=True)``, ``--tracking mlflow``) read it unchanged; :func:`iteration_losses` reads
    the terms from either form. See ``docs/architecture.md``.

    Args:
        device: device to run on.
        max_epochs: epochs to train.
        train_data_loader: data loader (or iterable) of training batches.
        students: student networks by name, e.g. ``{"sp": unet_small, "sf": unet_small2}``.
        optimizers: one optimizer per student, same names. Route adapters are added to the target student's
            optimizer as an extra parameter group.
        loss_function: supervised loss ``(logits, label) -> loss`` (e.g. ``DiceCELoss``, ``CrossEntropyLoss``).
        teacher: the teacher network, in the role ``teacher_mode`` names, or a :class:`medkd.training.teachers.Teacher`
            (used as it is). A frozen teacher is needed when a route starts at it, ignored (not loaded, not run)
            otherwise; an online teacher is always trained.
        teacher_checkpoint: optional path of the teacher network's weights, loaded before training (an online
            teacher without one starts from scratch).
        routes: a preset name (``"diversified"``, ``"kd"``, ...), or a list of routes or route dicts.
        feature_layers: module names per network for routes that read features; networks not listed use
            :func:`medkd.knowledge.features.default_feature_layer`.
        example_batch: a batch to size the adapters with; ``None`` takes the first batch of the data loader.
        teacher_cache: optional :class:`medkd.knowledge.teacher_cache.TeacherCache`, to reuse teacher outputs across
            epochs when the teacher's inputs are deterministic (samples named by ``meta["filename_or_obj"]``). Its first
            hit is checked against a recomputed teacher forward (``verify=True``, the default).
        nan_policy: ``"raise"`` stops on a non-finite loss (an online teacher's included) naming the iteration and
            terms, ``"skip"`` skips that step with a warning (weights, optimizer states and BatchNorm statistics as
            before it; every DDP process alike), ``"ignore"`` does not check (no host sync): the policy of
            :class:`medkd.training.nonfinite.NonFiniteLoss`.
        teacher_mode: ``"frozen"`` (the offline teacher, :class:`medkd.training.teachers.FrozenTeacher`) or ``"online"``
            (trained with the students by its supervised loss, :class:`medkd.training.teachers.OnlineTeacher`; no
            ``teacher_cache``).
        teacher_optimizer: the online teacher's optimizer (required online), stepped with the students' ones.
        amp: autocast the forward passes; ``amp_kwargs={"dtype": torch.bfloat16}`` for bf16. A gradient scaler is
            used for float16 on CUDA only.
        compile: ``torch.compile`` the teacher and the students in place (:mod:`medkd.training.compiling`), with the
            routes' feature hooks traced in; ``compile_kwargs`` are ``torch.compile``'s.
        channels_last: convert the teacher, the students and the routes' adapters to the channels-last layout
            (:mod:`medkd.runtime.layout`).
        mixing: optional :class:`medkd.training.mixing.BatchMixer` (mixup or cutmix): each batch is mixed before the
            forwards, so the teacher and the students see the same mixed images, and the supervised losses follow
            the mixing (:meth:`medkd.training.mixing.MixedBatch.loss`); no ``teacher_cache``.
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
        teacher: nn.Module | Teacher | None = None,
        teacher_checkpoint: str | None = None,
        routes: str | Sequence[Route | Mapping] = "diversified",
        feature_layers: Mapping[str, Sequence[str]] | None = None,
        example_batch: Any = None,
        teacher_cache: TeacherCache | None = None,
        nan_policy: str = "raise",
        teacher_mode: str = "frozen",
        teacher_optimizer: Optimizer | None = None,
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
        compile: bool = False,
        compile_kwargs: dict | None = None,
        channels_last: bool = False,
        mixing: BatchMixer | None = None,
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
        _check_names(students, optimizers)
        self.nonfinite = NonFiniteLoss(nan_policy, terms=LOSSES)
        self.students = {name: net.to(self.state.device) for name, net in students.items()}
        self.optimizers = dict(optimizers)
        self.loss_function = loss_function
        self.optim_set_to_none = optim_set_to_none
        self.scaler: torch.amp.GradScaler | None = None  # made by run(), for float16 on CUDA only
        self.routes = KnowledgeRoutes(routes, list(self.students), feature_layers)
        # a frozen teacher no route reads from (student alone, DML) is neither loaded nor run
        self.teacher_role = self._teacher_role(
            teacher, teacher_mode, teacher_checkpoint, teacher_optimizer, teacher_cache
        )
        self.mixing = _checked_mixing(mixing, self.teacher_role)
        self.networks: dict[str, nn.Module] = {TEACHER: self.teacher} if self.teacher is not None else {}
        self.networks.update(self.students)
        self._setup_routes(example_batch)
        self._setup_networks(self.networks.values(), channels_last, compile, compile_kwargs, adapters=[self.routes])
        self.nonfinite.attach(self)

    def _setup_routes(self, example_batch: Any) -> None:
        """Size the routes' adapters with ``example_batch`` (``None``: the data loader's first, read only if a route
        needs it), move them to the device and add them to their target student's optimizer."""

        def example_inputs() -> torch.Tensor:
            batch = example_batch if example_batch is not None else next(iter(self.data_loader))
            return _plain(self.prepare_batch(batch, self.state.device, self.non_blocking, **self.to_kwargs)[0])

        self.routes.setup(self.networks, example_inputs)
        self.routes.to(self.state.device)
        for name, optimizer in self.optimizers.items():
            adapters = self.routes.parameters_of(name)
            if adapters:
                optimizer.add_param_group({"params": adapters})

    def _teacher_role(
        self,
        teacher: nn.Module | Teacher | None,
        mode: str,
        checkpoint: str | None,
        optimizer: Optimizer | None,
        cache: TeacherCache | None,
    ) -> Teacher | None:
        if isinstance(teacher, Teacher):
            trained = teacher.optimizer is not None
            return teacher.to(self.state.device) if trained or self.routes.needs_teacher else None
        check_teacher_mode(mode)
        if mode != "online" and not self.routes.needs_teacher:
            return None
        if teacher is None:
            raise ConfigError(
                "a route takes knowledge from the teacher, but no teacher network was given: give `teacher`, or "
                "routes that do not start at it (e.g. the 'dml' or 'student' preset)."
                if mode != "online"
                else "teacher_mode 'online' trains the teacher, but no teacher network was given."
            )
        return make_teacher(teacher, mode, checkpoint, optimizer, cache, device=self.state.device)

    @property
    def teacher(self) -> nn.Module | None:
        """The teacher network (``None`` when no route reads from it and it is not trained online)."""
        return self.teacher_role.network if self.teacher_role is not None else None

    @property
    def trained_optimizers(self) -> dict[str, Optimizer]:
        """The optimizer of every network trained in a step, by name: each student's, then an online teacher's."""
        teacher = self.teacher_role.optimizer if self.teacher_role is not None else None
        return {**self.optimizers, **({TEACHER: teacher} if teacher is not None else {})}

    def checkpoint_objects(self) -> dict[str, Any]:
        """What a resume checkpoint must hold besides the engine state, by name, each with ``state_dict`` and
        ``load_state_dict``: ``"routes"`` (the routes' adapters), ``"student_<name>"`` (unwrapped from DDP) and
        ``"optimizer_<name>"`` for every student, what the teacher object trains (nothing for a frozen teacher;
        ``"teacher"`` and ``"optimizer_teacher"`` for an online one), ``"mixing"`` (the batch mixer's generator)
        when batches are mixed, and ``"scaler"`` while a float16 gradient scaler is in use (from :meth:`run` on, so
        ask at ``Events.STARTED`` or later)."""
        objects: dict[str, Any] = {"routes": self.routes}
        if self.mixing is not None:
            objects["mixing"] = self.mixing
        for name, student in self.students.items():
            objects[f"student_{name}"] = unwrap(student)
            objects[f"optimizer_{name}"] = self.optimizers[name]
        if self.teacher_role is not None:
            objects.update(self.teacher_role.checkpoint_objects())
        if self.scaler is not None:
            objects["scaler"] = self.scaler
        return objects

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

    def run(self) -> None:  # type: ignore[override]
        """Train; the float16 gradient scaler is only created for CUDA."""
        use_scaler = (
            self.amp
            and torch.device(self.state.device).type == "cuda"
            and self.amp_kwargs.get("dtype", torch.float16) == torch.float16
        )
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        super(Trainer, self).run()

    def _iteration(self, engine: DistillationTrainer, batchdata: Any) -> dict:
        """One distillation step; see the class docstring for the output."""
        inputs, targets = engine._load_batch(batchdata)
        inputs, targets = _plain(inputs), _plain(targets)  # the networks and losses run on plain tensors
        mixed = engine.mixing(inputs, targets) if engine.mixing is not None else MixedBatch(inputs, targets)
        inputs = mixed.inputs  # what the teacher and the students see
        for student in engine.students.values():
            student.train()
        optimizers = engine.trained_optimizers
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        with engine._autocast():
            logits, features = {}, {}
            if engine.teacher_role is not None:
                logits[TEACHER], features[TEACHER] = engine.teacher_role(
                    inputs, batchdata, lambda: engine.routes.pop_features(TEACHER)
                )
            for name, student in engine.students.items():
                logits[name] = student(inputs)
                features[name] = engine.routes.pop_features(name)
            engine.state.output[Keys.PRED] = logits
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            supervised = {name: mixed.loss(engine.loss_function, logits[name]) for name in optimizers}
            terms = engine.routes.losses(logits, features, supervised, mixed.route_targets, epoch=engine.state.epoch)
            if TEACHER in supervised:  # an online teacher learns from the labels only: no route targets it
                terms.update({f"{TEACHER}/sup": supervised[TEACHER], f"{TEACHER}/total": supervised[TEACHER]})
            loss = sum(terms[f"{name}/total"] for name in optimizers)
            engine.state.output[Keys.LOSS] = loss.detach()
            engine.state.output[LOSSES] = {k: v.detach() for k, v in terms.items()}
            engine.fire_event(IterationEvents.LOSS_COMPLETED)  # engine.nonfinite checks the loss

        scaler = engine.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()
        engine.routes.sync_gradients()  # DDP averages the students' gradients, not the adapters'
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)  # a skipped step's gradients dropped here
        for optimizer in optimizers.values():
            scaler.step(optimizer) if scaler is not None else optimizer.step()
        if scaler is not None:
            scaler.update()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
