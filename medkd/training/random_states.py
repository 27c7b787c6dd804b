"""The random states of a training run, saved with its resume checkpoint so that a resumed run draws the same
random numbers as a run never stopped: the same augmentations, batch order and dropout masks, hence the same weights
and metrics (on the same device and thread count).

A training epoch draws from Python's ``random``, numpy's global generator, torch's CPU generator (the data loader's
shuffling, a sampler without a generator of its own, dropout, the ``worker_init_fn`` seeds of loader workers) and
its CUDA generators, and from the generators held by the data loader: the ``R`` (a numpy ``RandomState``) of every
MONAI ``Randomizable`` transform of its dataset (a ``Compose``, the transforms it holds and those nested in them,
e.g. a ``RandSpatialCropd``'s cropper) and the ``torch.Generator`` of a sampler or of the loader.
:class:`RandomStates` gives them all to :class:`medkd.training.handlers.ResumeCheckpoint` as one stateful object;
:class:`DataPass` lets a resumed run continue a pass over the training data that the saved epoch ended within.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

__all__ = ["RandomStates", "DataPass", "random_sources"]

Source = np.random.RandomState | torch.Generator
# a data loader or dataset is followed through these attributes only (not its data or its cache)
_FOLLOWED = ("dataset", "transform", "sampler", "batch_sampler", "generator")
# other objects are searched when they are MONAI's, medkd's or torch's data classes (not modules, tensors, ...)
_SEARCHED = ("monai.", "medkd.", "torch.utils.data.")


def _children(obj: Any) -> list[tuple[str, Any]]:
    """The parts of ``obj`` that may hold a random generator, by name (``.attribute`` or ``[index]``)."""
    if isinstance(obj, (list, tuple)):
        return [(f"[{i}]", item) for i, item in enumerate(obj)]
    if isinstance(obj, dict):
        return [(f"[{key!r}]", value) for key, value in obj.items()]
    if isinstance(obj, (torch.utils.data.DataLoader, torch.utils.data.Dataset)):
        return [(f".{key}", getattr(obj, key)) for key in _FOLLOWED if hasattr(obj, key)]
    if not (hasattr(obj, "__dict__") and type(obj).__module__.startswith(_SEARCHED)):
        return []
    return [(f".{key}", value) for key, value in vars(obj).items()]


def random_sources(root: Any, name: str = "loader") -> Iterator[tuple[str, Source]]:
    """Every numpy ``RandomState`` and ``torch.Generator`` reachable from ``root`` (a data loader), each once, with
    the path it was first found at (e.g. ``loader.dataset.transform.transforms[9].R``), in a fixed order."""
    seen: set[int] = set()
    stack = [(name, root)]
    while stack:
        path, obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, (np.random.RandomState, torch.Generator)):
            yield path, obj
            continue
        if isinstance(getattr(obj, "R", None), np.random.RandomState) and not isinstance(obj, type):
            stack.append((f"{path}.R", obj.R))  # a class attribute, not in vars(obj) until set_random_state
        stack.extend((path + key, child) for key, child in reversed(_children(obj)))


def _numpy_state(generator: np.random.RandomState) -> dict:
    """``generator``'s state with its key as a tensor (``torch.load(weights_only=True)`` reads no numpy arrays)."""
    state = generator.get_state(legacy=False)
    return {**state, "state": {**state["state"], "key": torch.from_numpy(state["state"]["key"].astype(np.int64))}}


def _set_numpy_state(generator: np.random.RandomState, state: dict) -> None:
    key = state["state"]["key"].cpu().numpy().astype(np.uint32)
    generator.set_state({**state, "state": {**state["state"], "key": key}})


def _source_state(source: Source) -> Any:
    return source.get_state() if isinstance(source, torch.Generator) else _numpy_state(source)


def _set_source_state(source: Source, state: Any) -> None:
    if isinstance(source, torch.Generator):
        source.set_state(state.cpu())
    else:
        _set_numpy_state(source, state)


class RandomStates:
    """The random states a training epoch draws from (see the module docstring), as one object with
    ``state_dict``/``load_state_dict``.

    Args:
        loader: the training data loader; its dataset's transforms and its sampler are searched for generators
            (:func:`random_sources`) each time the states are taken or restored.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def state_dict(self) -> dict:
        """Every random state now, by source."""
        return {
            "python": random.getstate(),
            "numpy": _numpy_state(np.random.mtrand._rand),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "loader": {path: _source_state(source) for path, source in random_sources(self.loader)},
        }

    def load_state_dict(self, state: dict) -> list[str]:
        """Restore the states of :meth:`state_dict`; return what could not be restored (generators of the loader
        that the saved states lack or name no more, CUDA states on another device count), for a warning."""
        lost = self.load_global_state(state)
        saved = dict(state["loader"])
        for path, source in random_sources(self.loader):
            if path in saved:
                _set_source_state(source, saved.pop(path))
            else:
                lost.append(path)
        return lost + sorted(saved)

    @staticmethod
    def load_global_state(state: dict) -> list[str]:
        """Restore the global generators of :meth:`state_dict` (Python, numpy, torch), not the loader's; return
        what could not be restored."""
        random.setstate(state["python"])
        _set_numpy_state(np.random.mtrand._rand, state["numpy"])
        torch.set_rng_state(state["torch"].cpu())
        cuda = [s.cpu() for s in state["cuda"]]
        if torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
            return []
        if cuda or torch.cuda.is_available():
            return [f"the CUDA generators (saved {len(cuda)}, now {torch.cuda.device_count()})"]
        return []


def _batches(loader: Any) -> int | None:
    """The number of batches of one pass over ``loader``, or ``None`` when it has no length."""
    try:
        return len(loader)
    except TypeError:
        return None


class DataPass:
    """Where a training engine is in its pass over its data loader: the random states when the pass began and the
    batches drawn since.

    An epoch of ``iterations_per_epoch`` iterations may end within a pass (a small training list is cycled). A
    resumed run then makes the iterator of that pass again from the states it began with and draws its batches
    again, so that it goes on with the batches an uninterrupted run would draw.
    """

    def __init__(self) -> None:
        self.start: dict | None = None
        self.drawn = 0
        self.engine: Engine | None = None

    def attach(self, engine: Engine) -> None:
        """Count the batches ``engine`` draws; take the random states when it is about to begin a new pass."""
        self.engine = engine
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._count)
        engine.add_event_handler(Events.DATALOADER_STOP_ITERATION, self.begin)

    def begin(self, engine: Engine) -> None:
        """A pass begins: ``engine`` makes its next data iterator before it draws any other random number."""
        self.start = RandomStates(engine.state.dataloader).state_dict()
        self.drawn = 0

    def _count(self, engine: Engine) -> None:
        self.drawn += 1

    def state_dict(self) -> dict:
        """The states the pass began with and the batches drawn since."""
        return {"start": self.start, "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved pass (after :class:`RandomStates` restored the states of the saved epoch's end): if
        it was under way, make its iterator again, draw its ``drawn`` batches (the loader's generators are then where
        the pass left them, also where a ``ThreadDataLoader`` had made batches ahead) and restore the epoch's end
        global states; else begin a new pass."""
        engine = self.engine
        self.start, self.drawn = state["start"], state["drawn"]
        if self.start is None or self.drawn in (0, _batches(engine.state.dataloader)):
            self.begin(engine)
            return
        states = RandomStates(engine.state.dataloader)
        end = states.state_dict()
        states.load_state_dict(self.start)
        iterator = iter(engine.state.dataloader)
        for _ in range(self.drawn):
            next(iterator)
        states.load_global_state(end)
        engine._dataloader_iter = iterator  # the engine's iterator of the current pass (ignite has no setter for it)
