"""Would one batched forward/backward of the two students pay? Students of one architecture, as in the bundles, run
one after the other (``seq``: what ``DistillationTrainer`` does) or as one ``torch.func.vmap`` over their stacked
parameters and batch-norm buffers (``vmap``: ``functional_call`` on one copy of the network; the stacked running
statistics written back after each step), each on the bundle's batch with its supervised loss and one backward.

The two take a step each per round, in alternating order, after a warm-up; reported: median ms per step and the
median of the per-round ratios ``vmap / seq``. No distillation terms and no optimizer step: the question is only
whether batching the students' networks is faster than running them one by one. Freed CPU memory is kept for reuse as
in the bundles (``--default-allocator``: glibc's default policy).

Usage::

    python benchmarks/batched_students.py --setting all --threads 1
    python benchmarks/batched_students.py --setting 2d --device cuda
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from bundle_settings import add_allocator_option, bundle_setting, make_loss, make_network, use_allocator
from torch.func import functional_call, vmap

BUNDLES = {"2d": "segmentation_2d", "3d": "segmentation_3d"}


def steps(setting: str, device: torch.device) -> dict[str, Callable[[], float]]:
    """The two ways of running both students on one batch, as ``{"seq": step, "vmap": step}``; a step returns the
    students' summed loss."""
    cfg = bundle_setting(BUNDLES[setting])
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(cfg["batch_size"], cfg["in_channels"], *cfg["size"], generator=generator).to(device)
    shape = (cfg["batch_size"], 1, *cfg["size"])
    labels = torch.randint(0, cfg["num_classes"], shape, generator=generator).to(device)
    students = [make_network(cfg, "student", seed=1 + i).to(device).train() for i in range(2)]
    loss_function = make_loss(cfg)
    skeleton = copy.deepcopy(students[0]).to("meta")  # functional_call's module: every tensor is replaced
    # each name's tensor in every student, looked up once (stacked anew each step, so gradients reach the students)
    params = {n: [dict(s.named_parameters())[n] for s in students] for n, _ in skeleton.named_parameters()}
    buffers = {n: [dict(s.named_buffers())[n] for s in students] for n, _ in skeleton.named_buffers()}

    def sequential() -> float:
        for student in students:
            student.zero_grad(set_to_none=True)
        loss = sum(loss_function(student(inputs), labels) for student in students)
        loss.backward()
        return loss.item()

    def batched() -> float:
        for student in students:
            student.zero_grad(set_to_none=True)
        stacked_params = {n: torch.stack(tensors) for n, tensors in params.items()}
        stacked_buffers = {n: torch.stack(tensors) for n, tensors in buffers.items()}
        forward = lambda p, b, x: functional_call(skeleton, (p, b), (x,))  # noqa: E731
        logits = vmap(forward, in_dims=(0, 0, None), randomness="different")(stacked_params, stacked_buffers, inputs)
        loss = sum(loss_function(logits[i], labels) for i in range(len(students)))
        loss.backward()
        with torch.no_grad():  # the running statistics each student's batch norms updated, written back
            for name, tensors in buffers.items():
                for i, buffer in enumerate(tensors):
                    buffer.copy_(stacked_buffers[name][i])
        return loss.item()

    return {"seq": sequential, "vmap": batched}


def measure(setting: str, device: torch.device, repeats: int, warmup: int) -> dict:
    fns = steps(setting, device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name in list(fns)[:: 1 if r % 2 == 0 else -1]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fns[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    ratio = statistics.median(v / s for v, s in zip(times["vmap"], times["seq"], strict=True))
    return {name: statistics.median(t) * 1e3 for name, t in times.items()} | {"vmap/seq": ratio}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=["2d", "3d", "all"], default="all")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    add_allocator_option(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    kept = use_allocator(args)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, freed memory kept {kept}")
    print("| setting | seq ms | vmap ms | vmap/seq |\n|---|---:|---:|---:|")
    for setting in ["2d", "3d"] if args.setting == "all" else [args.setting]:
        r = measure(setting, device, args.repeats, args.warmup)
        print(f"| {setting} | {r['seq']:.1f} | {r['vmap']:.1f} | {r['vmap/seq']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
