"""The demo's child processes get the demo's own settings, not the caller's stray UMCD_* variables."""

from __future__ import annotations

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
