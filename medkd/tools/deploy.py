"""A deployment report (``python -m medkd deploy-report BUNDLE_ROOT``): what the teacher, each student and the
students' ensemble of a trained bundle cost to deploy.

For each network it counts the parameters and the multiply-accumulates (MACs) of one full test image, and for each
runtime (PyTorch eager, TorchScript, ONNX Runtime; on the CPU, and on CUDA where present) it measures the peak
memory of one full-image inference and the median latency per full test image through the bundle's inferer (the
sliding window of a segmentation bundle, one forward of a classification bundle). The networks, their checkpoints,
the inferer and the test list are those of the bundle's ``evaluate`` stage; the test score comes from the run's
``eval/results.json`` when it exists. It writes ``deploy/deploy_report.md``, ``deploy/deploy_report.csv``,
``deploy/metric_vs_latency.png`` and each network exported to ``deploy/<network>.onnx`` into the bundle root, after
moving an earlier ``deploy`` folder aside. How each number is measured: ``docs/deploy.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from medkd.bundles import (
    CKPT_DIR,
    DEPLOY_DIR,
    DEPLOY_PLOT,
    DEPLOY_REPORT_CSV,
    DEPLOY_REPORT_MD,
    ENSEMBLE_MEMBERS,
    EVAL_DATASET,
    INFERER,
    INPUT_SETTINGS,
    NETWORKS,
    OUTPUT_DIR,
    RESULTS_JSON,
    TEACHER,
    stage_config,
    stage_files,
)
from medkd.errors import ConfigError
from medkd.tools.report import markdown_table
from medkd.training.checkpoints import check_trained_inputs, load_network_weights, trained_files
from medkd.training.evaluators import ENSEMBLE, METRICS, EnsembleNetwork
from medkd.training.previous import set_aside
from medkd.validation import check_overrides, parse_value

__all__ = [
    "RUNTIMES",
    "DeployBundle",
    "load_bundle",
    "count_parameters",
    "count_macs",
    "export_onnx",
    "build_runtime",
    "latency_ms",
    "peak_rss_increase_mb",
    "deploy_report",
    "add_deploy_parser",
]

logger = logging.getLogger("medkd.tools.deploy")

RUNTIMES = ("eager", "torchscript", "onnxruntime")
INSTALL_HINT = 'pip install "medkd[deploy]" (or pip install onnx onnxruntime)'
INPUT_NAME, OUTPUT_NAME = "image", "logits"


@dataclass
class DeployBundle:
    """What the report measures, as the bundle's ``evaluate`` stage builds it."""

    networks: dict[str, nn.Module]  # by name, the students' ensemble as an EnsembleNetwork, weights loaded, eval mode
    inferer: Callable[..., Any]  # the bundle's inferer: inferer(image, network) -> logits
    image: torch.Tensor  # the first test image, (1, C, *spatial)
    image_name: str
    scores: dict[str, dict[str, float]]  # metric -> value, by network, from eval/results.json ({} when absent)


def load_bundle(root: str | Path, configs: str | Path | None = None, overrides: Mapping[str, Any] | None = None):
    """The networks (checkpoints of ``root``'s ``ckpt_dir`` loaded as the evaluate stage's ``LoadNetworks`` loads
    them, after the same check of the inputs they were trained on), inferer, first test image and test scores of the
    trained bundle in ``root``, configured by the bundle folder ``configs`` (default ``root``) and ``overrides``."""
    root = Path(root)
    parser = stage_config(configs or root, "evaluate", {**(overrides or {}), "bundle_root": str(root)})
    networks = dict(parser.get_parsed_content(NETWORKS))
    files = trained_files(parser.get_parsed_content(CKPT_DIR), networks)
    check_trained_inputs(files, parser.get_parsed_content(INPUT_SETTINGS))
    for name, network in networks.items():
        load_network_weights(network.cpu(), files[name], map_location="cpu", role=name)
    members = parser.get_parsed_content(ENSEMBLE_MEMBERS)
    if members:
        networks[ENSEMBLE] = EnsembleNetwork({m: networks[m] for m in members})
    sample = parser.get_parsed_content(EVAL_DATASET)[0]
    image = (
        torch.as_tensor(sample["image"]).as_subclass(torch.Tensor).unsqueeze(0).float()
    )  # plain: loaded with weights_only
    name = Path(str(sample["image"].meta.get("filename_or_obj", "image"))).name
    scores = _test_scores(Path(parser.get_parsed_content(OUTPUT_DIR)) / RESULTS_JSON)
    return DeployBundle({k: v.eval() for k, v in networks.items()}, parser.get_parsed_content(INFERER), image, name,
                        scores)  # fmt: skip


def _test_scores(path: Path) -> dict[str, dict[str, float]]:
    """The scores of each network in an evaluate stage's ``results.json``; ``{}`` when it does not exist."""
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text(encoding="utf-8"))
    return {row["network"]: {m: float(row[m]) for m in METRICS if m in row} for row in rows}


def count_parameters(network: nn.Module) -> int:
    """The number of parameters of ``network`` (an ensemble's: its members')."""
    return sum(p.numel() for p in network.parameters())


def count_macs(run: Callable[[torch.Tensor], Any], image: torch.Tensor) -> int:
    """Multiply-accumulates of ``run(image)`` (e.g. a sliding-window inference), counted by PyTorch's
    ``FlopCounterMode`` (convolutions, matrix products: MACs = FLOPs / 2; normalisation and activations are not
    counted)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run(image)
    return counter.get_total_flops() // 2


def network_input(network: nn.Module, inferer: Callable[..., Any], image: torch.Tensor) -> torch.Tensor:
    """An input as ``inferer`` gives it to ``network`` (a sliding window's batch of windows, or the whole image)."""
    seen: list[torch.Tensor] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        return network(x)

    with torch.no_grad():
        inferer(image, record)
    return torch.as_tensor(seen[0]).clone()


def export_onnx(network: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Export ``network`` to ONNX at ``path`` with dynamic batch and spatial sizes (``dynamic_axes`` of the
    TorchScript-based exporter, which is several times faster than ``dynamo=True`` and exports MONAI's networks)."""
    dims = {0: "batch", **{d: f"size{d}" for d in range(2, example.dim())}}
    torch.onnx.export(network, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_axes={INPUT_NAME: dims, OUTPUT_NAME: dims}, dynamo=False)  # fmt: skip


def _onnx_session(path: Path, device: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable running the ONNX file at ``path`` in ONNX Runtime on ``device``, torch tensor in and out."""
    import onnxruntime

    providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    session = onnxruntime.InferenceSession(str(path), providers=providers)

    def run(x: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {INPUT_NAME: x.detach().cpu().numpy()})[0]
        return torch.from_numpy(out).to(x.device)

    return run


def build_runtime(runtime: str, network: nn.Module, example: torch.Tensor, folder: Path, name: str, device: str):
    """``network`` as ``runtime`` runs it on ``device``: the module (eager), ``torch.jit.trace`` of it
    (``<name>.torchscript.pt`` in ``folder``) or an ONNX Runtime session of ``<name>.onnx`` (exported once)."""
    network, example = network.to(device), example.to(device)
    if runtime == "eager":
        return network
    if runtime == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(network, example, check_trace=False)  # the report compares outputs
        if device == "cpu":
            traced.save(str(folder / f"{name}.torchscript.pt"))
        return traced
    path = folder / f"{name}.onnx"
    if not path.is_file():
        export_onnx(network.cpu(), example.cpu(), path)
        network.to(device)
    return _onnx_session(path, device)


def latency_ms(run: Callable[[torch.Tensor], Any], image: torch.Tensor, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time in ms of ``run(image)`` over ``repeats`` runs after ``warmup`` runs (CUDA synchronised)."""
    samples = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            run(image)
            if image.is_cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def _status_mb(field: str) -> float:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _load_runtime_file(runtime: str, path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network saved at ``path`` for ``runtime``: a pickled module (eager), a TorchScript file or an ONNX file."""
    if runtime == "onnxruntime":
        return _onnx_session(Path(path), "cpu")
    if runtime == "torchscript":
        return torch.jit.load(path)
    return torch.load(path, weights_only=False)  # our own pickle, written by _memory_file


def _child_peak(runtime: str, model: str, image: str, inferer: Any) -> float:
    """In a fresh process: load the runtime's file and the image, reset the peak RSS, run one inference and return
    the peak RSS increase in MB."""
    torch.set_num_threads(1)
    run = _load_runtime_file(runtime, model)
    x = torch.load(image)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    before = _status_mb("VmRSS")
    with torch.no_grad():
        inferer(x, run)
    return _status_mb("VmHWM") - before


def peak_rss_increase_mb(runtime: str, model: Path, image: torch.Tensor, inferer: Any) -> float | None:
    """The peak increase of the resident memory (RSS) of a fresh process while it runs one full-image inference of
    ``model`` (a pickled module for ``eager``, a TorchScript file, an ONNX file) through ``inferer``, in MB, after it
    loaded the model and the image; ``None`` where Linux's ``/proc/self/clear_refs`` is not available."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(image.cpu(), Path(tmp) / "image.pt")
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_child_peak, (runtime, str(model), str(Path(tmp) / "image.pt"), inferer))


def onnx_available() -> bool:
    """Whether ``onnx`` and ``onnxruntime`` (the ``deploy`` extra) are installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _runs_on(runtime: str, device: str) -> bool:
    """Whether ``runtime`` can run on ``device`` here (ONNX Runtime on CUDA needs the onnxruntime-gpu package)."""
    if runtime != "onnxruntime" or device == "cpu":
        return True
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _memory_file(runtime: str, network: nn.Module, folder: Path, name: str, scratch: Path) -> Path:
    """The file :func:`peak_rss_increase_mb` loads for ``runtime`` (the eager module is pickled to ``scratch``)."""
    if runtime == "eager":
        torch.save(network.cpu(), scratch / f"{name}.pickle.pt")
        return scratch / f"{name}.pickle.pt"
    return folder / (f"{name}.torchscript.pt" if runtime == "torchscript" else f"{name}.onnx")


def _network_row(bundle: DeployBundle, name: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """What does not depend on the runtime: the network's parameters and MACs per full image; its input
    as the inferer feeds it (to trace and export it), and its eager output on the full image (the reference)."""
    network = bundle.networks[name].cpu()
    example = network_input(network, bundle.inferer, bundle.image)
    with torch.no_grad():
        reference = bundle.inferer(bundle.image, network)
    macs = count_macs(lambda x: bundle.inferer(x, network), bundle.image)
    return {"params": count_parameters(network), "gmacs": macs / 1e9}, example, reference


def measure(bundle: DeployBundle, folder: Path, runtimes: Sequence[str], devices: Sequence[str], repeats: int = 10,
            warmup: int = 2, memory: bool = True) -> list[dict]:  # fmt: skip
    """One row per network, runtime and device: parameters, MACs per full image, peak memory (CPU), median latency,
    the largest difference from the eager output, the ONNX check at a second size, and the test score; tqdm shows
    the progress."""
    rows, jobs = [], [(n, r, d) for n in bundle.networks for d in devices for r in runtimes if _runs_on(r, d)]
    with tempfile.TemporaryDirectory() as scratch:
        for name, runtime, device in tqdm(jobs, desc="deploy report", unit="run"):
            if not rows or rows[-1]["network"] != name:
                common, example, reference = _network_row(bundle, name)
            network, image = bundle.networks[name], bundle.image.to(device)
            run = build_runtime(runtime, network, example, folder, name, device)
            row = {"network": name, "runtime": runtime, "device": device, **common}
            if memory and device == "cpu":
                model = _memory_file(runtime, network, folder, name, Path(scratch))
                row["peak_rss_mb"] = peak_rss_increase_mb(runtime, model, bundle.image, bundle.inferer)
            row["latency_ms"] = latency_ms(lambda x, r=run: bundle.inferer(x, r), image, repeats, warmup)
            row.update({"speedup_vs_teacher": None, **bundle.scores.get(name, {})})  # the speed-up: once all ran
            with torch.no_grad():
                row["max_diff_vs_eager"] = (bundle.inferer(image, run).cpu() - reference).abs().max().item()
            if runtime == "onnxruntime":
                row["onnx_second_size"] = second_size_check(run, network.to(device), example.to(device))
            rows.append(row)
            network.cpu()
    return _with_speedup(rows)


def second_size_check(run: Callable[[torch.Tensor], torch.Tensor], network: nn.Module, example: torch.Tensor) -> str:
    """Run the exported network at a second input size (batch 2, each spatial size doubled): ``"BxCx...: max |diff|
    vs PyTorch"``, or why it failed."""
    x = torch.randn(2, *example.shape[1:2], *(2 * s for s in example.shape[2:]), device=example.device)
    shape = "x".join(map(str, x.shape))
    try:
        with torch.no_grad():
            diff = (run(x) - network(x)).abs().max().item()
    except Exception as e:  # ONNX Runtime raises its own types for a shape the graph cannot take
        return f"{shape} failed: {type(e).__name__}"
    return f"{shape} ok, max |diff| {diff:.1e}"


def _with_speedup(rows: list[dict]) -> list[dict]:
    """Add each row's speed-up: the teacher's latency with the same runtime and device over this row's."""
    teacher = {(r["runtime"], r["device"]): r["latency_ms"] for r in rows if r["network"] == TEACHER}
    for row in rows:
        base = teacher.get((row["runtime"], row["device"]))
        row["speedup_vs_teacher"] = base / row["latency_ms"] if base else None
    return rows


def _key_metric(rows: Sequence[Mapping]) -> str | None:
    return next((m for m in METRICS if any(m in r for r in rows)), None)


def plot_metric_vs_latency(rows: Sequence[Mapping], path: Path) -> None:
    """The key test metric against latency (log scale), one labelled point per network, runtime and device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = _key_metric(rows)
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = dict(zip(RUNTIMES, "os^", strict=True))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(dict.fromkeys(row["network"] for row in rows))
    for row in rows:
        y = row.get(metric, float("nan")) if metric else float("nan")
        color, i = colors[names.index(row["network"]) % len(colors)], RUNTIMES.index(row["runtime"])
        ax.scatter(row["latency_ms"], y, marker=markers[row["runtime"]], s=50, color=color)
        label = f"{row['network']} {row['runtime']}" + ("" if row["device"] == "cpu" else f" {row['device']}")
        # the runtimes of one network share its score: their labels at three heights do not overlap
        ax.annotate(label, (row["latency_ms"], y), textcoords="offset points", xytext=(5, 10 * i - 12), fontsize=8,
                    color=color)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("latency per full test image, ms (median, log scale)")
    ax.set_ylabel(f"test {metric}" if metric else "no test score (run the evaluate stage)")
    ax.set_title("test score against latency, per network and runtime")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: Sequence[Mapping], folder: Path, header: str) -> str:
    """Write ``deploy_report.csv``, ``deploy_report.md`` (``header``, then the table) and the plot into ``folder``;
    return the markdown table."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with (folder / DEPLOY_REPORT_CSV).open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    table = markdown_table(rows)
    (folder / DEPLOY_REPORT_MD).write_text(f"{header}\n\n{table}\n", encoding="utf-8")
    plot_metric_vs_latency(rows, folder / DEPLOY_PLOT)
    return table


def _header(bundle: DeployBundle, runtimes: Sequence[str], repeats: int, memory: bool) -> str:
    shape = "x".join(map(str, bundle.image.shape[1:]))
    lines = [
        "# Deployment report",
        "",
        f"Test image {bundle.image_name} ({shape}, channels first), through the bundle's inferer; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads. Latency: median of {repeats} runs after warm-up. "
        "gmacs: multiply-accumulates per image (FlopCounterMode, FLOPs / 2). "
        + ("peak_rss_mb: peak RSS increase of a fresh process during one inference. " if memory else "")
        + "speedup_vs_teacher: the teacher's latency in the same runtime and device over this one's. How each number "
        "is measured: docs/deploy.md in medkd.",
    ]
    if "onnxruntime" not in runtimes:
        lines += ["", f"ONNX Runtime not measured: onnx or onnxruntime is not installed ({INSTALL_HINT})."]
    return "\n".join(lines)


def deploy_report(root: str | Path, configs: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                  repeats: int = 10, warmup: int = 2, memory: bool = True) -> list[dict]:  # fmt: skip
    """Measure the trained bundle in ``root`` (see the module's doc) and write its report into ``root/deploy``,
    moving an earlier ``deploy`` folder aside with a timestamp; return the rows."""
    bundle = load_bundle(root, configs, overrides)
    runtimes = RUNTIMES if onnx_available() else RUNTIMES[:2]
    if "onnxruntime" not in runtimes:
        logger.warning("onnx or onnxruntime is not installed: ONNX Runtime is not measured (%s)", INSTALL_HINT)
    folder = Path(root) / DEPLOY_DIR
    for old, new in set_aside([folder]).items():
        logger.warning("the earlier deployment report %s was moved aside to %s", old, new)
    folder.mkdir(parents=True)
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    rows = measure(bundle, folder, runtimes, devices, repeats, warmup, memory)
    table = write_report(rows, folder, _header(bundle, runtimes, repeats, memory))
    print(f"\nDeployment report ({folder / DEPLOY_REPORT_MD}, plot {folder / DEPLOY_PLOT}):\n{table}\n", flush=True)
    return rows


def _overrides(settings: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` command-line settings as bundle overrides."""
    overrides = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {setting!r}: write KEY=VALUE, e.g. --set patch_size=[128,128].")
        overrides[key] = parse_value(value)
    return overrides


def _run(args: argparse.Namespace) -> int:
    configs = Path(args.bundle or args.bundle_root)
    if not (configs / "configs" / "train.json").is_file():
        raise ConfigError(
            f"{configs} has no configs/train.json: give the bundle whose configs trained the run with --bundle "
            "(e.g. --bundle bundles/segmentation_2d)."
        )
    overrides = _overrides(args.set)
    check_overrides(stage_files(configs, "evaluate"), overrides)  # a mistyped key would be ignored without a word
    deploy_report(args.bundle_root, configs, overrides, args.repeats, args.warmup, not args.no_memory)
    return 0


def add_deploy_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``deploy-report``."""
    p = subparsers.add_parser(
        "deploy-report",
        help="parameters, MACs, memory and latency of a trained bundle's networks in eager, TorchScript and ONNX",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("bundle_root", help="the trained bundle's root (its models/ checkpoints, eval/ results)")
    p.add_argument("--bundle", default=None, help="the bundle whose configs to use (default: BUNDLE_ROOT)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any bundle config override")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per network and runtime (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before them (default 2)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak memory (a fresh process per measurement)")
    p.set_defaults(handler=_run)
