"""medkd: MONAI-native knowledge distillation for medical imaging (one teacher, two students, diversified)."""

from __future__ import annotations

import importlib
from types import ModuleType

__version__ = "0.1.0"

_SUBMODULES = {
    "checkpoints", "checks", "data", "engines", "evaluators", "features", "handlers", "labels",
    "losses", "report", "routes", "synthetic", "teacher_cache",
}  # fmt: skip


def __getattr__(name: str) -> ModuleType:
    """Import submodules on first use, so bundle expressions can write ``medkd.synthetic.…`` after ``import medkd``."""
    if name in _SUBMODULES:
        return importlib.import_module(f"medkd.{name}")
    raise AttributeError(f"module 'medkd' has no attribute {name!r}")
