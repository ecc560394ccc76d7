"""The decode pacer's grouping rules, on an event loop with no sockets."""

import asyncio

from mesh.coordinator.pacer import DecodePacer


class Recorder:
    """Records which sessions' steps left together (one list per departure)."""

    def __init__(self, groups=1):
        self.departures: list[list[int]] = []
        self._current: list[int] = []
        self.pacer = DecodePacer(groups, on_depart=self._depart)

    def _depart(self):
        self.departures.append(sorted(self._current))
        self._current = []

    def ready(self, *sessions):
        for s in sessions:
            self.pacer.ready(s, lambda s=s: self._current.append(s))


async def _turn():
    for _ in range(3):
        await asyncio.sleep(0)


def run(body):
    return asyncio.run(body())


def test_one_session_never_waits():
    async def body():
        r = Recorder()
        for _ in range(3):
            r.ready(7)
            r.pacer.arrived(7)
        assert r.departures == [[7], [7], [7]]
    run(body)


def test_a_returned_group_leaves_as_soon_as_its_last_member_is_ready():
    async def body():
        r = Recorder()
        r.ready(1, 2, 3)  # the first ready one leaves alone; the others wait for it
        await _turn()
        assert r.departures == [[1]]
        r.pacer.arrived(1)
        r.ready(1)
        assert r.departures == [[1], [1, 2, 3]]  # phases merged
        for s in (1, 2, 3):
            r.pacer.arrived(s)
        r.ready(3)
        r.ready(1)
        assert len(r.departures) == 2  # 2 not ready yet
        r.ready(2)
        assert r.departures[-1] == [1, 2, 3]
    run(body)


def test_a_partly_returned_group_waits_for_the_rest_and_newcomers_join():
    async def body():
        r = Recorder()
        r.ready(1, 2)
        await _turn()
        r.pacer.arrived(1)
        r.pacer.arrived(2)
        r.ready(1, 2)
        assert r.departures[-1] == [1, 2]
        r.pacer.arrived(1)  # 2's token is still out: nobody leaves
        r.ready(1)
        r.ready(9)  # a new session
        await _turn()
        assert r.departures[-1] == [1, 2]
        r.pacer.arrived(2)
        r.ready(2)
        assert r.departures[-1] == [1, 2, 9]
    run(body)


def test_ended_and_slow_members_do_not_hold_their_group():
    async def body():
        r = Recorder()
        r.ready(1, 2, 3)
        await _turn()
        r.pacer.arrived(1)
        r.ready(1)
        for s in (1, 2, 3):
            r.pacer.arrived(s)
        r.ready(1)
        r.pacer.forget(2)  # finished
        assert r.departures[-1] == [1, 2, 3]  # 3 not ready yet
        await _turn()  # 3's caller is busy: the group leaves without it at the turn's end
        assert r.departures[-1] == [1]
        r.ready(3)
        await _turn()
        r.pacer.arrived(1)
        r.ready(1)
        assert r.departures[-1] == [1, 3]
    run(body)


def test_with_two_groups_one_leaves_while_the_other_is_out():
    async def body():
        r = Recorder(groups=2)
        r.ready(1)
        r.ready(2)
        await _turn()
        assert r.departures == [[1], [2]]
        r.ready(3)
        await _turn()
        assert len(r.departures) == 2  # two groups out: 3 waits
        r.pacer.arrived(1)
        r.ready(1)
        assert r.departures[-1] == [1, 3]
    run(body)
