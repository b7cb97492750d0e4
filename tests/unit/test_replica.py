"""Index replicas against a real SQLite audit store: log replay, watermarks, local adds, removals, snapshots."""

from __future__ import annotations

import numpy as np
import pytest

from core.index import pack_codes
from db import repo
from db.session import make_engine, session_scope
from workers.replica import Replica, read_snapshot_meta, snapshot_paths

BITS = 32
V1, V2 = "v1aaaaaaaaaa", "v2bbbbbbbbbb"

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def codes(n: int, seed: int) -> list[bytes]:
    """n random packed 32-bit codes (4 bytes each)."""
    rng = np.random.default_rng(seed)
    return [c.tobytes() for c in pack_codes(rng.choice([-1, 1], size=(n, BITS)))]


def add_images(url: str, n: int, seed: int, version: str = V1) -> list[int]:
    with session_scope(url) as s:
        return repo.add_database_images(s, codes(n, seed), version, source="seed")


def insert_one(url: str, request_id: str, code: bytes, version: str = V1) -> int:
    with session_scope(url) as s:
        return repo.insert_database_image(s, request_id, code, version)


def quarantine(url: str, image_id: int) -> None:
    with session_scope(url) as s:
        repo.quarantine_image(s, image_id, ["test"])


def active_ids(url: str, version: str = V1) -> set[int]:
    with session_scope(url) as s:
        return {i for i, _ in repo.active_image_codes(s, version)}


def test_bootstrap_from_the_log_holds_exactly_the_active_images(db_url):
    ids = add_images(db_url, 20, seed=1)
    quarantine(db_url, ids[3])
    add_images(db_url, 5, seed=2, version=V2)  # another version's rows are not read
    replica = Replica.bootstrap(make_engine(db_url), V1, BITS)
    assert set(replica.index.ids().tolist()) == active_ids(db_url) == set(ids) - {ids[3]}
    with session_scope(db_url) as s:
        assert replica.watermark == repo.max_log_seq(s, V1)
    code = codes(20, seed=1)[7]
    found, dist = replica.index.search(np.frombuffer(code, np.uint8)[None], 1)
    assert found[0, 0] == ids[7] and dist[0, 0] == 0


def test_sync_applies_adds_and_removes_past_the_watermark(db_url):
    engine = make_engine(db_url)
    first = add_images(db_url, 10, seed=1)
    replica = Replica.bootstrap(engine, V1, BITS)
    mark = replica.watermark
    later = add_images(db_url, 4, seed=3)
    quarantine(db_url, first[0])
    read = replica.sync(engine)
    assert read == 5 and replica.watermark > mark
    assert set(replica.index.ids().tolist()) == active_ids(db_url) == (set(first) | set(later)) - {first[0]}
    assert replica.sync(engine) == 0  # nothing new: nothing read
    assert replica.lag_seconds >= 0.0


def test_two_log_rows_adding_one_image_put_it_in_the_index_once(db_url):
    """The index keeps every copy of an id added twice (a search would count that neighbour twice)."""
    from workers.replica import LogEntry

    engine = make_engine(db_url)
    replica = Replica.bootstrap(engine, V1, BITS)
    code = codes(1, seed=4)[0]
    replica.apply([LogEntry(replica.watermark + 1, "add", 77, code, 0.0),
                   LogEntry(replica.watermark + 2, "add", 77, code, 0.0)])
    assert replica.index.ids().tolist() == [77]
    found, _ = replica.index.search(np.frombuffer(code, np.uint8)[None], 2)
    assert found[0].tolist() == [77, -1]


def test_a_local_add_is_not_duplicated_when_its_log_row_arrives(db_url):
    engine = make_engine(db_url)
    add_images(db_url, 3, seed=1)
    replica = Replica.bootstrap(engine, V1, BITS)
    code = codes(1, seed=9)[0]
    image_id = insert_one(db_url, "req-local", code)
    assert replica.add_local(image_id, code) is True
    assert replica.add_local(image_id, code) is False
    replica.sync(engine)
    assert len(replica) == 4
    assert replica.index.ids().tolist().count(image_id) == 1
    assert list(replica.visibility) == []  # the row was visible before it was read back


def test_a_removed_image_never_comes_back(db_url):
    engine = make_engine(db_url)
    code = codes(1, seed=4)[0]
    image_id = insert_one(db_url, "req-removed", code)
    replica = Replica.bootstrap(engine, V1, BITS)
    assert replica.contains(image_id)
    quarantine(db_url, image_id)
    replica.sync(engine)
    assert not replica.contains(image_id)
    assert replica.add_local(image_id, code) is False
    assert image_id not in replica.index.ids().tolist()


def test_rows_read_from_the_log_report_their_visibility_delay_but_bootstrap_rows_do_not(db_url):
    engine = make_engine(db_url)
    add_images(db_url, 6, seed=1)
    seen: list[list[float]] = []
    replica = Replica.bootstrap(engine, V1, BITS, on_visible=seen.append)
    assert seen == [] and len(replica.visibility) == 0
    add_images(db_url, 2, seed=2)
    replica.sync(engine)
    assert len(seen) == 1 and len(seen[0]) == 2
    assert all(d >= 0 for d in seen[0]) and len(replica.visibility) == 2


def test_snapshot_then_log_equals_a_full_replay(db_url, tmp_path):
    engine = make_engine(db_url)
    ids = add_images(db_url, 30, seed=1)
    writer = Replica.bootstrap(engine, V1, BITS)
    assert writer.save_snapshot(tmp_path)
    index_path, meta_path, _ = snapshot_paths(tmp_path, V1)
    assert index_path.is_file() and read_snapshot_meta(tmp_path, V1)["watermark"] == writer.watermark
    more = add_images(db_url, 7, seed=5)
    quarantine(db_url, ids[0])
    resumed = Replica.bootstrap(engine, V1, BITS, snapshot_dir=tmp_path)
    assert resumed.snapshot_watermark == writer.watermark
    assert resumed.applied_rows == 8  # only the rows past the snapshot were read
    full = Replica.bootstrap(engine, V1, BITS)
    assert set(resumed.index.ids().tolist()) == set(full.index.ids().tolist()) == (set(ids) | set(more)) - {ids[0]}
    probe = np.frombuffer(b"".join(codes(30, seed=1)[:5]), np.uint8).reshape(5, BITS // 8)
    assert np.array_equal(resumed.index.search(probe, 5)[1], full.index.search(probe, 5)[1])


def test_a_snapshot_is_not_overwritten_by_an_older_one(db_url, tmp_path):
    engine = make_engine(db_url)
    add_images(db_url, 5, seed=1)
    old = Replica.bootstrap(engine, V1, BITS)
    add_images(db_url, 5, seed=2)
    new = Replica.bootstrap(engine, V1, BITS)
    assert new.save_snapshot(tmp_path)
    assert old.save_snapshot(tmp_path) is False
    assert read_snapshot_meta(tmp_path, V1)["watermark"] == new.watermark


def test_a_damaged_snapshot_is_ignored_and_the_log_replayed(db_url, tmp_path):
    engine = make_engine(db_url)
    ids = add_images(db_url, 8, seed=1)
    Replica.bootstrap(engine, V1, BITS).save_snapshot(tmp_path)
    index_path, _, _ = snapshot_paths(tmp_path, V1)
    index_path.write_bytes(b"not a faiss index")
    replica = Replica.bootstrap(engine, V1, BITS, snapshot_dir=tmp_path)
    assert replica.snapshot_watermark == 0
    assert set(replica.index.ids().tolist()) == set(ids)


def test_a_log_row_with_a_code_of_the_wrong_length_is_refused(db_url):
    engine = make_engine(db_url)
    with session_scope(db_url) as s:
        repo.add_database_images(s, [b"\x01\x02"], V1)  # 16 bits in a 32-bit version
    with pytest.raises(ValueError, match="code of 2 bytes"):
        Replica.bootstrap(engine, V1, BITS)
