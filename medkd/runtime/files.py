"""Files medkd writes and reads back. Writing is atomic, the one policy of medkd: write a temporary file in the same
folder, flush it to disk, then rename it over the target. A reader never sees half a file, and a crash or a full disk
leaves the previous file intact (the temporary file is removed). Settings are written as readable JSON
(:func:`write_settings`); checkpoints are read safely, weights only, naming the file in any error
(:func:`load_checkpoint`)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from medkd.errors import ConfigError, MedkdError

__all__ = [
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "write_settings",
    "CheckpointError",
    "load_checkpoint",
]


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


class CheckpointError(MedkdError, RuntimeError):
    """A checkpoint file is missing, unreadable or does not match the network."""


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Read a checkpoint dictionary, naming the file in any error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train that network first or fix the path.")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it may be truncated or not a "
            "PyTorch file. Delete it to start again, or restore it from a backup."
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dictionary of weights.")
    return obj


def write_settings(plan: Mapping[str, Any], path: str | os.PathLike, key: str = "plan_file") -> Path:
    """Write ``plan`` (settings: a plan, a run's settings file) as indented JSON, atomically; ``key`` is the bundle
    key that names ``path``, for the error message."""
    path = Path(path).expanduser()
    try:
        return atomic_write_text(path, _dumps(plan) + "\n")
    except OSError as e:
        raise ConfigError(
            f"cannot write {path} ({e}); pass --{key} a writable path (e.g. in the bundle's folder)."
        ) from e


def _dumps(plan: Mapping[str, Any]) -> str:
    """Indented JSON with short lists (sizes, spacings, strides) on one line."""
    text = json.dumps(plan, indent=2, default=str)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]", text)
