"""``compile=True``: the engines compile their networks in place (after the routes hook them) and give the results
of the eager run. Traced with torch's ``aot_eager`` backend (forward and backward graphs, no C++ build), which is
what every backend compiles from; the bundles' stages with dynamo's tracing alone."""

import pytest
import torch
from bundle_utils import every_stage_with
from conftest import tiny_batches, tiny_students, tiny_trainer, tiny_unet
from monai.data import MetaTensor

from medkd.training.compiling import compile_in_place, is_compiled
from medkd.training.engines import DistillationTrainer, iteration_losses
from medkd.training.evaluators import MultiNetworkEvaluator, segmentation_metrics, segmentation_postprocessing

BACKEND = {"backend": "aot_eager"}
TRACE = {"backend": "eager"}  # dynamo's tracing alone: the bundles' wiring, at a third of aot_eager's time


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def train(batches, compile: bool) -> DistillationTrainer:
    students = tiny_students()
    if compile:  # as a bundle's validator does, built before the trainer
        compile_in_place(students.values(), BACKEND)
    feature = {"kind": "feature", "layers": "multi"}
    routes = [
        {"source": "teacher", "target": "sp", "kind": "prediction"},
        {"source": "teacher", "target": "sf", **feature},
        {"source": "sp", "target": "sf", "kind": "prediction"},
        {"source": "sf", "target": "sp", **feature},
    ]
    trainer = tiny_trainer(routes, batches, students=students, max_epochs=2, compile=compile, compile_kwargs=BACKEND)
    trainer.run()
    return trainer


def test_compiled_training_gives_the_eager_losses_and_weights():
    """The students are compiled before the trainer, as by a bundle's validator, and multi-depth hints make the
    routes probe them (with temporary hooks) before hooking them: the compiled graphs must hold the routes' hooks."""
    batches = tiny_batches(n=2, batch_size=2)
    eager, compiled = train(batches, compile=False), train(batches, compile=True)
    assert all(is_compiled(net) for net in compiled.networks.values())
    assert not any(is_compiled(net) for net in eager.networks.values())
    terms, compiled_terms = iteration_losses(eager.state.output), iteration_losses(compiled.state.output)
    assert set(compiled_terms) == set(terms) and "sp/feature_from_sf" in terms
    for name, value in terms.items():
        assert float(compiled_terms[name]) == pytest.approx(float(value), rel=1e-4, abs=1e-6), name
    for name, student in eager.students.items():
        state = compiled.students[name].state_dict()
        assert list(state) == list(student.state_dict())  # compiled in place: checkpoints keep their keys
        for key, value in student.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")


def test_compiled_evaluator_takes_metatensors_and_scores_as_eager():
    images = tiny_batches(n=1, batch_size=2)[0]
    batch = [{k: MetaTensor(v, meta={"filename_or_obj": "x.nii.gz"}) for k, v in images.items()}]
    scores = {}
    for compile in (False, True):
        torch._dynamo.reset()
        networks = {"sp": tiny_unet(seed=1), "sf": tiny_unet(seed=2)}
        evaluator = MultiNetworkEvaluator(
            "cpu",
            batch,
            networks,
            postprocessing=segmentation_postprocessing(list(networks), 2),
            metrics=segmentation_metrics(list(networks)),
            compile=compile,
            compile_kwargs=BACKEND,
        )
        evaluator.run()
        assert all(is_compiled(net) == compile for net in networks.values())
        assert isinstance(evaluator.state.output[0]["pred_sp"], MetaTensor)
        scores[compile] = evaluator.state.metrics
    assert scores[True] == pytest.approx(scores[False], rel=1e-5)


@pytest.mark.parametrize("bundle", ["segmentation_2d", "classification_2d"])
def test_every_bundle_stage_runs_compiled_and_scores_as_eager(bundle, tmp_path):
    """``--compile True`` from the command line: the teacher stage, distillation, evaluation and inference compile
    their networks; evaluating the same checkpoints compiled and eagerly gives the same scores."""
    every_stage_with(bundle, tmp_path, {"compile": True, "compile_kwargs": TRACE}, is_compiled, torch._dynamo.reset)
