"""``MedkdWorkflow``: what every medkd engine adds to MONAI's, in one place (as MONAI's ``Workflow`` is the base of
its ``Trainer`` and ``Evaluator``): networks moved to the engine's device, converted to the channels-last layout
(:mod:`medkd.runtime.layout`) and compiled in place (:mod:`medkd.training.compiling`), autocast, the batch loaded
for an iteration, and user errors first (:class:`medkd.errors.UserErrorsFirst`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from medkd.errors import UserErrorsFirst
from medkd.runtime.layout import channels_last as to_channels_last
from medkd.training.compiling import compile_in_place, compiled_inferer

__all__ = ["MedkdWorkflow"]


class MedkdWorkflow(UserErrorsFirst):
    """Engine mixin, placed before MONAI's engine class among the bases (e.g. ``class TeacherTrainer(MedkdWorkflow,
    SupervisedTrainer)``); its methods use the state and arguments that MONAI's ``Workflow`` keeps."""

    def _setup_networks(
        self,
        networks: Iterable[nn.Module],
        channels_last: bool = False,
        compile: bool = False,
        compile_kwargs: Mapping[str, Any] | None = None,
        adapters: Iterable[nn.Module] = (),
    ) -> None:
        """Move ``networks`` and ``adapters`` (modules run by the engine's own code, e.g. route adapters) to the
        engine's device; with ``channels_last``, convert them to that layout; with ``compile``, compile ``networks``
        in place and, on an engine with an ``inferer``, wrap it to feed them plain tensors (an engine without one
        feeds them plain tensors itself)."""
        networks = list(networks)
        modules = [module.to(self.state.device) for module in (*networks, *adapters)]
        if channels_last:
            to_channels_last(modules)
        if not compile:
            return
        if getattr(self, "inferer", None) is not None:  # in place and fed plain tensors rather than MONAI's wrapper
            self.inferer = compiled_inferer(networks, self.inferer, compile_kwargs)
        else:
            compile_in_place(networks, compile_kwargs)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """The forward passes' precision context: autocast with ``amp_kwargs`` when ``amp``, else none."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.state.device).type, **self.amp_kwargs)

    def _load_batch(self, batchdata: Any) -> tuple[Any, Any]:
        """The preamble of an iteration: ``batchdata`` through ``prepare_batch`` onto the device, ``state.output``
        started with its image and label as given (metadata included); return ``(inputs, targets)``."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = self.prepare_batch(batchdata, self.state.device, self.non_blocking, **self.to_kwargs)
        inputs, targets = batch[0], batch[1]
        self.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        return inputs, targets
