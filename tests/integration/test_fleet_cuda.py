"""A detection worker on the GPU (UMCD_DEVICE=cuda), end to end: real redis-server, a real Celery worker
process, SQLite audit store. Its answers are checked against the calibrated detector on the CPU.

Skipped where torch sees no GPU; `deploy/gpu-check.sh` runs it on a GPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.fleet_helpers import (
    digits_query_pngs,
    digits_splits,
    start_worker,
    stop_worker,
    trained_checkpoint,
    verdict_rows,
    wait_ready,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

REDIS_DB = 13
#: score tolerance between the GPU worker and the CPU detector (float32 sums in another order)
SCORE_ATOL = 1e-3


def test_a_gpu_worker_answers_png_array_and_single_requests_as_the_cpu_detector_scores_them(
        redis_server, tmp_path_factory):
    import redis as redis_lib

    from db.migrate import upgrade
    from db.session import dispose_engine
    from producers.sdk import Client
    from umcd.settings import Settings
    from workers.encoding import decode_for_model
    from workers.publish import publish
    from workers.runtime import DetectionRuntime

    artifacts = tmp_path_factory.mktemp("gpu-fleet")
    db_url = f"sqlite:///{artifacts / 'audit.db'}"
    broker = redis_server.url_for(REDIS_DB)
    redis_lib.Redis.from_url(broker).flushdb()
    upgrade(db_url)
    settings = Settings(artifacts=artifacts, database_url=db_url, broker_url=broker, result_backend=broker, bits=16)
    published = publish(trained_checkpoint(tmp_path_factory), settings=settings, seed_fraction=0.5)
    worker = start_worker("gpu", settings, artifacts, env={"UMCD_DEVICE": "cuda", "UMCD_INDEX_BACKEND": "gpu"})
    client = Client(settings)
    try:
        wait_ready(client, {"gpu": worker})
        pngs = digits_query_pngs()
        pixels = digits_splits().query.get().mul(255).round().byte().permute(0, 2, 3, 1).numpy()
        png_ids = client.submit_queries(pngs, batch=True)
        array_ids = client.submit_queries(pixels, batch=True)
        single_ids = client.submit_queries(pngs[:24])
        ids = png_ids + array_ids + single_ids
        results = client.wait(ids, timeout=300)
        assert set(results) == set(ids), worker.log_text()[-4000:]
        assert "detection runtime started on cuda" in worker.log_text()
        import faiss

        if hasattr(faiss, "StandardGpuResources"):  # faiss-gpu here (deploy/gpu-faiss.sh): the worker's index is on the GPU
            assert "the index stays on the CPU" not in worker.log_text(), worker.log_text()[-4000:]
        rows = verdict_rows(db_url, ids)
        assert all(len(v) == 1 for v in rows.values())  # one verdict row per request
        assert {v[0]["worker"].split("@")[0] for v in rows.values()} == {"gpu"}
        assert {r.model_version for r in results.values()} == {published.model_version}

        # the reference: the same published model, calibration and index on the CPU, in this process
        runtime = DetectionRuntime(settings.model_copy(update={"device": "cpu"}))
        assert runtime.refresh_model()
        state = runtime.state
        assert state.detector.device.type == "cpu"
        x = torch.from_numpy(np.stack([decode_for_model(p, settings, state.image_size) for p in pngs]))
        ref = state.detector.score_batch(x)
        thresholds = state.calibration.thresholds
        for group in (png_ids, array_ids, single_ids):
            near = np.zeros(len(group), dtype=bool)
            for name, thr in thresholds.items():
                got = np.array([results[rid].scores[name] for rid in group])
                want = ref.scores[name][: len(group)]
                np.testing.assert_allclose(got, want, atol=SCORE_ATOL, err_msg=name)
                near |= np.abs(want - thr) <= SCORE_ATOL
            verdicts = np.array([results[rid].verdict for rid in group])
            assert (verdicts == np.array(ref.verdicts[: len(group)]))[~near].all()
            fired = [sorted(results[rid].fired) for rid in group]
            want_fired = [sorted(n for n, f in zip(ref.names, row) if f) for row in ref.fired[: len(group)]]
            assert [f for f, n in zip(fired, near) if not n] == [f for f, n in zip(want_fired, near) if not n]
        assert {r.verdict for r in results.values()} == {"benign", "adversarial"}  # both sides compared
        runtime.stop()
    finally:
        stop_worker(worker)
        client.close()
        dispose_engine(db_url)
