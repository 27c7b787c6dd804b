"""Class-balanced sampling: the sampler, its multi-process form, the plan's choice and the bundle key."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from bundle_utils import run_stage
from PIL import Image

from medkd.data.balance import balanced_sampler, class_weights
from medkd.errors import ConfigError
from medkd.planning.plan import IMBALANCE
from medkd.planning.planfile import make_plan
from medkd.runtime.distributed import train_sampler


def imbalanced(counts: dict[int, int]) -> list[dict]:
    return [{"image": f"{label}_{i}.png", "label": label} for label, n in counts.items() for i in range(n)]


def test_each_class_is_drawn_about_equally_often():
    datalist = imbalanced({0: 90, 1: 9, 2: 1})
    assert class_weights(datalist)[:1] + class_weights(datalist)[-1:] == [1 / 90, 1.0]
    torch.manual_seed(0)
    sampler = balanced_sampler(datalist, True)
    drawn = Counter(datalist[i]["label"] for _ in range(30) for i in sampler)
    assert len(sampler) == 100 and sum(drawn.values()) == 3000
    assert all(900 <= drawn[c] <= 1100 for c in range(3)), drawn  # uniform sampling: 2700 / 270 / 30
    assert balanced_sampler(datalist, False) is None


def test_a_list_without_class_indices_cannot_be_balanced():
    with pytest.raises(ConfigError, match=r"entry 1 \(b.nii.gz\) has 'b_seg.nii.gz'.*--balanced_sampling False"):
        class_weights([{"image": "a.png", "label": 0}, {"image": "b.nii.gz", "label": "b_seg.nii.gz"}])


def test_several_processes_draw_their_share_with_the_same_weights():
    datalist = imbalanced({0: 30, 1: 2})
    torch.manual_seed(0)
    drawn = Counter()
    for rank in (0, 1):  # no process group here: the sampler is told the ranks
        plain = train_sampler(datalist, None, num_replicas=2, rank=rank)
        assert type(plain).__name__ == "DistributedSampler" and plain.shuffle and len(plain) == 16
        weighted = train_sampler(datalist, balanced_sampler(datalist, True), num_replicas=2, rank=rank)
        assert type(weighted).__name__ == "DistributedWeightedRandomSampler" and len(weighted) == 16
        drawn.update(datalist[i]["label"] for _ in range(20) for i in weighted)
    assert 200 <= drawn[1] <= 440, drawn  # 640 drawn, half of them of the 2 rare images (uniform: 40)


def pictures(root, counts: dict[int, int]):
    """A classification data set of random 40x40 PNG files, ``counts`` training images per class."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    entries = []
    for i, label in enumerate(label for label, n in counts.items() for _ in range(n + 2)):
        Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(root / "img" / f"{i}.png")
        entries.append({"image": f"img/{i}.png", "label": label})
    held = [entries.pop(next(k for k, e in enumerate(entries) if e["label"] == c)) for c in counts for _ in range(2)]
    lists = {
        "labels": {str(c): f"class{c}" for c in counts},
        "training": entries,
        "validation": held[::2],
        "test": held[1::2],
    }
    (root / "dataset.json").write_text(json.dumps(lists))
    return root / "dataset.json"


def test_the_plan_balances_classes_from_the_imbalance_threshold_on(tmp_path):
    assert IMBALANCE == 3.0  # with one validation image per class, 15 : 5 samples read is 3x, 15 : 6 is not
    plan = make_plan(str(pictures(tmp_path / "a", {0: 14, 1: 4})), task="classification", device="cpu")
    assert plan["settings"]["balanced_sampling"] is True
    assert plan["reasons"]["balanced_sampling"].startswith("imbalanced classes (class0 3x as many samples as class1")
    plan = make_plan(str(pictures(tmp_path / "b", {0: 14, 1: 5})), task="classification", device="cpu")
    assert plan["settings"]["balanced_sampling"] is False
    assert (
        plan["reasons"]["balanced_sampling"] == "classes within 3x of each other (class0 2.5x class1): uniform sampling"
    )


def test_the_bundle_trains_on_balanced_batches_on_request(tmp_path):
    teacher = run_stage("classification_2d", "train_teacher", tmp_path, balanced_sampling=True)
    loader = teacher.parser.get_parsed_content("train#dataloader")
    assert type(loader.sampler).__name__ == "WeightedRandomSampler" and (tmp_path / "models" / "teacher.pt").is_file()
    plain = run_stage("classification_2d", "train_teacher", tmp_path / "plain").parser
    assert plain.get_parsed_content("train#sampler") is None  # the embedded data: the default plan, uniform
