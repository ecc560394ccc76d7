"""A link-delay shim: a TCP forwarder that holds every byte for a fixed one-way delay.

The kernel here has no netem, so delay is injected in user space: each ``DelayedLink`` listens
on a loopback port and forwards to one stage, holding the bytes of each direction for
``delay_ms`` before passing them on (order kept; bandwidth not limited). Put one in front of
every stage and give the links' URLs to the coordinator and to the chain: then every hop
(coordinator → stage 0, stage i → stage i+1, final stage → coordinator) pays the delay once,
as between machines.

Runs on a thread of its own with an asyncio loop; used by ``scripts/bench_wan.py`` and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

from mesh.launcher import free_port


class DelayedLink:
    def __init__(self, target_host: str, target_port: int, delay_ms: float):
        self.target = (target_host, target_port)
        self.delay_s = delay_ms / 1e3
        self.port = free_port()
        self.url = f"tcp://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="delayed-link")

    def __enter__(self) -> DelayedLink:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _shutdown(self) -> None:
        """Every connection's tasks end before the loop does."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        with contextlib.suppress(asyncio.CancelledError):  # shutting down: nothing to report
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer),
                                 return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Bytes read at t leave at t + delay, in order."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            while data := await reader.read(1 << 16):
                queue.put_nowait((time.monotonic() + self.delay_s, data))
        except OSError:
            pass
        queue.put_nowait((0.0, b""))
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await sender
        writer.close()
