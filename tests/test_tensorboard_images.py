"""TensorBoard images during validation: the image, its label map and each network's prediction, per validation."""

from types import SimpleNamespace

import torch
from ignite.engine import Engine, Events
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medkd.training.tensorboard_images import ValidationImages


def _output(shape):
    onehot = torch.nn.functional.one_hot(torch.randint(0, 3, shape), 3).movedim(-1, 0).float()
    return [{"image": torch.rand(1, *shape), "label": onehot, "pred_sp": onehot, "pred_teacher": onehot}]


def _validate(handler, shape, epochs):
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    for epoch in epochs:
        engine.state = SimpleNamespace(epoch=epoch, output=_output(shape))
        for event in ("_forget", "_keep", "__call__"):
            getattr(handler, event)(engine)
    return engine


def test_each_validation_writes_the_image_the_label_and_every_prediction(tmp_path):
    _validate(ValidationImages(str(tmp_path), ["sp", "teacher"], enabled=True), (16, 12), epochs=(2, 4))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()["images"]
    assert {"images/image", "images/label", "images/sp", "images/teacher"} <= {t.split("_")[0] for t in tags}
    assert [e.step for e in events.Images(next(t for t in tags if t.startswith("images/sp")))] == [2, 4]


def test_a_volume_is_written_too_and_nothing_when_switched_off(tmp_path):
    _validate(ValidationImages(str(tmp_path / "3d"), ["sp"], enabled=True), (6, 8, 5), epochs=(1,))
    events = EventAccumulator(str(tmp_path / "3d"))
    events.Reload()
    assert any(t.startswith("images/sp") for t in events.Tags()["images"])
    engine, off = Engine(lambda e, b: None), ValidationImages(str(tmp_path / "off"), ["sp"])
    off.attach(engine)
    assert not engine.has_event_handler(off, Events.EPOCH_COMPLETED)
    assert not engine.has_event_handler(off._keep, Events.ITERATION_COMPLETED)
    assert not (tmp_path / "off").exists()
