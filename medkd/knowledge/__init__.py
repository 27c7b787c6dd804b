"""The knowledge model: routes and route kinds, their losses, the feature layers read, the teacher's roles."""

from __future__ import annotations

from medkd import lazy_submodules

__getattr__ = lazy_submodules(__name__)
