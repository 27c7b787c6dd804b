"""The one atomic writer (medkd.runtime.files): whole files or the previous one, never half of one."""

import json

import pytest
import torch

from medkd.runtime.files import atomic_torch_save, atomic_write_json, atomic_write_text


def test_each_writer_writes_the_whole_file_making_its_folder(tmp_path):
    assert atomic_write_text(tmp_path / "a" / "t.txt", "été\n").read_text(encoding="utf-8") == "été\n"
    assert json.loads(atomic_write_json(tmp_path / "b" / "d.json", {"x": [1, 2]}).read_text()) == {"x": [1, 2]}
    assert torch.equal(torch.load(atomic_torch_save({"w": torch.ones(2)}, tmp_path / "c" / "w.pt"))["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["d.json", "t.txt", "w.pt"]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary_file(tmp_path):
    path = atomic_write_json(tmp_path / "d.json", {"old": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"new": object()})  # not JSON: fails before anything is written
    with pytest.raises(RuntimeError):
        atomic_torch_save(_Unpicklable(), path)  # fails half-way through torch.save
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["d.json"]


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle")
