"""Runs know what they are: fingerprints, resume refusing another run's checkpoint, fresh starts keeping the old
best checkpoints, the last epoch always validated, compare refusing an output folder made with other settings."""

import csv
import json

import pytest
import torch
from bundle_utils import BUNDLES, STAGES, TINY, run_stage
from monai.networks.nets import UNet

from medkd.__main__ import build_parser
from medkd.bundles import stage_config
from medkd.data.synthetic import ensure_segmentation_data
from medkd.errors import ConfigError, user_error
from medkd.knowledge.routes import preset_routes
from medkd.runtime.files import CheckpointError
from medkd.tools.compare import claim_output, compare, compare_fingerprint
from medkd.training.run_fingerprint import fingerprint_changes, run_fingerprint


def _files(root):
    """Every file under ``root/models`` and ``root/eval``, with its bytes."""
    return {p: p.read_bytes() for folder in ("models", "eval") for p in (root / folder).rglob("*") if p.is_file()}


def _user_error(info):
    error = user_error(info.value)
    assert error is not None, info.value
    return error


def test_fingerprint_changes_say_what_changed(tmp_path):
    datalist = tmp_path.resolve() / "dataset.json"
    datalist.write_text(json.dumps({"training": [], "validation": []}))
    small = UNet(2, 1, 3, channels=(4, 8), strides=(2,))
    nets = {"teacher": UNet(2, 1, 3, channels=(8, 16), strides=(2,)), "sp": small, "sf": small}

    def fingerprint(**changed):
        settings = {"datalist": datalist, "networks": nets, "routes": "diversified", "class_names": ["bg", "a"]}
        return run_fingerprint(**{**settings, "seed": 0, **changed})

    base = fingerprint()
    assert fingerprint() == base and json.loads(json.dumps(base)) == base
    assert fingerprint_changes(base, fingerprint()) == []
    kd, weights = preset_routes("kd", ["sp", "sf"]), preset_routes("diversified", ["sp", "sf"], kd_weight=0.5)
    assert fingerprint_changes(base, fingerprint(routes=kd)) == ["routes: diversified → kd"]
    assert fingerprint_changes(base, fingerprint(routes=weights)) == [
        "route sp/prediction_from_teacher: weight 1.0 → 0.5"
    ]
    assert fingerprint_changes(base, fingerprint(seed=1)) == ["seed 0 → 1"]
    assert fingerprint_changes(base, fingerprint(class_names=["bg", "b"])) == ["class names ['bg', 'a'] → ['bg', 'b']"]
    assert fingerprint(label_values=[0, 1]) == base  # values that are the class indices are not recorded
    changes = fingerprint_changes(base, fingerprint(label_values=[0, 255]))
    assert changes == ["label values the class indices → [0, 255]"]
    wider = {**nets, "sf": UNet(2, 1, 3, channels=(8, 8), strides=(2,))}
    assert fingerprint_changes(base, fingerprint(networks=wider))[0].startswith("network sf: ")
    assert fingerprint_changes(base, fingerprint(networks={"teacher": nets["teacher"], "sp": small}, routes="kd")) == [
        "networks: teacher, sp, sf → teacher, sp",
        "routes: diversified → kd",
    ]
    other = datalist.parent / "other" / "dataset.json"
    other.parent.mkdir()
    other.write_text(datalist.read_text())
    assert fingerprint_changes(base, fingerprint(datalist=other)) == [f"data list {datalist} → {other}"]
    datalist.write_text(json.dumps({"training": [{"image": "a.nii.gz"}], "validation": []}))
    assert fingerprint_changes(base, fingerprint()) == [f"data list {datalist} content changed"]
    overrides = {"settings": {"patch_size": [32, 32]}}  # as compare's fingerprint.json holds them
    assert fingerprint_changes({"settings": {}}, overrides) == ["settings patch_size: (not set) → [32, 32]"]


def test_resume_of_another_run_stops_and_keeps_every_file(tmp_path):
    run_stage("segmentation_2d", "train", tmp_path, routes_preset="dml")
    before = _files(tmp_path)
    last = tmp_path / "models" / "last.pt"
    datalist, copy = tmp_path.resolve() / "data" / "dataset.json", tmp_path.resolve() / "copy.json"
    copy.write_text(datalist.read_text())
    attempts = [
        ({"routes_preset": "student", "batch_size": 3}, "routes: dml → student"),  # other settings_students.json
        ({"routes_preset": "dml", "seed": 1}, "seed 0 → 1"),
        ({"routes_preset": "dml", "peer_prediction_weight": 0.5}, "route sf/prediction_from_sp: weight 1.0 → 0.5"),
        ({"routes_preset": "dml", "datalist_file": str(copy)}, f"data list {datalist} → {copy}"),
    ]
    for overrides, change in attempts:
        with pytest.raises(Exception) as info:  # MONAI's config runner wraps the error of a "run" expression
            run_stage("segmentation_2d", "train", tmp_path, **overrides)
        error = _user_error(info)
        assert isinstance(error, CheckpointError)
        assert f"resume checkpoint {last} was written by another run" in str(error)
        assert f"\n  - {change}\n" in str(error), str(error)
        assert "--bundle_root" in str(error) and "--resume False" in str(error)
        assert _files(tmp_path) == before  # nothing written, nothing lost

    old = torch.load(last, weights_only=True)
    del old["fingerprint"]  # as an older medkd wrote it
    torch.save(old, last)
    with pytest.raises(Exception) as info:
        run_stage("segmentation_2d", "train", tmp_path, routes_preset="dml")
    assert "has no run fingerprint" in str(_user_error(info)) and "--resume False" in str(_user_error(info))


def test_fresh_start_moves_the_better_best_checkpoint_aside(tmp_path, capsys):
    run_stage("segmentation_2d", "train", tmp_path, routes_preset="dml", max_epochs=2)
    models, history = tmp_path / "models", tmp_path / "eval" / "history_students.csv"
    better = torch.load(models / "sp.pt", weights_only=True)
    better["metric"] = 2.0  # better than any Dice the next run can reach
    torch.save(better, models / "sp.pt")
    old_history = history.read_text()

    run_stage("segmentation_2d", "train", tmp_path, routes_preset="kd", resume=False, teacher_ckpt="")
    kept = list(models.glob("sp.*.pt"))
    assert len(kept) == 1 and torch.load(kept[0], weights_only=True)["metric"] == 2.0
    new = torch.load(models / "sp.pt", weights_only=True)
    assert new["metric"] < 2.0 and new["fingerprint"]["route_graph"] == "kd"
    assert len(list(models.glob("sf.*.pt"))) == len(list(models.glob("last.*.pt"))) == 1  # the old run's state
    assert len(list(models.glob("settings_students.*.json"))) == 1
    assert json.loads((models / "settings_students.json").read_text())["settings"]["max_epochs"] == 1
    (kept_history,) = tmp_path.glob("eval/history_students.*.csv")
    assert kept_history.read_text() == old_history
    assert [row["epoch"] for row in csv.DictReader(history.open())] == ["1"]
    out = capsys.readouterr().out
    assert "starting afresh (--resume False)" in out and kept[0].name in out


def test_the_last_epoch_is_validated_when_val_interval_skips_it(tmp_path):
    run_stage("segmentation_2d", "train_teacher", tmp_path, val_interval=5)
    assert torch.load(tmp_path / "models" / "teacher.pt", weights_only=True)["epoch"] == 1
    run_stage("segmentation_2d", "train", tmp_path, val_interval=5)
    for name in ("sp", "sf"):
        assert torch.load(tmp_path / "models" / f"{name}.pt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("bundle", list(STAGES))
@pytest.mark.parametrize("stage", ["train_teacher", "train"])
def test_every_training_stage_validates_its_last_epoch_before_saving_it(bundle, stage):
    parser = stage_config(BUNDLES / bundle, stage)
    handlers = [h if isinstance(h, str) else h["_target_"] for h in parser["train"]["handlers"]]
    assert handlers.index("ValidationHandler") < handlers.index("medkd.training.handlers.FinalValidation"), handlers
    # the resume checkpoint is the trainer's last handler (MONAI's check_properties wants handler dicts in the list)
    assert parser["train"]["trainer"]["train_handlers"].endswith("@resume_checkpoint]")
    for key in ("best_checkpoints", "resume_checkpoint"):
        assert parser[key]["fingerprint"] == "@fingerprint"
    expected = "${'teacher': @teacher}" if stage == "train_teacher" else "${'teacher': @teacher, **@students}"
    assert parser["fingerprint"]["networks"] == expected
    assert (parser["fingerprint"]["routes"] is None) == (stage == "train_teacher")


def test_a_network_without_best_checkpoint_is_named(tmp_path, capsys):
    run_stage("segmentation_2d", "train", tmp_path, routes_preset="dml", **{"best_checkpoints#metric": "x"})
    assert not (tmp_path / "models" / "sp.pt").exists()
    assert "training ended without a best checkpoint for sp, sf" in capsys.readouterr().out


def test_compare_refuses_an_output_made_with_another_dataset(tmp_path):
    bundle, tmp_path = BUNDLES / "segmentation_2d", tmp_path.resolve()
    for name in ("a", "b"):
        ensure_segmentation_data(str(tmp_path / name), spatial_dims=2, size=48, counts=(4, 2, 2))
    on_a = {**TINY["segmentation_2d"], "dataset_dir": str(tmp_path / "a")}
    on_b = {**on_a, "dataset_dir": str(tmp_path / "b")}
    out = tmp_path / "out"
    claim_output(out, compare_fingerprint(bundle, on_a))  # as a comparison on dataset a starts
    claim_output(out, compare_fingerprint(bundle, on_a))  # the same settings: it goes on
    with pytest.raises(ConfigError) as info:
        compare(bundle, presets=["student"], seeds=[0], output=out, max_epochs=1, teacher_epochs=1, overrides=on_b)
    message = str(info.value)
    assert f"{out} holds a comparison made with other settings" in message
    assert f"\n  - dataset dir {tmp_path / 'a'} → {tmp_path / 'b'}" in message
    assert f"\n  - data list {tmp_path / 'a' / 'dataset.json'} → {tmp_path / 'b' / 'dataset.json'}" in message
    assert "--output" in message and "--fresh" in message
    assert sorted(p.name for p in out.iterdir()) == ["fingerprint.json"]  # nothing ran

    claim_output(out, compare_fingerprint(bundle, on_b), fresh=True)
    (aside,) = tmp_path.glob("out.*")
    assert json.loads((aside / "fingerprint.json").read_text())["dataset_dir"] == str(tmp_path / "a")
    assert json.loads((out / "fingerprint.json").read_text())["dataset_dir"] == str(tmp_path / "b")
    assert build_parser().parse_args(["compare", str(bundle), "--fresh"]).fresh


def test_a_checkpoint_trained_on_other_inputs_is_named_with_the_settings_it_needs(tmp_path):
    from medkd.training.checkpoints import check_trained_inputs
    from medkd.training.run_fingerprint import input_settings

    plan = {"in_channels": 1, "pixdim": [0.7, 0.7, 5.0], "normalization": {"scheme": "zscore"}, "strides": [2, 2]}
    trained = input_settings({**plan, "patch_size": [64, 64, 8], "max_epochs": 3}, "segmentation", axcodes="RAS")
    assert trained == {**plan, "axcodes": "RAS"}  # patch size and epochs may change between stages
    torch.save({"teacher": {}, "fingerprint": {"inputs": trained}}, tmp_path / "teacher.pt")
    torch.save({"sp": {}}, tmp_path / "sp.pt")  # no record (an earlier medkd): passed over
    check_trained_inputs({"teacher": tmp_path / "teacher.pt", "sp": tmp_path / "sp.pt", "sf": None}, trained)
    other = {**trained, "pixdim": [0.7, 0.7, 2.5]}
    with pytest.raises(CheckpointError) as err:
        check_trained_inputs({"teacher": tmp_path / "teacher.pt"}, other)
    assert str(err.value) == (
        f"checkpoint {tmp_path / 'teacher.pt'} (teacher) was trained on other inputs than this run gives it: pixdim: "
        "[0.7, 0.7, 5.0] → [0.7, 0.7, 2.5]. Run with the settings it was trained with (--pixdim '[0.7, 0.7, 5.0]', "
        "or the plan file it was trained with), or train it for these settings in other folders (--bundle_root)."
    )
    assert input_settings({"patch_size": [96, 96], "pixdim": [1, 1]}, "classification") == {"patch_size": [96, 96]}
    classifier = input_settings({"in_channels": 1, "patch_size": [64, 64], "normalization": {}}, "classification")
    torch.save({"teacher": {}, "fingerprint": {"inputs": {**classifier, "axcodes": "RA"}}}, tmp_path / "teacher.pt")
    with pytest.raises(CheckpointError) as err:  # was told to run with --patch_size, which a segmentation run has
        check_trained_inputs({"teacher": tmp_path / "teacher.pt"}, {**trained, "axcodes": "RA"})
    assert str(err.value).startswith(
        f"checkpoint {tmp_path / 'teacher.pt'} (teacher) is a classification network, not a segmentation one: it is "
        "another bundle's or data set's. Point --ckpt_dir (or --bundle_root) at checkpoints this bundle trained"
    )
    torch.save({"teacher": {}, "fingerprint": {"inputs": {**trained, "axcodes": "RA"}}}, tmp_path / "teacher.pt")
    with pytest.raises(CheckpointError, match=r"is a network of 2D images, not 3D ones: it is another bundle's"):
        check_trained_inputs({"teacher": tmp_path / "teacher.pt"}, trained)
    torch.save({"teacher": {}, "fingerprint": {"inputs": {**trained, "strides": [2, 2, 1]}}}, tmp_path / "teacher.pt")
    with pytest.raises(CheckpointError) as err:  # only what differs from what the run has
        check_trained_inputs({"teacher": tmp_path / "teacher.pt"}, other)
    assert "(--pixdim '[0.7, 0.7, 5.0]' --strides '[2, 2, 1]', or the plan file" in str(err.value)


def test_every_stage_stops_on_checkpoints_trained_on_other_inputs(tmp_path):
    run_stage("segmentation_2d", "train_teacher", tmp_path)
    changed = {"normalization": {"scheme": "minmax"}}  # the embedded data's default plan: per-image z-score
    with pytest.raises(RuntimeError) as info:  # distillation from a frozen teacher trained on other inputs
        run_stage("segmentation_2d", "train", tmp_path, **changed)
    assert "teacher.pt (teacher) was trained on other inputs than this run gives it: normalization: " in str(
        _user_error(info)
    )
    alone = {"ckpt_dir": str(tmp_path / "alone"), "output_dir": str(tmp_path / "alone_eval")}
    run_stage("segmentation_2d", "train", tmp_path, routes_preset="student", **alone, **changed)  # reads no teacher
    run_stage("segmentation_2d", "train", tmp_path)
    with pytest.raises(RuntimeError) as info:  # resuming a run with other inputs
        run_stage("segmentation_2d", "train_teacher", tmp_path, max_epochs=2, **changed)
    assert "inputs normalization: {'scheme': 'zscore'} → {'scheme': 'minmax'}" in str(_user_error(info))
    for stage, settings in (("evaluate", {}), ("inference", {"network_name": "sf"})):
        with pytest.raises(RuntimeError) as info:
            run_stage("segmentation_2d", stage, tmp_path, **settings, **changed)
        message, first = str(_user_error(info)), "teacher.pt (teacher)" if stage == "evaluate" else "sf.pt (sf)"
        assert f"{first} was trained on other inputs than this run gives it: normalization: " in message
        assert 'Run with the settings it was trained with (--normalization \'{"scheme": "zscore"}\'' in message
