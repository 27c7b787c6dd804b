"""Mixup and cutmix of distillation batches (medkd.training.mixing) and the trainer's step with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medkd.bundles import TEACHER
from medkd.errors import ConfigError
from medkd.knowledge.teacher_cache import TeacherCache
from medkd.training.mixing import BatchMixer, MixedBatch, batch_mixer, check_mixing, cutmix_box
from tests.conftest import tiny_batches, tiny_batches3d, tiny_trainer, tiny_unet3d


def _batch(spatial=(16, 16), n=4, label_map=True):
    """Images whose every pixel holds its sample's index, and labels that hold it too."""
    inputs = torch.arange(n, dtype=torch.float32).view(n, 1, *([1] * len(spatial))).expand(n, 1, *spatial).clone()
    targets = inputs.long() if label_map else torch.arange(n)
    return inputs, targets


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
@pytest.mark.parametrize("alpha", [0.2, 1.0, 5.0])
def test_lambda_in_range(mode, alpha):
    mixer = BatchMixer(mode, alpha, seed=3)
    for _ in range(20):
        mixed = mixer(*_batch(label_map=False))
        assert 0.0 <= mixed.lam <= 1.0 and mixed.partner is not None


@pytest.mark.parametrize("shape", [(17, 16), (9, 12, 7)])
def test_cutmix_boxes_inside_the_image(shape):
    rng = np.random.default_rng(0)
    for lam in np.linspace(0, 1, 21):
        box = cutmix_box(shape, float(lam), rng)
        assert len(box) == len(shape)
        assert all(0 <= s.start <= s.stop <= size for s, size in zip(box, shape, strict=True))


@pytest.mark.parametrize("spatial", [(16, 16), (8, 8, 8)])
def test_cutmix_mixes_label_maps_like_images(spatial):
    inputs, targets = _batch(spatial)
    mixed = BatchMixer("cutmix", 1.0, seed=1)(inputs, targets)
    assert mixed.partner is None  # exact: no λ-weighted second loss
    assert torch.equal(mixed.targets.float(), mixed.inputs)  # each pixel's label is its image's sample
    assert not torch.equal(mixed.inputs, inputs)


def test_cutmix_classification_lambda_is_the_area_ratio():
    inputs, targets = _batch(label_map=False)
    mixed = BatchMixer("cutmix", 1.0, seed=2)(inputs, targets)
    first_share = (mixed.inputs == inputs).float().mean(dim=(1, 2, 3))
    perm_moved = targets != mixed.partner
    assert torch.allclose(first_share[perm_moved], torch.tensor(mixed.lam))


def test_mixup_blends_images_and_weights_the_losses():
    inputs, targets = _batch(label_map=False)
    mixed = BatchMixer("mixup", 1.0, seed=4)(inputs, targets)
    expected = mixed.lam * targets.float() + (1 - mixed.lam) * mixed.partner.float()
    assert torch.allclose(mixed.inputs.flatten(1)[:, 0], expected)
    loss = mixed.loss(lambda logits, y: y.float(), torch.zeros(4))
    assert torch.isclose(loss, expected.mean())


def test_deterministic_under_a_seed():
    inputs, targets = _batch()
    runs = [[BatchMixer("cutmix", 1.0, seed=7)(inputs, targets).inputs for _ in range(2)] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    other = BatchMixer("cutmix", 1.0, seed=8)(inputs, targets).inputs
    assert not torch.equal(runs[0][0], other)


def test_prob_zero_leaves_the_batch_unmixed():
    inputs, targets = _batch()
    mixed = BatchMixer("mixup", 1.0, prob=0.0)(inputs, targets)
    assert mixed.inputs is inputs and mixed.partner is None and mixed.lam == 1.0


def test_route_targets_are_the_larger_share():
    a, b = torch.zeros(2), torch.ones(2)
    assert MixedBatch(a, a, b, 0.3).route_targets is b
    assert MixedBatch(a, a, b, 0.7).route_targets is a


@pytest.mark.parametrize(
    ("mode", "alpha", "prob", "key"),
    [("mixin", 1.0, 1.0, "mix must be"), ("mixup", 0.0, 1.0, "mix_alpha"), ("cutmix", 1.0, 1.5, "mix_prob"),
     ("mixup", "1", 1.0, "mix_alpha")],
)  # fmt: skip
def test_bad_values_are_one_config_error(mode, alpha, prob, key):
    with pytest.raises(ConfigError, match=key):
        check_mixing(mode, alpha, prob)
    assert batch_mixer(None) is None


def _spy_inputs(network, seen):
    network.register_forward_hook(lambda module, args, output: seen.append(args[0].detach().clone()))


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
@pytest.mark.parametrize("routes", ["diversified", "kd_dml"])
def test_step_teacher_and_students_see_the_mixed_batch(mode, routes):
    trainer = tiny_trainer(routes, tiny_batches(n=1), mixing=BatchMixer(mode, 1.0, seed=0))
    seen = {name: [] for name in trainer.networks}
    for name, network in trainer.networks.items():
        _spy_inputs(network, seen[name])
    trainer.run()
    images = [inputs for inputs in seen[TEACHER] if inputs.shape[0] > 1]
    assert len(images) == 1 and not torch.equal(images[0], tiny_batches(n=1)[0]["image"])
    assert all(torch.equal(seen[name][-1], images[0]) for name in trainer.students)
    assert all(torch.isfinite(v) for v in trainer.state.output["losses"].values())


def test_step_in_3d():
    trainer = tiny_trainer("kd", tiny_batches3d(n=1), unet=tiny_unet3d, mixing=BatchMixer("cutmix", 1.0))
    trainer.run()
    assert torch.isfinite(trainer.state.output["loss"])


def test_mixing_refuses_a_teacher_cache():
    with pytest.raises(ConfigError, match="mix cannot use a teacher cache"):
        tiny_trainer("kd", tiny_batches(n=1), mixing=BatchMixer("mixup"), teacher_cache=TeacherCache())
