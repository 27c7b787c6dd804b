"""Test-set pixel accuracy of a segmentation bundle's trained networks, for comparison with published figures that
are given as pixel accuracy rather than Dice (e.g. AxonDeepSeg's 85% on its rat SEM test images).

Pixel accuracy is the share of the test pixels (background included) whose predicted class equals the label, pooled
over the test images after the evaluate stage's own loading and resampling; Dice (what the bundles report) is per
class and ignores the background. Run from the repository root on the folders a run used, e.g. after
``python -m medkd compare bundles/segmentation_2d --output OUT``::

    python benchmarks/pixel_accuracy.py bundles/segmentation_2d --run-dir OUT/teacher --networks teacher
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from medkd.bundles import checkpoint_file, run_folders, stage_config
from medkd.training.checkpoints import load_network_weights


def pixel_accuracy(
    bundle: Path, run_dir: Path, networks: list[str], overrides: dict[str, Any] | None = None
) -> dict[str, float]:
    """Pooled test pixel accuracy of each network in ``networks``, loaded from ``run_dir/models/<name>.pt``; the
    evaluate stage of ``bundle`` (with ``overrides``, e.g. the run's ``dataset_dir``) loads the test list."""
    parser = stage_config(bundle, "evaluate", {**run_folders(run_dir), **(overrides or {})})
    device = parser.get_parsed_content("device")
    nets = {name: parser.get_parsed_content("networks")[name] for name in networks}
    ckpt_dir = Path(parser.get_parsed_content("ckpt_dir"))
    for name, net in nets.items():
        load_network_weights(net, ckpt_dir / checkpoint_file(name), map_location=device, role=name)
        net.to(device).eval()
    inferer = parser.get_parsed_content("inferer")
    correct = dict.fromkeys(nets, 0)
    total = 0
    with torch.no_grad():
        for batch in parser.get_parsed_content("dataloader"):
            image, label = batch["image"].to(device), batch["label"].to(device)
            valid = label >= 0  # the ignore label (-1) is not scored
            total += int(valid.sum())
            for name, net in nets.items():
                pred = inferer(image, net).argmax(dim=1, keepdim=True)
                correct[name] += int((pred == label)[valid].sum())
    return {name: correct[name] / max(total, 1) for name in nets}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path, help="the bundle folder the run used, e.g. bundles/segmentation_2d")
    p.add_argument("--run-dir", type=Path, required=True, help="the run's folder (its models/ holds <net>.pt)")
    p.add_argument("--networks", default="teacher", help="comma-separated network names (default: teacher)")
    p.add_argument("--dataset-dir", default=None, help="the run's --dataset_dir (default: the bundle's data)")
    args = p.parse_args(argv)
    overrides = {"dataset_dir": args.dataset_dir} if args.dataset_dir else {}
    networks = args.networks.split(",")
    for name, value in pixel_accuracy(args.bundle.resolve(), args.run_dir.resolve(), networks, overrides).items():
        print(f"{name}: test pixel accuracy {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
