"""Checks of a bundle's settings before any work starts: override keys, network geometry, input images.

Every check raises :class:`medkd.errors.ConfigError` naming the key or file, what is wrong and the fix; the bundles
call them first in ``initialize`` (after :func:`medkd.errors.install_excepthook`), so a typo costs a second, not a
traceback after the data is cached.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import os
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from torch import nn

from medkd import config_checks
from medkd.bundles import check_config_files, run_command
from medkd.data.channels import is_picture
from medkd.data.loading import LoadMedicalImage, unit_axes
from medkd.errors import ConfigError
from medkd.runtime.devices import check_device

__all__ = [
    "RUN_ARGUMENTS",
    "RENAMED",
    "check_overrides",
    "check_command_line",
    "check_writable",
    "command_line_overrides",
    "parse_value",
    "total_stride",
    "check_patch_size",
    "check_inputs",
    "check_networks",
    "bundle_hint",
    "choose",
]

# arguments of ``python -m monai.bundle run`` / ``ConfigWorkflow`` that are not config keys
RUN_ARGUMENTS = frozenset(
    {
        "run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file",
        "workflow_name", "workflow_type", "properties_path",
    }
)  # fmt: skip


# keys of earlier medkd versions, by the key that replaced them
RENAMED = {
    "alpha": "kd_weight",
    "beta": "hint_weight",
    "gamma": "peer_prediction_weight",
    "delta": "peer_feature_weight",
    "metric_prefix": "metric",
    "image_size": "patch_size",  # the spatial size the networks are fed, in every bundle
    "data_keys": "load_keys",  # the keys of the ``load`` transforms, in every bundle
}


def _candidates(parser: ConfigParser, key: str) -> list[str]:
    """Valid keys beside ``key``: the top-level keys, or the siblings of a ``a#b#c`` key."""
    parent, sep, _ = key.replace("::", "#").rpartition("#")
    if not sep:
        return list(parser.get())
    node = parser[parent] if parent in parser else None
    if isinstance(node, Mapping):
        return [f"{parent}#{k}" for k in node]
    if isinstance(node, list):
        return [f"{parent}#{i}" for i in range(len(node))]
    return list(parser.get())


def check_overrides(config_files: Sequence[str | os.PathLike], keys: Iterable[str]) -> None:
    """Raise :class:`ConfigError` for override keys the merged ``config_files`` do not define.

    MONAI adds an unknown override as a new key that nothing reads, so ``--temprature 2`` would be ignored without
    a word; the message names each unknown key and the nearest valid one.
    """
    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    lines = []
    for key in keys:
        if key in RUN_ARGUMENTS or key in parser:
            continue
        parent, sep, leaf = key.rpartition("#")
        if leaf in RENAMED and f"{parent}{sep}{RENAMED[leaf]}" in parser:
            lines.append(f"--{key} (renamed --{parent}{sep}{RENAMED[leaf]})")
            continue
        close = difflib.get_close_matches(key, _candidates(parser, key), n=1, cutoff=0.6)
        lines.append(f"--{key}" + (f" (did you mean --{close[0]}?)" if close else ""))
    if lines:
        files = ", ".join(Path(f).name for f in config_files)
        raise ConfigError(
            f"unknown setting(s) {'; '.join(lines)}: no such key in {files}. Check the spelling; the keys a bundle "
            "reads are those of its configs/*.json."
        )


def parse_value(text: str) -> Any:
    """A command-line value read as ``python -m monai.bundle run --key value`` reads one: JSON (``true``, ``[1, 2]``)
    or a Python literal (``True``, ``None``, ``{'mode': 'max-autotune'}``), else the text itself (a path, an
    expression)."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError):  # json.JSONDecodeError is a ValueError
            continue
    return text


def command_line_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` / ``--flag`` pairs of a ``monai.bundle run`` command line, read as fire reads
    them (hyphens in keys become underscores; ``True`` is a boolean, ``false`` the text ``"false"``)."""
    from fire.parser import DefaultParseValue

    found: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--") or token == "--":
            continue
        key, sep, text = token[2:].partition("=")
        if not sep:
            if i < len(argv) and not argv[i].startswith("--"):
                text, i = argv[i], i + 1
            else:
                text = "True"
        found[key.replace("-", "_")] = DefaultParseValue(text)
    return found


def _other_options(arguments: Sequence[str]) -> list[str]:
    """The options of a ``monai.bundle run`` command line but ``--config_file`` and ``--meta_file`` (which
    :func:`~medkd.bundles.run_command` gives), quoted for a shell."""
    kept: list[str] = []
    skip = False
    for token in arguments[1:] if arguments and arguments[0] == "run" else arguments:
        key = token[2:].partition("=")[0].replace("-", "_") if token.startswith("--") else None
        if skip or key in ("config_file", "meta_file"):
            skip = key is not None and "=" not in token
            continue
        kept.append(shlex.quote(token))
    return kept


def check_command_line(argv: Sequence[str] | None = None) -> None:
    """Under ``python -m monai.bundle run`` (or ``torchrun -m monai.bundle run``), check the bundle's config as a
    whole before any work: its ``--config_file`` list (:func:`~medkd.bundles.check_config_files`), the keys of those
    files and of its ``--args_file`` (:func:`medkd.config_checks.check_config_keys`), the ``_target_`` classes, the
    command line's override keys (:func:`check_overrides`) and values
    (:func:`medkd.config_checks.check_override_values`), the ``--device``, and that a ``--datalist_file`` comes with
    its ``--dataset_dir``; a no-op in any other program (e.g. a ``ConfigWorkflow`` built in Python, whose caller
    checks its own overrides)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or Path(argv[0]).parts[-3:] != ("monai", "bundle", "__main__.py"):
        return
    overrides = command_line_overrides(argv[1:])
    if "args_file" in overrides:
        overrides = {**config_checks.read_config_file(str(overrides["args_file"])), **overrides}
    config_files = overrides.get("config_file")
    if config_files is None:
        return
    files = [config_files] if isinstance(config_files, str) else list(config_files)
    check_config_files(files, options=_other_options(argv[1:]))
    settings = {key: value for key, value in overrides.items() if key not in RUN_ARGUMENTS}
    config_checks.check_config_keys(files, settings)
    check_overrides(files, overrides)
    config_checks.check_override_values(files, settings)
    config_checks.check_targets(ConfigParser.load_config_files(files))
    if "device" in overrides:
        check_device(overrides["device"])
    if "datalist_file" in overrides and "dataset_dir" not in overrides:
        folder = Path(str(overrides["datalist_file"])).expanduser().parent
        raise ConfigError(
            f"--datalist_file {overrides['datalist_file']} without --dataset_dir: the bundle would read its relative "
            "paths from, and write its split file, plan and sample data to, its own data folder (bundle_root/data). "
            f"Add --dataset_dir {folder} (the folder its paths start from)."
        )


def check_writable(folders: Mapping[str, str | os.PathLike], root_key: str | None = "bundle_root") -> None:
    """Raise :class:`ConfigError` when a folder a run writes (by the key or option that sets it, e.g.
    ``{"ckpt_dir": ...}``) cannot be written, its nearest existing folder being read-only or a file, before any
    work; the message names the folder and the options that move it (``--<key>``, or ``--<root_key>``, the folder
    the bundle writes ``models/``, ``eval/`` and ``runs/`` under)."""
    for key, folder in folders.items():
        path = Path(folder).expanduser().absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
            continue
        why = "is read-only" if existing.is_dir() else "is a file"
        where = f" (or --{root_key}, the folder the bundle writes models/, eval/ and runs/ under)" if root_key else ""
        raise ConfigError(
            f"{path} ({key}) cannot be written: {existing} {why}. Give --{key}{where} a folder you can write to."
        )


def total_stride(network: nn.Module) -> list[int] | None:
    """Per spatial axis, the factor by which ``network`` downsamples its input (the product of its ``strides``, as
    MONAI's ``UNet`` and ``DynUNet`` record them), or ``None`` for networks that do not record strides."""
    strides = getattr(network, "strides", None)
    if not strides:
        return None
    per_level = [[int(s)] if isinstance(s, int) else [int(x) for x in s] for s in strides]
    dims = max(max(len(s) for s in per_level), getattr(network, "dimensions", 0), getattr(network, "spatial_dims", 0))
    per_level = [s * dims if len(s) == 1 else s for s in per_level]
    return [math.prod(level[axis] for level in per_level) for axis in range(dims)]


def _takes(network: nn.Module, size: Sequence[int]) -> bool | None:
    """Whether ``network`` runs on an input of ``size``, tried on the meta device (no memory, no arithmetic, the
    network's own weights untouched); ``None`` where that cannot be told (no convolution to read the input channels
    from, an operator without meta support)."""
    conv = next((m for m in network.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if conv is None:
        return None
    meta = {k: torch.empty_like(v, device="meta") for k, v in [*network.named_parameters(), *network.named_buffers()]}
    try:
        with torch.no_grad():  # a batch of 2: batch normalisation in training mode needs more than one value
            torch.func.functional_call(network, meta, (torch.empty(2, conv.in_channels, *size, device="meta"),))
    except (RuntimeError, ValueError):
        return False
    except Exception:  # noqa: BLE001 - an operator the meta device lacks: the size cannot be told here
        return None
    return True


def _probe_size(name: str, network: nn.Module, patch_size: Sequence[int], key: str) -> None:
    """Raise :class:`ConfigError` when ``network``, which records no strides (a classifier), cannot take an input
    of ``patch_size`` (its pooling would shrink some axis below nothing), naming the smallest power of two per axis it
    takes."""
    if _takes(network, patch_size) is not False:
        return
    smallest = [2 ** math.ceil(math.log2(max(int(p), 1))) for p in patch_size]
    while max(smallest) <= 1024 and _takes(network, smallest) is False:
        smallest = [2 * s for s in smallest]
    hint = f'Use e.g. --{key} "{smallest}"' if max(smallest) <= 1024 else f"Use a larger --{key}"
    raise ConfigError(
        f"{key} {list(patch_size)} is too small for the {name} network ({type(network).__name__}): its downsampling "
        f"leaves nothing of it. {hint}, or a network that downsamples less."
    )


def check_patch_size(networks: Mapping[str, nn.Module], patch_size: Sequence[int], key: str = "patch_size") -> None:
    """Raise :class:`ConfigError` when ``patch_size`` is not a multiple of a network's total stride on some axis
    (skip connections would not line up), or, for a network that records no strides (a classifier), is too small for
    it to run on; naming the network and sizes that work."""
    for name, network in networks.items():
        stride = total_stride(network)
        if stride is None:
            _probe_size(name, network, patch_size, key)
            continue
        stride = stride * len(patch_size) if len(stride) == 1 else stride
        if len(stride) != len(patch_size):
            raise ConfigError(
                f"{key} {list(patch_size)} has {len(patch_size)} axes but the {name} network is {len(stride)}D; "
                f'give one size per spatial axis (--{key} "{[96] * len(stride)}").'
            )
        if any(int(p) % s for p, s in zip(patch_size, stride, strict=True)):
            fixed = [max(s, round(int(p) / s) * s) for p, s in zip(patch_size, stride, strict=True)]
            raise ConfigError(
                f"{key} {list(patch_size)} is not a multiple of {stride}, the total downsampling of the {name} "
                f"network (its strides multiplied): its skip connections would not line up. Use e.g. "
                f'--{key} "{fixed}", or change the network\'s strides.'
            )


def _channels_and_dims(image: Any) -> tuple[int, int]:
    """(channels, spatial dims) of an image as loaded without ``ensure_channel_first``."""
    channel_dim = image.meta.get("original_channel_dim", "no_channel")
    if channel_dim in ("no_channel", None) or (isinstance(channel_dim, float) and math.isnan(channel_dim)):
        return 1, image.ndim
    return int(image.shape[int(channel_dim)]), image.ndim - 1


def bundle_hint(dims: int, task: str | None = None, start: str | os.PathLike | None = None) -> str:
    """Which bundle to use for ``dims``-D images (of ``task``, when known), for error messages: the command of its
    train stage typed in ``start`` (default the working folder) where medkd's ``bundles`` folder is at hand, else the
    bundle's name."""
    names = [f"{task}_{dims}d"] if task else [f"segmentation_{dims}d", f"classification_{dims}d"]
    bundles = Path(__file__).resolve().parents[1] / "bundles"
    if not all((bundles / name / "configs" / "train.json").is_file() for name in names):
        return "use " + " or ".join(f"bundles/{name}" for name in names)
    start = Path.cwd() if start is None else Path(start)
    return "run " + " or ".join(run_command(bundles / name, "train", start) for name in names)


def check_inputs(datalists: Mapping[str, Sequence[Mapping]], in_channels: int, spatial_dims: int) -> None:
    """Raise :class:`ConfigError` when the first image of a list has another number of channels or spatial
    dimensions than the bundle's ``in_channels`` / ``spatial_dims`` (e.g. a 2-channel volume into a 1-channel bundle,
    3D volumes into a 2D bundle), naming the file and the fix. A picture (PNG, JPEG, BMP) takes 1 or 3 channels
    whatever it holds: the bundles convert it (:class:`medkd.data.channels.MatchChannelsd`)."""
    loader = LoadMedicalImage(image_only=True, dtype=None)
    for key, items in datalists.items():
        if not items or "image" not in items[0]:
            continue
        path = items[0]["image"]
        image = loader(path)
        channels, dims = _channels_and_dims(image)
        if dims > spatial_dims and unit_axes(image, dims - spatial_dims):
            dims = spatial_dims  # a slice stored as (H, W, 1): the bundles drop the axis (DropUnitAxesd)
        if dims != spatial_dims:
            raise ConfigError(
                f"{path} (first image of the {key} list) is {dims}D but this bundle has spatial_dims={spatial_dims}: "
                f"{bundle_hint(dims)}, or convert the data."
            )
        if channels != in_channels and not (is_picture(path, dims) and in_channels in (1, 3)):
            what = "an RGB(A) image" if channels in (3, 4) and spatial_dims == 2 else f"{channels} channels"
            raise ConfigError(
                f"{path} (first image of the {key} list) has {what} but the bundle's in_channels is {in_channels}: "
                f"pass --in_channels {channels} (the networks follow it), or convert the images"
                + (" to greyscale." if in_channels == 1 and channels in (3, 4) and spatial_dims == 2 else ".")
            )


def check_networks(networks: Any, key: str = "networks") -> None:
    """Raise :class:`ConfigError` unless ``networks`` maps names to networks (what an evaluation scores), saying how
    to pick some of them: a list of names, for one, is not enough, as the bundle cannot tell which network each is."""
    if isinstance(networks, Mapping) and networks and all(isinstance(n, nn.Module) for n in networks.values()):
        return
    raise ConfigError(
        f"--{key} must map names to networks, but it is {networks!r}. Evaluate the teacher only with "
        f"--{key} \"\\${{'teacher': @teacher}}\", the students only with --{key} @students, or one student with "
        f"--{key} \"\\${{'sp': @students['sp']}}\" (the \\ keeps the shell from reading the $)."
    )


def choose(options: Mapping[str, Any], name: str, key: str) -> Any:
    """``options[name]``, or a :class:`ConfigError` saying that ``--key name`` is not one of the options."""
    if name not in options:
        raise ConfigError(f"--{key} {name!r} is not one of {list(options)}.")
    return options[name]
