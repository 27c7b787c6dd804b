"""The 3D segmentation bundle's embedded default data: a seeded draw of cases from the Decathlon hippocampus set.

``--cases`` cases (one person each) are drawn from the source ``dataset.json``'s training list with Python's
``random.Random(--seed).sample``, in the list's order, and dealt in the order drawn into training, validation and
test (``--counts``); each case's image and label files are copied unchanged into ``images/`` and ``labels/``, and a
``dataset.json`` with the three lists is written beside them. The README and LICENSE beside the subset are written by
hand (see ``medkd/sample_data/msd_hippocampus/README.md``).

Usage (how ``medkd/sample_data/msd_hippocampus`` was made, from the repository root)::

    python benchmarks/hippocampus_subset.py /work/shared/data/msd_hippocampus medkd/sample_data/msd_hippocampus
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

SPLITS = ("training", "validation", "test")
CLASSES = {"0": "background", "1": "anterior", "2": "posterior"}


def draw(cases: list[dict], counts: tuple[int, ...], seed: int = 0) -> dict[str, list[dict]]:
    """``sum(counts)`` cases drawn from ``cases`` with ``random.Random(seed)``, dealt into the splits in that order."""
    drawn = random.Random(seed).sample(cases, sum(counts))
    splits, start = {}, 0
    for split, count in zip(SPLITS, counts, strict=True):
        splits[split] = sorted(drawn[start : start + count], key=lambda case: case["image"])
        start += count
    return splits


def copy_case(case: dict, source: Path, output: Path) -> dict:
    """Copy one case's image and label files unchanged; return its datalist entry, relative to ``output``."""
    entry = {}
    for key, folder in (("image", "images"), ("label", "labels")):
        path = source / case[key]
        (output / folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, output / folder / path.name)
        entry[key] = f"{folder}/{path.name}"
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="the Decathlon Task04_Hippocampus folder (dataset.json, imagesTr/)")
    parser.add_argument("output", type=Path, help="the folder to write (images/, labels/, dataset.json)")
    parser.add_argument("--counts", type=int, nargs=3, default=[40, 10, 10], help="training, validation, test cases")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    source = json.loads((args.source / "dataset.json").read_text())
    splits = draw(source["training"], tuple(args.counts), args.seed)
    datalist = {
        "name": "msd_hippocampus",
        "description": "a seeded subset of the Medical Segmentation Decathlon's Task04_Hippocampus (CC-BY-SA 4.0); "
        "see README.md for the source, licence and how it was made",
        "reference": source.get("reference", ""),
        "licence": "CC-BY-SA 4.0",
        "labels": CLASSES,
    }
    for split, cases in splits.items():
        datalist[split] = [copy_case(case, args.source, args.output) for case in cases]
        print(split, len(cases), " ".join(Path(case["image"]).name.split(".")[0][-3:] for case in cases))
    (args.output / "dataset.json").write_text(json.dumps(datalist, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
