"""The fleet benchmark stops its detection workers while it measures in-process scoring next to a phase."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import psutil
import pytest

from umcd.bench.fleet import _workers_paused


def test_workers_are_stopped_inside_the_block_and_continued_after_it_also_on_an_error():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = SimpleNamespace(services=[SimpleNamespace(kind="worker", pid=busy.pid),
                                          SimpleNamespace(kind="redis", pid=other.pid)])
        fleet = SimpleNamespace(read_state=lambda: state)
        proc = psutil.Process(busy.pid)
        with pytest.raises(RuntimeError):
            with _workers_paused(fleet):
                assert proc.status() == psutil.STATUS_STOPPED
                assert psutil.Process(other.pid).status() != psutil.STATUS_STOPPED  # only the workers
                raise RuntimeError("the measurement failed")
        assert proc.status() != psutil.STATUS_STOPPED  # continued, also after the error
        paused_cpu: dict[str, float] = {}  # what the fleet's processes used inside the block, by kind
        with _workers_paused(fleet, paused_cpu):
            time.sleep(0.3)
        assert set(paused_cpu) == {"worker", "redis"}
        assert paused_cpu["worker"] <= 0.01  # counted from the moment it is stopped: no CPU at all
    finally:
        for p in (busy, other):
            p.kill()
            p.wait()
