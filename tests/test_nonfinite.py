"""Tests for medkd.training.nonfinite: NaN/Inf in images, in the teacher stage's loss and in network outputs."""

from __future__ import annotations

import copy
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_batches, tiny_unet
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.networks.nets import UNet
from monai.transforms import Compose, EnsureTyped, ScaleIntensityd

from medkd.data.finite import CheckFinited, count_nonfinite, with_finite_check
from medkd.data.loading import DataError, LoadMedicalImaged
from medkd.errors import ConfigError, MedkdError
from medkd.training.evaluators import MultiNetworkEvaluator
from medkd.training.nonfinite import NonFiniteLoss, NonFiniteLossError, NonFiniteOutputError, NonFiniteOutputs


def nan_image(path, count=3) -> str:
    array = np.random.rand(8, 8).astype(np.float32)
    array.flat[:count] = np.nan
    array.flat[-1] = np.inf
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return str(path)


def test_count_nonfinite():
    assert count_nonfinite(np.array([1.0, np.nan, np.inf, -np.inf])) == 3
    assert count_nonfinite(torch.tensor([1.0, float("nan")])) == 1
    assert count_nonfinite(np.arange(4)) == 0  # integers cannot hold NaN


def test_guard_after_loading_names_the_file(tmp_path):
    path = nan_image(tmp_path / "scan.nii.gz")
    transforms = with_finite_check([LoadMedicalImaged("image"), ScaleIntensityd("image"), EnsureTyped("image")])
    assert [type(t) for t in transforms[:3]] == [LoadMedicalImaged, CheckFinited, ScaleIntensityd]
    with pytest.raises(RuntimeError) as err:  # MONAI wraps transform errors
        Compose(transforms)({"image": path})
    cause = err.value.__cause__
    assert isinstance(cause, DataError)
    assert str(cause).startswith(f"Image file '{path}' has 4 non-finite value(s) (NaN or Inf) out of 64.")
    assert "numpy.nan_to_num" in str(cause)
    finite = tmp_path / "ok.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4)), str(finite))
    assert Compose(transforms)({"image": str(finite)})["image"].shape == (8, 8)
    with pytest.raises(ConfigError, match="no LoadMedicalImaged/LoadImaged"):
        with_finite_check([ScaleIntensityd("image")])


def batches_with_nan(n=3):
    """Tiny batches whose second batch holds a NaN pixel; the images name their files."""
    batches = tiny_batches(n=n, batch_size=2, size=24)
    for i, b in enumerate(batches):
        b["image"] = MetaTensor(b["image"], meta={"filename_or_obj": [f"case_{i}_{j}.nii.gz" for j in range(2)]})
    batches[1]["image"][1, 0, 3, 3] = float("nan")
    return batches


def teacher_trainer(batches, nan_policy):
    torch.manual_seed(0)
    net = UNet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm="batch")  # with running stats
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=batches,
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-2),
        loss_function=torch.nn.CrossEntropyLoss(),
        prepare_batch=lambda b, device, non_blocking, **kw: (b["image"], b["label"][:, 0]),
        train_handlers=[NonFiniteLoss(nan_policy)],
        decollate=False,
    )
    return trainer, net


def test_teacher_nan_loss_raise_names_epoch_iteration_and_file():
    trainer, _ = teacher_trainer(batches_with_nan(), "raise")
    with pytest.raises(NonFiniteLossError) as err:
        trainer.run()
    message = str(err.value)
    assert "non-finite loss (nan) at epoch 1, iteration 2 (non-finite input in case_1_1.nii.gz)" in message
    assert "--nan_policy skip" in message
    assert not isinstance(err.value, MedkdError) and isinstance(err.value, FloatingPointError)


def test_teacher_nan_loss_skip_leaves_weights_and_batchnorm_statistics_as_before():
    batches = batches_with_nan()
    trainer, net = teacher_trainer(batches[:1], "skip")
    trainer.run()
    after_first_step = copy.deepcopy(net.state_dict())
    trainer, net = teacher_trainer(batches[:2], "skip")  # the same step, then the batch with a NaN pixel
    with pytest.warns(UserWarning, match=r"skipping the step at epoch 1, iteration 2: .*case_1_1\.nii\.gz"):
        trainer.run()
    assert trainer.state.iteration == 2
    state = net.state_dict()  # parameters, BN running statistics and counters: as after the first step
    assert all(torch.equal(state[k], after_first_step[k]) for k in state)
    assert all(torch.isfinite(v.float()).all() for v in state.values())


def test_teacher_nan_policy_ignore_and_bad_value():
    trainer, net = teacher_trainer(batches_with_nan(), "ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no skip warning
        trainer.run()
    assert not all(torch.isfinite(p).all() for p in net.parameters())  # what the policy protects against
    with pytest.raises(ConfigError, match="nan_policy must be one of"):
        NonFiniteLoss("drop")


def test_outputs_of_each_network_are_checked_per_image():
    batch = tiny_batches(n=1, batch_size=2, size=24)[0]
    batch["image"] = MetaTensor(batch["image"], meta={"filename_or_obj": ["a.nii.gz", "b.nii.gz"]})
    good, bad = tiny_unet(), tiny_unet()
    with torch.no_grad():
        next(bad.parameters()).fill_(float("nan"))

    def evaluator(networks, data):
        return MultiNetworkEvaluator(
            "cpu", [data], networks, val_handlers=[NonFiniteOutputs(ckpt_dir="models")], decollate=False
        )

    evaluator({"teacher": good}, batch).run()  # finite: no error
    with pytest.raises(NonFiniteOutputError) as err:
        evaluator({"teacher": good, "sp": bad}, batch).run()
    assert str(err.value).startswith("network 'sp' gave non-finite output (NaN or Inf) for image 'a.nii.gz'")
    assert "models/sp.pt" in str(err.value) and "--amp False" in str(err.value)
    nan_input = dict(batch, image=batch["image"].clone())
    nan_input["image"][1, 0, 0, 0] = float("inf")
    with pytest.raises(DataError, match=r"Image 'b\.nii\.gz' \(after preprocessing\) has 1 non-finite value"):
        evaluator({"teacher": good}, nan_input).run()


def test_teacher_nan_loss_skip_with_an_enabled_grad_scaler(monkeypatch):
    """With AMP, MONAI steps through a GradScaler: the skipped step's gradients are set to NaN so that the scaler
    skips it (a CPU scaler stands in for the CUDA one that MONAI makes at each run)."""
    monkeypatch.setattr(torch.cuda.amp, "GradScaler", lambda: torch.amp.GradScaler("cpu"))

    def run(batches):
        trainer, net = teacher_trainer(batches, "skip")
        trainer.amp = True
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
            warnings.filterwarnings("ignore", message="skipping the step")
            trainer.run()
        return trainer, net.state_dict()

    batches = batches_with_nan()
    _, after_first_step = run(batches[:1])
    trainer, state = run(batches[:2])
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 65536.0 / 2  # the scaler skipped it
    assert all(torch.equal(state[k], after_first_step[k]) for k in state)
