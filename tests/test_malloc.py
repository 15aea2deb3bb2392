"""train/malloc.py: after keep_freed_memory() the memory of a freed 20 MB buffer is reused without page faults;
with glibc's defaults it goes back to the kernel and the next buffer faults all its pages in again."""

import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys, torch
from train.malloc import keep_freed_memory
if sys.argv[1] == "on":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(5 << 20).fill_(1.0)  # 20 MB, written, freed
before = faults()
torch.empty(19 << 18).fill_(1.0)  # 19 MB: fits where the first one was (a 64-byte-aligned block of the
# very same size may not fit in the freed one, so glibc would take fresh memory for it even with the setting)
print(faults() - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_memory_reuses_freed_buffers_without_page_faults():
    pages = (19 << 20) // 4096
    off, on = page_faults("off"), page_faults("on")
    assert off > 0.8 * pages, off  # the default: the second buffer is fresh memory (so the probe sees faults)
    assert on < 0.02 * pages, on  # kept: the second buffer is the first one's memory
