"""TensorBoard images during validation: one validation image, its label map and each network's prediction, once per
validation (``tensorboard_images``, off by default), beside the loss curves of the same run folder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys as Keys
from monai.visualize import plot_2d_or_3d_image

from medkd.training.evaluators import pred_key

__all__ = ["ValidationImages"]


def _label_map(onehot: torch.Tensor) -> torch.Tensor:
    """A one-hot map ``(C, *spatial)`` as one channel of class indices scaled to [0, 1] (so every class shows)."""
    classes = max(onehot.shape[0] - 1, 1)
    return onehot.argmax(dim=0, keepdim=True).float() / classes


class ValidationImages:
    """At each validation, write the first validation image of the run (``images/image``), its label map
    (``images/label``) and each network's prediction (``images/<network>``) to TensorBoard in ``log_dir`` with MONAI's
    ``plot_2d_or_3d_image`` (a 3D volume as an animated GIF of its slices along the last axis), at the trainer's
    epoch.

    Args:
        log_dir: the TensorBoard run folder (the stage's, e.g. ``runs/distillation``).
        networks: the scored networks (predictions ``pred_<name>`` in the evaluator's output, one-hot).
        enabled: False attaches nothing.
        max_frames: the most slices of a 3D volume shown.
    """

    def __init__(self, log_dir: str, networks: Sequence[str], enabled: bool = False, max_frames: int = 64) -> None:
        self.log_dir, self.networks, self.enabled, self.max_frames = log_dir, list(networks), enabled, max_frames
        self._item: dict[str, torch.Tensor] | None = None
        self._writer: Any = None

    def attach(self, engine: Engine) -> None:
        """Keep the first item of each validation run, write it when the run's epoch completes."""
        if not self.enabled:
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self._forget)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._keep)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _forget(self, engine: Engine) -> None:
        self._item = None

    def _keep(self, engine: Engine) -> None:
        if self._item is not None:
            return
        output = engine.state.output
        first = output[0] if isinstance(output, list) else output
        keys = {"image": Keys.IMAGE, "label": Keys.LABEL, **{n: pred_key(n) for n in self.networks}}
        self._item = {tag: first[key].detach().cpu() for tag, key in keys.items() if key in first}

    def __call__(self, engine: Engine) -> None:
        if not self._item:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard is imported only when images are asked for

            self._writer = SummaryWriter(log_dir=self.log_dir)
        for tag, data in self._item.items():
            picture = data[:1] if tag == "image" else _label_map(data)
            plot_2d_or_3d_image(data=picture[None], step=engine.state.epoch, writer=self._writer, index=0,
                                max_channels=1, max_frames=self.max_frames, tag=f"images/{tag}")  # fmt: skip
        self._writer.flush()
