"""A bad UMCD_* variable is told in one line naming it, by the settings and by the `umcd` program (no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError

from umcd.settings import Settings, settings_problems

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("env, line", [
    ({"UMCD_BATCH_MAX_SIZE": "0"}, "UMCD_BATCH_MAX_SIZE: Input should be greater than or equal to 1"),
    ({"UMCD_DEVICE": "gpu"}, "UMCD_DEVICE: Input should be 'auto', 'cpu' or 'cuda'"),
    ({"UMCD_TOP_K": "ten"}, "UMCD_TOP_K: Input should be a valid integer"),
    ({"UMCD_BROKER_URL": "notaurl"}, "UMCD_BROKER_URL: not a URL: expected scheme://"),
    ({"UMCD_DATABASE_URL": "secret-garbage"}, "UMCD_DATABASE_URL: not a URL: expected scheme://"),
    ({"UMCD_IMAGE_FORMATS": "PNG"}, """UMCD_IMAGE_FORMATS: cannot be parsed (a list is written as JSON, e.g. '["PNG", "JPEG"]')"""),
    ({"UMCD_IMAGE_ROOTS": "/data"}, """UMCD_IMAGE_ROOTS: cannot be parsed (a list is written as JSON, e.g. '["/shared"]')"""),
])
def test_a_bad_variable_is_named_in_one_line_without_its_value(monkeypatch, env, line):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises((ValidationError, SettingsError)) as info:
        Settings()
    problems = settings_problems(info.value)
    assert len(problems) == 1 and problems[0].startswith(line), problems
    assert "secret-garbage" not in problems[0]  # values are not echoed: a URL may hold a password
    assert "secret-garbage" not in str(info.value)  # nor by the error itself, which other programs may log


def test_url_settings_take_urls_and_blank_means_the_embedded_default():
    s = Settings(broker_url="redis+socket:///tmp/r.sock", database_url="postgresql+psycopg://u:p@h/db",
                 result_backend="  ")
    assert (s.broker_url, s.database_url, s.result_backend) == ("redis+socket:///tmp/r.sock",
                                                                "postgresql+psycopg://u:p@h/db", None)


def test_other_exceptions_are_not_settings_problems():
    assert settings_problems(ValueError("x")) is None
    with pytest.raises(ValidationError) as info:  # a model other than Settings
        from pydantic import BaseModel

        class Other(BaseModel):
            n: int

        Other(n="x")
    assert settings_problems(info.value) is None


def test_the_umcd_program_prints_the_bad_variables_and_exits_2(tmp_path):
    env = {**os.environ, "UMCD_ARTIFACTS": str(tmp_path), "UMCD_BATCH_MAX_SIZE": "0", "UMCD_IMAGE_FORMATS": "PNG"}
    env.pop("UMCD_DATABASE_URL", None)
    proc = subprocess.run([sys.executable, "-m", "umcd.cli", "audit", "counts"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("umcd: bad settings in the environment:\n")
    assert "UMCD_IMAGE_FORMATS: cannot be parsed" in proc.stderr or "UMCD_BATCH_MAX_SIZE:" in proc.stderr
    # a control: with good settings a command that reads them runs
    env.pop("UMCD_BATCH_MAX_SIZE"), env.pop("UMCD_IMAGE_FORMATS")
    ok = subprocess.run([sys.executable, "-m", "umcd.cli", "db", "current"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
