"""Distillation losses: prediction KL, feature hints and the per-sample normalisation they share.

Every loss works for classification logits ``(B, C)`` and segmentation logits ``(B, C, H, W[, D])``;
segmentation terms are computed per pixel/voxel and averaged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PredictionDistillationLoss", "FeatureDistillationLoss", "attention_map", "normalize_per_sample"]


class PredictionDistillationLoss(nn.Module):
    """Temperature-scaled KL divergence ``τ² · KL(σ(z_src/τ) ‖ σ(z_dst/τ))`` (Hinton et al., 2015).

    The source (teacher or peer) is detached, as in Deep Mutual Learning, so only the destination learns.

    Args:
        temperature: softmax temperature ``τ`` (> 0).
        ignore_index: for segmentation, label value whose pixels are excluded (needs ``target`` in ``forward``).

    Shapes:
        - ``student_logits``, ``source_logits``: ``(B, C)`` or ``(B, C, *spatial)``.
        - ``mask`` (optional): broadcastable to ``(B, 1, *spatial)`` (or ``(B, 1)``), nonzero where the term counts.
        - output: scalar.
    """

    def __init__(self, temperature: float = 4.0, ignore_index: int | None = None) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)
        self.ignore_index = ignore_index

    def forward(
        self,
        student_logits: torch.Tensor,
        source_logits: torch.Tensor,
        mask: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if student_logits.shape != source_logits.shape:
            raise ValueError(
                f"prediction distillation needs logits of one shape, got student {tuple(student_logits.shape)} "
                f"and source {tuple(source_logits.shape)}: the networks must predict the same classes."
            )
        tau = self.temperature
        log_p_dst = F.log_softmax(student_logits.float() / tau, dim=1)
        log_p_src = F.log_softmax(source_logits.detach().float() / tau, dim=1)
        kl = (log_p_src.exp() * (log_p_src - log_p_dst)).sum(dim=1, keepdim=True)  # (B, 1, *spatial)
        if self.ignore_index is not None and target is not None:
            keep = (target != self.ignore_index).to(kl.dtype)
            mask = keep if mask is None else mask * keep
        if mask is None:
            return tau * tau * kl.mean()
        mask = mask.to(kl.dtype).expand_as(kl)
        return tau * tau * (kl * mask).sum() / mask.sum().clamp_min(1.0)


def normalize_per_sample(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Standardise each sample of ``(B, ...)`` to zero mean, unit variance over all its other dimensions."""
    flat = x.flatten(1)
    mean = flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, keepdim=True, unbiased=False)
    return ((flat - mean) / (std + eps)).view_as(x)


def attention_map(x: torch.Tensor) -> torch.Tensor:
    """Attention-transfer map (Zagoruyko & Komodakis, 2017): channel-mean of squares, L2-normalised per sample.

    ``(B, C, *spatial)`` -> ``(B, prod(spatial))``.
    """
    return F.normalize(x.pow(2).mean(dim=1).flatten(1), dim=1)


def _conv_1x1(spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]
    return conv(in_channels, out_channels, kernel_size=1, bias=False)


class FeatureDistillationLoss(nn.Module):
    """Hint loss between a destination feature map and a (detached) source feature map (FitNets).

    When channel counts differ, a learnable 1x1(x1) convolution adapter maps the destination's channels onto the
    source's; when spatial sizes differ, the adapted map is resized (trilinear/bilinear) to the source's size.
    The adapter's parameters belong to the destination network and must be optimised with it.

    Args:
        dst_channels: channels of the destination (learning) network's feature map.
        src_channels: channels of the source (teaching) network's feature map.
        spatial_dims: 1, 2 or 3.
        mode: ``"mse"`` — mean squared error of per-sample-standardised maps (``normalize=True``) or raw maps;
            ``"attention"`` — attention transfer, adapter-free, compares spatial attention maps.
        normalize: standardise each sample's maps before the MSE so one weight works across networks.

    Shapes:
        - ``dst``: ``(B, dst_channels, *spatial_dst)``; ``src``: ``(B, src_channels, *spatial_src)``.
        - output: scalar.
    """

    def __init__(
        self, dst_channels: int, src_channels: int, spatial_dims: int, mode: str = "mse", normalize: bool = True
    ) -> None:
        super().__init__()
        if mode not in ("mse", "attention"):
            raise ValueError(f"feature loss mode must be 'mse' or 'attention', got {mode!r}.")
        self.mode = mode
        self.normalize = normalize
        self.spatial_dims = spatial_dims
        needs_adapter = mode == "mse" and dst_channels != src_channels
        self.adapter = _conv_1x1(spatial_dims, dst_channels, src_channels) if needs_adapter else nn.Identity()

    def _resize(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        if x.shape[2:] == size:
            return x
        mode = ("linear", "bilinear", "trilinear")[self.spatial_dims - 1]
        return F.interpolate(x, size=size, mode=mode, align_corners=False)

    def forward(self, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        src = src.detach().float()
        dst = self._resize(self.adapter(dst).float(), src.shape[2:])
        if self.mode == "attention":
            return (attention_map(dst) - attention_map(src)).pow(2).mean()
        if self.normalize:
            dst, src = normalize_per_sample(dst), normalize_per_sample(src)
        return F.mse_loss(dst, src)
