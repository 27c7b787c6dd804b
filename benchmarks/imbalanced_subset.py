"""An imbalanced copy of a classification datalist, for measuring ``balanced_sampling`` on real data.

Each image of the ``training`` and ``validation`` lists whose class is in ``--keep`` is kept with that probability
(Python's ``random`` with ``--seed``), the others always; the ``test`` list is kept whole, so that each class's recall
is measured on as many images as the data set has. Paths are rewritten relative to the output's folder.

Usage (the brain MRI measurement of bundles/classification_2d/docs/README.md, "Imbalanced classes")::

    python benchmarks/imbalanced_subset.py /data/brain_mri/dataset.json /data/brain_imb/dataset.json \\
        --keep "{'1': 0.2174, '2': 0.2597}"
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
from collections import Counter
from pathlib import Path


def imbalanced(datalist: dict, keep: dict[int, float], seed: int = 0) -> dict:
    """``datalist`` with the training and validation images of the classes in ``keep`` kept with that probability."""
    rng = random.Random(seed)
    out = dict(datalist)
    for key in ("training", "validation"):
        out[key] = [e for e in datalist.get(key, []) if rng.random() < keep.get(int(e["label"]), 1.0)]
    return out


def _moved(entry: dict, source: Path, target: Path) -> dict:
    image = entry["image"] if os.path.isabs(entry["image"]) else str(source / entry["image"])
    return {**entry, "image": os.path.relpath(image, target)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("datalist", type=Path, help="a classification datalist (JSON, integer labels)")
    parser.add_argument("output", type=Path, help="the datalist to write")
    parser.add_argument("--keep", required=True, help="probability of keeping an image, by class: \"{'1': 0.2}\"")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    keep = {int(k): float(v) for k, v in ast.literal_eval(args.keep).items()}
    out = imbalanced(json.loads(args.datalist.read_text()), keep, args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for key in ("training", "validation", "test"):
        out[key] = [_moved(e, args.datalist.parent.resolve(), args.output.parent.resolve()) for e in out.get(key, [])]
        print(key, len(out[key]), dict(sorted(Counter(e["label"] for e in out[key]).items())))
    args.output.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
