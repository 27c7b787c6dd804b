"""Compare distillation methods on one bundle: same data split, same teacher checkpoint, several seeds.

``python -m medkd compare bundles/segmentation_2d`` trains the teacher once (``train_teacher`` stage), then every
preset for every seed (``train`` stage with ``--routes_preset``), evaluates each on the test list (``evaluate``
stage) and writes ``results.csv``, ``results.md`` and ``comparison.png``. Runs resume from their checkpoints, so an
interrupted comparison continues where it stopped when the same command is run again (more presets or seeds are
added to it). The output folder's ``fingerprint.json`` records the bundle, the dataset and the ``--set`` overrides: an
output folder made with other ones stops the command, naming what changed; ``--fresh`` moves it aside to start anew.

``--jobs N`` runs the (preset, seed) runs N at a time in worker processes once the teacher is trained, each with
``--threads`` intra-op threads (default: this process's threads, i.e. ``OMP_NUM_THREADS`` or the cores, divided by
N) and, on a machine with several GPUs, its own GPU (round-robin); each run's output goes to
``<output>/<preset>/seed<k>/compare.log``. The results equal a ``--jobs 1`` run's with the same ``--threads``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigWorkflow
from tqdm.auto import tqdm

from medkd.bundles import stage_config, stage_files
from medkd.checkpoints import set_aside
from medkd.errors import ConfigError
from medkd.evaluators import METRICS, split_metric_name
from medkd.fingerprint import datalist_digest, fingerprint_changes
from medkd.jobs import Job, JobsFailed, run_jobs, threads_per_job, visible_gpus
from medkd.report import markdown_table
from medkd.routes import PRESETS
from medkd.validation import check_overrides

__all__ = ["compare", "compare_fingerprint", "claim_output", "summarize", "plot_comparison", "add_compare_parser"]

logger = logging.getLogger("medkd.compare")


def _run_stage(bundle: Path, stage: str, overrides: Mapping[str, Any]) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=[str(p) for p in stage_files(bundle, stage)],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        workflow_type="train" if stage.startswith("train") else "infer",
        bundle_root=str(bundle),
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


def _dirs(root: Path) -> dict[str, str]:
    return {"ckpt_dir": str(root / "models"), "output_dir": str(root / "eval"), "log_dir": str(root / "runs")}


def _results(root: Path) -> list[dict]:
    return json.loads((root / "eval" / "results.json").read_text())


def _train_and_evaluate(bundle: Path, run_dir: Path, settings: Mapping[str, Any]) -> list[dict]:
    """One (preset, seed) run: the ``train`` stage, then the ``evaluate`` stage of its students; their results."""
    _run_stage(bundle, "train", settings)
    _run_stage(bundle, "evaluate", {**settings, "networks": "@students"})
    return _results(run_dir)


def inference_ms(networks: Mapping[str, torch.nn.Module], input_shape: Sequence[int], repeats: int = 20) -> dict:
    """Median CPU/GPU forward time in ms of each network on one input of ``input_shape`` (batch 1)."""
    times = {}
    x = torch.rand(*input_shape)
    for name, net in networks.items():
        net.eval()
        with torch.no_grad():
            for _ in range(3):
                net(x)
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                net(x)
                samples.append((time.perf_counter() - start) * 1000)
        times[name] = statistics.median(samples)
    return times


def _bundle_networks(bundle: Path, overrides: Mapping[str, Any]) -> tuple[dict[str, torch.nn.Module], list[int]]:
    parser = stage_config(bundle, "train", overrides)
    networks = {"teacher": parser.get_parsed_content("teacher_def"), **parser.get_parsed_content("students")}
    shape = [1, parser.get_parsed_content("in_channels"), *parser.get_parsed_content("patch_size")]
    return {k: v.cpu() for k, v in networks.items()}, shape


def compare_fingerprint(bundle: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a comparison's results depend on besides its presets, seeds and epochs: the bundle folder, the dataset
    folder, the content of its data lists (training, validation and test) and the other config overrides. The
    bundle's default data is generated first if it is used and missing (as its first stage would)."""
    overrides = dict(overrides or {})
    parser = stage_config(Path(bundle).resolve(), "train", overrides)
    parser.get_parsed_content("make_default_data")
    datalist = parser.get_parsed_content("datalists")
    fingerprint = {
        "bundle": str(Path(bundle).resolve()),
        "dataset_dir": str(Path(parser.get_parsed_content("dataset_dir")).expanduser().resolve()),
        "data": datalist_digest(datalist, keys=("training", "validation", "test")),
        "settings": {k: v for k, v in overrides.items() if k != "dataset_dir"},
    }
    return json.loads(json.dumps(fingerprint, default=str))


def claim_output(output: str | Path, fingerprint: Mapping[str, Any], fresh: bool = False) -> None:
    """Make ``output`` the folder of the comparison with ``fingerprint`` (written to ``output/fingerprint.json``).

    An output folder holding a comparison with another fingerprint (or results without a fingerprint, from an older
    medkd) raises :class:`~medkd.errors.ConfigError` naming what changed, unless ``fresh``: then the folder is renamed
    with a timestamp (``results`` -> ``results.20261126-101500``) and a new one started.
    """
    output = Path(output).resolve()
    path = output / "fingerprint.json"
    used = path.is_file() or (output / "teacher").exists() or (output / "results.csv").is_file()
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
    presets: Sequence[str] = PRESETS,
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
        presets: routes presets to compare (see :data:`medkd.routes.PRESETS`).
        seeds: random seeds; each preset is trained once per seed.
        output: folder of every run, of ``results.csv``, ``results.md`` and ``comparison.png``.
        max_epochs: distillation epochs (default: the bundle's).
        teacher_epochs: teacher epochs (default: the bundle's).
        overrides: more config overrides for every stage (e.g. ``{"dataset_dir": "/data/mine"}``).
        fresh: move an existing ``output`` folder aside first (see :func:`claim_output`); without it, an ``output``
            made with another bundle, dataset or overrides stops the comparison with a ``ConfigError``.
        jobs: after the teacher, run this many (preset, seed) runs at a time, each in a worker process writing its
            output to ``<output>/<preset>/seed<k>/compare.log``; spread over the GPUs when there are several and no
            ``device`` override (see :mod:`medkd.jobs`). 1: one after another in this process, printing as they go.
            A failed run raises :class:`medkd.jobs.JobsFailed` naming each failed (preset, seed) after the running
            ones finish (runs not started yet are cancelled); a rerun resumes them all.
        threads: intra-op threads of each (preset, seed) run (the teacher keeps this process's). Default: this
            process's threads divided by ``jobs``; with ``jobs=1``, this process's. The float reductions of CPU
            kernels depend on the thread count, so identical results need the same ``threads``.
    """
    bundle, output = Path(bundle).resolve(), Path(output).resolve()
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        raise ValueError(f"unknown presets {unknown}; choose from {', '.join(PRESETS)}.")
    if jobs < 1 or (threads is not None and threads < 1):
        raise ValueError(f"jobs and threads must be at least 1, got jobs={jobs}, threads={threads}.")
    common = dict(overrides or {})
    check_overrides(stage_files(bundle, "evaluate"), common)
    claim_output(output, compare_fingerprint(bundle, common), fresh=fresh)
    teacher_dir = output / "teacher"
    teacher_ckpt = str(teacher_dir / "models" / "teacher.pt")
    runs = [(preset, seed) for seed in seeds for preset in presets]
    rows: list[dict] = []
    with tqdm(total=len(runs) + 1, desc="compare", unit="run") as bar:
        bar.set_postfix_str("teacher")
        epochs = {"max_epochs": teacher_epochs} if teacher_epochs else {}
        _run_stage(bundle, "train_teacher", {**common, **_dirs(teacher_dir), **epochs})
        teacher_eval = {**common, **_dirs(teacher_dir), "networks": "${'teacher': @teacher}"}
        _run_stage(bundle, "evaluate", teacher_eval)
        rows += [{**r, "preset": "-", "seed": "-"} for r in _results(teacher_dir)]
        bar.update()
        todo = []
        for preset, seed in runs:
            run_dir = output / preset / f"seed{seed}"
            settings = {**common, **_dirs(run_dir), "routes_preset": preset, "seed": seed, "teacher_ckpt": teacher_ckpt}
            if max_epochs:
                settings["max_epochs"] = max_epochs
            name, args = f"{preset} seed {seed}", (bundle, run_dir, settings)
            todo.append(Job((preset, seed), name, _train_and_evaluate, args, run_dir / "compare.log"))
        start = time.perf_counter()
        if jobs > 1:
            threads = threads or threads_per_job(jobs)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the teacher's cached memory, for the workers
            logs = output / "<preset>" / "seed<k>" / "compare.log"
            bar.write(f"{len(todo)} runs, {jobs} at a time, {threads} threads each; their output: {logs}")
        results = run_jobs(todo, jobs, threads, visible_gpus("device" in common), bar)
        logger.info("%d runs took %.1f s (%d at a time)", len(todo), time.perf_counter() - start, jobs)
        rows += [{**r, "preset": preset, "seed": seed} for preset, seed in runs for r in results[(preset, seed)]]
    networks, shape = _bundle_networks(bundle, common)
    ms = inference_ms(networks, shape)
    for row in rows:
        row["ms_per_image"] = ms[row["network"]]
    _write(rows, output, presets, seeds)
    return rows


def _write(rows: list[dict], output: Path, presets: Sequence[str], seeds: Sequence[int]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with (output / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    table = summarize(rows)
    (output / "results.md").write_text(table + "\n")
    curves = {
        (p, s): output / p / f"seed{s}" / "eval" / "history_students.csv"
        for p in presets
        for s in seeds
        if (output / p / f"seed{s}" / "eval" / "history_students.csv").is_file()
    }
    plot_comparison(rows, curves, output / "comparison.png")
    print(f"\nMethod comparison ({output / 'results.md'}, plot {output / 'comparison.png'}):\n{table}\n", flush=True)


def _metric(rows: Sequence[Mapping]) -> str:
    return next(m for m in METRICS if any(m in r for r in rows))


def _mean_std(values: Sequence[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def _score_columns(rows: Sequence[Mapping]) -> list[str]:
    """The metrics found in ``rows``, then their per-class columns (``"mean_dice:<class>"``), in first-seen order."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    metrics = [m for m in METRICS if m in keys]
    return metrics + [k for k in keys if ":" in k and k.split(":")[0] in metrics]


def summarize(rows: Sequence[Mapping]) -> str:
    """Markdown table: per preset and network, mean ± std over seeds of each metric (and of each class's score, where
    the evaluation reported them), parameters, ms per image."""
    metrics = _score_columns(rows)
    groups: dict[tuple[str, str], list[Mapping]] = {}
    for r in rows:
        groups.setdefault((str(r["preset"]), str(r["network"])), []).append(r)
    table = []
    for (preset, network), group in groups.items():
        line: dict[str, Any] = {"method": "teacher" if preset == "-" else preset, "network": network}
        line["seeds"] = len(group)
        for m in metrics:
            values = [float(r[m]) for r in group if r.get(m) not in (None, "")]
            line[m] = _mean_std(values) if values else None
        line["params"] = group[0].get("params")
        line["ms/image"] = f"{float(group[0]['ms_per_image']):.2f}" if "ms_per_image" in group[0] else None
        table.append(line)
    return markdown_table(table)


def plot_comparison(rows: Sequence[Mapping], curves: Mapping[tuple[str, int], Path], path: Path) -> None:
    """Bar chart (mean ± std per preset and student, teacher as a line) and validation curves, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = _metric(rows)
    students = list(dict.fromkeys(str(r["network"]) for r in rows if r["preset"] != "-"))
    presets = list(dict.fromkeys(str(r["preset"]) for r in rows if r["preset"] != "-"))
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(len(students), 1)
    for i, student in enumerate(students):
        values = [[float(r[metric]) for r in rows if r["preset"] == p and r["network"] == student] for p in presets]
        means = [statistics.mean(v) if v else 0.0 for v in values]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        xs = [j + (i - (len(students) - 1) / 2) * width for j in range(len(presets))]
        bars.bar(xs, means, width, yerr=stds, capsize=3, label=student)
    for r in rows:
        if r["preset"] == "-":
            bars.axhline(float(r[metric]), color="black", linestyle="--", label=f"teacher ({float(r[metric]):.3f})")
    scores = [float(r[metric]) for r in rows]
    span = max(scores) - min(scores)
    bars.set_ylim(max(0.0, min(scores) - max(span, 0.02)), min(1.0, max(scores) + max(span, 0.02)))
    bars.set_xticks(range(len(presets)), presets, rotation=20)
    bars.set_ylabel(f"test {metric}")
    bars.set_title("test score, mean ± std over seeds")
    bars.legend(fontsize=8)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (preset, _seed), csv_path in sorted(curves.items()):
        with csv_path.open(newline="") as f:
            history = list(csv.DictReader(f))
        color = colors[presets.index(preset) % len(colors)]
        for student, style in zip(students, ("-", "--", ":", "-."), strict=False):
            key = next((k for k in history[0] if (split_metric_name(k) or ("", ""))[1] == student), None)
            if key:
                epochs = [int(h["epoch"]) for h in history]
                lines.plot(epochs, [float(h[key]) for h in history], style, color=color, alpha=0.8, linewidth=1)
    for preset in presets:
        lines.plot([], [], color=colors[presets.index(preset) % len(colors)], label=preset)
    for student, style in zip(students, ("-", "--", ":", "-."), strict=False):
        lines.plot([], [], style, color="gray", label=student)
    lines.set_xlabel("epoch")
    lines.set_ylabel(f"validation {metric}")
    lines.set_title("validation curves (every seed)")
    lines.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def _compare_command(args: argparse.Namespace) -> int:
    overrides = _parse_set(args.set)
    if args.dataset_dir:
        overrides["dataset_dir"] = args.dataset_dir
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
    p.add_argument("--presets", default=",".join(PRESETS), help=f"comma-separated presets (default: all: {PRESETS})")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default 3)")
    p.add_argument("--output", default="results", help="output folder (default ./results)")
    p.add_argument("--max-epochs", type=int, default=None, help="distillation epochs (default: the bundle's)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (default: the bundle's)")
    p.add_argument("--dataset-dir", default=None, help="your data: folder holding dataset.json (default: generated)")
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
        help="after the teacher, run this many (preset, seed) runs at a time in worker processes, spread over the "
        "GPUs if there are several (default 1: one after another)",
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
