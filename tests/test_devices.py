"""Every medkd engine puts the networks it runs on its own device (MONAI's engines leave that to the caller).

The engines are built on the ``meta`` device: a network left on the CPU is then caught by its parameters' device,
on a machine without a GPU.
"""

import pytest
import torch
from bundle_utils import BUNDLES, TINY
from conftest import tiny_unet
from ignite.engine import Engine
from monai.handlers import ValidationHandler
from monai.losses import DiceCELoss

from medkd.bundles import stage_config
from medkd.training.engines import DistillationTrainer, TeacherTrainer
from medkd.training.evaluators import MultiNetworkEvaluator, SingleNetworkEvaluator

META = torch.device("meta")


def networks_of(engine: Engine) -> dict[str, torch.nn.Module]:
    """The networks an engine runs, by name."""
    if hasattr(engine, "networks"):
        return dict(engine.networks)
    if hasattr(engine, "students"):
        return {**engine.students, "teacher": engine.teacher}
    return {"network": engine.network}


def assert_on(device: torch.device, engine: Engine) -> None:
    for name, network in networks_of(engine).items():
        devices = {p.device for p in network.parameters()} | {b.device for b in network.buffers()}
        assert devices == {device}, f"{type(engine).__name__} left {name} on {devices}, not its device {device}"


def test_engines_move_their_networks():
    net = tiny_unet()
    optimizer = torch.optim.Adam(net.parameters())
    assert_on(META, TeacherTrainer(META, 1, [], net, optimizer, DiceCELoss(to_onehot_y=True, softmax=True)))
    assert_on(META, SingleNetworkEvaluator(META, [], tiny_unet()))
    assert_on(META, MultiNetworkEvaluator(META, [], {"teacher": tiny_unet(), "sp": tiny_unet()}))
    students = {"sp": tiny_unet(), "sf": tiny_unet()}
    optimizers = {n: torch.optim.Adam(s.parameters()) for n, s in students.items()}
    trainer = DistillationTrainer(META, 1, [], students, optimizers, torch.nn.MSELoss(), tiny_unet(), routes="kd")
    assert_on(META, trainer)


@pytest.mark.parametrize("bundle", ["segmentation_2d", "segmentation_3d", "classification_2d", "classification_3d"])
@pytest.mark.parametrize("stage,engine_id", [("evaluate", "evaluator"), ("inference", "evaluator"),
                                             ("train_teacher", "train#trainer")])  # fmt: skip
def test_bundle_stage_engines_hold_networks_on_their_device(bundle, stage, engine_id, tmp_path):
    parser = stage_config(BUNDLES / bundle, stage, {**TINY[bundle], "device": "$torch.device('meta')"})
    parser["bundle_root"] = str(tmp_path)
    parser.get_parsed_content("make_default_data")
    engine = parser.get_parsed_content(engine_id)
    assert_on(META, engine)
    for handler in parser.get_parsed_content("train#handlers") if stage == "train_teacher" else []:
        if isinstance(handler, ValidationHandler):
            assert_on(META, handler.validator)


def test_classification_labels_follow_the_predictions_device():
    from medkd.training.evaluators import classification_postprocessing

    # MONAI's decollation makes each class index a Python number: its one-hot would be made on the CPU
    item = {"pred_teacher": torch.zeros(3, device=META), "pred_sp": torch.zeros(3, device=META), "label": 2}
    out = classification_postprocessing(["teacher", "sp"], num_classes=3)(item)
    assert out["label"].device == META and out["label"].shape == (3,)


def test_predictions_under_bf16_autocast_are_scored_in_float32():
    from monai.networks.nets import DenseNet

    from medkd.training.evaluators import classification_metrics, classification_postprocessing

    torch.manual_seed(0)
    images = torch.rand(8, 1, 16, 16)
    data = [{"image": images, "label": torch.tensor([0, 1] * 4)}]
    networks = {"sp": DenseNet(2, 1, 2, init_features=4, growth_rate=4, block_config=(1, 1))}
    evaluator = MultiNetworkEvaluator(
        "cpu", data, networks, postprocessing=classification_postprocessing(["sp"], 2),
        key_val_metric=classification_metrics(["sp"]), amp=True, amp_kwargs={"dtype": torch.bfloat16},
    )  # fmt: skip
    evaluator.run()  # ROC-AUC converts the predictions to numpy, which has no bfloat16
    assert 0.0 <= evaluator.state.metrics["val_auc_sp"] <= 1.0
    assert evaluator.state.output[0]["pred_sp"].dtype == torch.float32


def test_evaluator_metrics_first_is_the_key_metric():
    from medkd.errors import ConfigError
    from medkd.training.evaluators import segmentation_metrics, segmentation_postprocessing

    data = [{"image": torch.rand(2, 1, 32, 32), "label": (torch.rand(2, 1, 32, 32) > 0.5).long()}]
    networks = {"teacher": tiny_unet(seed=0), "sp": tiny_unet(seed=1)}
    evaluator = MultiNetworkEvaluator(
        "cpu", data, networks, postprocessing=segmentation_postprocessing(list(networks), 2),
        metrics=segmentation_metrics(list(networks)),
    )  # fmt: skip
    evaluator.run()
    assert evaluator.state.key_metric_name == "val_mean_dice_teacher"
    assert {"val_mean_dice_teacher", "val_mean_dice_sp"} <= set(evaluator.state.metrics)
    with pytest.raises(ConfigError, match="not both"):
        MultiNetworkEvaluator("cpu", data, networks, metrics=segmentation_metrics(["sp"]),
                              key_val_metric=segmentation_metrics(["teacher"]))  # fmt: skip
