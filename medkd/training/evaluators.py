"""Evaluate the teacher and every student in one pass, each network's score under its own name, and the students'
ensemble (the mean of their softmax probabilities) as one more network, ``"ensemble"``."""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.metrics import Accuracy, Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.engines import Evaluator, SupervisedEvaluator
from monai.engines.utils import IterationEvents, default_metric_cmp_fn, default_prepare_batch
from monai.handlers import IgniteMetricHandler, MeanDice, from_engine
from monai.inferers import Inferer, SimpleInferer
from monai.metrics import ROCAUCMetric
from monai.transforms import Activationsd, AsDiscreted, Compose
from monai.utils import ImageMetaKey
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from medkd.bundles import TEACHER
from medkd.errors import ConfigError
from medkd.training.surface_metrics import HD95Metric, NSDMetric
from medkd.training.workflow import MedkdWorkflow

__all__ = [
    "METRICS",
    "LOWER_IS_BETTER",
    "ENSEMBLE",
    "metric_name",
    "split_metric_name",
    "MultiNetworkEvaluator",
    "SingleNetworkEvaluator",
    "pred_key",
    "ensemble_members",
    "scored_networks",
    "ensemble_logits",
    "EnsembleNetwork",
    "inference_networks",
    "checkpointed",
    "segmentation_postprocessing",
    "segmentation_metrics",
    "classification_postprocessing",
    "classification_metrics",
    "ProbabilitiesCSV",
]


# the metrics the bundles compute, as named in results tables; the segmentation bundles score hd95 and nsd (see
# medkd.training.surface_metrics) at the evaluate stage only
METRICS = ("mean_dice", "hd95", "nsd", "auc", "acc", "bacc")
LOWER_IS_BETTER = frozenset({"hd95"})  # the metrics of METRICS that a better network lowers
ENSEMBLE = "ensemble"  # the name under which the students' ensemble is scored (metrics, predictions, tables)


def metric_name(metric: str, network: str) -> str:
    """Engine-metric name of one network's score, e.g. ``metric_name("mean_dice", "sp") == "val_mean_dice_sp"``;
    :func:`split_metric_name` reads it back."""
    return f"val_{metric}_{network}"


def split_metric_name(name: str, metrics: Sequence[str] = METRICS) -> tuple[str, str] | None:
    """``"val_mean_dice_sp"`` -> ``("mean_dice", "sp")`` (see :func:`metric_name`); ``None`` for another name."""
    for metric in metrics:
        prefix = metric_name(metric, "")
        if name.startswith(prefix) and len(name) > len(prefix):
            return metric, name[len(prefix) :]
    return None


def pred_key(network: str) -> str:
    """Engine-output key of a network's prediction, e.g. ``pred_teacher``."""
    return f"pred_{network}"


def ensemble_members(networks: Iterable[str], enabled: bool = True) -> list[str]:
    """The networks averaged into the ensemble: every network of ``networks`` (names, or a mapping by name) but the
    teacher, when ``enabled`` and there are at least two; else none (no ensemble)."""
    members = [name for name in networks if name != TEACHER]
    return members if enabled and len(members) >= 2 else []


def scored_networks(networks: Iterable[str], members: Sequence[str] = ()) -> list[str]:
    """The names scored by an evaluation: ``networks`` (names, or a mapping by name), then ``"ensemble"`` when it
    has ``members`` (see :func:`ensemble_members`); for the postprocessing and metrics functions below."""
    return [*networks, *([ENSEMBLE] if members else [])]


def ensemble_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Logits of the ensemble of networks with these ``logits`` (class dimension 1): the log of the mean of their
    softmax probabilities, computed stably, in float32. Their softmax is that mean and their argmax its argmax, so
    the ensemble goes through the same postprocessing and metrics as a network."""
    log_probs = torch.stack([x.float().log_softmax(dim=1) for x in logits])
    return torch.logsumexp(log_probs, dim=0) - math.log(len(logits))


class EnsembleNetwork(nn.Module):
    """The students' ensemble as one network, for inference: its output is :func:`ensemble_logits` of its members'
    (the log of their mean softmax), so it goes through the same postprocessing as a network's logits. Its weights
    are its members' (loaded from their checkpoints, :func:`checkpointed`).

    Args:
        members: the networks averaged, by name.
    """

    def __init__(self, members: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleDict(dict(members))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, *spatial) → the ensemble's logits (B, classes, ...)."""
        return ensemble_logits([member(x) for member in self.members.values()])


def inference_networks(teacher: nn.Module, students: Mapping[str, nn.Module], ensemble: bool = True) -> dict:
    """The networks an inference run can use, by name: the teacher, each student and, when ``ensemble`` and there
    are at least two students, their ensemble (:class:`EnsembleNetwork`, ``"ensemble"``)."""
    members = ensemble_members(students, ensemble)
    return {TEACHER: teacher, **students, **({ENSEMBLE: EnsembleNetwork(students)} if members else {})}


def checkpointed(name: str, network: nn.Module) -> dict[str, nn.Module]:
    """The networks whose checkpoints make ``network`` (named ``name``): itself, or an ensemble's members."""
    return dict(network.members) if isinstance(network, EnsembleNetwork) else {name: network}


class MultiNetworkEvaluator(MedkdWorkflow, Evaluator):
    """Run several networks on each validation batch; output ``pred_<name>`` per network plus image and label.

    The networks are moved to ``device`` (MONAI's evaluators leave that to the caller).

    Metrics read the prediction of one network each (see :func:`segmentation_metrics`,
    :func:`classification_metrics`), so one pass scores the teacher and every student. With ``ensemble``, the output
    also holds ``pred_ensemble``, the logits of those networks' ensemble (:func:`ensemble_logits`: the mean of their
    softmax probabilities), scored like a network when the postprocessing and metrics are made for
    :func:`scored_networks`; it has no weights of its own, so no checkpoint.

    Args:
        device: device to run on.
        val_data_loader: validation data.
        networks: networks by name (teacher and students).
        inferer: e.g. ``SlidingWindowInferer`` for 3D volumes; default ``SimpleInferer``.
        metrics: every metric by name (e.g. :func:`segmentation_metrics` of all networks); the first is MONAI's key
            metric (``key_val_metric``), the others are additional. Give either this or the two MONAI arguments.
        ensemble: names of the networks whose ensemble is scored as ``"ensemble"`` (at least two of ``networks``,
            e.g. :func:`ensemble_members`); empty for none.
        compile: ``torch.compile`` the networks in place (once: a trainer's networks may be compiled already) and
            feed them plain tensors (:mod:`medkd.training.compiling`); ``compile_kwargs`` are ``torch.compile``'s.
        channels_last: convert the networks to the channels-last layout (:mod:`medkd.runtime.layout`).
        Other arguments are those of ``monai.engines.SupervisedEvaluator``.
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Iterable,
        networks: Mapping[str, nn.Module],
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        iteration_update: Callable | None = None,
        inferer: Inferer | None = None,
        metrics: Mapping[str, Any] | None = None,
        postprocessing: Callable | None = None,
        key_val_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        val_handlers: Sequence | None = None,
        amp: bool = False,
        mode: str = "eval",
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = True,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
        ensemble: Sequence[str] = (),
        compile: bool = False,
        compile_kwargs: dict | None = None,
        channels_last: bool = False,
    ) -> None:
        ensemble = list(ensemble)
        if ENSEMBLE in networks:
            raise ConfigError(f"'{ENSEMBLE}' is the name of the students' ensemble; rename that network.")
        if ensemble and (len(ensemble) < 2 or not set(ensemble) <= set(networks)):
            raise ConfigError(
                f"the ensemble averages two or more of the evaluated networks {list(networks)}, got {ensemble}."
            )
        if metrics:
            if key_val_metric or additional_metrics:
                raise ConfigError(
                    "give the evaluator `metrics`, or `key_val_metric` and `additional_metrics`, not both."
                )
            first, *others = metrics
            key_val_metric, additional_metrics = {first: metrics[first]}, {k: metrics[k] for k in others}
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            val_handlers=val_handlers,
            amp=amp,
            mode=mode,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=decollate,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )
        self.networks = dict(networks)
        self.inferer = SimpleInferer() if inferer is None else inferer
        self.ensemble = ensemble
        self._setup_networks(self.networks.values(), channels_last, compile, compile_kwargs)

    def _iteration(self, engine: MultiNetworkEvaluator, batchdata: Any) -> dict:
        inputs, _ = engine._load_batch(batchdata)
        with engine.mode(*engine.networks.values()), torch.no_grad():
            for name, network in engine.networks.items():
                with engine._autocast():
                    pred = engine.inferer(inputs, network)
                # scored in float32: metrics (e.g. ROC-AUC through numpy) do not take bfloat16
                engine.state.output[pred_key(name)] = pred.float()
            if engine.ensemble:
                members = [engine.state.output[pred_key(name)] for name in engine.ensemble]
                engine.state.output[pred_key(ENSEMBLE)] = ensemble_logits(members)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class SingleNetworkEvaluator(MedkdWorkflow, SupervisedEvaluator):
    """MONAI's ``SupervisedEvaluator`` (one network, output ``pred``), with the network moved to the evaluator's
    device, with ``channels_last`` converted to the channels-last layout (:mod:`medkd.runtime.layout`) and, with
    ``compile``, compiled in place (:mod:`medkd.training.compiling`); used for inference. The other arguments are
    those of ``SupervisedEvaluator``."""

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Iterable,
        network: nn.Module,
        compile: bool = False,
        compile_kwargs: dict | None = None,
        channels_last: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(device, val_data_loader, network, **kwargs)
        self._setup_networks([self.network], channels_last, compile, compile_kwargs)


def segmentation_postprocessing(networks: Sequence[str], num_classes: int, chosen: Callable | None = None) -> Compose:
    """Argmax + one-hot of every network's logits, one-hot of the label (for ``DiceMetric``), then ``chosen``: the
    post-processing chosen on the validation images, if any
    (:class:`medkd.training.postprocessing.PostprocessingChoice`)."""
    return Compose(
        [
            AsDiscreted(keys=[pred_key(n) for n in networks], argmax=True, to_onehot=num_classes),
            AsDiscreted(keys=Keys.LABEL, to_onehot=num_classes),
            *([chosen] if chosen is not None else []),
        ]
    )


def segmentation_metrics(
    networks: Sequence[str], surface_tolerances: Sequence[float] | None = None
) -> dict[str, IgniteMetricHandler]:
    """Mean Dice (background excluded) per network, named ``val_mean_dice_<network>``; with ``surface_tolerances``
    (one per foreground class, :func:`medkd.training.surface_metrics.surface_tolerances`), also each network's HD95
    (``val_hd95_<network>``) and normalised surface Dice at those tolerances (``val_nsd_<network>``), in the label
    maps' physical unit (:mod:`medkd.training.surface_metrics`). Validation during training scores Dice only."""
    metrics: dict[str, IgniteMetricHandler] = {
        metric_name("mean_dice", n): MeanDice(include_background=False, output_transform=_outputs(n)) for n in networks
    }
    if surface_tolerances is not None:
        for n in networks:
            metrics[metric_name("hd95", n)] = IgniteMetricHandler(metric_fn=HD95Metric(), output_transform=_outputs(n))
            metrics[metric_name("nsd", n)] = IgniteMetricHandler(
                metric_fn=NSDMetric(surface_tolerances), output_transform=_outputs(n)
            )
    return metrics


def _outputs(network: str) -> Callable:
    """Output transform of a metric of ``network``: its prediction and the label."""
    return from_engine([pred_key(network), Keys.LABEL])


def classification_postprocessing(networks: Sequence[str], num_classes: int) -> Compose:
    """Softmax of every network's logits, one-hot of the label (for ``ROCAUCMetric``), on the predictions' device.

    MONAI's decollation turns each sample's class index into a Python number, whose one-hot tensor is made on the
    CPU; the label is moved to the device of the first prediction so metrics compare tensors on one device.
    """
    reference = pred_key(networks[0])

    def label_to_prediction_device(item: dict) -> dict:
        item[Keys.LABEL] = item[Keys.LABEL].to(torch.as_tensor(item[reference]).device)
        return item

    return Compose(
        [
            Activationsd(keys=[pred_key(n) for n in networks], softmax=True),
            AsDiscreted(keys=Keys.LABEL, to_onehot=num_classes),
            label_to_prediction_device,
        ]
    )


def _stacked(network: str) -> Callable[[Any], tuple[torch.Tensor, torch.Tensor]]:
    """Output transform for ignite's ``Accuracy``: stacked probabilities and class indices."""

    def transform(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        preds, labels = from_engine([pred_key(network), Keys.LABEL])(output)
        return torch.stack(list(preds)), torch.stack(list(labels)).argmax(dim=1)

    return transform


class PresentClassesROCAUC(ROCAUCMetric):
    """MONAI's one-vs-rest ROC-AUC, averaged over the classes that have samples in the list (macro): the same as
    ``ROCAUCMetric(average="macro")`` when every class has, and a number instead of NaN when a class is absent (a
    small validation or test list accepted with ``allow_missing_classes``); NaN when no class has both positive and
    negative samples."""

    def __init__(self) -> None:
        super().__init__(average="none")

    def aggregate(self, average: Any = None) -> float:  # noqa: ARG002 - always over the classes present
        with warnings.catch_warnings():  # MONAI warns for each absent class: its AUC is NaN, left out here
            warnings.filterwarnings("ignore", message="y values can not be all")
            values = [float(v) for v in super().aggregate(average="none")]
        present = [v for v in values if not math.isnan(v)]
        return sum(present) / len(present) if present else float("nan")


class BalancedAccuracy(Metric):
    """Balanced accuracy: the mean, over the classes present in the labels, of the share of each class's samples
    predicted as that class (top-1 recall). Unlike accuracy it does not reward the majority class: a network that
    predicts one class for every sample scores 1 / (classes present), whatever the class shares.

    Update with ``(probabilities (N, C), class indices (N,))``, as ignite's ``Accuracy``."""

    @reinit__is_reduced
    def reset(self) -> None:
        self._hits = torch.zeros(0, dtype=torch.float64)
        self._samples = torch.zeros(0, dtype=torch.float64)

    @reinit__is_reduced
    def update(self, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        scores, labels = output[0].detach(), output[1].detach().long().flatten()
        classes = int(scores.shape[1])
        if self._samples.numel() < classes:
            self._hits = torch.cat([self._hits, torch.zeros(classes - self._hits.numel(), dtype=torch.float64)])
            self._samples = torch.cat(
                [self._samples, torch.zeros(classes - self._samples.numel(), dtype=torch.float64)]
            )
        right = (scores.argmax(dim=1) == labels).double().cpu()
        self._samples += torch.bincount(labels.cpu(), minlength=classes)[:classes].double()
        self._hits += torch.bincount(labels.cpu(), weights=right, minlength=classes)[:classes].double()

    @sync_all_reduce("_hits", "_samples")
    def compute(self) -> float:
        present = self._samples > 0
        return float((self._hits[present] / self._samples[present]).mean()) if present.any() else float("nan")


def classification_metrics(networks: Sequence[str], with_accuracy: bool = True) -> dict[str, Any]:
    """Per network: macro ROC-AUC over the classes present (``val_auc_<network>``, :class:`PresentClassesROCAUC`),
    top-1 accuracy (``val_acc_<network>``) and balanced accuracy (``val_bacc_<network>``, :class:`BalancedAccuracy`)."""
    metrics: dict[str, Any] = {}
    for n in networks:
        metrics[metric_name("auc", n)] = IgniteMetricHandler(
            metric_fn=PresentClassesROCAUC(), output_transform=_outputs(n)
        )
        if with_accuracy:
            metrics[metric_name("acc", n)] = Accuracy(output_transform=_stacked(n))
            metrics[metric_name("bacc", n)] = BalancedAccuracy(output_transform=_stacked(n))
    return metrics


class ProbabilitiesCSV:
    """Write each image's class probabilities to a CSV file at the end of an evaluation, one row per image.

    Columns: ``image`` (the file), ``label`` (class index, when the data has labels), then the probabilities:
    ``<class>`` for one network (the engine's ``pred``, e.g. ``SupervisedEvaluator``), or ``<network>_<class>`` for
    each of ``networks`` (``pred_<network>`` of :class:`MultiNetworkEvaluator`). Attach it after a softmax in the
    postprocessing. Iterations without output (a batch of unreadable files skipped by
    :func:`medkd.data.skipping.skip_empty_batches`) add no row.

    Args:
        output_file: path of the CSV file; its folder is created.
        class_names: class names, index order.
        networks: network names of a :class:`MultiNetworkEvaluator`; ``None`` for a single-network evaluator.
    """

    def __init__(self, output_file: str, class_names: Sequence[str], networks: Sequence[str] | None = None) -> None:
        self.output_file = output_file
        self.class_names = [str(c) for c in class_names]
        self.networks = None if networks is None else list(networks)
        self.rows: list[tuple[str, int | None, list[float]]] = []

    def attach(self, engine: Engine) -> None:
        """Collect rows at every iteration of ``engine`` and write the file at the end of each epoch."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _keys(self) -> list[str]:
        return [Keys.PRED] if self.networks is None else [pred_key(n) for n in self.networks]

    def _reset(self, engine: Engine) -> None:
        self.rows = []

    def _collect(self, engine: Engine) -> None:
        for item in engine.state.output or []:  # decollated: one dict per image
            image = item[Keys.IMAGE]
            meta = getattr(image, "meta", {})
            label = item.get(Keys.LABEL)
            if isinstance(label, torch.Tensor):
                label = int(label.argmax()) if label.numel() > 1 else int(label)
            probabilities = [float(p) for key in self._keys() for p in torch.as_tensor(item[key]).flatten()]
            self.rows.append((str(meta.get(ImageMetaKey.FILENAME_OR_OBJ, "")), label, probabilities))

    def _write(self, engine: Engine) -> None:
        has_label = any(label is not None for _, label, _ in self.rows)
        columns = self.class_names if self.networks is None else [
            f"{n}_{c}" for n in self.networks for c in self.class_names
        ]  # fmt: skip
        Path(self.output_file).parent.mkdir(parents=True, exist_ok=True)
        with open(self.output_file, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", *(["label"] if has_label else []), *columns])
            for path, label, probabilities in self.rows:
                writer.writerow([path, *([label] if has_label else []), *(f"{p:.6f}" for p in probabilities)])
