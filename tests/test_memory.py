"""dualroute.memory: glibc's malloc keeps freed blocks in the heap, so a tensor allocated again reuses mapped
pages. Checked by counting page faults (not time), in a fresh interpreter so the setting stays there."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from dualroute import memory

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                           reason="mallopt is glibc's")

# Allocate, fill and free a 64 MiB tensor a few times, then count the minor page faults of doing it once more;
# the fewest of five such counts, so that a page the VM's host reclaimed in between (seen once in a full run)
# does not decide it.
_FAULTS = """
import json, resource, sys, torch
from dualroute import memory
applied = memory.keep_freed_memory() if sys.argv[1] == "keep" else False
for _ in range(3):
    torch.ones(16 * 2**20).sum()
counts = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20).sum()
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": min(counts), "kept": memory.freed_memory_kept()}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@glibc
def test_a_freed_tensor_is_reused_without_page_faults():
    pages = 64 * 2**20 // 4096
    plain, kept = _faults("plain"), _faults("keep")
    assert not plain["applied"] and plain["kept"] == {}
    assert plain["faults"] > pages // 2  # glibc mmaps a 64 MiB block afresh: every page faults again
    assert kept["applied"] and kept["kept"] == {"mmap_threshold": memory.MMAP_THRESHOLD,
                                                "trim_threshold": memory.TRIM_THRESHOLD}
    assert kept["faults"] < pages // 20  # the heap's pages are already mapped


@pytest.mark.parametrize("kwargs, error", [
    ({"mmap_threshold": 0}, ValueError), ({"trim_threshold": 2**31}, ValueError),
    ({"mmap_threshold": 1.5}, TypeError), ({"trim_threshold": True}, TypeError)])
def test_bad_thresholds_are_named(kwargs, error):
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        memory.keep_freed_memory(**kwargs)


def test_the_environment_switch(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(1) or True)
    assert memory.keep_freed_memory_from_env({}) is True
    assert memory.keep_freed_memory_from_env({memory.ENV: "1"}) is True
    assert memory.keep_freed_memory_from_env({memory.ENV: "0"}) is False
    assert len(calls) == 2
    with pytest.raises(ValueError, match=f"{memory.ENV} must be 0 or 1, got 'yes'"):
        memory.keep_freed_memory_from_env({memory.ENV: "yes"})


def test_the_command_reports_a_bad_switch(monkeypatch, capsys):
    from dualroute.cli import main

    monkeypatch.setenv(memory.ENV, "2")
    assert main(["train", "--help"]) == 2
    assert memory.ENV in capsys.readouterr().err


def test_without_glibc_nothing_is_set(monkeypatch):
    monkeypatch.setattr(memory, "_libc", lambda: None)
    monkeypatch.setattr(memory, "_applied", {})
    assert memory.keep_freed_memory() is False and memory.freed_memory_kept() == {}
