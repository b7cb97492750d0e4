"""`umcd bench` option wiring: the group's --out/--quick/--device reach a named sub-benchmark."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner


@pytest.fixture
def recorded(monkeypatch):
    """run_index_scaling replaced by a recorder (the wiring is under test, not the benchmark)."""
    import umcd.bench.index_scaling as index_scaling
    import umcd.commands.bench as bench

    calls = []

    def fake(artifacts, folder, *, sizes, device):
        calls.append({"folder": folder, "sizes": sizes, "device": device})
        return {"rows": [], "machine_hamming_rate_per_s": 1.0}

    monkeypatch.setattr(index_scaling, "run_index_scaling", fake)
    monkeypatch.setattr(bench, "_GROUP", {})
    return calls


def test_group_options_reach_the_named_sub_benchmark(recorded, tmp_path):
    from umcd.cli import app

    result = CliRunner().invoke(app, ["bench", "--out", str(tmp_path / "run"), "--quick", "--device", "cuda", "index"])
    assert result.exit_code == 0, result.output
    assert recorded == [{"folder": tmp_path / "run", "sizes": (10_000, 100_000), "device": "cuda"}]


def test_sub_benchmark_options_still_work_on_their_own(recorded, tmp_path):
    from umcd.cli import app

    result = CliRunner().invoke(app, ["bench", "index", "--out", str(tmp_path / "own")])
    assert result.exit_code == 0, result.output
    assert recorded[0]["folder"] == tmp_path / "own" and recorded[0]["device"] == "cpu"
    assert recorded[0]["sizes"] == (10_000, 100_000, 1_000_000, 10_000_000)
