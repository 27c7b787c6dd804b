"""The one set-aside policy (medkd.training.previous): used by training (checkpoints) and the tools (evaluation,
inference folders)."""

from __future__ import annotations

import logging
from pathlib import Path

from medkd.tools.outputs import new_run_folder, set_aside_evaluation
from medkd.training.previous import keep_previous, numbered, set_aside


def test_numbered_keeps_the_suffix_last(tmp_path):
    names = numbered(tmp_path / "sp.stamp.pt", ".pt")
    assert [next(names).name for _ in range(3)] == ["sp.stamp.pt", "sp.stamp-1.pt", "sp.stamp-2.pt"]


def test_set_aside_never_moves_over_an_earlier_set_aside(tmp_path):
    for n in range(3):
        (tmp_path / "sp.pt").write_text(str(n))
        (tmp_path / "results").mkdir()
        set_aside([tmp_path / "sp.pt", tmp_path / "results", tmp_path / "absent.pt"], stamp="20261207-101500")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "results.20261207-101500",
        "results.20261207-101500-1",
        "results.20261207-101500-2",
        "sp.20261207-101500-1.pt",
        "sp.20261207-101500-2.pt",
        "sp.20261207-101500.pt",
    ]
    assert (tmp_path / "sp.20261207-101500.pt").read_text() == "0"


def test_the_stages_keep_previous_results_with_one_warning(tmp_path, caplog):
    (tmp_path / "results.md").write_text("old")
    with caplog.at_level(logging.WARNING, logger="medkd"):
        set_aside_evaluation(tmp_path)
        assert keep_previous([tmp_path / "nothing"], "starting afresh") == {}
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["evaluating again"]
    assert not (tmp_path / "results.md").exists() and len(list(tmp_path.glob("results.*.md"))) == 1


def test_inference_folders_of_the_same_second_are_numbered(tmp_path):
    first, second = new_run_folder(tmp_path, "sp"), new_run_folder(tmp_path, "sp")
    assert second == first + "-1" or Path(second).name > Path(first).name  # or the clock turned a second
