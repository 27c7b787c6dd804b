"""Post-processing and mirror test-time augmentation chosen on the validation images, as nnU-Net chooses them.

At the evaluate stage, before the test images are scored, :class:`ChoosePostprocessing` runs every network on the
validation list and keeps, per network:

- mirror test-time augmentation (``mirror_tta``, off unless asked for: it costs 2^d forward passes): the mean of
  the softmax probabilities over every flip of the spatial axes, kept where it raises the validation mean Dice;
- the largest connected component of each foreground class, kept for the classes whose validation Dice it raises
  (one object per class, e.g. an organ; a class of many objects, e.g. axons, keeps every component).

The choice (:class:`PostprocessingChoice`) is written to ``<output_dir>/postprocessing.json`` with the validation
Dice before and after, and applied to the test images: TTA by :class:`ChosenInferer`, the components by the choice
itself as the last post-processing transform. Nothing is kept that does not improve the validation score.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics import compute_dice
from monai.utils import CommonKeys as Keys
from scipy import ndimage
from torch import nn

from medkd.training.evaluators import ENSEMBLE, ensemble_logits, pred_key

__all__ = [
    "POSTPROCESSING_JSON",
    "keep_largest_component",
    "PostprocessingChoice",
    "mirrored",
    "ChosenInferer",
    "ChoosePostprocessing",
]

logger = logging.getLogger("medkd.training.postprocessing")

POSTPROCESSING_JSON = "postprocessing.json"


def keep_largest_component(onehot: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """``onehot`` (``(C, *spatial)``) with only the largest connected component (full connectivity, as MONAI's
    ``KeepLargestConnectedComponent``, here through SciPy) of each of ``classes``; removed pixels become background
    (channel 0)."""
    kept = onehot.clone()
    for c in classes:
        mask = onehot[c].detach().cpu().numpy() > 0
        components, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
        if count < 2:
            continue
        sizes = np.bincount(components.ravel())[1:]
        removed = torch.as_tensor(mask & (components != 1 + int(sizes.argmax())), device=onehot.device)
        kept[c][removed] = 0
        kept[0][removed] = 1
    return kept


class PostprocessingChoice:
    """What each network's prediction gets: mirror TTA (``mirror[name]``) and the foreground classes whose largest
    connected component alone is kept (``largest_component[name]``, class indices). Called on a decollated
    evaluator output (one-hot predictions ``pred_<name>`` of shape ``(C, *spatial)``), it applies the components."""

    def __init__(self) -> None:
        self.mirror: dict[str, bool] = {}
        self.largest_component: dict[str, list[int]] = {}

    def describe(self) -> str:
        """One sentence for ``results.md``: what each network's test predictions got; ``""`` when nothing."""
        parts = []
        for name, classes in self.largest_component.items():
            kept = ["mirror TTA"] if self.mirror.get(name) else []
            if classes:
                kept.append(f"the largest component of class {', '.join(map(str, classes))}")
            if kept:
                parts.append(f"{name}: {' and '.join(kept)}")
        if not parts:
            return ""
        return (
            f"Post-processing chosen on the validation images ({POSTPROCESSING_JSON}), applied to the test images "
            f"above: {'; '.join(parts)}; the other networks' predictions are scored as they are."
        )

    def __call__(self, item: dict) -> dict:
        for name, classes in self.largest_component.items():
            if classes and pred_key(name) in item:
                item[pred_key(name)] = keep_largest_component(item[pred_key(name)], classes)
        return item


def mirrored(inferer: Callable, inputs: torch.Tensor, network: nn.Module) -> torch.Tensor:
    """Log of the mean softmax probabilities of ``network`` over every flip of the spatial axes of ``inputs``
    (``(B, C, *spatial)``; 4 passes in 2D, 8 in 3D): logits whose softmax is that mean."""
    axes = range(2, inputs.ndim)
    flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
    total = None
    for dims in flips:
        logits = inferer(torch.flip(inputs, dims) if dims else inputs, network)
        probabilities = torch.softmax((torch.flip(logits, dims) if dims else logits).float(), dim=1)
        total = probabilities if total is None else total + probabilities
    return torch.log(total / len(flips) + torch.finfo(torch.float32).tiny)


class ChosenInferer:
    """``inferer`` that runs the networks whose choice is mirror TTA through :func:`mirrored`.

    Args:
        inferer: the bundle's inferer (e.g. ``SlidingWindowInferer``).
        choice: the post-processing choice, filled in by :class:`ChoosePostprocessing`.
        networks: the evaluated networks by name (the same objects the evaluator runs).
    """

    def __init__(self, inferer: Callable, choice: PostprocessingChoice, networks: Mapping[str, nn.Module]) -> None:
        self.inferer = inferer
        self.choice = choice
        self.names = {id(network): name for name, network in networks.items()}

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.choice.mirror.get(self.names.get(id(network), ""), False):
            return mirrored(lambda x, net: self.inferer(x, net, *args, **kwargs), inputs, network)
        return self.inferer(inputs, network, *args, **kwargs)


def _dice(logits: torch.Tensor, label: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per foreground class, the Dice of the argmax of ``logits`` (``(1, C, *spatial)``) against ``label``
    (``(1, 1, *spatial)``) without and with its largest connected component kept (NaN for a class absent from both)."""
    pred = torch.nn.functional.one_hot(logits.argmax(1), num_classes).movedim(-1, 1).float()
    truth = torch.nn.functional.one_hot(label[:, 0].long(), num_classes).movedim(-1, 1).float()
    kept = keep_largest_component(pred[0], range(1, num_classes))[None]
    return tuple(compute_dice(p, truth, include_background=False, ignore_empty=True)[0].cpu() for p in (pred, kept))


def _mean(scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per class, the mean over images of the present ones (NaN where a class is never present)."""
    return torch.nanmean(torch.stack(scores), dim=0)


class ChoosePostprocessing:
    """At ``Events.STARTED`` of the evaluator (after the weights are loaded: attach after ``LoadNetworks``), choose
    each network's post-processing on ``val_loader`` and write it to ``<output_dir>/postprocessing.json``.

    Args:
        choice: filled in here; the same object is the evaluator's last post-processing transform and its inferer's
            choice (:class:`ChosenInferer`).
        networks: the evaluated networks by name; ``ensemble``: the members of the scored ensemble (chosen after them,
            with each member's TTA as chosen).
        val_loader: the validation images (batches of one image with ``image`` and ``label``).
        inferer: the bundle's inferer; ``num_classes``: classes with the background.
        mirror_tta: try mirror test-time augmentation; ``enabled``: False chooses nothing (no validation pass).
    """

    def __init__(
        self,
        choice: PostprocessingChoice,
        networks: Mapping[str, nn.Module],
        val_loader: Iterable,
        inferer: Callable,
        num_classes: int,
        output_dir: str,
        ensemble: Sequence[str] = (),
        mirror_tta: bool = False,
        device: str | torch.device = "cpu",
        enabled: bool = True,
    ) -> None:
        self.choice, self.networks, self.val_loader, self.inferer = choice, dict(networks), val_loader, inferer
        self.num_classes, self.output_dir, self.ensemble = num_classes, Path(output_dir), list(ensemble)
        self.mirror_tta, self.device, self.enabled = mirror_tta, device, enabled

    def attach(self, engine: Engine) -> None:
        """Choose at ``Events.STARTED`` of ``engine``."""
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self)

    def _scores(self, forward: Callable[[torch.Tensor], Mapping[str, torch.Tensor]]) -> dict[str, tuple]:
        """Per output name of ``forward`` (images → logits by name): the per-class validation Dice without and with
        the largest components."""
        plain: dict[str, list] = {}
        kept: dict[str, list] = {}
        with torch.no_grad():
            for batch in self.val_loader:
                images, label = batch[Keys.IMAGE].to(self.device), batch[Keys.LABEL].to(self.device)
                for name, logits in forward(images).items():
                    without, with_kept = _dice(logits, label, self.num_classes)
                    plain.setdefault(name, []).append(without)
                    kept.setdefault(name, []).append(with_kept)
        return {name: (_mean(plain[name]), _mean(kept[name])) for name in plain}

    def _networks_forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = {}
        for name, network in self.networks.items():
            outputs[name] = self.inferer(images, network)
            if self.mirror_tta:
                outputs[f"{name}+mirror"] = mirrored(self.inferer, images, network)
        return outputs

    def _ensemble_forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        def member(name: str) -> torch.Tensor:
            network = self.networks[name]
            return (
                mirrored(self.inferer, images, network) if self.choice.mirror[name] else self.inferer(images, network)
            )

        return {ENSEMBLE: ensemble_logits([member(n) for n in self.ensemble])}

    def _keep(self, name: str, without: torch.Tensor, with_kept: torch.Tensor) -> dict[str, Any]:
        """Record the classes whose Dice the largest component raises; the scores before and after."""
        classes = [c + 1 for c in range(len(without)) if bool(with_kept[c] > without[c])]
        self.choice.largest_component[name] = classes
        after = torch.where(torch.tensor([c + 1 in classes for c in range(len(without))]), with_kept, without)
        return {
            "largest_component": classes,
            "validation_dice": _round(without),
            "validation_dice_chosen": _round(after),
        }

    def __call__(self, engine: Engine) -> None:
        for network in self.networks.values():
            network.eval()
        scores = self._scores(self._networks_forward)
        report: dict[str, Any] = {}
        for name in self.networks:
            plain, mirror = scores[name], scores.get(f"{name}+mirror")
            use_mirror = mirror is not None and bool(torch.nanmean(mirror[0]) > torch.nanmean(plain[0]))
            self.choice.mirror[name] = use_mirror
            entry = {"mirror_tta": use_mirror, **self._keep(name, *(mirror if use_mirror else plain))}
            if mirror is not None:
                entry["validation_dice_without_tta"] = _round(plain[0])
            report[name] = entry
        if self.ensemble:
            report[ENSEMBLE] = {
                "mirror_tta": None,
                **self._keep(ENSEMBLE, *self._scores(self._ensemble_forward)[ENSEMBLE]),
            }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / POSTPROCESSING_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        for name, entry in report.items():
            logger.info(
                "chosen on the validation images for %s: mirror TTA %s, largest component of classes %s",
                name, entry["mirror_tta"], entry["largest_component"] or "none",
            )  # fmt: skip


def _round(scores: torch.Tensor) -> list[float | None]:
    """Per-class scores for JSON: 4 decimals, None for NaN (a class absent from every validation image)."""
    return [None if torch.isnan(v) else round(float(v), 4) for v in scores]
