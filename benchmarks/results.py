"""Writes one benchmark's section of benchmarks/RESULTS.md, leaving the other sections alone.

Each benchmark owns the text between `<!-- BEGIN name -->` and `<!-- END name -->`.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

RESULTS_PATH = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nEach section is written by the script named in it; rerun the command to reproduce.\n"


def machine_line() -> str:
    """One line naming the machine a result was measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, {platform.system()} {platform.release()}"


def write_section(name: str, body: str, path: Path = RESULTS_PATH) -> None:
    """Replaces (or appends) the section `name` with `body`, stamped with date and machine."""
    stamp = f"_{datetime.date.today().isoformat()} on {machine_line()}_\n\n"
    block = f"<!-- BEGIN {name} -->\n{stamp}{body.rstrip()}\n<!-- END {name} -->"
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
