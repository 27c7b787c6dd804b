"""Compare distillation methods on one bundle: same data split, same teacher checkpoint, several seeds.

``python -m medkd compare bundles/segmentation_2d`` trains the teacher once (``train_teacher`` stage), then every
preset for every seed (``train`` stage with ``--routes_preset``), evaluates each on the test list (``evaluate``
stage) and writes ``results.csv``, ``results.md`` and ``comparison.png``. Runs resume from their checkpoints, so an
interrupted comparison continues where it stopped when the same command is run again (more presets or seeds are
added to it); the files cover every finished run in the output folder, those of earlier commands too. The output
folder's ``fingerprint.json`` records the bundle, the dataset and the ``--set`` overrides: an
output folder made with other ones stops the command, naming what changed; ``--fresh`` moves it aside to start anew.

``--jobs N`` runs the (preset, seed) runs N at a time in worker processes. The runs that do not read the teacher
(:func:`reads_teacher`: the ``student`` and ``dml`` presets, or every run when the teacher trains online from
scratch) start at once, N - 1 at a time beside the teacher, which trains in this process; the others start once it is
trained. Each run has ``--threads`` intra-op threads (default: this process's threads, i.e.
``OMP_NUM_THREADS`` or the cores, divided by N) and, on a machine with several GPUs, its own GPU (round-robin); each
run's output goes to ``<output>/<preset>/seed<k>/compare.log``. The results equal a ``--jobs 1`` run's with the same
``--threads``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from medkd.bundles import (
    CASES_PNG,
    CLASS_NAMES,
    COMPARE_FINGERPRINT,
    COMPARE_LOG,
    DATALISTS,
    DATASET_DIR,
    DEVICE,
    EVAL_DIR,
    IN_CHANNELS,
    MAKE_DEFAULT_DATA,
    MAX_EPOCHS,
    MODELS_DIR,
    NETWORKS,
    PATCH_SIZE,
    RESULTS_CSV,
    RESULTS_JSON,
    ROUTE_GRAPH,
    ROUTES_PRESET,
    SEED,
    STUDENTS,
    STUDENTS_HISTORY,
    TEACHER,
    TEACHER_CKPT,
    TEACHER_DEF,
    TEACHER_EPOCH,
    TEACHER_INIT,
    TEACHER_MODE,
    run_folders,
    stage_config,
    stage_files,
    stage_workflow,
)
from medkd.errors import ConfigError
from medkd.knowledge.routes import PAPER_PRESETS, PRESETS
from medkd.knowledge.teacher import teacher_checkpoint, teacher_is_read
from medkd.tools.jobs import Job, JobPool, JobsFailed, threads_per_job, visible_gpus
from medkd.tools.overlays import OVERLAYS_DIR, methods_page
from medkd.tools.report import inference_ms, write_comparison
from medkd.training.evaluators import ENSEMBLE, ensemble_members
from medkd.training.previous import set_aside
from medkd.training.run_fingerprint import datalist_digest, fingerprint_changes
from medkd.validation import check_overrides, check_writable, parse_value

__all__ = ["compare", "compare_fingerprint", "claim_output", "reads_teacher", "run_settings", "add_compare_parser"]

logger = logging.getLogger("medkd.tools.compare")
# what a worker imports as it starts, while the teacher trains: what every run's stages import anyway
WORKER_PRELOAD = ("medkd.tools.compare", "medkd.training.engines", "medkd.training.handlers", "monai.bundle")


def _run_stage(bundle: Path, stage: str, overrides: Mapping[str, Any]) -> None:
    workflow = stage_workflow(bundle, stage, **overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def _run_dir(output: Path, preset: str, seed: int | str) -> Path:
    """The folder of one (preset, seed) run of a comparison."""
    return output / preset / f"seed{seed}"


def _results(root: Path) -> list[dict]:
    return json.loads((root / EVAL_DIR / RESULTS_JSON).read_text(encoding="utf-8"))


def run_settings(
    output: Path, preset: str, seed: int, common: Mapping[str, Any], max_epochs: int | None = None
) -> dict[str, Any]:
    """The overrides of one (preset, seed) run of a comparison in ``output``: ``common`` (every ``--set``), the run's
    folders, preset and seed, the comparison's teacher (its snapshot of ``teacher_epoch`` when ``common`` sets one)
    and ``max_epochs`` (``--max-epochs``). Only the preset and the seed differ between runs, so every preset, the
    ``student`` baseline included, trains for the same epochs and steps per epoch."""
    teacher_ckpt = teacher_checkpoint(output / TEACHER / MODELS_DIR, common.get(TEACHER_EPOCH))
    settings = {**common, **run_folders(_run_dir(output, preset, seed))}
    settings.update({ROUTES_PRESET: preset, SEED: seed, TEACHER_CKPT: teacher_ckpt})
    if max_epochs:
        settings[MAX_EPOCHS] = max_epochs
    return settings


def _train_and_evaluate(bundle: Path, run_dir: Path, settings: Mapping[str, Any]) -> list[dict]:
    """One (preset, seed) run: the ``train`` stage, then the ``evaluate`` stage of its students; their results."""
    _run_stage(bundle, "train", settings)
    _run_stage(bundle, "evaluate", {**settings, NETWORKS: f"@{STUDENTS}"})
    return _results(run_dir)


def reads_teacher(bundle: str | Path, overrides: Mapping[str, Any]) -> bool:
    """Whether the distillation (``train`` stage) with ``overrides`` reads the trained teacher's checkpoint: a route
    takes knowledge from a frozen teacher, or an online teacher starts from the checkpoint. The runs that do not
    (e.g. the ``student`` and ``dml`` presets with a frozen teacher) need not wait for the teacher."""
    parser = stage_config(Path(bundle), "train", overrides)
    if parser.get_parsed_content(TEACHER_INIT) != "checkpoint":
        return False
    return teacher_is_read(parser.get_parsed_content(TEACHER_MODE), parser.get_parsed_content(ROUTE_GRAPH))


def _bundle_networks(bundle: Path, overrides: Mapping[str, Any]) -> tuple[dict[str, torch.nn.Module], list[int]]:
    parser = stage_config(bundle, "train", overrides)
    networks = {TEACHER: parser.get_parsed_content(TEACHER_DEF), **parser.get_parsed_content(STUDENTS)}
    shape = [1, parser.get_parsed_content(IN_CHANNELS), *parser.get_parsed_content(PATCH_SIZE)]
    return {k: v.cpu() for k, v in networks.items()}, shape


def _earlier_runs(output: Path, runs: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """The finished (evaluated) runs of earlier commands in ``output`` that are not among ``runs``: the comparison
    covers them too (the folder's fingerprint says they were made with the same bundle, data and overrides)."""
    found = []
    for path in output.glob(f"*/seed*/{EVAL_DIR}/{RESULTS_JSON}"):
        preset, seed = path.parts[-4], path.parts[-3].removeprefix("seed")
        if preset in PRESETS and seed.isdigit() and (preset, int(seed)) not in runs:
            found.append((preset, int(seed)))
    return found


def _curves(output: Path, runs: Sequence[tuple[str, int]]) -> dict[tuple[str, int], Path]:
    """The students' validation history of each run that wrote one."""
    paths = {run: _run_dir(output, *run) / EVAL_DIR / STUDENTS_HISTORY for run in runs}
    return {run: path for run, path in paths.items() if path.is_file()}


def compare_fingerprint(bundle: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a comparison's results depend on besides its presets, seeds and epochs: the bundle folder, the dataset
    folder, the content of its data lists (training, validation and test) and the other config overrides. The
    bundle's default data is generated first if it is used and missing (as its first stage would)."""
    overrides = dict(overrides or {})
    parser = stage_config(Path(bundle).resolve(), "train", overrides)
    parser.get_parsed_content(MAKE_DEFAULT_DATA)
    datalist = parser.get_parsed_content(DATALISTS)
    fingerprint = {
        "bundle": str(Path(bundle).resolve()),
        "dataset_dir": str(Path(parser.get_parsed_content(DATASET_DIR)).expanduser().resolve()),
        "data": datalist_digest(datalist, keys=("training", "validation", "test")),
        "settings": {k: v for k, v in overrides.items() if k != DATASET_DIR},
    }
    return json.loads(json.dumps(fingerprint, default=str))


def claim_output(output: str | Path, fingerprint: Mapping[str, Any], fresh: bool = False) -> None:
    """Make ``output`` the folder of the comparison with ``fingerprint`` (written to ``output/fingerprint.json``).

    An output folder holding a comparison with another fingerprint (or results without a fingerprint, from an older
    medkd) raises :class:`~medkd.errors.ConfigError` naming what changed, unless ``fresh``: then the folder is renamed
    with a timestamp (``results`` -> ``results.20261126-101500``) and a new one started.
    """
    output = Path(output).resolve()
    path = output / COMPARE_FINGERPRINT
    used = path.is_file() or (output / TEACHER).exists() or (output / RESULTS_CSV).is_file()
    if used and fresh:
        cwd = Path.cwd().resolve()
        if output == cwd or output in cwd.parents:
            raise ConfigError(
                f"--fresh cannot move {output} aside: it holds the current folder; pass another --output."
            )
        moved = set_aside([output])[output]
        logger.warning("--fresh: the previous comparison in %s was moved aside to %s", output, moved)
    elif used:
        choices = (
            f"Its results stay as they are. Pass another --output, or --fresh to move {output} aside (renamed with a "
            "timestamp) and start again there."
        )
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            raise ConfigError(
                f"{output} holds results of a comparison but no readable fingerprint.json (an older medkd wrote none), "
                f"so it cannot be told whether they were made with these settings. {choices}"
            ) from None
        changes = fingerprint_changes(previous, fingerprint)
        if changes:
            listed = "".join(f"\n  - {c}" for c in changes)
            raise ConfigError(f"{output} holds a comparison made with other settings ({path}):{listed}\n{choices}")
    output.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fingerprint, indent=2) + "\n")


def compare(
    bundle: str | Path,
    presets: Sequence[str] = PAPER_PRESETS,
    seeds: Sequence[int] = (0, 1, 2),
    output: str | Path = "results",
    max_epochs: int | None = None,
    teacher_epochs: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    fresh: bool = False,
    jobs: int = 1,
    threads: int | None = None,
) -> list[dict]:
    """Run the comparison and write its files to ``output``; return one row per (preset, seed, network).

    Args:
        bundle: bundle folder.
        presets: routes presets to compare (see :data:`medkd.knowledge.routes.PRESETS`; default the paper's six,
            :data:`medkd.knowledge.routes.PAPER_PRESETS`).
        seeds: random seeds; each preset is trained once per seed.
        output: folder of every run, of ``results.csv``, ``results.md`` and ``comparison.png``.
        max_epochs: distillation epochs (default: the bundle's).
        teacher_epochs: teacher epochs (default: the bundle's).
        overrides: more config overrides for every stage (e.g. ``{"dataset_dir": "/data/mine"}``).
        fresh: move an existing ``output`` folder aside first (see :func:`claim_output`); without it, an ``output``
            made with another bundle, dataset or overrides stops the comparison with a ``ConfigError``.
        jobs: (preset, seed) runs at a time (the teacher counting as one), each in a worker process logging to
            ``<output>/<preset>/seed<k>/compare.log``, spread over the GPUs (:mod:`medkd.tools.jobs`); 1: one after
            another in this process. A failed run raises :class:`medkd.tools.jobs.JobsFailed` naming each failed
            run once the running ones finish; a rerun resumes them all.
        threads: intra-op threads of each run (default: this process's threads divided by ``jobs``); identical
            results need the same ``threads`` (CPU kernels sum in an order that depends on it).
    """
    bundle, output = Path(bundle).resolve(), Path(output).resolve()
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        raise ConfigError(f"--presets: unknown {unknown}; choose from {', '.join(PRESETS)}.")
    if jobs < 1 or (threads is not None and threads < 1):
        raise ConfigError(f"--jobs and --threads must be at least 1, got --jobs {jobs}, --threads {threads}.")
    common = dict(overrides or {})
    check_overrides(stage_files(bundle, "evaluate"), common)
    check_writable({"output": output}, root_key=None)
    claim_output(output, compare_fingerprint(bundle, common), fresh=fresh)
    teacher_dir = output / TEACHER
    runs = [(preset, seed) for seed in seeds for preset in presets]
    todo = []
    for preset, seed in runs:
        run_dir, settings = _run_dir(output, preset, seed), run_settings(output, preset, seed, common, max_epochs)
        todo.append(Job((preset, seed), f"{preset} seed {seed}", _train_and_evaluate, (bundle, run_dir, settings),
                        run_dir / COMPARE_LOG))  # fmt: skip
    rows: list[dict] = []
    if jobs > 1:
        threads = threads or threads_per_job(jobs)
    workers = JobPool(jobs, threads, visible_gpus(DEVICE in common), preload=WORKER_PRELOAD)
    with tqdm(total=len(runs) + 1, desc="compare", unit="run") as bar, workers:  # the workers start up meanwhile
        start = time.perf_counter()
        schedule = None
        if jobs > 1:  # the runs that do not read the teacher start now, beside it (it keeps one worker's share)
            free = {preset for preset in presets if not reads_teacher(bundle, {**common, ROUTES_PRESET: preset})}
            waiting = [job.key for job in todo if job.key[0] not in free]
            logs = _run_dir(output, "<preset>", "<k>") / COMPARE_LOG
            bar.write(
                f"{len(todo)} runs, {jobs} at a time, {threads} threads each ({len(todo) - len(waiting)} start while "
                f"the teacher trains, {len(waiting)} after it); their output: {logs}"
            )
            schedule = workers.start(todo, bar, held=waiting, reserve=1)
        bar.set_postfix_str("teacher")
        rows += _teacher_rows(bundle, teacher_dir, common, teacher_epochs, schedule)
        bar.update()
        teacher_s = time.perf_counter() - start
        if schedule is not None:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the teacher's cached memory, for the workers
            results = schedule.wait()  # the held runs start now
        else:
            results = workers.run(todo, bar)
        logger.info(
            "the teacher took %.1f s, the %d runs ended %.1f s after it (%d at a time)",
            teacher_s, len(todo), time.perf_counter() - start - teacher_s, jobs,
        )  # fmt: skip
    return _report(bundle, output, runs, results, rows, common)


def _teacher_rows(
    bundle: Path, teacher_dir: Path, common: Mapping[str, Any], teacher_epochs: int | None, schedule: Any
) -> list[dict]:
    """Train the teacher (``train_teacher`` stage) and evaluate it; its result rows. A failure stops the runs
    scheduled beside it (``schedule``) after those in progress finish, and is raised."""
    try:
        epochs = {MAX_EPOCHS: teacher_epochs} if teacher_epochs else {}
        _run_stage(bundle, "train_teacher", {**common, **run_folders(teacher_dir), **epochs})
        teacher_eval = {**common, **run_folders(teacher_dir), NETWORKS: "${'teacher': @teacher}"}
        _run_stage(bundle, "evaluate", teacher_eval)
    except BaseException as error:
        if schedule is not None:
            logger.error("the teacher failed (%s); the runs in progress finish first, a rerun resumes", error)
            schedule.stop()
        raise
    return [{**r, "preset": "-", "seed": "-"} for r in _results(teacher_dir)]


def _report(
    bundle: Path,
    output: Path,
    runs: list[tuple[str, int]],
    results: dict,
    rows: list[dict],
    common: Mapping[str, Any],
) -> list[dict]:
    """Add the earlier finished runs in ``output`` and every run's rows to ``rows``, time the networks and write the
    comparison's files (:func:`medkd.tools.report.write_comparison`, the cases page); the rows."""
    if earlier := _earlier_runs(output, runs):
        listed = ", ".join(f"{preset} seed {seed}" for preset, seed in sorted(earlier))
        logger.info("the results also cover %d earlier finished runs in %s: %s", len(earlier), output, listed)
        results.update({run: _results(_run_dir(output, *run)) for run in earlier})
    runs = sorted([*runs, *earlier], key=lambda run: (run[1], PRESETS.index(run[0])))
    rows += [{**r, "preset": preset, "seed": seed} for preset, seed in runs for r in results[(preset, seed)]]
    networks, shape = _bundle_networks(bundle, common)
    ms = inference_ms(networks, shape)
    ms[ENSEMBLE] = sum(ms[name] for name in ensemble_members(networks))  # each student runs once
    for row in rows:
        row["ms_per_image"] = ms[row["network"]]
    evals = {run: _run_dir(output, *run) / EVAL_DIR for run in runs}
    write_comparison(rows, _curves(output, runs), output, evals)
    _cases_page(bundle, output, runs, common)
    return rows


def _cases_page(bundle: Path, output: Path, runs: Sequence[tuple[str, int]], overrides: Mapping[str, Any]) -> None:
    """``cases.png``: the worst test cases of the first seed's runs, each method's ensemble side by side
    (:func:`medkd.tools.overlays.methods_page`), where the evaluations drew their cases (segmentation)."""
    seed = runs[0][1]
    folders = {preset: _run_dir(output, preset, s) / EVAL_DIR for preset, s in runs if s == seed}
    if all((folder / OVERLAYS_DIR).is_dir() for folder in folders.values()):
        class_names = stage_config(bundle, "train", overrides).get_parsed_content(CLASS_NAMES)
        methods_page(folders, output / CASES_PNG, class_names)


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = parse_value(value)
    return overrides


def _compare_command(args: argparse.Namespace) -> int:
    overrides = _parse_set(args.set)
    if args.dataset_dir:
        overrides[DATASET_DIR] = args.dataset_dir
    try:
        compare(
            args.bundle,
            presets=[p.strip() for p in args.presets.split(",") if p.strip()],
            seeds=list(range(args.seeds)),
            output=args.output,
            max_epochs=args.max_epochs,
            teacher_epochs=args.teacher_epochs,
            overrides=overrides,
            fresh=args.fresh,
            jobs=args.jobs,
            threads=args.threads,
        )
    except JobsFailed as error:  # each run's error in one line; a bug's traceback is in the run's log
        print(f"ERROR: {error}\nFix them and run the same command again: finished runs are kept.", file=sys.stderr)
        return 1
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``python -m medkd compare``."""
    p = subparsers.add_parser(
        "compare",
        help="compare distillation methods (presets) on a bundle over several seeds",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle", help="bundle folder, e.g. bundles/segmentation_2d")
    p.add_argument(
        "--presets",
        default=",".join(PAPER_PRESETS),
        help=f"comma-separated presets of {PRESETS} (default: the paper's six, {','.join(PAPER_PRESETS)})",
    )
    p.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default 3)")
    p.add_argument("--output", default="results", help="output folder (default ./results)")
    p.add_argument("--max-epochs", type=int, default=None, help="distillation epochs (default: the bundle's)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (default: the bundle's)")
    p.add_argument(
        "--dataset-dir",
        default=None,
        help="your data: folder holding dataset.json (default: the bundle's embedded data)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any bundle config override")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="move an existing --output folder aside (renamed with a timestamp) and start anew; needed when it was "
        "made with another bundle, dataset or --set overrides",
    )
    p.add_argument(
        "--jobs",
        type=_positive,
        default=1,
        help="run this many (preset, seed) runs at a time in worker processes (those that do not read the teacher "
        "start beside it), spread over the GPUs if there are several (default 1: one after another)",
    )
    p.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="CPU threads of each run (default: OMP_NUM_THREADS or the cores, divided by --jobs); results are "
        "identical for any --jobs with the same --threads",
    )
    p.set_defaults(handler=_compare_command)
    return p
