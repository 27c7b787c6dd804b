"""Inference skips the files it cannot use, lists them in skipped.tsv and logs them at the end."""

import logging
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from monai.data import DataLoader

from medkd.data.loading import LoadMedicalImaged
from medkd.data.skipping import SafeDataset, SkippedFilesReport, skip_empty_batches, skip_none_collate

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def images(tmp_path) -> list[str]:
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"img{i}.nii.gz"))
        nib.save(nib.Nifti1Image(np.random.rand(8, 8).astype(np.float32), np.eye(4)), paths[-1])
    return paths


@pytest.mark.parametrize("num_workers", [0, 2])
def test_safe_dataset_skips_corrupt_files(tmp_path, images, num_workers, caplog):
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not a nifti")
    data = [{"image": path} for path in images]
    data.insert(1, {"image": str(corrupt)})
    report = tmp_path / "out" / "skipped.tsv"
    dataset = SafeDataset(data, LoadMedicalImaged("image", ensure_channel_first=True), report_file=report)
    loader = DataLoader(dataset, batch_size=2, num_workers=num_workers, collate_fn=skip_none_collate)
    seen = [name for batch in loader if batch is not None for name in batch["image"].meta["filename_or_obj"]]
    assert seen == images
    assert [p.path for p in dataset.skipped] == [str(corrupt)]
    assert "cannot be read as NIFTI" in dataset.skipped[0].reason
    assert dataset.summary().splitlines() == ["Skipped 1 of 4 item(s):", f"  - {dataset.skipped[0]}"]
    assert report.read_text().startswith(f"{corrupt}\t")
    if num_workers == 0:
        assert f"Skipping {corrupt}" in caplog.text


def test_a_batch_of_unusable_files_only_is_passed_over_and_reported(tmp_path, caplog):
    dataset = SafeDataset(
        [{"image": str(tmp_path / "gone.nii.gz")}], LoadMedicalImaged("image"), report_file=tmp_path / "r"
    )
    assert [skip_none_collate([dataset[0]])] == [None]
    assert "not found" in dataset.skipped[0].reason
    assert SafeDataset([], None).summary() == "All 0 item(s) loaded; none skipped."
    engine = SimpleNamespace(_iteration=lambda engine, batch: {"pred": batch})
    assert skip_empty_batches(engine, None) == {} and skip_empty_batches(engine, [1]) == {"pred": [1]}
    with caplog.at_level(logging.INFO, logger="medkd.data.skipping"):
        SkippedFilesReport(dataset)(engine)
    assert caplog.records[-1].levelno == logging.WARNING
    assert caplog.records[-1].getMessage().startswith(f"Skipped 1 of 1 item(s):\n  - {tmp_path / 'gone.nii.gz'}: ")
