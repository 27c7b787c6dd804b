"""The comparison tool (``python -m medkd compare``): its runs, jobs and report."""

from __future__ import annotations

from medkd import lazy_submodules

__getattr__ = lazy_submodules(__name__)
