"""The bottom layer every medkd module may import: devices, process groups and DDP wrapping, channels-last layouts,
atomic file writing. It imports nothing of medkd but :mod:`medkd.errors`."""

from __future__ import annotations

from medkd import lazy_submodules

__getattr__ = lazy_submodules(__name__)
