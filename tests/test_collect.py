"""Phase collectors (who may answer, once, by when) and the update stream."""

import asyncio
import threading

import pytest

from fedplug.collect import PhaseCollector, UpdateStream


def test_admits_each_expected_client_once_for_its_round():
    async def go():
        c = PhaseCollector("client_update", 3, {"a", "b"})
        assert "round 2" in c.admit("a", 2)
        assert "not asked" in c.admit("z", 3)
        assert c.admit("a", 3) is None
        assert "duplicate" in c.admit("a", 3)
        c.settle("a", 1)
        assert not c.complete
        c.give_up("b")
        assert "given up" in c.admit("b", 3)
        assert c.complete and await c.wait(0.1)
        assert c.values() == {"a": 1}
    asyncio.run(go())


def test_deadline_bounds_the_wait_and_pending_work_holds_completion():
    async def go():
        c = PhaseCollector("client_eval", 1, {"a"})
        assert await c.wait(0.05) is False
        c.admit("a", 1)
        c.begin_work()
        c.settle("a", {"x": 1})
        assert not c.complete  # still decoding
        c.end_work()
        assert c.complete
    asyncio.run(go())


def test_update_stream_yields_as_items_arrive_and_only_once():
    s = UpdateStream()
    seen = []
    t = threading.Thread(target=lambda: seen.extend(s))
    t.start()
    s.put("u1")
    s.put("u2")
    s.close()
    t.join(5)
    assert seen == ["u1", "u2"]
    with pytest.raises(RuntimeError):
        list(s)
