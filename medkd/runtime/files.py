"""Atomic file writing, the one policy of medkd: write a temporary file in the same folder, flush it to disk, then
rename it over the target. A reader never sees half a file, and a crash or a full disk leaves the previous file
intact (the temporary file is removed)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["atomic_write_text", "atomic_write_json", "atomic_torch_save"]


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write`` on a temporary binary file next to ``path`` (its folders made), then rename it to ``path``."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; return the path."""
    return _atomic_write(path, lambda f: f.write(text.encode(encoding)))


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 2, default: Any = None) -> Path:
    """Write ``data`` as JSON (``indent``, ``default`` as in :func:`json.dumps`) with a final newline to ``path``
    atomically; return the path."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=default) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically; return the path."""
    return _atomic_write(path, lambda f: torch.save(obj, f))
