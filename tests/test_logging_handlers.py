"""What a run logs: the settings and files MLflow records (--tracking mlflow), and TensorBoard's series and folders."""

import json
from pathlib import Path

import pytest
from bundle_utils import STAGES, run_stage
from ignite.engine import Engine
from monai.bundle import ConfigParser
from monai.handlers import MLFlowHandler

from medkd.knowledge.routes import preset_routes
from medkd.training.handlers import TrackedSettings, tracking_params

mlflow = pytest.importorskip("mlflow")  # a dev dependency (pip install -e ".[dev]")
event_multiplexer = pytest.importorskip("tensorboard.backend.event_processing.event_multiplexer")


def store(root: Path) -> str:
    """The local MLflow store that ``--tracking mlflow`` writes under ``root`` (MLflow no longer has a file store)."""
    return f"sqlite:///{root / 'eval' / 'mlruns.db'}"


def runs_of(tracking_uri: str) -> list:
    client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return sorted(runs, key=lambda r: r.info.start_time)


def artifacts_of(tracking_uri: str, run) -> set[str]:
    return {a.path for a in mlflow.tracking.MlflowClient(tracking_uri=tracking_uri).list_artifacts(run.info.run_id)}


def test_tracking_params_flatten_settings_and_name_each_route():
    routes = preset_routes("kd", ["sp", "sf"], kd_weight=0.5, temperature=2.0)
    params = tracking_params({"routes": "kd", "route_graph": routes, "seed": 3, "plan": {"patch_size": [32, 32]}})
    assert params["routes"] == "kd" and params["seed"] == "3" and params["plan/patch_size"] == "[32, 32]"
    assert params["route_graph/sp/prediction_from_teacher/weight"] == "0.5"
    assert params["route_graph/sf/prediction_from_teacher/temperature"] == "2.0"
    assert all(isinstance(v, str) for v in params.values())


def test_tracked_settings_reach_the_engines_mlflow_handler(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    (tmp_path / "plan.json").write_text("{}")
    engine = Engine(lambda engine, batch: 0.0)
    TrackedSettings({"seed": 7, "plan": {"batch_size": 2}}, [tmp_path / "plan.json", tmp_path / "absent.json"]).attach(
        engine
    )
    MLFlowHandler(tracking_uri=uri, iteration_log=False, close_on_complete=True).attach(engine)
    engine.run([0, 1], max_epochs=1)
    (run,) = runs_of(uri)
    assert {"seed": "7", "plan/batch_size": "2"}.items() <= run.data.params.items()
    assert artifacts_of(uri, run) == {"plan.json"}


def test_tracked_settings_without_tracking_do_nothing():
    engine = Engine(lambda engine, batch: 0.0)
    TrackedSettings({"seed": 7}).attach(engine)
    engine.run([0], max_epochs=1)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """The 2D segmentation bundle's teacher and students, one tiny epoch each, tracked with MLflow."""
    root = tmp_path_factory.mktemp("tracked")
    run_stage("segmentation_2d", "train_teacher", root, tracking="mlflow")
    run_stage("segmentation_2d", "train", root, tracking="mlflow", kd_weight=0.5)
    return root


def test_mlflow_records_each_stages_settings_and_files(tracked):
    teacher, students = runs_of(store(tracked))
    plan = {f"plan/{k}" for k in ("patch_size", "batch_size", "max_epochs", "teacher_channels", "student_channels")}
    assert {"seed", *plan} <= set(teacher.data.params)
    assert {"settings_teacher.json"} <= artifacts_of(store(tracked), teacher)
    params = students.data.params
    assert {"seed", "temperature", "peer_feature_weight", "teacher_mode", *plan} <= set(params)
    assert params["routes"] == "diversified" and params["kd_weight"] == "0.5"
    assert params["route_graph/sp/prediction_from_teacher/weight"] == "0.5"
    assert params["route_graph/sp/prediction_from_teacher/temperature"] == params["temperature"] == "4.0"
    assert params["route_graph/sf/feature_from_teacher/weight"] == "1.0"
    files = artifacts_of(store(tracked), students)
    assert "settings_students.json" in files and any(f.startswith("config_") for f in files), files  # + MONAI's
    settings = json.loads((tracked / "models" / "settings_students.json").read_text())
    assert json.loads(params["plan/patch_size"]) == settings["settings"]["patch_size"]


def scalar_tags(log_dir: Path) -> dict[str, set[str]]:
    """The scalar series of each TensorBoard run (folder) under ``log_dir``, as TensorBoard reads them."""
    runs = event_multiplexer.EventMultiplexer().AddRunsFromDirectory(str(log_dir))
    runs.Reload()
    return {run: set(tags["scalars"]) for run, tags in runs.Runs().items()}


def test_tensorboard_has_one_folder_per_stage_and_one_series_per_loss_term(tracked):
    assert not [p.name for p in (tracked / "runs").iterdir() if p.is_file()]  # every event file in a stage's folder
    tags = scalar_tags(tracked / "runs")
    assert set(tags) == {"teacher", "distillation"}
    assert {"train_loss", "val_mean_dice_teacher"} <= tags["teacher"]  # its validation beside its training loss
    assert {"val_mean_dice_sp", "val_mean_dice_sf"} <= tags["distillation"]
    terms = ["sp/sup", "sp/total", "sp/prediction_from_teacher", "sf/feature_from_teacher", "sf/prediction_from_sp"]
    for term in terms:
        assert [t for t in tags["distillation"] if t.endswith(term)] == [f"loss/{term}"], term


@pytest.mark.parametrize("bundle", ["segmentation_2d", "classification_2d"])
@pytest.mark.parametrize(("stage", "folder"), [("train_teacher", "teacher"), ("train", "distillation")])
def test_every_tensorboard_handler_writes_to_its_stages_folder(bundle, stage, folder):
    parser = ConfigParser()
    parser.read_config([str(p) for p in STAGES[bundle][stage]])
    assert parser["train"]["log_dir"] == f"$@log_dir + '/{folder}'"
    handlers = parser["train"]["handlers"] + parser["validate"]["handlers"]
    boards = [h for h in handlers if isinstance(h, dict) and h.get("_target_") == "TensorBoardStatsHandler"]
    assert len(boards) == 2 and all(h["log_dir"] == "@train#log_dir" for h in boards), boards
    if stage == "train":  # the epoch means of the loss terms (loss/<term>), not each term per iteration too
        assert boards[0]["iteration_log"] is False and "output_transform" not in boards[0]
    assert any(h.get("_target_", "").endswith("TrackedSettings") for h in parser["train"]["handlers"])
