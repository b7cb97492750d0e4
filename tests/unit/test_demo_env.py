"""The demo's child processes get the demo's own settings, not the caller's stray UMCD_* variables."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.parametrize("device", ["cpu", "cuda", "auto"])
def test_the_demo_workers_get_the_device_the_demo_was_given(device, monkeypatch, tmp_path):
    from umcd.demo import Demo, DemoConfig

    monkeypatch.setenv("UMCD_DEVICE", device)
    monkeypatch.setenv("UMCD_BATCH_MAX_SIZE", "7")  # not the demo's: its workers run with their defaults
    demo = Demo(DemoConfig(artifacts=tmp_path))
    env = demo.child_env(demo.settings())
    assert env["UMCD_DEVICE"] == device
    assert "UMCD_BATCH_MAX_SIZE" not in env
    assert env["UMCD_ARTIFACTS"] == str(tmp_path.resolve())


def test_the_demo_deletes_only_a_folder_of_its_own(tmp_path):
    """`umcd demo --artifacts DIR` rewrites DIR; a DIR holding anything else (the artifacts root with a running
    fleet's state and secrets) is refused and left as it was."""
    from umcd.demo import DEMO_MARKER, DemoFolderInUse, _clear_demo_folder

    marked = tmp_path / "marked"
    (marked / "anything").mkdir(parents=True)
    (marked / DEMO_MARKER).write_text("x")
    _clear_demo_folder(marked)
    assert not marked.exists()
    older = tmp_path / "older"  # a demo folder from before the marker: recognised by its entries
    (older / "logs").mkdir(parents=True)
    (older / "audit.db").write_text("x")
    _clear_demo_folder(older)
    assert not older.exists()
    root = tmp_path / "artifacts"
    (root / "fleet").mkdir(parents=True)
    (root / "fleet" / "state.json").write_text("{}")
    (root / "logs").mkdir()
    with pytest.raises(DemoFolderInUse, match="holds more than an earlier demo \\(fleet\\)"):
        _clear_demo_folder(root)
    assert (root / "fleet" / "state.json").is_file() and (root / "logs").is_dir()
    (root / DEMO_MARKER).write_text("x")  # even marked (an earlier demo run there): a fleet under it is kept
    with pytest.raises(DemoFolderInUse):
        _clear_demo_folder(root)
    assert (root / "fleet" / "state.json").is_file()
    _clear_demo_folder(tmp_path / "never-made")  # nothing there: nothing to do


def test_each_demo_run_sends_request_ids_of_its_own():
    from umcd.demo import Demo, DemoConfig

    first, second = Demo(DemoConfig.small(Path("a"))), Demo(DemoConfig.small(Path("a")))
    assert first.rid("q-dhta-0") != second.rid("q-dhta-0")
    assert first.rid("q-dhta-0").startswith("demo-") and first.rid("q-dhta-0").endswith("-q-dhta-0")


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_demo_s_children_do_not_outlive_a_killed_demo(tmp_path):
    """A demo SIGKILLed (no chance to stop its workers) takes its children with it: the kernel sends each
    SIGTERM (before, they ran on as orphans). A real parent process, a real child, a real SIGKILL."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    parent_code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from umcd.demo import Processes\n"
        "procs = Processes()\n"
        f"p = procs.start('sleeper', [sys.executable, '-c', 'import time; time.sleep(120)'], {{}}, "
        f"Path({str(tmp_path / 'child.log')!r}))\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _running(child):
            time.sleep(0.05)
        assert not _running(child), "the demo's child outlived the SIGKILLed demo"
    finally:
        if parent.poll() is None:
            parent.kill()
        with __import__("contextlib").suppress(psutil.NoSuchProcess, NameError):
            child.kill()


def _running(proc) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever reaps it in a container)."""
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_die_with_parent_hook_is_offered_to_the_main_thread_only():
    import threading

    from umcd.embedded import die_with_parent_hook

    if __import__("sys").platform.startswith("linux"):
        assert callable(die_with_parent_hook())
    seen = []
    worker = threading.Thread(target=lambda: seen.append(die_with_parent_hook()))
    worker.start()
    worker.join()
    assert seen == [None]
