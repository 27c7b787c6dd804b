"""Shared fixtures: tiny 2D and 3D segmentation data, tiny MONAI U-Nets and a trainer of tiny students."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from monai.data import create_test_image_2d
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from medkd.training.engines import DistillationTrainer

torch.set_num_threads(2)


def tiny_unet(channels=(4, 8, 16), seed: int = 0) -> UNet:
    """A small 2D U-Net with 2 output classes."""
    torch.manual_seed(seed)
    return UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=channels, strides=(2, 2), num_res_units=1)


def tiny_batches(n: int = 4, batch_size: int = 4, size: int = 32, seed: int = 0) -> list[dict]:
    """``n`` batches of ``create_test_image_2d`` images and binary labels, as dicts like MONAI loaders give."""
    rng = np.random.RandomState(seed)
    batches = []
    for _ in range(n):
        pairs = [create_test_image_2d(size, size, num_objs=3, rad_max=8, noise_max=0.2, random_state=rng)
                 for _ in range(batch_size)]  # fmt: skip
        image = torch.as_tensor(np.stack([p[0] for p in pairs]))[:, None].float()
        label = (torch.as_tensor(np.stack([p[1] for p in pairs]))[:, None] > 0).long()
        batches.append({"image": image, "label": label})
    return batches


def tiny_unet3d(channels=(4, 8, 16), seed: int = 0) -> UNet:
    """A small 3D U-Net with 2 output classes."""
    torch.manual_seed(seed)
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=channels, strides=(2, 2), num_res_units=1)


def tiny_batches3d(n: int = 2, batch_size: int = 2, size: int = 16, seed: int = 0) -> list[dict]:
    """``n`` batches of noisy 3D balls and their binary labels."""
    rng = np.random.RandomState(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"))
    batches = []
    for _ in range(n):
        centres = rng.uniform(4, size - 4, size=(batch_size, 3, 1, 1, 1))
        label = (np.sqrt(((grid[None] - centres) ** 2).sum(axis=1)) < 4)[:, None]
        image = label + 0.3 * rng.normal(size=label.shape)
        batches.append({"image": torch.as_tensor(image).float(), "label": torch.as_tensor(label).long()})
    return batches


def texture(seed: int, size: int = 32) -> np.ndarray:
    """A distinct uint8 image per seed, with the 1/f spectrum of natural and medical images."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(size)
    radius = np.hypot(f[:, None], f[None, :])
    radius[0, 0] = 1.0
    x = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(size, size))) / radius))
    return (255 * (x - x.min()) / (x.max() - x.min())).astype(np.uint8)


@pytest.fixture
def batches() -> list[dict]:
    return tiny_batches()


def tiny_students(unet: Callable[..., UNet] = tiny_unet) -> dict[str, UNet]:
    """Students ``sp`` and ``sf`` of 4, 8, 8 channels made by ``unet``, seeds 1 and 2."""
    return {"sp": unet((4, 8, 8), seed=1), "sf": unet((4, 8, 8), seed=2)}


def tiny_trainer(
    routes,
    batches: list[dict],
    unet: Callable[..., UNet] = tiny_unet,
    optimizer: Callable = lambda params: torch.optim.Adam(params, lr=1e-2),
    students: dict[str, torch.nn.Module] | None = None,
    max_epochs: int = 1,
    **kwargs,
) -> DistillationTrainer:
    """A ``DistillationTrainer`` of tiny students ``sp`` and ``sf`` (4, 8, 8 channels; or ``students``) and teacher
    (8, 16, 32) made by ``unet``, along ``routes``, on ``batches`` (DiceCE, ``decollate=False``; ``kwargs`` are the
    trainer's)."""
    students = students or tiny_students(unet)
    return DistillationTrainer(
        device="cpu",
        train_data_loader=batches,
        students=students,
        optimizers={name: optimizer(s.parameters()) for name, s in students.items()},
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        teacher=unet((8, 16, 32), seed=0),
        routes=routes,
        decollate=False,
        max_epochs=max_epochs,
        **kwargs,
    )
