"""Pictures of a segmentation evaluation: each test case's image with, side by side, the ground truth and every
network's segmentation as coloured label overlays (:class:`SegmentationOverlays`, in ``eval/overlays/``), a gallery
of the worst cases, and one page of the same cases across several evaluated runs (:func:`methods_page`).

A mean Dice hides what a look shows at once (a checkerboard artefact, a class drawn at the wrong place). A 3D case
is drawn through its axial slice (the last spatial axis) with the most ground-truth foreground
(:func:`foreground_slice`); Dice is that of the whole case. Beside each ``<case>.png`` the slice drawn is kept as
``<case>.npz``, from which :func:`methods_page` redraws it across runs.
"""

from __future__ import annotations

import io
import logging
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics import compute_dice
from monai.utils import ImageMetaKey
from monai.utils.enums import CommonKeys as Keys
from monai.visualize import blend_images

from medkd.bundles import TEACHER
from medkd.data.cases import case_name
from medkd.errors import ConfigError
from medkd.training.evaluators import ENSEMBLE, pred_key

__all__ = [
    "OVERLAYS_DIR",
    "WORST_PNG",
    "CLASS_COLOURS",
    "SegmentationOverlays",
    "foreground_slice",
    "case_dice",
    "worst_cases",
    "methods_page",
    "pyplot",
    "save_png",
]

logger = logging.getLogger("medkd.tools.overlays")

OVERLAYS_DIR = "overlays"  # in the evaluation's output_dir
WORST_PNG = "worst.png"
# one fixed colour per foreground class (class 1 first, then cycled), readable on grey images
CLASS_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#e377c2", "#17becf", "#bcbd22")
MAX_WIDTH_PX = 1200  # the widest picture drawn
PANEL_IN, DPI = 2.0, 100  # a panel's size (inches) at most in a gallery, and pixels per inch
CASE_COLUMNS = 3  # panels per row in the picture of one case
MAX_SIDE = 512  # a slice larger than this is drawn (and kept) subsampled to about this size
ALPHA = 0.45  # the weight of a label's colour over the image


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def foreground_slice(label: np.ndarray) -> int:
    """Index, along the last axis of a 3D ``label`` map, of the slice with the most foreground (non-zero) voxels;
    the middle slice when there is none."""
    counts = (np.asarray(label) != 0).reshape(-1, label.shape[-1]).sum(axis=0)
    return int(counts.argmax()) if counts.any() else label.shape[-1] // 2


def case_dice(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Mean Dice over the foreground classes of one case, from one-hot ``pred`` and ``label`` (C, *spatial), as the
    evaluation's ``MeanDice`` scores it: a class absent from the label is left out; NaN when every class is."""
    scores = compute_dice(pred[None].float(), label[None].float().to(pred.device), include_background=False)
    return float(torch.nanmean(scores)) if scores.numel() else float("nan")


def worst_cases(scores: Mapping[str, float], count: int) -> list[str]:
    """The ``count`` cases of lowest score, worst first; cases without a score (NaN) come last."""
    return sorted(scores, key=lambda case: (math.isnan(scores[case]), scores[case]))[:count]


def _class_map(onehot: torch.Tensor) -> np.ndarray:
    """A one-hot (C, *spatial) or one-channel (1, *spatial) label as a class-index map (*spatial)."""
    array = torch.as_tensor(onehot).detach().cpu()
    return (array.argmax(0) if array.shape[0] > 1 else array[0]).numpy().astype(np.uint8)


def _plane(array: np.ndarray, index: int | None) -> np.ndarray:
    """A 2D plane of ``array`` (*spatial): the slice ``index`` of a 3D one, subsampled to about :data:`MAX_SIDE`."""
    plane = array[..., index] if index is not None else array
    step = max(1, math.ceil(max(plane.shape) / MAX_SIDE))
    return np.ascontiguousarray(plane[::step, ::step].T)  # rows along the second axis, as a radiological view


def _grey(image: np.ndarray) -> np.ndarray:
    """An image plane scaled to [0, 1] between its 1st and 99th percentiles."""
    low, high = np.percentile(image, (1, 99))
    return np.clip((image - low) / (high - low), 0, 1) if high > low else np.zeros_like(image, dtype=np.float32)


def _blend(grey: np.ndarray, labels: np.ndarray | None, num_classes: int) -> np.ndarray:
    """RGB (H, W, 3) of a grey plane with ``labels`` coloured over it (MONAI's ``blend_images``)."""
    if labels is None:
        return np.repeat(grey[..., None], 3, axis=-1)
    from matplotlib.colors import ListedColormap

    colours = ListedColormap(["black", *(CLASS_COLOURS[i % len(CLASS_COLOURS)] for i in range(num_classes - 1))])
    scaled = labels[None].astype(np.float32) / max(num_classes - 1, 1)  # class k -> colour k of the map
    rgb = blend_images(grey[None], scaled, alpha=ALPHA, cmap=colours, rescale_arrays=False)
    return np.moveaxis(np.asarray(rgb), 0, -1)


def _draw_row(axes: Sequence[Any], case: Mapping[str, Any], panels: Sequence[tuple[str, str]], num_classes: int):
    """Draw one case on a row of axes: ``panels`` are (title, key of ``case``), ``"image"`` drawn plain."""
    grey = _grey(case["image"])
    for ax, (title, key) in zip(axes, panels, strict=True):
        ax.imshow(_blend(grey, None if key == "image" else case[key], num_classes))  # antialiased when shrunk
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()


def _legend(figure: Any, class_names: Sequence[str]) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=CLASS_COLOURS[i % len(CLASS_COLOURS)], label=name) for i, name in enumerate(class_names)]
    figure.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)


def _titles(case: Mapping[str, Any], networks: Sequence[str]) -> list[tuple[str, str]]:
    """Panel titles and keys of a case: the image, the ground truth, then each network with its Dice."""
    dice = dict(zip(case["networks"].tolist(), case["dice"].tolist(), strict=True))
    return [("image", "image"), ("ground truth", "label")] + [
        (f"{n}\nDice {dice[n]:.3f}", pred_key(n)) for n in networks
    ]  # fmt: skip


def _gallery(
    rows: Sequence[tuple[str, Mapping[str, Any], list]],
    class_names: Sequence[str],
    title: str,
    path: Path,
    panel_in: float = PANEL_IN,
) -> None:
    """Save a picture of ``rows`` (row title, case, panels), one row each, with a legend of the foreground
    ``class_names``; panels of ``panel_in`` inches at most; the row titles, in order, go into the PNG's
    ``Description``."""
    plt = pyplot()
    columns = max(len(panels) for _, _, panels in rows)
    size = min(panel_in, MAX_WIDTH_PX / DPI / columns)
    height = (size + 0.45) * len(rows) + 0.6  # a panel and its two-line title per row, the title and the legend
    figure, axes = plt.subplots(
        len(rows), columns, figsize=(size * columns, height), squeeze=False, layout="constrained"
    )
    for row_axes, (row_title, case, panels) in zip(axes, rows, strict=True):
        _draw_row(row_axes[: len(panels)], case, panels, len(class_names) + 1)
        for ax in row_axes[len(panels) :]:
            ax.set_axis_off()
        if row_title:  # in place of the image's title, wrapped to the panel's width
            row_axes[0].set_title(textwrap.fill(row_title, int(size * 15)), fontsize=8)
    figure.suptitle(title, fontsize=9)
    _legend(figure, class_names)
    save_png(figure, path, "; ".join(dict.fromkeys(r or title for r, _, _ in rows)))


def save_png(figure: Any, path: Path, description: str = "") -> None:
    """Save and close a matplotlib ``figure`` as a PNG of at most 256 colours (a few times smaller than matplotlib's
    own), ``description`` in its ``Description`` text."""
    from PIL import Image, PngImagePlugin

    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=DPI, format="png")
    pyplot().close(figure)
    info = PngImagePlugin.PngInfo()
    info.add_text("Description", description)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.open(buffer).convert("RGB").quantize(256).save(path, pnginfo=info, optimize=True)


class SegmentationOverlays:
    """At each iteration of a segmentation evaluation (:class:`medkd.training.evaluators.MultiNetworkEvaluator`
    after its argmax/one-hot postprocessing), save ``<output_dir>/overlays/<case>.png`` for each case: the image and,
    side by side, the ground truth and each network's segmentation as coloured overlays, with each network's Dice
    for the case; at the end, ``worst.png``, the ``worst`` cases of lowest key score (the mean of the students' Dice
    for the case; every network's where none is a student), worst first. The evaluate stage sets an earlier
    evaluation's overlays folder aside first (:func:`medkd.tools.outputs.set_aside_evaluation`); used on its own, the
    handler replaces the overlays it finds in that folder, with a warning.

    Args:
        output_dir: the evaluation's output folder.
        class_names: every class name, background first (index order).
        networks: the networks scored, in panel order (e.g. :func:`~medkd.training.evaluators.scored_networks`).
        enabled: ``False`` to draw nothing (the bundle key ``overlays``).
        worst: the number of cases in ``worst.png``.
    """

    def __init__(
        self,
        output_dir: str,
        class_names: Sequence[str],
        networks: Sequence[str],
        enabled: bool = True,
        worst: int = 4,
    ) -> None:
        self.folder = Path(output_dir) / OVERLAYS_DIR
        self.class_names = [str(c) for c in class_names]
        self.networks = list(networks)
        self.students = [n for n in self.networks if n not in (TEACHER, ENSEMBLE)] or self.networks
        self.enabled = enabled
        self.worst = worst
        self.scores: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        """Draw at every iteration of ``engine`` and the gallery when it completes (nothing when not enabled)."""
        if self.enabled:
            engine.add_event_handler(Events.EPOCH_STARTED, self._start)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._draw_batch)
            engine.add_event_handler(Events.COMPLETED, self._draw_worst)

    def _start(self, engine: Engine) -> None:
        self.scores = {}
        earlier = [p for p in self.folder.glob("*") if p.suffix in (".png", ".npz")]
        if earlier:
            logger.warning(f"replacing the {len(earlier)} overlay files of an earlier evaluation in {self.folder}")
            for path in earlier:
                path.unlink()

    def _draw_batch(self, engine: Engine) -> None:
        for item in engine.state.output or []:  # decollated: one dict per case
            self.draw_case(item)

    def _name(self, item: Mapping[str, Any]) -> str:
        meta = getattr(item[Keys.IMAGE], "meta", {})
        name = Path(case_name(meta.get(ImageMetaKey.FILENAME_OR_OBJ) or f"case_{len(self.scores) + 1}")).name
        name = name.removesuffix(".gz").rsplit(".", 1)[0] if "." in name else name
        return name if name not in self.scores else f"{name}_{len(self.scores) + 1}"

    def draw_case(self, item: Mapping[str, Any]) -> Path:
        """Save the picture (and slice, ``.npz``) of one case of the evaluator's decollated output; return it."""
        name = self._name(item)
        label = _class_map(item[Keys.LABEL])
        index = foreground_slice(label) if label.ndim == 3 else None
        dice = [case_dice(item[pred_key(n)], item[Keys.LABEL]) for n in self.networks]
        case = {
            "image": _plane(torch.as_tensor(item[Keys.IMAGE])[0].detach().cpu().float().numpy(), index),
            "label": _plane(label, index),
            **{pred_key(n): _plane(_class_map(item[pred_key(n)]), index) for n in self.networks},
            "networks": np.array(self.networks),
            "dice": np.array(dice),
            "slice": np.array(-1 if index is None else index),
        }
        self.scores[name] = float(np.nanmean([d for n, d in zip(self.networks, dice, strict=True)
                                              if n in self.students] or [np.nan]))  # fmt: skip
        self.folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(self.folder / f"{name}.npz", **case)
        where = "" if index is None else f", axial slice {index} of {label.shape[-1]} (most foreground)"
        path = self.folder / f"{name}.png"
        panels = _titles(case, self.networks)  # in rows of three, each panel up to 4 inches: near the image's pixels
        rows = [("", case, panels[i : i + CASE_COLUMNS]) for i in range(0, len(panels), CASE_COLUMNS)]
        _gallery(rows, self.class_names[1:], f"{name}{where}", path, panel_in=MAX_WIDTH_PX / DPI / CASE_COLUMNS)
        return path

    def _draw_worst(self, engine: Engine) -> None:
        cases = worst_cases(self.scores, self.worst)
        if not cases:
            return
        rows = []
        for name in cases:
            case = dict(np.load(self.folder / f"{name}.npz"))
            rows.append((f"{name} (students' mean Dice {self.scores[name]:.3f})", case, _titles(case, self.networks)))
        title = f"The {len(cases)} worst of {len(self.scores)} cases by the students' mean Dice, worst first"
        _gallery(rows, self.class_names[1:], title, self.folder / WORST_PNG)
        logger.info(f"overlays of {len(self.scores)} cases and the worst ones in {self.folder}")


def methods_page(
    runs: Mapping[str, str | Path],
    output_file: str | Path,
    class_names: Sequence[str],
    cases: Sequence[str] | None = None,
    network: str = ENSEMBLE,
    count: int = 4,
) -> Path:
    """One page of the same cases across several evaluated runs (e.g. one per method): a row per case with its
    image, ground truth and, for each run, ``network``'s segmentation and Dice (its first student where the run has
    no such network), read from each run's ``overlays/<case>.npz`` (:class:`SegmentationOverlays`).

    Args:
        runs: each run's evaluation output folder (its ``output_dir``), by the name shown (e.g. the method).
        output_file: the PNG to write.
        class_names: every class name, background first.
        cases: the cases to show; default the ``count`` of lowest mean Dice over the runs, worst first.
        network: the network shown of each run.
        count: the number of cases when ``cases`` is not given.
    Returns:
        ``output_file``.
    """
    folders = {name: Path(folder) / OVERLAYS_DIR for name, folder in runs.items()}
    shared = set.intersection(*({p.stem for p in f.glob("*.npz")} for f in folders.values()))
    loaded = {case: {name: dict(np.load(f / f"{case}.npz")) for name, f in folders.items()} for case in shared}
    shown = {case: {name: _shown(run, network) for name, run in by_run.items()} for case, by_run in loaded.items()}
    if cases is None:
        means = {case: float(np.nanmean([d for _, d in by_run.values()])) for case, by_run in shown.items()}
        cases = worst_cases(means, count)
    missing = [c for c in cases if c not in loaded]
    if missing or not cases:
        raise ConfigError(
            f"cases {missing or list(cases)} are not drawn in every run of {[str(f) for f in folders.values()]}: "
            "evaluate each run with overlays on (the default) or name cases they all have."
        )
    rows = []
    for case in cases:
        first = next(iter(loaded[case].values()))
        page = {"image": first["image"], "label": first["label"]}
        panels = [("image", "image"), ("ground truth", "label")]
        for name, (key, dice) in shown[case].items():
            page[name] = loaded[case][name][key]
            panels.append((f"{name}: {key.removeprefix('pred_')}\nDice {dice:.3f}", name))
        rows.append((case, page, panels))
    title = f"The same cases across {len(runs)} runs: {network} of each"
    _gallery(rows, list(class_names)[1:], title, Path(output_file))
    return Path(output_file)


def _shown(run: Mapping[str, Any], network: str) -> tuple[str, float]:
    """The key and Dice of the network a run shows on a methods page: ``network``, else its first student."""
    names = run["networks"].tolist()
    chosen = network if network in names else next((n for n in names if n not in (TEACHER, ENSEMBLE)), names[0])
    return pred_key(chosen), float(run["dice"][names.index(chosen)])
