"""User errors: one base class for every mistake a user can fix, and a short report of them instead of a traceback.

Every error medkd raises about its input (data, checkpoints, configuration) derives from :class:`MedkdError` and
says which file or key is wrong, what is wrong and what to do. MONAI's config parser wraps such an error in
``RuntimeError: Failed to evaluate ConfigExpression ...``; :func:`user_error` finds it again in the exception chain,
and :func:`install_excepthook` (called first in every bundle stage's ``initialize``, and by ``python -m medkd``)
prints just its message (naming the file of a JSON syntax error MONAI met reading a config file). It
prints Ctrl-C (``KeyboardInterrupt``) as one line too: a training engine's says where the run stopped and how to
resume it (:class:`UserErrorsFirst`).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from types import TracebackType

__all__ = [
    "MedkdError",
    "ConfigError",
    "DataError",
    "user_error",
    "json_error",
    "install_excepthook",
    "UserErrorsFirst",
]


class MedkdError(Exception):
    """A mistake in the user's input; the message names the file or key, the problem and the fix."""


class ConfigError(MedkdError, ValueError):
    """A bundle setting (override, route, network, patch size) that cannot work."""


class DataError(MedkdError, ValueError):
    """Invalid or unreadable input data; the message says which file, what is wrong and what to do."""


def user_error(error: BaseException | None) -> MedkdError | None:
    """The first :class:`MedkdError` in ``error``'s chain of causes and contexts, or ``None``."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, MedkdError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def json_error(path: str | os.PathLike, error: json.JSONDecodeError) -> ConfigError:
    """The :class:`ConfigError` of a JSON syntax ``error`` in the file ``path``."""
    return ConfigError(
        f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}. Fix the file there (a "
        "missing comma or quote, a comma after the last item, or a comment, which JSON does not allow)."
    )


def config_file_error(error: BaseException, tb: TracebackType | None) -> MedkdError | None:
    """A JSON syntax ``error`` that MONAI met reading a config file (``ConfigParser.load_config_file``, whose
    ``filepath`` the traceback ``tb`` holds) as a :class:`ConfigError` naming the file, or ``None``."""
    if not isinstance(error, json.JSONDecodeError):
        return None
    for frame, _ in traceback.walk_tb(tb):
        if frame.f_code.co_name == "load_config_file" and "filepath" in frame.f_locals:
            return json_error(frame.f_locals["filepath"], error)
    return None


def _excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        print(str(error) or "Interrupted.", file=sys.stderr, flush=True)
        return
    found = user_error(error) or config_file_error(error, tb)
    if found is None:
        sys.__excepthook__(kind, error, tb)
        return
    print(f"ERROR: {found}", file=sys.stderr, flush=True)


def install_excepthook() -> None:
    """Print a :class:`MedkdError` found in an uncaught exception as one message (the process still exits with
    status 1), and a ``KeyboardInterrupt`` as its message alone (the process exits as interrupted: status 130 in a
    shell); any other exception keeps its full traceback."""
    sys.excepthook = _excepthook


class UserErrorsFirst:
    """Engine mixin: a :class:`MedkdError` or a ``KeyboardInterrupt`` leaves the engine at once, before MONAI's
    ``StatsHandler`` logs it with its whole traceback (other exceptions go through the engine's ``EXCEPTION_RAISED``
    handlers as usual). An engine with a ``resume_checkpoint`` (a
    :class:`medkd.training.handlers.ResumeCheckpoint` attached to it) leaves a bare Ctrl-C as the one-line
    ``KeyboardInterrupt`` of its ``interrupted(engine)``."""

    def _handle_exception(self, e: BaseException) -> None:
        if isinstance(e, KeyboardInterrupt):
            checkpoint = getattr(self, "resume_checkpoint", None)
            raise (checkpoint.interrupted(self) if checkpoint is not None and not e.args else e) from None
        if user_error(e) is not None:
            raise e
        super()._handle_exception(e)  # type: ignore[misc]
