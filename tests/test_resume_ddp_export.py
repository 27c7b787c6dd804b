"""Holding up: resume after SIGKILL, corrupt checkpoints, full disks, 2-process DDP (gloo), TorchScript export."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from bundle_utils import BASE, BUNDLES, run_stage, stage_command, tiny_overlay
from monai.bundle import ckpt_export

from medkd.bundles import stage_config
from medkd.runtime.files import CheckpointError
from medkd.training.checkpoints import load_network_weights, save_or_explain

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(cmd, **kwargs):
    done = subprocess.run(
        cmd, env=ENV, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300, **kwargs
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_killed_run_resumes_to_the_same_end(tmp_path):
    """SIGKILL a DML distillation after its first checkpoint, run the same command again: it resumes from the
    saved epoch and ends like an uninterrupted run."""
    epochs = 12
    overlay = tiny_overlay("segmentation_2d", tmp_path / "tiny.json", routes_preset="dml", max_epochs=epochs)
    cmd = stage_command("segmentation_2d", "train", tmp_path / "killed", overlay)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "models" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved_epoch = torch.load(last, weights_only=True)["engine"]["iteration"] // 2  # 2 iterations per epoch
    assert 1 <= saved_epoch < epochs, "the run must be killed mid-training"

    resumed = _run(cmd)
    assert f"at epoch {saved_epoch} of {epochs}" in resumed.stdout + resumed.stderr
    _run(stage_command("segmentation_2d", "train", tmp_path / "straight", overlay))
    a = torch.load(last, weights_only=True)
    b = torch.load(tmp_path / "straight" / "models" / "last.pt", weights_only=True)
    assert a["engine"]["iteration"] == b["engine"]["iteration"] == epochs * 2
    assert a.keys() == b.keys() >= {"engine", "routes", "student_sp", "student_sf", "optimizer_sp", "best"}
    assert a["best"]["best"].keys() == {"sp", "sf"}

    again = _run(cmd)  # a finished run is not trained again
    assert "training already complete" in again.stdout + again.stderr


def test_corrupt_or_mismatched_resume_checkpoint_is_named(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "last.pt").write_bytes(b"truncated")
    with pytest.raises(RuntimeError) as info:  # MONAI's config runner wraps the error of a "run" expression
        run_stage("segmentation_2d", "train", tmp_path, routes_preset="dml")
    assert isinstance(info.value.__cause__, CheckpointError)
    assert "last.pt cannot be read" in str(info.value.__cause__)
    torch.save({"engine": {}}, tmp_path / "models" / "last.pt")
    with pytest.raises(RuntimeError) as info:
        run_stage("segmentation_2d", "train", tmp_path, routes_preset="dml")
    assert "last.pt lacks" in str(info.value.__cause__) and "another configuration" in str(info.value.__cause__)


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_or_explain({"a": torch.ones(1)}, path)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(CheckpointError, match=r"No space left on device.*previous .*last\.pt is intact"):
        save_or_explain({"a": torch.zeros(1)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(1))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def _two_process_training(bundle, root, **overrides):
    """Run the ``train`` stage of ``bundle`` in 2 gloo processes (multi_gpu_train.json); each rank saves its
    students, teacher (unwrapped, with the class of the network the trainer runs), routes and iteration counts.
    Returns the two ranks' dumps."""
    overlay = tiny_overlay(bundle, root / "tiny.json", max_epochs=2, batch_size=2, **overrides)
    dump = root / "dump.json"
    dump.write_text(
        json.dumps(
            {
                "finalize": [
                    "$torch.save({'students': {k: v.state_dict() for k, v in @students.items()}, "
                    "'teacher': medkd.knowledge.features.unwrap(@train#trainer.teacher).state_dict(), "
                    "'teacher_class': type(@train#trainer.teacher).__name__, "
                    "'routes': @train#trainer.routes.state_dict(), 'iteration': @train#trainer.state.iteration, "
                    "'epoch_length': @train#trainer.state.epoch_length, "
                    "'sampler': type(@train#trainer.data_loader.sampler).__name__}, "
                    "@ckpt_dir + '/rank' + str(torch.distributed.get_rank()) + '.pt')",
                    "$medkd.runtime.distributed.destroy_process_group()",
                ]
            }
        )
    )
    cmd = stage_command(bundle, "train", root, overlay, BUNDLES / bundle / "configs" / "multi_gpu_train.json", dump)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29731"]
    _run(torchrun + cmd[1:])
    return [torch.load(root / "models" / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def _assert_same_parameters(a, b):
    params = [k for k in a if "running_" not in k and "num_batches" not in k]
    assert len(params) > 10
    for key in params:  # batch-norm buffers are rank-local until DDP broadcasts them at the next forward
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.mark.parametrize("bundle", ["segmentation_2d", "classification_2d"])
def test_two_process_gloo_training_keeps_students_identical(bundle, tmp_path):
    """The classification bundle's multi_gpu_train.json (generated from the segmentation bundle's) serves it too."""
    run_stage(bundle, "train_teacher", tmp_path)
    balanced = {"balanced_sampling": True} if bundle.startswith("classification") else {}
    r0, r1 = _two_process_training(bundle, tmp_path, **balanced)
    assert r0["teacher_class"] != "DistributedDataParallel"  # a frozen teacher is only replicated
    sampler = "DistributedWeightedRandomSampler" if balanced else "DistributedSampler"
    assert r0["sampler"] == r1["sampler"] == sampler
    datalist = json.loads((tmp_path / "data" / "dataset.json").read_text())
    per_rank = -(-len(datalist["training"]) // 2)  # DistributedSampler splits the training list over 2 ranks
    assert r0["epoch_length"] == r1["epoch_length"] == -(-per_rank // 2)  # batch size 2
    assert r0["iteration"] == r1["iteration"] == 2 * r0["epoch_length"]
    for name in ("sp", "sf"):
        _assert_same_parameters(r0["students"][name], r1["students"][name])
    assert r0["routes"].keys() and all(torch.equal(v, r1["routes"][k]) for k, v in r0["routes"].items())


def test_two_process_gloo_training_keeps_an_online_teacher_identical(tmp_path):
    """teacher_mode online: the teacher is wrapped in DDP like the students (unwrapped, each rank's copy would learn
    from its own half of the data and drift apart; medkd.training.teachers.OnlineTeacher refuses it)."""
    r0, r1 = _two_process_training("segmentation_2d", tmp_path, teacher_mode="online", routes_preset="kd")
    assert r0["teacher_class"] == "DistributedDataParallel"
    _assert_same_parameters(r0["teacher"], r1["teacher"])
    for name in ("sp", "sf"):
        _assert_same_parameters(r0["students"][name], r1["students"][name])


def test_torchscript_export_matches_the_checkpoint(tmp_path):
    run_stage("segmentation_2d", "train", tmp_path, routes_preset="student")
    configs = [str(BASE / "train.json")]
    ckpt_export(
        net_id="student_def",
        filepath=str(tmp_path / "sp.ts"),
        ckpt_file=str(tmp_path / "models" / "sp.pt"),
        key_in_ckpt="sp",
        meta_file=str(BUNDLES / "segmentation_2d" / "configs" / "metadata.json"),
        config_file=configs,
        bundle_root=str(tmp_path),
    )
    parser = stage_config(BUNDLES / "segmentation_2d", "train", {"bundle_root": str(tmp_path)})
    reference = parser.get_parsed_content("student_def")
    load_network_weights(reference, tmp_path / "models" / "sp.pt", role="sp")
    exported = torch.jit.load(str(tmp_path / "sp.ts"))
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), reference.eval()(x))
