"""Lateral classes: class pairs that are the same structure on the left and on the right (or single classes named
with a side), found by name and by position, with the axis that separates them (:mod:`medkd.planning.fingerprint`).

* by name: ``left``/``right``, ``l``/``r``, ``lt``/``rt``, ``sinister``/``dexter`` tokens;
* by position: their centroids lie on opposite sides of the image centre along one axis, the same way round in at
  least 90% of the images holding both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["name_side", "lateral_by_name", "lateral_by_position", "lateral_classes"]

LEFT = frozenset({"left", "l", "lt", "sinister", "sinistra", "sinistrum", "sin"})
RIGHT = frozenset({"right", "r", "rt", "dexter", "dextra", "dextrum", "dex"})
POSITION_MARGIN = 0.05  # a centroid is on one side when it is this fraction of the axis away from the centre
POSITION_AGREEMENT = 0.9  # ... the same way round in at least this fraction of the images holding both classes


def _tokens(name: str) -> list[str]:
    """Lower-case words of a class name: split at non-alphanumerics and camel case; ``L1`` stays one token."""
    words = []
    for part in re.split(r"[^A-Za-z0-9]+", str(name)):
        if not part:
            continue
        if any(c.isdigit() for c in part):
            words.append(part)
        else:
            words += re.findall(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+", part)
    return [w.lower() for w in words]


def name_side(name: str) -> str | None:
    """``"left"``, ``"right"`` or ``None`` from the words of a class name (``left_lung``, ``LungR``, ``clavicle
    lt``, ``ren sinister``)."""
    words = set(_tokens(name))
    left, right = bool(words & LEFT), bool(words & RIGHT)
    return "left" if left and not right else "right" if right and not left else None


def _base(name: str) -> str:
    return " ".join(w for w in _tokens(name) if w not in LEFT | RIGHT)


def lateral_by_name(class_names: Sequence[str], background: bool = True) -> tuple[list[tuple[int, int]], list[int]]:
    """``(pairs, singles)``: ``(left, right)`` class indices whose names differ only by a side word, and classes
    named with a side but without a partner. With ``background`` (segmentation), class 0 is the background and never
    lateral; a classifier's class 0 is a finding like the others."""
    sides = {i: name_side(n) for i, n in enumerate(class_names) if i > 0 or not background}
    pairs, paired = [], set()
    for i, side in sides.items():
        if side != "left":
            continue
        partner = next(
            (
                j
                for j, s in sides.items()
                if s == "right" and j not in paired and _base(class_names[j]) == _base(class_names[i])
            ),
            None,
        )
        if partner is not None:
            pairs.append((i, partner))
            paired |= {i, partner}
    singles = [i for i, s in sides.items() if s and i not in paired]
    return pairs, singles


def lateral_by_position(
    centroids: Sequence[Mapping[int, Sequence[float]]],
    margin: float = POSITION_MARGIN,
    agreement: float = POSITION_AGREEMENT,
    min_images: int = 2,
) -> list[dict]:
    """Pairs of classes that lie on opposite sides of the image centre along one axis, consistently.

    Args:
        centroids: per image, ``{class: offset of its centroid from the image centre, per axis, as a fraction of
            the axis length}`` (-0.5..0.5).
        margin: how far from the centre (fraction of the axis) a centroid must be to count as on one side.
        agreement: fraction of the images holding both classes in which they must be on opposite sides, the same
            way round.
        min_images: fewest images holding both classes for a decision.

    Returns:
        ``[{"classes": [a, b], "axis": d, "agreement": f, "images": n}]`` with ``a`` on the low side of axis ``d``
        (smaller index) in most images.
    """
    classes = sorted({c for image in centroids for c in image})
    found = []
    for i, a in enumerate(classes):
        for b in classes[i + 1 :]:
            both = [(image[a], image[b]) for image in centroids if a in image and b in image]
            if len(both) < min_images:
                continue
            best = None
            for axis in range(len(both[0][0])):
                votes = [
                    (1 if ca[axis] < 0 else -1)
                    if abs(ca[axis]) > margin and abs(cb[axis]) > margin and (ca[axis] < 0) != (cb[axis] < 0)
                    else 0
                    for ca, cb in both
                ]
                score = abs(sum(votes)) / len(both)
                spread = float(np.mean([abs(ca[axis] - cb[axis]) for ca, cb in both]))
                if score >= agreement and (best is None or (score, spread) > (best[1], best[2])):
                    best = (axis, score, spread, sum(votes) > 0)
            if best is not None:
                axis, score, _, a_low = best
                pair = [a, b] if a_low else [b, a]
                found.append({"classes": pair, "axis": axis, "agreement": round(score, 3), "images": len(both)})
    return found


def _side_axis(centroids: Sequence[Mapping[int, Sequence[float]]], c: int, margin: float = POSITION_MARGIN):
    """The axis along which class ``c`` lies consistently off-centre, or ``None``."""
    offsets = [image[c] for image in centroids if c in image]
    if len(offsets) < 2:
        return None
    best = None
    for axis in range(len(offsets[0])):
        votes = [(1 if o[axis] < 0 else -1) if abs(o[axis]) > margin else 0 for o in offsets]
        score = abs(sum(votes)) / len(offsets)
        if score >= POSITION_AGREEMENT and (best is None or score > best[1]):
            best = (axis, score)
    return None if best is None else best[0]


def lateral_classes(
    names: Sequence[str], centroids: Sequence[Mapping[int, Sequence[float]]], dims: int, background: bool = True
) -> list[dict]:
    """Lateral classes: name pairs, position pairs, and single classes named with a side, each with its axis."""
    by_position = {tuple(sorted(p["classes"])): p for p in lateral_by_position(centroids)} if centroids else {}
    pairs, singles = lateral_by_name(names, background)
    found = []
    for left, right in pairs:
        pos = by_position.pop(tuple(sorted((left, right))), None)
        entry = {
            "classes": [left, right],
            "names": [names[left], names[right]],
            "found_by": ["name", "position"] if pos else ["name"],
            "axis": pos["axis"] if pos else 0,
        }
        if pos:
            entry.update(agreement=pos["agreement"], images=pos["images"])
        else:
            entry["note"] = "not separated by position in these images; axis 0 (left-right after reorientation) assumed"
        found.append(entry)
    for single in singles:
        axis = _side_axis(centroids, single) if centroids else None
        found.append(
            {
                "classes": [single],
                "names": [names[single]],
                "found_by": ["name"],
                "axis": 0 if axis is None else axis,
                **({} if axis is not None else {"note": "axis 0 (left-right after reorientation) assumed"}),
            }
        )
    for pos in by_position.values():
        a, b = pos["classes"]
        found.append({"classes": [a, b], "names": [names[a], names[b]], "found_by": ["position"], **{
            k: pos[k] for k in ("axis", "agreement", "images")}})  # fmt: skip
    return found
