"""``keep_freed_memory``: freed CPU memory stays in the heap, and every bundle stage applies the bundle's option."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
from bundle_utils import BUNDLES, STAGES

from medkd.bundles import stage_config
from medkd.training import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# In a process of its own (the policy is process-wide and one-way): the resident memory growth that remains after
# a 256 MiB tensor is written and freed, with the policy applied or not.
_PROBE = """
import json, sys, torch
from medkd.training.allocator import keep_freed_memory
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
applied = keep_freed_memory(sys.argv[1] == "True")
before = rss()
x = torch.ones(2**26)
del x
print(json.dumps({"applied": applied, "kept_mib": (rss() - before) / 2**20}))
"""


@pytest.mark.parametrize("enabled", [True, False])
def test_keep_freed_memory_keeps_a_freed_block_for_reuse(enabled):
    if not GLIBC:
        assert allocator.keep_freed_memory(enabled) is False
        return
    out = subprocess.run([sys.executable, "-c", _PROBE, str(enabled)], capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout)
    assert probe["applied"] is enabled
    if enabled:  # the freed 256 MiB stay resident, ready for the next allocation
        assert probe["kept_mib"] > 200, probe
    else:  # glibc's default: a block that large is a mapping of its own, unmapped when freed
        assert probe["kept_mib"] < 50, probe


STAGES_OF = [(b, s) for b, stages in STAGES.items() for s in (*stages, "multi_gpu_train")]


@pytest.mark.parametrize("bundle, stage", STAGES_OF)
@pytest.mark.parametrize("value", [None, False])
def test_every_stage_applies_the_bundle_option(bundle, stage, value, monkeypatch):
    """Each stage's ``initialize`` calls ``keep_freed_memory`` with the bundle's ``keep_freed_memory`` (default true;
    ``--keep_freed_memory False`` turns it off)."""
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda enabled=True: calls.append(enabled) or False)
    parser = stage_config(BUNDLES / bundle, stage, {} if value is None else {"keep_freed_memory": value})
    steps = parser["initialize"]
    index = next(i for i, step in enumerate(steps) if "keep_freed_memory" in str(step))
    parser.get_parsed_content(f"initialize#{index}")
    assert calls == [True if value is None else value]
