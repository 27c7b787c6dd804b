"""The network a bundle ships (``network_name``) as MONAI's model-zoo tools expect it: ``network_def`` in the
configs, its best weights as a plain state dict in ``<ckpt_dir>/model.pt``.

The distillation stage writes ``model.pt`` when it completes (:class:`DeployedModel`), so that ``python -m
monai.bundle ckpt_export network_def`` (TorchScript), ``onnx_export`` and ``verify_net_in_out`` run on a trained
bundle with their default checkpoint file. An earlier ``model.pt`` of other weights is set aside with a timestamp
(:func:`medkd.training.checkpoints.keep_previous`), never replaced without a word. The commands: each bundle's
``docs/README.md``, section "Model-zoo commands".
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from medkd.bundles import checkpoint_file
from medkd.errors import ConfigError
from medkd.runtime.files import CheckpointError, load_checkpoint
from medkd.training.checkpoints import save_or_explain
from medkd.training.previous import keep_previous

__all__ = ["MODEL_FILE", "DeployedModel", "same_weights"]

logger = logging.getLogger("medkd.tools.export")

MODEL_FILE = "model.pt"  # the deployed network's weights in ckpt_dir (the model-zoo name)


def same_weights(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """Whether two state dicts hold the same tensors under the same names."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _readable_weights(path: Path) -> dict:
    """The state dict in ``path``; ``{}`` when it cannot be read (a file to set aside like any other)."""
    try:
        return load_checkpoint(path)
    except CheckpointError:
        return {}


class DeployedModel:
    """Write the best checkpoint of the network a user ships to ``{save_dir}/model.pt`` as a plain state dict when
    training completes (rank 0); an earlier ``model.pt`` of other weights is set aside first, one of the same
    weights is left as it is.

    Attach to the trainer. ``network`` must be one of ``networks`` (those with checkpoints: the teacher and the
    students, not their ensemble): a :class:`~medkd.errors.ConfigError` before training otherwise.

    Args:
        save_dir: checkpoint folder (``ckpt_dir``), where :class:`~medkd.training.handlers.BestCheckpoints` writes.
        network: the bundle's ``network_name``.
        networks: the names of the networks with checkpoints.
    """

    def __init__(self, save_dir: str, network: str, networks: Iterable[str]) -> None:
        names = list(networks)
        if network not in names:
            raise ConfigError(
                f"--network_name {network!r}: the network to deploy (models/{MODEL_FILE}, network_def) must be one "
                f"of {names}, a network with weights; the students' ensemble has none of its own."
            )
        self.save_dir = Path(save_dir)
        self.network = network

    @property
    def path(self) -> Path:
        """The file written: ``{save_dir}/model.pt``."""
        return self.save_dir / MODEL_FILE

    def attach(self, engine: Engine) -> None:
        """Write the file at ``Events.COMPLETED`` of ``engine``."""
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        best = self.save_dir / checkpoint_file(self.network)
        if not best.is_file():
            logger.warning("no best checkpoint %s of %s: %s not written", best, self.network, self.path)
            return
        weights = load_checkpoint(best)[self.network]
        if self.path.is_file():
            if same_weights(_readable_weights(self.path), weights):
                return
            keep_previous([self.path], f"writing the best {self.network} to {self.path}")
        save_or_explain(weights, self.path)
        logger.info("deployed network %s (best checkpoint %s) written to %s", self.network, best, self.path)
