"""Helpers shared by the benchmark scripts: child processes, memory sampling, the machine."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

RESULTS = Path(__file__).with_name("RESULTS.md")
#: The benchmarks measure the dasknmf beside them, not an installed copy: the README's commands
#: install the package (not editable), which leaves the copy of that commit in site-packages.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class PeakMemory:
    """Samples the resident memory of this process and its children while the block runs;
    ``extra`` is the peak above what was resident when the block began."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                total += child.memory_info().rss
        return total

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.baseline = self.peak = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra(self) -> int:
        return self.peak - self.baseline


def run_child(script: str, *args: str) -> dict:
    """Run ``script`` in a fresh Python process; it prints one JSON object as its last line.
    Its standard error goes to this process's, so that its progress and any traceback show."""
    out = subprocess.run(
        [sys.executable, script, *args], check=True, stdout=subprocess.PIPE, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def machine() -> str:
    """One line naming this machine and the versions that matter."""
    import dask
    import numpy
    import sklearn

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM; Python "
        f"{platform.python_version()}, numpy {numpy.__version__}, scikit-learn "
        f"{sklearn.__version__}, dask {dask.__version__}"
    )


def write_section(name: str, text: str) -> None:
    """Replace the part of RESULTS.md between ``<!-- name:start -->`` and ``<!-- name:end -->``
    (appending it if missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}"
    content = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if start in content:
        before, rest = content.split(start, 1)
        content = before + block + rest.split(end, 1)[1]
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(content)


@contextlib.contextmanager
def iteration_times(probe=None, samples: list | None = None):
    """Time stamps of the iterations dasknmf records while the block runs (a list, filled as
    they come): the benchmarks' only hook into a fit. With ``probe``, its value at each stamp
    is appended to ``samples``."""
    from dasknmf import engine

    stamps: list[float] = []
    record = engine.History.record

    def timed(self, *args, **kwargs):
        stamps.append(time.perf_counter())
        if probe is not None:
            samples.append(probe())
        record(self, *args, **kwargs)

    engine.History.record = timed
    try:
        yield stamps
    finally:
        engine.History.record = record
