"""medkd: MONAI-native knowledge distillation for medical imaging (one teacher, two students, diversified).

Sub-packages (see docs/architecture.md, "Package layout"): :mod:`medkd.knowledge` (routes, route kinds, losses,
features, the teacher), :mod:`medkd.training` (engines, evaluators, handlers and what they need), :mod:`medkd.data`
(loading, checks, labels, default data), :mod:`medkd.tools` (``compare`` and its report), :mod:`medkd.planning`
and :mod:`medkd.prepare`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

__version__ = "0.2.0"


def lazy_submodules(package: str) -> Callable[[str], ModuleType]:
    """A module ``__getattr__`` for ``package`` that imports its submodules on first use.

    Bundle expressions can then write ``medkd.data.synthetic.…`` after a plain ``import medkd``.
    """

    def __getattr__(name: str) -> ModuleType:
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{package}.{name}":
                raise
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return __getattr__


__getattr__ = lazy_submodules(__name__)
