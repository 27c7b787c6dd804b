"""Post-processing and mirror test-time augmentation, each kept only where it improves the validation images."""

import json

import pytest
import torch
from monai.inferers import SimpleInferer

from medkd.training.evaluators import pred_key
from medkd.training.postprocessing import (
    POSTPROCESSING_JSON,
    ChoosePostprocessing,
    ChosenInferer,
    PostprocessingChoice,
    mirrored,
)

RAMP = torch.linspace(-1.0, 1.0, 8)  # along the width: flipping the image turns it around


class Biased(torch.nn.Module):
    """Two-class logits of a binary image: the object is class 1 (±5), plus a bias 7 x RAMP that flipping the image
    does not flip, so the plain prediction spills over on the right and loses the object's left edge."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 5 * (2 * x - 1) + 7 * RAMP], dim=1)


class Fixed(torch.nn.Module):
    """The same logits whatever the image (``logits`` of shape ``(1, 2, 8, 8)``)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1, -1, -1)


def _square() -> torch.Tensor:
    label = torch.zeros(1, 1, 8, 8)
    label[..., 1:4, 1:4] = 1  # off-centre: a fixed output turned around misses it
    return label


def _logits(mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros_like(mask), 10 * (2 * mask - 1)], dim=1)


def test_mirrored_is_the_log_of_the_mean_probability_over_every_flip():
    x = torch.rand(1, 1, 8, 8)
    expected = (
        sum(
            torch.softmax(torch.flip(Biased()(torch.flip(x, dims)), dims) if dims else Biased()(x), dim=1)
            for dims in ((), (2,), (3,), (2, 3))
        )
        / 4
    )
    assert torch.allclose(torch.softmax(mirrored(SimpleInferer(), x, Biased()), dim=1), expected, atol=1e-6)


def test_tta_and_the_largest_component_are_kept_only_where_they_raise_the_validation_dice(tmp_path):
    label = _square()
    speck = label.clone()
    speck[..., 7, 7] = 1  # a false positive apart from the object
    networks = {"biased": Biased(), "speck": Fixed(_logits(speck)), "exact": Fixed(_logits(label))}
    choice = PostprocessingChoice()
    handler = ChoosePostprocessing(
        choice, networks, [{"image": label, "label": label}], SimpleInferer(), num_classes=2,
        output_dir=str(tmp_path), ensemble=["speck", "exact"], mirror_tta=True,
    )  # fmt: skip
    handler(None)
    # the bias is undone by the mirrored mean; a fixed output turned around only loses the object
    assert choice.mirror == {"biased": True, "speck": False, "exact": False}
    assert choice.largest_component == {"biased": [], "speck": [1], "exact": [], "ensemble": []}
    report = json.loads((tmp_path / POSTPROCESSING_JSON).read_text())
    assert report["speck"]["validation_dice"] == [pytest.approx(2 * 9 / 19, abs=1e-4)]
    assert report["speck"]["validation_dice_chosen"] == [1.0] and report["exact"]["largest_component"] == []
    assert report["biased"]["validation_dice"] == [1.0] and report["biased"]["validation_dice_without_tta"][0] < 1
    item = {
        pred_key("speck"): torch.cat([1 - speck[0], speck[0]]),
        pred_key("exact"): torch.cat([1 - label[0], label[0]]),
    }
    assert torch.equal(choice(item)[pred_key("speck")][1], label[0, 0])  # the speck is gone at test time
    assert "speck: the largest component of class 1" in choice.describe() and "biased: mirror TTA" in choice.describe()


def test_the_chosen_inferer_mirrors_only_the_networks_chosen_for_it():
    choice, networks, x = PostprocessingChoice(), {"a": Biased(), "b": Biased()}, _square()
    choice.mirror["a"] = True
    inferer = ChosenInferer(SimpleInferer(), choice, networks)
    assert torch.allclose(inferer(x, networks["a"]), mirrored(SimpleInferer(), x, networks["a"]))
    assert torch.equal(inferer(x, networks["b"]), Biased()(x))


def test_nothing_is_chosen_when_switched_off(tmp_path):
    class Engine:
        def add_event_handler(self, *args):
            raise AssertionError("attached although disabled")

    ChoosePostprocessing(PostprocessingChoice(), {}, [], SimpleInferer(), 2, str(tmp_path), enabled=False).attach(
        Engine()
    )
