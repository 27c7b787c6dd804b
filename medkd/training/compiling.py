"""``torch.compile`` for medkd's engines: networks compiled in place, fed plain tensors (:class:`PlainInputs`).

The engines compile with ``nn.Module.compile`` rather than wrapping (``torch.compile(network)``): the network stays
the same object, of the same class, with the same state-dict keys, so checkpoints, fingerprints, layer names and the
validator (which runs the same objects) see no difference, and the forward hooks that capture feature maps are traced
into the compiled graph (torch re-traces a network whose hooks have changed since a call, as when the routes probe
it before and after hooking it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from torch import nn

__all__ = ["PlainInputs", "compile_in_place", "compiled_inferer", "is_compiled"]


def is_compiled(network: nn.Module) -> bool:
    """Whether ``network`` was compiled in place (``nn.Module.compile``)."""
    return getattr(network, "_compiled_call_impl", None) is not None


def compile_in_place(networks: Iterable[nn.Module], compile_kwargs: Mapping[str, Any] | None = None) -> None:
    """``network.compile(**compile_kwargs)`` for each network not compiled yet (a network shared by a trainer and
    its validator is compiled once). ``compile_kwargs``: those of ``torch.compile``, e.g. ``{"mode":
    "max-autotune"}`` or ``{"backend": "eager"}`` (tracing only, to check that a network compiles)."""
    for network in networks:
        if not is_compiled(network):
            network.compile(**dict(compile_kwargs or {}))


class PlainInputs(Inferer):
    """``inferer`` run on the plain tensor of a ``MetaTensor`` input (compiled graphs do not take MetaTensors,
    pytorch/pytorch#117026), its prediction given the input's metadata back, so that postprocessing and writers see
    what they see without compiling. (MONAI's own ``compile=True`` path rebuilds the MetaTensor from the metadata
    dict, which fails on a collated batch of more than one image.)

    Args:
        inferer: the inferer to wrap (``SimpleInferer``, ``SlidingWindowInferer``, ...).
    """

    def __init__(self, inferer: Inferer) -> None:
        super().__init__()
        self.inferer = inferer

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(inputs, MetaTensor):
            return self.inferer(inputs, network, *args, **kwargs)
        pred = self.inferer(inputs.as_tensor(), network, *args, **kwargs)
        if isinstance(pred, torch.Tensor) and not isinstance(pred, MetaTensor):
            pred = MetaTensor(pred)
            pred.copy_meta_from(inputs)
        return pred


def compiled_inferer(
    networks: Iterable[nn.Module], inferer: Inferer, compile_kwargs: Mapping[str, Any] | None = None
) -> PlainInputs:
    """Compile ``networks`` in place (:func:`compile_in_place`) and return ``inferer`` wrapped to feed them plain
    tensors: what an engine with ``compile=True`` runs its networks through."""
    compile_in_place(networks, compile_kwargs)
    return PlainInputs(inferer)
