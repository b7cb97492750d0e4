"""UMCD_WORKER_CPUS: CPU lists, each fleet worker's share, and pinning every thread of a worker process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from umcd.fleet import worker_cpu_lists
from umcd.settings import Settings, format_cpu_list, parse_cpu_list

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, cpus", [("0", {0}), ("0-3", {0, 1, 2, 3}), (" 5, 0-1 ,3", {0, 1, 3, 5}),
                                        ("2-2", {2}), ("1,1,0-1", {0, 1})])
def test_cpu_lists_parse_and_format_back_compactly(text, cpus):
    assert parse_cpu_list(text) == cpus
    assert parse_cpu_list(format_cpu_list(cpus)) == cpus
    assert format_cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"


@pytest.mark.parametrize("text, why", [("a", "neither a CPU number"), ("3-1", "runs backwards"), ("0,,1", "neither"),
                                       ("-1", "neither"), ("1-", "neither"), ("0-x", "neither")])
def test_bad_cpu_lists_are_refused_with_the_reason(text, why):
    with pytest.raises(ValueError, match=why):
        parse_cpu_list(text)
    with pytest.raises(ValueError, match="UMCD_WORKER_CPUS|worker_cpus|bad CPU list"):
        Settings(worker_cpus=text)


def test_the_setting_is_normalised_and_empty_means_unpinned(monkeypatch):
    assert Settings(worker_cpus="3,0-1,2").worker_cpus == "0-3"
    assert Settings(worker_cpus=" ").worker_cpus is None and Settings().worker_cpus is None
    monkeypatch.setenv("UMCD_WORKER_CPUS", "1")
    assert Settings().worker_cpus == "1"


def test_fleet_workers_get_equal_contiguous_shares_and_none_when_outnumbering_the_cpus():
    assert worker_cpu_lists(2, {0, 1}) == ["0", "1"]
    assert worker_cpu_lists(1, {0, 1}) == ["0-1"]
    assert worker_cpu_lists(4, range(8)) == ["0-1", "2-3", "4-5", "6-7"]
    assert worker_cpu_lists(2, {0, 1, 2}) == ["0", "1"]  # CPU 2 left over: no worker gets it
    assert worker_cpu_lists(2, {4, 9, 6, 7}) == ["4,6", "7,9"]
    assert worker_cpu_lists(3, {0, 1}) == [None, None, None]
    assert worker_cpu_lists(0, {0, 1}) == []


PROBE = r"""
import json, os, sys, threading, time
import torch
stop = threading.Event()
early = threading.Thread(target=stop.wait, daemon=True)
early.start()  # started before the pinning, as Celery's pool and consumer threads are
from workers.affinity import pin_process
result = {"pinned": sorted(pin_process(sys.argv[1]))}
late_cpus = {}
late = threading.Thread(target=lambda: late_cpus.update(cpus=sorted(os.sched_getaffinity(0))))
late.start(); late.join()
def affinity(tid):
    try:
        return sorted(os.sched_getaffinity(int(tid)))
    except ProcessLookupError:  # a thread that ended after the listing: it runs nowhere now
        return None
result["threads"] = {tid: cpus for tid in os.listdir("/proc/self/task") if (cpus := affinity(tid)) is not None}
result["early"] = sorted(os.sched_getaffinity(early.native_id))
result["late"] = late_cpus["cpus"]
result["torch_threads"] = torch.get_num_threads()
import faiss
result["faiss_threads"] = faiss.omp_get_max_threads()
print(json.dumps(result))
stop.set()
"""


def _probe(cpus: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", PROBE, cpus], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_pinning_covers_threads_started_before_and_after_it_and_sizes_the_thread_pools():
    cpu = min(os.sched_getaffinity(0))
    out = _probe(str(cpu))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["pinned"] == [cpu]
    assert len(result["threads"]) >= 2 and all(cpus == [cpu] for cpus in result["threads"].values())
    assert result["early"] == [cpu] and result["late"] == [cpu]
    assert result["torch_threads"] == 1 and result["faiss_threads"] == 1


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and two CPUs")
def test_an_explicit_omp_num_threads_keeps_the_thread_pools_as_set():
    cpus = sorted(os.sched_getaffinity(0))[:2]
    out = _probe(format_cpu_list(cpus), {"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["pinned"] == cpus and result["torch_threads"] == 1


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_cpus_the_process_may_not_use_stop_the_worker_with_the_reason():
    beyond = max(os.sched_getaffinity(0)) + 1000
    out = _probe(f"0,{beyond}")
    assert out.returncode != 0
    assert f"UMCD_WORKER_CPUS='0,{beyond}'" in out.stderr and f"CPUs {beyond}" in out.stderr
