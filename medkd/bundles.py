"""Bundles: the config files, workflow and command of each stage, and the names medkd shares with the bundles.

One policy serves every bundle: a bundle folder holds every config file it runs (the 3D bundles' are generated from
the 2D bundles' by :mod:`medkd.bundle_generation`, not copied by hand), and a stage's config list is built by
:func:`stage_files`. ``python -m medkd compare``, the tests and the
benchmarks build their lists here, and each bundle's ``docs/README.md`` shows the plain ``python -m monai.bundle run``
command of every stage (:func:`run_command`; a test keeps them equal).

It also owns the names that medkd's code shares with the bundles: the bundle keys it reads or overrides and the
files a run writes (``python -m medkd compare`` reads them, ``tests/test_bundle_keys.py`` checks the bundles agree).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser, ConfigWorkflow

from medkd.errors import ConfigError

__all__ = [
    "TEACHER",
    "STAGES",
    "stage_files",
    "stage_config",
    "stage_workflow",
    "run_arguments",
    "run_command",
    "check_config_files",
    "runs_alone",
    "checkpoint_file",
    "snapshot_file",
    "run_folders",
    "SHARED_KEYS",
    "STAGE_KEYS",
    "OWN_KEYS",
    "known_keys",
]

TEACHER = "teacher"  # the teacher's network name: in routes, term names, checkpoint and history files

# a bundle's metadata and logging configuration, in its configs folder
METADATA = "configs/metadata.json"
LOGGING_CONF = "configs/logging.conf"

# bundle keys that medkd reads or overrides
CKPT_DIR = "ckpt_dir"  # checkpoints
OUTPUT_DIR = "output_dir"  # metrics history, evaluation results
LOG_DIR = "log_dir"  # TensorBoard
DATASET_DIR = "dataset_dir"
DATALISTS = "datalists"  # the data list file of each list
MAKE_DEFAULT_DATA = "make_default_data"
TEACHER_CKPT = "teacher_ckpt"  # the teacher checkpoint the distillation reads
TEACHER_EPOCH = "teacher_epoch"  # the teacher snapshot the distillation reads instead of the best checkpoint
TEACHER_MODE = "teacher_mode"  # "frozen" or "online"
TEACHER_INIT = "teacher_init"  # where the distillation's teacher starts: "checkpoint" (TEACHER_CKPT) or "scratch"
ROUTE_GRAPH = "route_graph"  # the routes of the distillation (a list of medkd.knowledge.routes.Route)
ROUTES_PRESET = "routes_preset"
SEED = "seed"
MAX_EPOCHS = "max_epochs"
DEVICE = "device"
NETWORKS = "networks"  # the networks the evaluate stage scores
TEACHER_DEF = "teacher_def"
STUDENTS = "students"
IN_CHANNELS = "in_channels"
PATCH_SIZE = "patch_size"  # the spatial size the networks are fed
INFERER = "inferer"  # the inferer of validation, evaluation and inference (a sliding window, or one forward)
INPUT_SETTINGS = "input_settings"  # the settings that define the networks' inputs (checked against checkpoints)
ENSEMBLE_MEMBERS = "ensemble_members"  # the networks the evaluate stage averages into the students' ensemble
EVAL_DATASET = "dataset"  # the evaluate stage's test dataset

# the folders a run writes under its bundle_root (the defaults of CKPT_DIR, OUTPUT_DIR and LOG_DIR)
MODELS_DIR = "models"
EVAL_DIR = "eval"
RUNS_DIR = "runs"
# files in OUTPUT_DIR: the validation metrics of each epoch, and the evaluate stage's table (medkd.tools.report)
STUDENTS_HISTORY = "history_students.csv"
TEACHER_HISTORY = "history_teacher.csv"
STUDENTS_SETTINGS = "settings_students.json"  # the settings a training stage used (beside its checkpoints)
TEACHER_SETTINGS = "settings_teacher.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
# files of a comparison (python -m medkd compare) in its output folder, and in each run's folder
RESULTS_CSV = "results.csv"
COMPARISON_PNG = "comparison.png"
CASES_PNG = "cases.png"  # a segmentation comparison's page of the same test cases across the methods
CLASS_NAMES = "class_names"
COMPARE_FINGERPRINT = "fingerprint.json"
COMPARE_LOG = "compare.log"
# files of a deployment report (python -m medkd deploy-report) in the bundle root's DEPLOY_DIR, beside the exported
# networks (<network>.onnx, <network>.torchscript.pt)
DEPLOY_DIR = "deploy"
DEPLOY_REPORT_MD = "deploy_report.md"
DEPLOY_REPORT_CSV = "deploy_report.csv"
DEPLOY_PLOT = "metric_vs_latency.png"

# the top-level keys of the bundles as shipped (tests/test_bundle_keys.py keeps them equal to the configs): the keys
# every bundle defines in every stage, for the same thing (see docs/architecture.md#bundle-keys), ...
SHARED_KEYS = frozenset({
    # folders and data
    "imports", "bundle_root", "ckpt_dir", "output_dir", "log_dir", "dataset_dir", "datalist_file", "split_file",
    "split_options", "datalists", "default_data", "make_default_data", "allow_missing_classes", "allow_leakage",
    "allow_other_teacher_data",
    "check_data", "check_lengths", "check_settings", "class_names", "num_classes",
    # planned settings
    "spatial_dims", "axcodes", "auto_plan", "plan_file", "plan_options", "default_plan", "plan", "plan_used",
    "show_plan", "in_channels", "patch_size", "batch_size", "max_epochs", "iterations_per_epoch", "val_interval",
    "normalization", "flip_axes", "rot90_axes", "rotate_degrees", "scale_range", "intensity_augmentation",
    # run
    "num_workers", "learning_rate", "seed", "amp", "amp_kwargs", "compile", "compile_kwargs", "channels_last",
    "data_on_device", "keep_freed_memory", "device", "is_not_rank0", "resume", "nan_policy", "resume_file",
    "history_file", "settings_file",
    # networks and knowledge
    "teacher_def", "student_def", "teacher", "students", "train_students", "teacher_ckpt", "routes_preset",
    "kd_weight", "hint_weight", "peer_prediction_weight", "peer_feature_weight", "temperature", "routes",
    "route_graph", "feature_layers", "loss", "optimizer", "optimizers", "warmup_epochs", "hint_layers",
    "lr_decay_power", "teacher_mode", "teacher_init", "teacher_optimizer", "train_teacher", "ensemble",
    "teacher_snapshots", "teacher_epoch", "mix", "mix_alpha", "mix_prob", "mixing",
    # the network a bundle ships (medkd.tools.export)
    "network_name", "network_def",
    # transforms and engines
    "load_keys", "load", "augment", "inferer", "input_settings", "fingerprint", "best_checkpoints",
    "resume_checkpoint", "train", "validate", "initialize", "run",
})  # fmt: skip
# ... the keys a stage file adds, ...
STAGE_KEYS = {
    "train": frozenset(),
    "train_teacher": frozenset({"teacher_train_network", "teacher_snapshot_checkpoints"}),
    "evaluate": frozenset({
        "networks", "ensemble_members", "scored_networks", "overlays", "test_datalist", "preprocessing", "dataset",
        "dataloader", "handlers", "evaluator",
    }),
    "inference": frozenset({
        "input_dir", "input_pattern", "run_dir", "network", "infer_datalist", "preprocessing",
        "dataset", "dataloader", "postprocessing", "handlers", "evaluator",
    }),
    "multi_gpu_train": frozenset({"backend", "finalize", "teacher_train_network"}),
}  # fmt: skip
# ... and what only one task has: the segmentation bundles resample, crop patches, slide windows over U-Nets and map
# label values to classes; the classification bundle knows lateral findings and balances classes; the 3D bundle
# samples several patches per volume
_SEGMENTATION_KEYS = frozenset({
    "pixdim", "interp_modes", "crop", "strides", "teacher_channels", "compression", "student_channels",
    "sw_overlap", "sw_batch_size", "label_values", "map_labels", "surface_tolerance_mm",
    "surface_tolerances", "choose_postprocessing", "mirror_tta", "postprocessing_choice",
    "tensorboard_images",
})  # fmt: skip
OWN_KEYS = {
    "segmentation_2d": _SEGMENTATION_KEYS,
    "segmentation_3d": _SEGMENTATION_KEYS | {"samples_per_volume"},
    "classification_2d": frozenset({"lateral", "balanced_sampling"}),
    "classification_3d": frozenset({"lateral", "balanced_sampling"}),
}


def known_keys() -> frozenset[str]:
    """Every top-level key of a shipped bundle, in any stage (a key of a config file that is none of these and that
    nothing refers to is a typo: :func:`medkd.config_checks.check_config_keys`)."""
    return SHARED_KEYS.union(*STAGE_KEYS.values(), *OWN_KEYS.values())


STAGES = ("train_teacher", "train", "evaluate", "inference", "multi_gpu_train")
# how a user starts a stage from the bundle folder; the multi-GPU stage is started by torchrun (here on 2 GPUs)
LAUNCHERS = {"multi_gpu_train": "torchrun --nproc_per_node=2 -m monai.bundle run"}
LAUNCHER = "python -m monai.bundle run"


def stage_files(bundle_dir: str | Path, stage: str) -> list[Path]:
    """The config files to merge, in order, to run ``stage`` of the bundle in ``bundle_dir``: its ``train.json``, then
    its stage file (model-zoo convention: ``evaluate.json`` etc. add to ``train.json``). A bundle folder holds every
    stage file it runs (the 3D bundles' are generated from the 2D bundles': :mod:`medkd.bundle_generation`)."""
    configs = Path(bundle_dir) / "configs"
    files = [configs / "train.json"] + ([] if stage == "train" else [configs / f"{stage}.json"])
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} does not exist: {bundle_dir} is not a medkd bundle folder of a {stage} stage."
            )
    return files


def stage_config(bundle_dir: str | Path, stage: str, overrides: Mapping[str, Any] | None = None) -> ConfigParser:
    """The merged config of ``stage`` (see :func:`stage_files`) with ``bundle_root`` set to the bundle and
    ``overrides`` applied, as ``python -m monai.bundle run`` would see it; nothing is parsed yet."""
    parser = ConfigParser()
    parser.read_config([str(p) for p in stage_files(bundle_dir, stage)])
    parser["bundle_root"] = str(bundle_dir)
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


def stage_workflow(bundle_dir: str | Path, stage: str, **overrides: Any) -> ConfigWorkflow:
    """The MONAI workflow of ``stage`` (what ``python -m monai.bundle run`` builds from :func:`run_command`), with
    the bundle's metadata and logging configuration, ``bundle_root`` the bundle folder unless overridden; not
    initialised yet."""
    bundle = Path(bundle_dir)
    return ConfigWorkflow(
        config_file=[str(p) for p in stage_files(bundle, stage)],
        meta_file=str(bundle / METADATA),
        logging_file=str(bundle / LOGGING_CONF),
        workflow_type="train" if stage.startswith("train") else "infer",
        **{"bundle_root": str(bundle), **overrides},
    )


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def run_arguments(bundle_dir: str | Path, stage: str, start: str | Path | None = None) -> list[str]:
    """The arguments that name the config files of ``stage`` to ``python -m monai.bundle run``, with paths relative
    to ``start`` (default the bundle folder): ``--config_file`` (a list when there are several files)."""
    bundle = Path(bundle_dir)
    start = bundle if start is None else Path(start)
    files = [_relative(p, start) for p in stage_files(bundle, stage)]
    return ["--config_file", files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"]


def run_command(bundle_dir: str | Path, stage: str, start: str | Path | None = None) -> str:
    """The command a user types in ``start`` (default the bundle folder) to run ``stage``, e.g. ``python -m
    monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']"`` (the bundles' READMEs show
    these)."""
    arguments = run_arguments(bundle_dir, stage, start)
    quoted = [f'"{a}"' if a.startswith("[") else a for a in arguments]
    return " ".join([LAUNCHERS.get(stage, LAUNCHER), *quoted])


def _bundle_of(config_file: Path) -> Path | None:
    """The bundle folder of a config file in a bundle's ``configs`` folder, else ``None``."""
    folder = config_file.parent
    return folder.parent if folder.name == "configs" and (folder / "train.json").is_file() else None


def runs_alone(stage_file: str | Path) -> bool:
    """Whether a bundle's stage file holds every key of its ``train.json`` (a generated ``evaluate.json`` or
    ``inference.json``), so that it runs alone as well as after ``train.json``."""
    stage_file = Path(stage_file)
    keys = [set(json.loads(f.read_text(encoding="utf-8"))) for f in (stage_file, stage_file.parent / "train.json")]
    return stage_file.name != "train.json" and keys[1] <= keys[0]


def _meant_bundle(files: list[Path], start: Path) -> Path | None:
    """The bundle that a ``--config_file`` list means: the bundle of its first ``train.json``, else the folder the
    user is in when it is a bundle, else the bundle of its first file."""
    bundles = [(f, b) for f, b in zip(files, map(_bundle_of, files), strict=True) if b is not None]
    for candidates in (
        [b for f, b in bundles if f.name == "train.json"],
        [start] if (start / "configs" / "train.json").is_file() else [],
        [b for _, b in bundles],
    ):
        if candidates:
            return candidates[0]
    return None


def check_config_files(
    config_files: Sequence[str | os.PathLike], start: str | Path | None = None, options: Sequence[str] = ()
) -> None:
    """Raise :class:`~medkd.errors.ConfigError` when the bundle config files among ``config_files`` (those named
    after a stage, in a bundle's ``configs`` folder) are not :func:`stage_files` of the stage they name: a stage file
    without ``train.json`` (but a generated ``evaluate.json`` or ``inference.json``, which runs alone), or files in the
    wrong order. The message gives the command to run from ``start`` (default the working folder), with the user's
    other ``options``. Other files (the user's own overrides) may come anywhere."""
    start = Path.cwd() if start is None else Path(start)
    files = [(start / Path(f).expanduser()).resolve() for f in config_files]
    given = [f for f in files if f.stem in STAGES and _bundle_of(f) is not None]
    bundle = _meant_bundle(given, start.resolve())
    if bundle is None:
        return
    stage = next((f.stem for f in reversed(given) if f.stem != "train"), "train")
    expected = [p.resolve() for p in stage_files(bundle, stage)]
    if given == expected or given == expected[1:] and runs_alone(expected[-1]):
        return
    command = " ".join([run_command(bundle, stage, start), *options])
    raise ConfigError(
        f"--config_file {', '.join(_relative(f, start) for f in files)}: the {stage} stage of the bundle "
        f"{bundle.name} merges {', '.join(_relative(f, start) for f in expected)}, in this order (a stage "
        f"file adds to train.json). Run: {command}"
    )


def checkpoint_file(network: str) -> str:
    """The file name of a network's best checkpoint in ``ckpt_dir`` (``sp.pt``; the teacher's is
    :data:`TEACHER_CHECKPOINT`)."""
    return f"{network}.pt"


TEACHER_CHECKPOINT = checkpoint_file(TEACHER)


def snapshot_file(network: str, epoch: int) -> str:
    """The file name of a network's snapshot at ``epoch`` in ``ckpt_dir`` (``teacher_epoch10.pt``; see
    :class:`medkd.training.handlers.EpochSnapshots`)."""
    return f"{network}_epoch{epoch}.pt"


def run_folders(root: str | Path) -> dict[str, str]:
    """The overrides that put a run's checkpoints, results and logs under ``root``, as the bundles put them under
    their ``bundle_root``."""
    root = Path(root)
    return {CKPT_DIR: str(root / MODELS_DIR), OUTPUT_DIR: str(root / EVAL_DIR), LOG_DIR: str(root / RUNS_DIR)}
