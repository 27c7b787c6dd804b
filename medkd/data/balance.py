"""Class-balanced sampling of a classification training list: every class drawn equally often.

On imbalanced data (e.g. 90% normal, 10% finding) a network trained on uniformly drawn batches can score a high
accuracy by favouring the common class; drawing each image with a probability inversely proportional to its class's
count gives every class the same share of the batches (with replacement: the rare images are seen more often, the
common ones less). The bundles' ``balanced_sampling`` key turns it on (:func:`balanced_sampler`), in one process or
on several GPUs (:func:`medkd.runtime.distributed.train_sampler`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import WeightedRandomSampler

from medkd.errors import ConfigError

__all__ = ["balanced_sampler", "class_weights"]


def class_weights(datalist: Sequence[Mapping[str, Any]], label_key: str = "label") -> list[float]:
    """Per entry of ``datalist``, ``1 / n`` for the ``n`` entries of its class: the sampling weights under which each
    class is drawn equally often.

    Raises:
        ConfigError: an entry has no integer class label (a segmentation or unlabelled list).
    """
    labels = []
    for i, entry in enumerate(datalist):
        label = entry.get(label_key)
        if isinstance(label, bool) or not isinstance(label, int):
            raise ConfigError(
                f"balanced_sampling needs a class index as each training entry's {label_key!r}, but entry {i} "
                f"({entry.get('image')}) has {label!r}; it is for classification lists: pass --balanced_sampling False."
            )
        labels.append(label)
    counts = Counter(labels)
    return [1.0 / counts[label] for label in labels]


def balanced_sampler(datalist: Sequence[Mapping[str, Any]], enabled: bool) -> WeightedRandomSampler | None:
    """A sampler drawing ``len(datalist)`` entries per pass, with replacement, each class equally often
    (:func:`class_weights`), when ``enabled``; else ``None`` (the data loader shuffles). It draws from torch's global
    random generator, which the bundles seed (``--seed``)."""
    if not enabled:
        return None
    return WeightedRandomSampler(class_weights(datalist), num_samples=len(datalist), replacement=True)
