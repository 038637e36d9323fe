"""Push queues: bounded, never blocking, drained with retries while the peer lives.

Everything runs under trio's MockClock; retry delays and lag are checked
against the times the fake `send` recorded.
"""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing

from stemedb.errors import SignatureError, StorageFull, Unavailable
from stemedb.replication.framing import RecordBatch
from stemedb.replication.push import PushBatch, PushQueue


def batch(records: int, size: int = 10) -> PushBatch:
    offsets = np.arange(records + 1, dtype=np.int64) * size
    return PushBatch(RecordBatch(bytes(records * size), offsets, np.zeros((records, 32), np.uint8)))


def run(main):
    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_offer_respects_both_bounds_and_counts_drops():
    async def main():
        queue = PushQueue("b", max_records=5, max_bytes=100)
        assert queue.offer(batch(3))                      # 3 records, 30 bytes
        assert not queue.offer(batch(3))                  # 6 records: over
        assert queue.offer(batch(2, size=35))             # 5 records, 100 bytes: fits exactly
        assert not queue.offer(batch(1, size=1))          # over both
        assert (queue.depth_batches, queue.depth_records, queue.depth_bytes) == (2, 5, 100)
        assert (queue.stats.dropped_batches, queue.stats.dropped_records) == (2, 4)
        assert queue.stats.offered_records == 9
        big = PushQueue("c", max_records=10, max_bytes=50)
        assert not big.offer(batch(1, size=51))           # larger than the queue itself
    run(main)


def test_nothing_is_sent_while_the_peer_is_down_then_everything_in_order():
    sent = []

    async def send(pushed):
        sent.append((trio.current_time(), pushed.records))

    async def main():
        queue = PushQueue("b", coalesce_records=1)     # each batch in a push of its own
        for n in (1, 2, 3):
            queue.offer(batch(n))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.run, send)
            await trio.sleep(10)
            assert sent == [] and queue.lag() == 10.0
            queue.peer_up()
            await trio.sleep(0.001)
            assert [n for _, n in sent] == [1, 2, 3] and queue.depth_batches == 0
            assert queue.lag() == 0.0 and queue.stats.sent_records == 6
            nursery.cancel_scope.cancel()
    run(main)


def test_transient_failures_retry_with_doubling_backoff_and_disk_full_waits_for_space():
    attempts = []
    disk_full_until = [3.0]

    async def send(pushed):
        attempts.append(trio.current_time())
        if len(attempts) <= 2:
            raise Unavailable("connection lost")
        if trio.current_time() < disk_full_until[0]:
            raise StorageFull("disk full on the replica")

    async def main():
        queue = PushQueue("b", retry_initial=0.05, retry_max=1.0)
        queue.peer_up()
        queue.offer(batch(4))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.run, send)
            await trio.sleep(2.0)
            assert queue.depth_records == 4 and queue.lag() == 2.0     # still stuck on the full disk
            await trio.sleep(5.0)
            assert queue.depth_records == 0 and queue.stats.sent_records == 4
            nursery.cancel_scope.cancel()
        return queue

    queue = run(main)
    gaps = np.diff(attempts)
    assert list(gaps[:5]) == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8])
    assert all(g == pytest.approx(1.0) for g in gaps[5:])             # capped at retry_max
    assert attempts[-1] >= 3.0 and attempts[-2] < 3.0
    assert queue.stats.send_failures == len(attempts) - 1


def test_a_refused_batch_is_dropped_not_retried():
    sent = []

    async def send(pushed):
        if pushed.records == 2:
            raise SignatureError("records[0]: bad signature")
        sent.append(pushed.records)

    async def main():
        queue = PushQueue("b", coalesce_records=1)
        queue.peer_up()
        for n in (1, 2, 3):
            queue.offer(batch(n))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.run, send)
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
        return queue

    queue = run(main)
    assert sent == [1, 3]
    assert (queue.stats.refused_batches, queue.stats.refused_records) == (1, 2)
    assert queue.stats.send_failures == 0


def test_a_peer_going_down_suspends_retries_until_it_is_up():
    attempts = []

    async def send(pushed):
        attempts.append(trio.current_time())
        if trio.current_time() < 20:
            raise Unavailable("no route")

    async def main():
        queue = PushQueue("b", retry_initial=0.5, retry_max=0.5)
        queue.peer_up()
        queue.offer(batch(1))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.run, send)
            await trio.sleep(2.1)
            queue.peer_down()
            await trio.sleep(18)
            assert len(attempts) == 5            # 0, 0.5, ..., 2.0; none once down
            queue.peer_up()
            await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
        return queue

    queue = run(main)
    assert attempts[:5] == pytest.approx([0, 0.5, 1.0, 1.5, 2.0])
    assert attempts[-1] == pytest.approx(20.1) and queue.depth_batches == 0


def test_offer_never_waits_even_while_the_drain_is_stuck():
    async def stuck(pushed):
        await trio.sleep_forever()

    async def main():
        queue = PushQueue("b", max_records=3)
        queue.peer_up()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.run, stuck)
            await trio.sleep(1)
            started = trio.current_time()
            results = [queue.offer(batch(1)) for _ in range(10)]
            assert trio.current_time() == started
            assert results == [True] * 3 + [False] * 7
            nursery.cancel_scope.cancel()
        figures = queue.figures()
        assert figures["depth_records"] == 3 and figures["dropped_records"] == 7
    run(main)


def test_push_delays_are_enqueued_to_confirmed_and_give_p50_and_p99():
    async def send(pushed):
        await trio.sleep(0.01 * pushed.records)     # the peer confirms after records × 10 ms

    async def main():
        queue = PushQueue("b")
        assert queue.delay_quantiles() is None and queue.figures()["delay_p99_seconds"] is None
        queue.peer_up()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.run, send)
            for records in [1] * 98 + [50, 100]:
                queue.offer(batch(records))
                await trio.sleep(2)                  # each batch sent alone: delay = its own send
            nursery.cancel_scope.cancel()
        assert len(queue.delays) == 100
        p50, p99 = queue.delay_quantiles()
        assert p50 == pytest.approx(0.01) and p99 == pytest.approx(0.5)
        figures = queue.figures()
        assert (figures["delay_p50_seconds"], figures["delay_samples"]) == (p50, 100)
    run(main)


def tagged(tag: int, records: int) -> PushBatch:
    pushed = batch(records)
    pushed.batch.ids[:, 0] = tag
    return pushed


def test_a_queue_that_fell_behind_drains_in_coalesced_pushes_in_order():
    sent = []

    async def send(pushed):
        sent.append([int(i) for i in pushed.batch.ids[:, 0]])
        await trio.sleep(0.1)

    async def main():
        queue = PushQueue("b", coalesce_records=5, coalesce_bytes=1000)
        for tag in range(1, 8):                       # 7 batches of 2 records, queued while down
            queue.offer(tagged(tag, 2))
        queue.offer(tagged(8, 7))                     # larger than a push: goes alone
        queue.offer(tagged(9, 1))
        await trio.sleep(1)
        queue.peer_up()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.run, send)
            await trio.sleep(5)
            nursery.cancel_scope.cancel()
        return queue

    queue = run(main)
    assert sent == [[1, 1, 2, 2], [3, 3, 4, 4], [5, 5, 6, 6], [7, 7], [8] * 7, [9]]
    assert (queue.stats.sent_batches, queue.stats.sent_records, queue.depth_batches) == (9, 22, 0)
    assert len(queue.delays) == 9 and min(queue.delays) == pytest.approx(1.1)


def test_a_refused_coalesced_push_is_sent_batch_by_batch_and_only_the_bad_one_dropped():
    sent = []

    async def send(pushed):
        tags = [int(i) for i in pushed.batch.ids[:, 0]]
        if 2 in tags:
            raise SignatureError("records[0]: bad signature")
        sent.append(tags)

    async def main():
        queue = PushQueue("b")
        for tag in (1, 2, 3):
            queue.offer(tagged(tag, 1))
        queue.peer_up()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.run, send)
            await trio.sleep(1)
            queue.offer(tagged(4, 1))
            queue.offer(tagged(5, 1))
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
        return queue

    queue = run(main)
    assert sent == [[1], [3], [4, 5]]       # after the refusal one at a time, then coalesced again
    assert (queue.stats.refused_batches, queue.stats.refused_records) == (1, 1)


def test_a_batch_queued_while_a_push_is_on_its_way_goes_out_without_waiting_for_it():
    began = []

    async def send(pushed):
        began.append((trio.current_time(), [int(i) for i in pushed.batch.ids[:, 0]]))
        await trio.sleep(0.1)                         # the peer answers after 100 ms

    async def main(window):
        began.clear()
        queue = PushQueue("b", window=window)
        queue.peer_up()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.run, send)
            queue.offer(tagged(1, 1))
            await trio.sleep(0.01)
            queue.offer(tagged(2, 1))
            await trio.sleep(0.005)
            assert queue.depth_batches == 2 and queue.depth_records == 2   # in flight still held
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
        return queue, list(began)

    queue, two = trio.run(main, 2, clock=trio.testing.MockClock(autojump_threshold=0))
    assert two == [(pytest.approx(0.0), [1]), (pytest.approx(0.01), [2])]
    assert sorted(queue.delays) == pytest.approx([0.1, 0.1]) and queue.depth_batches == 0
    assert max(queue.waits) == pytest.approx(0.0) and list(queue.sends) == pytest.approx([0.1, 0.1])
    queue, one = trio.run(main, 1, clock=trio.testing.MockClock(autojump_threshold=0))
    assert one == [(pytest.approx(0.0), [1]), (pytest.approx(0.1), [2])]     # window 1: waits its turn
    assert sorted(queue.delays) == pytest.approx([0.1, 0.19])


def test_pushes_unconfirmed_when_the_senders_stop_go_back_to_the_head_of_the_queue():
    async def stuck(pushed):
        await trio.sleep_forever()

    async def main():
        queue = PushQueue("b", window=2, coalesce_records=1)
        queue.peer_up()
        for tag in (1, 2, 3):
            queue.offer(tagged(tag, 1))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.run, stuck)
            await trio.sleep(1)
            assert queue.depth_batches == 3 and len(queue._batches) == 1      # two in flight
            nursery.cancel_scope.cancel()
        assert [int(b.batch.ids[0, 0]) for b in queue._batches] == [1, 2, 3]
        assert (queue.depth_batches, queue.depth_records) == (3, 3) and queue.lag() == 1.0
        sent = []

        async def send(pushed):
            sent.append(int(pushed.batch.ids[0, 0]))

        async with trio.open_nursery() as nursery:                            # a new drain sends them
            nursery.start_soon(queue.run, send)
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
        assert sorted(sent) == [1, 2, 3] and queue.depth_records == 0
    run(main)


def test_the_window_must_be_positive():
    with pytest.raises(ValueError, match="window"):
        PushQueue("b", window=0)
