"""Tests for medkd.data.loading: datalists and loading NIfTI, DICOM (real pydicom test files) and PNG through MONAI."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from pydicom.data import get_testdata_file

from medkd.data.datalists import csv_lists, load_datalist
from medkd.data.dicom import DicomReader
from medkd.data.formats import FORMATS, SUPPORTED, ImageFormat, is_image_file, reader_for, reader_kind
from medkd.data.loading import LoadMedicalImage, LoadMedicalImaged, find_images, image_loader
from medkd.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def dicom_file(name: str) -> str:
    """A DICOM file bundled with pydicom (never downloaded)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom version")
    return str(path)


def write_nifti(path: Path, array: np.ndarray, spacing=(1.0, 1.0), origin=(0.0, 0.0)) -> str:
    affine = np.eye(4)
    affine[[0, 1], [0, 1]] = spacing
    affine[:2, 3] = origin
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


# ------------------------------------------------------------------------------------------------- datalists


def test_json_datalist_resolves_paths(tmp_path):
    (tmp_path / "datalist.json").write_text(
        json.dumps(
            {
                "training": [{"image": "img/a.nii.gz", "label": "lbl/a.nii.gz", "fold": 0}],
                "test": ["img/b.nii.gz"],
            }
        )
    )
    items = load_datalist(tmp_path / "datalist.json")
    assert items == [{"image": str(tmp_path / "img/a.nii.gz"), "label": str(tmp_path / "lbl/a.nii.gz"), "fold": 0}]
    assert load_datalist(tmp_path / "datalist.json", key="test", base_dir="/data") == [{"image": "/data/img/b.nii.gz"}]


def test_csv_datalist_segmentation_and_classification(tmp_path):
    (tmp_path / "seg.csv").write_text("image,label\nimg/a.nii.gz,lbl/a.nii.gz\n/abs/b.nii.gz,lbl/b.nii.gz\n")
    assert load_datalist(tmp_path / "seg.csv") == [
        {"image": str(tmp_path / "img/a.nii.gz"), "label": str(tmp_path / "lbl/a.nii.gz")},
        {"image": "/abs/b.nii.gz", "label": str(tmp_path / "lbl/b.nii.gz")},
    ]
    (tmp_path / "cls.csv").write_text("image,label,site\na.png,1,A\nb.png, 0 ,B\n")
    items = load_datalist(tmp_path / "cls.csv", base_dir="/data")
    assert items == [
        {"image": "/data/a.png", "label": 1, "site": "A"},
        {"image": "/data/b.png", "label": 0, "site": "B"},
    ]


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("bad.json", '{"training": [', "not valid JSON"),
        ("nokey.json", '{"validation": []}', "has no 'training' list (lists found: ['validation'])"),
        ("root.json", "[1, 2]", "must be a JSON object"),
        ("noimage.json", '{"training": [{"label": "a.nii"}]}', "entry 0 of 'training' has no 'image' field"),
        ("cols.csv", "img,label\na.nii,b.nii\n", "has no 'image' column (columns found: ['img', 'label'])"),
        ("cells.csv", "image,label\na.png,1,x\n", "line 2: 3 cells, but the header names 2 columns (image, label)"),
        (
            "cells.csv",
            "image,label\na.nii,1\nb.nii,\n",
            "the 'label' cell is empty on line(s) 3 of the 'training' list",
        ),
    ],
)
def test_malformed_datalist_messages(tmp_path, name, content, expected):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as err:
        load_datalist(tmp_path / name)
    assert str(tmp_path / name) in str(err.value) and expected in str(err.value)


def test_csv_list_whose_label_cells_are_all_empty_is_unlabelled(tmp_path):
    (tmp_path / "lists.csv").write_text("image,label,split\na.png,1,train\nb.png,,test\nc.png,,test\n")
    assert load_datalist(tmp_path / "lists.csv", "test") == [{"image": str(tmp_path / n)} for n in ("b.png", "c.png")]
    assert load_datalist(tmp_path / "lists.csv") == [{"image": str(tmp_path / "a.png"), "label": 1}]


def test_csv_with_excel_byte_order_mark(tmp_path):
    (tmp_path / "excel.csv").write_bytes("image,label\r\na.png,1\r\n".encode("utf-8-sig"))
    assert load_datalist(tmp_path / "excel.csv") == [{"image": str(tmp_path / "a.png"), "label": 1}]


def test_csv_class_names_as_labels_are_numbered_in_sorted_order_or_by_the_given_names(tmp_path):
    from medkd.data.labels import datalist_class_names

    path = tmp_path / "cls.csv"
    (tmp_path / "malignant").mkdir()  # a folder named like a class is not a label map
    path.write_text("image,label,split\na.png,malignant,train\nb.png,benign,train\nc.png,benign,test\n")
    assert datalist_class_names(path, task="classification") == ["benign", "malignant"]
    assert [e["label"] for e in load_datalist(path)] == [1, 0] and load_datalist(path, "test")[0]["label"] == 0
    assert [e["label"] for e in load_datalist(path, class_names=["malignant", "benign"])] == [0, 1]
    with pytest.raises(DataError, match=r"label 'benign' \(line 3\) is not one of the class names \['malignant'\]"):
        load_datalist(path, class_names=["malignant"])
    path.write_text("image,label\na.png,cat\nb.png,0\nc.png,dog\nd.png,1.0\n")
    with pytest.raises(DataError) as err:
        load_datalist(path)
    assert str(err.value).startswith(
        f"Datalist '{path}': labels '0' (line 3), '1.0' (line 5) are not one of the class names ['cat', 'dog']. Write "
        "each label as one of them (or every label as a class index 0..N-1)"
    )
    path.write_text("image,label\n" + "".join(f"{i}.png,{i % 2}\n" for i in range(7)) + "7.png,malignant\n")
    with pytest.raises(DataError) as err:  # the one class name is the odd cell out, not the seven indices
        load_datalist(path)
    assert str(err.value) == (
        f"Datalist '{path}': label 'malignant' (line 9) is a class name but the other 7 labels of the 'training' list "
        "are class indices. Write it as a class index too (0..N-1), or every label as a class name."
    )
    path.write_text("image,label\na.png,0\nd.png,1.0\n")
    with pytest.raises(DataError, match=r"label '1.0' \(line 3\) is neither an integer class index, a class name"):
        load_datalist(path)
    with pytest.raises(DataError, match="is a CSV file, which has no 'labels' map and whose labels are class indices"):
        datalist_class_names(path, task="classification")
    path.write_text("image,label\na.png,benign\nb.png,Benign\nc.png,malignant\n")
    with pytest.raises(DataError, match=r"the class names \['Benign', 'benign'\] differ only in case"):
        load_datalist(path)
    # a JSON datalist's labels may name classes of its labels map
    labels = {"labels": {"0": "benign", "1": "malignant"}, "training": [{"image": "a.png", "label": "malignant"}]}
    (tmp_path / "named.json").write_text(json.dumps(labels))
    assert load_datalist(tmp_path / "named.json") == [{"image": str(tmp_path / "a.png"), "label": 1}]
    # label maps given by name only (no folder, no suffix) are paths when the file exists
    (tmp_path / "seg_a").write_bytes(b"")
    (tmp_path / "seg.csv").write_text("image,label\na.nii.gz,seg_a\nb.nii.gz,labels/b.nii.gz\n")
    assert [it["label"] for it in load_datalist(tmp_path / "seg.csv")] == [
        str(tmp_path / "seg_a"),
        str(tmp_path / "labels/b.nii.gz"),
    ]


def test_missing_datalist(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_datalist(tmp_path / "nope.json")


# ----------------------------------------------------------------------------------------------------- DICOM


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm"]
)
def test_single_dicom_files(name):
    path = dicom_file(name)
    ds = pydicom.dcmread(path)
    img = LoadMedicalImage()(path)
    assert tuple(img.shape) == (ds.Columns, ds.Rows)  # MONAI convention: first axis runs along a row
    np.testing.assert_allclose(img.pixdim, [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])], rtol=1e-6)
    # identity ImageOrientationPatient in LPS -> x and y flipped in MONAI's RAS affine; origin from the header
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    np.testing.assert_allclose(img.affine[:3, 3], [-x, -y, z], rtol=1e-6)
    assert img.affine[0, 0] < 0 and img.affine[1, 1] < 0
    expected = ds.pixel_array.T * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    np.testing.assert_allclose(img.numpy(), expected)
    assert img.meta["filename_or_obj"] == path


def test_big_endian_and_implicit_vr_match_explicit_little_endian():
    reference = LoadMedicalImage()(dicom_file("MR_small.dcm"))
    for name in ("MR_small_bigendian.dcm", "MR_small_implicit.dcm"):
        img = LoadMedicalImage()(dicom_file(name))
        np.testing.assert_array_equal(img.numpy(), reference.numpy())
        np.testing.assert_allclose(img.affine, reference.affine)


def test_dicom_without_preamble_or_extension(tmp_path):
    raw = Path(dicom_file("CT_small.dcm")).read_bytes()
    assert raw[128:132] == b"DICM"
    (tmp_path / "no_preamble.dcm").write_bytes(raw[132:])  # starts directly with the file meta group
    (tmp_path / "IM0001").write_bytes(raw)  # no extension, as exported by many scanners
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.preamble = None
    ds.save_as(tmp_path / "IM0002", implicit_vr=True, little_endian=True, enforce_file_format=False)  # no meta
    reference = LoadMedicalImage()(dicom_file("CT_small.dcm"))
    for name in ("no_preamble.dcm", "IM0001", "IM0002"):
        assert reader_kind(tmp_path / name) == "dicom"
        img = LoadMedicalImage()(tmp_path / name)
        np.testing.assert_array_equal(img.numpy(), reference.numpy())
        np.testing.assert_allclose(img.affine, reference.affine)


def test_monochrome1_is_turned_into_the_sense_of_other_images(tmp_path):
    """A radiograph stored with its lowest value white reads as the same image stored the usual way, inverted."""
    reference = LoadMedicalImage()(dicom_file("MR_small.dcm")).numpy()  # signed 16 bits, no rescale
    unsigned_12 = {"PixelRepresentation": 0, "BitsStored": 12, "RescaleSlope": 0.5, "RescaleIntercept": 10}
    for name, total, change in (
        ("MR_small.dcm", -1, {}),  # lo + hi = -32768 + 32767
        ("CT_small.dcm", -1 - 2 * 1024, {}),  # the same, rescale intercept -1024
        ("MR_small.dcm", 10 + (4095 * 0.5 + 10), unsigned_12),  # 0..4095, slope 0.5, intercept 10
    ):
        ds = pydicom.dcmread(dicom_file(name))
        for key, value in change.items():
            setattr(ds, key, value)
        ds.save_as(tmp_path / "mono2.dcm")
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(tmp_path / "mono1.dcm")
        usual, inverted = (LoadMedicalImage()(tmp_path / f).numpy() for f in ("mono2.dcm", "mono1.dcm"))
        np.testing.assert_allclose(usual + inverted, np.full(usual.shape, total), rtol=1e-6)
        assert inverted.dtype == usual.dtype and not np.array_equal(usual, inverted)
    np.testing.assert_allclose(usual, reference * 0.5 + 10)


def test_multiframe_rtdose_frames_last_with_grid_spacing():
    path = dicom_file("rtdose.dcm")
    ds = pydicom.dcmread(path)
    img = LoadMedicalImage()(path)
    frames = int(ds.NumberOfFrames)
    assert tuple(img.shape) == (ds.Columns, ds.Rows, frames)
    step = float(ds.GridFrameOffsetVector[1]) - float(ds.GridFrameOffsetVector[0])
    np.testing.assert_allclose(img.pixdim, [*map(float, ds.PixelSpacing[::-1]), step])
    for k in (0, frames - 1):
        np.testing.assert_array_equal(img[..., k].numpy(), ds.pixel_array[k].T)


def test_enhanced_multiframe_geometry_from_functional_groups(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    frames = np.stack([ds.pixel_array + k for k in range(3)]).astype(ds.pixel_array.dtype)
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness"):
        delattr(ds, tag)
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = [0.5, 0.6]
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in range(3):
        item = Dataset()
        item.PlanePositionSequence = Sequence([Dataset()])
        item.PlanePositionSequence[0].ImagePositionPatient = [10.0, 20.0, 30.0 + 2.0 * k]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.save_as(tmp_path / "enhanced.dcm")
    img = LoadMedicalImage()(tmp_path / "enhanced.dcm")
    assert tuple(img.shape) == (64, 64, 3)
    np.testing.assert_allclose(img.pixdim, [0.6, 0.5, 2.0])
    np.testing.assert_allclose(img.affine[:3, 3], [-10.0, -20.0, 30.0])
    np.testing.assert_array_equal(img[..., 2].numpy(), frames[2].T)


def write_series(
    folder: Path, n: int = 5, series_uid: str = "1.2.826.0.1.3680043.2.1125.1", seed: int = 0, direction=None
) -> sitk.Image:
    """Write a series with SimpleITK: slice k holds value 10*k; file names and InstanceNumbers are shuffled.

    Returns the volume, whose geometry (LPS) is what the files describe."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = sitk.GetImageFromArray(np.stack([np.full((4, 6), 10 * k, np.int16) for k in range(n)]))
    volume.SetSpacing((0.7, 0.8, 2.5))
    volume.SetOrigin((10.0, 20.0, -30.0))
    if direction is not None:
        volume.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    cosines = np.asarray(volume.GetDirection()).reshape(3, 3)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    names = list(range(n))
    random.Random(seed).shuffle(names)
    instance_numbers = list(reversed(range(1, n + 1)))  # deliberately disagrees with the position order
    for k in range(n):
        image = volume[:, :, k]
        tags = {
            "0008|0060": "MR",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.0",
            "0020|000e": series_uid,
            "0020|0013": str(instance_numbers[k]),
            "0020|0032": "\\".join(f"{v:g}" for v in volume.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": "\\".join(f"{v:.6f}" for v in [*cosines[:, 0], *cosines[:, 1]]),
            "0018|0050": "2.5",
        }
        for key, value in tags.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice_{names[k]:03d}.dcm"))
        writer.Execute(image)
    return volume


def test_dicom_series_folder_sorted_by_position(tmp_path):
    write_series(tmp_path / "series")
    (tmp_path / "series" / "README.txt").write_text("not a DICOM file")
    img = LoadMedicalImage()(tmp_path / "series")
    assert tuple(img.shape) == (6, 4, 5)
    np.testing.assert_allclose(img.pixdim, [0.7, 0.8, 2.5], rtol=1e-5)
    assert img[0, 0, :].tolist() == [0, 10, 20, 30, 40]  # slice order follows ImagePositionPatient
    np.testing.assert_allclose(img.affine[:3, 3], [-10.0, -20.0, -30.0])
    np.testing.assert_allclose(np.diag(img.affine)[:3], [-0.7, -0.8, 2.5], rtol=1e-5)


def test_oblique_dicom_series_matches_nifti_written_by_simpleitk(tmp_path):
    """A DICOM series and a NIfTI file of the same grid (converted by SimpleITK) get the same affine."""
    angle = np.deg2rad(30)
    rotation = [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
    volume = write_series(tmp_path / "series", direction=rotation)
    sitk.WriteImage(volume, str(tmp_path / "volume.nii.gz"))
    dicom = LoadMedicalImage()(tmp_path / "series")
    nifti = LoadMedicalImage()(tmp_path / "volume.nii.gz")
    assert dicom.shape == nifti.shape
    np.testing.assert_allclose(dicom.affine, nifti.affine, atol=1e-4)
    np.testing.assert_array_equal(dicom.numpy(), nifti.numpy())


def test_dicom_series_folder_errors(tmp_path):
    write_series(tmp_path / "mixed", n=3)
    write_series(tmp_path / "other", n=3, series_uid="1.2.826.0.1.3680043.2.1125.2")
    for f in (tmp_path / "other").iterdir():
        f.rename(tmp_path / "mixed" / f"b_{f.name}")
    with pytest.raises(DataError, match=r"mixes 2 series") as err:
        LoadMedicalImage()(tmp_path / "mixed")
    assert str(tmp_path / "mixed") in str(err.value)

    write_series(tmp_path / "dup", n=3)
    write_series(tmp_path / "dup2", n=3, seed=1)
    for f in (tmp_path / "dup2").iterdir():
        f.rename(tmp_path / "dup" / f"b_{f.name}")
    with pytest.raises(DataError, match="several slices at the same position"):
        LoadMedicalImage()(tmp_path / "dup")

    write_series(tmp_path / "gap", n=6)  # a slice lost: on one regular grid a mask would be misplaced
    (lost,) = [f for f in (tmp_path / "gap").iterdir() if float(pydicom.dcmread(f).ImagePositionPatient[2]) == -25.0]
    lost.unlink()
    with pytest.raises(DataError, match=r"has a gap: .* are 5 mm apart, the other slices 2.5 mm \(a missing slice\?\)"):
        LoadMedicalImage()(tmp_path / "gap")

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="contains no DICOM image slices"):
        LoadMedicalImage()(tmp_path / "empty")


# ------------------------------------------------------------------------------------------ NIfTI / PNG / dict


def test_nifti_and_png_through_dict_loader(tmp_path):
    from PIL import Image

    array = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    image = write_nifti(tmp_path / "img.nii.gz", array, spacing=(1.5, 2.0))
    pixels = np.arange(8 * 6, dtype=np.uint8).reshape(6, 8)  # 6 rows, 8 columns
    Image.fromarray(pixels).save(tmp_path / "mask.png")
    out = image_loader(["image", "label"])({"image": image, "label": str(tmp_path / "mask.png"), "id": 3})
    assert tuple(out["image"].shape) == (1, 6, 5, 4) and out["id"] == 3
    np.testing.assert_allclose(out["image"].pixdim, [1.5, 2.0, 1.0])
    np.testing.assert_array_equal(out["image"][0].numpy(), array)
    assert tuple(out["label"].shape) == (1, 8, 6)
    np.testing.assert_array_equal(out["label"][0].numpy(), pixels.T)

    meta = LoadMedicalImaged("image", image_only=False)({"image": image})
    assert meta["image_meta_dict"]["filename_or_obj"] == image and tuple(meta["image"].shape) == (6, 5, 4)


def test_reader_selection(tmp_path):
    assert type(reader_for(dicom_file("CT_small.dcm"))) is DicomReader
    (tmp_path / "a.nii").write_bytes(b"")
    (tmp_path / "b.JPG").write_bytes(b"")
    assert [reader_kind(tmp_path / n) for n in ("a.nii", "b.JPG")] == ["nifti", "pil"]
    assert reader_kind(tmp_path) == "dicom"


def test_formats_table_drives_every_choice_of_reader(tmp_path):
    """Each row of the formats table: its suffixes pick its reader, its description is in the messages."""
    for row in FORMATS.values():
        for suffix in row.suffixes:
            assert reader_kind(tmp_path / f"x{suffix.upper()}", check_exists=False) == row.kind
            assert is_image_file(tmp_path / f"x{suffix}")
        assert row.described in SUPPORTED
    (tmp_path / "x.mha").write_bytes(b"ObjectType = Image")
    with pytest.raises(DataError, match=r"unsupported format\. Supported: NIfTI .*NumPy"):
        reader_kind(tmp_path / "x.mha")
    assert reader_kind(tmp_path / "not_there_yet", check_exists=False) == "dicom"  # the row that sniffs


def test_a_new_format_is_one_row_of_the_table(tmp_path, monkeypatch):
    from monai.data import PILReader
    from PIL import Image

    Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4)).save(tmp_path / "a.tif")
    assert not is_image_file(tmp_path / "a.tif")
    monkeypatch.setitem(FORMATS, "tiff", ImageFormat("tiff", "TIFF (.tif, .tiff)", (".tif", ".tiff"), PILReader))
    assert reader_kind(tmp_path / "a.tif") == "tiff" and find_images(tmp_path) == [str(tmp_path / "a.tif")]
    np.testing.assert_array_equal(LoadMedicalImage()(tmp_path / "a.tif").numpy(), np.arange(12).reshape(3, 4).T)


def test_bundle_config_can_build_loaders(tmp_path):
    from monai.bundle import ConfigParser

    image = write_nifti(tmp_path / "img.nii.gz", np.zeros((4, 4), np.float32))
    parser = ConfigParser(
        {
            "imports": [
                "$import medkd",
                "$import medkd.data.loading",
            ],  # the 2nd makes `medkd.data.loading` an attribute
            "expr": "$medkd.data.loading.image_loader(['image'])",
            "target": {
                "_target_": "medkd.data.loading.LoadMedicalImaged",
                "keys": ["image"],
                "ensure_channel_first": True,
            },
        }
    )
    for key in ("expr", "target"):
        assert tuple(parser.get_parsed_content(key)({"image": image})["image"].shape) == (1, 4, 4)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("missing.nii.gz", None, "not found"),
        ("empty.nii.gz", b"", "is empty (0 bytes)"),
        ("notes.txt", b"hello", "unsupported format"),
        ("truncated.nii.gz", "truncate", "cannot be read as NIFTI"),
        ("bad.png", b"\x89PNG\r\n\x1a\n garbage", "cannot be read as PIL"),
    ],
)
def test_unreadable_images_name_the_file(tmp_path, name, content, expected):
    path = tmp_path / name
    if content == "truncate":
        full = Path(write_nifti(tmp_path / "full.nii.gz", np.random.rand(16, 16, 16).astype(np.float32)))
        path.write_bytes(full.read_bytes()[:-500])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as err:
        LoadMedicalImaged("image")({"image": str(path)})
    assert str(path) in str(err.value) and expected in str(err.value)


def test_truncated_dicom_is_a_data_error():
    path = dicom_file("MR_truncated.dcm")
    with pytest.raises(DataError, match="corrupt or truncated") as err:
        LoadMedicalImage()(path)
    assert path in str(err.value)


def test_list_of_files_is_one_multichannel_image(tmp_path):
    t1 = write_nifti(tmp_path / "t1.nii.gz", np.zeros((6, 5), np.float32))
    t2 = write_nifti(tmp_path / "t2.nii.gz", np.ones((6, 5), np.float32))
    image = image_loader("image")({"image": [t1, t2]})["image"]
    assert tuple(image.shape) == (2, 6, 5) and image[1].min() == 1
    with pytest.raises(DataError, match="different formats"):
        LoadMedicalImage()([t1, dicom_file("CT_small.dcm")])


# ------------------------------------------------------------------------------------- folders of images (inference)


def test_find_images_takes_every_supported_format(tmp_path):
    from PIL import Image

    write_nifti(tmp_path / "a.nii.gz", np.zeros((4, 4), np.float32))
    write_nifti(tmp_path / "b.nii", np.zeros((4, 4), np.float32))
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "c.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "d.jpg")
    (tmp_path / "e.dcm").write_bytes(Path(dicom_file("CT_small.dcm")).read_bytes())
    (tmp_path / "IM0001").write_bytes(Path(dicom_file("CT_small.dcm")).read_bytes())  # no extension
    write_series(tmp_path / "series")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("not an image")
    (tmp_path / "README.txt").write_text("not an image")
    (tmp_path / "volume.mha").write_bytes(b"ObjectType = Image")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    names = [Path(p).name for p in find_images(tmp_path)]
    assert names == ["IM0001", "a.nii.gz", "b.nii", "c.png", "d.jpg", "e.dcm", "series"]
    for path in find_images(tmp_path):  # and every one of them loads
        assert LoadMedicalImage()(path).ndim in (2, 3)
    assert [Path(p).name for p in find_images(tmp_path, "*.nii*")] == ["a.nii.gz", "b.nii"]


def test_find_images_errors_name_the_folder_and_what_it_holds(tmp_path):
    with pytest.raises(DataError) as err:
        find_images(tmp_path / "nope")
    assert str(err.value) == (
        f"Input folder '{tmp_path / 'nope'}' does not exist. Pass --input_dir the folder that holds the images to "
        "process."
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no image in a supported format \(NIfTI .*\): it is empty\."):
        find_images(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "scan.mha").write_bytes(b"ObjectType = Image")
    (tmp_path / "other" / "sub").mkdir()
    with pytest.raises(DataError) as err:
        find_images(tmp_path / "other", "*.nii*")
    assert str(err.value) == (
        f"Input folder '{tmp_path / 'other'}' holds no image matching input_pattern '*.nii*': it holds 1 file(s) and "
        "1 folder(s): scan.mha, sub/. Fix --input_pattern, or leave it out to take every image of a supported format."
    )
    with pytest.raises(DataError, match="is a file, not a folder"):
        find_images(tmp_path / "other" / "scan.mha")


def test_csv_split_column_names_each_rows_list(tmp_path):
    path = tmp_path / "all.csv"
    path.write_text("image,label,split\na.png,0,train\nb.png,1,Training\nc.png,0,val\nd.png,1,test\n")
    assert csv_lists(path) == ["training", "validation", "test"]
    assert load_datalist(path, key="training") == [
        {"image": str(tmp_path / "a.png"), "label": 0},
        {"image": str(tmp_path / "b.png"), "label": 1},
    ]  # the split column is not kept
    assert [e["image"] for e in load_datalist(path, key="validation")] == [str(tmp_path / "c.png")]
    assert [e["image"] for e in load_datalist(path, key="test")] == [str(tmp_path / "d.png")]
    (tmp_path / "two.csv").write_text("image,label,split\na.png,0,test\nb.png,1,training\n")
    assert csv_lists(tmp_path / "two.csv") == ["training", "test"]
    with pytest.raises(DataError, match=r"has no row whose split is 'validation' \(lists found: \['training', 'test'"):
        load_datalist(tmp_path / "two.csv", key="validation")
    (tmp_path / "bad.csv").write_text("image,label,split\na.png,0,train\nb.png,1,holdout\n")
    for read in (csv_lists, load_datalist):
        with pytest.raises(DataError, match=r"bad.csv', line 3: the 'split' cell 'holdout' names no list. Write"):
            read(tmp_path / "bad.csv")
    (tmp_path / "one.csv").write_text("image,label\na.png,0\n")
    assert csv_lists(tmp_path / "one.csv") == ["training"]  # one list, read whatever the key
    assert load_datalist(tmp_path / "one.csv", key="test") == load_datalist(tmp_path / "one.csv")


def test_cases_of_several_files_are_named_and_grouped_as_the_datalist_names_them():
    from medkd.data.cases import case_name, channel_suffixes, group_cases

    nnunet = ["/d/imagesTr/prostate_000_0000.nii.gz", "/d/imagesTr/prostate_000_0001.nii.gz"]
    assert case_name(nnunet) == "/d/imagesTr/prostate_000.nii.gz"
    assert case_name(["/d/BraTS_001_t1.nii.gz", "/d/BraTS_001_t1ce.nii.gz", "/d/BraTS_001_flair.nii.gz"]) == (
        "/d/BraTS_001.nii.gz"
    )
    assert case_name(["/d/case1/t1.nii.gz", "/d/case1/t2.nii.gz"]) == "/d/case1.nii.gz"  # a folder per case
    assert case_name(["/d/t1/a.nii.gz", "/d/t2/a.nii.gz"]) == "/d/t1/a.nii.gz"  # a folder per channel
    assert case_name("/d/a.png") == case_name(["/d/a.png"]) == "/d/a.png"
    entries = [{"image": [f"/d/imagesTr/p{i}_0000.nii.gz", f"/d/imagesTr/p{i}_0001.nii.gz"]} for i in range(3)]
    suffixes = channel_suffixes(entries)
    assert suffixes == ("_0000.nii.gz", "_0001.nii.gz")
    files = ["/n/a_0000.nii.gz", "/n/a_0001.nii.gz", "/n/b_0000.nii.gz", "/n/c_0001.nii.gz", "/n/x_10000.nii.gz"]
    assert group_cases(files, suffixes) == ([files[:2]], files[2:])
    per_channel_folder = [{"image": [f"/d/t1/{c}.nii.gz", f"/d/t2/{c}.nii.gz"]} for c in "ab"]
    assert channel_suffixes(per_channel_folder) is None  # named in different ways: no suffix groups them
    assert channel_suffixes([{"image": "/d/a.nii.gz"}]) is None
    one_channel = [{"image": f"/d/imagesTs/p{i}_0000.nii.gz"} for i in range(3)]  # nnU-Net, one channel
    assert channel_suffixes(one_channel) == ("_0000.nii.gz",)
    assert case_name("/d/imagesTs/p1_0000.nii.gz", ("_0000.nii.gz",)) == "/d/imagesTs/p1.nii.gz"
    assert case_name("/d/new/q.nii.gz", ("_0000.nii.gz",)) == "/d/new/q.nii.gz"  # no suffix to take off
    assert channel_suffixes([*one_channel, {"image": "/d/imagesTs/q.nii.gz"}]) is None  # not all: other names


def test_inputs_whose_outputs_would_share_a_name_are_named_apart(tmp_path, caplog):
    from medkd.data.cases import distinct_names
    from medkd.data.loading import inference_items

    assert distinct_names(["/n/scan.nii", "/n/scan.nii.gz", "/n/other.png", "/n/case1", "/n/case1.nii.gz"]) == [
        "/n/scan_nii.nii", "/n/scan_nii_gz.nii.gz", "/n/other.png", "/n/case1", "/n/case1_nii_gz.nii.gz"
    ]  # fmt: skip
    assert distinct_names(["/a/x.png", "/b/x.png", "/c/y.png"]) == ["/a/a_x_png.png", "/b/b_x_png.png", "/c/y.png"]
    for name in ("scan.nii", "scan.nii.gz"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / name)
    with caplog.at_level(logging.WARNING):
        cases = inference_items(tmp_path, None, tmp_path / "none.json")
    assert sorted(Path(item["case"]).name for item in cases) == ["scan_nii.nii", "scan_nii_gz.nii.gz"]
    assert f"{tmp_path / 'scan.nii'}: its output is named after {tmp_path / 'scan_nii.nii'}" in caplog.text
    kept = inference_items(tmp_path, None, tmp_path / "none.json", name_apart=False)  # one CSV of rows: no clash
    assert [item["case"] for item in kept] == [item["image"] for item in kept]


def test_inference_names_the_outputs_of_one_channel_nnunet_cases_without_the_channel_suffix(tmp_path):
    from medkd.data.loading import inference_items

    (tmp_path / "dataset.json").write_text(
        json.dumps({"test": [{"image": "p1_0000.nii.gz"}, {"image": "p2_0000.nii.gz"}]})
    )
    listed = inference_items(None, None, tmp_path / "dataset.json")
    assert [item["case"] for item in listed] == [str(tmp_path / "p1.nii.gz"), str(tmp_path / "p2.nii.gz")]
    new = tmp_path / "new"
    new.mkdir()
    for name in ("n1_0000.nii.gz", "n2.nii.gz"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), new / name)
    cases = inference_items(new, None, tmp_path / "dataset.json")
    assert [Path(item["case"]).name for item in cases] == ["n1.nii.gz", "n2.nii.gz"]


def test_pictures_get_the_networks_channels_and_volumes_keep_theirs(tmp_path, caplog):
    from monai.data import MetaTensor

    from medkd.data.channels import MatchChannelsd, match_channels

    rgb = torch.tensor([[[1.0]], [[2.0]], [[3.0]]])
    assert match_channels(rgb, 1).flatten().tolist() == pytest.approx([0.299 + 2 * 0.587 + 3 * 0.114])
    assert match_channels(torch.cat([rgb, torch.ones(1, 1, 1)]), 3).flatten().tolist() == [1.0, 2.0, 3.0]  # RGBA
    assert match_channels(torch.tensor([[[5.0]], [[1.0]]]), 3).flatten().tolist() == [5.0, 5.0, 5.0]  # grey + alpha
    assert match_channels(torch.tensor([[[5.0]], [[1.0]]]), 1).flatten().tolist() == [5.0]
    assert match_channels(rgb, 3) is rgb or torch.equal(match_channels(rgb, 3), rgb)
    transform = MatchChannelsd("image", channels=1)
    affine = torch.diag(torch.tensor([0.5, 0.5, 1.0, 1.0]))
    picture = MetaTensor(rgb.expand(3, 4, 4).clone(), affine=affine, meta={"filename_or_obj": "/d/a.JPG"})
    with caplog.at_level(logging.WARNING, logger="medkd.data.channels"):
        for _ in range(2):
            out = transform({"image": picture})["image"]
    assert out.shape == (1, 4, 4) and torch.equal(out.affine, affine) and out.meta["filename_or_obj"] == "/d/a.JPG"
    assert caplog.text.count("pictures of 3 channels are converted to the networks' 1 (in_channels)") == 1
    volume = MetaTensor(rgb.expand(3, 4, 4).clone(), meta={"filename_or_obj": "/d/a.nii.gz"})
    assert transform({"image": volume})["image"] is volume  # modalities: the checks name a mismatch


def test_inference_inputs_of_other_dimensions_are_named_and_a_folder_of_slices_is_one_series(tmp_path):
    from monai.transforms import Compose

    from medkd.data.loading import inference_items
    from medkd.data.skipping import SafeDataset, inference_loading

    write_series(tmp_path / "series")
    datalist = tmp_path / "none.json"  # no datalist beside the checkpoints
    slices = sorted(str(p) for p in (tmp_path / "series").iterdir())
    assert inference_items(tmp_path / "series", None, datalist, spatial_dims=3) == [
        {"image": str(tmp_path / "series"), "case": str(tmp_path / "series")}
    ]
    assert [e["image"] for e in inference_items(tmp_path / "series", None, datalist, spatial_dims=2)] == slices
    load = Compose(inference_loading([image_loader(["image"])], spatial_dims=3))
    dataset = SafeDataset([{"image": slices[0]}, {"image": str(tmp_path / "series")}], load, report_file=tmp_path / "s")
    assert dataset[0] is None and dataset[1]["image"].shape == (1, 6, 4, 5)
    (skipped,) = dataset.skipped
    assert skipped.reason == (
        f"'{slices[0]}' is 2D but the networks take 3D images; a DICOM series is read from its folder: put each "
        "series' slices in a sub-folder of --input_dir (a folder of slices given as --input_dir is read slice by "
        "slice)."
    )
    rgb = tmp_path / "rgb.nii.gz"  # a volume of 3 channels among 1-channel ones: skipped, not the end of the run
    nib.save(nib.Nifti1Image(np.zeros((6, 4, 5, 3), np.float32), np.eye(4)), rgb)
    load = Compose(inference_loading([image_loader(["image"])], spatial_dims=3, in_channels=1))
    dataset = SafeDataset([{"image": str(rgb)}, {"image": str(tmp_path / "series")}], load, report_file=tmp_path / "c")
    assert dataset[0] is None and dataset[1]["image"].shape == (1, 6, 4, 5)
    assert dataset.skipped[0].reason == f"'{rgb}' has 3 channel(s) but the networks take 1."


def test_a_colour_dicom_is_a_2d_picture_with_three_channels(tmp_path):
    from medkd.data.channels import MatchChannelsd, is_picture

    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    rgb = np.stack([np.full((ds.Rows, ds.Columns), v, np.uint8) for v in (10, 20, 30)], axis=-1)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rgb.tobytes()
    ds.save_as(tmp_path / "colour")  # an ultrasound or photograph, named without extension
    image = LoadMedicalImage(ensure_channel_first=True)(tmp_path / "colour")
    assert tuple(image.shape) == (3, ds.Columns, ds.Rows) and len(image.pixdim) == 2  # not a 3D volume of 3 slices
    assert image[:, 0, 0].tolist() == [10, 20, 30]
    assert is_picture(str(tmp_path / "colour")) and not is_picture(str(tmp_path / "colour"), spatial_dims=3)
    grey = MatchChannelsd("image", channels=1)({"image": image})["image"]
    assert grey.shape == (1, ds.Columns, ds.Rows) and float(grey[0, 0, 0]) == pytest.approx(
        0.299 * 10 + 0.587 * 20 + 0.114 * 30
    )
