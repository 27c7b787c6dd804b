"""The distillation losses equal hand computations on small tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from medkd.errors import ConfigError
from medkd.knowledge.losses import (
    FeatureDistillationLoss,
    PredictionDistillationLoss,
    attention_map,
    normalize_per_sample,
)
from medkd.knowledge.routes import Route


def _kl_by_hand(src: list[float], dst: list[float], tau: float) -> float:
    p = [math.exp(v / tau) for v in src]
    q = [math.exp(v / tau) for v in dst]
    p = [v / sum(p) for v in p]
    q = [v / sum(q) for v in q]
    return tau * tau * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


@pytest.mark.parametrize("tau", [1.0, 4.0])  # (τ = 1 skips the division)
def test_prediction_kl_matches_hand_computation_classification(tau):
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    expected = (_kl_by_hand([2, 0, 1], [1, 2, 0.5], tau) + _kl_by_hand([1, 1, 1], [0, -1, 3], tau)) / 2
    got = PredictionDistillationLoss(temperature=tau)(student, teacher)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_prediction_kl_is_pixelwise_for_segmentation_and_masks():
    # (B=1, C=2, H=2, W=1): pixel 0 has student logits (1, 2), pixel 1 has (0, 1)
    student = torch.tensor([[[[1.0], [0.0]], [[2.0], [1.0]]]])
    teacher = torch.tensor([[[[0.0], [1.0]], [[3.0], [1.0]]]])
    px0 = _kl_by_hand([0.0, 3.0], [1.0, 2.0], 2.0)
    px1 = _kl_by_hand([1.0, 1.0], [0.0, 1.0], 2.0)
    loss = PredictionDistillationLoss(temperature=2.0)
    assert loss(student, teacher).item() == pytest.approx((px0 + px1) / 2, rel=1e-5)
    mask = torch.tensor([1.0, 0.0]).reshape(1, 1, 2, 1)
    assert loss(student, teacher, mask=mask).item() == pytest.approx(px0, rel=1e-5)
    ignore = PredictionDistillationLoss(temperature=2.0, ignore_index=255)
    target = torch.tensor([0, 255]).reshape(1, 1, 2, 1)
    assert ignore(student, teacher, target=target).item() == pytest.approx(px0, rel=1e-5)


def test_prediction_kl_zero_for_equal_logits_and_source_detached():
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    src = z.detach().clone().requires_grad_(True)
    loss = PredictionDistillationLoss(3.0)(z, src)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert src.grad is None


@pytest.mark.parametrize("tau", [1.0, 3.0])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_prediction_kl_gradient_is_autograds_through_kl_div(tau, layout):
    """The KL's own backward (``−scale · p_src`` to the student's log-probabilities) gives the student's logits the
    gradient that autograd gives through ``log_softmax`` and ``kl_div``, in either memory layout."""
    torch.manual_seed(0)
    z = torch.randn(2, 3, 5, 4).contiguous(memory_format=layout).requires_grad_(True)
    src = torch.randn(2, 3, 5, 4)
    (got,) = torch.autograd.grad(PredictionDistillationLoss(tau)(z, src), z)
    reference = F.kl_div(F.log_softmax(z / tau, 1), F.log_softmax(src / tau, 1), reduction="sum", log_target=True)
    (expected,) = torch.autograd.grad(tau * tau * reference / (2 * 5 * 4), z)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-8)


def test_prediction_kl_under_bf16_logits_gives_a_bf16_gradient():
    z = torch.randn(2, 3, 4, 4).to(torch.bfloat16).requires_grad_(True)
    loss = PredictionDistillationLoss(2.0)(z, torch.randn(2, 3, 4, 4))
    assert loss.dtype == torch.float32
    loss.backward()
    assert z.grad.dtype == torch.bfloat16 and torch.isfinite(z.grad).all()


def test_prediction_kl_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same classes"):
        PredictionDistillationLoss()(torch.zeros(2, 3), torch.zeros(2, 4))
    # option values are checked in one place, where a route gives them (the route kinds), naming the route
    with pytest.raises(ConfigError, match="temperature of route sp/prediction_from_teacher must be a finite number"):
        Route("teacher", "sp", "prediction", temperature=0)


def test_feature_mse_matches_hand_computation_without_adapter():
    dst = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    src = torch.tensor([[[[2.0, 2.0], [2.0, 6.0]]]])
    raw = FeatureDistillationLoss(1, 1, spatial_dims=2, normalize=False)
    assert isinstance(raw.adapter, torch.nn.Identity)
    assert raw(dst, src).item() == pytest.approx((1 + 0 + 1 + 4) / 4)
    norm = FeatureDistillationLoss(1, 1, spatial_dims=2)
    by_hand = ((normalize_per_sample(dst) - normalize_per_sample(src)) ** 2).mean()
    assert norm(dst, src).item() == pytest.approx(by_hand.item())
    zd = (dst - dst.mean()) / dst.std(unbiased=False)
    assert normalize_per_sample(dst).flatten().tolist() == pytest.approx(zd.flatten().tolist(), rel=1e-5)


def test_feature_adapter_maps_channels_and_resizes():
    loss = FeatureDistillationLoss(dst_channels=3, src_channels=5, spatial_dims=3)
    assert isinstance(loss.adapter, torch.nn.Conv3d) and loss.adapter.weight.shape == (5, 3, 1, 1, 1)
    dst = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    src = torch.randn(2, 5, 8, 8, 8)
    value = loss(dst, src)
    value.backward()
    assert dst.grad is not None and loss.adapter.weight.grad is not None
    with torch.no_grad():
        up = torch.nn.functional.interpolate(loss.adapter(dst), size=(8, 8, 8), mode="trilinear")
        expected = ((normalize_per_sample(up) - normalize_per_sample(src)) ** 2).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_attention_transfer_matches_hand_computation():
    dst = torch.tensor([[[[1.0, 0.0]], [[1.0, 2.0]]]])  # (1, 2, 1, 2)
    src = torch.tensor([[[[3.0, 4.0]]]])  # (1, 1, 1, 2)
    a_dst = torch.tensor([1.0, 2.0]) / math.sqrt(5)  # mean of squares over channels: [1, 2]
    a_src = torch.tensor([9.0, 16.0]) / math.sqrt(81 + 256)
    expected = ((a_dst - a_src) ** 2).mean().item()
    loss = FeatureDistillationLoss(2, 1, spatial_dims=2, mode="attention")
    assert isinstance(loss.adapter, torch.nn.Identity)
    assert loss(dst, src).item() == pytest.approx(expected, rel=1e-5)
    assert attention_map(src).shape == (1, 2)
    assert torch.equal(loss(dst, src), FeatureDistillationLoss.attention(dst, src))  # the one implementation
    with pytest.raises(ConfigError, match="route sp/feature_from_teacher has mode 'l1'"):
        Route("teacher", "sp", "feature", mode="l1")
