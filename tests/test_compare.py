"""The method comparison on tiny data (one run at a time and side by side), and the README's routes example."""

import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from bundle_utils import BUNDLES, REPO, TINY
from monai.networks.nets import UNet

from medkd.__main__ import build_parser
from medkd.bundles import stage_config
from medkd.data.synthetic import ensure_segmentation_data
from medkd.errors import user_error
from medkd.knowledge.features import FeatureExtractor, default_feature_layer
from medkd.knowledge.routes import PAPER_PRESETS, PRESETS, KnowledgeRoutes, parse_routes
from medkd.tools.compare import _bundle_networks, claim_output, compare, compare_fingerprint, reads_teacher
from medkd.tools.jobs import Job, JobPool, JobsFailed, run_jobs
from medkd.validation import parse_value


def test_timing_input_is_the_bundles_patch_size():
    classes = ["background", "a", "b"]  # instead of reading a datalist (none in a fresh clone)
    nets, shape = _bundle_networks(BUNDLES / "segmentation_3d", {"patch_size": [24, 24, 16], "class_names": classes})
    assert shape == [1, 1, 24, 24, 16] and {"teacher", "sp", "sf"} <= set(nets)
    overrides = {"patch_size": [48, 40], "class_names": classes[:2]}
    _, shape = _bundle_networks(BUNDLES / "classification_2d", overrides)  # the size images are resized to
    assert shape == [1, 1, 48, 40]


@pytest.mark.parametrize(
    "text, value",
    [
        ("False", False),  # once read as the text "False", which a bundle took as true
        ("true", True),
        ("None", None),
        ("1e-3", 0.001),
        ("[128,128]", [128, 128]),
        ("{'mode': 'max-autotune'}", {"mode": "max-autotune"}),
        ('{"dtype": "bf16"}', {"dtype": "bf16"}),
        ("/data/my set", "/data/my set"),
        ("$@output_dir + '/x'", "$@output_dir + '/x'"),
    ],
)
def test_set_values_are_read_as_the_bundle_command_line_reads_them(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_the_runs_that_read_the_teacher_are_those_of_its_routes_or_of_an_online_teacher_from_its_checkpoint():
    bundle, tiny = BUNDLES / "segmentation_2d", {**TINY["segmentation_2d"], "class_names": ["background", "a", "b"]}
    found = {preset: reads_teacher(bundle, {**tiny, "routes_preset": preset}) for preset in PRESETS}
    teacher_presets = ("kd", "fitnets", "kd_dml", "diversified", "cwd", "dist", "diversified_cwd")
    assert found == {preset: preset in teacher_presets for preset in PRESETS}
    online = {**tiny, "routes_preset": "student", "teacher_mode": "online"}
    assert reads_teacher(bundle, {**online, "teacher_init": "checkpoint"})  # the online teacher starts from it
    assert not reads_teacher(bundle, online)  # an online teacher starts from scratch by default
    assert not reads_teacher(BUNDLES / "classification_2d", {"routes_preset": "dml", "class_names": ["a", "b"]})


def test_compare_runs_the_papers_presets_unless_told_otherwise():
    assert build_parser().parse_args(["compare", "bundles/x"]).presets.split(",") == list(PAPER_PRESETS)
    assert set(PAPER_PRESETS) < set(PRESETS)  # the others (cwd, dist, ...) when named in --presets


def test_compare_writes_csv_table_and_plot(tmp_path):
    overrides = {**TINY["segmentation_2d"], "dataset_dir": str(tmp_path / "data")}
    ensure_segmentation_data(str(tmp_path / "data"), spatial_dims=2, size=48, counts=(4, 2, 2))
    rows = compare(
        BUNDLES / "segmentation_2d",
        presets=["student", "diversified"],
        seeds=[0],
        output=tmp_path / "out",
        max_epochs=1,
        teacher_epochs=1,
        overrides=overrides,
    )
    with (tmp_path / "out" / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == 1 + 2 * 3  # teacher + 2 presets x (2 students and their ensemble)
    assert {(r["preset"], r["network"]) for r in table} == {
        ("-", "teacher"), ("student", "sp"), ("student", "sf"), ("student", "ensemble"),
        ("diversified", "sp"), ("diversified", "sf"), ("diversified", "ensemble"),
    }  # fmt: skip
    for r in table:
        for key in ("mean_dice", "params", "ms_per_image"):
            assert math.isfinite(float(r[key])), (key, r)
        assert 0.0 <= float(r["mean_dice"]) <= 1.0
    md = (tmp_path / "out" / "results.md").read_text()
    assert md.startswith("| method | network | seeds | mean_dice | mean_dice:dim_object | mean_dice:bright_object |")
    scores = r"(?:(?:\d+\.\d{4}|nan) \| ){9}"  # one seed: the mean alone; Dice, HD95 and NSD, each with 2 classes
    assert re.search(rf"\| diversified \| sp \| 1 \| {scores}\d+ \| \d+\.\d\d \|", md), md
    assert re.search(rf"\| diversified \| ensemble \| 1 \| {scores}\d+ \| \d+\.\d\d \|", md), md
    dice = {(r["preset"], r["network"]): float(r["mean_dice"]) for r in table}
    interval, gap = r"\[[-+]\d\.\d{4}, [-+]\d\.\d{4}\]", r"(–|-?\d+%)"
    for network in ("sp", "sf", "ensemble"):  # the gain over the same network trained alone, same seed
        gain = dice[("diversified", network)] - dice[("student", network)]
        cells = rf"{re.escape(f'{gain:+.4f}')}( \(n\.s\.\))? \| {interval} \| {int(gain > 0)}/1 \| {gap}"
        line = rf"\| diversified \| {network} \| 1 \| {cells} \|"
        assert re.search(line, md), md
    assert (tmp_path / "out" / "cases.png").read_bytes().startswith(b"\x89PNG")  # the same cases across the methods
    png = (tmp_path / "out" / "comparison.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    fingerprint = json.loads((tmp_path / "out" / "fingerprint.json").read_text())  # what a rerun must match
    assert fingerprint["dataset_dir"] == str((tmp_path / "data").resolve()) and "seed" not in fingerprint["settings"]


def test_a_rerun_with_fewer_presets_keeps_the_earlier_runs_in_the_results(tmp_path, capfd):
    overrides = {**TINY["segmentation_2d"], "dataset_dir": str(tmp_path / "data")}
    ensure_segmentation_data(str(tmp_path / "data"), spatial_dims=2, size=48, counts=(4, 2, 2))
    settings = {"seeds": [0], "output": tmp_path / "out", "max_epochs": 1, "teacher_epochs": 1, "overrides": overrides}
    compare(BUNDLES / "segmentation_2d", presets=["student"], **settings)
    rows = compare(BUNDLES / "segmentation_2d", presets=["kd"], **settings)  # issue 26: student's rows were lost
    assert [(r["preset"], r["network"]) for r in rows][:4] == [
        ("-", "teacher"), ("student", "sp"), ("student", "sf"), ("student", "ensemble")
    ]  # fmt: skip
    with (tmp_path / "out" / "results.csv").open() as f:
        assert {r["preset"] for r in csv.DictReader(f)} == {"-", "student", "kd"}
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| student | sp | 1 |" in md and "| kd | sp | 1 | " in md and "Gain in mean_dice over the students" in md
    log = "".join(capfd.readouterr())  # the bundles' logging.conf sends medkd's log to the console
    assert f"the results also cover 1 earlier finished runs in {tmp_path / 'out'}: student seed 0" in log


def test_readme_routes_example_builds_on_the_bundle_networks():
    block = re.search(r'```json\n"routes": (\[.*?\n\])\n```', (REPO / "docs" / "guide.md").read_text(), re.S).group(1)
    routes = parse_routes(json.loads(block), ["sp", "sf"])
    config = stage_config(BUNDLES / "segmentation_2d", "train", {"class_names": ["background", "a", "b"]})
    nets = {}
    for name, key in (("teacher", "teacher_def"), ("sp", "student_def"), ("sf", "student_def")):
        d = {k: config.get_parsed_content(f"{key}#{k}") for k in ("channels", "strides", "num_res_units")}
        nets[name] = UNet(2, 1, 3, channels=d["channels"], strides=d["strides"], num_res_units=d["num_res_units"])
    # as the engine does: routes without "layers" use each network's default feature layer
    graph = KnowledgeRoutes(routes, ["sp", "sf"], {n: [default_feature_layer(v)] for n, v in nets.items()})
    feats = {}
    for name, net in nets.items():
        fx = FeatureExtractor(net, graph.layers_of(name), name)
        net(torch.zeros(1, 1, 32, 32))
        feats[name] = fx.pop()
    graph.build(feats, spatial_dims=2)
    assert graph.built and graph.parameters_of("sf")  # teacher 128 ch -> sf 64 ch needs an adapter


def _scores(path):
    """The rows of a results.csv without the timing column (``ms_per_image`` is measured, not computed)."""
    with path.open() as f:
        return [{k: v for k, v in row.items() if k != "ms_per_image"} for row in csv.DictReader(f)]


def test_compare_with_two_jobs_gives_the_results_of_one_job(tmp_path):
    data = tmp_path / "data"
    ensure_segmentation_data(str(data), spatial_dims=2, size=48, counts=(4, 2, 2))
    settings = {
        "presets": ["kd", "dml"],  # kd reads the teacher checkpoint; 4 runs, so a worker runs two in its own order
        "seeds": [0, 1],
        "max_epochs": 1,
        "teacher_epochs": 1,
        "overrides": {**TINY["segmentation_2d"], "dataset_dir": str(data)},
        "threads": 1,  # CPU float reductions depend on the thread count: equal results need equal threads
    }
    compare(BUNDLES / "segmentation_2d", output=tmp_path / "one", jobs=1, **settings)
    compare(BUNDLES / "segmentation_2d", output=tmp_path / "two", jobs=2, **settings)
    one, two = _scores(tmp_path / "one" / "results.csv"), _scores(tmp_path / "two" / "results.csv")
    assert len(one) == 1 + 4 * 3 and [(r["preset"], r["seed"], r["network"]) for r in one][:3] == [
        ("-", "-", "teacher"), ("kd", "0", "sp"), ("kd", "0", "sf")
    ]  # fmt: skip
    assert two == one  # every metric, per class too, to the last digit written
    assert len({r["mean_dice"] for r in one}) > 4  # the runs differ from each other: the seeds were used
    log = (tmp_path / "two" / "dml" / "seed1" / "compare.log").read_text()
    assert log.startswith("==== dml seed 1: started ") and ", 1 threads, " in log and "Engine run finished" in log
    assert not (tmp_path / "one" / "dml" / "seed1" / "compare.log").exists()  # --jobs 1 prints to the console


def test_a_failed_run_is_named_and_the_command_exits_non_zero(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    ensure_segmentation_data(str(data), spatial_dims=2, size=48, counts=(4, 2, 2))
    broken = out / "student" / "seed1" / "models" / "last.pt"  # only this run's train stage fails, on resuming
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a checkpoint")
    tiny = [f"--set={key}={json.dumps(value)}" for key, value in TINY["segmentation_2d"].items()]
    args = ["compare", str(BUNDLES / "segmentation_2d"), "--presets", "student", "--seeds", "3", "--max-epochs", "1"]
    args += ["--teacher-epochs", "1", "--dataset-dir", str(data), "--output", str(out), "--jobs", "2", *tiny]
    parsed = build_parser().parse_args(args)
    assert (parsed.jobs, parsed.threads, build_parser().parse_args(args[:2]).jobs) == (2, None, 1)
    with pytest.raises(SystemExit):
        build_parser().parse_args([*args, "--jobs", "0"])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "medkd", *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "ERROR: 1 of 3 runs failed" in done.stderr, done.stderr[-3000:]
    assert f"\n  - student seed 1: checkpoint {broken}" in done.stderr, done.stderr[-3000:]
    assert f"(log: {broken.parents[1] / 'compare.log'})" in done.stderr and "Traceback" not in done.stderr
    assert (out / "student" / "seed0" / "eval" / "results.json").is_file()  # the other runs went on
    assert not (out / "results.csv").exists()


def test_a_failed_teacher_stops_the_runs_started_beside_it_and_its_error_is_raised(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    ensure_segmentation_data(str(data), spatial_dims=2, size=48, counts=(4, 2, 2))
    overrides = {**TINY["segmentation_2d"], "dataset_dir": str(data)}
    claim_output(out, compare_fingerprint(BUNDLES / "segmentation_2d", overrides))
    broken = out / "teacher" / "models" / "last_teacher.pt"  # the teacher stage fails on resuming
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception) as info:
        compare(BUNDLES / "segmentation_2d", ["student"], [0, 1, 2], out, 1, 1, overrides, jobs=2, threads=1)
    assert f"checkpoint {broken}" in str(user_error(info.value))  # the teacher's error, not a JobsFailed
    finished = sorted(p.parts[-3] for p in out.glob("student/seed*/eval/results.json"))
    assert len(finished) < 3 and not (out / "results.csv").exists()  # no run started after the failure


def test_run_jobs_reports_errors_cancels_the_rest_and_survives_a_dead_worker(tmp_path):
    calls = [(math.sqrt, (-1.0,)), (time.sleep, (1.0,))] + [(time.sleep, (0.0,))] * 4  # job 1 holds the worker
    jobs = [Job(i, f"job {i}", fn, args, tmp_path / f"{i}.log") for i, (fn, args) in enumerate(calls)]
    with pytest.raises(JobsFailed) as info:
        run_jobs(jobs, workers=2)
    failed = info.value
    assert list(failed.failures) == ["job 0"] and failed.failures["job 0"].startswith("ValueError: math domain error")
    assert failed.cancelled and failed.finished + len(failed.cancelled) == 5  # the rest ran or never started
    assert "Traceback" in (tmp_path / "0.log").read_text()  # the bug's traceback is in its log
    assert str(failed).startswith(f"1 of 6 runs failed ({failed.finished} finished, {len(failed.cancelled)} not st")
    crash = [Job("crash", "crash", os._exit, (3,)), Job("ok", "ok", math.sqrt, (4.0,))]
    with pytest.raises(JobsFailed) as info:
        run_jobs(crash, workers=2)
    assert info.value.failures["crash"].startswith("its worker process died")
    assert run_jobs([Job("a", "a", math.sqrt, (9.0,))], workers=1, threads=1) == {"a": 3.0}


def test_a_schedule_holds_jobs_until_released_and_leaves_the_reserve_to_the_caller(tmp_path, monkeypatch):
    probe = tmp_path / "medkd_span_probe.py"  # a job that sleeps and says when it ran, importable by the workers
    probe.write_text(
        "import pathlib, time\n"
        "def span(seconds, done):\n"
        "    start = time.time()\n    time.sleep(seconds)\n    pathlib.Path(done).touch()\n"
        "    return start, time.time()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    span = __import__("medkd_span_probe").span
    jobs = [Job(i, f"job {i}", span, (0.5, tmp_path / f"{i}.done")) for i in range(4)]
    with JobPool(2, threads=1) as pool:
        schedule = pool.start(jobs, held=[2, 3], reserve=1)
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"{i}.done").exists() for i in (0, 1)) and time.monotonic() < deadline:
            time.sleep(0.05)
        released = time.time()
        assert not any((tmp_path / f"{i}.done").exists() for i in (2, 3))
        schedule.release()
        spans = schedule.wait()
    assert spans[0][1] <= spans[1][0] or spans[1][1] <= spans[0][0]  # one worker left to the caller: one at a time
    assert min(spans[2][0], spans[3][0]) >= released  # the held jobs waited
    assert max(spans[2][0], spans[3][0]) < min(spans[2][1], spans[3][1])  # then both workers ran them
    with JobPool(2, threads=1) as pool:
        schedule = pool.start(jobs, held=[1, 2, 3], reserve=1)
        schedule.stop()  # e.g. the teacher failed: the running job finishes, the held ones never start
        assert set(schedule.wait()) <= {0}
    with pytest.raises(RuntimeError, match="workers > 1"):
        JobPool(1).start(jobs)


def test_job_pool_starts_and_preloads_its_workers_before_any_job(tmp_path, monkeypatch):
    probe = tmp_path / "medkd_preload_probe.py"  # on import, a worker leaves a file named after its process
    probe.write_text(f"import os, pathlib\npathlib.Path({str(tmp_path)!r}, f'{{os.getpid()}}.loaded').touch()\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers get this process's sys.path
    with JobPool(2, threads=1, preload=["medkd_preload_probe"]) as pool:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("*.loaded"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        loaded = {int(p.stem) for p in tmp_path.glob("*.loaded")}
        assert len(loaded) == 2  # both workers started and imported it while no job was given
        pids = pool.run([Job(i, f"job {i}", os.getpid) for i in range(4)])
    assert set(pids.values()) <= loaded  # the jobs ran in those workers


def test_an_unknown_preset_is_one_error_line(tmp_path):
    command = [sys.executable, "-m", "medkd", "compare", "bundles/classification_2d", "--presets", "kdd"]
    result = subprocess.run(
        [*command, "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "ERROR: --presets: unknown ['kdd']; choose from student, kd" in result.stderr
