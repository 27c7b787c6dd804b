"""Validation and test lists held out of the training list of a datalist that lacks them (Decathlon layout)."""

from __future__ import annotations

import json
import logging

import pytest

from medkd.data.held_out import SplitOptions, bundle_datalists, lists_to_hold_out, make_split
from medkd.data.loading import DataError, load_datalist
from medkd.errors import ConfigError


def decathlon(root, n=20, per_patient=1, classes=None, **lists):
    """A Decathlon ``dataset.json`` in ``root``: ``n`` training cases (``per_patient`` images per patient; an integer
    label ``i % classes`` for classification) and an unlabelled test list; ``lists`` replace or add lists."""
    root.mkdir(parents=True, exist_ok=True)
    training = [
        {
            "image": f"imagesTr/patient{i // per_patient:03d}_{i % per_patient}.nii.gz",
            "label": i % classes if classes else f"labelsTr/patient{i // per_patient:03d}_{i % per_patient}.nii.gz",
        }
        for i in range(n)
    ]
    data = {"name": "Prostate", "labels": {"0": "background", "1": "PZ"}, "modality": {"0": "T2"}, "training": training}
    data["test"] = ["imagesTs/patient900.nii.gz"]
    data.update(lists)
    (root / "dataset.json").write_text(json.dumps(data))
    return root / "dataset.json"


def images(entries):
    return [e["image"] for e in entries]


def test_the_lists_a_datalist_lacks(tmp_path):
    assert lists_to_hold_out(decathlon(tmp_path / "a")) == ["validation", "test"]  # test unlabelled
    labelled = [{"image": "x.nii.gz", "label": "y.nii.gz"}]
    assert lists_to_hold_out(decathlon(tmp_path / "b", validation=labelled)) == ["test"]
    assert lists_to_hold_out(decathlon(tmp_path / "c", validation=labelled, test=labelled)) == []
    assert lists_to_hold_out(decathlon(tmp_path / "d", validation=[], test=labelled)) == ["validation"]
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "list.csv").write_text("image,label\n")
    (tmp_path / "empty.json").write_text(json.dumps({"labels": {"0": "background"}, "training": []}))
    for other in ("broken.json", "list.csv", "missing.json", "empty.json"):
        assert lists_to_hold_out(tmp_path / other) == []  # the bundles' own loading reports these


def test_split_holds_out_whole_disjoint_lists_reproducibly(tmp_path):
    source = decathlon(tmp_path / "data")
    first = make_split(source, tmp_path / "data" / "s1.json")
    again = make_split(source, tmp_path / "data" / "s2.json")
    lists = {key: load_datalist(first, key=key) for key in ("training", "validation", "test")}
    assert [len(v) for v in lists.values()] == [12, 4, 4]
    assert sorted(sum((images(v) for v in lists.values()), [])) == sorted(images(load_datalist(source)))
    for key, entries in lists.items():
        assert images(load_datalist(again, key=key)) == images(entries)  # same seed, same split
    other_seed = make_split(source, tmp_path / "data" / "s3.json", options=SplitOptions(seed=1))
    assert images(load_datalist(other_seed, key="test")) != images(lists["test"])
    written = json.loads(first.read_text())
    assert written["labels"] == {"0": "background", "1": "PZ"} and written["modality"] == {"0": "T2"}
    assert written["name"] == "Prostate" and written["test"][0]["image"].startswith("imagesTr/")  # relative, beside
    assert written["medkd_split"]["held_out"] == ["validation", "test"]
    assert written["medkd_split"]["counts"] == {"training": 12, "validation": 4, "test": 4}
    elsewhere = json.loads(make_split(source, tmp_path / "elsewhere" / "split.json").read_text())
    assert elsewhere["training"][0]["image"] == str(tmp_path / "data" / written["training"][0]["image"])


def test_split_keeps_groups_and_given_lists_and_stratifies_classes(tmp_path):
    source = decathlon(tmp_path / "g", n=24, per_patient=3)
    split = make_split(source, tmp_path / "g" / "split.json", options=SplitOptions(group_by=r"patient(\d+)"))
    patients = {
        key: {path.split("patient")[1][:3] for path in images(load_datalist(split, key=key))}
        for key in ("training", "validation", "test")
    }
    assert not (patients["training"] & patients["validation"]) and not (patients["training"] & patients["test"])
    assert not (patients["validation"] & patients["test"]) and len(patients["test"]) >= 1
    given = [{"image": "imagesVal/v.nii.gz", "label": "labelsVal/v.nii.gz"}]
    split = make_split(decathlon(tmp_path / "v", validation=given), tmp_path / "v" / "split.json")
    assert images(load_datalist(split, key="validation")) == [str(tmp_path / "v" / "imagesVal/v.nii.gz")]
    assert len(load_datalist(split, key="test")) == 4 and len(load_datalist(split)) == 16  # only the test held out
    split = make_split(decathlon(tmp_path / "c", n=30, classes=3), tmp_path / "c" / "split.json", task="classification")
    for key in ("validation", "test"):
        assert sorted(e["label"] for e in load_datalist(split, key=key)) == [0, 0, 1, 1, 2, 2]  # 20% of each class


def test_split_mistakes_are_named(tmp_path):
    source = decathlon(tmp_path / "data", n=2)
    with pytest.raises(DataError, match=r"has 2 training case\(s\) \(groups\), too few to hold out validation and"):
        make_split(source, tmp_path / "split.json")
    source = decathlon(tmp_path / "more")
    with pytest.raises(ConfigError, match="val_fraction 0.6 and test_fraction 0.5 must"):
        bundle_datalists(source, tmp_path / "split.json", val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ConfigError, match="split_options has no val_frac; its keys are val_fraction, test_fraction"):
        bundle_datalists(source, tmp_path / "split.json", val_frac=0.1)
    with pytest.raises(DataError, match="group_by 'site_' matches nothing in the image path 'imagesTr/patient000_0"):
        make_split(source, tmp_path / "split.json", options=SplitOptions(group_by="site_"))
    with pytest.raises(DataError, match=r"split_options group_by '\(' is not a valid regular expression"):
        make_split(source, tmp_path / "split.json", options=SplitOptions(group_by="("))
    from medkd.data.splits import group_regex  # the one compiler of prepare's --group-by too

    with pytest.raises(DataError, match=r"^--group-by '\(' is not a valid regular expression"):
        group_regex("(")
    assert not (tmp_path / "split.json").exists()


def test_bundle_datalists_split_once_and_keep_the_file(tmp_path, caplog):
    labelled = [{"image": "a.nii.gz", "label": "b.nii.gz"}]
    complete = decathlon(tmp_path / "full", validation=labelled, test=labelled)
    as_is = dict.fromkeys(("training", "validation", "test"), str(complete))
    assert bundle_datalists(complete, tmp_path / "full" / "split.json") == as_is
    assert not (tmp_path / "full" / "split.json").exists()
    source, split = decathlon(tmp_path / "data"), tmp_path / "data" / "medkd_splits.json"
    assert bundle_datalists(source, split) == dict.fromkeys(("training", "validation", "test"), str(split))
    data = json.loads(split.read_text())
    data["test"] = data["test"][:1]  # edited by hand: used as it is
    split.write_text(json.dumps(data))

    def warnings():
        return [r for r in caplog.records if r.levelno >= logging.WARNING]

    with caplog.at_level(logging.WARNING):
        bundle_datalists(source, split)
        assert len(load_datalist(split, key="test")) == 1 and not warnings()
        fixed = json.loads(source.read_text())
        fixed["labels"]["1"] = "peripheral zone"  # a field but the lists: copied again, no warning
        source.write_text(json.dumps(fixed))
        bundle_datalists(source, split)
        assert json.loads(split.read_text())["labels"]["1"] == "peripheral zone" and not warnings()
        fixed["training"] = fixed["training"][1:]
        source.write_text(json.dumps(fixed))
        bundle_datalists(source, split, seed=1)
    assert len(load_datalist(split, key="test")) == 1
    assert f"the split file {split} was made before these changed: the lists of {source}, seed 0 → 1;" in caplog.text


def nnunet_raw(root, cases=("a", "b", "c", "d", "e"), channels=2, drop=None):
    """An nnU-Net v2 raw dataset (no case list in dataset.json); ``drop`` leaves out one image file."""
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for case in cases:
        (root / "labelsTr" / f"{case}.nii.gz").write_bytes(b"")
        for c in range(channels):
            (root / "imagesTr" / f"{case}_{c:04d}.nii.gz").write_bytes(b"")
    if drop:
        (root / "imagesTr" / drop).unlink()
    data = {
        "channel_names": {str(c): f"MR{c}" for c in range(channels)},
        "labels": {"background": 0, "prostate": 1},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(data))
    return root / "dataset.json"


def test_an_nnunet_raw_dataset_gets_its_cases_from_its_folders(tmp_path):
    from medkd.data.held_out import nnunet_training

    source = nnunet_raw(tmp_path / "Dataset001")
    assert lists_to_hold_out(source) == ["validation", "test"]
    cases = nnunet_training(source.parent, json.loads(source.read_text()))
    root = source.parent
    assert cases[0] == {
        "image": [str(root / "imagesTr" / "a_0000.nii.gz"), str(root / "imagesTr" / "a_0001.nii.gz")],
        "label": str(root / "labelsTr" / "a.nii.gz"),
    }
    split = bundle_datalists(source, root / "medkd_splits.json")["training"]
    written = json.loads((root / "medkd_splits.json").read_text())
    assert sum(len(written[key]) for key in ("training", "validation", "test")) == 5
    assert written["training"][0]["image"][1].startswith("imagesTr/")
    assert written["labels"] == {"background": 0, "prostate": 1}
    assert all(isinstance(e["image"], list) for e in load_datalist(split))  # two channels: a list of files
    one_channel = {"file_ending": ".nii.gz", "channel_names": {"0": "CT"}}
    single = nnunet_training(nnunet_raw(tmp_path / "one", channels=1).parent, one_channel)
    assert single[0]["image"] == str(tmp_path / "one" / "imagesTr" / "a_0000.nii.gz")
    broken = nnunet_raw(tmp_path / "broken", drop="c_0001.nii.gz")
    with pytest.raises(DataError, match=r"case 'c' has no image .*c_0001.nii.gz"):
        nnunet_training(broken.parent, json.loads(broken.read_text()))
    with pytest.raises(DataError, match="has no label map labelsTr/\\*.nii.gz"):
        nnunet_training(nnunet_raw(tmp_path / "empty", cases=()).parent, one_channel)


def test_a_csv_datalist_without_split_column_gets_its_lists_held_out(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    rows = "".join(f"images/case{i:02d}.png,{i % 2},site{i % 3}\n" for i in range(20))
    (root / "all.csv").write_text("image,label,site\n" + rows)
    assert lists_to_hold_out(root / "all.csv") == ["validation", "test"]
    split = root / "medkd_splits.json"
    assert bundle_datalists(root / "all.csv", split, task="classification") == dict.fromkeys(
        ("training", "validation", "test"), str(split)
    )
    lists = {key: load_datalist(split, key=key) for key in ("training", "validation", "test")}
    assert [len(v) for v in lists.values()] == [12, 4, 4]
    assert sorted(sum((images(v) for v in lists.values()), [])) == sorted(images(load_datalist(root / "all.csv")))
    assert [sorted(e["label"] for e in lists[key]) for key in ("validation", "test")] == [[0, 0, 1, 1]] * 2
    written = json.loads(split.read_text())
    assert written["test"][0]["image"].startswith("images/case") and "site" in written["test"][0]  # relative, kept
    assert set(written) == {"training", "validation", "test", "medkd_split"}
    (root / "given.csv").write_text("image,label,site,split\n" + rows.replace("\n", ",train\n") + "t.png,0,A,test\n")
    assert lists_to_hold_out(root / "given.csv") == ["validation"]
    make_split(root / "given.csv", root / "given.json", task="classification")
    assert images(load_datalist(root / "given.json", key="test")) == [str(root / "t.png")]  # kept as given
    (root / "full.csv").write_text((root / "given.csv").read_text() + "v.png,1,A,val\n")
    assert lists_to_hold_out(root / "full.csv") == []
    (root / "unlabelled.csv").write_text("image\na.png\nb.png\n")
    assert lists_to_hold_out(root / "unlabelled.csv") == []  # nothing to train on: the bundles' checks say so
    # class names as labels: the split file keeps them, with the labels map that numbers them
    (root / "named.csv").write_text("image,label,site\n" + rows.replace(",0,", ",normal,").replace(",1,", ",effusion,"))
    make_split(root / "named.csv", root / "named.json", task="classification")
    named = json.loads((root / "named.json").read_text())
    assert named["labels"] == {"0": "effusion", "1": "normal"} and named["test"][0]["label"] in ("normal", "effusion")
    by_name = {e["image"]: e["label"] for e in load_datalist(root / "named.csv")}
    assert all(by_name[e["image"]] == e["label"] for e in load_datalist(root / "named.json", key="test"))
    assert load_datalist(root / "named.json", key="test", class_names=["normal", "effusion"])[0]["label"] == (
        1 - load_datalist(root / "named.json", key="test")[0]["label"]
    )  # the bundle's class names, in another order, number them alike in every list


def test_cases_of_one_patient_stay_in_one_list_by_an_entry_field(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    rows = "".join(f"images/{i:02d}.png,{i % 2},P{i // 3}\n" for i in range(30))  # three images per patient
    (root / "all.csv").write_text("image,label,patient\n" + rows)
    split = make_split(root / "all.csv", root / "split.json", options=SplitOptions(group_field="patient"))
    patients = {
        key: {e["patient"] for e in load_datalist(split, key=key)} for key in ("training", "validation", "test")
    }
    assert sum(map(len, patients.values())) == 10 and all(patients.values())  # each patient in exactly one list
    assert json.loads(split.read_text())["medkd_split"]["group_field"] == "patient"
    with pytest.raises(DataError, match=r"group_field 'site': the training entry of 'images/00.png' in .* has no"):
        make_split(root / "all.csv", root / "s2.json", options=SplitOptions(group_field="site"))
    with pytest.raises(ConfigError, match="group_by .* or group_field .*, not both"):
        SplitOptions(group_by="P(\\d+)", group_field="patient")


def test_splitting_needs_nothing_above_the_data_layer(tmp_path):
    """Making and refreshing a split file imports neither planning nor prepare (issue 28: data lies below them)."""
    import subprocess
    import sys

    source = decathlon(tmp_path / "data")
    code = (
        "import sys; from medkd.data.held_out import bundle_datalists; "
        f"bundle_datalists({str(source)!r}, {str(tmp_path / 'split.json')!r}); "
        f"bundle_datalists({str(source)!r}, {str(tmp_path / 'split.json')!r}); "
        "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('medkd.') and m.count('.') > 1}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "planning" not in out and "prepare" not in out, out
    assert json.loads((tmp_path / "split.json").read_text())["medkd_split"]["counts"] == {
        "training": 12,
        "validation": 4,
        "test": 4,
    }
