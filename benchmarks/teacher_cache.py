"""Epoch time of the diversified preset with and without ``medkd.knowledge.teacher_cache.TeacherCache``, and whether the
students end the same.

The data are the 2D bundle's synthetic default cases (NIfTI, written to a temporary folder) loaded as the bundle
loads them — its ``load`` transforms (``LoadMedicalImaged`` → ``Orientationd`` → ``Spacingd`` →
``ScaleIntensityRangePercentilesd`` → ``EnsureTyped``), read from its config, in a ``CacheDataset``, batches from a
MONAI ``DataLoader`` (``MetaTensor`` images whose ``meta["filename_or_obj"]`` names each sample) — with no random
augmentation before the teacher, shuffled by a seeded generator. After a one-epoch warm-up, the same seeds train
once without and once with the cache: epoch 1 fills the cache, the first batch of epoch 2 is recomputed once to
verify the cache, and the other batches skip the teacher forward.

Usage::

    python benchmarks/teacher_cache.py --epochs 4 --cases 32 --json teacher_cache.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings

import torch
from bundle_settings import bundle_setting, make_loss, make_network
from ignite.engine import Events
from monai.data import CacheDataset, DataLoader, load_decathlon_datalist
from monai.transforms import Compose

from medkd.data.synthetic import ensure_segmentation_data
from medkd.knowledge.teacher_cache import TeacherCache
from medkd.training.engines import DistillationTrainer, iteration_losses

SPACING = 1.0  # of the generated cases; the bundle's load transforms resample to it (pixdim), i.e. keep them as made


def make_loader(cfg: dict, dataset_dir: str, cases: int, size: int, batch_size: int, seed: int) -> DataLoader:
    """The bundle's deterministic preprocessing (its ``load`` transforms) over generated cases, in a CacheDataset."""
    datalist = ensure_segmentation_data(
        dataset_dir, spatial_dims=2, size=size, counts=(cases, 1, 1), seed=seed, spacing=SPACING
    )
    transform = Compose(cfg["parser"].get_parsed_content("load", lazy=False))
    data = load_decathlon_datalist(datalist, data_list_key="training", base_dir=dataset_dir)
    dataset = CacheDataset(data, transform, cache_rate=1.0, num_workers=0, progress=False)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0, generator=generator)


def train(cfg: dict, loader: DataLoader, epochs: int, cache: TeacherCache | None, seed: int) -> dict:
    teacher = make_network(cfg, "teacher", seed)
    students = {"sp": make_network(cfg, "student", seed + 1), "sf": make_network(cfg, "student", seed + 2)}
    optimizers = {n: torch.optim.Adam(s.parameters(), lr=cfg["lr"]) for n, s in students.items()}
    loader.generator.manual_seed(seed)  # the same batch order in both runs
    trainer = DistillationTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=loader,
        students=students,
        optimizers=optimizers,
        loss_function=make_loss(cfg),
        teacher=teacher,
        routes="diversified",
        teacher_cache=cache,
    )
    forwards = []
    teacher.register_forward_hook(lambda *_: forwards.append(trainer.state.epoch))
    epoch_times, losses, start = [], [], {}
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: start.update(t=time.perf_counter()))

    def epoch_done(engine) -> None:
        epoch_times.append(time.perf_counter() - start["t"])
        terms = iteration_losses(engine.state.output)
        losses.append(sum(float(v) for k, v in terms.items() if k.endswith("/total")))

    trainer.add_event_handler(Events.EPOCH_COMPLETED, epoch_done)
    trainer.run()
    return dict(
        epoch_s=epoch_times,
        last_loss=losses,
        teacher_forwards=[forwards.count(e) for e in range(1, epochs + 1)],
        weights={n: [p.detach().clone() for p in s.state_dict().values()] for n, s in students.items()},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--cases", type=int, default=32, help="training cases (2D, 128x128)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # Orientationd's default-labels notice

    with tempfile.TemporaryDirectory() as tmp:
        cfg = bundle_setting("segmentation_2d", pixdim=[SPACING, SPACING])
        loader = make_loader(cfg, tmp, args.cases, args.size, args.batch_size, args.seed)
        batch = next(iter(loader))
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.cases} cases "
            f"{args.size}x{args.size}, "
            f"batch {args.batch_size}, {len(loader)} iterations/epoch; batch image {type(batch['image']).__name__}, "
            f"ids e.g. {batch['image'].meta['filename_or_obj'][:2]}"
        )
        train(cfg, loader, 1, None, args.seed)  # warm-up (oneDNN primitives, allocator), not reported
        plain = train(cfg, loader, args.epochs, None, args.seed)
        cache = TeacherCache()
        cached = train(cfg, loader, args.epochs, cache, args.seed)

    diffs = [
        (a - b).abs().max().item()
        for n in plain["weights"]
        for a, b in zip(plain["weights"][n], cached["weights"][n], strict=True)
        if a.is_floating_point()
    ]
    max_diff = max(diffs)
    same = all(
        torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)
        for n in plain["weights"]
        for a, b in zip(plain["weights"][n], cached["weights"][n], strict=True)
    )
    print(
        "\n| epoch | no cache s | cache s | speed-up "
        "| teacher forwards (no cache / cache) | last loss (no cache / cache) |"
    )
    print("|---:|---:|---:|---:|---|---|")
    for e in range(args.epochs):
        print(
            f"| {e + 1} | {plain['epoch_s'][e]:.2f} | {cached['epoch_s'][e]:.2f} | "
            f"{plain['epoch_s'][e] / cached['epoch_s'][e]:.2f}x | {plain['teacher_forwards'][e]} / "
            f"{cached['teacher_forwards'][e]} | {plain['last_loss'][e]:.5f} / {cached['last_loss'][e]:.5f} |"
        )
    later_plain = statistics.median(plain["epoch_s"][2:] or plain["epoch_s"][1:])
    later_cached = statistics.median(cached["epoch_s"][2:] or cached["epoch_s"][1:])
    print(
        f"\nepochs 3+ (all batches from the cache): median {later_plain:.2f} s without, {later_cached:.2f} s with "
        f"({later_plain / later_cached:.2f}x). Cache: {len(cache)} samples, {cache.hits} hits, {cache.misses} misses, "
        f"verified: {not cache.needs_verification and cache.enabled}."
    )
    print(f"final student weights: max |difference| {max_diff:.2e}, allclose(rtol=1e-4, atol=1e-5): {same}")
    if args.json:
        with open(args.json, "w") as f:
            runs = {"plain": plain, "cached": cached}
            out = {k: {kk: vv for kk, vv in v.items() if kk != "weights"} for k, v in runs.items()}
            json.dump(dict(args=vars(args), **out, max_weight_diff=max_diff, allclose=same), f, indent=2)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
