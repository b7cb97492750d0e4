"""Fixtures of the chaos and load tests: the shared test model, digit images and a figures recorder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fleet_helpers import ROOT, digits_query_pngs, trained_checkpoint

#: where every chaos/load test writes its figures (requests sent, verdict rows, lost, ...)
FIGURES_DIR = ROOT / "artifacts" / "chaos"


@pytest.fixture(scope="session")
def chaos_checkpoint(tmp_path_factory) -> Path:
    """The small CSQ test model (trained once per session, shared with the integration tests)."""
    return trained_checkpoint(tmp_path_factory)


@pytest.fixture(scope="session")
def query_pngs() -> list[bytes]:
    """PNG bytes of the 1,000 digits query images."""
    return digits_query_pngs()


@pytest.fixture()
def figures(request):
    """A dict the test fills with its figures; written to ``artifacts/chaos/<test>.json`` and printed,
    pass or fail."""
    data: dict = {}
    yield data
    if data:
        FIGURES_DIR.mkdir(parents=True, exist_ok=True)
        name = request.node.name.replace("/", "_").replace("[", "-").replace("]", "")
        path = FIGURES_DIR / f"{name}.json"
        path.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
        print(f"\n[{request.node.name}] figures ({path}):\n{json.dumps(data, sort_keys=True, default=str)}")
