"""A redelivered insertion whose second scoring disagrees with the stored verdict never enters the index.

No broker here: the redelivery is simulated in process, by writing one request twice through the worker's
write path (``DetectionRuntime._write``), as a redelivered task does after scoring the image again. Real
redeliveries (a worker killed mid-batch) are in test_chaos_worker_kill.py.
"""

from __future__ import annotations

import copy
import uuid

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.chaos]


@pytest.fixture()
def runtime(chaos_checkpoint, tmp_path):
    """An in-process detection runtime (no threads) serving the published test model from SQLite."""
    from db.migrate import upgrade
    from db.session import dispose_engine
    from umcd.settings import Settings
    from workers.publish import publish
    from workers.runtime import DetectionRuntime

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    upgrade(url)
    settings = Settings(artifacts=tmp_path, database_url=url, broker_url="redis://unused", bits=16, device="cpu")
    publish(chaos_checkpoint, settings=settings, seed_fraction=0.5)
    rt = DetectionRuntime(settings)
    assert rt.refresh_model()
    try:
        yield rt
    finally:
        dispose_engine(url)


def _scored_insert(runtime, image_png: bytes, request_id: str):
    """(BatchItem, Result, record, packed code) of one insertion, scored by the served model."""
    from workers.encoding import decode_for_model
    from workers.results import ScreenRequest, detection_result
    from workers.runtime import BatchItem

    state = runtime.state
    request = ScreenRequest(request_id=request_id, kind="insert", worker="first@test", source="chaos")
    image = decode_for_model(image_png, runtime.settings, state.image_size)
    item = BatchItem(request, image, image_png)
    batch = state.detector.score_batch(torch.from_numpy(np.stack([image])))
    record = batch.record(0)
    result = detection_result(request, record, directions=state.detector.directions, model_version=state.version,
                              calibration_id=state.calibration_id, detector=state.detector_name, batch_size=1,
                              model_ms=0.0, search_ms=0.0)
    return item, result, record, bytes.fromhex(record["code"])


def test_a_redelivered_insertion_scored_benign_after_a_quarantine_stays_out_of_the_replica(runtime, query_pngs):
    """The first delivery quarantined the image; a redelivery scores it benign (another batch, another
    model version): the stored verdict stands and the image must not join this worker's replica."""
    from sqlalchemy import select

    from db import repo
    from db.models import DbImage
    from db.session import session_scope

    rid = uuid.uuid4().hex
    item, result, record, code = _scored_insert(runtime, query_pngs[5], rid)
    first = copy.deepcopy(result)
    first.update(verdict="adversarial", fired=["c2"], reasons=["c2 below its threshold (test)"], image_id=None)
    stored = runtime._write(runtime.state, [(item, first, record, code)])[rid]
    assert stored["verdict"] == "adversarial"
    size_before = len(runtime.state.replica)

    again = copy.deepcopy(result)
    again.update(verdict="benign", fired=[], reasons=[], worker="second@test")
    answer = runtime._write(runtime.state, [(item, again, record, code)])[rid]

    with session_scope(runtime.engine) as s:
        image = s.scalars(select(DbImage).where(DbImage.request_id == rid)).one()
        assert image.status == "quarantined"
        assert repo.get_verdict(s, rid).verdict == "adversarial"
    assert answer["verdict"] == "adversarial" and answer["worker"] == "first@test"
    assert not runtime.state.replica.contains(image.id), "a quarantined image joined the replica"
    assert len(runtime.state.replica) == size_before


def test_a_redelivered_benign_insertion_is_in_the_replica_once(runtime, query_pngs):
    rid = uuid.uuid4().hex
    item, result, record, code = _scored_insert(runtime, query_pngs[6], rid)
    first = copy.deepcopy(result)
    first["verdict"], first["fired"], first["reasons"] = "benign", [], []
    written = runtime._write(runtime.state, [(item, first, record, code)])[rid]
    size = len(runtime.state.replica)
    again = runtime._write(runtime.state, [(item, copy.deepcopy(first), record, code)])[rid]
    assert again["image_id"] == written["image_id"] is not None
    assert runtime.state.replica.contains(written["image_id"])
    assert len(runtime.state.replica) == size
