"""The byte counter: thread-safe sums by round, client, direction and message type."""

from __future__ import annotations

import threading

import pytest

from fedafd.runtime.accounting import ByteCounter


def test_counter_is_thread_safe_and_sums():
    counter = ByteCounter()

    def work(i: int) -> None:
        for _ in range(1000):
            counter.add(i % 2, f"c{i}", "up", "feature_upload", 3)
            counter.add(i % 2, f"c{i}", "down", "ack", 1)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert counter.rounds() == [0, 1]
    assert counter.for_round(1) == {f"c{i}": {"up": {"feature_upload": 3000}, "down": {"ack": 1000}}
                                    for i in (1, 3)}
    assert sum(v["up"]["feature_upload"] for v in counter.totals().values()) == 12000


def test_counter_rejects_unknown_direction():
    with pytest.raises(ValueError, match="sideways"):
        ByteCounter().add(0, "c", "sideways", "ack", 1)
