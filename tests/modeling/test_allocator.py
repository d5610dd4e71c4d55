"""`reuse_freed_memory`: a large block freed and allocated again comes back without fresh pages (Linux with glibc)."""

import os
import subprocess
import sys

import pytest


# a child process, so that the process-wide setting is measured from a clean start and stays out of the test session
CHILD = """
import resource, sys
import torch
from modeling_oisa.allocator import reuse_freed_memory

applied = reuse_freed_memory() if sys.argv[1] == "reuse" else False
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(64 * 2**20, dtype=torch.uint8)  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
    block.fill_(1)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, *faults)
"""


def page_faults(mode: str, setting: str | None = None) -> tuple[str, list[int]]:
    """
    Whether the setting applied, and the minor page faults of each of 8 allocations of a 64 MiB block, in a child
    whose environment sets OISA_REUSE_FREED_MEMORY to `setting` (unset when None).
    """
    env = {name: value for name, value in os.environ.items() if name != "OISA_REUSE_FREED_MEMORY"}
    if setting is not None:
        env["OISA_REUSE_FREED_MEMORY"] = setting
    result = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True, env=env)
    applied, *faults = result.stdout.split()
    return applied, [int(count) for count in faults]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_blocks_are_reused_without_fresh_pages():
    applied, faults = page_faults("reuse")
    default_applied, default_faults = page_faults("default")
    assert (applied, default_applied) == ("True", "False")
    # by default every block is a new mapping: 16,384 pages of 4 KiB (fewer with huge pages) faulted in anew
    assert all(count > 4000 for count in default_faults[-4:]), default_faults
    # kept for reuse, the heap grows for the first blocks (freed blocks can fall a little short of the next request's
    # alignment), then serves them again
    assert all(count < 100 for count in faults[-4:]), faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_the_environment_can_keep_glibcs_defaults():
    applied, faults = page_faults("reuse", setting="0")
    assert applied == "False" and all(count > 4000 for count in faults[-4:]), faults
