"""Cost of one distillation step against the floor of a plain PyTorch loop doing the same network work.

Variants, all in one process on the same batch, with the bundle's networks and supervised loss:

* ``a`` floor: a plain loop — one teacher forward (no grad), then each student's forward, DiceCE loss, backward and
  optimizer step. Nothing else (no distillation terms, no engine, plain tensors).
* ``b`` one ``DistillationTrainer`` iteration along the bundle's routes (``route_graph``: by default the diversified
  preset, teacher → sp prediction KL, teacher → sf feature hint with adapter, sp ↔ sf prediction terms, and the sp ↔
  sf feature terms, weighted ``peer_feature_weight`` = 0 and so not computed), timed through the real
  ``engine.run`` on a batch collated like the bundle's ``CacheDataset`` + ``DataLoader`` gives it (``MetaTensor``
  image and label).
* ``b_plain`` the same with a plain-tensor batch (what the engine costs without MetaTensor inputs).
* ``b_dict`` the same as ``b`` with ``decollate=False`` (what decollating the output, as MONAI's handlers expect,
  costs).
* ``b_cl`` ``b`` with the engine's ``channels_last=True`` (the bundles' ``--channels_last True``: networks and
  adapters in the channels-last layout; not run with ``--channels-last``, where every variant has it).
* ``c`` one MONAI ``SupervisedTrainer`` iteration training a single student on the same MetaTensor batch.
* ``a_meta`` the floor loop fed the MetaTensor batch: what MONAI's per-op metadata bookkeeping costs.

Networks, loss, routes (weights and temperature), learning rate, patch size and batch size (times
``samples_per_volume`` in 3D) are read from the bundle's ``train.json`` (``bundles/segmentation_2d``,
``bundles/segmentation_3d``), with 3 classes as in the embedded default data.

Engine variants are timed per iteration from one ``ITERATION_COMPLETED`` event to the next (so the batch fetch and
every event of ``engine.run`` are inside); the floor is timed per step. After warm-up steps, the variants take
one step each per round, in an order rotated every round, so that load drift of a shared machine hits all of them;
ratios are medians of the per-round (paired) ratios. Reported: median wall ms per step (and the process CPU time,
steadier on a loaded machine), ratios, images/s and peak memory, measured in one more step of each variant after the
timed ones (CPU: peak RSS growth over the RSS at the start of the step, read from ``VmHWM`` after resetting it through
``/proc/self/clear_refs``, with ``malloc_trim`` before, which hands the heap's free memory back and so would slow a
timed step; CUDA: ``torch.cuda.max_memory_allocated``, which includes the weights and optimizer states).

The process keeps freed CPU memory for reuse, as the bundles do by default (``keep_freed_memory``, see
``medkd.training.allocator``); ``--default-allocator`` measures with glibc's default policy instead.

Usage::

    python benchmarks/step_cost.py --setting all --json step_cost.json
    python benchmarks/step_cost.py --setting 2d --device cuda --amp bf16 --channels-last
    python benchmarks/step_cost.py --setting 2d --profile   # torch.profiler table of the floor and of b
    python benchmarks/step_cost.py --setting all --default-allocator   # glibc's default malloc policy
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from bundle_settings import add_allocator_option, bundle_setting, make_loss, make_network, use_allocator
from ignite.engine import Events
from monai.data import MetaTensor, list_data_collate
from monai.engines import SupervisedTrainer
from monai.inferers import SimpleInferer

from medkd.knowledge.features import default_feature_layer
from medkd.training.engines import DistillationTrainer

SETTINGS = {  # which bundle, and how many steps to time
    "2d": dict(bundle="segmentation_2d", repeats=20, warmup=3),
    "3d": dict(bundle="segmentation_3d", repeats=6, warmup=2),
}
STUDENTS = ("sp", "sf")


def make_batch(cfg: dict, seed: int = 0) -> dict:
    """A batch as the bundle's DataLoader collates it: MetaTensor image/label with per-sample file names."""
    rng = np.random.RandomState(seed)
    shape = (cfg["in_channels"], *cfg["size"])
    samples = []
    for i in range(cfg["batch_size"]):
        image = rng.rand(*shape).astype(np.float32)
        label = np.floor(rng.rand(1, *shape[1:]) * cfg["num_classes"]).astype(np.int64)
        meta = {"filename_or_obj": f"sample_{i:03d}.nii.gz", "affine": torch.eye(cfg["spatial_dims"] + 1)}
        samples.append({"image": MetaTensor(image, meta=dict(meta)), "label": MetaTensor(label, meta=dict(meta))})
    return list_data_collate(samples)


def plain_batch(batch: dict) -> dict:
    return {k: v.as_tensor() if isinstance(v, MetaTensor) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------ devices, memory
class Device:
    def __init__(self, name: str, amp: str, channels_last: bool) -> None:
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"
        if self.cuda and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available.")
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16}[amp]  # bf16 needs no gradient scaler
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # the same for every variant: fixed shapes
        self.channels_last = channels_last
        self._libc = None
        if not self.cuda and platform.system() == "Linux":
            with contextlib.suppress(OSError):
                self._libc = ctypes.CDLL("libc.so.6")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def memory_format(self, ndim: int) -> torch.memory_format:
        if not self.channels_last:
            return torch.contiguous_format
        return torch.channels_last if ndim == 4 else torch.channels_last_3d

    def network(self, net: torch.nn.Module, spatial_dims: int) -> torch.nn.Module:
        return net.to(self.device, memory_format=self.memory_format(spatial_dims + 2))

    def batch(self, batch: dict) -> dict:
        """The batch on the training device, image in the chosen memory format (``.to`` keeps the format)."""
        image = batch["image"].to(self.device).contiguous(memory_format=self.memory_format(batch["image"].ndim))
        return dict(batch, image=image, label=batch["label"].to(self.device))

    # peak memory of a block: CUDA allocator peak, or peak RSS growth on Linux CPU
    def memory_start(self) -> float:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device) / 2**20
        if self._libc is not None:
            self._libc.malloc_trim(0)  # give freed heap back so the growth below is this block's
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            return _proc_status_mb("VmRSS")
        except OSError:
            return math.nan

    def memory_peak(self, start: float) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return _proc_status_mb("VmHWM") - start if not math.isnan(start) else math.nan


def _proc_status_mb(key: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


# ----------------------------------------------------------------------------------------------------- variants
@dataclass
class Variant:
    name: str
    label: str
    run_block: Callable[[int], list[tuple[float, float]]]  # runs n steps, returns (wall s, process CPU s) per step
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    peak_mb: float = math.nan


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _diffs(stamps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:], strict=False)]


def _loop_block_runner(step: Callable[[], None], dev: Device) -> Callable[[int], list[tuple[float, float]]]:
    """Time ``n`` calls of a plain-loop ``step``, synchronising the device around each."""

    def run_block(n: int) -> list[tuple[float, float]]:
        stamps = []
        dev.sync()
        for _ in range(n):
            stamps.append(_now())
            step()
            dev.sync()
        stamps.append(_now())
        return _diffs(stamps)

    return run_block


def floor_variant(cfg: dict, dev: Device, batch: dict, meta: bool = False) -> Variant:
    """a: teacher forward (no grad) + each student's forward, DiceCE, backward, optimizer step; nothing else.

    ``meta``: the same loop fed the MetaTensor batch (what a plain loop over the bundle's DataLoader does): the
    cost of MetaTensor's per-op bookkeeping, which the engine avoids by unwrapping the batch.
    """
    sd = cfg["spatial_dims"]
    teacher = dev.network(make_network(cfg, "teacher", seed=0), sd).eval().requires_grad_(False)
    students = [dev.network(make_network(cfg, "student", seed=1 + i), sd).train() for i in range(2)]
    optimizers = [torch.optim.Adam(s.parameters(), lr=cfg["lr"]) for s in students]
    loss_function = make_loss(cfg)
    batch = dev.batch(batch if meta else plain_batch(batch))
    inputs, targets = batch["image"], batch["label"]

    def step() -> None:
        with torch.no_grad(), dev.autocast():
            teacher(inputs)
        for student, optimizer in zip(students, optimizers, strict=True):
            optimizer.zero_grad(set_to_none=True)
            with dev.autocast():
                loss = loss_function(student(inputs), targets)
            loss.backward()
            optimizer.step()

    if meta:
        return Variant("a_meta", "the floor loop fed the MetaTensor batch", _loop_block_runner(step, dev))
    return Variant("a", "floor: plain loop, teacher fwd + 2 students fwd/bwd/step", _loop_block_runner(step, dev))


def _hooked(network: torch.nn.Module, store: dict, key: str) -> torch.nn.Module:
    """Record the output of ``network``'s default feature layer in ``store[key]`` at each forward."""
    layer = dict(network.named_modules())[default_feature_layer(network)]
    layer.register_forward_hook(lambda _m, _i, out: store.__setitem__(key, out))
    return network


def routes_floor_variant(cfg: dict, dev: Device, batch: dict) -> Variant:
    """a_routes: the floor loop plus the distillation terms of the bundle's diversified routes, written here in plain
    PyTorch (what ``b`` computes, without the engine), each times its bundle weight and left out when that is 0:
    teacher → sp pixel-wise KL at the bundle's temperature (α), teacher → sf hint (1x1 adapter,
    per-sample-standardised MSE) at the default feature layers (β), sp ↔ sf KL (γ) and hints (δ; no adapter: same
    channels); every source detached, one backward of the two totals, each optimizer steps."""
    weights = {r.name: r.weight for r in cfg["parser"].get_parsed_content("route_graph")}
    temperature = cfg["parser"].get_parsed_content("temperature")
    sd = cfg["spatial_dims"]
    feats: dict[str, torch.Tensor] = {}
    teacher = _hooked(dev.network(make_network(cfg, "teacher", seed=0), sd).eval().requires_grad_(False), feats, "t")
    sp, sf = (_hooked(dev.network(make_network(cfg, "student", seed=1 + i), sd).train(), feats, n)
              for i, n in enumerate(STUDENTS))  # fmt: skip
    inputs, targets = (dev.batch(plain_batch(batch))[k] for k in ("image", "label"))
    with torch.no_grad():
        teacher(inputs[:1]), sf(inputs[:1])
    conv = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)[sd - 1]
    adapter = dev.network(conv(feats["sf"].shape[1], feats["t"].shape[1], 1, bias=False), sd)
    optimizers = [torch.optim.Adam(sp.parameters(), lr=cfg["lr"]),
                  torch.optim.Adam([*sf.parameters(), *adapter.parameters()], lr=cfg["lr"])]  # fmt: skip
    loss_function = make_loss(cfg)
    tau2 = temperature * temperature

    def kl(log_dst: torch.Tensor, log_src: torch.Tensor) -> torch.Tensor:  # τ²·KL per pixel, averaged
        log_src = log_src.detach()
        return tau2 * (log_src.exp() * (log_src - log_dst)).sum(dim=1).mean()

    def hint(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        src = src.detach().float()
        return torch.nn.functional.mse_loss(
            torch.nn.functional.layer_norm(dst.float(), dst.shape[1:]),
            torch.nn.functional.layer_norm(src, src.shape[1:]),
        )

    def weighted(terms: dict[str, Callable[[], torch.Tensor]]) -> list[torch.Tensor]:
        return [weights[name] * term() for name, term in terms.items() if weights[name] != 0]

    def step() -> None:
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        with dev.autocast():
            with torch.no_grad():
                logits_t = teacher(inputs)
            logits_sp, logits_sf = sp(inputs), sf(inputs)
            log_t, log_sp, log_sf = (torch.log_softmax(z.float() / temperature, dim=1)
                                     for z in (logits_t, logits_sp, logits_sf))  # fmt: skip
            total_sp = sum(weighted({
                "sp/prediction_from_teacher": lambda: kl(log_sp, log_t),
                "sp/prediction_from_sf": lambda: kl(log_sp, log_sf),
                "sp/feature_from_sf": lambda: hint(feats["sp"], feats["sf"]),
            }), loss_function(logits_sp, targets))  # fmt: skip
            total_sf = sum(weighted({
                "sf/feature_from_teacher": lambda: hint(adapter(feats["sf"]), feats["t"]),
                "sf/prediction_from_sp": lambda: kl(log_sf, log_sp),
                "sf/feature_from_sp": lambda: hint(feats["sf"], feats["sp"]),
            }), loss_function(logits_sf, targets))  # fmt: skip
        (total_sp + total_sf).backward()
        for optimizer in optimizers:
            optimizer.step()

    what = "floor + the bundle's distillation terms in plain PyTorch (no engine)"
    return Variant("a_routes", what, _loop_block_runner(step, dev))


def _engine_block_runner(engine, dev: Device) -> Callable[[int], list[tuple[float, float]]]:
    """Time iterations of ``engine.run()``: one ``ITERATION_COMPLETED`` to the next, the first from ``STARTED``."""
    stamps: list[tuple[float, float]] = []

    def stamp(_engine) -> None:
        dev.sync()
        stamps.append(_now())

    engine.add_event_handler(Events.STARTED, stamp)
    engine.add_event_handler(Events.ITERATION_COMPLETED, stamp)

    def run_block(n: int) -> list[tuple[float, float]]:
        stamps.clear()
        engine.state.max_epochs = engine.state.epoch + n  # continue for n more epochs of one iteration
        engine.run()
        return _diffs(stamps)

    return run_block


def distillation_variant(
    cfg: dict, dev: Device, batch: dict, meta: bool, decollate: bool = True, channels_last: bool = False
) -> Variant:
    """b: one DistillationTrainer iteration along the bundle's routes, through the ignite engine."""
    sd = cfg["spatial_dims"]
    teacher = dev.network(make_network(cfg, "teacher", seed=0), sd)
    students = {n: dev.network(make_network(cfg, "student", seed=1 + i), sd) for i, n in enumerate(STUDENTS)}
    optimizers = {n: torch.optim.Adam(s.parameters(), lr=cfg["lr"]) for n, s in students.items()}
    batch = dev.batch(batch if meta else plain_batch(batch))
    trainer = DistillationTrainer(
        device=dev.device,
        max_epochs=1,
        train_data_loader=[batch],
        students=students,
        optimizers=optimizers,
        loss_function=make_loss(cfg),
        teacher=teacher,
        routes=cfg["parser"].get_parsed_content("route_graph"),
        amp=dev.amp_dtype is not None,
        amp_kwargs={"dtype": dev.amp_dtype} if dev.amp_dtype is not None else None,
        decollate=decollate,
        channels_last=channels_last,
    )
    trainer.routes.to(memory_format=dev.memory_format(sd + 2))
    name, what = ("b", "MetaTensor batch, as the bundle") if meta else ("b_plain", "plain-tensor batch")
    if not decollate:
        name, what = f"{name}_dict", f"{what}, decollate=False"
    if channels_last:
        name, what = f"{name}_cl", f"{what}, channels_last=True"
    return Variant(name, f"DistillationTrainer, bundle routes, engine.run ({what})", _engine_block_runner(trainer, dev))


def supervised_variant(cfg: dict, dev: Device, batch: dict) -> Variant:
    """c: one MONAI SupervisedTrainer iteration training one student (reference)."""
    sd = cfg["spatial_dims"]
    student = dev.network(make_network(cfg, "student", seed=1), sd)
    trainer = SupervisedTrainer(
        device=dev.device,
        max_epochs=1,
        train_data_loader=[dev.batch(batch)],
        network=student,
        optimizer=torch.optim.Adam(student.parameters(), lr=cfg["lr"]),
        loss_function=make_loss(cfg),
        inferer=SimpleInferer(),
        amp=dev.amp_dtype is not None,
        amp_kwargs={"dtype": dev.amp_dtype} if dev.amp_dtype is not None else None,
    )
    return Variant("c", "MONAI SupervisedTrainer, one student (MetaTensor batch)", _engine_block_runner(trainer, dev))


# ---------------------------------------------------------------------------------------------------- measuring
def measure(setting: str, dev: Device, repeats: int | None, warmup: int | None, profile: bool) -> dict:
    cfg = {**SETTINGS[setting], **bundle_setting(SETTINGS[setting]["bundle"])}
    repeats, warmup = repeats or cfg["repeats"], cfg["warmup"] if warmup is None else warmup
    batch = make_batch(cfg)
    variants = [
        floor_variant(cfg, dev, batch),
        distillation_variant(cfg, dev, batch, meta=True),
        routes_floor_variant(cfg, dev, batch),
        distillation_variant(cfg, dev, batch, meta=False),
        distillation_variant(cfg, dev, batch, meta=True, decollate=False),
        supervised_variant(cfg, dev, batch),
        floor_variant(cfg, dev, batch, meta=True),
    ]
    if not dev.channels_last:
        variants.append(distillation_variant(cfg, dev, batch, meta=True, channels_last=True))
    for _ in range(warmup):  # allocator, oneDNN/cuDNN algorithm choice; not measured
        for v in variants:
            v.run_block(1)
    for r in range(repeats):  # one step of each variant per round, the order rotated every round
        for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
            (wall, cpu), *_ = v.run_block(1)
            v.wall.append(wall)
            v.cpu.append(cpu)
    for v in variants:  # peak memory in a step of its own: measuring it trims the heap, which would slow the next
        start = dev.memory_start()
        v.run_block(1)
        v.peak_mb = dev.memory_peak(start)
    if profile:
        for v in variants[:2]:
            profile_variant(v, 2)
    by_name = {v.name: v for v in variants}
    floor, sup, terms = by_name["a"], by_name["c"], by_name["a_routes"]
    rows = []
    for v in variants:
        wall_ms = statistics.median(v.wall) * 1e3
        rows.append(
            dict(
                variant=v.name,
                what=v.label,
                median_ms=wall_ms,
                q1_ms=float(np.percentile(v.wall, 25) * 1e3),
                q3_ms=float(np.percentile(v.wall, 75) * 1e3),
                median_cpu_ms=statistics.median(v.cpu) * 1e3,
                steps=len(v.wall),
                # medians of the per-round ratios: paired steps, so load drift of the machine cancels
                ratio_to_a=statistics.median(x / y for x, y in zip(v.wall, floor.wall, strict=True)),
                ratio_to_c=statistics.median(x / y for x, y in zip(v.wall, sup.wall, strict=True)),
                ratio_to_a_routes=statistics.median(x / y for x, y in zip(v.wall, terms.wall, strict=True)),
                cpu_ratio_to_a=statistics.median(x / y for x, y in zip(v.cpu, floor.cpu, strict=True)),
                images_per_s=cfg["batch_size"] / (wall_ms / 1e3),
                peak_mb=None if math.isnan(v.peak_mb) else v.peak_mb,
            )
        )
    return dict(
        setting=setting,
        spatial_dims=cfg["spatial_dims"],
        batch_size=cfg["batch_size"],
        size=cfg["size"],
        in_channels=cfg["in_channels"],
        num_classes=cfg["num_classes"],
        teacher_channels=cfg["teacher"],
        student_channels=cfg["student"],
        warmup_steps=warmup,
        measured_steps=repeats,
        rows=rows,
    )


def profile_variant(v: Variant, block: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        v.run_block(block)
    print(f"\n=== profile of {v.name} ({v.label}), {block} steps ===")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def print_table(result: dict, dev: Device) -> None:
    memory = "peak MiB (CUDA max allocated)" if dev.cuda else "peak RSS growth MiB"
    print(
        f"\n{result['setting']}: batch {result['batch_size']}, {'x'.join(map(str, result['size']))}, "
        f"{result['in_channels']} channel, {result['num_classes']} classes; teacher {result['teacher_channels']}, "
        f"students {result['student_channels']}; {result['warmup_steps']} warm-up + {result['measured_steps']} "
        "measured steps per variant, interleaved"
    )
    print(f"| variant | median ms (IQR) | CPU ms | ×a | ×a_routes | ×a (CPU) | ×c | images/s | {memory} | what |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in result["rows"]:
        peak = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        print(
            f"| {r['variant']} | {r['median_ms']:.0f} ({r['q1_ms']:.0f}–{r['q3_ms']:.0f}) | {r['median_cpu_ms']:.0f} "
            f"| {r['ratio_to_a']:.3f} | {r['ratio_to_a_routes']:.3f} | {r['cpu_ratio_to_a']:.3f} "
            f"| {r['ratio_to_c']:.2f} | {r['images_per_s']:.1f} "
            f"| {peak} | {r['what']} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=["2d", "3d", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=None, help="measured steps per variant (2d: 20, 3d: 6)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (2d: 3, 3d: 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none", help="autocast dtype")
    parser.add_argument("--channels-last", action="store_true", help="channels_last(_3d) networks and inputs")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of a and b")
    add_allocator_option(parser)
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    kept = use_allocator(args)
    dev = Device(args.device, args.amp, args.channels_last)
    if args.amp != "none" and not dev.cuda:
        print(
            "note: --amp on CPU autocasts a and b, but MONAI's SupervisedTrainer (c) autocasts on CUDA only, so c "
            "runs in float32 here; --amp is meant for --device cuda."
        )
    settings = ["2d", "3d"] if args.setting == "all" else [args.setting]
    print(
        f"torch {torch.__version__}, device {dev.device}"
        + (f" ({torch.cuda.get_device_name(dev.device)})" if dev.cuda else f", {torch.get_num_threads()} threads")
        + f", amp {args.amp}, channels_last {args.channels_last}, freed memory kept {kept}"
    )
    results = []
    for setting in settings:
        result = measure(setting, dev, args.repeats, args.warmup, args.profile)
        print_table(result, dev)
        results.append(result)
    if args.json:
        meta = dict(
            torch=torch.__version__,
            device=str(dev.device),
            amp=args.amp,
            channels_last=args.channels_last,
            freed_memory_kept=kept,
            threads=torch.get_num_threads(),
            argv=sys.argv[1:],
        )
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
