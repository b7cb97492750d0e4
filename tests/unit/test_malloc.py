"""workers.malloc: glibc keeps a batch's freed activation buffers mapped for the next batch."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from workers.malloc import MAX_MMAP_THRESHOLD, tune_malloc

ROOT = Path(__file__).resolve().parents[2]

#: a worker's batcher in miniature: conv forward passes of a batch on a thread other than the main one,
#: counting that thread's minor page faults over 10 batches after a warm-up
_FAULTS = """
import resource, sys, threading
import torch
from workers.malloc import tune_malloc
torch.set_num_threads(1)
if sys.argv[1] == "tuned":
    assert tune_malloc(mmap_threshold=32 << 20, trim_threshold=128 << 20)
out = []
def batches():
    conv = torch.nn.Conv2d(3, 32, 3, padding=1)
    x = torch.rand(64, 3, 32, 32)  # each output: 64 x 32 x 32 x 32 float32 = 8 MiB
    with torch.no_grad():
        for _ in range(3):
            conv(x)
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(10):
            torch.relu(conv(x))
        out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=batches)
thread.start()
thread.join()
print(out[0])
"""


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, env=env,
                          timeout=120, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_tuned_malloc_reuses_the_pages_of_the_last_batch():
    """Untuned, each 8 MiB activation is a fresh mmap and every batch faults its pages in again
    (thousands of faults per batch); tuned, the pages of the last batch are reused."""
    plain, tuned = _faults("plain"), _faults("tuned")
    assert plain > 10 * 1024  # at least half an 8 MiB buffer (2,048 pages) per batch faulted in again
    assert tuned < plain / 5, (plain, tuned)


def test_thresholds_must_be_positive():
    for bad in ((0, 1), (1, 0), (-1, 5)):
        with pytest.raises(ValueError, match="positive"):
            tune_malloc(*bad)


def test_a_started_runtime_tunes_malloc_as_its_setting_says(monkeypatch, tmp_path):
    import workers.runtime as runtime_module
    from umcd.settings import Settings

    import workers.malloc as malloc_module

    calls = []
    monkeypatch.setattr(malloc_module, "tune_malloc", lambda **kw: calls.append(kw) or True)
    monkeypatch.setattr(runtime_module.metrics, "serve", lambda port: None)
    before = sys.getswitchinterval()
    try:
        for keep, expected in ((64, [{"mmap_threshold": 32 << 20, "trim_threshold": 64 << 20}]),
                               (16, [{"mmap_threshold": 16 << 20, "trim_threshold": 16 << 20}]), (0, [])):
            calls.clear()
            settings = Settings(artifacts=tmp_path, database_url=f"sqlite:///{tmp_path / 'a.db'}",
                                worker_malloc_keep_mib=keep)
            runtime = runtime_module.DetectionRuntime(settings)
            runtime.start(load=False)
            runtime.stop()
            assert calls == expected
    finally:
        sys.setswitchinterval(before)
    assert MAX_MMAP_THRESHOLD == 32 << 20
