"""`umcd bench fleet` on tiny sizes: real redis-server and two detection workers, the JSON and PNG it writes."""

from __future__ import annotations

import json
import shutil

import psutil
import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(400),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
]

ROW_KEYS = {"mode", "images", "images_per_s", "p50_ms", "p95_ms", "p99_ms"}
MODES = ["in_process_batch1", "in_process_batch16", "fleet_single_open_loop", "fleet_batch_open_loop",
         "fleet_single_saturation", "fleet_batch_saturation", "fleet_array_saturation",
         "fleet_array_saturation_small_messages", "fleet_batch_prequeued"]


def test_quick_fleet_bench_writes_rows_for_every_mode_with_every_request_answered_and_stored(tmp_path):
    from umcd.bench.fleet import QUICK, run_fleet_bench

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = run_fleet_bench(tmp_path / "artifacts", tmp_path / "out", quick=True)

    assert result["benchmark"] == "fleet"
    assert {"cpu_count", "torch", "loadavg_start", "loadavg_end"} <= set(result["machine"])
    assert result["settings"]["workers"] == 2 and result["settings"]["index_size"] >= QUICK.db_codes
    rows = {r["mode"]: r for r in result["rows"]}
    assert list(rows) == MODES
    for row in result["rows"]:
        assert ROW_KEYS <= set(row), row["mode"]
        assert row["images"] > 0 and row["images_per_s"] > 0
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    for mode in MODES[2:]:  # the fleet: every request answered, once, and stored in the audit store
        row = rows[mode]
        assert row["results"] == row["images"] == row["verdict_rows"], row
        assert row["errors"] == 0 and row["latency_missing"] == 0
        assert set(row["verdicts"]) <= {"benign", "adversarial"}
    assert rows["fleet_single_saturation"]["messages"] == QUICK.saturation_single
    assert QUICK.message_size > QUICK.batch_size  # a message spans several model batches
    assert rows["fleet_batch_saturation"]["messages"] == -(-QUICK.saturation_batch // QUICK.message_size)
    assert rows["fleet_batch_saturation"]["mean_model_batch"] > 1
    prequeued = rows["fleet_batch_prequeued"]  # queued while the workers did not consume, then released
    assert prequeued["messages"] == rows["fleet_batch_saturation"]["messages"] and prequeued["send_seconds"] > 0
    assert rows["fleet_array_saturation"]["messages"] == rows["fleet_batch_saturation"]["messages"]
    assert rows["fleet_array_saturation"]["submission"].startswith("pixel array")
    small = rows["fleet_array_saturation_small_messages"]  # the same array, one model batch per message
    assert small["messages"] == -(-QUICK.saturation_batch // QUICK.batch_size) and small["submission"].startswith("pixel")
    target = result["targets"]["batch_throughput_ratio"]
    assert target["measured"] == rows["fleet_array_saturation"]["ratio_to_in_process"]
    assert target["png_files"] == rows["fleet_batch_saturation"]["ratio_to_in_process"]
    assert target["png_files_queued_first"] == prequeued["ratio_to_in_process"]
    assert target["pixel_arrays_in_messages_of_one_model_batch"] == small["ratio_to_in_process"]
    assert target["images_per_message"] == QUICK.message_size
    for mode in ("fleet_single_saturation", "fleet_batch_saturation", "fleet_array_saturation",
                 "fleet_array_saturation_small_messages", "fleet_batch_prequeued"):
        bracket = rows[mode]["in_process_bracket"]  # the in-process rate right before and after the phase
        assert bracket["before"] > 0 and bracket["after"] > 0
        by_threads = bracket["images_per_s_by_threads"]  # each side at the faster of the thread counts tried
        assert set(by_threads["before"]) == set(by_threads["after"]) == set(result["settings"]["in_process_torch_threads_tried"])
        assert (bracket["before"], bracket["after"]) == (max(by_threads["before"].values()), max(by_threads["after"].values()))
        # counted from the moment both workers are seen stopped to their release (not the metrics calls around it)
        assert bracket["fleet_cpu_seconds_during_before"]["worker"] <= 0.01
        assert bracket["images_per_s"] == pytest.approx((bracket["before"] + bracket["after"]) / 2)
        threads = max(by_threads["before"])  # the most threads' rate over one thread's, mean of the two sides
        assert bracket["thread_scaling"] == (pytest.approx(
            sum(by_threads[side][threads] / by_threads[side][1] for side in ("before", "after")) / 2)
            if threads > 1 else None)
        assert bracket["one_thread_ms_per_image"] == pytest.approx(
            1e3 / ((by_threads["before"][1] + by_threads["after"][1]) / 2))
        assert rows[mode]["ratio_to_in_process"] == pytest.approx(rows[mode]["images_per_s"] / bracket["images_per_s"])
        assert rows[mode]["ratio_to_in_process_start_end"] == pytest.approx(
            rows[mode]["images_per_s"] / rows["in_process_batch16"]["images_per_s"])
    assert "ratio_to_in_process" not in rows["fleet_single_open_loop"]
    assert set(result["targets"]) == {"batch_throughput_ratio", "query_p99_ms_open_loop"}
    for mode in MODES[2:]:  # where the CPU went: the two workers, the producer (this process), redis-server
        cpu = rows[mode]["cpu"]
        assert set(cpu["cpu_seconds"]) == {"producer", "worker", "redis"} and cpu["cpu_seconds"]["worker"] > 0
        assert len(cpu["worker_rss_mib_start"]) == 2 and all(v > 50 for v in cpu["worker_rss_mib_end"].values())
        per_image = cpu["ms_per_image"]
        assert per_image["worker"] == pytest.approx(1e3 * cpu["cpu_seconds"]["worker"] / rows[mode]["images"], rel=1e-3)
        assert cpu["cpu_bound_images_per_s"] == pytest.approx(1e3 * cpu["cores"] / sum(per_image.values()), rel=1e-3)
        # the workers' own account of it (umcd_worker_cpu_seconds_total from their /metrics), the rest "other"
        stages = cpu["worker_stage_cpu_seconds"]
        assert {"decode", "score", "store", "other"} <= set(stages), stages
        assert all(stages[k] > 0 for k in ("decode", "score", "store")), stages
        # "other" is the workers' CPU outside their own stage accounts: those accounts never exceed it
        assert stages["other"] >= -0.02 * cpu["cpu_seconds"]["worker"], stages
        assert cpu["worker_stage_ms_per_image"]["score"] == pytest.approx(
            1e3 * stages["score"] / rows[mode]["images"], rel=1e-3)
        # scoring's share of all the fleet's CPU per image: the fleet's side of the ratio
        assert 0 < cpu["score_share"] < 1
        assert cpu["score_share"] == pytest.approx(cpu["worker_stage_ms_per_image"]["score"] / sum(per_image.values()),
                                                   rel=1e-2)
    for mode in ("fleet_batch_saturation", "fleet_array_saturation", "fleet_batch_prequeued"):
        assert rows[mode]["cpu"]["worker_stage_cpu_seconds"]["answer"] > 0  # batch messages store their own Results
    memory = result["worker_memory"]
    assert memory["requests"] == sum(rows[m]["images"] for m in MODES[2:]) and len(memory["growth"]) == 2
    assert memory["steady"]["requests"] == QUICK.saturation_batch and len(memory["steady"]["growth"]) == 2

    written = json.loads((tmp_path / "out" / "fleet.json").read_text())
    assert written == json.loads(json.dumps(result, default=float))
    png = (tmp_path / "out" / "fleet.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]
    assert left == [], [p.cmdline() for p in left]  # redis-server and the workers are stopped
