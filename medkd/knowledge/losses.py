"""Distillation losses: prediction KL, feature hints, channel-wise KL, DIST and the helpers they share.

Every loss works for classification logits ``(B, C)`` and segmentation logits ``(B, C, H, W[, D])``;
segmentation terms are computed per pixel/voxel and averaged. The values of their options (temperatures, modes,
grids, weights) are checked in one place, where a route gives them (the kinds' ``validate``,
:mod:`medkd.knowledge.route_kinds`), with a :class:`~medkd.errors.ConfigError` naming the route.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PredictionDistillationLoss",
    "FeatureDistillationLoss",
    "AffinityDistillationLoss",
    "RegionPredictionLoss",
    "RegionFeatureLoss",
    "ChannelWiseDistillationLoss",
    "DISTLoss",
    "affinity_matrix",
    "channel_adapter",
    "attention_map",
    "class_pixel_weights",
    "inverse_frequency",
    "label_indices",
    "normalize_per_sample",
    "pearson_correlation",
    "region_means",
    "resize_to",
]


class _KLSum(torch.autograd.Function):
    """``scale · Σ p_src · (log p_src − log p_dst)`` with its gradient ``−scale · p_src`` to ``log p_dst`` only.

    The same value as ``F.kl_div(..., reduction="sum", log_target=True)`` but with one elementwise pass forward
    (besides a dot product) and one backward, where autograd through ``kl_div`` takes about five, plus an ``exp``
    each way; on CPU, for 3D segmentation logits, this is a large part of a distillation step. (The difference
    is taken elementwise: two large dot products subtracted lose the digits of a small KL in float32.)
    """

    @staticmethod
    def forward(ctx, log_p_dst: torch.Tensor, log_p_src: torch.Tensor, p_src: torch.Tensor, scale: float):
        with torch.autocast(log_p_dst.device.type, enabled=False):
            diff = log_p_src - log_p_dst
            if diff.is_contiguous() and p_src.is_contiguous():
                value = torch.dot(p_src.reshape(-1), diff.reshape(-1))
            else:  # e.g. channels_last: same value
                value = (p_src * diff).sum()
        ctx.save_for_backward(p_src)
        ctx.scale = scale
        return value * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (p_src,) = ctx.saved_tensors
        return p_src * (grad * -ctx.scale), None, None, None


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
        self.temperature = float(temperature)
        self.ignore_index = ignore_index

    def forward(
        self,
        student_logits: torch.Tensor,
        source_logits: torch.Tensor,
        mask: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.from_log_probs(
            self.log_probs(student_logits), self.log_probs(source_logits.detach()), mask=mask, target=target
        )

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``log σ(z/τ)`` in float32, over the class dimension (at ``τ`` = 1 without a division: one elementwise pass
        less each way on full-resolution logits)."""
        logits = logits.float()
        return F.log_softmax(logits if self.temperature == 1 else logits / self.temperature, dim=1)

    def from_log_probs(
        self,
        log_p_dst: torch.Tensor,
        log_p_src: torch.Tensor,
        mask: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        p_src: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss from :meth:`log_probs` of the student and of the source (detached here), so that a network's
        log-probabilities can be shared by several routes at one temperature (``KnowledgeRoutes`` does this).
        ``p_src``: ``log_p_src.exp()`` when already computed."""
        if log_p_dst.shape != log_p_src.shape:
            raise ValueError(
                f"prediction distillation needs logits of one shape, got student {tuple(log_p_dst.shape)} "
                f"and source {tuple(log_p_src.shape)}: the networks must predict the same classes."
            )
        tau = self.temperature
        log_p_src = log_p_src.detach()
        if self.ignore_index is not None and target is not None:
            keep = (target != self.ignore_index).to(log_p_dst.dtype)
            mask = keep if mask is None else mask * keep
        if mask is None:  # the mean over pixels of the KL summed over classes
            pixels = max(log_p_dst.numel() // max(log_p_dst.shape[1], 1), 1)
            p_src = log_p_src.exp() if p_src is None else p_src.detach()
            return _KLSum.apply(log_p_dst, log_p_src, p_src, tau * tau / pixels)
        kl = F.kl_div(log_p_dst, log_p_src, reduction="none", log_target=True).sum(dim=1, keepdim=True)
        mask = mask.to(kl.dtype).expand_as(kl)
        return tau * tau * (kl * mask).sum() / mask.sum().clamp_min(1.0)


def normalize_per_sample(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Standardise each sample of ``(B, ...)`` to zero mean, unit variance over all its other dimensions:
    ``(x - mean) / sqrt(var + eps²)`` (population variance; a constant sample gives zeros).

    Computed as a layer norm without affine over the non-batch dimensions: one fused kernel forward and backward,
    about 4x faster than mean/std on CPU.
    """
    return F.layer_norm(x, x.shape[1:], eps=eps * eps)


def attention_map(x: torch.Tensor) -> torch.Tensor:
    """Attention-transfer map (Zagoruyko & Komodakis, 2017): channel-mean of squares, L2-normalised per sample.

    ``(B, C, *spatial)`` -> ``(B, prod(spatial))``.
    """
    return F.normalize(x.pow(2).mean(dim=1).flatten(1), dim=1)


def channel_adapter(dst_channels: int, src_channels: int, spatial_dims: int) -> nn.Module:
    """A learnable 1x1(x1) convolution without bias mapping ``dst_channels`` onto ``src_channels`` (1, 2 or 3
    ``spatial_dims``), or ``nn.Identity`` when they are equal."""
    if dst_channels == src_channels:
        return nn.Identity()
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]
    return conv(dst_channels, src_channels, kernel_size=1, bias=False)


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(B, C, *spatial)`` resized (linear, bilinear or trilinear) to the spatial ``size``; ``x`` when it has it."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = ("linear", "bilinear", "trilinear")[x.ndim - 3]
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


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
            ``"attention"`` — attention transfer, adapter-free, compares spatial attention maps (:meth:`attention`,
            also the ``attention`` route kind's loss).
        normalize: standardise each sample's maps before the MSE so one weight works across networks.

    Shapes:
        - ``dst``: ``(B, dst_channels, *spatial_dst)``; ``src``: ``(B, src_channels, *spatial_src)``.
        - output: scalar.
    """

    def __init__(
        self, dst_channels: int, src_channels: int, spatial_dims: int, mode: str = "mse", normalize: bool = True
    ) -> None:
        super().__init__()
        self.mode = mode
        self.normalize = normalize
        self.spatial_dims = spatial_dims
        self.adapter = channel_adapter(dst_channels, src_channels, spatial_dims) if mode == "mse" else nn.Identity()

    def forward(self, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        if self.mode == "attention":
            return self.attention(dst, src)
        src = src.detach().float()
        dst = resize_to(self.adapter(dst).float(), src.shape[2:])
        if self.normalize:
            dst, src = normalize_per_sample(dst), normalize_per_sample(src)
        return F.mse_loss(dst, src)

    @staticmethod
    def attention(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """Attention transfer (Zagoruyko & Komodakis, 2017), the one implementation: MSE of the
        :func:`attention_map` of ``dst`` (resized to ``src``'s spatial size) and of ``src`` (detached)."""
        src = src.detach().float()
        return (attention_map(resize_to(dst.float(), src.shape[2:])) - attention_map(src)).pow(2).mean()


def _pool(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(B, C, *spatial)`` average-pooled to ``size`` (adaptive: each output element is the mean of its area)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[x.ndim - 3](x, tuple(size))


def affinity_matrix(x: torch.Tensor) -> torch.Tensor:
    """Pairwise affinity of the positions of a feature map: cosine similarity of the channel vectors of every two
    positions. ``(B, C, *spatial)`` -> ``(B, N, N)``, ``N = prod(spatial)``."""
    v = F.normalize(x.float().flatten(2), dim=1)  # (B, C, N), unit channel vectors
    return v.transpose(1, 2) @ v


class AffinityDistillationLoss(nn.Module):
    """Pairwise affinity distillation (structured KD for segmentation, Liu et al. 2019): both feature maps are
    average-pooled to a grid of at most ``grid`` positions per axis, and the MSE is taken between their affinity
    matrices (:func:`affinity_matrix`). It compares how positions relate, not the features themselves, so the
    networks may have any channel counts (no adapter) and spatial sizes (each is pooled to the common grid).

    Memory is bounded by the grid: ``B · N²`` floats per map with ``N = grid ** spatial_dims`` at most.

    Args:
        grid: positions per spatial axis after pooling (>= 1); a map smaller than that keeps its size.

    Shapes:
        - ``dst``: ``(B, C_dst, *spatial_dst)``; ``src``: ``(B, C_src, *spatial_src)``, detached here.
        - output: scalar, ``>= 0``, zero when the maps relate their positions alike.
    """

    def __init__(self, grid: int = 8) -> None:
        super().__init__()
        self.grid = int(grid)

    def forward(self, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        size = [min(self.grid, a, b) for a, b in zip(dst.shape[2:], src.shape[2:], strict=True)]
        a_dst = affinity_matrix(_pool(dst.float(), size))
        a_src = affinity_matrix(_pool(src.detach().float(), size))
        return F.mse_loss(a_dst, a_src)


def label_indices(targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The class index of every pixel (or sample) of ``targets``, ``-1`` where it is not one of the ``C`` classes
    of ``logits`` (e.g. an ignore label).

    Shapes:
        - ``targets``: class indices ``(B, 1, *spatial)`` or ``(B, *spatial)`` (``(B,)`` for classification), or
          one-hot ``(B, C, *spatial)``; ``logits``: ``(B, C, *spatial)``.
        - output: ``(B, 1, *spatial)``, long.
    """
    num_classes = logits.shape[1]
    if targets.ndim == logits.ndim and targets.shape[1] == num_classes and num_classes > 1:
        targets = targets.argmax(dim=1, keepdim=True)  # one-hot
    elif targets.ndim == logits.ndim - 1:
        targets = targets.unsqueeze(1)
    expected = (logits.shape[0], 1, *logits.shape[2:])
    if tuple(targets.shape) != expected:
        raise ValueError(
            f"labels of shape {tuple(targets.shape)} do not match logits {tuple(logits.shape)}: expected class "
            f"indices {expected} or one-hot {tuple(logits.shape)}."
        )
    labels = targets.detach().round().long()
    return labels.masked_fill((labels < 0) | (labels >= num_classes), -1)


def inverse_frequency(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class weights ``c_k = 1 / n_k``, ``n_k`` the number of pixels of class ``k`` in ``labels`` (``0`` for a class
    without pixels). ``labels``: class indices from :func:`label_indices`; output: ``(num_classes,)``."""
    counts = torch.bincount(labels[labels >= 0].flatten(), minlength=num_classes)[:num_classes].float()
    return torch.where(counts > 0, 1.0 / counts.clamp_min(1.0), torch.zeros_like(counts))


def class_pixel_weights(labels: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """Per-pixel weights ``w(x) = c_{y(x)} · N / Σ_x' c_{y(x')}`` from the class ``y(x)`` of each of the ``N``
    pixels (or samples) of the batch: weighted by class, normalised to mean 1 (all zeros when every weight is zero).
    Pixels of no class (``-1``) weigh 0.

    Shapes:
        - ``labels``: ``(B, 1, *spatial)`` from :func:`label_indices`; ``class_weights``: ``(C,)``.
        - output: ``(B, 1, *spatial)``, float.
    """
    c = torch.cat([class_weights.to(labels.device, torch.float32), torch.zeros(1, device=labels.device)])
    w = c[labels]  # index -1: the appended zero
    total = w.sum()
    return w * (w.numel() / total) if total > 0 else w


def region_means(x: torch.Tensor, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of ``x`` over each of ``K`` soft regions, and each region's mass: the regions are average-pooled to
    ``x``'s spatial size, then ``mean_k = Σ_x r_k(x) · x(x) / Σ_x r_k(x)``.

    Shapes:
        - ``x``: ``(B, C, *spatial_x)``; ``regions``: ``(B, K, *spatial_r)``, ``>= 0`` (soft or one-hot).
        - output: means ``(B, K, C)`` (zeros for an empty region) and masses ``(B, K)``.
    """
    r = _pool(regions.float(), x.shape[2:]).flatten(2)  # (B, K, N)
    mass = r.sum(dim=2)
    means = r @ x.float().flatten(2).transpose(1, 2)  # (B, K, C)
    return means / mass.clamp_min(1e-6).unsqueeze(2), mass


class RegionPredictionLoss(nn.Module):
    """Class-region distillation of predictions: in each class region ``k`` (soft weights ``r_k``, from the labels
    or the source's prediction), the mean predicted distribution ``P_k = Σ_x r_k(x) σ(z(x)/τ) / Σ_x r_k(x)``; the
    loss is ``τ² · KL(P_k^src ‖ P_k^dst)``, averaged over the regions with pixels in each sample. It asks the
    student to confuse the classes of each region the way the source does, a small structure weighing as much as
    the background.

    Args:
        temperature: softmax temperature ``τ`` (> 0).

    Shapes:
        - ``dst_logits``, ``src_logits``: ``(B, C, *spatial)`` (the source detached here).
        - ``regions``: ``(B, K, *spatial_r)``, ``>= 0``.
        - output: scalar, ``>= 0``, zero when the predictions are equal.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, dst_logits: torch.Tensor, src_logits: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        tau = self.temperature
        p_dst, mass = region_means(F.softmax(dst_logits.float() / tau, dim=1), regions)
        p_src, _ = region_means(F.softmax(src_logits.detach().float() / tau, dim=1), regions)
        kl = (p_src * (p_src.clamp_min(1e-8).log() - p_dst.clamp_min(1e-8).log())).sum(dim=2)  # (B, K)
        present = (mass > 1e-6).float()
        return tau * tau * (kl * present).sum() / present.sum().clamp_min(1.0)


class RegionFeatureLoss(nn.Module):
    """Class-region distillation of features: the mean feature vector of each class region (a class prototype,
    :func:`region_means`) of each network, and the MSE between the two networks' matrices of cosine similarity
    between the prototypes of the classes present in the sample, over the pairs of two different classes (zero
    with fewer than two). It compares how the classes relate in feature space, so the networks may have any channel
    counts (no adapter).

    Shapes:
        - ``dst``: ``(B, C_dst, *spatial_dst)``; ``src``: ``(B, C_src, *spatial_src)``, detached here.
        - ``regions``: ``(B, K, *spatial_r)``, ``>= 0``.
        - output: scalar, ``>= 0``, zero when the prototypes relate alike.
    """

    def forward(self, dst: torch.Tensor, src: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        proto_dst, mass_dst = region_means(dst, regions)
        proto_src, mass_src = region_means(src.detach(), regions)
        present = ((mass_dst > 1e-6) & (mass_src > 1e-6)).float()  # (B, K)
        others = 1.0 - torch.eye(present.shape[1], device=present.device)  # a class's similarity to itself is 1
        pairs = present.unsqueeze(2) * present.unsqueeze(1) * others  # (B, K, K): two different classes present
        relation_dst = affinity_matrix(proto_dst.transpose(1, 2))  # (B, K, K)
        relation_src = affinity_matrix(proto_src.transpose(1, 2))
        return ((relation_dst - relation_src).pow(2) * pairs).sum() / pairs.sum().clamp_min(1.0)


class ChannelWiseDistillationLoss(nn.Module):
    """Channel-wise distillation (Shu et al., ICCV 2021): each channel's map becomes a distribution over the spatial
    positions, ``φ(y_c)(x) = softmax_x(y_c(x) / τ)``, and the destination matches the source's in every channel:
    ``τ² / (B·C) · Σ_{b,c} KL(φ(y^src_{b,c}) ‖ φ(y^dst_{b,c}))``, the KL summed over the positions, averaged over
    the channels and the batch. Where a pixel-wise KL weighs every pixel alike, this asks for the places each
    channel (a class, for logits) responds most strongly.

    Args:
        temperature: softmax temperature ``τ`` (> 0).

    Shapes:
        - ``dst``, ``src``: ``(B, C, *spatial)``, one shape (logits, or a feature map through an adapter and
          resized); the source detached here.
        - output: scalar, ``>= 0``, zero when the maps are equal.
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        if dst.shape != src.shape or dst.ndim < 3:
            raise ValueError(
                f"channel-wise distillation needs maps (B, C, *spatial) of one shape, got destination "
                f"{tuple(dst.shape)} and source {tuple(src.shape)}."
            )
        tau = self.temperature
        log_p_dst = F.log_softmax(dst.float().flatten(2) / tau, dim=2)
        log_p_src = F.log_softmax(src.detach().float().flatten(2) / tau, dim=2)
        return _KLSum.apply(log_p_dst, log_p_src, log_p_src.exp(), tau * tau / (dst.shape[0] * dst.shape[1]))


def pearson_correlation(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: the cosine similarity of the rows
    centred on their means (``eps`` added to the product of norms, as in DIST). ``(N, K)``, ``(N, K)`` -> ``(N,)``;
    a constant row gives 0."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


class DISTLoss(nn.Module):
    """DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher"): the destination matches
    the source's class probabilities ``p = softmax(z / τ)`` up to a linear relation, by correlation rather than KL.
    With the predictions as a matrix of samples by classes,

    - inter-class relation: ``mean over samples i of 1 − Pearson(p_dst[i, :], p_src[i, :])``;
    - intra-class relation: ``mean over classes c of 1 − Pearson(p_dst[:, c], p_src[:, c])``;
    - loss ``τ² · (β · inter + γ · intra)``.

    For segmentation every pixel (voxel) of the batch is a sample: inter over the ``C`` classes at each pixel,
    intra per class over all the pixels of the batch.

    Args:
        temperature: softmax temperature ``τ`` (> 0); 1 in the authors' code and ImageNet setting.
        beta: weight ``β`` of the inter-class term (>= 0).
        gamma: weight ``γ`` of the intra-class term (>= 0).

    Shapes:
        - ``dst_logits``, ``src_logits``: ``(B, C)`` or ``(B, C, *spatial)``, one shape; the source detached here.
        - output: scalar in ``[0, 2 τ² (β + γ)]``, (nearly) zero when the predictions are equal.
    """

    def __init__(self, temperature: float = 1.0, beta: float = 1.0, gamma: float = 1.0) -> None:
        super().__init__()
        self.temperature, self.beta, self.gamma = float(temperature), float(beta), float(gamma)

    def samples(self, logits: torch.Tensor) -> torch.Tensor:
        """The probabilities ``softmax(z / τ)`` as a matrix ``(samples, C)``: one row per sample or pixel."""
        p = F.softmax(logits.float() / self.temperature, dim=1)
        return p.movedim(1, -1).reshape(-1, p.shape[1])

    def forward(self, dst_logits: torch.Tensor, src_logits: torch.Tensor) -> torch.Tensor:
        if dst_logits.shape != src_logits.shape:
            raise ValueError(
                f"DIST needs logits of one shape, got destination {tuple(dst_logits.shape)} and source "
                f"{tuple(src_logits.shape)}: the networks must predict the same classes."
            )
        p_dst, p_src = self.samples(dst_logits), self.samples(src_logits.detach())
        inter = 1.0 - pearson_correlation(p_dst, p_src).mean()
        intra = 1.0 - pearson_correlation(p_dst.T, p_src.T).mean()
        return self.temperature**2 * (self.beta * inter + self.gamma * intra)
