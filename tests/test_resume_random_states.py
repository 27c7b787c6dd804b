"""An interrupted run, resumed, is the run it resumed: the random states are saved with the resume checkpoint and
restored, so its weights and metrics history equal an uninterrupted run's; Ctrl-C says so in one line."""

import os
import subprocess
import sys

import pytest
import torch
from bundle_utils import BUNDLES, TINY, native_spacing
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, RandFlipd, RandSpatialCropd

from medkd.bundles import stage_workflow
from medkd.training.random_states import RandomStates

BUNDLE = "segmentation_2d"
EPOCHS = 2
# per epoch: the teacher's end within a pass over the 4 training images (2 batches of 2), the students' with one
ITERATIONS = {"train_teacher": 3, "train": 2}
# augmentation on (whatever the tiny data's plan says), the loader shuffling in the main process
SETTINGS = {
    **TINY[BUNDLE],
    **native_spacing(BUNDLE),
    "teacher_channels": [8, 16, 32, 64, 64],
    "max_epochs": EPOCHS,
    "val_interval": 1,
    "num_workers": 0,
    "flip_axes": [0, 1],
    "rotate_degrees": 15.0,
    "scale_range": 0.2,
    "intensity_augmentation": True,
    "mix": "cutmix",  # the distillation's batch mixer has a generator of its own (the teacher stage does not mix)
}
FILES = {"train_teacher": ("last_teacher.pt", "history_teacher.csv"), "train": ("last.pt", "history_students.csv")}


def _interrupt(engine):
    raise KeyboardInterrupt


def _train(stage, root, interrupt_at=None):
    """Run ``stage`` in ``root``; with ``interrupt_at``, press Ctrl-C after that iteration and return the one-line
    message the run stops with."""
    settings = {**SETTINGS, "iterations_per_epoch": ITERATIONS[stage]}
    workflow = stage_workflow(BUNDLES / BUNDLE, stage, bundle_root=str(root), **settings)
    workflow.initialize()
    if interrupt_at is None:
        workflow.run()
        return None
    trainer = workflow.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=interrupt_at), _interrupt)
    with pytest.raises(KeyboardInterrupt) as stopped:
        workflow.run()
    return str(stopped.value)


def _same(a, b, where=""):
    """Assert two checkpoint values are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each stage run straight in one folder, and interrupted in epoch 2 then resumed in another (the distillation
    of each folder distils its own teacher); the messages of the interruptions."""
    straight, resumed = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("resumed")
    messages = {}
    for stage in FILES:
        _train(stage, straight)
        messages[stage] = _train(stage, resumed, interrupt_at=ITERATIONS[stage] + 1)
        _train(stage, resumed)
    return straight, resumed, messages


@pytest.mark.parametrize("stage", list(FILES))
def test_resumed_run_equals_uninterrupted_run(runs, stage):
    straight, resumed, _ = runs
    checkpoint, history = FILES[stage]
    a = torch.load(straight / "models" / checkpoint, weights_only=True)
    b = torch.load(resumed / "models" / checkpoint, weights_only=True)
    assert a["engine"]["iteration"] == EPOCHS * ITERATIONS[stage]
    _same({k: v for k, v in a.items() if k != "fingerprint"}, {k: v for k, v in b.items() if k != "fingerprint"})
    assert (straight / "eval" / history).read_text() == (resumed / "eval" / history).read_text()


@pytest.mark.parametrize("stage", list(FILES))
def test_ctrl_c_says_where_and_how_to_resume(runs, stage):
    _, resumed, messages = runs
    path = resumed / "models" / FILES[stage][0]
    assert messages[stage] == (
        f"Interrupted at epoch 2 (iteration {ITERATIONS[stage] + 1}): the last checkpoint is {path} (epoch 1); run the "
        "same command again to resume."
    )


def test_ctrl_c_prints_one_line_and_exits_130():
    code = (
        "import medkd.errors; medkd.errors.install_excepthook(); "
        "raise KeyboardInterrupt('Interrupted at epoch 3 (iteration 57): ...')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=60)
    assert done.stderr == "Interrupted at epoch 3 (iteration 57): ...\n"
    assert done.returncode in (130, -2)  # a shell sees 130; Python ends itself by SIGINT


def test_checkpoint_without_random_states_resumes_with_a_warning(tmp_path, capsys):
    _train("train_teacher", tmp_path, interrupt_at=ITERATIONS["train_teacher"] + 1)
    path = tmp_path / "models" / "last_teacher.pt"
    old = torch.load(path, weights_only=True)
    del old["random_states"]
    torch.save(old, path)
    _train("train_teacher", tmp_path)
    assert "holds no random states" in capsys.readouterr().out
    assert torch.load(path, weights_only=True)["engine"]["iteration"] == EPOCHS * ITERATIONS["train_teacher"]


def test_random_states_cover_the_transforms_and_the_sampler():
    generator = torch.Generator().manual_seed(1)
    transform = Compose([RandSpatialCropd("x", roi_size=[2], random_size=False), RandFlipd("x", prob=0.5)])
    loader = DataLoader(Dataset([{"x": torch.rand(1, 4)}] * 4, transform), shuffle=True, generator=generator)
    states = RandomStates(loader)
    saved = states.state_dict()
    assert len(saved["loader"]) == 5  # Compose, the crop and its cropper, the flip, the generator
    first = [batch["x"] for batch in loader]
    assert states.load_state_dict(saved) == []
    assert all(torch.equal(a, batch["x"]) for a, batch in zip(first, loader, strict=True))
