"""``data_on_device``: images cached on the training device and batches made by a ``ThreadDataLoader``, with the
same batches, in the same order, as without it."""

import pytest
import torch
from bundle_utils import native_spacing, run_stage
from monai.data import DataLoader, ThreadDataLoader
from monai.transforms import ToDeviced

from medkd.data.resident import data_loader, on_device


def test_on_device_appends_a_device_copy_only_when_enabled():
    load = [lambda d: d]
    assert on_device(load, ["image"], "cpu", enabled=False) == load
    with_copy = on_device(load, ["image"], "cpu", enabled=True)
    assert with_copy[0] is load[0] and isinstance(with_copy[1], ToDeviced) and len(with_copy) == 2


def test_data_loader_is_threaded_on_request_and_keeps_the_batches():
    data = [torch.full((1,), float(i)) for i in range(10)]
    plain, threaded = data_loader(data, 3, num_workers=0), data_loader(data, 3, threaded=True, num_workers=2)
    assert type(plain) is DataLoader and isinstance(threaded, ThreadDataLoader) and threaded.num_workers == 0
    assert all(torch.equal(a, b) for a, b in zip(plain, threaded, strict=True))
    order = torch.utils.data.SequentialSampler(data)
    for threaded in (False, True):  # a sampler decides the order: the bundles' `shuffle: true` gives way to it
        loader = data_loader(data, 5, threaded=threaded, sampler=order, shuffle=True)
        assert loader.sampler is order and torch.equal(next(iter(loader)).flatten(), torch.arange(5.0))
    assert isinstance(data_loader(data, 5, sampler=None, shuffle=True).sampler, torch.utils.data.RandomSampler)


@pytest.mark.parametrize(("bundle", "epochs"), [("segmentation_2d", 2), ("classification_2d", 1)])
def test_bundle_trains_the_same_students_with_data_on_device(bundle, epochs, tmp_path):
    """Random augmentations included: the thread draws them in the order the plain loader does, epoch after
    epoch."""
    fast = native_spacing(bundle)
    weights = {}
    for on in (False, True):
        root = tmp_path / str(on)
        settings = dict(routes_preset="student", data_on_device=on, max_epochs=epochs, **fast)
        workflow = run_stage(bundle, "train", root, **settings)
        trainer = workflow.parser.get_parsed_content("train#trainer")
        assert isinstance(trainer.data_loader, ThreadDataLoader) == on
        weights[on] = {name: s.state_dict() for name, s in trainer.students.items()}
    for name, state in weights[False].items():
        for key, value in state.items():
            assert torch.equal(weights[True][name][key], value), f"{name} {key}"
