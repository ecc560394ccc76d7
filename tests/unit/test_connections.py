"""The coordinator's connection to a stage reads what the stage sends in bounded turns."""

from __future__ import annotations

import asyncio

import zmq

from mesh.coordinator.connections import READ_BATCH, StageConnection
from mesh.transport import frames as fr
from mesh.transport.messages import Error, Message

ORIGIN = b"coord-flood"


def test_a_flood_from_a_stage_is_read_in_turns_and_in_order():
    total = 3 * READ_BATCH + 10

    async def main() -> tuple[int, int, list[Message]]:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.bind("inproc://stage")
        got: list[Message] = []
        conn = StageConnection(0, "inproc://stage", ORIGIN, ctx, lambda c, m: got.append(m))
        try:
            conn.send(fr.encode(Error(code="x", message="hello", session=None, stage="s")))
            router.recv_multipart()  # the stage now knows the coordinator's routing id
            for i in range(total):  # inproc: each message is in the connection's queue now
                router.send_multipart([ORIGIN, fr.error_frame("x", str(i), 1, "s")])
            conn.start()
            first_turn = len(got)
            seen: list[int] = []
            asyncio.get_running_loop().call_soon(lambda: seen.append(len(got)))
            for _ in range(100):
                if len(got) == total:
                    break
                await asyncio.sleep(0)
            return first_turn, seen[0], got
        finally:
            await conn.close()
            router.close(linger=0)
            ctx.term()

    first_turn, later, got = asyncio.run(main())
    assert first_turn == READ_BATCH  # one turn reads a bounded batch, not the whole flood
    assert READ_BATCH < later < total  # other callbacks ran while messages were waiting
    assert [m.message for m in got if isinstance(m, Error)] == [str(i) for i in range(total)]
