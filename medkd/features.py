"""Take intermediate feature maps from any network by module name, through forward hooks.

Like torchdistill's forward-hook capture: networks are not rewritten; a hook on each named module stores its
output during the forward pass, and the caller reads them afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers import SkipConnection
from torch import nn

from medkd.distributed import unwrap
from medkd.errors import ConfigError

__all__ = ["FeatureExtractor", "default_feature_layer"]


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


def default_feature_layer(network: nn.Module) -> str:
    """The layer medkd distils by default: the bottleneck of a MONAI U-Net, the last convolutional stage of a
    classifier (DenseNet ``features``, ResNet ``layer4``).

    Raises:
        ConfigError: when the architecture is not recognised; name the layer explicitly then.
    """
    net = unwrap(network)
    skips = [name for name, m in net.named_modules() if isinstance(m, SkipConnection)]
    if skips:  # U-Net family: the innermost skip connection wraps the bottleneck
        return max(skips, key=lambda n: n.count(".")) + ".submodule"
    names = dict(net.named_modules())
    for candidate in ("features", "layer4"):
        if candidate in names:
            return candidate
    raise ConfigError(
        f"cannot choose a default feature layer for {type(net).__name__}; give the module names "
        "in `feature_layers` (see `network.named_modules()`)."
    )


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
