"""The students' ensemble (mean of their softmax probabilities) scored as a third network, without a checkpoint."""

import pytest
import torch
from conftest import tiny_batches, tiny_unet
from monai.engines.utils import IterationEvents
from monai.metrics import compute_roc_auc
from monai.networks.nets import UNet
from torch import nn

from medkd.errors import ConfigError
from medkd.tools.report import ResultsTable
from medkd.training.evaluators import (
    MultiNetworkEvaluator,
    classification_metrics,
    classification_postprocessing,
    ensemble_logits,
    ensemble_members,
    pred_key,
    scored_networks,
    segmentation_metrics,
    segmentation_postprocessing,
)
from medkd.training.handlers import BestCheckpoints


def evaluate(networks, batches, postprocessing, metrics, **kwargs) -> MultiNetworkEvaluator:
    evaluator = MultiNetworkEvaluator(
        "cpu", batches, networks, postprocessing=postprocessing, metrics=metrics, ensemble=list(networks), **kwargs
    )
    evaluator.run()
    return evaluator


def mean_probabilities(networks, images):
    with torch.no_grad():
        return torch.stack([net.eval()(images).softmax(dim=1) for net in networks.values()]).mean(dim=0)


def test_members_are_the_students_and_logits_give_the_mean_probabilities():
    assert ensemble_members({"teacher": 0, "sp": 1, "sf": 2}) == ["sp", "sf"]
    assert ensemble_members(["teacher", "sp"]) == [] and ensemble_members(["sp", "sf"], enabled=False) == []
    assert scored_networks(["teacher", "sp", "sf"], ["sp", "sf"]) == ["teacher", "sp", "sf", "ensemble"]
    assert scored_networks(["teacher"], []) == ["teacher"]
    a, b = torch.randn(2, 3, 4, 4) * 30, torch.randn(2, 3, 4, 4)  # large logits: probabilities that underflow
    logits = ensemble_logits([a, b])
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits.softmax(dim=1), (a.softmax(dim=1) + b.softmax(dim=1)) / 2)


def test_segmentation_ensemble_dice_is_that_of_the_mean_probability_prediction(tmp_path):
    torch.manual_seed(0)
    batch = [{"image": torch.rand(3, 1, 32, 32), "label": torch.randint(0, 3, (3, 1, 32, 32))}]
    networks = {"sp": UNet(2, 1, 3, channels=(4, 8), strides=(2,)), "sf": UNet(2, 1, 3, channels=(4, 8), strides=(2,))}
    names = scored_networks(networks, list(networks))
    best = BestCheckpoints(str(tmp_path), networks, "mean_dice")
    evaluator = MultiNetworkEvaluator(
        "cpu",
        batch,
        networks,
        postprocessing=segmentation_postprocessing(names, 3),
        metrics=segmentation_metrics(names),
        val_handlers=[best],
        ensemble=list(networks),
    )
    logits = []
    evaluator.add_event_handler(
        IterationEvents.FORWARD_COMPLETED, lambda e: logits.append(e.state.output[pred_key("ensemble")].clone())
    )
    evaluator.run()

    image, label = batch[0]["image"], batch[0]["label"][:, 0]
    probabilities = mean_probabilities(networks, image)
    torch.testing.assert_close(logits[0].softmax(dim=1), probabilities)
    prediction = probabilities.argmax(dim=1)
    dice = [
        2 * ((p == c) & (g == c)).sum() / ((p == c).sum() + (g == c).sum())
        for p, g in zip(prediction, label, strict=True)
        for c in (1, 2)  # background excluded
    ]
    assert evaluator.state.metrics["val_mean_dice_ensemble"] == pytest.approx(float(torch.stack(dice).mean()), abs=1e-6)
    assert {"val_mean_dice_sp", "val_mean_dice_sf"} <= evaluator.state.metrics.keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sf.pt", "sp.pt"]  # the ensemble has no checkpoint
    assert best.missing() == []


class TinyClassifier(nn.Sequential):
    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        super().__init__(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_classification_ensemble_auc_and_accuracy_are_those_of_the_mean_probabilities():
    torch.manual_seed(0)
    images, labels = torch.randn(12, 1, 8, 8), torch.arange(12) % 3
    networks = {"sp": TinyClassifier(1), "sf": TinyClassifier(2)}
    names = scored_networks(networks, list(networks))
    batches = [{"image": images[:6], "label": labels[:6]}, {"image": images[6:], "label": labels[6:]}]
    evaluator = evaluate(networks, batches, classification_postprocessing(names, 3), classification_metrics(names))

    probabilities = mean_probabilities(networks, images)
    metrics = evaluator.state.metrics
    assert metrics["val_acc_ensemble"] == pytest.approx(float((probabilities.argmax(dim=1) == labels).float().mean()))
    auc = compute_roc_auc(probabilities, nn.functional.one_hot(labels, 3), average="macro")
    assert metrics["val_auc_ensemble"] == pytest.approx(float(auc), abs=1e-6)
    assert metrics["val_auc_ensemble"] not in (metrics["val_auc_sp"], metrics["val_auc_sf"])


def test_ensemble_needs_two_evaluated_networks_and_its_own_name():
    batch = tiny_batches(n=1, batch_size=1)
    with pytest.raises(ConfigError, match="two or more of the evaluated networks"):
        MultiNetworkEvaluator("cpu", batch, {"sp": tiny_unet(), "sf": tiny_unet()}, ensemble=["sp"])
    with pytest.raises(ConfigError, match="two or more of the evaluated networks"):
        MultiNetworkEvaluator("cpu", batch, {"sp": tiny_unet(), "sf": tiny_unet()}, ensemble=["sp", "sx"])
    with pytest.raises(ConfigError, match="the name of the students' ensemble"):
        MultiNetworkEvaluator("cpu", batch, {"sp": tiny_unet(), "ensemble": tiny_unet()})


def test_ensemble_row_in_the_results_table_counts_its_members_parameters(tmp_path):
    networks = {"teacher": nn.Linear(2, 5), "sp": nn.Linear(2, 3), "sf": nn.Linear(2, 2)}
    table = ResultsTable(str(tmp_path), networks=networks, ensemble=["sp", "sf"])
    metrics = {"val_auc_teacher": 0.9, "val_auc_sp": 0.7, "val_auc_sf": 0.75, "val_auc_ensemble": 0.8}
    rows = table.rows(metrics)
    assert [r["network"] for r in rows] == ["teacher", "sp", "sf", "ensemble"]
    assert rows[-1] == {"network": "ensemble", "auc": 0.8, "params": 9 + 6}


def test_the_ensemble_network_gives_the_logits_of_its_members_mean_softmax():
    from medkd.training.evaluators import EnsembleNetwork, checkpointed, ensemble_logits, inference_networks

    torch.manual_seed(0)
    members = {"sp": nn.Conv2d(1, 3, 1), "sf": nn.Conv2d(1, 3, 1)}
    ensemble = EnsembleNetwork(members)
    x = torch.randn(2, 1, 4, 4)
    assert torch.allclose(ensemble(x), ensemble_logits([members["sp"](x), members["sf"](x)]))
    mean = (members["sp"](x).softmax(1) + members["sf"](x).softmax(1)) / 2
    assert torch.allclose(ensemble(x).softmax(1), mean, atol=1e-6)
    assert checkpointed("ensemble", ensemble) == members and checkpointed("sp", members["sp"]) == {"sp": members["sp"]}
    assert list(inference_networks(nn.Identity(), members)) == ["teacher", "sp", "sf", "ensemble"]
    assert "ensemble" not in inference_networks(nn.Identity(), members, ensemble=False)
