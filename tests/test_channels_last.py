"""``channels_last=True``: every engine converts its networks (and the routes' adapters) to the channels-last layout,
in place, and gives the results of the contiguous run within float tolerance; the bundles take ``--channels_last``."""

import json

import pytest
import torch
from bundle_utils import native_spacing, run_stage
from conftest import tiny_batches, tiny_batches3d, tiny_unet, tiny_unet3d
from monai.losses import DiceCELoss

from medkd.training.distributed import wrap_ddp
from medkd.training.engines import DistillationTrainer, iteration_losses
from medkd.training.evaluators import MultiNetworkEvaluator, segmentation_metrics, segmentation_postprocessing
from medkd.training.layout import channels_last, is_channels_last


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


def train(batches, make, layout: bool) -> DistillationTrainer:
    students = {"sp": make((4, 8, 8), seed=1), "sf": make((4, 8, 8), seed=2)}
    # SGD, not Adam: a convolution's bias before a batch norm has a gradient of rounding noise, which Adam's
    # normalised step would turn into a step of the learning rate's size, different in each layout
    optimizers = {n: torch.optim.SGD(s.parameters(), lr=0.1) for n, s in students.items()}
    trainer = DistillationTrainer(
        device="cpu",
        max_epochs=2,
        train_data_loader=batches,
        students=students,
        optimizers=optimizers,
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        teacher=make((8, 16, 32), seed=0),
        routes="diversified",  # teacher -> sf hint through an adapter (8 -> 32 channels)
        decollate=False,
        channels_last=layout,
    )
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


def test_channels_last_evaluator_scores_as_contiguous():
    batch = tiny_batches(n=1, batch_size=2)
    scores = {}
    for layout in (False, True):
        networks = {"sp": tiny_unet(seed=1), "sf": tiny_unet(seed=2)}
        evaluator = MultiNetworkEvaluator(
            "cpu",
            batch,
            networks,
            postprocessing=segmentation_postprocessing(list(networks), 2),
            metrics=segmentation_metrics(list(networks)),
            channels_last=layout,
        )
        evaluator.run()
        assert all(is_channels_last(net) == layout for net in networks.values())
        scores[layout] = evaluator.state.metrics
    assert scores[True] == pytest.approx(scores[False], rel=1e-5)


@pytest.mark.parametrize("bundle", ["segmentation_2d", "classification_2d"])
def test_every_bundle_stage_takes_channels_last(bundle, tmp_path):
    """``--channels_last True`` from the command line: the teacher stage, distillation, evaluation and inference
    convert their networks; evaluating the same checkpoints with and without it gives the same scores."""
    fast = native_spacing(bundle)
    layout = {"channels_last": True, **fast}
    trainer = run_stage(bundle, "train_teacher", tmp_path, **layout).parser.get_parsed_content("train#trainer")
    assert is_channels_last(trainer.network)
    trainer = run_stage(bundle, "train", tmp_path, **layout).parser.get_parsed_content("train#trainer")
    assert all(is_channels_last(net) for net in trainer.networks.values())
    results = {}
    for converted in (False, True):
        evaluator = run_stage(bundle, "evaluate", tmp_path, **(layout if converted else fast))
        evaluator = evaluator.parser.get_parsed_content("evaluator")
        assert all(is_channels_last(net) == converted for net in evaluator.networks.values())
        results[converted] = json.loads((tmp_path / "eval" / "results.json").read_text())
    for plain, row in zip(results[False], results[True], strict=True):
        scores = {k: v for k, v in plain.items() if isinstance(v, float)}
        assert scores and {k: row[k] for k in scores} == pytest.approx(scores, rel=1e-5), row["network"]
    evaluator = run_stage(bundle, "inference", tmp_path, **layout).parser.get_parsed_content("evaluator")
    assert is_channels_last(evaluator.network)
