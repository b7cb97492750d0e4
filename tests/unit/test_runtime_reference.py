"""A reference detector (umcd-trust-input) published and loaded without servers: its FeatureReference file and the secret setting."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

DETECTOR = "umcd-trust-input"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """An untrained 16-bit model published with umcd-trust-input to a SQLite audit store: (settings, PublishResult)."""
    from core.checkpoint import save_untrained_checkpoint
    from db.migrate import upgrade
    from db.session import dispose_engine
    from umcd.settings import Settings
    from workers.publish import publish

    artifacts = tmp_path_factory.mktemp("reference-detector")
    checkpoint = save_untrained_checkpoint(artifacts / "untrained.safetensors", 16)
    url = f"sqlite:///{artifacts / 'audit.db'}"
    upgrade(url)
    settings = Settings(artifacts=artifacts, database_url=url, broker_url="redis://unused", bits=16, device="cpu",
                        detector=DETECTOR)
    result = publish(checkpoint, settings=settings, seed_fraction=0.5)
    try:
        yield settings, result
    finally:
        dispose_engine(url)


def test_publish_saves_the_reference_of_the_seed_images_and_records_its_path(published):
    from sqlalchemy import select

    from core.extensions import FeatureReference, reference_path
    from db import repo
    from db.models import DbImage
    from db.session import session_scope

    settings, result = published
    assert result.detector == DETECTOR
    assert result.reference_path == str(reference_path(settings.artifacts, result.model_version).resolve())
    reference = FeatureReference.load(result.reference_path)
    with session_scope(settings.db_url) as s:
        seed_ids = sorted(s.scalars(select(DbImage.id).where(DbImage.source == "seed")))
        cal = repo.get_calibration(s, result.calibration_id)
        assert cal.detector == DETECTOR and cal.meta["reference"] == result.reference_path
        assert cal.meta["n_reference"] == len(seed_ids)
    assert sorted(reference.ids.tolist()) == seed_ids and len(seed_ids) == result.n_reference > 0
    assert "trust@in" in result.thresholds


def test_a_missing_reference_leaves_the_worker_not_ready_with_a_clear_error_until_the_file_is_back(
        published, caplog):
    from workers.runtime import DetectionRuntime, NoModel

    settings, result = published
    path = Path(result.reference_path)
    aside = path.with_name(path.name + ".aside")
    shutil.move(path, aside)
    try:
        runtime = DetectionRuntime(settings)
        with caplog.at_level(logging.ERROR, logger="workers.runtime"):
            assert runtime.refresh_model() is False
            assert runtime.refresh_model() is False  # the watcher polls again: no crash, one error line
        assert runtime.state is None
        assert "feature reference" in runtime.not_ready and str(path) in runtime.not_ready
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and result.model_version in errors[0].getMessage()
        assert str(path) in errors[0].getMessage()
        with pytest.raises(NoModel, match="feature reference"):
            runtime.wait_for_model(timeout=0.0)
    finally:
        shutil.move(aside, path)
    assert runtime.refresh_model() is True
    assert runtime.not_ready is None
    assert runtime.state.detector_name == DETECTOR and runtime.state.detector.spec.name == DETECTOR
    assert runtime.state.detector.reference.ids.shape == (result.n_reference,)


def test_a_truncated_reference_file_is_not_ready_rather_than_a_crash(published, tmp_path):
    from workers.runtime import DetectionRuntime

    settings, result = published
    path = Path(result.reference_path)
    aside = tmp_path / "reference.safetensors"
    shutil.copyfile(path, aside)
    try:
        path.write_bytes(aside.read_bytes()[:100])
        runtime = DetectionRuntime(settings)
        assert runtime.refresh_model() is False
        assert runtime.state is None and "cannot load its feature reference" in runtime.not_ready
    finally:
        shutil.copyfile(aside, path)


def test_the_detector_secret_setting_reaches_the_random_denoiser_and_is_never_printed(monkeypatch):
    from core.extensions import SECRET_ENV, RandomDenoiser
    from umcd.settings import DETECTOR_SECRET_ENV, Settings, export_detector_secret

    assert DETECTOR_SECRET_ENV == SECRET_ENV
    monkeypatch.setenv(SECRET_ENV, "")  # recorded, so the variable export_detector_secret sets is undone after
    monkeypatch.delenv(SECRET_ENV)
    settings = Settings(detector_secret="deployment-secret-42")
    assert "deployment-secret-42" not in repr(settings) and "deployment-secret-42" not in str(settings.model_dump())
    assert export_detector_secret(Settings()) is False  # no secret: the denoiser uses the public default
    assert export_detector_secret(settings) is True
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert RandomDenoiser().draws(x)[0] == RandomDenoiser("deployment-secret-42").draws(x)[0]
    assert RandomDenoiser().draws(x)[0] != RandomDenoiser("another-secret").draws(x)[0]
    monkeypatch.setenv(SECRET_ENV, "from-the-environment")
    assert Settings().detector_secret.get_secret_value() == "from-the-environment"


def test_a_plain_detector_published_on_the_same_model_gets_no_reference_and_keeps_the_other_calibration(published):
    from db import repo
    from db.session import session_scope
    from workers.publish import publish

    settings, trust = published
    plain = publish(Path(trust.checkpoint), settings=settings.model_copy(update={"detector": "umcd"}),
                    seed_fraction=0.5)
    assert plain.model_version == trust.model_version and plain.n_seeded == 0  # seeded once, by the first publish
    assert plain.detector == "umcd" and plain.reference_path is None and plain.n_reference == 0
    assert set(plain.thresholds) == {"c1", "c2", "c3"}
    with session_scope(settings.db_url) as s:
        assert "reference" not in repo.get_calibration(s, plain.calibration_id).meta
        assert repo.active_calibration(s, trust.model_version, DETECTOR).id == trust.calibration_id


def test_a_started_runtime_sets_the_gil_switch_interval_of_its_worker_process(published):
    """The batcher gives up the GIL in every torch op; the worker shortens the interpreter's switch
    interval so that it gets it back sooner (UMCD_WORKER_GIL_SWITCH_MS)."""
    import sys

    from workers.runtime import DetectionRuntime

    settings, _ = published
    before = sys.getswitchinterval()
    runtime = DetectionRuntime(settings.model_copy(update={"worker_gil_switch_ms": 0.25}))
    try:
        runtime.start(load=False)
        assert sys.getswitchinterval() == pytest.approx(0.00025)
    finally:
        runtime.stop()
        sys.setswitchinterval(before)
    assert before != pytest.approx(0.00025)


def test_the_gil_switch_interval_setting_is_checked():
    from pydantic import ValidationError

    from umcd.settings import Settings

    assert Settings(worker_gil_switch_ms=2).worker_gil_switch_ms == 2.0
    for bad in (0, -1, 1000):
        with pytest.raises(ValidationError, match="worker_gil_switch_ms"):
            Settings(worker_gil_switch_ms=bad)
