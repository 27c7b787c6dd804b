"""Devices, process groups and rank guards, in one process and in two (gloo)."""

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from medkd.data.checks import check_before_run
from medkd.runtime import devices, distributed


def test_devices_and_backend_follow_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.default_device() == devices.local_device() == torch.device("cpu")
    assert devices.default_backend() == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert devices.default_device() == torch.device("cuda", 0)
    assert devices.local_device() == torch.device("cuda", 3)
    assert devices.default_backend() == "nccl"


def test_without_a_process_group_every_guard_is_a_no_op(tmp_path):
    assert not distributed.is_distributed() and not distributed.is_not_rank0()
    with distributed.rank0_first():
        (tmp_path / "written").touch()
    assert (tmp_path / "written").is_file()
    distributed.destroy_process_group()  # not in a group: nothing to leave


def test_data_checks_run_on_rank0_only(monkeypatch, tmp_path):
    monkeypatch.setattr("medkd.data.checks.is_not_rank0", lambda: True)
    check_before_run(tmp_path / "missing.json")  # another rank: no check, no exit
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        check_before_run(tmp_path / "missing.json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank0_writes_first(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    distributed.init_process_group(devices.default_backend(), "cpu")
    distributed.init_process_group(devices.default_backend(), "cpu")  # already in the group: nothing happens
    assert distributed.is_distributed() and distributed.is_not_rank0() == (rank == 1)
    marker = os.path.join(folder, "data")
    with distributed.rank0_first():
        if rank == 0:
            time.sleep(1.0)  # rank 1 would find nothing if it did not wait
            open(marker, "w").close()
        seen = os.path.exists(marker)
    with open(os.path.join(folder, f"rank{rank}"), "w") as f:
        f.write(str(seen))
    distributed.destroy_process_group()
    assert not distributed.is_distributed()


def test_rank0_first_makes_the_other_ranks_wait(tmp_path):
    mp.start_processes(_rank0_writes_first, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    assert (tmp_path / "rank0").read_text() == (tmp_path / "rank1").read_text() == "True"


def test_unwrap_finds_the_network_inside_wrappers_and_compiled_modules(tmp_path):
    from medkd.training.checkpoints import load_network_weights

    class Compiled(torch.nn.Module):  # as torch.compile wraps a module (without compiling anything here)
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

    net = torch.nn.Linear(2, 3)
    compiled = Compiled(torch.nn.DataParallel(net))
    assert distributed.unwrap(net) is net and distributed.unwrap(torch.nn.DataParallel(net)) is net
    assert distributed.unwrap(compiled) is net
    torch.save({"network": torch.nn.Linear(2, 3).state_dict()}, tmp_path / "w.pt")
    load_network_weights(compiled, tmp_path / "w.pt")  # the weights of the network, not of its wrappers
    assert torch.equal(net.weight, torch.load(tmp_path / "w.pt")["network"]["weight"])
