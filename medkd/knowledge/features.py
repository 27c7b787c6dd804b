"""Take intermediate feature maps from any network by module name, through forward hooks.

Like torchdistill's forward-hook capture: networks are not rewritten; a hook on each named module stores its
output during the forward pass, and the caller reads them afterwards.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.networks.layers import SkipConnection
from torch import nn

from medkd.errors import ConfigError
from medkd.runtime.distributed import unwrap

__all__ = ["DEPTHS", "Depth", "FeatureExtractor", "default_feature_layer", "feature_depths", "match_depths"]

DEPTHS = {
    "multi": ("encoder", "bottleneck", "decoder"),
    "encoder": ("encoder", "bottleneck"),
    "decoder": ("decoder",),
    "last_decoder": ("decoder",),  # only the finest decoder depth both networks have: the last before the output
}  # the names a route's "layers" may give instead of module names, by the roles of the depths they take


def _resolve(network: nn.Module, name: str, network_name: str) -> nn.Module:
    modules = dict(unwrap(network).named_modules())
    if name not in modules:
        valid = [n for n in modules if n]
        shown = ", ".join(valid[:40]) + (f", ... ({len(valid)} in all)" if len(valid) > 40 else "")
        raise ConfigError(
            f"network '{network_name}' has no module named '{name}'. Valid names: {shown}. "
            "Use the names printed by `[n for n, _ in network.named_modules()]`."
        )
    return modules[name]


def default_feature_layer(network: nn.Module, example_input: torch.Tensor | None = None) -> str:
    """The layer medkd distils by default: the bottleneck of a MONAI U-Net, the last convolutional stage of a
    classifier (DenseNet ``features``, ResNet ``layer4``); for another network, given ``example_input``, the
    bottleneck that :func:`feature_depths` finds by probing its output shapes (e.g. ``down_4`` of a ``BasicUNet``).

    Raises:
        ConfigError: when the architecture is not recognised and no ``example_input`` is given, or the probe finds
            no feature map; name the layer explicitly then.
    """
    net = unwrap(network)
    skips = [name for name, m in net.named_modules() if isinstance(m, SkipConnection)]
    if skips:  # U-Net family: the innermost skip connection wraps the bottleneck
        return max(skips, key=lambda n: n.count(".")) + ".submodule"
    names = dict(net.named_modules())
    for candidate in ("features", "layer4"):
        if candidate in names:
            return candidate
    if example_input is not None:
        return next(d.layer for d in feature_depths(net, example_input) if d.role == "bottleneck")
    raise ConfigError(
        f"cannot choose a default feature layer for {type(net).__name__}; give the module names "
        "in `feature_layers` (see `network.named_modules()`)."
    )


@dataclass(frozen=True)
class Depth:
    """A layer of a network at one depth, as :func:`feature_depths` finds it.

    Attributes:
        role: ``"encoder"`` (on the way down), ``"bottleneck"`` (the coarsest) or ``"decoder"`` (on the way up).
        size: spatial shape of its output for the probe input (e.g. ``(48, 48)``).
        channels: channels of its output.
        layer: module name, as in ``network.named_modules()``.
    """

    role: str
    size: tuple[int, ...]
    channels: int
    layer: str


@dataclass
class _Call:
    """One module's call in the probe forward: when it started and completed (one count for both), the resolution
    (number of spatial elements) of its first tensor input and of its output."""

    name: str
    start: int
    in_scale: int | None
    end: int = -1
    out_scale: int | None = None
    output: weakref.ref | None = None


@dataclass
class _Map:
    """One distinct feature map of the probe forward, with the modules (with parameters) that returned it."""

    tensor: weakref.ref
    size: tuple[int, ...]
    channels: int
    names: list[str]
    done: int  # when the last (outermost) of them completed: a block adding in place to its last layer's map is done

    @property
    def scale(self) -> int:
        return math.prod(self.size)

    @property
    def layer(self) -> str:
        """The shortest name among the modules that returned it (e.g. ``down_1``, not ``down_1.convs.conv_1``)."""
        return min(self.names, key=lambda n: n.count("."))  # min keeps the first (innermost) of equals


class _Probe:
    """Record one forward of ``network`` on the first sample of ``example_input`` (eval mode, no grad): every
    module's :class:`_Call`, and the feature maps (:class:`_Map`, in the order they were made) returned by modules
    with parameters that do not merely concatenate (``SkipConnection``), with the input's spatial dims, more than
    one pixel, and other than the network's output (``self.output_calls`` are the calls that returned that)."""

    def __init__(self, network: nn.Module, example_input: torch.Tensor) -> None:
        self.ndim = example_input.ndim
        self.calls: list[_Call] = []
        self.maps: list[_Map] = []
        self._by_id: dict[int, _Map] = {}
        self._clock = itertools.count()
        self._open: list[_Call] = []  # the calls started and not yet completed, innermost last
        handles = []
        for name, module in network.named_modules():
            if name:
                is_layer = not isinstance(module, SkipConnection) and next(module.parameters(), None) is not None
                handles.append(module.register_forward_pre_hook(self._started(name)))
                handles.append(module.register_forward_hook(self._completed(is_layer)))
        was_training = network.training
        try:
            network.eval()
            with torch.no_grad():
                result = network(example_input[:1])
        finally:
            network.train(was_training)
            for handle in handles:
                handle.remove()
        self.output_calls = [c for c in self.calls if c.output is not None and c.output() is result]
        self.maps = [m for m in self.maps if m.tensor() is not result]

    def _scale(self, x: object) -> int | None:
        return math.prod(x.shape[2:]) if isinstance(x, torch.Tensor) and x.ndim == self.ndim else None

    def _started(self, name: str):
        def hook(_module: nn.Module, inputs: tuple) -> None:
            first = next((x for x in inputs if isinstance(x, torch.Tensor)), None)
            self.calls.append(_Call(name, next(self._clock), self._scale(first)))
            self._open.append(self.calls[-1])

        return hook

    def _completed(self, is_layer: bool):
        def hook(_module: nn.Module, _inputs: tuple, output: object) -> None:
            call = self._open.pop()
            call.end, call.out_scale = next(self._clock), self._scale(output)
            if call.out_scale is None:
                return
            call.output = weakref.ref(output)
            if not is_layer or call.out_scale <= 1:
                return
            seen = self._by_id.get(id(output))
            if seen is not None and seen.tensor() is output:  # e.g. a Sequential returning its last child's map
                seen.names.append(call.name)
                seen.done = call.end
                return
            self._by_id[id(output)] = _Map(call.output, tuple(output.shape[2:]), output.shape[1], [call.name], call.end)
            self.maps.append(self._by_id[id(output)])

        return hook

    def last_map_before(self, time: float) -> _Map | None:
        """The last feature map done before ``time``."""
        return max((m for m in self.maps if m.done < time), key=lambda m: m.done, default=None)


def feature_depths(network: nn.Module, example_input: torch.Tensor) -> list[Depth]:
    """The layers of ``network`` at several depths, found from the resolutions of one probe forward on the first
    sample of ``example_input`` (``(B, C, *spatial)``), not from module names: so MONAI's ``UNet``, ``BasicUNet``,
    ``DynUNet``, ``SegResNet`` and classifiers (DenseNet, ResNet) get theirs alike.

    A feature map is the output of a module with parameters; a module whose output is coarser than its input
    *downsamples*, finer *upsamples*. Then:

    - an **encoder** depth at a resolution is the last map made before the first downsampling from it;
    - the **bottleneck** is the last map at the coarsest resolution made before the first upsampling after it
      (for a classifier, the last at the coarsest resolution);
    - a **decoder** depth at a resolution is the last map made before the next upsampling from it, or before the
      output head, kept only where an encoder depth has the same resolution (the network's output is never one).

    When several modules return the same map (a ``Sequential`` and its last child), the shortest name is given.

    Returns:
        encoder depths (finest first), the bottleneck, decoder depths (coarsest first); a classifier has no decoder.

    Raises:
        ConfigError: when the forward gives no feature map to choose from.
    """
    net = unwrap(network)
    probe = _Probe(net, example_input)
    if not probe.maps:
        raise ConfigError(
            f"no feature map found in a forward of {type(net).__name__}; name the layers explicitly "
            "(see `network.named_modules()`)."
        )
    coarsest = min(m.scale for m in probe.maps)
    calls = sorted((c for c in probe.calls if c.in_scale and c.out_scale), key=lambda c: c.start)
    downs = [c for c in calls if c.out_scale < c.in_scale]
    ups = [c for c in calls if c.out_scale > c.in_scale]

    def depths_before(changes: list[_Call], after: float) -> dict[tuple[int, ...], _Map]:
        found: dict[tuple[int, ...], _Map] = {}
        for change in changes:
            m = probe.last_map_before(change.start)
            if m is not None and m.done > after and m.scale == change.in_scale and m.scale > coarsest:
                found.setdefault(m.size, m)  # the first change from a resolution, not one inside a later block
        return found

    encoder = depths_before(downs, after=-1)
    first_coarsest = next(m for m in probe.maps if m.scale == coarsest)
    up = next((c.start for c in ups if c.start > first_coarsest.done), math.inf)
    bottleneck = max((m for m in probe.maps if m.scale == coarsest and m.done < up), key=lambda m: m.done)
    last_up = max((c.start for c in ups if c.start > bottleneck.done), default=bottleneck.done)
    head = [c for c in probe.output_calls if c.start > last_up and c.in_scale]
    decoder = depths_before(ups + sorted(head, key=lambda c: c.start)[:1], after=bottleneck.done)

    def depths(role: str, maps: list[_Map]) -> list[Depth]:
        return [Depth(role, m.size, m.channels, m.layer) for m in maps]

    return [
        *depths("encoder", sorted(encoder.values(), key=lambda m: -m.scale)),
        *depths("bottleneck", [bottleneck]),
        *depths("decoder", sorted((m for size, m in decoder.items() if size in encoder), key=lambda m: m.scale)),
    ]


def match_depths(source: Sequence[Depth], target: Sequence[Depth], which: str = "multi") -> list[tuple[str, str]]:
    """``[(source_layer, target_layer), ...]``: the depths of the roles ``which`` names (:data:`DEPTHS`: ``"multi"``
    every depth, ``"encoder"`` the encoder's and the bottleneck, ``"decoder"`` the decoder's, ``"last_decoder"`` the
    finest of the decoder's, the layer just before the output head) paired by role and resolution (the bottlenecks
    pair whatever their resolutions), in the source's order."""
    roles = DEPTHS[which]
    by_key = {(d.role, None if d.role == "bottleneck" else d.size): d for d in target}
    pairs = []
    for d in source:
        match = by_key.get((d.role, None if d.role == "bottleneck" else d.size))
        if d.role in roles and match is not None:
            pairs.append((d.layer, match.layer))
    return pairs[-1:] if which == "last_decoder" else pairs  # decoder depths run coarsest first


class FeatureExtractor:
    """Record the outputs of named modules of ``network`` at each forward pass.

    Args:
        network: any ``nn.Module`` (DDP-wrapped networks are unwrapped for naming).
        layers: module names, as in ``network.named_modules()``.
        network_name: used in error messages.

    Example::

        fx = FeatureExtractor(unet, ["model.1.submodule.1.submodule"])
        logits = unet(x)
        bottleneck = fx.features["model.1.submodule.1.submodule"]
    """

    def __init__(self, network: nn.Module, layers: Sequence[str], network_name: str = "network") -> None:
        self.layers = list(dict.fromkeys(layers))
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [
            _resolve(network, name, network_name).register_forward_hook(self._hook(name)) for name in self.layers
        ]

    def _hook(self, name: str):
        def store(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            self.features[name] = output

        return store

    def pop(self) -> dict[str, torch.Tensor]:
        """Return the features of the last forward pass and forget them (no reference outlives the step)."""
        features, self.features = self.features, {}
        return features

    def remove(self) -> None:
        """Detach the hooks from the network."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
