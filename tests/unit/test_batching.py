"""The in-worker micro-batcher: batches form under concurrency, stay bounded, and fail items one at a time."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from workers.batching import PENDING, BatcherStopped, BatchGroup, MicroBatcher

from tests.servers import wait_until


class Recorder:
    """A batch function that doubles numbers, records batch sizes, and can be held or poisoned."""

    def __init__(self, poison: set[int] = frozenset(), fail_item: set[int] = frozenset()) -> None:
        self.batches: list[list[int]] = []
        self.poison = set(poison)  # an item that makes the whole batch raise
        self.fail_item = set(fail_item)  # an item whose own outcome is an exception
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.entered.set()
        self.gate.wait(10)
        self.batches.append(list(items))
        if self.poison & set(items):
            raise RuntimeError(f"poisoned batch {items}")
        return [ValueError(f"bad item {x}") if x in self.fail_item else 2 * x for x in items]


def test_concurrent_submitters_share_batches_and_each_gets_its_own_result():
    fn = Recorder()
    fn.gate.clear()  # hold the first batch so that the others queue up behind it
    with MicroBatcher(fn, max_size=16, max_wait_s=0.02) as batcher:
        first = batcher.submit(-1)
        assert fn.entered.wait(5)
        with ThreadPoolExecutor(12) as pool:
            futures = list(pool.map(batcher.submit, range(60)))
        fn.gate.set()
        assert first.result(10) == -2
        assert [f.result(10) for f in futures] == [2 * x for x in range(60)]
    sizes = [len(b) for b in fn.batches]
    assert sum(sizes) == 61
    assert max(sizes) > 1
    assert batcher.stats.items == 61 and batcher.stats.max_size == max(sizes)


def test_submit_many_queues_items_in_order_and_they_share_batches():
    fn = Recorder()
    fn.gate.clear()  # hold the first batch so that the next ones gather from a full queue
    with MicroBatcher(fn, max_size=8, max_wait_s=0.5) as batcher:
        first = batcher.submit_many(range(8))  # a full batch: it runs at once
        assert fn.entered.wait(5)
        rest = batcher.submit_many(range(8, 28))
        assert not rest.done() and rest.outcomes == [PENDING] * 20
        fn.gate.set()
        assert first.wait(10) and rest.wait(10)
        assert first.outcomes + rest.outcomes == [2 * x for x in range(28)]
    assert fn.batches == [list(range(8)), list(range(8, 16)), list(range(16, 24)), list(range(24, 28))]


class CountingCondition:
    """A threading.Condition that counts how often a wait returned (the batching thread woke up)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self.wakeups = 0

    def __enter__(self):
        return self._cond.__enter__()

    def __exit__(self, *exc):
        return self._cond.__exit__(*exc)

    def wait(self, timeout=None):
        try:
            return self._cond.wait(timeout)
        finally:
            self.wakeups += 1

    def notify(self, n=1):
        self._cond.notify(n)


def test_a_gathering_batch_is_not_woken_for_every_item():
    """Items arriving one by one while a batch gathers wake the batching thread when the batch could be
    full or its wait is over, not once per item (each wake-up is a GIL hand-off with the submitters)."""
    fn = Recorder()
    batcher = MicroBatcher(fn, max_size=64, max_wait_s=1.0)
    batcher._ready = counting = CountingCondition()
    with batcher:
        assert wait_until(lambda: counting._cond._waiters, timeout=5)  # asleep, waiting for a first item
        futures = []
        for x in range(40):  # one by one, 2 ms apart (80 ms in all, within the 1 s wait)
            futures.append(batcher.submit(x))
            time.sleep(0.002)
        assert [f.result(10) for f in futures] == [2 * x for x in range(40)]
        assert fn.batches == [list(range(40))]  # one batch, closed by its wait
        assert counting.wakeups <= 3  # the first item, the end of the wait (and at most one spurious)
        more = batcher.submit_many(range(64))  # a full batch at once: no wait at all
        assert more.wait(10) and more.outcomes == [2 * x for x in range(64)]


def test_a_batch_never_exceeds_max_size():
    fn = Recorder()
    fn.gate.clear()
    with MicroBatcher(fn, max_size=5, max_wait_s=0.01) as batcher:
        futures = [batcher.submit(x) for x in range(40)]
        fn.gate.set()
        assert [f.result(10) for f in futures] == [2 * x for x in range(40)]
    assert max(len(b) for b in fn.batches) == 5
    assert sorted(x for b in fn.batches for x in b) == list(range(40))


def test_a_lone_item_is_processed_alone_after_the_wait():
    fn = Recorder()
    with MicroBatcher(fn, max_size=64, max_wait_s=0.01) as batcher:
        assert batcher.submit(21).result(10) == 42
    assert fn.batches == [[21]]


def test_an_item_whose_outcome_is_an_exception_fails_alone():
    fn = Recorder(fail_item={3})
    fn.gate.clear()
    with MicroBatcher(fn, max_size=8, max_wait_s=0.05) as batcher:
        futures = {x: batcher.submit(x) for x in range(6)}
        fn.gate.set()
        with pytest.raises(ValueError, match="bad item 3"):
            futures[3].result(10)
        assert {x: f.result(10) for x, f in futures.items() if x != 3} == {x: 2 * x for x in range(6) if x != 3}


def test_a_batch_that_raises_is_retried_item_by_item_so_batch_mates_still_succeed():
    fn = Recorder(poison={4})
    fn.gate.clear()
    with MicroBatcher(fn, max_size=8, max_wait_s=0.05) as batcher:
        held = batcher.submit(100)
        assert fn.entered.wait(5)
        futures = {x: batcher.submit(x) for x in range(8)}
        fn.gate.set()
        assert held.result(10) == 200
        with pytest.raises(RuntimeError, match="poisoned"):
            futures[4].result(10)
        assert all(futures[x].result(10) == 2 * x for x in range(8) if x != 4)
    assert any(len(b) > 1 and 4 in b for b in fn.batches)  # the poisoned batch ran once as a batch
    assert [4] in fn.batches  # and the poison item again on its own


def test_a_batch_function_returning_the_wrong_number_of_outcomes_fails_items_not_the_thread():
    calls = []

    def short(items):
        calls.append(list(items))
        return [] if len(items) > 1 else [items[0] + 1]

    with MicroBatcher(short, max_size=4, max_wait_s=0.05) as batcher:
        futures = [batcher.submit(x) for x in range(3)]
        assert [f.result(10) for f in futures] == [1, 2, 3]
        assert batcher.submit(9).result(10) == 10  # the thread is still alive


def test_a_failing_on_batch_callback_does_not_fail_the_batch():
    def boom(size, seconds):
        raise RuntimeError("metrics down")

    with MicroBatcher(Recorder(), max_size=4, max_wait_s=0.0, on_batch=boom) as batcher:
        assert batcher.submit(5).result(10) == 10


def test_stop_finishes_the_items_queued_before_it_and_refuses_new_ones():
    fn = Recorder()
    fn.gate.clear()
    batcher = MicroBatcher(fn, max_size=1, max_wait_s=0.0).start()
    running = batcher.submit(1)
    assert fn.entered.wait(5)
    queued = [batcher.submit(x) for x in range(2, 5)]
    stopper = threading.Thread(target=batcher.stop, kwargs={"timeout": 10})
    stopper.start()
    assert wait_until(lambda: not batcher.running)
    with pytest.raises(BatcherStopped):  # refused from the moment stop begins
        batcher.submit(9)
    fn.gate.set()
    stopper.join(10)
    assert running.result(10) == 2  # the batch in progress finishes
    assert [f.result(10) for f in queued] == [4, 6, 8]  # and so does what was queued before the stop
    assert fn.batches == [[1], [2], [3], [4]]


def test_stop_fails_what_is_still_queued_when_its_timeout_passes():
    fn = Recorder()
    fn.gate.clear()  # the batch in progress outlasts the stop's timeout
    batcher = MicroBatcher(fn, max_size=1, max_wait_s=0.0).start()
    running = batcher.submit(1)
    assert fn.entered.wait(5)
    queued = [batcher.submit(x) for x in range(2, 5)]
    group = batcher.submit_many([5, 6])  # a message's items, queued together
    batcher.stop(timeout=0.2)
    for f in queued:
        with pytest.raises(BatcherStopped):
            f.result(1)
    assert group.wait(1) and all(isinstance(o, BatcherStopped) for o in group.outcomes)
    fn.gate.set()
    assert running.result(10) == 2  # the batch that was running still answers
    assert fn.batches == [[1]]  # nothing queued ran after it
    with pytest.raises(BatcherStopped):
        batcher.submit_many([7])


def test_a_group_holds_each_items_own_outcome_and_a_cancelled_group_keeps_its_waiting_items_out():
    fn = Recorder(fail_item={3})
    fn.gate.clear()
    with MicroBatcher(fn, max_size=4, max_wait_s=0.0) as batcher:
        first = batcher.submit_many([1, 2, 3, 4])
        assert fn.entered.wait(5)  # the first batch is running; the second group waits in the queue
        second = batcher.submit_many([5, 6, 7])
        assert not second.wait(0.05)
        second.cancel()  # as a task whose wait ran out: the items not started yet are never scored
        fn.gate.set()
        assert first.wait(10)
        assert first.outcomes[:2] == [2, 4] and first.outcomes[3] == 8
        assert isinstance(first.outcomes[2], ValueError)  # item 3 failed alone
        assert batcher.submit_many([8]).wait(10)  # the batcher went on past the cancelled items
    assert second.outcomes == [PENDING] * 3 and not second.done()
    assert fn.batches == [[1, 2, 3, 4], [8]]
    assert BatchGroup(0).wait(0)  # nothing to wait for


def test_invalid_limits_are_refused():
    with pytest.raises(ValueError):
        MicroBatcher(lambda items: items, max_size=0, max_wait_s=0.01)
    with pytest.raises(ValueError):
        MicroBatcher(lambda items: items, max_size=4, max_wait_s=-1)


def test_a_deferred_stage_lets_the_batcher_score_the_next_batch_before_the_last_one_is_stored():
    """process may return a Future of its outcomes (the worker stores verdicts on a writer thread):
    the batcher runs the next batch while the first is still unanswered, and each item gets its own
    outcome, exceptions included, when the deferred stage finishes."""
    from concurrent.futures import Future

    stages: list[tuple[list[int], Future]] = []
    second_batch = threading.Event()

    def process(items: list[int]) -> Future:
        done: Future = Future()
        stages.append((list(items), done))
        if len(stages) == 2:
            second_batch.set()
        return done

    with MicroBatcher(process, max_size=2, max_wait_s=1.0) as batcher:  # a batch closes when full
        first = [batcher.submit(x) for x in (1, 2)]
        assert wait_until(lambda: len(stages) == 1)
        second = [batcher.submit(x) for x in (3, 4)]
        assert second_batch.wait(5), "the batcher waited for the first batch's deferred stage"
        assert not any(f.done() for f in first + second)
        stages[1][1].set_result([30, ValueError("bad 4")])
        stages[0][1].set_result([10, 20])
        assert [f.result(5) for f in first] == [10, 20]
        assert second[0].result(5) == 30
        with pytest.raises(ValueError, match="bad 4"):
            second[1].result(5)


def test_a_failed_deferred_stage_fails_each_item_of_its_batch_and_the_batcher_goes_on():
    from concurrent.futures import Future

    def process(items: list[int]) -> Future:
        done: Future = Future()
        if 0 in items:
            done.set_exception(OSError("the audit store is down"))
        elif 9 in items:
            done.set_result([1])  # one outcome for two items: a broken stage
        else:
            done.set_result([2 * x for x in items])
        return done

    with MicroBatcher(process, max_size=2, max_wait_s=1.0) as batcher:  # a batch closes when full
        failed = [batcher.submit(x) for x in (0, 5)]
        for f in failed:
            with pytest.raises(OSError, match="audit store is down"):
                f.result(5)
        broken = [batcher.submit(x) for x in (9, 8)]
        for f in broken:
            with pytest.raises(RuntimeError, match="1 outcomes for 2 items"):
                f.result(5)
        assert batcher.submit(7).result(5) == 14

