"""medkd: MONAI-native knowledge distillation for medical imaging (one teacher, two students, diversified)."""

from __future__ import annotations

import importlib
from types import ModuleType

__version__ = "0.2.0"


def __getattr__(name: str) -> ModuleType:
    """Import submodules on first use, so bundle expressions can write ``medkd.synthetic.…`` after ``import medkd``."""
    try:
        return importlib.import_module(f"medkd.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"medkd.{name}":
            raise
        raise AttributeError(f"module 'medkd' has no attribute {name!r}") from None
