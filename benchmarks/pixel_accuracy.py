"""Test-set pixel accuracy of a segmentation bundle's trained networks, for comparison with published figures that
are given as pixel accuracy rather than Dice (e.g. AxonDeepSeg's 85% on its rat SEM test images).

Pixel accuracy is the share of the test pixels (background included) whose predicted class equals the label, pooled
over the test images after the evaluate stage's own loading and resampling; Dice (what the bundles report) is per
class and ignores the background. Run from the repository root on the folders a run used, e.g. after
``python -m medkd compare bundles/segmentation_2d --output OUT``::

    python benchmarks/pixel_accuracy.py bundles/segmentation_2d --bundle-root OUT/teacher --networks teacher
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from medkd.bundles import checkpoint_file, run_folders, stage_config
from medkd.training.checkpoints import load_network_weights


def pixel_accuracy(bundle: Path, bundle_root: Path, networks: list[str], dataset_dir: str | None) -> dict[str, float]:
    """Pooled test pixel accuracy of each network in ``networks``, loaded from ``bundle_root``'s checkpoints."""
    overrides = dict(run_folders(bundle_root))
    if dataset_dir:
        overrides["dataset_dir"] = dataset_dir
    parser = stage_config(bundle, "evaluate", overrides)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path, help="bundle folder, e.g. bundles/segmentation_2d")
    p.add_argument("--bundle-root", type=Path, required=True, help="the run's folder (its models/ holds <net>.pt)")
    p.add_argument("--networks", default="teacher", help="comma-separated network names (default: teacher)")
    p.add_argument("--dataset-dir", default=None, help="the run's --dataset_dir (default: the bundle's data)")
    args = p.parse_args()
    networks = args.networks.split(",")
    scores = pixel_accuracy(args.bundle.resolve(), args.bundle_root.resolve(), networks, args.dataset_dir)
    for name, value in scores.items():
        print(f"{name}: test pixel accuracy {value:.4f}")


if __name__ == "__main__":
    main()
