"""``channels_last=True``: every engine converts its networks (and the routes' adapters) to the channels-last layout,
in place, and gives the results of the contiguous run within float tolerance; the bundles take ``--channels_last``."""

import pytest
import torch
from bundle_utils import every_stage_with
from conftest import tiny_batches, tiny_batches3d, tiny_trainer, tiny_unet, tiny_unet3d

from medkd.runtime.distributed import wrap_ddp
from medkd.runtime.layout import channels_last, is_channels_last
from medkd.training.engines import DistillationTrainer, iteration_losses


@pytest.mark.parametrize(("make", "layout"), [(tiny_unet, torch.channels_last), (tiny_unet3d, torch.channels_last_3d)])
def test_channels_last_converts_convolution_weights_in_place(make, layout):
    net = make(seed=0)
    before = {name: (p, p.detach().clone()) for name, p in net.named_parameters()}
    assert not is_channels_last(net)
    channels_last([net])
    assert is_channels_last(net)
    for name, p in net.named_parameters():
        assert p is before[name][0]  # the same Parameter: optimizers built before still hold it
        assert torch.equal(p, before[name][1])  # the values do not change
        if p.dim() >= 4:
            assert p.is_contiguous(memory_format=layout), name
    # (with one input channel or a 1x1 kernel, channels-last strides are the contiguous ones)
    assert any(not p.is_contiguous() for p in net.parameters() if p.dim() >= 4)
    out = net(torch.rand(2, 1, *[16] * net.dimensions))
    assert out.is_contiguous(memory_format=layout)  # contiguous input, channels-last run
    channels_last([net])  # converting again changes nothing
    assert is_channels_last(net)
    assert not is_channels_last(torch.nn.Linear(3, 2))  # nothing to convert: not "channels-last"


def test_ddp_wrapping_converts_before_wrapping():
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not built in")
    torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    try:
        wrapped = wrap_ddp({"sp": tiny_unet(seed=1)}, "cpu", channels_last=True)["sp"]
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and is_channels_last(wrapped.module)
    finally:
        torch.distributed.destroy_process_group()


def sgd(params) -> torch.optim.Optimizer:
    """SGD, not Adam: a convolution's bias before a batch norm has a gradient of rounding noise, which Adam's
    normalised step would turn into a step of the learning rate's size, different in each layout."""
    return torch.optim.SGD(params, lr=0.1)


def train(batches, unet, layout: bool) -> DistillationTrainer:
    # diversified: the teacher -> sf hint goes through an adapter (8 -> 32 channels)
    trainer = tiny_trainer("diversified", batches, unet, sgd, max_epochs=2, channels_last=layout)
    trainer.run()
    return trainer


@pytest.mark.parametrize(("make", "data"), [(tiny_unet, tiny_batches), (tiny_unet3d, tiny_batches3d)])
def test_channels_last_training_gives_the_contiguous_losses_and_weights(make, data):
    batches = data(n=2, batch_size=2)
    plain, fast = train(batches, make, False), train(batches, make, True)
    assert all(is_channels_last(net) for net in fast.networks.values())
    assert not any(is_channels_last(net) for net in plain.networks.values())
    terms, fast_terms = iteration_losses(plain.state.output), iteration_losses(fast.state.output)
    assert set(fast_terms) == set(terms)
    for name, value in terms.items():
        assert float(fast_terms[name]) == pytest.approx(float(value), rel=1e-4, abs=1e-6), name
    for name, student in plain.students.items():
        for key, value in student.state_dict().items():
            torch.testing.assert_close(fast.students[name].state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("bundle", ["segmentation_2d", "classification_2d"])
def test_every_bundle_stage_takes_channels_last(bundle, tmp_path):
    """``--channels_last True`` from the command line: the teacher stage, distillation, evaluation and inference
    convert their networks; evaluating the same checkpoints with and without it gives the same scores."""
    every_stage_with(bundle, tmp_path, {"channels_last": True}, is_channels_last)
