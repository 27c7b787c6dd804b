"""The data layer: loading images and data lists, checks before a run, class names, the default data."""

from __future__ import annotations

from medkd import lazy_submodules

__getattr__ = lazy_submodules(__name__)
