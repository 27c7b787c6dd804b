"""The engines and their handlers: the distillation step, evaluation, checkpoints, resume, devices."""

from __future__ import annotations

from medkd import lazy_submodules

__getattr__ = lazy_submodules(__name__)
