"""Nothing replaced, nothing stale: inference run folders, evaluation and fresh starts set old results aside, a
teacher trained on other data and a test list holding training images stop the run (issue 26)."""

import json
import re
import shutil

import pytest
import torch
from bundle_utils import latest_run, native_spacing, run_stage

from medkd.data.held_out import bundle_datalists
from medkd.errors import ConfigError, user_error
from medkd.runtime.files import CheckpointError
from medkd.training.checkpoints import check_not_trained_on
from medkd.training.run_fingerprint import image_ids
from medkd.training.teachers import start_checkpoint

BUNDLE = "segmentation_2d"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A teacher and students trained for one epoch on 48x48 images (8 NIfTI images)."""
    root = tmp_path_factory.mktemp("trained")
    run_stage(BUNDLE, "train_teacher", root, **native_spacing(BUNDLE))
    run_stage(BUNDLE, "train", root, **native_spacing(BUNDLE))
    return root


def test_inference_writes_a_new_folder_each_time_and_no_stale_output(trained):
    test = json.loads((trained / "data" / "dataset.json").read_text())["test"]
    out = trained / "eval" / "segmentations"
    run_stage(BUNDLE, "inference", trained, **native_spacing(BUNDLE))
    first = latest_run(out)
    outputs = {p.name: p.read_bytes() for p in first.glob("*.nii.gz")}
    assert len(outputs) == len(test)

    new = trained / "new_inputs"
    new.mkdir()
    same, other = (trained / "data" / case["image"] for case in test[:2])
    shutil.copy(same, new / same.name)  # a new image with the name of an earlier one
    (new / other.name).write_bytes(b"not a NIfTI file")  # skipped
    run_stage(BUNDLE, "inference", trained, input_dir=str(new), **native_spacing(BUNDLE))
    second = latest_run(out)
    assert second != first and {p.name: p.read_bytes() for p in first.glob("*.nii.gz")} == outputs  # kept
    assert [p.name for p in second.glob("*.nii.gz")] == [same.name.replace(".nii.gz", "_sp_seg.nii.gz")]
    assert (second / "skipped.tsv").read_text().startswith(str(new / other.name))


def test_evaluating_again_sets_the_previous_results_aside(trained, capsys):
    run_stage(BUNDLE, "evaluate", trained, **native_spacing(BUNDLE))
    eval_dir = trained / "eval"
    old = {p.name: p.read_text() for p in [eval_dir / "results.md", *eval_dir.glob("*_raw.csv")]}
    run_stage(BUNDLE, "evaluate", trained, **native_spacing(BUNDLE))
    kept = {p.name: p.read_text() for p in eval_dir.glob("*.*-*.*")}
    assert set(old.values()) <= set(kept.values())  # e.g. results.20261207-151500.md, val_mean_dice_sp_raw.2026...
    assert (eval_dir / "results.md").is_file()
    overlays = sorted(p.name for p in (eval_dir / "overlays").iterdir())
    assert [sorted(p.name for p in kept.iterdir()) for kept in eval_dir.glob("overlays.*")] == [overlays]  # pictures
    out = capsys.readouterr().out
    assert "evaluating again: the previous run's" in out and next(n for n in kept if n.startswith("results.")) in out


def test_starting_over_sets_evaluation_and_segmentations_aside(trained, capsys):
    root = trained.parent / "over"
    shutil.copytree(trained, root)
    run_stage(BUNDLE, "evaluate", root, **native_spacing(BUNDLE))
    run_stage(BUNDLE, "inference", root, **native_spacing(BUNDLE))
    results = (root / "eval" / "results.md").read_text()
    run_stage(BUNDLE, "train", root, resume=False, **native_spacing(BUNDLE))
    assert not (root / "eval" / "results.md").exists() and not (root / "eval" / "segmentations").exists()
    assert results in [p.read_text() for p in root.glob("eval/results.*.md")]
    assert len(list(root.glob("eval/segmentations.*/*/*_sp_seg.nii.gz"))) > 0
    assert "starting afresh (--resume False)" in capsys.readouterr().out


def test_a_teacher_trained_on_other_images_stops_the_distillation(trained, tmp_path):
    teacher = trained / "models" / "teacher.pt"
    training = json.loads((trained / "data" / "dataset.json").read_text())["training"]
    entries = [{"image": str(trained / "data" / e["image"])} for e in training]
    assert torch.load(teacher, weights_only=True)["fingerprint"]["training_images"] == sorted(image_ids(entries))
    assert start_checkpoint(teacher, "checkpoint", training=entries) == teacher
    with pytest.raises(CheckpointError, match="--allow_other_teacher_data True"):
        start_checkpoint(teacher, "checkpoint", training=entries[1:])
    assert start_checkpoint(teacher, "checkpoint", training=entries[1:], allow_other_data=True) == teacher
    old = tmp_path / "old.pt"  # made before the record existed
    torch.save({"teacher": {}, "fingerprint": {"seed": 0}}, old)
    assert start_checkpoint(old, "checkpoint", training=entries[1:]) == old

    other = tmp_path / "other_data"  # the bundle: another --dataset_dir, the same trained folder
    shutil.copytree(trained / "data", other)
    lists = json.loads((other / "dataset.json").read_text())
    (other / "dataset.json").write_text(json.dumps({**lists, "training": lists["training"][1:]}))
    with pytest.raises(Exception) as raised:  # MONAI wraps the CheckpointError the user sees
        run_stage(BUNDLE, "train", trained, dataset_dir=str(other), ckpt_dir=str(tmp_path / "models"),
                  teacher_ckpt=str(teacher), auto_plan=False, **native_spacing(BUNDLE))  # fmt: skip
    assert "teacher) was trained on other training images" in str(user_error(raised.value))


def test_a_test_list_holding_training_images_is_refused(trained, tmp_path):
    lists = json.loads((trained / "data" / "dataset.json").read_text())
    mixed = trained / "data" / "mixed.json"  # the lists changed after training: a training image moved to the test list
    training, test = lists["training"], lists["test"][:1] + lists["training"][:1]
    mixed.write_text(json.dumps({**lists, "training": training[1:], "test": test}))
    datalists = dict.fromkeys(("training", "validation", "test"), str(mixed))
    for stage in ("evaluate", "inference"):
        with pytest.raises(Exception) as raised:
            run_stage(BUNDLE, stage, trained, datalists=datalists, **native_spacing(BUNDLE))
        assert re.search(r"1 image\(s\) of the test list .* --allow_leakage True", str(user_error(raised.value)))
    items = [{"image": str(trained / "data" / lists["training"][0]["image"])}]
    files = {"sp": trained / "models" / "sp.pt"}
    check_not_trained_on(files, items, allow=True)
    old = tmp_path / "old.pt"  # made before the record existed
    torch.save({"sp": {}}, old)
    check_not_trained_on({"sp": old}, items)


def test_no_split_is_held_out_of_a_list_the_networks_were_trained_on(trained):
    datalist = trained / "data" / "dataset.json"
    lists = json.loads(datalist.read_text())
    backup = datalist.read_text()
    try:  # the test list replaced by unlabelled images after training
        datalist.write_text(json.dumps({**lists, "test": [{"image": e["image"]} for e in lists["test"]]}))
        split = trained / "data" / "medkd_splits.json"
        with pytest.raises(ConfigError, match="was trained on its training list.*--resume False"):
            bundle_datalists(datalist, split, trained_in=trained / "models")
        assert not split.exists()
        with pytest.raises(Exception) as raised:
            run_stage(BUNDLE, "evaluate", trained, **native_spacing(BUNDLE))
        assert "was trained on its training list" in str(user_error(raised.value))
        assert bundle_datalists(datalist, split, trained_in=None)["test"] == str(split)  # a fresh start splits
    finally:
        datalist.write_text(backup)
        (trained / "data" / "medkd_splits.json").unlink(missing_ok=True)
